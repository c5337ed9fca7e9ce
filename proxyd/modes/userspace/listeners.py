"""Opening the listening sockets of userspace mode.

Every socket is non-blocking and bound with ``SO_REUSEADDR`` and
``SO_REUSEPORT``: a NodePort listening on the wildcard address and a
service address with the same port number (say ClusterIP 10.96.0.10:30080)
can then coexist, and the kernel hands each packet to the most specific
socket. ``IP_FREEBIND`` lets a socket bind a service address even when the
address is still being added (or could not be), so one failed address never
stops the rest of a sync.
"""

from __future__ import annotations

import _socket
import ipaddress
import socket
from collections.abc import Sequence

from proxyd.model import Protocol
from proxyd.modes.userspace.planner import ListenerKey

BACKLOG = 4096
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78
KEEPALIVE_IDLE = 15
KEEPALIVE_INTERVAL = 15


def tune_tcp(sock: _socket.socket) -> None:
    """Options of every proxied TCP socket: no Nagle delay, and keepalive.

    Keepalive (15 s idle, 15 s between probes, like the Go dialer
    kube-proxy userspace used) reaps connections whose peer vanished
    silently, which would otherwise hold two sockets and two pipes forever.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)


def open_socket(key: ListenerKey) -> socket.socket:
    """A bound (and, for TCP, listening) non-blocking socket for ``key``; OSError on failure."""
    v6 = ":" in key.ip
    family = socket.AF_INET6 if v6 else socket.AF_INET
    kind = socket.SOCK_STREAM if key.protocol == Protocol.TCP else socket.SOCK_DGRAM
    if key.protocol not in (Protocol.TCP, Protocol.UDP):
        raise OSError(f"userspace mode cannot serve {key.protocol}")
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((key.ip, key.port))
        if kind == socket.SOCK_STREAM:
            # Accepted sockets inherit these, so clients cost no extra syscalls.
            tune_tcp(sock)
            sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class SourceFilter:
    """Which client addresses a listener admits (``loadBalancerSourceRanges``)."""

    __slots__ = ("_networks", "ranges")

    def __init__(self, ranges: Sequence[str]) -> None:
        self.ranges = tuple(ranges)
        self._networks = [ipaddress.ip_network(r, strict=False) for r in ranges]

    def __call__(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self._networks if net.version == addr.version)
