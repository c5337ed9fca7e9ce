"""Readiness of the TCP data path's sockets: proxyd's own epoll set, watched by the event loop as one fd.

Going through ``loop.add_reader``/``add_writer`` costs, on uvloop, a
``Handle`` per registration, a poll handle per descriptor and a
``WeakValueDictionary`` lookup (the check that no transport owns the fd) on
every add and remove: a measurable share of the CPU per new connection.
``Poller`` keeps the same add/remove reader/writer contract on a plain
``select.epoll`` (level-triggered, one ``epoll_ctl`` per change) and the loop
only watches the epoll descriptor; each loop wake-up dispatches a batch of
ready sockets to their callbacks. Readers get the event mask, so one that
sees ``RDHUP`` can read the EOF right after the data instead of waiting for
another wake-up.

Closing a descriptor removes it from the epoll set in the kernel, so sockets
are not unregistered before they close: ``forget(fd)`` right before the
close drops the callbacks without a syscall. A descriptor forgotten while a
batch is being dispatched gets no further callback from that batch, even if
a new socket reuses its number in the meantime (its stale readiness belongs
to the closed socket).

A callback that raises is reported to the loop's exception handler, as the
loop does for its own callbacks, and the batch goes on.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable

BATCH = 256

RDHUP = select.EPOLLRDHUP
# RDHUP (the peer shut down writing) tells a reader that the EOF is already there behind the data.
_IN = select.EPOLLIN | RDHUP
_OUT = select.EPOLLOUT
# Hang-up and error are reported whatever the mask: both callbacks get to see them (their syscall then fails).
_READ_EVENTS = select.EPOLLIN | RDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR

Callback = Callable[[], None]
ReadCallback = Callable[[int], None]  # gets the epoll event mask


class Poller:
    """Level-triggered readiness callbacks for raw descriptors, one epoll set behind one loop reader."""

    __slots__ = ("_dead", "_ep", "_loop", "_masks", "_readers", "_writers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ep = select.epoll()
        self._readers: dict[int, ReadCallback] = {}
        self._writers: dict[int, Callback] = {}
        self._masks: dict[int, int] = {}  # what the kernel has, per registered fd
        self._dead: set[int] | None = None  # fds forgotten during the batch being dispatched
        loop.add_reader(self._ep.fileno(), self._dispatch)

    def add_reader(self, fd: int, callback: ReadCallback) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def drop_writer(self, fd: int) -> None:
        """Remove the writer callback but leave the kernel mask until the next change of ``fd`` (no syscall).

        For a descriptor that gets a reader right after: one ``epoll_ctl`` instead of two.
        """
        self._writers.pop(fd, None)

    def drop_reader(self, fd: int) -> None:
        """Remove the reader callback, leaving the kernel mask (for a descriptor about to be closed)."""
        self._readers.pop(fd, None)

    def forget(self, fd: int) -> None:
        """Drop every callback of ``fd``; call right before closing it (the close unregisters it)."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._masks.pop(fd, None)
        if self._dead is not None:
            self._dead.add(fd)

    def _update(self, fd: int) -> None:
        mask = (_IN if fd in self._readers else 0) | (_OUT if fd in self._writers else 0)
        old = self._masks.get(fd)
        if old == mask:
            return
        ep = self._ep
        if not mask:
            # Nobody waits: leave the set, or hang-up and error would be reported again and again.
            del self._masks[fd]
            try:
                ep.unregister(fd)
            except OSError:
                pass  # closed without forget(): the kernel dropped it already
            return
        self._masks[fd] = mask
        if old is None:
            try:
                ep.register(fd, mask)
            except FileExistsError:
                ep.modify(fd, mask)
        else:
            try:
                ep.modify(fd, mask)
            except FileNotFoundError:
                ep.register(fd, mask)

    def _dispatch(self) -> None:
        try:
            events = self._ep.poll(0, BATCH)
        except InterruptedError:
            return
        readers = self._readers
        writers = self._writers
        self._dead = dead = set[int]()
        try:
            for fd, ev in events:
                if fd in dead:
                    continue
                try:
                    if ev & _READ_EVENTS:
                        reader = readers.get(fd)
                        if reader is not None:
                            reader(ev)
                    if ev & _WRITE_EVENTS and fd not in dead:
                        writer = writers.get(fd)
                        if writer is not None:
                            writer()
                except Exception as exc:  # one broken connection must not stop the others
                    self._loop.call_exception_handler({
                        "message": "exception in a userspace data-path callback", "exception": exc})
        finally:
            self._dead = None

    def close(self) -> None:
        self._loop.remove_reader(self._ep.fileno())
        self._ep.close()
        self._readers.clear()
        self._writers.clear()
        self._masks.clear()
