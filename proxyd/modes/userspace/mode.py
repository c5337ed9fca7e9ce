"""Userspace mode's mode class: proxyd itself accepts every service connection and relays it to an endpoint.

The node owns every service address (ClusterIPs, externalIPs, LB ingress
IPs) as ``local`` routes via the port-less bridge ``proxyd0``
(``addresses.py``), and proxyd listens on each service ``ip:port`` and on
each NodePort of the node addresses allowed by ``--nodeport-addresses``
(``listeners.py``); ``applier.py`` holds both. TCP is relayed with splice(2)
by the native engine's worker threads (``engine.py``, ``native/engine.pyx``),
or by its pure-Python twin (``tcp.py``, ``pump.py``) when the extension is
missing or ``PROXYD_NO_EXTENSIONS=1``; UDP per client flow by the engine's
UDP thread (``udp_engine.py``, ``native/engine_udp.h``) or its twin
(``udp.py``); endpoints are chosen by round robin and ClientIP affinity (the
engine's C table with the engine, the connection table otherwise) among the
sets ``proxyd.policy`` allows (``planner.py``).

A sync re-plans the changed service ports (the tracker's index), then
applies the difference: add new addresses (a full sync does this in the
netlink thread while the listeners open: they bind with IP_FREEBIND, and
no packet reaches a listener before its address exists), open new
listeners, install endpoint lists, close removed listeners, remove old
addresses (only after their listeners closed). Closing a listener or changing endpoints
never touches established connections. A listener that cannot be opened
(port taken by another program, no NET_BIND_SERVICE) is logged once and
retried at every sync; it does not fail the sync, like kube-proxy
userspace's per-port errors, and it is named in /healthz
(``listen_failures``) and counted in ``proxyd_listen_failures``.

Descriptors: listeners, connections and UDP flows share one budget
(``TcpProxy``, ``NativeTcpPath``): listeners (one descriptor each) may take
all but a quarter of what the start-up descriptors and the control reserve
(``tcp.fd_reserve``: /healthz, /metrics, the source, netlink) leave
(``tcp.listener_cap``); ports beyond that wait in service order, are logged
when the refusals start and end and counted, and open as soon as room appears. The
data path never connects to its own listeners (``OwnListeners``), and the
desired state never holds endpoints that are proxyd's own addresses
(``proxyd.selfloop``).

Shutdown (SIGTERM): listeners close at once (new connections are refused),
open connections get ``SHUTDOWN_GRACE`` seconds to finish and are then
reset. The service routes via ``proxyd0`` stay: a stopped proxyd then
refuses connections to services at once (RST from the node's own stack)
instead of letting them hang or leak elsewhere, and the next start adopts
the addresses without a gap — the same choice kube-proxy userspace made by
leaving its iptables rules in place. ``--cleanup`` deletes ``proxyd0`` and
with it every route.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from proxyd import heap, metrics, nodeaddrs
from proxyd.config import Config
from proxyd.fdlimit import raise_fd_limit
from proxyd.introspect import ModeStatus, TracePacket, TraceResult
from proxyd.model import Protocol, ProxyState, ServicePortName
from proxyd.modes.base import ProxyMode, SyncRequest
from proxyd.modes.dualstack import node_families
from proxyd.modes.userspace.addresses import AddressHolder
from proxyd.modes.userspace.applier import Applier
from proxyd.modes.userspace.conntable import NATIVE, ConnTable
from proxyd.modes.userspace.engine import NATIVE as ENGINE_NATIVE
from proxyd.modes.userspace.engine import NativeTcpPath, PyTcpPath, TcpPath, default_workers
from proxyd.modes.userspace.planner import (
    Plan,
    Planner,
    TableEntry,
    TableKey,
    nodeport_listen_ips,
    nodeport_node_ips,
)
from proxyd.modes.userspace.stats import FLUSH_INTERVAL, Stats, StatsCache
from proxyd.modes.userspace.udp import UdpProxy
from proxyd.modes.userspace.udp_engine import NativeUdpPath, UdpPath

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0
AFFINITY_SWEEP_INTERVAL = 60.0

__all__ = ["UserspaceMode"]


def refused_ports(state: ProxyState, failed: Mapping[str, int]) -> dict[ServicePortName, str]:
    """The service ports of ``failed`` addresses (ip -> errno) -> the kernel's reason.

    Looks over every port only while some address is refused.
    """
    if not failed:
        return {}
    out: dict[ServicePortName, str] = {}
    for name, sp in state.service_ports.items():
        for ip in (*sp.cluster_ips, *sp.external_ips, *sp.load_balancer_ips):
            code = failed.get(ip)
            if code is not None:
                out.setdefault(name, f"cannot add address {ip}: {os.strerror(code)}")
    return out


class UserspaceMode(ProxyMode):
    name = "userspace"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.applier = Applier()
        self.planner = Planner()
        self.stats = StatsCache()
        self.table: Any = None
        self.tcp: TcpPath | None = None
        self.udp: UdpPath | None = None
        self.tables: dict[TableKey, TableEntry] = {}
        self._conflicts: set[str] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._flusher: asyncio.TimerHandle | None = None
        self._started = False
        self._last_plan: Plan | None = None  # for ``status``: what the last sync asked for
        # One instance serves both families (one listener set, one proxyd0): kube-proxy's per-family
        # split happens per service port in the planner. A node without IPv6 serves IPv4 only.
        self.families = node_families()

    def _stats_of(self, key: TableKey) -> Stats:
        return self.stats.get(key.name)

    async def start(self) -> None:
        if self._started:
            return
        loop = asyncio.get_running_loop()
        limit = raise_fd_limit()
        # Each UDP flow holds a socket; keep flows well inside the descriptor budget.
        max_flows = max(64, min(65536, limit // 4))
        self.table = ConnTable(max_udp_flows=max_flows)
        metrics.CONNTABLE_IMPLEMENTATION.set(1 if NATIVE else 0)
        log.info("userspace: connection table: %s", "native (Cython extension)" if NATIVE
                 else "pure-Python twin")
        tcp: TcpPath
        if ENGINE_NATIVE:
            workers = self.config.userspace_workers or default_workers()
            tcp = NativeTcpPath(workers=workers, stats_of=self._stats_of, fd_limit=limit,
                                other_fds=self._udp_fds)
            log.info("userspace: TCP data path: native engine, %d worker threads", workers)
            metrics.USERSPACE_ENGINE_NATIVE.set(1)
        else:
            tcp = PyTcpPath(loop=loop, table=self.table, stats_of=self._stats_of, fd_limit=limit,
                            other_fds=self._udp_fds)
            log.info("userspace: TCP data path: pure-Python twin (asyncio)")
            metrics.USERSPACE_ENGINE_NATIVE.set(0)
        self.tcp = tcp
        if isinstance(tcp, NativeTcpPath):
            self.udp = NativeUdpPath(tcp=tcp, stats_of=self._stats_of, max_flows=max_flows,
                                     idle_timeout=self.config.udp_idle_timeout)
        else:
            self.udp = UdpProxy(loop=loop, table=self.table, stats_of=self._stats_of,
                                idle_timeout=self.config.udp_idle_timeout, has_room=tcp.has_room)
        log.info("userspace: UDP data path: %s", "native engine (one UDP thread)" if self.udp.native
                 else "pure-Python twin (asyncio)")
        await self.applier.holder.ensure()
        self._sweeper = loop.call_later(AFFINITY_SWEEP_INTERVAL, self._sweep_affinity)
        self._flusher = loop.call_later(FLUSH_INTERVAL, self._flush_stats)
        metrics.BEFORE_RENDER.append(self._flush_counts)
        self._started = True

    def _flush_counts(self) -> None:
        assert self.tcp is not None and self.udp is not None
        self.tcp.flush()
        self.udp.flush()
        self.stats.flush()

    def _flush_stats(self) -> None:
        self._flush_counts()
        self._flusher = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._flush_stats)

    def _udp_fds(self) -> int:
        return len(self.applier.udp_listeners) + (self.udp.flow_fds() if self.udp is not None else 0)

    def _sweep_affinity(self) -> None:
        assert self.table is not None and self.tcp is not None and self.udp is not None
        now = time.monotonic()
        self.table.sweep(now)
        self.tcp.sweep(now)
        self.udp.sweep(now)
        self._sweeper = asyncio.get_running_loop().call_later(AFFINITY_SWEEP_INTERVAL, self._sweep_affinity)

    async def _nodeport_ips(self) -> tuple[list[str], list[str]]:
        """Where NodePorts listen (a family's wildcard when it is unrestricted), and the node addresses
        behind that, for every family this node serves (``--nodeport-addresses`` per family)."""
        cidrs = self.config.nodeport_addresses
        node_ips = nodeport_node_ips(cidrs, await nodeaddrs.node_addresses_async(()), self.families)
        return nodeport_listen_ips(cidrs, node_ips, self.families), node_ips

    async def sync(self, request: SyncRequest) -> None:
        if request.changed is None:
            # A full sync allocates ~a million long-lived objects (plans, tables, listeners): the
            # cyclic GC would scan the whole heap several times over while nothing becomes garbage
            # (0.3 s of a 10,000-service sync's 0.8 s of CPU). It runs again once the sync is done.
            with heap.gc_paused():
                await self._sync(request)
        else:
            await self._sync(request)
        # Service addresses the kernel refused (each fails only itself and is retried every sync):
        # their service ports are reported like any mode's quarantine.
        self.quarantine.settle(None, refused_ports(request.state, self.applier.holder.failed))

    async def _sync(self, request: SyncRequest) -> None:
        if not self._started:
            await self.start()
        nodeport_ips, node_ips = await self._nodeport_ips()
        plan = self.planner.plan(request.state, changed=request.changed, nodeport_ips=nodeport_ips,
                                 local_ips=node_ips, changed_ports=request.changed_ports,
                                 families=self.families)
        for text in plan.conflicts:
            if text not in self._conflicts:
                log.warning("userspace: %s; not serving it twice", text)
        self._conflicts = set(plan.conflicts)

        a = self.applier
        holder = a.holder
        assert self.tcp is not None and self.udp is not None
        changes = plan.changes
        if changes is None:
            await holder.ensure()  # full sync: re-read what the kernel really holds
            # New addresses are added by the netlink thread while listeners
            # open here (they bind with IP_FREEBIND, and no packet reaches a
            # listener before its address exists); old addresses go last,
            # after their listeners closed.
            adding = asyncio.ensure_future(holder.apply(holder.current | plan.addresses))
            await asyncio.sleep(0)  # let the task hand its batch to the netlink thread before we go on
            try:
                self._update_tables(plan, plan.tables)
                every = [*a.tcp_listeners, *a.udp_listeners, *a.not_open, *plan.listeners]
                a.update_listeners(plan, dict.fromkeys(every), self.tcp, self.udp)
                self._remove_tables(plan, list(self.tables))
            finally:
                await adding
            a.guard_own_listeners(plan, node_ips, self.tcp, self.udp)
            await holder.apply(plan.addresses)
            self._last_plan = plan
            return
        # Partial: only what the planner says changed (plus earlier refusals, retried).
        if await holder.check():
            retry = [ip for ip in holder.failed if ip in plan.addresses]
            await holder.update(add=[*changes.added_addresses, *retry], remove=())
        else:
            # The device was gone and is back empty: every address goes on again.
            await holder.apply(holder.current | plan.addresses)
        self._update_tables(plan, changes.tables)
        a.update_listeners(plan, [*changes.listeners, *a.bind_errors], self.tcp, self.udp)
        a.guard_own_listeners(plan, node_ips, self.tcp, self.udp)
        self._remove_tables(plan, changes.tables)
        await holder.update(add=(), remove=changes.removed_addresses)
        self._last_plan = plan

    def listen_failures(self) -> dict[str, str]:
        return self.applier.listen_failures()

    async def status(self, names: Collection[ServicePortName] | None = None) -> ModeStatus:
        """Open connections and bytes per endpoint; listeners, addresses and tables against the last sync."""
        from proxyd.modes.userspace import introspect

        return introspect.status(self, self._last_plan)

    async def trace(self, packet: TracePacket) -> TraceResult:
        """Which listener, source filter and endpoint list a new connection meets now."""
        from proxyd.modes.userspace import introspect

        local = set(await nodeaddrs.node_addresses_async(()))
        return introspect.trace(self, packet, local)

    def _update_tables(self, plan: Plan, keys: Iterable[TableKey]) -> None:
        assert self.table is not None and self.udp is not None and self.tcp is not None
        now = time.monotonic()
        for key in keys:
            entry = plan.tables.get(key)
            if entry is None or self.tables.get(key) == entry:
                continue
            if key.name.protocol == Protocol.TCP:
                self.tcp.set_endpoints(key, entry, now)
            else:
                self.udp.set_endpoints(key, entry, now)
            self.tables[key] = entry

    def _remove_tables(self, plan: Plan, keys: Iterable[TableKey]) -> None:
        assert self.table is not None and self.udp is not None and self.tcp is not None
        for key in [k for k in keys if k not in plan.tables and k in self.tables]:
            if key.name.protocol == Protocol.TCP:
                self.tcp.remove_service(key)
            else:
                self.udp.remove_service(key)
            del self.tables[key]

    async def shutdown(self) -> None:
        if not self._started:
            return
        self.applier.close_listeners()
        for timer in (self._sweeper, self._flusher):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._flusher = None
        assert self.tcp is not None and self.udp is not None
        self.udp.close()
        reset = await self.tcp.drain(SHUTDOWN_GRACE)
        self.stats.flush()
        if self._flush_counts in metrics.BEFORE_RENDER:
            metrics.BEFORE_RENDER.remove(self._flush_counts)
        if reset:
            log.info("userspace: reset %d connections still open after %.0fs", reset, SHUTDOWN_GRACE)
        self.applier.close()
        self._started = False

    @classmethod
    async def cleanup(cls, config: Config) -> None:
        """Delete ``proxyd0`` and every service route via it; the rest lives and dies with the process."""
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(None, AddressHolder.delete_device):
            log.info("userspace: deleted %s", "proxyd0")

