"""Opening the listening sockets of userspace mode.

Every socket is non-blocking. No ``SO_REUSEPORT``: with it, any other
process of the same user (root, in the DaemonSet) could bind the same
address and port and take a share of the service's traffic. TCP listeners
set ``SO_REUSEADDR`` only, so a restart can bind while old connections sit
in TIME_WAIT; Linux still refuses a second bind of a listening TCP
address (and a specific address under a listening wildcard). UDP sockets set
nothing: for UDP, ``SO_REUSEADDR`` on both sides lets any process bind the
very same address and port and steal datagrams, and UDP has no TIME_WAIT to
wait for. A wildcard NodePort and a service address with the same port
number (say ClusterIP 10.96.0.10:30080) therefore cannot both be bound;
the planner gives such a NodePort one listener per node address instead
(``planner.merge``). ``IP_FREEBIND`` lets a socket bind a service address
even when the address is still being added (or could not be), so one failed
address never stops the rest of a sync.
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
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


_UNSPECIFIED = ("0.0.0.0", "::")


class OwnListeners:
    """What proxyd's own listeners of one protocol accept: the data path never connects there.

    An endpoint that is one of them would be accepted by proxyd again and
    proxied again, without end. The desired state is filtered of such
    endpoints already (``proxyd.selfloop``); this guard holds whatever the
    state says, between syncs too: an endpoint ``(ip, port)`` is ours when a
    listener is bound to exactly it, or when a wildcard listener has the port
    and ``ip`` is local — a node or service address known at the last sync,
    the unspecified address, or (for an address added since) one the kernel
    lets a socket bind, which only a local address allows. That last check
    costs a socket and a bind, and only endpoints on a wildcard listener's
    port (a NodePort) that are not known local ever pay it.
    """

    __slots__ = ("local_ips", "nonlocal_bind", "specific", "wildcard_ports")

    def __init__(self, keys: Sequence[ListenerKey] = (), local_ips: Sequence[str] = (), *,
                 nonlocal_bind: bool = False) -> None:
        self.specific = {(k.ip, k.port) for k in keys if k.ip not in _UNSPECIFIED}
        self.wildcard_ports = {k.port for k in keys if k.ip in _UNSPECIFIED}
        self.local_ips = frozenset(local_ips)
        # With net.ipv4.ip_nonlocal_bind every address binds: the bind check would refuse remote endpoints.
        self.nonlocal_bind = nonlocal_bind

    def __contains__(self, endpoint: tuple[str, int]) -> bool:
        if endpoint in self.specific:
            return True
        if endpoint[1] not in self.wildcard_ports:
            return False
        ip = endpoint[0]
        if ip in self.local_ips or ip in _UNSPECIFIED:
            return True
        return not self.nonlocal_bind and _bindable(ip)


def _bindable(ip: str) -> bool:
    """Whether ``ip`` is an address of this namespace (a socket can bind it without IP_FREEBIND)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((ip, 0))
    except OSError:
        return False
    return True


def nonlocal_bind() -> bool:
    """net.ipv4.ip_nonlocal_bind or net.ipv6.ip_nonlocal_bind of this namespace (read at each sync)."""
    for fam in ("ipv4", "ipv6"):
        try:
            with open(f"/proc/sys/net/{fam}/ip_nonlocal_bind") as f:
                if f.read().strip() != "0":
                    return True
        except OSError:
            pass
    return False
