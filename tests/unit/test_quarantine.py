"""Quarantine of what the kernel refuses (issue 18): the record, bisection, and iptables/nftables modes.

The modes run against fakes that refuse a transaction whenever a given
text (one service's endpoint) appears in it, the way the kernel refuses one
object of an atomic restore: the refused port is found in about log2(n)
extra transactions, the others are applied, the refused one keeps its last
good state, and changing it so it no longer triggers clears the quarantine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

import pytest

from bench.quarantine import RefusingApplier
from proxyd import metrics
from proxyd.config import Config
from proxyd.health import ProxierHealth
from proxyd.model import Endpoint, ProxyState, ServicePortName
from proxyd.modes.base import SyncRequest
from proxyd.quarantine import (
    MAX_ISOLATED,
    NodeWideFailure,
    Quarantine,
    hold_back,
    isolate,
    reason_class,
    trial_budget,
)
from tests.builders import endpoint, service_port, state

BAD_IP = "10.9.9.9"


def _isolate_with(n: int, bad: set[int]) -> tuple[dict[int, str], int, set[int]]:
    """Run ``isolate`` over 0..n-1 with a fake transaction refusing any group holding a bad one."""
    applied: set[int] = set()

    async def attempt(include: frozenset[int]) -> str | None:
        hit = include & bad
        if hit:
            return f"refused {min(hit)}"
        applied.update(include)
        return None

    refused, trials = asyncio.run(isolate(list(range(n)), "refused", attempt))
    return refused, trials, applied


@pytest.mark.parametrize("n", [2, 3, 10, 100, 1000, 10_000])
def test_one_refused_among_many_is_found_in_about_log2_n_trials(n: int) -> None:
    for bad in {0, n // 3, n - 1}:
        refused, trials, applied = _isolate_with(n, {bad})
        assert set(refused) == {bad}
        assert applied == set(range(n)) - {bad}  # every other candidate applied
        assert trials <= math.ceil(math.log2(n)) + 1, (n, bad, trials)


def test_several_refused_are_all_found_and_the_rest_applied() -> None:
    bad = {3, 4, 500, 999}
    refused, trials, applied = _isolate_with(1000, bad)
    assert set(refused) == bad and applied == set(range(1000)) - bad
    assert refused[500] == "refused 500"  # the kernel's reason for that port
    assert trials <= len(bad) * 2 * (math.ceil(math.log2(1000)) + 1)


def test_failure_without_any_candidate_is_node_wide_and_bounded() -> None:
    calls: list[frozenset[int]] = []

    async def attempt(include: frozenset[int]) -> str | None:
        calls.append(include)
        return "iptables-restore: command not found"

    with pytest.raises(NodeWideFailure):
        asyncio.run(isolate(list(range(10_000)), "boom", attempt))
    # gave up once the bare transaction failed too: one path down, the deferred rest, the bare one
    assert len(calls) <= math.ceil(math.log2(10_000)) + 2 and calls[-1] == frozenset()
    calls.clear()
    with pytest.raises(NodeWideFailure):
        asyncio.run(isolate([1], "boom", attempt))
    assert calls == [frozenset()]


def test_random_kernel_failures_stop_at_the_budget() -> None:
    count = 0

    async def attempt(include: frozenset[int]) -> str | None:
        nonlocal count
        count += 1
        return None if not include else "flaky"  # everything but the bare transaction fails

    refused, trials = asyncio.run(isolate(list(range(8)), "flaky", attempt))
    assert set(refused) == set(range(8)) and trials == count <= 40
    # Too many to isolate one by one: the rest is quarantined as a block, within the budget.
    count = 0
    refused, trials = asyncio.run(isolate(list(range(100_000)), "flaky", attempt))
    assert len(refused) == 100_000 and trials == count <= trial_budget(100_000, MAX_ISOLATED)
    assert sum(r.startswith("not isolated") for r in refused.values()) > 99_000


def test_record_logs_once_counts_reports_and_clears(caplog: pytest.LogCaptureFixture) -> None:
    q = Quarantine("testmode", wall=lambda: 1000.0)
    a = ServicePortName("ns", "a", "", service_port().protocol)
    b = ServicePortName("ns", "b", "", service_port().protocol)
    before = metrics.QUARANTINED_TOTAL.labels(mode="testmode", reason="restore")._value.get()
    with caplog.at_level(logging.WARNING, logger="proxyd.quarantine"):
        q.settle({a}, {a: "iptables-restore: line 7 failed\n"})
        q.settle({a}, {a: "iptables-restore: line 7 failed"})
    assert sum("quarantined" in r.message for r in caplog.records) == 1
    assert metrics.QUARANTINED_TOTAL.labels(mode="testmode", reason="restore")._value.get() == before + 1
    assert metrics.QUARANTINED_PORTS.labels(mode="testmode")._value.get() == 1
    assert q.report() == {f"{a}/TCP": "iptables-restore: line 7 failed"} and q.entries[a].since == 1000.0
    assert q.held({b}) == {a} and q.held({a}) == set() and q.held(None) == set()
    q.settle({b}, {})  # a partial sync that did not retry a: still quarantined
    assert a in q
    q.settle(None, {})  # a full sync retried it and it applied
    assert not q and metrics.QUARANTINED_PORTS.labels(mode="testmode")._value.get() == 0


def test_the_quarantines_of_one_mode_share_its_gauge() -> None:
    """One quarantine per address family: every change sets the gauge to the node's total."""
    gauge = metrics.QUARANTINED_PORTS.labels(mode="sharedmode")
    v4, v6 = Quarantine("sharedmode"), Quarantine("sharedmode")
    a = ServicePortName("ns", "a", "", service_port().protocol)
    b = ServicePortName("ns", "b", "", service_port().protocol)
    v4.add(a, "refused")
    v6.add(a, "refused")
    v6.add(b, "refused")
    assert gauge._value.get() == 3
    v4.settle(None, {})  # IPv4 applied: the IPv6 ports are still quarantined
    assert gauge._value.get() == 2
    other = Quarantine("othermode")
    other.add(a, "refused")
    assert gauge._value.get() == 2  # another mode's quarantine is not this mode's
    assert metrics.QUARANTINED_PORTS.labels(mode="othermode")._value.get() == 1
    del v6  # a dropped mode instance leaves the sum with its quarantine
    v4.add(b, "refused")
    assert gauge._value.get() == 1


def test_reason_label_is_bounded() -> None:
    assert reason_class("x" * 10_000) == "other"
    assert reason_class("_IPSetError: (4353, 'Unknown error 4353')") == "netlink"
    assert reason_class("Error: Could not process rule: nft") == "transaction"


def test_healthz_names_the_quarantine_keeping_200() -> None:
    quarantined = {"ns/a:80/TCP": "iptables-restore: line 7 failed"}
    health = ProxierHealth(timeout=60, quarantined=lambda: quarantined)
    health.updated()
    status, _, body = health.healthz()
    assert status == 200
    answer = json.loads(body)
    assert answer["quarantined"] == quarantined and answer["quarantinedTotal"] == 1
    quarantined.clear()
    assert "quarantined" not in json.loads(health.healthz()[2])


def test_hold_back_keeps_the_last_good_version_or_none() -> None:
    old = service_port("a", "10.96.0.1")
    new = service_port("a", "10.96.0.1", port=81)
    fresh = service_port("b", "10.96.0.2")
    good = state((old, (endpoint("10.1.0.1"),)))
    desired = state((new, (endpoint("10.1.0.2"),)), (fresh, ()))
    mixed = hold_back(desired, good, {old.name, fresh.name})
    assert dict(mixed.service_ports) == {old.name: old}
    assert dict(mixed.endpoints) == {old.name: (endpoint("10.1.0.1"),)}
    assert hold_back(desired, good, ()) is desired


# -- modes ---------------------------------------------------------------------


def _services(n: int, bad_ip: str | None, bad_index: int) -> ProxyState:
    entries = []
    for i in range(n):
        ip = bad_ip if (i == bad_index and bad_ip) else f"10.1.{i // 250}.{i % 250 + 1}"
        entries.append((service_port(f"s{i:03d}", f"10.96.{i // 250}.{i % 250 + 1}"), (Endpoint(ip, 80),)))
    return state(*entries)


def test_iptables_mode_quarantines_the_refused_port_and_applies_the_others() -> None:
    from proxyd.modes.iptables import IptablesMode

    mode = IptablesMode(Config(cluster_cidrs=("10.0.0.0/8",), sync_period=30.0), clock=lambda: 0.0)
    fake = RefusingApplier()
    mode.applier = fake  # type: ignore[assignment]
    n, bad = 64, 17
    first = _services(n, None, bad)
    bad_name = sorted(first.service_ports)[bad]

    async def scenario() -> None:
        await mode.sync(SyncRequest(first, None))
        assert fake.transactions == 1 and not mode.quarantine
        # Every endpoint moves; the bad port's new endpoint is refused by the "kernel".
        fake.refuse = f"--to-destination {BAD_IP}:80"
        second = ProxyState(service_ports=first.service_ports,
                            endpoints={k: (Endpoint(BAD_IP if k == bad_name else "10.2.0.1", 80),)
                                       for k in first.service_ports}, node_name="node1")
        changed = frozenset(n.service for n in first.service_ports)
        fake.transactions = 0
        await mode.sync(SyncRequest(second, changed, frozenset(first.service_ports)))
        # partial + full retry + about log2(64) trials
        assert fake.transactions <= 2 + math.ceil(math.log2(n)) + 2
        assert set(mode.quarantine.entries) == {bad_name}
        assert "line 42 failed" in mode.quarantined()[f"{bad_name}/TCP"]
        cache = mode.planner.cache
        for name in first.service_ports:
            want = "10.1." if name == bad_name else "10.2.0.1"
            # The cache keeps what each port DNATs to (not the rules' text).
            assert any(str(ep).startswith(want) for ep in cache[name].reachable), name
        # A partial sync of something else leaves it held back, unretried.
        fake.transactions = 0
        await mode.sync(SyncRequest(second, frozenset(), frozenset()))
        assert fake.transactions == 0 and bad_name in mode.quarantine  # nothing to re-render: no restore
        # Fixing the object clears the quarantine.
        third = ProxyState(service_ports=second.service_ports,
                           endpoints={**second.endpoints, bad_name: (Endpoint("10.3.0.1", 80),)},
                           node_name="node1")
        fake.transactions = 0
        await mode.sync(SyncRequest(third, frozenset({bad_name.service}), frozenset({bad_name})))
        assert fake.transactions == 1 and not mode.quarantine
        assert [str(ep) for ep in mode.planner.cache[bad_name].reachable] == ["10.3.0.1:80"]

    asyncio.run(scenario())


def test_iptables_new_refused_port_gets_no_rules_on_a_first_full_sync() -> None:
    from proxyd.modes.iptables import IptablesMode

    mode = IptablesMode(Config(cluster_cidrs=("10.0.0.0/8",), sync_period=30.0), clock=lambda: 0.0)
    fake = RefusingApplier()
    fake.refuse = f"--to-destination {BAD_IP}:80"
    mode.applier = fake  # type: ignore[assignment]
    desired = _services(200, BAD_IP, 150)
    bad_name = sorted(desired.service_ports)[150]
    asyncio.run(mode.sync(SyncRequest(desired, None)))
    assert set(mode.quarantine.entries) == {bad_name}
    assert bad_name not in mode.planner.cache and len(mode.planner.cache) == 199
    assert fake.transactions <= 1 + math.ceil(math.log2(200)) + 2
    # The next full sync retries it; still refused, it stays (logged and counted once).
    total = metrics.QUARANTINED_TOTAL.labels(mode="iptables", reason="restore")._value.get()
    asyncio.run(mode.sync(SyncRequest(desired, None)))
    assert set(mode.quarantine.entries) == {bad_name}
    assert metrics.QUARANTINED_TOTAL.labels(mode="iptables", reason="restore")._value.get() == total
    fake.refuse = None
    asyncio.run(mode.sync(SyncRequest(desired, None)))
    assert not mode.quarantine and len(mode.planner.cache) == 200


def test_nftables_mode_quarantines_the_refused_port_and_mirror_adopts_only_commits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from proxyd.modes.nftables import NftablesMode
    from proxyd.modes.nftables import mode as mode_module
    from tests.unit.test_nftables_mode import FakeNft

    monkeypatch.setattr(mode_module, "_node_addresses",
                        lambda cidrs, family: (["192.168.0.2"], "192.168.0.2"))
    fake = FakeNft()
    mode = NftablesMode(Config(proxy_mode="nftables", node_name="node1", cluster_cidrs=("10.244.0.0/16",)),
                        nft=fake)  # type: ignore[arg-type]
    n, bad = 100, 42
    first = _services(n, None, bad)
    bad_name = sorted(first.service_ports)[bad]

    def backends() -> str:
        return " ".join(" ".join(map(str, m.items())) for m in fake.ruleset.sets.values())

    asyncio.run(mode.sync(SyncRequest(first, None)))
    fake.refuse = BAD_IP
    second = ProxyState(service_ports=first.service_ports,
                        endpoints={**first.endpoints, bad_name: (Endpoint(BAD_IP, 80),),
                                   sorted(first.service_ports)[0]: (Endpoint("10.2.0.1", 80),)},
                        node_name="node1")
    fake.attempts = 0
    asyncio.run(mode.sync(SyncRequest(second, frozenset(k.service for k in first.service_ports),
                                      frozenset(first.service_ports))))
    assert set(mode.quarantine.entries) == {bad_name}
    assert "out of range" in mode.quarantined()[f"{bad_name}/TCP"]
    assert fake.attempts <= 2 + math.ceil(math.log2(n)) + 2
    kernel = backends()
    assert "10.2.0.1" in kernel and BAD_IP not in kernel  # the other change applied, the bad one did not
    assert "10.1.0.43" in kernel  # the refused port keeps its last good endpoint
    # The mirror holds exactly what was committed: a partial sync sends nothing more.
    count = len(fake.transactions)
    asyncio.run(mode.sync(SyncRequest(second, frozenset(), frozenset())))
    assert len(fake.transactions) == count and bad_name in mode.quarantine
    # Fixing the object clears the quarantine.
    third = ProxyState(service_ports=second.service_ports,
                       endpoints={**second.endpoints, bad_name: (Endpoint("10.3.0.1", 80),)},
                       node_name="node1")
    asyncio.run(mode.sync(SyncRequest(third, frozenset({bad_name.service}), frozenset({bad_name}))))
    assert not mode.quarantine and "10.3.0.1" in backends() and "10.1.0.43" not in backends()


def test_ipvs_refused_objects_are_blamed_on_their_service_ports() -> None:
    from proxyd.model import Protocol
    from proxyd.modes.ipvs import IpvsMode
    from proxyd.modes.ipvs.applier import IpvsApplier
    from proxyd.modes.ipvs.planner import Assembly, Op, PortPlan, RealServer, VirtualServer, VSKey

    applier = IpvsApplier()
    mode = IpvsMode(Config(proxy_mode="ipvs"), applier=applier)
    a = service_port("a", "10.96.0.1").name
    b = service_port("b", "10.96.0.2").name
    c = service_port("c", "10.96.0.3").name
    key_a, key_b = VSKey("10.96.0.1", 80, Protocol.TCP), VSKey("10.96.0.2", 80, Protocol.TCP)
    mode._assembly = Assembly()
    mode._assembly.put(a, PortPlan(servers=(VirtualServer(key_a, "rr"),), bind=("10.96.0.1",)))
    mode._assembly.put(b, PortPlan(servers=(VirtualServer(key_b, "rr"),),
                                   entries=(("KUBE-EXTERNAL-IP", "192.0.2.10,tcp:80"),)))
    mode._assembly.put(c, PortPlan(bind=("10.96.0.3",)))
    entry = Op("set_add", ("KUBE-EXTERNAL-IP", "192.0.2.10,tcp:80"))
    dest = Op("add_dest", (key_a, RealServer("10.244.0.1", 80), 1))
    applier.refusals = {entry: "KUBE-EXTERNAL-IP: error 4105 (Hash is full)"}
    mode._refused = {}
    mode._blame({entry, dest})
    assert mode._refused == {b: "KUBE-EXTERNAL-IP: error 4105 (Hash is full)", a: f"refused: {dest}"}
    mode.quarantine.settle({a, b, c}, mode._refused)
    assert set(mode.quarantined()) == {f"{a}/TCP", f"{b}/TCP"}
    mode.quarantine.settle({b}, {})  # b changed and applied; a not looked at again
    assert set(mode.quarantined()) == {f"{a}/TCP"}


def test_userspace_refused_addresses_name_their_service_ports() -> None:
    import errno

    from proxyd.modes.userspace.mode import refused_ports

    a = service_port("a", "10.96.0.1", external_ips=("192.0.2.10",))
    b = service_port("b", "10.96.0.2")
    st = state((a, ()), (b, ()))
    assert refused_ports(st, {}) == {}
    refused = refused_ports(st, {"192.0.2.10": errno.EADDRNOTAVAIL})
    assert list(refused) == [a.name] and "192.0.2.10" in refused[a.name]
    assert "Cannot assign requested address" in refused[a.name]
