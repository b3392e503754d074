#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and RabbitMQ are running on 127.0.0.1 with their
# default ports (5432, 6379, 5672), installing them from Debian where missing.
#
# Idempotent and non-interactive; meant to run as root on a Debian machine where
# services are NOT managed by systemd (the dev/CI machines of this project).
# "Running" is decided by probing the service (pg_isready, redis-cli ping,
# rabbitmq-diagnostics ping), never by pid files. A service that already answers
# is left alone: this script never stops or restarts anything.
#
# Afterwards the tests can use:
#   postgres://postgres@127.0.0.1:5432/postgres   (trust auth, no password)
#   redis://127.0.0.1:6379
#   amqp://guest:guest@127.0.0.1:5672/%2f
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
WAIT_SECS="${SERVICES_WAIT_SECS:-60}"   # bound for every wait loop

log() { echo "services-up: $*"; }
die() { echo "services-up: ERROR: $*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it may apt-get install and start daemons)"

# apt-get update runs at most once, and only when something must be installed.
APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    apt-get update -q </dev/null
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  apt-get install -y -q --no-install-recommends "$@" </dev/null
}

# wait_for DESCRIPTION CMD...: retry CMD once a second for up to WAIT_SECS.
wait_for() {
  local what="$1"; shift
  local deadline=$((SECONDS + WAIT_SECS))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      die "timed out after ${WAIT_SECS}s waiting for $what (probe: $*)"
    fi
    sleep 1
  done
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# ---------------------------------------------------------------- PostgreSQL
pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432; }
pg_trust_ok() {
  PGPASSWORD='' psql -w -X -q -At -h 127.0.0.1 -p 5432 -U postgres -d postgres \
    -c 'select 1' >/dev/null 2>&1
}
# psql as the postgres OS user over the local socket (peer auth on Debian).
pg_local() { runuser -u postgres -- psql -X -q -At -d postgres "$@"; }

ensure_postgres() {
  if ! have psql || ! have pg_isready; then
    # A server may already listen without the client tools installed here.
    if port_open 5432; then apt_install postgresql-client; else apt_install postgresql; fi
  fi

  if pg_ready; then
    log "PostgreSQL already accepting connections on 127.0.0.1:5432"
  else
    have pg_ctlcluster || apt_install postgresql
    local ver
    # Prefer an existing "main" cluster; otherwise the newest installed server.
    ver="$(find /etc/postgresql -mindepth 2 -maxdepth 2 -name main -printf '%h\n' 2>/dev/null \
            | xargs -r -n1 basename | sort -V | tail -n1)"
    if [ -z "$ver" ]; then
      ver="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n1)"
      [ -n "$ver" ] || die "no PostgreSQL server found under /usr/lib/postgresql after install"
      log "creating PostgreSQL $ver cluster 'main'"
      pg_createcluster "$ver" main
    fi
    log "starting PostgreSQL $ver/main"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start \
      || pg_ready || die "pg_ctlcluster $ver main start failed (see /var/log/postgresql/)"
    wait_for "PostgreSQL on 127.0.0.1:5432" pg_ready
  fi

  # Tests connect as postgres without a password over TCP. A fresh Debian
  # install uses scram for host connections, so put a trust rule first.
  if ! pg_trust_ok; then
    local hba
    hba="$(pg_local -c 'show hba_file')" || die "cannot reach PostgreSQL as the postgres OS user to fix auth"
    log "adding trust rules for 127.0.0.1 and ::1 to $hba"
    local tmp
    tmp="$(mktemp)"
    { echo "# added by scripts/services-up.sh: password-less local TCP for dev/CI"
      echo "host all all 127.0.0.1/32 trust"
      echo "host all all ::1/128 trust"
      cat "$hba"; } >"$tmp"
    cat "$tmp" >"$hba"   # keep the file's owner and mode
    rm -f "$tmp"
    # Also give postgres the password "postgres" (what docker-compose uses);
    # with trust it is ignored, but it lets postgres:postgres URLs work too.
    pg_local -c "alter user postgres password 'postgres'" -c 'select pg_reload_conf()' >/dev/null
    wait_for "password-less login as postgres on 127.0.0.1" pg_trust_ok
  fi
  log "PostgreSQL OK (postgres://postgres@127.0.0.1:5432/postgres)"
}

# --------------------------------------------------------------------- Redis
redis_ok() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }

ensure_redis() {
  if ! have redis-server; then
    apt_install redis-server          # pulls in redis-tools (redis-cli)
  elif ! have redis-cli; then
    apt_install redis-tools
  fi
  if redis_ok; then
    log "Redis already answering on 127.0.0.1:6379"
  else
    log "starting Redis (no persistence)"
    # --dir /tmp: nothing is saved anyway, but never write into the caller's cwd.
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp
    wait_for "Redis on 127.0.0.1:6379" redis_ok
  fi
  log "Redis OK (redis://127.0.0.1:6379)"
}

# ------------------------------------------------------------------ RabbitMQ
rabbit_ping() { timeout 30 rabbitmq-diagnostics -q ping; }

ensure_rabbitmq() {
  have rabbitmq-server || apt_install rabbitmq-server
  if rabbit_ping >/dev/null 2>&1; then
    log "RabbitMQ node already up"
  elif port_open 5672; then
    # Something holds the port but the node does not answer its CLI (a
    # wedged node): starting another would fail on the same name and port,
    # and this script never stops one. `.ci/run` probes it with real work
    # and runs on a private node if it does not do any.
    log "WARNING: 127.0.0.1:5672 accepts connections but the node does not answer rabbitmq-diagnostics ping; leaving it alone"
    return 0
  else
    log "starting RabbitMQ"
    rabbitmq-server -detached
    # The node must be reachable before await_startup can talk to it.
    wait_for "RabbitMQ node to answer ping" rabbit_ping
  fi
  # Returns at once on a booted node; otherwise waits for the app (bounded).
  if ! timeout "$WAIT_SECS" rabbitmqctl -q --timeout "$WAIT_SECS" await_startup >/dev/null; then
    port_open 5672 || die "RabbitMQ did not finish booting within ${WAIT_SECS}s (see /var/log/rabbitmq/)"
    log "WARNING: RabbitMQ did not report booted within ${WAIT_SECS}s but accepts connections; .ci/run's probe decides"
    return 0
  fi
  wait_for "RabbitMQ AMQP port 127.0.0.1:5672" port_open 5672
  log "RabbitMQ OK (amqp://guest:guest@127.0.0.1:5672/%2f)"
}

ensure_postgres
ensure_redis
ensure_rabbitmq
log "all services up"
