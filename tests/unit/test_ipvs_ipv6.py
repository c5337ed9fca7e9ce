"""ipvs mode for IPv6 and dual-stack without a kernel: golden plans per family, the IPv6 netlink
encoding (IPVS services and real servers, inet6 ipset entries), dump parsing filtered by family, the
``KUBE-6-`` set names, the ip6tables ruleset, the per-family mode behind ``DualStackMode``, and the
IPv6 trace/status. No root needed."""

from __future__ import annotations

import asyncio
import socket
import sys
from functools import partial
from typing import Any

import pytest
from pyroute2.netlink.generic import ipvs as genl_ipvs
from pyroute2.netlink.nfnetlink.ipset import ipset_msg

from proxyd.config import Config
from proxyd.introspect import TracePacket
from proxyd.model import Protocol, ServiceType
from proxyd.modes.base import SyncRequest
from proxyd.modes.dualstack import DualStackMode
from proxyd.modes.ipvs import introspect
from proxyd.modes.ipvs import mode as mode_module
from proxyd.modes.ipvs.applier import (
    IpvsApplier,
    KernelDest,
    dest_request,
    entry_text,
    ipset_data,
    ipset_request,
    parse_dest,
    parse_service,
    server_request,
)
from proxyd.modes.ipvs.mode import IpvsMode
from proxyd.modes.ipvs.planner import (
    CLUSTER_IP,
    EXTERNAL_IP,
    HEALTH_CHECK_NODE_PORT,
    IPSETS,
    IPVS_IPS,
    LOAD_BALANCER,
    LOAD_BALANCER_FW,
    LOAD_BALANCER_SOURCE_CIDR,
    LOAD_BALANCER_SOURCE_IP,
    LOOP_BACK,
    NODE_PORT_LOCAL_SCTP,
    NODE_PORT_TCP,
    Op,
    PlanContext,
    RealServer,
    VirtualServer,
    VSKey,
    assemble,
    iptables_rules,
    plan_port,
    set_name,
)
from proxyd.netlink import encode
from tests.builders import endpoint, service_port
from tests.builders import state as state_of
from tests.unit.test_ipvs_planner import FakeApplier, _reply

NODE = "node1"
TCP = Protocol.TCP
V4_NODE, V6_NODE = "203.0.113.1", "2001:db8:203::1"
CTX6 = PlanContext(scheduler="rr", node_name=NODE, family=6, node_ips=(V6_NODE,),
                   local_addresses=frozenset({V6_NODE, "::1"}))
CTX4 = PlanContext(scheduler="rr", node_name=NODE, family=4, node_ips=(V4_NODE,),
                   local_addresses=frozenset({V4_NODE, "127.0.0.1"}))
CIP4, CIP6 = "10.96.0.10", "fd00:10:96::10"
EXT4, EXT6 = "192.0.2.10", "2001:db8:2::10"
LB4, LB6 = "192.0.2.20", "2001:db8:2::20"
P4, P6 = "10.244.1.11", "fd00:10:244:1::11"
REMOTE6 = "fd00:10:244:2::11"

svc = partial(service_port, target_port=8080)
ep = partial(endpoint, node=NODE)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def dual(**fields: Any):
    """A dual-stack port (IPv4 primary) with addresses of both families."""
    return svc(ip=CIP4, secondary_cluster_ip=CIP6, **fields)


# --- planner: golden output per family ---------------------------------------------------------

def test_ipv6_port_plans_every_kind_of_virtual_server() -> None:
    port = svc(ip=CIP6, type=ServiceType.LOAD_BALANCER, node_port=30080, external_ips=(EXT6,),
               load_balancer_ips=(LB6,),
               load_balancer_source_ranges=("2001:db8:203::/64", "2001:db8:9::7/128"),
               health_check_node_port=32100)
    plan = assemble([plan_port(port, (ep(P6), ep(REMOTE6, node="node2")), CTX6)])
    real = (RealServer(P6, 8080), RealServer(REMOTE6, 8080))
    keys = [VSKey(CIP6, 80, TCP), VSKey(EXT6, 80, TCP), VSKey(LB6, 80, TCP), VSKey(V6_NODE, 30080, TCP)]
    assert plan.servers == {k: VirtualServer(k, "rr", 0, 0) for k in keys}
    assert {k: plan.destinations[k] for k in keys} == {k: real for k in keys}
    assert plan.bind == {CIP6, EXT6, LB6}
    got = {name: set(entries) for name, entries in plan.ipsets.items() if entries}
    assert got == {
        LOOP_BACK: {f"{P6},tcp:8080,{P6}"},
        CLUSTER_IP: {f"{CIP6},tcp:80"},
        EXTERNAL_IP: {f"{EXT6},tcp:80"},
        LOAD_BALANCER: {f"{LB6},tcp:80"},
        LOAD_BALANCER_FW: {f"{LB6},tcp:80"},
        # a /128 reads as the bare address, as a /32 does for IPv4 (ipset save's form)
        LOAD_BALANCER_SOURCE_CIDR: {f"{LB6},tcp:80,2001:db8:203::/64", f"{LB6},tcp:80,2001:db8:9::7"},
        # the node's own address is in a source range: the node may reach the LB IP
        LOAD_BALANCER_SOURCE_IP: {f"{LB6},tcp:80,{LB6}"},
        NODE_PORT_TCP: {"30080"},
        HEALTH_CHECK_NODE_PORT: {"32100"},
        IPVS_IPS: {CIP6, EXT6, LB6},
    }
    assert plan.no_node_access == ()


def test_dual_stack_port_is_planned_once_per_family_with_that_familys_endpoints() -> None:
    port = dual(type=ServiceType.NODE_PORT, node_port=30080, external_ips=(EXT4, EXT6),
                load_balancer_source_ranges=("192.0.2.0/24", "2001:db8::/32"))
    eps = (ep(P4), ep(P6))
    plans = {}
    for fam, ctx in ((4, CTX4), (6, CTX6)):
        view = port.for_family(fam)
        assert view is not None
        plans[fam] = assemble([plan_port(view, tuple(e for e in eps if (":" in e.ip) == (fam == 6)), ctx)])
    v4, v6 = plans[4], plans[6]
    assert set(v4.servers) == {VSKey(CIP4, 80, TCP), VSKey(EXT4, 80, TCP), VSKey(V4_NODE, 30080, TCP)}
    assert set(v6.servers) == {VSKey(CIP6, 80, TCP), VSKey(EXT6, 80, TCP), VSKey(V6_NODE, 30080, TCP)}
    assert set(v4.destinations.values()) == {(RealServer(P4, 8080),)}
    assert set(v6.destinations.values()) == {(RealServer(P6, 8080),)}
    assert v4.bind == {CIP4, EXT4} and v6.bind == {CIP6, EXT6}
    assert v4.ipsets[CLUSTER_IP] == {f"{CIP4},tcp:80"} and v6.ipsets[CLUSTER_IP] == {f"{CIP6},tcp:80"}


def test_the_other_familys_addresses_and_endpoints_never_reach_a_plan() -> None:
    # Even handed a whole dual-stack port (not the family's view), each family keeps to its own.
    port = svc(ip=CIP6, external_ips=(EXT4, EXT6), load_balancer_ips=(LB4,), node_port=30080,
               type=ServiceType.LOAD_BALANCER, load_balancer_source_ranges=("192.0.2.0/24",))
    ctx = PlanContext(node_name=NODE, family=6, node_ips=(V4_NODE, V6_NODE))
    plan = assemble([plan_port(port, (ep(P4), ep(P6), ep("fd00::1", 0)), ctx)])
    assert all(":" in k.ip for k in plan.servers)
    assert all(":" in s.ip for ds in plan.destinations.values() for s in ds)
    assert VSKey(V6_NODE, 30080, TCP) in plan.servers and VSKey(V4_NODE, 30080, TCP) not in plan.servers
    # an LB IP of the other family: no virtual server, no firewall entries
    assert not plan.ipsets[LOAD_BALANCER_FW] and not plan.ipsets[LOAD_BALANCER_SOURCE_CIDR]
    # an IPv4 port reaching the IPv6 planner is named, not mis-planned (and vice versa)
    assert "not IPv6" in plan_port(svc(ip=CIP4), (ep(P4),), CTX6).skipped
    assert "not IPv4" in plan_port(svc(ip=CIP6), (ep(P6),), CTX4).skipped


def test_ipv6_sctp_node_port_entries_carry_the_node_address() -> None:
    port = svc(ip=CIP6, protocol=Protocol.SCTP, type=ServiceType.NODE_PORT, node_port=30090)
    plan = assemble([plan_port(port, (ep(P6),), CTX6)])
    assert VSKey(V6_NODE, 30090, Protocol.SCTP) in plan.servers
    assert "KUBE-NODE-PORT-SCTP-HASH" in plan.ipsets and \
        plan.ipsets["KUBE-NODE-PORT-SCTP-HASH"] == {f"{V6_NODE},sctp:30090"}
    assert not plan.ipsets[NODE_PORT_LOCAL_SCTP]


# --- set names and the ip6tables ruleset --------------------------------------------------------

def test_ipv6_sets_get_kube_proxys_kube_6_names_within_ipsets_limit() -> None:
    assert set_name(CLUSTER_IP, 4) == "KUBE-CLUSTER-IP"
    assert set_name(CLUSTER_IP, 6) == "KUBE-6-CLUSTER-IP"
    # kube-proxy cuts names over ipset's 31 characters
    assert set_name(LOAD_BALANCER_SOURCE_CIDR, 6) == "KUBE-6-LOAD-BALANCER-SOURCE-CID"
    assert set_name(NODE_PORT_LOCAL_SCTP, 6) == "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS"
    v4 = {set_name(i.name, 4) for i in IPSETS}
    v6 = {set_name(i.name, 6) for i in IPSETS}
    assert len(v4) == len(v6) == len(IPSETS) and not v4 & v6
    assert max(map(len, v4 | v6)) <= 31


def test_ip6tables_rules_match_the_ipv6_sets() -> None:
    port = svc(ip=CIP6, type=ServiceType.LOAD_BALANCER, node_port=30080, load_balancer_ips=(LB6,),
               load_balancer_source_ranges=("2001:db8:9::/48",))
    plan = assemble([plan_port(port, (ep(P6),), CTX6)])
    rules = iptables_rules(plan, cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/48"), family=6)
    sets = [line.split("--match-set ")[1].split()[0] for line in rules.splitlines() if "--match-set" in line]
    assert sets and all(name.startswith("KUBE-6-") for name in sets)
    assert "-A KUBE-SERVICES -s ::1/128 -j RETURN" in rules and "127.0.0.0/8" not in rules
    # the cluster CIDR of this family decides masquerading of off-cluster ClusterIP traffic
    assert "! -s fd00:10:244::/48 -j KUBE-MARK-MASQ" in rules and "10.244.0.0/16" not in rules
    # the node cannot reach an LB IP whose source ranges exclude it
    assert f"-A KUBE-IPVS-OUT-FILTER -s {LB6} -m ipvs --vaddr {LB6} --vproto tcp --vport 80 -j DROP" in rules
    v4_rules = iptables_rules(assemble([plan_port(svc(), (ep(P4),), CTX4)]),
                              cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/48"))
    assert "KUBE-6-" not in v4_rules and "! -s 10.244.0.0/16 -j KUBE-MARK-MASQ" in v4_rules


# --- applier encoding (what the kernel reads) ---------------------------------------------------

KEY6 = VSKey(CIP6, 80, TCP)
S6 = RealServer(P6, 8080)


def _decoded(req: Any) -> Any:
    msg = genl_ipvs.ipvsmsg(encode(req, 7))
    msg.decode()
    return msg


def test_ipv6_virtual_and_real_server_requests_encode_af_inet6() -> None:
    vs = VirtualServer(KEY6, "rr", 0, 0)
    for op in (Op("add_server", (vs,)), Op("update_server", (vs,)), Op("delete_server", (KEY6,))):
        msg = _decoded(server_request(42, op))
        attrs = dict(msg.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"])
        assert (attrs["IPVS_SVC_ATTR_AF"], attrs["IPVS_SVC_ATTR_ADDR"], attrs["IPVS_SVC_ATTR_PORT"]) == \
            (socket.AF_INET6, CIP6, 80)
        if op.kind != "delete_server":
            # the kernel reads an IPv6 service's netmask as a prefix length in host byte order (a
            # big-endian 128 reads as 2**31 on x86: EINVAL, seen in the guest)
            assert socket.inet_aton(attrs["IPVS_SVC_ATTR_NETMASK"]) == (128).to_bytes(4, sys.byteorder)
    raw = encode(server_request(42, Op("add_server", (vs,))), 1)
    assert socket.inet_pton(socket.AF_INET6, CIP6) in raw and (128).to_bytes(4, sys.byteorder) in raw
    for op in (Op("add_dest", (KEY6, S6, 1)), Op("set_weight", (KEY6, S6, 0)), Op("delete_dest", (KEY6, S6))):
        msg = _decoded(dest_request(42, op))
        dest = dict(msg.get_attr("IPVS_CMD_ATTR_DEST")["attrs"])
        got = (dest["IPVS_DEST_ATTR_ADDR_FAMILY"], dest["IPVS_DEST_ATTR_ADDR"], dest["IPVS_DEST_ATTR_PORT"])
        assert got == (socket.AF_INET6, P6, 8080)
        svc_attrs = dict(msg.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"])
        assert svc_attrs["IPVS_SVC_ATTR_AF"] == socket.AF_INET6
    v4 = _decoded(server_request(42, Op("add_server", (VirtualServer(VSKey(CIP4, 80, TCP), "rr"),))))
    assert dict(v4.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"])["IPVS_SVC_ATTR_NETMASK"] == "255.255.255.255"


@pytest.mark.parametrize(("set_type", "entry"), [
    ("hash:ip,port", f"{CIP6},tcp:80"),
    ("hash:ip,port,ip", f"{P6},udp:53,{P6}"),
    ("hash:ip,port,net", f"{LB6},tcp:80,2001:db8:203::/64"),
    ("hash:ip,port,net", f"{LB6},sctp:80,2001:db8:9::7"),
    ("hash:ip", CIP6),
])
def test_ipv6_ipset_entries_encode_inet6_and_read_back(set_type: str, entry: str) -> None:
    msg = ipset_msg(encode(ipset_request(True, "KUBE-6-X", set_type, entry, family=6), 1))
    msg.decode()
    assert msg["nfgen_family"] == socket.AF_INET6 and msg.get_attr("IPSET_ATTR_SETNAME") == "KUBE-6-X"
    data = msg.get_attr("IPSET_ATTR_DATA")
    ip = dict(dict(data["attrs"])["IPSET_ATTR_IP_FROM"]["attrs"])
    assert ip == {"IPSET_ATTR_IPADDR_IPV6": entry.split(",")[0]}
    assert entry_text(set_type, data) == entry
    if set_type == "hash:ip,port,net" and "/" not in entry:
        assert dict(ipset_data(set_type, entry))["IPSET_ATTR_CIDR2"] == 128


def test_ipv6_applier_refuses_ipv4_entries_and_maps_set_names() -> None:
    applier = IpvsApplier(family=6)
    try:
        with pytest.raises(ValueError, match="not IPv6"):
            applier._request(Op("set_add", (CLUSTER_IP, f"{CIP4},tcp:80")))
        req = applier._request(Op("set_add", (CLUSTER_IP, f"{CIP6},tcp:80")))
        msg = ipset_msg(encode(req, 1))
        msg.decode()
        assert msg.get_attr("IPSET_ATTR_SETNAME") == "KUBE-6-CLUSTER-IP"
        # a port-only entry has no family
        req = applier._request(Op("set_add", (NODE_PORT_TCP, "30080")))
        msg = ipset_msg(encode(req, 1))
        msg.decode()
        assert msg.get_attr("IPSET_ATTR_SETNAME") == "KUBE-6-NODE-PORT-TCP"
    finally:
        applier._pool.shutdown(wait=False)
    with pytest.raises(ValueError):
        IpvsApplier(family=5)


def _service_reply(af: int, addr: str) -> bytes:
    return _reply([("IPVS_CMD_ATTR_SERVICE", {"attrs": [
        ("IPVS_SVC_ATTR_AF", af), ("IPVS_SVC_ATTR_PROTOCOL", 6), ("IPVS_SVC_ATTR_ADDR", addr),
        ("IPVS_SVC_ATTR_PORT", 80), ("IPVS_SVC_ATTR_SCHED_NAME", "rr"),
        ("IPVS_SVC_ATTR_FLAGS", {"flags": 0x0002, "mask": 0xFFFFFFFF}), ("IPVS_SVC_ATTR_TIMEOUT", 0)]})])


def test_dump_replies_are_filtered_by_family() -> None:
    v6 = _service_reply(socket.AF_INET6, CIP6)
    v4 = _service_reply(socket.AF_INET, CIP4)
    assert parse_service(v6, 6) == VirtualServer(KEY6, "rr", 0, 0)
    assert parse_service(v6, 4) is None and parse_service(v4, 6) is None
    assert parse_service(v4) == VirtualServer(VSKey(CIP4, 80, TCP), "rr", 0, 0)
    dest = _reply([("IPVS_CMD_ATTR_DEST", {"attrs": [
        ("IPVS_DEST_ATTR_ADDR_FAMILY", socket.AF_INET6), ("IPVS_DEST_ATTR_ADDR", P6),
        ("IPVS_DEST_ATTR_PORT", 8080), ("IPVS_DEST_ATTR_FWD_METHOD", 0), ("IPVS_DEST_ATTR_WEIGHT", 1),
        ("IPVS_DEST_ATTR_ACTIVE_CONNS", 2), ("IPVS_DEST_ATTR_INACT_CONNS", 0)]})])
    assert parse_dest(dest, 6) == KernelDest(S6, 1, 0, 2, 0)
    assert parse_dest(dest, 4) is None
    # truncated IPv6 replies are skipped, never read past their end
    for cut in (0, 20, 30, 40, len(v6) - 30):
        assert parse_service(v6[:cut], 6) is None


# --- the mode: one instance per family ----------------------------------------------------------

class Fake6(FakeApplier):
    family = 6


def _mode(monkeypatch: pytest.MonkeyPatch, fam: int) -> tuple[IpvsMode, FakeApplier]:
    async def addresses(cidrs: Any, *, family: int | None = None) -> list[str]:
        return {4: [V4_NODE, "127.0.0.1"], 6: [V6_NODE, "fe80::1", "::1"]}[family or 4]

    monkeypatch.setattr(mode_module.nodeaddrs, "node_addresses_async", addresses)
    fake = Fake6() if fam == 6 else FakeApplier()
    return IpvsMode(Config(proxy_mode="ipvs", node_name=NODE), family=fam, applier=fake), fake  # type: ignore[arg-type]


def test_ipv6_instance_syncs_its_familys_view_only(monkeypatch: pytest.MonkeyPatch) -> None:
    m, fake = _mode(monkeypatch, 6)
    assert IpvsMode.per_family and m.family == 6
    port = dual(type=ServiceType.NODE_PORT, node_port=30080)
    state = state_of((port, (ep(P4), ep(P6))))
    run(m.sync(SyncRequest(state.for_family(6), None)))
    # NodePorts on the global node address only: not loopback, not link-local
    assert set(fake.servers) == {KEY6, VSKey(V6_NODE, 30080, TCP)}
    assert set(fake.dests[KEY6]) == {S6}
    assert fake.bound == {CIP6}
    assert fake.sets[CLUSTER_IP] == {f"{CIP6},tcp:80"}
    assert "KUBE-6-CLUSTER-IP" in fake.rules and "-s ::1/128" in fake.rules
    assert m.quarantined() == {}


def test_dual_stack_mode_runs_one_ipvs_instance_per_family() -> None:
    dsm = DualStackMode(Config(proxy_mode="ipvs", node_name=NODE), IpvsMode, (4, 6))
    try:
        got = {fam: (p.family, p.applier.family) for fam, p in dsm.proxiers.items()}  # type: ignore[attr-defined]
        assert got == {4: (4, 4), 6: (6, 6)}
    finally:
        for p in dsm.proxiers.values():
            p.applier._pool.shutdown(wait=False)  # type: ignore[attr-defined]


def test_cleanup_removes_both_families(monkeypatch: pytest.MonkeyPatch) -> None:
    applier = IpvsApplier(family=4)
    asked: list[int | None] = []
    destroyed: list[str] = []

    def read_servers(*, with_dests: bool = True, family: int | None = None) -> dict:
        asked.append(family)
        key = KEY6 if family == 6 else VSKey(CIP4, 80, TCP)
        return {key: (VirtualServer(key, "rr"), {})}

    class IPR:
        def link_lookup(self, **kw: Any) -> list[int]:
            return []

    class IPSet:
        def destroy(self, name: str) -> None:
            destroyed.append(name)

    deleted: list[Op] = []
    monkeypatch.setattr(applier, "read_servers", read_servers)
    monkeypatch.setattr(applier, "apply", lambda ops: deleted.extend(ops) or set())
    applier._ipr, applier._ipset = IPR(), IPSet()  # type: ignore[assignment]
    try:
        assert applier.cleanup() == []
    finally:
        applier._ipr = applier._ipset = None
        applier._pool.shutdown(wait=False)
    assert asked == [4, 6]
    assert [op.args[0] for op in deleted] == [VSKey(CIP4, 80, TCP), KEY6]
    assert "KUBE-CLUSTER-IP" in destroyed and "KUBE-6-CLUSTER-IP" in destroyed
    assert len(destroyed) == 2 * len(IPSETS)


# --- trace and status for IPv6 ------------------------------------------------------------------

def test_ipv6_trace_is_the_ipvs_lookup() -> None:
    port = svc(ip=CIP6, type=ServiceType.NODE_PORT, node_port=30080)
    state = state_of((port, (ep(P6), ep("fd00:10:244:1::12"))))
    s2 = RealServer("fd00:10:244:1::12", 8080)
    table: introspect.KernelTable = {
        KEY6: (VirtualServer(KEY6, "rr"), {S6: {"weight": 1}, s2: {"weight": 1}}),
        VSKey(V6_NODE, 30080, TCP): (VirtualServer(VSKey(V6_NODE, 30080, TCP), "rr"), {S6: {"weight": 1}}),
    }
    inside = introspect.build_trace(table, TracePacket("fd00:10:244:1::13", CIP6, 80, "tcp"), state,
                                    cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/48"))
    assert sorted((p.endpoint, p.odds, p.masquerade) for p in inside.paths) == [
        (f"[{P6}]:8080", 0.5, False), ("[fd00:10:244:1::12]:8080", 0.5, False)]
    outside = introspect.build_trace(table, TracePacket("2001:db8:203::2", CIP6, 80, "tcp"), state,
                                     cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/48"))
    assert all(p.masquerade for p in outside.paths)
    node_port = introspect.build_trace(table, TracePacket("2001:db8:203::2", V6_NODE, 30080, "tcp"), state)
    assert [p.endpoint for p in node_port.paths] == [f"[{P6}]:8080"]
    miss = introspect.build_trace(table, TracePacket("2001:db8:203::2", "2001:db8:2::99", 80, "tcp"), state)
    assert "no IPVS virtual server [2001:db8:2::99]:80/TCP" in miss.paths[0].steps[0]
    plan = assemble([plan_port(port, (ep(P6), ep("fd00:10:244:1::12")), CTX6)])
    status = introspect.build_status(table, plan, state)
    # both virtual servers (ClusterIP and NodePort) count under the service port
    assert set(status.counters["default/web/TCP"]) == {f"[{P6}]:8080", "[fd00:10:244:1::12]:8080"}
    assert status.matches is False
    assert status.mismatches == [f"virtual server [{V6_NODE}]:30080/TCP: real server "
                                 "[fd00:10:244:1::12]:8080 missing"]
