"""Userspace mode's TCP data path: the native engine, or its pure-Python twin, behind one interface.

``NativeTcpPath`` drives ``proxyd._engine`` (``native/engine.pyx`` with its
C core ``native/engine_core.h``): worker threads that accept, pick, connect
with retry and splice without the GIL and without any Python per connection.
``PyTcpPath`` is the twin: the asyncio data path of ``tcp.py``/``pump.py``
with the shared connection table. ``NATIVE`` says which one the mode uses:
the engine when the extension imports, unless ``PROXYD_NO_EXTENSIONS=1``
(as for the connection table). Both implement ``TcpPath``, which the
applier (listeners, their descriptor budget, the own-listener guard) and
the mode (endpoint tables) use; the behaviour tests run against each.

What crosses the Python boundary, and when (never per connection):

* at each sync: listeners (the listening socket's descriptor, which the
  engine takes over, with the source ranges it admits), endpoint lists and affinity timeouts per
  table key, without the endpoints that are proxyd's own listeners (see
  ``NativeTcpPath.own``); retargeting or re-filtering a listener replaces it
  in the engine;
* every ``FLUSH_INTERVAL``: cumulative counters per table key (connections,
  bytes each way, retries, rejections per reason), read from C atomics and
  turned into metric deltas; per endpoint, the connections and bytes counted
  since the last flush (for ``proxyd status``; only endpoints with news);
  the number of accept pauses (logged as today);
  the descriptors the rest of the process holds, for the engine's budget;
* at scrape time: active connections per table key (the gauge reads C);
* every affinity sweep: expired ClientIP entries are removed;
* at shutdown: listeners go at once, then the engine is polled until its
  connections ended or the grace period passed, then reset and joined.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from proxyd import metrics
from proxyd.modes.userspace.listeners import OwnListeners, SourceFilter
from proxyd.modes.userspace.planner import TableEntry, TableKey
from proxyd.modes.userspace.pump import PIPE_POOL_MAX, PIPE_SIZE, USE_SPLICE
from proxyd.modes.userspace.stats import Stats
from proxyd.modes.userspace.tcp import (
    EndpointTable,
    TcpListener,
    TcpProxy,
    fd_reserve,
    listener_cap,
    open_fds,
)

log = logging.getLogger(__name__)

EngineNative: Any = None
ServiceNative: Any = None
REJECT_REASONS: tuple[str, ...] = ("no endpoint", "all endpoints failed", "source range", "resources",
                                   "client gone")
try:
    import proxyd._engine
except ImportError:  # no compiler at install time: the twin serves
    pass
else:
    EngineNative = proxyd._engine.Engine
    ServiceNative = proxyd._engine.Service
    REJECT_REASONS = tuple(proxyd._engine.REJECT_REASONS)

NATIVE: bool = EngineNative is not None and not os.environ.get("PROXYD_NO_EXTENSIONS")
DRAIN_POLL = 0.05
PAUSE_LOG_EVERY = 10.0
ENGINE_FD_RESERVE = 16  # PE_FD_RESERVE in native/engine_core.h: the engine keeps this many free by itself
OWN_LOG_MAX = 1024
_PORT = operator.itemgetter(1)  # an endpoint's port

__all__ = ["NATIVE", "NativeTcpPath", "PyTcpPath", "TcpListenerLike", "TcpPath", "default_workers"]


def default_workers() -> int:
    """The number of CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:
        return max(1, os.cpu_count() or 1)


class TcpListenerLike(Protocol):
    """A TCP listener as the applier holds it: its table key and the sources it admits can change."""

    @property
    def key(self) -> TableKey: ...
    @property
    def admits(self) -> Callable[[str], bool] | None: ...
    @admits.setter
    def admits(self, value: Callable[[str], bool] | None) -> None: ...
    def retarget(self, key: TableKey) -> None: ...
    def close(self) -> None: ...


class TcpPath(Protocol):
    """What userspace mode and its applier ask of the TCP data path."""

    native: bool
    fd_limit: int

    @property
    def own(self) -> OwnListeners: ...
    @own.setter
    def own(self, value: OwnListeners) -> None: ...
    def listener_room(self, listeners: int) -> int: ...
    def has_room(self) -> bool: ...
    def listen(self, sock: socket.socket, key: TableKey) -> TcpListenerLike: ...
    def set_endpoints(self, key: TableKey, entry: TableEntry, now: float) -> None: ...
    def remove_service(self, key: TableKey) -> None: ...
    def sweep(self, now: float) -> None: ...
    def flush(self) -> None: ...
    async def drain(self, grace: float) -> int: ...


class PyTcpPath(TcpProxy):
    """The twin: ``TcpProxy`` and one ``TcpListener`` per key, endpoints in the shared connection table.

    Its own-listener guard checks every endpoint it is about to connect to (``tcp._Dial``).
    """

    native = False

    def __init__(self, *, loop: asyncio.AbstractEventLoop, table: EndpointTable,
                 stats_of: Callable[[TableKey], Stats], fd_limit: int = 1 << 20,
                 other_fds: Callable[[], int] = lambda: 0) -> None:
        super().__init__(loop=loop, table=table, stats_of=stats_of, fd_limit=fd_limit, other_fds=other_fds)
        self.shared: Any = table

    def listen(self, sock: socket.socket, key: TableKey) -> TcpListener:
        return TcpListener(proxy=self, sock=sock, key=key)

    def set_endpoints(self, key: TableKey, entry: TableEntry, now: float) -> None:
        self.shared.set_endpoints(key.id, entry.endpoints, entry.affinity_timeout, now)

    def remove_service(self, key: TableKey) -> None:
        self.shared.remove_service(key.id)  # a TCP key has no UDP flows to close

    def sweep(self, now: float) -> None:
        pass  # the shared table's sweep covers TCP keys too

    def flush(self) -> None:
        pass  # the asyncio path updates its Stats itself


_ZEROS = (0,) * 16  # the counters before anything was counted (more than the engine gives)


class _NativeService:
    """A table key's engine service and the counters already turned into metrics."""

    __slots__ = ("entry", "last", "sent", "service", "stats")

    def __init__(self, service: Any, stats: Stats) -> None:
        self.service = service
        self.stats = stats
        now = service.counters()
        # The cumulative counters at the last flush; None while all are zero (most of 10,000 ports are
        # never used through this node: no 10-int tuple kept for each).
        self.last: tuple[int, ...] | None = now if any(now) else None
        self.entry: TableEntry | None = None  # what the plan wants, own listeners included
        self.sent: tuple[tuple[str, int], ...] | None = None  # what the engine holds
        stats.live.append(service.active)

    def flush(self) -> int:
        """Push the deltas since the last flush into the metrics; the connections still open."""
        now = self.service.counters()
        if not any(now):  # nothing counted since the start (counters only grow): nothing to add
            self.last = None
            return 0
        last = self.last if self.last is not None else _ZEROS
        self.last = now
        self.stats.add_counts(now[0] - last[0], now[1] - last[1], now[2] - last[2])
        for ep, opened, to_endpoint, to_client in self.service.take_endpoint_counts():
            self.stats.add_endpoint_counts(ep, opened, to_endpoint, to_client)
        if now[3] != last[3]:
            self.stats.retry(now[3] - last[3])
        for i, reason in enumerate(REJECT_REASONS):
            delta = now[5 + i] - last[5 + i]
            if delta:
                self.stats.reject_many(reason, delta)
        return int(now[4])

    def retire(self) -> None:
        with contextlib.suppress(ValueError):
            self.stats.live.remove(self.service.active)


class _EngineListener:
    """What a TCP and a UDP engine listener share: a new table key or source filter is handed to the
    engine by ``_replace`` (each kind's own way)."""

    __slots__ = ("_admits", "key")
    key: TableKey
    _admits: SourceFilter | None

    def _replace(self) -> None:
        raise NotImplementedError

    @property
    def admits(self) -> Callable[[str], bool] | None:
        return self._admits

    @admits.setter
    def admits(self, value: Callable[[str], bool] | None) -> None:
        if value is not None and not isinstance(value, SourceFilter):
            raise TypeError("the engine filters sources by CIDR ranges (a SourceFilter)")
        if value is self._admits:
            return
        self._admits = value
        self._replace()

    def retarget(self, key: TableKey) -> None:
        if key != self.key:
            self.key = key
            self._replace()


class _NativeListener(_EngineListener):
    """One listening socket served by the engine; a new table key or source filter replaces it there.

    The engine owns the socket's only descriptor (``handle.fd``): a listener
    costs the process one descriptor, as on the twin, so 10,000 service ports
    fit a 20,000-descriptor limit with room left for connections.
    """

    __slots__ = ("handle", "path")

    def __init__(self, path: NativeTcpPath, sock: socket.socket, key: TableKey) -> None:
        self.path = path
        self.key = key
        self._admits: SourceFilter | None = None
        # The engine takes the descriptor over (and closes it, also when adding fails).
        service = path.service(key).service
        self.handle: Any = path.engine.add_listener(sock.detach(), service, None, adopt=True)
        path.listeners.add(self)
        path.budget()

    def _replace(self) -> None:
        ranges = self._admits.ranges if self._admits is not None else None
        # A listener's configuration is immutable in the engine: a new one replaces it on the same socket
        # (a duplicate of the engine's descriptor; the old one closes once no worker can be using it).
        handle = self.path.engine.add_listener(os.dup(self.handle.fd), self.path.service(self.key).service,
                                               ranges or None, adopt=True)
        self.path.engine.remove_listener(self.handle, stop=False)
        self.handle = handle

    def close(self) -> None:
        if self not in self.path.listeners:
            return
        self.path.listeners.discard(self)
        self.path.engine.remove_listener(self.handle)  # shut down now; the engine closes the descriptor
        self.path.budget()


class _NativeKeys:
    """The engine's services per table key, fed without proxyd's own listeners (TCP and UDP alike).

    Endpoint lists never hold an endpoint that is in ``own`` (a listener's
    exact ``ip:port``, or a wildcard listener's port on a local address):
    the engine sends without asking Python. Setting ``own`` (the applier
    does after each sync) re-filters only the table keys with an endpoint on
    a port whose answer may have changed.
    """

    own_verb = "connected to"

    def __init__(self, *, stats_of: Callable[[TableKey], Stats]) -> None:
        self.stats_of = stats_of
        self.services: dict[TableKey, _NativeService] = {}
        self.retired: list[_NativeService] = []  # removed keys whose connections or flows still run
        self._own = OwnListeners()
        self._by_port: dict[int, set[TableKey]] = {}  # endpoint port -> table keys with such an endpoint
        self._own_logged: set[tuple[str, tuple[str, int]]] = set()

    def changed(self) -> None:
        """An endpoint list in the engine changed (UDP: flows whose endpoint left close)."""

    def service(self, key: TableKey) -> _NativeService:
        svc = self.services.get(key)
        if svc is None:
            svc = self.services[key] = _NativeService(ServiceNative(), self.stats_of(key))
        return svc

    def set_endpoints(self, key: TableKey, entry: TableEntry, now: float) -> None:
        svc = self.service(key)
        old = svc.entry
        if old is not None:
            self._unindex(key, old.endpoints)
        svc.entry = entry
        for port in set(map(_PORT, entry.endpoints)):
            self._by_port.setdefault(port, set()).add(key)
        self._send(key, svc, force=True)

    def _unindex(self, key: TableKey, endpoints: Iterable[tuple[str, int]]) -> None:
        for port in set(map(_PORT, endpoints)):
            keys = self._by_port.get(port)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_port[port]

    def _send(self, key: TableKey, svc: _NativeService, *, force: bool = False) -> None:
        """Give the engine the key's endpoints without proxyd's own listeners."""
        assert svc.entry is not None
        own = self._own
        specific, wildcard_ports = own.specific, own.wildcard_ports
        keep = []
        for ep in svc.entry.endpoints:
            # Only an exact listener or a wildcard listener's port can be ours (set lookups first:
            # 100,000 endpoints in a full sync at 10,000 services).
            if (ep in specific or ep[1] in wildcard_ports) and ep in own:
                if (key.id, ep) not in self._own_logged and len(self._own_logged) < OWN_LOG_MAX:
                    self._own_logged.add((key.id, ep))
                    log.warning("%s: endpoint %s:%d is one of proxyd's own listeners; never %s",
                                key, *ep, self.own_verb)
                continue
            keep.append(ep)
        # The plan's own tuple when nothing was left out (the usual case): one list held, not two.
        entry_eps = svc.entry.endpoints
        endpoints = entry_eps if len(keep) == len(entry_eps) else tuple(keep)
        if force or endpoints != svc.sent:
            svc.service.set_endpoints(endpoints, svc.entry.affinity_timeout)
            svc.sent = endpoints
            self.changed()

    def remove_service(self, key: TableKey) -> None:
        svc = self.services.pop(key, None)
        if svc is not None:
            if svc.entry is not None:
                self._unindex(key, svc.entry.endpoints)
            # Listeners of the key are gone already; its connections keep running and keep counting.
            svc.service.set_endpoints((), 0)
            self.retired.append(svc)
            self.changed()

    @property
    def own(self) -> OwnListeners:
        return self._own

    @own.setter
    def own(self, value: OwnListeners) -> None:
        old, self._own = self._own, value
        # Ports whose answer may differ: listeners' ports that came or went, and when the local
        # addresses or the bind check changed, every wildcard listener's port (old and new).
        if value is old:
            # The same sets (nothing they are made of changed): only an address added since the last
            # sync may answer the bind check, so wildcard ports stay checked.
            ports = set(value.wildcard_ports)
        else:
            ports = {p for _, p in old.specific ^ value.specific}
            ports |= old.wildcard_ports ^ value.wildcard_ports
            if old.local_ips != value.local_ips or old.nonlocal_bind != value.nonlocal_bind:
                ports |= old.wildcard_ports | value.wildcard_ports
            else:
                # An address added since the last sync answers the bind check: wildcard ports stay checked.
                ports |= value.wildcard_ports
        keys = set().union(*(self._by_port.get(p, ()) for p in ports)) if ports else set()
        for key in keys:
            svc = self.services.get(key)
            if svc is not None and svc.entry is not None:
                self._send(key, svc)

    def sweep(self, now: float) -> None:
        for svc in self.services.values():
            svc.service.sweep(now)

    def flush_services(self) -> None:
        """Counter deltas of every key into the metrics; a removed key is read until nothing runs on it."""
        for svc in self.services.values():
            svc.flush()
        still = []
        for svc in self.retired:
            if svc.flush():
                still.append(svc)
            else:
                svc.retire()
        self.retired = still


class NativeTcpPath(_NativeKeys):
    """The native engine: worker threads own every TCP connection; Python configures and reads counters.

    Descriptors: the same budget as the twin's (``TcpProxy``): a listener
    costs one descriptor (the engine takes the applier's socket over);
    ``listener_room``/``has_room`` answer as the twin does, and
    the engine keeps ``fd_reserve`` free (its own ``PE_FD_RESERVE`` plus the
    rest, handed over as descriptors held elsewhere).

    Own listeners: the engine connects without asking Python, so the guard
    works on what it is given: endpoint lists never hold an endpoint that is
    in ``own`` (a listener's exact ``ip:port``, or a wildcard listener's port
    on a local address). Setting ``own`` (the applier does after each sync)
    re-filters only the table keys with an endpoint on a port whose answer
    may have changed.
    """

    native = True

    def __init__(self, *, workers: int, stats_of: Callable[[TableKey], Stats], fd_limit: int,
                 other_fds: Callable[[], int]) -> None:
        assert EngineNative is not None
        self.other_fds = other_fds
        self.fd_limit = fd_limit
        self.reserve = fd_reserve(fd_limit)
        self.base_fds = open_fds()
        pool = max(1, min(PIPE_POOL_MAX, fd_limit // 32) // workers)
        self.engine = EngineNative(workers, fd_limit, copy=not USE_SPLICE, pipe_size=PIPE_SIZE, pool_max=pool)
        super().__init__(stats_of=stats_of)
        self.listeners: set[_NativeListener] = set()
        self._pauses = 0
        self._last_pause_log = 0.0
        self.budget()
        self.engine.start()

    # -- descriptor budget

    def fds_in_use(self) -> int:
        """Estimated descriptors held by the process (the engine counts its connections and pipes)."""
        return self.base_fds + len(self.listeners) + int(self.engine.fds()) + self.other_fds()

    def listener_room(self, listeners: int) -> int:
        """How many more listening sockets may open now, with ``listeners`` open (TCP and UDP).

        As ``TcpProxy.listener_room``: an engine listener holds one descriptor (the engine's).
        """
        cap = listener_cap(self.fd_limit, self.base_fds, self.reserve)
        free = self.fd_limit - self.reserve - self.fds_in_use()
        return max(0, min(cap - listeners, free))

    def has_room(self) -> bool:
        """Whether one more socket fits the budget without touching the reserve (UDP flows ask)."""
        return self.fds_in_use() + 1 + self.reserve <= self.fd_limit

    def budget(self) -> None:
        """Tell the engine what the rest of the process holds (and the reserve beyond its own)."""
        extra = max(0, self.reserve - ENGINE_FD_RESERVE)
        self.engine.set_other_fds(self.base_fds + len(self.listeners) + self.other_fds() + extra)

    # -- listeners and endpoints

    def listen(self, sock: socket.socket, key: TableKey) -> _NativeListener:
        return _NativeListener(self, sock, key)

    # -- counters, sweep, shutdown

    def flush(self) -> None:
        self.budget()
        self.engine.collect()
        self.flush_services()
        pauses = self.engine.pauses()
        if pauses != self._pauses:
            metrics.ACCEPT_PAUSES.inc(pauses - self._pauses)
            self._pauses = pauses
            now = time.monotonic()
            if now - self._last_pause_log >= PAUSE_LOG_EVERY:
                self._last_pause_log = now
                log.warning("userspace: pausing accepting: descriptors ran short (%d connections open, "
                            "~%d of %d descriptors)", self.engine.connections(), self.fds_in_use(),
                            self.fd_limit)

    async def drain(self, grace: float) -> int:
        for listener in list(self.listeners):
            listener.close()
        deadline = time.monotonic() + grace
        # The workers cannot set an asyncio.Event; polling happens only here, during shutdown.
        while self.engine.connections() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL)
        left = self.engine.connections()
        if left:
            self.engine.reset_all()
        self.engine.stop()
        self.flush()
        for svc in (*self.services.values(), *self.retired):
            svc.retire()
        return int(left)
