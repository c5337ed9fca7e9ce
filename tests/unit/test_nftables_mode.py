"""nftables mode's life cycle against a fake nft: full then partial syncs, repair, failures, cleanup.

No root: ``FakeNft`` plays libnftables, applying each transaction to a
``tracer.Ruleset`` (so malformed or inconsistent text fails as nft would)
and answering the canary listing from it.
"""

from __future__ import annotations

import asyncio

import pytest

from proxyd import metrics
from proxyd.config import Config
from proxyd.model import (
    Endpoint,
    Protocol,
    ProxyState,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServiceType,
)
from proxyd.modes.base import MODES, SyncRequest, mode_class
from proxyd.modes.nftables import NftablesMode
from proxyd.modes.nftables.libnft import NftError
from proxyd.modes.nftables.tracer import Ruleset


class FakeNft:
    backend = "fake"

    def __init__(self) -> None:
        self.ruleset = Ruleset()
        self.transactions: list[str] = []
        self.fail_next = 0  # transactions still to fail
        self.refuse: str | None = None  # fail every transaction holding this text (a refused element)
        self.attempts = 0

    def run(self, commands: str, *, json_output: bool = False) -> str:
        self.attempts += 1
        if self.fail_next:
            self.fail_next -= 1
            raise NftError("Error: Could not process rule: No such file or directory")
        if self.refuse is not None and self.refuse in commands:
            raise NftError(f"Error: Could not process rule: Numerical result out of range ({self.refuse})")
        snapshot = (dict(self.ruleset.chains), dict(self.ruleset.base),
                    {k: dict(v) for k, v in self.ruleset.sets.items()})
        try:
            self.ruleset.load(commands)
        except ValueError as err:
            self.ruleset.chains, self.ruleset.base, self.ruleset.sets = snapshot  # one transaction
            raise NftError(str(err)) from None
        self.transactions.append(commands)
        return ""

    def run_json(self, commands: str) -> list[dict]:
        if commands.startswith("list set"):
            name = commands.split()[-1]
            if name not in self.ruleset.sets:
                raise NftError("Error: No such file or directory")
            return [{"set": {"name": name, "elem": list(self.ruleset.sets[name])}}]
        if commands.startswith("list chains"):
            return [{"chain": {"table": "proxyd", "name": c}} for c in self.ruleset.chains]
        raise AssertionError(commands)


def sp(name: str, ip: str, **kw: object) -> ServicePort:
    n = ServicePortName("default", name, "", kw.pop("protocol", Protocol.TCP))  # type: ignore[arg-type]
    return ServicePort(name=n, type=ServiceType.CLUSTER_IP, cluster_ip=ip, port=80, protocol=n.protocol,
                       **kw)  # type: ignore[arg-type]


def st(*entries: tuple[ServicePort, tuple[Endpoint, ...]]) -> ProxyState:
    return ProxyState(service_ports={s.name: s for s, _ in entries},
                      endpoints={s.name: e for s, e in entries}, node_name="node1")


WEB = sp("web", "10.96.0.10")
ONE = st((WEB, (Endpoint("10.244.1.11", 8080),)))
TWO = st((WEB, (Endpoint("10.244.1.11", 8080), Endpoint("10.244.1.12", 8080))))
CHANGED = frozenset({ServiceName("default", "web")})


@pytest.fixture(autouse=True)
def _no_host_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mode reads this node's addresses over netlink; unit tests must not read the host's."""
    from proxyd.modes.nftables import mode as mode_module

    monkeypatch.setattr(mode_module, "_node_addresses",
                        lambda cidrs, family: (["192.168.0.2"], "192.168.0.2"))


def make() -> tuple[NftablesMode, FakeNft]:
    fake = FakeNft()
    mode = NftablesMode(Config(proxy_mode="nftables", node_name="node1", cluster_cidrs=("10.244.0.0/16",)),
                        nft=fake)  # type: ignore[arg-type]
    return mode, fake


def test_registered() -> None:
    assert "nftables" in MODES and mode_class("nftables") is NftablesMode


def test_full_then_partial_then_nothing() -> None:
    mode, fake = make()
    asyncio.run(mode.sync(SyncRequest(ONE, None)))
    assert mode.last_plan is not None and mode.last_plan.full
    asyncio.run(mode.sync(SyncRequest(TWO, CHANGED)))
    assert mode.last_plan is not None and not mode.last_plan.full
    assert "add element ip proxyd svc-backends-tcp { 10.96.0.10 . tcp . 80 . 1 : 10.244.1.12 . 8080 }" \
        in fake.transactions[-1]
    asyncio.run(mode.sync(SyncRequest(TWO, frozenset())))
    # svc-pick-tcp-1 fell out of use: emptied by the partial sync, deleted by the next one
    assert fake.transactions[-1] == ("add chain ip proxyd svc-pick-tcp-1\n"
                                     "delete chain ip proxyd svc-pick-tcp-1\n")
    count = len(fake.transactions)
    asyncio.run(mode.sync(SyncRequest(TWO, frozenset())))
    assert len(fake.transactions) == count  # nothing changed: no transaction at all


def test_flushed_table_is_repaired_with_a_full_sync() -> None:
    mode, fake = make()
    asyncio.run(mode.sync(SyncRequest(ONE, None)))
    before = metrics.NFTABLES_REPAIRS._value.get()
    fake.ruleset = Ruleset()  # nft flush ruleset
    asyncio.run(mode.sync(SyncRequest(ONE, frozenset())))
    assert mode.last_plan is not None and mode.last_plan.full
    assert metrics.NFTABLES_REPAIRS._value.get() == before + 1
    assert fake.ruleset.sets["svc-backends-tcp"]


def test_failed_partial_transaction_is_counted_and_retried_at_once_as_a_full_one() -> None:
    mode, fake = make()
    asyncio.run(mode.sync(SyncRequest(ONE, None)))
    before = metrics.NFTABLES_SYNC_FAILURES._value.get()
    fake.fail_next = 1
    asyncio.run(mode.sync(SyncRequest(TWO, CHANGED)))
    assert metrics.NFTABLES_SYNC_FAILURES._value.get() == before + 1
    assert mode.last_plan is not None and mode.last_plan.full and not mode.quarantine
    assert len(fake.ruleset.sets["svc-backends-tcp"]) == 2


def test_node_wide_failure_is_counted_and_makes_the_next_sync_full() -> None:
    mode, fake = make()
    asyncio.run(mode.sync(SyncRequest(ONE, None)))
    before = metrics.NFTABLES_SYNC_FAILURES._value.get()
    kept = {k: dict(v) for k, v in fake.ruleset.sets.items()}
    fake.fail_next = 100  # whatever is sent: not one service's fault, nobody is quarantined
    with pytest.raises(RuntimeError):
        asyncio.run(mode.sync(SyncRequest(TWO, CHANGED)))
    assert metrics.NFTABLES_SYNC_FAILURES._value.get() == before + 1
    assert fake.ruleset.sets == kept  # the previous ruleset stays
    assert mode.planner.needs_full and not mode.quarantine
    fake.fail_next = 0
    asyncio.run(mode.sync(SyncRequest(TWO, CHANGED)))  # the runner's retry
    assert mode.last_plan is not None and mode.last_plan.full
    assert len(fake.ruleset.sets["svc-backends-tcp"]) == 2


def test_restart_adopts_and_retires_stale_dynamic_chains() -> None:
    mode, fake = make()
    sticky = sp("sticky", "10.96.0.20", affinity_timeout=60)
    asyncio.run(mode.sync(SyncRequest(st((sticky, (Endpoint("10.244.1.11", 80),))), None)))
    assert any(c.startswith("sticky-") for c in fake.ruleset.chains)
    # A new process (empty mirror) finds the old table, without that service any more.
    again = NftablesMode(Config(proxy_mode="nftables", node_name="node1"), nft=fake)  # type: ignore[arg-type]
    asyncio.run(again.sync(SyncRequest(ONE, None)))
    left = [c for c in fake.ruleset.chains if c.startswith(("sticky-", "endpoint-"))]
    assert left and not any(fake.ruleset.chains[c] for c in left)  # emptied now, deleted next
    assert not any(s.startswith("affinity-") for s in fake.ruleset.sets)
    asyncio.run(again.sync(SyncRequest(ONE, frozenset())))
    assert not any(c.startswith(("sticky-", "endpoint-")) for c in fake.ruleset.chains)
