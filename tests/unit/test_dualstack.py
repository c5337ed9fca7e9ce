"""The per-family view of the desired state and the meta-mode that runs one proxier per family."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxyd.config import Config
from proxyd.introspect import ModeStatus, TracePacket, TraceResult
from proxyd.model import Endpoint, Protocol, ServicePort, ServicePortName
from proxyd.modes.base import ProxyMode, SyncRequest
from proxyd.modes.dualstack import DualStackMode, node_families
from tests.builders import endpoint, service_port, state

V4, V6 = "10.96.0.10", "fd00:96::10"


def dual() -> tuple[ServicePort, list[Endpoint]]:
    sp = service_port("web", V4, secondary_cluster_ip=V6, external_ips=("192.0.2.7", "2001:db8::7"),
                      load_balancer_ips=("2001:db8::8",), load_balancer_source_ranges=("198.51.100.0/24",))
    return sp, [endpoint("10.244.1.2"), endpoint("[fd00:244::2]:8080"), endpoint("10.244.1.3")]


def test_a_single_stack_port_is_its_own_view_and_absent_from_the_other_family() -> None:
    sp = service_port("web", V4, external_ips=("192.0.2.7",))
    assert sp.for_family(4) is sp
    assert sp.for_family(6) is None
    assert sp.cluster_ips == (V4,)


def test_a_dual_stack_port_is_seen_with_each_family_s_addresses_only() -> None:
    sp, _ = dual()
    assert sp.cluster_ips == (V4, V6)
    v4, v6 = sp.for_family(4), sp.for_family(6)
    assert v4 is not None and v6 is not None
    assert (v4.cluster_ip, v4.secondary_cluster_ip, v4.external_ips, v4.load_balancer_ips,
            v4.load_balancer_source_ranges) == (V4, "", ("192.0.2.7",), (), ("198.51.100.0/24",))
    assert (v6.cluster_ip, v6.secondary_cluster_ip, v6.external_ips, v6.load_balancer_ips,
            v6.load_balancer_source_ranges) == (V6, "", ("2001:db8::7",), ("2001:db8::8",), ())
    assert v4.name == v6.name == sp.name


def test_an_ipv6_primary_service_keeps_its_ipv4_secondary_for_the_ipv4_proxier() -> None:
    sp = service_port("web", V6, secondary_cluster_ip=V4)
    v4 = sp.for_family(4)
    assert v4 is not None and v4.cluster_ip == V4


def test_the_state_view_keeps_each_family_s_endpoints() -> None:
    sp, eps = dual()
    only4 = service_port("old", "10.96.0.11")
    s = state((sp, eps), (only4, [endpoint("10.244.1.9")]))
    v4, v6 = s.for_family(4), s.for_family(6)
    assert set(v4.service_ports) == {sp.name, only4.name}
    assert [e.ip for e in v4.endpoints_of(sp.name)] == ["10.244.1.2", "10.244.1.3"]
    assert set(v6.service_ports) == {sp.name}
    assert [e.ip for e in v6.endpoints_of(sp.name)] == ["fd00:244::2"]
    assert v6.node_name == s.node_name


def test_a_single_family_state_s_endpoint_tuples_are_not_copied() -> None:
    sp = service_port("web", V4)
    eps = [endpoint("10.244.1.2")]
    s = state((sp, eps))
    assert s.for_family(4).endpoints[sp.name] is s.endpoints[sp.name]


def test_a_request_view_keeps_the_change_index() -> None:
    sp, eps = dual()
    req = SyncRequest(state((sp, eps)), frozenset({sp.name.service}), frozenset({sp.name}))
    v6 = req.for_family(6)
    assert v6.changed == req.changed and v6.changed_ports == req.changed_ports
    assert v6.state.service_ports[sp.name].cluster_ip == V6


def test_node_families_follow_the_kernel(tmp_path: Path) -> None:
    assert node_families(if_inet6=str(tmp_path / "absent")) == (4,)
    present = tmp_path / "if_inet6"
    present.write_text("")
    assert 4 in node_families(if_inet6=str(present))


class Recorder(ProxyMode):
    name = "recorder"
    per_family = True
    fail_family: int | None = None

    def __init__(self, config: Config, *, family: int = 4) -> None:
        super().__init__(config)
        self.family = family
        self.seen: list[SyncRequest] = []

    async def sync(self, request: SyncRequest) -> None:
        self.seen.append(request)
        if self.family == Recorder.fail_family:
            raise RuntimeError(f"IPv{self.family} broken")

    def quarantined(self) -> dict[str, str]:
        return {f"q{self.family}": "refused"}

    async def status(self, names: object = None) -> ModeStatus:
        st = ModeStatus(matches=True)
        st.counters[f"svc{self.family}"] = {"ep": {"packets": self.family}}
        if self.family == 6:
            st.mismatch("missing element")
        return st

    async def trace(self, packet: TracePacket) -> TraceResult:
        return TraceResult(source=f"IPv{self.family}")

    @classmethod
    async def cleanup(cls, config: Config) -> None:
        pass


def test_the_meta_mode_syncs_every_family_with_its_view_and_merges_reports() -> None:
    Recorder.fail_family = None
    meta = DualStackMode(Config(), Recorder, (4, 6))
    sp, eps = dual()
    asyncio.run(meta.sync(SyncRequest(state((sp, eps)), None)))
    p4, p6 = meta.proxiers[4], meta.proxiers[6]
    assert isinstance(p4, Recorder) and isinstance(p6, Recorder)
    assert p4.seen[0].state.service_ports[sp.name].cluster_ip == V4
    assert p6.seen[0].state.service_ports[sp.name].cluster_ip == V6
    assert meta.quarantined() == {"q4": "refused", "q6": "refused"}
    st = asyncio.run(meta.status())
    assert st.matches is False and st.mismatches == ["IPv6: missing element"]
    assert set(st.counters) == {"svc4", "svc6"}
    assert asyncio.run(meta.trace(TracePacket("2001:db8::1", V6, 80))).source == "IPv6"
    assert asyncio.run(meta.trace(TracePacket("192.0.2.1", V4, 80))).source == "IPv4"


def test_one_family_failing_does_not_stop_the_other_and_the_sync_fails() -> None:
    Recorder.fail_family = 6
    try:
        meta = DualStackMode(Config(), Recorder, (6, 4))
        sp, eps = dual()
        with pytest.raises(RuntimeError, match="IPv6 broken"):
            asyncio.run(meta.sync(SyncRequest(state((sp, eps)), None)))
        p4 = meta.proxiers[4]
        assert isinstance(p4, Recorder) and len(p4.seen) == 1
    finally:
        Recorder.fail_family = None


def test_a_single_family_node_traces_the_other_family_as_unsupported() -> None:
    meta = DualStackMode(Config(), Recorder, (4,))
    result = asyncio.run(meta.trace(TracePacket("2001:db8::1", V6, 80)))
    assert not result.supported and "IPv6" in result.notes[0]


def _ignored_unserved(source: str = "kube") -> float:
    from proxyd.metrics import REGISTRY

    labels = {"source": source, "kind": "Service", "reason": "family_not_served"}
    return REGISTRY.get_sample_value("proxyd_ignored_objects_total", labels) or 0.0


def test_a_family_the_node_does_not_serve_is_reported_once_per_service_port(caplog) -> None:
    Recorder.fail_family = None
    caplog.set_level("INFO", "proxyd.modes.dualstack")
    meta = DualStackMode(Config(), Recorder, (4,))
    assert any("serves IPv4 only" in r.getMessage() for r in caplog.records)
    only6 = service_port("v6", V6)
    only6b = service_port(ServicePortName("default", "v6", "dns", Protocol.UDP), V6)
    dual_sp, eps = dual()
    before = _ignored_unserved()
    s = state((only6, []), (only6b, []), (dual_sp, eps))
    for _ in range(3):  # every sync, full and partial: still once
        asyncio.run(meta.sync(SyncRequest(s, None)))
        asyncio.run(meta.sync(SyncRequest(s, frozenset({only6.name.service}), frozenset({only6.name}))))
    lines = [r.getMessage() for r in caplog.records if "is not served on this node" in r.getMessage()]
    assert sorted(lines) == ["IPv6 is not served on this node: default/v6 not proxied",
                             "IPv6 is not served on this node: default/v6:dns not proxied"]
    assert _ignored_unserved() == before + 2
    # The IPv4 proxier never saw them; the dual-stack port is served on its IPv4 address.
    p4 = meta.proxiers[4]
    assert isinstance(p4, Recorder)
    assert set(p4.seen[-1].state.service_ports) == {dual_sp.name}
    # Gone, then back: reported again.
    without = state((only6b, []), (dual_sp, eps))
    asyncio.run(meta.sync(SyncRequest(without, frozenset({only6.name.service}), frozenset({only6.name}))))
    asyncio.run(meta.sync(SyncRequest(s, frozenset({only6.name.service}), frozenset({only6.name}))))
    assert _ignored_unserved() == before + 3
    # A full sync with nothing unserved forgets them all.
    asyncio.run(meta.sync(SyncRequest(state((dual_sp, eps)), None)))
    asyncio.run(meta.sync(SyncRequest(s, None)))
    assert _ignored_unserved() == before + 5


def test_a_node_serving_both_families_reports_nothing(caplog) -> None:
    Recorder.fail_family = None
    caplog.set_level("INFO", "proxyd.modes.dualstack")
    meta = DualStackMode(Config(manifests="/nonexistent"), Recorder, (4, 6))
    before = _ignored_unserved("manifests")
    asyncio.run(meta.sync(SyncRequest(state((service_port("v6", V6), [])), None)))
    assert _ignored_unserved("manifests") == before
    assert not [r for r in caplog.records if "not served" in r.getMessage() or "only" in r.getMessage()]


def test_the_quarantine_gauge_is_the_node_s_total_at_every_step() -> None:
    """Each family's quarantine changes the gauge as it syncs: the value is the node's total throughout."""
    from proxyd import metrics

    gauge = metrics.QUARANTINED_PORTS.labels(mode="refusing")
    seen: list[tuple[int, float]] = []

    class Refusing(Recorder):
        name = "refusing"
        refuse = True

        async def sync(self, request: SyncRequest) -> None:
            names = list(request.state.service_ports)
            self.quarantine.settle(None, {n: f"IPv{self.family} refused it" for n in names}
                                   if Refusing.refuse else {})
            seen.append((self.family, gauge._value.get()))

    meta = DualStackMode(Config(), Refusing, (4, 6))
    sp, eps = dual()
    asyncio.run(meta.sync(SyncRequest(state((sp, eps)), None)))
    assert seen == [(4, 1), (6, 2)] and gauge._value.get() == 2
    seen.clear()
    Refusing.refuse = False  # both apply now: IPv4 first, while IPv6 still holds its port
    asyncio.run(meta.sync(SyncRequest(state((sp, eps)), None)))
    assert seen == [(4, 1), (6, 0)] and gauge._value.get() == 0


def test_cleanup_is_the_wrapped_mode_s_once(monkeypatch) -> None:
    """``--cleanup`` of a per-family mode: its own cleanup removes every family; run it once."""
    import proxyd.modes.dualstack as dualstack

    calls: list[str] = []

    class Cleaned(Recorder):
        @classmethod
        async def cleanup(cls, config: Config) -> None:
            calls.append(config.proxy_mode)

    monkeypatch.setattr(dualstack, "mode_class", lambda name: Cleaned)
    asyncio.run(DualStackMode.cleanup(Config(proxy_mode="iptables")))
    assert calls == ["iptables"]


def test_cleanup_refuses_a_mode_that_is_not_per_family() -> None:
    with pytest.raises(ValueError, match="userspace mode does not run one instance per family"):
        asyncio.run(DualStackMode.cleanup(Config(proxy_mode="userspace")))
