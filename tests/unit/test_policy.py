"""Endpoint categorisation: kube-proxy's topology_test.go cases, plus ours.

Each row mirrors a TestCategorizeEndpoints case of pkg/proxy (with
ProxyTerminatingEndpoints on, as it always is now). Where kube-proxy returns
a nil cluster set (internal-only port with internalTrafficPolicy Local),
proxyd returns the local set instead; the rows say so explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyd.model import (
    Endpoint,
    Protocol,
    ProxyState,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServiceType,
)
from proxyd.policy import (
    Categorized,
    categorize,
    local_endpoint_count,
    local_endpoint_counts,
    uses_cluster_endpoints,
    uses_local_endpoints,
)
from tests.builders import endpoint, service_port

NODE = "node-1"


def ep(addr: str, *, local: bool = False, hints: tuple[str, ...] = (), node: str | None = None,
       **conditions: bool) -> Endpoint:
    """An endpoint in the vocabulary of kube-proxy's policy tables: ``local`` means on this node."""
    return endpoint(addr, node=NODE if local else (node or "node-other"), zone_hints=hints, **conditions)


def svc(*, itp_local: bool = False, etp_local: bool = False, node_port: int = 0,
        topology: bool = False, external_ips: tuple[str, ...] = (),
        lb_ips: tuple[str, ...] = (), hc_port: int = 0, name: str = "svc") -> ServicePort:
    """A service port in the same vocabulary (the policy flags by their kube-proxy names)."""
    return service_port(name, "172.30.0.1", namespace="ns",
                        type=ServiceType.NODE_PORT if node_port else ServiceType.CLUSTER_IP,
                        node_port=node_port, external_ips=external_ips, load_balancer_ips=lb_ips,
                        internal_policy_local=itp_local, external_policy_local=etp_local,
                        topology_aware=topology, health_check_node_port=hc_port)


@dataclass
class Case:
    name: str
    svc: ServicePort
    endpoints: list[Endpoint]
    cluster: set[str]
    local: set[str]
    all: set[str] | None = None  # None: the union of cluster and local
    only_remote: bool = False     # has_any although all_reachable is empty
    zone: str | None = "zone-a"


ZONE_EPS = [
    ep("10.1.2.3:80", hints=("zone-a",)),
    ep("10.1.2.4:80", hints=("zone-b",)),
    ep("10.1.2.5:80", hints=("zone-c",)),
    ep("10.1.2.6:80", hints=("zone-a",)),
]
ALL_ZONE = {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"}

CASES = [
    Case("hints enabled, hints annotation == auto", svc(topology=True), ZONE_EPS,
         {"10.1.2.3:80", "10.1.2.6:80"}, set()),
    # "disabled", "aUto" and "" annotations: the source sets topology_aware False.
    Case("hints annotation disabled/empty/miscapitalised: hints ignored", svc(topology=False), ZONE_EPS,
         ALL_ZONE, set()),
    Case("externalTrafficPolicy: Local, topology ignored for Local endpoints",
         svc(etp_local=True, node_port=8080, topology=True),
         [ep("10.1.2.3:80", hints=("zone-a",), local=True), ep("10.1.2.4:80", hints=("zone-b",), local=True),
          ep("10.1.2.5:80", hints=("zone-c",)), ep("10.1.2.6:80", hints=("zone-a",))],
         {"10.1.2.3:80", "10.1.2.6:80"}, {"10.1.2.3:80", "10.1.2.4:80"},
         {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}),
    Case("internalTrafficPolicy: Local, topology ignored for Local endpoints",
         svc(itp_local=True, node_port=8080, topology=True),
         [ep("10.1.2.3:80", hints=("zone-a",), local=True), ep("10.1.2.4:80", hints=("zone-b",), local=True),
          ep("10.1.2.5:80", hints=("zone-c",)), ep("10.1.2.6:80", hints=("zone-a",))],
         {"10.1.2.3:80", "10.1.2.6:80"}, {"10.1.2.3:80", "10.1.2.4:80"},
         {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}),
    Case("empty node labels", svc(topology=True), [ep("10.1.2.3:80", hints=("zone-a",))],
         {"10.1.2.3:80"}, set(), zone=None),
    Case("empty zone label", svc(topology=True), [ep("10.1.2.3:80", hints=("zone-a",))],
         {"10.1.2.3:80"}, set(), zone=""),
    Case("node in different zone, no endpoint filtering", svc(topology=True),
         [ep("10.1.2.3:80", hints=("zone-a",))], {"10.1.2.3:80"}, set(), zone="zone-b"),
    Case("unready endpoint", svc(topology=True),
         [*ZONE_EPS[:3], ep("10.1.2.6:80", hints=("zone-a",), ready=False)],
         {"10.1.2.3:80"}, set()),
    Case("only unready endpoints in same zone (should not filter)", svc(topology=True),
         [ep("10.1.2.3:80", hints=("zone-a",), ready=False), ep("10.1.2.4:80", hints=("zone-b",)),
          ep("10.1.2.5:80", hints=("zone-c",)), ep("10.1.2.6:80", hints=("zone-a",), ready=False)],
         {"10.1.2.4:80", "10.1.2.5:80"}, set()),
    Case("missing hints, no filtering applied", svc(topology=True),
         [ZONE_EPS[0], ZONE_EPS[1], ep("10.1.2.5:80"), ZONE_EPS[3]], ALL_ZONE, set()),
    Case("multiple hints per endpoint, filtering includes any endpoint with zone included",
         svc(topology=True),
         [ep("10.1.2.3:80", hints=("zone-a", "zone-b", "zone-c")),
          ep("10.1.2.4:80", hints=("zone-b", "zone-c")),
          ep("10.1.2.5:80", hints=("zone-b", "zone-d")), ep("10.1.2.6:80", hints=("zone-c",))],
         {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}, set(), zone="zone-c"),
    Case("conflicting topology and localness require merging allEndpoints",
         svc(etp_local=True, node_port=8080, topology=True),
         [ep("10.0.0.0:80", hints=("zone-a",), local=True), ep("10.0.0.1:80", hints=("zone-b",), local=True),
          ep("10.0.0.2:80", hints=("zone-a",)), ep("10.0.0.3:80", hints=("zone-b",))],
         {"10.0.0.0:80", "10.0.0.2:80"}, {"10.0.0.0:80", "10.0.0.1:80"},
         {"10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"}),
    Case("internalTrafficPolicy: Local, with empty endpoints", svc(itp_local=True), [], set(), set()),
    # kube-proxy: cluster nil, local empty, hasAny true.
    Case("internalTrafficPolicy: Local, but all endpoints are remote", svc(itp_local=True),
         [ep("10.0.0.0:80"), ep("10.0.0.1:80")], set(), set(), only_remote=True),
    Case("internalTrafficPolicy: Local, all endpoints are local", svc(itp_local=True),
         [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80", local=True)],
         {"10.0.0.0:80", "10.0.0.1:80"}, {"10.0.0.0:80", "10.0.0.1:80"}),
    Case("internalTrafficPolicy: Local, some endpoints are local", svc(itp_local=True),
         [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80")], {"10.0.0.0:80"}, {"10.0.0.0:80"}),
    Case("Cluster traffic policy, endpoints not Ready", svc(),
         [ep("10.0.0.0:80", ready=False), ep("10.0.0.1:80", ready=False)], set(), set()),
    Case("Cluster traffic policy, some endpoints are Ready", svc(),
         [ep("10.0.0.0:80", ready=False), ep("10.0.0.1:80")], {"10.0.0.1:80"}, set()),
    Case("Cluster traffic policy, all endpoints are terminating", svc(),
         [ep("10.0.0.0:80", ready=False, serving=True, terminating=True, local=True),
          ep("10.0.0.1:80", ready=False, serving=True, terminating=True)],
         {"10.0.0.0:80", "10.0.0.1:80"}, set()),
    Case("Cluster traffic policy, terminating but not serving endpoints are never used", svc(),
         [ep("10.0.0.0:80", ready=False, serving=False, terminating=True)], set(), set()),
    Case("iTP: Local, eTP: Cluster, some endpoints local", svc(itp_local=True, node_port=8080),
         [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80")],
         {"10.0.0.0:80", "10.0.0.1:80"}, {"10.0.0.0:80"}, {"10.0.0.0:80", "10.0.0.1:80"}),
    Case("iTP: Cluster, eTP: Local, some endpoints local", svc(etp_local=True, node_port=8080),
         [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80")],
         {"10.0.0.0:80", "10.0.0.1:80"}, {"10.0.0.0:80"}, {"10.0.0.0:80", "10.0.0.1:80"}),
    Case("iTP: Local, eTP: Local, some endpoints local", svc(itp_local=True, etp_local=True, node_port=8080),
         [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80")],
         {"10.0.0.0:80", "10.0.0.1:80"}, {"10.0.0.0:80"}, {"10.0.0.0:80", "10.0.0.1:80"}),
    Case("iTP: Local, eTP: Local, all endpoints remote", svc(itp_local=True, etp_local=True, node_port=8080),
         [ep("10.0.0.0:80"), ep("10.0.0.1:80")],
         {"10.0.0.0:80", "10.0.0.1:80"}, set(), {"10.0.0.0:80", "10.0.0.1:80"}),
    Case("iTP: Local, eTP: Local, all endpoints remote and terminating",
         svc(itp_local=True, etp_local=True, node_port=8080),
         [ep("10.0.0.0:80", ready=False, serving=True, terminating=True),
          ep("10.0.0.1:80", ready=False, serving=True, terminating=True)],
         {"10.0.0.0:80", "10.0.0.1:80"}, set(), {"10.0.0.0:80", "10.0.0.1:80"}, only_remote=True),
    Case("iTP: Cluster, eTP: Local, with terminating endpoints", svc(etp_local=True, node_port=8080),
         [ep("10.0.0.0:80"), ep("10.0.0.1:80", ready=False, serving=False, local=True),
          ep("10.0.0.2:80", ready=False, serving=True, terminating=True, local=True),
          ep("10.0.0.3:80", ready=False, serving=True, terminating=True)],
         {"10.0.0.0:80"}, {"10.0.0.2:80"}, {"10.0.0.0:80", "10.0.0.2:80"}),
    Case("externalTrafficPolicy ignored if not externally accessible", svc(etp_local=True),
         [ep("10.0.0.0:80"), ep("10.0.0.1:80", local=True)],
         {"10.0.0.0:80", "10.0.0.1:80"}, set(), {"10.0.0.0:80", "10.0.0.1:80"}),
    Case("no cluster endpoints for iTP:Local internal-only service (proxyd: cluster = local)",
         svc(itp_local=True), [ep("10.0.0.0:80"), ep("10.0.0.1:80", local=True)],
         {"10.0.0.1:80"}, {"10.0.0.1:80"}, {"10.0.0.1:80"}),
    # Ours beyond kube-proxy's table.
    Case("externalIPs make a port externally accessible", svc(etp_local=True, external_ips=("192.0.2.1",)),
         [ep("10.0.0.0:80"), ep("10.0.0.1:80", local=True)],
         {"10.0.0.0:80", "10.0.0.1:80"}, {"10.0.0.1:80"}),
    Case("LB IPs make a port externally accessible", svc(etp_local=True, lb_ips=("198.51.100.7",)),
         [ep("10.0.0.0:80"), ep("10.0.0.1:80", local=True)],
         {"10.0.0.0:80", "10.0.0.1:80"}, {"10.0.0.1:80"}),
    Case("local ready beats local serving-terminating", svc(etp_local=True, node_port=30000),
         [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80", ready=False, serving=True, terminating=True,
                                            local=True)],
         {"10.0.0.0:80"}, {"10.0.0.0:80"}),
    Case("eTP Local, no usable endpoint anywhere", svc(etp_local=True, node_port=30000),
         [ep("10.0.0.0:80", ready=False, local=True), ep("10.0.0.1:80", ready=False)], set(), set()),
    Case("eTP Local, only remote ready: drop, not reject", svc(etp_local=True, node_port=30000),
         [ep("10.0.0.1:80")], {"10.0.0.1:80"}, set()),
    Case("topology with terminating local endpoint merges all_reachable",
         svc(etp_local=True, node_port=30000, topology=True),
         [ep("10.0.0.0:80", hints=("zone-a",)), ep("10.0.0.1:80", hints=("zone-b",)),
          ep("10.0.0.2:80", ready=False, serving=True, terminating=True, local=True)],
         {"10.0.0.0:80"}, {"10.0.0.2:80"}, {"10.0.0.0:80", "10.0.0.2:80"}),
    Case("topology, every ready endpoint hinted elsewhere: fall back to all",
         svc(topology=True), [ep("10.0.0.0:80", hints=("zone-b",)), ep("10.0.0.1:80", hints=("zone-c",))],
         {"10.0.0.0:80", "10.0.0.1:80"}, set()),
    Case("topology, only terminating endpoints: hints irrelevant", svc(topology=True),
         [ep("10.0.0.0:80", ready=False, serving=True, terminating=True, hints=("zone-b",)),
          ep("10.0.0.1:80", ready=False, serving=True, terminating=True, hints=("zone-a",))],
         {"10.0.0.0:80", "10.0.0.1:80"}, set()),
]


def names(eps: tuple[Endpoint, ...]) -> set[str]:
    out = [str(e) for e in eps]
    assert len(out) == len(set(out)), f"duplicates in {out}"
    return set(out)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_categorize_kube_proxy_cases(case: Case) -> None:
    got = categorize(case.svc, case.endpoints, node_name=NODE, node_zone=case.zone)
    assert names(got.cluster) == case.cluster
    assert names(got.local) == case.local
    expected_all = case.all if case.all is not None else case.cluster | case.local
    assert names(got.all_reachable) == expected_all
    assert got.has_any == (bool(expected_all) or case.only_remote)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_outputs_keep_input_order_and_are_deterministic(case: Case) -> None:
    got = categorize(case.svc, case.endpoints, node_name=NODE, node_zone=case.zone)
    index = {str(e): i for i, e in enumerate(case.endpoints)}
    for part in (got.cluster, got.local, got.all_reachable):
        positions = [index[str(e)] for e in part]
        assert positions == sorted(positions)
    assert categorize(case.svc, list(case.endpoints), node_name=NODE, node_zone=case.zone) == got


def test_internal_and_external_pick_the_policy_set() -> None:
    eps = [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80")]
    both_local = categorize(svc(itp_local=True, etp_local=True, node_port=30000), eps,
                            node_name=NODE, node_zone=None)
    assert names(both_local.internal) == {"10.0.0.0:80"}
    assert names(both_local.external) == {"10.0.0.0:80"}

    itp_only = categorize(svc(itp_local=True, node_port=30000), eps, node_name=NODE, node_zone=None)
    assert names(itp_only.internal) == {"10.0.0.0:80"}
    assert names(itp_only.external) == {"10.0.0.0:80", "10.0.0.1:80"}

    etp_only = categorize(svc(etp_local=True, node_port=30000), eps, node_name=NODE, node_zone=None)
    assert names(etp_only.internal) == {"10.0.0.0:80", "10.0.0.1:80"}
    assert names(etp_only.external) == {"10.0.0.0:80"}

    # eTP Local without any external address is not a Local policy at all.
    internal_only = categorize(svc(etp_local=True), eps, node_name=NODE, node_zone=None)
    assert not internal_only.external_local
    assert names(internal_only.external) == {"10.0.0.0:80", "10.0.0.1:80"}


def test_empty_endpoints_carry_policy_flags() -> None:
    got = categorize(svc(itp_local=True, etp_local=True, node_port=1), [], node_name=NODE, node_zone="z")
    assert got == Categorized(internal_local=True, external_local=True)
    assert got.internal == () and got.external == () and not got.has_any


def test_endpoint_without_node_is_never_local() -> None:
    e = Endpoint(ip="10.0.0.9", port=80, node_name=None)
    got = categorize(svc(itp_local=True), [e], node_name=NODE, node_zone=None)
    assert got.local == () and got.has_any
    # An empty node name must not match endpoints without a node either.
    got = categorize(svc(itp_local=True), [e], node_name="", node_zone=None)
    assert got.local == ()


def test_uses_helpers_match_kube_proxy() -> None:
    assert uses_cluster_endpoints(svc()) and not uses_local_endpoints(svc())
    assert not uses_cluster_endpoints(svc(itp_local=True)) and uses_local_endpoints(svc(itp_local=True))
    assert uses_cluster_endpoints(svc(itp_local=True, node_port=1))
    assert uses_local_endpoints(svc(etp_local=True, node_port=1))
    assert not uses_local_endpoints(svc(etp_local=True))


def test_local_endpoint_count_counts_distinct_ready_local_ips() -> None:
    eps = [
        ep("10.0.0.1:80", local=True), ep("10.0.0.1:81", local=True),  # same IP, two ports
        ep("10.0.0.2:80", local=True, ready=False, serving=True, terminating=True),
        ep("10.0.0.3:80"),
        ep("10.0.0.4:80", local=True),
    ]
    assert local_endpoint_count(svc(), eps, NODE) == 2
    assert local_endpoint_count(svc(), eps, "elsewhere") == 0
    assert local_endpoint_count(None, [], NODE) == 0


def test_local_endpoint_counts_per_service_over_ports() -> None:
    a80 = svc(name="a", hc_port=32000, etp_local=True, node_port=30080)
    a443 = ServicePort(name=ServicePortName("ns", "a", "https", Protocol.TCP), type=ServiceType.NODE_PORT,
                       cluster_ip="172.30.0.1", port=443, protocol=Protocol.TCP, node_port=30443,
                       external_policy_local=True, health_check_node_port=32000)
    b = svc(name="b")
    state = ProxyState(
        service_ports={a80.name: a80, a443.name: a443, b.name: b},
        endpoints={a80.name: (ep("10.0.0.1:80", local=True),),
                   a443.name: (ep("10.0.0.1:443", local=True), ep("10.0.0.2:443", local=True),
                               ep("10.0.0.3:443")),
                   b.name: (ep("10.0.0.9:80", local=True),)},
        node_name=NODE)
    assert local_endpoint_counts(state) == {ServiceName("ns", "a"): 2}


def test_local_endpoint_counts_zero_when_no_endpoints() -> None:
    a = svc(name="a", hc_port=32000, etp_local=True, node_port=30080)
    state = ProxyState(service_ports={a.name: a}, endpoints={}, node_name=NODE)
    assert local_endpoint_counts(state) == {ServiceName("ns", "a"): 0}


# ---- properties ---------------------------------------------------------

_endpoints = st.lists(
    st.builds(
        lambda i, ready, serving, term, local, hints: Endpoint(
            ip=f"10.0.0.{i}", port=80, ready=ready, serving=serving or ready, terminating=term,
            node_name=NODE if local else "other", zone_hints=hints),
        st.integers(0, 30), st.booleans(), st.booleans(), st.booleans(), st.booleans(),
        st.sampled_from([(), ("zone-a",), ("zone-b",), ("zone-a", "zone-b")])),
    max_size=12, unique_by=lambda e: e.ip)
_services = st.builds(
    lambda itp, etp, np, topo: svc(itp_local=itp, etp_local=etp, node_port=np, topology=topo),
    st.booleans(), st.booleans(), st.sampled_from([0, 30000]), st.booleans())


@given(_services, _endpoints, st.sampled_from([None, "", "zone-a", "zone-b"]))
def test_categorize_invariants(port: ServicePort, eps: list[Endpoint], zone: str | None) -> None:
    got = categorize(port, eps, node_name=NODE, node_zone=zone)
    usable = [e for e in eps if e.ready or (e.serving and e.terminating)]
    # Only usable endpoints are ever chosen; local ones are this node's.
    for e in got.cluster + got.local + got.all_reachable:
        assert e in usable
    assert all(e.node_name == NODE for e in got.local)
    assert names(got.all_reachable) == names(got.cluster) | names(got.local)
    # has_any is exactly "a usable endpoint exists somewhere".
    assert got.has_any == bool(usable)
    # Ready endpoints are preferred over terminating ones within each set.
    for part in (got.cluster, got.local):
        if any(e.ready for e in part):
            assert all(e.ready for e in part)
    # Something ready and reachable under Cluster policy is never dropped.
    if usable and not port.internal_policy_local:
        assert got.cluster
    if any(e.ready and e.node_name == NODE for e in eps) and uses_local_endpoints(port):
        assert got.local
