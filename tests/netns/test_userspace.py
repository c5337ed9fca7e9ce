"""Userspace mode against the real daemon: the shared behaviour tests plus what only this mode does.

Only userspace mode retries a failed connect on the next endpoint, shows the
endpoint the node's address as the client (the connection is proxyd's
own), and holds service addresses as ``local`` routes via ``proxyd0``.

Every class runs twice: against the native TCP engine (the default; the
extension must be built) and against its pure-Python twin
(``PROXYD_NO_EXTENSIONS=1``), as the connection-table tests run on both.

IPv6 (issue 16): ``TestUserspaceIPv6`` (engine) and ``TestUserspaceDualStackTwin``
(twin) run the behaviour suite on single-stack IPv6 and dual-stack services;
``TestUserspaceIPv6Specific`` covers this mode's own IPv6 behaviour (one
instance, family-separated endpoint lists, IPv6 service routes, UDP replies,
retry and affinity, status and trace). Each has its twin class.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.netns.behaviour import (
    CLUSTER_IP,
    EXTERNAL_IP,
    POD1,
    POD2,
    POD3,
    ServiceBehaviour,
    local_eps,
    not_served,
    refused,
    web,
)
from tests.netns.holder import device_addresses, holder_addresses
from tests.netns.topology import (
    POD_GATEWAY,
    Topology,
    endpoint_slice,
    port,
    read_line,
    service,
    wait_until,
)

TWIN = {"PROXYD_NO_EXTENSIONS": "1"}


def assert_data_path(topo: Topology, *, native: bool) -> None:
    """The daemon runs the TCP data path the class is about (the engine, or the twin)."""
    assert topo.metric("proxyd_userspace_engine_native") == (1 if native else 0)


class TestUserspace(ServiceBehaviour):
    mode = "userspace"
    native = True

    def test_data_path_in_use(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1)), tcp=("pod1",))
        assert_data_path(topology, native=self.native)
        assert topology.hello(topology.pod("pod2").ns, CLUSTER_IP, 80).pod == "pod1"

    def assert_clean(self, topo: Topology) -> None:
        links = topo.ns_run(topo.node, ["ip", "-o", "link", "show"]).stdout
        assert "proxyd0" not in links

    def test_retries_next_endpoint_when_one_is_down(self, topology: Topology) -> None:
        # pod3 runs no server: its connects are refused and retried elsewhere
        self.start(topology, web(endpoints=local_eps(POD1, POD2, POD3)), tcp=("pod1", "pod2"))
        seen = self.pods_seen(topology, topology.pod("pod3").ns, CLUSTER_IP, 80, 12)
        assert sum(seen.values()) == 12 and set(seen) == {"pod1", "pod2"}
        retries = topology.metric("proxyd_connect_retries_total", {"service": "default/web"})
        assert retries is not None and retries >= 3

    def test_retries_after_connect_timeout(self, topology: Topology) -> None:
        # 10.244.1.99 has no pod: SYNs go nowhere and the 250 ms dial timeout moves on.
        self.start(topology, web(endpoints=local_eps("10.244.1.99", POD1)), tcp=("pod1",))
        ns = topology.pod("pod3").ns
        timings = []
        for _ in range(4):
            started = time.monotonic()
            assert topology.hello(ns, CLUSTER_IP, 80).pod == "pod1"
            timings.append(time.monotonic() - started)
        # The dead endpoint was tried and abandoned after its 250 ms timeout
        # (round robin moves on past the retried endpoint, as kube-proxy's did).
        assert any(t >= 0.2 for t in timings), timings
        assert max(timings) < 2.0, timings
        retries = topology.metric("proxyd_connect_retries_total", {"service": "default/web"})
        assert retries is not None and retries >= 1

    def test_dial_timeouts_step_250ms_500ms_1s_2s_and_cap_at_four_attempts(self, topology: Topology) -> None:
        # Endpoints that drop SYNs: 10.244.1.10 has no pod (dropped on the node), pod1 and pod2 drop
        # port 8080. All addresses have two-digit last octets, so every ordering puts pod3 last.
        dark = ["10.244.1.10", POD1, POD2]
        docs = [*web(name="three-dark", cluster_ip="10.96.0.21", endpoints=local_eps(*dark, POD3)),
                *web(name="all-dark", cluster_ip="10.96.0.22",
                     endpoints=local_eps(*dark, "10.244.1.14", "10.244.1.15"))]
        self.start(topology, docs, tcp=("pod1", "pod2", "pod3"))
        for pod in ("pod1", "pod2"):
            topology.ns_run(topology.pod(pod).ns, ["iptables-nft", "-A", "INPUT", "-p", "tcp",
                                                    "--dport", "8080", "-j", "DROP"])
        ns = topology.pod("pod3").ns

        def retries(name: str) -> float:
            return topology.metric("proxyd_connect_retries_total", {"service": f"default/{name}"}) or 0.0

        # Three timed-out attempts (250 ms + 500 ms + 1 s) before pod3 answers: timers never fire
        # early, so 1.75 s is a floor; the ceiling only tells a wait from a hang (SYN retries: minutes).
        started = time.monotonic()
        assert topology.hello(ns, "10.96.0.21", 80, timeout=60).pod == "pod3"
        took = time.monotonic() - started
        assert 1.7 <= took < 20, took
        wait_until(lambda: retries("three-dark") == 3, timeout=30, what="three retries counted")

        # Five dark endpoints: four attempts (… + 2 s = 3.75 s), then the client is turned away. The
        # client is only turned away once every attempt has ended, so a fifth attempt would show as
        # a fifth counted retry (and at least 2 s more).
        started = time.monotonic()
        with topology.connect(ns, "10.96.0.22", 80, timeout=60) as sock:
            try:
                assert sock.recv(64) == b"", "served by a dark endpoint"
            except ConnectionResetError:
                pass
        took = time.monotonic() - started
        assert 3.7 <= took < 20, took
        assert retries("all-dark") == 4

    def test_affinity_expires_after_timeout(self, topology: Topology) -> None:
        # 3 s: each of the first four connections refreshes the entry, so only a pause of 3 s between
        # two of them (not a busy machine's usual stall) could end it early.
        self.start(topology, web(endpoints=local_eps(POD1, POD2, POD3), affinity_timeout=3))
        ns = topology.pod("pod1").ns
        first = self.pods_seen(topology, ns, CLUSTER_IP, 80, 4)
        assert len(first) == 1, first
        time.sleep(4.5)  # a sleep can only be longer than asked: the entry is surely expired
        # the entry expired: round robin resumes where it stopped, at another endpoint
        second = self.pods_seen(topology, ns, CLUSTER_IP, 80, 4)
        assert len(second) == 1 and second.keys() != first.keys(), (first, second)

    def test_shutdown_drains_open_connections(self, topology: Topology) -> None:
        proc = self.start(topology, web(endpoints=local_eps(POD1)), tcp=("pod1",))
        ns = topology.pod("pod2").ns
        held = topology.connect(ns, CLUSTER_IP, 80)
        with held:
            read_line(held)
            os.kill(proc.pid, signal.SIGTERM)
            # new connections are refused at once; the open one keeps working
            wait_until(lambda: refused(topology, ns, CLUSTER_IP, 80), timeout=30, what="listener closed")
            held.sendall(b"during shutdown\n")
            assert read_line(held) == b"during shutdown\n"
            assert proc.poll() is None
        # Once the last connection ends the daemon exits cleanly, before the grace period: the wait
        # has a margin far beyond the 5 s grace (a busy machine), and the daemon's own log says
        # whether the grace ran out with connections left (it resets them and says so).
        assert proc.wait(timeout=60) == 0
        assert "still open after" not in topology.log_of(proc), topology.log_of(proc)[-2000:]

    def test_round_robin_is_exact(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1, POD2, POD3)))
        seen = self.pods_seen(topology, topology.pod("pod1").ns, CLUSTER_IP, 80, 30)
        assert seen == Counter({"pod1": 10, "pod2": 10, "pod3": 10})

    def test_endpoint_sees_the_node(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1)), tcp=("pod1",))
        assert topology.hello(topology.pod("pod2").ns, CLUSTER_IP, 80).peer_ip == POD_GATEWAY

    def test_addresses_follow_services(self, topology: Topology) -> None:
        docs = [*web(endpoints=local_eps(POD1), external_ips=[EXTERNAL_IP]),
                service("headless", cluster_ip="None", ports=[port(80)])]
        proc = self.start(topology, docs, tcp=("pod1",))
        assert holder_addresses(topology) == {CLUSTER_IP, EXTERNAL_IP}
        assert device_addresses(topology) == set()  # local routes only: no address on any device
        topology.write_manifest("services.yaml", web(endpoints=local_eps(POD1), cluster_ip="10.96.0.11"))
        wait_until(lambda: holder_addresses(topology) == {"10.96.0.11"}, timeout=30, what="address swap")
        assert topology.hello(topology.pod("pod2").ns, "10.96.0.11", 80).pod == "pod1"
        # shutdown keeps the addresses (adopted by the next start); restart serves again
        assert topology.stop_proxyd(proc) == 0
        assert holder_addresses(topology) == {"10.96.0.11"}
        topology.start_proxyd(self.mode)
        assert topology.hello(topology.pod("pod2").ns, "10.96.0.11", 80).pod == "pod1"

    def test_udp_flow_moves_when_its_endpoint_goes(self, topology: Topology) -> None:
        docs = [
            service("dns", cluster_ip=CLUSTER_IP, ports=[port(53, protocol="UDP", target_port=5353)]),
            endpoint_slice("dns", ports=[{"port": 5353, "protocol": "UDP"}], endpoints=local_eps(POD1)),
        ]
        self.start(topology, docs, tcp=(), udp=("pod1", "pod2"), extra=("--udp-timeout", "30s"))
        ns = topology.pod("pod3").ns
        with topology.udp_socket(ns) as sock:
            assert topology.udp_hello(ns, CLUSTER_IP, 53, sock=sock)[0].pod == "pod1"
            topology.write_manifest("services.yaml", [docs[0], endpoint_slice(
                "dns", ports=[{"port": 5353, "protocol": "UDP"}], endpoints=local_eps(POD2))])
            def moved() -> bool:
                return topology.udp_hello(ns, CLUSTER_IP, 53, sock=sock, timeout=0.5)[0].pod == "pod2"

            wait_until(moved, timeout=30, what="flow moved to pod2")

    def test_udp_refusal_follows_endpoints(self, topology: Topology) -> None:
        # A UDP port without endpoints holds no socket (the kernel refuses), and gets one back with them.
        svc = service("dns", cluster_ip=CLUSTER_IP, ports=[port(53, protocol="UDP", target_port=5353)])

        def docs(*ips: str) -> list[dict]:
            return [svc, endpoint_slice("dns", ports=[{"port": 5353, "protocol": "UDP"}],
                                        endpoints=local_eps(*ips))]

        self.start(topology, docs(POD1), tcp=(), udp=("pod1",))
        ns = topology.pod("pod3").ns

        def udp_refused() -> bool:
            with topology.udp_socket(ns) as sock:
                sock.settimeout(0.5)
                sock.connect((CLUSTER_IP, 53))
                sock.send(b"anyone?")
                try:
                    sock.recv(100)
                except ConnectionRefusedError:
                    return True
                except TimeoutError:
                    return False
                return False

        def served() -> bool:
            try:
                return topology.udp_hello(ns, CLUSTER_IP, 53, timeout=0.5)[0].pod == "pod1"
            except OSError:
                return False

        assert served()
        topology.write_manifest("services.yaml", docs())
        wait_until(udp_refused, timeout=30, what="datagrams refused once the endpoints are gone")
        assert CLUSTER_IP in holder_addresses(topology)  # still local: refused here, never routed on
        topology.write_manifest("services.yaml", docs(POD1))
        wait_until(served, timeout=30, what="served again once an endpoint is back")

    def test_running_out_of_descriptors_pauses_accepting(self, topology: Topology) -> None:
        # With 64 descriptors proxyd can hold only a few proxied connections
        # (two sockets and two pipes each); the rest must wait, not crash it.
        proc = self.start(topology, web(endpoints=local_eps(POD1)), tcp=("pod1",),
                          wrapper=("prlimit", "--nofile=64:64"))
        ns = topology.pod("pod2").ns
        held = []
        try:
            for _ in range(24):
                held.append(topology.connect(ns, CLUSTER_IP, 80, timeout=2))
            time.sleep(1.0)
            assert proc.poll() is None
        finally:
            for sock in held:
                sock.close()
        wait_until(lambda: topology.hello(ns, CLUSTER_IP, 80, timeout=1).pod == "pod1", timeout=30,
                   what="serving again after descriptors came back")
        pauses = topology.metric("proxyd_accept_pauses_total")
        rejected = topology.metric("proxyd_connections_rejected_total",
                                   {"service": "default/web", "reason": "resources"})
        assert (pauses or 0) + (rejected or 0) >= 1
        assert proc.poll() is None


class TestUserspaceCopyPump:
    """The recv/send fallback of the pump, for kernels without splice: same data-path tests."""

    mode = "userspace"
    extra_args = ()
    env = {"PROXYD_USERSPACE_COPY": "1"}
    families = (4,)
    # the behaviour suite's helpers these tests use (the class takes three of its tests, not all)
    start = ServiceBehaviour.start
    books = ServiceBehaviour.books
    svc = ServiceBehaviour.svc
    slices = ServiceBehaviour.slices
    web = ServiceBehaviour.web
    test_bulk_transfer_both_directions = ServiceBehaviour.test_bulk_transfer_both_directions
    test_half_close = ServiceBehaviour.test_half_close
    test_endpoint_changes_keep_established_connections = (
        ServiceBehaviour.test_endpoint_changes_keep_established_connections)
    pods_seen = staticmethod(ServiceBehaviour.pods_seen)


class TestUserspaceTwin(TestUserspace):
    """The same tests against the pure-Python twin of the engine."""

    env = TWIN
    native = False


class TestUserspaceCopyPumpTwin(TestUserspaceCopyPump):
    env = {**TestUserspaceCopyPump.env, **TWIN}


class TestUserspaceDataPath:
    """Userspace-only data-path properties: backpressure, metrics, UDP idle expiry, NodePort addresses."""

    mode = "userspace"
    extra_args = ()
    env: dict[str, str] = {}
    start = ServiceBehaviour.start

    def test_backpressure_bounds_buffering(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1)), tcp=())
        server = topology.tcp_socket(topology.pod("pod1").ns)
        with server:
            server.bind((POD1, 8080))
            server.listen(8)
            server.settimeout(5)
            client = topology.connect(topology.pod("pod2").ns, CLUSTER_IP, 80, timeout=10)
            conn, _ = server.accept()
            with client, conn:
                # The client reads nothing: the endpoint must soon be unable to send.
                conn.setblocking(False)
                chunk = b"z" * 65536
                sent = 0
                stalled_since = None
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    try:
                        sent += conn.send(chunk)
                        stalled_since = None
                    except BlockingIOError:
                        stalled_since = stalled_since or time.monotonic()
                        if time.monotonic() - stalled_since > 0.5:
                            break
                        time.sleep(0.01)
                assert stalled_since is not None, "the endpoint never had to wait"
                # socket buffers on both legs plus one pipe, not the whole stream
                assert sent < 64 << 20, sent
                conn.setblocking(True)
                conn.shutdown(socket.SHUT_WR)
                received = 0
                while True:
                    data = client.recv(1 << 20)
                    if not data:
                        break
                    received += len(data)
                assert received == sent

    def test_metrics_count_connections_and_bytes(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1)), tcp=("pod1",))
        ns = topology.pod("pod2").ns
        with topology.connect(ns, CLUSTER_IP, 80) as sock:
            read_line(sock)
            sock.sendall(b"a" * 1000)
            got = 0
            while got < 1000:
                got += len(sock.recv(4096))
            labels = {"service": "default/web", "protocol": "TCP"}
            assert topology.metric("proxyd_active_connections", labels) == 1
        wait_until(lambda: topology.metric("proxyd_active_connections", labels) == 0, timeout=30,
                   what="connection closed in metrics")
        # counters are flushed every second, off the data path
        wait_until(lambda: topology.metric("proxyd_connections_total", labels) == 1, timeout=30,
                   what="connection counted")
        web_bytes = {"service": "default/web"}
        wait_until(lambda: topology.metric("proxyd_bytes_total", {**web_bytes, "direction": "to_endpoint"})
                   == 1000, timeout=30, what="bytes to the endpoint counted")
        to_client = topology.metric("proxyd_bytes_total", {**web_bytes, "direction": "to_client"})
        assert to_client is not None and to_client >= 1000 + len(b"pod1 x y 8080\n")

    def test_udp_flow_expires_when_idle(self, topology: Topology) -> None:
        docs = [
            service("dns", cluster_ip=CLUSTER_IP, ports=[port(53, protocol="UDP", target_port=5353)]),
            endpoint_slice("dns", ports=[{"port": 5353, "protocol": "UDP"}], endpoints=local_eps(POD1, POD2)),
        ]
        # 2 s: the second datagram must still find the flow (a busy machine's pause stays well below);
        # the sweep runs every timeout / 2, so 1.5 × timeout after the last datagram the flow is gone.
        self.start(topology, docs, tcp=(), udp=("pod1", "pod2"), extra=("--udp-timeout", "2s"))
        ns = topology.pod("pod3").ns
        with topology.udp_socket(ns) as sock:
            first = topology.udp_hello(ns, CLUSTER_IP, 53, sock=sock)[0].pod
            assert topology.udp_hello(ns, CLUSTER_IP, 53, sock=sock)[0].pod == first
            time.sleep(4.5)
            # the flow expired; round robin gives the next endpoint to the new flow
            assert topology.udp_hello(ns, CLUSTER_IP, 53, sock=sock)[0].pod != first

    def test_nodeport_addresses_limit_where_nodeports_listen(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1), type_="NodePort", node_port=30080), tcp=("pod1",),
                   extra=("--nodeport-addresses", "203.0.113.0/24"))
        assert topology.hello(topology.client, "203.0.113.1", 30080).pod == "pod1"
        assert refused(topology, topology.node2, "198.51.100.1", 30080)

    def test_holder_device_recreated_when_deleted(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1)), tcp=("pod1",))
        topology.ns_run(topology.node, ["ip", "link", "del", "proxyd0"])
        # the next sync (any change) notices and puts every address back
        topology.write_manifest("other.yaml", web(name="other", cluster_ip="10.96.0.12",
                                                  endpoints=local_eps(POD1)))
        wait_until(lambda: holder_addresses(topology) == {CLUSTER_IP, "10.96.0.12"}, timeout=30,
                   what="proxyd0 recreated")
        assert topology.hello(topology.pod("pod2").ns, CLUSTER_IP, 80).pod == "pod1"

    def test_nodeport_and_service_address_sharing_a_port_both_serve(self, topology: Topology) -> None:
        """No SO_REUSEPORT: a wildcard NodePort 30080 and a ClusterIP on port 30080 still both serve.

        The NodePort then listens on each node address, the ClusterIP on its own (TCP and UDP).
        """
        docs = [
            service("np", cluster_ip="10.96.0.11", type_="NodePort",
                    ports=[port(80, name="t", target_port=8080, node_port=30080),
                           port(53, name="u", protocol="UDP", target_port=5353, node_port=30080)]),
            endpoint_slice("np", ports=[{"name": "t", "port": 8080},
                                        {"name": "u", "port": 5353, "protocol": "UDP"}],
                           endpoints=local_eps(POD1)),
            service("cip", cluster_ip=CLUSTER_IP,
                    ports=[port(30080, name="t", target_port=8080),
                           port(30080, name="u", protocol="UDP", target_port=5353)]),
            endpoint_slice("cip", ports=[{"name": "t", "port": 8080},
                                         {"name": "u", "port": 5353, "protocol": "UDP"}],
                           endpoints=local_eps(POD2)),
        ]
        self.start(topology, docs, tcp=("pod1", "pod2"), udp=("pod1", "pod2"))
        ns = topology.pod("pod3").ns
        assert topology.hello(topology.client, "203.0.113.1", 30080).pod == "pod1"
        assert topology.hello(topology.node, "127.0.0.1", 30080).pod == "pod1"
        assert topology.hello(ns, CLUSTER_IP, 30080).pod == "pod2"
        assert topology.udp_hello(topology.client, "203.0.113.1", 30080)[0].pod == "pod1"
        assert topology.udp_hello(ns, CLUSTER_IP, 30080)[0].pod == "pod2"

class TestUserspaceDataPathTwin(TestUserspaceDataPath):
    env = TWIN


# -- IPv6 and dual-stack: what only userspace mode does, or how it does it ----------------------------

CLUSTER_IP6 = "fd00:10:96::10"
EXTERNAL_IP6 = "2001:db8:2::10"


def holder_addresses6(topo: Topology) -> set[str]:
    """The IPv6 service IPs held by proxyd's ``local`` routes via ``proxyd0``."""
    out = topo.ns_run(topo.node, ["ip", "-6", "-o", "route", "show", "table", "all", "dev", "proxyd0",
                                  "proto", "static", "type", "local"], check=False)
    if out.returncode != 0:
        return set()
    return {line.split()[1] for line in out.stdout.splitlines()}


def dual_stack(docs: list[dict], *, cluster_ip6: str, eps6: list[dict], families: tuple[int, ...] = (4, 6),
               ) -> list[dict]:
    """``docs`` (a service and its IPv4 slice, as ``web`` makes them) made dual-stack (or IPv6-only
    with ``families=(6,)``): clusterIPs of both families and an IPv6 EndpointSlice of ``eps6``."""
    svc, slice4 = docs
    spec = svc["spec"]
    if families == (6,):
        spec["clusterIP"] = cluster_ip6
        spec["clusterIPs"] = [cluster_ip6]
        spec["ipFamilies"] = ["IPv6"]
        spec["ipFamilyPolicy"] = "SingleStack"
        out = [svc]
    else:
        spec["clusterIPs"] = [spec["clusterIP"], cluster_ip6]
        spec["ipFamilies"] = ["IPv4", "IPv6"]
        spec["ipFamilyPolicy"] = "RequireDualStack"
        out = [svc, slice4]
    slice6 = {**slice4, "metadata": {**slice4["metadata"], "name": slice4["metadata"]["name"] + "-v6"},
              "addressType": "IPv6", "endpoints": eps6}
    return [*out, slice6]


class TestUserspaceIPv6Specific:
    """IPv6 in the one userspace instance: family-separated endpoints, IPv6 service routes via proxyd0,
    IPv6 UDP replies from the service address, retry and ClientIP affinity over IPv6, [v6]:port status."""

    mode = "userspace"
    extra_args = ()
    env: dict[str, str] = {}
    native = True
    start = ServiceBehaviour.start
    pods_seen = staticmethod(ServiceBehaviour.pods_seen)

    def test_dual_stack_port_serves_each_family_its_own_endpoints(self, topology: Topology) -> None:
        pod1, pod2 = topology.pod("pod1"), topology.pod("pod2")
        docs = dual_stack(web(endpoints=local_eps(POD1), type_="NodePort", node_port=30080,
                              external_ips=[EXTERNAL_IP, EXTERNAL_IP6]),
                          cluster_ip6=CLUSTER_IP6, eps6=local_eps(pod2.ip6))
        self.start(topology, docs, tcp=("pod1", "pod2"))
        assert_data_path(topology, native=self.native)
        ns = topology.pod("pod3").ns
        # Each family's listeners reach only that family's endpoints, as kube-proxy's per-family proxiers.
        for _ in range(3):
            assert topology.hello(ns, CLUSTER_IP, 80).pod == "pod1"
            six = topology.hello(ns, CLUSTER_IP6, 80)
            assert six.pod == "pod2" and ":" in six.peer_ip, six
            assert topology.hello(topology.client, "203.0.113.1", 30080).pod == "pod1"
            assert topology.hello(topology.client, "2001:db8:203::1", 30080).pod == "pod2"
            assert topology.hello(topology.client, EXTERNAL_IP6, 80).pod == "pod2"
            assert topology.hello(topology.client, EXTERNAL_IP, 80).pod == "pod1"
        assert holder_addresses(topology) >= {CLUSTER_IP, EXTERNAL_IP}
        assert holder_addresses6(topology) == {CLUSTER_IP6, EXTERNAL_IP6}
        assert not device_addresses(topology)  # service IPs are routes, never device addresses
        # The IPv6 half going away leaves the IPv4 half serving, and its addresses leave proxyd0.
        topology.write_manifest("services.yaml", web(endpoints=local_eps(POD1), type_="NodePort",
                                                     node_port=30080, external_ips=[EXTERNAL_IP]))
        wait_until(lambda: not holder_addresses6(topology), timeout=30, what="IPv6 addresses removed")
        assert not_served(topology, ns, CLUSTER_IP6, 80)
        assert topology.hello(ns, CLUSTER_IP, 80).pod == "pod1"
        assert pod1.ip6  # the pods are dual-stack: only the plan kept pod1 off the IPv6 half

    def test_ipv6_udp_replies_come_from_the_address_the_client_used(self, topology: Topology) -> None:
        pod1 = topology.pod("pod1")
        docs = dual_stack(web(endpoints=local_eps(POD2), type_="NodePort",
                              ports=[port(53, protocol="UDP", target_port=5353, node_port=30053)]),
                          cluster_ip6=CLUSTER_IP6, eps6=local_eps(pod1.ip6))
        docs[1]["ports"] = docs[2]["ports"] = [{"port": 5353, "protocol": "UDP"}]
        self.start(topology, docs, tcp=(), udp=("pod1", "pod2"))
        ns = topology.pod("pod3").ns
        greeting, payload, source = topology.udp_hello(ns, CLUSTER_IP6, 53)
        assert (greeting.pod, payload, source) == ("pod1", b"ping", (CLUSTER_IP6, 53))
        assert topology.udp_hello(ns, CLUSTER_IP, 53)[0].pod == "pod2"
        # The wildcard NodePort listener replies from the node address the client sent to (IPV6_PKTINFO).
        greeting, _, source = topology.udp_hello(topology.client, "2001:db8:203::1", 30053)
        assert (greeting.pod, source) == ("pod1", ("2001:db8:203::1", 30053))
        with topology.udp_socket(topology.client, 6) as sock:
            first = {topology.udp_hello(topology.client, "2001:db8:203::1", 30053, sock=sock)[0].peer_port
                     for _ in range(3)}
        assert len(first) == 1  # one client address and port: one flow, one endpoint socket

    def test_ipv6_connect_retries_next_endpoint(self, topology: Topology) -> None:
        p1, p2, p3 = (topology.pod(n) for n in ("pod1", "pod2", "pod3"))
        # pod3 runs no server: its connects are refused and retried on the next IPv6 endpoint.
        docs = dual_stack(web(endpoints=[]), cluster_ip6=CLUSTER_IP6,
                          eps6=local_eps(p1.ip6, p2.ip6, p3.ip6), families=(6,))
        self.start(topology, docs, tcp=("pod1", "pod2"))
        seen = self.pods_seen(topology, p3.ns, CLUSTER_IP6, 80, 12)
        assert sum(seen.values()) == 12 and set(seen) == {"pod1", "pod2"}
        retries = topology.metric("proxyd_connect_retries_total", {"service": "default/web"})
        assert retries is not None and retries >= 3

    def test_ipv6_client_affinity(self, topology: Topology) -> None:
        pods = [topology.pod(n) for n in ("pod1", "pod2", "pod3")]
        docs = dual_stack(web(endpoints=[], affinity_timeout=60), cluster_ip6=CLUSTER_IP6,
                          eps6=local_eps(*(p.ip6 for p in pods)), families=(6,))
        self.start(topology, docs)
        chosen = {}
        for ns in (topology.pod("pod3").ns, topology.client, topology.node2):
            seen = self.pods_seen(topology, ns, CLUSTER_IP6, 80, 6)
            assert len(seen) == 1, (ns, seen)  # every connection of one IPv6 client: one endpoint
            chosen[ns] = next(iter(seen))
        # Without affinity, round robin would give three clients' first connections three endpoints.
        assert len(set(chosen.values())) == 3, chosen

    def test_ipv6_status_and_trace_show_bracketed_endpoints(self, topology: Topology) -> None:
        p1 = topology.pod("pod1")
        sock_path = topology.manifests.parent / "status-v6.sock"
        docs = dual_stack(web(endpoints=local_eps(POD1)), cluster_ip6=CLUSTER_IP6, eps6=local_eps(p1.ip6))
        self.start(topology, docs, tcp=("pod1",), extra=("--status-socket", str(sock_path)))
        assert topology.hello(topology.pod("pod2").ns, CLUSTER_IP6, 80).pod == "pod1"
        exe = Path(sys.executable).parent / "proxyd"

        def ask(*args: str) -> dict:
            done = subprocess.run([str(exe), *args, "--json", "--socket", str(sock_path)],
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        trace = ask("trace", topology.pod("pod2").ip6, CLUSTER_IP6, "80")
        assert (trace["service"], trace["address_kind"]) == ("default/web", "cluster IP"), trace
        accepted = [p["endpoint"] for p in trace["paths"] if p["verdict"] == "ACCEPT"]
        assert accepted == [f"[{p1.ip6}]:8080"], trace
        assert any(f"listener [{CLUSTER_IP6}]:80/TCP" in s for s in trace["paths"][0]["steps"]), trace
        trace4 = ask("trace", topology.pod("pod2").ip, CLUSTER_IP, "80")
        assert [p["endpoint"] for p in trace4["paths"]] == [f"{POD1}:8080"], trace4

        def counted() -> dict | None:
            status = ask("status", "--namespace", "default", "web")
            [svc] = status["services"]
            eps = {ep["address"]: ep for ep in svc["endpoints"]}
            six = eps.get(f"[{p1.ip6}]:8080")
            return status if six is not None and six.get("counters", {}).get("connections", 0) >= 1 else None

        status = wait_until(counted, timeout=30, what="IPv6 endpoint counted in status")
        assert status["kernel"]["matches"] is True, status["kernel"]


class TestUserspaceIPv6SpecificTwin(TestUserspaceIPv6Specific):
    env = TWIN
    native = False


class _UserspaceFamilies(ServiceBehaviour):
    mode = "userspace"
    assert_clean = TestUserspace.assert_clean


# Each family variant runs on one data path (IPv6 on the engine, dual-stack on the twin), so both
# carry IPv6 traffic while the matrix stays within CI's time: TestUserspaceIPv6Specific runs on both.
class TestUserspaceIPv6(_UserspaceFamilies):
    """The behaviour tests on single-stack IPv6 services (native engine)."""

    families = (6,)


class TestUserspaceDualStackTwin(_UserspaceFamilies):
    """The behaviour tests on dual-stack services, reached on both cluster IPs (the pure-Python twin)."""

    families = (4, 6)
    env = TWIN
