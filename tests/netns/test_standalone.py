"""Issue 21 end to end: kubectl-generated manifests served by the real daemon (userspace), real traffic.

Services come from the real ``kubectl create service … --dry-run=client -o
yaml`` (no clusterIP, no nodePort), endpoints from a hand-written Endpoints
object, as a VM user writes them. With ``--service-cluster-ip-range`` every
type is served on its allocated addresses; without it each is refused with
the documented line and counted; a restart and a second daemon reading the
same directory (on node2) agree on every allocated address.
"""

from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

import yaml

from proxyd import check
from tests.kubectl import SERVICE_TYPES, endpoints, kubectl_service
from tests.netns.topology import HEALTHZ, NODE_IP, Topology, wait_until

RANGE = "10.96.0.0/16"
PROXYD = str(Path(sys.executable).parent / "proxyd")
ALLOCATED = re.compile(r"Service default/(web-\w+): allocated clusterIP ([\d.]+)(?:, nodePort (\d+))?")


def write_kubectl_services(topo: Topology) -> None:
    ips = [topo.pod("pod1").ip, topo.pod("pod2").ip]
    for type_ in SERVICE_TYPES:
        name = f"web-{type_}"
        text = kubectl_service(type_, name) + "---\n" + yaml.safe_dump(endpoints(name, ips, node="node1"))
        topo.write_manifest(f"{name}.yaml", text)
    for pod in ("pod1", "pod2"):
        topo.start_tcp_server(pod, 8080)


def allocations(log: str) -> dict[str, tuple[str, int]]:
    return {m[1]: (m[2], int(m[3] or 0)) for m in ALLOCATED.finditer(log)}


def wait_allocations(topo: Topology, proc) -> dict[str, tuple[str, int]]:
    return wait_until(lambda: len(found := allocations(topo.log_of(proc))) == 3 and found, timeout=20,
                      what="three allocation log lines")


def check_output(topo: Topology) -> str:
    out = io.StringIO()
    assert check.main([str(topo.manifests), "--service-cluster-ip-range", RANGE, "--hostname-override",
                       "node1"], out=out) == 0
    return out.getvalue()


def test_kubectl_services_are_served_after_allocation(topology: Topology) -> None:
    write_kubectl_services(topology)
    proc = topology.start_proxyd("userspace", extra_args=["--service-cluster-ip-range", RANGE])
    got = wait_allocations(topology, proc)
    report = check_output(topology)
    print(report)
    pod3 = topology.pod("pod3").ns
    for type_ in SERVICE_TYPES:
        cluster_ip, node_port = got[f"web-{type_}"]
        # `proxyd check` says what the daemon serves.
        assert f"clusterIP   {cluster_ip}:80 (allocated)" in report
        seen = {topology.hello(pod3, cluster_ip, 80).pod for _ in range(4)}
        assert seen == {"pod1", "pod2"}, (type_, seen)
        if type_ == "clusterip":
            assert node_port == 0
        else:
            assert 30000 <= node_port <= 32767
            assert f"nodePort    {node_port} on node addresses (allocated)" in report
            assert topology.hello(topology.client, NODE_IP, node_port).pod in {"pod1", "pod2"}
    assert topology.stop_proxyd(proc) == 0


def test_without_the_range_each_service_is_refused_with_the_documented_line(topology: Topology) -> None:
    write_kubectl_services(topology)
    proc = topology.start_proxyd("userspace")
    assert topology.http_get(topology.node, *HEALTHZ, "/healthz")[0] == 200
    count = wait_until(lambda: topology.metric("proxyd_rejected_objects_total",
                                               {"source": "manifests", "kind": "Service",
                                                "reason": "no_cluster_ip"}) == 3,
                       timeout=10, what="three refusals counted")
    assert count
    log = topology.log_of(proc)
    for type_ in SERVICE_TYPES:
        line = (f"manifests web-{type_}.yaml: Service default/web-{type_} is refused: spec.clusterIP: "
                "missing, and no --service-cluster-ip-range to allocate one from (set spec.clusterIP, or "
                "start proxyd with --service-cluster-ip-range CIDR)")
        assert log.count(line) == 1, log[-3000:]
    out = io.StringIO()
    assert check.main([str(topology.manifests)], out=out) == 1
    assert out.getvalue().count("is refused: spec.clusterIP: missing") == 3
    assert topology.stop_proxyd(proc) == 0


def test_allocation_is_stable_across_restarts_and_daemons(topology: Topology) -> None:
    write_kubectl_services(topology)
    first = topology.start_proxyd("userspace", extra_args=["--service-cluster-ip-range", RANGE])
    got = wait_allocations(topology, first)
    assert topology.stop_proxyd(first) == 0
    again = topology.start_proxyd("userspace", extra_args=["--service-cluster-ip-range", RANGE])
    assert wait_allocations(topology, again) == got
    pod3 = topology.pod("pod3").ns
    for cluster_ip, _ in got.values():
        assert topology.hello(pod3, cluster_ip, 80).pod in {"pod1", "pod2"}

    # A second daemon on another node (node2), reading the very same directory.
    other = topology.spawn(topology.node2, [
        PROXYD, "--proxy-mode", "userspace", "--manifests", str(topology.manifests), "--hostname-override",
        "node2", "--healthz-bind-address", f"{HEALTHZ[0]}:{HEALTHZ[1]}", "--metrics-bind-address", "",
        "--service-cluster-ip-range", RANGE], log_name="proxyd-node2")
    deadline = time.monotonic() + 25
    while topology.http_get(topology.node2, *HEALTHZ, "/healthz")[0] != 200:
        assert other.poll() is None and time.monotonic() < deadline, topology.log_of(other)[-3000:]
        time.sleep(0.05)
    assert wait_allocations(topology, other) == got
    for type_, (cluster_ip, node_port) in got.items():
        # Traffic from node2 to the same address reaches the pods through node2's own proxyd.
        assert topology.hello(topology.node2, cluster_ip, 80).pod in {"pod1", "pod2"}, type_
    assert topology.stop_proxyd(other) == 0
    assert topology.stop_proxyd(again) == 0
