"""Moving bytes between two connected TCP sockets: splice(2) through a pipe per direction.

Each direction (``Half``) reads its source socket into a kernel pipe and
splices the pipe into the destination socket, so payload never enters
Python. Sockets are raw, non-blocking, and driven by a ``Poller``
(``poller.py``: proxyd's own epoll set, watched by the loop as one fd; this
works on uvloop and asyncio alike; uvloop transports cannot splice).

Backpressure: a direction reads only while its pipe is empty. When the
destination cannot take everything, the direction stops reading its source
and waits for the destination to become writable; once the pipe is drained
it reads again. So at most one pipe's worth of data is in flight per
direction and a slow receiver slows the sender down through TCP.

Half-close: EOF on a source is passed on, once its pipe is drained, as
``shutdown(SHUT_WR)`` on the destination; the other direction keeps going.
The connection ends when both directions have seen EOF.

Reset: any error on either socket (ECONNRESET, EPIPE, ...) aborts the whole
connection: both sockets are closed with ``SO_LINGER`` 0, so the peer that
is still there gets an RST, as it would from the other end directly.

Pipes are sized with ``F_SETPIPE_SZ`` and lent from a pool only while a
direction holds data (as HAProxy does): an idle connection costs two
descriptors, not six, and a busy one reuses pooled pipes without syscalls. Where splice is unavailable
(no ``os.splice``, or ``PROXYD_USERSPACE_COPY=1`` in the environment) the same
state machine copies through a user-space buffer with recv_into/send.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable

from proxyd.modes.userspace.poller import RDHUP, Poller

F_SETPIPE_SZ = 1031
PIPE_SIZE = 256 * 1024
COPY_BUFFER = 64 * 1024
PIPE_POOL_MAX = 256
STARVED_RETRY = 0.02  # seconds a direction waits before trying again to get a pipe
USE_SPLICE = hasattr(os, "splice") and os.environ.get("PROXYD_USERSPACE_COPY", "") not in ("1", "true", "yes")

_SPLICE_FLAGS = (getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2))
_LINGER_ZERO = struct.pack("ii", 1, 0)


class PipePool:
    """Pipes (read fd, write fd, capacity) lent to connections while they hold data.

    ``outstanding`` pipes are lent out; up to ``limit`` empty ones wait in
    the pool. ``fds`` is what both hold, for the descriptor budget.
    """

    def __init__(self, size: int = PIPE_SIZE, limit: int = PIPE_POOL_MAX) -> None:
        self.size = size
        self.limit = limit
        self.outstanding = 0
        self._free: list[tuple[int, int, int]] = []

    @property
    def fds(self) -> int:
        return 2 * (self.outstanding + len(self._free))

    def get(self) -> tuple[int, int, int]:
        if self._free:
            self.outstanding += 1
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            capacity = fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:
            capacity = 65536  # the kernel default; the limit may be lower for this user
        self.outstanding += 1
        return r, w, capacity

    def put(self, pipe: tuple[int, int, int], *, empty: bool) -> None:
        self.outstanding -= 1
        if empty and len(self._free) < self.limit:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def trim(self) -> int:
        """Close every pooled pipe (descriptors ran short); how many were closed."""
        count = len(self._free)
        while self._free:
            r, w, _ = self._free.pop()
            os.close(r)
            os.close(w)
        return count

    def close(self) -> None:
        self.trim()


def abort(sock: _socket.socket) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    sock.close()


class Half:
    """One direction of a proxied connection: ``src`` → pipe → ``dst``.

    The pipe is borrowed from the pool when data arrives and given back as
    soon as it is drained, so an idle connection holds two sockets and no
    pipe. When no pipe can be had (descriptors ran out) the direction stops
    reading for ``STARVED_RETRY`` seconds and tries again: data waits in the
    socket buffers, nothing is lost or reset.
    """

    __slots__ = ("buffered", "capacity", "conn", "dfd", "dst", "eof", "finished", "loop", "nbytes", "pipe",
                 "poller", "pool", "reading", "retry", "sfd", "src", "writing")

    def __init__(self, conn: Connection, src: _socket.socket, dst: _socket.socket) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.poller = conn.poller
        self.pool = conn.pool
        self.src = src
        self.dst = dst
        self.sfd = src.fileno()
        self.dfd = dst.fileno()
        self.pipe: tuple[int, int, int] | None = None
        self.capacity = COPY_BUFFER
        self.buffered = 0
        self.nbytes = 0
        self.eof = False
        self.finished = False
        self.reading = False
        self.writing = False
        self.retry: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.reading = True
        self.poller.add_reader(self.sfd, self.on_events)

    def stop(self) -> None:
        if self.reading:
            self.reading = False
            self.poller.remove_reader(self.sfd)
        if self.writing:
            self.writing = False
            self.poller.remove_writer(self.dfd)
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None

    def detach(self) -> None:
        """Stop without touching the poller: the connection forgets both descriptors and closes them."""
        self.reading = self.writing = False
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None

    def release(self) -> None:
        """Give the pipe back (at close, also when it still holds data: it is then closed)."""
        if self.pipe is not None:
            self.pool.put(self.pipe, empty=self.buffered == 0)  # type: ignore[union-attr]
            self.pipe = None

    def on_events(self, events: int) -> None:
        """The poller's callback: read; if the peer has also shut down writing (``RDHUP``) and this
        read left nothing buffered, take the EOF in the same wake-up instead of the next one."""
        self.on_readable()
        if events & RDHUP and self.reading and not self.buffered:
            self.on_readable()

    def on_readable(self) -> None:
        n = self._read()
        if n is None:
            return
        if n == 0:
            self._on_eof()
            return
        self.flush()

    def _read(self) -> int | None:
        """Move what ``src`` has into the pipe: bytes moved (0 at EOF); None when none came or it failed."""
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pool.get()  # type: ignore[union-attr]
            except OSError as err:
                self._starved(err)
                return None
            self.pipe = pipe
        try:
            n = os.splice(self.sfd, pipe[1], pipe[2], flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            if not self.buffered:
                self.release()
            return None
        except OSError:
            self.conn.abort()
            return None
        self.buffered += n
        return n

    def _starved(self, err: OSError) -> None:
        if self.reading:
            self.reading = False
            self.poller.remove_reader(self.sfd)
        self.retry = self.loop.call_later(STARVED_RETRY, self._retry)
        self.conn.starved(err)

    def _retry(self) -> None:
        self.retry = None
        if not self.conn.closed and not self.eof and not self.reading and not self.buffered:
            self.reading = True
            self.poller.add_reader(self.sfd, self.on_events)

    def on_writable(self) -> None:
        self.flush()

    def flush(self) -> None:
        pr = self.pipe[0]  # type: ignore[index]
        while self.buffered:
            try:
                m = os.splice(pr, self.dfd, self.buffered, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.conn.abort()
                return
            self.buffered -= m
            self.nbytes += m
        self._after_flush()

    def _after_flush(self) -> None:
        if self.buffered:
            # Destination full: stop reading until it drains (backpressure).
            if self.reading:
                self.reading = False
                self.poller.remove_reader(self.sfd)
            if not self.writing:
                self.writing = True
                self.poller.add_writer(self.dfd, self.on_writable)
            return
        if self.writing:
            self.writing = False
            self.poller.remove_writer(self.dfd)
        if self.pipe is not None:
            self.release()
        if self.eof:
            self._finish()
        elif not self.reading:
            self.reading = True
            self.poller.add_reader(self.sfd, self.on_events)

    def _on_eof(self) -> None:
        self.eof = True
        if self.pipe is not None and not self.buffered:
            self.release()
        if self.reading:
            self.reading = False
            if self.buffered or not self.conn.done_halves:
                self.poller.remove_reader(self.sfd)
            else:
                # The other direction is done and this one is about to be: the close unregisters the fd.
                self.poller.drop_reader(self.sfd)
        if not self.buffered:
            self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if not self.conn.done_halves:
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                # The destination is gone already; nothing more to pass on.
                pass
        # else: both directions are done and the close right after sends the FIN (nothing is left unread).
        self.conn.half_done()


class CopyHalf(Half):
    """The same direction with a user-space buffer, for kernels or builds without splice."""

    __slots__ = ("buf", "offset", "view")

    def __init__(self, conn: Connection, src: _socket.socket, dst: _socket.socket) -> None:
        super().__init__(conn, src, dst)
        self.buf = bytearray(COPY_BUFFER)
        self.view = memoryview(self.buf)
        self.offset = 0

    def _read(self) -> int | None:
        try:
            n = self.src.recv_into(self.buf)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self.conn.abort()
            return None
        self.buffered = n
        self.offset = 0
        return n

    def flush(self) -> None:
        while self.buffered:
            try:
                m = self.dst.send(self.view[self.offset:self.offset + self.buffered])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.conn.abort()
                return
            self.offset += m
            self.buffered -= m
            self.nbytes += m
        self._after_flush()


class Connection:
    """A client socket joined to an endpoint socket; calls ``on_close(self)`` once at the end.

    ``on_starved(err)`` is called when a direction could not get a pipe
    (the owner pauses accepting); the direction retries by itself.
    """

    __slots__ = ("backend", "client", "closed", "done_halves", "endpoint", "flushed_in", "flushed_out", "key",
                 "loop", "on_close", "on_starved", "poller", "pool", "stats", "to_client", "to_endpoint")

    def __init__(self, *, loop: asyncio.AbstractEventLoop, poller: Poller, client: _socket.socket,
                 backend: _socket.socket, key: object, endpoint: tuple[str, int], pool: PipePool | None,
                 on_close: Callable[[Connection], None],
                 on_starved: Callable[[OSError], None] | None = None, stats: object = None) -> None:
        self.loop = loop
        self.poller = poller
        self.client = client
        self.backend = backend
        self.key = key
        self.endpoint = endpoint
        self.pool = pool
        self.on_close = on_close
        self.on_starved = on_starved
        self.stats = stats  # the owner's per-service record, kept here to save a lookup at close
        self.closed = False
        self.done_halves = 0
        self.flushed_in = 0
        self.flushed_out = 0
        if pool is not None:
            self.to_endpoint: Half = Half(self, client, backend)
            self.to_client: Half = Half(self, backend, client)
        else:
            self.to_endpoint = CopyHalf(self, client, backend)
            self.to_client = CopyHalf(self, backend, client)

    def start(self, *, client_first: bool = False) -> None:
        """Start pumping; ``client_first``: the client has likely sent already, read it now.

        The speculative read saves a trip through the poller for protocols where the client speaks
        first (HTTP); when nothing is there it costs one splice that fails with EAGAIN.
        """
        self.to_endpoint.start()
        self.to_client.start()
        if client_first:
            self.to_endpoint.on_readable()

    def starved(self, err: OSError) -> None:
        if self.on_starved is not None:
            self.on_starved(err)

    def take_bytes(self) -> tuple[int, int]:
        """Bytes moved (to endpoint, to client) since the last call."""
        up, down = self.to_endpoint.nbytes, self.to_client.nbytes
        delta = (up - self.flushed_in, down - self.flushed_out)
        self.flushed_in, self.flushed_out = up, down
        return delta

    def half_done(self) -> None:
        self.done_halves += 1
        if self.done_halves == 2:
            self._close(reset=False)

    def abort(self) -> None:
        self._close(reset=True)

    def close(self, *, reset: bool = False) -> None:
        self._close(reset=reset)

    def _close(self, *, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for half in (self.to_endpoint, self.to_client):
            half.detach()
            half.release()
        self.poller.forget(self.to_endpoint.sfd)
        self.poller.forget(self.to_client.sfd)
        if reset:
            abort(self.client)
            abort(self.backend)
        else:
            self.client.close()
            self.backend.close()
        self.on_close(self)
        # Break the connection <-> direction cycle so refcounting frees both now, not the cyclic GC later.
        del self.to_endpoint, self.to_client


def is_fd_exhaustion(err: OSError) -> bool:
    return err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
