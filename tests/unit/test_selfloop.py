"""SelfEndpoints: endpoints that are proxyd's own service or NodePort addresses never reach a mode."""

from __future__ import annotations

from types import MappingProxyType

from proxyd import metrics
from proxyd.model import (
    Endpoint,
    Protocol,
    ProxyState,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServiceType,
)
from proxyd.modes.base import SyncRequest
from proxyd.selfloop import SelfEndpoints

NODE_IPS = ["127.0.0.1", "203.0.113.1"]


def name(svc: str, proto: Protocol = Protocol.TCP) -> ServicePortName:
    return ServicePortName("default", svc, "", proto)


def port(svc: str, cluster_ip: str, number: int = 80, *, proto: Protocol = Protocol.TCP, node_port: int = 0,
         external_ips: tuple[str, ...] = ()) -> ServicePort:
    kind = ServiceType.NODE_PORT if node_port else ServiceType.CLUSTER_IP
    return ServicePort(name=name(svc, proto), type=kind,
                       cluster_ip=cluster_ip, port=number, protocol=proto, node_port=node_port,
                       external_ips=external_ips)


def state(ports: list[ServicePort], eps: dict[str, list[tuple[str, int]]]) -> ProxyState:
    services = {p.name: p for p in ports}
    endpoints = {p.name: tuple(Endpoint(ip=ip, port=n) for ip, n in eps.get(p.name.name, [])) for p in ports}
    return ProxyState(service_ports=MappingProxyType(services), endpoints=MappingProxyType(endpoints),
                      node_name="node1")


def run(f: SelfEndpoints, st: ProxyState, changed: frozenset[ServiceName] | None,
        node_ips: list[str]) -> tuple[ProxyState, frozenset[ServiceName] | None]:
    out = f.filter(SyncRequest(st, changed), node_ips)
    return out.state, out.changed


def kept(st: ProxyState, svc: str, proto: Protocol = Protocol.TCP) -> list[tuple[str, int]]:
    return [(e.ip, e.port) for e in st.endpoints_of(name(svc, proto))]


def rejected() -> float:
    labels = {"source": "test", "kind": "EndpointSlice", "reason": "self_endpoint"}
    return metrics.REGISTRY.get_sample_value("proxyd_rejected_objects_total", labels) or 0


def test_own_cluster_ip_external_ip_and_nodeport_are_refused_the_rest_kept(caplog) -> None:
    before = rejected()
    ports = [port("a", "10.96.0.10"), port("b", "10.96.0.11", external_ips=("192.0.2.10",)),
             port("c", "10.96.0.12", node_port=30080), port("d", "10.96.0.13", proto=Protocol.UDP, number=53)]
    st = state(ports, {
        "a": [("10.96.0.10", 80), ("10.244.1.11", 8080), ("10.96.0.10", 81)],  # itself; a pod; unserved port
        "b": [("192.0.2.10", 80), ("10.96.0.12", 80)],  # its externalIP; another service's ClusterIP
        "c": [("203.0.113.1", 30080), ("203.0.113.1", 8080)],  # node address on its NodePort; hostNetwork pod
        "d": [("10.96.0.13", 53), ("10.96.0.13", 80)],  # UDP: own address; TCP-only port of another service
    })
    f = SelfEndpoints(source="test")
    out, changed = run(f, st, None, NODE_IPS)
    assert changed is None
    assert kept(out, "a") == [("10.244.1.11", 8080), ("10.96.0.10", 81)]
    assert kept(out, "b") == []
    assert kept(out, "c") == [("203.0.113.1", 8080)]
    assert kept(out, "d", Protocol.UDP) == [("10.96.0.13", 80)]
    assert rejected() - before == 5
    # Logged once: the same state again adds nothing.
    caplog.clear()
    again, changed = run(f, st, frozenset(), NODE_IPS)
    assert again.endpoints == out.endpoints and changed == frozenset()
    assert rejected() - before == 5 and not caplog.records


def test_clean_state_passes_through_untouched() -> None:
    st = state([port("a", "10.96.0.10")], {"a": [("10.244.1.11", 8080)]})
    out, changed = run(SelfEndpoints(source="test"), st, None, NODE_IPS)
    assert out is st and changed is None


def test_partial_sync_rechecks_services_hit_by_a_new_or_removed_address() -> None:
    f = SelfEndpoints(source="test")
    # b points at 10.96.0.20:80, which nobody serves yet.
    st1 = state([port("b", "10.96.0.11")], {"b": [("10.96.0.20", 80), ("10.244.1.11", 8080)]})
    out, _ = run(f, st1, None, NODE_IPS)
    assert kept(out, "b") == [("10.96.0.20", 80), ("10.244.1.11", 8080)]
    # Service a appears with that ClusterIP: b, unchanged itself, must lose the endpoint and be re-planned.
    st2 = state([port("a", "10.96.0.20"), port("b", "10.96.0.11")],
                {"b": [("10.96.0.20", 80), ("10.244.1.11", 8080)]})
    out, changed = run(f, st2, frozenset({ServiceName("default", "a")}), NODE_IPS)
    assert kept(out, "b") == [("10.244.1.11", 8080)]
    assert changed == {ServiceName("default", "a"), ServiceName("default", "b")}
    # a goes away: b gets its endpoint back.
    out, changed = run(f, st1, frozenset({ServiceName("default", "a")}), NODE_IPS)
    assert kept(out, "b") == [("10.96.0.20", 80), ("10.244.1.11", 8080)]
    assert ServiceName("default", "b") in changed
    # A NodePort appearing on 30081 catches b's hostNetwork endpoint on that port.
    st3 = state([port("b", "10.96.0.11"), port("n", "10.96.0.30", node_port=30081)],
                {"b": [("203.0.113.1", 30081)]})
    run(f, state([port("b", "10.96.0.11")], {"b": [("203.0.113.1", 30081)]}), None, NODE_IPS)
    out, changed = run(f, st3, frozenset({ServiceName("default", "n")}), NODE_IPS)
    assert kept(out, "b") == [] and ServiceName("default", "b") in changed
    # Node addresses change (the address is no longer the node's): everything is re-checked.
    out, _ = run(f, st3, frozenset(), ["127.0.0.1"])
    assert kept(out, "b") == [("203.0.113.1", 30081)]


def test_ports_whose_refusal_changed_join_the_port_index() -> None:
    f = SelfEndpoints(source="test")
    st1 = state([port("a", "10.96.0.10"), port("b", "10.96.0.11")], {"b": [("10.244.1.11", 80)]})
    f.filter(SyncRequest(st1, None), NODE_IPS)
    # b's endpoint becomes a's ClusterIP while only a is reported changed: b joins both indexes.
    st2 = state([port("a", "10.96.0.10"), port("b", "10.96.0.11")], {"b": [("10.96.0.10", 80)]})
    out = f.filter(SyncRequest(st2, frozenset({ServiceName("default", "b")}),
                               frozenset({name("b")})), NODE_IPS)
    assert out.changed_ports == frozenset({name("b")})
    assert kept(out.state, "b") == []
    st3 = state([port("a", "10.96.0.12"), port("b", "10.96.0.11")], {"b": [("10.96.0.10", 80)]})
    out = f.filter(SyncRequest(st3, frozenset({ServiceName("default", "a")}),
                               frozenset({name("a")})), NODE_IPS)
    assert out.changed == frozenset({ServiceName("default", "a"), ServiceName("default", "b")})
    assert out.changed_ports == frozenset({name("a"), name("b")})
    assert kept(out.state, "b") == [("10.96.0.10", 80)]


def test_both_families_own_addresses_are_refused() -> None:
    before = rejected()
    dual = ServicePort(name=name("dual"), type=ServiceType.NODE_PORT, cluster_ip="10.96.0.20", port=80,
                       protocol=Protocol.TCP, node_port=30090, secondary_cluster_ip="fd00:10:96::20",
                       external_ips=("2001:db8:2::1",))
    st = state([dual], {"dual": [("fd00:10:96::20", 80), ("2001:db8:2::1", 80), ("2001:db8:203::1", 30090),
                                 ("fd00:10:244:1::a", 8080), ("10.244.1.10", 8080)]})
    out, _ = run(SelfEndpoints(source="test"), st, None, [*NODE_IPS, "2001:db8:203::1"])
    assert kept(out, "dual") == [("fd00:10:244:1::a", 8080), ("10.244.1.10", 8080)]
    assert rejected() - before == 3
