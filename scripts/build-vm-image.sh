#!/usr/bin/env bash
# Builds the stock Debian 12 guest the VM test suite (tests/vm/) boots: debootstrap from Debian's packages,
# the distribution kernel (6.1), systemd as PID 1, pure cgroup v2, the stock qemu-guest-agent as the
# command channel. No bootloader and no partition table: qemu boots the image's own kernel and initrd
# (copied out beside it) with root=/dev/vda, and `mkfs.ext4 -d` fills the file system without a loop device.
#
# Usage: build-vm-image.sh [CACHE_DIR]   (default build/vm). Prints the directory holding
# rootfs.img, vmlinuz and initrd.img. Cached by the hash of this script and the package lists, so a second
# run is instant; delete the directory to rebuild.
#
# What is installed is what a user's host has before they install our .deb: systemd, dbus, the kernel and its
# headers (bcc compiles against them), the .deb's dependencies (python3, python3-bpfcc, python3-systemd,
# iproute2, adduser), and stress-ng and curl for the tests' workloads. The guest has no network, so nothing can
# be fetched later.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${1:-build/vm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
GUEST_PACKAGES=(
  systemd systemd-sysv dbus udev kmod qemu-guest-agent initramfs-tools
  linux-image-amd64 linux-headers-amd64
  python3 python3-bpfcc python3-systemd iproute2 adduser
  stress-ng curl
)
key=$(sha256sum <"$0" | cut -c1-16)
OUT=$CACHE/debian12-$key
if [ -s "$OUT/rootfs.img" ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ]; then
  echo "$OUT"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "build-vm-image.sh must run as root (debootstrap, chroot)" >&2
  exit 1
fi
for tool in debootstrap mkfs.ext4 qemu-system-x86_64; do
  command -v "$tool" >/dev/null || { echo "$tool missing: run make setup" >&2; exit 1; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/shadowplane-vm.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
rootfs=$work/rootfs
include=$(IFS=,; echo "${GUEST_PACKAGES[*]}")
echo "[vm-image] debootstrap bookworm ($MIRROR) into $rootfs" >&2
debootstrap --variant=minbase --include="$include" bookworm "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
  { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
SOURCES
chroot "$rootfs" apt-get clean

echo "[vm-image] configuring" >&2
echo shadowplane-vm >"$rootfs/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 shadowplane-vm\n::1 localhost\n' >"$rootfs/etc/hosts"
echo '/dev/vda / ext4 rw,relatime 0 1' >"$rootfs/etc/fstab"
# The guest has no NIC; nothing should wait for a network.
chroot "$rootfs" systemctl mask systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
# The host's checkout is shared read-write over 9p at /host (tests/vm/guest.py mounts it).
echo 9p >"$rootfs/etc/modules-load.d/9p.conf"
printf '9pnet_virtio\n' >>"$rootfs/etc/modules-load.d/9p.conf"
mkdir -p "$rootfs/host"
kver=$(ls "$rootfs/lib/modules" | sort -V | tail -n 1)

mkdir -p "$work/out"
cp "$rootfs/boot/vmlinuz-$kver" "$work/out/vmlinuz"
cp "$rootfs/boot/initrd.img-$kver" "$work/out/initrd.img"
used_mb=$(du -sm "$rootfs" | cut -f1)
# Room for what the tests install and write (the .deb's venv is ~250 MB) without a resize step.
mkfs.ext4 -q -L root -d "$rootfs" "$work/out/rootfs.img" "$((used_mb + 2048))M"
echo "$kver" >"$work/out/kernel-version"
mkdir -p "$CACHE"
rm -rf "$OUT"
mv "$work/out" "$OUT"
echo "[vm-image] $OUT (kernel $kver, $((used_mb + 2048)) MB)" >&2
echo "$OUT"
