"""UDP in userspace mode: one flow per client address, one connected endpoint socket per flow.

This asyncio path is the twin of the native engine's UDP thread
(``native/engine_udp.h``, driven through ``udp_engine.NativeUdpPath``): it
serves when the extension is missing or ``PROXYD_NO_EXTENSIONS=1``, and the
tests drive both with the same datagrams (``tests/unit/test_udp_engine.py``).

A ``UdpListener`` owns the socket bound to the service address (or a
NodePort). The first datagram of a client picks an endpoint from the
connection table (round robin, ClientIP affinity) and opens a socket
connected to it; the flow is stored in the connection table's flow table
(``udp_get``/``udp_set``) and later datagrams reuse it. Replies read from the
endpoint socket are sent back through the listening socket, so they come
from the service address and port the client talked to; on a wildcard
NodePort listener the address the client used is taken from ``IP_PKTINFO``
(``IPV6_PKTINFO`` on the IPv6 wildcard) and replies are sent from it. IPv6
flows work like IPv4 ones: the client key is ``(address, port)``, the
endpoint socket is of the endpoint's family (always the listener's: each
family's listeners feed only that family's endpoints).

A flow ends when idle for ``udp_idle_timeout`` (kube-proxy's --udp-timeout;
``UdpProxy`` sweeps with ``udp_expire``), when the flow table is full (the
connection table evicts the least recently used flow; counted), when its
endpoint stops being usable (``set_endpoints``/``remove_service`` hand the
flow back and the mode calls ``closed_by_table``: the client's next
datagram then picks a live endpoint, as conntrack cleanup gives kernel
modes), or when the endpoint answers with ICMP unreachable (the flow is
marked dead and replaced at the next datagram).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

from proxyd import metrics
from proxyd.modes.userspace.listeners import OwnListeners
from proxyd.modes.userspace.planner import TableEntry, TableKey
from proxyd.modes.userspace.stats import Stats

log = logging.getLogger(__name__)

RECV_BATCH = 64
MAX_DATAGRAM = 65535
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_PKTINFO6 = struct.Struct("=16sI")  # struct in6_pktinfo: addr, ifindex
_ANC_SIZE = socket.CMSG_SPACE(max(_PKTINFO.size, _PKTINFO6.size))


class Flow:
    __slots__ = ("client", "closed", "endpoint", "key", "listener", "local", "nbytes_in", "nbytes_out",
                 "proxy", "sock")

    def __init__(self, *, proxy: UdpProxy, listener: UdpListener, client: tuple[str, int],
                 endpoint: tuple[str, int], sock: socket.socket, local: bytes | None) -> None:
        self.proxy = proxy
        self.listener = listener
        self.key = listener.key
        self.client = client
        self.endpoint = endpoint
        self.sock = sock
        self.local = local
        self.closed = False
        self.nbytes_in = 0
        self.nbytes_out = 0

    def on_reply(self) -> None:
        listener = self.listener
        for _ in range(RECV_BATCH):
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ICMP unreachable from the endpoint: the next datagram picks again.
                self.proxy.close_flow(self)
                return
            self.nbytes_out += len(data)
            listener.reply(self, data)


class UdpProxy:
    """Flows of every UDP listener, kept in the connection table."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, table: Any, stats_of: Callable[[TableKey], Stats],
                 idle_timeout: float, has_room: Callable[[], bool] = lambda: True) -> None:
        self.loop = loop
        # Whether the descriptor budget has room for one more socket (the reserve stays untouched).
        self.has_room = has_room
        self.table = table
        self.stats_of = stats_of
        self.idle_timeout = max(idle_timeout, 0.01)
        self._sweeper: asyncio.TimerHandle | None = None
        self.own = OwnListeners()  # set by the mode after every sync
        self._own_logged: set[tuple[str, tuple[str, int]]] = set()

    def forward(self, listener: UdpListener, client: tuple[str, int], data: bytes,
                local: bytes | None) -> None:
        now = time.monotonic()
        found = self.table.udp_get(listener.key_id, client, now)
        flow: Flow | None = found[1] if found is not None else None
        if flow is None or flow.closed or flow.listener is not listener:
            flow = self._open(listener, client, local, now)
            if flow is None:
                return
        try:
            flow.sock.send(data)
            flow.nbytes_in += len(data)
        except (BlockingIOError, InterruptedError):
            pass  # the endpoint socket's buffer is full: drop, as a router would
        except OSError:
            self.close_flow(flow)

    def _open(self, listener: UdpListener, client: tuple[str, int], local: bytes | None,
              now: float) -> Flow | None:
        key = listener.key
        stats = self.stats_of(key)
        ep = self.table.pick(listener.key_id, client[0], now, ())
        tried: list[tuple[str, int]] = []
        while ep is not None and ep in self.own:
            # One of our own sockets: the datagram would come back to us and circulate.
            if (key.id, ep) not in self._own_logged and len(self._own_logged) < 1024:
                self._own_logged.add((key.id, ep))
                log.warning("udp %s: endpoint %s:%d is one of proxyd's own listeners; never sent to",
                            key, *ep)
            tried.append(ep)
            ep = self.table.pick(listener.key_id, client[0], now, tried)
        if ep is None:
            stats.reject("no endpoint")
            return None
        if not self.has_room():
            stats.reject("resources")
            return None
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in ep[0] else socket.AF_INET,
                                 socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        except OSError as err:
            stats.reject("resources")
            log.debug("udp %s: no socket for a new flow: %s", key, err)
            return None
        try:
            sock.connect(ep)
        except OSError:
            sock.close()
            stats.reject("all endpoints failed")
            return None
        flow = Flow(proxy=self, listener=listener, client=client, endpoint=ep, sock=sock, local=local)
        for old_key, old_client, _ep, old in self.table.udp_set(listener.key_id, client, ep, flow, now):
            if (old_key, old_client) != (listener.key_id, client):
                metrics.UDP_FLOWS_EVICTED.inc()
            self.close_flow(old)
        self.table.open(listener.key_id, ep)
        stats.opened(ep)
        self.loop.add_reader(sock.fileno(), flow.on_reply)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle_timeout, self._sweep)
        return flow

    # -- the interface userspace mode and its applier use (``udp_engine.UdpPath``)

    native = False

    def listen(self, sock: socket.socket, key: TableKey) -> UdpListener:
        return UdpListener(proxy=self, sock=sock, key=key)

    def set_endpoints(self, key: TableKey, entry: TableEntry, now: float) -> None:
        self.closed_by_table(self.table.set_endpoints(key.id, entry.endpoints, entry.affinity_timeout, now))

    def remove_service(self, key: TableKey) -> None:
        self.closed_by_table(self.table.remove_service(key.id))

    def sweep(self, now: float) -> None:
        pass  # the shared table's sweep covers UDP keys

    def flush(self) -> None:
        pass  # flows update their Stats themselves

    def flow_fds(self) -> int:
        """Descriptors the flows hold (one socket each)."""
        return int(self.table.udp_count())

    def close_flow(self, flow: Flow) -> None:
        """Close a flow's endpoint socket (idempotent); its table entry goes by replacement or expiry."""
        if flow.closed:
            return
        flow.closed = True
        self.loop.remove_reader(flow.sock.fileno())
        flow.sock.close()
        stats = self.stats_of(flow.key)
        stats.closed(flow.nbytes_in, flow.nbytes_out, flow.endpoint)
        self.table.close(flow.key.id, flow.endpoint)

    def closed_by_table(self, dropped: Iterable[tuple[Any, ...]]) -> None:
        """Close the flows ``set_endpoints``/``remove_service`` handed back (value is the last item)."""
        for item in dropped:
            self.close_flow(item[-1])

    def _sweep(self) -> None:
        self._sweeper = None
        for *_, flow in self.table.udp_expire(time.monotonic(), self.idle_timeout):
            self.close_flow(flow)
        if self.table.udp_count():
            self._sweeper = self.loop.call_later(self.idle_timeout / 2, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for *_, flow in self.table.udp_expire(float("inf"), 0.0):
            self.close_flow(flow)


class UdpListener:
    """A UDP service socket; datagrams go to ``UdpProxy.forward``."""

    def __init__(self, *, proxy: UdpProxy, sock: socket.socket, key: TableKey) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.sock = sock
        self.key = key
        self.key_id = key.id
        self.admits: Callable[[str], bool] | None = None
        self.wildcard = receive_pktinfo(sock)
        self.v6 = sock.family == socket.AF_INET6
        self._fd = sock.fileno()
        self.loop.add_reader(self._fd, self._on_readable)

    def retarget(self, key: TableKey) -> None:
        self.key = key
        self.key_id = key.id

    def _on_readable(self) -> None:
        forward = self.proxy.forward
        for _ in range(RECV_BATCH):
            try:
                if self.wildcard:
                    data, anc, _flags, client = self.sock.recvmsg(MAX_DATAGRAM, _ANC_SIZE)
                    local = _pktinfo_dst(anc)
                else:
                    data, client = self.sock.recvfrom(MAX_DATAGRAM)
                    local = None
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                # ICMP errors for replies we sent surface here; they are not fatal.
                if err.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    log.debug("udp %s: recv failed: %s", self.key, err)
                continue
            if self.admits is not None and not self.admits(client[0]):
                continue  # outside loadBalancerSourceRanges: dropped, as the kernel modes do
            forward(self, client[:2], data, local)

    def reply(self, flow: Flow, data: bytes) -> None:
        try:
            if flow.local is not None:
                if self.v6:
                    anc = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, _PKTINFO6.pack(flow.local, 0))]
                else:
                    anc = [(socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, flow.local, b"\0" * 4))]
                self.sock.sendmsg([data], anc, 0, flow.client)
            else:
                self.sock.sendto(data, flow.client)
        except OSError as err:
            log.debug("udp %s: reply to %s failed: %s", self.key, flow.client, err)

    def close(self) -> None:
        """Stop receiving; flows of this listener end by idle timeout or endpoint changes."""
        self.loop.remove_reader(self._fd)
        with contextlib.suppress(OSError):
            self.sock.close()


def receive_pktinfo(sock: socket.socket) -> bool:
    """On a wildcard listener, ask for the address each datagram was sent to; whether it is one."""
    if sock.getsockname()[0] not in ("0.0.0.0", "::"):
        return False
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    return True


def _pktinfo_dst(ancillary: list[tuple[int, int, bytes]]) -> bytes | None:
    """The destination address the client used, packed, from IP_PKTINFO or IPV6_PKTINFO."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _PKTINFO.size:
            dst: bytes = _PKTINFO.unpack_from(data)[2]  # ipi_addr: the destination the client used
            return dst
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= _PKTINFO6.size:
            dst6: bytes = _PKTINFO6.unpack_from(data)[0]  # ipi6_addr
            return dst6
    return None
