"""The userspace planner: which addresses, listeners and endpoint lists a state asks for (no root)."""

from __future__ import annotations

import itertools
from functools import partial

import pytest

from proxyd.model import (
    Endpoint,
    Protocol,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServiceType,
)
from proxyd.modes.userspace.listeners import SourceFilter
from proxyd.modes.userspace.planner import (
    ListenerKey,
    Merged,
    Planner,
    PortPlan,
    TableEntry,
    TableKey,
    merge,
    nodeport_listen_ips,
    nodeport_node_ips,
    plan_port,
)
from proxyd.nodeaddrs import filter_addresses
from tests.builders import endpoint, port_name, service_port, state

TCP, UDP = Protocol.TCP, Protocol.UDP


spn = port_name
svc = service_port
ep = partial(endpoint, node="node1")


def plan_one(port: ServicePort, endpoints: tuple[Endpoint, ...], nodeport_ips=("0.0.0.0",)):
    return plan_port(port, endpoints, node_name="node1", node_zone=None, nodeport_ips=list(nodeport_ips))


def test_cluster_ip_only() -> None:
    name = spn()
    plan = plan_one(svc(name), (ep("10.244.1.11"), ep("10.244.1.12")))
    assert plan.addresses == ("10.96.0.10",)
    assert plan.listeners == ((ListenerKey("10.96.0.10", 80, TCP), TableKey(name)),)
    assert plan.tables == ((TableKey(name), TableEntry((("10.244.1.11", 8080), ("10.244.1.12", 8080)), 0)),)


def test_table_key_id_names_port_protocol_and_traffic() -> None:
    assert TableKey(spn(port="dns", protocol=UDP)).id == "default/web:dns/UDP"
    assert TableKey(spn(), external=True).id == "default/web/TCP/external"
    assert TableKey(spn(), external=True) == TableKey(spn(), True, id="anything")


def test_node_port_external_ips_and_lb_ips() -> None:
    name = spn()
    port = svc(name, type=ServiceType.LOAD_BALANCER, node_port=30080, external_ips=("192.0.2.10",),
               load_balancer_ips=("192.0.2.20",))
    plan = plan_one(port, (ep("10.244.1.11"),), nodeport_ips=("203.0.113.1", "fd00::1"))
    assert plan.addresses == ("10.96.0.10", "192.0.2.10", "192.0.2.20")
    ext = TableKey(name, external=True)
    assert dict(plan.listeners) == {
        ListenerKey("10.96.0.10", 80, TCP): TableKey(name),
        ListenerKey("192.0.2.10", 80, TCP): ext,
        ListenerKey("192.0.2.20", 80, TCP): ext,
        ListenerKey("203.0.113.1", 30080, TCP): ext,  # the v6 node address is skipped for a v4 service
    }
    # the Cluster policy: both kinds of traffic use the same endpoints, held once
    tables = dict(plan.tables)
    assert tables[ext] is tables[TableKey(name)]
    assert tables[ext].endpoints == (("10.244.1.11", 8080),)


def test_source_ranges_guard_lb_ips_only() -> None:
    name = spn()
    port = svc(name, type=ServiceType.LOAD_BALANCER, node_port=30080, external_ips=("192.0.2.10",),
               load_balancer_ips=("192.0.2.20",), load_balancer_source_ranges=("198.51.100.0/24", "fd00::/8"))
    plan = plan_one(port, (ep("10.244.1.11"),))
    assert plan.source_ranges == ((ListenerKey("192.0.2.20", 80, TCP), ("198.51.100.0/24",)),)
    assert merge({name: plan}).source_ranges == {ListenerKey("192.0.2.20", 80, TCP): ("198.51.100.0/24",)}


def test_source_filter() -> None:
    admits = SourceFilter(["198.51.100.0/24", "fd00::/8"])
    assert admits("198.51.100.7") and admits("fd00::1")
    assert not admits("203.0.113.2") and not admits("not an ip") and not admits("")


def test_affinity_timeout_is_carried() -> None:
    plan = plan_one(svc(spn(), affinity_timeout=300), (ep("10.244.1.11"),))
    assert plan.tables[0][1].affinity_timeout == 300


def test_external_policy_local_limits_external_traffic_only() -> None:
    name = spn()
    port = svc(name, type=ServiceType.NODE_PORT, node_port=30080, external_policy_local=True)
    plan = plan_one(port, (ep("10.244.1.11"), ep("10.244.2.11", node="node2")))
    tables = dict(plan.tables)
    assert tables[TableKey(name)].endpoints == (("10.244.1.11", 8080), ("10.244.2.11", 8080))
    assert tables[TableKey(name, external=True)].endpoints == (("10.244.1.11", 8080),)


def test_external_policy_local_without_local_endpoint_has_none() -> None:
    name = spn()
    port = svc(name, type=ServiceType.NODE_PORT, node_port=30080, external_policy_local=True)
    plan = plan_one(port, (ep("10.244.2.11", node="node2"),))
    assert dict(plan.tables)[TableKey(name, external=True)].endpoints == ()


def test_internal_policy_local() -> None:
    name = spn()
    eps = (ep("10.244.1.11"), ep("10.244.2.11", node="node2"))
    plan = plan_one(svc(name, internal_policy_local=True), eps)
    assert dict(plan.tables)[TableKey(name)].endpoints == (("10.244.1.11", 8080),)


def test_terminating_endpoints_used_only_when_none_ready() -> None:
    name = spn()
    eps = (ep("10.244.1.11", ready=False, serving=True, terminating=True), ep("10.244.1.12"))
    assert plan_one(svc(name), eps).tables[0][1].endpoints == (("10.244.1.12", 8080),)
    eps = (ep("10.244.1.11", ready=False, serving=True, terminating=True),
           ep("10.244.1.12", ready=False, serving=False, terminating=True))
    assert plan_one(svc(name), eps).tables[0][1].endpoints == (("10.244.1.11", 8080),)


def test_no_endpoints_still_listens() -> None:
    # the listener stays so that clients are refused at once rather than left hanging
    plan = plan_one(svc(spn()), ())
    assert plan.listeners and plan.tables[0][1].endpoints == ()


def test_duplicate_endpoints_collapse() -> None:
    plan = plan_one(svc(spn()), (ep("10.244.1.11"), ep("10.244.1.11"), ep("10.244.1.12")))
    assert plan.tables[0][1].endpoints == (("10.244.1.11", 8080), ("10.244.1.12", 8080))


def test_conflicting_listeners_first_service_wins() -> None:
    a, b = spn("a"), spn("b")
    plans = {
        b: plan_one(svc(b, ip="10.96.0.2", external_ips=("192.0.2.10",)), ()),
        a: plan_one(svc(a, ip="10.96.0.1", external_ips=("192.0.2.10",)), ()),
    }
    merged = merge(plans)
    assert merged.listeners[ListenerKey("192.0.2.10", 80, TCP)].name == a
    assert len(merged.conflicts) == 1 and "default/b" in merged.conflicts[0]
    assert merged.addresses == {"10.96.0.1", "10.96.0.2", "192.0.2.10"}


def test_a_contested_listener_put_and_dropped_port_by_port_agrees_with_a_fresh_merge() -> None:
    """Three ports claim one externalIP listener; as they come and go in any order, the incremental
    merge (one claim held as a pair, several as a dict) names the same winner and conflicts as a merge
    from scratch, and forgets the listener once nobody claims it."""
    names = [spn("a"), spn("b"), spn("c")]
    plans = {n: plan_one(svc(n, ip=f"10.96.0.{i + 1}", external_ips=("192.0.2.10",)), ())
             for i, n in enumerate(names)}
    shared = ListenerKey("192.0.2.10", 80, TCP)
    for order in itertools.permutations(names):
        merged = Merged()
        held: dict[ServicePortName, PortPlan] = {}
        for step in [*order, *order]:  # each put, then each dropped
            if step in held:
                del held[step]
                merged.put(step, None)
            else:
                held[step] = plans[step]
                merged.put(step, plans[step])
            want, got = merge(held), merged.plan()
            assert got.listeners == want.listeners and got.conflicts == want.conflicts, (order, step)
            if held:
                assert got.listeners[shared].name == min(held)
                assert len(got.conflicts) == len(held) - 1
        assert merged.claims == {} and merged.plan().listeners == {}


def test_external_ip_equal_to_cluster_ip_is_not_a_conflict() -> None:
    name = spn()
    merged = merge({name: plan_one(svc(name, external_ips=("10.96.0.10",)), ())})
    assert merged.conflicts == ()
    assert merged.listeners[ListenerKey("10.96.0.10", 80, TCP)] == TableKey(name)


def test_tcp_and_udp_on_one_port_are_separate() -> None:
    tcp, udp = spn(port="dns-tcp"), spn(port="dns", protocol=UDP)
    eps = (ep("10.244.1.11"),)
    merged = merge({tcp: plan_one(svc(tcp, port=53), eps), udp: plan_one(svc(udp, port=53), eps)})
    assert set(merged.listeners) == {ListenerKey("10.96.0.10", 53, TCP), ListenerKey("10.96.0.10", 53, UDP)}
    assert merged.conflicts == ()


def test_udp_port_without_endpoints_holds_no_listener() -> None:
    """No socket, so the kernel refuses its datagrams (REJECT); the address stays local and the table kept."""
    udp = spn(port="dns", protocol=UDP)
    plan = plan_one(svc(udp, port=53, type=ServiceType.NODE_PORT, node_port=30053), ())
    assert plan.listeners == () and plan.addresses == ("10.96.0.10",)
    assert [entry.endpoints for _, entry in plan.tables] == [(), ()]
    assert len(plan_one(svc(udp, port=53, type=ServiceType.NODE_PORT, node_port=30053),
                        (ep("10.244.1.11"),)).listeners) == 2
    # TCP without endpoints keeps its listener (it refuses each connection itself)
    tcp = spn(port="dns-tcp")
    assert plan_one(svc(tcp, port=53), ()).listeners


def test_udp_port_with_only_remote_endpoints_under_local_policy_keeps_its_listener() -> None:
    """Remote endpoints exist: datagrams are dropped (kube-proxy's DROP), not refused."""
    udp = spn(port="dns", protocol=UDP)
    remote = (ep("10.244.2.11", node="node2"),)
    plan = plan_one(svc(udp, port=53, internal_policy_local=True), remote)
    assert [key for key, _ in plan.listeners] == [ListenerKey("10.96.0.10", 53, UDP)]
    assert [entry.endpoints for _, entry in plan.tables] == [()]


def test_partial_sync_closes_and_reopens_a_udp_listener_as_endpoints_go_and_come() -> None:
    udp = spn("dns", port="dns", protocol=UDP)
    planner = Planner()
    key = ListenerKey("10.96.0.1", 53, UDP)
    name = frozenset({ServiceName("default", "dns")})
    with_eps = state((svc(udp, ip="10.96.0.1", port=53), (ep("10.244.1.11"),)))
    without = state((svc(udp, ip="10.96.0.1", port=53), ()))
    assert key in planner.plan(with_eps, changed=None, nodeport_ips=["0.0.0.0"]).listeners
    gone = planner.plan(without, changed=name, nodeport_ips=["0.0.0.0"])
    assert key not in gone.listeners and gone.changes is not None and key in gone.changes.listeners
    assert "10.96.0.1" in gone.addresses
    back = planner.plan(with_eps, changed=name, nodeport_ips=["0.0.0.0"])
    assert key in back.listeners and back.changes is not None and key in back.changes.listeners


def test_planner_partial_sync_replans_only_changed() -> None:
    a, b = spn("a"), spn("b")
    planner = Planner()
    s1 = state((svc(a, ip="10.96.0.1"), (ep("10.244.1.11"),)),
               (svc(b, ip="10.96.0.2"), (ep("10.244.1.12"),)))
    full = planner.plan(s1, changed=None, nodeport_ips=["0.0.0.0"])
    assert full.addresses == {"10.96.0.1", "10.96.0.2"}
    # b changes, a is unchanged; then a service goes away
    s2 = state((svc(a, ip="10.96.0.1"), (ep("10.244.1.11"),)),
               (svc(b, ip="10.96.0.2"), (ep("10.244.1.13"),)))
    part = planner.plan(s2, changed=frozenset({ServiceName("default", "b")}), nodeport_ips=["0.0.0.0"])
    assert part.tables[TableKey(b)].endpoints == (("10.244.1.13", 8080),)
    assert part.tables[TableKey(a)].endpoints == (("10.244.1.11", 8080),)
    s3 = state((svc(a, ip="10.96.0.1"), (ep("10.244.1.11"),)))
    gone = planner.plan(s3, changed=frozenset({ServiceName("default", "b")}), nodeport_ips=["0.0.0.0"])
    assert gone.addresses == {"10.96.0.1"} and TableKey(b) not in gone.tables
    # a full plan of the same state from scratch agrees with the incremental one
    assert Planner().plan(s3, changed=None, nodeport_ips=["0.0.0.0"]) == gone


def test_planner_replans_everything_when_node_addresses_change() -> None:
    name = spn()
    planner = Planner()
    s = state((svc(name, type=ServiceType.NODE_PORT, node_port=30080), (ep("10.244.1.11"),)))
    planner.plan(s, changed=None, nodeport_ips=["203.0.113.1"])
    plan = planner.plan(s, changed=frozenset(), nodeport_ips=["198.51.100.1"])
    assert ListenerKey("198.51.100.1", 30080, TCP) in plan.listeners
    assert ListenerKey("203.0.113.1", 30080, TCP) not in plan.listeners


def test_3000_services_each_get_their_listener_and_address() -> None:
    # Only completeness here; planning time is measured by bench/sync_scale.py, not asserted.
    ports = [(svc(f"s{i}", ip=f"10.96.{i // 250}.{i % 250 + 1}"), (ep(f"10.244.{i % 200}.{i % 250 + 1}"),))
             for i in range(3000)]
    plan = Planner().plan(state(*ports), changed=None, nodeport_ips=["0.0.0.0"])
    assert len(plan.listeners) == 3000 and len(plan.addresses) == 3000


def test_nodeport_listen_ips() -> None:
    assert nodeport_listen_ips((), ["203.0.113.1"]) == ["0.0.0.0"]
    assert nodeport_listen_ips(("203.0.113.0/24",), ["203.0.113.1"]) == ["203.0.113.1"]
    assert nodeport_listen_ips(("203.0.113.0/24",), []) == []


@pytest.mark.parametrize(("addresses", "cidrs", "want"), [
    (["127.0.0.1", "203.0.113.1", "198.51.100.1"], [], ["127.0.0.1", "198.51.100.1", "203.0.113.1"]),
    (["127.0.0.1", "203.0.113.1", "198.51.100.1"], ["203.0.113.0/24"], ["203.0.113.1"]),
    (["203.0.113.1", "fd00::1"], ["fd00::/64"], ["fd00::1"]),
    (["203.0.113.1", "fd00::1"], ["0.0.0.0/0"], ["203.0.113.1"]),
    (["203.0.113.1", "203.0.113.1"], ["203.0.113.1/32", "203.0.113.0/24"], ["203.0.113.1"]),
])
def test_filter_addresses(addresses, cidrs, want) -> None:
    assert filter_addresses(addresses, cidrs) == want


@pytest.mark.parametrize("bad", [["not-an-ip"], ["300.1.1.1"], [""]])
def test_filter_addresses_rejects_garbage(bad) -> None:
    with pytest.raises(ValueError):
        filter_addresses(bad, [])


def test_filter_addresses_rejects_bad_cidr() -> None:
    with pytest.raises(ValueError):
        filter_addresses(["10.0.0.1"], ["10.0.0.0/99"])


def test_wildcard_nodeport_sharing_a_port_with_a_service_address_splits_per_node_address() -> None:
    """Without SO_REUSEPORT 0.0.0.0:30080 and 10.96.0.2:30080 cannot both be bound: the NodePort
    listens on each node address instead, the ClusterIP keeps its own listener."""
    a, b = spn("a"), spn("b")
    plans = {a: plan_one(svc(a, "10.96.0.1", type=ServiceType.NODE_PORT, node_port=30080), ()),
             b: plan_one(svc(b, "10.96.0.2", port=30080), ())}
    merged = merge(plans, ["127.0.0.1", "203.0.113.1", "fd00::1"])
    assert ListenerKey("0.0.0.0", 30080, TCP) not in merged.listeners
    assert merged.listeners[ListenerKey("10.96.0.2", 30080, TCP)].name == b
    assert merged.listeners[ListenerKey("203.0.113.1", 30080, TCP)] == TableKey(a, external=True)
    assert merged.listeners[ListenerKey("127.0.0.1", 30080, TCP)] == TableKey(a, external=True)
    assert not any(k.ip == "fd00::1" for k in merged.listeners)
    # No collision: the wildcard stays.
    alone = merge({a: plans[a]}, ["203.0.113.1"])
    assert ListenerKey("0.0.0.0", 30080, TCP) in alone.listeners


# -- IPv6 and dual-stack: one instance, each family planned on its own view with its own endpoints --

CIP6 = "fd00:10:96::10"
POD6 = ("fd00:10:244:1::11", "fd00:10:244:1::12")
NODEPORT_BOTH = ("0.0.0.0", "::")


def dual(name, **fields) -> ServicePort:
    return svc(name, secondary_cluster_ip=CIP6, **fields)


def test_ipv6_single_stack_golden() -> None:
    name = spn()
    port = svc(name, CIP6, type=ServiceType.LOAD_BALANCER, node_port=30080, external_ips=("2001:db8:2::10",),
               load_balancer_ips=("2001:db8:2::20",), load_balancer_source_ranges=("2001:db8:203::/64",),
               affinity_timeout=60)
    plan = plan_one(port, (ep(POD6[0]), ep(POD6[1])), nodeport_ips=NODEPORT_BOTH)
    internal, external = TableKey(name, family=6), TableKey(name, external=True, family=6)
    assert plan.addresses == (CIP6, "2001:db8:2::10", "2001:db8:2::20")
    assert plan.listeners == (
        (ListenerKey(CIP6, 80, TCP), internal),
        (ListenerKey("2001:db8:2::10", 80, TCP), external),
        (ListenerKey("2001:db8:2::20", 80, TCP), external),
        (ListenerKey("::", 30080, TCP), external),
    )
    both = ((POD6[0], 8080), (POD6[1], 8080))
    assert plan.tables == ((internal, TableEntry(both, 60)), (external, TableEntry(both, 60)))
    assert plan.source_ranges == ((ListenerKey("2001:db8:2::20", 80, TCP), ("2001:db8:203::/64",)),)
    assert internal.id == "default/web/TCP/IPv6" and external.id == "default/web/TCP/external/IPv6"
    assert str(ListenerKey(CIP6, 80, TCP)) == f"[{CIP6}]:80/TCP"


def test_dual_stack_golden_per_family() -> None:
    """A dual-stack port listens on both cluster IPs (and each family's external IPs and NodePort
    wildcard), each listener feeding a table of only its own family's endpoints."""
    name = spn()
    port = dual(name, type=ServiceType.NODE_PORT, node_port=30080,
                external_ips=("192.0.2.10", "2001:db8:2::10"), load_balancer_source_ranges=())
    eps4, eps6 = (ep("10.244.1.11"), ep("10.244.1.12")), (ep(POD6[0]),)
    plan = plan_one(port, (*eps4, *eps6), nodeport_ips=NODEPORT_BOTH)
    t4, e4 = TableKey(name), TableKey(name, external=True)
    t6, e6 = TableKey(name, family=6), TableKey(name, external=True, family=6)
    assert plan.addresses == ("10.96.0.10", "192.0.2.10", CIP6, "2001:db8:2::10")
    assert plan.listeners == (
        (ListenerKey("10.96.0.10", 80, TCP), t4),
        (ListenerKey("192.0.2.10", 80, TCP), e4),
        (ListenerKey("0.0.0.0", 30080, TCP), e4),
        (ListenerKey(CIP6, 80, TCP), t6),
        (ListenerKey("2001:db8:2::10", 80, TCP), e6),
        (ListenerKey("::", 30080, TCP), e6),
    )
    v4 = (("10.244.1.11", 8080), ("10.244.1.12", 8080))
    v6 = ((POD6[0], 8080),)
    assert plan.tables == ((t4, TableEntry(v4, 0)), (e4, TableEntry(v4, 0)),
                           (t6, TableEntry(v6, 0)), (e6, TableEntry(v6, 0)))
    # Each family's plan equals the plan of that family's view (kube-proxy's per-family proxier).
    for fam, view_eps in ((4, eps4), (6, eps6)):
        view = port.for_family(fam)
        assert view is not None
        alone = plan_one(view, view_eps, nodeport_ips=NODEPORT_BOTH)
        assert set(alone.listeners) <= set(plan.listeners) and set(alone.tables) <= set(plan.tables)


def test_dual_stack_family_without_endpoints_has_an_empty_table() -> None:
    name = spn()
    plan = plan_one(dual(name), (ep("10.244.1.11"),))
    assert dict(plan.tables)[TableKey(name, family=6)].endpoints == ()
    assert dict(plan.tables)[TableKey(name)].endpoints == (("10.244.1.11", 8080),)


def test_single_stack_port_ignores_the_other_family() -> None:
    """A single-stack IPv4 port never reaches an IPv6 endpoint, external IP or source range."""
    name = spn()
    port = svc(name, type=ServiceType.LOAD_BALANCER, node_port=30080, external_ips=("2001:db8:2::10",),
               load_balancer_ips=("192.0.2.20",), load_balancer_source_ranges=("2001:db8::/32",))
    plan = plan_one(port, (ep("10.244.1.11"), ep(POD6[0])), nodeport_ips=NODEPORT_BOTH)
    assert plan.addresses == ("10.96.0.10", "192.0.2.20")
    assert {k.ip for k, _ in plan.listeners} == {"10.96.0.10", "192.0.2.20", "0.0.0.0"}
    assert all(e.endpoints == (("10.244.1.11", 8080),) for _, e in plan.tables)
    assert plan.source_ranges == ()


def test_families_the_node_does_not_serve_are_left_out() -> None:
    name = spn()
    plan = plan_port(dual(name), (ep("10.244.1.11"), ep(POD6[0])), node_name="node1", node_zone=None,
                     nodeport_ips=["0.0.0.0"], families=(4,))
    assert plan.addresses == ("10.96.0.10",) and [t.family for t, _ in plan.tables] == [4]
    v6_only = plan_port(svc(name, CIP6), (ep(POD6[0]),), node_name="node1", node_zone=None,
                        nodeport_ips=["0.0.0.0"], families=(4,))
    assert v6_only.addresses == () and v6_only.listeners == () and v6_only.tables == ()


def test_planner_partial_sync_of_a_dual_stack_port() -> None:
    name = spn()
    planner = Planner()
    full = planner.plan(state((dual(name), (ep("10.244.1.11"),))), changed=None,
                        nodeport_ips=["0.0.0.0", "::"])
    assert full.addresses == {"10.96.0.10", CIP6}
    part = planner.plan(state((dual(name), (ep("10.244.1.11"), ep(POD6[1])))),
                        changed=frozenset({name.service}), nodeport_ips=["0.0.0.0", "::"])
    # A re-planned port names all its tables; the mode installs only entries that differ.
    assert part.changes is not None and TableKey(name, family=6) in part.changes.tables
    assert part.tables[TableKey(name)] == full.tables[TableKey(name)]
    assert part.tables[TableKey(name, family=6)].endpoints == ((POD6[1], 8080),)
    gone = planner.plan(state((svc(name), (ep("10.244.1.11"),))), changed=frozenset({name.service}),
                        nodeport_ips=["0.0.0.0", "::"])
    assert gone.changes is not None and gone.changes.removed_addresses == {CIP6}
    assert ListenerKey(CIP6, 80, TCP) not in gone.listeners and TableKey(name, family=6) not in gone.tables


@pytest.mark.parametrize(("cidrs", "families", "listen", "node"), [
    ((), (4, 6), ["0.0.0.0", "::"], ["203.0.113.1", "127.0.0.1", "2001:db8:203::1", "::1"]),
    ((), (4,), ["0.0.0.0"], ["203.0.113.1", "127.0.0.1"]),
    # Only IPv4 CIDRs: IPv6 NodePorts stay on every IPv6 address (kube-proxy's per-family rule).
    (("203.0.113.0/24",), (4, 6), ["203.0.113.1", "::"], ["203.0.113.1", "2001:db8:203::1", "::1"]),
    (("2001:db8:203::/64",), (4, 6), ["0.0.0.0", "2001:db8:203::1"], ["203.0.113.1", "127.0.0.1",
                                                                      "2001:db8:203::1"]),
    (("198.51.100.0/24", "2001:db8:198::/64"), (4, 6), [], []),
])
def test_nodeport_addresses_per_family(cidrs, families, listen, node) -> None:
    local = ["203.0.113.1", "127.0.0.1", "2001:db8:203::1", "fe80::1", "::1"]
    node_ips = nodeport_node_ips(cidrs, local, families)
    assert node_ips == node  # never link-local: it binds only with a scope
    assert nodeport_listen_ips(cidrs, node_ips, families) == listen
