"""The userspace data path never connects to its own listeners (issue 14.1), whatever the state says.

``OwnListeners`` on its own, then a real ``TcpProxy`` and ``UdpProxy`` on this
process's loopback whose connection table offers only the proxy's own
listener as the endpoint: the client is refused at once and nothing loops.
"""

from __future__ import annotations

import asyncio
import socket
import time

from proxyd import metrics
from proxyd.model import Protocol, ServicePortName
from proxyd.modes.userspace.listeners import OwnListeners, open_socket
from proxyd.modes.userspace.planner import ListenerKey, TableKey
from proxyd.modes.userspace.stats import StatsCache
from proxyd.modes.userspace.tcp import TcpListener, TcpProxy
from proxyd.modes.userspace.udp import UdpListener, UdpProxy

TCP, UDP = Protocol.TCP, Protocol.UDP


def test_own_listeners_specific_and_wildcard() -> None:
    own = OwnListeners([ListenerKey("10.96.0.10", 80, TCP), ListenerKey("0.0.0.0", 30080, TCP)],
                       ["203.0.113.1", "10.96.0.10"])
    assert ("10.96.0.10", 80) in own
    assert ("10.96.0.10", 81) not in own
    assert ("10.244.1.11", 80) not in own
    for ip in ("203.0.113.1", "10.96.0.10", "127.0.0.1", "127.3.4.5", "0.0.0.0"):
        assert (ip, 30080) in own, ip
    assert ("10.244.1.11", 30080) not in own
    assert ("10.244.1.11", 8080) not in OwnListeners()


def test_an_address_added_since_the_last_sync_is_found_local_by_the_kernel() -> None:
    """A wildcard NodePort and an endpoint on a local address nobody told us about: still ours."""
    own = OwnListeners([ListenerKey("0.0.0.0", 30080, TCP)], local_ips=())
    assert ("127.3.4.5", 30080) in own  # local (127/8), not in local_ips: found by the bind check
    assert ("192.0.2.1", 30080) not in own  # TEST-NET-1: not an address here
    # Where any address binds (ip_nonlocal_bind), only the known ones count.
    loose = OwnListeners([ListenerKey("0.0.0.0", 30080, TCP)], local_ips=("203.0.113.1",), nonlocal_bind=True)
    assert ("203.0.113.1", 30080) in loose and ("192.0.2.1", 30080) not in loose


class OneEndpoint:
    """A connection table whose only endpoint is ``ep``."""

    def __init__(self, ep: tuple[str, int]) -> None:
        self.ep = ep
        self.picks = 0
        self.flows: list = []

    def pick(self, key, client_ip, now, exclude=()):
        self.picks += 1
        return None if self.ep in exclude else self.ep

    def open(self, key, endpoint) -> None:
        pass

    def close(self, key, endpoint) -> None:
        pass

    def udp_get(self, key, client, now):
        return None

    def udp_count(self) -> int:
        return 0

    def udp_set(self, key, client, endpoint, flow, now):
        self.flows.append(flow)
        return []

    def udp_expire(self, now, idle):
        flows, self.flows = self.flows, []
        return [(None, None, None, f) for f in flows]


NAME = ServicePortName("default", "loop", "", TCP)


async def test_tcp_never_dials_its_own_listener() -> None:
    loop = asyncio.get_running_loop()
    sock = open_socket(ListenerKey("127.0.0.1", 0, TCP))
    own = sock.getsockname()
    table = OneEndpoint(own)
    stats = StatsCache()
    proxy = TcpProxy(loop=loop, table=table, stats_of=lambda key: stats.get(key.name))
    proxy.own = OwnListeners([ListenerKey(*own, TCP)])
    listener = TcpListener(proxy=proxy, sock=sock, key=TableKey(NAME))
    try:
        client = socket.socket()
        client.setblocking(False)
        started = time.monotonic()
        try:
            await loop.sock_connect(client, own)
            data = await asyncio.wait_for(loop.sock_recv(client, 1), 5)
        except ConnectionResetError:  # the RST may come before connect() returns
            data = b""
        assert data == b"" and time.monotonic() - started < 2  # refused, not proxied to ourselves
        await asyncio.sleep(0.3)
        assert not proxy.connections and not proxy.dialing
        assert table.picks <= 2  # the own address, then "nothing left"
        client.close()
    finally:
        listener.close()
        await proxy.drain(0)


async def test_udp_never_sends_to_its_own_socket() -> None:
    loop = asyncio.get_running_loop()
    sock = open_socket(ListenerKey("127.0.0.1", 0, UDP))
    own = sock.getsockname()
    table = OneEndpoint(own)
    stats = StatsCache()
    proxy = UdpProxy(loop=loop, table=table, stats_of=lambda key: stats.get(key.name), idle_timeout=30)
    proxy.own = OwnListeners([ListenerKey(*own, UDP)])
    listener = UdpListener(proxy=proxy, sock=sock, key=TableKey(ServicePortName("default", "loop", "", UDP)))
    try:
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setblocking(False)
        for _ in range(3):
            client.sendto(b"ping", own)
        await asyncio.sleep(0.3)
        assert table.picks <= 6  # two per datagram: the own address, then nothing; no circulation
        client.close()
    finally:
        listener.close()
        proxy.close()


async def test_udp_flow_is_not_opened_when_the_descriptor_budget_is_full() -> None:
    """New UDP flows leave the reserve of /healthz, /metrics, the source and netlink alone."""
    loop = asyncio.get_running_loop()
    sock = open_socket(ListenerKey("127.0.0.1", 0, UDP))
    table = OneEndpoint(("192.0.2.1", 53))
    stats = StatsCache()
    name = ServicePortName("default", "full", "", UDP)
    proxy = UdpProxy(loop=loop, table=table, stats_of=lambda key: stats.get(key.name), idle_timeout=30,
                     has_room=lambda: False)
    listener = UdpListener(proxy=proxy, sock=sock, key=TableKey(name))
    try:
        proxy.forward(listener, ("127.0.0.1", 40000), b"ping", None)
        assert table.flows == []
        assert metrics.REGISTRY.get_sample_value(
            "proxyd_connections_rejected_total", {"service": "default/full", "reason": "resources"}) == 1
    finally:
        listener.close()
        proxy.close()


def test_pktinfo_destination_of_both_families() -> None:
    """The address a client used on a wildcard UDP listener, from IP_PKTINFO or IPV6_PKTINFO."""
    from proxyd.modes.userspace.udp import IP_PKTINFO, IPV6_PKTINFO, _pktinfo_dst

    v4 = socket.inet_pton(socket.AF_INET, "203.0.113.1")
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8:203::1")
    assert _pktinfo_dst([(socket.IPPROTO_IP, IP_PKTINFO, b"\1\0\0\0" + v4 + v4)]) == v4
    assert _pktinfo_dst([(socket.IPPROTO_IPV6, IPV6_PKTINFO, v6 + b"\2\0\0\0")]) == v6
    # truncated or foreign control messages carry no destination
    assert _pktinfo_dst([(socket.IPPROTO_IPV6, IPV6_PKTINFO, v6[:10])]) is None
    assert _pktinfo_dst([(socket.SOL_SOCKET, 1, b"x" * 20)]) is None
    assert _pktinfo_dst([]) is None


async def test_ipv6_udp_flow_replies_from_the_service_address() -> None:
    """An IPv6 client's datagrams reach an IPv6 endpoint and the replies come from the listener."""
    loop = asyncio.get_running_loop()
    echo = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    echo.bind(("::1", 0))
    echo.setblocking(False)
    sock = open_socket(ListenerKey("::1", 0, UDP))
    service = sock.getsockname()[:2]
    table = OneEndpoint(echo.getsockname()[:2])
    stats = StatsCache()
    proxy = UdpProxy(loop=loop, table=table, stats_of=lambda key: stats.get(key.name), idle_timeout=30)
    listener = UdpListener(proxy=proxy, sock=sock, key=TableKey(ServicePortName("default", "v6", "", UDP),
                                                                family=6))
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    client.setblocking(False)
    try:
        client.sendto(b"ping", service)
        data, peer = await asyncio.wait_for(loop.sock_recvfrom(echo, 100), 10)
        assert data == b"ping" and peer[0] == "::1"
        await loop.sock_sendto(echo, b"pong", peer)
        data, source = await asyncio.wait_for(loop.sock_recvfrom(client, 100), 10)
        assert data == b"pong" and source[:2] == service
        assert table.flows and table.flows[0].client[0] == "::1"  # keyed by the IPv6 client
    finally:
        client.close()
        echo.close()
        listener.close()
        proxy.close()
