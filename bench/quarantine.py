"""Cost of isolating one refused service (issue 18): extra transactions when 1 of N is refused.

    python -m bench.quarantine [--services 10000] [--json]

Pure: the real iptables and nftables modes (planner, bisection, quarantine)
drive fake appliers that refuse any restore / transaction holding one
service's endpoint, as the kernel refuses one object of an atomic
transaction. For each mode, two syncs are measured:

* ``full``: the first sync of N services, one of them refused;
* ``partial``: every one of the N services changes at once (endpoints
  move), one change refused.

Printed per case: the transactions run (``transactions``; a clean sync is
1), the extra ones (``extra``), log2(N) for comparison, the refused ports
found, and the wall time of the sync (planning included; no kernel, so the
time is the planner's and the bisection's share only). Issue 18's target:
at most ~log2(10,000) ≈ 13.3 extra transactions. ``--save`` also writes
``bench/results/quarantine.json`` with the run's metadata (``bench/runmeta.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from typing import Any

from bench import runmeta
from proxyd.config import Config
from proxyd.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName, ServiceType
from proxyd.modes.base import SyncRequest

BAD_ENDPOINT = "10.254.254.254"


def _state(n: int, base: int, bad: int) -> ProxyState:
    ports: dict[ServicePortName, ServicePort] = {}
    eps: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for i in range(n):
        name = ServicePortName("bench", f"s{i:05d}", "", Protocol.TCP)
        ports[name] = ServicePort(name=name, type=ServiceType.CLUSTER_IP,
                                  cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}", port=80,
                                  protocol=Protocol.TCP)
        ip = BAD_ENDPOINT if i == bad else f"10.{base}.{i // 250}.{i % 250 + 1}"
        eps[name] = (Endpoint(ip, 8080),)
    return ProxyState(service_ports=ports, endpoints=eps, node_name="node1")


class RefusingApplier:
    """iptables mode's applier without a kernel; refuses any restore holding ``refuse``.

    Shared with ``tests/unit/test_quarantine.py``.
    """

    def __init__(self) -> None:
        self.refuse: str | None = None
        self.transactions = 0

    async def ensure_canaries(self) -> None:
        pass

    async def ensure_jumps(self) -> None:
        pass

    async def missing(self) -> list[str]:
        return []

    async def chains(self, table: str) -> set[str]:
        return set()

    async def restore(self, text: str) -> None:
        from proxyd.netfilter.backend import IptablesError

        self.transactions += 1
        if self.refuse is not None and self.refuse in text:
            raise IptablesError(["iptables-restore"], 1, f"iptables-restore: line 42 failed ({self.refuse})")


class _NftFake:
    """libnftables without a kernel; refuses transactions holding the bad endpoint."""

    backend = "fake"

    def __init__(self) -> None:
        self.refuse: str | None = None
        self.transactions = 0

    def run(self, commands: str, *, json_output: bool = False) -> str:
        from proxyd.modes.nftables.libnft import NftError

        self.transactions += 1
        if self.refuse is not None and self.refuse in commands:
            raise NftError("Error: Could not process rule: Numerical result out of range")
        return ""

    def run_json(self, commands: str) -> list[dict[str, Any]]:
        from proxyd.modes.nftables import layout as lay

        if commands.startswith("list set"):
            return [{"set": {"name": lay.CANARY, "elem": [lay.Family(4).canary_element]}}]
        return []


def _mode(kind: str) -> tuple[Any, Any]:
    if kind == "iptables":
        from proxyd.modes.iptables import IptablesMode

        mode: Any = IptablesMode(Config(cluster_cidrs=("10.0.0.0/8",)), clock=lambda: 0.0)
        fake: Any = RefusingApplier()
        mode.applier = fake
        return mode, fake
    from proxyd.modes.nftables import NftablesMode
    from proxyd.modes.nftables import mode as nft_mode

    nft_mode._node_addresses = lambda cidrs, family: ([], None)  # no host netlink in a pure bench
    fake = _NftFake()
    return NftablesMode(Config(proxy_mode="nftables", cluster_cidrs=("10.0.0.0/8",)), nft=fake), fake


async def _case(kind: str, n: int, sync: str) -> dict[str, Any]:
    mode, fake = _mode(kind)
    bad = n // 3
    first = _state(n, 1, -1 if sync == "partial" else bad)
    trigger = f"{BAD_ENDPOINT}:8080" if kind == "iptables" else f"{BAD_ENDPOINT} . 8080"
    if sync == "partial":
        await mode.sync(SyncRequest(first, None))
        second = _state(n, 2, bad)
        request = SyncRequest(second, frozenset(name.service for name in second.service_ports),
                              frozenset(second.service_ports))
    else:
        request = SyncRequest(first, None)
    fake.refuse = trigger
    fake.transactions = 0
    start = time.perf_counter()
    await mode.sync(request)
    seconds = time.perf_counter() - start
    return {"mode": kind, "sync": sync, "services": n, "transactions": fake.transactions,
            "extra": fake.transactions - 1, "log2_n": round(math.log2(n), 1),
            "refused": len(mode.quarantine), "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", action="store_true",
                        help="also write bench/results/quarantine.json with the run's metadata")
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    run = runmeta.Run(runmeta.module_command("bench.quarantine", raw))
    rows = [asyncio.run(_case(kind, args.services, sync))
            for kind in ("iptables", "nftables") for sync in ("full", "partial")]
    head = f"{'mode':<9} {'sync':<8} {'services':>8} {'transactions':>12} {'extra':>5} {'log2(N)':>7} " \
           f"{'refused':>7} {'seconds':>7}"
    print(head, file=sys.stderr)
    for r in rows:
        print(f"{r['mode']:<9} {r['sync']:<8} {r['services']:>8} {r['transactions']:>12} {r['extra']:>5} "
              f"{r['log2_n']:>7} {r['refused']:>7} {r['seconds']:>7}", file=sys.stderr)
    if args.save:
        print(f"saved {run.save('quarantine', {'services': args.services, 'rows': rows})}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows))
    return 0 if all(r["refused"] == 1 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
