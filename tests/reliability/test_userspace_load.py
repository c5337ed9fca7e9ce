"""userspace mode under load and abuse, end to end: the real daemon, real sockets, its own /proc.

What each test proves (numbers go to ``figures`` for ``docs/reliability.md``):

* as many concurrent connections as the descriptor budget allows are held,
  stay usable after sitting idle, and give their descriptors back;
* running out of descriptors (a low ``ulimit -n`` on the daemon) pauses
  accepting — counted in ``proxyd_accept_pauses_total`` — and accepting
  resumes by itself when descriptors free up; the daemon never dies;
* clients that never read do not make the daemon's memory grow with the
  bytes waiting: backpressure keeps it per connection, not per byte;
* half-closed connections finish cleanly, a vanished endpoint closes its
  clients, and nothing leaks; proxied sockets carry TCP keepalive so clients
  that vanish silently are reaped (kube-proxy userspace's Go sockets had it);
* endpoints that drop SYNs cost one connect timeout each, never a hanging
  client;
* storms of resets from clients (before and after accept) and from
  endpoints leave no connection, descriptor or memory behind;
* a UDP flood from many source ports keeps the flow table at its bound and
  evicts the least recently used flows, counted in
  ``proxyd_udp_flows_evicted_total``.

Every test runs against the native TCP engine and against its pure-Python
twin (``PROXYD_NO_EXTENSIONS=1``): the ``data_path`` fixture gives the
daemon's environment and checks the daemon says which path it runs.
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
import time
from typing import Any

import pytest

from tests.netns.topology import (
    Topology,
    endpoint,
    endpoint_slice,
    in_netns,
    port,
    service,
    wait_until,
)
from tests.reliability import harness
from tests.reliability.harness import (
    close_all,
    echo_all,
    fd_count,
    healthz,
    metric_sum,
    nofile_limit,
    open_many,
    read_lines,
    rss_kib,
    start_load_server,
)

CLUSTER_IP = "10.96.0.10"
KERNEL_MODE_TARGET = 10_000
# Descriptors the daemon may hold besides connections: its pipe pool keeps up
# to 256 idle pipes (512 descriptors) after connections end.
POOL_FDS = 512
LINGER_ZERO = struct.pack("ii", 1, 0)


DATA_PATHS = {"engine": {}, "twin": {"PROXYD_NO_EXTENSIONS": "1"}}
_data_path_env: dict[str, str] = {}
_data_path_log = ""


@pytest.fixture(autouse=True, params=list(DATA_PATHS))
def data_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which data path (TCP and UDP) the daemons of this test run: the native engine or its twin."""
    monkeypatch.setattr(f"{__name__}._data_path_env", DATA_PATHS[request.param])
    monkeypatch.setattr(f"{__name__}._data_path_log",
                        "native engine" if request.param == "engine" else "pure-Python twin")
    return request.param


def start_daemon(topo: Topology, mode: str, *, env: dict[str, str] | None = None, **kwargs: object) -> Any:
    """``harness.start_daemon`` on the data path of the ``data_path`` fixture."""
    proc = harness.start_daemon(topo, mode, env={**(env or {}), **_data_path_env}, **kwargs)  # type: ignore[arg-type]
    if kwargs.get("wait_healthy", True):
        assert f"TCP data path: {_data_path_log}" in topo.log_of(proc), topo.log_of(proc)[-2000:]
        assert f"UDP data path: {_data_path_log}" in topo.log_of(proc), topo.log_of(proc)[-2000:]
    return proc


def web(*pods: str, name: str = "web", cluster_ip: str = CLUSTER_IP, protocol: str = "TCP",
        target: int = 8080, svc_port: int = 80) -> list[dict]:
    ips = {"pod1": "10.244.1.11", "pod2": "10.244.1.12", "pod3": "10.244.1.13"}
    ports = [port(svc_port, target_port=target, protocol=protocol)]
    return [service(name, cluster_ip=cluster_ip, ports=ports),
            endpoint_slice(name, ports=[{"port": target, "protocol": protocol}],
                           endpoints=[endpoint(ips[p]) for p in pods])]


def active(topo: Topology) -> float:
    return metric_sum(topo, "proxyd_active_connections", {"protocol": "TCP"})


def settle_fds(pid: int, ceiling: int, *, timeout: float = 10.0) -> int:
    """Wait until the daemon holds at most ``ceiling`` descriptors; how many it holds."""
    wait_until(lambda: fd_count(pid) <= ceiling, timeout=timeout,
               what=f"daemon back to <= {ceiling} descriptors (holds {fd_count(pid)})")
    return fd_count(pid)


@pytest.mark.slow
def test_concurrent_connections_within_descriptor_budget(topology: Topology, figures: dict) -> None:
    """Open connections (up to 10,000) until the daemon's descriptor budget stops it; all stay usable.

    The budget is found, not assumed: batches are opened until one is not
    served at once. Those clients must be waiting in the backlog (not reset),
    the held ones must survive sitting idle, and every descriptor comes back.
    """
    for pod in ("pod1", "pod2"):
        start_load_server(topology, pod, 8080)
    topology.write_manifest("web.yaml", web("pod1", "pod2"))
    proc = start_daemon(topology, "userspace")
    pid = proc.pid
    client_ns = topology.pod("pod3").ns
    rss_before, fds_before = rss_kib(pid), fd_count(pid)
    limit = nofile_limit(pid)
    held: list[socket.socket] = []
    waiting: list[socket.socket] = []
    per_conn = 0
    try:
        pauses_before = metric_sum(topology, "proxyd_accept_pauses_total")
        while len(held) < KERNEL_MODE_TARGET and not waiting:
            batch = open_many(client_ns, CLUSTER_IP, 80, min(250, KERNEL_MODE_TARGET - len(held)), timeout=10)
            lines = read_lines(batch, timeout=3)
            assert b"" not in lines, "a client was reset instead of served or kept waiting"
            held += [s for s, line in zip(batch, lines, strict=True) if line]
            pending = [s for s, line in zip(batch, lines, strict=True) if line is None]
            # A client without its greeting yet is only "beyond the budget" once the daemon says
            # it paused accepting; until then it is just slow (a busy machine), so keep reading.
            deadline = time.monotonic() + 120
            while pending and time.monotonic() < deadline \
                    and metric_sum(topology, "proxyd_accept_pauses_total") == pauses_before:
                more = read_lines(pending, timeout=1)
                assert b"" not in more, "a client was reset instead of served or kept waiting"
                held += [s for s, line in zip(pending, more, strict=True) if line]
                pending = [s for s, line in zip(pending, more, strict=True) if line is None]
            waiting += pending
            if not per_conn and held:
                per_conn = math.ceil((fd_count(pid) - fds_before) / len(held) - 0.01)
        target = len(held)
        assert active(topology) == target
        rss_held, fds_held = rss_kib(pid), fd_count(pid)
        print(f"userspace: {target} concurrent connections held ({per_conn} fds each, limit {limit}, "
              f"{fds_held} fds open), {len(waiting)} more waiting in the backlog")
        # The daemon must spend at least half its descriptor limit on connections.
        assert target >= min(KERNEL_MODE_TARGET, limit // per_conn // 2)
        time.sleep(5)  # idle: nothing may time them out or drop them
        echoed = echo_all(held, timeout=60)
        assert echoed == target
        # Clients beyond the budget waited; freeing some lets them in.
        if waiting:
            close_all(held[:len(waiting) + 10])
            late = read_lines(waiting, timeout=15)
            assert all(late), f"{sum(1 for x in late if not x)} clients beyond the budget never got through"
        assert proc.poll() is None and healthz(topology) == 200
    finally:
        close_all(held)
        close_all(waiting)
    wait_until(lambda: active(topology) == 0, timeout=30, what="every connection closed")
    fds_after = settle_fds(pid, fds_before + POOL_FDS)
    rss_after = rss_kib(pid)
    figures.update(connections_held=target, waited_beyond_budget=len(waiting), fd_limit=limit,
                   fds_per_connection=per_conn, rss_kib_before=rss_before, rss_kib_holding=rss_held,
                   rss_kib_after=rss_after, rss_kib_per_connection=round((rss_held - rss_before) / target, 1),
                   fds_before=fds_before, fds_holding=fds_held, fds_after=fds_after,
                   connections_lost=target - echoed)
    print(f"VmRSS {rss_before} -> {rss_held} -> {rss_after} KiB")
    assert (rss_held - rss_before) / target < 16, "more than 16 KiB of daemon memory per idle connection"


def test_descriptor_exhaustion_pauses_accept_and_resumes(topology: Topology, figures: dict) -> None:
    start_load_server(topology, "pod1", 8080)
    topology.write_manifest("web.yaml", web("pod1"))
    proc = start_daemon(topology, "userspace", nofile=160)
    pid = proc.pid
    client_ns = topology.pod("pod3").ns
    fds_before = fd_count(pid)
    capacity = (160 - fds_before) // 2  # an upper bound whatever a connection costs
    socks = open_many(client_ns, CLUSTER_IP, 80, capacity + 40)
    try:
        lines = read_lines(socks, timeout=3)
        served = [s for s, line in zip(socks, lines, strict=True) if line]
        waiting = [s for s, line in zip(socks, lines, strict=True) if line is None]
        reset = [s for s, line in zip(socks, lines, strict=True) if line == b""]
        pauses = metric_sum(topology, "proxyd_accept_pauses_total")
        print(f"fd limit 160 (daemon held {fds_before} at start): {len(served)} served, "
              f"{len(waiting)} waiting in the backlog, {len(reset)} reset; {pauses:.0f} accept pauses")
        assert proc.poll() is None, topology.log_of(proc)[-2000:]
        assert pauses >= 1, "accepting never paused although descriptors ran out"
        assert served and waiting
        assert "pausing" in topology.log_of(proc)
        # Free descriptors: the clients waiting in the backlog must now be served,
        # as many at a time as the limit allows; each is checked and let go.
        close_all(served)
        pending, later, deadline = waiting, 0, time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            lines = read_lines(pending, timeout=0.5)
            done = [s for s, line in zip(pending, lines, strict=True) if line]
            reset += [s for s, line in zip(pending, lines, strict=True) if line == b""]
            assert echo_all(done, timeout=10) == len(done)
            close_all(done)
            later += len(done)
            pending = [s for s, line in zip(pending, lines, strict=True) if line is None]
        assert not pending, f"{len(pending)} waiting clients never got through"
    finally:
        close_all(socks)
    wait_until(lambda: active(topology) == 0, timeout=10, what="every connection closed")
    assert topology.hello(client_ns, CLUSTER_IP, 80).pod == "pod1"
    assert proc.poll() is None and healthz(topology) == 200
    figures.update(fd_limit=160, served_at_once=len(served), waited_then_served=later,
                   reset_at_the_limit=len(reset), accept_pauses=pauses)
    # A client accepted at the very edge may be reset (no descriptor left for
    # its endpoint socket or pipes); more than a handful means accepting did not pause.
    assert len(reset) <= 4, f"{len(reset)} clients were reset instead of waiting"


@pytest.mark.slow
@pytest.mark.parametrize("copy", [False, True], ids=["splice", "copy"])
def test_slow_readers_keep_memory_bounded(topology: Topology, figures: dict, copy: bool) -> None:
    """Endpoints that send forever to clients that never read: daemon memory stays per connection."""
    start_load_server(topology, "pod1", 8080, style="flood")
    start_load_server(topology, "pod2", 8080)
    topology.write_manifest("web.yaml", web("pod1") + web("pod2", name="echo", cluster_ip="10.96.0.11"))
    proc = start_daemon(topology, "userspace", env={"PROXYD_USERSPACE_COPY": "1"} if copy else None)
    pid = proc.pid
    client_ns = topology.pod("pod3").ns
    rss_before = rss_kib(pid)
    count = 200
    socks = []
    try:
        with in_netns(client_ns):
            for _ in range(count):
                sock = socket.socket()
                # A small receive window so the backlog builds up in the daemon's direction.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(5)
                sock.connect((CLUSTER_IP, 80))
                socks.append(sock)
        # Let every endpoint fill every buffer on the way (they never stop sending).
        time.sleep(4)
        moved = metric_sum(topology, "proxyd_bytes_total")
        rss_full = rss_kib(pid)
        time.sleep(3)
        rss_later = rss_kib(pid)
        # The event loop still serves others promptly.
        started = time.monotonic()
        assert topology.hello(client_ns, "10.96.0.11", 80, timeout=3).pod == "pod2"
        other_latency = time.monotonic() - started
        assert proc.poll() is None
    finally:
        close_all(socks)
    growth = (rss_full - rss_before) / count
    figures.update(path="copy" if copy else "splice", slow_readers=count, rss_kib_before=rss_before,
                   rss_kib_full=rss_full, rss_kib_later=rss_later, rss_kib_per_connection=round(growth, 1),
                   other_connect_seconds=round(other_latency, 3))
    print(f"{'copy' if copy else 'splice'}: {count} slow readers; VmRSS {rss_before} -> {rss_full} -> "
          f"{rss_later} KiB ({growth:.1f} KiB per connection); bytes flushed so far {moved:.0f}")
    # splice keeps payload in kernel pipes; the copy path holds one 64 KiB buffer per direction.
    bound = 192 if copy else 48
    assert growth < bound, f"{growth:.1f} KiB per slow reader (bound {bound})"
    assert rss_later - rss_full < 2048, "memory kept growing while nothing was read"
    wait_until(lambda: active(topology) == 0, timeout=15, what="every connection closed")


def test_half_closed_and_vanished_endpoints_leave_nothing(topology: Topology, figures: dict) -> None:
    start_load_server(topology, "pod1", 8080)
    topology.write_manifest("web.yaml", web("pod1"))
    proc = start_daemon(topology, "userspace")
    pid = proc.pid
    client_ns = topology.pod("pod3").ns
    fds_before = fd_count(pid)

    # Half-close: the client stops sending and keeps reading until the endpoint ends.
    socks = open_many(client_ns, CLUSTER_IP, 80, 300)
    assert all(read_lines(socks, timeout=10))
    for sock in socks:
        sock.setblocking(True)
        sock.sendall(b"last words\n")
        sock.shutdown(socket.SHUT_WR)
    tails = []
    for sock in socks:
        sock.settimeout(5)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                data += chunk
        tails.append(data)
    close_all(socks)
    # The echo of what was sent before the FIN, then the endpoint's own last words, then EOF.
    assert all(t == b"last words\nBYE\n" for t in tails), "bytes after the client's FIN were lost"
    wait_until(lambda: active(topology) == 0, timeout=10, what="half-closed connections ended")

    # The endpoint process dies with 300 connections open: every client is told.
    server = start_load_server(topology, "pod2", 8080)
    topology.write_manifest("web.yaml", web("pod2"))
    wait_until(lambda: topology.hello(client_ns, CLUSTER_IP, 80).pod == "pod2", timeout=5, what="pod2 serves")
    socks = open_many(client_ns, CLUSTER_IP, 80, 300)
    assert all(read_lines(socks, timeout=10))
    topology.kill(server)
    ended = read_lines(socks, timeout=10)
    close_all(socks)
    assert all(line == b"" for line in ended), "a client was left hanging after its endpoint died"
    wait_until(lambda: active(topology) == 0, timeout=10, what="dead endpoint's connections ended")
    fds_after = settle_fds(pid, fds_before + POOL_FDS)
    assert proc.poll() is None and healthz(topology) == 200
    figures.update(half_closed=300, endpoint_died_under=300, fds_before=fds_before, fds_after=fds_after)


@pytest.mark.slow
def test_half_open_clients_are_reaped_by_keepalive(topology: Topology, figures: dict) -> None:
    """Clients that vanish without FIN or RST (power loss, a lost route) must not pin connections forever.

    Both proxied sockets carry keepalive (15 s idle, 15 s interval, as
    kube-proxy userspace's Go sockets). To see the reaping in CI time the
    node namespace's ``tcp_keepalive_probes`` is lowered to 1, so a dead
    peer is found after 15 s + 15 s instead of 15 s + 9 x 15 s.
    """
    start_load_server(topology, "pod1", 8080)
    topology.write_manifest("web.yaml", web("pod1"))
    topology.sysctl(topology.node, "net.ipv4.tcp_keepalive_probes", "1")
    proc = start_daemon(topology, "userspace")
    pid = proc.pid
    fds_before = fd_count(pid)
    client_ns = topology.pod("pod3").ns
    socks = open_many(client_ns, CLUSTER_IP, 80, 20)
    try:
        assert all(read_lines(socks, timeout=5))

        def proxied() -> tuple[list[str], str]:
            out = topology.ns_run(topology.node, ["ss", "-tnoH", "state", "established"]).stdout
            return [line for line in out.splitlines() if f"{CLUSTER_IP}:80 " in line or ":8080 " in line], out

        # The engine switches the endpoint side's keepalive on a second after connecting (docs/userspace.md).
        def all_keepalive() -> bool:
            mine = proxied()[0]
            return len(mine) == 40 and all("keepalive" in line for line in mine)

        wait_until(all_keepalive, timeout=10, interval=0.25, what="keepalive on every proxied socket")
        mine, out = proxied()
        assert len(mine) == 40, out
        assert all("keepalive" in line for line in mine), "proxied sockets without TCP keepalive:\n" + out
        # The client vanishes: every packet to or from it is dropped from now on.
        for chain in ("INPUT", "OUTPUT"):
            topology.ns_run(client_ns, ["iptables-nft", "-A", chain, "-j", "DROP"])
        vanished = time.monotonic()
        wait_until(lambda: active(topology) == 0, timeout=45, interval=0.5,
                   what="half-open connections reaped by keepalive")
        reaped_after = time.monotonic() - vanished
        settle_fds(pid, fds_before + POOL_FDS)
        assert proc.poll() is None
    finally:
        close_all(socks)
    figures.update(half_open=len(socks), reaped_after_seconds=round(reaped_after, 1))
    print(f"{len(socks)} half-open connections reaped {reaped_after:.1f}s after their client vanished")


def test_reset_storms_leave_nothing_behind(topology: Topology, figures: dict) -> None:
    start_load_server(topology, "pod1", 8080)
    start_load_server(topology, "pod2", 8080, style="rst")
    topology.write_manifest("web.yaml", web("pod1") + web("pod2", name="rst", cluster_ip="10.96.0.11"))
    proc = start_daemon(topology, "userspace")
    pid = proc.pid
    client_ns = topology.pod("pod3").ns
    rss_before, fds_before = rss_kib(pid), fd_count(pid)
    keeper = topology.connect(client_ns, CLUSTER_IP, 80)
    resets = 0
    keeper_rounds = 0
    try:
        assert keeper.recv(4096).startswith(b"pod1")
        for round_ in range(5):
            # 400 clients reset right after connecting, many before the daemon accepted them.
            socks = open_many(client_ns, CLUSTER_IP, 80, 400)
            for sock in socks:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
            close_all(socks)
            # 200 more reset after the endpoint greeted them, in the middle of the stream.
            socks = open_many(client_ns, CLUSTER_IP, 80, 200)
            read_lines(socks, timeout=5)
            for sock in socks:
                sock.setblocking(True)
                with contextlib.suppress(OSError):
                    sock.send(b"x" * 1000)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
            close_all(socks)
            # And 200 whose endpoint resets them.
            socks = open_many(client_ns, "10.96.0.11", 80, 200, reset_ok=True)
            ends = read_lines(socks, timeout=10)
            close_all(socks)
            assert all(e == b"" for e in ends), "a client was not told its endpoint reset"
            resets += 800
            keeper.sendall(f"round {round_}\n".encode())
            assert keeper.recv(4096) == f"round {round_}\n".encode(), "the long-lived connection broke"
            keeper_rounds += 1
        wait_until(lambda: active(topology) == 1, timeout=15, what="only the long-lived connection left")
        assert proc.poll() is None and healthz(topology) == 200
        assert topology.hello(client_ns, CLUSTER_IP, 80).pod == "pod1"
    finally:
        keeper.close()
    fds_after = settle_fds(pid, fds_before + POOL_FDS)
    rss_after = rss_kib(pid)
    figures.update(resets=resets, fds_before=fds_before, fds_after=fds_after, rss_kib_before=rss_before,
                   rss_kib_after=rss_after, long_lived_connections_lost=0 if keeper_rounds == 5 else 1)
    print(f"RST storm of {resets}: fds {fds_before} -> {fds_after}, VmRSS {rss_before} -> {rss_after} KiB")
    assert rss_after - rss_before < 20 * 1024, "daemon memory grew by more than 20 MiB after the storm"


def test_udp_flood_keeps_flow_table_bounded_and_evicts_oldest(topology: Topology, figures: dict) -> None:
    topology.start_udp_server("pod1", 5353)
    topology.write_manifest("dns.yaml", web("pod1", name="dns", protocol="UDP", target=5353, svc_port=53))
    nofile = 1024
    # A long idle timeout: only the table bound may end flows here.
    proc = start_daemon(topology, "userspace", nofile=nofile, extra_args=["--udp-timeout", "120s"])
    pid = proc.pid
    bound = max(64, min(65536, nofile // 4))  # proxyd's flow bound for this descriptor limit
    client_ns = topology.pod("pod3").ns
    rss_before, fds_before = rss_kib(pid), fd_count(pid)
    flood = 3 * bound + 200
    socks: list[socket.socket] = []
    try:
        with in_netns(client_ns):
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(flood)]
        oldest = socks[0]
        first_peer = topology.udp_hello(client_ns, CLUSTER_IP, 53, sock=oldest)[0].peer_port
        # Each source port waits for its answer, so every datagram makes a flow
        # (a blind burst overflows the service socket's buffer and is dropped,
        # as it would be anywhere); the burst comes after.
        peers = {}
        for sock in socks[1:]:
            peers[sock] = topology.udp_hello(client_ns, CLUSTER_IP, 53, sock=sock)[0].peer_port
        newest = socks[-20:]
        evicted = wait_until(
            lambda: (v := metric_sum(topology, "proxyd_udp_flows_evicted_total")) >= flood - bound and v,
            timeout=10, what="evictions counted")
        flows = metric_sum(topology, "proxyd_active_connections", {"protocol": "UDP"})
        fds_full = fd_count(pid)
        rss_full = rss_kib(pid)
        # The newest flows are still the same flows (same endpoint-side socket) ...
        for sock in newest:
            assert topology.udp_hello(client_ns, CLUSTER_IP, 53, sock=sock)[0].peer_port == peers[sock]
        # ... while the oldest was evicted: its next datagram opens a new flow.
        assert topology.udp_hello(client_ns, CLUSTER_IP, 53, sock=oldest)[0].peer_port != first_peer
        # A blind burst on top: dropped datagrams and evictions, never more flows.
        with in_netns(client_ns):
            burst = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2000)]
        socks += burst
        for sock in burst:
            sock.sendto(b"burst", (CLUSTER_IP, 53))
        time.sleep(1)
        assert metric_sum(topology, "proxyd_active_connections", {"protocol": "UDP"}) <= bound
        assert fd_count(pid) <= fds_before + bound + 8
        assert topology.udp_hello(client_ns, CLUSTER_IP, 53)[0].pod == "pod1"
        assert proc.poll() is None and healthz(topology) == 200
    finally:
        close_all(socks)
    figures.update(fd_limit=nofile, flow_bound=bound, source_ports=flood, flows_evicted=evicted,
                   flows_held=flows, fds_before=fds_before, fds_full=fds_full,
                   rss_kib_before=rss_before, rss_kib_full=rss_full)
    print(f"UDP flood from {flood} ports: {flows:.0f} flows held (bound {bound}), {evicted:.0f} evicted; "
          f"fds {fds_before} -> {fds_full}; VmRSS {rss_before} -> {rss_full} KiB")
    assert flows <= bound
    assert fds_full <= fds_before + bound + 8
    assert rss_full - rss_before < 10 * 1024



def test_blackholed_endpoints_are_skipped_and_never_hang_clients(topology: Topology, figures: dict) -> None:
    """Endpoints that drop SYNs (a dead node, a firewall): connects time out and move on, bounded.

    kube-proxy userspace's per-attempt timeouts (250 ms, 500 ms, ...) apply:
    a client is served by a live endpoint after one timed-out attempt, and
    is refused (RST) once every endpoint timed out — never left hanging.
    """
    for pod in ("pod1", "pod2"):
        start_load_server(topology, pod, 8080)
    topology.write_manifest("web.yaml", web("pod1", "pod2") + web("pod1", "pod2", name="dead",
                                                                 cluster_ip="10.96.0.11"))
    proc = start_daemon(topology, "userspace")
    pid = proc.pid
    fds_before = fd_count(pid)
    client_ns = topology.pod("pod3").ns
    topology.ns_run(topology.pod("pod1").ns, ["iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "8080",
                                               "-j", "DROP"])
    # Half the picks hit the black hole; every client still reaches pod2.
    socks = open_many(client_ns, CLUSTER_IP, 80, 200)
    started = time.monotonic()
    lines = read_lines(socks, timeout=60)
    served_in = time.monotonic() - started
    close_all(socks)
    assert all(line and line.startswith(b"pod2") for line in lines), set(lines)
    # A hang would last the kernel's SYN retries (over a minute); the 250 ms step is timed in
    # tests/netns/test_userspace.py. The bound leaves room for a busy machine.
    assert served_in < 15.0, f"200 clients took {served_in:.1f}s"
    # Let those finish closing before pod2 goes dark too (a FIN it never
    # acknowledges would keep them in FIN-WAIT for the kernel's retry time).
    wait_until(lambda: active(topology) == 0, timeout=10, what="served connections closed")
    # Every endpoint black-holed: refused after the attempts, never hanging.
    topology.ns_run(topology.pod("pod2").ns, ["iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "8080",
                                               "-j", "DROP"])
    socks = open_many(client_ns, "10.96.0.11", 80, 300)
    started = time.monotonic()
    ends = read_lines(socks, timeout=60)
    refused_in = time.monotonic() - started
    close_all(socks)
    assert all(end == b"" for end in ends), "a client hung or was served by a black hole"
    assert refused_in < 15.0, f"clients of a dead service waited {refused_in:.1f}s"
    retries = metric_sum(topology, "proxyd_connect_retries_total")
    wait_until(lambda: active(topology) == 0, timeout=10, what="nothing left open")
    fds_after = settle_fds(pid, fds_before + POOL_FDS)
    assert proc.poll() is None and healthz(topology) == 200
    figures.update(served_past_black_hole=200, refused_dead_service=300, connect_retries=retries,
                   refused_within_seconds=round(refused_in, 2), fds_before=fds_before, fds_after=fds_after)
