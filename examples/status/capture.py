"""Capture real ``proxyd status`` / ``proxyd trace`` output for the README, from a throw-away topology.

    sudo .venv/bin/python examples/status/capture.py [--mode iptables|userspace]

Builds the netns topology of the tests (node, three pods, an outside
client), starts the real daemon in ``--mode`` with a ``web`` NodePort service
(three endpoints), an ``empty`` service and one invalid manifest, sends ten
connections from a pod, then prints the commands and their output exactly as
an operator on the node would see them. Everything it creates is removed at
the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.netns.behaviour import CLUSTER_IP, POD1, POD2, POD3, local_eps, web  # noqa: E402
from tests.netns.topology import (  # noqa: E402
    CLIENT_IP,
    NODE_IP,
    Topology,
    endpoint_slice,
    port,
    service,
    wait_until,
)

PROXYD = Path(sys.executable).parent / "proxyd"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="iptables", choices=("iptables", "userspace"))
    args = parser.parse_args()
    with Topology() as topo:
        for pod in ("pod1", "pod2", "pod3"):
            topo.start_tcp_server(pod, 8080)
        topo.write_manifest("services.yaml", [
            *web(endpoints=local_eps(POD1, POD2, POD3), type_="NodePort", node_port=30080),
            service("empty", cluster_ip="10.96.0.20", ports=[port(80, target_port=8080)]),
            endpoint_slice("empty", ports=[{"port": 8080}], endpoints=[])])
        topo.write_manifest("bad.yaml", [service("bad", cluster_ip="10.96.0.30", ports=[port(70000)])])
        sock = topo._tmp / "status.sock"
        topo.start_proxyd(args.mode, extra_args=("--status-socket", str(sock)))
        pod = topo.pod("pod1")
        wait_until(lambda: topo.hello(pod.ns, CLUSTER_IP, 80), timeout=20, what="the service answering")
        for _ in range(9):
            topo.hello(pod.ns, CLUSTER_IP, 80)
        topo.hello(topo.client, NODE_IP, 30080)
        for argv in (["status"], ["status", "web"], ["trace", pod.ip, CLUSTER_IP, "80"],
                     ["trace", CLIENT_IP, NODE_IP, "30080"], ["trace", pod.ip, "10.96.0.20", "80"]):
            out = subprocess.run([str(PROXYD), *argv, "--socket", str(sock)], capture_output=True, text=True,
                                 timeout=60)
            print(f"# proxyd {' '.join(argv)}")
            print(out.stdout + out.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
