#!/usr/bin/env bash
# Benchmark: builds the release binary, starts a fresh intake and worker
# against a new database `prereg_bench` and a private RabbitMQ prefix, runs
# the load generator (`prereg-loadgen`, the workspace crate loadgen/) against
# them and stops them again.
#
#   scripts/bench.sh                              # defaults of the load generator
#   scripts/bench.sh --requests 5000 --partners 20 --json
#   scripts/bench.sh --rate 500 --concurrency 128
#
# Extra arguments go to the load generator (see `target/release/prereg-loadgen --help`).
# Needs PostgreSQL, RabbitMQ and Redis on 127.0.0.1 (scripts/services-up.sh).
# Any PREREG_* variable not set below (e.g. PREREG_WORKER_CONCURRENCY,
# PREREG_DB_MAX_CONNECTIONS) passes through to both services.
#
# Environment knobs: BENCH_PG (server URL, default postgres://postgres@127.0.0.1:5432),
# BENCH_DB (database, default prereg_bench), BENCH_KEEP_QUEUES=1 (leave the
# RabbitMQ queues and exchanges of the run in place), BENCH_LOG_DIR (service logs),
# BENCH_BIN_DIR (prebuilt prereg and prereg-loadgen; no build).
set -euo pipefail

cd "$(dirname "$0")/.."

PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
DB="${BENCH_DB:-prereg_bench}"
HTTP_ADDR=127.0.0.1:18080
METRICS_ADDR=127.0.0.1:19091
# BENCH_BIN_DIR: run prebuilt binaries from there instead of building.
BIN_DIR="${BENCH_BIN_DIR:-target/release}"
BIN="$BIN_DIR/prereg"
LOADGEN="$BIN_DIR/prereg-loadgen"

log() { echo "bench.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ "$DB" =~ ^[a-z_][a-z0-9_]*$ ]] || die "BENCH_DB must be a plain lower-case identifier"

# ------------------------------------------------------------------ machine
echo "== machine =="
echo "cpus:   $(nproc)"
echo "model:  $(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || echo unknown)"
echo "memory: $(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo 2>/dev/null || echo unknown)"
echo "kernel: $(uname -sr)"
echo "load:   $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown) (1, 5, 15 min)"
echo "git:    $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
echo

# -------------------------------------------------------------------- build
if [ -z "${BENCH_BIN_DIR:-}" ]; then
  log "cargo build --release (prereg and prereg-loadgen)"
  cargo build --release -p prereg -p prereg-loadgen
fi

# ----------------------------------------------------------------- database
log "recreating database $DB"
psql -X -q -v ON_ERROR_STOP=1 "$PG/postgres" \
  -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" \
  -c "CREATE DATABASE $DB" >/dev/null

export PREREG_DATABASE_URL="$PG/$DB"
export PREREG_AMQP_PREFIX="bench-$$"
export PREREG_OPERATOR_TOKEN=bench-operator
# A throwaway local stack: development mode accepts its short secrets.
export PREREG_DEV_MODE=1
export PREREG_HTTP_ADDR="$HTTP_ADDR"
export PREREG_METRICS_ADDR="$METRICS_ADDR"
export PREREG_LOG_FORMAT=json
export PREREG_PARTNER_QUOTA="${PREREG_PARTNER_QUOTA:-1000000}"
export RUST_LOG=warn

"$BIN" migrate >/dev/null

# ----------------------------------------------------------------- services
LOG_DIR="${BENCH_LOG_DIR:-$(mktemp -d /tmp/prereg-bench.XXXXXX)}"
mkdir -p "$LOG_DIR"
INTAKE_PID=""
WORKER_PID=""

stop() {
  local pids=()
  [ -n "$INTAKE_PID" ] && pids+=("$INTAKE_PID")
  [ -n "$WORKER_PID" ] && pids+=("$WORKER_PID")
  [ ${#pids[@]} -gt 0 ] || return 0
  log "stopping intake and worker (SIGTERM)"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  # They drain within PREREG_SHUTDOWN_GRACE (25 s by default); then force.
  local deadline=$((SECONDS + 40))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid still running after 40 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  INTAKE_PID=""
  WORKER_PID=""
}

# Best effort, with rabbitmqctl (the management plugin may be off): queues,
# then exchanges (no rabbitmqctl command for those; `eval` of the broker's own
# delete, as in RabbitMQ 3.x).
delete_topology() {
  [ -z "${BENCH_KEEP_QUEUES:-}" ] || return 0
  command -v rabbitmqctl >/dev/null 2>&1 || return 0
  local queues exchanges
  queues="$(timeout 30 rabbitmqctl -q list_queues name </dev/null 2>/dev/null | grep "^$PREREG_AMQP_PREFIX\\." || true)"
  exchanges="$(timeout 30 rabbitmqctl -q list_exchanges name </dev/null 2>/dev/null | grep "^$PREREG_AMQP_PREFIX\\." || true)"
  [ -n "$queues$exchanges" ] || return 0
  log "deleting the RabbitMQ queues and exchanges of prefix $PREREG_AMQP_PREFIX"
  local q x
  while read -r q; do
    [ -n "$q" ] || continue
    # rabbitmqctl reads stdin: keep it away from the list being read.
    timeout 30 rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1 || log "could not delete queue $q"
  done <<<"$queues"
  while read -r x; do
    [ -n "$x" ] || continue
    timeout 30 rabbitmqctl -q eval \
      "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$x\">>), false, <<\"bench\">>)." \
      </dev/null >/dev/null 2>&1 || log "could not delete exchange $x"
  done <<<"$exchanges"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop
  delete_topology
  log "service logs: $LOG_DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting intake on $HTTP_ADDR and worker (health on $METRICS_ADDR), AMQP prefix $PREREG_AMQP_PREFIX"
"$BIN" intake >"$LOG_DIR/intake.log" 2>&1 &
INTAKE_PID=$!
"$BIN" worker >"$LOG_DIR/worker.log" 2>&1 &
WORKER_PID=$!

wait_ready() {
  local name="$1" pid="$2" url="$3" deadline=$((SECONDS + 60))
  until curl -fsS -o /dev/null --max-time 2 "$url"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited; last lines of $LOG_DIR/$name.log:"
      tail -n 20 "$LOG_DIR/$name.log" >&2 || true
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$name not ready after 60 s; last lines of $LOG_DIR/$name.log:"
      tail -n 20 "$LOG_DIR/$name.log" >&2 || true
      exit 1
    fi
    sleep 0.5
  done
}
wait_ready intake "$INTAKE_PID" "http://$HTTP_ADDR/readyz"
wait_ready worker "$WORKER_PID" "http://$METRICS_ADDR/readyz"
log "intake pid $INTAKE_PID and worker pid $WORKER_PID are ready"

# -------------------------------------------------------------------- bench
rc=0
"$LOADGEN" --url "http://$HTTP_ADDR" \
  --intake-pid "$INTAKE_PID" --worker-pid "$WORKER_PID" \
  --metrics-url "http://$HTTP_ADDR/metrics,http://$METRICS_ADDR/metrics" "$@" || rc=$?

for name in intake worker; do
  n="$(grep -c '"level":"\(WARN\|ERROR\)"' "$LOG_DIR/$name.log" 2>/dev/null || true)"
  log "$name logged ${n:-0} warnings/errors ($LOG_DIR/$name.log)"
done
exit "$rc"
