"""DualStackMode's per-family views: patching by the change index gives what a rebuild gives."""

from __future__ import annotations

import random
from dataclasses import replace

from proxyd.model import Endpoint, ProxyState, ServicePortName
from proxyd.modes.base import SyncRequest
from proxyd.modes.familyviews import FamilyViews
from tests.builders import service_port, state


def _port(i: int, kind: int):  # type: ignore[no-untyped-def]
    """Port ``i`` as IPv4-only (0), IPv6-only (1) or dual-stack (2, either family primary)."""
    v4, v6 = f"10.96.0.{i}", f"fd00:10:96::{i:x}"
    if kind == 0:
        return service_port(f"s{i}", v4)
    if kind == 1:
        return service_port(f"s{i}", v6, external_ips=(f"2001:db8:2::{i:x}",))
    primary, secondary = (v4, v6) if i % 2 else (v6, v4)
    return service_port(f"s{i}", primary, secondary_cluster_ip=secondary,
                        external_ips=(f"192.0.2.{i}", f"2001:db8:2::{i:x}"))


def _random_state(rng: random.Random, node: str = "node1") -> ProxyState:
    entries = []
    for i in rng.sample(range(1, 60), 25):
        eps = [Endpoint(f"10.244.{rng.randrange(3)}.{rng.randrange(1, 9)}", 80)
               for _ in range(rng.randrange(3))]
        eps += [Endpoint(f"fd00:10:244::{rng.randrange(1, 9)}", 80) for _ in range(rng.randrange(3))]
        entries.append((_port(i, rng.randrange(3)), tuple(dict.fromkeys(eps))))
    return state(*entries, node=node)


def _changed(old: ProxyState, new: ProxyState) -> frozenset[ServicePortName]:
    names = set(old.service_ports) | set(new.service_ports)
    return frozenset(n for n in names if old.service_ports.get(n) != new.service_ports.get(n)
                     or old.endpoints.get(n) != new.endpoints.get(n))


def _plain(view: ProxyState) -> tuple:  # type: ignore[type-arg]
    return dict(view.service_ports), dict(view.endpoints), view.node_name, dict(view.node_labels)


def test_patched_views_equal_rebuilt_ones_over_random_changes() -> None:
    rng = random.Random(16)
    views = FamilyViews((4, 6))
    old = _random_state(rng)
    views.split(SyncRequest(old, None))
    for _ in range(200):
        new = _random_state(rng) if rng.random() < 0.2 else _mutate(rng, old)
        changed = _changed(old, new)
        request = SyncRequest(new, frozenset(n.service for n in changed), changed)
        split = views.split(request)
        for fam in (4, 6):
            assert _plain(split[fam].state) == _plain(new.for_family(fam))
            assert split[fam].changed_ports == changed and split[fam].changed == request.changed
        old = new


def _mutate(rng: random.Random, st: ProxyState) -> ProxyState:
    ports, eps = dict(st.service_ports), dict(st.endpoints)
    for name in rng.sample(sorted(ports), 3):
        action = rng.randrange(4)
        if action == 0:
            del ports[name]
            eps.pop(name, None)
        elif action == 1:
            eps[name] = (*eps.get(name, ()), Endpoint(f"fd00:10:244::{rng.randrange(10, 99)}", 80))
        elif action == 2:
            eps[name] = tuple(e for e in eps.get(name, ()) if ":" in e.ip)
        else:
            sp = _port(rng.randrange(60, 99), rng.randrange(3))
            ports[sp.name], eps[sp.name] = sp, (Endpoint("10.244.9.9", 80),)
    return replace(st, service_ports=ports, endpoints=eps)


def test_views_handed_out_never_change() -> None:
    rng = random.Random(6)
    views = FamilyViews((4, 6))
    first = _random_state(rng)
    given = views.split(SyncRequest(first, None))
    before = {fam: _plain(r.state) for fam, r in given.items()}
    second = _mutate(rng, first)
    changed = _changed(first, second)
    views.split(SyncRequest(second, frozenset(n.service for n in changed), changed))
    assert {fam: _plain(r.state) for fam, r in given.items()} == before


def test_rebuilds_on_full_requests_missing_index_node_change_and_after_forget() -> None:
    rng = random.Random(4)
    views = FamilyViews((4, 6))
    st = _random_state(rng)
    views.split(SyncRequest(st, None))
    # A stale view would keep the old ports: every one of these requests names no change.
    other = _random_state(rng)
    for request in (SyncRequest(other, None), SyncRequest(other, frozenset()),
                    SyncRequest(replace(other, node_name="node2"), frozenset(), frozenset()),
                    SyncRequest(replace(other, node_labels={"zone": "b"}), frozenset(), frozenset())):
        views.split(SyncRequest(st, None))
        got = views.split(request)
        assert all(_plain(got[f].state) == _plain(request.state.for_family(f)) for f in (4, 6))
    views.split(SyncRequest(st, None))
    views.forget()
    got = views.split(SyncRequest(other, frozenset(), frozenset()))
    assert all(_plain(got[f].state) == _plain(other.for_family(f)) for f in (4, 6))


def test_single_family_ports_stay_the_same_objects() -> None:
    sp = _port(1, 0)
    views = FamilyViews((4, 6))
    got = views.split(SyncRequest(state((sp, (Endpoint("10.244.0.1", 80),))), None))
    assert got[4].state.service_ports[sp.name] is sp and not got[6].state.service_ports
