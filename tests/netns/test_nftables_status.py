"""nftables status/trace read back from the kernel, both families: every way of reading agrees with the plan.

A full plan of a rich set of services (affinity, source ranges, Local
policies, NodePorts, no endpoints) is loaded into a fresh namespace with
libnftables; then each way ``status.py`` reads the kernel (whole table,
terse rules plus dispatch maps, rules plus the elements of named ports
dumped by ``nlread``) must find it equal to what the planner committed, and
``trace_now`` (rules plus the sets on the way) must give every flow the
planner-text tracer gives. The daemon-level checks with real traffic are in
``test_operability.py``.
"""

from __future__ import annotations

from proxyd.introspect import TracePacket
from proxyd.model import ProxyState, ServiceType
from proxyd.modes.iptables.tracer import flow
from proxyd.modes.nftables import layout as lay
from proxyd.modes.nftables import status as nst
from proxyd.modes.nftables.libnft import Nft
from proxyd.modes.nftables.planner import Planner, PlannerOptions
from tests.builders import endpoint, service_port, state
from tests.netns.topology import Topology, in_netns
from tests.unit.test_nftables_tracer import FLOWS, NODE_IPS, TRACER, _options, _state

V6_NODE = "2001:db8:1::2"


def _v6_state() -> ProxyState:
    sp = dict(namespace="ns", port_name="p80")
    local = endpoint("2001:db8:244::11", 8080, node="node1")
    remote = endpoint("2001:db8:244::12", 8080, node="node2")
    lb = service_port("lb", "2001:db8:96::20", type=ServiceType.LOAD_BALANCER, node_port=30081,  # type: ignore[arg-type]
                      load_balancer_ips=("2001:db8:5::1",), load_balancer_source_ranges=("2001:db8:77::/64",),
                      **sp)
    return state(
        (service_port("web", "2001:db8:96::10", type=ServiceType.NODE_PORT, node_port=30080, **sp),  # type: ignore[arg-type]
         (local, remote)),
        (lb, (endpoint("2001:db8:244::13", 80),)),
        (service_port("sticky", "2001:db8:96::30", affinity_timeout=60, **sp),  # type: ignore[arg-type]
         (endpoint("2001:db8:244::14", 80), endpoint("2001:db8:244::15", 80))),
        (service_port("empty", "2001:db8:96::40", **sp), ()),  # type: ignore[arg-type]
        node="node1")


def _load(nft: Nft, planner: Planner, st: ProxyState) -> None:
    plan = planner.plan(st, None)
    nft.run(plan.text)
    planner.commit(plan)


def _named(nft: Nft, planner: Planner, st: ProxyState) -> nst.ModeStatus:
    names = sorted(st.service_ports)
    snap = nst.read_keys(nft, planner.options.fam, nst.keys_for(planner, st, names))
    return nst.build_status(snap, planner, st, names, whole_table=False)


def _every_read_matches(nft: Nft, planner: Planner, st: ProxyState) -> None:
    fam = planner.options.fam
    whole = nst.build_status(nst.read_table(nft, fam), planner, st, None, whole_table=True)
    dispatch = nst.build_status(nst.read_sets(nft, fam, nst.DISPATCH_SETS), planner, st, None,
                                whole_table=False)
    named = _named(nft, planner, st)
    for how, result in (("whole", whole), ("dispatch", dispatch), ("named", named)):
        assert result.matches is True and not result.mismatches, (fam, how, result.mismatches)
    assert named.counters == whole.counters and whole.counters


def test_every_read_back_equals_the_plan_and_traces_alike_ipv4(topology: Topology) -> None:
    with in_netns(topology.node):
        nft = Nft("library")
        planner, st = Planner(_options()), _state()
        _load(nft, planner, st)
        _every_read_matches(nft, planner, st)
        fam = lay.Family(4)
        for what, src, dst, proto, local, expected in FLOWS:
            ip, _, port = dst.rpartition(":")
            result = nst.trace_now(nft, fam, TracePacket(src, ip, int(port), proto), NODE_IPS)
            assert result.supported, (what, result.notes)
            if local != (src in NODE_IPS):
                continue  # the daemon decides the hook from the source address, the flow table states it
            got = {(p.verdict, p.endpoint, p.masquerade) for p in result.paths}
            outcomes = TRACER.trace(src=src, dst=ip, port=int(port), protocol=proto, local_origin=local)
            want = {(o.verdict, o.destination if o.verdict == "ACCEPT" else None, o.masquerade)
                    for o in outcomes}
            assert got == want, (what, flow(TRACER, src=src, dst=dst, protocol=proto, local_origin=local))
        # Drift through every reader: an endpoint element deleted behind proxyd's back.
        key = next(iter(planner.kernel["svc-backends-tcp"]))
        nft.run(f"delete element {fam.table} svc-backends-tcp {{ {key} }}\n")
        named = _named(nft, planner, st)
        assert any(m.startswith(f"svc-backends-tcp: element {key} : ") for m in named.mismatches), named
        nft.run(f"delete table {fam.table}\n")
        gone = nst.trace_now(nft, fam, TracePacket("10.0.0.2", "172.30.0.41", 80), NODE_IPS)
        assert not gone.supported and "not in the kernel" in gone.notes[0]
        nft.close()


def test_every_read_back_equals_the_plan_and_traces_ipv6(topology: Topology) -> None:
    with in_netns(topology.node):
        nft = Nft("library")
        planner = Planner(PlannerOptions(family=6, cluster_cidrs=("2001:db8:244::/48",), node_ip=V6_NODE))
        st = _v6_state()
        _load(nft, planner, st)
        _every_read_matches(nft, planner, st)
        fam = lay.Family(6)

        def paths(src: str, dst: str, port: int) -> list[tuple[str, str | None, float, bool]]:
            result = nst.trace_now(nft, fam, TracePacket(src, dst, port), [V6_NODE])
            assert result.supported, result.notes
            return [(p.verdict, p.endpoint, round(p.odds, 3), p.masquerade) for p in result.paths]

        assert paths("2001:db8:244::99", "2001:db8:96::10", 80) == [
            ("ACCEPT", "[2001:db8:244::11]:8080", 0.5, False),
            ("ACCEPT", "[2001:db8:244::12]:8080", 0.5, False)]
        assert paths("2001:db8:77::5", "2001:db8:5::1", 80) == [
            ("ACCEPT", "[2001:db8:244::13]:80", 1.0, True)]
        assert paths("2001:db8:99::5", "2001:db8:5::1", 80) == [("DROP", None, 1.0, False)]
        assert paths("2001:db8:244::99", "2001:db8:96::40", 80) == [("REJECT", None, 1.0, False)]
        assert [p[1] for p in paths("2001:db8:244::99", "2001:db8:96::30", 80)] == [
            "[2001:db8:244::14]:80", "[2001:db8:244::15]:80"]
        nft.run(f"delete table {fam.table}\n")
        nft.close()
