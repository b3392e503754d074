#!/usr/bin/env bash
# Expiry sweep benchmark: fills a fresh database with 1,000,000 claims of
# which 100,000 are due, times one full sweep and sweeps with nothing due,
# and prints the figures and query plans as Markdown (for docs/benchmarks.md).
#
#   scripts/bench-sweep.sh
#   BENCH_CLAIMS=2000000 BENCH_DUE=200000 PREREG_SWEEP_BATCH=10000 scripts/bench-sweep.sh
#
# Needs PostgreSQL on 127.0.0.1 (scripts/services-up.sh). Knobs: BENCH_PG
# (server URL, default postgres://postgres@127.0.0.1:5432), BENCH_DB
# (default prereg_bench_sweep, dropped afterwards unless BENCH_KEEP_DB=1),
# BENCH_CLAIMS, BENCH_DUE, PREREG_SWEEP_BATCH, PREREG_CLAIM_REMINDER_BEFORE.
exec "$(dirname "$0")/cargo-bench.sh" sweep "$@"
