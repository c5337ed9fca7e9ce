"""Control-plane scale of a proxy mode: full and incremental sync time and memory.

    python -m bench.sync_scale --mode iptables --services 1000,10000 [--endpoints 10]
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

After each point the same objects go through the C tools that do the same
work, in the same run and namespace, once proxyd's own objects are removed
(``--no-compare`` skips this): userspace — ``ip -batch`` adding the full
sync's service addresses the way proxyd holds them, as ``local`` routes via
a port-less bridge (``addresses_s`` is proxyd's share of its full sync for
them, ``c_addresses_s`` the tool's, ``addresses_ratio`` the quotient;
``addresses_cpu_s``, ``c_addresses_cpu_s`` and ``addresses_cpu_ratio`` the
same in CPU seconds: proxyd's netlink thread, the tool's process);
ipvs — ``ip -batch`` (addresses), ``ipset restore`` (sets and entries),
``ipvsadm-restore`` (virtual and real servers) and ``iptables-restore``
(the same ruleset), summed as ``c_full_s`` against ``full_s``
(``full_ratio``), and ``ipvsadm -R`` of the incremental change (one
real server added, the replaced one set to weight 0; ``ipvsadm-restore``
would first flush the table) as
``c_incremental_s`` (``incremental_ratio``).

Targets (README "Benchmarks"): full ≤ 2 s and incremental ≤ 100 ms at 10,000
services (nftables: ≤ 10 ms, RSS ≤ 150 MB). ``--mode nftables`` (back ends
``library``: libnftables in process, the default; ``subprocess``: ``nft -f
-``) also loads kube-proxy's nftables ruleset shape for the same services
with ``nft -f`` in the same namespace (``bench/kube_proxy_nft.py``) and
prints the ratio. Modes are pluggable: ``DRIVERS`` maps ``--mode`` to a factory of
a ``Driver`` (async ``start``/``full``/``partial``/``close``); ``--mode
ipvs`` needs IPVS, so run it inside the QEMU guest:
``tests/vm/run-in-vm.sh --cmd 'python -m bench.sync_scale --mode ipvs --services 1000,10000 --save'``
(the runner copies the file the guest saves to ``bench/results/``).
``--profile`` prints a cProfile of each point's full sync (main thread and the
mode's kernel worker thread) on stderr.
``--save`` also writes ``bench/results/sync_scale-MODE.json`` (every point
and the run's metadata, ``bench/runmeta.py``) for ``python -m bench.docs_figures``.
Output: a table on stderr; with ``--json`` one JSON object on the last
stdout line (flat when one count and one back end,
else ``{"points": [...]}``), whose keys are exactly the figures above.

The harness (``python -m bench``) runs it through ``run_all``: one
subprocess per (service count, mode), counts in the outer loop and modes in
the inner one, so a slow mode at 30k services cannot starve the others of
their small points; once a mode overruns, its bigger points are not
started. Every point has a timeout bounded by what is left of the run's
time budget. A point that overruns is stopped the way Ctrl-C would stop it
(SIGINT to its process group, so its own cleanup deletes the namespace it
made), then killed; a namespace one of its processes was still in is
deleted afterwards. Nothing is estimated: a mode without a driver, a
failure or a timeout is reported as such.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from bench import runmeta
from proxyd import heap
from proxyd.config import Config
from proxyd.model import (
    Endpoint,
    ProxyState,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServiceType,
)
from proxyd.model import Protocol as L4
from proxyd.modes.base import SyncRequest

REPO = Path(__file__).resolve().parents[1]
# This module run as a program from the repository root (bench, netnstopo and proxyd import as they are).
COMMAND = (sys.executable, "-m", "bench.sync_scale")

INSIDE_ENV = "PROXYD_BENCH_INSIDE_NETNS"
# nftables: also load kube-proxy's nftables ruleset shape for the same services (the anchor);
# PROXYD_BENCH_NFT_ANCHOR=0 skips it (it takes minutes at 10,000 services).
ANCHOR_ENV = "PROXYD_BENCH_NFT_ANCHOR"
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
    return ProxyState(service_ports=ports, endpoints=eps, node_name="bench-node")


def _ip(first: int, n: int) -> str:
    return f"10.{first + n // 65536}.{(n // 256) % 256}.{n % 256}"


class Driver(Protocol):
    async def start(self) -> None: ...
    async def full(self, state: ProxyState) -> dict[str, float]: ...
    async def partial(self, state: ProxyState, changed: frozenset[ServiceName]) -> dict[str, float]: ...
    def rules(self) -> int: ...
    async def close(self) -> None: ...
    def c_tools(self, repeat: int) -> dict[str, float]: ...
    compares: bool


def timed_tool(argv: list[str], text: str) -> float:
    """Seconds one C tool takes to apply ``text`` (its stdin or batch file); raises when it fails."""
    t = time.perf_counter()
    proc = subprocess.run(argv, input=text, text=True, capture_output=True, timeout=POINT_TIMEOUT,
                          check=False)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()[:400]}")
    return took


def address_batch(ips: Iterable[str], device: str, verb: str = "add") -> str:
    """``ip -batch`` input adding (or deleting) host addresses on ``device``."""
    return "".join(f"addr {verb} {ip}/{128 if ':' in ip else 32} dev {device}\n" for ip in ips)


def local_route_batch(ips: Iterable[str], device: str, verb: str = "add") -> str:
    """``ip -batch`` input adding (or deleting) the ``local`` routes that hold service IPs via ``device``.

    The same routes userspace mode adds (``proxyd.netlink.local_route_request``).
    """
    return "".join(f"route {verb} local {ip}/{128 if ':' in ip else 32} dev {device} table local "
                   "proto static\n" for ip in ips)


COMPARE_DEVICE = "pxdcmp0"  # where the C tools put the same addresses, after proxyd's own are gone


class PlannerTimedDriver:
    """Drives a mode's ``sync`` and times its pure planning apart from the rest."""

    mode: Any
    compares = True  # c_tools times the same objects through the C tools

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
        t, cpu = time.perf_counter(), time.process_time()
        await self.mode.sync(request)
        return {"total": time.perf_counter() - t, "plan": self._plan_time, "cpu": time.process_time() - cpu}

    async def full(self, state: ProxyState) -> dict[str, float]:
        return await self._sync(SyncRequest(state, None))

    async def partial(self, state: ProxyState, changed: frozenset[ServiceName]) -> dict[str, float]:
        # As the daemon does: the services and the tracker's index of their changed ports.
        ports = frozenset(n for n in (BENCH_PORT,) if n.service in changed)
        return await self._sync(SyncRequest(state, changed, ports))

    async def close(self) -> None:
        await self.mode.shutdown()


class NetfilterDriver(PlannerTimedDriver):
    """A mode keeping its ``last_plan`` (iptables, nftables): a partial sync must plan partially."""

    async def partial(self, state: ProxyState, changed: frozenset[ServiceName]) -> dict[str, float]:
        out = await super().partial(state, changed)
        plan = self.mode.last_plan
        assert plan is not None and not plan.full, "partial sync was not partial"
        return out


class IptablesDriver(NetfilterDriver):
    """proxyd.modes.iptables.IptablesMode on the given back end; ``rules``: nat rules held."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        from proxyd.modes.iptables import IptablesMode
        from proxyd.netfilter.backend import Backend

        self.mode = IptablesMode(Config(cluster_cidrs=("10.0.0.0/8",)), backend=Backend(backend))

    def rules(self) -> int:
        plan = self.mode.last_plan
        return sum(r.n_chain_rules + len(r.nat_services) for r in plan.cache.values()) if plan else 0

    compares = False  # the restore tools' own figures: bench/iptables_tools.py

    def c_tools(self, repeat: int) -> dict[str, float]:
        del repeat
        return {}


class IpvsDriver(PlannerTimedDriver):
    """proxyd.modes.ipvs.IpvsMode (needs a kernel with IPVS: run it inside the QEMU guest).

    ``plan`` is ``plan_port`` + merging (``Assembly``); the rest is the diff and the kernel work
    (netlink batches for addresses, set entries, virtual and real servers; one iptables-restore
    when the ruleset text changes). ``rules``: virtual servers held.
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
        ipvs_mode.Assembly.put = self.timed(ipvs_mode.Assembly.put)  # type: ignore[method-assign]
        ipvs_mode.Assembly.plan = self.timed(ipvs_mode.Assembly.plan)  # type: ignore[method-assign]

    def rules(self) -> int:
        plan = self.mode.last_plan
        return len(plan.servers) if plan else 0

    def c_tools(self, repeat: int) -> dict[str, float]:
        """The same objects through ip -batch, ipset restore, ipvsadm-restore and iptables-restore.

        Run after proxyd's own objects were removed (``--cleanup``), on an
        empty IPVS table, as proxyd's full sync was. The incremental figure
        is the equivalent of proxyd's partial sync: one real server added and
        the one it replaces set to weight 0, through ``ipvsadm -R`` (what
        ``ipvsadm-restore`` runs after flushing the whole table).
        """
        from proxyd.modes.ipvs.planner import IPSETS

        plan = self.mode.last_plan
        rules = self.mode._rules
        assert plan is not None and rules is not None
        out: dict[str, float] = {}
        subprocess.run(["ip", "link", "add", COMPARE_DEVICE, "type", "dummy"], check=True, timeout=30)
        try:
            batch = address_batch(sorted(plan.bind), COMPARE_DEVICE)
            out["c_ip_batch_s"] = timed_tool(["ip", "-batch", "-"], batch)
            lines = []
            for info in IPSETS:
                extra = ("range 0-65535" if info.type == "bitmap:port"
                         else "family inet hashsize 1024 maxelem 65536")
                lines.append(f"create {info.name} {info.type} {extra}")
                lines.extend(f"add {info.name} {e}" for e in sorted(plan.ipsets.get(info.name, ())))
            out["c_ipset_restore_s"] = timed_tool(["ipset", "restore", "-exist"], "\n".join(lines) + "\n")
            vs_lines = []
            for key, vs in plan.servers.items():
                flag = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[key.protocol.value]
                vs_lines.append(f"-A {flag} {key.ip}:{key.port} -s {vs.scheduler}")
                vs_lines.extend(f"-a {flag} {key.ip}:{key.port} -r {d.ip}:{d.port} -m -w 1"
                                for d in plan.destinations.get(key, ()))
            out["c_ipvsadm_restore_s"] = timed_tool(["ipvsadm-restore"], "\n".join(vs_lines) + "\n")
            out["c_iptables_restore_s"] = timed_tool(["iptables-restore", "--noflush", "-w", "5"], rules)
            out["c_full_s"] = sum(out.values())
            first = next(iter(plan.servers))
            old = plan.destinations[first][-1]
            times = []
            for gen in range(1, repeat + 1):
                new = f"10.251.{gen // 256 % 256}.{gen % 256}"
                text = (f"-a -t {first.ip}:{first.port} -r {new}:{old.port} -m -w 1\n"
                        f"-e -t {first.ip}:{first.port} -r {old.ip}:{old.port} -m -w 0\n")
                # ipvsadm -R: ipvsadm-restore without the table flush its wrapper script starts with.
                times.append(timed_tool(["ipvsadm", "-R"], text))
            out["c_incremental_s"] = statistics.median(times)
        finally:
            subprocess.run(["ipvsadm", "-C"], check=False, timeout=120, capture_output=True)
            for info in IPSETS:
                subprocess.run(["ipset", "destroy", info.name], check=False, timeout=60, capture_output=True)
            subprocess.run(["ip", "link", "del", COMPARE_DEVICE], check=False, timeout=60)
        return out


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

    async def _full_checked(self, state: ProxyState) -> dict[str, float]:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if len(state.service_ports) > hard:
            raise SystemExit(f"userspace: {len(state.service_ports)} listeners need as many descriptors; "
                             f"the hard limit here is {hard}")
        return await super().full(state)

    async def start(self) -> None:
        await super().start()
        holder = self.mode.applier.holder
        apply_sync = holder._apply_sync
        self.address_s = self.address_cpu_s = 0.0

        def timed_apply(add: set[str], remove: set[str]) -> None:
            # CPU of the netlink thread too: in a full sync it runs while the main thread opens
            # listeners, and on a busy machine its wall time counts the wait for the GIL.
            t, cpu = time.perf_counter(), time.thread_time()
            try:
                apply_sync(add, remove)
            finally:
                self.address_s += time.perf_counter() - t
                self.address_cpu_s += time.thread_time() - cpu
                self.addresses = sorted(add) if add else getattr(self, "addresses", [])

        holder._apply_sync = timed_apply  # type: ignore[method-assign]

    async def full(self, state: ProxyState) -> dict[str, float]:
        self.address_s = self.address_cpu_s = 0.0
        out = await self._full_checked(state)
        out["addresses"] = self.address_s
        out["addresses_cpu"] = self.address_cpu_s
        return out

    def rules(self) -> int:
        return len(self.mode.applier.tcp_listeners) + len(self.mode.applier.udp_listeners)

    def c_tools(self, repeat: int) -> dict[str, float]:
        """The full sync's service routes through ``ip -batch`` via a fresh bridge, once proxyd's are gone."""
        del repeat
        subprocess.run(["ip", "link", "add", COMPARE_DEVICE, "type", "bridge"], check=True, timeout=30)
        try:
            subprocess.run(["ip", "link", "set", COMPARE_DEVICE, "up"], check=True, timeout=30)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            took = timed_tool(["ip", "-batch", "-"], local_route_batch(self.addresses, COMPARE_DEVICE))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        finally:
            subprocess.run(["ip", "link", "del", COMPARE_DEVICE], check=False, timeout=120)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return {"c_addresses_s": took, "c_addresses_cpu_s": cpu}


class NftablesDriver(NetfilterDriver):
    """proxyd.modes.nftables.NftablesMode through libnftables ("library") or ``nft -f -`` ("subprocess").

    ``rules``: map and set elements held (per-service state lives there, not in rules).
    """

    def __init__(self, backend: str) -> None:
        super().__init__()
        from proxyd.modes.nftables import NftablesMode
        from proxyd.modes.nftables.libnft import Nft

        self.mode = NftablesMode(Config(proxy_mode="nftables", cluster_cidrs=("10.0.0.0/8",),
                                        node_name="bench-node"),
                                 nft=Nft(None if backend == "default" else backend))

    def rules(self) -> int:
        return self.mode.planner.elements

    compares = False  # its anchor is kube-proxy's ruleset shape through nft -f (_kube_proxy_anchor)

    def c_tools(self, repeat: int) -> dict[str, float]:
        del repeat
        return {}


DRIVERS: dict[str, Callable[[str], Driver]] = {
    "iptables": IptablesDriver,
    "ipvs": IpvsDriver,
    "userspace": UserspaceDriver,
    "nftables": NftablesDriver,
}
def default_backend(mode: str) -> str:
    """What proxyd itself would use on this host (iptables: legacy or nft, as detected)."""
    if mode == "iptables":
        from proxyd.netfilter.backend import detect

        return detect().name
    if mode == "nftables":
        return "library"
    return "default"


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def measure(mode: str, backend: str, services: int, endpoints: int, repeat: int,
                  compare: bool = True, profile: bool = False) -> dict[str, Any]:
    driver = DRIVERS[mode](backend)
    await driver.start()
    state = build_state(services, endpoints)
    gc.collect()
    if profile:
        full = await _profiled(driver, state)
    else:
        full = await driver.full(state)
    changed = frozenset({ServiceName("bench", "svc-0")})
    partials = []
    for gen in range(1, repeat + 1):
        partials.append(await driver.partial(_shift(state, gen), changed))
    rules = driver.rules()
    await driver.close()
    # Memory of the mode, before the anchor (its generator holds a big string) runs.
    rss, max_rss = rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out: dict[str, Any] = {
        "mode": mode, "backend": backend, "services": services, "endpoints": endpoints,
        "full_s": round(full["total"], 4), "plan_full_s": round(full["plan"], 4),
        # CPU seconds of this process (worker threads and in-process kernel calls included; a
        # subprocess's not): on a busy machine wall time overstates the cost.
        "full_cpu_s": round(full["cpu"], 4),
        "incremental_cpu_s": round(statistics.median(p["cpu"] for p in partials), 4),
        "incremental_s": round(statistics.median(p["total"] for p in partials), 4),
        "plan_incremental_s": round(statistics.median(p["plan"] for p in partials), 4),
        "incremental_max_s": round(max(p["total"] for p in partials), 4),
        "rss_mib": round(rss, 1),
        "max_rss_mib": round(max_rss, 1),
        "rules": rules,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if "addresses" in full:
        out["addresses_s"] = round(full["addresses"], 4)
        out["addresses_cpu_s"] = round(full["addresses_cpu"], 4)
    if compare and driver.compares:
        # The same objects through the C tools, in this run, once proxyd's own are removed.
        await _cleanup(mode)
        tools = driver.c_tools(repeat)
        out.update({k: round(v, 4) for k, v in tools.items()})
        for mine, theirs, ratio in (("full_s", "c_full_s", "full_ratio"),
                                    ("incremental_s", "c_incremental_s", "incremental_ratio"),
                                    ("addresses_s", "c_addresses_s", "addresses_ratio"),
                                    ("addresses_cpu_s", "c_addresses_cpu_s", "addresses_cpu_ratio")):
            if mine in out and out.get(theirs):
                out[ratio] = round(out[mine] / out[theirs], 2)
    if mode == "nftables" and os.environ.get(ANCHOR_ENV, "1") == "1":
        del driver
        await _cleanup(mode)
        out.update(_kube_proxy_anchor(state, full["total"]))
    return out


BENCH_PORT = ServicePortName("bench", "svc-0", "http", L4.TCP)  # the port the incremental syncs change


async def _profiled(driver: Driver, state: ProxyState) -> dict[str, float]:
    """The full sync under cProfile, then the top functions on stderr (times inflated by the profiler).

    The main thread (planning, diff) and, for a mode with an ``applier`` running kernel work on its
    worker thread (ipvs), that thread too: cProfile sees only the thread that enables it.
    """
    import cProfile
    import io
    import pstats

    main, worker = cProfile.Profile(), cProfile.Profile()
    applier = getattr(getattr(driver, "mode", None), "applier", None)
    call = getattr(applier, "call", None)
    if call is not None:
        async def profiled_call(func: Callable[..., Any], *args: Any) -> Any:
            def run() -> Any:
                worker.enable()
                try:
                    return func(*args)
                finally:
                    worker.disable()
            return await call(run)
        applier.call = profiled_call  # type: ignore[union-attr]
    main.enable()
    try:
        return await driver.full(state)
    finally:
        main.disable()
        if call is not None:
            applier.call = call  # type: ignore[union-attr]
        text = io.StringIO()
        stats = pstats.Stats(main, stream=text)
        with contextlib.suppress(TypeError):  # a worker that never ran has no stats
            stats.add(worker)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(25)
        print(text.getvalue(), file=sys.stderr, flush=True)


def _kube_proxy_anchor(state: ProxyState, full_s: float) -> dict[str, Any]:
    """Load kube-proxy's nftables shape for ``state`` with ``nft -f`` here; its time and our ratio."""
    from bench.kube_proxy_nft import TABLE, ruleset

    text = ruleset(state)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True,
                          timeout=POINT_TIMEOUT, check=False)
    elapsed = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    subprocess.run(["nft", "delete", "table", *TABLE.split()], capture_output=True, timeout=POINT_TIMEOUT,
                   check=False)
    if proc.returncode != 0:
        return {"kube_proxy_nft_error": proc.stderr.strip()[-300:]}
    return {"kube_proxy_nft_load_s": round(elapsed, 3), "kube_proxy_nft_load_cpu_s": round(cpu, 3),
            "kube_proxy_nft_ratio": round(elapsed / full_s, 1) if full_s > 0 else None}


def _shift(state: ProxyState, gen: int) -> ProxyState:
    first = BENCH_PORT
    eps = dict(state.endpoints)
    eps[first] = (*eps[first][:-1], Endpoint(f"10.250.{gen // 256 % 256}.{gen % 256}", 8080))
    return ProxyState(service_ports=state.service_ports, endpoints=eps, node_name=state.node_name)


def report(r: dict[str, Any]) -> None:
    """One point's line on stderr, as soon as it is measured (a long run shows its progress)."""
    if "error" in r:
        print(f"{r['mode']:8} {r['backend']:7} {r['services']:>6} svc  ERROR {r['error']}", file=sys.stderr,
              flush=True)
    else:
        print(f"{r['mode']:8} {r['backend']:7} {r['services']:>6} svc x {r['endpoints']} ep: "
              f"full {r['full_s']:.3f}s (plan {r['plan_full_s']:.3f}s)  incremental "
              f"{r['incremental_s'] * 1000:.1f}ms (plan {r['plan_incremental_s'] * 1000:.1f}ms)  "
              f"CPU full {r.get('full_cpu_s', 0):.3f}s "
              f"incremental {r.get('incremental_cpu_s', 0) * 1000:.1f}ms  "
              f"RSS {r['rss_mib']:.0f} MiB  rules {r['rules']}", file=sys.stderr, flush=True)
        if "c_addresses_s" in r:
            print(f"{'':8} {'':7} {'':>6}     addresses: proxyd {r['addresses_s']:.3f}s, ip -batch "
                  f"{r['c_addresses_s']:.3f}s (ratio {r.get('addresses_ratio', float('nan')):.2f}); "
                  f"CPU proxyd {r.get('addresses_cpu_s', float('nan')):.3f}s, ip -batch "
                  f"{r.get('c_addresses_cpu_s', float('nan')):.3f}s "
                  f"(ratio {r.get('addresses_cpu_ratio', float('nan')):.2f})", file=sys.stderr, flush=True)
        if "c_full_s" in r:
            print(f"{'':8} {'':7} {'':>6}     C tools: full {r['c_full_s']:.3f}s (ip -batch "
                  f"{r['c_ip_batch_s']:.3f}, ipset restore {r['c_ipset_restore_s']:.3f}, ipvsadm-restore "
                  f"{r['c_ipvsadm_restore_s']:.3f}, iptables-restore {r['c_iptables_restore_s']:.3f}) ratio "
                  f"{r.get('full_ratio', float('nan')):.2f}; incremental {r['c_incremental_s'] * 1000:.1f}ms "
                  f"ratio {r.get('incremental_ratio', float('nan')):.2f}", file=sys.stderr, flush=True)
        if "kube_proxy_nft_load_s" in r:
            print(f"{'':8} {'':7} {r['services']:>6} svc: kube-proxy's nftables shape loads with nft -f in "
                  f"{r['kube_proxy_nft_load_s']:.2f}s (CPU {r['kube_proxy_nft_load_cpu_s']:.2f}s) = "
                  f"{r['kube_proxy_nft_ratio']}x proxyd's full sync",
                  file=sys.stderr, flush=True)
        elif "kube_proxy_nft_error" in r:
            print(f"  kube-proxy anchor failed: {r['kube_proxy_nft_error']}", file=sys.stderr, flush=True)


def inside(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for backend in args.backend:
        for count in args.services:
            # Each point in a fresh child so memory and rules do not carry over.
            argv = [*COMMAND, "--mode", args.mode, "--services", str(count), "--endpoints",
                    str(args.endpoints), "--backend", backend, "--repeat", str(args.repeat), "--point",
                    *(["--no-compare"] if args.no_compare else []),
                    *(["--profile"] if args.profile else [])]
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=POINT_TIMEOUT,
                                      check=False, cwd=REPO, env={**os.environ, INSIDE_ENV: "1"})
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
            if args.profile:
                print(proc.stderr, file=sys.stderr, flush=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            report(results[-1])
            # Leave the namespace clean for the next point.
            asyncio.run(_cleanup(args.mode))
    return results


async def _cleanup(mode: str) -> None:
    from proxyd.modes.base import mode_class

    await mode_class(mode).cleanup(Config())


def in_netns(argv: list[str], command: Sequence[str] = COMMAND) -> int:
    """Re-run ``command`` (this script) inside a fresh network namespace, then delete it."""
    ns = f"pxd-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        proc = subprocess.run(["ip", "netns", "exec", ns, *command, *argv], timeout=3600,
                              check=False, cwd=REPO, env={**os.environ, INSIDE_ENV: "1"})
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
    parser.add_argument("--save", action="store_true",
                        help="also write bench/results/sync_scale-MODE.json with the run's metadata")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the C tools (userspace: ip -batch; ipvs: ip -batch, ipset restore, "
                             "ipvsadm-restore, iptables-restore) that time the same objects after each point")
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of each point's full sync on stderr (its times are inflated)")
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
        heap.bound_malloc()  # the allocator as the daemon sets it at start (proxyd.daemon.run)
        result = asyncio.run(measure(args.mode, args.backend[0], args.services[0], args.endpoints,
                                     args.repeat, compare=not args.no_compare, profile=args.profile))
        print(json.dumps(result))
        return 0
    run = runmeta.Run(runmeta.module_command("bench.sync_scale", raw))
    results = inside(args)
    if args.save:
        path = run.save(f"sync_scale-{args.mode}", {"mode": args.mode, "points": results})
        print(f"saved {path}", file=sys.stderr)
    if args.json:
        out: dict[str, Any] = dict(results[0]) if len(results) == 1 else {"points": results}
        print(json.dumps(out))
    return 0 if all("error" not in r for r in results) else 1


# -- the harness side: one subprocess per point, within a time budget ------------------------------

POINT_CAP = {1000: 90.0, 10000: 180.0, 30000: 240.0}
DEFAULT_CAP = 240.0
MIN_POINT_TIME = 10.0


def last_json_object(text: str) -> dict[str, Any] | None:
    """The whole output as one JSON object, else the last line that is one."""
    text = text.strip()
    for candidate in (text, *reversed(text.splitlines())):
        candidate = candidate.strip()
        if not candidate.startswith("{"):
            continue
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def extract(data: Mapping[str, Any], services: int) -> dict[str, Any]:
    """A point {services, backend, full_s, incremental_s, rss_mib, raw} from one result object."""
    point: dict[str, Any] = {
        "services": services, "backend": str(data.get("backend", "")),
        "full_s": _number(data.get("full_s")), "incremental_s": _number(data.get("incremental_s")),
        "rss_mib": _number(data.get("rss_mib")), "raw": dict(data),
    }
    if data.get("error"):
        point["error"] = str(data["error"])[-300:]
    elif point["full_s"] is None and point["incremental_s"] is None:
        point["error"] = f"no full_s or incremental_s in the output (keys: {', '.join(sorted(data))[:200]})"
    return point


def points_from(data: Mapping[str, Any], services: int) -> list[dict[str, Any]]:
    """Every point of one run's output, flat or ``{"points": [...]}``."""
    raw = data.get("points")
    if isinstance(raw, list):
        return [extract(p, services) for p in raw if isinstance(p, Mapping)] or \
            [{"services": services, "error": "empty points list"}]
    return [extract(data, services)]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo and len(out) < 10_000:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _namespaces_of(pids: Sequence[int]) -> set[str]:
    names: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            got = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True,
                                 timeout=5, check=False)
            names.update(n for n in got.stdout.split() if n.startswith("pxd-"))
    return names


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGINT the point's process group (its cleanup runs), then SIGKILL; delete namespaces it left."""
    leftovers = _namespaces_of([proc.pid, *_descendants(proc.pid)])
    for sig, wait in ((signal.SIGINT, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.communicate(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    for name in leftovers:
        if Path(f"/run/netns/{name}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)


def run_point(*, mode: str, services: int, timeout: float,
              command: Sequence[str] = COMMAND) -> list[dict[str, Any]]:
    """One (mode, service count) point as a subprocess of ``command``; its points or the failure."""
    argv = [*command, "--mode", mode, "--services", str(services), "--json"]
    # --mode nftables also loads kube-proxy's ruleset shape (minutes at 10,000 services); the
    # full bench has a time budget and reports proxyd's figures only.
    env = {**os.environ, ANCHOR_ENV: os.environ.get(ANCHOR_ENV, "0")}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=REPO, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        return [{"services": services, "error": f"timed out after {timeout:.0f}s"}]
    except BaseException:
        _stop(proc)
        raise
    data = last_json_object(out)
    if data is None:
        detail = (err.strip() or out.strip())[-300:]
        return [{"services": services, "error": f"sync_scale exited {proc.returncode}: {detail}"}]
    return points_from(data, services)


def run_all(*, modes: Sequence[str], services: Sequence[int], skipped: Mapping[str, str],
            deadline: float, log: Callable[[str], None],
            command: Sequence[str] = COMMAND) -> dict[str, Any]:
    """{mode: {"points"} or {"skipped"}}; no point starts after ``deadline`` (monotonic)."""
    out: dict[str, Any] = {}
    running: list[str] = []
    for mode in modes:
        if f"proxyd-{mode}" in skipped:
            out[mode] = {"skipped": skipped[f"proxyd-{mode}"]}
        elif mode not in DRIVERS:
            out[mode] = {"skipped": f"bench/sync_scale.py has no driver for mode {mode}"}
        else:
            running.append(mode)
            out[mode] = {"points": []}
    timed_out: dict[str, int] = {}
    for count in services:
        for mode in running:
            if mode in timed_out:
                # A bigger point of a mode that already overran would only burn the budget of the others.
                why = f"not run: {timed_out[mode]} services already timed out"
                out[mode]["points"].append({"services": count, "error": why})
                continue
            left = deadline - time.monotonic()
            if left < MIN_POINT_TIME:
                out[mode]["points"].append({"services": count, "error": "not run: time budget exhausted"})
                continue
            timeout = min(POINT_CAP.get(count, DEFAULT_CAP), left)
            log(f"sync scale: {mode} at {count} services (timeout {timeout:.0f}s)")
            points = run_point(mode=mode, services=count, timeout=timeout, command=command)
            out[mode]["points"] += points
            if any(str(p.get("error", "")).startswith("timed out") for p in points):
                timed_out[mode] = count
    return out


if __name__ == "__main__":
    sys.exit(main())
