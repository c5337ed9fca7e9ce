#!/usr/bin/env bash
# Set up proxyd on a fresh Debian machine (as root): system packages, a virtual
# environment in .venv with the pinned Python dependencies, and proxyd itself
# (editable, with its Cython extension). `--test` adds what the test suite and
# the QEMU/IPVS runner need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    *) echo "usage: $0 [--test]" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (it installs system packages)" >&2
  exit 1
fi

packages=(python3 python3-venv python3-dev gcc iproute2 iptables nftables libnftables1 ipset conntrack kmod procps curl)
if [ "$want_test" = 1 ]; then
  packages+=(iperf3 wrk haproxy nginx-light libnginx-mod-stream socat libcap2-bin systemd
             qemu-system-x86 busybox-static)
  packages+=(ipvsadm)  # bench/sync_scale.py --mode ipvs: ipvsadm-restore, the C tool it compares with
fi
# The standalone tests generate manifests with the real kubectl client
# (Debian's kubernetes-client package); keep a kubectl that is already there.
if [ "$want_test" = 1 ] && ! command -v kubectl >/dev/null; then
  packages+=(kubernetes-client)
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip setuptools wheel
extras=""
[ "$want_test" = 1 ] && extras="[test,bench]"
# The extension must build here: a silent fall-back to the pure twin would hide a broken build.
PROXYD_REQUIRE_EXTENSIONS=1 .venv/bin/pip install -q -c constraints.txt -e ".$extras"
.venv/bin/python -c 'import proxyd.modes.userspace.conntable as c, proxyd.modes.userspace.engine as e; print("proxyd installed; native conntable:", c.NATIVE, "native TCP engine:", e.NATIVE)'

if [ "$want_test" = 1 ] && [ -x scripts/ipvs-vm-setup.sh ]; then
  scripts/ipvs-vm-setup.sh
fi
