"""End to end: the real daemon with ``--kubeconfig`` follows API changes with real traffic.

The fake API server runs as a process inside the node namespace (on its
loopback, where the daemon reaches it); the test drives it through its
``/fake/...`` admin endpoints over a socket opened in that namespace.
Creating, scaling and deleting a Service and its EndpointSlice must show in
which pod answers a connection to the ClusterIP from a pod.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.fake_apiserver import write_kubeconfig
from tests.capability import fail_or_skip_without_netns
from tests.netns.topology import FAKE_API_PORT, HEALTHZ, METRICS, Topology, fake_api, wait_until

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
PROXYD = str(Path(sys.executable).parent / "proxyd")
CLUSTER_IP = "10.96.0.10"

@pytest.fixture
def topology() -> Iterator[Topology]:
    fail_or_skip_without_netns()
    with Topology() as topo:
        yield topo


def web_service() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": CLUSTER_IP,
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}


def web_slice(ips: list[str]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node1"}
                          for ip in ips]}


def answering(topo: Topology, *, tries: int = 12) -> set[str]:
    """Which pods answer CLUSTER_IP:80 from pod3 (empty when refused)."""
    seen: set[str] = set()
    for _ in range(tries):
        try:
            seen.add(topo.hello(topo.pod("pod3").ns, CLUSTER_IP, 80, timeout=2).pod)
        except (ConnectionRefusedError, TimeoutError, OSError):
            return seen
    return seen


@pytest.mark.parametrize("mode", ["userspace", "iptables", "nftables"])
def test_traffic_follows_api_changes(topology: Topology, tmp_path: Path, mode: str) -> None:
    pod1, pod2 = topology.pod("pod1"), topology.pod("pod2")
    topology.start_servers(tcp=(pod1, pod2))
    fake = topology.spawn(topology.node, [sys.executable, "-m", "tests.api.fake_apiserver",
                                          "--host", "127.0.0.1", "--port", str(FAKE_API_PORT)],
                          log_name="fake-apiserver", env={"PYTHONPATH": str(ROOT)})
    wait_until(lambda: "listening" in topology.log_of(fake) or fake.poll() is not None, timeout=15,
               what="fake API server")
    assert fake.poll() is None, topology.log_of(fake)
    fake_api(topology, "apply", {"resource": "nodes", "object": {
        "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "z1"}}}})

    kubeconfig = write_kubeconfig(str(tmp_path / "kubeconfig"), f"http://127.0.0.1:{FAKE_API_PORT}")
    proc = topology.spawn(topology.node, [
        PROXYD, "--proxy-mode", mode, "--kubeconfig", kubeconfig, "--hostname-override", "node1",
        "--healthz-bind-address", f"{HEALTHZ[0]}:{HEALTHZ[1]}",
        "--metrics-bind-address", f"{METRICS[0]}:{METRICS[1]}",
        "--cluster-cidr", "10.244.0.0/16", "--min-sync-period", "0s"], log_name=f"proxyd-kube-{mode}")
    try:
        wait_until(lambda: proc.poll() is not None
                   or topology.http_get(topology.node, *HEALTHZ, "/healthz")[0] == 200,
                   timeout=30, what="proxyd healthy")
        assert proc.poll() is None, topology.log_of(proc)[-3000:]

        # create
        fake_api(topology, "apply", {"resource": "services", "object": web_service()})
        fake_api(topology, "apply", {"resource": "endpointslices", "object": web_slice([pod1.ip])})
        wait_until(lambda: answering(topology) == {"pod1"}, timeout=15, what="service created")
        # scale up
        fake_api(topology, "apply", {"resource": "endpointslices", "object": web_slice([pod1.ip, pod2.ip])})
        wait_until(lambda: answering(topology, tries=30) == {"pod1", "pod2"}, timeout=15, what="scaled to 2")
        # scale down to pod2 only
        fake_api(topology, "apply", {"resource": "endpointslices", "object": web_slice([pod2.ip])})
        wait_until(lambda: answering(topology) == {"pod2"}, timeout=15, what="scaled to pod2")
        # the watch is dropped: resumed (and counted), and changes made meanwhile still arrive
        reconnects_before = topology.metric_sum("proxyd_source_reconnects_total") or 0.0
        fake_api(topology, "drop", {"truncate": True})
        fake_api(topology, "apply", {"resource": "endpointslices", "object": web_slice([pod1.ip])})
        wait_until(lambda: answering(topology) == {"pod1"}, timeout=15, what="change after a dropped stream")
        # delete
        fake_api(topology, "delete", {"resource": "services", "namespace": "default", "name": "web"})
        wait_until(lambda: answering(topology, tries=1) == set(), timeout=15, what="service deleted")

        assert topology.http_get(topology.node, *HEALTHZ, "/healthz")[0] == 200
        reconnects = topology.metric_sum("proxyd_source_reconnects_total")
        assert reconnects is not None and reconnects > reconnects_before, (reconnects_before, reconnects)
        lists = [r for r in admin_requests(topology) if r["verb"] == "list" and r["resource"] == "services"]
        assert len(lists) == 1, "a dropped stream must not relist"
        assert topology.stop_proxyd(proc) == 0, topology.log_of(proc)[-3000:]
    finally:
        if proc.poll() is None:
            topology.stop_proxyd(proc)


def admin_requests(topo: Topology) -> list[dict[str, Any]]:
    with topo.connect(topo.node, "127.0.0.1", FAKE_API_PORT, timeout=5) as sock:
        sock.sendall(b"GET /fake/requests HTTP/1.0\r\nHost: fake\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])
