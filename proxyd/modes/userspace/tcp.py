"""TCP in userspace mode: accept, pick an endpoint, connect with retry, then pump.

One ``TcpListener`` per ``(ip, port)``; it accepts in batches from a
non-blocking socket driven by ``loop.add_reader``. For each connection the
``TcpProxy`` asks the connection table for an endpoint (round robin, ClientIP
affinity) among those the planner allowed, and connects to it without
blocking. A failed or timed-out connect moves on to the next endpoint not
tried yet (round again once every endpoint was tried, as kube-proxy picks
anew for each attempt), with kube-proxy userspace's per-attempt timeouts
250 ms, 500 ms, 1 s and 2 s; the client sees an error only when all four
attempts failed. A port
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
counters flushed in bulk every few seconds. Sockets are the C-level
``_socket.socket`` (accepted through ``_accept()``), which skips the Python
wrapper's constructor and enum conversions, and readiness goes through the
``Poller`` (one epoll set of our own) instead of one loop registration per
socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from _socket import socket as raw_socket
from collections.abc import Callable, Collection
from typing import Protocol

from proxyd import metrics
from proxyd.modes.userspace.listeners import OwnListeners, tune_tcp
from proxyd.modes.userspace.planner import TableKey
from proxyd.modes.userspace.poller import Poller
from proxyd.modes.userspace.pump import (
    PIPE_POOL_MAX,
    USE_SPLICE,
    Connection,
    PipePool,
    abort,
    is_fd_exhaustion,
)
from proxyd.modes.userspace.stats import Stats

log = logging.getLogger(__name__)

# kube-proxy userspace's EndpointDialTimeouts: one connect attempt per entry.
DIAL_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
ACCEPT_BATCH = 64
RESUME_AFTER = 1.0  # longest accept pause when no connection ends to free descriptors
FD_RESERVE = 16  # fewest descriptors kept free for HTTP servers, netlink, manifests and the like
FD_RESERVE_MAX = 256


def fd_reserve(limit: int) -> int:
    """Descriptors neither listeners nor connections may take: /healthz, /metrics, the source, netlink.

    A sixteenth of the limit, between ``FD_RESERVE`` and ``FD_RESERVE_MAX`` (the HTTP servers alone may
    hold a few dozen clients at once).
    """
    return max(FD_RESERVE, min(FD_RESERVE_MAX, limit // 16))


CONNECTION_SHARE = 4  # connections always keep 1/CONNECTION_SHARE of the budget from listeners


def listener_cap(limit: int, base: int, reserve: int) -> int:
    """The most descriptors listening sockets (TCP and UDP, one each) may hold under ``limit``.

    The budget is what the descriptors held at start (``base``) and the
    control reserve leave. As with kube-proxy userspace, which opened a
    socket per service port and let connections have the rest, service
    ports come first: listeners may take all of it but a quarter, which
    connections always keep (at a 20,000 limit: ~14,700 listeners, and
    ~4,900 descriptors for connections, ~2,400 with data in flight or
    ~4,900 idle, beyond what listeners leave unused).
    """
    usable = max(0, limit - base - reserve)
    return usable - usable // CONNECTION_SHARE
BYTES_FLUSH_INTERVAL = 5.0

_AF_INET, _AF_INET6 = socket.AF_INET.value, socket.AF_INET6.value
_STREAM = socket.SOCK_STREAM.value
_STREAM_NONBLOCK = socket.SOCK_STREAM.value | socket.SOCK_NONBLOCK.value
_SOL_SOCKET, _SO_ERROR = socket.SOL_SOCKET, socket.SO_ERROR
_EINPROGRESS, _EAGAIN = errno.EINPROGRESS, errno.EAGAIN


class EndpointTable(Protocol):
    """The part of ``proxyd.modes.userspace.conntable.ConnTable`` the TCP path uses."""

    def pick(self, key: str, client_ip: str, now: float,
             exclude: Collection[tuple[str, int]] = ()) -> tuple[str, int] | None: ...
    def open(self, key: str, endpoint: tuple[str, int]) -> None: ...
    def close(self, key: str, endpoint: tuple[str, int]) -> None: ...


class _Dial:
    """One client connection while its endpoint connect is in progress."""

    __slots__ = ("attempt", "backend", "client", "client_ip", "ep", "key", "proxy", "stats", "timer", "tried")

    def __init__(self, proxy: TcpProxy, client: raw_socket, client_ip: str, key: TableKey,
                 stats: Stats) -> None:
        self.proxy = proxy
        self.client = client
        self.client_ip = client_ip
        self.key = key
        self.stats = stats
        self.attempt = 0
        self.tried: list[tuple[str, int]] = []
        self.backend: raw_socket | None = None
        self.ep: tuple[str, int] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def next(self) -> None:
        proxy = self.proxy
        while self.attempt < len(DIAL_TIMEOUTS):
            ep = proxy.table.pick(self.key.id, self.client_ip, time.monotonic(), self.tried)
            if ep is None:
                # Every endpoint tried and attempts left: go round again, as kube-proxy's NextEndpoint
                # does for each attempt (one slow endpoint gets its 500 ms, 1 s and 2 s tries too).
                # Our own listeners stay excluded; a round with no real attempt ends the dial.
                again = [t for t in self.tried if t in proxy.own]
                if len(again) == len(self.tried):
                    break
                self.tried = again
                continue
            self.tried.append(ep)
            if ep in proxy.own:
                # Our own listener: connecting would proxy this connection to ourselves, again and again.
                proxy.refuse_own(self.key, ep)
                self._count_retry(ep, "own listener")
                continue
            timeout = DIAL_TIMEOUTS[self.attempt]
            self.attempt += 1
            family = _AF_INET6 if ":" in ep[0] else _AF_INET
            try:
                sock = raw_socket(family, _STREAM_NONBLOCK)
            except OSError as err:
                # Pooled pipes hold descriptors: give them back and try once more.
                if not (is_fd_exhaustion(err) and proxy.trim_pool()):
                    self._out_of_resources(err)
                    return
                try:
                    sock = raw_socket(family, _STREAM_NONBLOCK)
                except OSError as again:
                    self._out_of_resources(again)
                    return
            code = sock.connect_ex(ep)
            if code == 0 or (code == _EINPROGRESS and _handshake_done(sock)):
                self.backend = sock
                self._connected(ep)
                return
            if code == _EINPROGRESS or code == _EAGAIN:
                self.backend = sock
                self.ep = ep
                proxy.dialing.add(self)
                proxy.poller.add_writer(sock.fileno(), self._on_writable)
                self.timer = proxy.loop.call_later(timeout, self._failed, ep, "timeout")
                return
            sock.close()
            self._count_retry(ep, errno.errorcode.get(code, str(code)))
        self._give_up("no endpoint" if not self.tried else "all endpoints failed")

    def _count_retry(self, ep: tuple[str, int], why: str) -> None:
        self.stats.retry()
        log.debug("%s: connect to %s:%d failed (%s)", self.key, ep[0], ep[1], why)

    def _on_writable(self) -> None:
        sock = self.backend
        ep = self.ep
        assert sock is not None and ep is not None
        code = sock.getsockopt(_SOL_SOCKET, _SO_ERROR)
        if code == _EINPROGRESS or code == _EAGAIN:
            return
        self._stop_waiting(connected=not code)
        if code:
            self._failed(ep, errno.errorcode.get(code, str(code)), stopped=True)
            return
        self._connected(ep)

    def _stop_waiting(self, *, connected: bool = False) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.backend is not None:
            if connected:
                # The pump registers the socket for reading right away: one epoll_ctl for both changes.
                self.proxy.poller.drop_writer(self.backend.fileno())
            else:
                self.proxy.poller.forget(self.backend.fileno())
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

    def _out_of_resources(self, err: OSError) -> None:
        if is_fd_exhaustion(err):
            self.proxy.pause(f"no descriptor for an endpoint socket ({err.strerror})")
        else:
            log.warning("%s: cannot create an endpoint socket: %s", self.key, err)
        self._give_up("resources")

    def _give_up(self, reason: str) -> None:
        self.stats.reject(reason)
        abort(self.client)

    def cancel(self) -> None:
        self._stop_waiting()  # forgets the backend fd in the poller
        if self.backend is not None:
            self.backend.close()
        abort(self.client)


class TcpProxy:
    """Every proxied TCP connection of the mode, independent of listeners.

    Descriptor budget: the proxy keeps an estimate of the descriptors the
    process holds (those open at start, listeners, two sockets per
    connection, pipes lent or pooled, and ``other_fds()`` for UDP). When
    another connection would leave fewer than ``reserve`` free, or the
    kernel says EMFILE/ENFILE anyway, accepting pauses on every listener at
    once; it resumes when a connection ends (or ``RESUME_AFTER`` later) and
    the estimate allows. Clients meanwhile wait in the listen backlog
    instead of being reset.
    """

    def __init__(self, *, loop: asyncio.AbstractEventLoop, table: EndpointTable,
                 stats_of: Callable[[TableKey], Stats], fd_limit: int = 1 << 20,
                 other_fds: Callable[[], int] = lambda: 0) -> None:
        self.loop = loop
        self.table = table
        self.stats_of = stats_of
        self.fd_limit = fd_limit
        self.reserve = fd_reserve(fd_limit)
        self.other_fds = other_fds
        self.base_fds = open_fds()
        # Pooled pipes keep two descriptors each: a small share of the budget.
        self.pool = PipePool(limit=min(PIPE_POOL_MAX, fd_limit // 32)) if USE_SPLICE else None
        self.connections: set[Connection] = set()
        self.dialing: set[_Dial] = set()
        self.listeners: set[TcpListener] = set()
        self.accepting = True
        self._resume_timer: asyncio.TimerHandle | None = None
        self._last_pause_log = 0.0
        self._flusher: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None
        self.poller = Poller(loop)
        self.own = OwnListeners()  # set by the mode after every sync
        self._own_logged: set[tuple[str, tuple[str, int]]] = set()
        self._check_at = 0  # open connections + dials at which the descriptor budget is next computed

    def fds_in_use(self) -> int:
        """Estimated descriptors held by the process."""
        pipes = self.pool.fds if self.pool is not None else 0
        return (self.base_fds + len(self.listeners) + 2 * (len(self.connections) + len(self.dialing))
                + pipes + self.other_fds())

    def listener_room(self, listeners: int) -> int:
        """How many more listening sockets may open now, with ``listeners`` open (TCP and UDP).

        Listeners may take at most ``listener_cap`` (connections always keep a quarter of the budget),
        and never what connections already hold.
        """
        cap = listener_cap(self.fd_limit, self.base_fds, self.reserve)
        free = self.fd_limit - self.reserve - self.fds_in_use()
        return max(0, min(cap - listeners, free))

    def has_room(self) -> bool:
        """Whether one more socket fits the budget without touching the reserve (UDP flows ask)."""
        return self.fds_in_use() + 1 + self.reserve <= self.fd_limit

    def _full(self) -> bool:
        return self.fds_in_use() + 2 + self.reserve > self.fd_limit

    def pause(self, why: str) -> None:
        """Stop accepting on every listener until a connection ends (or ``RESUME_AFTER``)."""
        if not self.accepting:
            return
        self.accepting = False
        metrics.ACCEPT_PAUSES.inc()
        now = time.monotonic()
        if now - self._last_pause_log >= 10:
            self._last_pause_log = now
            log.warning("userspace: pausing accepting: %s (%d connections open, ~%d of %d descriptors)",
                        why, len(self.connections), self.fds_in_use(), self.fd_limit)
        for listener in self.listeners:
            listener.stop_reading()
        self._resume_timer = self.loop.call_later(RESUME_AFTER, self.resume)

    def resume(self) -> None:
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        if self.accepting:
            return
        if self._full():
            self._resume_timer = self.loop.call_later(RESUME_AFTER, self.resume)
            return
        self.accepting = True
        self._check_at = 0
        for listener in self.listeners:
            listener.start_reading()

    def refuse_own(self, key: TableKey, ep: tuple[str, int]) -> None:
        """Log (once per service and endpoint) that ``ep`` is one of our own listeners."""
        if (key.id, ep) not in self._own_logged and len(self._own_logged) < 1024:
            self._own_logged.add((key.id, ep))
            log.warning("%s: endpoint %s:%d is one of proxyd's own listeners; never connected to", key, *ep)

    def trim_pool(self) -> bool:
        """Free the pooled pipes' descriptors; True when there were any."""
        return self.pool is not None and self.pool.trim() > 0

    def handle(self, client: raw_socket, client_ip: str, key: TableKey, stats: Stats) -> None:
        _Dial(self, client, client_ip, key, stats).next()
        if len(self.connections) + len(self.dialing) >= self._check_at:
            self._check_budget()

    def _check_budget(self) -> None:
        """Pause when the descriptor estimate is near the limit; else plan when to look again.

        Computing the estimate at every accept costs more than the accept's Python work: far from the
        limit it is done again only after a fraction of the headroom could have been used (a connection
        holds at most six descriptors: two sockets, two pipes). EMFILE at accept or socket() still pauses.
        """
        if self._full():
            self._check_at = 0
            self.pause("descriptor limit near")
            return
        headroom = self.fd_limit - self.reserve - self.fds_in_use()
        self._check_at = len(self.connections) + len(self.dialing) + max(0, headroom // 24)

    def established(self, client: raw_socket, backend: raw_socket, key: TableKey,
                    ep: tuple[str, int], stats: Stats) -> None:
        try:
            # The client socket inherited the same options from its listener.
            tune_tcp(backend)
            conn = Connection(loop=self.loop, poller=self.poller, client=client, backend=backend, key=key,
                              endpoint=ep, pool=self.pool, on_close=self._closed, on_starved=self._starved,
                              stats=stats)
        except OSError as err:
            # Out of descriptors for pipes, or the client already reset.
            log.debug("%s: cannot start pumping: %s", key, err)
            stats.reject("resources" if is_fd_exhaustion(err) else "client gone")
            self.poller.forget(backend.fileno())
            abort(client)
            abort(backend)
            return
        self.table.open(key.id, ep)
        stats.opened(ep)
        self.connections.add(conn)
        # The client got its handshake before accept and usually sent its first bytes while we connected.
        conn.start(client_first=True)
        if self._flusher is None:
            self._flusher = self.loop.call_later(BYTES_FLUSH_INTERVAL, self._flush_bytes)

    def _starved(self, err: OSError) -> None:
        self.pause(f"no descriptors for pipes ({err.strerror})")

    def _closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.accepting:
            self.resume()
        if self._drained is not None and not self.connections:
            self._drained.set()
        key: TableKey = conn.key  # type: ignore[assignment]
        stats: Stats = conn.stats  # type: ignore[assignment]
        stats.closed(*conn.take_bytes(), conn.endpoint)
        self.table.close(key.id, conn.endpoint)

    def _flush_bytes(self) -> None:
        self._flusher = None
        for conn in self.connections:
            conn.stats.add_bytes(*conn.take_bytes(), conn.endpoint)  # type: ignore[attr-defined]
        if self.connections:
            self._flusher = self.loop.call_later(BYTES_FLUSH_INTERVAL, self._flush_bytes)

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for connections to end, then reset the rest; how many were reset."""
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
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
        self.poller.close()
        return len(left)


def _handshake_done(sock: raw_socket) -> bool:
    """Whether a non-blocking connect that said EINPROGRESS has completed already.

    To an endpoint behind a veth on this node the handshake usually completes inside connect()
    itself: one getpeername() then saves the epoll registration, the timer and the wake-up. A
    remote endpoint pays this one failing syscall.
    """
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


class TcpListener:
    """A listening socket feeding accepted connections for one table key to the ``TcpProxy``."""

    def __init__(self, *, proxy: TcpProxy, sock: socket.socket, key: TableKey) -> None:
        self.proxy = proxy
        self.sock = sock
        self.key = key
        self.loop = proxy.loop
        self.reading = False
        self.admits: Callable[[str], bool] | None = None
        self._stats: Stats | None = None  # the key's metrics, looked up on first use
        self._fd = sock.fileno()
        self._family = int(sock.family)
        proxy.listeners.add(self)
        if proxy.accepting:
            self.start_reading()

    def retarget(self, key: TableKey) -> None:
        """Serve another table key from now on (the listener changed owner)."""
        self.key = key
        self._stats = None

    def start_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.loop.add_reader(self._fd, self._on_accept)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self._fd)

    def _on_accept(self) -> None:
        # The C-level accept returns a bare fd: no Python socket constructor, no family/type enum lookups.
        accept = self.sock._accept  # type: ignore[attr-defined]  # socket.socket has it; typeshed does not say
        family = self._family
        proxy = self.proxy
        key = self.key
        stats = self._stats
        if stats is None:
            stats = self._stats = proxy.stats_of(key)
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as err:
                if is_fd_exhaustion(err):
                    proxy.pause(f"accept: {err.strerror}")
                else:
                    log.warning("accept on %s failed: %s", self.sock.getsockname(), err)
                return
            client = raw_socket(family, _STREAM, 0, fd)
            if self.admits is not None and not self.admits(addr[0]):
                stats.reject("source range")
                abort(client)
                continue
            client.setblocking(False)
            proxy.handle(client, addr[0], key, stats)
            if not proxy.accepting:
                return

    def close(self) -> None:
        self.stop_reading()
        self.proxy.listeners.discard(self)
        self.sock.close()
