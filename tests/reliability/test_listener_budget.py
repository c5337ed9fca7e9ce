"""Listeners cannot eat every descriptor (issue 14.2): a budget covers them, a reserve stays.

With a 2,048-descriptor limit one Service with 3,000 ports used to leave the
daemon with no descriptor for anything: accepts paused everywhere,
``/healthz``, ``/livez`` and ``/metrics`` could not accept, the manifests
source could not list its directory (so removing the file was never noticed)
and netlink calls failed — only a restart helped. Now the ports that do not
fit are refused (one log line, ``proxyd_listen_failures{reason="descriptors"}``,
named in ``/healthz``), the ones that fit serve, the control plane keeps its
reserve, and removing the service recovers without a restart.
"""

from __future__ import annotations

import json

from tests.netns.topology import (
    HEALTHZ,
    METRICS,
    Topology,
    endpoint,
    endpoint_slice,
    port,
    service,
    wait_until,
)
from tests.reliability.harness import fd_count, metric_sum, start_daemon

PORTS = 3000
LIMIT = 2048


def wide_service() -> list[dict]:
    ports = [port(10000 + i, name=f"p{i}", target_port=8080) for i in range(PORTS)]
    # An EndpointSlice holds at most 100 ports.
    slices = [endpoint_slice("wide", name=f"wide-{n}", endpoints=[endpoint("10.244.1.11")],
                             ports=[{"name": f"p{i}", "port": 8080} for i in range(n, min(n + 100, PORTS))])
              for n in range(0, PORTS, 100)]
    return [service("wide", cluster_ip="10.96.0.10", ports=ports), *slices]


def test_listeners_beyond_the_descriptor_budget_are_refused_and_control_keeps_a_reserve(
        topology: Topology, figures: dict) -> None:
    topology.start_tcp_server("pod1", 8080)
    topology.write_manifest("wide.yaml", wide_service())
    proc = start_daemon(topology, "userspace", nofile=LIMIT, wait_healthy=False)
    _, body = wait_until(
        lambda: (r := topology.http_get(topology.node, *HEALTHZ, "/healthz", timeout=5))[0] == 200 and r,
        timeout=60, what="/healthz 200 with 3,000 ports under a 2,048-descriptor limit")
    answer = json.loads(body)
    refused = metric_sum(topology, "proxyd_listen_failures", {"reason": "descriptors"})
    assert 0 < refused < PORTS and answer["listenFailuresTotal"] == refused, answer
    assert topology.http_get(topology.node, *HEALTHZ, "/livez")[0] == 200
    assert topology.http_get(topology.node, *METRICS, "/metrics")[0] == 200
    held = fd_count(proc.pid)
    assert held < LIMIT - 64, held
    log = topology.log_of(proc)
    assert log.count("descriptor budget") == 1, log[-2000:]
    # The ports that fit serve.
    assert topology.hello(topology.pod("pod2").ns, "10.96.0.10", 10000).pod == "pod1"

    # The source still sees the directory: removing the service frees everything, a new one serves.
    topology.remove_manifest("wide.yaml")
    topology.write_manifest("small.yaml", [
        service("small", cluster_ip="10.96.0.11", ports=[port(80, target_port=8080)]),
        endpoint_slice("small", ports=[{"port": 8080}], endpoints=[endpoint("10.244.1.11")])])
    wait_until(lambda: topology.hello(topology.pod("pod2").ns, "10.96.0.11", 80, timeout=2).pod == "pod1",
               timeout=30, what="a new service served after the wide one was removed")
    wait_until(lambda: metric_sum(topology, "proxyd_listen_failures", {"reason": "descriptors"}) == 0,
               timeout=10, what="no listen failure left")
    # The engine closes a removed listener's duplicate once every worker is past it (within a flush, 1 s).
    wait_until(lambda: fd_count(proc.pid) < 100, timeout=10, what="the listeners' descriptors closed")
    after = fd_count(proc.pid)
    assert proc.poll() is None
    figures.update(limit=LIMIT, ports=PORTS, listeners_opened=PORTS - int(refused), refused=int(refused),
                   descriptors_held=held, descriptors_after_removal=after)
