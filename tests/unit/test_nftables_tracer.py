"""Packet flows through the nftables planner's ruleset, traced without root: the iptables tracer's cases.

The same services and flows as tests/unit/test_iptables_tracer.py, on the
nftables ruleset; where kube-proxy's nftables mode differs on purpose it is
said so. Each flow is also traced after reaching the same state through a
chain of partial transactions, which must give the same answers.
"""

# Flow tables read best one entry per line.
# ruff: noqa: E501

from __future__ import annotations

import pytest

from proxyd.model import ProxyState, ServiceName
from proxyd.modes.iptables.tracer import flow
from proxyd.modes.nftables.planner import Planner, PlannerOptions
from proxyd.modes.nftables.tracer import Ruleset, Tracer, parse_rule
from tests.unit.test_iptables_tracer import FLOWS as IPTABLES_FLOWS
from tests.unit.test_iptables_tracer import (
    NODE,
    NODE_IP,
    NODE_IPS6,
    OUTSIDE,
    POD,
    SERVICES,
    SERVICES6,
    v6,
    v6_expected,
)

NODE_IPS = [NODE_IP, "172.16.0.1"]


def _state(services=SERVICES) -> ProxyState:
    return ProxyState(service_ports={s.name: s for s, _ in services}, endpoints={s.name: e for s, e in services},
                      node_name=NODE)


def _options(**opts: object) -> PlannerOptions:
    return PlannerOptions(**{"cluster_cidrs": ("10.0.0.0/8",), "node_ip": NODE_IP, **opts})  # type: ignore[arg-type]


def build(**opts: object) -> Tracer:
    return Tracer(Planner(_options(**opts)).plan(_state(), None).text, node_ips=NODE_IPS)


def build_incrementally() -> Tracer:
    """Start from half the services, then add the rest one service per partial plan."""
    planner = Planner(_options())
    first = SERVICES[: len(SERVICES) // 2]
    plan = planner.plan(_state(first), None)
    texts = [plan.text]
    planner.commit(plan)
    for i in range(len(first), len(SERVICES)):
        svc = SERVICES[i][0]
        plan = planner.plan(_state(SERVICES[: i + 1]), frozenset({svc.name.service}))
        assert not plan.full
        texts.append(plan.text)
        planner.commit(plan)
    return Tracer(*texts, node_ips=NODE_IPS)


TRACER = build()
INCREMENTAL = build_incrementally()

# kube-proxy's nftables mode rejects traffic to a ClusterIP port the service does not have
# (cluster-ips-check); its iptables mode lets it through untouched.
NFT_DIFFERENCES = {
    "ClusterIP wrong port goes nowhere special": "REJECT",
}
FLOWS = [(what, src, dst, proto, local, NFT_DIFFERENCES.get(what, expected))
         for what, src, dst, proto, local, expected in IPTABLES_FLOWS]


@pytest.mark.parametrize("what,src,dst,proto,local,expected", FLOWS, ids=[f[0] for f in FLOWS])
def test_flow(what: str, src: str, dst: str, proto: str, local: bool, expected: str) -> None:
    assert flow(TRACER, src=src, dst=dst, protocol=proto, local_origin=local) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("what,src,dst,proto,local,expected", FLOWS, ids=[f[0] for f in FLOWS])
def test_flow_after_partial_syncs(what: str, src: str, dst: str, proto: str, local: bool, expected: str) -> None:
    assert flow(INCREMENTAL, src=src, dst=dst, protocol=proto, local_origin=local) == expected  # type: ignore[arg-type]


def test_masquerade_all() -> None:
    tracer = build(masquerade_all=True)
    assert flow(tracer, src=POD, dst="172.30.0.41:80") == "10.180.0.1:80 masq"  # type: ignore[arg-type]


def test_without_cluster_cidr_nothing_internal_is_masqueraded() -> None:
    tracer = build(cluster_cidrs=())
    assert flow(tracer, src="192.168.0.99", dst="172.30.0.41:80") == "10.180.0.1:80 no-masq"  # type: ignore[arg-type]
    assert flow(tracer, src="10.180.0.1", dst="172.30.0.41:80") == "10.180.0.1:80 masq"  # type: ignore[arg-type]


def test_nodeport_addresses_limit_nodeports() -> None:
    tracer = build(nodeport_addresses=("192.168.0.0/24",), node_ips=(NODE_IP,))
    assert flow(tracer, src=OUTSIDE, dst=f"{NODE_IP}:3012").startswith("10.180.0.17:80")  # type: ignore[arg-type]
    assert flow(tracer, src=OUTSIDE, dst="172.16.0.1:3012") == "172.16.0.1:3012 no-masq"  # type: ignore[arg-type]


def test_removing_every_service_leaves_only_the_fixed_layout() -> None:
    planner = Planner(_options())
    plan = planner.plan(_state(), None)
    planner.commit(plan)
    gone = frozenset(ServiceName(s.name.namespace, s.name.name) for s, _ in SERVICES)
    second = planner.plan(ProxyState(node_name=NODE), gone)
    planner.commit(second)
    third = planner.plan(ProxyState(node_name=NODE), frozenset())
    tracer = Tracer(plan.text, second.text, third.text, node_ips=NODE_IPS)
    assert {name: elements for name, elements in tracer.ruleset.sets.items() if elements} == \
        {"canary": {"0.0.0.0": None}}
    assert not [c for c in tracer.ruleset.chains if c.startswith(("svc-pick-", "np-", "sticky-", "endpoint-"))
                and c not in ("np-ext", "np-extl", "np-short")]
    assert flow(tracer, src=POD, dst="172.30.0.41:80") == "172.30.0.41:80 no-masq"  # type: ignore[arg-type]


def test_tracer_refuses_what_it_does_not_understand() -> None:
    with pytest.raises(ValueError):
        parse_rule("meta skuid 0 accept")
    with pytest.raises(ValueError):
        Ruleset().load("add rule ip proxyd nowhere drop\n")
    with pytest.raises(ValueError):
        Ruleset().load("insert rule ip proxyd x drop\n")
    loop = Tracer("add table ip proxyd\nadd chain ip proxyd pre { type nat hook prerouting priority -100 ; }\n"
                  "add chain ip proxyd a\nadd rule ip proxyd pre jump a\nadd rule ip proxyd a jump a\n",
                  node_ips=[])
    with pytest.raises(ValueError):
        loop.trace(src=POD, dst="1.1.1.1", port=1)
    short = Tracer("add table ip proxyd\nadd chain ip proxyd pre { type nat hook prerouting priority -100 ; }\n"
                   "add map ip proxyd b { typeof ip daddr . meta l4proto . th dport . numgen random mod 2 : "
                   "ip daddr . tcp dport ; }\n"
                   "add rule ip proxyd pre dnat ip addr . port to ip daddr . meta l4proto . th dport . "
                   "numgen random mod 2 map @b\n"
                   "add element ip proxyd b { 1.1.1.1 . tcp . 1 . 0 : 10.0.0.1 . 80 }\n", node_ips=[])
    with pytest.raises(ValueError):
        short.trace(src=POD, dst="1.1.1.1", port=1)


# -- IPv6: every flow above on the ip6 table (the iptables tracer tests' mapping to IPv6) ----------------

FLOWS6 = [(what, v6(src), v6(dst), proto, local, v6_expected(expected))
          for what, src, dst, proto, local, expected in FLOWS]


def _options6(**opts: object) -> PlannerOptions:
    return PlannerOptions(**{"family": 6, "cluster_cidrs": ("10.0.0.0/8", v6("10.0.0.0/8")),  # type: ignore[arg-type]
                             "node_ip": v6(NODE_IP), **opts})


def build6_incrementally() -> Tracer:
    planner = Planner(_options6())
    first = SERVICES6[: len(SERVICES6) // 2]
    plan = planner.plan(_state(first), None)
    texts = [plan.text]
    planner.commit(plan)
    for i in range(len(first), len(SERVICES6)):
        plan = planner.plan(_state(SERVICES6[: i + 1]), frozenset({SERVICES6[i][0].name.service}))
        assert not plan.full
        texts.append(plan.text)
        planner.commit(plan)
    return Tracer(*texts, node_ips=NODE_IPS6)


TRACER6 = Tracer(Planner(_options6()).plan(_state(SERVICES6), None).text, node_ips=NODE_IPS6)
INCREMENTAL6 = build6_incrementally()


@pytest.mark.parametrize("what,src,dst,proto,local,expected", FLOWS6, ids=[f[0] for f in FLOWS6])
def test_ipv6_flow(what: str, src: str, dst: str, proto: str, local: bool, expected: str) -> None:
    assert flow(TRACER6, src=src, dst=dst, protocol=proto, local_origin=local) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("what,src,dst,proto,local,expected", FLOWS6, ids=[f[0] for f in FLOWS6])
def test_ipv6_flow_after_partial_syncs(what: str, src: str, dst: str, proto: str, local: bool,
                                       expected: str) -> None:
    assert flow(INCREMENTAL6, src=src, dst=dst, protocol=proto, local_origin=local) == expected  # type: ignore[arg-type]


def test_ipv6_table_only() -> None:
    text = Planner(_options6()).plan(_state(SERVICES + SERVICES6), None).text
    assert all(" ip6 proxyd" in line for line in text.splitlines() if line.startswith(("add ", "flush ", "delete ")))
    assert "172.30." not in text and "ipv4_addr" not in text and "ipv6_addr" in text
