"""Control-plane scale of a proxy mode: full and incremental sync time and memory.

    python bench/sync_scale.py --mode iptables --services 1000,10000 [--endpoints 10]
                               [--backend nft,legacy] [--repeat 5] [--json]

``--backend`` defaults to the back end proxyd would pick on this host.

For each service count it builds a ProxyState of N ClusterIP services × E
endpoints, then, inside a throw-away network namespace (so the host's rules
are never touched; the script re-executes itself there with ``ip netns
exec`` and deletes the namespace afterwards), drives the real mode:

* ``full_s``: the first, full sync (planning + iptables-restore of everything);
* ``incremental_s``: median of ``--repeat`` partial syncs where one endpoint
  of one service changed (planning + restore + conntrack check);
* ``plan_full_s`` / ``plan_incremental_s``: the pure planner's share;
* ``rss_mib``: resident memory after the syncs; ``rules``: nat rules held.

Targets (SPEC/brief): full ≤ 2 s and incremental ≤ 100 ms at 10,000
services. Modes are pluggable: ``DRIVERS`` maps ``--mode`` to a factory of
a ``Driver`` (async ``start``/``full``/``partial``/``close``); ``--mode
ipvs`` needs IPVS, so run it inside the QEMU guest:
``tests/vm/run-in-vm.sh --cmd 'python bench/sync_scale.py --mode ipvs'``.
Output: a table on stderr; with ``--json`` one JSON object on the last
stdout line (flat when one count and one back end,
else ``{"points": [...]}``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proxyd.config import Config  # noqa: E402
from proxyd.model import (  # noqa: E402
    Endpoint,
    ProxyState,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServiceType,
)
from proxyd.model import Protocol as L4  # noqa: E402
from proxyd.modes.base import SyncRequest  # noqa: E402

INSIDE_ENV = "PROXYD_BENCH_INSIDE_NETNS"
POINT_TIMEOUT = 1800.0  # seconds for one (mode, back end, service count) point


def build_state(services: int, endpoints: int) -> ProxyState:
    """N ClusterIP services with E endpoints each."""
    ports: dict[ServicePortName, ServicePort] = {}
    eps: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for i in range(services):
        name = ServicePortName("bench", f"svc-{i}", "http", L4.TCP)
        ports[name] = ServicePort(name=name, type=ServiceType.CLUSTER_IP,
                                  cluster_ip=f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}",
                                  port=80, protocol=L4.TCP)
        base = i * endpoints
        eps[name] = tuple(Endpoint(_ip(128, base + j), 8080) for j in range(endpoints))
    return ProxyState(services=ports, endpoints=eps, node_name="bench-node")


def _ip(first: int, n: int) -> str:
    return f"10.{first + n // 65536}.{(n // 256) % 256}.{n % 256}"


class Driver(Protocol):
    async def start(self) -> None: ...
    async def full(self, state: ProxyState) -> dict[str, float]: ...
    async def partial(self, state: ProxyState, changed: frozenset[ServiceName]) -> dict[str, float]: ...
    def rules(self) -> int: ...
    async def close(self) -> None: ...


class PlannerTimedDriver:
    """Drives a mode's ``sync`` and times its pure planning apart from the rest."""

    mode: Any

    def __init__(self) -> None:
        self._plan_time = 0.0

    def timed(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """``func``, its run time added to the current sync's planning time."""
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self._plan_time += time.perf_counter() - t
        return wrapper

    async def start(self) -> None:
        await self.mode.start()
        # start() may build the planner: time its plan() from then on.
        self.mode.planner.plan = self.timed(self.mode.planner.plan)

    async def _sync(self, request: SyncRequest) -> dict[str, float]:
        self._plan_time = 0.0
        t = time.perf_counter()
        await self.mode.sync(request)
        return {"total": time.perf_counter() - t, "plan": self._plan_time}

    async def full(self, state: ProxyState) -> dict[str, float]:
        return await self._sync(SyncRequest(state, None))

    async def partial(self, state: ProxyState, changed: frozenset[ServiceName]) -> dict[str, float]:
        return await self._sync(SyncRequest(state, changed))

    async def close(self) -> None:
        await self.mode.shutdown()


class IptablesDriver(PlannerTimedDriver):
    """proxyd.modes.iptables.IptablesMode on the given back end; ``rules``: nat rules held."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        from proxyd.modes.iptables import IptablesMode
        from proxyd.modes.iptables.backend import Backend

        self.mode = IptablesMode(Config(cluster_cidrs=("10.0.0.0/8",)), backend=Backend(backend))

    async def partial(self, state: ProxyState, changed: frozenset[ServiceName]) -> dict[str, float]:
        out = await super().partial(state, changed)
        plan = self.mode.last_plan
        assert plan is not None and not plan.full, "partial sync was not partial"
        return out

    def rules(self) -> int:
        plan = self.mode.last_plan
        return sum(len(r.chain_rules) + len(r.nat_services) for r in plan.cache.values()) if plan else 0


class IpvsDriver(PlannerTimedDriver):
    """proxyd.modes.ipvs.IpvsMode (needs a kernel with IPVS: run it inside the QEMU guest).

    ``plan`` is ``plan_port`` + ``assemble``; the rest is diffing and kernel calls (netlink per
    virtual/real server, one iptables-restore when the ruleset text changes). ``rules``: virtual
    servers held.
    """

    def __init__(self, backend: str) -> None:
        super().__init__()
        del backend  # one back end: netlink + iptables-restore
        from proxyd.modes.ipvs.mode import IpvsMode

        self.mode = IpvsMode(Config(proxy_mode="ipvs", cluster_cidrs=("10.0.0.0/8",), node_name="bench-node"))

    async def start(self) -> None:
        from proxyd.modes.ipvs import mode as ipvs_mode

        await self.mode.start()
        # The mode module looks these up at call time: time them where they are used.
        ipvs_mode.plan_port = self.timed(ipvs_mode.plan_port)  # type: ignore[assignment]
        ipvs_mode.assemble = self.timed(ipvs_mode.assemble)  # type: ignore[assignment]

    def rules(self) -> int:
        plan = self.mode.last_plan
        return len(plan.servers) if plan else 0


class UserspaceDriver(PlannerTimedDriver):
    """proxyd.modes.userspace.UserspaceMode: addresses on ``proxyd0``, one listener per service port.

    ``rules``: listeners open. Each listener is a descriptor, so the service count is bounded by
    ``ulimit -n`` (the mode lifts its soft limit to the hard one).
    """

    def __init__(self, backend: str) -> None:
        super().__init__()
        del backend  # one way to realise it
        from proxyd.modes.userspace import UserspaceMode

        self.mode = UserspaceMode(Config(proxy_mode="userspace", node_name="bench-node"))

    async def full(self, state: ProxyState) -> dict[str, float]:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if len(state.services) > hard:
            raise SystemExit(f"userspace: {len(state.services)} listeners need as many descriptors; "
                             f"the hard limit here is {hard}")
        return await super().full(state)

    def rules(self) -> int:
        return len(self.mode.tcp_listener_keys()) + len(self.mode.udp_listeners)


DRIVERS: dict[str, Callable[[str], Driver]] = {
    "iptables": IptablesDriver,
    "ipvs": IpvsDriver,
    "userspace": UserspaceDriver,
}
def default_backend(mode: str) -> str:
    """What proxyd itself would use on this host (iptables: legacy or nft, as detected)."""
    if mode == "iptables":
        from proxyd.modes.iptables.backend import detect

        return detect().name
    return "default"


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def measure(mode: str, backend: str, services: int, endpoints: int, repeat: int) -> dict[str, Any]:
    driver = DRIVERS[mode](backend)
    await driver.start()
    state = build_state(services, endpoints)
    gc.collect()
    full = await driver.full(state)
    changed = frozenset({ServiceName("bench", "svc-0")})
    partials = []
    for gen in range(1, repeat + 1):
        partials.append(await driver.partial(_shift(state, gen), changed))
    rules = driver.rules()
    await driver.close()
    return {
        "mode": mode, "backend": backend, "services": services, "endpoints": endpoints,
        "full_s": round(full["total"], 4), "plan_full_s": round(full["plan"], 4),
        "incremental_s": round(statistics.median(p["total"] for p in partials), 4),
        "plan_incremental_s": round(statistics.median(p["plan"] for p in partials), 4),
        "incremental_max_s": round(max(p["total"] for p in partials), 4),
        "rss_mib": round(rss_mib(), 1),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rules": rules,
    }


def _shift(state: ProxyState, gen: int) -> ProxyState:
    first = ServicePortName("bench", "svc-0", "http", L4.TCP)
    eps = dict(state.endpoints)
    eps[first] = (*eps[first][:-1], Endpoint(f"10.250.{gen // 256 % 256}.{gen % 256}", 8080))
    return ProxyState(services=state.services, endpoints=eps, node_name=state.node_name)


def report(r: dict[str, Any]) -> None:
    """One point's line on stderr, as soon as it is measured (a long run shows its progress)."""
    if "error" in r:
        print(f"{r['mode']:8} {r['backend']:7} {r['services']:>6} svc  ERROR {r['error']}", file=sys.stderr,
              flush=True)
    else:
        print(f"{r['mode']:8} {r['backend']:7} {r['services']:>6} svc x {r['endpoints']} ep: "
              f"full {r['full_s']:.3f}s (plan {r['plan_full_s']:.3f}s)  incremental "
              f"{r['incremental_s'] * 1000:.1f}ms (plan {r['plan_incremental_s'] * 1000:.1f}ms)  "
              f"RSS {r['rss_mib']:.0f} MiB  rules {r['rules']}", file=sys.stderr, flush=True)


def inside(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for backend in args.backend:
        for count in args.services:
            # Each point in a fresh child so memory and rules do not carry over.
            argv = [sys.executable, __file__, "--mode", args.mode, "--services", str(count), "--endpoints",
                    str(args.endpoints), "--backend", backend, "--repeat", str(args.repeat), "--point"]
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=POINT_TIMEOUT,
                                      check=False, env={**os.environ, INSIDE_ENV: "1"})
            except subprocess.TimeoutExpired:
                results.append({"mode": args.mode, "backend": backend, "services": count,
                                "error": f"timed out after {POINT_TIMEOUT:.0f}s"})
                report(results[-1])
                asyncio.run(_cleanup(args.mode))
                break  # a bigger point would only take longer
            if proc.returncode != 0:
                results.append({"mode": args.mode, "backend": backend, "services": count,
                                "error": proc.stderr.strip()[-400:]})
                report(results[-1])
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            report(results[-1])
            # Leave the namespace clean for the next point.
            asyncio.run(_cleanup(args.mode))
    return results


async def _cleanup(mode: str) -> None:
    from proxyd.modes.base import mode_class

    await mode_class(mode).cleanup(Config())


def in_netns(argv: list[str]) -> int:
    """Re-run this script inside a fresh network namespace, then delete it."""
    ns = f"pxd-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, *argv], timeout=3600,
                              check=False, env={**os.environ, INSIDE_ENV: "1"})
        return proc.returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="iptables", choices=sorted(DRIVERS))
    parser.add_argument("--services", default="1000,10000",
                        type=lambda s: [int(x) for x in s.split(",") if x])
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--backend", default=None, type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(raw)
    if not args.backend:
        args.backend = [default_backend(args.mode)]
    if os.environ.get(INSIDE_ENV) != "1":
        if os.geteuid() != 0:
            print("sync_scale: needs root (network namespaces)", file=sys.stderr)
            return 2
        # Detected here, on the host: the namespace's own tables are empty.
        return in_netns([*raw, "--backend", ",".join(args.backend)] if "--backend" not in raw else raw)
    if args.point:
        result = asyncio.run(measure(args.mode, args.backend[0], args.services[0], args.endpoints,
                                     args.repeat))
        print(json.dumps(result))
        return 0
    results = inside(args)
    if args.json:
        out: dict[str, Any] = dict(results[0]) if len(results) == 1 else {"points": results}
        print(json.dumps(out))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
