"""nftables mode against the real daemon: the shared behaviour suites plus what only nftables mode shows.

Besides ``ServiceBehaviour`` and ``KernelNatBehaviour`` (source address
preserved or masqueraded, hairpin, UDP conntrack): the fixed table layout, a
restart under load that adopts the table without losing a connection, ``nft
flush ruleset`` repaired within one sync period, ``--cleanup`` leaving
nothing, and both ways of driving nft (libnftables in process, ``nft -f -``).
The IPv6 and dual-stack tests of ``netfilter_dualstack.DualStackNat`` run both
ways too.
"""

from __future__ import annotations

import threading
import time

from tests.netns.behaviour import (
    CLUSTER_IP,
    POD1,
    POD2,
    POD3,
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
    refused,
    slice_of,
    web6,
)
from tests.netns.topology import (
    Topology,
    endpoint_slice,
    port,
    read_line,
    service,
    wait_until,
)

DEADLINE = 5.0


def table(topo: Topology) -> str:
    return topo.ns_run(topo.node, ["nft", "list", "table", "ip", "proxyd"], check=False).stdout


class TestNftables(KernelNatBehaviour):
    mode = "nftables"

    def assert_clean(self, topo: Topology) -> None:
        text = topo.ns_run(topo.node, ["nft", "list", "ruleset"]).stdout
        assert "proxyd" not in text, text

    def test_service_is_elements_of_the_fixed_layout(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1, POD2)))
        text = table(topology)
        assert f"{CLUSTER_IP} . tcp . 80 : goto svc-int" in text
        # Backends elements carry counters ("proxyd status" reads them).
        assert f"{CLUSTER_IP} . tcp . 80 . 1 counter packets 0 bytes 0 : {POD2} . 8080" in text or \
            f"{CLUSTER_IP} . tcp . 80 . 0 counter packets 0 bytes 0 : {POD2} . 8080" in text
        assert "chain svc-pick-tcp-2" in text

    def test_sctp_service_is_programmed(self, topology: Topology) -> None:
        # This kernel has no SCTP sockets (EPROTONOSUPPORT), so no SCTP traffic can be sent here;
        # the rules for an SCTP service must still load beside the others (the tracer checks
        # where its packets would go).
        sctp = port(9000, protocol="SCTP", target_port=9000)
        docs = [*web(endpoints=local_eps(POD1)),
                service("assoc", cluster_ip="10.96.0.30", ports=[sctp]),
                endpoint_slice("assoc", ports=[{"port": 9000, "protocol": "SCTP"}],
                               endpoints=local_eps(POD2))]
        self.start(topology, docs, tcp=("pod1",))
        text = table(topology)
        assert "chain svc-pick-sctp-1" in text
        assert f"10.96.0.30 . sctp . 9000 . 0 counter packets 0 bytes 0 : {POD2} . 9000" in text
        assert topology.hello(topology.pod("pod3").ns, CLUSTER_IP, 80).pod == "pod1"

    def test_unknown_port_of_a_cluster_ip_is_rejected(self, topology: Topology) -> None:
        from tests.netns.behaviour import refused

        self.start(topology, web(endpoints=local_eps(POD1)), tcp=("pod1",))
        assert refused(topology, topology.pod("pod2").ns, CLUSTER_IP, 81)

    def test_restart_under_load_adopts_without_losing_a_connection(self, topology: Topology) -> None:
        proc = self.start(topology, web(endpoints=local_eps(POD1, POD2)))
        ns = topology.pod("pod3").ns
        held = topology.connect(ns, CLUSTER_IP, 80)
        failures: list[BaseException] = []
        served = [0]
        stop = threading.Event()

        def load() -> None:
            # New connections all through the restart: none may fail.
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    topology.hello(ns, CLUSTER_IP, 80, timeout=3.0)
                    served[0] += 1
                except BaseException as err:
                    failures.append(err)
                    return

        worker = threading.Thread(target=load, daemon=True)
        with held:
            assert read_line(held).split(b" ")[0] in (b"pod1", b"pod2")
            before = table(topology)
            worker.start()
            assert topology.stop_proxyd(proc) == 0
            proc = topology.start_proxyd(self.mode, extra_args=self.extra_args, env=self.env)
            topology.write_manifest("services.yaml", web(endpoints=local_eps(POD1, POD2, POD3)))
            wait_until(lambda: "chain svc-pick-tcp-3" in table(topology), timeout=DEADLINE,
                       what="change applied")
            stop.set()
            worker.join(timeout=30)
            held.sendall(b"still here\n")
            assert read_line(held) == b"still here\n"
        assert not failures, failures
        assert served[0] > 0
        assert "svc-pick-tcp-2" in before

    def test_flush_ruleset_is_repaired_within_one_sync_period(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1)), extra=("--sync-period", "1s"))
        ns = topology.pod("pod3").ns
        assert topology.hello(ns, CLUSTER_IP, 80).pod == "pod1"
        topology.ns_run(topology.node, ["nft", "flush", "ruleset"])
        started = time.monotonic()
        wait_until(lambda: reachable(topology, ns, CLUSTER_IP, 80), timeout=10.0, what="table repaired")
        # one sync period (1 s) plus generous slack for the busy machine
        assert time.monotonic() - started < 5.0
        assert (topology.metric("proxyd_nftables_table_repairs_total") or 0) >= 1

    def test_a_table_an_older_layout_left_is_replaced_whole(self, topology: Topology) -> None:
        # An older proxyd declared a map otherwise (e.g. without per-element counters): nft refuses
        # to redefine it ("File exists"), so only replacing the table in one transaction can adopt it.
        topology.ns_run(topology.node, ["nft", "add", "table", "ip", "proxyd"])
        topology.ns_run(topology.node, ["nft", "add", "map", "ip", "proxyd", "service-ips",
                                        "{ type ipv4_addr : verdict ; }"])
        proc = self.start(topology, web(endpoints=local_eps(POD1)))
        assert topology.hello(topology.pod("pod3").ns, CLUSTER_IP, 80).pod == "pod1"
        assert "replacing table ip proxyd" in topology.log_of(proc)
        assert "inet_proto . inet_service : verdict" in table(topology)
        assert not topology.metric_sum("proxyd_quarantined_service_ports")

    def test_an_older_layouts_filter_chains_are_deleted_on_adoption(self, topology: Topology) -> None:
        # proxyd hooked filter chains before kube-proxy's checks moved into its nat chains: adopting
        # such a table (canary present, so no replacement) must leave none, as they cost every packet.
        old = topology.manifests.parent / "old-layout.nft"
        old.write_text(
            "add table ip proxyd\n"
            "add set ip proxyd canary { type ipv4_addr ; }\n"
            "add element ip proxyd canary { 0.0.0.0 }\n"
            "add chain ip proxyd service-endpoints-check\n"
            "add chain ip proxyd filter-prerouting { type filter hook prerouting priority -110 ; }\n"
            "add chain ip proxyd filter-forward { type filter hook forward priority -110 ; }\n"
            "add rule ip proxyd filter-forward ct state new jump service-endpoints-check\n")
        topology.ns_run(topology.node, ["nft", "-f", str(old)])
        proc = self.start(topology, web(endpoints=local_eps(POD1)))
        assert topology.hello(topology.pod("pod3").ns, CLUSTER_IP, 80).pod == "pod1"
        assert "replacing table" not in topology.log_of(proc)
        listed = table(topology)
        assert "hook forward" not in listed and "filter-" not in listed, listed
        assert "type nat hook prerouting" in listed

    def test_canary_flushed_is_repaired(self, topology: Topology) -> None:
        self.start(topology, web(endpoints=local_eps(POD1)), extra=("--sync-period", "1s"))
        ns = topology.pod("pod3").ns
        topology.ns_run(topology.node, ["nft", "flush", "set", "ip", "proxyd", "canary"])
        topology.ns_run(topology.node, ["nft", "flush", "map", "ip", "proxyd", "service-ips"])
        wait_until(lambda: reachable(topology, ns, CLUSTER_IP, 80), timeout=10.0, what="table repaired")
        canary = topology.ns_run(topology.node, ["nft", "list", "set", "ip", "proxyd", "canary"]).stdout
        assert "0.0.0.0" in canary

    def test_failed_transaction_keeps_the_previous_ruleset(self, topology: Topology) -> None:
        proc = self.start(topology, web(endpoints=local_eps(POD1)), extra=("--sync-period", "1s"))
        ns = topology.pod("pod3").ns
        # Someone deletes an element proxyd believes is there: the next partial transaction's
        # delete of it fails, nothing of that transaction applies, the failure is counted and the
        # runner's retry (a full sync) repairs.
        topology.ns_run(topology.node, ["nft", "delete", "element", "ip", "proxyd", "svc-backends-tcp",
                                        f"{{ {CLUSTER_IP} . tcp . 80 . 0 }}"])
        topology.write_manifest("services.yaml", web(endpoints=local_eps(POD2)))
        wait_until(lambda: reachable(topology, ns, CLUSTER_IP, 80)
                   and topology.hello(ns, CLUSTER_IP, 80).pod == "pod2", timeout=10.0, what="change applied")
        assert (topology.metric("kubeproxy_sync_proxy_rules_nftables_sync_failures_total") or 0) >= 1
        assert proc.poll() is None


class TestNftablesSubprocess(TestNftables):
    """The same suite with ``nft -f -`` instead of libnftables in process."""

    env = {"PROXYD_NFT_BACKEND": "subprocess"}


# Each family variant runs on one back end (IPv6 on one, dual-stack on the other), so both back ends
# carry IPv6 traffic while the matrix stays within CI's time: the back ends differ only in how rules
# reach the kernel, which the IPv4 classes cover whole.
class TestNftablesIPv6(Icmp6Refusal, ServiceBehaviour):
    """The shared suite with single-stack IPv6 services (the ip6 proxyd table)."""

    mode = "nftables"
    families = (6,)
    assert_clean = TestNftables.assert_clean


class TestNftablesSubprocessDualStack(TestNftablesIPv6):
    """The shared suite with dual-stack services reached on both of their addresses (``nft -f -``)."""

    families = (4, 6)
    env = {"PROXYD_NFT_BACKEND": "subprocess"}


class TestNftablesDualStackNat(DualStackNat):
    """IPv6 and dual-stack: the ``ip6 proxyd`` table beside ``ip proxyd``, one proxier per family."""

    mode = "nftables"

    def ruleset(self, topo: Topology, fam: int) -> str:
        return topo.ns_run(topo.node, ["nft", "list", "table", "ip6" if fam == 6 else "ip", "proxyd"],
                           check=False).stdout

    def flush_family(self, topo: Topology, fam: int) -> None:
        topo.ns_run(topo.node, ["nft", "delete", "table", "ip6" if fam == 6 else "ip", "proxyd"])

    def assert_clean(self, topo: Topology) -> None:
        text = topo.ns_run(topo.node, ["nft", "list", "ruleset"]).stdout
        assert "proxyd" not in text, text

    def test_ipv6_table_layout_and_icmpv6_reject(self, topology: Topology) -> None:
        docs = web6(topology, "pod1", families=(4, 6), v4_pods=("pod1",))
        docs += [dual_service("empty", families=(6,), cluster_ips={6: EMPTY_IP6}, ports=[port(80)]),
                 slice_of("empty", 6, [], [{"port": 80}])]
        self.start(topology, docs, tcp=("pod1",))
        v6, v4 = self.ruleset(topology, 6), self.ruleset(topology, 4)
        assert "type ipv6_addr . inet_proto . inet_service : verdict" in v6
        assert f"{CLUSTER_IP6} . tcp . 80 : goto svc-int" in v6
        # Backends elements carry counters ("proxyd status" reads them).
        pod1 = topology.pod("pod1").ip6
        assert f"{CLUSTER_IP6} . tcp . 80 . 0 counter packets 0 bytes 0 : {pod1} . 8080" in v6
        assert f"{EMPTY_IP6} . tcp . 80 : goto reject-chain" in v6
        assert "ip6 saddr != fd00:10:244::/48 jump mark-for-masquerade" in v6
        assert "fib daddr type local ip6 daddr != ::1 " in v6
        # An ip6 table's plain "reject" answers with ICMPv6 port unreachable (kube-proxy writes the same).
        assert "reject" in v6.split("chain reject-chain", 1)[1].split("}", 1)[0]
        assert refused(topology, topology.pod("pod3").ns, EMPTY_IP6, 80)
        assert f"{CLUSTER_IP} . tcp . 80 : goto svc-int" in v4 and "fd00:" not in v4


def test_nft_runner_both_ways_is_atomic_and_refuses_bad_input(topology: Topology) -> None:
    """libnftables in process and ``nft -f -`` behave alike: one transaction, errors change nothing."""
    import pytest

    from proxyd.modes.nftables.libnft import Nft, NftError
    from tests.netns.topology import in_netns

    with in_netns(topology.node):
        for backend in ("library", "subprocess"):
            nft = Nft(backend)
            assert nft.backend == backend
            with pytest.raises(NftError):
                nft.run("add table ip probe\nadd chain ip probe c\nadd rule ip probe c bogus statement\n")
            assert not [i for i in nft.run_json("list tables ip") if "table" in i]
            for bad in ("add table ip x\0", "}}}}", "add element ip nowhere s { 1.2.3.4 }", "x" * 1_000_000):
                with pytest.raises(NftError):
                    nft.run(bad)
            many = ", ".join(f"10.1.{i // 256}.{i % 256}" for i in range(20000))
            nft.run(f"add table ip probe\nadd set ip probe s {{ type ipv4_addr ; }}\n"
                    f"add element ip probe s {{ {many} }}\n")
            assert [i["table"]["name"] for i in nft.run_json("list tables ip") if "table" in i] == ["probe"]
            nft.run("delete table ip probe\n")
            nft.close()
