"""Packet flows through the iptables planner's rules, traced without root (kube-proxy's tracePacket cases).

Each case reads as a flow: source -> destination reaches these endpoints,
masqueraded or not, or is rejected/dropped. Node 192.168.0.2 ("node1") runs
proxyd with --cluster-cidr 10.0.0.0/8; pods are 10.0.0.0/8, outside clients
203.0.113.0/24.
"""

# Golden rule text and flow tables read best one entry per line.
# ruff: noqa: E501

from __future__ import annotations

import dataclasses
import ipaddress
import re
from functools import partial

import pytest

from proxyd.model import Protocol, ServiceType
from proxyd.modes.iptables.planner import Planner, PlannerOptions
from proxyd.modes.iptables.tracer import Tracer, flow, parse
from tests.builders import endpoint, service_port, state

NODE, NODE_IP = "node1", "192.168.0.2"
POD, OUTSIDE = "10.0.0.2", "203.0.113.5"


sp = partial(service_port, namespace="ns", port_name="p80")
ep = partial(endpoint, node="node2")


LOCAL = {"node": NODE}
SERVICES = [
    (sp("svc1", "172.30.0.41"), (ep("10.180.0.1", 80, node=NODE),)),
    (sp("target", "172.30.0.42"), (ep("10.180.0.2", 8080),)),
    (sp("dns", "172.30.0.43", port=53, port_name="dns-tcp"), (ep("10.180.0.3", 5353),)),
    (sp("dns", "172.30.0.43", port=53, port_name="dns", protocol=Protocol.UDP), (ep("10.180.0.4", 53),)),
    (sp("empty", "172.30.0.44", type=ServiceType.NODE_PORT, node_port=3004, external_ips=("192.168.99.4",)), ()),
    (sp("lb", "172.30.0.45", type=ServiceType.LOAD_BALANCER, node_port=3005, load_balancer_ips=("1.2.3.5",),
        load_balancer_source_ranges=("203.0.113.0/25",)),
     (ep("10.180.0.5", 80), ep("10.180.0.6", 80, node=NODE))),
    (sp("local", "172.30.0.46", type=ServiceType.LOAD_BALANCER, node_port=3006, load_balancer_ips=("1.2.3.6",),
        external_policy_local=True, health_check_node_port=30006),
     (ep("10.180.0.7", 80, node=NODE), ep("10.180.0.8", 80))),
    (sp("nolocal", "172.30.0.47", type=ServiceType.NODE_PORT, node_port=3007, external_ips=("192.168.99.7",),
        external_policy_local=True), (ep("10.180.0.9", 80),)),
    (sp("itp", "172.30.0.48", internal_policy_local=True), (ep("10.180.0.10", 80, node=NODE), ep("10.180.0.11", 80))),
    (sp("itpnone", "172.30.0.49", internal_policy_local=True), (ep("10.180.0.12", 80),)),
    (sp("term", "172.30.0.50", type=ServiceType.NODE_PORT, node_port=3010, external_policy_local=True),
     (ep("10.180.0.13", 80, node=NODE, ready=False, serving=True, terminating=True), ep("10.180.0.14", 80))),
    (sp("termgone", "172.30.0.51", type=ServiceType.NODE_PORT, node_port=3011, external_policy_local=True),
     (ep("10.180.0.15", 80, node=NODE, ready=False, serving=False, terminating=True), ep("10.180.0.16", 80))),
    (sp("np", "172.30.0.52", type=ServiceType.NODE_PORT, node_port=3012),
     (ep("10.180.0.17", 80), ep("10.180.0.18", 80), ep("10.180.0.19", 80))),
    (sp("sticky", "172.30.0.53", affinity_timeout=60), (ep("10.180.0.20", 80), ep("10.180.0.21", 80))),
]


def build(**opts: object) -> Tracer:
    st = state(*SERVICES, node=NODE)
    options = PlannerOptions(**{"cluster_cidrs": ("10.0.0.0/8",), "node_ip": NODE_IP, **opts})  # type: ignore[arg-type]
    return Tracer(Planner(options).plan(st, None).text, node_ips=[NODE_IP, "172.16.0.1"])


TRACER = build()

FLOWS = [
    # (what, source, destination, protocol, local_origin, expected)
    ("ClusterIP from a pod", POD, "172.30.0.41:80", "tcp", False, "10.180.0.1:80 no-masq"),
    ("ClusterIP from outside the cluster CIDR is masqueraded", "192.168.0.99", "172.30.0.41:80", "tcp", False,
     "10.180.0.1:80 masq"),
    ("ClusterIP from the node itself", NODE_IP, "172.30.0.41:80", "tcp", True, "10.180.0.1:80 masq"),
    ("hairpin: an endpoint reaching itself is masqueraded", "10.180.0.1", "172.30.0.41:80", "tcp", False,
     "10.180.0.1:80 masq"),
    ("ClusterIP wrong port goes nowhere special", POD, "172.30.0.41:81", "tcp", False, "172.30.0.41:81 no-masq"),
    ("targetPort differs from port", POD, "172.30.0.42:80", "tcp", False, "10.180.0.2:8080 no-masq"),
    ("same port, TCP", POD, "172.30.0.43:53", "tcp", False, "10.180.0.3:5353 no-masq"),
    ("same port, UDP", POD, "172.30.0.43:53", "udp", False, "10.180.0.4:53 no-masq"),
    ("no endpoints: ClusterIP rejects", POD, "172.30.0.44:80", "tcp", False, "REJECT"),
    ("no endpoints: NodePort rejects", OUTSIDE, f"{NODE_IP}:3004", "tcp", False, "REJECT"),
    ("no endpoints: externalIP rejects", OUTSIDE, "192.168.99.4:80", "tcp", False, "REJECT"),
    ("LB IP from an allowed source range, Cluster policy: masqueraded", OUTSIDE, "1.2.3.5:80", "tcp", False,
     "10.180.0.5:80, 10.180.0.6:80 masq"),
    ("LB IP from outside the source ranges is dropped", "203.0.113.200", "1.2.3.5:80", "tcp", False, "DROP"),
    ("LB IP from a pod outside the source ranges is dropped too", POD, "1.2.3.5:80", "tcp", False, "DROP"),
    ("NodePort bypasses source ranges (kube-proxy)", "203.0.113.200", f"{NODE_IP}:3005", "tcp", False,
     "10.180.0.5:80, 10.180.0.6:80 masq"),
    ("eTP Cluster ClusterIP unaffected", POD, "172.30.0.45:80", "tcp", False, "10.180.0.5:80, 10.180.0.6:80 no-masq"),
    ("eTP Local: NodePort reaches only local endpoints, source kept", OUTSIDE, f"{NODE_IP}:3006", "tcp", False,
     "10.180.0.7:80 no-masq"),
    ("eTP Local: LB IP reaches only local endpoints, source kept", OUTSIDE, "1.2.3.6:80", "tcp", False,
     "10.180.0.7:80 no-masq"),
    ("eTP Local: pods short-circuit to the cluster endpoints", POD, "1.2.3.6:80", "tcp", False,
     "10.180.0.7:80, 10.180.0.8:80 no-masq"),
    ("eTP Local: the node itself goes to the cluster endpoints, masqueraded", NODE_IP, "1.2.3.6:80", "tcp", True,
     "10.180.0.7:80, 10.180.0.8:80 masq"),
    ("eTP Local: ClusterIP uses every endpoint", POD, "172.30.0.46:80", "tcp", False,
     "10.180.0.7:80, 10.180.0.8:80 no-masq"),
    ("eTP Local, no local endpoint: NodePort drops", OUTSIDE, f"{NODE_IP}:3007", "tcp", False, "DROP"),
    ("eTP Local, no local endpoint: externalIP drops", OUTSIDE, "192.168.99.7:80", "tcp", False, "DROP"),
    ("eTP Local, no local endpoint: pods still reach the externalIP", POD, "192.168.99.7:80", "tcp", False,
     "10.180.0.9:80 no-masq"),
    ("eTP Local, no local endpoint: ClusterIP works", POD, "172.30.0.47:80", "tcp", False, "10.180.0.9:80 no-masq"),
    ("iTP Local: only local endpoints", POD, "172.30.0.48:80", "tcp", False, "10.180.0.10:80 no-masq"),
    ("iTP Local, none local: dropped", POD, "172.30.0.49:80", "tcp", False, "DROP"),
    ("terminating eTP Local: external traffic uses the serving-terminating local endpoint", OUTSIDE,
     f"{NODE_IP}:3010", "tcp", False, "10.180.0.13:80 no-masq"),
    ("terminating eTP Local: ClusterIP uses the ready endpoint", POD, "172.30.0.50:80", "tcp", False,
     "10.180.0.14:80 no-masq"),
    ("terminating, not serving: external dropped", OUTSIDE, f"{NODE_IP}:3011", "tcp", False, "DROP"),
    ("NodePort on any node address", OUTSIDE, "172.16.0.1:3012", "tcp", False,
     "10.180.0.17:80, 10.180.0.18:80, 10.180.0.19:80 masq"),
    ("NodePort on localhost is not served", NODE_IP, "127.0.0.1:3012", "tcp", True, "127.0.0.1:3012 no-masq"),
    ("NodePort wrong protocol", OUTSIDE, f"{NODE_IP}:3012", "udp", False, f"{NODE_IP}:3012 no-masq"),
    ("ClientIP affinity: first packet spreads", POD, "172.30.0.53:80", "tcp", False,
     "10.180.0.20:80, 10.180.0.21:80 no-masq"),
    ("healthCheckNodePort is accepted", OUTSIDE, f"{NODE_IP}:30006", "tcp", False, f"{NODE_IP}:30006 no-masq"),
]


@pytest.mark.parametrize("what,src,dst,proto,local,expected", FLOWS, ids=[f[0] for f in FLOWS])
def test_flow(what: str, src: str, dst: str, proto: str, local: bool, expected: str) -> None:
    assert flow(TRACER, src=src, dst=dst, protocol=proto, local_origin=local) == expected


def test_health_check_node_port_rule_is_what_accepts() -> None:
    rules = TRACER.tables["filter"]["KUBE-NODEPORTS"]
    assert [(r.target, dict((o, v) for _, o, v in r.matches)["--dport"]) for r in rules] == [("ACCEPT", ("30006",))]


def test_masquerade_all() -> None:
    tracer = build(masquerade_all=True)
    assert flow(tracer, src=POD, dst="172.30.0.41:80") == "10.180.0.1:80 masq"


def test_without_cluster_cidr_nothing_internal_is_masqueraded() -> None:
    tracer = build(cluster_cidrs=())
    assert flow(tracer, src="192.168.0.99", dst="172.30.0.41:80") == "10.180.0.1:80 no-masq"
    assert flow(tracer, src="10.180.0.1", dst="172.30.0.41:80") == "10.180.0.1:80 masq"  # hairpin still


def test_nodeport_addresses_limit_nodeports() -> None:
    tracer = build(nodeport_addresses=("192.168.0.0/24",), node_ips=(NODE_IP,))
    assert flow(tracer, src=OUTSIDE, dst=f"{NODE_IP}:3012").startswith("10.180.0.17:80")
    assert flow(tracer, src=OUTSIDE, dst="172.16.0.1:3012") == "172.16.0.1:3012 no-masq"


def test_tracer_refuses_what_it_does_not_understand() -> None:
    with pytest.raises(ValueError):
        Tracer("*nat\n:X - [0:0]\n-A X -m owner --uid-owner 0 -j ACCEPT\nCOMMIT\n", node_ips=[])
    with pytest.raises(ValueError):
        parse("-A X -j Y\n")
    tracer = Tracer("*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j KUBE-MISSING\nCOMMIT\n", node_ips=[])
    with pytest.raises(ValueError):
        tracer.trace(src=POD, dst="1.1.1.1", port=1)
    loop = Tracer("*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j KUBE-SERVICES\nCOMMIT\n", node_ips=[])
    with pytest.raises(ValueError):
        loop.trace(src=POD, dst="1.1.1.1", port=1)


# -- IPv6: every flow above, on the IPv6 proxier's rules ---------------------------------------------
#
# The same services and flows moved to IPv6 by one mapping that keeps CIDR membership (a.b.c.d ->
# fd00:0:<a.b.c.d as 32 bits>::, a /n -> a /(32+n)), so every case must come out the same way on the
# rules of the family-6 planner: what kube-proxy's IPv6 proxier does. Loopback maps to ::1.

_V4 = re.compile(r"\b(\d{1,3}(?:\.\d{1,3}){3})(/\d{1,2}|:\d+)?")


def v6(addr: str) -> str:
    """``addr`` (address, CIDR or ``ip:port``) moved to IPv6; endpoints as ``[ip]:port``."""
    return _V4.sub(_v6_match, addr)


def _v6_match(m: re.Match[str]) -> str:
    ip, suffix = m.group(1), m.group(2) or ""
    six = "::1" if ip == "127.0.0.1" else str(ipaddress.IPv6Address((0xFD00 << 112) | (int(ipaddress.IPv4Address(ip)) << 64)))
    if suffix.startswith("/"):
        return f"{six}/{32 + int(suffix[1:])}"
    if suffix:
        return f"[{six}]{suffix}"
    return six


def v6_expected(expected: str) -> str:
    """A flow's expected outcome moved to IPv6 (endpoints re-sorted: hex sorts differently)."""
    if expected in ("REJECT", "DROP"):
        return expected
    dests, _, tag = expected.rpartition(" ")
    return ", ".join(sorted(v6(d) for d in dests.split(", "))) + " " + tag


def v6_services(services=SERVICES):  # type: ignore[no-untyped-def]
    out = []
    for svc, eps in services:
        svc6 = dataclasses.replace(svc, cluster_ip=v6(svc.cluster_ip),
                                   external_ips=tuple(v6(a) for a in svc.external_ips),
                                   load_balancer_ips=tuple(v6(a) for a in svc.load_balancer_ips),
                                   load_balancer_source_ranges=tuple(v6(c) for c in svc.load_balancer_source_ranges))
        out.append((svc6, tuple(dataclasses.replace(e, ip=v6(e.ip)) for e in eps)))
    return out


SERVICES6 = v6_services()
NODE_IPS6 = [v6(NODE_IP), v6("172.16.0.1")]
FLOWS6 = [(what, v6(src), v6(dst), proto, local, v6_expected(expected))
          for what, src, dst, proto, local, expected in FLOWS]


def build6(**opts: object) -> Tracer:
    options = PlannerOptions(**{"family": 6, "cluster_cidrs": ("10.0.0.0/8", v6("10.0.0.0/8")),  # type: ignore[arg-type]
                                "node_ip": v6(NODE_IP), **opts})
    return Tracer(Planner(options).plan(state(*SERVICES6, node=NODE), None).text, node_ips=NODE_IPS6)


TRACER6 = build6()


def test_ipv6_mapping_keeps_membership() -> None:
    assert v6("10.0.0.2") == "fd00:0:a00:2::" and v6("10.0.0.0/8") == "fd00:0:a00::/40"
    assert v6("10.180.0.1:80") == "[fd00:0:ab4:1::]:80" and v6("127.0.0.1:3012") == "[::1]:3012"
    assert ipaddress.ip_address(v6(OUTSIDE)) in ipaddress.ip_network(v6("203.0.113.0/25"))
    assert ipaddress.ip_address(v6("203.0.113.200")) not in ipaddress.ip_network(v6("203.0.113.0/25"))


@pytest.mark.parametrize("what,src,dst,proto,local,expected", FLOWS6, ids=[f[0] for f in FLOWS6])
def test_ipv6_flow(what: str, src: str, dst: str, proto: str, local: bool, expected: str) -> None:
    assert flow(TRACER6, src=src, dst=dst, protocol=proto, local_origin=local) == expected


def test_ipv6_rules_hold_no_ipv4_and_ipv4_rules_no_ipv6() -> None:
    both = SERVICES + SERVICES6
    text4 = Planner(PlannerOptions(cluster_cidrs=("10.0.0.0/8",))).plan(state(*both, node=NODE), None).text
    text6 = Planner(PlannerOptions(family=6)).plan(state(*both, node=NODE), None).text
    assert "fd00:" not in text4
    assert not _V4.search(text6.replace("0.5000000000", "").replace("0.3333333333", ""))
    # A v4 flow through the v6 rules is nobody's business: untouched.
    tracer6 = Tracer(text6, node_ips=NODE_IPS6)
    assert flow(tracer6, src=POD, dst="172.30.0.41:80") == "172.30.0.41:80 no-masq"
