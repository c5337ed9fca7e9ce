"""Micro-benchmark of the userspace connection table: pure twin against the Cython extension.

``python -m bench.conntable`` prints, in one run, operations per second for
pick+open+close (round robin, and with ClientIP affinity) and for UDP flow
lookup with each implementation and the native/pure ratio. ``bench_table(impl)``
returns the same numbers for one implementation, for other benchmarks to call.

Run as root, it then measures how much of that reaches the proxy: new
connections per second (and proxyd CPU per connection) through the real
userspace proxy, once with the extension and once with the twin forced by
``PROXYD_NO_EXTENSIONS=1``, in network namespaces, on the main benchmark's
stack (``harness.setup`` backends, ``paths.ProxydPath``, ``dataplane.http``
with ``Connection: close``). ``--no-proxy`` skips that part.

The workload keeps a window of connections open (closed 64 picks later), so
``close`` does not always see the endpoint ``pick`` just returned, and spreads
picks over many service ports and client IPs as a node would see them.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable

from proxyd.modes.userspace.conntable import ConnTableNative, ConnTablePy

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


def _connections(keys: list[str], ops: int) -> list[list[tuple[str, str, float]]]:
    """(key, client ip, now) per new connection, in batches of WINDOW open at once."""
    clients = [f"10.244.{c // 200}.{c % 200}" for c in range(CLIENTS)]
    conns = [(keys[i % len(keys)], clients[(i * 31) % CLIENTS], i * 1e-3) for i in range(ops)]
    return [conns[i : i + WINDOW] for i in range(0, ops, WINDOW)]


def _pick_open_close(impl: type | None, ops: int, *, affinity: float) -> float:
    """Seconds for ``ops`` pick+open+close; ``impl`` None times the harness loop alone."""
    table = (impl or ConnTablePy)()
    batches = _connections(_fill(table, affinity=affinity), ops)
    pick, open_, close = table.pick, table.open, table.close
    gc.collect()
    if impl is None:
        start = time.process_time()
        for batch in batches:
            opened = []
            for key, client, _now in batch:
                ep = client
                opened.append((key, ep))
            for _key, _ep in opened:
                pass
        return time.process_time() - start
    start = time.process_time()
    for batch in batches:
        opened = []
        for key, client, now in batch:
            ep = pick(key, client, now)
            open_(key, ep)
            opened.append((key, ep))
        for key, ep in opened:
            close(key, ep)
    elapsed = time.process_time() - start
    if table.total_active() != 0 or (table.affinity_count() > 0) != (affinity > 0):
        raise AssertionError("benchmark bookkeeping is off")
    return elapsed


def _udp_lookup(impl: type | None, ops: int) -> float:
    """Seconds for ``ops`` lookups of existing flows; ``impl`` None times the harness loop alone."""
    table = (impl or ConnTablePy)(max_udp_flows=UDP_FLOWS * 2)
    keys = [f"ns/dns{i}:53/UDP" for i in range(100)]
    flows = []
    for f in range(UDP_FLOWS):
        key = keys[f % len(keys)]
        client = (f"10.244.{f // 250 % 250}.{f % 250}", 30000 + f % 20000)
        table.udp_set(key, client, ("10.96.0.10", 53), object(), 0.0)
        flows.append((key, client))
    lookups = [flows[(i * 7919) % len(flows)] for i in range(ops)]
    get = table.udp_get
    gc.collect()
    start = time.process_time()
    if impl is None:
        for _key, _client in lookups:
            pass
    else:
        for key, client in lookups:
            get(key, client, 1.0)
    elapsed = time.process_time() - start
    if impl is not None and table.udp_count() != UDP_FLOWS:
        raise AssertionError("flows lost")
    return elapsed


def _workloads(ops: int) -> dict[str, Callable[[type | None], float]]:
    return {
        "pick_open_close_rr": lambda impl: _pick_open_close(impl, ops, affinity=0.0),
        "pick_open_close_affinity": lambda impl: _pick_open_close(impl, ops, affinity=10800.0),
        "udp_lookup": lambda impl: _udp_lookup(impl, ops),
    }


def compare(impls: dict[str, type], *, ops: int = 100_000, repeat: int = 7) -> dict[str, dict[str, float]]:
    """Table operations per second of each implementation on each workload.

    Runs are interleaved (harness, then each implementation, ``repeat``
    times) and the best run of each is kept, so drift in the load of a
    shared machine hits every implementation alike; time is the process's
    CPU time, so time spent descheduled by other load does not count. The cost of the
    benchmark's own loop (the harness run: the same loop without the table
    calls) is subtracted: the numbers are what the table costs a caller,
    call overhead included.
    """
    out: dict[str, dict[str, float]] = {name: {} for name in impls}
    for workload, run in _workloads(ops).items():
        best = {name: math.inf for name in ("harness", *impls)}
        for _ in range(repeat):
            best["harness"] = min(best["harness"], run(None))
            for name, impl in impls.items():
                best[name] = min(best[name], run(impl))
        for name in impls:
            out[name][workload] = ops / max(best[name] - best["harness"], 1e-9)
    return out


def bench_table(impl: type, *, ops: int = 100_000, repeat: int = 7) -> dict[str, float]:
    """Table operations per second of ``impl`` (a ConnTable class) on each workload; see ``compare``."""
    return compare({"impl": impl}, ops=ops, repeat=repeat)["impl"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=100_000, help="operations per measurement")
    parser.add_argument("--repeat", type=int, default=7, help="measurements per workload (best is kept)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-proxy", action="store_true",
                        help="skip the connection-rate comparison through the real proxy (needs root)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each proxy measurement")
    args = parser.parse_args(argv)
    impls: dict[str, type] = {"pure": ConnTablePy}
    if ConnTableNative is not None:
        impls["native"] = ConnTableNative
    results: dict = compare(impls, ops=args.ops, repeat=args.repeat)
    proxy = None if args.no_proxy or ConnTableNative is None else proxy_rates(args.seconds)
    if args.json:
        print(json.dumps({**results, "proxy": proxy}, indent=2))
        return 0
    print(f"{'workload':<26}{'pure ops/s':>14}{'native ops/s':>14}{'ratio':>8}")
    for workload, pure in results["pure"].items():
        if "native" in results:
            native = results["native"][workload]
            print(f"{workload:<26}{pure:>14,.0f}{native:>14,.0f}{native / pure:>7.1f}x")
        else:
            print(f"{workload:<26}{pure:>14,.0f}{'(not built)':>14}{'-':>8}")
    if proxy:
        pure, native = proxy["pure"], proxy["native"]
        print("\nthrough the userspace proxy (new connections, wrk Connection: close, one run each):")
        print(f"{'':<26}{'pure':>14}{'native':>14}{'ratio':>8}")
        for key in ("conn_proxyd_per_s", "proxyd_cpu_us_per_conn"):
            print(f"{key:<26}{pure[key]:>14,.1f}{native[key]:>14,.1f}{native[key] / pure[key]:>7.2f}x")
    return 0


def proxy_rates(seconds: float) -> dict[str, dict[str, float]] | None:
    """New-connection rate through the real proxy with each twin; None without root/netns."""
    from bench import dataplane, harness, paths
    from netnstopo.topology import Topology, netns_available

    why = netns_available()
    if why:
        print(f"(proxy-level comparison skipped: {why})", file=sys.stderr)
        return None
    out: dict[str, dict[str, float]] = {}
    with Topology(pods=3, pods2=0) as topo:
        harness.setup(topo)
        script = dataplane.write_wrk_script(topo.manifests.parent)
        for name, env in (("pure", {"PROXYD_NO_EXTENSIONS": "1"}), ("native", {})):
            path = paths.ProxydPath(topo, "userspace", env=env)
            running = path.start()
            try:
                sample = dataplane.http(topo, target=running.endpoints.http, seconds=max(1, round(seconds)),
                                        connections=16, close=True, meter=running.meter, script=script)
            finally:
                path.stop()
            if sample.get("error"):
                raise RuntimeError(f"{name}: {sample['error']}")
            out[name] = {"conn_proxyd_per_s": sample["cps"],
                         "proxyd_cpu_us_per_conn": sample["cpu_per_conn_us"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
