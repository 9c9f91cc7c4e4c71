#!/usr/bin/env bash
# Runs every benchmark (`cargo bench`: overhead, populate, fault_rtt,
# restore, scaling), stores the run as this host's last full run in
# bench-report/runs/<host>/ (host: CPU model, CPU count, kernel release),
# then writes BENCHMARKS.md (a section per host, newest first) and
# docs/bench-curves/<host>.svg with gmem-bench-report. Other hosts' runs
# stay as they are. Run it on a quiet machine: the rows are ratios measured
# in the same process run, but noise still moves them.
#
#   scripts/bench.sh            full run (about 9 minutes on 2 cores), then the report
#   scripts/bench.sh --quick    GMEM_BENCH_QUICK=1: shrunken sizes, nothing stored, report not written
#   scripts/bench.sh --report   only rewrite the report from the stored runs
#   --no-userfaultfd-rs         (with either run) build without the userfaultfd-rs baseline
#
# The userfaultfd-rs baseline (feature bench-userfaultfd-rs) runs bindgen at
# build time, which needs libclang: it is on when LIBCLANG_PATH holds a
# libclang*.so* or ldconfig knows one. Otherwise a notice says so, and its
# rows are reported as skipped. Every row a host cannot run (no
# guest_memfd, too few CPUs) is reported as skipped with the reason; the run
# still finishes.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    echo "usage: $0 [--quick | --report] [--no-userfaultfd-rs]" >&2
    exit 2
}

mode="full"
rs="auto"
for arg in "$@"; do
    case "$arg" in
        --quick) [[ $mode == full ]] || usage; mode="quick" ;;
        --report) [[ $mode == full ]] || usage; mode="report" ;;
        --no-userfaultfd-rs) rs="off" ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *) usage ;;
    esac
done

# Whether bindgen will find libclang (as clang-sys looks for it).
have_libclang() {
    if [[ -n ${LIBCLANG_PATH:-} ]] && compgen -G "$LIBCLANG_PATH/libclang*.so*" >/dev/null; then
        return 0
    fi
    command -v ldconfig >/dev/null 2>&1 &&
        ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9.]+)?\.so'
}

target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
results="$target_dir/tmp/gmem-bench"

if [[ $mode != report ]]; then
    features=()
    if [[ $rs == off ]]; then
        echo "notice: --no-userfaultfd-rs: the userfaultfd-rs rows are reported as skipped"
    elif have_libclang; then
        features=(--features bench-userfaultfd-rs)
        echo "libclang found: the userfaultfd-rs baseline is built (--features bench-userfaultfd-rs)"
    else
        echo "notice: no libclang (LIBCLANG_PATH holds no libclang*.so*, ldconfig knows none):" \
            "the userfaultfd-rs baseline is not built and its rows are reported as skipped;" \
            "install libclang (e.g. libclang1-19) and set LIBCLANG_PATH to measure it"
    fi
    rm -rf "$results"
    if [[ $mode == quick ]]; then
        export GMEM_BENCH_QUICK=1
    fi
    SECONDS=0
    cargo bench "${features[@]}" \
        --bench overhead --bench populate --bench fault_rtt --bench restore --bench scaling
    echo "==> benchmarks took ${SECONDS}s"
    skipped="$(cat "$results"/*.json | { grep -o '"reason":' || true; } | wc -l)"
    echo "==> $skipped row(s) skipped on this host (each printed above as SKIPPED, with the reason)"
fi
if [[ $mode == quick ]]; then
    echo "quick run: records in $results; BENCHMARKS.md is written from full runs only"
    exit 0
fi
store=()
if [[ $mode == full ]]; then
    store=(--results "$results")
fi
cargo run -q --release -p gmem-bench-report -- "${store[@]}" --runs bench-report/runs \
    --out BENCHMARKS.md --svg-dir docs/bench-curves
