"""The native engine's UDP thread against its pure-Python twin (``udp.UdpProxy``).

``test_udp_twin_machine`` drives both with the same random history of
datagram events (endpoint lists with a dead endpoint among live ones,
affinity on and off, datagrams from several clients, a flow table small
enough to evict) — each side behind its own listener on loopback in front
of the same echo backends — and compares what every client sees: which
endpoint answered, whether it came through the same flow as the client's
previous datagram (the endpoint sees the same source port), and that every
reply came from the service address. The counters (flows opened, bytes
each way, per endpoint) must agree too.

Plus the engine's own surface, each case on both paths where it applies:
idle expiry, eviction count, flows closed when their endpoint leaves,
source ranges and retargeting in place, replies from the address a client
used on wildcard listeners (IPv4 and IPv6), the descriptor budget, no
endpoint, bad input and shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from proxyd.model import Protocol, ServicePortName
from proxyd.modes.userspace.conntable import ConnTablePy
from proxyd.modes.userspace.engine import NativeTcpPath
from proxyd.modes.userspace.listeners import SourceFilter, open_socket
from proxyd.modes.userspace.planner import ListenerKey, TableEntry, TableKey
from proxyd.modes.userspace.stats import StatsCache
from proxyd.modes.userspace.udp import UdpProxy
from proxyd.modes.userspace.udp_engine import NativeUdpPath, UdpEngineNative
from tests.unit.test_engine import LoopThread, needs_native  # one extension holds both engines

UDP = Protocol.UDP
NAME = ServicePortName("test", "udpengine", "", UDP)
UKEY = TableKey(NAME)
REPLY_WAIT = 1.0  # a dead endpoint never answers: how long a client waits before calling it silent
LIVE_WAIT = 10.0  # with live endpoints only an answer must come: wait well past a busy machine's delays


class UdpBackends:
    """Loopback UDP echo servers: each answers ``<name> <source port the datagram came from> <payload>``."""

    def __init__(self, count: int, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        for i in range(count):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((host, 0))
            sock.settimeout(0.1)
            self.socks.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock, f"ep{i}"), daemon=True)
            thread.start()
            self.threads.append(thread)
        self.stop = False
        probe = socket.socket(family, socket.SOCK_DGRAM)
        probe.bind((host, 0))
        self.dead = (host, probe.getsockname()[1])  # nobody listens: ICMP port unreachable
        probe.close()
        self.live = [(host, s.getsockname()[1]) for s in self.socks]

    def _serve(self, sock: socket.socket, name: str) -> None:
        while True:
            try:
                data, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(OSError):
                sock.sendto(f"{name} {peer[1]} ".encode() + data, peer)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        for thread in self.threads:
            thread.join(timeout=5)


class UdpSide:
    """One UDP data path (the engine's thread, or the twin on an asyncio loop) behind its own listener."""

    def __init__(self, *, native: bool, max_flows: int = 64, idle_timeout: float = 300.0,
                 host: str = "127.0.0.1", fd_limit: int = 4096) -> None:
        self.native = native
        self.stats = StatsCache()
        self.loop = None if native else LoopThread()
        self.sock = open_socket(ListenerKey(host, 0, UDP))
        self.addr = self.sock.getsockname()[:2]
        stats_of: Callable[[TableKey], Any] = lambda k: self.stats.get(k.name)  # noqa: E731
        self.tcp: NativeTcpPath | None = None
        if native:
            self.tcp = NativeTcpPath(workers=1, stats_of=stats_of, fd_limit=fd_limit, other_fds=lambda: 0)
            self.path: Any = NativeUdpPath(tcp=self.tcp, stats_of=stats_of, max_flows=max_flows,
                                           idle_timeout=idle_timeout)
        else:
            assert self.loop is not None
            self.path = self.loop.call(lambda: UdpProxy(
                loop=asyncio.get_running_loop(), table=ConnTablePy(max_udp_flows=max_flows),
                stats_of=stats_of, idle_timeout=idle_timeout))
        self.set(TableEntry((), 0))
        self.listener: Any = self.do(lambda: self.path.listen(self.sock, UKEY))

    def do(self, fn: Callable[[], Any]) -> Any:
        return fn() if self.loop is None else self.loop.call(fn)

    def set(self, entry: TableEntry) -> None:
        self.do(lambda: self.path.set_endpoints(UKEY, entry, time.monotonic()))

    def counts(self) -> tuple[int, int, int, dict[tuple[str, int], list[int]]]:
        """Flows opened, bytes to endpoints, bytes to clients, and those per endpoint (after close)."""
        self.do(self.path.flush)
        st_ = self.stats.get(NAME)
        return st_.pending_total, st_.pending_in, st_.pending_out, dict(st_.by_endpoint)

    def close(self) -> tuple[int, int, int, dict[tuple[str, int], list[int]]]:
        """Close the listener and every flow; the counts then (the twin adds a flow's bytes at its close)."""
        self.do(self.listener.close)
        self.do(self.path.close)
        final = self.counts()
        if self.tcp is not None:
            asyncio.run(self.tcp.drain(0.0))
        if self.loop is not None:
            self.loop.close()
        return final


def ask(client: socket.socket, addr: tuple[str, int], payload: bytes = b"ping",
        wait: float = REPLY_WAIT) -> tuple[str, int, tuple[str, int]] | None:
    """Send one datagram; the answering endpoint's name, the source port it saw, and the reply's source."""
    client.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            client.recv(65535)  # a late answer to an earlier step is not this step's answer
    client.settimeout(wait)
    client.sendto(payload, addr)
    try:
        data, source = client.recvfrom(65535)
    except TimeoutError:
        return None
    name, port, echoed = data.split(b" ", 2)
    assert echoed == payload
    return name.decode(), int(port), source[:2]


def _wait(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def udp_backends() -> Iterator[UdpBackends]:
    b = UdpBackends(3)
    yield b
    b.close()


@needs_native
@pytest.mark.parametrize(("max_flows", "with_dead"), [(3, False), (64, True)])
def test_udp_twin_machine(udp_backends: UdpBackends, max_flows: int, with_dead: bool) -> None:
    """The same datagram events through the engine and the twin give the same outcomes and counters.

    A flow closed by ICMP unreachable leaves the twin's table only when it is replaced (the engine's at
    once), so a dead endpoint and a full table are not mixed: that is where their eviction choices differ.
    """
    choices = [0, 1, 2, "dead"] if with_dead else [0, 1, 2]

    @settings(max_examples=int(os.environ.get("PROXYD_UDP_ENGINE_EXAMPLES", "8")), stateful_step_count=20,
              deadline=None, suppress_health_check=list(HealthCheck))
    class UdpTwinMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.sides = [UdpSide(native=native, max_flows=max_flows) for native in (True, False)]
            # per client index: one socket per side, and the source port its last answer saw
            self.clients = [[socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in self.sides]
                            for _ in range(5)]
            for pair in self.clients:
                for sock in pair:
                    sock.bind(("127.0.0.1", 0))
            self.last: list[list[int | None]] = [[None, None] for _ in self.clients]
            self.emptied = False  # the empty list was installed once in this example
            self.empty = True  # no endpoint installed now (a side starts so): nothing can answer
            self.silent_possible = False  # a dead endpoint is installed: a send may go unanswered

        def teardown(self) -> None:
            if not hasattr(self, "sides"):
                return
            counts = [side.counts() for side in self.sides]
            for pair in self.clients:
                for sock in pair:
                    sock.close()
            after = [side.close() for side in self.sides]
            assert counts[0][0] == counts[1][0], counts  # flows opened
            assert after[0][1:] == after[1][1:], after  # bytes each way, per endpoint, once flows closed

        # At least one endpoint: a silent answer costs REPLY_WAIT on each side, so the empty list
        # (datagrams dropped on both) is one step of its own, not a frequent random draw.
        @rule(picks=st.lists(st.sampled_from(choices), min_size=1, max_size=4),
              affinity=st.sampled_from([0, 0, 10800]))
        def set_endpoints(self, picks: list, affinity: int) -> None:
            eps = tuple(udp_backends.dead if p == "dead" else udp_backends.live[p] for p in picks)
            for side in self.sides:
                side.set(TableEntry(eps, affinity))
            self.empty = False
            self.silent_possible = "dead" in picks

        @precondition(lambda self: not self.emptied)
        @rule()
        def no_endpoints(self) -> None:
            self.emptied = self.empty = True
            for side in self.sides:
                side.set(TableEntry((), 0))

        @rule(i=st.integers(0, 4), size=st.sampled_from([1, 500, 9000]))
        def send(self, i: int, size: int) -> None:
            payload = os.urandom(size).replace(b" ", b"x")
            outcomes = []
            for s, side in enumerate(self.sides):
                # with no endpoint nothing can answer: a late answer would fail the next step anyway
                wait = 0.05 if self.empty else REPLY_WAIT if self.silent_possible else LIVE_WAIT
                opened_before = side.counts()[0]
                got = ask(self.clients[i][s], side.addr, payload, wait=wait)
                if got is None:
                    outcomes.append(None)
                    continue
                name, port, source = got
                assert source == side.addr  # the reply comes from the service address
                # A new flow is told by the side's own count of flows opened, not by the port the
                # endpoint saw: a new flow's socket may get its closed predecessor's port again.
                same = side.counts()[0] == opened_before
                if same:
                    assert port == self.last[i][s], (s, port, self.last[i][s])  # a kept flow keeps its socket
                self.last[i][s] = port
                outcomes.append((name, same))
            assert outcomes[0] == outcomes[1], outcomes

    UdpTwinMachine.TestCase().runTest()


# -- behaviour on both paths ---------------------------------------------------------------------

BOTH = [pytest.param(True, id="engine", marks=needs_native), pytest.param(False, id="twin")]


@pytest.mark.parametrize("native", BOTH)
def test_flow_closes_when_its_endpoint_leaves(udp_backends: UdpBackends, native: bool) -> None:
    side = UdpSide(native=native)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            side.set(TableEntry((udp_backends.live[0],), 0))
            first = ask(client, side.addr)
            assert first is not None and first[0] == "ep0"
            again = ask(client, side.addr)
            assert again is not None and again[1] == first[1]  # the same flow
            side.set(TableEntry((udp_backends.live[1],), 0))
            if native:
                assert side.path.flows() == 0  # closed before set_endpoints returned, without a datagram
            moved = ask(client, side.addr)
            assert moved is not None and moved[0] == "ep1"
            opened, *_ = side.counts()
            assert opened == 2
    finally:
        side.close()


@pytest.mark.parametrize("native", BOTH)
def test_endpoint_removed_and_put_back_at_once_still_ends_its_flows(udp_backends: UdpBackends,
                                                                     native: bool) -> None:
    """The flow ends at the removal, however soon the endpoint returns (the engine once kept it)."""
    side = UdpSide(native=native)
    ep0, ep1 = udp_backends.live[:2]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            side.set(TableEntry((ep0,), 0))
            first = ask(client, side.addr)
            assert first is not None and first[0] == "ep0"
            side.set(TableEntry((ep1,), 0))
            side.set(TableEntry((ep0, ep1), 0))  # at once: before the UDP thread would get a turn
            again = ask(client, side.addr)
            assert again is not None and again[1] != first[1]  # a new flow
            opened, *_ = side.counts()
            assert opened == 2
    finally:
        side.close()


@pytest.mark.parametrize("native", BOTH)
def test_idle_flow_expires(udp_backends: UdpBackends, native: bool) -> None:
    side = UdpSide(native=native, idle_timeout=0.3)
    try:
        side.set(TableEntry(tuple(udp_backends.live[:2]), 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            first = ask(client, side.addr)
            assert first is not None
            stats = side.stats.get(NAME)
            assert side.do(stats._active) == 1
            _wait(lambda: side.do(stats._active) == 0)
            second = ask(client, side.addr)
            assert second is not None and second[0] != first[0]  # a new flow: round robin moved on
    finally:
        side.close()


@pytest.mark.parametrize("native", BOTH)
def test_source_ranges_and_retarget_in_place(udp_backends: UdpBackends, native: bool) -> None:
    side = UdpSide(native=native)
    other = TableKey(ServicePortName("test", "udpengine-other", "", UDP))
    try:
        side.set(TableEntry((udp_backends.live[0],), 0))
        entry = TableEntry((udp_backends.live[2],), 0)
        side.do(lambda: side.path.set_endpoints(other, entry, time.monotonic()))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            first = ask(client, side.addr)
            assert first is not None and first[0] == "ep0"

            def admit(ranges: tuple[str, ...] | None) -> None:
                side.listener.admits = SourceFilter(ranges) if ranges else None

            side.do(lambda: admit(("192.0.2.0/24",)))
            assert ask(client, side.addr) is None  # outside loadBalancerSourceRanges: dropped
            side.do(lambda: admit(("127.0.0.0/8",)))
            same = ask(client, side.addr)
            assert same is not None and same[1] == first[1]  # the flow survived the re-filtering
            side.do(lambda: side.listener.retarget(other))
            moved = ask(client, side.addr)
            assert moved is not None and moved[0] == "ep2"  # the new key's flow
    finally:
        side.close()


@pytest.mark.parametrize("native", BOTH)
@pytest.mark.parametrize(("wildcard", "dest"), [("0.0.0.0", "127.0.0.2"), ("::", "::1")])
def test_wildcard_listener_replies_from_the_address_the_client_used(native: bool, wildcard: str,
                                                                    dest: str) -> None:
    host = "::1" if ":" in dest else "127.0.0.1"
    backends = UdpBackends(1, host)
    side = UdpSide(native=native, host=wildcard)
    try:
        side.set(TableEntry((backends.live[0],), 0))
        family = socket.AF_INET6 if ":" in dest else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as client:
            for _ in range(2):  # the flow's first datagram and a later one
                got = ask(client, (dest, side.addr[1]), wait=5.0)
                assert got is not None and got[2] == (dest, side.addr[1])
    finally:
        side.close()
        backends.close()


@pytest.mark.parametrize("native", BOTH)
def test_full_table_evicts_the_least_recently_used(udp_backends: UdpBackends, native: bool) -> None:
    side = UdpSide(native=native, max_flows=2)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        side.set(TableEntry((udp_backends.live[0],), 0))
        ports = [ask(c, side.addr) for c in clients[:2]]
        assert ask(clients[0], side.addr) == ports[0]  # client 0 is now the most recently used
        assert ask(clients[2], side.addr) is not None  # evicts client 1's flow
        assert ask(clients[0], side.addr) == ports[0]
        again = ask(clients[1], side.addr)
        assert again is not None and again[1] != ports[1][1]  # type: ignore[index]
        if native:
            side.path.flush()
            assert side.path._evicted == 2 and side.path.flows() == 2
    finally:
        for c in clients:
            c.close()
        side.close()


# -- the engine's own surface --------------------------------------------------------------------


@needs_native
def test_engine_counts_rejections_and_its_descriptors(udp_backends: UdpBackends) -> None:
    side = UdpSide(native=True)
    assert side.tcp is not None
    path: NativeUdpPath = side.path
    service = path.services[UKEY].service
    try:
        base = int(side.tcp.engine.fds())
        assert base == 1  # the listener's duplicate
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            assert ask(client, side.addr, wait=0.3) is None  # no endpoint
            _wait(lambda: service.counters()[5] == 1)
            side.set(TableEntry((udp_backends.live[0],), 0))
            side.tcp.engine.set_other_fds(side.tcp.fd_limit)  # the budget is full
            assert ask(client, side.addr, wait=0.3) is None
            _wait(lambda: service.counters()[5 + 3] == 1)
            side.tcp.budget()
            got = ask(client, side.addr)
            assert got is not None
            assert side.tcp.engine.fds() == base + 1 and path.flows() == 1
            reply = len(f"{got[0]} {got[1]} ping")
            # counted right after the reply left: the client may read it first
            _wait(lambda: service.counters()[:5] == (1, 4, reply, 0, 1))
        path.close()
        assert path.flows() == 0 and side.tcp.engine.fds() == 0
    finally:
        side.close()


@needs_native
def test_engine_bad_input() -> None:
    tcp = NativeTcpPath(workers=1, stats_of=lambda k: StatsCache().get(k.name), fd_limit=1024,
                        other_fds=lambda: 0)
    try:
        for bad in [(0, 1.0), (-5, 1.0), (10, 0.0), (10, float("nan")), (10, -1.0)]:
            with pytest.raises(ValueError):
                UdpEngineNative(tcp.engine, *bad)
        with pytest.raises(TypeError):
            UdpEngineNative(None, 10, 1.0)
        udp = UdpEngineNative(tcp.engine, 10, 1.0)
        from proxyd._engine import Service

        svc = Service()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stream, pytest.raises(ValueError):
            udp.add_listener(stream, svc)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dgram:
            dgram.bind(("127.0.0.1", 0))
            for ranges in (["not a cidr"], ["10.0.0.0/33"], ["x" * 100_000]):
                with pytest.raises(ValueError):
                    udp.add_listener(dgram, svc, ranges)
            listener = udp.add_listener(dgram, svc, ["10.0.0.0/8"] * 1000)
            udp.remove_listener(listener)
            udp.remove_listener(listener)  # twice: nothing
            with pytest.raises(ValueError):
                udp.configure(listener, svc, None)
        assert tcp.engine.fds() == 0
        del udp
    finally:
        asyncio.run(tcp.drain(0.0))
