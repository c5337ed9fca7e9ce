"""Userspace mode's TCP data path: the native engine, or its pure-Python twin, behind one interface.

``NativeTcpPath`` drives ``proxyd._engine`` (``native/engine.pyx`` with its
C core ``native/engine_core.h``): worker threads that accept, pick, connect
with retry and splice without the GIL and without any Python per connection.
``PyTcpPath`` is the twin: the asyncio data path of ``tcp.py``/``pump.py``
with the shared connection table. ``NATIVE`` says which one the mode uses:
the engine when the extension imports, unless ``PROXYD_NO_EXTENSIONS=1``
(as for the connection table). Both implement ``TcpPath``; the behaviour
tests run against each.

What crosses the Python boundary, and when (never per connection):

* at each sync: listeners (a duplicate of the listening socket's descriptor,
  with the source ranges it admits), endpoint lists and affinity timeouts per
  table key; retargeting or re-filtering a listener replaces it in the engine;
* every ``FLUSH_INTERVAL``: cumulative counters per table key (connections,
  bytes each way, retries, rejections per reason), read from C atomics and
  turned into metric deltas; the number of accept pauses (logged as today);
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
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from proxyd import metrics
from proxyd.modes.userspace.listeners import SourceFilter
from proxyd.modes.userspace.planner import ListenerKey, TableEntry, TableKey
from proxyd.modes.userspace.pump import PIPE_POOL_MAX, PIPE_SIZE, USE_SPLICE
from proxyd.modes.userspace.stats import Stats
from proxyd.modes.userspace.tcp import TcpListener, TcpProxy, open_fds

log = logging.getLogger(__name__)

EngineNative: Any
ServiceNative: Any
try:
    from proxyd._engine import REJECT_REASONS
    from proxyd._engine import Engine as EngineNative
    from proxyd._engine import Service as ServiceNative
except ImportError:  # no compiler at install time: the twin serves
    EngineNative = ServiceNative = None
    REJECT_REASONS = ("no endpoint", "all endpoints failed", "source range", "resources", "client gone")

NATIVE: bool = EngineNative is not None and not os.environ.get("PROXYD_NO_EXTENSIONS")
DRAIN_POLL = 0.05
PAUSE_LOG_EVERY = 10.0

__all__ = ["NATIVE", "NativeTcpPath", "PyTcpPath", "TcpPath", "default_workers"]


def default_workers() -> int:
    """The number of CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:
        return max(1, os.cpu_count() or 1)


class TcpPath(Protocol):
    """What userspace mode asks of its TCP data path."""

    native: bool

    def set_endpoints(self, key: TableKey, entry: TableEntry, now: float) -> None: ...
    def remove_service(self, key: TableKey) -> None: ...
    def add_listener(self, key: ListenerKey, sock: Any, table_key: TableKey,
                     ranges: tuple[str, ...] | None) -> None: ...
    def update_listener(self, key: ListenerKey, table_key: TableKey,
                        ranges: tuple[str, ...] | None) -> None: ...
    def remove_listener(self, key: ListenerKey) -> None: ...
    def has_listener(self, key: ListenerKey) -> bool: ...
    def listener_keys(self) -> list[ListenerKey]: ...
    def sweep(self, now: float) -> None: ...
    def flush(self) -> None: ...
    async def drain(self, grace: float) -> int: ...


class PyTcpPath:
    """The twin: ``TcpProxy`` and one ``TcpListener`` per key, endpoints in the shared connection table."""

    native = False

    def __init__(self, *, loop: asyncio.AbstractEventLoop, table: Any, stats_of: Callable[[TableKey], Stats],
                 fd_limit: int, other_fds: Callable[[], int]) -> None:
        self.table = table
        self.proxy = TcpProxy(loop=loop, table=table, stats_of=stats_of, fd_limit=fd_limit,
                              other_fds=other_fds)
        self.listeners: dict[ListenerKey, TcpListener] = {}

    def set_endpoints(self, key: TableKey, entry: TableEntry, now: float) -> None:
        self.table.set_endpoints(key.id, entry.endpoints, entry.affinity_timeout, now)

    def remove_service(self, key: TableKey) -> None:
        self.table.remove_service(key.id)  # a TCP key has no UDP flows to close

    def add_listener(self, key: ListenerKey, sock: Any, table_key: TableKey,
                     ranges: tuple[str, ...] | None) -> None:
        listener = self.listeners[key] = TcpListener(proxy=self.proxy, sock=sock, key=table_key)
        listener.admits = SourceFilter(ranges) if ranges else None

    def update_listener(self, key: ListenerKey, table_key: TableKey, ranges: tuple[str, ...] | None) -> None:
        listener = self.listeners[key]
        if listener.key != table_key:
            listener.retarget(table_key)
        have = listener.admits.ranges if isinstance(listener.admits, SourceFilter) else None
        if (ranges or None) != have:
            listener.admits = SourceFilter(ranges) if ranges else None

    def remove_listener(self, key: ListenerKey) -> None:
        self.listeners.pop(key).close()

    def has_listener(self, key: ListenerKey) -> bool:
        return key in self.listeners

    def listener_keys(self) -> list[ListenerKey]:
        return list(self.listeners)

    def sweep(self, now: float) -> None:
        pass  # the shared table's sweep covers TCP keys too

    def flush(self) -> None:
        pass  # the asyncio path updates its Stats itself

    async def drain(self, grace: float) -> int:
        for key in list(self.listeners):
            self.remove_listener(key)
        return await self.proxy.drain(grace)


class _NativeListener:
    __slots__ = ("handle", "ranges", "sock", "table_key")

    def __init__(self, handle: Any, sock: Any, table_key: TableKey, ranges: tuple[str, ...] | None) -> None:
        self.handle = handle
        self.sock = sock
        self.table_key = table_key
        self.ranges = ranges


class _NativeService:
    """A table key's engine service and the counters already turned into metrics."""

    __slots__ = ("last", "service", "stats")

    def __init__(self, service: Any, stats: Stats) -> None:
        self.service = service
        self.stats = stats
        self.last = service.counters()
        stats.live.append(service.active)

    def flush(self) -> int:
        """Push the deltas since the last flush into the metrics; the connections still open."""
        now = self.service.counters()
        last, self.last = self.last, now
        self.stats.add_counts(now[0] - last[0], now[1] - last[1], now[2] - last[2])
        if now[3] != last[3]:
            self.stats.retries.inc(now[3] - last[3])
        for i, reason in enumerate(REJECT_REASONS):
            delta = now[5 + i] - last[5 + i]
            if delta:
                self.stats.reject_many(reason, delta)
        return int(now[4])

    def retire(self) -> None:
        with contextlib.suppress(ValueError):
            self.stats.live.remove(self.service.active)


class NativeTcpPath:
    """The native engine: worker threads own every TCP connection; Python configures and reads counters."""

    native = True

    def __init__(self, *, workers: int, stats_of: Callable[[TableKey], Stats], fd_limit: int,
                 other_fds: Callable[[], int]) -> None:
        assert EngineNative is not None
        self.stats_of = stats_of
        self.other_fds = other_fds
        self.fd_limit = fd_limit
        self.base_fds = open_fds()
        pool = max(1, min(PIPE_POOL_MAX, fd_limit // 32) // workers)
        self.engine = EngineNative(workers, fd_limit, copy=not USE_SPLICE, pipe_size=PIPE_SIZE, pool_max=pool)
        self.services: dict[TableKey, _NativeService] = {}
        self.retired: list[_NativeService] = []  # removed keys whose connections still run
        self.listeners: dict[ListenerKey, _NativeListener] = {}
        self._pauses = 0
        self._last_pause_log = 0.0
        self._budget()
        self.engine.start()

    def _service(self, key: TableKey) -> _NativeService:
        svc = self.services.get(key)
        if svc is None:
            svc = self.services[key] = _NativeService(ServiceNative(), self.stats_of(key))
        return svc

    def set_endpoints(self, key: TableKey, entry: TableEntry, now: float) -> None:
        self._service(key).service.set_endpoints(entry.endpoints, entry.affinity_timeout)

    def remove_service(self, key: TableKey) -> None:
        svc = self.services.pop(key, None)
        if svc is not None:
            # Listeners of the key are gone already; its connections keep running and keep counting.
            svc.service.set_endpoints((), 0)
            self.retired.append(svc)

    def _add(self, key: ListenerKey, sock: Any, table_key: TableKey, ranges: tuple[str, ...] | None) -> None:
        handle = self.engine.add_listener(sock, self._service(table_key).service, ranges or None)
        self.listeners[key] = _NativeListener(handle, sock, table_key, ranges or None)

    def add_listener(self, key: ListenerKey, sock: Any, table_key: TableKey,
                     ranges: tuple[str, ...] | None) -> None:
        self._add(key, sock, table_key, ranges)
        self._budget()

    def update_listener(self, key: ListenerKey, table_key: TableKey, ranges: tuple[str, ...] | None) -> None:
        current = self.listeners[key]
        if current.table_key == table_key and current.ranges == (ranges or None):
            return
        # A listener's configuration is immutable in the engine: a new one replaces it on the same socket.
        self.engine.remove_listener(current.handle, stop=False)
        self._add(key, current.sock, table_key, ranges)

    def remove_listener(self, key: ListenerKey) -> None:
        current = self.listeners.pop(key)
        self.engine.remove_listener(current.handle)
        current.sock.close()
        self._budget()

    def has_listener(self, key: ListenerKey) -> bool:
        return key in self.listeners

    def listener_keys(self) -> list[ListenerKey]:
        return list(self.listeners)

    def sweep(self, now: float) -> None:
        for svc in self.services.values():
            svc.service.sweep(now)

    def _budget(self) -> None:
        # each listener: the mode's socket and the engine's duplicate
        self.engine.set_other_fds(self.base_fds + 2 * len(self.listeners) + self.other_fds())

    def flush(self) -> None:
        self._budget()
        self.engine.collect()
        for svc in self.services.values():
            svc.flush()
        still = []
        for svc in self.retired:
            if svc.flush():
                still.append(svc)
            else:
                svc.retire()
        self.retired = still
        pauses = self.engine.pauses()
        if pauses != self._pauses:
            metrics.ACCEPT_PAUSES.inc(pauses - self._pauses)
            self._pauses = pauses
            now = time.monotonic()
            if now - self._last_pause_log >= PAUSE_LOG_EVERY:
                self._last_pause_log = now
                log.warning("userspace: pausing accepting: descriptors ran short (%d connections open, "
                            "~%d of %d descriptors)", self.engine.connections(),
                            self.engine.fds() + self.base_fds + 2 * len(self.listeners) + self.other_fds(),
                            self.fd_limit)

    async def drain(self, grace: float) -> int:
        for key in list(self.listeners):
            self.remove_listener(key)
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

