"""Micro-benchmark of the userspace connection table: pure twin against the Cython extension.

``python bench/conntable.py`` prints, in one run, operations per second for
pick+open+close (round robin, and with ClientIP affinity) and for UDP flow
lookup with each implementation and the native/pure ratio. ``bench_table(impl)``
returns the same numbers for one implementation, for other benchmarks to call.

The workload keeps a window of connections open (closed 64 picks later), so
``close`` does not always see the endpoint ``pick`` just returned, and spreads
picks over many service ports and client IPs as a node would see them.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable

from proxyd.conntable import ConnTableNative, ConnTablePy

SERVICES = 1000
ENDPOINTS = 5
CLIENTS = 256
WINDOW = 64
UDP_FLOWS = 10_000


def _fill(table: object, *, affinity: float) -> list[str]:
    keys = [f"ns{i % 50}/svc{i}:80/TCP" for i in range(SERVICES)]
    for s, key in enumerate(keys):
        eps = [(f"10.{s // 250}.{s % 250}.{e + 1}", 8080) for e in range(ENDPOINTS)]
        table.set_endpoints(key, eps, affinity, 0.0)  # type: ignore[attr-defined]
    return keys


def _pick_open_close(impl: type, ops: int, *, affinity: float) -> float:
    table = impl()
    keys = _fill(table, affinity=affinity)
    clients = [f"10.244.{c // 200}.{c % 200}" for c in range(CLIENTS)]
    nkeys = len(keys)
    pick, open_, close = table.pick, table.open, table.close
    ring: list[tuple[str, tuple[str, int]] | None] = [None] * WINDOW
    gc.collect()
    start = time.perf_counter()
    for i in range(ops):
        key = keys[i % nkeys]
        ep = pick(key, clients[i % CLIENTS], i * 1e-3)
        open_(key, ep)
        slot = i % WINDOW
        old = ring[slot]
        if old is not None:
            close(old[0], old[1])
        ring[slot] = (key, ep)
    elapsed = time.perf_counter() - start
    if table.total_active() != min(ops, WINDOW):
        raise AssertionError("benchmark bookkeeping is off")
    return ops / elapsed


def _udp_lookup(impl: type, ops: int) -> float:
    table = impl(max_udp_flows=UDP_FLOWS * 2)
    keys = [f"ns/dns{i}:53/UDP" for i in range(100)]
    flows = []
    for f in range(UDP_FLOWS):
        key = keys[f % len(keys)]
        client = (f"10.244.{f // 250 % 250}.{f % 250}", 30000 + f % 20000)
        table.udp_set(key, client, ("10.96.0.10", 53), object(), 0.0)
        flows.append((key, client))
    get = table.udp_get
    nflows = len(flows)
    gc.collect()
    start = time.perf_counter()
    for i in range(ops):
        key, client = flows[(i * 7919) % nflows]
        if get(key, client, 1.0) is None:
            raise AssertionError("flow lost")
    return ops / (time.perf_counter() - start)


def _best(fn: Callable[[], float], repeat: int) -> float:
    return max(fn() for _ in range(repeat))


def bench_table(impl: type, *, ops: int = 200_000, repeat: int = 3) -> dict[str, float]:
    """Operations per second of ``impl`` (a ConnTable class) on the three workloads (best of ``repeat``)."""
    return {
        "pick_open_close_rr": _best(lambda: _pick_open_close(impl, ops, affinity=0.0), repeat),
        "pick_open_close_affinity": _best(lambda: _pick_open_close(impl, ops, affinity=10800.0), repeat),
        "udp_lookup": _best(lambda: _udp_lookup(impl, ops), repeat),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=200_000, help="operations per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per workload (best is kept)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    impls: dict[str, type] = {"pure": ConnTablePy}
    if ConnTableNative is not None:
        impls["native"] = ConnTableNative
    results = {name: bench_table(impl, ops=args.ops, repeat=args.repeat) for name, impl in impls.items()}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'workload':<26}{'pure ops/s':>14}{'native ops/s':>14}{'ratio':>8}")
    for workload, pure in results["pure"].items():
        if "native" in results:
            native = results["native"][workload]
            print(f"{workload:<26}{pure:>14,.0f}{native:>14,.0f}{native / pure:>7.1f}x")
        else:
            print(f"{workload:<26}{pure:>14,.0f}{'(not built)':>14}{'-':>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
