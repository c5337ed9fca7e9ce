#!/usr/bin/env bash
# Run the whole test suite as root after scripts/setup.sh --test:
#   1. ruff over the tree, mypy (strict) over proxyd/;
#   2. pytest on this kernel: unit, API (fake API server + real kubernetes_asyncio
#      client) and network-namespace integration tests (userspace and iptables
#      modes, real daemon, real packets);
#   3. the IPVS tests inside a QEMU guest running Debian's stock kernel, beside step 2 (this
#      host's kernel has no IPVS), with the guest's test counts printed;
#   4. per-suite test counts (unit, api, netns, reliability, vm) from the JUnit
#      XML, failing any suite that ran fewer tests than its minimum in
#      tests/suite_counts.py (zero included).
# Results (JUnit XML, logs) go to $RESULTS_DIR (default build/test-results).
# Exit status is non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${RESULTS_DIR:-$PWD/build/test-results}
mkdir -p "$results"
status=0

stage() { printf '\n=== %s ===\n' "$*"; }

stage "ruff"
.venv/bin/ruff check . || status=1

stage "mypy (strict, proxyd/)"
.venv/bin/mypy || status=1

# The ipvs suite boots its own kernel under QEMU (software emulation: one core busy for its whole
# run, the host suites mostly wait on sockets), so it runs beside the host suites, not after them.
vm_pid=""
if [ -x tests/vm/run-in-vm.sh ]; then
  stage "pytest -m ipvs inside a QEMU guest with IPVS: started in the background (its output follows the host suites)"
  rm -f "$results/vm/ipvs.xml"
  RESULTS_DIR="$results" tests/vm/run-in-vm.sh > "$results/vm.log" 2>&1 &
  vm_pid=$!
fi

stage "pytest (host kernel: unit, api, netns, reliability)"
# The suite must exercise the Cython connection table, not silently the twin.
export PROXYD_REQUIRE_EXTENSIONS=${PROXYD_REQUIRE_EXTENSIONS:-1}
.venv/bin/python -c 'import proxyd.modes.userspace.conntable as c; assert c.NATIVE, "Cython extension not built"; print("conntable: native extension in use")' || status=1
rm -f "$results/host.xml"  # a run that dies before writing it must not be counted from an old one
.venv/bin/pytest -m "not ipvs" -p no:cacheprovider -q -rfEs --junitxml="$results/host.xml" "$@"
rc=$?
# 5 = no tests collected: a suite that ran nothing has failed.
[ "$rc" = 0 ] || status=1
# Per-suite counts from the JUnit XML; with no extra pytest arguments every suite must
# have run at least its minimum (tests/suite_counts.py), so an all-skipped suite fails.
host_suites=unit,api,netns,reliability
[ $# -eq 0 ] || host_suites=""
.venv/bin/python -m tests.suite_counts --suites "$host_suites" "$results/host.xml" || status=1

if [ -n "$vm_pid" ]; then
  stage "pytest -m ipvs inside a QEMU guest with IPVS"
  wait "$vm_pid" || status=1
  cat "$results/vm.log"
  .venv/bin/python -m tests.suite_counts --suites vm "$results/vm/ipvs.xml" || status=1
fi

stage "summary"
[ "$status" = 0 ] && echo "all stages passed" || echo "some stage failed"
exit "$status"
