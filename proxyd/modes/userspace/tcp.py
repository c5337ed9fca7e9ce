"""TCP in userspace mode: accept, pick an endpoint, connect with retry, then pump.

One ``TcpListener`` per ``(ip, port)``; it accepts in batches from a
non-blocking socket driven by ``loop.add_reader``. For each connection the
``TcpProxy`` asks the connection table for an endpoint (round robin, ClientIP
affinity) among those the planner allowed, and connects to it without
blocking. A failed or timed-out connect moves on to the next endpoint not
tried yet, with kube-proxy userspace's per-attempt timeouts 250 ms, 500 ms,
1 s and 2 s; the client sees an error only when every attempt failed. A port
with no usable endpoint answers at once with an RST (``SO_LINGER`` 0 close),
so clients are refused, never left hanging.

Running out of descriptors at accept (EMFILE/ENFILE) pauses that listener
for a moment instead of spinning or crashing; the backlog keeps waiting
clients meanwhile.

Established connections belong to the ``TcpProxy``, not to a listener:
closing a listener (service removed) or changing endpoints leaves them
running. ``drain()`` waits for them at shutdown.

Per-connection work is kept small: no task or future per connection, one
timer per connect attempt, metric children bound once per service, byte
counters flushed in bulk every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable, Collection
from typing import Protocol

from proxyd import metrics
from proxyd.modes.userspace.planner import TableKey
from proxyd.modes.userspace.pump import USE_SPLICE, Connection, PipePool, abort, is_fd_exhaustion
from proxyd.modes.userspace.stats import Stats

log = logging.getLogger(__name__)

# kube-proxy userspace's EndpointDialTimeouts: one connect attempt per entry.
DIAL_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
ACCEPT_BATCH = 64
ACCEPT_PAUSE = 0.1
BYTES_FLUSH_INTERVAL = 5.0


class EndpointTable(Protocol):
    """The part of ``proxyd.conntable.ConnTable`` the TCP path uses."""

    def pick(self, key: str, client_ip: str, now: float,
             exclude: Collection[tuple[str, int]] = ()) -> tuple[str, int] | None: ...
    def open(self, key: str, endpoint: tuple[str, int]) -> None: ...
    def close(self, key: str, endpoint: tuple[str, int]) -> None: ...


class _Dial:
    """One client connection while its endpoint connect is in progress."""

    __slots__ = ("attempt", "backend", "client", "client_ip", "key", "proxy", "stats", "timer", "tried")

    def __init__(self, proxy: TcpProxy, client: socket.socket, client_ip: str, key: TableKey,
                 stats: Stats) -> None:
        self.proxy = proxy
        self.client = client
        self.client_ip = client_ip
        self.key = key
        self.stats = stats
        self.attempt = 0
        self.tried: list[tuple[str, int]] = []
        self.backend: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None

    def next(self) -> None:
        proxy = self.proxy
        while self.attempt < len(DIAL_TIMEOUTS):
            ep = proxy.table.pick(self.key.id, self.client_ip, time.monotonic(), self.tried)
            if ep is None:
                break
            self.tried.append(ep)
            timeout = DIAL_TIMEOUTS[self.attempt]
            self.attempt += 1
            try:
                sock = socket.socket(socket.AF_INET6 if ":" in ep[0] else socket.AF_INET,
                                     socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as err:
                log.warning("%s: cannot create a socket to %s: %s", self.key, ep, err)
                break
            code = sock.connect_ex(ep)
            if code == 0:
                self.backend = sock
                self._connected(ep)
                return
            if code in (errno.EINPROGRESS, errno.EAGAIN):
                self.backend = sock
                proxy.dialing.add(self)
                proxy.loop.add_writer(sock.fileno(), self._on_writable, ep)
                self.timer = proxy.loop.call_later(timeout, self._failed, ep, "timeout")
                return
            sock.close()
            self._count_retry(ep, errno.errorcode.get(code, str(code)))
        self._give_up("no endpoint" if not self.tried else "all endpoints failed")

    def _count_retry(self, ep: tuple[str, int], why: str) -> None:
        self.stats.retries.inc()
        log.debug("%s: connect to %s:%d failed (%s)", self.key, ep[0], ep[1], why)

    def _on_writable(self, ep: tuple[str, int]) -> None:
        sock = self.backend
        assert sock is not None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code in (errno.EINPROGRESS, errno.EAGAIN):
            return
        self._stop_waiting()
        if code:
            self._failed(ep, errno.errorcode.get(code, str(code)), stopped=True)
            return
        self._connected(ep)

    def _stop_waiting(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.backend is not None:
            self.proxy.loop.remove_writer(self.backend.fileno())
        self.proxy.dialing.discard(self)

    def _failed(self, ep: tuple[str, int], why: str, *, stopped: bool = False) -> None:
        if not stopped:
            self._stop_waiting()
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self._count_retry(ep, why)
        self.next()

    def _connected(self, ep: tuple[str, int]) -> None:
        sock = self.backend
        assert sock is not None
        self.proxy.established(self.client, sock, self.key, ep, self.stats)

    def _give_up(self, reason: str) -> None:
        self.stats.reject(reason)
        abort(self.client)

    def cancel(self) -> None:
        self._stop_waiting()
        if self.backend is not None:
            self.backend.close()
        abort(self.client)


class TcpProxy:
    """Every proxied TCP connection of the mode, independent of listeners."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, table: EndpointTable,
                 stats_of: Callable[[TableKey], Stats]) -> None:
        self.loop = loop
        self.table = table
        self.stats_of = stats_of
        self.pool = PipePool() if USE_SPLICE else None
        self.connections: set[Connection] = set()
        self.dialing: set[_Dial] = set()
        self._flusher: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None

    def handle(self, client: socket.socket, client_ip: str, key: TableKey) -> None:
        stats = self.stats_of(key)
        _Dial(self, client, client_ip, key, stats).next()

    def established(self, client: socket.socket, backend: socket.socket, key: TableKey,
                    ep: tuple[str, int], stats: Stats) -> None:
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(loop=self.loop, client=client, backend=backend, key=key, endpoint=ep,
                              pool=self.pool, on_close=self._closed)
        except OSError as err:
            # Out of descriptors for pipes, or the client already reset.
            log.debug("%s: cannot start pumping: %s", key, err)
            stats.reject("resources" if is_fd_exhaustion(err) else "client gone")
            abort(client)
            abort(backend)
            return
        self.table.open(key.id, ep)
        stats.active.inc()
        stats.total.inc()
        self.connections.add(conn)
        conn.start()
        if self._flusher is None:
            self._flusher = self.loop.call_later(BYTES_FLUSH_INTERVAL, self._flush_bytes)

    def _closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._drained is not None and not self.connections:
            self._drained.set()
        key: TableKey = conn.key  # type: ignore[assignment]
        stats = self.stats_of(key)
        stats.active.dec()
        stats.add_bytes(*conn.take_bytes())
        self.table.close(key.id, conn.endpoint)

    def _flush_bytes(self) -> None:
        self._flusher = None
        for conn in self.connections:
            self.stats_of(conn.key).add_bytes(*conn.take_bytes())  # type: ignore[arg-type]
        if self.connections:
            self._flusher = self.loop.call_later(BYTES_FLUSH_INTERVAL, self._flush_bytes)

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for connections to end, then reset the rest; how many were reset."""
        for dial in list(self.dialing):
            dial.cancel()
        if self.connections:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        left = list(self.connections)
        for conn in left:
            conn.abort()
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self.pool is not None:
            self.pool.close()
        return len(left)


class TcpListener:
    """A listening socket feeding accepted connections for one table key to the ``TcpProxy``."""

    def __init__(self, *, proxy: TcpProxy, sock: socket.socket, key: TableKey) -> None:
        self.proxy = proxy
        self.sock = sock
        self.key = key
        self.loop = proxy.loop
        self._paused: asyncio.TimerHandle | None = None
        self._fd = sock.fileno()
        self.loop.add_reader(self._fd, self._on_accept)

    def retarget(self, key: TableKey) -> None:
        """Serve another table key from now on (the listener changed owner)."""
        self.key = key

    def _on_accept(self) -> None:
        accept = self.sock.accept
        handle = self.proxy.handle
        key = self.key
        for _ in range(ACCEPT_BATCH):
            try:
                client, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as err:
                if is_fd_exhaustion(err):
                    self._pause(err)
                else:
                    log.warning("accept on %s failed: %s", self.sock.getsockname(), err)
                return
            client.setblocking(False)
            handle(client, addr[0], key)

    def _pause(self, err: OSError) -> None:
        metrics.ACCEPT_PAUSES.inc()
        log.warning("accept on %s: %s; pausing %.1fs", self.sock.getsockname(), err.strerror, ACCEPT_PAUSE)
        self.loop.remove_reader(self._fd)
        self._paused = self.loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        self.loop.add_reader(self._fd, self._on_accept)

    def close(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        else:
            self.loop.remove_reader(self._fd)
        self.sock.close()
