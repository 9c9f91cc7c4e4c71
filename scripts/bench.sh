#!/usr/bin/env bash
# Runs every benchmark (`cargo bench`: overhead, populate, fault_rtt,
# restore, scaling), then writes BENCHMARKS.md and docs/bench-curves.svg
# from their JSON records with gmem-bench-report. Run it on a quiet machine:
# the rows are ratios measured in the same process run, but noise still
# moves them.
#
#   scripts/bench.sh            full run (about 4 minutes on 2 cores), then the report
#   scripts/bench.sh --quick    GMEM_BENCH_QUICK=1: shrunken sizes, report not written
#   scripts/bench.sh --report   only rewrite the report from the last run's records
set -euo pipefail
cd "$(dirname "$0")/.."

mode="full"
case "${1:-}" in
    "") ;;
    --quick) mode="quick" ;;
    --report) mode="report" ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [--quick | --report]" >&2
        exit 2
        ;;
esac

target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
results="$target_dir/tmp/gmem-bench"

if [[ $mode != report ]]; then
    rm -rf "$results"
    if [[ $mode == quick ]]; then
        export GMEM_BENCH_QUICK=1
    fi
    SECONDS=0
    cargo bench --bench overhead --bench populate --bench fault_rtt --bench restore --bench scaling
    echo "==> benchmarks took ${SECONDS}s"
fi
if [[ $mode == quick ]]; then
    echo "quick run: records in $results; BENCHMARKS.md is written from full runs only"
    exit 0
fi
cargo run -q --release -p gmem-bench-report -- --results "$results" \
    --out BENCHMARKS.md --svg docs/bench-curves.svg
