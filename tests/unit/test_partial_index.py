"""The partial-sync index: the tracker names the changed service ports, and every mode plans from it alone.

Proportional work is checked structurally, not by timing: the state handed
to a partial sync is a mapping that refuses to be iterated (``NoScan``), so
a mode that walked every service port would fail. Each mode's partial result
must equal what a full plan of the same state gives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from proxyd.config import Config
from proxyd.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Protocol,
    ProxyState,
    Service,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServiceType,
    SliceEndpoint,
)
from proxyd.modes.base import SyncRequest
from proxyd.modes.iptables.planner import Planner as IptablesPlanner
from proxyd.modes.iptables.planner import PlannerOptions
from proxyd.modes.ipvs import mode as ipvs_mode_module
from proxyd.modes.ipvs.mode import IpvsMode
from proxyd.modes.ipvs.planner import Op, RealServer, VSKey
from proxyd.modes.userspace.planner import Planner as UserspacePlanner
from proxyd.tracker import Tracker
from tests.unit.test_ipvs_planner import FakeApplier

NODE = "node-1"
TCP = Protocol.TCP


class NoScan(Mapping[Any, Any]):
    """A mapping that answers look-ups but fails any walk over its keys."""

    def __init__(self, data: Mapping[Any, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[Any]:
        raise AssertionError("a partial sync walked every service port")


def spn(i: int, pname: str = "http") -> ServicePortName:
    return ServicePortName("ns", f"svc-{i}", pname, TCP)


def sport(i: int, pname: str = "http", number: int = 80) -> ServicePort:
    return ServicePort(name=spn(i, pname), type=ServiceType.CLUSTER_IP,
                       cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}", port=number, protocol=TCP)


def big_state(n: int, *, changed: dict[ServicePortName, tuple[Endpoint, ...]] | None = None,
              drop: tuple[ServicePortName, ...] = (), scan: bool = True) -> ProxyState:
    services = {spn(i): sport(i) for i in range(n)}
    endpoints = {spn(i): (Endpoint(f"10.244.{i // 250}.{i % 250 + 1}", 8080),) for i in range(n)}
    endpoints.update(changed or {})
    for name in drop:
        services.pop(name)
        endpoints.pop(name)
    if scan:
        return ProxyState(service_ports=services, endpoints=endpoints, node_name=NODE)
    return ProxyState(service_ports=NoScan(services), endpoints=NoScan(endpoints), node_name=NODE)


CHANGED = {spn(7): (Endpoint("10.244.0.8", 8080), Endpoint("10.250.0.1", 8080))}


# --- the tracker builds the index ----------------------------------------------------------------

def eslice(svc: str, name: str, ips: tuple[str, ...], pname: str = "http") -> EndpointSlice:
    return EndpointSlice(namespace="ns", name=name, service=svc, ports=(EndpointPort(pname, 8080, TCP),),
                         endpoints=tuple(SliceEndpoint(ip=ip, ready=True, serving=True) for ip in ips))


def test_tracker_indexes_changed_ports_exactly() -> None:
    tracker = Tracker(NODE)
    two = Service(name=ServiceName("ns", "svc-1"), ports=(sport(1), sport(1, "admin", 9090)))
    tracker.update_service(two.name, two)
    svc2 = ServiceName("ns", "svc-2")
    tracker.update_service(svc2, Service(name=svc2, ports=(sport(2),)))
    first = tracker.take()
    assert first.changed_ports == {spn(1), spn(1, "admin"), spn(2)}
    # An endpoint of one port of a two-port service: only that port.
    tracker.update_slice(("ns", "svc-1-a"), eslice("svc-1", "svc-1-a", ("10.244.0.5",)))
    snap = tracker.take()
    assert snap.changed == {ServiceName("ns", "svc-1")} and snap.changed_ports == {spn(1)}
    # A port removed from the service, and another service deleted.
    tracker.update_service(two.name, Service(name=two.name, ports=(sport(1),)))
    tracker.update_service(ServiceName("ns", "svc-2"), None)
    assert tracker.take().changed_ports == {spn(1, "admin"), spn(2)}
    # A slice edit that merges to the same endpoints, and a change undone: nothing.
    tracker.update_slice(("ns", "svc-1-b"), eslice("svc-1", "svc-1-b", ("10.244.0.5",)))
    tracker.update_service(two.name, Service(name=two.name, ports=(sport(1, number=81),)))
    tracker.update_service(two.name, Service(name=two.name, ports=(sport(1),)))
    assert tracker.take().changed_ports == frozenset()
    # The node's zone moved: every port.
    tracker.set_node_labels({"topology.kubernetes.io/zone": "z1"})
    assert tracker.take().changed_ports == {spn(1)}


def test_sync_request_without_the_index_falls_back_to_a_scan() -> None:
    state = big_state(5)
    legacy = SyncRequest(state, frozenset({ServiceName("ns", "svc-3")}))
    assert legacy.ports_to_plan() == {spn(3)}
    assert legacy.ports_to_plan([spn(3, "gone")]) == {spn(3), spn(3, "gone")}
    services = frozenset({ServiceName("ns", "svc-3")})
    indexed = SyncRequest(big_state(5, scan=False), services, frozenset({spn(3)}))
    assert indexed.ports_to_plan() == {spn(3)}
    with pytest.raises(AssertionError, match="walked every service port"):
        SyncRequest(big_state(5, scan=False), services).ports_to_plan()  # the scan NoScan catches
    assert SyncRequest(state, None).ports_to_plan() is None


# --- every mode plans a partial sync from the index alone ---------------------------------------------

N = 400


def test_userspace_partial_plan_uses_only_the_index() -> None:
    planner = UserspacePlanner()
    planner.plan(big_state(N), changed=None, nodeport_ips=["0.0.0.0"])
    after = big_state(N, changed=CHANGED, drop=(spn(9),), scan=False)
    plan = planner.plan(after, changed=frozenset({spn(7).service, spn(9).service}), nodeport_ips=["0.0.0.0"],
                        changed_ports=frozenset({spn(7), spn(9)}))
    assert plan.changes is not None
    assert {k.name for k in plan.changes.tables} == {spn(7), spn(9)}
    assert plan.changes.removed_addresses == {"10.96.0.10"} and not plan.changes.added_addresses
    full = UserspacePlanner().plan(big_state(N, changed=CHANGED, drop=(spn(9),)), changed=None,
                                   nodeport_ips=["0.0.0.0"])
    assert plan == full


def test_iptables_partial_plan_uses_only_the_index() -> None:
    opts = PlannerOptions(cluster_cidrs=("10.0.0.0/8",), node_ip="192.168.0.2", random_fully=False)
    planner = IptablesPlanner(opts)
    planner.commit(planner.plan(big_state(N), None))
    after = big_state(N, changed=CHANGED, drop=(spn(9),), scan=False)
    plan = planner.plan(after, frozenset({spn(7).service, spn(9).service}),
                        changed_ports=frozenset({spn(7), spn(9)}))
    assert not plan.full and plan.rerendered == {spn(7)}
    assert "10.250.0.1" in plan.text


@pytest.fixture
def ipvs(monkeypatch: pytest.MonkeyPatch) -> tuple[IpvsMode, FakeApplier]:
    async def addresses(cidrs: Any, *, family: int | None = None) -> list[str]:
        return ["203.0.113.1"]

    monkeypatch.setattr(ipvs_mode_module.nodeaddrs, "node_addresses_async", addresses)
    fake = FakeApplier()
    return IpvsMode(Config(proxy_mode="ipvs", node_name=NODE), applier=fake), fake  # type: ignore[arg-type]


def test_ipvs_partial_sync_uses_only_the_index(ipvs: tuple[IpvsMode, FakeApplier]) -> None:
    mode, fake = ipvs
    asyncio.run(mode.sync(SyncRequest(big_state(N), None)))
    fake.calls.clear()
    after = big_state(N, changed=CHANGED, drop=(spn(9),), scan=False)
    asyncio.run(mode.sync(SyncRequest(after, frozenset({spn(7).service, spn(9).service}),
                                      frozenset({spn(7), spn(9)}))))
    key7, key9 = VSKey("10.96.0.8", 80, TCP), VSKey("10.96.0.10", 80, TCP)
    assert ("add_dest", key7, RealServer("10.250.0.1", 8080)) in fake.calls
    assert ("delete_server", key9) in fake.calls and key9 not in fake.servers
    assert not [c for c in fake.calls if c[0] in ("add_server", "update_server")]
    assert "10.96.0.10" not in fake.bound


def test_ipvs_refused_object_fails_alone_and_is_retried(ipvs: tuple[IpvsMode, FakeApplier]) -> None:
    mode, fake = ipvs
    bad = Op("add_dest", (VSKey("10.96.0.3", 80, TCP), RealServer("10.244.0.3", 8080), 1))
    fake.refuse = {bad}
    asyncio.run(mode.sync(SyncRequest(big_state(5), None)))
    assert len(fake.servers) == 5 and sum(len(d) for d in fake.dests.values()) == 4
    assert mode._held is not None and RealServer("10.244.0.3", 8080) not in mode._held.dests[bad.args[0]]
    # Its service port is quarantined with the kernel's reason (issue 18).
    assert set(mode.quarantine.entries) == {spn(2)}
    assert "Hash is full" in mode.quarantine.entries[spn(2)].reason
    # The next sync that looks at that virtual server tries again.
    fake.refuse = set()
    asyncio.run(mode.sync(SyncRequest(big_state(5), frozenset({spn(2).service}), frozenset({spn(2)}))))
    assert RealServer("10.244.0.3", 8080) in fake.dests[bad.args[0]]
    assert not mode.quarantine
