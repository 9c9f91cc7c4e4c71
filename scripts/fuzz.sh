#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo-fuzz, nightly) for N seconds each
# and prints a summary row per target: seconds, executions, corpus files and
# bytes, and whether it found anything (a crash, leak, timeout or OOM, saved
# under fuzz/artifacts/<target>/). Installs cargo-fuzz first when missing.
#
#   scripts/fuzz.sh            60 seconds per target
#   scripts/fuzz.sh 300        300 seconds per target
#   FUZZ_TARGETS="uffd_msg builders" scripts/fuzz.sh 30
#
# The corpora grow under fuzz/corpus/<target>/ (ignored by git). The build
# goes to $CARGO_TARGET_DIR when set (else fuzz/target). Needs a nightly
# toolchain (`rustup toolchain install nightly`). The `builders` target
# needs /dev/kvm and does nothing without it.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
case "$secs" in
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    '' | *[!0-9]*)
        echo "usage: $0 [seconds per target]" >&2
        exit 2
        ;;
esac

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: a nightly toolchain is needed: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz
fi

targets="${FUZZ_TARGETS:-uffd_msg firecracker_handshake gmem_handover builders}"
log_dir="fuzz/logs"
mkdir -p "$log_dir"

cd fuzz
cargo +nightly fuzz build
cd ..

status=0
rows=()
for t in $targets; do
    mkdir -p "fuzz/corpus/$t"
    extra=()
    if [ -f "fuzz/dict/$t.dict" ]; then
        extra+=("-dict=dict/$t.dict")
    fi
    log="$log_dir/$t.log"
    echo "== $t: ${secs}s (log: $log)" >&2
    set +e
    (cd fuzz && cargo +nightly fuzz run "$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        ${extra[@]+"${extra[@]}"}) >"$log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    files=$(find "fuzz/corpus/$t" -type f | wc -l)
    bytes=$(du -sb "fuzz/corpus/$t" | cut -f1)
    if [ "$rc" -eq 0 ]; then
        found="none"
    else
        found="FOUND (exit $rc): $(grep -m1 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" || echo 'see log')"
        status=1
    fi
    rows+=("| $t | $secs | ${execs:-?} | $files files, $bytes bytes | $found |")
done

echo
echo "| target | seconds | execs | corpus | findings |"
echo "| --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
exit "$status"
