#!/usr/bin/env bash
# Soak benchmark (not a CI test): a steady rate of pre-registrations for
# DURATION seconds against an intake and two workers, all on PRIVATE
# instances (Postgres, Redis, a 3-node RabbitMQ cluster) started here under
# a temporary directory, with a fault every FAULT_EVERY seconds in rotation:
#   worker SIGKILL (restarted), RabbitMQ node restart, Redis restart,
#   Postgres restart (fast shutdown).
# Reports accepted, refused, decided, double claims (must be 0), retries,
# dead letters and the RSS of every process over time (CSV).
# The machine's shared services are never touched.
#
#   scripts/soak.sh                  # 30 minutes, 20 req/s, a fault every 3 minutes
#   DURATION=300 FAULT_EVERY=60 scripts/soak.sh
#
# Environment: DURATION (s, 1800), RATE (req/s, 20), FAULT_EVERY (s, 180),
# PARTNERS (20), PREREG_BIN (default target/release/prereg, else debug),
# PREREG_LOADGEN (default: prereg-loadgen beside PREREG_BIN),
# SOAK_DIR (kept afterwards when KEEP=1), PG_PORT (55432), REDIS_PORT (56379),
# AMQP_BASE (45672), HTTP_PORT (58080).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-1800}
RATE=${RATE:-20}
FAULT_EVERY=${FAULT_EVERY:-180}
PARTNERS=${PARTNERS:-20}
PG_PORT=${PG_PORT:-55432}
REDIS_PORT=${REDIS_PORT:-56379}
AMQP_BASE=${AMQP_BASE:-45672}
HTTP_PORT=${HTTP_PORT:-58080}
SOAK_DIR=${SOAK_DIR:-$(mktemp -d /tmp/prereg-soak.XXXXXX)}
BIN=${PREREG_BIN:-}
if [ -z "$BIN" ]; then
  if [ -x target/release/prereg ]; then BIN=target/release/prereg; else BIN=target/debug/prereg; fi
fi
[ -x "$BIN" ] || { echo "build prereg first (cargo build --release)" >&2; exit 1; }
BIN=$(realpath "$BIN")
# The load generator is its own workspace crate (not in the prereg binary).
LOADGEN=${PREREG_LOADGEN:-$(dirname "$BIN")/prereg-loadgen}
[ -x "$LOADGEN" ] || { echo "build the load generator first (cargo build [--release] -p prereg-loadgen)" >&2; exit 1; }
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
CLUSTER=(env CLUSTER_DIR="$SOAK_DIR/rabbit" BASE_PORT="$AMQP_BASE" CLUSTER_NAME=prereg-soak NODES=3 scripts/rabbitmq-cluster.sh)
mkdir -p "$SOAK_DIR"
echo "soak: ${DURATION}s at ${RATE}/s, a fault every ${FAULT_EVERY}s; state in $SOAK_DIR; binary $BIN"

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$PG_PORT" "$REDIS_PORT" "$HTTP_PORT" "$AMQP_BASE" $((AMQP_BASE+1)) $((AMQP_BASE+2)); do
  if port_open "$p"; then echo "port $p is in use; set PG_PORT/REDIS_PORT/AMQP_BASE/HTTP_PORT" >&2; exit 1; fi
done

PIDS_FILE="$SOAK_DIR/pids"
: >"$PIDS_FILE"
cleanup() {
  set +e
  [ -n "${BENCH_PID:-}" ] && kill "$BENCH_PID" 2>/dev/null
  while read -r name pid; do kill -TERM "$pid" 2>/dev/null; done <"$PIDS_FILE"
  sleep 2
  while read -r name pid; do kill -KILL "$pid" 2>/dev/null; done <"$PIDS_FILE"
  [ -n "${REDIS_PID:-}" ] && kill -KILL "$REDIS_PID" 2>/dev/null
  as_pg "$PGBIN/pg_ctl" -D "$SOAK_DIR/pg" -m immediate stop >/dev/null 2>&1
  "${CLUSTER[@]}" down >/dev/null 2>&1
  if [ "${KEEP:-0}" != 1 ]; then rm -rf "$SOAK_DIR"; fi
}
trap cleanup EXIT INT TERM

# --- private services -------------------------------------------------------
mkdir -p "$SOAK_DIR/pg"
[ "$(id -u)" = 0 ] && chown postgres "$SOAK_DIR" "$SOAK_DIR/pg"
as_pg "$PGBIN/initdb" -D "$SOAK_DIR/pg" -U postgres --auth=trust --no-sync >/dev/null
PG_OPTS="-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$SOAK_DIR/pg -c max_connections=200"
pg_start() { as_pg "$PGBIN/pg_ctl" -D "$SOAK_DIR/pg" -o "$PG_OPTS" -l "$SOAK_DIR/pg/server.log" -w start >/dev/null; }
pg_start
redis_start() { redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$SOAK_DIR" >/dev/null 2>&1 & REDIS_PID=$!; for _ in $(seq 50); do port_open "$REDIS_PORT" && break; sleep 0.1; done; }
redis_start
"${CLUSTER[@]}" start
AMQP_URL=$("${CLUSTER[@]}" urls)

export PREREG_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
export PREREG_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export PREREG_AMQP_URL="$AMQP_URL"
export PREREG_AMQP_PREFIX=soak
export PREREG_OPERATOR_TOKEN=soak-operator-token-0123456789abcdef0123456789
export PREREG_LINK_SECRET=soak-link-secret-0123456789abcdef0123456789abcdef
export PREREG_SMTP_URL="smtp://127.0.0.1:1"  # no email in this soak
export PREREG_PARTNER_QUOTA=1000000
export PREREG_LOG_FORMAT=json RUST_LOG=warn
"$BIN" migrate >/dev/null

start_proc() { # name, then command
  local name=$1; shift
  "$@" >>"$SOAK_DIR/$name.log" 2>&1 &
  echo "$name $!" >>"$PIDS_FILE"
}
pid_of() { awk -v n="$1" '$1==n {p=$2} END {print p}' "$PIDS_FILE"; }
PREREG_HTTP_ADDR=127.0.0.1:$HTTP_PORT start_proc intake "$BIN" intake
PREREG_METRICS_ADDR=127.0.0.1:$((HTTP_PORT+1)) start_proc worker1 "$BIN" worker
PREREG_METRICS_ADDR=127.0.0.1:$((HTTP_PORT+2)) start_proc worker2 "$BIN" worker
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null && break; sleep 0.2; done

# --- load ---------------------------------------------------------------------
COUNT=$(awk -v r="$RATE" -v d="$DURATION" 'BEGIN {printf "%d", r*d}')
"$LOADGEN" --url "http://127.0.0.1:$HTTP_PORT" --requests "$COUNT" --rate "$RATE" \
  --partners "$PARTNERS" --concurrency 32 --timeout 300s --json >"$SOAK_DIR/bench.out" 2>&1 &
BENCH_PID=$!

# --- RSS over time --------------------------------------------------------------
RSS="$SOAK_DIR/rss.csv"
echo "t_s,process,rss_kib" >"$RSS"
T0=$(date +%s)
sample() {
  local t=$(( $(date +%s) - T0 ))
  for n in intake worker1 worker2; do
    local p; p=$(pid_of "$n")
    local kib; kib=$(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo "")
    [ -n "$kib" ] && echo "$t,$n,$kib" >>"$RSS"
  done
}

# --- faults ---------------------------------------------------------------------
FAULTS="$SOAK_DIR/faults.log"
fault() {
  local k=$1 t=$(( $(date +%s) - T0 ))
  case $((k % 4)) in
    0) local p; p=$(pid_of worker1); kill -KILL "$p" 2>/dev/null || true
       wait "$p" 2>/dev/null || true  # reaped: its metrics port is free
       PREREG_METRICS_ADDR=127.0.0.1:$((HTTP_PORT+1)) start_proc worker1 "$BIN" worker
       echo "$t worker1 SIGKILLed and restarted" >>"$FAULTS" ;;
    1) "${CLUSTER[@]}" stop-node 2 >/dev/null; sleep 5; "${CLUSTER[@]}" start-node 2 >/dev/null
       echo "$t rabbitmq node 2 killed, restarted after 5 s" >>"$FAULTS" ;;
    2) kill -KILL "$REDIS_PID"; sleep 5; redis_start
       echo "$t redis killed, restarted after 5 s (locks lost)" >>"$FAULTS" ;;
    3) as_pg "$PGBIN/pg_ctl" -D "$SOAK_DIR/pg" -m fast stop >/dev/null; sleep 5; pg_start
       echo "$t postgres stopped (fast), restarted after 5 s" >>"$FAULTS" ;;
  esac
}
k=0
next_fault=$FAULT_EVERY
while kill -0 "$BENCH_PID" 2>/dev/null; do
  sample
  now=$(( $(date +%s) - T0 ))
  if [ "$now" -ge "$next_fault" ] && [ "$now" -lt "$DURATION" ]; then
    fault "$k"; k=$((k+1)); next_fault=$((next_fault + FAULT_EVERY))
  fi
  sleep 10
done
wait "$BENCH_PID" || echo "bench exited non-zero (see $SOAK_DIR/bench.out)"
BENCH_PID=
sample

# --- report ---------------------------------------------------------------------
q() { as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atc "$1"; }
metric() { # sum of the series matching a regex over every worker and the intake
  local total=0
  for port in $((HTTP_PORT+1)) $((HTTP_PORT+2)) "$HTTP_PORT"; do
    local v; v=$(curl -fs "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$0 ~ m {s+=$NF} END {print s+0}')
    total=$(awk -v a="$total" -v b="$v" 'BEGIN {print a+b}')
  done
  echo "$total"
}
echo
echo "== soak report ($(( $(date +%s) - T0 )) s) =="
tail -n 1 "$SOAK_DIR/bench.out" | grep -q '^{' && echo "bench: $(tail -n 1 "$SOAK_DIR/bench.out")"
echo "faults:"; sed 's/^/  /' "$FAULTS" 2>/dev/null || true
echo "rows: $(q "SELECT count(*) FROM preregistrations")  queued (undecided): $(q "SELECT count(*) FROM preregistrations WHERE status='queued'")"
echo "decided by status: $(q "SELECT string_agg(status || '=' || n, ' ') FROM (SELECT status, count(*) n FROM preregistrations GROUP BY 1) x")"
echo "double claims (customers with two active claims, must be 0): $(q "SELECT count(*) FROM (SELECT email_norm FROM preregistrations WHERE status IN ('preregistered','invited','association_failed') GROUP BY 1 HAVING count(*) > 1) x") by email, $(q "SELECT count(*) FROM (SELECT mobile_norm FROM preregistrations WHERE status IN ('preregistered','invited','association_failed') GROUP BY 1 HAVING count(*) > 1) x") by mobile"
echo "decided twice (must be 0): $(q "SELECT count(*) FROM (SELECT preregistration_id FROM preregistration_events WHERE change='decided' GROUP BY 1 HAVING count(*) > 1) x")"
echo "lock renewals lost: $(metric '^prereg_lock_lost_total')  decided without a lock: $(metric '^prereg_lock_unavailable_total')"
echo "retries (prereg_jobs_total outcome=retried, surviving processes): $(metric '^prereg_jobs_total[{].*outcome="retried"')"
echo "dead letters (registration DLQ): $("${CLUSTER[@]}" ctl 1 list_queues name messages 2>/dev/null | awk '$1 ~ /\.dlq$/ {s+=$2} END {print s+0}')"
echo "RSS (KiB) first / max / last per process:"
for n in intake worker1 worker2; do
  awk -F, -v n="$n" '$2==n {if (!f) f=$3; if ($3>m) m=$3; l=$3} END {printf "  %s: %s / %s / %s\n", n, f, m, l}' "$RSS"
done
echo "RSS samples: $RSS (KEEP=1 keeps $SOAK_DIR)"
