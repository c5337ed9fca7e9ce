"""Service behaviour every proxy mode must show, written once and run per mode (uvloop's mixin trick).

A mode's test module subclasses ``ServiceBehaviour`` (the class name must
start with ``Test``), sets ``mode`` (and ``extra_args`` if needed) and
implements ``assert_clean``; pytest then runs every test below in that mode
against the real daemon in a fresh ``Topology``.

Clients are chosen as real traffic would come: ClusterIPs from a pod on the
node, NodePorts / externalIPs / LB IPs from the external ``client``
namespace. Which backend answered comes from the backend's greeting. Tests
that hold for the kernel NAT modes only (source IP preservation,
masquerading, hairpin, UDP conntrack) are in ``KernelNatBehaviour`` (IPv4);
those of one mode (userspace's connect retry) belong in that mode's module.

Every test runs in the address families ``families`` names: ``(4,)`` (the
default), ``(6,)`` for single-stack IPv6 services, ``(4, 6)`` for dual-stack
services (one cluster IP and one EndpointSlice per family) reached on the
addresses of both. The addresses of each family come from an address book
(``V4``, ``V6``). A family variant subclasses ``ServiceBehaviour`` itself,
not the IPv4 class of its module (whose mode-specific tests would run again),
and reuses that class's ``assert_clean``::

    class TestIptablesIPv6(ServiceBehaviour):
        mode = "iptables"
        families = (6,)
        assert_clean = TestIptables.assert_clean
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from tests.netns.topology import (
    CLIENT_IP,
    NODE_IP,
    NODE_IP6,
    POD_GATEWAY,
    Topology,
    af,
    endpoint,
    endpoint_slice,
    port,
    read_line,
    service,
    wait_until,
)

CLUSTER_IP = "10.96.0.10"
EXTERNAL_IP = "192.0.2.10"
LB_IP = "192.0.2.20"
POD1, POD2, POD3 = "10.244.1.11", "10.244.1.12", "10.244.1.13"
REMOTE_POD = "10.244.2.11"
# A wait for a change to take effect, not a target: the 1 s target is measured in bench/. Far beyond
# the product's own delays (1 s minimum sync period) because a busy machine stretches them.
CHANGE_DEADLINE = 30.0


@dataclass(frozen=True)
class Addresses:
    """The addresses the behaviour tests use in one family."""

    version: int
    cluster_ip: str
    external_ip: str
    lb_ip: str
    node_ip: str
    node2_range: str  # holds node2's address, not the client's
    pods: Mapping[str, str] = field(default_factory=dict)  # pod name -> address

    def service_ip(self, n: int) -> str:
        """Another cluster IP of this family (``n`` < 100)."""
        return f"10.96.0.{n}" if self.version == 4 else f"fd00:10:96::{n}"

    def outside_ip(self, n: int) -> str:
        """Another external address of this family (``n`` < 100)."""
        return f"192.0.2.{n}" if self.version == 4 else f"2001:db8:2::{n}"


V4 = Addresses(4, CLUSTER_IP, EXTERNAL_IP, LB_IP, NODE_IP, "198.51.100.0/24",
               {"pod1": POD1, "pod2": POD2, "pod3": POD3, "pod2-1": REMOTE_POD})
V6 = Addresses(6, "fd00:10:96::10", "2001:db8:2::10", "2001:db8:2::20", NODE_IP6, "2001:db8:198::/64",
               {"pod1": "fd00:10:244:1::11", "pod2": "fd00:10:244:1::12", "pod3": "fd00:10:244:1::13",
                "pod2-1": "fd00:10:244:2::11"})
BOOKS = {4: V4, 6: V6}


@dataclass(frozen=True)
class Ep:
    """An endpoint named by its pod, whatever the family (``eps``)."""

    pod: str
    conditions: tuple[tuple[str, Any], ...] = ()

    def in_family(self, book: Addresses) -> dict[str, Any]:
        node = "node2" if self.pod.startswith("pod2-") else "node1"
        return endpoint(book.pods[self.pod], node=node, **dict(self.conditions))


def eps(*pods: str, **conditions: Any) -> list[Ep]:
    """Endpoints on ``pods`` (with the same conditions)."""
    return [Ep(pod, tuple(sorted(conditions.items()))) for pod in pods]


def web(*, endpoints: list[dict], name: str = "web", cluster_ip: str = CLUSTER_IP, **kwargs) -> list[dict]:
    """A one-port TCP service 80 → 8080 with the given endpoints (and its slice)."""
    kwargs.setdefault("ports", [port(80, target_port=8080, node_port=kwargs.pop("node_port", None))])
    return [service(name, cluster_ip=cluster_ip, **kwargs),
            endpoint_slice(name, ports=[{"port": 8080}], endpoints=endpoints)]


def local_eps(*ips: str) -> list[dict]:
    return [endpoint(ip) for ip in ips]


def dns(*ips: str) -> list[dict]:
    """A UDP service 53 -> 5353 with the given node1 endpoints."""
    return [service("dns", cluster_ip=CLUSTER_IP, ports=[port(53, protocol="UDP", target_port=5353)]),
            endpoint_slice("dns", ports=[{"port": 5353, "protocol": "UDP"}], endpoints=local_eps(*ips))]


def reachable(topo: Topology, ns: str, ip: str, port_: int) -> bool:
    """True when a backend greets a client of ``ip:port_`` within half a second."""
    try:
        return bool(topo.hello(ns, ip, port_, timeout=0.5).pod)
    except (OSError, ValueError):
        return False


def refused(topo: Topology, ns: str, ip: str, port_: int, *, timeout: float = 1.0) -> bool:
    """True when a TCP client is turned away (refused or reset) within ``timeout``; False on a hang."""
    sock = topo.tcp_socket(ns, 6 if af(ip) == socket.AF_INET6 else 4)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port_))
        data = sock.recv(1)
        return data == b""  # EOF without a greeting also turns the client away
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def not_served(topo: Topology, ns: str, ip: str, port_: int, *, timeout: float = 2.0) -> bool:
    """True when no backend greets a client of ``ip:port_`` (refused, reset, unreachable or silent)."""
    try:
        with topo.connect(ns, ip, port_, timeout=timeout) as sock:
            return read_line(sock) == b""
    except OSError:  # refused, reset, unreachable, or timed out
        return True


def echo_transfer(sock: socket.socket, payload: bytes, *, chunk: int = 1 << 20) -> bytes:
    """Send ``payload`` (then half-close) while reading everything the echo server sends back."""
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            view = memoryview(payload)
            for off in range(0, len(view), chunk):
                sock.sendall(view[off:off + chunk])
            sock.shutdown(socket.SHUT_WR)
        except BaseException as err:  # reported by the reader
            errors.append(err)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    received = bytearray()
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        received += data
    thread.join(timeout=30)
    if errors:
        raise errors[0]
    return bytes(received)


class ServiceBehaviour:
    """Mixin: the behaviour tests. Subclasses set ``mode`` and implement ``assert_clean``."""

    mode: ClassVar[str] = ""
    families: ClassVar[tuple[int, ...]] = (4,)
    extra_args: ClassVar[tuple[str, ...]] = ()
    env: ClassVar[dict[str, str]] = {}

    def assert_clean(self, topo: Topology) -> None:
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------------

    @property
    def books(self) -> tuple[Addresses, ...]:
        """The address book of every family under test, primary first."""
        return tuple(BOOKS[f] for f in self.families)

    def svc(self, name: str, *, ports: list[dict[str, Any]], ip: int = 10, **kwargs: Any) -> dict[str, Any]:
        """A Service in this class's families: cluster IP ``service_ip(ip)`` of each (10: ``cluster_ip``)."""
        ips = [b.cluster_ip if ip == 10 else b.service_ip(ip) for b in self.books]
        return service(name, cluster_ip=ips[0], cluster_ips=ips, ports=ports, **kwargs)

    def slices(self, name: str, endpoints: list[Ep], ports: list[dict[str, Any]] | None = None) -> list[dict]:
        """One EndpointSlice per family of this class, holding ``endpoints`` in that family."""
        return [endpoint_slice(name, ports=ports or [{"port": 8080}], name=f"{name}-ipv{b.version}",
                               address_type=f"IPv{b.version}", endpoints=[e.in_family(b) for e in endpoints])
                for b in self.books]

    def web(self, endpoints: list[Ep], *, name: str = "web", node_port: int | None = None,
            **kwargs: Any) -> list[dict]:
        """A one-port TCP service 80 → 8080 in this class's families, with its slices."""
        return [self.svc(name, ports=[port(80, target_port=8080, node_port=node_port)], **kwargs),
                *self.slices(name, endpoints)]

    def start(self, topo: Topology, docs: list[dict], *, tcp: tuple[str, ...] = ("pod1", "pod2", "pod3"),
              udp: tuple[str, ...] = (), tcp_port: int = 8080, udp_port: int = 5353,
              extra: tuple[str, ...] = (), wrapper: tuple[str, ...] = ()):
        topo.start_servers(tcp=tcp, udp=udp, tcp_port=tcp_port, udp_port=udp_port)
        topo.write_manifest("services.yaml", docs)
        return topo.start_proxyd(self.mode, extra_args=(*self.extra_args, *extra), env=self.env,
                                 wrapper=wrapper)

    @staticmethod
    def pods_seen(topo: Topology, ns: str, ip: str, port_: int, count: int) -> Counter[str]:
        return Counter(topo.hello(ns, ip, port_).pod for _ in range(count))

    # -- tests -------------------------------------------------------------------------------------

    def test_cluster_ip_spreads_over_endpoints(self, topology: Topology) -> None:
        self.start(topology, self.web(eps("pod1", "pod2", "pod3")))
        for b in self.books:
            seen = self.pods_seen(topology, topology.pod("pod1").ns, b.cluster_ip, 80, 30)
            assert set(seen) == {"pod1", "pod2", "pod3"}, (b.cluster_ip, seen)
            # targetPort 8080 answered a connection to port 80
            assert topology.hello(topology.pod("pod2").ns, b.cluster_ip, 80).port == 8080

    def test_named_multi_port(self, topology: Topology) -> None:
        docs = [
            self.svc("multi", ports=[port(80, name="http", target_port="web"),
                                     port(81, name="alt", target_port="alt")]),
            *self.slices("multi", eps("pod1"), ports=[{"name": "http", "port": 8080},
                                                     {"name": "alt", "port": 9090}]),
        ]
        topology.start_tcp_server("pod1", 9090)
        self.start(topology, docs, tcp=("pod1",))
        ns = topology.pod("pod2").ns
        for b in self.books:
            assert topology.hello(ns, b.cluster_ip, 80).port == 8080
            assert topology.hello(ns, b.cluster_ip, 81).port == 9090

    def dns(self, endpoints: list[Ep]) -> list[dict]:
        return [self.svc("dns", ports=[port(53, protocol="UDP", target_port=5353)]),
                *self.slices("dns", endpoints, ports=[{"port": 5353, "protocol": "UDP"}])]

    def test_udp(self, topology: Topology) -> None:
        # An idle timeout far beyond any pause a busy machine puts between two datagrams of the flow
        # (the default 250 ms could end the flow mid-test; the flag is userspace's, the others ignore it).
        self.start(topology, self.dns(eps("pod1", "pod2")), tcp=(), udp=("pod1", "pod2"),
                   extra=("--udp-timeout", "60s"))
        ns = topology.pod("pod3").ns
        for b in self.books:
            with topology.udp_socket(ns, b.version) as sock:
                first, payload, source = topology.udp_hello(ns, b.cluster_ip, 53, payload=b"q1", sock=sock)
                assert payload == b"q1"
                assert source == (b.cluster_ip, 53)  # replies come from the service address
                # one client address is one flow: it stays on its endpoint
                for i in range(5):
                    again, payload, _ = topology.udp_hello(ns, b.cluster_ip, 53, payload=b"q%d" % i,
                                                           sock=sock)
                    assert again.pod == first.pod and payload == b"q%d" % i
            # different client sockets spread over both endpoints (kernel modes pick at random per new
            # flow: 30 flows all on one endpoint has odds 2**-29; 12 failed once in a CI run)
            seen = {topology.udp_hello(ns, b.cluster_ip, 53)[0].pod for _ in range(30)}
            assert seen == {"pod1", "pod2"}, b.cluster_ip

    def test_no_endpoints_refused_at_once(self, topology: Topology) -> None:
        self.start(topology, self.web([]), tcp=())
        for b in self.books:
            started = time.monotonic()
            assert refused(topology, topology.pod("pod1").ns, b.cluster_ip, 80)
            assert time.monotonic() - started < 1.0

    def test_client_ip_affinity(self, topology: Topology) -> None:
        self.start(topology, self.web(eps("pod1", "pod2", "pod3"), affinity_timeout=300))
        for b in self.books:
            for pod in ("pod1", "pod2", "pod3"):
                seen = self.pods_seen(topology, topology.pod(pod).ns, b.cluster_ip, 80, 8)
                assert len(seen) == 1, (pod, b.cluster_ip, seen)

    def test_node_port_from_outside(self, topology: Topology) -> None:
        self.start(topology, self.web(eps("pod1", "pod2"), type_="NodePort", node_port=30080))
        for b in self.books:
            seen = self.pods_seen(topology, topology.client, b.node_ip, 30080, 12)
            assert set(seen) == {"pod1", "pod2"}, (b.node_ip, seen)

    def test_external_ip(self, topology: Topology) -> None:
        self.start(topology, self.web(eps("pod1", "pod2"), external_ips=[b.external_ip for b in self.books]))
        for b in self.books:
            seen = self.pods_seen(topology, topology.client, b.external_ip, 80, 12)
            assert set(seen) == {"pod1", "pod2"}, (b.external_ip, seen)
            assert topology.hello(topology.pod("pod3").ns, b.cluster_ip, 80).pod in {"pod1", "pod2"}

    def test_load_balancer_ip(self, topology: Topology) -> None:
        self.start(topology, self.web(eps("pod1", "pod2"), type_="LoadBalancer", node_port=30081,
                                      lb_ips=[b.lb_ip for b in self.books]))
        for b in self.books:
            seen = self.pods_seen(topology, topology.client, b.lb_ip, 80, 12)
            assert set(seen) == {"pod1", "pod2"}, (b.lb_ip, seen)

    def test_load_balancer_source_ranges(self, topology: Topology) -> None:
        self.start(topology, self.web(eps("pod1"), type_="LoadBalancer", node_port=30083,
                                      lb_ips=[b.lb_ip for b in self.books],
                                      source_ranges=[b.node2_range for b in self.books]), tcp=("pod1",))
        for b in self.books:
            # node2 is inside the ranges, the client is not
            assert topology.hello(topology.node2, b.lb_ip, 80).pod == "pod1"
            with pytest.raises(OSError):  # refused, reset or timed out: never served
                topology.hello(topology.client, b.lb_ip, 80, timeout=1.5)
            # the ranges guard the LB IP only; the NodePort stays open to everyone
            assert topology.hello(topology.client, b.node_ip, 30083).pod == "pod1"

    def test_endpoint_changes_keep_established_connections(self, topology: Topology) -> None:
        self.start(topology, self.web(eps("pod1")))
        ns = topology.pod("pod3").ns
        held = [topology.connect(ns, b.cluster_ip, 80) for b in self.books]
        try:
            for sock in held:
                assert read_line(sock).startswith(b"pod1 ")
            # pod1 leaves, pod2 arrives
            topology.write_manifest("services.yaml", self.web(eps("pod2")))
            for b in self.books:
                wait_until(lambda b=b: self.pods_seen(topology, ns, b.cluster_ip, 80, 4)
                           == Counter({"pod2": 4}), timeout=CHANGE_DEADLINE,
                           what=f"new endpoint in use on {b.cluster_ip}")
            for sock in held:
                sock.sendall(b"still there\n")
                assert read_line(sock) == b"still there\n"
            # and pod1 comes back next to pod2
            topology.write_manifest("services.yaml", self.web(eps("pod1", "pod2")))
            for b in self.books:
                wait_until(lambda b=b: set(self.pods_seen(topology, ns, b.cluster_ip, 80, 6))
                           == {"pod1", "pod2"}, timeout=CHANGE_DEADLINE,
                           what=f"added endpoint in use on {b.cluster_ip}")
            for sock in held:
                sock.sendall(b"again\n")
                assert read_line(sock) == b"again\n"
        finally:
            for sock in held:
                sock.close()

    def test_headless_external_name_and_labelled_services_get_nothing(self, topology: Topology) -> None:
        # Each ignored service carries externalIPs (and the labelled ones ClusterIPs) with a live
        # endpoint behind them: had proxyd programmed anything for them, these addresses would answer.
        ignored = {"headless": 31, "extname": 32, "other-proxy": 33, "labelled-headless": 34}
        labelled = {"other-proxy": (33, {"service.kubernetes.io/service-proxy-name": "someone-else"}),
                    "labelled-headless": (34, {"service.kubernetes.io/headless": ""})}

        def outside(name: str) -> list[str]:
            return [b.outside_ip(ignored[name]) for b in self.books]

        docs = [
            *self.web(eps("pod1")),
            service("headless", cluster_ip="None", ports=[port(80, target_port=8080)],
                    external_ips=outside("headless")),
            service("extname", cluster_ip="", ports=[port(80, target_port=8080)],
                    external_name="example.invalid", external_ips=outside("extname")),
        ]
        for name, (n, labels) in labelled.items():
            docs.append(self.svc(name, ip=n, ports=[port(80, target_port=8080)], external_ips=outside(name),
                                 labels=labels))
        for name in ignored:
            docs.extend(self.slices(name, eps("pod2")))
        proc = self.start(topology, docs, tcp=("pod1", "pod2"))
        ns = topology.pod("pod3").ns
        for b in self.books:
            # the served one works, so a sync has happened with every object above in it
            assert topology.hello(ns, b.cluster_ip, 80).pod == "pod1"
            for name, n in ignored.items():
                assert not_served(topology, topology.client, b.outside_ip(n), 80), f"{name} is served"
            for name, (n, _) in labelled.items():
                assert not_served(topology, ns, b.service_ip(n), 80), (name, b.service_ip(n))
        assert proc.poll() is None

    def test_broken_manifest_does_not_affect_others(self, topology: Topology) -> None:
        topology.write_manifest("broken.yaml", "kind: Service\nspec: [unclosed\n  - : :\n")
        topology.write_manifest("invalid.yaml",
                                [self.svc("bad", ip=99, ports=[port(70000, target_port=8080)])])
        self.start(topology, self.web(eps("pod1")))
        ns = topology.pod("pod3").ns
        for b in self.books:
            assert topology.hello(ns, b.cluster_ip, 80).pod == "pod1"
        # the daemon keeps applying changes after the bad files
        topology.write_manifest("services.yaml", self.web(eps("pod2")))
        for b in self.books:
            wait_until(lambda b=b: topology.hello(ns, b.cluster_ip, 80).pod == "pod2",
                       timeout=CHANGE_DEADLINE, what=f"change after a broken file on {b.cluster_ip}")

    def test_cleanup_leaves_nothing(self, topology: Topology) -> None:
        proc = self.start(topology, self.web(eps("pod1"), external_ips=[b.external_ip for b in self.books]))
        for b in self.books:
            assert topology.hello(topology.pod("pod3").ns, b.cluster_ip, 80).pod == "pod1"
        assert topology.stop_proxyd(proc) == 0
        result = topology.run_proxyd(["--cleanup"])
        assert result.returncode == 0, result.stderr
        self.assert_clean(topology)
        # and a second cleanup on a clean node is fine
        assert topology.run_proxyd(["--cleanup"]).returncode == 0

    def test_bulk_transfer_both_directions(self, topology: Topology) -> None:
        self.start(topology, self.web(eps("pod1")), tcp=("pod1",))
        payload = os.urandom(64 << 20)
        for b in self.books:
            with topology.connect(topology.pod("pod2").ns, b.cluster_ip, 80, timeout=30) as sock:
                greeting = read_line(sock)
                echoed = echo_transfer(sock, payload)
            assert greeting.startswith(b"pod1 ")
            assert len(echoed) == len(payload) + 4
            assert hashlib.sha256(echoed[:-4]).digest() == hashlib.sha256(payload).digest()
            assert echoed[-4:] == b"BYE\n"

    def test_half_close(self, topology: Topology) -> None:
        self.start(topology, self.web(eps("pod1")), tcp=("pod1",))
        for b in self.books:
            with topology.connect(topology.pod("pod2").ns, b.cluster_ip, 80) as sock:
                read_line(sock)
                sock.sendall(b"before close\n")
                sock.shutdown(socket.SHUT_WR)
                # our direction is closed; the server's keeps sending until it is done
                received = b""
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    received += data
            assert received == b"before close\nBYE\n"

    def test_resets_propagate(self, topology: Topology) -> None:
        # An in-process backend on pod1 that we can make reset on demand.
        self.start(topology, self.web(eps("pod1")), tcp=())
        for b in self.books:
            self._resets_propagate(topology, b)

    @staticmethod
    def _resets_propagate(topology: Topology, b: Addresses) -> None:
        server = topology.tcp_socket(topology.pod("pod1").ns, b.version)
        with server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind((b.pods["pod1"], 8080))
            server.listen(8)
            server.settimeout(5)
            # endpoint resets -> client sees a reset
            with topology.connect(topology.pod("pod2").ns, b.cluster_ip, 80) as client:
                conn, _ = server.accept()
                conn.sendall(b"hi\n")
                assert read_line(client) == b"hi\n"
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                with pytest.raises(ConnectionResetError):
                    client.settimeout(3)
                    while client.recv(65536):
                        pass
            # client resets -> endpoint sees a reset
            client = topology.connect(topology.pod("pod2").ns, b.cluster_ip, 80)
            conn, _ = server.accept()
            with conn:
                client.sendall(b"x")
                conn.settimeout(3)
                assert conn.recv(1) == b"x"
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                with pytest.raises(ConnectionResetError):
                    while conn.recv(65536):
                        pass

    def test_external_traffic_policy_local(self, topology: Topology) -> None:
        topology.start_tcp_server("pod2-1", 8080)
        self.start(topology, self.web(eps("pod1", "pod2-1"), type_="NodePort", node_port=30082,
                                      external_local=True), tcp=("pod1",))
        for b in self.books:
            seen = self.pods_seen(topology, topology.client, b.node_ip, 30082, 10)
            assert seen == Counter({"pod1": 10}), b.node_ip
            # cluster traffic still reaches both
            seen = self.pods_seen(topology, topology.pod("pod3").ns, b.cluster_ip, 80, 10)
            assert set(seen) == {"pod1", "pod2-1"}, b.cluster_ip

    def test_terminating_serving_endpoints_are_used_only_when_none_is_ready(self, topology: Topology) -> None:
        # pod1 is terminating but still serving, pod2 terminating and not serving: with no ready
        # endpoint, traffic falls back to the serving-terminating ones (pod1 only).
        fallback = [*eps("pod1", ready=False, serving=True, terminating=True),
                    *eps("pod2", ready=False, serving=False, terminating=True)]
        self.start(topology, self.web(fallback), tcp=("pod1", "pod2", "pod3"))
        ns = topology.pod("pod3").ns
        for b in self.books:
            assert self.pods_seen(topology, ns, b.cluster_ip, 80, 8) == Counter({"pod1": 8}), b.cluster_ip
        # a ready endpoint arrives: only it is used from then on
        topology.write_manifest("services.yaml", self.web([*fallback, *eps("pod3")]))
        for b in self.books:
            wait_until(lambda b=b: self.pods_seen(topology, ns, b.cluster_ip, 80, 6) == Counter({"pod3": 6}),
                       timeout=30, what=f"the ready endpoint replaces the terminating one on {b.cluster_ip}")

    def test_internal_traffic_policy_local(self, topology: Topology) -> None:
        topology.start_tcp_server("pod2-1", 8080)
        self.start(topology, self.web(eps("pod1", "pod2-1"), internal_local=True), tcp=("pod1",))
        ns = topology.pod("pod3").ns
        for b in self.books:
            # from this node, only this node's endpoint; the one on node2 is never used
            assert self.pods_seen(topology, ns, b.cluster_ip, 80, 10) == Counter({"pod1": 10}), b.cluster_ip
        # no local endpoint left: cluster traffic from this node is not sent to node2
        topology.write_manifest("services.yaml", self.web(eps("pod2-1"), internal_local=True))
        for b in self.books:
            wait_until(lambda b=b: not_served(topology, ns, b.cluster_ip, 80), timeout=30,
                       what=f"no local endpoint: {b.cluster_ip} not served")

    def test_udp_without_endpoints_is_refused(self, topology: Topology) -> None:
        self.start(topology, self.dns([]), tcp=())
        ns = topology.pod("pod3").ns
        for b in self.books:
            with topology.udp_socket(ns, b.version) as sock:
                sock.settimeout(5)
                sock.connect((b.cluster_ip, 53))
                started = time.monotonic()
                sock.send(b"anyone?")
                # The refusal (ICMP port unreachable) reaches a connected socket as ECONNREFUSED.
                with pytest.raises(ConnectionRefusedError):
                    sock.recv(100)
                assert time.monotonic() - started < 5


class KernelNatBehaviour(ServiceBehaviour):
    """Mixin for the kernel NAT modes (iptables, nftables): addresses as kube-proxy's rules leave them."""

    def test_client_ip_preserved_with_external_policy_local(self, topology: Topology) -> None:
        docs = web(endpoints=[endpoint(POD1), endpoint(REMOTE_POD, node="node2")], type_="NodePort",
                   node_port=30083, external_local=True)
        self.start(topology, docs, tcp=("pod1",))
        for _ in range(5):
            greeting = topology.hello(topology.client, NODE_IP, 30083)
            assert greeting.pod == "pod1" and greeting.peer_ip == CLIENT_IP

    def test_external_traffic_with_cluster_policy_is_masqueraded(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1), type_="LoadBalancer", node_port=30084,
                                 lb_ips=[LB_IP]), tcp=("pod1",))
        for ip, port_ in ((NODE_IP, 30084), (LB_IP, 80)):
            greeting = topology.hello(topology.client, ip, port_)
            assert greeting.pod == "pod1" and greeting.peer_ip == POD_GATEWAY, (ip, greeting)

    def test_pod_to_cluster_ip_keeps_its_address(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1)), tcp=("pod1",))
        assert topology.hello(topology.pod("pod3").ns, CLUSTER_IP, 80).peer_ip == POD3

    def test_hairpin_is_masqueraded(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1)), tcp=("pod1",))
        greeting = topology.hello(topology.pod("pod1").ns, CLUSTER_IP, 80)
        assert greeting.pod == "pod1" and greeting.peer_ip == POD_GATEWAY

    def test_stale_udp_conntrack_is_cleared(self, topology: Topology) -> None:
        self.start(topology, dns(POD1), tcp=(), udp=("pod1", "pod2"))
        ns = topology.pod("pod3").ns
        sock = topology.udp_socket(ns)
        with sock:
            assert topology.udp_hello(ns, CLUSTER_IP, 53, sock=sock)[0].pod == "pod1"
            # pod1 still answers, so only the conntrack entry could keep the flow there
            topology.write_manifest("services.yaml", dns(POD2))

            def moved() -> bool:
                return topology.udp_hello(ns, CLUSTER_IP, 53, sock=sock, timeout=0.5)[0].pod == "pod2"

            wait_until(moved, timeout=CHANGE_DEADLINE, what="UDP flow moved to the new endpoint")

    def test_udp_service_gaining_its_first_endpoint(self, topology: Topology) -> None:
        self.start(topology, dns(), tcp=(), udp=("pod1",))
        ns = topology.pod("pod3").ns
        sock = topology.udp_socket(ns)
        with sock:
            sock.settimeout(0.3)
            sock.sendto(b"early", (CLUSTER_IP, 53))
            try:
                sock.recvfrom(100)
                raise AssertionError("a service without endpoints answered")
            except (TimeoutError, ConnectionRefusedError):
                pass
            topology.write_manifest("services.yaml", dns(POD1))

            def answered() -> bool:
                try:
                    return topology.udp_hello(ns, CLUSTER_IP, 53, sock=sock, timeout=0.5)[0].pod == "pod1"
                except (TimeoutError, ConnectionRefusedError):
                    return False

            wait_until(answered, timeout=CHANGE_DEADLINE, what="UDP flow served after the first endpoint")
