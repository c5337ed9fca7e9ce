"""Tracker: merging, change tracking, snapshots; property-tested against a reference.

The reference (``reference_state``) recomputes everything from scratch with
the rules written out plainly; the tracker, which recomputes incrementally,
must agree with it after any sequence of events.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd import metrics
from proxyd.model import (
    Endpoint,
    EndpointSlice,
    Protocol,
    ProxyState,
    Service,
    ServiceName,
    ServicePort,
    ServicePortName,
    SliceEndpoint,
    family,
)
from proxyd.tracker import Tracker, TrackerSnapshot, merge_endpoints
from tests.builders import endpoint_slice as eslice
from tests.builders import service, service_port
from tests.builders import slice_endpoint as sep

NODE = "node-1"
TCP, UDP = Protocol.TCP, Protocol.UDP
sp = partial(service_port, namespace="ns")


SN = ServiceName("ns", "web")
SPN = ServicePortName("ns", "web", "", TCP)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- merging --------------------------------------------------------------

def test_service_without_slices_has_empty_endpoints() -> None:
    t = Tracker(NODE)
    assert t.update_service(SN, service("ns", "web"))
    snap = t.take()
    assert snap.state.service_ports == {SPN: sp("web")}
    assert snap.state.endpoints == {SPN: ()}
    assert snap.changed == {SN}


def test_slices_of_one_service_merge_sorted_and_deduplicated() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    t.update_slice(("ns", "web-b"), eslice("ns", "web-b", "web", [("", 8080, TCP)],
                                           [sep("10.0.0.3"), sep("10.0.0.1")]))
    t.update_slice(("ns", "web-a"), eslice("ns", "web-a", "web", [("", 8080, TCP)],
                                           [sep("10.0.0.2"), sep("10.0.0.1")]))
    eps = t.take().state.endpoints[SPN]
    assert [str(e) for e in eps] == ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]


def test_many_slices_of_one_service_are_indexed_past_the_small_tuple() -> None:
    """A service's slice index is a tuple while small and a set past it: 20 slices in, some moved to
    another service and back, then out one by one; the endpoints follow at every step."""
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    other = ServiceName("ns", "api")
    t.update_service(other, service("ns", "api"))

    def put(i: int, svc: str) -> None:
        t.update_slice(("ns", f"s{i}"), eslice("ns", f"s{i}", svc, [("", 8080, TCP)], [sep(f"10.0.1.{i}")]))

    def ips(name: ServicePortName) -> list[str]:
        return [e.ip for e in t.take().state.endpoints[name]]

    for i in range(20):
        put(i, "web")
        assert ips(SPN) == [f"10.0.1.{j}" for j in range(i + 1)]
    api = ServicePortName("ns", "api", "", TCP)
    for i in range(0, 20, 2):
        put(i, "api")
    assert ips(SPN) == [f"10.0.1.{j}" for j in range(1, 20, 2)]
    assert ips(api) == [f"10.0.1.{j}" for j in range(0, 20, 2)]
    put(4, "web")
    put(4, "web")  # the same again: indexed once
    assert ips(SPN) == sorted([f"10.0.1.{j}" for j in range(1, 20, 2)] + ["10.0.1.4"],
                              key=lambda ip: int(ip.rsplit(".", 1)[1]))
    for i in range(20):
        t.update_slice(("ns", f"s{i}"), None)
    assert ips(SPN) == [] and ips(api) == []
    assert not t._slices_by_service  # nothing left indexed
    put(3, "web")
    assert ips(SPN) == ["10.0.1.3"]


def test_a_repeated_port_name_keeps_the_last_and_goes_once() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web", sp("web", port=80), sp("web", port=81)))
    assert t.take().state.service_ports == {SPN: sp("web", port=81)}
    t.update_service(SN, service("ns", "web", sp("web", port_name="a"), sp("web", port_name="a", port=82)))
    snap = t.take()
    a = ServicePortName("ns", "web", "a", TCP)
    assert snap.state.service_ports == {a: sp("web", port_name="a", port=82)}
    assert snap.changed_ports == {SPN, a}
    t.update_service(SN, None)
    snap = t.take()
    assert snap.state.service_ports == {} and snap.state.endpoints == {} and snap.changed_ports == {a}


def test_duplicate_ready_beats_unready_whatever_the_slice_order() -> None:
    for first_ready in (True, False):
        t = Tracker(NODE)
        t.update_service(SN, service("ns", "web"))
        t.update_slice(("ns", "a"), eslice("ns", "a", "web", [("", 80, TCP)],
                                           [sep("10.0.0.1", ready=first_ready, zone="za")]))
        t.update_slice(("ns", "b"), eslice("ns", "b", "web", [("", 80, TCP)],
                                           [sep("10.0.0.1", ready=not first_ready, zone="zb")]))
        (e,) = t.take().state.endpoints[SPN]
        assert e.ready
        assert e.zone == ("za" if first_ready else "zb")


def test_duplicate_local_beats_remote_then_first_slice_by_name() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    t.update_slice(("ns", "c"), eslice("ns", "c", "web", [("", 80, TCP)], [sep("10.0.0.1", zone="zc")]))
    t.update_slice(("ns", "b"), eslice("ns", "b", "web", [("", 80, TCP)],
                                       [sep("10.0.0.1", node=NODE, zone="zb")]))
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [("", 80, TCP)], [sep("10.0.0.1", zone="za")]))
    (e,) = t.take().state.endpoints[SPN]
    assert e.node_name == NODE and e.zone == "zb"
    t.update_slice(("ns", "b"), None)
    (e,) = t.take().state.endpoints[SPN]
    assert e.zone == "za"


def test_endpoints_sort_numerically_by_address_then_port_v4_first() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [("", 9000, TCP)],
                                       [sep("10.0.0.10"), sep("10.0.0.9"), sep("9.0.0.1")]))
    t.update_slice(("ns", "b"), eslice("ns", "b", "web", [("", 80, TCP)], [sep("10.0.0.10")]))
    assert [str(e) for e in t.take().state.endpoints[SPN]] == [
        "9.0.0.1:9000", "10.0.0.9:9000", "10.0.0.10:80", "10.0.0.10:9000"]
    v6 = sp("web", "fd00::1")
    t.update_service(SN, service("ns", "web", v6))
    t.update_slice(("ns", "c"), eslice("ns", "c", "web", [("", 80, TCP)],
                                       [sep("fd00::10"), sep("fd00::9"), sep("fc00::ffff")]))
    assert [e.ip for e in t.take().state.endpoints[v6.name]] == ["fc00::ffff", "fd00::9", "fd00::10"]


def test_same_ip_different_target_ports_are_distinct_endpoints() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [("", 80, TCP)], [sep("10.0.0.1")]))
    t.update_slice(("ns", "b"), eslice("ns", "b", "web", [("", 81, TCP)], [sep("10.0.0.1")]))
    assert [str(e) for e in t.take().state.endpoints[SPN]] == ["10.0.0.1:80", "10.0.0.1:81"]


def test_ports_match_by_name_and_protocol() -> None:
    http = sp("web", port_name="http", protocol=TCP)
    dns_tcp = sp("web", port_name="dns", protocol=TCP, port=53)
    dns_udp = sp("web", port_name="dns", protocol=UDP, port=53)
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web", http, dns_tcp, dns_udp))
    t.update_slice(("ns", "a"), eslice("ns", "a", "web",
                                       [("http", 8080, TCP), ("dns", 5353, UDP), ("", 9, TCP),
                                        ("dns", 5300, Protocol.SCTP)],
                                       [sep("10.0.0.1")]))
    eps = t.take().state.endpoints
    assert [str(e) for e in eps[http.name]] == ["10.0.0.1:8080"]
    assert [str(e) for e in eps[dns_udp.name]] == ["10.0.0.1:5353"]
    assert eps[dns_tcp.name] == ()
    assert set(eps) == {http.name, dns_tcp.name, dns_udp.name}


def test_slice_of_other_service_or_namespace_is_ignored() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    t.update_slice(("ns", "x"), eslice("ns", "x", "other", [("", 80, TCP)], [sep("10.0.0.1")]))
    t.update_slice(("ns2", "x"), eslice("ns2", "x", "web", [("", 80, TCP)], [sep("10.0.0.2")]))
    assert t.take().state.endpoints[SPN] == ()


def test_slice_before_service_applies_when_service_appears() -> None:
    t = Tracker(NODE)
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [("", 80, TCP)], [sep("10.0.0.1")]))
    snap = t.take()
    assert snap.state.service_ports == {} and snap.state.endpoints == {}
    assert snap.changed == frozenset()
    t.update_service(SN, service("ns", "web"))
    snap = t.take()
    assert [str(e) for e in snap.state.endpoints[SPN]] == ["10.0.0.1:80"]
    assert snap.changed == {SN}


def test_service_delete_removes_ports_but_keeps_slices() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [("", 80, TCP)], [sep("10.0.0.1")]))
    t.take()
    t.update_service(SN, None)
    snap = t.take()
    assert snap.state.service_ports == {} and snap.state.endpoints == {}
    assert snap.changed == {SN}
    t.update_service(SN, service("ns", "web"))
    assert len(t.take().state.endpoints[SPN]) == 1


def test_port_removed_from_service_disappears() -> None:
    a, b = sp("web", port_name="a"), sp("web", port_name="b", port=81)
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web", a, b))
    t.take()
    t.update_service(SN, service("ns", "web", a))
    snap = t.take()
    assert set(snap.state.service_ports) == {a.name} and set(snap.state.endpoints) == {a.name}


def test_port_renamed_with_same_count_is_a_change() -> None:
    a, b = sp("web", port_name="a"), sp("web", port_name="b")
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web", a))
    t.take()
    t.update_service(SN, service("ns", "web", b))
    snap = t.take()
    assert snap.changed == {SN} and set(snap.state.service_ports) == {b.name}


def test_endpoints_of_other_family_are_skipped() -> None:
    v6 = sp("web", "fd00::1")
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web", v6))
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [("", 80, TCP)],
                                       [sep("10.0.0.1"), sep("fd00:10::1")]))
    assert [e.ip for e in t.take().state.endpoints[v6.name]] == ["fd00:10::1"]


def test_endpoint_fields_carry_over() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [("", 80, TCP)], [
        SliceEndpoint(ip="10.0.0.1", ready=False, serving=True, terminating=True, node_name=NODE,
                      zone="z1", zone_hints=("z1", "z2"))]))
    (e,) = t.take().state.endpoints[SPN]
    assert e == Endpoint(ip="10.0.0.1", port=80, ready=False, serving=True, terminating=True,
                         node_name=NODE, zone="z1", zone_hints=("z1", "z2"))


def test_slice_port_zero_is_ignored() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [("", 0, TCP)], [sep("10.0.0.1")]))
    assert t.take().state.endpoints[SPN] == ()


def test_slice_moving_to_another_service_updates_both() -> None:
    other = ServiceName("ns", "api")
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    t.update_service(other, service("ns", "api"))
    t.update_slice(("ns", "s"), eslice("ns", "s", "web", [("", 80, TCP)], [sep("10.0.0.1")]))
    t.take()
    t.update_slice(("ns", "s"), eslice("ns", "s", "api", [("", 80, TCP)], [sep("10.0.0.1")]))
    snap = t.take()
    assert snap.changed == {SN, other}
    assert snap.state.endpoints[SPN] == ()
    assert len(snap.state.endpoints[ServicePortName("ns", "api", "", TCP)]) == 1


def test_mismatched_key_is_a_programming_error() -> None:
    t = Tracker(NODE)
    with pytest.raises(ValueError, match="delivered under"):
        t.update_service(ServiceName("ns", "x"), service("ns", "web"))
    with pytest.raises(ValueError, match="delivered under"):
        t.update_slice(("ns", "b"), eslice("ns", "a", "web", [], []))
    assert not t.pending


def test_merge_endpoints_keeps_both_families_of_a_dual_stack_port_only() -> None:
    # Families are told apart by address; the builder's slices need no addressType here.
    slices = [eslice("ns", "v4", "web", [("", 80, TCP)], [sep("10.0.0.1")]),
              eslice("ns", "v6", "web", [("", 80, TCP)], [sep("fd00::1")])]
    dual = service_port("web", "10.96.0.10", namespace="ns", secondary_cluster_ip="fd00:96::10")
    assert [e.ip for e in merge_endpoints(dual, slices, node_name=NODE)] == ["10.0.0.1", "fd00::1"]
    only6 = service_port("web", "fd00:96::10", namespace="ns")
    assert [e.ip for e in merge_endpoints(only6, slices, node_name=NODE)] == ["fd00::1"]
    only4 = service_port("web", "10.96.0.10", namespace="ns")
    assert [e.ip for e in merge_endpoints(only4, slices, node_name=NODE)] == ["10.0.0.1"]


def test_merge_endpoints_ignores_input_slice_order() -> None:
    p = sp("web")
    s1 = eslice("ns", "a", "web", [("", 80, TCP)], [sep("10.0.0.1", ready=False, zone="a")])
    s2 = eslice("ns", "b", "web", [("", 80, TCP)], [sep("10.0.0.1", ready=False, zone="b")])
    assert merge_endpoints(p, [s1, s2], node_name=NODE) == merge_endpoints(p, [s2, s1], node_name=NODE)
    assert merge_endpoints(p, [s2, s1], node_name=NODE)[0].zone == "a"


# ---- change tracking ------------------------------------------------------

def test_noop_changes_vanish() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    t.take()
    assert not t.pending
    assert t.update_service(SN, service("ns", "web", sp("web", port=81)))
    assert t.pending
    assert t.update_service(SN, service("ns", "web"))
    assert not t.pending and t.oldest_pending is None
    snap = t.take()
    assert snap.changed == frozenset() and snap.oldest_change is None


def test_add_then_delete_vanishes() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [], []))
    t.update_slice(("ns", "a"), None)
    t.update_service(SN, None)
    assert not t.pending
    assert t.take().changed == frozenset()


def test_identical_redelivery_is_not_a_change() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    sl = eslice("ns", "a", "web", [("", 80, TCP)], [sep("10.0.0.1")])
    t.update_slice(sl.key, sl)
    t.take()
    assert not t.update_service(SN, service("ns", "web"))
    assert not t.update_slice(sl.key, eslice("ns", "a", "web", [("", 80, TCP)], [sep("10.0.0.1")]))
    assert not t.update_service(ServiceName("ns", "gone"), None)
    assert not t.update_slice(("ns", "gone"), None)
    assert not t.pending


def test_slice_edit_with_same_merged_result_is_not_reported() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [("", 80, TCP)], [sep("10.0.0.1"), sep("10.0.0.2")]))
    t.take()
    # Reordered endpoints: a different slice, the same merged endpoints.
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [("", 80, TCP)], [sep("10.0.0.2"), sep("10.0.0.1")]))
    assert t.pending
    assert t.take().changed == frozenset()


def test_oldest_change_is_first_change_since_take() -> None:
    clock = FakeClock()
    t = Tracker(NODE, clock=clock)
    assert t.oldest_pending is None
    t.update_service(SN, service("ns", "web"))
    clock.now = 105.0
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [], []))
    assert t.oldest_pending == 100.0
    snap = t.take()
    assert snap.oldest_change == 100.0
    assert t.oldest_pending is None
    clock.now = 110.0
    t.update_service(SN, None)
    assert t.take().oldest_change == 110.0


def test_oldest_change_restarts_after_everything_was_undone() -> None:
    clock = FakeClock()
    t = Tracker(NODE, clock=clock)
    t.update_service(SN, service("ns", "web"))
    t.update_service(SN, None)
    clock.now = 200.0
    t.update_service(SN, service("ns", "web"))
    assert t.oldest_pending == 200.0


def test_node_labels_change_marks_every_service() -> None:
    t = Tracker(NODE)
    other = ServiceName("ns", "api")
    t.update_service(SN, service("ns", "web"))
    t.update_service(other, service("ns", "api"))
    t.take()
    assert t.set_node_labels({"topology.kubernetes.io/zone": "z1"})
    snap = t.take()
    assert snap.changed == {SN, other}
    assert snap.state.node_zone == "z1"
    assert not t.set_node_labels({"topology.kubernetes.io/zone": "z1"})
    # Change and revert: nothing pending.
    t.set_node_labels({"topology.kubernetes.io/zone": "z2"})
    t.set_node_labels({"topology.kubernetes.io/zone": "z1"})
    assert not t.pending and t.take().changed == frozenset()


def test_node_labels_are_copied() -> None:
    labels = {"topology.kubernetes.io/zone": "z1"}
    t = Tracker(NODE)
    t.set_node_labels(labels)
    labels["topology.kubernetes.io/zone"] = "mutated"
    assert t.take().state.node_zone == "z1"


def test_replace_all_diffs_against_content() -> None:
    t = Tracker(NODE)
    web = service("ns", "web")
    api = service("ns", "api")
    sl = eslice("ns", "a", "web", [("", 80, TCP)], [sep("10.0.0.1")])
    assert t.replace_all([web, api], [sl])
    t.take()
    assert not t.replace_all([api, web], [sl])
    assert not t.pending
    assert t.replace_all([web], [sl])
    snap = t.take()
    assert snap.changed == {api.name}
    assert set(snap.state.service_ports) == {SPN}
    # None leaves that kind alone.
    assert not t.replace_all(None, [sl])
    assert t.replace_all([web], None) is False
    assert t.replace_all(None, [])
    assert t.take().state.endpoints[SPN] == ()


def test_replace_all_last_duplicate_wins() -> None:
    t = Tracker(NODE)
    t.replace_all([service("ns", "web"), service("ns", "web", sp("web", port=99))], [])
    assert t.take().state.service_ports[SPN].port == 99


def test_snapshots_are_immutable_and_independent() -> None:
    t = Tracker(NODE)
    t.update_service(SN, service("ns", "web"))
    first = t.take().state
    t.update_service(SN, None)
    t.update_service(ServiceName("ns", "api"), service("ns", "api"))
    second = t.take().state
    assert SPN in first.service_ports and SPN not in second.service_ports
    with pytest.raises(TypeError):
        first.service_ports[SPN] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        first.endpoints[SPN] = ()  # type: ignore[index]


def test_equal_inputs_give_equal_states() -> None:
    def build(order: int) -> ProxyState:
        t = Tracker(NODE)
        objs = [
            lambda: t.update_service(SN, service("ns", "web")),
            lambda: t.update_slice(("ns", "b"), eslice("ns", "b", "web", [("", 80, TCP)],
                                                       [sep("10.0.0.9"), sep("10.0.0.10")])),
            lambda: t.update_slice(("ns", "a"), eslice("ns", "a", "web", [("", 80, TCP)], [sep("10.0.0.2")])),
        ]
        for f in (objs if order else reversed(objs)):
            f()
        return t.take().state

    assert build(0) == build(1)


def test_metrics_count_changes_and_pending() -> None:
    def value(name: str) -> float:
        v = metrics.REGISTRY.get_sample_value(name)
        return 0.0 if v is None else v

    t = Tracker(NODE)
    svc_total = value("kubeproxy_sync_proxy_rules_service_changes_total")
    ep_total = value("kubeproxy_sync_proxy_rules_endpoint_changes_total")
    t.update_service(SN, service("ns", "web"))
    t.update_service(ServiceName("ns", "api"), service("ns", "api"))
    t.update_service(SN, service("ns", "web"))  # identical: not counted
    t.update_slice(("ns", "a"), eslice("ns", "a", "web", [], []))
    t.update_slice(("ns", "b"), eslice("ns", "b", "web", [], []))
    t.update_slice(("ns", "c"), eslice("ns", "c", "api", [], []))
    assert value("kubeproxy_sync_proxy_rules_service_changes_total") == svc_total + 2
    assert value("kubeproxy_sync_proxy_rules_endpoint_changes_total") == ep_total + 3
    assert value("kubeproxy_sync_proxy_rules_service_changes_pending") == 2
    assert value("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 2  # web and api
    t.update_slice(("ns", "c"), None)  # undone: api has no pending endpoint change
    assert value("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 1
    t.take()
    assert value("kubeproxy_sync_proxy_rules_service_changes_pending") == 0
    assert value("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0


def test_take_recomputes_only_touched_services(monkeypatch: pytest.MonkeyPatch) -> None:
    t = Tracker(NODE)
    for i in range(50):
        name = f"s{i}"
        t.update_service(ServiceName("ns", name), service("ns", name))
        t.update_slice(("ns", name), eslice("ns", name, name, [("", 80, TCP)], [sep(f"10.0.{i}.1")]))
    t.take()
    import proxyd.tracker as tracker_mod

    calls: list[ServicePortName] = []
    real = tracker_mod.merge_endpoints

    def counting(p: ServicePort, slices: Iterable[EndpointSlice], *, node_name: str) -> tuple[Endpoint, ...]:
        calls.append(p.name)
        return real(p, slices, node_name=node_name)

    monkeypatch.setattr(tracker_mod, "merge_endpoints", counting)
    t.update_slice(("ns", "s7"), eslice("ns", "s7", "s7", [("", 80, TCP)], [sep("10.0.7.2")]))
    snap = t.take()
    assert calls == [ServicePortName("ns", "s7", "", TCP)]
    assert snap.changed == {ServiceName("ns", "s7")}
    assert len(snap.state.service_ports) == 50
    calls.clear()
    assert t.take().changed == frozenset() and calls == []


# ---- property tests against a from-scratch reference ----------------------

def reference_state(services: Mapping[ServiceName, Service], slices: Mapping[tuple[str, str], EndpointSlice],
                    node_name: str) -> tuple[dict, dict]:
    """Every port and its endpoints, computed from scratch with the plain rules."""
    ports: dict[ServicePortName, ServicePort] = {}
    eps: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for svc in services.values():
        for p in svc.ports:
            ports[p.name] = p  # last duplicate wins
    for pn, p in ports.items():
        candidates: dict[tuple[str, int], list[Endpoint]] = {}
        mine = sorted((s for s in slices.values() if s.namespace == pn.namespace and s.service == pn.name),
                      key=lambda s: s.name)
        for s in mine:
            for ep_port in s.ports:
                if ep_port.name != pn.port or ep_port.protocol != pn.protocol or ep_port.port <= 0:
                    continue
                for e in s.endpoints:
                    if family(e.ip) != family(p.cluster_ip):
                        continue
                    candidates.setdefault((e.ip, ep_port.port), []).append(Endpoint(
                        ip=e.ip, port=ep_port.port, ready=e.ready, serving=e.serving,
                        terminating=e.terminating, node_name=e.node_name, zone=e.zone,
                        zone_hints=e.zone_hints))
        chosen = [sorted(c, key=lambda e: (not e.ready, e.node_name != node_name))[0]
                  for c in candidates.values()]
        chosen.sort(key=lambda e: (family(e.ip), int(ipaddress.ip_address(e.ip)), e.port))
        eps[pn] = tuple(chosen)
    return ports, eps


def services_of(ports: Mapping[ServicePortName, object]) -> set[ServiceName]:
    return {pn.service for pn in ports}


def diff_services(old: ProxyState, new: ProxyState) -> set[ServiceName]:
    out = set()
    for pn in set(old.service_ports) | set(new.service_ports):
        if (old.service_ports.get(pn) != new.service_ports.get(pn)
                or old.endpoints.get(pn) != new.endpoints.get(pn)):
            out.add(pn.service)
    return out


SVC_NAMES = ["a", "b", "c"]
SLICE_NAMES = ["s1", "s2", "s3", "s4"]
IPS = ["10.0.0.1", "10.0.0.9", "10.0.0.10", "fd00::1", "fd00::10"]
PORT_NAMES = ["", "http"]

_svc_port = st.builds(
    lambda pname, proto, num, v6: (pname, proto, num, v6),
    st.sampled_from(PORT_NAMES), st.sampled_from([TCP, UDP]), st.sampled_from([80, 443]), st.booleans())


@st.composite
def services_st(draw: st.DrawFn) -> Service:
    name = draw(st.sampled_from(SVC_NAMES))
    specs = draw(st.lists(_svc_port, min_size=0, max_size=3))
    ports = tuple(sp(name, "fd00::a" if v6 else "172.30.0.1", port_name=pname, protocol=proto, port=num)
                  for pname, proto, num, v6 in specs)
    return Service(name=ServiceName("ns", name), ports=ports)


_slice_ep = st.builds(
    lambda ip, ready, term, node, zone: SliceEndpoint(ip=ip, ready=ready, serving=ready or term,
                                                      terminating=term, node_name=node, zone=zone),
    st.sampled_from(IPS), st.booleans(), st.booleans(), st.sampled_from([NODE, "node-2", None]),
    st.sampled_from([None, "z1", "z2"]))


@st.composite
def slices_st(draw: st.DrawFn) -> EndpointSlice:
    name = draw(st.sampled_from(SLICE_NAMES))
    svc = draw(st.sampled_from(SVC_NAMES))
    ports = draw(st.lists(st.tuples(st.sampled_from(PORT_NAMES), st.sampled_from([0, 8080, 8443]),
                                    st.sampled_from([TCP, UDP])), max_size=3))
    eps = draw(st.lists(_slice_ep, max_size=4))
    return eslice("ns", name, svc, ports, eps)


_ops = st.lists(st.one_of(
    st.tuples(st.just("svc"), services_st()),
    st.tuples(st.just("delsvc"), st.sampled_from(SVC_NAMES)),
    st.tuples(st.just("slice"), slices_st()),
    st.tuples(st.just("delslice"), st.sampled_from(SLICE_NAMES)),
    st.tuples(st.just("replace"), st.tuples(st.lists(services_st(), max_size=3),
                                            st.lists(slices_st(), max_size=4))),
    st.tuples(st.just("labels"), st.sampled_from([{}, {"topology.kubernetes.io/zone": "z1"}])),
    st.tuples(st.just("take"), st.none()),
), max_size=40)


def apply(t: Tracker, op: str, arg: object, model: dict) -> None:
    if op == "svc":
        t.update_service(arg.name, arg)
        model["svc"][arg.name] = arg
    elif op == "delsvc":
        name = ServiceName("ns", arg)
        t.update_service(name, None)
        model["svc"].pop(name, None)
    elif op == "slice":
        t.update_slice(arg.key, arg)
        model["slice"][arg.key] = arg
    elif op == "delslice":
        t.update_slice(("ns", arg), None)
        model["slice"].pop(("ns", arg), None)
    elif op == "replace":
        svcs, slices = arg
        t.replace_all(svcs, slices)
        model["svc"] = {s.name: s for s in svcs}
        model["slice"] = {s.key: s for s in slices}
    elif op == "labels":
        t.set_node_labels(arg)
        model["labels"] = dict(arg)


def check_take(t: Tracker, model: dict, prev: TrackerSnapshot, prev_labels: dict) -> TrackerSnapshot:
    snap = t.take()
    ports, eps = reference_state(model["svc"], model["slice"], NODE)
    assert dict(snap.state.service_ports) == ports
    assert dict(snap.state.endpoints) == eps
    assert dict(snap.state.node_labels) == model["labels"]
    expected = diff_services(prev.state, snap.state)
    if model["labels"] != prev_labels:
        expected |= services_of(snap.state.service_ports)
    assert snap.changed == expected
    assert not t.pending and t.oldest_pending is None
    return snap


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_tracker_matches_reference_after_any_sequence(ops: list) -> None:
    t = Tracker(NODE)
    model: dict = {"svc": {}, "slice": {}, "labels": {}}
    prev = t.take()
    prev_labels: dict = {}
    for op, arg in ops:
        if op == "take":
            prev = check_take(t, model, prev, prev_labels)
            prev_labels = dict(model["labels"])
        else:
            apply(t, op, arg, model)
    check_take(t, model, prev, prev_labels)


@settings(max_examples=200, deadline=None)
@given(_ops, _ops)
def test_sequence_then_restore_is_a_noop(setup: list, noise: list) -> None:
    """Whatever happens between two takes, restoring the content leaves nothing pending."""
    t = Tracker(NODE)
    model: dict = {"svc": {}, "slice": {}, "labels": {}}
    for op, arg in setup:
        if op != "take":
            apply(t, op, arg, model)
    before = t.take()
    saved = {k: dict(v) for k, v in model.items()}
    for op, arg in noise:
        if op != "take":
            apply(t, op, arg, model)
    t.replace_all(saved["svc"].values(), saved["slice"].values())
    t.set_node_labels(saved["labels"])
    assert not t.pending and t.oldest_pending is None
    snap = t.take()
    assert snap.changed == frozenset()
    assert snap.state == before.state
