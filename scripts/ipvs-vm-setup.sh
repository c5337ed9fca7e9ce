#!/usr/bin/env bash
# One-time setup for the IPVS tests (as root; safe to run again).
#
# This host's kernel has no IPVS and no dummy driver, so the ipvs tests run in
# a QEMU guest booting Debian's stock kernel, which has both as modules. The
# guest shares the host's root filesystem read-only (virtme-ng), so the only
# things to provide are:
#   * the kernel image, unpacked from Debian's linux-image package into
#     $PROXYD_VM_DIR (default /var/cache/proxyd-vm), with its version in
#     $PROXYD_VM_DIR/kver;
#   * its modules in /lib/modules/$KVER on the host (the guest loads them from
#     there), with depmod run;
#   * qemu, kmod and busybox-static (apt), and virtme-ng (`vng`, PyPI) in the
#     project's .venv.
# Nothing is installed into the host's boot path: the host keeps its kernel.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "ipvs-vm-setup.sh: run as root (it installs packages and writes /lib/modules)" >&2
  exit 1
fi

vm_dir=${PROXYD_VM_DIR:-/var/cache/proxyd-vm}
export DEBIAN_FRONTEND=noninteractive

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
command -v depmod >/dev/null || need_apt+=(kmod)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
# The guest's tests need these too; they are the host's binaries, seen through the shared root.
command -v ipset >/dev/null || need_apt+=(ipset)
command -v iptables-restore >/dev/null || need_apt+=(iptables)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v ipvsadm-restore >/dev/null || need_apt+=(ipvsadm)  # the C tools bench/sync_scale.py compares with
if [ "${#need_apt[@]}" -gt 0 ] || [ ! -f "$vm_dir/kver" ]; then
  apt-get update -qq
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "ipvs-vm-setup.sh: .venv missing: run scripts/setup.sh first" >&2
  exit 1
fi
if [ ! -x .venv/bin/vng ]; then
  constraint=()
  [ -f constraints.txt ] && constraint=(-c constraints.txt)
  .venv/bin/pip install -q "${constraint[@]}" virtme-ng
fi

kver=""
[ -f "$vm_dir/kver" ] && kver=$(cat "$vm_dir/kver")
if [ -n "$kver" ] && [ -f "$vm_dir/vmlinuz-$kver" ] && [ -f "/lib/modules/$kver/modules.dep" ]; then
  echo "ipvs-vm-setup: kernel $kver already in place ($vm_dir)"
  exit 0
fi

# linux-image-amd64 is a metapackage: fetch the versioned image it depends on.
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$pkg" ]; then
  echo "ipvs-vm-setup.sh: cannot resolve linux-image-amd64 (apt-get update failed?)" >&2
  exit 1
fi
work=$(mktemp -d)
chmod 755 "$work"  # apt-get download runs as _apt
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq "$pkg")
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"
kver=$(ls "$work/root/lib/modules")
mkdir -p "$vm_dir" /lib/modules
rm -rf "/lib/modules/$kver"
cp -a "$work/root/lib/modules/$kver" "/lib/modules/$kver"
depmod "$kver"
cp "$work/root/boot/vmlinuz-$kver" "$vm_dir/vmlinuz-$kver"
[ -f "$work/root/boot/config-$kver" ] && cp "$work/root/boot/config-$kver" "$vm_dir/config-$kver"
echo "$kver" > "$vm_dir/kver"
echo "ipvs-vm-setup: kernel $kver ready ($vm_dir/vmlinuz-$kver, modules in /lib/modules/$kver)"
