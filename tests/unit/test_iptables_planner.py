"""iptables planner: golden rule text (kube-proxy's), partial syncs, hostile input, helpers around it."""

# Golden rule text and flow tables read best one entry per line.
# ruff: noqa: E501

from __future__ import annotations

import asyncio
import dataclasses
import re
import shlex
from functools import partial

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
from proxyd.modes.iptables import chains as ch
from proxyd.modes.iptables.conntrack import Flow, stale_flows
from proxyd.modes.iptables.planner import (
    NODEPORTS_COMMENT,
    Planner,
    PlannerOptions,
    compute_probability,
    render_port,
)
from proxyd.modes.iptables.tracer import parse
from proxyd.netfilter import Jump
from proxyd.netfilter.backend import Backend, chains_of, choose
from tests.builders import service_port, state

NODE = "node1"


sp = partial(service_port, port_name="p80")


OPTS = PlannerOptions(cluster_cidrs=("10.0.0.0/8",), node_ip="192.168.0.2", random_fully=False)

SVC1 = sp("svc1", "172.30.0.41", namespace="ns1")
SVC2 = sp("svc2", "172.30.0.42", namespace="ns2", type=ServiceType.LOAD_BALANCER, node_port=3001,
          external_ips=("192.168.99.22",), load_balancer_ips=("1.2.3.4",),
          load_balancer_source_ranges=("203.0.113.0/25",), external_policy_local=True,
          health_check_node_port=30000)
SVC3 = sp("svc3", "172.30.0.43", namespace="ns3", node_port=3003, type=ServiceType.NODE_PORT)
GOLDEN_STATE = state(
    (SVC1, (Endpoint("10.180.0.1", 80),)),
    (SVC2, (Endpoint("10.180.0.2", 80, node_name=NODE), Endpoint("10.180.0.3", 80, node_name="node2"))),
    (SVC3, ()),
)

GOLDEN = """\
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns3/svc3:p80 has no endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3003 -j REJECT
-A KUBE-PROXY-FIREWALL -m comment --comment "ns2/svc2:p80 traffic not accepted by KUBE-FW-GNZBNJ2PO5MGZ6GT" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-FW-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVL-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-SEP-2GOKER2KF7NAANZN - [0:0]
:KUBE-SEP-STALE0000000000 - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-FW-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -j KUBE-SVL-GNZBNJ2PO5MGZ6GT
-A KUBE-FW-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-FW-GNZBNJ2PO5MGZ6GT -m comment --comment "other traffic to ns2/svc2:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.3:80" -j KUBE-SEP-2GOKER2KF7NAANZN
-A KUBE-SVL-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-2GOKER2KF7NAANZN -m comment --comment ns2/svc2:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-2GOKER2KF7NAANZN -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-X KUBE-SEP-STALE0000000000
COMMIT
"""


def test_golden_full_plan() -> None:
    plan = Planner(OPTS).plan(GOLDEN_STATE, None,
                              existing_chains=["KUBE-SEP-STALE0000000000", "CNI-FOO", "KUBE-SERVICES"])
    assert plan.text == GOLDEN
    assert plan.full and plan.deleted_chains == ("KUBE-SEP-STALE0000000000",)


def test_plan_is_deterministic_whatever_the_insertion_order() -> None:
    entries = [(SVC3, ()), (SVC1, (Endpoint("10.180.0.1", 80),)),
               (SVC2, GOLDEN_STATE.endpoints[SVC2.name])]
    reordered = state(*entries)
    assert Planner(OPTS).plan(reordered, None).text == Planner(OPTS).plan(GOLDEN_STATE, None).text


def test_kube_proxy_chain_names() -> None:
    # Values from kube-proxy's proxier_test.go.
    name = ServicePortName("ns1", "svc1", "p80", Protocol.TCP)
    assert ch.svc_chain(name) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert ch.sep_chain(name, Endpoint("10.180.0.1", 80)) == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert ch.ext_chain(name) == "KUBE-EXT-XPGD46QRK7WJZT7O"
    assert ch.fw_chain(name) == "KUBE-FW-XPGD46QRK7WJZT7O"
    assert ch.svl_chain(name) == "KUBE-SVL-XPGD46QRK7WJZT7O"
    udp = ServicePortName("ns1", "svc1", "p80", Protocol.UDP)
    assert ch.svc_chain(udp) != ch.svc_chain(name)
    unnamed = ServicePortName("ns1", "svc1", "", Protocol.TCP)
    assert ch.svc_chain(unnamed) == ch.SVC_PREFIX + ch._hash16("ns1/svc1tcp")
    assert all(len(ch.sep_chain(name, f"10.0.0.{i}:80")) <= 28 for i in range(50))


def test_probability_formatting() -> None:
    assert compute_probability(2) == "0.5000000000"
    assert compute_probability(3) == "0.3333333333"
    assert compute_probability(1000) == "0.0010000000"


def test_random_spread_over_n_endpoints() -> None:
    eps = tuple(Endpoint(f"10.180.0.{i}", 80) for i in range(1, 5))
    r = render_port(SVC1, eps, options=OPTS, node_name=NODE, node_zone=None, large=False)
    probs = [re.search(r"--probability (\S+)", line) for line in r.chain_rules if "-> " in line]
    assert [m.group(1) if m else None for m in probs] == ["0.2500000000", "0.3333333333", "0.5000000000", None]


def test_session_affinity_rules() -> None:
    svc = sp("svc1", "172.30.0.41", namespace="ns1", affinity_timeout=10800)
    r = render_port(svc, (Endpoint("10.180.0.1", 80),), options=OPTS, node_name=NODE, node_zone=None,
                    large=False)
    assert ('-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m recent '
            "--name KUBE-SEP-SXIVWICOYRO3J4NJ --rcheck --seconds 10800 --reap -j KUBE-SEP-SXIVWICOYRO3J4NJ"
            ) in r.chain_rules
    assert ("-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m recent --name "
            "KUBE-SEP-SXIVWICOYRO3J4NJ --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80"
            ) in r.chain_rules


def test_masquerade_all_and_no_cluster_cidr() -> None:
    eps = (Endpoint("10.180.0.1", 80),)
    r = render_port(SVC1, eps, options=PlannerOptions(masquerade_all=True), node_name=NODE, node_zone=None,
                    large=False)
    assert r.chain_rules[0].endswith("--dport 80 -j KUBE-MARK-MASQ")
    r = render_port(SVC1, eps, options=PlannerOptions(), node_name=NODE, node_zone=None, large=False)
    assert not any("cluster IP" in line and "MARK-MASQ" in line for line in r.chain_rules)


def test_masquerade_bit() -> None:
    text = Planner(PlannerOptions(masquerade_bit=3)).plan(GOLDEN_STATE, None).text
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x8\n" in text
    assert "--mark 0x8/0x8 -j ACCEPT" in text
    with pytest.raises(ValueError):
        PlannerOptions(masquerade_bit=32)


def test_nodeport_addresses_give_one_tail_rule_per_node_ip() -> None:
    opts = PlannerOptions(nodeport_addresses=("192.168.0.0/16",), node_ips=("192.168.0.2", "127.0.0.1"))
    text = Planner(opts).plan(GOLDEN_STATE, None).text
    tails = [line for line in text.splitlines() if "-j KUBE-NODEPORTS" in line]
    assert tails == ['-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be '
                     'the last rule in this chain" -d 192.168.0.2 -j KUBE-NODEPORTS']


def test_conntrack_liberal_drops_invalid_rule() -> None:
    text = Planner(PlannerOptions(conntrack_liberal=True)).plan(GOLDEN_STATE, None).text
    assert "INVALID" not in text


def test_large_cluster_mode_drops_endpoint_comments() -> None:
    eps = tuple(Endpoint(f"10.{i // 250}.{i % 250}.1", 80) for i in range(1001))
    plan = Planner(OPTS).plan(state((SVC1, eps)), None)
    assert plan.large
    sep = [line for line in plan.text.splitlines() if line.startswith("-A KUBE-SEP-")]
    assert len(sep) == 2002 and not any("comment" in line for line in sep)
    assert "-m statistic --mode random --probability 0.0009990010" in plan.text


def test_family_filter() -> None:
    v6 = sp("v6", "fd00::41", namespace="ns6")
    svc = sp("svc1", "172.30.0.41", namespace="ns1", external_ips=("192.168.99.1", "fd00::99"))
    st = state((svc, (Endpoint("10.180.0.1", 80), Endpoint("fd00::1", 80))), (v6, (Endpoint("fd00::2", 80),)))
    text4 = Planner(OPTS).plan(st, None).text
    assert "fd00" not in text4 and "192.168.99.1" in text4
    text6 = Planner(PlannerOptions(family=6)).plan(st, None).text
    assert "172.30" not in text6 and "--to-destination [fd00::2]:80" in text6
    assert "! -d ::1/128" in text6
    with pytest.raises(ValueError):
        PlannerOptions(family=5)


def test_hostile_names_cannot_escape_the_comment() -> None:
    bad = ServicePortName('ns"; -j ACCEPT', "a\nb\r-A INPUT -j DROP", "p\x00", Protocol.TCP)
    svc = ServicePort(name=bad, type=ServiceType.CLUSTER_IP, cluster_ip="172.30.0.9", port=80,
                      protocol=Protocol.TCP)
    text = Planner(OPTS).plan(state((svc, ()), (SVC1, (Endpoint("10.180.0.1", 80),))), None).text
    for line in text.splitlines():
        assert "\r" not in line and "\x00" not in line
        assert line.count('"') % 2 == 0
    for line in text.splitlines():
        argv = shlex.split(line)
        assert "INPUT" not in argv and argv.count("-j") <= 1 and argv.count("-A") <= 1
    assert len(text.splitlines()) == len(Planner(OPTS).plan(state(
        (sp("y", "172.30.0.9", namespace="x"), ()), (SVC1, (Endpoint("10.180.0.1", 80),))), None).text.splitlines())


@pytest.mark.parametrize("field,value", [("cluster_ip", "1.2.3.4 -j ACCEPT"), ("external_ips", ("1.2.3.4/0",)),
                                         ("load_balancer_source_ranges", ("0.0.0.0/0 -j ACCEPT",))])
def test_hostile_addresses_are_refused(field: str, value: object) -> None:
    kwargs = {"external_ips": ("192.168.99.1",), "load_balancer_ips": ("1.2.3.4",)}
    kwargs[field] = value
    svc = ServicePort(name=SVC1.name, type=ServiceType.LOAD_BALANCER,
                      cluster_ip=kwargs.pop("cluster_ip", "172.30.0.41"), port=80, protocol=Protocol.TCP,
                      **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Planner(OPTS).plan(state((svc, (Endpoint("10.180.0.1", 80),))), None)


def _simulate(*texts: str) -> dict[str, dict[str, list]]:
    return parse("".join(texts))


def _normalise(tables: dict[str, dict[str, list]]) -> dict[tuple[str, str], list]:
    out = {}
    for table, chains in tables.items():
        for chain, rules in chains.items():
            if chain in (ch.KUBE_SERVICES, ch.KUBE_NODEPORTS) and table == "nat":
                tail = [r for r in rules if r.target == ch.KUBE_NODEPORTS]
                assert not tail or rules[-1] == tail[-1], "nodeport jump must stay last"
                out[(table, chain)] = sorted(map(repr, rules))
            else:
                out[(table, chain)] = list(map(repr, rules))
    return out


def _bump(st: ProxyState, **changes: tuple[ServicePort, tuple[Endpoint, ...]] | None) -> ProxyState:
    services = dict(st.service_ports)
    endpoints = dict(st.endpoints)
    for key, val in changes.items():
        name = {"svc1": SVC1.name, "svc2": SVC2.name, "svc3": SVC3.name}.get(key)
        if val is None:
            services.pop(name, None)
            endpoints.pop(name, None)
        else:
            services[val[0].name] = val[0]
            endpoints[val[0].name] = val[1]
    return ProxyState(service_ports=services, endpoints=endpoints, node_name=NODE)


PARTIAL_CASES = {
    "endpoint added": ({"svc1": (SVC1, (Endpoint("10.180.0.1", 80), Endpoint("10.180.0.9", 80)))}, {"ns1"}),
    "endpoint removed": ({"svc2": (SVC2, (Endpoint("10.180.0.3", 80, node_name="node2"),))}, {"ns2"}),
    "service removed": ({"svc1": None}, {"ns1"}),
    "first endpoint": ({"svc3": (SVC3, (Endpoint("10.180.0.7", 80),))}, {"ns3"}),
    "new service": ({"new": (sp("svc4", "172.30.0.44", namespace="ns4", node_port=3004), (Endpoint("10.1.1.1", 80),))},
                    {"ns4"}),
    "ip changed": ({"svc1": (sp("svc1", "172.30.0.99", namespace="ns1"), (Endpoint("10.180.0.1", 80),))}, {"ns1"}),
    "nothing really changed": ({}, {"ns1", "ns2"}),
}


@pytest.mark.parametrize("case", sorted(PARTIAL_CASES))
def test_partial_plan_reaches_the_same_rules_as_a_full_one(case: str) -> None:
    changes, namespaces = PARTIAL_CASES[case]
    planner = Planner(OPTS)
    first = planner.plan(GOLDEN_STATE, None)
    planner.commit(first)
    new_state = _bump(GOLDEN_STATE, **changes)
    changed = frozenset(n.service for n in set(new_state.service_ports) | set(GOLDEN_STATE.service_ports)
                        if n.namespace in namespaces)
    partial = planner.plan(new_state, changed)
    assert not partial.full
    full = Planner(OPTS).plan(new_state, None)
    assert _normalise(_simulate(first.text, partial.text)) == _normalise(_simulate(full.text))
    # Declaring a chain flushes it: unchanged services' chains must not appear.
    unchanged = [c for n, r in first.cache.items() if n.namespace not in namespaces for c in r.chains]
    assert not any(f":{c} " in partial.text for c in unchanged)
    planner.commit(partial)
    # And a second partial sync from there still agrees.
    again = planner.plan(GOLDEN_STATE, changed)
    assert _normalise(_simulate(first.text, partial.text, again.text)) == _normalise(_simulate(first.text))


def test_partial_cost_is_proportional_to_the_change() -> None:
    entries = [(sp(f"s{i}", f"172.30.{i // 250}.{i % 250}", namespace="ns"), (Endpoint(f"10.1.{i // 250}.{i % 250}", 80),))
               for i in range(2000)]
    st = state(*entries)
    planner = Planner(OPTS)
    planner.commit(planner.plan(st, None))
    svc, _ = entries[7]
    st2 = ProxyState(service_ports=st.service_ports, endpoints={**st.endpoints, svc.name: (Endpoint("10.9.9.9", 80),)},
                     node_name=NODE)
    plan = planner.plan(st2, frozenset({svc.name.service}))
    assert len(plan.text.splitlines()) < 40
    assert plan.rerendered == frozenset({svc.name})


def test_uncommitted_plan_leaves_the_cache_alone_and_invalidate_forces_full() -> None:
    planner = Planner(OPTS)
    assert planner.needs_full
    planner.commit(planner.plan(GOLDEN_STATE, None))
    assert not planner.needs_full
    before = dict(planner.cache)
    planner.plan(_bump(GOLDEN_STATE, svc1=None), frozenset({SVC1.name.service}))  # never committed
    assert dict(planner.cache) == before
    planner.invalidate()
    assert planner.plan(GOLDEN_STATE, frozenset()).full


def test_changing_large_mode_or_tail_forces_full() -> None:
    planner = Planner(OPTS)
    planner.commit(planner.plan(GOLDEN_STATE, None))
    planner.set_node_ips(["192.168.0.2"])  # no effect without --nodeport-addresses
    assert not planner.plan(GOLDEN_STATE, frozenset()).full
    eps = tuple(Endpoint(f"10.{i // 250}.{i % 250}.1", 80) for i in range(1001))
    assert planner.plan(_bump(GOLDEN_STATE, svc1=(SVC1, eps)), frozenset({SVC1.name.service})).full


def test_jump_rules_match_kube_proxy() -> None:
    assert ch.jump_rules_text("nat") == [
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    ]
    assert len(ch.jump_rules_text("filter")) == 9
    assert Jump("nat", "OUTPUT", "T", "x y").args() == ["-m", "comment", "--comment", "x y", "-j", "T"]


def test_backend_choice_follows_iptables_wrapper() -> None:
    hint = ":KUBE-IPTABLES-HINT - [0:0]\n"
    many = "*nat\n" + "-A X -j Y\n" * 20
    assert choose(nft_mangle=hint, legacy_save=many, nft_save="") == "nft"
    assert choose(nft_mangle="", legacy_save="*mangle\n:KUBE-KUBELET-CANARY - [0:0]\n", nft_save=many) == "legacy"
    assert choose(nft_mangle="", legacy_save=many, nft_save="-A X\n") == "legacy"
    assert choose(nft_mangle="", legacy_save="-A X\n", nft_save="-A X\n") == "nft"
    assert choose(nft_mangle="garbage\x00\n" * 100, legacy_save="", nft_save="") == "nft"
    assert Backend("legacy").restore[:3] == ["iptables-legacy-restore", "--noflush", "--counters"]
    assert Backend("nft", 6).save == ["ip6tables-nft-save"]
    with pytest.raises(ValueError):
        Backend("ebtables")


def test_backend_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxyd.netfilter.backend import detect

    assert detect(environ={"PROXYD_IPTABLES_BACKEND": "legacy"}).name == "legacy"
    assert detect(environ={"PROXYD_IPTABLES_BACKEND": " NFT "}).name == "nft"
    with pytest.raises(ValueError):
        detect(environ={"PROXYD_IPTABLES_BACKEND": "pf"})


def test_chains_of_save_output() -> None:
    text = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*nat\n:KUBE-SVC-X - [1:2]\n:junk\nCOMMIT\n"
    assert chains_of(text, "nat") == {"KUBE-SVC-X", "junk"}
    assert chains_of(text, "filter") == {"INPUT", "KUBE-SERVICES"}
    assert chains_of("\x00" * 1000 + "\n:::\n", "nat") == set()


def test_stale_udp_flows() -> None:
    udp = sp("dns", "172.30.0.10", namespace="ns1", port_name="dns", port=53, protocol=Protocol.UDP, node_port=30053,
             external_ips=("192.168.99.10",))
    tcp = sp("dns", "172.30.0.10", namespace="ns1", port_name="dns-tcp", port=53, protocol=Protocol.TCP)
    e1, e2 = Endpoint("10.180.0.1", 53), Endpoint("10.180.0.2", 53)

    def rendered(svc: ServicePort, eps: tuple[Endpoint, ...]):
        return render_port(svc, eps, options=OPTS, node_name=NODE, node_zone=None, large=False)

    old_ports = {udp.name: udp, tcp.name: tcp}
    old = {udp.name: rendered(udp, (e1, e2)), tcp.name: rendered(tcp, (e1, e2))}
    new = {udp.name: rendered(udp, (e2,)), tcp.name: rendered(tcp, (e2,))}
    flows = stale_flows([udp.name, tcp.name], old_ports=old_ports, old_renders=old, new_ports=old_ports,
                        new_renders=new)
    assert flows == [Flow(None, 30053, "10.180.0.1"), Flow("172.30.0.10", 53, "10.180.0.1"),
                     Flow("192.168.99.10", 53, "10.180.0.1")]
    # First endpoint after rejecting: entries towards the service go, whatever their target.
    empty = {udp.name: rendered(udp, ())}
    flows = stale_flows([udp.name], old_ports=old_ports, old_renders=empty, new_ports=old_ports,
                        new_renders={udp.name: rendered(udp, (e1,))})
    assert Flow("172.30.0.10", 53, None) in flows and Flow(None, 30053, None) in flows
    # Service removed: every endpoint it had is stale.
    flows = stale_flows([udp.name], old_ports=old_ports, old_renders=old, new_ports={}, new_renders={})
    assert {f.nat_ip for f in flows} == {"10.180.0.1", "10.180.0.2"}
    assert Flow("172.30.0.10", 53, "10.180.0.1").matches("172.30.0.10", 53, "10.180.0.1")
    assert not Flow("172.30.0.10", 53, "10.180.0.1").matches("172.30.0.10", 54, "10.180.0.1")
    assert Flow(None, 30053, None).matches("1.1.1.1", 30053, "9.9.9.9")


def test_service_name_key_is_kube_proxy_string() -> None:
    assert str(ServicePortName("a", "b", "", Protocol.TCP)) == "a/b"
    assert ServiceName("a", "b") == SVC1.name.service.__class__("a", "b")


class FakeApplier:
    """Records restores; fails them on demand. Stands in for the kernel in mode-level tests."""

    def __init__(self) -> None:
        self.restored: list[str] = []
        self.fail = False
        self.canary = True
        self.jumps = 0
        self.checks = 0

    async def ensure_canaries(self) -> None:
        self.canary = True

    async def ensure_jumps(self) -> None:
        self.jumps += 1

    async def missing(self) -> list[str]:
        self.checks += 1
        return [] if self.canary else ["nat KUBE-PROXY-CANARY"]

    async def chains(self, table: str) -> set[str]:
        return {"KUBE-SEP-LEFTOVER0000000"} if table == "nat" else set()

    async def restore(self, text: str) -> None:
        if self.fail:
            from proxyd.netfilter.backend import IptablesError

            raise IptablesError(["iptables-restore"], 1, "line 7 failed")
        self.restored.append(text)


def _mode_with(fake: FakeApplier, clock=lambda: 0.0):
    from proxyd.config import Config
    from proxyd.modes.iptables import IptablesMode

    mode = IptablesMode(Config(cluster_cidrs=("10.0.0.0/8",), sync_period=30.0), clock=clock)
    mode.applier = fake  # type: ignore[assignment]
    return mode


@pytest.mark.parametrize("code", [4, None])  # the xtables lock held past -w 5; the tool timed out
def test_a_held_xtables_lock_at_start_is_not_fatal_the_first_sync_creates_the_canaries(monkeypatch, code) -> None:
    import asyncio

    from proxyd.modes.base import SyncRequest
    from proxyd.modes.iptables import mode as iptables_mode
    from proxyd.netfilter import Backend
    from proxyd.netfilter.backend import IptablesError

    class Locked(FakeApplier):
        def __init__(self, backend: Backend) -> None:
            super().__init__()
            self.canaries = 0
            self.locked = True

        async def ensure_canaries(self) -> None:
            if self.locked:
                raise IptablesError(["iptables-nft", "-w", "5"], code, "Can't lock /run/xtables.lock")
            self.canaries += 1

    monkeypatch.setattr(iptables_mode, "Applier", Locked)
    monkeypatch.setattr(iptables_mode, "_node_addresses", lambda cidrs, family: ([], None))
    from proxyd.config import Config

    mode = iptables_mode.IptablesMode(Config(cluster_cidrs=("10.0.0.0/8",)), backend=Backend("nft"))

    async def scenario() -> None:
        await mode.start()
        applier = mode.applier
        assert isinstance(applier, Locked) and applier.canaries == 0
        applier.locked = False
        await mode.sync(SyncRequest(GOLDEN_STATE, None))
        assert applier.canaries == 1 and applier.restored

    asyncio.run(scenario())
    # Any other failure of the start is still the start's failure.
    monkeypatch.setattr(iptables_mode, "Applier", type("Broken", (Locked,), {"ensure_canaries": _refuse}))
    with pytest.raises(IptablesError, match="exited 1"):
        asyncio.run(iptables_mode.IptablesMode(Config(), backend=Backend("nft")).start())


async def _refuse(self) -> None:
    from proxyd.netfilter.backend import IptablesError

    raise IptablesError(["iptables-nft"], 1, "Permission denied")


def test_mode_full_then_partial_then_failure_then_full() -> None:
    import asyncio

    from proxyd import metrics
    from proxyd.modes.base import SyncRequest

    fake = FakeApplier()
    now = [0.0]
    mode = _mode_with(fake, clock=lambda: now[0])
    failures = metrics.IPTABLES_RESTORE_FAILURES._value.get()
    repairs = metrics.NETFILTER_REPAIRS.labels(mode="iptables")._value.get()
    partial_failures = metrics.IPTABLES_PARTIAL_RESTORE_FAILURES._value.get()

    async def scenario() -> None:
        await mode.sync(SyncRequest(GOLDEN_STATE, None))
        assert "-X KUBE-SEP-LEFTOVER0000000" in fake.restored[-1] and fake.jumps == 1
        changed = _bump(GOLDEN_STATE, svc1=(SVC1, (Endpoint("10.180.0.9", 80),)))
        await mode.sync(SyncRequest(changed, frozenset({SVC1.name.service})))
        assert mode.last_plan is not None and not mode.last_plan.full and fake.jumps == 1
        good_cache = dict(mode.planner.cache)
        fake.fail = True
        with pytest.raises(RuntimeError):
            await mode.sync(SyncRequest(GOLDEN_STATE, frozenset({SVC1.name.service})))
        # the kernel still holds what the cache says, and the next sync is full
        assert dict(mode.planner.cache) == good_cache and mode.planner.needs_full
        fake.fail = False
        await mode.sync(SyncRequest(GOLDEN_STATE, frozenset({SVC1.name.service})))
        assert mode.last_plan is not None and mode.last_plan.full and fake.jumps == 2
        # within a sync period of the last full sync nothing is checked
        fake.canary = False
        await mode.sync(SyncRequest(GOLDEN_STATE, frozenset()))
        assert not mode.last_plan.full and fake.checks == 0
        # a sync period later the check runs: the canary vanishing turns it into a full sync
        now[0] = 30.0
        await mode.sync(SyncRequest(GOLDEN_STATE, frozenset()))
        assert mode.last_plan.full and fake.jumps == 3 and fake.checks == 1
        # all present again: checked once per period, partial syncs stay partial
        fake.canary = True
        now[0] = 45.0
        await mode.sync(SyncRequest(GOLDEN_STATE, frozenset()))
        assert not mode.last_plan.full and fake.checks == 1
        now[0] = 61.0
        await mode.sync(SyncRequest(GOLDEN_STATE, frozenset()))
        assert not mode.last_plan.full and fake.checks == 2

    asyncio.run(scenario())
    assert metrics.IPTABLES_RESTORE_FAILURES._value.get() == failures + 1
    assert metrics.IPTABLES_PARTIAL_RESTORE_FAILURES._value.get() == partial_failures + 1
    assert metrics.NETFILTER_REPAIRS.labels(mode="iptables")._value.get() == repairs + 1


def test_chunked_full_plan_gives_the_same_rules_in_self_consistent_transactions() -> None:
    entries = [(sp(f"s{i}", f"172.30.0.{i}", namespace="ns", node_port=30000 + i, type=ServiceType.NODE_PORT),
                tuple(Endpoint(f"10.1.{i}.{j}", 80) for j in range(1, 4))) for i in range(1, 40)]
    st = state(*entries, (SVC3, ()))
    opts = dataclasses.replace(OPTS, chunk_rules=30)
    chunked = Planner(opts).plan(st, None, existing_chains=["KUBE-SVC-GONE000000000000"])
    whole = Planner(OPTS).plan(st, None, existing_chains=["KUBE-SVC-GONE000000000000"])
    assert len(chunked.chunks) > 5 and whole.chunks == [whole.text]
    assert _normalise(parse(chunked.text)) == _normalise(parse(whole.text))
    # Each service's chains are declared (flushed) and refilled in one transaction.
    for name, r in chunked.cache.items():
        if not r.chains:
            continue
        holders = [c for c in chunked.chunks if f":{r.chains[0]} " in c]
        assert len(holders) == 1, name
        lines = holders[0].splitlines()
        for chain, count in zip(r.chains, r.chain_counts, strict=True):
            assert sum(1 for line in lines if line.startswith(f"-A {chain} ")) == count, (name, chain)
    # The jumps into them, and the deletes of stale chains, come last; KUBE-MARK-MASQ first.
    assert "-A KUBE-SERVICES" in chunked.chunks[-1] and "-X KUBE-SVC-GONE000000000000" in chunked.chunks[-1]
    assert not any("-A KUBE-SERVICES" in c or "-X " in c for c in chunked.chunks[:-1])
    assert chunked.chunks[0].startswith("*nat\n:KUBE-MARK-MASQ - [0:0]\n")


def test_tool_runner_argv_stdin_errors_and_time_limit() -> None:
    import asyncio

    from proxyd.netfilter.backend import IptablesError, run

    async def scenario() -> None:
        big = "x" * (8 << 20)  # a restore input of 10k services is ~30 MB
        assert len(await run(["cat"], stdin=big)) == len(big)
        assert await run(["echo", "a b; rm -rf /"]) == "a b; rm -rf /\n"  # argv, never a shell
        with pytest.raises(IptablesError) as err:
            await run(["sh", "-c", "echo oops >&2; exit 3"])
        assert err.value.returncode == 3 and "oops" in err.value.stderr
        with pytest.raises(IptablesError, match="timed out"):
            await run(["sleep", "5"], time_limit=0.2)
        with pytest.raises(OSError):
            await run(["/nonexistent/iptables-restore"])

    asyncio.run(scenario())


def test_a_tool_runs_in_its_own_session_and_dies_with_a_cancelled_caller(tmp_path) -> None:
    """A signal to the daemon's process group is not the tool's; a caller that gives up takes it along."""
    import asyncio
    import os

    from proxyd.netfilter.backend import run

    marker = tmp_path / "ids"

    async def scenario() -> int:
        task = asyncio.create_task(run(["sh", "-c", f"echo $$ > {marker}.tmp; mv {marker}.tmp {marker}; "
                                        "exec sleep 30"]))
        for _ in range(1000):  # bounded: the shell writes its ids at once
            if marker.exists():
                break
            await asyncio.sleep(0.01)
        pid = int(marker.read_text())
        assert os.getsid(pid) == pid != os.getsid(0)  # the tool leads a session of its own
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pid

    pid = asyncio.run(scenario())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(pid, 0)


def test_cleanup_inputs_flush_every_chain_before_deleting_any() -> None:
    from proxyd.netfilter import cleanup_inputs

    victims = [f"KUBE-SEP-{i:04d}" for i in range(10)]
    (single,) = cleanup_inputs("nat", victims, 0)
    lines = single.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert lines[1:-1] == [f":{c} - [0:0]" for c in victims] + [f"-X {c}" for c in victims]

    chunks = cleanup_inputs("nat", victims, 4)
    assert len(chunks) == 6  # 10 flushes and 10 deletes, four lines a transaction
    bodies = [c.splitlines() for c in chunks]
    assert all(b[0] == "*nat" and b[-1] == "COMMIT" and len(b) - 2 <= 4 for b in bodies)
    order = [line for b in bodies for line in b[1:-1]]
    assert order == lines[1:-1]
    assert cleanup_inputs("nat", [], 4) == []

    unjump = ["-D PREROUTING -j KUBE-SERVICES", "-D OUTPUT -j KUBE-SERVICES"]
    (single,) = cleanup_inputs("nat", victims[:2], 0, first=unjump)
    assert single.splitlines()[1:-1] == [*unjump, *(f":{c} - [0:0]" for c in victims[:2]),
                                         *(f"-X {c}" for c in victims[:2])]
    chunks = cleanup_inputs("nat", victims[:2], 4, first=unjump)
    assert [c.splitlines()[1:-1] for c in chunks] == [unjump, [f":{c} - [0:0]" for c in victims[:2]],
                                                      [f"-X {c}" for c in victims[:2]]]
    assert cleanup_inputs("nat", [], 0, first=unjump) == ["*nat\n" + "\n".join(unjump) + "\nCOMMIT\n"]


_SAVED = """# Generated by iptables-nft-save
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-AAAA - [0:0]
:USER-CHAIN - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -j USER-CHAIN
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "not ours" -j KUBE-SERVICES
-A KUBE-SERVICES -j KUBE-SVC-AAAA
COMMIT
"""


def _fake_iptables(monkeypatch: pytest.MonkeyPatch, *, saved: str = "", listings: dict[str, str] | None = None,
                   fail_restore: bool = False) -> list[list[str]]:
    """The iptables tools as ``proxyd.netfilter.tables`` runs them: ``-save`` prints ``saved``, ``-S CHAIN``
    answers from ``listings`` ("TABLE CHAIN" -> text), ``-C``, ``-D`` and ``-N`` fail; each call is
    recorded as its argv, then its stdin if it had one."""
    listings = listings or {}
    from proxyd.netfilter import tables
    from proxyd.netfilter.backend import IptablesError

    calls: list[list[str]] = []

    async def run(argv: list[str], *, stdin: str | None = None, time_limit: float = 0) -> str:
        calls.append([*argv, *([stdin] if stdin is not None else [])])
        if argv[0].endswith("-save"):
            return saved
        if argv[0].endswith("-restore"):
            if fail_restore:
                raise IptablesError(argv, 1, "Couldn't load target `KUBE-SERVICES'")
            return ""
        if "-S" in argv:
            table, chain = argv[argv.index("-t") + 1], argv[argv.index("-S") + 1]
            if f"{table} {chain}" not in listings:
                raise IptablesError(argv, 1, "No chain/target/match by that name.")
            return listings[f"{table} {chain}"]
        if "-C" in argv or "-D" in argv or "-N" in argv:
            raise IptablesError(argv, 1, "Chain already exists." if "-N" in argv else "Bad rule")
        return ""

    monkeypatch.setattr(tables, "run", run)
    return calls



def test_cleanup_reads_once_and_removes_every_copy_of_its_jumps(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxyd.netfilter import Backend, Netfilter

    jumps = [Jump("nat", chain, "KUBE-SERVICES", "kubernetes service portals") for chain in ("PREROUTING", "OUTPUT")]
    chains = {"nat": ("KUBE-SERVICES", "KUBE-NODEPORTS"), "filter": ("KUBE-FORWARD",)}
    nf = Netfilter(Backend("nft", 4))

    calls = _fake_iptables(monkeypatch, saved=_SAVED)
    owned = lambda c: c.startswith("KUBE-SVC-")  # noqa: E731
    assert asyncio.run(nf.cleanup(jumps, chains, owned)) == []
    assert [c[0] for c in calls] == ["iptables-nft-save", "iptables-nft-restore", "iptables-nft-restore",
                                     "iptables-nft-restore"]
    body = [line for c in calls[1:] for line in c[-1].splitlines() if line not in ("*nat", "COMMIT")]
    assert body == ['-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
                    '-D OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
                    '-D OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
                    ":KUBE-SERVICES - [0:0]", ":KUBE-SVC-AAAA - [0:0]", "-X KUBE-SERVICES", "-X KUBE-SVC-AAAA"]

    # Nothing of ours there: one process, no transaction.
    calls = _fake_iptables(monkeypatch, saved="*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j USER-CHAIN\nCOMMIT\n")
    assert asyncio.run(nf.cleanup(jumps, chains, owned)) == []
    assert [c[0] for c in calls] == ["iptables-nft-save"]


def test_cleanup_falls_back_to_one_by_one_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxyd.netfilter import Backend, Netfilter

    jumps = [Jump("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals")]
    nf = Netfilter(Backend("legacy", 4))
    calls = _fake_iptables(monkeypatch, saved=_SAVED, fail_restore=True)
    problems = asyncio.run(nf.cleanup(jumps, {"nat": ("KUBE-SERVICES",)}))
    assert len(problems) == 1
    assert problems[0].startswith("legacy nat: iptables-legacy-restore")
    assert problems[0].endswith("Couldn't load target `KUBE-SERVICES'")
    ops = [c[c.index("-t"):] for c in calls if c[0] == "iptables-legacy"]
    assert ops == [["-t", "nat", "-D", "PREROUTING", *jumps[0].args()],  # refused: no copy left, next step
                   ["-t", "nat", "-F", "KUBE-SERVICES"], ["-t", "nat", "-X", "KUBE-SERVICES"]]

    monkeypatch.setattr("proxyd.netfilter.tables.run", _raise_oserror)
    assert asyncio.run(nf.cleanup(jumps, {"nat": ("KUBE-SERVICES",)})) == [
        "legacy: save failed: [Errno 2] No such file or directory: 'iptables-legacy-save'"]


async def _raise_oserror(argv: list[str], **_: object) -> str:
    raise FileNotFoundError(2, "No such file or directory", argv[0])


# -- IPv6 and dual-stack ------------------------------------------------------------------------------
#
# The IPv6 proxier's text for the golden services moved to IPv6: what kube-proxy's IPv6 proxier writes
# (ip6tables-restore input): the same chain names (the service hashes do not depend on the family), the
# endpoint chains hashed over "[ip]:port", the NodePort tail skipping ::1 (IPv6 has no route_localnet),
# the family's cluster CIDR for masquerading, and a plain "-j REJECT" (ip6tables' default answer is
# icmp6-port-unreachable, which ip6tables-save prints back).

OPTS6 = PlannerOptions(family=6, cluster_cidrs=("10.0.0.0/8", "fd00:10::/32"), node_ip="2001:db8:168::2",
                       random_fully=False)
SVC1_6 = sp("svc1", "fd00:172:30::41", namespace="ns1")
SVC2_6 = sp("svc2", "fd00:172:30::42", namespace="ns2", type=ServiceType.LOAD_BALANCER, node_port=3001,
            external_ips=("2001:db8:99::22",), load_balancer_ips=("2001:db8:1::4",),
            load_balancer_source_ranges=("2001:db8:203::/64",), external_policy_local=True,
            health_check_node_port=30000)
SVC3_6 = sp("svc3", "fd00:172:30::43", namespace="ns3", node_port=3003, type=ServiceType.NODE_PORT)
GOLDEN6_STATE = state(
    (SVC1_6, (Endpoint("fd00:10:180::1", 80),)),
    (SVC2_6, (Endpoint("fd00:10:180::2", 80, node_name=NODE), Endpoint("fd00:10:180::3", 80, node_name="node2"))),
    (SVC3_6, ()),
)

GOLDEN6 = """\
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 has no endpoints" -m tcp -p tcp -d fd00:172:30::43 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns3/svc3:p80 has no endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3003 -j REJECT
-A KUBE-PROXY-FIREWALL -m comment --comment "ns2/svc2:p80 traffic not accepted by KUBE-FW-GNZBNJ2PO5MGZ6GT" -m tcp -p tcp -d 2001:db8:1::4 --dport 80 -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-OGYCNMB4EMRUSJ6N - [0:0]
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-FW-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVL-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SEP-HVN4VNKVYQ7L4BSW - [0:0]
:KUBE-SEP-FSFULW5ZXQDYZS5P - [0:0]
:KUBE-SEP-STALE0000000000 - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d fd00:172:30::41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d fd00:172:30::42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 2001:db8:99::22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 2001:db8:1::4 --dport 80 -j KUBE-FW-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d fd00:172:30::41 --dport 80 ! -s fd00:10::/32 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> [fd00:10:180::1]:80" -j KUBE-SEP-OGYCNMB4EMRUSJ6N
-A KUBE-SEP-OGYCNMB4EMRUSJ6N -m comment --comment ns1/svc1:p80 -s fd00:10:180::1 -j KUBE-MARK-MASQ
-A KUBE-SEP-OGYCNMB4EMRUSJ6N -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination [fd00:10:180::1]:80
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d fd00:172:30::42 --dport 80 ! -s fd00:10::/32 -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s fd00:10::/32 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -j KUBE-SVL-GNZBNJ2PO5MGZ6GT
-A KUBE-FW-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 loadbalancer IP" -s 2001:db8:203::/64 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-FW-GNZBNJ2PO5MGZ6GT -m comment --comment "other traffic to ns2/svc2:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> [fd00:10:180::2]:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-HVN4VNKVYQ7L4BSW
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> [fd00:10:180::3]:80" -j KUBE-SEP-FSFULW5ZXQDYZS5P
-A KUBE-SVL-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> [fd00:10:180::2]:80" -j KUBE-SEP-HVN4VNKVYQ7L4BSW
-A KUBE-SEP-HVN4VNKVYQ7L4BSW -m comment --comment ns2/svc2:p80 -s fd00:10:180::2 -j KUBE-MARK-MASQ
-A KUBE-SEP-HVN4VNKVYQ7L4BSW -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination [fd00:10:180::2]:80
-A KUBE-SEP-FSFULW5ZXQDYZS5P -m comment --comment ns2/svc2:p80 -s fd00:10:180::3 -j KUBE-MARK-MASQ
-A KUBE-SEP-FSFULW5ZXQDYZS5P -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination [fd00:10:180::3]:80
-X KUBE-SEP-STALE0000000000
COMMIT
"""


def test_golden_ipv6_full_plan() -> None:
    plan = Planner(OPTS6).plan(GOLDEN6_STATE, None,
                               existing_chains=["KUBE-SEP-STALE0000000000", "CNI-FOO", "KUBE-SERVICES"])
    assert plan.text == GOLDEN6
    assert plan.full and plan.deleted_chains == ("KUBE-SEP-STALE0000000000",)
    name = ServicePortName("ns1", "svc1", "p80", Protocol.TCP)
    assert ch.sep_chain(name, Endpoint("fd00:10:180::1", 80)) == "KUBE-SEP-" + ch._hash16(
        "ns1/svc1:p80tcp[fd00:10:180::1]:80") == "KUBE-SEP-OGYCNMB4EMRUSJ6N"


def _dual(v4: ServicePort, v6: ServicePort) -> ServicePort:
    """The dual-stack service port whose two families' views are ``v4`` and ``v6``."""
    return dataclasses.replace(v4, secondary_cluster_ip=v6.cluster_ip, external_ips=v4.external_ips + v6.external_ips,
                               load_balancer_ips=v6.load_balancer_ips + v4.load_balancer_ips,
                               load_balancer_source_ranges=v4.load_balancer_source_ranges + v6.load_balancer_source_ranges)


DUAL_STATE = state(*((_dual(a, b), GOLDEN_STATE.endpoints[a.name] + GOLDEN6_STATE.endpoints[b.name])
                     for a, b in ((SVC1, SVC1_6), (SVC2, SVC2_6), (SVC3, SVC3_6))))


def test_dual_stack_services_give_each_family_its_golden_view() -> None:
    existing = ["KUBE-SEP-STALE0000000000"]
    assert Planner(OPTS).plan(DUAL_STATE.for_family(4), None, existing_chains=existing).text == GOLDEN
    assert Planner(OPTS6).plan(DUAL_STATE.for_family(6), None, existing_chains=existing).text == GOLDEN6
    # Single-family ports are shared, not copied, by the views (a v4-only sync costs no more than before).
    assert GOLDEN_STATE.for_family(4).service_ports[SVC1.name] is SVC1
    assert not GOLDEN_STATE.for_family(6).service_ports


def test_dual_stack_partial_sync_of_each_family_reaches_its_full_plan() -> None:
    moved = dataclasses.replace(DUAL_STATE, endpoints={**DUAL_STATE.endpoints, SVC1.name: (
        Endpoint("10.180.0.9", 80), Endpoint("fd00:10:180::9", 80))})
    for fam, opts in ((4, OPTS), (6, OPTS6)):
        planner = Planner(opts)
        planner.commit(planner.plan(DUAL_STATE.for_family(fam), None))
        partial = planner.plan(moved.for_family(fam), frozenset({SVC1.name.service}))
        assert not partial.full and "--to-destination" in partial.text
        assert ("[fd00:10:180::9]:80" in partial.text) == (fam == 6)
        assert ("10.180.0.9:80" in partial.text) == (fam == 4)
        full = Planner(opts).plan(moved.for_family(fam), None)
        assert _normalise(_simulate(GOLDEN if fam == 4 else GOLDEN6, partial.text)) == \
            _normalise(_simulate(full.text.replace("-X KUBE-SEP-STALE0000000000\n", "")))


def test_nodeport_addresses_of_the_other_family_leave_this_one_on_every_address() -> None:
    from proxyd.modes.iptables.mode import family_cidrs

    cidrs = ("192.168.0.0/16", "2001:db8:203::/64")
    assert family_cidrs(cidrs, 4) == ("192.168.0.0/16",) and family_cidrs(cidrs, 6) == ("2001:db8:203::/64",)
    assert family_cidrs(("192.168.0.0/16",), 6) == ()
    only6 = Planner(dataclasses.replace(OPTS6, nodeport_addresses=family_cidrs(cidrs, 6),
                                        node_ips=("2001:db8:203::1", "::1"))).plan(GOLDEN6_STATE, None).text
    assert [line for line in only6.splitlines() if line.endswith("-j KUBE-NODEPORTS")] == [
        f"-A KUBE-SERVICES -m comment --comment {NODEPORTS_COMMENT} -d 2001:db8:203::1 -j KUBE-NODEPORTS"]
    every6 = Planner(dataclasses.replace(OPTS6, nodeport_addresses=family_cidrs(("192.168.0.0/16",), 6))).plan(
        GOLDEN6_STATE, None).text
    assert "-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS" in every6


def test_dual_stack_mode_runs_one_iptables_proxier_per_family() -> None:
    import asyncio

    from proxyd import metrics
    from proxyd.config import Config
    from proxyd.modes.base import SyncRequest
    from proxyd.modes.dualstack import DualStackMode
    from proxyd.modes.iptables import IptablesMode

    assert IptablesMode.per_family
    mode = DualStackMode(Config(cluster_cidrs=("10.0.0.0/8", "fd00:10::/32"), sync_period=30.0), IptablesMode, (4, 6))
    fakes = {fam: FakeApplier() for fam in (4, 6)}
    for fam, proxier in mode.proxiers.items():
        proxier.applier = fakes[fam]  # type: ignore[attr-defined]

    async def scenario() -> None:
        await mode.sync(SyncRequest(GOLDEN_STATE, None))
        assert [len(f.restored) for f in fakes.values()] == [1, 1]
        assert "172.30.0.41" in fakes[4].restored[0] and "172.30" not in fakes[6].restored[0]
        # An IPv4-only change: the IPv6 proxier has nothing to do and runs no ip6tables-restore.
        changed = _bump(GOLDEN_STATE, svc1=(SVC1, (Endpoint("10.180.0.9", 80),)))
        await mode.sync(SyncRequest(changed, frozenset({SVC1.name.service}), frozenset({SVC1.name})))
        assert [len(f.restored) for f in fakes.values()] == [2, 1]
        # A dual-stack state: each family gets its own golden view, both counted in the rules gauge.
        await mode.sync(SyncRequest(DUAL_STATE, None))
        assert fakes[6].restored[-1].startswith(GOLDEN6[:200]) and "fd00:172:30::41" in fakes[6].restored[-1]
        plans = [p.last_plan for p in mode.proxiers.values()]  # type: ignore[attr-defined]
        assert metrics.IPTABLES_TOTAL_RULES.labels("nat")._value.get() == sum(p.nat_rules for p in plans)

    asyncio.run(scenario())


def test_backend_detection_reads_both_families_and_decides_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxyd.netfilter import backend

    outputs: dict[tuple[str, ...], str] = {}
    monkeypatch.setattr(backend, "_output", lambda argv, timeout=5.0: outputs.get(tuple(argv), ""))

    def both() -> set[str]:
        return {backend.detect(family=f, environ={}).name for f in (4, 6)}

    # kubelet's hint only in the IPv6 nf_tables mangle table: nft for both families (iptables-wrapper).
    outputs[("ip6tables-nft-save", "-t", "mangle")] = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
    outputs[("iptables-legacy-save",)] = "*nat\n" + "-A X -j Y\n" * 5
    assert both() == {"nft"}
    # No hint anywhere: the rules of both families are counted; IPv6 legacy rules tip IPv4 too.
    outputs.clear()
    outputs[("ip6tables-legacy-save",)] = "*filter\n" + "-A X -j Y\n" * 3
    outputs[("iptables-nft-save",)] = "*filter\n" + "-A X -j Y\n" * 2
    assert both() == {"legacy"}
    assert {backend.detect(family=f, environ={}).family for f in (4, 6)} == {4, 6}


def _jumps() -> list[Jump]:

    return [Jump("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
            Jump("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
            Jump("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules",
                 ("-m", "conntrack", "--ctstate", "NEW"))]


def test_ensure_jumps_reads_the_chains_and_inserts_the_absent_ones_in_one_transaction_a_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from proxyd.netfilter import Backend, Netfilter

    jumps = _jumps()
    nf = Netfilter(Backend("nft", 4))
    listings = {"nat OUTPUT": "-P OUTPUT ACCEPT\n" + jumps[0].restore_line() + "\n",
                "nat PREROUTING": "-P PREROUTING ACCEPT\n", "filter FORWARD": "-P FORWARD ACCEPT\n"}
    calls = _fake_iptables(monkeypatch, listings=listings)
    asyncio.run(nf.ensure_jumps(jumps))
    reads = [c for c in calls if "-S" in c]
    restores = [c for c in calls if c[0] == "iptables-nft-restore"]
    assert [c[c.index("-S") + 1] for c in reads] == ["OUTPUT", "PREROUTING", "FORWARD"]
    assert [c[-1] for c in restores] == [
        '*nat\n-I PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\nCOMMIT\n',
        '*filter\n-I FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes forwarding rules" '
        '-j KUBE-FORWARD\nCOMMIT\n']
    assert len(calls) == len(reads) + len(restores)  # no process per jump

    # All there: reads only.
    listings["nat PREROUTING"] += jumps[1].restore_line() + "\n"
    listings["filter FORWARD"] += jumps[2].restore_line() + "\n"
    calls = _fake_iptables(monkeypatch, listings=listings)
    asyncio.run(nf.ensure_jumps(jumps))
    assert all("-S" in c for c in calls) and len(calls) == 3
    assert asyncio.run(nf.missing(jumps, canary_tables=())) == []


def test_ensure_jumps_falls_back_to_one_by_one_when_a_target_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxyd.netfilter import Backend, Netfilter

    jumps = _jumps()[:2]
    nf = Netfilter(Backend("nft", 6))
    calls = _fake_iptables(monkeypatch, fail_restore=True)
    asyncio.run(nf.ensure_jumps(jumps))
    ops = [c[c.index("-t"):c.index("-t") + 4] for c in calls if c[0] == "ip6tables-nft"]
    assert ops == [["-t", "nat", "-S", "OUTPUT"], ["-t", "nat", "-S", "PREROUTING"],
                   ["-t", "nat", "-N", "KUBE-SERVICES"], ["-t", "nat", "-C", "OUTPUT"], ["-t", "nat", "-I", "OUTPUT"],
                   ["-t", "nat", "-N", "KUBE-SERVICES"], ["-t", "nat", "-C", "PREROUTING"],
                   ["-t", "nat", "-I", "PREROUTING"]]
    assert sum(c[0] == "ip6tables-nft-restore" for c in calls) == 1


def test_missing_names_canaries_and_jumps_table_by_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxyd.netfilter import CANARY, Backend, Netfilter

    jumps = _jumps()
    nf = Netfilter(Backend("nft", 4))
    _fake_iptables(monkeypatch, listings={"mangle KUBE-PROXY-CANARY": "", "filter KUBE-PROXY-CANARY": "",
                                "nat OUTPUT": jumps[0].restore_line() + "\n", "filter FORWARD": ""})
    assert asyncio.run(nf.missing(jumps)) == [f"nat {CANARY}", "nat PREROUTING -> KUBE-SERVICES",
                                              "filter FORWARD -> KUBE-FORWARD"]
