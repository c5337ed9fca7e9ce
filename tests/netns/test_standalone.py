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


ROOT = Path(__file__).resolve().parents[2]
VM_EXAMPLE = ROOT / "examples/standalone/vm"


def unit_flags() -> list[str]:
    """The daemon flags of systemd/proxyd.service's ExecStart (the binary left out)."""
    for line in (ROOT / "systemd/proxyd.service").read_text().splitlines():
        if line.startswith("ExecStart="):
            return line.removeprefix("ExecStart=").split()[1:]
    raise AssertionError("no ExecStart in the unit")


def test_vm_walkthrough_with_the_units_flags(topology: Topology) -> None:
    """examples/standalone/vm: kubectl output + hand-written endpoints, run with the unit's own flags."""
    for path in (VM_EXAMPLE / "manifests").glob("*.yaml"):
        topology.write_manifest(path.name, path.read_text())
    for pod, port_ in (("pod1", 8080), ("pod2", 8080), ("pod3", 8443)):
        topology.start_tcp_server(pod, port_)
    flags = unit_flags()
    assert flags[:2] == ["--manifests", "/etc/proxyd/manifests"] and "--service-cluster-ip-range" in flags
    flags[1] = str(topology.manifests)
    proc = topology.spawn(topology.node, [PROXYD, *flags, "--hostname-override", "node1",
                                          "--healthz-bind-address", f"{HEALTHZ[0]}:{HEALTHZ[1]}"],
                          log_name="proxyd-unit")
    def up() -> bool:
        return proc.poll() is not None or topology.http_get(topology.node, *HEALTHZ, "/healthz")[0] == 200

    wait_until(up, timeout=25, what="healthz")
    assert proc.poll() is None, topology.log_of(proc)[-3000:]
    # The README's `proxyd check` output, computed from the very files and flag.
    out = io.StringIO()
    cluster_range = flags[flags.index("--service-cluster-ip-range") + 1]
    assert check.main([str(topology.manifests), "--service-cluster-ip-range", cluster_range], out=out) == 0
    report = out.getvalue()
    readme = (VM_EXAMPLE / "README.md").read_text()
    web = re.search(r"default/web:80-8080/TCP .*?clusterIP\s+([\d.]+):80 .*?nodePort\s+(\d+)", report, re.S)
    api = re.search(r"default/api:443-8443/TCP .*?clusterIP\s+([\d.]+):443", report, re.S)
    assert web and api, report
    for address in (web[1], web[2], api[1]):
        assert address in readme, f"README shows other addresses than {address}"
    pod3 = topology.pod("pod3").ns
    # iptables mode picks at random: ask until both answered (40 tries: 2**-39 to miss one by chance).
    seen: set[str] = set()
    for _ in range(40):
        seen.add(topology.hello(pod3, web[1], 80).pod)
        if seen == {"pod1", "pod2"}:
            break
    assert seen == {"pod1", "pod2"}
    assert topology.hello(topology.client, NODE_IP, int(web[2])).pod in {"pod1", "pod2"}
    assert topology.hello(topology.pod("pod1").ns, api[1], 443).pod == "pod3"
    assert topology.stop_proxyd(proc) == 0
