#!/usr/bin/env bash
# Measures the line and region coverage of the library's unit tests and the
# integration suite (tests/it, against the real services) with
# cargo-llvm-cov, installed from crates.io if missing.
#
#   scripts/coverage.sh                 # summary per file in target/coverage/
#   COVERAGE_SKIP="faults_cluster dashboard" scripts/coverage.sh
#
# Writes target/coverage/summary.txt (per file) and
# target/coverage/uncovered-workers-mq.txt (uncovered lines of workers/ and
# src/mq/). CPU-heavy: everything is rebuilt with instrumentation.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup component add llvm-tools-preview >/dev/null
if ! cargo llvm-cov --version >/dev/null 2>&1; then
    cargo install cargo-llvm-cov --locked
fi

skip_args=()
for t in ${COVERAGE_SKIP-}; do
    skip_args+=(--skip "$t")
done

out=target/coverage
mkdir -p "$out"
cargo llvm-cov clean --workspace
cargo llvm-cov --no-report -p prereg --lib
# A failing test does not stop the measurement; its result is kept.
cargo llvm-cov --no-report -p prereg --test it --no-fail-fast \
    -- --test-threads "${COVERAGE_THREADS:-2}" "${skip_args[@]}" \
    2>&1 | tee "$out/it.log" | grep -E '^test result|FAILED|^test .* FAILED' || true
cargo llvm-cov report -p prereg --summary-only \
    --ignore-filename-regex '(devtools|tests|benches|loadgen)/' | tee "$out/summary.txt"
cargo llvm-cov report -p prereg --show-missing-lines \
    --ignore-filename-regex '(devtools|tests|benches|loadgen)/' > "$out/missing.txt"
grep -E '(workers|src/mq)/' "$out/missing.txt" > "$out/uncovered-workers-mq.txt" || true
echo "coverage written to $out/"
