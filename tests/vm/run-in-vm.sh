#!/usr/bin/env bash
# Run the IPVS tests (pytest -m ipvs) inside a QEMU guest booting Debian's
# stock kernel, which has IPVS and the dummy driver (this host's kernel has
# neither). The guest sees the host's files read-only (virtme-ng), so it runs
# the project's own .venv; results come back through one writable directory.
#
#   tests/vm/run-in-vm.sh                 # pytest -m ipvs tests/vm
#   tests/vm/run-in-vm.sh -k affinity     # extra pytest arguments
#   tests/vm/run-in-vm.sh --cmd 'python -m bench.sync_scale --mode ipvs --services 1000,10000 --save'
#                                         # any command (run from the repo, .venv/bin first in PATH)
#
# A benchmark's --save file written in the guest (bench/runmeta.py: PROXYD_BENCH_RESULTS points the
# guest at a shared directory) is copied to bench/results/ on the host, with the run's metadata saying
# it ran in this guest: emulation, guest and host kernels, the host's load average before and after.
#
# Env: RESULTS_DIR (default build/test-results; the guest writes to
# $RESULTS_DIR/vm), VM_TIMEOUT seconds for the whole guest run (default
# 3600: beside the host suites on a slow, busy host the suite took 50 min before the iptables
# work of a full sync and of a test's node reset went from dozens of processes to a few, 27 min
# after),
# VM_MEMORY (default 2G), VM_VERBOSE=1 (the guest's console and kernel log
# into $RESULTS_DIR/vm/vng.log: where a silent hang stopped), PROXYD_VM_DIR (kernel location, see
# scripts/ipvs-vm-setup.sh, which is run here when the kernel is missing).
#
# `vng` exits 255 even when the guest command succeeded, so the guest writes
# its exit status to a file and this script exits with that status (1 when
# the guest never wrote it: boot failure or timeout). Software emulation is
# used (--disable-kvm): KVM fails to start on these hosts.
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

vm_dir=${PROXYD_VM_DIR:-/var/cache/proxyd-vm}
results=${RESULTS_DIR:-$repo/build/test-results}
final="$results/vm"
# The guest writes into a directory under /tmp, copied to $final at exit: with its writable directory
# under /work the guest hung at boot, silently (seen three times on these machines; never under /tmp).
out=$(mktemp -d /tmp/proxyd-vm.XXXXXX)
finish() {
  mkdir -p "$final"
  rm -f "$final/rc" "$final/ipvs.xml" "$final/guest.log" "$final/vng.log" "$final/command"
  for f in rc ipvs.xml guest.log vng.log command; do
    [ -f "$out/$f" ] && cp "$out/$f" "$final/$f"
  done
  rm -rf "$out"
}
trap finish EXIT
timeout_s=${VM_TIMEOUT:-3600}
memory=${VM_MEMORY:-2G}
cpus=2
verbose=()
[ "${VM_VERBOSE:-0}" = 1 ] && verbose=(--verbose)

command=""
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cmd) command=$2; shift 2 ;;
    *) pytest_args+=("$1"); shift ;;
  esac
done

if [ ! -f "$vm_dir/kver" ] || [ ! -x .venv/bin/vng ]; then
  echo "run-in-vm: guest kernel or vng missing; running scripts/ipvs-vm-setup.sh"
  PROXYD_VM_DIR=$vm_dir scripts/ipvs-vm-setup.sh || { echo "run-in-vm: setup failed" >&2; exit 1; }
fi
kver=$(cat "$vm_dir/kver")
kernel="$vm_dir/vmlinuz-$kver"
if [ ! -f "$kernel" ] || [ ! -d "/lib/modules/$kver" ]; then
  echo "run-in-vm: $kernel or /lib/modules/$kver missing: run scripts/ipvs-vm-setup.sh" >&2
  exit 1
fi

mkdir -p "$out" "$out/results"
rm -f "$out/rc" "$out/ipvs.xml" "$out/guest.log" "$out/bundle.tar"
# Which code runs (the guest's copy has no .git) and on what host, for a benchmark's results file.
commit=$(git describe --always --dirty --abbrev=12 2>/dev/null || echo "?")
host_load=$(cut -d' ' -f1-3 /proc/loadavg)

command_given=$command
if [ -z "$command" ]; then
  # Quote each pytest argument for the guest's shell.
  extra=""
  for arg in "${pytest_args[@]+"${pytest_args[@]}"}"; do extra+=" $(printf '%q' "$arg")"; done
  command="python -m pytest -m ipvs tests/vm -p no:cacheprovider -q -rfEs --junitxml=$out/ipvs.xml$extra"
fi
printf '%s\n' "$command" > "$out/command"

# The guest reads the host's files over 9p, where every stat/open costs a
# round trip through the emulator: importing pyroute2 takes ~30 s that way.
# So the Python side (stdlib without tests and tools, the venv's
# site-packages without build and plotting tools, and the project's code)
# travels as one tar file that the guest unpacks into its RAM-backed /tmp
# and runs from there: a relocated venv whose python is the host's binary.
base_bin=$(awk -F' = ' '$1 == "home" {print $2}' .venv/pyvenv.cfg)
base=$(dirname "$base_bin")
pyver=$(.venv/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
stdlib="lib/python$pyver"
site=".venv/lib/python$pyver/site-packages"
bundle_start=$SECONDS
# The guest cannot write bytecode (read-only sources, PYTHONDONTWRITEBYTECODE), and a fresh clone has
# none: every Python process it starts would compile each project module it imports, about a second more
# per daemon start under emulation. Compiled here, the bytecode travels in the bundle.
.venv/bin/python -m compileall -q proxyd netnstopo tests $( [ -d bench ] && echo bench ) >/dev/null \
  || echo "run-in-vm: compileall failed; the guest compiles as it imports" >&2
tar -cf "$out/bundle.tar" --anchored \
  --exclude="$stdlib/site-packages" --exclude="$stdlib/test" --exclude="$stdlib/idlelib" \
  --exclude="$stdlib/tkinter" --exclude="$stdlib/turtledemo" --exclude="$stdlib/ensurepip" \
  --exclude="$stdlib/lib2to3" --exclude="$stdlib/config-*" \
  --exclude="$site/pip" --exclude="$site/setuptools" --exclude="$site/Cython" --exclude="$site/matplotlib" \
  --exclude="$site/numpy" --exclude="$site/numpy.libs" --exclude="$site/fontTools" --exclude="$site/PIL" \
  --exclude="$site/pillow.libs" --exclude="$site/contourpy" --exclude="$site/kiwisolver" \
  --exclude="$site/__editable__*" \
  --transform "s,^lib/,pyhome/lib/," --transform "s,^bin/,pyhome/bin/," --transform "s,^\\.venv/,venv/," \
  --transform "s,^\\(proxyd\\|netnstopo\\|tests\\|bench\\|pyproject.toml\\),repo/\\1," \
  -C "$base" "$stdlib" "bin/python$pyver" $(cd "$base" && ls lib/libpython"$pyver"*.so* 2>/dev/null) \
  -C "$repo" "$site" proxyd netnstopo tests pyproject.toml $( [ -d bench ] && echo bench )
echo "run-in-vm: bundle $(du -h "$out/bundle.tar" | cut -f1) built in $((SECONDS - bundle_start))s"

# Runs inside the guest (as root, host FS read-only, /tmp /etc /var overlaid). The guest
# exists to provide IPVS: without the module nothing could test it, so that fails at once.
# The script travels as a file in the shared directory, and the guest is only told to run it:
# vng passes its --exec text base64-encoded on the kernel command line, whose 2048 bytes this
# script plus a few pytest arguments (or a long directory name) overflowed, and the guest
# kernel then panicked at boot (fortify: buffer overflow in strlen) with nothing on the console:
# the silent boot hangs seen before. No comments or single quotes inside the script.
guest_script="set -u
exec >>$out/guest.log 2>&1
modprobe ip_vs && modprobe dummy || { echo run-in-vm: modprobe ip_vs or dummy failed; echo 1 > $out/rc; exit 1; }
g=/tmp/pxd
mkdir -p \$g && tar -C \$g -xf $out/bundle.tar || { echo 1 > $out/rc; exit 1; }
mkdir -p \$g/venv/bin
ln -s \$g/pyhome/bin/python$pyver \$g/venv/bin/python
ln -s python \$g/venv/bin/python3
printf 'home = %s\\ninclude-system-site-packages = false\\nversion = %s\\n' \$g/pyhome/bin $pyver > \$g/venv/pyvenv.cfg
echo \$g/repo > \$g/venv/lib/python$pyver/site-packages/proxyd-repo.pth
printf '#!%s\\nimport sys\\nfrom proxyd.cli import main\\nsys.exit(main())\\n' \$g/venv/bin/python > \$g/venv/bin/proxyd
chmod +x \$g/venv/bin/proxyd
export PYTHONHOME=\$g/pyhome LD_LIBRARY_PATH=\$g/pyhome/lib PYTHONDONTWRITEBYTECODE=1 PROXYD_IN_VM=1
export PROXYD_BENCH_RESULTS=$out/results PROXYD_BENCH_COMMIT=$(printf '%q' "$commit")
export PROXYD_VM_EMULATION=$(printf '%q' "QEMU TCG software emulation, no KVM, $memory, $cpus vCPUs")
export PROXYD_VM_HOST_KERNEL=$(uname -r) PROXYD_VM_HOST_CPUS=$(nproc) PROXYD_VM_HOST_LOAD=$(printf '%q' "$host_load")
export PATH=\$g/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd \$g/repo
(eval $(printf '%q' "$command"))
echo \$? > $out/rc"
printf '%s\n' "$guest_script" > "$out/guest.sh"

export PATH="$repo/.venv/bin:$PATH"
echo "run-in-vm: booting Debian kernel $kver under QEMU (TCG, timeout ${timeout_s}s)"
start=$(date +%s)
timeout --kill-after=20 "$timeout_s" vng --run "$kernel" --memory "$memory" --cpus "$cpus" --disable-kvm ${verbose[@]+"${verbose[@]}"} \
  --rwdir "$out" --exec "sh $out/guest.sh" >"$out/vng.log" 2>&1 </dev/null
vng_rc=$?
rm -f "$out/bundle.tar"
elapsed=$(( $(date +%s) - start ))

if [ ! -f "$out/rc" ]; then
  echo "run-in-vm: the guest wrote no exit status (vng exit $vng_rc after ${elapsed}s); last output:" >&2
  tail -n 40 "$out/vng.log" >&2
  [ -f "$out/guest.log" ] && tail -n 40 "$out/guest.log" >&2
  exit 1
fi
rc=$(cat "$out/rc")
# The guest's own output (pytest's summary included), without kernel log lines.
cat "$out/guest.log"
saved=("$out"/results/*.json)
if [ -f "${saved[0]}" ]; then
  mkdir -p bench/results
  copied=()
  for f in "${saved[@]}"; do
    cp "$f" bench/results/ && copied+=("bench/results/$(basename "$f")") && echo "run-in-vm: saved ${copied[-1]}"
  done
  [ ${#copied[@]} = 0 ] || .venv/bin/python -m bench.runmeta --host-load-after "${copied[@]}" \
    || echo "run-in-vm: could not add the host load average to the results files" >&2
fi
if [ -f "$out/ipvs.xml" ]; then
  # One plain line with the guest's counts, so whoever reads this log sees them.
  .venv/bin/python - "$out/ipvs.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"guest: {passed} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped")
# pytest exits 0 when every test skipped: a guest run that tested nothing has failed.
sys.exit(0 if passed + n["failures"] + n["errors"] > 0 else 1)
EOF
  [ $? = 0 ] || { echo "run-in-vm: no test ran in the guest" >&2; rc=1; }
elif [ -z "$command_given" ]; then
  echo "run-in-vm: the guest wrote no $out/ipvs.xml" >&2
  rc=1
fi
echo "run-in-vm: guest exit status $rc, ${elapsed}s wall clock (boot included)"
exit "$rc"
