"""Least privilege: the daemon works with only the capabilities the deploy artifacts grant.

The DaemonSet and the systemd unit grant NET_ADMIN, NET_RAW and
NET_BIND_SERVICE (service ports below 1024 in userspace mode). Here the real
daemon runs under ``capsh`` with every other capability dropped from its
bounding set, so as root it holds exactly those three; the test checks the
process's effective set and that a ClusterIP still carries traffic.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns.topology import HEALTHZ, METRICS, endpoint, endpoint_slice, port, service, wait_until

PROXYD = str(Path(sys.executable).parent / "proxyd")
GRANTED = ("cap_net_admin", "cap_net_raw", "cap_net_bind_service")
GRANTED_BITS = (1 << 12) | (1 << 13) | (1 << 10)


def capsh_drop_list() -> str:
    printed = subprocess.run(["capsh", "--print"], capture_output=True, text=True, timeout=10).stdout
    bounding = re.search(r"^Bounding set =(.*)$", printed, re.M)
    assert bounding, printed
    return ",".join(cap for cap in bounding.group(1).split(",") if cap and cap not in GRANTED)


def effective_caps(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.M).group(1), 16)


@pytest.mark.parametrize("mode", ["userspace", "iptables", "nftables"])
def test_runs_with_only_granted_capabilities(topology, mode):
    if importlib.util.find_spec(f"proxyd.modes.{mode}") is None:
        pytest.skip(f"{mode} mode not built")
    pod = topology.pod_list[0]
    topology.start_tcp_server(pod, 8080)
    topology.write_manifest("svc.yaml", [
        service("web", cluster_ip="10.96.0.10", ports=[port(80, target_port=8080)]),
        endpoint_slice("web", ports=[{"port": 8080}], endpoints=[endpoint(pod.ip)]),
    ])
    argv = ["capsh", f"--drop={capsh_drop_list()}", f"--shell={PROXYD}", "--",
            "--proxy-mode", mode, "--manifests", str(topology.manifests), "--hostname-override", "node1",
            "--healthz-bind-address", f"{HEALTHZ[0]}:{HEALTHZ[1]}",
            "--metrics-bind-address", f"{METRICS[0]}:{METRICS[1]}", "--cluster-cidr", "10.244.0.0/16"]
    proc = topology.spawn(topology.node, argv, log_name=f"proxyd-caps-{mode}")
    wait_until(lambda: topology.http_get(topology.node, *HEALTHZ, "/healthz")[0] == 200, timeout=20,
               what=f"{mode} healthy under capsh")
    assert effective_caps(proc.pid) & ~GRANTED_BITS == 0
    assert effective_caps(proc.pid) & (1 << 12)  # NET_ADMIN really held
    assert topology.hello(topology.client, "10.96.0.10", 80).pod == pod.name if mode != "userspace" else \
        topology.hello(topology.node, "10.96.0.10", 80).pod == pod.name
    assert topology.stop_proxyd(proc) == 0, topology.log_of(proc)
