#!/usr/bin/env bash
# The whole system on this machine in the foreground, without Docker:
#   scripts/dev.sh
# 1. PostgreSQL, Redis and RabbitMQ: started, or installed from Debian and
#    started, where missing (scripts/services-up.sh; needs root only when
#    something must be installed or started).
# 2. `prereg dev`: creates the database when missing, migrates, then runs the
#    intake, every worker, the outbox relay and the scheduler in one process,
#    with email caught in target/dev-mail (readable on the dashboard).
#    It prints the URLs, an operator key and a ready partner key.
# Every PREREG_* variable still applies (e.g. PREREG_HTTP_ADDR=127.0.0.1:9000).
# Extra arguments go to `prereg dev` (e.g. --mail-dir /tmp/mail).
# Ctrl-C (or SIGTERM) stops it gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "dev.sh: $*" >&2; }
die() { echo "dev.sh: ERROR: $*" >&2; exit 1; }

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

if port_open 5432 && port_open 6379 && port_open 5672; then
  log "PostgreSQL, Redis and RabbitMQ already listen on 5432, 6379, 5672"
elif [ "$(id -u)" -eq 0 ]; then
  bash scripts/services-up.sh </dev/null >&2
elif command -v sudo >/dev/null 2>&1; then
  log "some services are missing; starting them with sudo scripts/services-up.sh"
  sudo bash scripts/services-up.sh </dev/null >&2
else
  die "PostgreSQL (5432), Redis (6379) or RabbitMQ (5672) is not running; run scripts/services-up.sh as root"
fi

command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) and put ~/.cargo/bin on PATH"
export PREREG_DEV_MODE=1
log "building (cargo build --locked --bin prereg)"
cargo build --locked --bin prereg >&2
exec target/debug/prereg dev "$@"
