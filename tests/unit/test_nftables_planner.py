"""nftables planner: golden transactions (full and partial), the in-memory mirror, hostile and huge input."""

# Golden nft text reads best one command per line.
# ruff: noqa: E501

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from proxyd.model import (
    Endpoint,
    Protocol,
    ProxyState,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServiceType,
)
from proxyd.modes.iptables.tracer import flow
from proxyd.modes.nftables import layout as lay
from proxyd.modes.nftables.planner import Planner, PlannerOptions
from proxyd.modes.nftables.tracer import Ruleset, Tracer

NODE = "node1"


def sp(name: str, ip: str, *, port: int = 80, protocol: Protocol = Protocol.TCP, port_name: str = "p80",
       **kw: object) -> ServicePort:
    n = ServicePortName("ns", name, port_name, protocol)
    return ServicePort(name=n, type=kw.pop("type", ServiceType.CLUSTER_IP), cluster_ip=ip, port=port,
                       protocol=protocol, **kw)  # type: ignore[arg-type]


def state(entries) -> ProxyState:
    return ProxyState(service_ports={s.name: s for s, _ in entries}, endpoints={s.name: e for s, e in entries},
                      node_name=NODE)


OPTS = PlannerOptions(cluster_cidrs=("10.0.0.0/8",), node_ip="192.168.0.2")
WEB = sp("web", "172.30.0.41")
LB = sp("lb", "172.30.0.42", type=ServiceType.LOAD_BALANCER, node_port=3001, external_ips=("192.168.99.22",),
        load_balancer_ips=("1.2.3.4",), load_balancer_source_ranges=("203.0.113.0/25",), external_policy_local=True,
        health_check_node_port=30000)
EMPTY = sp("empty", "172.30.0.43", port=53, protocol=Protocol.UDP, port_name="dns", type=ServiceType.NODE_PORT,
           node_port=3003)
STICKY = sp("sticky", "172.30.0.44", affinity_timeout=600)
ENTRIES = [
    (WEB, (Endpoint("10.180.0.1", 8080, node_name=NODE), Endpoint("10.180.0.2", 8080, node_name="node2"))),
    (LB, (Endpoint("10.180.0.3", 80, node_name=NODE), Endpoint("10.180.0.4", 80, node_name="node2"))),
    (EMPTY, ()),
    (STICKY, (Endpoint("10.180.0.5", 80, node_name="node2"),)),
]
CHANGED = [
    (WEB, (Endpoint("10.180.0.1", 8080, node_name=NODE), Endpoint("10.180.0.6", 8080, node_name="node2"),
           Endpoint("10.180.0.7", 8080, node_name="node2"))),
    *ENTRIES[1:3],
    (STICKY, ()),
]

GOLDEN_FULL = """\
add table ip proxyd
add chain ip proxyd nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip proxyd nat-output { type nat hook output priority -100 ; }
add chain ip proxyd nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip proxyd firewall-check
add chain ip proxyd service-endpoints-check
add chain ip proxyd nodeport-endpoints-check
add chain ip proxyd cluster-ips-check
add chain ip proxyd reject-chain
add chain ip proxyd mark-for-masquerade
add chain ip proxyd masquerading
add chain ip proxyd services
add chain ip proxyd svc-int
add chain ip proxyd svc-ext
add chain ip proxyd svc-extl
add chain ip proxyd svc-short
add chain ip proxyd np-ext
add chain ip proxyd np-extl
add chain ip proxyd np-short
add chain ip proxyd svc-pick-tcp-2
add chain ip proxyd svc-pick-tcp-1
add chain ip proxyd svc-short-pick-tcp-2
add chain ip proxyd np-pick-tcp-1
add chain ip proxyd np-short-pick-tcp-2
add chain ip proxyd endpoint-dvoxwsarum27fjjn
add chain ip proxyd sticky-u7tl6mk3ianqqakg
flush chain ip proxyd nat-prerouting
flush chain ip proxyd nat-output
flush chain ip proxyd nat-postrouting
flush chain ip proxyd firewall-check
flush chain ip proxyd service-endpoints-check
flush chain ip proxyd nodeport-endpoints-check
flush chain ip proxyd cluster-ips-check
flush chain ip proxyd reject-chain
flush chain ip proxyd mark-for-masquerade
flush chain ip proxyd masquerading
flush chain ip proxyd services
flush chain ip proxyd svc-int
flush chain ip proxyd svc-ext
flush chain ip proxyd svc-extl
flush chain ip proxyd svc-short
flush chain ip proxyd np-ext
flush chain ip proxyd np-extl
flush chain ip proxyd np-short
flush chain ip proxyd svc-pick-tcp-2
flush chain ip proxyd svc-pick-tcp-1
flush chain ip proxyd svc-short-pick-tcp-2
flush chain ip proxyd np-pick-tcp-1
flush chain ip proxyd np-short-pick-tcp-2
flush chain ip proxyd endpoint-dvoxwsarum27fjjn
flush chain ip proxyd sticky-u7tl6mk3ianqqakg
add set ip proxyd affinity-dvoxwsarum27fjjn { type ipv4_addr ; flags dynamic,timeout ; timeout 600s ; }
add set ip proxyd canary { type ipv4_addr ; }
flush set ip proxyd canary
add set ip proxyd cluster-ips { type ipv4_addr ; }
flush set ip proxyd cluster-ips
add set ip proxyd nodeport-ips { type ipv4_addr ; }
flush set ip proxyd nodeport-ips
add map ip proxyd service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
flush map ip proxyd service-ips
add map ip proxyd service-nodeports { type inet_proto . inet_service : verdict ; }
flush map ip proxyd service-nodeports
add map ip proxyd no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; }
flush map ip proxyd no-endpoint-services
add map ip proxyd no-endpoint-nodeports { type inet_proto . inet_service : verdict ; }
flush map ip proxyd no-endpoint-nodeports
add set ip proxyd firewall-ips { type ipv4_addr . inet_proto . inet_service ; }
flush set ip proxyd firewall-ips
add set ip proxyd firewall-allow { type ipv4_addr . inet_proto . inet_service . ipv4_addr ; flags interval ; }
flush set ip proxyd firewall-allow
add set ip proxyd hairpin { type ipv4_addr . ipv4_addr ; }
flush set ip proxyd hairpin
add map ip proxyd svc-pick { type ipv4_addr . inet_proto . inet_service : verdict ; }
flush map ip proxyd svc-pick
add map ip proxyd svc-backends-tcp { typeof ip daddr . meta l4proto . th dport . numgen random mod 2 : ip daddr . tcp dport ; counter ; }
flush map ip proxyd svc-backends-tcp
add map ip proxyd svc-backends-udp { typeof ip daddr . meta l4proto . th dport . numgen random mod 2 : ip daddr . udp dport ; counter ; }
flush map ip proxyd svc-backends-udp
add map ip proxyd svc-backends-sctp { typeof ip daddr . meta l4proto . th dport . numgen random mod 2 : ip daddr . sctp dport ; counter ; }
flush map ip proxyd svc-backends-sctp
add map ip proxyd svc-short-pick { type ipv4_addr . inet_proto . inet_service : verdict ; }
flush map ip proxyd svc-short-pick
add map ip proxyd svc-short-backends-tcp { typeof ip daddr . meta l4proto . th dport . numgen random mod 2 : ip daddr . tcp dport ; counter ; }
flush map ip proxyd svc-short-backends-tcp
add map ip proxyd svc-short-backends-udp { typeof ip daddr . meta l4proto . th dport . numgen random mod 2 : ip daddr . udp dport ; counter ; }
flush map ip proxyd svc-short-backends-udp
add map ip proxyd svc-short-backends-sctp { typeof ip daddr . meta l4proto . th dport . numgen random mod 2 : ip daddr . sctp dport ; counter ; }
flush map ip proxyd svc-short-backends-sctp
add map ip proxyd np-pick { type inet_proto . inet_service : verdict ; }
flush map ip proxyd np-pick
add map ip proxyd np-backends-tcp { typeof meta l4proto . th dport . numgen random mod 2 : ip daddr . tcp dport ; counter ; }
flush map ip proxyd np-backends-tcp
add map ip proxyd np-backends-udp { typeof meta l4proto . th dport . numgen random mod 2 : ip daddr . udp dport ; counter ; }
flush map ip proxyd np-backends-udp
add map ip proxyd np-backends-sctp { typeof meta l4proto . th dport . numgen random mod 2 : ip daddr . sctp dport ; counter ; }
flush map ip proxyd np-backends-sctp
add map ip proxyd np-short-pick { type inet_proto . inet_service : verdict ; }
flush map ip proxyd np-short-pick
add map ip proxyd np-short-backends-tcp { typeof meta l4proto . th dport . numgen random mod 2 : ip daddr . tcp dport ; counter ; }
flush map ip proxyd np-short-backends-tcp
add map ip proxyd np-short-backends-udp { typeof meta l4proto . th dport . numgen random mod 2 : ip daddr . udp dport ; counter ; }
flush map ip proxyd np-short-backends-udp
add map ip proxyd np-short-backends-sctp { typeof meta l4proto . th dport . numgen random mod 2 : ip daddr . sctp dport ; counter ; }
flush map ip proxyd np-short-backends-sctp
add rule ip proxyd nat-prerouting jump services
add rule ip proxyd nat-prerouting jump nodeport-endpoints-check
add rule ip proxyd nat-prerouting jump service-endpoints-check
add rule ip proxyd nat-prerouting ip daddr @cluster-ips fib daddr type != local jump cluster-ips-check
add rule ip proxyd nat-output jump service-endpoints-check
add rule ip proxyd nat-output jump services
add rule ip proxyd nat-output jump cluster-ips-check
add rule ip proxyd nat-output jump nodeport-endpoints-check
add rule ip proxyd nat-postrouting ct status dnat ip saddr . ip daddr @hairpin jump mark-for-masquerade
add rule ip proxyd nat-postrouting jump masquerading
add rule ip proxyd firewall-check ip daddr . meta l4proto . th dport @firewall-ips ip daddr . meta l4proto . th dport . ip saddr != @firewall-allow drop
add rule ip proxyd service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip proxyd nodeport-endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip proxyd cluster-ips-check ip daddr @cluster-ips reject
add rule ip proxyd reject-chain reject
add rule ip proxyd mark-for-masquerade meta mark set meta mark | 0x4000
add rule ip proxyd masquerading meta mark & 0x4000 == 0 return
add rule ip proxyd masquerading meta mark set meta mark ^ 0x4000
add rule ip proxyd masquerading masquerade fully-random
add rule ip proxyd services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip proxyd services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
add rule ip proxyd svc-int ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip proxyd svc-int ip daddr . meta l4proto . th dport vmap @svc-pick
add rule ip proxyd svc-ext jump firewall-check
add rule ip proxyd svc-ext jump mark-for-masquerade
add rule ip proxyd svc-ext ip daddr . meta l4proto . th dport vmap @svc-pick
add rule ip proxyd svc-extl jump firewall-check
add rule ip proxyd svc-extl ip saddr 10.0.0.0/8 goto svc-short
add rule ip proxyd svc-extl fib saddr type local jump mark-for-masquerade
add rule ip proxyd svc-extl fib saddr type local goto svc-short
add rule ip proxyd svc-extl ip daddr . meta l4proto . th dport vmap @svc-pick
add rule ip proxyd svc-short ip daddr . meta l4proto . th dport vmap @svc-short-pick
add rule ip proxyd np-ext jump mark-for-masquerade
add rule ip proxyd np-ext meta l4proto . th dport vmap @np-pick
add rule ip proxyd np-extl ip saddr 10.0.0.0/8 goto np-short
add rule ip proxyd np-extl fib saddr type local jump mark-for-masquerade
add rule ip proxyd np-extl fib saddr type local goto np-short
add rule ip proxyd np-extl meta l4proto . th dport vmap @np-pick
add rule ip proxyd np-short meta l4proto . th dport vmap @np-short-pick
add rule ip proxyd svc-pick-tcp-2 dnat ip addr . port to ip daddr . meta l4proto . th dport . numgen random mod 2 map @svc-backends-tcp
add rule ip proxyd svc-pick-tcp-1 dnat ip addr . port to ip daddr . meta l4proto . th dport . numgen random mod 1 map @svc-backends-tcp
add rule ip proxyd svc-short-pick-tcp-2 dnat ip addr . port to ip daddr . meta l4proto . th dport . numgen random mod 2 map @svc-short-backends-tcp
add rule ip proxyd np-pick-tcp-1 dnat ip addr . port to meta l4proto . th dport . numgen random mod 1 map @np-backends-tcp
add rule ip proxyd np-short-pick-tcp-2 dnat ip addr . port to meta l4proto . th dport . numgen random mod 2 map @np-short-backends-tcp
add rule ip proxyd endpoint-dvoxwsarum27fjjn update @affinity-dvoxwsarum27fjjn { ip saddr }
add rule ip proxyd endpoint-dvoxwsarum27fjjn meta l4proto tcp dnat to 10.180.0.5:80
add rule ip proxyd sticky-u7tl6mk3ianqqakg ip saddr @affinity-dvoxwsarum27fjjn goto endpoint-dvoxwsarum27fjjn
add rule ip proxyd sticky-u7tl6mk3ianqqakg numgen random mod 1 vmap { 0 : goto endpoint-dvoxwsarum27fjjn }
add element ip proxyd cluster-ips { 172.30.0.43, 172.30.0.42, 172.30.0.44, 172.30.0.41 }
add element ip proxyd no-endpoint-services { 172.30.0.43 . udp . 53 : goto reject-chain }
add element ip proxyd no-endpoint-nodeports { udp . 3003 : goto reject-chain }
add element ip proxyd service-ips { 172.30.0.42 . tcp . 80 : goto svc-int, 192.168.99.22 . tcp . 80 : goto svc-extl, 1.2.3.4 . tcp . 80 : goto svc-extl, 172.30.0.44 . tcp . 80 : goto svc-int, 172.30.0.41 . tcp . 80 : goto svc-int }
add element ip proxyd svc-pick { 172.30.0.42 . tcp . 80 : goto svc-pick-tcp-2, 192.168.99.22 . tcp . 80 : goto svc-pick-tcp-1, 1.2.3.4 . tcp . 80 : goto svc-pick-tcp-1, 172.30.0.44 . tcp . 80 : goto sticky-u7tl6mk3ianqqakg, 172.30.0.41 . tcp . 80 : goto svc-pick-tcp-2 }
add element ip proxyd svc-backends-tcp { 172.30.0.42 . tcp . 80 . 0 : 10.180.0.3 . 80, 172.30.0.42 . tcp . 80 . 1 : 10.180.0.4 . 80, 192.168.99.22 . tcp . 80 . 0 : 10.180.0.3 . 80, 1.2.3.4 . tcp . 80 . 0 : 10.180.0.3 . 80, 172.30.0.41 . tcp . 80 . 0 : 10.180.0.1 . 8080, 172.30.0.41 . tcp . 80 . 1 : 10.180.0.2 . 8080 }
add element ip proxyd svc-short-pick { 192.168.99.22 . tcp . 80 : goto svc-short-pick-tcp-2, 1.2.3.4 . tcp . 80 : goto svc-short-pick-tcp-2 }
add element ip proxyd svc-short-backends-tcp { 192.168.99.22 . tcp . 80 . 0 : 10.180.0.3 . 80, 192.168.99.22 . tcp . 80 . 1 : 10.180.0.4 . 80, 1.2.3.4 . tcp . 80 . 0 : 10.180.0.3 . 80, 1.2.3.4 . tcp . 80 . 1 : 10.180.0.4 . 80 }
add element ip proxyd firewall-ips { 1.2.3.4 . tcp . 80 }
add element ip proxyd firewall-allow { 1.2.3.4 . tcp . 80 . 203.0.113.0/25 }
add element ip proxyd service-nodeports { tcp . 3001 : goto np-extl }
add element ip proxyd np-pick { tcp . 3001 : goto np-pick-tcp-1 }
add element ip proxyd np-backends-tcp { tcp . 3001 . 0 : 10.180.0.3 . 80 }
add element ip proxyd np-short-pick { tcp . 3001 : goto np-short-pick-tcp-2 }
add element ip proxyd np-short-backends-tcp { tcp . 3001 . 0 : 10.180.0.3 . 80, tcp . 3001 . 1 : 10.180.0.4 . 80 }
add element ip proxyd hairpin { 10.180.0.3 . 10.180.0.3, 10.180.0.1 . 10.180.0.1 }
add element ip proxyd canary { 0.0.0.0 }
"""

# web gains endpoints (3 now: a new pick chain), sticky loses its only one (rejects; its affinity
# chains are emptied now and deleted by the next transaction, its set deleted now).
GOLDEN_PARTIAL = """\
add chain ip proxyd svc-pick-tcp-3
flush chain ip proxyd svc-pick-tcp-3
add rule ip proxyd svc-pick-tcp-3 dnat ip addr . port to ip daddr . meta l4proto . th dport . numgen random mod 3 map @svc-backends-tcp
delete element ip proxyd service-ips { 172.30.0.44 . tcp . 80 }
delete element ip proxyd svc-backends-tcp { 172.30.0.41 . tcp . 80 . 1 }
delete element ip proxyd svc-pick { 172.30.0.41 . tcp . 80, 172.30.0.44 . tcp . 80 }
add element ip proxyd no-endpoint-services { 172.30.0.44 . tcp . 80 : goto reject-chain }
add element ip proxyd svc-backends-tcp { 172.30.0.41 . tcp . 80 . 1 : 10.180.0.6 . 8080, 172.30.0.41 . tcp . 80 . 2 : 10.180.0.7 . 8080 }
add element ip proxyd svc-pick { 172.30.0.41 . tcp . 80 : goto svc-pick-tcp-3 }
flush chain ip proxyd endpoint-dvoxwsarum27fjjn
flush chain ip proxyd sticky-u7tl6mk3ianqqakg
delete set ip proxyd affinity-dvoxwsarum27fjjn
"""

GOLDEN_NEXT = """\
add chain ip proxyd endpoint-dvoxwsarum27fjjn
delete chain ip proxyd endpoint-dvoxwsarum27fjjn
add chain ip proxyd sticky-u7tl6mk3ianqqakg
delete chain ip proxyd sticky-u7tl6mk3ianqqakg
"""


def test_golden_full_partial_and_deferred_deletes() -> None:
    planner = Planner(OPTS)
    full = planner.plan(state(ENTRIES), None)
    assert full.full and full.text == GOLDEN_FULL
    planner.commit(full)
    changed = frozenset({WEB.name.service, STICKY.name.service})
    partial = planner.plan(state(CHANGED), changed)
    assert not partial.full and partial.text == GOLDEN_PARTIAL
    planner.commit(partial)
    nothing_changed = planner.plan(state(CHANGED), frozenset())
    assert nothing_changed.text == GOLDEN_NEXT
    planner.commit(nothing_changed)
    assert planner.plan(state(CHANGED), frozenset()).empty


def test_a_replacing_full_plan_swaps_the_whole_table_and_deletes_nothing_stale() -> None:
    planner = Planner(OPTS)
    planner.commit(planner.plan(state(ENTRIES), None))
    plan = planner.plan(state(CHANGED), frozenset(), stale_chains={"svc-ep-stale"}, stale_sets={"aff-stale"},
                        replace=True)
    table = lay.Family(4).table
    assert plan.full
    assert plan.text.startswith(f"add table {table}\ndelete table {table}\nadd table {table}\n")
    assert "stale" not in plan.text
    # Past the swap it is the ordinary full plan of the same state.
    fresh = Planner(OPTS).plan(state(CHANGED), None).text
    assert plan.text.split("\n", 2)[2] == fresh


# The filter base chains of the layout before the checks moved into the nat chains.
OLD_BASE_CHAINS = """\
add table ip proxyd
add chain ip proxyd firewall-check
add chain ip proxyd service-endpoints-check
add chain ip proxyd filter-prerouting { type filter hook prerouting priority -110 ; }
add chain ip proxyd filter-forward { type filter hook forward priority -110 ; }
add rule ip proxyd filter-prerouting ct state new jump firewall-check
add rule ip proxyd filter-forward ct state new jump service-endpoints-check
"""


def test_a_full_plan_deletes_an_older_layouts_base_chains() -> None:
    stale = {"filter-prerouting", "filter-forward", "svc-pick-tcp-9"}
    plan = Planner(OPTS).plan(state(ENTRIES), None, stale_chains=stale)
    for chain in ("filter-prerouting", "filter-forward"):
        assert f"flush chain ip proxyd {chain}\ndelete chain ip proxyd {chain}\n" in plan.text
    assert "delete chain ip proxyd svc-pick-tcp-9" not in plan.text  # dynamic: emptied, deleted next time
    tracer = Tracer(OLD_BASE_CHAINS, plan.text, node_ips=["192.168.0.2"])
    assert set(tracer.ruleset.base) == {name for name, *_ in lay.BASE_CHAINS}
    assert {hook for _t, hook, _p in tracer.ruleset.base.values()} == {"prerouting", "output", "postrouting"}
    assert {typ for typ, _h, _p in tracer.ruleset.base.values()} == {"nat"}
    assert flow(tracer, src="10.0.0.2", dst="172.30.0.43:53", protocol="udp") == "REJECT"  # type: ignore[arg-type]


def test_a_cluster_ips_unknown_port_is_rejected_where_kube_proxy_checks_it() -> None:
    # kube-proxy checks cluster IPs in forward and output, not input: the nat chains keep that.
    remote = Tracer(GOLDEN_FULL, node_ips=["192.168.0.2"])
    local = Tracer(GOLDEN_FULL, node_ips=["192.168.0.2", "172.30.0.41"])
    assert flow(remote, src="10.0.0.2", dst="172.30.0.41:81") == "REJECT"  # type: ignore[arg-type]
    assert flow(local, src="10.0.0.2", dst="172.30.0.41:81") == "172.30.0.41:81 no-masq"  # type: ignore[arg-type]
    assert flow(local, src="10.0.0.2", dst="172.30.0.41:81", local_origin=True) == "REJECT"  # type: ignore[arg-type]


def test_the_golden_transactions_are_what_the_tracer_accepts() -> None:
    tracer = Tracer(GOLDEN_FULL, GOLDEN_PARTIAL, GOLDEN_NEXT, node_ips=["192.168.0.2"])
    assert flow(tracer, src="10.0.0.2", dst="172.30.0.41:80") == \
        "10.180.0.1:8080, 10.180.0.6:8080, 10.180.0.7:8080 no-masq"  # type: ignore[arg-type]
    assert flow(tracer, src="10.0.0.2", dst="172.30.0.44:80") == "REJECT"  # type: ignore[arg-type]
    assert not [c for c in tracer.ruleset.chains if c.startswith((lay.STICKY_PREFIX, lay.ENDPOINT_PREFIX))]


def test_plan_does_not_touch_the_planner_until_commit() -> None:
    planner = Planner(OPTS)
    planner.plan(state(ENTRIES), None)
    assert planner.needs_full and not planner.kernel
    full = planner.plan(state(ENTRIES), None)
    planner.commit(full)
    before = _nonempty(planner.kernel)
    planner.plan(state(CHANGED), frozenset({WEB.name.service}))
    assert _nonempty(planner.kernel) == before
    planner.invalidate()
    assert planner.plan(state(CHANGED), frozenset({WEB.name.service})).full


def _nonempty(mirror) -> dict:
    return {name: dict(elements) for name, elements in mirror.items() if elements}


def _random_state(rng: random.Random, n: int) -> ProxyState:
    entries = []
    for i in range(n):
        if rng.random() < 0.2:
            continue
        kind = rng.choice(["ClusterIP", "NodePort", "LoadBalancer"])
        kw: dict = {}
        if kind != "ClusterIP":
            kw["type"] = ServiceType(kind)
            kw["node_port"] = 30000 + i
        if kind == "LoadBalancer":
            kw["load_balancer_ips"] = (f"192.0.2.{i + 1}",)
            if rng.random() < 0.5:
                kw["load_balancer_source_ranges"] = ("203.0.113.0/24",)
        if rng.random() < 0.3:
            kw["external_policy_local"] = kind != "ClusterIP"
            kw["internal_policy_local"] = kind == "ClusterIP"
        if rng.random() < 0.2:
            kw["affinity_timeout"] = rng.choice([60, 10800])
        protocol = rng.choice([Protocol.TCP, Protocol.UDP, Protocol.SCTP])
        svc = sp(f"s{i}", f"172.30.1.{i + 1}", protocol=protocol, **kw)
        eps = tuple(Endpoint(f"10.180.{i}.{j}", 8080, node_name=rng.choice([NODE, "node2"]),
                             ready=rng.random() < 0.9, serving=True, terminating=rng.random() < 0.1)
                    for j in range(rng.randrange(0, 5)))
        entries.append((svc, eps))
    return state(entries)


@pytest.mark.parametrize("seed", range(8))
def test_partial_syncs_keep_the_mirror_equal_to_a_full_plan(seed: int) -> None:
    """After any chain of partial plans the mirror (and the table they build) equals a fresh full plan's."""
    rng = random.Random(seed)
    planner = Planner(OPTS)
    st = _random_state(rng, 12)
    plan = planner.plan(st, None)
    texts = [plan.text]
    planner.commit(plan)
    for _ in range(10):
        new = _random_state(rng, 12)
        changed = frozenset(n.service for n in set(st.service_ports) | set(new.service_ports)
                            if st.service_ports.get(n) != new.service_ports.get(n)
                            or st.endpoints.get(n) != new.endpoints.get(n))
        plan = planner.plan(new, changed)
        texts.append(plan.text)
        planner.commit(plan)
        st = new
        fresh = Planner(OPTS).plan(st, None)
        assert _nonempty(planner.kernel) == _nonempty(fresh.kernel)
        assert {c: r for c, r in planner.dynamic_chains.items()} == fresh.chains
        # The compact mirror (hashed keys, owners, counts) itself, not only the texts rendered from it.
        committed = Planner(OPTS)
        committed.commit(fresh)
        assert planner.mirror == committed.mirror
        # A status of a few ports sees the same elements as the whole mirror, for their keys.
        whole = _nonempty(planner.kernel)
        some = sorted(st.service_ports)[::3]
        for set_name, elements in planner.kernel_for(some).items():
            assert elements and all(whole[set_name][k] == v for k, v in elements.items()), set_name
    # The tables built both ways hold the same elements.
    built = Ruleset().load("".join(texts))
    fresh_table = Ruleset().load(Planner(OPTS).plan(st, None).text)
    assert built.sets == fresh_table.sets


def test_node_port_addresses_follow_node_ips() -> None:
    opts = PlannerOptions(cluster_cidrs=("10.0.0.0/8",), nodeport_addresses=("192.168.0.0/16",),
                          node_ips=("192.168.0.2", "127.0.0.1"))
    planner = Planner(opts)
    full = planner.plan(state(ENTRIES), None)
    assert "add element ip proxyd nodeport-ips { 192.168.0.2 }" in full.text  # never loopback
    assert "services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports" in full.text
    planner.commit(full)
    planner.set_node_ips(["192.168.0.3"])
    plan = planner.plan(state(ENTRIES), frozenset())
    assert plan.text == ("delete element ip proxyd nodeport-ips { 192.168.0.2 }\n"
                         "add element ip proxyd nodeport-ips { 192.168.0.3 }\n")


def test_sctp_and_udp_use_their_own_backends_maps() -> None:
    entries = [(sp("x", "172.30.0.50", protocol=Protocol.SCTP), (Endpoint("10.180.0.9", 9),)),
               (sp("y", "172.30.0.51", protocol=Protocol.UDP), (Endpoint("10.180.0.10", 53),))]
    text = Planner(OPTS).plan(state(entries), None).text
    assert "add element ip proxyd svc-backends-sctp { 172.30.0.50 . sctp . 80 . 0 : 10.180.0.9 . 9 }" in text
    assert "map @svc-backends-udp" in text
    tracer = Tracer(text, node_ips=[])
    assert flow(tracer, src="10.0.0.2", dst="172.30.0.50:80", protocol="sctp") == "10.180.0.9:9 no-masq"  # type: ignore[arg-type]


def test_ipv6_table_is_the_same_layout_with_ip6() -> None:
    opts = PlannerOptions(family=6, cluster_cidrs=("fd00:10::/64", "10.0.0.0/8"))
    entries = [(sp("v6", "fd00:96::10"), (Endpoint("fd00:10::5", 8080), Endpoint("10.0.0.5", 8080))),
               (sp("v4", "172.30.0.1"), (Endpoint("10.0.0.6", 80),))]
    text = Planner(opts).plan(state(entries), None).text
    assert text.startswith("add table ip6 proxyd\n")
    assert "ip6 saddr != fd00:10::/64 jump mark-for-masquerade" in text
    assert "172.30.0.1" not in text and "10.0.0.5" not in text
    tracer = Tracer(text, node_ips=[])
    assert flow(tracer, src="fd00:10::9", dst="[fd00:96::10]:80") == "[fd00:10::5]:8080 no-masq"  # type: ignore[arg-type]


def test_two_ports_claiming_one_address_keep_the_first() -> None:
    a = sp("a", "172.30.0.60")
    b = sp("b", "172.30.0.60")
    plan = Planner(OPTS).plan(state([(a, (Endpoint("10.180.0.1", 80),)), (b, (Endpoint("10.180.0.2", 80),))]), None)
    assert plan.conflicts >= 2
    tracer = Tracer(plan.text, node_ips=[])
    assert flow(tracer, src="10.0.0.2", dst="172.30.0.60:80") == "10.180.0.1:80 no-masq"  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["10.0.0.1; flush ruleset", "10.0.0.1 }", "", "999.1.1.1", "10.0.0.1\n"])
def test_hostile_addresses_never_reach_nft(bad: str) -> None:
    with pytest.raises(ValueError):
        Planner(OPTS).plan(state([(WEB, (Endpoint(bad, 80),))]), None)
    with pytest.raises(ValueError):
        Planner(OPTS).plan(state([(sp("x", bad), ())]), None)


def test_hostile_source_range_is_refused() -> None:
    lb = sp("lb", "172.30.0.42", type=ServiceType.LOAD_BALANCER, load_balancer_ips=("1.2.3.4",),
            load_balancer_source_ranges=("0.0.0.0/0 } ; flush ruleset",))
    with pytest.raises(ValueError):
        Planner(OPTS).plan(state([(lb, (Endpoint("10.180.0.1", 80),))]), None)


def test_huge_service_is_one_pick_chain_and_many_elements() -> None:
    eps = tuple(Endpoint(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 80) for i in range(5000))
    plan = Planner(OPTS).plan(state([(WEB, eps)]), None)
    assert "numgen random mod 5000 map @svc-backends-tcp" in plan.text
    assert sum(len(v) for v in plan.kernel.values()) > 5000
    assert plan.added == sum(len(v) for v in plan.kernel.values())
    # element lists are split so no single command grows without bound
    assert max(len(line) for line in plan.text.splitlines()) < 4096 * 64


def test_dynamic_chain_names() -> None:
    assert lay.is_dynamic_chain("svc-pick-tcp-3")
    assert lay.is_dynamic_chain("np-short-pick-sctp-12")
    assert lay.is_dynamic_chain("sticky-abc") and lay.is_dynamic_chain("endpoint-abc")
    for fixed in ("svc-int", "svc-pick", "np-ext", "services", "svc-pick-tcp-0", "svc-pick-icmp-1", "nat-output"):
        assert not lay.is_dynamic_chain(fixed), fixed


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError):
        PlannerOptions(family=5)
    with pytest.raises(ValueError):
        PlannerOptions(masquerade_bit=32)
    assert isinstance(ServiceName("a", "b"), ServiceName)


# -- IPv6 and dual-stack ------------------------------------------------------------------------------
#
# The IPv6 proxier's table for the golden services moved to IPv6: the same layout in "ip6 proxyd"
# (ipv6_addr keys, ip6 payload matches, "::1" instead of 127.0.0.0/8 for NodePorts, as kube-proxy's
# nftables mode), its family's cluster CIDR for masquerading, "dnat to [ip]:port" for affinity, and a
# plain "reject" (ICMPv6 port unreachable in an ip6 table).

OPTS6 = PlannerOptions(family=6, cluster_cidrs=("10.0.0.0/8", "fd00:10::/32"), node_ip="2001:db8:168::2")
WEB6 = sp("web", "fd00:172:30::41")
LB6 = sp("lb", "fd00:172:30::42", type=ServiceType.LOAD_BALANCER, node_port=3001, external_ips=("2001:db8:99::22",),
         load_balancer_ips=("2001:db8:1::4",), load_balancer_source_ranges=("2001:db8:203::/64",),
         external_policy_local=True, health_check_node_port=30000)
EMPTY6 = sp("empty", "fd00:172:30::43", port=53, protocol=Protocol.UDP, port_name="dns", type=ServiceType.NODE_PORT,
            node_port=3003)
STICKY6 = sp("sticky", "fd00:172:30::44", affinity_timeout=600)
ENTRIES6 = [
    (WEB6, (Endpoint("fd00:10:180::1", 8080, node_name=NODE), Endpoint("fd00:10:180::2", 8080, node_name="node2"))),
    (LB6, (Endpoint("fd00:10:180::3", 80, node_name=NODE), Endpoint("fd00:10:180::4", 80, node_name="node2"))),
    (EMPTY6, ()),
    (STICKY6, (Endpoint("fd00:10:180::5", 80, node_name="node2"),)),
]

GOLDEN6_FULL = """\
add table ip6 proxyd
add chain ip6 proxyd nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip6 proxyd nat-output { type nat hook output priority -100 ; }
add chain ip6 proxyd nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip6 proxyd firewall-check
add chain ip6 proxyd service-endpoints-check
add chain ip6 proxyd nodeport-endpoints-check
add chain ip6 proxyd cluster-ips-check
add chain ip6 proxyd reject-chain
add chain ip6 proxyd mark-for-masquerade
add chain ip6 proxyd masquerading
add chain ip6 proxyd services
add chain ip6 proxyd svc-int
add chain ip6 proxyd svc-ext
add chain ip6 proxyd svc-extl
add chain ip6 proxyd svc-short
add chain ip6 proxyd np-ext
add chain ip6 proxyd np-extl
add chain ip6 proxyd np-short
add chain ip6 proxyd svc-pick-tcp-2
add chain ip6 proxyd svc-pick-tcp-1
add chain ip6 proxyd svc-short-pick-tcp-2
add chain ip6 proxyd np-pick-tcp-1
add chain ip6 proxyd np-short-pick-tcp-2
add chain ip6 proxyd endpoint-3qc77sh7jbmjxw2f
add chain ip6 proxyd sticky-u7tl6mk3ianqqakg
flush chain ip6 proxyd nat-prerouting
flush chain ip6 proxyd nat-output
flush chain ip6 proxyd nat-postrouting
flush chain ip6 proxyd firewall-check
flush chain ip6 proxyd service-endpoints-check
flush chain ip6 proxyd nodeport-endpoints-check
flush chain ip6 proxyd cluster-ips-check
flush chain ip6 proxyd reject-chain
flush chain ip6 proxyd mark-for-masquerade
flush chain ip6 proxyd masquerading
flush chain ip6 proxyd services
flush chain ip6 proxyd svc-int
flush chain ip6 proxyd svc-ext
flush chain ip6 proxyd svc-extl
flush chain ip6 proxyd svc-short
flush chain ip6 proxyd np-ext
flush chain ip6 proxyd np-extl
flush chain ip6 proxyd np-short
flush chain ip6 proxyd svc-pick-tcp-2
flush chain ip6 proxyd svc-pick-tcp-1
flush chain ip6 proxyd svc-short-pick-tcp-2
flush chain ip6 proxyd np-pick-tcp-1
flush chain ip6 proxyd np-short-pick-tcp-2
flush chain ip6 proxyd endpoint-3qc77sh7jbmjxw2f
flush chain ip6 proxyd sticky-u7tl6mk3ianqqakg
add set ip6 proxyd affinity-3qc77sh7jbmjxw2f { type ipv6_addr ; flags dynamic,timeout ; timeout 600s ; }
add set ip6 proxyd canary { type ipv6_addr ; }
flush set ip6 proxyd canary
add set ip6 proxyd cluster-ips { type ipv6_addr ; }
flush set ip6 proxyd cluster-ips
add set ip6 proxyd nodeport-ips { type ipv6_addr ; }
flush set ip6 proxyd nodeport-ips
add map ip6 proxyd service-ips { type ipv6_addr . inet_proto . inet_service : verdict ; }
flush map ip6 proxyd service-ips
add map ip6 proxyd service-nodeports { type inet_proto . inet_service : verdict ; }
flush map ip6 proxyd service-nodeports
add map ip6 proxyd no-endpoint-services { type ipv6_addr . inet_proto . inet_service : verdict ; }
flush map ip6 proxyd no-endpoint-services
add map ip6 proxyd no-endpoint-nodeports { type inet_proto . inet_service : verdict ; }
flush map ip6 proxyd no-endpoint-nodeports
add set ip6 proxyd firewall-ips { type ipv6_addr . inet_proto . inet_service ; }
flush set ip6 proxyd firewall-ips
add set ip6 proxyd firewall-allow { type ipv6_addr . inet_proto . inet_service . ipv6_addr ; flags interval ; }
flush set ip6 proxyd firewall-allow
add set ip6 proxyd hairpin { type ipv6_addr . ipv6_addr ; }
flush set ip6 proxyd hairpin
add map ip6 proxyd svc-pick { type ipv6_addr . inet_proto . inet_service : verdict ; }
flush map ip6 proxyd svc-pick
add map ip6 proxyd svc-backends-tcp { typeof ip6 daddr . meta l4proto . th dport . numgen random mod 2 : ip6 daddr . tcp dport ; counter ; }
flush map ip6 proxyd svc-backends-tcp
add map ip6 proxyd svc-backends-udp { typeof ip6 daddr . meta l4proto . th dport . numgen random mod 2 : ip6 daddr . udp dport ; counter ; }
flush map ip6 proxyd svc-backends-udp
add map ip6 proxyd svc-backends-sctp { typeof ip6 daddr . meta l4proto . th dport . numgen random mod 2 : ip6 daddr . sctp dport ; counter ; }
flush map ip6 proxyd svc-backends-sctp
add map ip6 proxyd svc-short-pick { type ipv6_addr . inet_proto . inet_service : verdict ; }
flush map ip6 proxyd svc-short-pick
add map ip6 proxyd svc-short-backends-tcp { typeof ip6 daddr . meta l4proto . th dport . numgen random mod 2 : ip6 daddr . tcp dport ; counter ; }
flush map ip6 proxyd svc-short-backends-tcp
add map ip6 proxyd svc-short-backends-udp { typeof ip6 daddr . meta l4proto . th dport . numgen random mod 2 : ip6 daddr . udp dport ; counter ; }
flush map ip6 proxyd svc-short-backends-udp
add map ip6 proxyd svc-short-backends-sctp { typeof ip6 daddr . meta l4proto . th dport . numgen random mod 2 : ip6 daddr . sctp dport ; counter ; }
flush map ip6 proxyd svc-short-backends-sctp
add map ip6 proxyd np-pick { type inet_proto . inet_service : verdict ; }
flush map ip6 proxyd np-pick
add map ip6 proxyd np-backends-tcp { typeof meta l4proto . th dport . numgen random mod 2 : ip6 daddr . tcp dport ; counter ; }
flush map ip6 proxyd np-backends-tcp
add map ip6 proxyd np-backends-udp { typeof meta l4proto . th dport . numgen random mod 2 : ip6 daddr . udp dport ; counter ; }
flush map ip6 proxyd np-backends-udp
add map ip6 proxyd np-backends-sctp { typeof meta l4proto . th dport . numgen random mod 2 : ip6 daddr . sctp dport ; counter ; }
flush map ip6 proxyd np-backends-sctp
add map ip6 proxyd np-short-pick { type inet_proto . inet_service : verdict ; }
flush map ip6 proxyd np-short-pick
add map ip6 proxyd np-short-backends-tcp { typeof meta l4proto . th dport . numgen random mod 2 : ip6 daddr . tcp dport ; counter ; }
flush map ip6 proxyd np-short-backends-tcp
add map ip6 proxyd np-short-backends-udp { typeof meta l4proto . th dport . numgen random mod 2 : ip6 daddr . udp dport ; counter ; }
flush map ip6 proxyd np-short-backends-udp
add map ip6 proxyd np-short-backends-sctp { typeof meta l4proto . th dport . numgen random mod 2 : ip6 daddr . sctp dport ; counter ; }
flush map ip6 proxyd np-short-backends-sctp
add rule ip6 proxyd nat-prerouting jump services
add rule ip6 proxyd nat-prerouting jump nodeport-endpoints-check
add rule ip6 proxyd nat-prerouting jump service-endpoints-check
add rule ip6 proxyd nat-prerouting ip6 daddr @cluster-ips fib daddr type != local jump cluster-ips-check
add rule ip6 proxyd nat-output jump service-endpoints-check
add rule ip6 proxyd nat-output jump services
add rule ip6 proxyd nat-output jump cluster-ips-check
add rule ip6 proxyd nat-output jump nodeport-endpoints-check
add rule ip6 proxyd nat-postrouting ct status dnat ip6 saddr . ip6 daddr @hairpin jump mark-for-masquerade
add rule ip6 proxyd nat-postrouting jump masquerading
add rule ip6 proxyd firewall-check ip6 daddr . meta l4proto . th dport @firewall-ips ip6 daddr . meta l4proto . th dport . ip6 saddr != @firewall-allow drop
add rule ip6 proxyd service-endpoints-check ip6 daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip6 proxyd nodeport-endpoints-check fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip6 proxyd cluster-ips-check ip6 daddr @cluster-ips reject
add rule ip6 proxyd reject-chain reject
add rule ip6 proxyd mark-for-masquerade meta mark set meta mark | 0x4000
add rule ip6 proxyd masquerading meta mark & 0x4000 == 0 return
add rule ip6 proxyd masquerading meta mark set meta mark ^ 0x4000
add rule ip6 proxyd masquerading masquerade fully-random
add rule ip6 proxyd services ip6 daddr . meta l4proto . th dport vmap @service-ips
add rule ip6 proxyd services fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports
add rule ip6 proxyd svc-int ip6 saddr != fd00:10::/32 jump mark-for-masquerade
add rule ip6 proxyd svc-int ip6 daddr . meta l4proto . th dport vmap @svc-pick
add rule ip6 proxyd svc-ext jump firewall-check
add rule ip6 proxyd svc-ext jump mark-for-masquerade
add rule ip6 proxyd svc-ext ip6 daddr . meta l4proto . th dport vmap @svc-pick
add rule ip6 proxyd svc-extl jump firewall-check
add rule ip6 proxyd svc-extl ip6 saddr fd00:10::/32 goto svc-short
add rule ip6 proxyd svc-extl fib saddr type local jump mark-for-masquerade
add rule ip6 proxyd svc-extl fib saddr type local goto svc-short
add rule ip6 proxyd svc-extl ip6 daddr . meta l4proto . th dport vmap @svc-pick
add rule ip6 proxyd svc-short ip6 daddr . meta l4proto . th dport vmap @svc-short-pick
add rule ip6 proxyd np-ext jump mark-for-masquerade
add rule ip6 proxyd np-ext meta l4proto . th dport vmap @np-pick
add rule ip6 proxyd np-extl ip6 saddr fd00:10::/32 goto np-short
add rule ip6 proxyd np-extl fib saddr type local jump mark-for-masquerade
add rule ip6 proxyd np-extl fib saddr type local goto np-short
add rule ip6 proxyd np-extl meta l4proto . th dport vmap @np-pick
add rule ip6 proxyd np-short meta l4proto . th dport vmap @np-short-pick
add rule ip6 proxyd svc-pick-tcp-2 dnat ip6 addr . port to ip6 daddr . meta l4proto . th dport . numgen random mod 2 map @svc-backends-tcp
add rule ip6 proxyd svc-pick-tcp-1 dnat ip6 addr . port to ip6 daddr . meta l4proto . th dport . numgen random mod 1 map @svc-backends-tcp
add rule ip6 proxyd svc-short-pick-tcp-2 dnat ip6 addr . port to ip6 daddr . meta l4proto . th dport . numgen random mod 2 map @svc-short-backends-tcp
add rule ip6 proxyd np-pick-tcp-1 dnat ip6 addr . port to meta l4proto . th dport . numgen random mod 1 map @np-backends-tcp
add rule ip6 proxyd np-short-pick-tcp-2 dnat ip6 addr . port to meta l4proto . th dport . numgen random mod 2 map @np-short-backends-tcp
add rule ip6 proxyd endpoint-3qc77sh7jbmjxw2f update @affinity-3qc77sh7jbmjxw2f { ip6 saddr }
add rule ip6 proxyd endpoint-3qc77sh7jbmjxw2f meta l4proto tcp dnat to [fd00:10:180::5]:80
add rule ip6 proxyd sticky-u7tl6mk3ianqqakg ip6 saddr @affinity-3qc77sh7jbmjxw2f goto endpoint-3qc77sh7jbmjxw2f
add rule ip6 proxyd sticky-u7tl6mk3ianqqakg numgen random mod 1 vmap { 0 : goto endpoint-3qc77sh7jbmjxw2f }
add element ip6 proxyd cluster-ips { fd00:172:30::43, fd00:172:30::42, fd00:172:30::44, fd00:172:30::41 }
add element ip6 proxyd no-endpoint-services { fd00:172:30::43 . udp . 53 : goto reject-chain }
add element ip6 proxyd no-endpoint-nodeports { udp . 3003 : goto reject-chain }
add element ip6 proxyd service-ips { fd00:172:30::42 . tcp . 80 : goto svc-int, 2001:db8:99::22 . tcp . 80 : goto svc-extl, 2001:db8:1::4 . tcp . 80 : goto svc-extl, fd00:172:30::44 . tcp . 80 : goto svc-int, fd00:172:30::41 . tcp . 80 : goto svc-int }
add element ip6 proxyd svc-pick { fd00:172:30::42 . tcp . 80 : goto svc-pick-tcp-2, 2001:db8:99::22 . tcp . 80 : goto svc-pick-tcp-1, 2001:db8:1::4 . tcp . 80 : goto svc-pick-tcp-1, fd00:172:30::44 . tcp . 80 : goto sticky-u7tl6mk3ianqqakg, fd00:172:30::41 . tcp . 80 : goto svc-pick-tcp-2 }
add element ip6 proxyd svc-backends-tcp { fd00:172:30::42 . tcp . 80 . 0 : fd00:10:180::3 . 80, fd00:172:30::42 . tcp . 80 . 1 : fd00:10:180::4 . 80, 2001:db8:99::22 . tcp . 80 . 0 : fd00:10:180::3 . 80, 2001:db8:1::4 . tcp . 80 . 0 : fd00:10:180::3 . 80, fd00:172:30::41 . tcp . 80 . 0 : fd00:10:180::1 . 8080, fd00:172:30::41 . tcp . 80 . 1 : fd00:10:180::2 . 8080 }
add element ip6 proxyd svc-short-pick { 2001:db8:99::22 . tcp . 80 : goto svc-short-pick-tcp-2, 2001:db8:1::4 . tcp . 80 : goto svc-short-pick-tcp-2 }
add element ip6 proxyd svc-short-backends-tcp { 2001:db8:99::22 . tcp . 80 . 0 : fd00:10:180::3 . 80, 2001:db8:99::22 . tcp . 80 . 1 : fd00:10:180::4 . 80, 2001:db8:1::4 . tcp . 80 . 0 : fd00:10:180::3 . 80, 2001:db8:1::4 . tcp . 80 . 1 : fd00:10:180::4 . 80 }
add element ip6 proxyd firewall-ips { 2001:db8:1::4 . tcp . 80 }
add element ip6 proxyd firewall-allow { 2001:db8:1::4 . tcp . 80 . 2001:db8:203::/64 }
add element ip6 proxyd service-nodeports { tcp . 3001 : goto np-extl }
add element ip6 proxyd np-pick { tcp . 3001 : goto np-pick-tcp-1 }
add element ip6 proxyd np-backends-tcp { tcp . 3001 . 0 : fd00:10:180::3 . 80 }
add element ip6 proxyd np-short-pick { tcp . 3001 : goto np-short-pick-tcp-2 }
add element ip6 proxyd np-short-backends-tcp { tcp . 3001 . 0 : fd00:10:180::3 . 80, tcp . 3001 . 1 : fd00:10:180::4 . 80 }
add element ip6 proxyd hairpin { fd00:10:180::3 . fd00:10:180::3, fd00:10:180::1 . fd00:10:180::1 }
add element ip6 proxyd canary { :: }
"""


def test_golden_ipv6_full_plan_and_flows() -> None:
    plan = Planner(OPTS6).plan(state(ENTRIES6), None)
    assert plan.full and plan.text == GOLDEN6_FULL
    tracer = Tracer(GOLDEN6_FULL, node_ips=["2001:db8:168::2"])
    assert flow(tracer, src="fd00:10::2", dst="[fd00:172:30::41]:80") == \
        "[fd00:10:180::1]:8080, [fd00:10:180::2]:8080 no-masq"  # type: ignore[arg-type]
    assert flow(tracer, src="fd00:10::2", dst="[fd00:172:30::44]:80") == "[fd00:10:180::5]:80 no-masq"  # type: ignore[arg-type]
    assert flow(tracer, src="2001:db8:203::5", dst="[2001:db8:1::4]:80") == "[fd00:10:180::3]:80 no-masq"  # type: ignore[arg-type]
    assert flow(tracer, src="2001:db8:204::5", dst="[2001:db8:1::4]:80") == "DROP"  # type: ignore[arg-type]
    assert flow(tracer, src="fd00:10::2", dst="[fd00:172:30::43]:53", protocol="udp") == "REJECT"  # type: ignore[arg-type]
    assert flow(tracer, src="2001:db8:168::2", dst="[::1]:3001", local_origin=True) == \
        "[::1]:3001 no-masq"  # type: ignore[arg-type]


def _dual(v4: ServicePort, v6: ServicePort) -> ServicePort:
    """The dual-stack service port whose two families' views are ``v4`` and ``v6``."""
    return replace(v4, secondary_cluster_ip=v6.cluster_ip, external_ips=v6.external_ips + v4.external_ips,
                   load_balancer_ips=v4.load_balancer_ips + v6.load_balancer_ips,
                   load_balancer_source_ranges=v6.load_balancer_source_ranges + v4.load_balancer_source_ranges)


def test_dual_stack_services_give_each_family_its_golden_view() -> None:
    dual = state([(_dual(a, b), ea + eb) for (a, ea), (b, eb) in zip(ENTRIES, ENTRIES6, strict=True)])
    assert Planner(OPTS).plan(dual.for_family(4), None).text == GOLDEN_FULL
    assert Planner(OPTS6).plan(dual.for_family(6), None).text == GOLDEN6_FULL
    # The partial transaction of the IPv4 view is the golden one; the IPv6 view's only touches ip6.
    changed6 = dict(zip((s.name for s, _ in ENTRIES6), (e for _, e in ENTRIES6), strict=True))
    changed6[WEB6.name] = (Endpoint("fd00:10:180::1", 8080, node_name=NODE), Endpoint("fd00:10:180::6", 8080))
    changed6[STICKY6.name] = ()
    moved = state([(_dual(a, b), ea + changed6[b.name]) for (a, ea), (b, _) in zip(CHANGED, ENTRIES6, strict=True)])
    names = frozenset({WEB.name.service, STICKY.name.service})
    for fam, opts, golden in ((4, OPTS, GOLDEN_FULL), (6, OPTS6, GOLDEN6_FULL)):
        planner = Planner(opts)
        planner.commit(planner.plan(dual.for_family(fam), None))
        partial = planner.plan(moved.for_family(fam), names)
        assert not partial.full
        if fam == 4:
            assert partial.text == GOLDEN_PARTIAL
        else:
            assert all(" ip6 proxyd " in line for line in partial.text.splitlines())
            tracer = Tracer(golden, partial.text, node_ips=["2001:db8:168::2"])
            assert flow(tracer, src="fd00:10::2", dst="[fd00:172:30::41]:80") == \
                "[fd00:10:180::1]:8080, [fd00:10:180::6]:8080 no-masq"  # type: ignore[arg-type]
            assert flow(tracer, src="fd00:10::2", dst="[fd00:172:30::44]:80") == "REJECT"  # type: ignore[arg-type]
