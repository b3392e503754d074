#!/usr/bin/env bash
# History benchmark: 1,000,000 history records over 100 partners (biggest
# 100,000); page latency p50/p95 per filter, the plans of two searches, and the
# CSV export of the biggest partner with its peak RSS, as Markdown.
#
#   scripts/bench-history.sh
#   BENCH_DB_URL_SUFFIX='?options=-c%20plan_cache_mode%3Dforce_custom_plan' scripts/bench-history.sh
#
# Needs PostgreSQL on 127.0.0.1. Knobs: BENCH_PG, BENCH_DB (default
# prereg_bench_history, dropped afterwards unless BENCH_KEEP_DB=1),
# BENCH_RECORDS, BENCH_BIG, BENCH_REQUESTS, BENCH_Q_FEW, BENCH_Q_MANY,
# BENCH_DB_URL_SUFFIX.
exec "$(dirname "$0")/cargo-bench.sh" history "$@"
