"""ipvs mode against the real daemon and a real IPVS kernel (run inside the QEMU guest).

The shared behaviour suite (``tests/netns/behaviour.py``) runs in ipvs mode,
plus what only this mode does: the ``sh`` scheduler, the client source IP
seen by a local endpoint under externalTrafficPolicy Local, graceful
removal of real servers (weight 0 while connections last), adoption of the
kernel's state across a restart without cutting connections, and the
kernel objects the mode owns. The kernel's view is read from
``/proc/net/ip_vs`` inside the node namespace.

IPv6 and dual-stack (issue 16): the behaviour suite runs again for
single-stack IPv6 services (``TestIpvsIPv6``) and dual-stack services reached
on both addresses (``TestIpvsDualStack``), each with the behaviour tests
that exercise what differs per family in ipvs mode (``FAMILY_TESTS``: every
test costs ~20 s under software emulation, and the others only repeat
family-blind code); ``test_dual_stack_kernel_objects`` shows the two
per-family instances sharing ``kube-ipvs0`` and the IPVS table.

Issue 18: ``test_refused_real_server_quarantines_one_service`` makes the
kernel refuse one service's real server among several: a route in the
local table making its endpoint's address a broadcast address, which IPVS
rejects as a destination (EINVAL: a real server must route as unicast or
local; a blackhole route does not do it, its lookup fails and counts as
unicast).
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections import Counter

import pytest

from tests.netns.behaviour import (
    CLUSTER_IP,
    POD1,
    POD2,
    POD3,
    REMOTE_POD,
    V6,
    ServiceBehaviour,
    local_eps,
    web,
)
from tests.netns.netfilter_dualstack import Icmp6Refusal
from tests.netns.topology import (
    CLIENT_IP,
    NODE_IP,
    NODE_IP6,
    Topology,
    endpoint,
    endpoint_slice,
    port,
    read_line,
    service,
    wait_until,
)

pytestmark = pytest.mark.ipvs


def _hex_addr(text: str) -> tuple[str, int]:
    """``0A60000A:0050`` (IPv4, hex) or ``[fd00:0010:...:0010]:0050`` (IPv6) -> (canonical ip, port)."""
    if text.startswith("["):
        ip, _, port_hex = text[1:].partition("]:")
        return str(ipaddress.ip_address(ip)), int(port_hex, 16)
    ip_hex, port_hex = text.split(":")
    raw = int(ip_hex, 16)
    return ".".join(str((raw >> s) & 0xFF) for s in (24, 16, 8, 0)), int(port_hex, 16)


def ipvs_table(topo: Topology) -> dict[tuple[str, int, str], dict]:
    """Virtual servers in the node namespace: {(ip, port, proto): {"sched", "flags", "dests": {...}}}."""
    text = topo.ns_run(topo.node, ["cat", "/proc/net/ip_vs"]).stdout
    table: dict[tuple[str, int, str], dict] = {}
    current: dict | None = None
    for line in text.splitlines()[3:]:
        fields = line.split()
        if not fields:
            continue
        if fields[0] in ("TCP", "UDP", "SCTP"):
            ip, port_ = _hex_addr(fields[1])
            current = {"sched": fields[2], "flags": fields[3:], "dests": {}}
            table[(ip, port_, fields[0])] = current
        elif fields[0] == "->" and current is not None:
            ip, port_ = _hex_addr(fields[1])
            current["dests"][(ip, port_)] = {"forward": fields[2], "weight": int(fields[3]),
                                             "active": int(fields[4]), "inactive": int(fields[5])}
    return table


def ipsets(topo: Topology) -> str:
    return topo.ns_run(topo.node, ["ipset", "list", "-n"]).stdout


class TestIpvs(ServiceBehaviour):
    mode = "ipvs"

    def assert_clean(self, topo: Topology) -> None:
        links = topo.ns_run(topo.node, ["ip", "-o", "link", "show"]).stdout
        assert "kube-ipvs0" not in links
        assert ipvs_table(topo) == {}
        assert "KUBE-" not in ipsets(topo)
        for tool in ("iptables", "ip6tables"):
            for table in ("nat", "filter"):
                rules = topo.ns_run(topo.node, [tool, "-t", table, "-S"]).stdout
                assert "KUBE-" not in rules, (tool, rules)

    def test_kernel_objects(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1, POD2), type_="NodePort", node_port=30090))
        table = ipvs_table(topology)
        vs = table[(CLUSTER_IP, 80, "TCP")]
        assert vs["sched"] == "rr"
        assert set(vs["dests"]) == {(POD1, 8080), (POD2, 8080)}
        assert {d["forward"] for d in vs["dests"].values()} == {"Masq"}
        assert set(table[(NODE_IP, 30090, "TCP")]["dests"]) == {(POD1, 8080), (POD2, 8080)}
        addrs = topology.ns_run(topology.node, ["ip", "-o", "-4", "addr", "show", "dev", "kube-ipvs0"]).stdout
        assert f"{CLUSTER_IP}/32" in addrs
        assert "KUBE-CLUSTER-IP" in ipsets(topology)
        members = topology.ns_run(topology.node, ["ipset", "list", "KUBE-NODE-PORT-TCP"]).stdout
        assert "30090" in members
        # another port of a service IP is rejected by KUBE-IPVS-FILTER, not left to hang
        from tests.netns.behaviour import refused
        assert refused(topology, topology.pod("pod3").ns, CLUSTER_IP, 81)

    def test_source_hash_scheduler(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1, POD2, POD3)), extra=("--ipvs-scheduler", "sh"))
        assert ipvs_table(topology)[(CLUSTER_IP, 80, "TCP")]["sched"] == "sh"
        for pod in ("pod1", "pod2", "pod3"):
            seen = self.pods_seen(topology, topology.pod(pod).ns, CLUSTER_IP, 80, 6)
            assert len(seen) == 1, (pod, seen)

    def test_affinity_is_persistence(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1, POD2), affinity_timeout=120))
        flags = ipvs_table(topology)[(CLUSTER_IP, 80, "TCP")]["flags"]
        # /proc/net/ip_vs shows the timeout in jiffies: 120 s at the kernel's HZ
        assert flags[0] == "persistent" and int(flags[1]) in {120 * hz for hz in (100, 250, 300, 1000)}, flags

    def test_external_local_preserves_client_ip(self, topology: Topology) -> None:
        docs = web(endpoints=[endpoint(POD1), endpoint(REMOTE_POD, node="node2")], type_="NodePort",
                   node_port=30083, external_local=True)
        self.start(topology, docs, tcp=("pod1",))
        greeting = topology.hello(topology.client, NODE_IP, 30083)
        assert (greeting.pod, greeting.peer_ip) == ("pod1", CLIENT_IP)
        # policy Cluster: masqueraded, the endpoint sees the node
        topology.write_manifest("services.yaml", web(endpoints=local_eps(POD1), type_="NodePort",
                                                     node_port=30083))
        wait_until(lambda: topology.hello(topology.client, NODE_IP, 30083).peer_ip != CLIENT_IP,
                   timeout=5, what="masquerade under policy Cluster")

    def test_graceful_removal(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1, POD2, POD3)), extra=("--ipvs-scheduler", "rr"))
        ns = topology.pod("pod3").ns
        held = None
        for _ in range(6):  # rr: one of the first connections lands on pod1
            sock = topology.connect(ns, CLUSTER_IP, 80)
            if read_line(sock).startswith(b"pod1 "):
                held = sock
                break
            sock.close()
        assert held is not None
        with held:
            topology.write_manifest("services.yaml", web(endpoints=local_eps(POD2)))

            def drained() -> bool:
                dests = ipvs_table(topology)[(CLUSTER_IP, 80, "TCP")]["dests"]
                # pod3 never had a connection: deleted; pod1 still serves one: weight 0, kept
                return (POD3, 8080) not in dests and dests.get((POD1, 8080), {}).get("weight") == 0

            wait_until(drained, timeout=15, what="pod1 draining and pod3 deleted")
            assert ipvs_table(topology)[(CLUSTER_IP, 80, "TCP")]["dests"][(POD1, 8080)]["active"] == 1
            assert self.pods_seen(topology, ns, CLUSTER_IP, 80, 4) == Counter({"pod2": 4})
            held.sendall(b"draining\n")
            assert read_line(held) == b"draining\n"
            # pod1 comes back before it was deleted: weight 1 again, same real server
            topology.write_manifest("services.yaml", web(endpoints=local_eps(POD1, POD2)))
            wait_until(lambda: ipvs_table(topology)[(CLUSTER_IP, 80, "TCP")]["dests"][(POD1, 8080)]["weight"]
                       == 1, timeout=5, what="pod1 weight restored")
            held.sendall(b"back\n")
            assert read_line(held) == b"back\n"

    def test_restart_adopts_without_cutting(self, topology: Topology) -> None:
        proc = self.start(topology, web(endpoints=local_eps(POD1)))
        ns = topology.pod("pod3").ns
        with topology.connect(ns, CLUSTER_IP, 80) as held:
            assert read_line(held).startswith(b"pod1 ")
            assert topology.stop_proxyd(proc) == 0
            # stopped: the kernel keeps serving
            assert topology.hello(ns, CLUSTER_IP, 80).pod == "pod1"
            topology.start_proxyd(self.mode, extra_args=self.extra_args)
            dest = ipvs_table(topology)[(CLUSTER_IP, 80, "TCP")]["dests"][(POD1, 8080)]
            # the same real server still carries the held connection: nothing was recreated
            assert dest["active"] == 1 and dest["weight"] == 1
            held.sendall(b"after restart\n")
            assert read_line(held) == b"after restart\n"
        # and the adopted state follows changes
        topology.write_manifest("services.yaml", web(endpoints=local_eps(POD2)))
        wait_until(lambda: topology.hello(ns, CLUSTER_IP, 80).pod == "pod2", timeout=5, what="change after "
                                                                     "restart")

    def test_stale_udp_conntrack_is_cleared(self, topology: Topology) -> None:
        """README: in the kernel modes stale UDP conntrack entries towards removed endpoints go away.

        ipvs mode has no code deleting them: it relies on the kernel's
        ``expire_nodest_conn``. This shows that a live flow does move when its
        endpoint is removed while that endpoint still answers (it passed in the
        guest on 2026-12-06).
        """
        def dns(*ips: str) -> list[dict]:
            return [service("dns", cluster_ip=CLUSTER_IP, ports=[port(53, protocol="UDP", target_port=5353)]),
                    endpoint_slice("dns", ports=[{"port": 5353, "protocol": "UDP"}],
                                   endpoints=local_eps(*ips))]

        self.start(topology, dns(POD1), tcp=(), udp=("pod1", "pod2"))
        ns = topology.pod("pod3").ns
        with topology.udp_socket(ns) as sock:
            assert topology.udp_hello(ns, CLUSTER_IP, 53, sock=sock)[0].pod == "pod1"
            # pod1 still answers, so only stale kernel state could keep the flow there
            topology.write_manifest("services.yaml", dns(POD2))

            def moved() -> bool:
                try:
                    return topology.udp_hello(ns, CLUSTER_IP, 53, sock=sock, timeout=1.0)[0].pod == "pod2"
                except (TimeoutError, ConnectionRefusedError):
                    return False

            wait_until(moved, timeout=60, what="UDP flow moved to the new endpoint")

    def test_health_check_node_port(self, topology: Topology) -> None:
        docs = [service("web", cluster_ip=CLUSTER_IP, type_="LoadBalancer", external_local=True,
                        health_check_node_port=32100, ports=[port(80, target_port=8080, node_port=30080)]),
                endpoint_slice("web", ports=[{"port": 8080}], endpoints=[endpoint(POD1)])]
        self.start(topology, docs, tcp=("pod1",))
        _, body = wait_until(
            lambda: (r := topology.http_get(topology.client, NODE_IP, 32100, "/"))[0] == 200 and r,
            timeout=120, what="healthCheckNodePort 200")
        answer = json.loads(body)
        assert answer["service"] == {"namespace": "default", "name": "web"} and answer["localEndpoints"] == 1
        docs[1] = endpoint_slice("web", ports=[{"port": 8080}],
                                 endpoints=[endpoint(REMOTE_POD, node="node2")])
        topology.write_manifest("services.yaml", docs)
        _, body = wait_until(
            lambda: (r := topology.http_get(topology.client, NODE_IP, 32100, "/"))[0] == 503 and r,
            timeout=120, what="healthCheckNodePort 503")
        assert json.loads(body)["localEndpoints"] == 0


# --- IPv6 and dual-stack (issue 16) ----------------------------------------------------------------

# What differs per family in ipvs mode: virtual/real servers and their spread, UDP, persistence, NodePorts
# on the family's node address, externalIPs bound on kube-ipvs0, the LB source-range ipsets and
# ip6tables firewall, the kernel's refusal without real servers, and --cleanup of both families.
FAMILY_TESTS = frozenset({
    "test_cluster_ip_spreads_over_endpoints", "test_udp", "test_client_ip_affinity",
    "test_node_port_from_outside", "test_external_ip", "test_load_balancer_source_ranges",
    "test_no_endpoints_refused_at_once", "test_cleanup_leaves_nothing",
})


def _family_tests_only(cls: type[ServiceBehaviour]) -> type[ServiceBehaviour]:
    """Leave only ``FAMILY_TESTS`` of the behaviour suite to pytest in ``cls``."""
    for name in dir(ServiceBehaviour):
        if name.startswith("test_") and name not in FAMILY_TESTS:
            setattr(cls, name, None)  # not a function: not collected
    return cls


@_family_tests_only
class TestIpvsIPv6(Icmp6Refusal, ServiceBehaviour):
    mode = "ipvs"
    families = (6,)
    assert_clean = TestIpvs.assert_clean


@_family_tests_only
class TestIpvsDualStack(Icmp6Refusal, ServiceBehaviour):
    mode = "ipvs"
    families = (4, 6)
    assert_clean = TestIpvs.assert_clean


def test_family_test_selection_is_real() -> None:
    assert FAMILY_TESTS <= {n for n in dir(ServiceBehaviour) if n.startswith("test_")}
    for cls in (TestIpvsIPv6, TestIpvsDualStack):
        assert {n for n in dir(cls) if n.startswith("test_") and callable(getattr(cls, n))} == FAMILY_TESTS


def test_dual_stack_kernel_objects(topology: Topology) -> None:
    """Both families' instances share kube-ipvs0 and the IPVS table, each with its own sets and rules."""
    cip6, pod1_6, pod2_6 = V6.cluster_ip, V6.pods["pod1"], V6.pods["pod2"]
    docs = [service("web", cluster_ip=CLUSTER_IP, cluster_ips=[CLUSTER_IP, cip6], type_="NodePort",
                    ports=[port(80, target_port=8080, node_port=30090)]),
            endpoint_slice("web", name="web-ipv4", ports=[{"port": 8080}], endpoints=local_eps(POD1, POD2)),
            endpoint_slice("web", name="web-ipv6", address_type="IPv6", ports=[{"port": 8080}],
                           endpoints=local_eps(pod1_6, pod2_6))]
    for pod in ("pod1", "pod2"):
        topology.start_tcp_server(pod, 8080)
    topology.write_manifest("services.yaml", docs)
    topology.start_proxyd("ipvs", extra_args=("--sync-period", "5s"))
    ns = topology.pod("pod3").ns
    for ip in (CLUSTER_IP, cip6):
        assert topology.hello(ns, ip, 80).pod in {"pod1", "pod2"}
    for ip in (NODE_IP, NODE_IP6):
        assert topology.hello(topology.client, ip, 30090).pod in {"pod1", "pod2"}

    def table_ok() -> bool:
        table = ipvs_table(topology)
        v6 = set(table.get((cip6, 80, "TCP"), {}).get("dests", {}))
        v4 = set(table.get((CLUSTER_IP, 80, "TCP"), {}).get("dests", {}))
        return (v6 == {(pod1_6, 8080), (pod2_6, 8080)} and v4 == {(POD1, 8080), (POD2, 8080)}
                and (NODE_IP6, 30090, "TCP") in table and (NODE_IP, 30090, "TCP") in table)

    # Several full syncs (5 s period) later, neither instance has removed the other's servers.
    wait_until(table_ok, timeout=30, what="both families' virtual servers")
    time.sleep(12)
    assert table_ok(), ipvs_table(topology)
    table = ipvs_table(topology)
    assert not any(ipaddress.ip_address(ip).is_link_local for ip, _, _ in table), table
    addrs = topology.ns_run(topology.node, ["ip", "-o", "addr", "show", "dev", "kube-ipvs0"]).stdout
    assert f"{CLUSTER_IP}/32" in addrs and f"{cip6}/128" in addrs, addrs
    names = ipsets(topology).split()
    assert "KUBE-CLUSTER-IP" in names and "KUBE-6-CLUSTER-IP" in names, names
    members = topology.ns_run(topology.node, ["ipset", "list", "KUBE-6-CLUSTER-IP"]).stdout
    assert "inet6" in members and f"{cip6},tcp:80" in members, members
    assert f"{CLUSTER_IP},tcp:80" not in members
    rules6 = topology.ns_run(topology.node, ["ip6tables", "-t", "nat", "-S", "KUBE-SERVICES"]).stdout
    assert "KUBE-6-CLUSTER-IP" in rules6 and "KUBE-CLUSTER-IP " not in rules6, rules6
    # another port of an IPv6 service IP is rejected by the IPv6 KUBE-IPVS-FILTER, not left to hang
    from tests.netns.behaviour import refused
    # The ICMPv6 error reaches the client during connect(), which drops it: refused at the next SYN
    # (~1 s later; see netfilter_dualstack.Icmp6Refusal), so wait past it.
    assert refused(topology, ns, cip6, 81, timeout=3.0)


# --- issue 18: one refused object never blocks the node -------------------------------------------


def test_refused_real_server_quarantines_one_service(topology: Topology) -> None:
    """IPVS refuses a real server whose address routes as broadcast (not unicast): only that service
    is quarantined; the others are programmed and serve, /healthz stays 200 and names it, and removing
    the conflicting route clears the quarantine when the service next changes."""
    bad_ip, other_ip = "10.96.0.12", "10.96.0.11"
    conflict = ["broadcast", POD3, "dev", "vpod3", "table", "local"]
    docs = (web(endpoints=local_eps(POD1), name="web") + web(endpoints=local_eps(POD2), name="other",
                                                             cluster_ip=other_ip)
            + web(endpoints=local_eps(POD3), name="bad", cluster_ip=bad_ip))
    for pod in ("pod1", "pod2", "pod3"):
        topology.start_tcp_server(pod, 8080)
    topology.write_manifest("services.yaml", docs)
    # The conflicting object: pod3's address is a broadcast address, so IPVS rejects it as a destination.
    topology.ns_run(topology.node, ["ip", "route", "add", *conflict])
    try:
        proc = topology.start_proxyd("ipvs", extra_args=("--sync-period", "5s"))
        labels = {"mode": "ipvs"}
        wait_until(lambda: topology.metric("proxyd_quarantined_service_ports", labels) == 1, timeout=60,
                   what="one quarantined service port")
        ns = topology.pod("pod1").ns
        assert topology.hello(ns, CLUSTER_IP, 80).pod == "pod1"
        assert topology.hello(ns, other_ip, 80).pod == "pod2"
        status, answer = topology.healthz_json()
        assert status == 200, answer
        assert answer.get("quarantinedTotal") == 1, answer
        assert set(answer["quarantined"]) == {"default/bad/TCP"}, answer
        reason = answer["quarantined"]["default/bad/TCP"]
        assert f"{POD3}:8080" in reason and "add_dest" in reason, reason
        total = topology.metric_sum("proxyd_quarantined_total")
        assert total is not None and total >= 1
        assert "quarantined" in topology.log_of(proc)
        # the bad service's virtual server is there, without the refused real server
        assert ipvs_table(topology)[(bad_ip, 80, "TCP")]["dests"] == {}
    finally:
        # Fix the object: the conflicting route goes.
        topology.ns_run(topology.node, ["ip", "route", "del", *conflict])
    # A quarantined port is retried when it changes (or at the hourly full sync): the service gains
    # an endpoint, and the whole of it applies now that the kernel takes pod3 again.
    topology.write_manifest("services.yaml", docs[:-1] + web(endpoints=local_eps(POD3, POD2), name="bad",
                                                             cluster_ip=bad_ip)[1:])
    wait_until(lambda: topology.metric("proxyd_quarantined_service_ports", labels) == 0, timeout=60,
               what="quarantine cleared when the service changed")
    wait_until(lambda: {topology.hello(ns, bad_ip, 80).pod for _ in range(8)} == {"pod2", "pod3"}, timeout=30,
               what="bad service served by both endpoints")
    status, answer = topology.healthz_json()
    assert status == 200 and "quarantined" not in answer, answer
