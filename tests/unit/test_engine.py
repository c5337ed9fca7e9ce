"""The native TCP engine of userspace mode against its pure-Python twin.

Two hypothesis machines:

* ``PickMachine``: the engine's C endpoint table (round robin, ClientIP
  affinity with expiry, retry exclusion) against the connection table's
  reference twin, step by step with a fake clock: every pick, sweep and
  affinity count must agree.
* ``TwinPathMachine``: the whole TCP data path. The same random history of
  connection events (endpoint lists with a dead endpoint among live ones,
  affinity on and off, connects, data, half-closes, resets) drives the
  engine (``NativeTcpPath``, its worker threads) and the twin (``PyTcpPath``
  on an asyncio loop in a thread), each with its own listener on loopback
  in front of the same backends; what every client sees (which endpoint
  answered, the bytes echoed, FIN or reset) must be the same.

Plus direct tests of the engine's control surface: bad input, counters,
listener removal and replacement, drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from proxyd.model import Protocol, ServicePortName
from proxyd.modes.userspace import engine as engine_mod
from proxyd.modes.userspace.conntable import ConnTablePy
from proxyd.modes.userspace.engine import EngineNative, NativeTcpPath, PyTcpPath, ServiceNative
from proxyd.modes.userspace.listeners import OwnListeners, SourceFilter
from proxyd.modes.userspace.planner import ListenerKey, TableEntry, TableKey
from proxyd.modes.userspace.stats import StatsCache

REQUIRED = os.environ.get("PROXYD_REQUIRE_EXTENSIONS", "") not in ("", "0")
# With PROXYD_REQUIRE_EXTENSIONS=1 (CI, scripts/test.sh) a missing engine fails these tests instead.
needs_native = pytest.mark.skipif(EngineNative is None and not REQUIRED,
                                  reason="the Cython engine is not built")
LINGER_ZERO = struct.pack("ii", 1, 0)
K = "ns/svc:80/TCP"


def test_engine_builds_when_required() -> None:
    if os.environ.get("PROXYD_REQUIRE_EXTENSIONS", "") in ("", "0"):
        pytest.skip("PROXYD_REQUIRE_EXTENSIONS not set")
    assert EngineNative is not None
    assert engine_mod.NATIVE is True or os.environ.get("PROXYD_NO_EXTENSIONS")


def test_engine_is_not_stale() -> None:
    """An in-place build older than native/engine* would test yesterday's code."""
    if EngineNative is None and not REQUIRED:
        pytest.skip("the Cython engine is not built")
    import proxyd._engine as ext

    native = Path(__file__).resolve().parents[2] / "native"
    built = Path(ext.__file__)
    if not (native / "engine.pyx").exists() or built.parent.parent != native.parent:
        pytest.skip("not an in-place build of this checkout")
    newest = max(p.stat().st_mtime for p in native.glob("engine*"))
    assert built.stat().st_mtime >= newest, f"{built.name} is older than native/: rebuild it"


def test_no_extensions_env_forces_the_twin() -> None:
    code = "import proxyd.modes.userspace.engine as e; print(e.NATIVE)"
    env = {**os.environ, "PROXYD_NO_EXTENSIONS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]


# -- the C endpoint table ------------------------------------------------------------------------


@needs_native
def test_round_robin_affinity_and_exclusion() -> None:
    svc = ServiceNative()
    assert svc.pick("1.1.1.1", 0.0) is None
    svc.set_endpoints([("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.1", 80), ("2001:db8::1", 8080)], 0)
    assert [svc.pick("1.1.1.1", 0.0) for _ in range(4)] == [
        ("10.0.0.1", 80), ("10.0.0.2", 80), ("2001:db8::1", 8080), ("10.0.0.1", 80)]
    assert svc.pick("1.1.1.1", 0.0, [("10.0.0.2", 80)]) == ("2001:db8::1", 8080)
    assert svc.pick("1.1.1.1", 0.0, [("10.0.0.1", 80), ("10.0.0.2", 80), ("2001:db8::1", 8080)]) is None
    svc.set_endpoints([("10.0.0.1", 80), ("10.0.0.2", 80)], 10.0)
    first = svc.pick("192.0.2.7", 1.0)
    assert all(svc.pick("192.0.2.7", 1.0 + i) == first for i in range(5))
    assert svc.affinity_count() == 1
    assert svc.pick("192.0.2.7", 100.0) != first or True  # expired: round robin decides
    assert svc.sweep(1000.0) == 1 and svc.affinity_count() == 0


@needs_native
@pytest.mark.parametrize("bad", [
    [("10.0.0.1", -1)], [("10.0.0.1", 65536)], [("10.0.0.1", True)], [(1, 80)], [("10.0.0.1",)],
    [("not an ip", 80)], [("10.0.0.1", 80, 1)], None, [("x" * 100_000, 80)],
])
def test_bad_endpoint_lists_change_nothing(bad: object) -> None:
    svc = ServiceNative()
    svc.set_endpoints([("10.0.0.1", 80)], 0)
    with pytest.raises((TypeError, ValueError, OSError)):
        svc.set_endpoints(bad, 0)
    assert svc.pick("1.1.1.1", 0.0) == ("10.0.0.1", 80)


@needs_native
@pytest.mark.parametrize("timeout", [-1.0, float("nan")])
def test_bad_affinity_timeout_refused(timeout: float) -> None:
    with pytest.raises(ValueError):
        ServiceNative().set_endpoints([("10.0.0.1", 80)], timeout)


@needs_native
def test_many_affinity_clients_grow_and_sweep() -> None:
    svc = ServiceNative()
    svc.set_endpoints([("10.0.0.1", 80), ("10.0.0.2", 80)], 5.0)
    for i in range(20_000):
        svc.pick(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 0.0)
    assert svc.affinity_count() == 20_000
    assert svc.sweep(5.0) == 20_000 and svc.affinity_count() == 0


ENDPOINTS = [("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80), ("2001:db8::4", 8080)]
CLIENTS = ["1.1.1.1", "1.1.1.2", "2001:db8::99"]


@needs_native
@settings(max_examples=int(os.environ.get("PROXYD_ENGINE_EXAMPLES", "200")), stateful_step_count=60,
          deadline=None, suppress_health_check=[HealthCheck.too_slow])
class PickMachine(RuleBasedStateMachine):
    """The engine's C table and the reference table agree on every pick, sweep and count."""

    @initialize()
    def setup(self) -> None:
        self.py = ConnTablePy()
        self.nat = ServiceNative()
        self.now = 0.0

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.999, 3.0, 3600.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(eps=st.lists(st.sampled_from(ENDPOINTS), max_size=6), timeout=st.sampled_from([0, 1.0, 3.0, 10800]))
    def set_endpoints(self, eps: list, timeout: float) -> None:
        self.py.set_endpoints(K, eps, timeout, self.now)
        self.nat.set_endpoints(eps, timeout)

    @rule(client=st.sampled_from(CLIENTS),
          exclude=st.lists(st.sampled_from(ENDPOINTS), max_size=3, unique=True))
    def pick(self, client: str, exclude: list) -> None:
        assert self.py.pick(K, client, self.now, exclude) == self.nat.pick(client, self.now, exclude)

    @rule()
    def sweep(self) -> None:
        assert self.py.sweep(self.now) == self.nat.sweep(self.now)

    @invariant()
    def same_affinity(self) -> None:
        if hasattr(self, "py"):
            assert self.py.affinity_count() == self.nat.affinity_count()


TestPickMachine = PickMachine.TestCase


# -- the whole data path: engine and twin, same events ---------------------------------------------


class Backends:
    """Loopback TCP servers: greet with their name, echo, answer EOF with BYE and close."""

    def __init__(self, count: int, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        for i in range(count):
            sock = socket.socket(family)
            sock.bind((host, 0))
            sock.listen(64)
            sock.settimeout(0.1)
            self.socks.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock, f"ep{i}"), daemon=True)
            thread.start()
            self.threads.append(thread)
        # a port nobody listens on: connects are refused and retried on the next endpoint
        probe, probe2 = socket.socket(family), socket.socket(family)
        probe.bind((host, 0))
        probe2.bind((host, 0))
        self.dead = (host, probe.getsockname()[1])
        self.dead2 = (host, probe2.getsockname()[1])
        probe.close()
        probe2.close()
        self.live = [(host, s.getsockname()[1]) for s in self.socks]

    def _serve(self, sock: socket.socket, name: str) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn, name), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket, name: str) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            conn.sendall(f"{name}\n".encode())
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.sendall(b"BYE\n")

    def close(self) -> None:
        self.stop.set()
        for sock in self.socks:
            sock.close()
        for thread in self.threads:
            thread.join(timeout=5)


class LoopThread:
    """An asyncio loop in a thread, for the twin; ``call`` runs a function in it and returns its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


def _listening_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    sock.bind((host, 0))
    sock.listen(256)
    return sock


NAME = ServicePortName("test", "engine", "", Protocol.TCP)
TKEY = TableKey(NAME)


class Side:
    """One implementation behind its own listener."""

    def __init__(self, *, native: bool, host: str = "127.0.0.1") -> None:
        self.native = native
        self.stats = StatsCache()
        self.loop = None if native else LoopThread()
        self.sock = _listening_socket(host)
        self.addr = self.sock.getsockname()[:2]
        self.lkey = ListenerKey(host, self.addr[1], Protocol.TCP)
        if native:
            self.path: Any = NativeTcpPath(workers=2, stats_of=lambda k: self.stats.get(k.name),
                                           fd_limit=4096, other_fds=lambda: 0)
        else:
            assert self.loop is not None
            self.path = self.loop.call(lambda: PyTcpPath(
                loop=asyncio.get_running_loop(), table=ConnTablePy(),
                stats_of=lambda k: self.stats.get(k.name), fd_limit=4096, other_fds=lambda: 0))
        self.do(lambda: self.path.set_endpoints(TKEY, TableEntry((), 0), time.monotonic()))
        self.listener: Any = self.do(lambda: self.path.listen(self.sock, TKEY))

    def do(self, fn: Callable[[], Any]) -> Any:
        return fn() if self.loop is None else self.loop.call(fn)

    def close(self) -> int:
        if self.loop is None:
            return asyncio.run(self.path.drain(0.0))
        reset = self.do(lambda: self.path.drain(0.0))
        self.loop.close()
        return reset


def read_until_close(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the end, and how it ended: 'fin', 'reset' or 'timeout'."""
    got = b""
    try:
        while data := sock.recv(65536):
            got += data
    except ConnectionResetError:
        return got, "reset"
    except TimeoutError:
        return got, "timeout"
    return got, "fin"


def read_line(sock: socket.socket) -> tuple[bytes, str]:
    got = b""
    try:
        while not got.endswith(b"\n"):
            data = sock.recv(1)
            if not data:
                return got, "fin"
            got += data
    except ConnectionResetError:
        return got, "reset"
    except TimeoutError:
        return got, "timeout"
    return got, "ok"


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    b = Backends(3)
    yield b
    b.close()


@needs_native
def test_twin_path_machine(backends: Backends) -> None:
    """The same events through the engine and the twin give the same outcomes."""

    @settings(max_examples=int(os.environ.get("PROXYD_ENGINE_PATH_EXAMPLES", "25")), stateful_step_count=25,
              deadline=None, suppress_health_check=list(HealthCheck))
    class TwinPathMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.sides = [Side(native=True), Side(native=False)]
            self.conns: list[list[socket.socket]] = []  # per open connection: [engine's, twin's]

        def teardown(self) -> None:
            for pair in getattr(self, "conns", []):
                for sock in pair:
                    sock.close()
            for side in getattr(self, "sides", []):
                side.close()

        @rule(picks=st.lists(st.sampled_from([0, 1, 2, "dead"]), max_size=5),
              affinity=st.sampled_from([0, 0, 10800]))
        def set_endpoints(self, picks: list, affinity: int) -> None:
            eps = tuple(backends.dead if p == "dead" else backends.live[p] for p in picks)
            entry = TableEntry(eps, affinity)
            for side in self.sides:
                side.do(lambda side=side: side.path.set_endpoints(TKEY, entry, time.monotonic()))

        @precondition(lambda self: len(self.conns) < 6)
        @rule()
        def connect(self) -> None:
            outcomes, pair = [], []
            for side in self.sides:
                try:
                    sock = socket.create_connection(side.addr, timeout=5)
                except ConnectionResetError:
                    # the proxy's RST can beat connect()'s return on loopback: the same outcome as below
                    outcomes.append((b"", "reset"))
                    continue
                outcomes.append(read_line(sock))
                pair.append(sock)
            assert outcomes[0] == outcomes[1], outcomes
            if outcomes[0][1] == "ok":
                self.conns.append(pair)
            else:
                for sock in pair:
                    sock.close()

        @precondition(lambda self: self.conns)
        @rule(i=st.integers(0, 5), size=st.sampled_from([1, 100, 70_000, 300_000]))
        def send(self, i: int, size: int) -> None:
            pair = self.conns[i % len(self.conns)]
            payload = os.urandom(size)
            got = []
            for sock in pair:
                sender = threading.Thread(target=sock.sendall, args=(payload,))
                sender.start()
                data = b""
                while len(data) < size:
                    chunk = sock.recv(1 << 20)
                    assert chunk, "closed while echoing"
                    data += chunk
                sender.join()
                got.append(data)
            assert got[0] == got[1] == payload

        @precondition(lambda self: self.conns)
        @rule(i=st.integers(0, 5))
        def half_close(self, i: int) -> None:
            pair = self.conns.pop(i % len(self.conns))
            ends = []
            for sock in pair:
                sock.shutdown(socket.SHUT_WR)
                ends.append(read_until_close(sock))
                sock.close()
            assert ends[0] == ends[1] == (b"BYE\n", "fin"), ends

        @precondition(lambda self: self.conns)
        @rule(i=st.integers(0, 5))
        def reset(self, i: int) -> None:
            pair = self.conns.pop(i % len(self.conns))
            for sock in pair:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
                sock.close()

    TwinPathMachine.TestCase().runTest()


# -- the engine's control surface ----------------------------------------------------------------


def _wait(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@needs_native
def test_counters_listener_removal_and_drain(backends: Backends) -> None:
    side = Side(native=True)
    path: NativeTcpPath = side.path
    try:
        path.set_endpoints(TKEY, TableEntry((backends.dead, backends.live[0]), 0), time.monotonic())
        with socket.create_connection(side.addr, timeout=5) as sock:
            assert read_line(sock) == (b"ep0\n", "ok")
            sock.sendall(b"x" * 1000)
            got = b""
            while len(got) < 1000:
                got += sock.recv(4096)
            # a worker adds what it moved right after moving it: the client may read first
            service = path.services[TKEY].service
            _wait(lambda: service.counters()[:5] == (1, 1000, 1004, 1, 1))
            # a listener replaced by another configuration keeps the socket and the connection
            side.listener.admits = SourceFilter(("192.0.2.0/24",))
            try:  # 127.0.0.1 is outside the range: reset (on loopback possibly before connect() returns)
                with socket.create_connection(side.addr, timeout=5) as other:
                    assert read_line(other)[1] == "reset"
            except ConnectionResetError:
                pass
            _wait(lambda: path.services[TKEY].service.counters()[5 + 2] == 1)
            side.listener.admits = None
            sock.sendall(b"y")
            assert sock.recv(10) == b"y"
            path.flush()
            assert path.services[TKEY].stats._active() == 1
            side.listener.close()
            with pytest.raises(OSError):
                socket.create_connection(side.addr, timeout=5).close()
            # the open connection lives on; drain resets it after the grace period
            assert asyncio.run(path.drain(0.2)) == 1
            assert read_until_close(sock)[1] == "reset"
        assert path.engine.fds() == 0
    finally:
        path.engine.stop()


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native, id="engine"),
                                    pytest.param(False, id="twin")])
def test_ipv6_listener_endpoints_retry_affinity_and_source_ranges(native: bool) -> None:
    """An IPv6 listener (the engine's sockaddr_in6 accept and connect, and the twin's): a refused
    endpoint is retried on the next, ClientIP affinity keys the IPv6 client, IPv6 source ranges filter."""
    six = Backends(2, host="::1")
    side = Side(native=native, host="::1")
    try:
        entry = TableEntry((six.dead, *six.live), 60)
        side.do(lambda: side.path.set_endpoints(TKEY, entry, time.monotonic()))
        names = {_talk(side.addr, b"v6")[0] for _ in range(6)}
        assert len(names) == 1  # one client (::1): one endpoint, the dead one skipped
        side.do(lambda: side.path.set_endpoints(TKEY, TableEntry(entry.endpoints, 0), time.monotonic()))
        assert {_talk(side.addr, b"v6")[0] for _ in range(6)} == {"ep0", "ep1"}

        def admit(ranges: tuple[str, ...]) -> None:
            side.listener.admits = SourceFilter(ranges)

        side.do(lambda: admit(("2001:db8::/32", "127.0.0.0/8")))  # ::1 is in neither
        try:
            with socket.create_connection(side.addr, timeout=5) as other:
                assert read_line(other)[1] == "reset"
        except ConnectionResetError:
            pass
        side.do(lambda: admit(("::1/128",)))
        assert _talk(side.addr, b"ok")[0] in ("ep0", "ep1")
    finally:
        side.close()
        if native:
            side.path.engine.stop()
        six.close()


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native, id="engine"),
                                    pytest.param(False, id="twin")])
def test_a_lone_failing_endpoint_gets_all_four_attempts(backends: Backends, native: bool) -> None:
    """kube-proxy picks anew for each of its four attempts: with one endpoint that one is tried four
    times (its 500 ms, 1 s and 2 s chances too), then the client is reset; two endpoints go round twice."""
    side = Side(native=native)
    try:
        for endpoints, attempts in (((backends.dead,), 4), ((backends.dead, backends.dead2), 4)):
            before = side.stats.get(NAME).retried
            side.do(lambda eps=endpoints: side.path.set_endpoints(TKEY, TableEntry(eps, 0), time.monotonic()))
            try:
                with socket.create_connection(side.addr, timeout=5) as sock:
                    assert read_line(sock)[1] == "reset"
            except ConnectionResetError:
                pass

            def counted(before: int = before, attempts: int = attempts) -> bool:
                side.do(side.path.flush)
                return side.stats.get(NAME).retried - before == attempts

            _wait(counted)
    finally:
        side.close()
        if native:
            side.path.engine.stop()


def _talk(addr: tuple[str, int], payload: bytes) -> tuple[str, int]:
    """One whole connection through a side: the endpoint that answered and the bytes it sent back."""
    with socket.create_connection(addr, timeout=5) as sock:
        name, how = read_line(sock)
        assert how == "ok"
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        rest, how = read_until_close(sock)
        assert how == "fin" and rest == payload + b"BYE\n"
        return name.decode().strip(), len(name) + len(rest)


@needs_native
def test_engine_endpoint_counters_match_connections_and_twin(backends: Backends) -> None:
    """Per-endpoint counts (``proxyd status``) from the engine equal what the connections moved, and
    what the twin records for the same traffic; they follow an endpoint across list replacements."""
    live = {f"ep{i}": ep for i, ep in enumerate(backends.live)}
    sides = [Side(native=True), Side(native=False)]
    try:
        expected: list[dict[tuple[str, int], list[int]]] = []
        for side in sides:
            want: dict[tuple[str, int], list[int]] = {}
            entry = TableEntry((backends.dead, backends.live[0], backends.live[1]), 0)
            side.do(lambda side=side, entry=entry: side.path.set_endpoints(TKEY, entry, time.monotonic()))
            for i in range(7):
                payload = bytes([65 + i]) * (100 * i + 1)
                name, back = _talk(side.addr, payload)
                counts = want.setdefault(live[name], [0, 0, 0])
                counts[0] += 1
                counts[1] += len(payload)
                counts[2] += back
            # a connection open while its endpoint leaves the list keeps counting for it; when the
            # endpoint comes back, its counts go on from there
            with socket.create_connection(side.addr, timeout=5) as sock:
                name, how = read_line(sock)
                assert how == "ok"
                ep = live[name.decode().strip()]
                others = tuple(e for e in backends.live if e != ep)
                side.do(lambda side=side, others=others: side.path.set_endpoints(
                    TKEY, TableEntry(others, 0), time.monotonic()))
                if side.native:
                    side.path.flush()
                sock.sendall(b"z" * 5000)
                sock.shutdown(socket.SHUT_WR)
                rest, how = read_until_close(sock)
                assert how == "fin" and len(rest) == 5004
                counts = want.setdefault(ep, [0, 0, 0])
                counts[0] += 1
                counts[1] += 5000
                counts[2] += len(name) + len(rest)
            side.do(lambda side=side: side.path.set_endpoints(
                TKEY, TableEntry(tuple(backends.live), 0), time.monotonic()))
            for i in range(3):
                name, back = _talk(side.addr, b"q" * 10)
                counts = want.setdefault(live[name], [0, 0, 0])
                counts[0] += 1
                counts[1] += 10
                counts[2] += back
            assert backends.dead not in want
            expected.append(want)
        assert expected[0] == expected[1]  # the same picks on both sides

        def by_endpoint(side: Side) -> dict[tuple[str, int], list[int]]:
            side.do(side.path.flush)
            stats = side.stats.peek(NAME)
            if stats is None:
                return {}
            return dict(side.do(lambda: {k: list(v) for k, v in stats.by_endpoint.items()}))

        # a worker adds what it moved right after moving it (the twin at close): wait for the last bytes
        for side, want in zip(sides, expected, strict=True):
            _wait(lambda side=side, want=want: by_endpoint(side) == want)
        # counts are handed out once: another flush adds nothing
        assert by_endpoint(sides[0]) == expected[0]
        assert sides[0].path.services[TKEY].service.take_endpoint_counts() == []
        # endpoints that left with nothing holding them are dropped; coming back they count afresh
        native = sides[0]
        native.path.set_endpoints(TKEY, TableEntry((), 0), time.monotonic())
        native.path.flush()
        native.path.set_endpoints(TKEY, TableEntry((backends.live[2],), 0), time.monotonic())
        name, back = _talk(native.addr, b"w" * 7)
        counts = expected[0].setdefault(live[name], [0, 0, 0])
        counts[0] += 1
        counts[1] += 7
        counts[2] += back
        _wait(lambda: by_endpoint(native) == expected[0])
    finally:
        for side in sides:
            side.close()


# -- the engine's own-listener guard and descriptor budget ------------------------------------


def _picks(path: NativeTcpPath, key: TableKey = TKEY, n: int = 12) -> set[tuple[str, int]]:
    service = path.services[key].service
    return {service.pick(f"192.0.2.{i}", 0.0) for i in range(n)}


@needs_native
def test_engine_never_holds_an_own_listener_endpoint(backends: Backends) -> None:
    """Endpoints that are proxyd's own listeners never reach the engine; re-filtered when ``own`` changes."""
    side = Side(native=True)
    path: NativeTcpPath = side.path
    try:
        live = backends.live[0]
        own_ep = ("127.0.0.1", side.addr[1])
        path.set_endpoints(TKEY, TableEntry((own_ep, live), 0), time.monotonic())
        assert _picks(path) == {own_ep, live}  # no guard told yet
        path.own = OwnListeners([side.lkey], ["127.0.0.1"])
        assert _picks(path) == {live}
        with socket.create_connection(side.addr, timeout=5) as sock:
            assert read_line(sock) == (b"ep0\n", "ok")
        # a wildcard listener's port: a local address is ours, a remote one is not
        wild = ListenerKey("0.0.0.0", 30080, Protocol.TCP)
        other = TableKey(ServicePortName("test", "other", "", Protocol.TCP))
        remote = ("192.0.2.7", 30080)
        path.set_endpoints(other, TableEntry((("127.0.0.1", 30080), remote, ("10.255.0.9", 30080)), 0),
                           time.monotonic())
        path.own = OwnListeners([side.lkey, wild], ["127.0.0.1", "10.255.0.9"])
        assert _picks(path, other) == {remote}
        assert _picks(path) == {live}
        # the listeners go: every endpoint is served again
        path.own = OwnListeners()
        assert _picks(path) == {own_ep, live}
        assert _picks(path, other, 24) == {("127.0.0.1", 30080), remote, ("10.255.0.9", 30080)}
        # a new endpoint list is filtered at once
        path.own = OwnListeners([side.lkey], ["127.0.0.1"])
        path.set_endpoints(TKEY, TableEntry((live, own_ep, backends.live[1]), 0), time.monotonic())
        assert _picks(path) == {live, backends.live[1]}
    finally:
        side.close()


@needs_native
def test_engine_listeners_share_the_descriptor_budget() -> None:
    """Each engine listener costs one descriptor (the engine's); listener_room never lets listeners take
    the reserve, nor the quarter of the budget connections keep."""
    from proxyd.modes.userspace.tcp import fd_reserve, open_fds

    before = open_fds()
    limit = before + 200
    stats = StatsCache()
    path = NativeTcpPath(workers=1, stats_of=lambda k: stats.get(k.name), fd_limit=limit, other_fds=lambda: 0)
    listeners = []
    try:
        room = path.listener_room(0)
        assert 0 < room <= (limit - path.base_fds - fd_reserve(limit)) * 3 // 4 + 1
        for _ in range(room + 5):
            if path.listener_room(len(listeners)) <= 0:
                break
            listeners.append(path.listen(_listening_socket(), TKEY))
        assert path.listener_room(len(listeners)) == 0
        assert len(listeners) <= room
        assert path.fds_in_use() + fd_reserve(limit) <= limit
        assert path.has_room()
        # One descriptor per listener: the applier's socket was handed over, not duplicated.
        assert open_fds() - before <= len(listeners) + 8  # + the engine's epoll sets and wake-up fds
        for listener in listeners:
            listener.close()
        assert path.listener_room(0) == room
    finally:
        for listener in listeners:
            listener.close()
        asyncio.run(path.drain(0.0))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n and (data := sock.recv(n - len(got))):
        got += data
    return got


def _sockets_connected_to(peer: tuple[str, int]) -> list[socket.socket]:
    """Duplicates of this process's TCP sockets whose peer is ``peer`` (engine workers are threads here)."""
    found = []
    seen = set()  # socket inodes: the duplicates made here are sockets too
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
            if not link.startswith("socket:") or link in seen:
                continue
            seen.add(link)
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.getpeername()[:2] == peer:
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()
    return found


@needs_native
def test_engine_endpoint_socket_options_come_when_they_matter(backends: Backends) -> None:
    """The endpoint socket: TCP_NODELAY before its second write (none on its first: Nagle holds nothing
    back there), keepalive 15 s / 15 s about a second after connecting (docs/userspace.md)."""
    side = Side(native=True)
    path: NativeTcpPath = side.path
    peer = backends.live[2]
    try:
        path.set_endpoints(TKEY, TableEntry((peer,), 0), time.monotonic())
        before = set()
        for other in _sockets_connected_to(peer):  # earlier tests' connections still closing
            with other:
                before.add(other.getsockname())
        with socket.create_connection(side.addr, timeout=5) as sock:
            assert read_line(sock) == (b"ep2\n", "ok")
            sock.sendall(b"one")
            assert _recv_exactly(sock, 3) == b"one"
            found = _sockets_connected_to(peer)
            (ep,) = [s for s in found if s.getsockname() not in before]
            for other in found:
                if other is not ep:
                    other.close()
            with ep:
                assert ep.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
                sock.sendall(b"two")
                assert _recv_exactly(sock, 3) == b"two"
                assert ep.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                _wait(lambda: ep.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0, timeout=10)
                assert ep.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
                assert ep.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
            sock.sendall(b"three")
            sock.shutdown(socket.SHUT_WR)
            assert read_until_close(sock) == (b"threeBYE\n", "fin")
        _wait(lambda: path.engine.connections() == 0)
    finally:
        side.close()
        path.engine.stop()
@needs_native
def test_an_adopted_descriptor_is_closed_when_adding_the_listener_fails() -> None:
    """``add_listener(fd, ..., adopt=True)`` owns ``fd`` from the call on, also when it raises."""
    engine = EngineNative(1, 1024)
    try:
        fd = _listening_socket().detach()
        with pytest.raises(ValueError):
            engine.add_listener(fd, ServiceNative(), ["not-a-cidr"], adopt=True)
        with pytest.raises(OSError):
            os.fstat(fd)  # closed by the engine, not leaked
        fd = _listening_socket().detach()
        listener = engine.add_listener(fd, ServiceNative(), ["192.0.2.0/24"], adopt=True)
        assert listener.fd == fd and listener.ranges == ("192.0.2.0/24",)
        engine.remove_listener(listener)
    finally:
        engine.stop()


@needs_native
def test_engine_endpoint_that_speaks_first_is_not_kept_waiting(backends: Backends) -> None:
    """The engine holds back the ACK that completes the endpoint handshake for the client's first bytes
    to carry it (TCP_DEFER_ACCEPT on the connecting socket); when the client has sent nothing the ACK
    goes out at once (TCP_QUICKACK). Without that the endpoint would accept only when the kernel's
    200 ms delayed-ACK timer fired, and a greeting server would greet 200 ms late every time; with it
    the greeting comes as soon as the worker runs, so the quickest of a few tries is well under that."""
    side = Side(native=True)
    path: NativeTcpPath = side.path
    try:
        path.set_endpoints(TKEY, TableEntry((backends.live[1],), 0), time.monotonic())
        delays = []
        for _ in range(5):
            started = time.monotonic()
            with socket.create_connection(side.addr, timeout=5) as sock:
                assert read_line(sock) == (b"ep1\n", "ok")
                delays.append(time.monotonic() - started)
                sock.sendall(b"after")
                assert _recv_exactly(sock, 5) == b"after"
        assert min(delays) < 0.15, delays
    finally:
        side.close()
        path.engine.stop()


TCPI_SEGS_IN = 140  # offset of tcpi_segs_in in struct tcp_info (linux/tcp.h)


class _FirstBytesEndpoint:
    """An endpoint that records, per connection, when it accepted and how many segments its socket had
    received once the first bytes (or the EOF) were read (tcpi_segs_in counts the SYN: 2 when the
    client's first bytes carried the handshake's last ACK, 3 when a bare ACK came between). Each
    connection greets first (b"hi") or waits for the client, as ``greet`` says for it, in order."""

    def __init__(self, greet: list[bool]) -> None:
        self.sock = _listening_socket()
        self.sock.setblocking(True)
        self.addr = self.sock.getsockname()[:2]
        self.greet = list(greet)
        self.accepted: list[tuple[float, bytes, int]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for greet in self.greet:
            conn, _ = self.sock.accept()
            at = time.monotonic()
            with conn:
                conn.settimeout(10)
                if greet:
                    conn.sendall(b"hi\n")
                data = conn.recv(64)
                info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                self.accepted.append((at, data, struct.unpack_from("I", info, TCPI_SEGS_IN)[0]))
                if data:
                    conn.sendall(b"ok\n")

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.sock.close()


@needs_native
def test_engine_holds_the_endpoint_ack_for_clients_that_speak_first() -> None:
    """The ACK that completes the endpoint handshake waits for the client's first bytes when the service's
    last connection began with the client speaking (docs/userspace.md): those bytes carry it, or, when the
    client keeps quiet, it goes after the engine's ack_hold and a greeting endpoint accepts then. After
    that the service sends the ACK at once again, so endpoints that greet are not kept waiting. A client
    that only half-closes while the ACK is held still passes its EOF on."""
    hold = 0.15  # below the kernel's own 200 ms delayed-ACK timer, which would send it anyway
    engine = EngineNative(1, 4096, ack_hold=hold)
    endpoint = _FirstBytesEndpoint([False, False, False, True, True, True, True])
    svc = ServiceNative()
    svc.set_endpoints([endpoint.addr], 0)
    sock = _listening_socket()
    addr = sock.getsockname()[:2]
    connected: list[float] = []

    def connect() -> socket.socket:
        client = socket.create_connection(addr, timeout=10)
        connected.append(time.monotonic())
        return client

    try:
        engine.start()
        listener = engine.add_listener(sock, svc, [])
        for first in (b"a\n", b"b\n"):  # the client speaks first: learned, then the ACK waits for it
            with connect() as client:
                client.sendall(first)
                assert read_line(client) == (b"ok\n", "ok")
        with connect() as client:  # held, and the client half-closes without a byte: the EOF still passes
            client.shutdown(socket.SHUT_WR)
            assert read_line(client) == (b"", "fin")
        for last in (b"c\n", b"d\n", b"e\n", b"f\n"):  # held until ack_hold once, then no more
            with connect() as client:
                assert read_line(client) == (b"hi\n", "ok")
                client.sendall(last)
                assert read_line(client) == (b"ok\n", "ok")
        endpoint.close()
        delays = [at - since for (at, _, _), since in zip(endpoint.accepted, connected, strict=True)]
        got = [data for _, data, _ in endpoint.accepted]
        assert got == [b"a\n", b"b\n", b"", b"c\n", b"d\n", b"e\n", b"f\n"]
        # the SYN, then the request that carried the ACK (a bare ACK between them would make it 3)
        assert endpoint.accepted[1][2] == 2, endpoint.accepted
        assert delays[3] >= hold * 0.8, delays  # the greeting endpoint waited for the hold
        assert min(delays[4:]) < hold * 0.5, delays  # and then no more
        _wait(lambda: engine.connections() == 0)
        engine.remove_listener(listener)
    finally:
        engine.stop()
        endpoint.close()
        sock.close()


@needs_native
def test_engine_ack_hold_is_bounded() -> None:
    for bad in (-0.1, 0.25):
        with pytest.raises(ValueError, match="ack_hold"):
            EngineNative(1, 4096, ack_hold=bad)


@needs_native
def test_engine_nap_is_bounded() -> None:
    for bad in (-1e-6, 0.002):
        with pytest.raises(ValueError, match="nap"):
            EngineNative(1, 4096, nap=bad)
        with pytest.raises(ValueError, match="stream_nap"):
            EngineNative(1, 4096, stream_nap=bad)


def _stream_naps(backends: Backends, *, stream_nap: float) -> tuple[int, float]:
    """Naps a worker with event naps off took while 8 MiB went through it to an echo endpoint and back,
    and the seconds that took."""
    engine = EngineNative(1, 4096, nap=0, stream_nap=stream_nap)
    svc = ServiceNative()
    svc.set_endpoints([backends.live[0]], 0)
    sock = _listening_socket()
    total, chunk = 8 << 20, b"y" * 65536
    try:
        engine.start()
        listener = engine.add_listener(sock, svc, [])
        # closed on the way out, a failed assertion included
        with socket.create_connection(sock.getsockname()[:2], timeout=10) as client:
            assert read_line(client) == (b"ep0\n", "ok")
            received = [0]

            def drain() -> None:
                while received[0] < total:
                    data = client.recv(1 << 20)
                    if not data:
                        return
                    received[0] += len(data)

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            before, started = engine.naps(), time.monotonic()
            for _ in range(total // len(chunk)):
                client.sendall(chunk)
            reader.join(timeout=30)
            assert received[0] == total
            naps, elapsed = engine.naps() - before, time.monotonic() - started
        _wait(lambda: engine.connections() == 0)
        engine.remove_listener(listener)
        return naps, elapsed
    finally:
        engine.stop()
        sock.close()


@needs_native
def test_engine_naps_between_batches_of_a_stream(backends: Backends) -> None:
    """A batch that moved a stream's worth of bytes is followed by the stream nap even with event naps
    off, and not without it (docs/userspace.md, "Naps under load")."""
    nap = 0.001  # the largest allowed, so that naps that did not sleep would not fit in the transfer
    naps, elapsed = _stream_naps(backends, stream_nap=nap)
    # one worker's naps follow one another, each a real sleep: they fit in the transfer (one may have
    # begun before it, one may have ended while the counters were read)
    assert naps > 0 and (naps - 2) * nap <= elapsed, (naps, elapsed)
    assert _stream_naps(backends, stream_nap=0)[0] == 0


@needs_native
def test_engine_naps_under_load_and_not_at_rest(backends: Backends) -> None:
    """A worker whose last batch handled several events or moved a stream's worth sleeps for the engine's
    nap before it polls again, so what arrives meanwhile is taken in one batch instead of each event
    waking it (docs/userspace.md); a worker at rest polls at once, so a lone exchange is not delayed."""
    nap = 0.001  # the largest allowed, so that naps that did not sleep would not fit in the run
    engine = EngineNative(1, 4096, nap=nap, stream_nap=nap)  # a batch that moved 64 KiB naps as long
    loaded, resting = ServiceNative(), ServiceNative()
    loaded.set_endpoints([backends.live[0]], 0)
    resting.set_endpoints([backends.live[0]], 0)
    socks = [_listening_socket(), _listening_socket()]
    clients: list[socket.socket] = []
    try:
        engine.start()
        listeners = [engine.add_listener(socks[0], loaded, []), engine.add_listener(socks[1], resting, [])]
        clients = [socket.create_connection(socks[0].getsockname()[:2], timeout=10) for _ in range(8)]
        at_rest = socket.create_connection(socks[1].getsockname()[:2], timeout=10)
        clients.append(at_rest)
        assert read_line(at_rest) == (b"ep0\n", "ok")
        _wait(lambda: engine.connections() == 9)
        time.sleep(0.2)  # a nap after the setup's batches (accepts and connects, several events) ends
        naps, started = engine.naps(), time.monotonic()
        for _ in range(300):  # eight connections with a message each, over and over: under load
            for client in clients[:-1]:
                client.sendall(b"x" * 100)
        sent = 300 * 8 * 100
        _wait(lambda: loaded.counters()[1] >= sent)  # bytes to the endpoint, counted as they move
        napped, elapsed = engine.naps() - naps, time.monotonic() - started
        assert loaded.counters()[1] == sent and napped > 0
        assert (napped - 2) * nap <= elapsed, (napped, elapsed)  # real sleeps, one after another
        time.sleep(0.2)
        before = engine.naps()
        for i in range(50):  # one event per batch, a few bytes: never a nap
            at_rest.sendall(b"%d\n" % i)
            assert read_line(at_rest) == (b"%d\n" % i, "ok")
        assert engine.naps() == before
        for client in clients:
            client.close()
        _wait(lambda: engine.connections() == 0)
        for listener in listeners:
            engine.remove_listener(listener)
    finally:
        for client in clients:
            client.close()
        engine.stop()
        for sock in socks:
            sock.close()


@needs_native
@pytest.mark.parametrize("copy", [False, True])
def test_engine_resumes_a_client_that_fell_behind(backends: Backends, copy: bool) -> None:
    """The client socket is watched for writability only once the client has not taken all that was
    sent to it (docs/userspace.md): a client that reads nothing while its endpoint echoes megabytes
    back stalls the stream, and when it reads again every byte arrives, in order, then the FIN."""
    engine = EngineNative(1, 4096, copy=copy, pipe_size=1 << 16, pool_max=4)
    svc = ServiceNative()
    svc.set_endpoints([backends.live[0]], 0)
    sock = _listening_socket()
    addr = sock.getsockname()[:2]
    try:
        engine.start()
        listener = engine.add_listener(sock, svc, [])
        payload = os.urandom(1 << 16) * 128  # 8 MiB: far more than both legs' socket buffers and a pipe
        with socket.create_connection(addr, timeout=30) as client:

            def send_all() -> None:
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)

            writer = threading.Thread(target=send_all, daemon=True)
            writer.start()
            time.sleep(0.5)  # the client reads nothing: the echo backs up to the engine's send to it
            got, how = read_until_close(client)
            writer.join(timeout=30)
        assert how == "fin" and not writer.is_alive()
        assert got == b"ep0\n" + payload + b"BYE\n"
        _wait(lambda: engine.connections() == 0)
        engine.remove_listener(listener)
    finally:
        engine.stop()
        sock.close()
