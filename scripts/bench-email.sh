#!/usr/bin/env bash
# Invitation email benchmark: 5,000 queued email invitations through the real
# email worker (pooled SMTP) into the in-process SMTP sink; prints emails/s and
# SMTP connections opened as Markdown (for docs/benchmarks.md).
#
#   scripts/bench-email.sh
#   BENCH_EMAILS=10000 PREREG_WORKER_CONCURRENCY=64 PREREG_SMTP_POOL_SIZE=64 scripts/bench-email.sh
#
# Needs PostgreSQL, RabbitMQ and Redis on 127.0.0.1 (scripts/services-up.sh).
# Knobs: BENCH_PG, BENCH_AMQP, BENCH_REDIS, BENCH_DB (default prereg_bench_email,
# dropped afterwards unless BENCH_KEEP_DB=1), BENCH_EMAILS,
# BENCH_PUBLISH_PARALLELISM, PREREG_DB_MAX_CONNECTIONS.
exec "$(dirname "$0")/cargo-bench.sh" email "$@"
