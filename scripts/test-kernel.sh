#!/usr/bin/env bash
# The project's own test kernel: Linux 7.3.4 from Debian's `linux-source-7.3`
# (trixie-backports), with the RFC uAPIs the crates use implemented by the
# patches in kernel/patches/, configured from kernel/config.fragment on top of
# `make tinyconfig`, built as an x86_64 bzImage with KVM built in. The kernel
# lane boots it with `scripts/kernel-lane.sh --kernel ours`.
#
#   scripts/test-kernel.sh            build (or reuse) the kernel; print its path last
#   scripts/test-kernel.sh --path     print where the kernel of this tree is or would be
#   scripts/test-kernel.sh --source D unpack the patched source into D (no build), for
#                                     writing or reviewing a patch
#
# Steps: 1. build packages (gcc, make, flex, bison, bc, libelf-dev,
# libssl-dev, xz-utils, cpio), installed if missing (as root); 2. the source
# package, fetched with the private apt configuration of
# scripts/apt-private.sh (apt verifies the Release signature against the
# Debian archive keyring and the package hash); 3. the tarball unpacked,
# the patches applied in order with `patch -p1` (a patch that does not apply
# exactly, without fuzz, fails the build); 4. tinyconfig + the fragment +
# olddefconfig, and a check that every line of the fragment holds in the
# result; 5. `make bzImage`.
#
# Cache: $GMEM_KERNEL_CACHE, default ~/.cache/kvm-gmem/test-kernel (outside
# the clone, so it survives between CI runs on one machine). The kernel is
# stored under a key that hashes the source version, the fragment, the
# patches and RECIPE (below): <cache>/<key>/{bzImage,config,patches.txt,
# build.txt}. A tree with the same inputs reuses it; anything else builds
# anew. Invocations for one key are serialized with flock(1) on
# <cache>/<key>.lock. The source .deb is kept in <cache>/debs; the build tree is removed
# after a build (GMEM_KERNEL_KEEP_BUILD=1 keeps it in <cache>/<key>/build).
#
# Environment: GMEM_KERNEL_CACHE (above), GMEM_KERNEL_JOBS (make -j, default
# the number of CPUs).
set -euo pipefail

SOURCE_PACKAGE="linux-source-7.3"
SOURCE_VERSION="7.3.4-1~bpo13+1"
# The recipe's version: part of the cache key with the source version, the
# fragment and the patches. Bump it when a change to steps 3 to 5 changes
# what gets built (not for a change to messages or caching).
RECIPE=1

root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/apt-private.sh
source "$root/scripts/apt-private.sh"
cache="${GMEM_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvm-gmem/test-kernel}"
jobs="${GMEM_KERNEL_JOBS:-$(nproc)}"
fragment="$root/kernel/config.fragment"
patches=("$root"/kernel/patches/*.patch)
SECONDS=0
say() { printf '==> [test-kernel %dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }

# The cache key: every input of the build.
key="$(
    {
        echo "$SOURCE_PACKAGE $SOURCE_VERSION recipe $RECIPE"
        sha256sum "$fragment" "${patches[@]}" | awk '{print $1}'
    } | sha256sum | cut -c1-16
)"
out="$cache/$key"

mode=build
src_dir=""
case "${1:-}" in
    "") ;;
    --path)
        echo "$out/bzImage"
        exit 0
        ;;
    --source)
        mode=source
        src_dir="${2:?usage: $0 --source DIR}"
        ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [--path | --source DIR]" >&2
        exit 2
        ;;
esac

# One build per key at a time: a second invocation (another lane, another
# CI run on this machine) waits here, then finds the kernel built.
mkdir -p "$cache"
if [[ $mode == build ]]; then
    exec 9>"$cache/$key.lock"
    if ! flock -n 9; then
        say "waiting for the build of $key by another invocation"
        flock 9
    fi
fi

if [[ $mode == build && -f "$out/bzImage" && -f "$out/build.txt" ]]; then
    say "cached: $out ($(head -n 1 "$out/build.txt"))"
    echo "$out/bzImage"
    exit 0
fi

# ---------------------------------------------------------------------------
say "1. build packages"
packages=(gcc make flex bison bc libelf-dev libssl-dev xz-utils cpio)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "installing: ${missing[*]}" >&2
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: installing packages needs root (or install: ${missing[*]})" >&2
        exit 1
    fi
    apt-get -qq update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# ---------------------------------------------------------------------------
say "2. $SOURCE_PACKAGE $SOURCE_VERSION (trixie-backports)"
debs="$cache/debs"
deb="$debs/${SOURCE_PACKAGE}_${SOURCE_VERSION//:/%3a}_all.deb"
if [[ ! -f "$deb" ]]; then
    apt_private_download amd64 "$debs" "$SOURCE_PACKAGE=$SOURCE_VERSION"
fi
echo "$deb ($(du -h "$deb" | cut -f1))" >&2

# ---------------------------------------------------------------------------
say "3. unpack; apply ${#patches[@]} patch(es)"
if [[ $mode == source ]]; then
    tree="$src_dir"
    # Never a directory with something in it: the caller's, not ours to clear.
    if [[ -e "$tree" && -n "$(ls -A "$tree" 2>/dev/null)" ]]; then
        echo "error: $tree exists and is not empty; give a new directory" >&2
        exit 2
    fi
else
    rm -rf "$out"
    tree="$out/build/src"
fi
mkdir -p "$tree"
dpkg-deb --fsys-tarfile "$deb" | tar -x -O "./usr/src/$SOURCE_PACKAGE.tar.xz" |
    tar -xJ -C "$tree" --strip-components=1
for p in "${patches[@]}"; do
    # The subject, unfolded (format-patch wraps long headers).
    subject="$(awk '/^Subject: /{s = $0; getline; while (/^ /) {s = s $0; getline}; print s; exit}' "$p")"
    echo "  $(basename "$p"): $(sed 's/^Subject: \(\[PATCH[^]]*\] \)\{0,1\}//' <<<"$subject")" >&2
    patch -d "$tree" -p1 --quiet --fuzz=0 --no-backup-if-mismatch <"$p"
done
if [[ $mode == source ]]; then
    say "the patched source is in $tree"
    exit 0
fi

# ---------------------------------------------------------------------------
say "4. configure: tinyconfig + kernel/config.fragment"
build="$out/build/obj"
mkdir -p "$build"
make -s -C "$tree" O="$build" tinyconfig >/dev/null
"$tree/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$fragment" >/dev/null
make -s -C "$tree" O="$build" olddefconfig >/dev/null
unmet=()
while read -r line; do
    grep -qxF "$line" "$build/.config" || unmet+=("$line")
done < <(grep -E '^CONFIG_' "$fragment")
if [[ ${#unmet[@]} -gt 0 ]]; then
    echo "error: the configuration lacks lines of kernel/config.fragment (a dependency is off):" >&2
    printf '  %s\n' "${unmet[@]}" >&2
    exit 1
fi

# ---------------------------------------------------------------------------
say "5. make -j$jobs bzImage"
build_start=$SECONDS
make -s -C "$tree" O="$build" -j"$jobs" bzImage >&2
build_secs=$((SECONDS - build_start))
cp "$build/arch/x86/boot/bzImage" "$out/bzImage"
cp "$build/.config" "$out/config"
for p in "${patches[@]}"; do basename "$p"; done >"$out/patches.txt"
{
    echo "Linux $(make -s -C "$tree" O="$build" kernelrelease) from $SOURCE_PACKAGE $SOURCE_VERSION + ${#patches[@]} patch(es); make -j$jobs bzImage ${build_secs}s; total ${SECONDS}s on $(nproc) CPU(s)"
    date -u +%Y-%m-%dT%H:%M:%SZ
} >"$out/build.txt"
[[ "${GMEM_KERNEL_KEEP_BUILD:-0}" == 1 ]] || rm -rf "$out/build"
say "built: $(head -n 1 "$out/build.txt")"
echo "$out/bzImage"
