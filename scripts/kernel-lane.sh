#!/usr/bin/env bash
# The kernel lane: run the workspace's kernel tests on a second kernel, Linux
# 7.3.4 (Debian trixie-backports), booted under QEMU with TCG, and write the
# kernel matrix (docs/kernel-matrix.md) from what tests/kernel_matrix.rs
# reports on the host kernel and on that kernel. Two architectures:
#
#   x86_64 (default)  the amd64 kernel on `-cpu max`: KVM runs on nested SVM
#                     with NPT; the test executables are the host's;
#   aarch64           the arm64 kernel on the `virt` machine with
#                     virtualization=on (the kernel boots at EL2, KVM is built
#                     in); the test executables are cross-compiled for
#                     aarch64-unknown-linux-gnu, statically linked
#                     (crt-static: no loader or libraries to carry into the
#                     guest, and the same files run under qemu-user).
#
#   scripts/kernel-lane.sh [--arch A]                run; compare the matrix with the docs (notice only)
#   scripts/kernel-lane.sh [--arch A] --check-docs   run; fail if this lane's status differs from the docs (CI)
#   scripts/kernel-lane.sh [--arch A] --update-docs  run; write this lane's column into docs/kernel-matrix.md
#   scripts/kernel-lane.sh [--arch A] --check-only   no run: steps 7 and 8 of --check-docs on the last
#                                                    run's logs (in <target>/kernel-lane/<lane>)
#   scripts/kernel-lane.sh --kernel ours [...]       the same on the project's own test kernel
#                                                    (x86_64 only): Linux 7.3.4 with the RFC uAPIs
#                                                    of kernel/patches/, built or reused by
#                                                    scripts/test-kernel.sh; lane "x86_64-rfc"
#
# The matrix has one lane column per lane (an architecture, and for
# `--kernel ours` the architecture with "-rfc": the guest kernel, the same
# on every machine, so compared strictly) and one column per host the lane
# ran on, labelled with its CPU, kernel and PVM or not. Each invocation runs
# one architecture and touches only its own lane column and this host's: the
# other architecture's column is kept as it is and not compared, so the two
# lanes run (and are checked) as separate invocations. This host's statuses
# never fail a check (a notice says when they differ from its column, or that
# it has none), and --update-docs replaces only this host's column, or adds
# it, keeping the other hosts'. The matrix is written by the gmem-matrix crate
# (matrix/), which this script runs with cargo.
#
# Steps:
#  1. system packages (installed if missing, as root): qemu-system-x86 or
#     qemu-system-arm, xz-utils, cpio, jq; for aarch64 also the cross
#     toolchain (gcc-aarch64-linux-gnu, libc6-dev-arm64-cross), qemu-user-static,
#     and the rustup target;
#  2. the kernel and the guest's busybox: `linux-binary-<abi>` (vmlinuz),
#     for x86_64 `linux-modules-<abi>` (irqbypass, ccp, kvm, kvm-amd; arm64
#     has KVM built in), and `busybox-static` (trixie), of the lane's Debian
#     architecture, fetched with the private apt configuration of
#     scripts/apt-private.sh (apt verifies the Release signature against
#     the Debian archive keyring and the package hashes as usual);
#     nothing is installed: the files are unpacked into
#     <target>/kernel-lane/kernel/<version>/<debian arch>/ (cached; the
#     modules decompressed);
#  3. `cargo test --workspace --no-run --message-format=json` (with --target
#     for aarch64): the test executables of the kernel-test packages (gmem,
#     kvm-gmem, uffd-gmem, kvm-gmem-sys; not the root package's `abi`,
#     `headers_readme` and `layering`, which need the source tree and host
#     compilers), and the `gmem` command, run as `gmem probe` and
#     `gmem demo`;
#  4. the host run of tests/kernel_matrix.rs (its GMEM-MATRIX lines; for
#     aarch64 a host build of it); for aarch64 also the `abi` test executable
#     of step 3 under qemu-aarch64-static: the ABI tables measured by aarch64
#     executables (tests/abi.rs, abi_native_c_equals_rust);
#  5. an initramfs: busybox, scripts/lane-init.sh as /init, the modules, the
#     test executables and the gmem command at their host paths, and their ldd
#     libraries; REQUIRED_CAPS (below) as /lane/required-caps;
#  6. QEMU boots it; /init runs every test executable with --test-threads=1
#     and --show-output (so SKIP lines reach the log; CI=true,
#     GMEM_KERNEL_LANE=1, GMEM_REQUIRED_CAPS), then `gmem probe` and
#     `gmem demo`, each between LANE-BEGIN/LANE-END markers, and powers off;
#     the serial console is streamed to the terminal and to
#     <target>/kernel-lane/<arch>/serial.log;
#  7. a summary per executable, and of its SKIP lines;
#  8. the matrix (<target>/kernel-lane/<arch>/kernel-matrix.md: the docs with
#     this run merged in).
# <target> is $CARGO_TARGET_DIR, or target/.
#
# Exits non-zero when a test executable or command fails (or is killed by the
# per-binary limit), a SKIP line names a capability of REQUIRED_CAPS, a marker
# is missing, the guest does not power off in time, the run lacks a matrix
# result, the aarch64 ABI run fails, or (with --check-docs) this lane's
# statuses or the matrix's rows differ from docs/kernel-matrix.md.
#
# Environment: GMEM_LANE_TIMEOUT (seconds for the whole guest run, default
# 600), GMEM_LANE_TEST_TIMEOUT (per test executable, default 300),
# GMEM_LANE_MEMORY (guest memory, default 4G), GMEM_LANE_SMP (guest vCPUs,
# default 1; 2 gains ~10% on a 2-core machine), GMEM_LANE_FILTER (an extended
# regex: run only the test executables and commands whose "<package>::<target>"
# label matches; the commands are gmem-command::probe and gmem-command::demo),
# GMEM_LANE_BUILD_ARGS (what `cargo test` builds, default --workspace; e.g.
# "-p gmem --test kernel_matrix" to iterate on one test),
# GMEM_LANE_EXTRA_COMMANDS (more commands for the guest, one "<label>
# <executable> [arguments]" a line, each run like `gmem demo`: a non-zero exit
# fails the lane; CI gives the x86_64 lane scripts/package-check.sh's fresh
# user, "packaging::fresh-user <target>/package-check/bin/fresh-user").
#
# To bump the kernel: set KERNEL_BASE and KERNEL_VERSION below to the new
# trixie-backports upload (`apt-cache policy linux-binary-<abi>` through the
# same private configuration, or https://packages.debian.org/trixie-backports/
# linux-binary-amd64 lists it), check the module paths in MODULES still exist
# (`dpkg-deb -c` of the amd64 modules package), run both lanes with
# --update-docs, and commit docs/kernel-matrix.md with the bump. Debian
# removes superseded backports from the mirror, so a stale pin fails at
# `apt-get download` with "Version ... was not found": bump it then.
set -euo pipefail

KERNEL_BASE="7.3.4+deb13"
KERNEL_VERSION="${GMEM_LANE_KERNEL_VERSION:-7.3.4-1~bpo13+1}"
# The packages whose test executables the guest runs, and those of their
# test executables that cannot run there: they read the source tree
# (CARGO_MANIFEST_DIR) or run the host's C compilers.
KERNEL_PACKAGES_RE='^(gmem|kvm-gmem|uffd-gmem|kvm-gmem-sys)$'
EXCLUDE_TESTS_RE='^(abi|headers_readme|layering)$'
MATRIX_TEST="kernel_matrix"

# The capabilities every lane's kernel (stock Debian 7.3.4) must have: /init
# exports them, with the architecture's own below, as GMEM_REQUIRED_CAPS,
# where a test that would print "SKIP <test>: <capability> = <value> on
# <kernel>" for one of them fails instead, and step 7 fails on any SKIP line
# naming one. Taken from the lane columns of docs/kernel-matrix.md; edit them
# with the kernel pin. Deliberately absent, because 7.3.4 lacks them:
# KVM_CAP_MEMORY_ATTRIBUTES on a default VM fd, the RFC features
# (KVM_GUEST_MEMFD_POPULATE, GUEST_MEMFD_FLAG_WRITE and _NO_DIRECT_MAP,
# KVM_MEM_USERFAULT) and userfaultfd on guest_memfd.
COMMON_CAPS=(
    /dev/kvm /dev/userfaultfd
    # guest_memfd, with host mmap and shared-at-creation pages
    KVM_CAP_GUEST_MEMFD KVM_CAP_GUEST_MEMFD_FLAGS
    GUEST_MEMFD_FLAG_MMAP GUEST_MEMFD_FLAG_INIT_SHARED
    KVM_CAP_USER_MEMORY2
    # userfaultfd: 7.3.4's UFFDIO_API offers every feature up to RWP_ASYNC (0x7ffff)
    UFFD_FEATURE_PAGEFAULT_FLAG_WP UFFD_FEATURE_EVENT_FORK UFFD_FEATURE_EVENT_REMAP
    UFFD_FEATURE_EVENT_REMOVE UFFD_FEATURE_MISSING_HUGETLBFS UFFD_FEATURE_MISSING_SHMEM
    UFFD_FEATURE_EVENT_UNMAP UFFD_FEATURE_SIGBUS UFFD_FEATURE_THREAD_ID
    UFFD_FEATURE_MINOR_HUGETLBFS UFFD_FEATURE_MINOR_SHMEM UFFD_FEATURE_EXACT_ADDRESS
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM UFFD_FEATURE_WP_UNPOPULATED UFFD_FEATURE_POISON
    UFFD_FEATURE_WP_ASYNC UFFD_FEATURE_MOVE UFFD_FEATURE_RWP UFFD_FEATURE_RWP_ASYNC
)

arch="x86_64"
kernel="debian"
mode="notice"
reuse=0
usage="usage: $0 [--arch x86_64|aarch64] [--kernel debian|ours] [--check-docs | --update-docs | --check-only]"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --arch)
            arch="${2:?$usage}"
            shift
            ;;
        --kernel)
            kernel="${2:?$usage}"
            shift
            ;;
        --check-docs) mode="check" ;;
        --update-docs) mode="update" ;;
        --check-only) mode="check" reuse=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "$usage" >&2
            exit 2
            ;;
    esac
    shift
done

# Per architecture: the Debian packages and QEMU, the modules to load (in
# load order, "<name> <path in the modules package>"), the Rust target (empty:
# the host's), and the capabilities that only this architecture's kernel has.
case "$arch" in
    x86_64)
        deb_arch="amd64"
        qemu_package="qemu-system-x86"
        qemu=(qemu-system-x86_64 -accel tcg,thread=multi -cpu max)
        console="ttyS0"
        virt="nested SVM+NPT"
        virt_about="\`-cpu max\`: KVM runs on nested SVM with NPT"
        # kvm needs irqbypass; kvm-amd needs kvm and ccp (SEV).
        MODULES=(
            "irqbypass kernel/virt/lib/irqbypass.ko.xz"
            "ccp kernel/drivers/crypto/ccp/ccp.ko.xz"
            "kvm kernel/arch/x86/kvm/kvm.ko.xz"
            "kvm-amd kernel/arch/x86/kvm/kvm-amd.ko.xz"
        )
        rust_target=""
        # Memory faults and pre-fault; guest_memfd-only memslots need the TDP MMU.
        ARCH_CAPS=(KVM_CAP_MEMORY_FAULT_INFO KVM_CAP_PRE_FAULT_MEMORY KVM_TDP_MMU)
        ;;
    aarch64)
        deb_arch="arm64"
        qemu_package="qemu-system-arm"
        # pauth-impdef=on: pointer authentication with QEMU's own cheap hash
        # instead of the architected QARMA5, which TCG computes slowly for
        # every PAC instruction of the kernel (Debian's is built with
        # pointer authentication): the tests run 7 to 13 times faster.
        qemu=(qemu-system-aarch64 -machine virt,virtualization=on,gic-version=3
            -accel tcg,thread=multi -cpu max,pauth-impdef=on)
        console="ttyAMA0"
        virt="KVM at emulated EL2"
        virt_about="the \`virt\` machine with virtualization=on and \`-cpu max,pauth-impdef=on\`: the kernel boots at EL2 and KVM runs its guests at EL1"
        MODULES=()
        rust_target="aarch64-unknown-linux-gnu"
        export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
        export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
        # 7.3.4 on arm64 answers 0 for KVM_CAP_MEMORY_FAULT_INFO and
        # KVM_CAP_PRE_FAULT_MEMORY, and has no TDP MMU (stage 2 always).
        ARCH_CAPS=()
        ;;
    *)
        echo "$usage" >&2
        exit 2
        ;;
esac
KERNEL_ABI="$KERNEL_BASE-$deb_arch"
REQUIRED_CAPS=("${COMMON_CAPS[@]}" "${ARCH_CAPS[@]}")
# --kernel ours: the project's test kernel (scripts/test-kernel.sh), x86_64
# only. KVM is built in (no modules); busybox still comes from Debian (step
# 2). Its lane must have every RFC uAPI and the software-protected VM rows
# besides what stock 7.3.4 has.
lane_id="$arch"
# The modules /init loads: the Debian kernel's (MODULES, which step 2 also
# fetches and caches for that kernel), none for ours.
load_modules=("${MODULES[@]}")
case "$kernel" in
    debian) ;;
    ours)
        if [[ "$arch" != x86_64 ]]; then
            echo "error: --kernel ours is built for x86_64 only" >&2
            exit 2
        fi
        lane_id="$arch-rfc"
        load_modules=()
        REQUIRED_CAPS+=(
            KVM_GUEST_MEMFD_POPULATE GUEST_MEMFD_FLAG_WRITE GUEST_MEMFD_FLAG_NO_DIRECT_MAP
            KVM_MEM_USERFAULT UFFDIO_REGISTER_GUEST_MEMFD
            KVM_X86_SW_PROTECTED_VM KVM_CAP_MEMORY_ATTRIBUTES
        )
        ;;
    *)
        echo "$usage" >&2
        exit 2
        ;;
esac
required_caps="$(IFS=,; echo "${REQUIRED_CAPS[*]}")" # GMEM_REQUIRED_CAPS's format

LANE_TIMEOUT="${GMEM_LANE_TIMEOUT:-600}"
TEST_TIMEOUT="${GMEM_LANE_TEST_TIMEOUT:-300}"
MEMORY="${GMEM_LANE_MEMORY:-4G}"
SMP="${GMEM_LANE_SMP:-1}"
FILTER="${GMEM_LANE_FILTER:-}"
BUILD_ARGS="${GMEM_LANE_BUILD_ARGS:---workspace}"

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/apt-private.sh
source scripts/apt-private.sh
target="${CARGO_TARGET_DIR:-target}"
[[ "$target" == /* ]] || target="$root/$target"
lanes="$target/kernel-lane"
lane="$lanes/$lane_id"
mkdir -p "$lane"
SECONDS=0
elapsed() { printf '%dm%02ds' $((SECONDS / 60)) $((SECONDS % 60)); }
say() { echo "==> [kernel-lane $lane_id $(elapsed)] $*"; }
gmem_matrix() { cargo run -q --release -p gmem-matrix -- "$@"; }
# "<package> <target name> <executable>" for every test executable of a
# `cargo --message-format=json` log. package_id is a package id spec:
# "path+file:///dir/kvm-gmem#0.1.0", or "path+file:///dir#gmem@0.1.0" when
# the directory is named otherwise.
test_executables() {
    jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test)
           | (.package_id | split("#")) as $p
           | (if ($p[1] | contains("@")) then ($p[1] | split("@")[0])
              else ($p[0] | split("/") | last) end) as $pkg
           | "\($pkg) \(.target.name) \(.executable)"' "$1" | sort -u
}
exe_named() { awk -v t="$1" '$2 == t {print $3}' "$2" | tail -n 1; }

# Steps 1 to 6 run the lane; --check-only skips them (down to the matching
# "fi" before step 7) and reads what the last run saved in $lane/run.env.
if [[ $reuse -eq 1 ]]; then
    say "1-6. skipped (--check-only): the last run's logs in $lane"
    if [[ ! -f "$lane/run.env" ]]; then
        echo "error: no $lane/run.env: run the $lane_id lane once first" >&2
        exit 1
    fi
    # shellcheck source=/dev/null # written by step 6 of an earlier run
    source "$lane/run.env"
else

# ---------------------------------------------------------------------------
say "1. system packages"
packages=("$qemu_package" xz-utils cpio jq)
[[ -n "$rust_target" ]] && packages+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "installing: ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: installing packages needs root (or install: ${missing[*]})" >&2
        exit 1
    fi
    apt-get -qq update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [[ -n "$rust_target" && ! -d "$(rustc --print target-libdir --target "$rust_target")" ]]; then
    rustup target add "$rust_target"
fi

# ---------------------------------------------------------------------------
say "2. kernel $KERNEL_ABI ($KERNEL_VERSION, trixie-backports) and busybox-static:$deb_arch (trixie)"
kdir="$lanes/kernel/$KERNEL_VERSION/$deb_arch"
stamp="$kdir/.complete"
cached=1
[[ -f "$stamp" && -f "$kdir/vmlinuz" && -f "$kdir/busybox" ]] || cached=0
for m in "${MODULES[@]}"; do
    [[ -f "$kdir/modules/${m%% *}.ko" ]] || cached=0
done
if [[ $cached -eq 1 ]]; then
    echo "cached in $kdir: $(cat "$stamp")"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    debs=("linux-binary-$KERNEL_ABI=$KERNEL_VERSION" busybox-static)
    [[ ${#MODULES[@]} -gt 0 ]] && debs+=("linux-modules-$KERNEL_ABI=$KERNEL_VERSION")
    apt_private_download "$deb_arch" "$work" "${debs[@]}"
    rm -rf "$kdir"
    mkdir -p "$kdir/unpacked" "$kdir/modules"
    dpkg-deb --fsys-tarfile "$work"/linux-binary-"$KERNEL_ABI"_*.deb |
        tar -x -C "$kdir/unpacked" "./usr/lib/modules/$KERNEL_ABI/vmlinuz"
    mv "$kdir/unpacked/usr/lib/modules/$KERNEL_ABI/vmlinuz" "$kdir/vmlinuz"
    dpkg-deb --fsys-tarfile "$work"/busybox-static_*.deb | tar -x -C "$kdir/unpacked" ./usr/bin/busybox
    mv "$kdir/unpacked/usr/bin/busybox" "$kdir/busybox"
    if [[ ${#MODULES[@]} -gt 0 ]]; then
        paths=()
        for m in "${MODULES[@]}"; do
            paths+=("./usr/lib/modules/$KERNEL_ABI/${m#* }")
        done
        dpkg-deb --fsys-tarfile "$work"/linux-modules-"$KERNEL_ABI"_*.deb |
            tar -x -C "$kdir/unpacked" "${paths[@]}"
        for m in "${MODULES[@]}"; do
            xz -dc "$kdir/unpacked/usr/lib/modules/$KERNEL_ABI/${m#* }" >"$kdir/modules/${m%% *}.ko"
        done
    fi
    rm -rf "$kdir/unpacked"
    echo "$KERNEL_ABI $KERNEL_VERSION; busybox-static $(dpkg-deb -f "$work"/busybox-static_*.deb Version)" >"$stamp"
    rm -rf "$work"
    trap - EXIT
    echo "unpacked into $kdir: $(cat "$stamp")"
fi
vmlinuz="$kdir/vmlinuz"
if [[ "$kernel" == ours ]]; then
    say "2b. the test kernel: scripts/test-kernel.sh (Debian linux-source-7.3 + kernel/patches/)"
    vmlinuz="$(scripts/test-kernel.sh | tail -n 1)"
    echo "$vmlinuz: $(head -n 1 "$(dirname "$vmlinuz")/build.txt")"
    sed 's/^/    /' "$(dirname "$vmlinuz")/patches.txt"
fi

# ---------------------------------------------------------------------------
say "3. cargo test $BUILD_ARGS --no-run${rust_target:+ --target $rust_target}"
# shellcheck disable=SC2086 # the build arguments are split on purpose
cargo test $BUILD_ARGS --no-run --message-format=json ${rust_target:+--target "$rust_target"} \
    >"$lane/build.json"
test_executables "$lane/build.json" >"$lane/executables.all"
gmem_bin="$(jq -r 'select(.reason == "compiler-artifact" and .target.kind == ["bin"]
                    and .target.name == "gmem" and (.profile.test | not)) | .executable' \
    "$lane/build.json" | tail -n 1)"
# runs.list: "<label> <kind> <executable> [arguments]", kind "test" (a
# libtest executable) or "command" (run with its arguments as they are).
: >"$lane/runs.list"
add_run() {
    if [[ -z "$FILTER" || "$1" =~ $FILTER ]]; then
        echo "$*" >>"$lane/runs.list"
    fi
}
while read -r pkg name exe; do
    if [[ "$pkg" =~ $KERNEL_PACKAGES_RE && ! "$name" =~ $EXCLUDE_TESTS_RE ]]; then
        add_run "$pkg::$name" test "$exe"
    fi
done <"$lane/executables.all"
if [[ -n "$gmem_bin" ]]; then
    add_run gmem-command::probe command "$gmem_bin" probe
    add_run gmem-command::demo command "$gmem_bin" demo
fi
# GMEM_LANE_EXTRA_COMMANDS: more commands, one "<label> <executable> [arguments]"
# a line, run like the gmem command (a non-zero exit fails the lane). CI
# passes the fresh user of scripts/package-check.sh
# (<target>/package-check/bin/fresh-user, built for this host) to the x86_64
# lane only: the aarch64 lane would need it cross-compiled and static.
while read -r label exe args; do
    [[ -n "$label" ]] || continue
    if [[ ! -x "$exe" ]]; then
        echo "error: GMEM_LANE_EXTRA_COMMANDS: $label: no executable $exe" >&2
        exit 1
    fi
    # shellcheck disable=SC2086 # the arguments are split on purpose
    add_run "$label" command "$(realpath "$exe")" $args
done <<<"${GMEM_LANE_EXTRA_COMMANDS:-}"
matrix_exe="$(exe_named "$MATRIX_TEST" "$lane/executables.all")"
if [[ -n "$rust_target" ]]; then
    # The host column needs the test built for this machine too.
    cargo test -p gmem --test "$MATRIX_TEST" --no-run --message-format=json >"$lane/build-host.json"
    matrix_exe="$(test_executables "$lane/build-host.json" | exe_named "$MATRIX_TEST" -)"
fi
if [[ -z "$matrix_exe" ]]; then
    echo "error: no test executable named $MATRIX_TEST (tests/$MATRIX_TEST.rs)" >&2
    exit 1
fi
echo "guest runs $(wc -l <"$lane/runs.list") test executable(s) and command(s):"
sed 's/^/    /' "$lane/runs.list"

# ---------------------------------------------------------------------------
say "4. host run of $MATRIX_TEST (kernel $(uname -r))${rust_target:+; the aarch64 abi executable under qemu-aarch64-static}"
host_rc=0
"$matrix_exe" --test-threads=1 >"$lane/host.log" 2>&1 || host_rc=$?
grep -E '^GMEM-MATRIX ' "$lane/host.log" || true
tail -n 3 "$lane/host.log"
if [[ $host_rc -ne 0 ]]; then
    cat "$lane/host.log"
    echo "error: $MATRIX_TEST failed on the host (exit $host_rc)" >&2
fi
abi_rc=-
abi_exe="$(exe_named abi "$lane/executables.all")"
if [[ -n "$rust_target" && -n "$abi_exe" ]]; then
    abi_rc=0
    qemu-aarch64-static "$abi_exe" --test-threads=1 >"$lane/abi.log" 2>&1 || abi_rc=$?
    grep -E 'facts|SKIP|^test result:|panicked' "$lane/abi.log" || true
    [[ $abi_rc -eq 0 ]] || cat "$lane/abi.log"
fi

# ---------------------------------------------------------------------------
say "5. initramfs"
stage="$lane/initramfs"
rm -rf "$stage"
mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,run,lane/modules}
cp "$kdir/busybox" "$stage/bin/busybox"
install -m 0755 scripts/lane-init.sh "$stage/init"
: >"$stage/lane/modules.list"
for m in "${load_modules[@]}"; do
    name="${m%% *}"
    cp "$kdir/modules/$name.ko" "$stage/lane/modules/"
    echo "$name" >>"$stage/lane/modules.list"
done
echo "$TEST_TIMEOUT" >"$stage/lane/timeout"
echo "$required_caps" >"$stage/lane/required-caps"
# Each executable (and the gmem command) at its host path, with its libraries
# (none for aarch64's static executables).
copy_with_libs() {
    local f="$1" lib
    [[ -e "$stage$f" ]] && return 0
    mkdir -p "$stage$(dirname "$f")"
    cp -L "$f" "$stage$f"
    for lib in $(ldd "$f" 2>/dev/null | grep -oE '/[^ ]+' || true); do
        if [[ -e "$lib" && ! -e "$stage$lib" ]]; then
            mkdir -p "$stage$(dirname "$lib")"
            cp -L "$lib" "$stage$lib"
        fi
    done
}
while read -r label kind exe args; do
    copy_with_libs "$exe"
done <"$lane/runs.list"
cp "$lane/runs.list" "$stage/lane/runs.list"
[[ -n "$gmem_bin" && -x "$gmem_bin" ]] && copy_with_libs "$gmem_bin"
initrd="$lane/initramfs.cpio"
(cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet) >"$initrd"
echo "$initrd: $(du -h "$initrd" | cut -f1)"

# ---------------------------------------------------------------------------
say "6. boot $(basename "$vmlinuz") ($kernel) under QEMU (TCG, $virt, -smp $SMP, -m $MEMORY; limit ${LANE_TIMEOUT}s)"
boot_start=$SECONDS
qemu_rc=0
timeout -k 10 "$LANE_TIMEOUT" "${qemu[@]}" -smp "$SMP" -m "$MEMORY" \
    -nodefaults -display none -monitor none -no-reboot \
    -serial stdio \
    -kernel "$vmlinuz" -initrd "$initrd" \
    -append "console=$console panic=-1 loglevel=4 rdinit=/init" \
    </dev/null 2>"$lane/qemu.stderr" | tr -d '\r' | tee "$lane/serial.log" || qemu_rc=${PIPESTATUS[0]}
boot_secs=$((SECONDS - boot_start))
if [[ -s "$lane/qemu.stderr" ]]; then
    echo "--- qemu stderr:"
    cat "$lane/qemu.stderr"
fi
qemu_version="$("${qemu[0]}" --version | sed -n '1s/^QEMU emulator version //p')"
printf 'host_rc=%q\nabi_rc=%q\nqemu_rc=%q\nboot_secs=%q\nqemu_version=%q\n' \
    "$host_rc" "$abi_rc" "$qemu_rc" "$boot_secs" "$qemu_version" >"$lane/run.env"
fi # steps 1 to 6

# ---------------------------------------------------------------------------
say "7. results"
log="$lane/serial.log"
problems=()
if [[ $qemu_rc -eq 124 || $qemu_rc -eq 137 ]]; then
    problems+=("the guest did not power off within ${LANE_TIMEOUT}s (QEMU killed)")
elif [[ $qemu_rc -ne 0 ]]; then
    problems+=("QEMU exited with $qemu_rc")
fi
grep -q '^LANE-DONE' "$log" || problems+=("no LANE-DONE marker: the guest did not finish")
while read -r err; do
    problems+=("guest: $err")
done < <(grep -E '^LANE-ERROR' "$log" || true)
guest_kernel="$(sed -n 's/^LANE-KERNEL //p' "$log" | head -n 1)"
printf '%-40s %-6s %s\n' "test executable or command" "exit" "result"
while read -r label kind exe args; do
    if ! grep -qxF "LANE-BEGIN $label" "$log"; then
        printf '%-40s %-6s %s\n' "$label" "-" "not started"
        problems+=("$label: not started")
        continue
    fi
    end="$(grep -E "^LANE-END $label rc=" "$log" | head -n 1 || true)"
    # A test's last test-result line, or a command's last line of output.
    summary="$(awk -v b="LANE-BEGIN $label" -v e="LANE-END $label rc=" -v kind="$kind" '
        $0 == b {on = 1; next}
        on && index($0, e) == 1 {on = 0}
        on && kind == "test" && /^test result:/ {sub(/; finished in.*/, ""); last = $0}
        on && kind == "command" && NF {last = $0}
        END {print last}' "$log")"
    if [[ -z "$end" ]]; then
        printf '%-40s %-6s %s\n' "$label" "-" "no LANE-END (the guest stopped in it)"
        problems+=("$label: did not finish")
        continue
    fi
    rc="${end##*rc=}"
    printf '%-40s %-6s %s\n' "$label" "$rc" "${summary:-no test result line}"
    if [[ "$rc" != 0 ]]; then
        if [[ "$rc" == 137 ]]; then
            problems+=("$label: killed after ${TEST_TIMEOUT}s")
        else
            problems+=("$label: exit $rc")
        fi
    fi
done <"$lane/runs.list"
[[ $host_rc -ne 0 ]] && problems+=("$MATRIX_TEST on the host: exit $host_rc")
if [[ "$abi_rc" != - ]]; then
    echo "abi (aarch64 executable under qemu-aarch64-static): exit $abi_rc; $(grep '^test result:' "$lane/abi.log" | tail -n 1)"
    [[ "$abi_rc" == 0 ]] || problems+=("the aarch64 abi executable under qemu-aarch64-static: exit $abi_rc (log: $lane/abi.log)")
fi
echo
if ! gmem_matrix skips --log "$log" --required "$required_caps"; then
    problems+=("a SKIP line names a capability the lane's kernel must have (REQUIRED_CAPS; above)")
fi

# ---------------------------------------------------------------------------
say "8. kernel matrix"
gen="$lane/kernel-matrix.md"
check=()
[[ "$mode" == check ]] && check=(--check)
guest_kernel="${guest_kernel:-$KERNEL_ABI}"
if [[ "$kernel" == ours ]]; then
    lane_label="lane $lane_id $guest_kernel: 7.3.4 + gmem RFC patches (ours; QEMU TCG, $virt)"
    lane_about="Linux $guest_kernel, built by \`scripts/test-kernel.sh\` from Debian \`linux-source-7.3\` $KERNEL_VERSION with the project's patches (\`kernel/patches/\`: $(cd kernel/patches && ls -- *.patch | sed 's/\.patch$//' | paste -sd, - | sed 's/,/, /g')) on \`make tinyconfig\` + \`kernel/config.fragment\`, booted by QEMU $qemu_version with TCG on $virt_about"
else
    lane_label="lane $lane_id $guest_kernel (QEMU TCG, $virt)"
    lane_about="Linux $guest_kernel (Debian \`linux-binary-$KERNEL_ABI\` $KERNEL_VERSION), booted by QEMU $qemu_version with TCG on $virt_about"
fi
if ! gmem_matrix merge --docs docs/kernel-matrix.md --out "$gen" --date "$(date -u +%Y-%m-%d)" \
    --host-log "$lane/host.log" --lane-log "$log" \
    --lane-label "$lane_label" --lane-about "$lane_about" \
    "${check[@]}"; then
    problems+=("the kernel matrix (above)")
fi
sed -n '/kernel-matrix:begin/,/kernel-matrix:end/p' "$gen" | sed '1d;$d'
if [[ "$mode" == update ]]; then
    if [[ ${#problems[@]} -eq 0 ]]; then
        cp "$gen" docs/kernel-matrix.md
        echo "wrote docs/kernel-matrix.md"
    else
        echo "not writing docs/kernel-matrix.md: the lane failed (below); the run's matrix is $gen"
    fi
fi

echo
echo "guest: $guest_kernel ($lane_id); boot to power-off ${boot_secs}s; lane wall time $(elapsed)"
[[ $reuse -eq 1 ]] && echo "(--check-only: the results of the last run, in $lane)"
if [[ ${#problems[@]} -gt 0 ]]; then
    echo "kernel lane ($lane_id) FAILED:" >&2
    printf '  - %s\n' "${problems[@]}" >&2
    exit 1
fi
echo "kernel lane ($lane_id) passed: $(wc -l <"$lane/runs.list") test executable(s) and command(s) on $guest_kernel"
