#!/usr/bin/env bash
# Runs one `cargo bench` target the way the bench-*.sh scripts do: dev-mode
# secrets for the benchmark's throwaway context, the machine and commit
# printed, the bench built first (so the load average printed before the run
# is not the compiler's), the load average before and after.
#
#   scripts/cargo-bench.sh NAME [ARGS...]      (NAME: sweep, history, email)
set -euo pipefail
name="$1"
shift
export PREREG_DEV_MODE="${PREREG_DEV_MODE:-1}"
cd "$(dirname "$0")/.."
echo "== machine: $(nproc) CPUs, $(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//'), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >&2
cargo bench --bench "$name" --no-run >&2
echo "== load average before: $(cat /proc/loadavg)" >&2
status=0
cargo bench --bench "$name" -- "$@" || status=$?
echo "== load average after: $(cat /proc/loadavg)" >&2
exit "$status"
