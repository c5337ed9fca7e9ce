"""IPv6 and dual-stack behaviour of the kernel NAT modes (iptables, nftables), against the real daemon.

A mixin like ``behaviour.ServiceBehaviour``: a mode's test module subclasses
``DualStackNat`` (class name starting with ``Test``) and sets ``mode``,
``env``, and the three per-mode hooks (``ruleset`` of one family,
``flush_family`` as a firewall reload would, ``assert_clean`` of both
families). The daemon runs one proxier per family (``DualStackMode``); these
tests check what that must give, as kube-proxy's per-family proxiers do:

* an IPv6 ClusterIP served from a pod without SNAT (the pod is inside the
  IPv6 cluster CIDR), a NodePort on the node's IPv6 address from outside
  (masqueraded), and a service without endpoints rejected at once
  (ICMPv6 port unreachable), but no NodePort on ``::1``;
* a dual-stack service reached on both cluster IPs and on both node
  addresses, each family with its own family's endpoints only;
* the client's IPv6 address preserved with externalTrafficPolicy Local;
* a hairpin over IPv6 masqueraded;
* an IPv6 UDP flow moved when its endpoint goes, and one served once its
  service gets a first endpoint (stale conntrack cleared);
* one family's state flushed behind the daemon's back repaired, the other
  family untouched;
* a restart adopting both families' state (connections of both kept, the
  same rules rewritten);
* ``--cleanup`` removing both families' state.
"""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any, ClassVar

from tests.netns.behaviour import CLUSTER_IP
from tests.netns.topology import (
    CLIENT_IP6,
    NODE_IP,
    NODE_IP6,
    POD_GATEWAY6,
    Topology,
    endpoint,
    endpoint_slice,
    port,
    read_line,
    service,
    wait_until,
)

CLUSTER_IP6 = "fd00:10:96::10"
EMPTY_IP6 = "fd00:10:96::11"
LB_IP6 = "2001:db8:2::20"
DEADLINE = 30.0  # waits for a change: far beyond the 1 s minimum sync period, on a busy machine


def dual_service(name: str, *, families: tuple[int, ...], cluster_ips: dict[int, str],
                 ports: list[dict], **kwargs) -> dict:
    """A Service of ``families`` (primary first) with its clusterIPs, ipFamilies and ipFamilyPolicy."""
    ips = [cluster_ips[f] for f in families]
    svc = service(name, cluster_ip=ips[0], ports=ports, **kwargs)
    svc["spec"]["clusterIPs"] = ips
    svc["spec"]["ipFamilies"] = [f"IPv{f}" for f in families]
    svc["spec"]["ipFamilyPolicy"] = "RequireDualStack" if len(families) == 2 else "SingleStack"
    return svc


def slice_of(service_name: str, fam: int, endpoints: list[dict], ports: list[dict]) -> dict:
    """The service's EndpointSlice of family ``fam`` (one per family, as the EndpointSlice controller)."""
    obj = endpoint_slice(service_name, ports=ports, endpoints=endpoints, name=f"{service_name}-v{fam}")
    obj["addressType"] = f"IPv{fam}"
    return obj


def web6(topo: Topology, *pods: str, name: str = "web", cluster_ip: str = CLUSTER_IP6,
         families: tuple[int, ...] = (6,), v4_pods: tuple[str, ...] = (), node: str = "node1",
         **kwargs) -> list[dict]:
    """A TCP service 80 -> 8080: IPv6 endpoints ``pods``, IPv4 ones ``v4_pods`` when dual-stack."""
    svc_port = [port(80, target_port=8080, node_port=kwargs.pop("node_port", None))]
    eps = [{"port": 8080}]
    docs = [dual_service(name, families=families, cluster_ips={4: CLUSTER_IP, 6: cluster_ip}, ports=svc_port,
                         **kwargs),
            slice_of(name, 6, [endpoint(topo.pod(p).ip6, node=node) for p in pods], eps)]
    if 4 in families:
        docs.append(slice_of(name, 4, [endpoint(topo.pod(p).ip, node=node) for p in v4_pods], eps))
    return docs


def dns6(topo: Topology, *pods: str) -> list[dict]:
    """An IPv6 UDP service 53 -> 5353 with the given node1 endpoints."""
    udp = [{"port": 5353, "protocol": "UDP"}]
    return [dual_service("dns", families=(6,), cluster_ips={6: CLUSTER_IP6},
                         ports=[port(53, protocol="UDP", target_port=5353)]),
            slice_of("dns", 6, [endpoint(topo.pod(p).ip6) for p in pods], udp)]


def refused(topo: Topology, ns: str, ip: str, port_: int, *, timeout: float = 3.0) -> bool:
    """True when a TCP client of ``ip`` (either family) is refused or reset within ``timeout``.

    The margin covers one SYN retransmission (1 s): an ICMPv6 error that arrives while ``connect``
    still holds the socket lock is dropped by the kernel (TcpExtLockDroppedIcmps), and the next SYN's
    error is the one that refuses. A DROP instead hangs for the whole timeout.
    """
    sock = topo.tcp_socket(ns, 6 if ":" in ip else 4)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port_))
        return sock.recv(1) == b""
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def served_by(topo: Topology, ns: str, ip: str, port_: int) -> str:
    """The pod that greets a client of ``ip:port_`` ("" when none does within half a second)."""
    try:
        return topo.hello(ns, ip, port_, timeout=0.5).pod
    except (OSError, ValueError):
        return ""


def icmp6_unreachables(topo: Topology, ns: str) -> int:
    """ICMPv6 destination-unreachable errors namespace ``ns`` has received."""
    for line in topo.ns_run(ns, ["cat", "/proc/net/snmp6"]).stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "Icmp6InDestUnreachs":
            return int(value)
    raise AssertionError("no Icmp6InDestUnreachs in /proc/net/snmp6")


class Icmp6Refusal:
    """Mixin for the shared suite's IPv6 variants: "refused at once" as IPv6 clients can see it.

    The kernel drops an ICMPv6 error that arrives while ``connect()`` still holds the socket
    (TcpExtLockDroppedIcmps; an IPv4 one is honoured), and between network namespaces the REJECT's
    answer arrives within that very call, so the client's TCP gives up only at its next SYN, 1 s
    later: the same with kube-proxy. What the proxy owes is the answer at once: the client gets the
    port unreachable within half a second, and its connection is refused (not left to time out).
    """

    def test_no_endpoints_refused_at_once(self, topology: Topology) -> None:
        suite: Any = self  # a ServiceBehaviour: this mixin comes first in its bases
        suite.start(topology, suite.web([]), tcp=())
        ns = topology.pod("pod1").ns
        for b in suite.books:
            if b.version == 4:
                started = time.monotonic()
                assert refused(topology, ns, b.cluster_ip, 80, timeout=1.0)
                assert time.monotonic() - started < 1.0
                continue
            before = icmp6_unreachables(topology, ns)
            # Refused already when the error came after connect() let the socket go (a slow machine),
            # else still in its first SYN: either way the port unreachable must have arrived.
            refused(topology, ns, b.cluster_ip, 80, timeout=0.5)
            assert icmp6_unreachables(topology, ns) > before, "no ICMPv6 port unreachable within 0.5 s"
            assert refused(topology, ns, b.cluster_ip, 80, timeout=3.0)


class DualStackNat:
    """Mixin: IPv6 and dual-stack tests of a kernel NAT mode."""

    mode: ClassVar[str] = ""
    env: ClassVar[dict[str, str]] = {}
    extra_args: ClassVar[tuple[str, ...]] = ()

    def ruleset(self, topo: Topology, fam: int) -> str:
        """The mode's state of family ``fam`` as its tool prints it."""
        raise NotImplementedError

    def flush_family(self, topo: Topology, fam: int) -> None:
        """Remove the mode's state of family ``fam`` (as a firewall reload would)."""
        raise NotImplementedError

    def assert_clean(self, topo: Topology) -> None:
        """No state of the mode left in either family."""
        raise NotImplementedError

    def start(self, topo: Topology, docs: list[dict], *, tcp: tuple[str, ...] = ("pod1", "pod2"),
              udp: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
        for pod in tcp:
            topo.start_tcp_server(pod, 8080)
        for pod in udp:
            topo.start_udp_server(pod, 5353)
        topo.write_manifest("services.yaml", docs)
        return topo.start_proxyd(self.mode, extra_args=(*self.extra_args, *extra), env=self.env)

    def test_ipv6_cluster_ip_node_port_and_reject(self, topology: Topology) -> None:
        docs = web6(topology, "pod1", "pod2", type_="NodePort", node_port=30091)
        docs += [dual_service("empty", families=(6,), cluster_ips={6: EMPTY_IP6}, ports=[port(80)]),
                 slice_of("empty", 6, [], [{"port": 80}])]
        self.start(topology, docs)
        pod3 = topology.pod("pod3")
        seen = {topology.hello(pod3.ns, CLUSTER_IP6, 80).pod for _ in range(20)}
        assert seen == {"pod1", "pod2"}
        # From inside the IPv6 cluster CIDR: no SNAT.
        assert topology.hello(pod3.ns, CLUSTER_IP6, 80).peer_ip == pod3.ip6
        # From outside, on the node's IPv6 address: masqueraded (Cluster policy).
        greeting = topology.hello(topology.client, NODE_IP6, 30091)
        assert greeting.pod in ("pod1", "pod2") and greeting.peer_ip == POD_GATEWAY6
        # No endpoints: rejected with ICMPv6 port unreachable, not left to time out.
        assert refused(topology, pod3.ns, EMPTY_IP6, 80)
        # kube-proxy never serves IPv6 NodePorts on ::1 (route_localnet has no IPv6 counterpart).
        assert served_by(topology, topology.node, "::1", 30091) == ""
        # The IPv6-only service lives in the IPv6 state only.
        assert CLUSTER_IP6 in self.ruleset(topology, 6)
        assert CLUSTER_IP6 not in self.ruleset(topology, 4)

    def test_dual_stack_service_reached_on_both_addresses_with_its_family_endpoints(
            self, topology: Topology) -> None:
        # IPv4 endpoints pod1, IPv6 endpoints pod2: each family's proxier must use only its own.
        docs = web6(topology, "pod2", families=(4, 6), v4_pods=("pod1",), type_="NodePort", node_port=30092)
        self.start(topology, docs)
        pod3 = topology.pod("pod3").ns
        for _ in range(5):
            assert topology.hello(pod3, CLUSTER_IP, 80).pod == "pod1"
            assert topology.hello(pod3, CLUSTER_IP6, 80).pod == "pod2"
            assert topology.hello(topology.client, NODE_IP, 30092).pod == "pod1"
            assert topology.hello(topology.client, NODE_IP6, 30092).pod == "pod2"
        assert CLUSTER_IP in self.ruleset(topology, 4) and CLUSTER_IP6 in self.ruleset(topology, 6)

    def test_ipv6_client_address_preserved_with_external_policy_local(self, topology: Topology) -> None:
        docs = web6(topology, "pod1", type_="NodePort", node_port=30093, external_local=True)
        docs += web6(topology, "pod2", name="lb", cluster_ip="fd00:10:96::12", type_="LoadBalancer",
                     node_port=30094, lb_ips=[LB_IP6])
        self.start(topology, docs)
        for _ in range(3):
            greeting = topology.hello(topology.client, NODE_IP6, 30093)
            assert greeting.pod == "pod1" and greeting.peer_ip == CLIENT_IP6
            greeting = topology.hello(topology.client, LB_IP6, 80)
            assert greeting.pod == "pod2" and greeting.peer_ip == POD_GATEWAY6

    def test_ipv6_hairpin_is_masqueraded(self, topology: Topology) -> None:
        self.start(topology, web6(topology, "pod1"), tcp=("pod1",))
        greeting = topology.hello(topology.pod("pod1").ns, CLUSTER_IP6, 80)
        assert greeting.pod == "pod1" and greeting.peer_ip == POD_GATEWAY6

    def test_ipv6_stale_udp_conntrack_is_cleared(self, topology: Topology) -> None:
        self.start(topology, dns6(topology, "pod1"), tcp=(), udp=("pod1", "pod2"))
        ns = topology.pod("pod3").ns
        with topology.udp_socket(ns, 6) as sock:
            assert topology.udp_hello(ns, CLUSTER_IP6, 53, sock=sock)[0].pod == "pod1"
            # pod1 still answers, so only the conntrack entry could keep the flow there.
            topology.write_manifest("services.yaml", dns6(topology, "pod2"))

            def moved() -> bool:
                try:
                    return topology.udp_hello(ns, CLUSTER_IP6, 53, sock=sock, timeout=0.5)[0].pod == "pod2"
                except OSError:
                    return False

            wait_until(moved, timeout=DEADLINE, what="IPv6 UDP flow moved to the new endpoint")

    def test_ipv6_udp_service_gaining_its_first_endpoint(self, topology: Topology) -> None:
        self.start(topology, dns6(topology), tcp=(), udp=("pod1",))
        ns = topology.pod("pod3").ns
        with topology.udp_socket(ns, 6) as sock:
            sock.settimeout(0.3)
            sock.sendto(b"early", (CLUSTER_IP6, 53))
            try:
                sock.recvfrom(100)
                raise AssertionError("a service without endpoints answered")
            except (TimeoutError, ConnectionRefusedError):
                pass
            # The entry made while the service rejected must go, or this flow keeps being rejected.
            topology.write_manifest("services.yaml", dns6(topology, "pod1"))

            def answered() -> bool:
                try:
                    return topology.udp_hello(ns, CLUSTER_IP6, 53, sock=sock, timeout=0.5)[0].pod == "pod1"
                except OSError:
                    return False

            wait_until(answered, timeout=DEADLINE, what="IPv6 UDP flow served after the first endpoint")

    def test_one_family_flushed_is_repaired_and_the_other_untouched(self, topology: Topology) -> None:
        proc = self.start(topology, web6(topology, "pod2", families=(4, 6), v4_pods=("pod1",)),
                          extra=("--sync-period", "2s"))
        pod3 = topology.pod("pod3").ns
        assert topology.hello(pod3, CLUSTER_IP6, 80).pod == "pod2"
        before4 = self.ruleset(topology, 4)
        self.flush_family(topology, 6)
        broken = time.monotonic()
        # The check runs once per sync period (2 s); the margin is for a busy machine.
        wait_until(lambda: served_by(topology, pod3, CLUSTER_IP6, 80) == "pod2", timeout=DEADLINE,
                   what="IPv6 state repaired")
        print(f"{self.mode}: IPv6 served again {time.monotonic() - broken:.1f}s after the flush")
        assert topology.hello(pod3, CLUSTER_IP, 80).pod == "pod1"
        log = topology.log_of(proc)
        assert "full resync" in log, log[-2000:]
        assert _own_lines(self.ruleset(topology, 4)) == _own_lines(before4)

    def test_restart_adopts_both_families(self, topology: Topology) -> None:
        proc = self.start(topology, web6(topology, "pod2", families=(4, 6), v4_pods=("pod1",)))
        pod3 = topology.pod("pod3").ns
        held = {4: topology.connect(pod3, CLUSTER_IP, 80), 6: topology.connect(pod3, CLUSTER_IP6, 80)}
        try:
            assert read_line(held[4]).startswith(b"pod1 ") and read_line(held[6]).startswith(b"pod2 ")
            before = {fam: _own_lines(self.ruleset(topology, fam)) for fam in (4, 6)}
            assert topology.stop_proxyd(proc) == 0
            # proxyd is down: both families' state stays and serves new connections
            assert topology.hello(pod3, CLUSTER_IP6, 80).pod == "pod2"
            topology.start_proxyd(self.mode, extra_args=self.extra_args, env=self.env)
            for fam, sock in held.items():
                sock.sendall(b"still %d\n" % fam)
                assert read_line(sock) == b"still %d\n" % fam
            # The first sync after the restart rewrote each family's state into the same rules.
            assert {fam: _own_lines(self.ruleset(topology, fam)) for fam in (4, 6)} == before
        finally:
            for sock in held.values():
                sock.close()

    def test_cleanup_removes_both_families(self, topology: Topology) -> None:
        proc = self.start(topology, web6(topology, "pod2", families=(4, 6), v4_pods=("pod1",)))
        assert topology.hello(topology.pod("pod3").ns, CLUSTER_IP6, 80).pod == "pod2"
        assert CLUSTER_IP in self.ruleset(topology, 4) and CLUSTER_IP6 in self.ruleset(topology, 6)
        assert topology.stop_proxyd(proc) == 0
        result = topology.run_proxyd(["--cleanup"])
        assert result.returncode == 0, result.stderr
        self.assert_clean(topology)


_COUNTERS = re.compile(r" counter packets \d+ bytes \d+")


def _own_lines(text: str) -> list[str]:
    """The lines of a ruleset listing that name the mode's objects, counters aside (traffic moves them)."""
    return sorted(_COUNTERS.sub("", line.strip()) for line in text.splitlines()
                  if line.strip() and not line.startswith("#") and not line.startswith(":"))
