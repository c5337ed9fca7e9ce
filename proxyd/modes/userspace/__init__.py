"""Userspace proxy mode: proxyd itself accepts every service connection and relays it to an endpoint.

The node owns every service address (ClusterIPs, externalIPs, LB ingress
IPs) as host addresses on the port-less bridge ``proxyd0``
(``addresses.py``), and proxyd listens on each service ``ip:port`` and on
each NodePort of the node addresses allowed by ``--nodeport-addresses``
(``listeners.py``). TCP is relayed with splice(2) (``tcp.py``, ``pump.py``),
UDP per client flow (``udp.py``); endpoints are chosen by the connection
table (round robin, ClientIP affinity) among the sets ``proxyd.policy``
allows (``planner.py``).

A sync re-plans the changed services, then applies the difference in an
order that never leaves a listener without its address: add new
addresses, open new listeners, install endpoint lists, close removed
listeners, remove old addresses. Closing a listener or changing endpoints
never touches established connections. A listener that cannot be opened
(port taken by another program, no NET_BIND_SERVICE) is logged once and
retried at every sync; it does not fail the sync, like kube-proxy
userspace's per-port errors, and it is named in /healthz
(``listen_failures``) and counted in ``proxyd_listen_failures``.

Descriptors: listeners, connections and UDP flows share one budget
(``TcpProxy``): listeners get at most half of what the start-up
descriptors and the control reserve (``tcp.fd_reserve``: /healthz,
/metrics, the source, netlink) leave; ports beyond that are refused with
one log line per change and counted, and open as soon as room appears. The
data path never connects to its own listeners (``OwnListeners``), and the
desired state never holds endpoints that are proxyd's own addresses
(``proxyd.selfloop``).

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
import errno
import logging
import resource
import time
from collections import Counter
from collections.abc import Collection
from typing import Any

from proxyd import metrics, nodeaddrs
from proxyd.config import Config
from proxyd.conntable import NATIVE, ConnTable
from proxyd.introspect import ModeStatus, TracePacket, TraceResult
from proxyd.logformat import event
from proxyd.model import Protocol, ServicePortName
from proxyd.modes.base import ProxyMode, SyncRequest
from proxyd.modes.userspace.addresses import AddressHolder
from proxyd.modes.userspace.listeners import OwnListeners, SourceFilter, nonlocal_bind, open_socket
from proxyd.modes.userspace.planner import (
    ListenerKey,
    Plan,
    Planner,
    TableEntry,
    TableKey,
    nodeport_listen_ips,
)
from proxyd.modes.userspace.stats import FLUSH_INTERVAL, Stats, StatsCache
from proxyd.modes.userspace.tcp import TcpListener, TcpProxy
from proxyd.modes.userspace.udp import UdpListener, UdpProxy

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0
AFFINITY_SWEEP_INTERVAL = 60.0

BUDGET_REFUSAL = "no room in the descriptor budget"

__all__ = ["UserspaceMode"]


def _reason(err: OSError) -> str:
    """The ``proxyd_listen_failures`` reason of a failed bind or listen."""
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission"
    if err.errno == errno.EADDRINUSE:
        return "address_in_use"
    if err.errno in (errno.EMFILE, errno.ENFILE):
        return "descriptors"
    return "other"


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
        self.tcp: TcpProxy | None = None
        self.udp: UdpProxy | None = None
        self.tcp_listeners: dict[ListenerKey, TcpListener] = {}
        self.udp_listeners: dict[ListenerKey, UdpListener] = {}
        self.tables: dict[TableKey, TableEntry] = {}
        self._bind_errors: dict[ListenerKey, tuple[str, str]] = {}  # key -> (metric reason, text)
        self._over_budget = 0
        self._failure_reasons: set[str] = set()
        self._conflicts: set[str] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._flusher: asyncio.TimerHandle | None = None
        self._started = False
        self._last_plan: Plan | None = None  # for ``status``: what the last sync asked for

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
        self.tcp = TcpProxy(loop=loop, table=self.table, stats_of=self._stats_of, fd_limit=limit,
                            other_fds=self._udp_fds)
        self.udp = UdpProxy(loop=loop, table=self.table, stats_of=self._stats_of,
                            idle_timeout=self.config.udp_idle_timeout, has_room=self.tcp.has_room)
        await self.holder.ensure()
        self._sweeper = loop.call_later(AFFINITY_SWEEP_INTERVAL, self._sweep_affinity)
        self._flusher = loop.call_later(FLUSH_INTERVAL, self._flush_stats)
        self._started = True

    def _flush_stats(self) -> None:
        self.stats.flush()
        self._flusher = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._flush_stats)

    def _udp_fds(self) -> int:
        return len(self.udp_listeners) + (self.table.udp_count() if self.table is not None else 0)

    def _sweep_affinity(self) -> None:
        assert self.table is not None
        self.table.sweep(time.monotonic())
        self._sweeper = asyncio.get_running_loop().call_later(AFFINITY_SWEEP_INTERVAL, self._sweep_affinity)

    async def _nodeport_ips(self) -> tuple[list[str], list[str]]:
        """Where NodePorts listen (a wildcard when unrestricted), and the node addresses behind that."""
        cidrs = self.config.nodeport_addresses
        node_ips = await nodeaddrs.node_addresses_async(cidrs)
        return nodeport_listen_ips(cidrs, node_ips), node_ips

    async def sync(self, request: SyncRequest) -> None:
        if not self._started:
            await self.start()
        nodeport_ips, node_ips = await self._nodeport_ips()
        plan = self.planner.plan(request.state, changed=request.changed, nodeport_ips=nodeport_ips,
                                 local_ips=node_ips)
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
        assert self.tcp is not None and self.udp is not None
        local = [*node_ips, *self.holder.current, *plan.addresses]
        loose = nonlocal_bind()
        self.tcp.own = OwnListeners(list(self.tcp_listeners), local, nonlocal_bind=loose)
        self.udp.own = OwnListeners(list(self.udp_listeners), local, nonlocal_bind=loose)
        self._remove_tables(plan)
        await self.holder.apply(plan.addresses)
        self._last_plan = plan

    def _update_tables(self, plan: Plan) -> None:
        assert self.table is not None and self.udp is not None
        now = time.monotonic()
        for key, entry in plan.tables.items():
            if self.tables.get(key) == entry:
                continue
            dropped = self.table.set_endpoints(key.id, entry.endpoints, entry.affinity_timeout, now)
            self.udp.closed_by_table(dropped)
            self.tables[key] = entry

    def _remove_tables(self, plan: Plan) -> None:
        assert self.table is not None and self.udp is not None
        for key in [k for k in self.tables if k not in plan.tables]:
            self.udp.closed_by_table(self.table.remove_service(key.id))
            del self.tables[key]

    def _update_listeners(self, plan: Plan) -> None:
        assert self.tcp is not None and self.udp is not None
        for current in (self.tcp_listeners, self.udp_listeners):
            for key in [k for k in current if k not in plan.listeners]:
                current.pop(key).close()
        # Listeners share the descriptor budget with connections; /healthz, /metrics, the source and
        # netlink keep a reserve neither may take. Ports that do not fit wait for room (next syncs).
        room = self.tcp.listener_room(len(self.tcp_listeners) + len(self.udp_listeners))
        over: list[ListenerKey] = []
        for key, table_key in plan.listeners.items():
            current = self.tcp_listeners if key.protocol == Protocol.TCP else self.udp_listeners
            listener = current.get(key)
            if listener is not None:
                if listener.key != table_key:
                    listener.retarget(table_key)
                continue
            if key.protocol not in (Protocol.TCP, Protocol.UDP):
                self._bind_failed(key, "userspace mode serves only TCP and UDP", "protocol")
                continue
            if room <= 0:
                over.append(key)
                self._bind_errors[key] = ("descriptors", BUDGET_REFUSAL)
                continue
            try:
                sock = open_socket(key)
            except OSError as err:
                self._bind_failed(key, err.strerror or str(err), _reason(err))
                continue
            room -= 1
            self._bind_errors.pop(key, None)
            if key.protocol == Protocol.TCP:
                self.tcp_listeners[key] = TcpListener(proxy=self.tcp, sock=sock, key=table_key)
            else:
                self.udp_listeners[key] = UdpListener(proxy=self.udp, sock=sock, key=table_key)
        for key in [k for k in self._bind_errors if k not in plan.listeners]:
            del self._bind_errors[key]
        if len(over) != self._over_budget:
            if over:
                log.error("userspace: descriptor budget (limit %d) full: %d listeners not opened (first %s); "
                          "retried at every sync", self.tcp.fd_limit, len(over), over[0])
            elif self._over_budget:
                log.info("userspace: every listener fits the descriptor budget again")
            self._over_budget = len(over)
        reasons = Counter(reason for reason, _ in self._bind_errors.values())
        for reason in {*reasons, *self._failure_reasons}:
            metrics.LISTEN_FAILURES.labels(reason).set(reasons.get(reason, 0))
        self._failure_reasons = set(reasons)
        for current in (self.tcp_listeners, self.udp_listeners):
            for key, listener in current.items():
                ranges = plan.source_ranges.get(key)
                have = listener.admits.ranges if isinstance(listener.admits, SourceFilter) else None
                if ranges != have:
                    listener.admits = SourceFilter(ranges) if ranges else None

    def _bind_failed(self, key: ListenerKey, why: str, reason: str) -> None:
        if self._bind_errors.get(key) != (reason, why):
            log.error("userspace: cannot listen on %s: %s (retried at every sync)", key, why,
                      extra=event(service=self._listener_owner(key), endpoint=key, reason=reason))
        self._bind_errors[key] = (reason, why)

    def _listener_owner(self, key: ListenerKey) -> str | None:
        """The service port a listener serves in the last plan (for log events)."""
        plan = self._last_plan
        owner = plan.listeners.get(key) if plan is not None else None
        return None if owner is None else str(owner.name)

    def listen_failures(self) -> dict[str, str]:
        """Service listeners that are not open, and why (for /healthz)."""
        return {str(key): why for key, (_, why) in sorted(self._bind_errors.items())}

    async def status(self, names: Collection[ServicePortName] | None = None) -> ModeStatus:
        """Open connections and bytes per endpoint; listeners, addresses and tables against the last sync."""
        from proxyd.modes.userspace import introspect

        return introspect.status(self, self._last_plan)

    async def trace(self, packet: TracePacket) -> TraceResult:
        """Which listener, source filter and endpoint list a new connection meets now."""
        from proxyd.modes.userspace import introspect

        local = set(await nodeaddrs.node_addresses_async(()))
        return introspect.trace(self, packet, local)

    async def shutdown(self) -> None:
        if not self._started:
            return
        for current in (self.tcp_listeners, self.udp_listeners):
            for listener in current.values():
                listener.close()
            current.clear()
        for timer in (self._sweeper, self._flusher):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._flusher = None
        assert self.tcp is not None and self.udp is not None
        self.udp.close()
        reset = await self.tcp.drain(SHUTDOWN_GRACE)
        self.stats.flush()
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

