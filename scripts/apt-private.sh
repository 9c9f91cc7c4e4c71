# shellcheck shell=bash
# Sourced by the scripts that fetch Debian packages without installing them
# (fetch-linux-libc-dev.sh, kernel-lane.sh, test-kernel.sh):
#
#   apt_private_download DEB_ARCH DEST_DIR PACKAGE[=VERSION]...
#
# downloads the packages' .deb files into DEST_DIR from Debian trixie and
# trixie-backports with a private apt configuration: its own sources list,
# lists, status and cache in a temporary directory, so the system's apt
# state is neither read nor changed. apt verifies the Release signature
# against the system's Debian archive keyring and each package's hash, as
# usual; nothing is installed. apt's progress goes to standard error.

APT_PRIVATE_MIRROR="http://deb.debian.org/debian"
APT_PRIVATE_KEYRING="/usr/share/keyrings/debian-archive-keyring.gpg"

apt_private_download() {
    local arch="$1" dest="$2"
    shift 2
    local work suite rc=0
    work="$(mktemp -d)"
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc/preferences.d"
    for suite in trixie trixie-backports; do
        echo "deb [signed-by=$APT_PRIVATE_KEYRING] $APT_PRIVATE_MIRROR $suite main"
    done >"$work/sources.list"
    : >"$work/status"
    local opts=(
        -o "Dir::Etc::SourceList=$work/sources.list"
        -o "Dir::Etc::SourceParts=-"
        -o "Dir::Etc::Preferences=$work/etc/preferences"
        -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
        -o "Dir::State::Lists=$work/lists"
        -o "Dir::State::Status=$work/status"
        -o "Dir::Cache=$work/cache"
        -o "APT::Architecture=$arch"
        -o "APT::Architectures=$arch"
        -o "Debug::NoLocking=1"
        -o "APT::Sandbox::User=root"
    )
    mkdir -p "$dest"
    apt-get "${opts[@]}" -qq update >&2 &&
        (cd "$dest" && apt-get "${opts[@]}" -qq download "$@" >&2) || rc=$?
    rm -rf "$work"
    return "$rc"
}
