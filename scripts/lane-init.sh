#!/bin/busybox sh
# shellcheck shell=dash
# /init of the kernel lane's initramfs (PID 1 inside the QEMU guest).
#
# scripts/kernel-lane.sh copies this file to /init of the initramfs, next to:
#   /bin/busybox                  busybox-static (every applet linked at boot)
#   /lane/modules/<name>.ko       the KVM modules, decompressed, in load order
#                                 (none on arm64, whose KVM is built in)
#   /lane/modules.list            their names, one a line, in load order
#   /lane/runs.list               "<name> <kind> <absolute path> [args]" per run: kind
#                                 "test" (a libtest executable, run with
#                                 --test-threads=1 --show-output [args]) or
#                                 "command" (run with [args] only)
#   /lane/required-caps           the capabilities this kernel must have, comma-separated
#                                 (kernel-lane.sh's REQUIRED_CAPS)
#   the test binaries and the gmem command at their host paths (so the
#   CARGO_BIN_EXE_* paths compiled into the tests resolve), and their ldd
#   libraries and dynamic loader.
#
# It prints, on the serial console, markers that the host parses:
#   LANE-KERNEL <release>
#   LANE-BEGIN <name>  ...test output...  LANE-END <name> rc=<n>
#   LANE-DONE
# then powers the guest off. Any setup failure prints LANE-ERROR <what>; the
# host treats a missing LANE-DONE (or a LANE-ERROR) as a failed lane.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# /tmp stays on the (writable) initramfs: no tmpfs over it, because the test
# executables sit at their host paths, which may lie under /tmp.
chmod 1777 /tmp
mount -t tmpfs tmpfs /run

# The per-binary time limit (seconds) is written by the host.
per_test_timeout=300
[ -f /lane/timeout ] && per_test_timeout="$(cat /lane/timeout)"

echo "LANE-KERNEL $(uname -r)"

while read -r mod; do
    [ -n "$mod" ] || continue
    if ! insmod "/lane/modules/$mod.ko"; then
        echo "LANE-ERROR insmod $mod"
    fi
done < /lane/modules.list

# A misc device node: devtmpfs creates it, unless the driver registered
# before devtmpfs was mounted without one; then make it from sysfs.
misc_node() {
    name="$1"
    [ -e "/dev/$name" ] && return 0
    if [ -r "/sys/class/misc/$name/dev" ]; then
        majmin="$(cat "/sys/class/misc/$name/dev")"
        mknod -m 0666 "/dev/$name" c "${majmin%%:*}" "${majmin##*:}"
        echo "lane: made /dev/$name ($majmin) from sysfs"
    fi
    [ -e "/dev/$name" ] || echo "LANE-ERROR no /dev/$name"
}
misc_node kvm
misc_node userfaultfd

echo "lane: $(uname -m), $(grep -c ^processor /proc/cpuinfo) cpu(s)," \
    "$(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo) memory," \
    "svm=$(grep -qw svm /proc/cpuinfo && echo yes || echo no)," \
    "npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null || echo ?)," \
    "tdp_mmu=$(cat /sys/module/kvm/parameters/tdp_mmu 2>/dev/null || echo ?)"
# How KVM came up (arm64: the EL2 mode, VHE or nVHE, and the GIC).
dmesg | grep -E 'kvm \[[0-9]+\]: ' | sed 's/^/lane: /'

export CI=true GMEM_KERNEL_LANE=1 RUST_BACKTRACE=1 HOME=/tmp TMPDIR=/tmp
# A test that would skip for want of one of these fails instead.
GMEM_REQUIRED_CAPS="$(cat /lane/required-caps 2>/dev/null)"
export GMEM_REQUIRED_CAPS
echo "lane: GMEM_REQUIRED_CAPS=$GMEM_REQUIRED_CAPS"
cd /tmp || echo "LANE-ERROR cd /tmp"

while read -r name kind path args; do
    [ -n "$name" ] || continue
    echo "LANE-BEGIN $name"
    # A test executable gets --show-output: the output of passing tests
    # (their SKIP lines) too.
    harness=""
    [ "$kind" = test ] && harness="--test-threads=1 --show-output"
    # shellcheck disable=SC2086 # harness and args are split on purpose
    timeout -s KILL "$per_test_timeout" "$path" $harness $args
    rc=$?
    echo "LANE-END $name rc=$rc"
done < /lane/runs.list

echo "LANE-DONE"
sync
poweroff -f
