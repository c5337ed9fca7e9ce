"""Endpoints that are proxyd's own addresses (issue 14.1): refused, and one client costs nothing more.

The API server accepts EndpointSlices whose addresses are a Service's own
ClusterIP, another Service's ClusterIP, an externalIP or a node address on a
NodePort. In userspace mode each of them made one client connection fan out
into a chain of proxied connections until descriptors ran out (every other
service then timed out) and made UDP datagrams circulate. Here all of those
are served at once next to a good service.
"""

from __future__ import annotations

import time

from tests.netns.behaviour import refused
from tests.netns.topology import NODE_IP, Topology, endpoint, endpoint_slice, port, service
from tests.reliability.harness import fd_count, healthz, metric_sum, start_daemon

GOOD = "10.96.0.20"


def svc(name: str, ip: str, target: str, number: int = 80, *, protocol: str = "TCP",
        node_port: int | None = None) -> list[dict]:
    """A one-port service whose only endpoint is ``target`` ("ip:port")."""
    ep_ip, ep_port = target.rsplit(":", 1)
    kind = {"type_": "NodePort"} if node_port else {}
    ports = [port(number, protocol=protocol, node_port=node_port)]
    return [service(name, cluster_ip=ip, ports=ports, **kind),
            endpoint_slice(name, ports=[{"port": int(ep_port), "protocol": protocol}],
                           endpoints=[endpoint(ep_ip)])]


def looping_services() -> list[dict]:
    return [
        *svc("itself", "10.96.0.10", "10.96.0.10:80"),
        *svc("ping", "10.96.0.11", "10.96.0.12:80"),  # ping -> pong -> ping
        *svc("pong", "10.96.0.12", "10.96.0.11:80"),
        *svc("nodeport", "10.96.0.13", f"{NODE_IP}:30080", node_port=30080),
        *svc("dns", "10.96.0.14", "10.96.0.14:53", number=53, protocol="UDP"),
        *svc("good", GOOD, "10.244.1.11:8080"),
    ]


def test_endpoints_that_are_proxyds_own_addresses_are_refused(topology: Topology, figures: dict) -> None:
    topology.start_tcp_server("pod1", 8080)
    topology.write_manifest("loops.yaml", looping_services())
    proc = start_daemon(topology, "userspace", nofile=1024)
    pid = proc.pid
    ns = topology.pod("pod2").ns
    rejected = metric_sum(topology, "proxyd_rejected_objects_total", {"reason": "self_endpoint"})
    assert rejected == 5, rejected
    baseline = fd_count(pid)
    started = time.monotonic()
    for _ in range(20):
        for ip, number in (("10.96.0.10", 80), ("10.96.0.11", 80), ("10.96.0.12", 80)):
            assert refused(topology, ns, ip, number, timeout=2), f"{ip}:{number} not refused at once"
        assert refused(topology, topology.client, NODE_IP, 30080, timeout=2)
    refusals = time.monotonic() - started
    with topology.udp_socket(ns) as sock:
        sock.settimeout(0.5)
        for _ in range(20):
            sock.sendto(b"ping", ("10.96.0.14", 53))
    time.sleep(1.0)
    # Nothing loops: descriptors where they were, no flow or connection open, other services fine.
    held = fd_count(pid)
    assert held <= baseline + 4, (baseline, held)
    assert metric_sum(topology, "proxyd_active_connections") == 0
    assert topology.hello(ns, GOOD, 80).pod == "pod1"
    assert healthz(topology) == 200
    log = topology.log_of(proc)
    for name in ("itself", "ping", "pong", "nodeport", "dns"):
        assert log.count(f"default/{name}/") == 1, f"default/{name} logged {log.count(f'default/{name}/')}x"
    assert metric_sum(topology, "proxyd_rejected_objects_total", {"reason": "self_endpoint"}) == 5
    figures.update(clients=80, udp_datagrams=20, refused_endpoints=rejected, descriptors_before=baseline,
                   descriptors_after=held, seconds_for_80_refusals=round(refusals, 2))
