"""Userspace mode's applier: the kernel side of a plan (service addresses on ``proxyd0``, listening sockets).

The mode decides (``planner``) and moves the endpoint tables; this object
holds what the kernel holds for it: the service addresses, local routes via
``proxyd0`` (``addresses.AddressHolder``), and one listening socket per service
``ip:port`` and NodePort. A listener that cannot be opened (port taken by
another program, no NET_BIND_SERVICE) is logged once and retried at every
sync; it does not fail the sync, like kube-proxy userspace's per-port
errors, and it is named in /healthz (``listen_failures``) and counted in
``proxyd_listen_failures``.

Listeners that do not fit the descriptor budget (``tcp.listener_cap``) wait
in ``listener_order`` (by service port, never by the order a source listed
objects) and open, first in that order, when room appears; while none does,
a sync spends nothing on them. The budget's refusals are logged when they
start and when they end (in between at most once a minute) and counted in
``proxyd_listen_failures{reason="descriptors"}``.
"""

from __future__ import annotations

import errno
import heapq
import logging
import time
from collections import Counter
from collections.abc import Iterable

from proxyd import metrics
from proxyd.logformat import event
from proxyd.model import Protocol
from proxyd.modes.userspace.addresses import AddressHolder
from proxyd.modes.userspace.engine import TcpListenerLike, TcpPath
from proxyd.modes.userspace.listeners import OwnListeners, SourceFilter, nonlocal_bind, open_socket
from proxyd.modes.userspace.planner import ListenerKey, Plan, TableKey
from proxyd.modes.userspace.udp_engine import UdpListenerLike, UdpPath

log = logging.getLogger(__name__)

BUDGET_REFUSAL = "no room in the descriptor budget"
BUDGET_LOG_EVERY = 60.0  # seconds between log lines while the number of budget refusals moves

ListenerOrder = tuple[str, str, str, str, bool, int, str, int, str]


def listener_order(key: ListenerKey, table: TableKey) -> ListenerOrder:
    """Which listeners a short descriptor budget holds first: by service port (namespace, name, port
    name, protocol), its cluster traffic before external and IPv4 before IPv6, then the socket's address.

    The order depends only on the desired state, never on the order a
    source listed objects, so every start on the same state holds the same
    listeners.
    """
    name = table.name
    return (name.namespace, name.name, name.port, name.protocol.value, table.external, table.family,
            key.ip, key.port, key.protocol.value)


def _reason(err: OSError) -> str:
    """The ``proxyd_listen_failures`` reason of a failed bind or listen."""
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission"
    if err.errno == errno.EADDRINUSE:
        return "address_in_use"
    if err.errno in (errno.EMFILE, errno.ENFILE):
        return "descriptors"
    return "other"


class Applier:
    """Service addresses and listening sockets of userspace mode."""

    def __init__(self, holder: AddressHolder | None = None) -> None:
        self.holder = holder or AddressHolder()
        self.tcp_listeners: dict[ListenerKey, TcpListenerLike] = {}
        self.udp_listeners: dict[ListenerKey, UdpListenerLike] = {}
        self._bind_errors: dict[ListenerKey, tuple[str, str]] = {}  # key -> (metric reason, text)
        # Listeners refused for the descriptor budget -> their order; ``_queue`` is a heap of
        # (order, key) whose entries no longer in ``_waiting`` with that order are skipped.
        self._waiting: dict[ListenerKey, ListenerOrder] = {}
        self._queue: list[tuple[ListenerOrder, ListenerKey]] = []
        self._budget_logged = 0  # budget refusals as last logged
        self._budget_log_at = 0.0
        self._failure_reasons: set[str] = set()
        self._failures_dirty = True
        self._listeners_version = 0  # moves whenever a listener opens or closes
        self._own_made_of: tuple[int, tuple[str, ...], bool] | None = None
        self._own_addresses: frozenset[str] = frozenset()
        self._own_held: set[str] = set()

    @property
    def bind_errors(self) -> list[ListenerKey]:
        """Listeners not open for another reason than the budget (retried at every sync)."""
        if not self._waiting:
            return list(self._bind_errors)
        return [key for key in self._bind_errors if key not in self._waiting]

    @property
    def not_open(self) -> list[ListenerKey]:
        """Every wanted listener that is not open: bind errors and budget refusals."""
        return list(self._bind_errors)

    @property
    def waiting(self) -> list[ListenerKey]:
        """Listeners refused for the descriptor budget, first to open first."""
        return sorted(self._waiting, key=self._waiting.__getitem__)

    def update_listeners(self, plan: Plan, keys: Iterable[ListenerKey], tcp: TcpPath, udp: UdpPath) -> None:
        """Open, retarget, re-filter or close the listeners ``keys`` as ``plan`` wants them.

        Listeners waiting for room in the descriptor budget open too when
        room appeared, first in ``listener_order``; an open listener is never
        closed to make room for another.
        """
        keys = list(keys)
        for key in keys:
            if key not in plan.listeners:
                current = self.tcp_listeners if key.protocol == Protocol.TCP else self.udp_listeners
                gone = current.pop(key, None)
                if gone is not None:
                    gone.close()
                    self._listeners_version += 1
                self._forget(key)
        new: dict[ListenerKey, None] = {}
        for key in keys:
            table_key = plan.listeners.get(key)
            if table_key is None:
                continue
            listener: TcpListenerLike | UdpListenerLike | None = (
                self.tcp_listeners.get(key) if key.protocol == Protocol.TCP else self.udp_listeners.get(key))
            if listener is None:
                if key.protocol not in (Protocol.TCP, Protocol.UDP):
                    self._bind_failed(key, "userspace mode serves only TCP and UDP", "protocol", table_key)
                else:
                    new[key] = None
                continue
            if listener.key != table_key:
                listener.retarget(table_key)
            self._filter(plan, key, listener)
        # Listeners share the descriptor budget with connections; /healthz, /metrics, the source and
        # netlink keep a reserve neither may take. Ports that do not fit wait for room (later syncs).
        room = tcp.listener_room(len(self.tcp_listeners) + len(self.udp_listeners))
        if new and (self._waiting or len(new) > room):
            self._enqueue(plan, new)
        else:
            for key in new:
                room -= self._open(plan, key, tcp, udp)
        while self._waiting and room > 0:
            key = self._next_waiting()
            table_key = plan.listeners.get(key)
            if table_key is not None:
                room -= self._open(plan, key, tcp, udp)
        self._note_budget(tcp)
        if self._failures_dirty:
            self._failures_dirty = False
            reasons = Counter(reason for reason, _ in self._bind_errors.values())
            for reason in {*reasons, *self._failure_reasons}:
                metrics.LISTEN_FAILURES.labels(reason).set(reasons.get(reason, 0))
            self._failure_reasons = set(reasons)

    def _open(self, plan: Plan, key: ListenerKey, tcp: TcpPath, udp: UdpPath) -> int:
        """Open the listener ``key``; 1 when it holds a descriptor now, else 0 (the error is kept)."""
        table_key = plan.listeners[key]
        try:
            sock = open_socket(key)
        except OSError as err:
            self._bind_failed(key, err.strerror or str(err), _reason(err), table_key)
            return 0
        if self._bind_errors.pop(key, None) is not None:
            self._failures_dirty = True
        listener: TcpListenerLike | UdpListenerLike
        if key.protocol == Protocol.TCP:
            listener = self.tcp_listeners[key] = tcp.listen(sock, table_key)
        else:
            listener = self.udp_listeners[key] = udp.listen(sock, table_key)
        self._filter(plan, key, listener)
        self._listeners_version += 1
        return 1

    @staticmethod
    def _filter(plan: Plan, key: ListenerKey, listener: TcpListenerLike | UdpListenerLike) -> None:
        ranges = plan.source_ranges.get(key)
        have = listener.admits.ranges if isinstance(listener.admits, SourceFilter) else None
        if ranges != have:
            listener.admits = SourceFilter(ranges) if ranges else None

    def _enqueue(self, plan: Plan, keys: Iterable[ListenerKey]) -> None:
        """Make ``keys`` wait for room in the budget, in ``listener_order``."""
        fresh = []
        for key in keys:
            order = listener_order(key, plan.listeners[key])
            if self._waiting.get(key) != order:
                self._waiting[key] = order
                fresh.append((order, key))
            if self._bind_errors.get(key) != ("descriptors", BUDGET_REFUSAL):
                self._bind_errors[key] = ("descriptors", BUDGET_REFUSAL)
                self._failures_dirty = True
        if len(fresh) > 64 or len(self._queue) > 2 * len(self._waiting) + 1024:
            # Many at once (a first sync) or many stale entries: one heapify beats pushes.
            self._queue = [item for item in self._queue if self._waiting.get(item[1]) == item[0]]
            self._queue.extend(fresh)
            heapq.heapify(self._queue)
        else:
            for item in fresh:
                heapq.heappush(self._queue, item)

    def _next_waiting(self) -> ListenerKey:
        """Take the first waiting listener out of the queue (``_waiting`` must not be empty)."""
        while True:
            order, key = heapq.heappop(self._queue)
            if self._waiting.get(key) == order:
                del self._waiting[key]
                return key

    def _forget(self, key: ListenerKey) -> None:
        """``key`` is no longer wanted: drop its error or budget refusal (a queue entry goes stale)."""
        self._waiting.pop(key, None)
        if self._bind_errors.pop(key, None) is not None:
            self._failures_dirty = True

    def _note_budget(self, tcp: TcpPath) -> None:
        """Log the budget's refusals when they start and end; while their number moves, once a minute."""
        waiting = len(self._waiting)
        if waiting == self._budget_logged:
            return
        now = time.monotonic()
        if waiting and self._budget_logged and now - self._budget_log_at < BUDGET_LOG_EVERY:
            return
        held = len(self.tcp_listeners) + len(self.udp_listeners)
        if waiting:
            queue = self._queue
            while self._waiting.get(queue[0][1]) != queue[0][0]:
                heapq.heappop(queue)  # stale: the first entry must be a waiting listener
            first = queue[0][1]
            log.log(logging.ERROR if not self._budget_logged else logging.WARNING,
                    "userspace: descriptor budget (limit %d) full: %d listeners open, %d not opened "
                    "(first waiting: %s); they open in service order as room appears",
                    tcp.fd_limit, held, waiting, first)
        else:
            log.info("userspace: every listener fits the descriptor budget again (%d open)", held)
        self._budget_logged = waiting
        self._budget_log_at = now

    def _bind_failed(self, key: ListenerKey, why: str, reason: str, owner: TableKey | None = None) -> None:
        if self._bind_errors.get(key) != (reason, why):
            log.error("userspace: cannot listen on %s: %s (retried at every sync)", key, why,
                      extra=event(service=None if owner is None else str(owner.name), endpoint=key,
                                  reason=reason))
            self._bind_errors[key] = (reason, why)
            self._failures_dirty = True

    def listen_failures(self) -> dict[str, str]:
        """Service listeners that are not open, and why (for /healthz)."""
        return {str(key): why for key, (_, why) in sorted(self._bind_errors.items())}

    def guard_own_listeners(self, plan: Plan, node_ips: list[str], tcp: TcpPath, udp: UdpPath) -> None:
        """Tell the data path which sockets are its own, so it never connects or sends to them.

        The sets are rebuilt only when what they are made of changed (listeners, node and service
        addresses, the nonlocal-bind setting): at 10,000 services that is ~8 ms a sync otherwise.
        Handing the same sets again still lets the native path re-check wildcard ports.
        """
        loose = nonlocal_bind()
        made_of = (self._listeners_version, tuple(node_ips), loose)
        held = self.holder.current
        if made_of == self._own_made_of and plan.addresses == self._own_addresses and held == self._own_held:
            tcp.own = tcp.own
            return
        local = [*node_ips, *held, *plan.addresses]
        tcp.own = OwnListeners(list(self.tcp_listeners), local, nonlocal_bind=loose)
        udp.own = OwnListeners(list(self.udp_listeners), local, nonlocal_bind=loose)
        self._own_made_of, self._own_addresses, self._own_held = made_of, plan.addresses, set(held)

    def close_listeners(self) -> None:
        for current in (self.tcp_listeners, self.udp_listeners):
            for listener in current.values():
                listener.close()
            current.clear()
        self._listeners_version += 1

    def close(self) -> None:
        self.holder.close()
