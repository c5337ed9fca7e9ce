"""ipvs mode: one ipset entry the kernel refuses never blocks the node (issue 18), in the QEMU guest.

The kernel refusal is real: another program has filled ``KUBE-EXTERNAL-IP``
to its maxelem (65,536), so the entry of a new service's externalIP is
refused ("Hash is full"). The test shows: the other service of the same
change is programmed and serves, the refused one is named with the kernel's
reason (``proxyd_quarantined_service_ports``, /healthz body) while /healthz
stays 200, and once there is room again, changing the service clears the
quarantine and its externalIP serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.netns.behaviour import EXTERNAL_IP, POD1, POD2, local_eps, web
from tests.netns.topology import HEALTHZ, Topology, wait_until

pytestmark = pytest.mark.ipvs

DEADLINE = 120.0  # the guest is slow; far beyond the 1 s minimum sync period
SET = "KUBE-EXTERNAL-IP"


def _fill(topo: Topology, directory: Path) -> None:
    lines = [f"add {SET} 198.51.100.{i},tcp:{10000 + j}" for i in range(256) for j in range(256)]
    path = directory / "fill.ipset"
    path.write_text("\n".join(lines) + "\n")
    topo.ns_run(topo.node, ["ipset", "restore", "-exist", "-f", str(path)], timeout=120.0)


def _healthz(topo: Topology) -> tuple[int, dict]:
    status, body = topo.http_get(topo.node, *HEALTHZ, "/healthz")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {}


def test_refused_ipset_entry_quarantines_one_service(topology: Topology, tmp_path: Path) -> None:
    for pod in ("pod1", "pod2"):
        topology.start_tcp_server(pod, 8080)
    first = web(endpoints=local_eps(POD1), name="web")
    topology.write_manifest("services.yaml", first)
    topology.start_proxyd("ipvs", timeout=120.0)
    _fill(topology, tmp_path)
    bad = web(endpoints=local_eps(POD2), name="bad", cluster_ip="10.96.0.12", external_ips=[EXTERNAL_IP])
    other = web(endpoints=local_eps(POD2), name="other", cluster_ip="10.96.0.11")
    topology.write_manifest("services.yaml", first + bad + other)
    labels = {"mode": "ipvs"}
    wait_until(lambda: topology.metric("proxyd_quarantined_service_ports", labels) == 1, timeout=DEADLINE)
    client = topology.pod("pod1").ns
    assert wait_until(lambda: topology.hello(client, "10.96.0.11", 80).pod == "pod2", timeout=DEADLINE)
    assert topology.hello(client, "10.96.0.10", 80).pod == "pod1"
    status, answer = _healthz(topology)
    assert status == 200, answer
    assert "default/bad/TCP" in answer.get("quarantined", {}), answer
    # Room again; changing the service retries it, it applies and leaves the quarantine.
    topology.ns_run(topology.node, ["ipset", "flush", SET])
    bad = web(endpoints=local_eps(POD1, POD2), name="bad", cluster_ip="10.96.0.12",
              external_ips=[EXTERNAL_IP])
    topology.write_manifest("services.yaml", first + bad + other)
    wait_until(lambda: topology.metric("proxyd_quarantined_service_ports", labels) == 0, timeout=DEADLINE)
    assert wait_until(lambda: topology.hello(topology.client, EXTERNAL_IP, 80).pod in ("pod1", "pod2"),
                      timeout=DEADLINE)
    status, answer = _healthz(topology)
    assert status == 200 and "quarantined" not in answer, answer
