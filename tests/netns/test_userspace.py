"""Userspace mode against the real daemon: the shared behaviour tests plus what only this mode does.

Only userspace mode retries a failed connect on the next endpoint, shows the
endpoint the node's address as the client (the connection is proxyd's
own), and holds service addresses on ``proxyd0``.
"""

from __future__ import annotations

from collections import Counter

from tests.netns.behaviour import (
    CLUSTER_IP,
    EXTERNAL_IP,
    POD1,
    POD2,
    POD3,
    ServiceBehaviour,
    local_eps,
    web,
)
from tests.netns.topology import POD_GATEWAY, Topology, endpoint_slice, port, service, wait_until


def holder_addresses(topo: Topology) -> set[str]:
    out = topo.ns_run(topo.node, ["ip", "-o", "-4", "addr", "show", "dev", "proxyd0"], check=False)
    if out.returncode != 0:
        return set()
    return {line.split()[3].split("/")[0] for line in out.stdout.splitlines()}


class TestUserspace(ServiceBehaviour):
    mode = "userspace"

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
        topology.write_manifest("services.yaml", web(endpoints=local_eps(POD1), cluster_ip="10.96.0.11"))
        wait_until(lambda: holder_addresses(topology) == {"10.96.0.11"}, timeout=3, what="address swap")
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

            wait_until(moved, timeout=3, what="flow moved to pod2")
