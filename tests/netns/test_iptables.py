"""iptables mode against the real daemon, on both back ends (legacy x_tables and nf_tables).

Every shared behaviour test (``ServiceBehaviour``, ``KernelNatBehaviour``:
source address preserved or masqueraded, hairpin, UDP conntrack) runs twice
(``PROXYD_IPTABLES_BACKEND``), plus what only iptables mode shows:
established connections surviving endpoint removal and a proxyd restart, a
resync after someone flushes the tables, and ``--cleanup`` leaving nothing
in either back end. The IPv6 and dual-stack tests of
``netfilter_dualstack.DualStackNat`` run on both back ends too, with the
IPv6 rule text kube-proxy's IPv6 proxier writes.
"""

from __future__ import annotations

import subprocess
import time

from proxyd.model import Protocol, ServicePortName
from proxyd.modes.iptables import chains as ch
from tests.netns.behaviour import (
    CLUSTER_IP,
    LB_IP,
    POD1,
    POD2,
    KernelNatBehaviour,
    ServiceBehaviour,
    local_eps,
    reachable,
    web,
)
from tests.netns.netfilter_dualstack import (
    CLUSTER_IP6,
    EMPTY_IP6,
    DualStackNat,
    Icmp6Refusal,
    dual_service,
    slice_of,
    web6,
)
from tests.netns.topology import (
    ConnectProber,
    Topology,
    endpoint_slice,
    in_netns,
    port,
    read_line,
    service,
    wait_until,
)

SAVE_TOOLS = ("iptables-legacy-save", "iptables-nft-save")
SAVE6_TOOLS = ("ip6tables-legacy-save", "ip6tables-nft-save")
DEADLINE = 30.0  # waits for changes: far beyond the 1 s minimum sync period, on a busy machine


def ruleset(topo: Topology, tool: str) -> str:
    return topo.ns_run(topo.node, [tool], check=False).stdout


class _IptablesBehaviour(KernelNatBehaviour):
    mode = "iptables"
    backend = ""

    def save(self, topo: Topology) -> str:
        return ruleset(topo, f"iptables-{self.backend}-save")

    def assert_clean(self, topo: Topology) -> None:
        # --cleanup removes both families' state in both back ends.
        for tool in (*SAVE_TOOLS, *SAVE6_TOOLS):
            text = ruleset(topo, tool)
            assert "KUBE-" not in text, (tool, text)

    def test_rules_in_the_chosen_backend_with_kube_proxy_names(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1)))
        text = self.save(topology)
        name = ServicePortName("default", "web", "", Protocol.TCP)
        assert f":{ch.svc_chain(name)} " in text
        assert "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES" in text
        other = ruleset(topology, f"iptables-{'nft' if self.backend == 'legacy' else 'legacy'}-save")
        assert "KUBE-SVC-" not in other

    def test_load_balancer_source_ranges(self, topology: Topology) -> None:
        docs = [service("web", cluster_ip=CLUSTER_IP, type_="LoadBalancer", lb_ips=[LB_IP],
                        ports=[port(80, target_port=8080, node_port=30085)],
                        source_ranges=["198.51.100.0/24"]),
                endpoint_slice("web", ports=[{"port": 8080}], endpoints=local_eps(POD1))]
        self.start(topology, docs, tcp=("pod1",))
        sock = topology.tcp_socket(topology.client)
        sock.settimeout(1.0)
        try:
            sock.connect((LB_IP, 80))
            raise AssertionError("LB IP reachable from outside loadBalancerSourceRanges")
        except TimeoutError:
            pass  # dropped, as kube-proxy does
        finally:
            sock.close()
        self.start_source_range_allowed(topology)

    def start_source_range_allowed(self, topology: Topology) -> None:
        docs = [service("web", cluster_ip=CLUSTER_IP, type_="LoadBalancer", lb_ips=[LB_IP],
                        ports=[port(80, target_port=8080, node_port=30085)],
                        source_ranges=["203.0.113.0/24"]),
                endpoint_slice("web", ports=[{"port": 8080}], endpoints=local_eps(POD1))]
        topology.write_manifest("services.yaml", docs)
        wait_until(lambda: reachable(topology, topology.client, LB_IP, 80), timeout=DEADLINE,
                   what="LB IP open to the allowed range")

    def test_established_connection_survives_endpoint_removal_and_restart(self, topology: Topology) -> None:
        proc = self.start(topology, web(endpoints=local_eps(POD1)))
        ns = topology.pod("pod3").ns
        held = topology.connect(ns, CLUSTER_IP, 80)
        with held:
            assert read_line(held).startswith(b"pod1 ")
            topology.write_manifest("services.yaml", web(endpoints=local_eps(POD2)))
            wait_until(lambda: topology.hello(ns, CLUSTER_IP, 80).pod == "pod2", timeout=DEADLINE,
                       what="endpoint change applied")
            held.sendall(b"one\n")
            assert read_line(held) == b"one\n"
            assert topology.stop_proxyd(proc) == 0
            # proxyd is down: rules stay, old and new connections keep working
            held.sendall(b"two\n")
            assert read_line(held) == b"two\n"
            assert topology.hello(ns, CLUSTER_IP, 80).pod == "pod2"
            before = self.save(topology)
            # Connects bounded below the SYN retransmission, every 20 ms, across the restart: a
            # flush-and-rewrite would leave an instant without rules and fail a probe.
            prober = ConnectProber(topology, ns, CLUSTER_IP, 80)
            prober.start()
            try:
                wait_until(lambda: prober.ok >= 5, timeout=30, what="probes before the restart")
                topology.start_proxyd(self.mode, extra_args=self.extra_args, env=self.env)
                up_from = prober.ok
                wait_until(lambda: prober.ok >= up_from + 10, timeout=30, what="probes after the restart")
            finally:
                _, failed = prober.stop()
            assert not failed, failed[:5]
            held.sendall(b"three\n")
            assert read_line(held) == b"three\n"
            assert _kube_lines(self.save(topology)) == _kube_lines(before)

    def test_resync_after_external_flush(self, topology: Topology) -> None:
        proc = self.start(topology, web(endpoints=local_eps(POD1)), extra=("--sync-period", "1s"))
        ns = topology.pod("pod3").ns
        assert topology.hello(ns, CLUSTER_IP, 80).pod == "pod1"
        noticed = topology.log_of(proc).count("flushed by someone else")
        tool = f"iptables-{self.backend}"
        for table in ("mangle", "nat", "filter"):
            topology.ns_run(topology.node, [tool, "-t", table, "-F"])
            topology.ns_run(topology.node, [tool, "-t", table, "-X"])
        # The daemon checks its canary every second, so it may repair before any probe here could
        # see the gap: synchronise on its own account of the flush instead of racing it.
        wait_until(lambda: topology.log_of(proc).count("flushed by someone else") > noticed, timeout=30,
                   what="the daemon noticing the flush")
        wait_until(lambda: reachable(topology, ns, CLUSTER_IP, 80), timeout=30, what="rules restored")
        assert "KUBE-PROXY-CANARY" in self.save(topology)

    def test_nat_flush_repaired_within_a_sync_period(self, topology: Topology) -> None:
        proc = self.start(topology, web(endpoints=local_eps(POD1)), extra=("--sync-period", "2s"))
        tool = f"iptables-{self.backend}"
        topology.ns_run(topology.node, [tool, "-t", "nat", "-F"])
        topology.ns_run(topology.node, [tool, "-t", "nat", "-X"])
        self._assert_repaired(topology, proc, "nat KUBE-PROXY-CANARY")

    def test_deleted_service_jumps_repaired_within_a_sync_period(self, topology: Topology) -> None:
        proc = self.start(topology, web(endpoints=local_eps(POD1)), extra=("--sync-period", "2s"))
        tool = f"iptables-{self.backend}"
        for chain in ("PREROUTING", "OUTPUT"):
            topology.ns_run(topology.node, [tool, "-t", "nat", "-D", chain, "-m", "comment", "--comment",
                                            "kubernetes service portals", "-j", "KUBE-SERVICES"])
        assert "KUBE-PROXY-CANARY" in self.save(topology)
        self._assert_repaired(topology, proc, "nat PREROUTING -> KUBE-SERVICES")

    def _assert_repaired(self, topology: Topology, proc: subprocess.Popen[str], what: str) -> None:
        ns = topology.pod("pod3").ns
        broken = time.monotonic()
        # The check runs once per sync period (2 s), so a probe here could land before or after the
        # repair: the daemon's own account says the damage was there (one line, naming it, below).
        wait_until(lambda: "full resync" in topology.log_of(proc), timeout=20.0, what="the damage noticed")
        # The margin is for a busy machine.
        wait_until(lambda: reachable(topology, ns, CLUSTER_IP, 80), timeout=20.0, what="rules repaired")
        print(f"{self.backend}: {what}: served again {time.monotonic() - broken:.1f}s after the damage")
        assert topology.metric("proxyd_netfilter_repairs_total", {"mode": "iptables"}) == 1.0
        lines = [line for line in topology.log_of(proc).splitlines() if "full resync" in line]
        assert len(lines) == 1 and what in lines[0], lines


def _kube_lines(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if "KUBE-" in line and not line.startswith("#"))


class TestIptablesNft(_IptablesBehaviour):
    backend = "nft"
    env = {"PROXYD_IPTABLES_BACKEND": "nft"}


class TestIptablesLegacy(_IptablesBehaviour):
    backend = "legacy"
    env = {"PROXYD_IPTABLES_BACKEND": "legacy"}

    def test_live_ruleset_through_python_iptables(self, topology: Topology) -> None:
        # libiptc reads the kernel's x_tables directly: an independent check of
        # what iptables-restore committed, without parsing iptables-save text.
        import iptc

        self.start(topology, web(endpoints=local_eps(POD1, POD2)))
        name = ServicePortName("default", "web", "", Protocol.TCP)
        with in_netns(topology.node):
            table = iptc.Table(iptc.Table.NAT)
            table.refresh()
            chains = {chain.name: chain for chain in table.chains}
            targets = [rule.target.name for rule in chains[ch.svc_chain(name)].rules]
            canary = ch.KUBE_PROXY_CANARY in chains
        assert canary
        assert sorted(t for t in targets if t.startswith("KUBE-SEP-")) == sorted(
            ch.sep_chain(name, f"{ip}:8080") for ip in (POD1, POD2))



# Each family variant runs on one back end (IPv6 on one, dual-stack on the other), so both back ends
# carry IPv6 traffic while the matrix stays within CI's time: the back ends differ only in how rules
# reach the kernel, which the IPv4 classes cover whole.
class TestIptablesNftIPv6(Icmp6Refusal, ServiceBehaviour):
    """The shared suite with single-stack IPv6 services (ip6tables-nft-restore)."""

    mode = "iptables"
    families = (6,)
    env = {"PROXYD_IPTABLES_BACKEND": "nft"}
    assert_clean = _IptablesBehaviour.assert_clean


class TestIptablesLegacyDualStack(TestIptablesNftIPv6):
    """The shared suite with dual-stack services reached on both of their addresses (legacy)."""

    families = (4, 6)
    env = {"PROXYD_IPTABLES_BACKEND": "legacy"}


class _IptablesDualStack(DualStackNat):
    mode = "iptables"
    backend = ""

    def ruleset(self, topo: Topology, fam: int) -> str:
        return ruleset(topo, f"{'ip6tables' if fam == 6 else 'iptables'}-{self.backend}-save")

    def flush_family(self, topo: Topology, fam: int) -> None:
        tool = f"{'ip6tables' if fam == 6 else 'iptables'}-{self.backend}"
        for table in ("mangle", "nat", "filter"):
            topo.ns_run(topo.node, [tool, "-t", table, "-F"])
            topo.ns_run(topo.node, [tool, "-t", table, "-X"])

    def assert_clean(self, topo: Topology) -> None:
        for tool in (*SAVE_TOOLS, *SAVE6_TOOLS):
            text = ruleset(topo, tool)
            assert "KUBE-" not in text, (tool, text)

    def test_ipv6_rules_with_kube_proxy_names_and_icmp6_reject(self, topology: Topology) -> None:
        docs = web6(topology, "pod1", families=(4, 6), v4_pods=("pod1",))
        docs += [dual_service("empty", families=(6,), cluster_ips={6: EMPTY_IP6}, ports=[port(80)]),
                 slice_of("empty", 6, [], [{"port": 80}])]
        self.start(topology, docs, tcp=("pod1",))
        v6, v4 = self.ruleset(topology, 6), self.ruleset(topology, 4)
        name = ServicePortName("default", "web", "", Protocol.TCP)
        # Same chain names in both families (the hash does not depend on the family), each family
        # with its own endpoint chain ("[ip]:port" is hashed for IPv6, as kube-proxy does).
        assert f":{ch.svc_chain(name)} " in v6 and f":{ch.svc_chain(name)} " in v4
        sep6 = ch.sep_chain(name, f"[{topology.pod('pod1').ip6}]:8080")
        assert f":{sep6} " in v6 and sep6 not in v4
        assert f"-j DNAT --to-destination [{topology.pod('pod1').ip6}]:8080" in v6
        assert "-j REJECT --reject-with icmp6-port-unreachable" in v6
        # iptables-save's order: the NodePort tail skips ::1, off-cluster IPv6 sources are masqueraded.
        assert "-A KUBE-SERVICES ! -d ::1/128 " in v6
        assert f"! -s fd00:10:244::/48 -d {CLUSTER_IP6}/128 -p tcp " in v6
        assert EMPTY_IP6 not in v4 and "fd00:" not in v4


class TestIptablesNftDualStackNat(_IptablesDualStack):
    backend = "nft"
    env = {"PROXYD_IPTABLES_BACKEND": "nft"}


class TestIptablesLegacyDualStackNat(_IptablesDualStack):
    backend = "legacy"
    env = {"PROXYD_IPTABLES_BACKEND": "legacy"}
