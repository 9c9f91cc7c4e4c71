#!/usr/bin/env bash
# Fetch Debian's linux-libc-dev (the Linux uAPI headers as `make headers_install`
# writes them) from trixie-backports into a private directory, for the ABI tests'
# independent cross-check of headers/. Nothing is installed into the system:
# apt runs with its own sources list, lists and cache directories
# (scripts/apt-private.sh), and the package is only unpacked with `dpkg -x`.
# apt verifies the Release signature against the system's Debian archive
# keyring as usual.
#
# Usage: scripts/fetch-linux-libc-dev.sh [DEST]   (default: target/linux-libc-dev)
# Prints the directory that holds usr/include on success.
#
# To bump: change VERSION below (and the expected version in CHANGELOG/README).
set -euo pipefail

VERSION="${LINUX_LIBC_DEV_VERSION:-7.3.4-1~bpo13+1}"

root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/apt-private.sh
source "$root/scripts/apt-private.sh"
dest="${1:-$root/target/linux-libc-dev}"
stamp="$dest/.version"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$VERSION" && -d "$dest/usr/include/linux" ]]; then
    echo "$dest"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
apt_private_download amd64 "$work" "linux-libc-dev=$VERSION"
deb="$(ls "$work"/linux-libc-dev_*.deb)"

rm -rf "$dest"
mkdir -p "$dest"
dpkg -x "$deb" "$dest"
echo "$VERSION" > "$stamp"
echo "$dest"
