#!/usr/bin/env bash
# The published shape of the crates, checked as a user of crates.io gets it.
#
#   scripts/package-check.sh
#
# Steps:
#  1. `cargo package -p kvm-gmem-sys -p kvm-gmem -p uffd-gmem`: one
#     invocation packages the three crates and verifies each .crate by
#     building it from its unpacked copy, the crates' unpublished
#     dependencies on each other resolved through cargo's temporary registry
#     overlay (<target>/package/tmp-registry); the .crate files are written
#     to <target>/package/.
#  2. Each .crate unpacked into <target>/package-check/crates/<name>-<version>/,
#     and a workspace written at <target>/package-check/ whose members are
#     the unpacked crates and the fresh user (step 3), with
#     `[patch.crates-io]` pointing the published names at the unpacked
#     crates: nothing of the repository is reachable. Each crate's own tests
#     run from its unpacked copy: `cargo test --all-features` per crate, and
#     `--no-default-features` for uffd-gmem (the userfaultfd-only build).
#     The environment passes through (CI, GMEM_*), so the tests' skip rules
#     apply: under CI=true a missing /dev/kvm or /dev/userfaultfd fails, a
#     capability the kernel lacks prints its SKIP line and passes.
#  3. packaging/fresh-user/ copied there: a binary crate that depends only
#     on the published names (kvm-gmem with vm-memory and kvm-ioctls,
#     uffd-gmem with guest-memfd, kvm-ioctls, vm-memory), built and run.
#     It prints `fresh-user: <part>: ok` per part, or a SKIP line for a part
#     this host lacks a capability for. The binary is copied to
#     <target>/package-check/bin/fresh-user, where scripts/kernel-lane.sh
#     (x86_64) picks it up and runs it on Linux 7.3, where every part runs.
#  4. A userfaultfd-only user (uffd-gmem with its default features, nothing
#     else) built from clean in its own target directory: the wall time of
#     the build and the crates it compiles.
#
# <target> is $CARGO_TARGET_DIR, or target/; the build artifacts of steps 2
# and 3 live in <target>/package-check/target (kept between runs), step 4's
# in <target>/package-check/uffd-only/target (removed before each build).
# Needs network access to crates.io, as `cargo package` does.
#
# Exits non-zero when any step fails (every step runs; the failures are
# listed at the end). `cargo package` runs with --allow-dirty, so a working
# tree with uncommitted changes is checked as it is.
#
# Environment: GMEM_PACKAGE_CHECK_SKIP_RUN=1 builds the fresh user without
# running it (for a machine without /dev/kvm that only feeds the kernel lane).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-target}"
[[ "$target" == /* ]] || target="$root/$target"
pc="$target/package-check"
crates_dir="$pc/crates"
SECONDS=0
elapsed() { printf '%dm%02ds' $((SECONDS / 60)) $((SECONDS % 60)); }
say() { echo "==> [package-check $(elapsed)] $*"; }
failures=()
fail() {
    echo "package-check: FAILED: $*" >&2
    failures+=("$*")
}
finish() {
    echo
    if [[ ${#failures[@]} -gt 0 ]]; then
        echo "package-check FAILED ($(elapsed)):" >&2
        printf '  - %s\n' "${failures[@]}" >&2
        exit 1
    fi
    echo "package-check passed ($(elapsed))"
}

CRATES=(kvm-gmem-sys kvm-gmem uffd-gmem)
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
echo "package-check: crates ${CRATES[*]} $version; CI=${CI:-}; target $target"

# ---------------------------------------------------------------------------
say "1. cargo package -p kvm-gmem-sys -p kvm-gmem -p uffd-gmem (with verification)"
package_args=()
for c in "${CRATES[@]}"; do
    package_args+=(-p "$c")
done
rm -f "$target"/package/*.crate
# Verification resolves the crates' dependencies on each other through a
# temporary local registry, whose unpacked sources cargo keeps under
# $CARGO_HOME/registry/src/-<hash>/ and reuses while the version is the same:
# a second run on one machine would verify against the first run's
# kvm-gmem-sys. Remove those copies so every run verifies what it packaged.
for c in "${CRATES[@]}"; do
    rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/"$c-$version"
done
if ! cargo package "${package_args[@]}" --allow-dirty; then
    fail "cargo package (verification of the .crate files)"
    finish
fi
for c in "${CRATES[@]}"; do
    f="$target/package/$c-$version.crate"
    [[ -f "$f" ]] || { fail "no $f"; finish; }
    echo "    $f: $(du -h "$f" | cut -f1), $(tar -tzf "$f" | wc -l) files"
done

# ---------------------------------------------------------------------------
say "2. the unpacked .crate files, each crate's own tests"
rm -rf "$crates_dir" "$pc/fresh-user" "$pc/uffd-only" "$pc/bin"
mkdir -p "$crates_dir" "$pc/bin"
# --touch: the files get the time of extraction, not the .crate's: cargo
# decides what to rebuild by mtime, and the .crate's are those of the
# sources, so a rebuilt .crate with an older file would not be rebuilt.
for c in "${CRATES[@]}"; do
    tar -xzf "$target/package/$c-$version.crate" -C "$crates_dir" --touch
done
cp -r packaging/fresh-user "$pc/fresh-user"
rm -rf "$pc/fresh-user/target" "$pc/fresh-user/Cargo.lock"
# The [patch.crates-io] table, for this workspace and for step 4's.
patch_table() {
    local dir="$1" c
    echo "[patch.crates-io]"
    for c in "${CRATES[@]}"; do
        echo "$c = { path = \"$dir/$c-$version\" }"
    done
}
{
    echo "# Written by scripts/package-check.sh: the unpacked .crate files and a fresh user."
    echo "[workspace]"
    printf 'members = ['
    for c in "${CRATES[@]}"; do
        printf '"crates/%s-%s", ' "$c" "$version"
    done
    echo '"fresh-user"]'
    echo 'resolver = "3"'
    echo
    patch_table crates
} >"$pc/Cargo.toml"
export CARGO_TARGET_DIR="$pc/target"
manifest=(--manifest-path "$pc/Cargo.toml")
# One line per test run: "<what> <result>".
results=()
run_tests() {
    local what="$1" log rc=0
    shift
    log="$pc/test-$(echo "$what" | tr ' /' '__').log"
    echo "--> cargo test --no-fail-fast $* -- --show-output (full log: $log)"
    # The log gets everything (--show-output: the SKIP lines of passing
    # tests too); the terminal the test executables, results and SKIP lines.
    cargo test "${manifest[@]}" --no-fail-fast "$@" -- --show-output >"$log" 2>&1 || rc=$?
    grep -E '^ *Running |^ *Doc-tests |^test result:|^SKIP ' "$log" || true
    [[ $rc -eq 0 ]] || tail -n 80 "$log"
    local passed failed skipped
    passed="$(grep -E '^test result:' "$log" | awk '{s += $4} END {print s + 0}')"
    failed="$(grep -E '^test result:' "$log" | awk '{s += $6} END {print s + 0}')"
    skipped="$(grep -cE '^SKIP ' "$log" || true)"
    if [[ $rc -eq 0 ]]; then
        results+=("$what: ok ($passed passed, $failed failed, $skipped SKIP lines)")
    else
        results+=("$what: FAILED (exit $rc; $passed passed, $failed failed; log $log)")
        fail "cargo test $* (from the .crate; log $log)"
    fi
}
run_tests "kvm-gmem-sys --all-features" -p kvm-gmem-sys --all-features
run_tests "kvm-gmem --all-features" -p kvm-gmem --all-features
run_tests "uffd-gmem --all-features" -p uffd-gmem --all-features
run_tests "uffd-gmem --no-default-features" -p uffd-gmem --no-default-features

# ---------------------------------------------------------------------------
say "3. packaging/fresh-user against the unpacked crates"
fresh_bin="$pc/bin/fresh-user"
if ! cargo clippy "${manifest[@]}" -p fresh-user -- -D warnings; then
    fail "clippy -D warnings on fresh-user"
fi
if cargo build "${manifest[@]}" -p fresh-user; then
    cp "$pc/target/debug/fresh-user" "$fresh_bin"
    echo "built $fresh_bin (scripts/kernel-lane.sh runs it on Linux 7.3)"
    if [[ "${GMEM_PACKAGE_CHECK_SKIP_RUN:-}" == 1 ]]; then
        results+=("fresh-user: built, not run (GMEM_PACKAGE_CHECK_SKIP_RUN=1)")
    elif "$fresh_bin"; then
        results+=("fresh-user: ok")
    else
        results+=("fresh-user: FAILED")
        fail "fresh-user (run)"
    fi
else
    results+=("fresh-user: FAILED to build")
    fail "fresh-user (build)"
fi

# ---------------------------------------------------------------------------
say "4. a userfaultfd-only user: uffd-gmem with default features, built from clean"
uo="$pc/uffd-only"
mkdir -p "$uo/src"
{
    echo '[package]'
    echo 'name = "uffd-only"'
    echo 'version = "0.0.0"'
    echo 'edition = "2024"'
    echo 'publish = false'
    echo
    echo '[dependencies]'
    echo "uffd-gmem = \"$version\""
    echo
    echo '[workspace]'
    echo
    patch_table ../crates
} >"$uo/Cargo.toml"
cat >"$uo/src/main.rs" <<'EOF'
fn main() {
    match uffd_gmem::Uffd::builder().create() {
        Ok(uffd) => println!("userfaultfd: {:?}", uffd.supported_features()),
        Err(e) => println!("userfaultfd: {e}"),
    }
}
EOF
uo_args=(--manifest-path "$uo/Cargo.toml" --target-dir "$uo/target")
# Resolve and download first: the time below is the build's alone.
if cargo fetch --manifest-path "$uo/Cargo.toml" -q; then
    rm -rf "$uo/target"
    start="$(date +%s.%N)"
    if cargo build "${uo_args[@]}" --color never 2>"$uo/build.log"; then
        end="$(date +%s.%N)"
        compiled="$(sed -n 's/^ *Compiling \([^ ]*\) v\([^ ]*\).*/\1 \2/p' "$uo/build.log" | sort)"
        secs="$(echo "$start $end" | awk '{printf "%.1f", $2 - $1}')"
        echo "clean debug build of a uffd-gmem (default features) user: ${secs}s wall on $(nproc) CPU(s)," \
            "$(echo "$compiled" | grep -c .) crates compiled:"
        echo "$compiled" | sed 's/^/    /'
        results+=("uffd-only clean build: ${secs}s, $(echo "$compiled" | awk '{print $1}' | paste -sd' ')")
    else
        cat "$uo/build.log"
        fail "the userfaultfd-only user does not build"
    fi
else
    fail "cargo fetch of the userfaultfd-only user"
fi

echo
echo "package-check results:"
printf '    %s\n' "${results[@]}"
finish
