#!/usr/bin/env bash
# Run proxyd in userspace mode on the bundled example, without touching the
# host's own network: a "node" network namespace runs proxyd with
# examples/standalone/manifests, and two pod namespaces (10.244.1.2 and
# 10.244.1.3, and fd00:10:244:1::2 and ::3, each on a routed veth) run the
# demo backend. Prints the curl lines that show round robin, over IPv4 and
# over IPv6 (the dual-stack service demo-dual). Ctrl-C stops everything and removes it all.
# `--once` shows a few requests and exits (what the tests run).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=examples/standalone
once=0
[ "${1:-}" = "--once" ] && once=1
[ "$(id -u)" = 0 ] || { echo "run.sh: run as root (it creates network namespaces)" >&2; exit 1; }
[ -x .venv/bin/proxyd ] || { echo "run.sh: run scripts/setup.sh first" >&2; exit 1; }

# PXDEMO_PREFIX names the namespaces (tests give each run its own, so runs never collide).
prefix=${PXDEMO_PREFIX:-pxdemo}
node=$prefix-node
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in $node $prefix-pod2 $prefix-pod3; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
cleanup

ip netns add $node
ip -n $node link set lo up
for i in 2 3; do
  pod=$prefix-pod$i
  ip netns add $pod
  ip -n $pod link set lo up
  ip link add pxdemo$i netns $node type veth peer name eth0 netns $pod
  ip -n $node addr add 10.244.1.1/32 dev pxdemo$i
  ip -n $node link set pxdemo$i up
  ip -n $node route add 10.244.1.$i/32 dev pxdemo$i
  ip -n $pod addr add 10.244.1.$i/32 dev eth0
  ip -n $pod link set eth0 up
  ip -n $pod route add 10.244.1.1/32 dev eth0
  ip -n $pod route add default via 10.244.1.1 dev eth0
  # IPv6 too, for the dual-stack service (nodad: usable at once).
  ip -n $node addr add fd00:10:244:1::1/128 dev pxdemo$i nodad
  ip -n $node route add fd00:10:244:1::$i/128 dev pxdemo$i
  ip -n $pod addr add fd00:10:244:1::$i/128 dev eth0 nodad
  ip -n $pod route add fd00:10:244:1::1/128 dev eth0
  ip -n $pod route add default via fd00:10:244:1::1 dev eth0
  ip netns exec $pod python3 $here/backend.py --name pod$i >/dev/null 2>&1 &
  pids+=($!)
done

ip netns exec $node .venv/bin/proxyd --proxy-mode userspace --manifests $here/manifests \
  --hostname-override demo-node --healthz-bind-address 127.0.0.1:10256 &
pids+=($!)
for _ in $(seq 100); do
  if ip netns exec $node curl -sf -o /dev/null http://127.0.0.1:10256/healthz; then break; fi
  sleep 0.1
done
ip netns exec $node curl -sf -o /dev/null http://127.0.0.1:10256/healthz || { echo "proxyd did not become healthy" >&2; exit 1; }

url=http://10.96.0.10/
url6='http://[fd00:10:96::12]/'
echo
echo "proxyd is serving the example. In another terminal, run (answers alternate between pod2 and pod3):"
echo "  ip netns exec $node curl -s $url    (as root)"
echo "and the dual-stack service demo-dual over IPv6 (10.96.0.12 is its IPv4 address):"
echo "  ip netns exec $node curl -s -g $url6    (as root)"
echo
if [ "$once" = 1 ]; then
  for _ in 1 2 3 4; do ip netns exec $node curl -s --max-time 5 $url; done
  for _ in 1 2 3 4; do ip netns exec $node curl -s -g --max-time 5 "$url6"; done
  exit 0
fi
echo "Ctrl-C to stop."
wait "${pids[-1]}"
