"""Userspace listeners and the descriptor budget: how many fit, which are held when it is short.

The applier runs against a fake TCP path whose budget the test sets, and
``open_socket`` is replaced by a counter (no socket is bound): what is
checked is the choice (``listener_order``, never the order a source listed
objects), that open listeners are never closed for others, the log lines
(when refusals start and end, not at every sync) and the
``proxyd_listen_failures{reason="descriptors"}`` gauge.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from proxyd import metrics
from proxyd.model import Protocol, ServicePortName
from proxyd.modes.userspace import applier as applier_mod
from proxyd.modes.userspace.applier import BUDGET_REFUSAL, Applier, listener_order
from proxyd.modes.userspace.planner import ListenerKey, Plan, PlanChanges, TableKey
from proxyd.modes.userspace.tcp import CONNECTION_SHARE, fd_reserve, listener_cap

TCP = Protocol.TCP


class FakeListener:
    def __init__(self, key: TableKey) -> None:
        self.key = key
        self.admits: Any = None
        self.closed = False

    def retarget(self, key: TableKey) -> None:
        self.key = key

    def close(self) -> None:
        self.closed = True


class FakePath:
    """A TCP path whose listener budget is ``cap`` listeners."""

    fd_limit = 1000

    def __init__(self, cap: int) -> None:
        self.cap = cap

    def listener_room(self, listeners: int) -> int:
        return max(0, self.cap - listeners)

    def listen(self, sock: object, key: TableKey) -> FakeListener:
        return FakeListener(key)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[ListenerKey]:
    """Every listener key ``open_socket`` was asked for, in order."""
    calls: list[ListenerKey] = []

    def fake_open(key: ListenerKey) -> object:
        calls.append(key)
        return object()

    monkeypatch.setattr(applier_mod, "open_socket", fake_open)
    return calls


def services(names: Iterable[str]) -> dict[ListenerKey, TableKey]:
    out = {}
    for i, name in enumerate(names):
        table = TableKey(ServicePortName("ns", name, "http", TCP))
        out[ListenerKey(f"10.96.{i // 256}.{i % 256}", 80, TCP)] = table
    return out


def plan_of(listeners: dict[ListenerKey, TableKey], changed: Sequence[ListenerKey] | None = None) -> Plan:
    changes = None if changed is None else PlanChanges(listeners=frozenset(changed))
    return Plan(listeners=listeners, changes=changes)


def full(a: Applier, listeners: dict[ListenerKey, TableKey], path: FakePath) -> None:
    """What the mode's full sync hands the applier."""
    plan = plan_of(listeners)
    every = [*a.tcp_listeners, *a.udp_listeners, *a.not_open, *plan.listeners]
    a.update_listeners(plan, dict.fromkeys(every), path, None)  # type: ignore[arg-type]


def partial(a: Applier, listeners: dict[ListenerKey, TableKey], changed: Sequence[ListenerKey],
            path: FakePath) -> None:
    """What the mode's partial sync hands the applier."""
    plan = plan_of(listeners, changed)
    a.update_listeners(plan, [*changed, *a.bind_errors], path, None)  # type: ignore[arg-type]


def refused() -> float:
    return metrics.REGISTRY.get_sample_value("proxyd_listen_failures", {"reason": "descriptors"}) or 0.0


def held_names(a: Applier) -> set[str]:
    return {table.name.name for table in (listener.key for listener in a.tcp_listeners.values())}


NAMES = [f"svc-{i:03d}" for i in range(40)]


def test_a_limit_of_20000_holds_10000_listeners_and_keeps_a_quarter_for_connections() -> None:
    base, limit = 60, 20_000
    cap = listener_cap(limit, base, fd_reserve(limit))
    assert cap >= 10_000
    assert limit - base - fd_reserve(limit) - cap >= (limit - base - fd_reserve(limit)) // CONNECTION_SHARE
    assert listener_cap(100, 200, 16) == 0  # nothing left: no listener, never a negative cap


def test_a_short_budget_holds_the_first_ports_in_service_order_whatever_the_source_order(
        opened: list[ListenerKey], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=applier_mod.__name__)
    want = services(NAMES)
    held = []
    for seed in range(3):
        shuffled = list(want.items())
        random.Random(seed).shuffle(shuffled)
        a = Applier(holder=object())  # type: ignore[arg-type]
        full(a, dict(shuffled), FakePath(cap=25))
        held.append(held_names(a))
        assert len(a.tcp_listeners) == 25
        assert refused() == 15
        assert set(a.waiting) == set(want) - set(a.tcp_listeners)
        assert a.listen_failures() == {str(k): BUDGET_REFUSAL for k in sorted(a.waiting)}
    assert held[0] == held[1] == held[2] == set(NAMES[:25])
    assert sum("descriptor budget" in r.getMessage() for r in caplog.records) == 3  # once per start


def test_refusals_cost_nothing_while_there_is_no_room_and_open_in_order_when_room_appears(
        opened: list[ListenerKey], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=applier_mod.__name__)
    want = services(NAMES)
    path = FakePath(cap=10)
    a = Applier(holder=object())  # type: ignore[arg-type]
    full(a, want, path)
    assert len(opened) == 10 and refused() == 30
    lines = len(caplog.records)
    for _ in range(5):
        partial(a, want, [], path)
        full(a, want, path)
    assert len(opened) == 10, "a sync without room tried to open refused listeners"
    assert len(caplog.records) == lines, "a sync without a change logged the budget again"
    # Room for three more: the next three in order open at the next sync, whatever it changed.
    path.cap = 13
    partial(a, want, [], path)
    assert held_names(a) == set(NAMES[:13]) and refused() == 27
    # A new service that sorts first waits too: open listeners are never closed for it.
    first = ListenerKey("10.97.0.1", 80, TCP)
    want = {first: TableKey(ServicePortName("aaa", "first", "http", TCP)), **want}
    partial(a, want, [first], path)
    assert first not in a.tcp_listeners and a.waiting[0] == first
    # ... and is the first to get room.
    path.cap = 14
    partial(a, want, [], path)
    assert first in a.tcp_listeners
    # A waiting port that goes away is forgotten: never opened, no longer counted.
    gone = a.waiting[0]
    del want[gone]
    partial(a, want, [gone], path)
    assert gone not in a.waiting and str(gone) not in a.listen_failures() and refused() == 26
    path.cap = 100
    partial(a, want, [], path)
    assert gone not in opened
    assert len(a.tcp_listeners) == len(want) and not a.waiting and refused() == 0
    messages = [r.getMessage() for r in caplog.records if "descriptor budget" in r.getMessage()]
    # Refusals started, moved (within a minute: not logged), ended.
    assert len(messages) == 2 and "fits the descriptor budget again" in messages[-1], messages


def test_the_order_is_by_service_port_then_cluster_before_external() -> None:
    name = ServicePortName("ns", "web", "http", TCP)
    cluster, external = TableKey(name), TableKey(name, external=True)
    node_port = ListenerKey("0.0.0.0", 30080, TCP)
    cluster_ip = ListenerKey("10.96.0.10", 80, TCP)
    other = TableKey(ServicePortName("ns", "api", "http", TCP), external=True)
    api_node_port = ListenerKey("0.0.0.0", 30081, TCP)
    order = sorted([(node_port, external), (cluster_ip, cluster), (api_node_port, other)],
                   key=lambda item: listener_order(*item))
    assert [k for k, _ in order] == [api_node_port, cluster_ip, node_port]
