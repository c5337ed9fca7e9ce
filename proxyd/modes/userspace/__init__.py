"""Userspace proxy mode: proxyd itself accepts every service connection and relays it to an endpoint.

The node owns every service address (ClusterIPs, externalIPs, LB ingress
IPs) as host addresses on the port-less bridge ``proxyd0``
(``addresses.py``), and proxyd listens on each service ``ip:port`` and on
each NodePort of the node addresses allowed by ``--nodeport-addresses``
(``listeners.py``). TCP is relayed with splice(2) by the native engine's
worker threads (``engine.py``, ``native/engine.pyx``), or by its pure-Python
twin (``tcp.py``, ``pump.py``) when the extension is missing or
``PROXYD_NO_EXTENSIONS=1``; UDP per client flow (``udp.py``); endpoints are
chosen by round robin and ClientIP affinity (the engine's C table for TCP,
the connection table otherwise) among the sets ``proxyd.policy`` allows
(``planner.py``).

A sync re-plans the changed services, then applies the difference in an
order that never leaves a listener without its address: add new
addresses, open new listeners, install endpoint lists, close removed
listeners, remove old addresses. Closing a listener or changing endpoints
never touches established connections. A listener that cannot be opened
(port taken by another program) is logged once and retried at every sync;
it does not fail the sync, like kube-proxy userspace's per-port errors.

Shutdown (SIGTERM): listeners close at once (new connections are refused),
open connections get ``SHUTDOWN_GRACE`` seconds to finish and are then
reset. The service addresses stay on ``proxyd0``: a stopped proxyd then
refuses connections to services at once (RST from the node's own stack)
instead of letting them hang or leak elsewhere, and the next start adopts
the addresses without a gap — the same choice kube-proxy userspace made by
leaving its iptables rules in place. ``--cleanup`` deletes ``proxyd0`` and
with it every address.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from proxyd import metrics, nodeaddrs
from proxyd.config import Config
from proxyd.conntable import NATIVE, ConnTable
from proxyd.model import Protocol
from proxyd.modes.base import ProxyMode, SyncRequest
from proxyd.modes.userspace.addresses import AddressHolder
from proxyd.modes.userspace.engine import NATIVE as ENGINE_NATIVE
from proxyd.modes.userspace.engine import NativeTcpPath, PyTcpPath, TcpPath, default_workers
from proxyd.modes.userspace.listeners import SourceFilter, open_socket
from proxyd.modes.userspace.planner import (
    ListenerKey,
    Plan,
    Planner,
    TableEntry,
    TableKey,
    nodeport_listen_ips,
)
from proxyd.modes.userspace.stats import FLUSH_INTERVAL, Stats, StatsCache
from proxyd.modes.userspace.udp import UdpListener, UdpProxy

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0
AFFINITY_SWEEP_INTERVAL = 60.0

__all__ = ["UserspaceMode"]


def _raise_fd_limit() -> int:
    """Lift the soft descriptor limit to the hard one: every connection costs two sockets and two pipes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class UserspaceMode(ProxyMode):
    name = "userspace"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.holder = AddressHolder()
        self.planner = Planner()
        self.stats = StatsCache()
        self.table: Any = None
        self.tcp: TcpPath | None = None
        self.udp: UdpProxy | None = None
        self.udp_listeners: dict[ListenerKey, UdpListener] = {}
        self.tables: dict[TableKey, TableEntry] = {}
        self._bind_errors: dict[ListenerKey, str] = {}
        self._conflicts: set[str] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._flusher: asyncio.TimerHandle | None = None
        self._started = False

    def _stats_of(self, key: TableKey) -> Stats:
        return self.stats.get(key.name)

    async def start(self) -> None:
        if self._started:
            return
        loop = asyncio.get_running_loop()
        limit = _raise_fd_limit()
        # Each UDP flow holds a socket; keep flows well inside the descriptor budget.
        max_flows = max(64, min(65536, limit // 4))
        self.table = ConnTable(max_udp_flows=max_flows)
        metrics.CONNTABLE_IMPLEMENTATION.set(1 if NATIVE else 0)
        log.info("userspace: connection table: %s", "native (Cython extension)" if NATIVE
                 else "pure-Python twin")
        if ENGINE_NATIVE:
            workers = self.config.userspace_workers or default_workers()
            self.tcp = NativeTcpPath(workers=workers, stats_of=self._stats_of, fd_limit=limit,
                                     other_fds=self._udp_fds)
            log.info("userspace: TCP data path: native engine, %d worker threads", workers)
            metrics.USERSPACE_ENGINE_NATIVE.set(1)
        else:
            self.tcp = PyTcpPath(loop=loop, table=self.table, stats_of=self._stats_of, fd_limit=limit,
                                 other_fds=self._udp_fds)
            log.info("userspace: TCP data path: pure-Python twin (asyncio)")
            metrics.USERSPACE_ENGINE_NATIVE.set(0)
        self.udp = UdpProxy(loop=loop, table=self.table, stats_of=self._stats_of,
                            idle_timeout=self.config.udp_idle_timeout)
        await self.holder.ensure()
        self._sweeper = loop.call_later(AFFINITY_SWEEP_INTERVAL, self._sweep_affinity)
        self._flusher = loop.call_later(FLUSH_INTERVAL, self._flush_stats)
        metrics.BEFORE_RENDER.append(self._flush_counts)
        self._started = True

    def _flush_counts(self) -> None:
        assert self.tcp is not None
        self.tcp.flush()
        self.stats.flush()

    def _flush_stats(self) -> None:
        self._flush_counts()
        self._flusher = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._flush_stats)

    def _udp_fds(self) -> int:
        return len(self.udp_listeners) + (self.table.udp_count() if self.table is not None else 0)

    def _sweep_affinity(self) -> None:
        assert self.table is not None and self.tcp is not None
        now = time.monotonic()
        self.table.sweep(now)
        self.tcp.sweep(now)
        self._sweeper = asyncio.get_running_loop().call_later(AFFINITY_SWEEP_INTERVAL, self._sweep_affinity)

    async def _nodeport_ips(self) -> list[str]:
        cidrs = self.config.nodeport_addresses
        if not cidrs:
            return nodeport_listen_ips(cidrs, [])
        return nodeport_listen_ips(cidrs, await nodeaddrs.node_addresses_async(cidrs))

    async def sync(self, request: SyncRequest) -> None:
        if not self._started:
            await self.start()
        nodeport_ips = await self._nodeport_ips()
        plan = self.planner.plan(request.state, changed=request.changed, nodeport_ips=nodeport_ips)
        for text in plan.conflicts:
            if text not in self._conflicts:
                log.warning("userspace: %s; not serving it twice", text)
        self._conflicts = set(plan.conflicts)

        if request.changed is None:
            await self.holder.ensure()  # full sync: re-read what the kernel really holds
        else:
            await self.holder.check()
        # New addresses first, so new listeners have them; old ones go last.
        await self.holder.apply(self.holder.current | plan.addresses)
        self._update_tables(plan)
        self._update_listeners(plan)
        self._remove_tables(plan)
        await self.holder.apply(plan.addresses)

    def _update_tables(self, plan: Plan) -> None:
        assert self.table is not None and self.udp is not None and self.tcp is not None
        now = time.monotonic()
        for key, entry in plan.tables.items():
            if self.tables.get(key) == entry:
                continue
            if key.name.protocol == Protocol.TCP:
                self.tcp.set_endpoints(key, entry, now)
            else:
                dropped = self.table.set_endpoints(key.id, entry.endpoints, entry.affinity_timeout, now)
                self.udp.closed_by_table(dropped)
            self.tables[key] = entry

    def _remove_tables(self, plan: Plan) -> None:
        assert self.table is not None and self.udp is not None and self.tcp is not None
        for key in [k for k in self.tables if k not in plan.tables]:
            if key.name.protocol == Protocol.TCP:
                self.tcp.remove_service(key)
            else:
                self.udp.closed_by_table(self.table.remove_service(key.id))
            del self.tables[key]

    def _update_listeners(self, plan: Plan) -> None:
        assert self.tcp is not None and self.udp is not None
        tcp = self.tcp
        for key in [k for k in self.udp_listeners if k not in plan.listeners]:
            self.udp_listeners.pop(key).close()
        for key in [k for k in self.tcp_listener_keys() if k not in plan.listeners]:
            tcp.remove_listener(key)
        for key, table_key in plan.listeners.items():
            if key.protocol == Protocol.TCP and tcp.has_listener(key):
                tcp.update_listener(key, table_key, plan.source_ranges.get(key))
                continue
            listener = self.udp_listeners.get(key)
            if listener is not None:
                if listener.key != table_key:
                    listener.retarget(table_key)
                continue
            if key.protocol not in (Protocol.TCP, Protocol.UDP):
                self._bind_failed(key, "userspace mode serves only TCP and UDP")
                continue
            try:
                sock = open_socket(key)
            except OSError as err:
                self._bind_failed(key, err.strerror or str(err))
                continue
            self._bind_errors.pop(key, None)
            if key.protocol == Protocol.TCP:
                tcp.add_listener(key, sock, table_key, plan.source_ranges.get(key))
            else:
                self.udp_listeners[key] = UdpListener(proxy=self.udp, sock=sock, key=table_key)
        for key in [k for k in self._bind_errors if k not in plan.listeners]:
            del self._bind_errors[key]
        for key, listener in self.udp_listeners.items():
            ranges = plan.source_ranges.get(key)
            have = listener.admits.ranges if isinstance(listener.admits, SourceFilter) else None
            if ranges != have:
                listener.admits = SourceFilter(ranges) if ranges else None

    def tcp_listener_keys(self) -> list[ListenerKey]:
        """The TCP listeners open now."""
        assert self.tcp is not None
        return self.tcp.listener_keys()

    def _bind_failed(self, key: ListenerKey, why: str) -> None:
        if self._bind_errors.get(key) != why:
            log.error("userspace: cannot listen on %s: %s (retried at every sync)", key, why)
        self._bind_errors[key] = why

    async def shutdown(self) -> None:
        if not self._started:
            return
        for listener in self.udp_listeners.values():
            listener.close()
        self.udp_listeners.clear()
        for timer in (self._sweeper, self._flusher):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._flusher = None
        assert self.tcp is not None and self.udp is not None
        self.udp.close()
        reset = await self.tcp.drain(SHUTDOWN_GRACE)  # closes the TCP listeners at once
        self.stats.flush()
        if self._flush_counts in metrics.BEFORE_RENDER:
            metrics.BEFORE_RENDER.remove(self._flush_counts)
        if reset:
            log.info("userspace: reset %d connections still open after %.0fs", reset, SHUTDOWN_GRACE)
        self.holder.close()
        self._started = False

    @classmethod
    async def cleanup(cls, config: Config) -> None:
        """Delete ``proxyd0`` and every service address on it; the rest lives and dies with the process."""
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(None, AddressHolder.delete_device):
            log.info("userspace: deleted %s", "proxyd0")

