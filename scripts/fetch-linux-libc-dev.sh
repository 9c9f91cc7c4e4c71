#!/usr/bin/env bash
# Fetch Debian's linux-libc-dev (the Linux uAPI headers as `make headers_install`
# writes them) from trixie-backports into a private directory, for the ABI tests'
# independent cross-check of headers/. Nothing is installed into the system:
# apt runs with its own sources list, lists and cache directories, and the
# package is only unpacked with `dpkg -x`. apt verifies the Release signature
# against the system's Debian archive keyring as usual.
#
# Usage: scripts/fetch-linux-libc-dev.sh [DEST]   (default: target/linux-libc-dev)
# Prints the directory that holds usr/include on success.
#
# To bump: change VERSION below (and the expected version in CHANGELOG/README).
set -euo pipefail

VERSION="${LINUX_LIBC_DEV_VERSION:-7.3.4-1~bpo13+1}"
SUITE="trixie-backports"
MIRROR="http://deb.debian.org/debian"
KEYRING="/usr/share/keyrings/debian-archive-keyring.gpg"

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/target/linux-libc-dev}"
stamp="$dest/.version"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$VERSION" && -d "$dest/usr/include/linux" ]]; then
    echo "$dest"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc/preferences.d" "$work/etc/apt.conf.d"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" > "$work/sources.list"
: > "$work/status"

opts=(
    -o "Dir::Etc::SourceList=$work/sources.list"
    -o "Dir::Etc::SourceParts=-"
    -o "Dir::Etc::Preferences=$work/etc/preferences"
    -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::State::Status=$work/status"
    -o "Dir::Cache=$work/cache"
    -o "APT::Architecture=amd64"
    -o "APT::Architectures=amd64"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=root"
)

apt-get "${opts[@]}" -qq update >&2
(cd "$work" && apt-get "${opts[@]}" -qq download "linux-libc-dev=$VERSION" >&2)
deb="$(ls "$work"/linux-libc-dev_*.deb)"

rm -rf "$dest"
mkdir -p "$dest"
dpkg -x "$deb" "$dest"
echo "$VERSION" > "$stamp"
echo "$dest"
