"""ipvs mode without a kernel: the planner, the applier's pure helpers, graceful termination and the
mode's diff logic (against a fake applier that records every kernel call). No root needed."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from pyroute2.netlink.generic import ipvs as genl_ipvs
from pyroute2.netlink.nfnetlink.ipset import ipset_msg

from proxyd import metrics
from proxyd.config import Config
from proxyd.model import (
    Endpoint,
    Protocol,
    ServiceName,
    ServicePort,
    ServiceType,
)
from proxyd.modes.base import SyncRequest
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
from proxyd.modes.ipvs.graceful import GracefulTerminator
from proxyd.modes.ipvs.mode import IpvsMode, ipvs_sysctls
from proxyd.modes.ipvs.planner import (
    CLUSTER_IP,
    EXTERNAL_IP,
    EXTERNAL_IP_LOCAL,
    FLAG_PERSISTENT,
    FLAG_SOURCE_HASH,
    IPSETS,
    IPVS_IPS,
    LOAD_BALANCER,
    LOAD_BALANCER_FW,
    LOAD_BALANCER_LOCAL,
    LOAD_BALANCER_SOURCE_CIDR,
    LOAD_BALANCER_SOURCE_IP,
    LOOP_BACK,
    NODE_PORT_LOCAL_TCP,
    NODE_PORT_SCTP,
    NODE_PORT_TCP,
    NODE_PORT_UDP,
    Op,
    PlanContext,
    RealServer,
    VirtualServer,
    VSKey,
    assemble,
    iptables_rules,
    plan_port,
    validate_scheduler,
)
from proxyd.netfilter.jumps import saved_jumps
from proxyd.netlink import encode
from tests.builders import endpoint, service_port
from tests.builders import state as state_of

NODE = "node1"
CTX = PlanContext(scheduler="rr", node_name=NODE, node_ips=("203.0.113.1", "198.51.100.1"),
                  local_addresses=frozenset({"203.0.113.1", "198.51.100.1", "127.0.0.1"}))
TCP = Protocol.TCP


svc = partial(service_port, target_port=8080)
ep = partial(endpoint, node=NODE)


LOCAL1, LOCAL2, REMOTE = ep("10.244.1.11"), ep("10.244.1.12"), ep("10.244.2.11", node="node2")


def dests(*eps: Endpoint) -> tuple[RealServer, ...]:
    return tuple(sorted(RealServer(e.ip, e.port) for e in eps))


def plan_of(*ports: tuple[ServicePort, tuple[Endpoint, ...]], ctx: PlanContext = CTX):
    return assemble(plan_port(s, eps, ctx) for s, eps in ports)


# --- planner -----------------------------------------------------------------------------------

def test_cluster_ip_virtual_server_with_every_ready_endpoint() -> None:
    plan = plan_of((svc(), (LOCAL2, LOCAL1, REMOTE, ep("10.244.1.13", ready=False, serving=False))))
    key = VSKey("10.96.0.10", 80, TCP)
    assert plan.servers == {key: VirtualServer(key, "rr", 0, 0)}
    assert plan.destinations[key] == dests(LOCAL1, LOCAL2, REMOTE)
    assert plan.bind == frozenset({"10.96.0.10"})
    assert plan.ipsets[CLUSTER_IP] == {"10.96.0.10,tcp:80"}
    assert plan.ipsets[IPVS_IPS] == {"10.96.0.10"}
    # hairpin entries for every endpoint on this node, ready or not (as kube-proxy), none for remote ones
    assert plan.ipsets[LOOP_BACK] == {f"10.244.1.{n},tcp:8080,10.244.1.{n}" for n in (11, 12, 13)}


def test_no_endpoints_keeps_the_virtual_server_without_real_servers() -> None:
    # The kernel answers ICMP port unreachable for a virtual server without real servers: a refusal.
    plan = plan_of((svc(), ()))
    key = VSKey("10.96.0.10", 80, TCP)
    assert key in plan.servers and plan.destinations[key] == ()


def test_serving_terminating_used_when_nothing_is_ready() -> None:
    term = ep("10.244.1.11", ready=False, serving=True, terminating=True)
    gone = ep("10.244.1.12", ready=False, serving=False, terminating=True)
    plan = plan_of((svc(), (term, gone)))
    assert plan.destinations[VSKey("10.96.0.10", 80, TCP)] == dests(term)


def test_affinity_is_persistence_and_mh_sets_source_hash() -> None:
    plan = plan_of((svc(affinity_timeout=600), (LOCAL1,)))
    vs = plan.servers[VSKey("10.96.0.10", 80, TCP)]
    assert (vs.flags, vs.timeout) == (FLAG_PERSISTENT, 600)
    ctx = PlanContext(scheduler="mh", node_name=NODE)
    vs = plan_of((svc(), (LOCAL1,)), ctx=ctx).servers[VSKey("10.96.0.10", 80, TCP)]
    assert (vs.scheduler, vs.flags) == ("mh", FLAG_SOURCE_HASH)


def test_node_port_on_every_node_address() -> None:
    s = svc(type=ServiceType.NODE_PORT, node_port=30080)
    plan = plan_of((s, (LOCAL1, REMOTE)))
    for ip in CTX.node_ips:
        assert plan.destinations[VSKey(ip, 30080, TCP)] == dests(LOCAL1, REMOTE)
    assert plan.ipsets[NODE_PORT_TCP] == {"30080"}
    assert not plan.ipsets[NODE_PORT_LOCAL_TCP]
    # node addresses are never bound to kube-ipvs0
    assert plan.bind == frozenset({"10.96.0.10"})


def test_node_port_without_node_addresses_makes_no_virtual_server() -> None:
    plan = plan_of((svc(type=ServiceType.NODE_PORT, node_port=30080), (LOCAL1,)),
                   ctx=PlanContext(node_name=NODE))
    assert set(plan.servers) == {VSKey("10.96.0.10", 80, TCP)}
    assert not plan.ipsets[NODE_PORT_TCP]


def test_udp_and_sctp_node_port_sets() -> None:
    plan = plan_of((svc("dns", port=53, protocol=Protocol.UDP, type=ServiceType.NODE_PORT, node_port=30053),
                    (LOCAL1,)),
                   (svc("sig", ip="10.96.0.11", port=9, protocol=Protocol.SCTP, type=ServiceType.NODE_PORT,
                        node_port=30009), (LOCAL1,)))
    assert plan.ipsets[NODE_PORT_UDP] == {"30053"}
    assert plan.ipsets[NODE_PORT_SCTP] == {"203.0.113.1,sctp:30009", "198.51.100.1,sctp:30009"}
    assert plan.ipsets[CLUSTER_IP] == {"10.96.0.10,udp:53", "10.96.0.11,sctp:9"}


def test_external_traffic_policy_local() -> None:
    s = svc(type=ServiceType.LOAD_BALANCER, node_port=30080, external_ips=("192.0.2.10",),
            load_balancer_ips=("192.0.2.20",), external_policy_local=True)
    plan = plan_of((s, (LOCAL1, REMOTE)))
    # cluster traffic reaches every endpoint; external traffic only the local one
    assert plan.destinations[VSKey("10.96.0.10", 80, TCP)] == dests(LOCAL1, REMOTE)
    for key in (VSKey("192.0.2.10", 80, TCP), VSKey("192.0.2.20", 80, TCP), VSKey("203.0.113.1", 30080, TCP)):
        assert plan.destinations[key] == dests(LOCAL1), key
    assert plan.ipsets[EXTERNAL_IP_LOCAL] == {"192.0.2.10,tcp:80"} and not plan.ipsets[EXTERNAL_IP]
    assert plan.ipsets[LOAD_BALANCER_LOCAL] == {"192.0.2.20,tcp:80"}
    assert plan.ipsets[NODE_PORT_LOCAL_TCP] == {"30080"} and plan.ipsets[NODE_PORT_TCP] == {"30080"}
    # no local endpoint: external virtual servers get none (refused), cluster traffic still served
    plan = plan_of((s, (REMOTE,)))
    assert plan.destinations[VSKey("203.0.113.1", 30080, TCP)] == ()
    assert plan.destinations[VSKey("10.96.0.10", 80, TCP)] == dests(REMOTE)


def test_internal_traffic_policy_local() -> None:
    plan = plan_of((svc(internal_policy_local=True), (LOCAL1, REMOTE)))
    assert plan.destinations[VSKey("10.96.0.10", 80, TCP)] == dests(LOCAL1)
    plan = plan_of((svc(internal_policy_local=True), (REMOTE,)))
    assert plan.destinations[VSKey("10.96.0.10", 80, TCP)] == ()


def test_external_ip_that_is_a_node_address_is_not_bound() -> None:
    plan = plan_of((svc(external_ips=("203.0.113.1", "192.0.2.10")), (LOCAL1,)))
    assert plan.bind == frozenset({"10.96.0.10", "192.0.2.10"})
    assert VSKey("203.0.113.1", 80, TCP) in plan.servers
    assert plan.ipsets[EXTERNAL_IP] == {"203.0.113.1,tcp:80", "192.0.2.10,tcp:80"}


def test_load_balancer_source_ranges() -> None:
    s = svc(type=ServiceType.LOAD_BALANCER, load_balancer_ips=("192.0.2.20",),
            load_balancer_source_ranges=("203.0.113.0/24", "198.51.100.7/32", "2001:db8::/64"))
    plan = plan_of((s, (LOCAL1,)))
    assert plan.ipsets[LOAD_BALANCER] == {"192.0.2.20,tcp:80"}
    assert plan.ipsets[LOAD_BALANCER_FW] == {"192.0.2.20,tcp:80"}
    assert plan.ipsets[LOAD_BALANCER_SOURCE_CIDR] == {"192.0.2.20,tcp:80,203.0.113.0/24",
                                                      "192.0.2.20,tcp:80,198.51.100.7"}
    # the node (203.0.113.1) is in a range: it may reach the LB IP with the LB IP as source
    assert plan.ipsets[LOAD_BALANCER_SOURCE_IP] == {"192.0.2.20,tcp:80,192.0.2.20"}
    assert plan.no_node_access == ()
    plan = plan_of((svc(type=ServiceType.LOAD_BALANCER, load_balancer_ips=("192.0.2.20",),
                        load_balancer_source_ranges=("192.0.2.128/25",)), (LOCAL1,)))
    assert plan.no_node_access == (("192.0.2.20", "tcp", 80),)
    assert ("-A KUBE-IPVS-OUT-FILTER -s 192.0.2.20 -m ipvs --vaddr 192.0.2.20 --vproto tcp --vport 80 -j "
            "DROP") \
        in iptables_rules(plan)


def test_hostile_endpoints_and_ipv6_are_left_out() -> None:
    weird = (ep("10.244.1.11", 0), ep("10.244.1.12", 70000), ep("fd00::1"), LOCAL1, LOCAL1)
    plan = plan_of((svc(external_ips=("2001:db8::1",), load_balancer_ips=("2001:db8::2",)), weird))
    assert plan.destinations[VSKey("10.96.0.10", 80, TCP)] == dests(LOCAL1)
    assert set(plan.servers) == {VSKey("10.96.0.10", 80, TCP)}
    v6 = plan_port(svc(ip="fd00::10"), (LOCAL1,), CTX)
    assert v6.skipped and not v6.servers


def test_conflicting_ports_first_keeps_the_virtual_server() -> None:
    a = svc("a", external_ips=("192.0.2.10",))
    b = svc("b", ip="10.96.0.11", external_ips=("192.0.2.10",), affinity_timeout=30)
    plan = plan_of((a, (LOCAL1,)), (b, (LOCAL2,)))
    key = VSKey("192.0.2.10", 80, TCP)
    assert plan.destinations[key] == dests(LOCAL1)
    assert plan.conflicts == (str(key),)


def test_2000_services_are_complete_and_the_ruleset_stays_constant() -> None:
    # Only completeness and the fixed ruleset size here; planning time is measured by bench/sync_scale.py.
    ports = [(svc(f"s{i}", ip=f"10.96.{i // 250}.{i % 250 + 1}"), (ep(f"10.244.{i // 250}.{i % 250 + 1}"),))
             for i in range(2000)]
    plan = plan_of(*ports)
    assert len(plan.servers) == 2000 and len(plan.ipsets[CLUSTER_IP]) == 2000
    # the ruleset does not grow with the number of services
    assert len(iptables_rules(plan).splitlines()) < 60


@pytest.mark.parametrize("name", ["rr", "wrr", "lc", "wlc", "sh", "dh", "sed", "nq", "mh"])
def test_schedulers_accepted(name: str) -> None:
    assert validate_scheduler(name) == name


@pytest.mark.parametrize("name", ["", "RR", "rr;reboot", "x" * 10000, "ip_vs_rr"])
def test_bad_schedulers_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="scheduler"):
        validate_scheduler(name)


# --- iptables ruleset ---------------------------------------------------------------------------

def test_rules_masquerade_choices() -> None:
    plan = plan_of((svc(), (LOCAL1,)))
    with_cidr = iptables_rules(plan, cluster_cidrs=("10.244.0.0/16",))
    assert ("-m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ") in with_cidr
    assert ("--match-set KUBE-CLUSTER-IP dst,dst -j "
            "KUBE-MARK-MASQ") in iptables_rules(plan, masquerade_all=True)
    assert "--match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ" in iptables_rules(plan)
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000" in with_cidr
    assert "--or-mark 0x000100" in iptables_rules(plan, masquerade_bit=8)


def test_rules_only_for_sets_in_use() -> None:
    rules = iptables_rules(plan_of((svc(), (LOCAL1,))))
    assert ("KUBE-NODE-PORT-TCP" not in rules and "KUBE-LOAD-BALANCER dst,dst -j "
            "KUBE-LOAD-BALANCER") not in rules
    # KUBE-IPVS-FILTER always rejects new connections to other ports of service IPs
    assert ("-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j "
            "REJECT") in rules
    rules = iptables_rules(plan_of((svc(type=ServiceType.NODE_PORT, node_port=30080), (LOCAL1,))))
    assert "-A KUBE-NODE-PORT -p tcp" in rules and "KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ" in rules
    # both tables, each committed, chains declared so a restore rewrites them whole
    assert rules.count("COMMIT") == 2 and ":KUBE-IPVS-FILTER - [0:0]" in rules


# --- applier helpers (pure) ---------------------------------------------------------------------

@pytest.mark.parametrize(("set_type", "entry"), [
    ("hash:ip,port", "10.96.0.10,tcp:80"),
    ("hash:ip,port,ip", "10.244.1.11,udp:53,10.244.1.11"),
    ("hash:ip,port,net", "192.0.2.20,tcp:80,203.0.113.0/24"),
    ("hash:ip,port,net", "192.0.2.20,sctp:80,203.0.113.7"),
    ("bitmap:port", "30080"),
    ("hash:ip", "10.96.0.10"),
])
def test_entry_round_trip(set_type: str, entry: str) -> None:
    data = dict(ipset_data(set_type, entry))
    # what the kernel lists for that element reads back as the same text
    attrs: list = []
    parts = entry.split(",")
    if set_type == "bitmap:port":
        attrs.append(("IPSET_ATTR_PORT_FROM", int(entry)))
    else:
        attrs.append(("IPSET_ATTR_IP_FROM", {"attrs": [("IPSET_ATTR_IPADDR_IPV4", parts[0])]}))
    if len(parts) > 1:
        attrs += [("IPSET_ATTR_PORT_FROM", data["IPSET_ATTR_PORT_FROM"]),
                  ("IPSET_ATTR_PROTO", data["IPSET_ATTR_PROTO"])]
    if len(parts) > 2:
        ip2, _, cidr = parts[2].partition("/")
        attrs.append(("IPSET_ATTR_IP2", {"attrs": [("IPSET_ATTR_IPADDR_IPV4", ip2)]}))
        if cidr:
            attrs.append(("IPSET_ATTR_CIDR2", int(cidr)))
    assert entry_text(set_type, {"attrs": attrs}) == entry


@pytest.mark.parametrize(("set_type", "entry"), [
    ("hash:ip,port", "10.96.0.10"), ("hash:ip,port", "10.96.0.10,icmp:80"), ("hash:ip,port", "1.2.3.4,tcp:x"),
    ("bitmap:port", "-1"), ("bitmap:port", "80,81"), ("hash:ip,port,ip", "1,2"), ("hash:nope", "1.2.3.4"),
    ("hash:ip,port", "," * 5000),
])
def test_bad_entries_rejected(set_type: str, entry: str) -> None:
    with pytest.raises(ValueError):
        ipset_data(set_type, entry)


def test_saved_jumps() -> None:
    saved = ("*nat\n:PREROUTING ACCEPT [0:0]\n"
             '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n'
             "-A OUTPUT -j KUBE-SERVICES\n-A garbage\nCOMMIT\n*filter\n"
             "-A INPUT -m comment --comment kube-proxy -j KUBE-IPVS-FILTER\nCOMMIT\n")
    assert saved_jumps(saved) == {("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
                                  ("nat", "OUTPUT", "KUBE-SERVICES", ""),
                                  ("filter", "INPUT", "KUBE-IPVS-FILTER", "kube-proxy")}


def test_sysctls_follow_kernel_version() -> None:
    new = ipvs_sysctls(strict_arp=False, kernel_release="6.1.0-56-amd64")
    assert new["net/ipv4/vs/conntrack"] == 1 and "net/ipv4/vs/conn_reuse_mode" not in new
    assert ipvs_sysctls(strict_arp=False, kernel_release="5.4.0")["net/ipv4/vs/conn_reuse_mode"] == 0
    strict = ipvs_sysctls(strict_arp=True, kernel_release="garbage")
    assert (strict["net/ipv4/conf/all/arp_ignore"], strict["net/ipv4/conf/all/arp_announce"]) == (1, 2)


# --- a fake kernel for graceful termination and the mode's diff ---------------------------------

class FakeApplier:
    """Records calls and keeps an in-memory 'kernel' with the applier's interface."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.servers: dict[VSKey, VirtualServer] = {}
        self.dests: dict[VSKey, dict[RealServer, list[int]]] = {}  # [weight, active, inactive]
        self.sets: dict[str, set[str]] = {}
        self.bound: set[str] = set()
        self.rules = ""
        self.refuse: set[Op] = set()  # operations the fake kernel refuses
        self.refusals: dict[Op, str] = {}  # the reason of each refused in the last apply (as the real one)
        self.gone: list[str] = []

    async def call(self, func: Callable[..., Any], *args: Any) -> Any:
        return func(*args)

    async def aclose(self) -> None:
        pass

    def log(self, *call: Any) -> None:
        self.calls.append(call)

    def load_modules(self, scheduler: str) -> None:
        pass

    def set_sysctls(self, values: dict) -> list[str]:
        return []

    def ensure_device(self) -> int:
        return 7

    def ensure_sets(self) -> None:
        for info in IPSETS:
            self.sets.setdefault(info.name, set())

    def read_servers(self) -> dict:
        return {k: (vs, self.read_dests(k)) for k, vs in self.servers.items()}

    def read_dests(self, key: VSKey) -> dict[RealServer, KernelDest]:
        return {s: KernelDest(s, w, 0, a, i) for s, (w, a, i) in self.dests.get(key, {}).items()}

    def read_sets(self) -> dict[str, set[str]]:
        return {k: set(v) for k, v in self.sets.items()}

    def read_bound(self) -> set[str]:
        return set(self.bound)

    def bind(self, add: Any, remove: Any) -> None:
        self.log("bind", tuple(add), tuple(remove))
        self.bound |= set(add)
        self.bound -= set(remove)

    def add_server(self, vs: VirtualServer) -> None:
        self.log("add_server", vs.key)
        self.servers[vs.key] = vs
        self.dests.setdefault(vs.key, {})

    def update_server(self, vs: VirtualServer) -> None:
        self.log("update_server", vs.key)
        self.servers[vs.key] = vs

    def delete_server(self, key: VSKey) -> None:
        self.log("delete_server", key)
        self.servers.pop(key, None)
        self.dests.pop(key, None)

    def add_dest(self, key: VSKey, server: RealServer, weight: int = 1) -> None:
        self.log("add_dest", key, server)
        self.dests[key][server] = [weight, 0, 0]

    def set_weight(self, key: VSKey, server: RealServer, weight: int) -> None:
        self.log("set_weight", key, server, weight)
        self.dests[key][server][0] = weight

    def delete_dest(self, key: VSKey, server: RealServer) -> None:
        self.log("delete_dest", key, server)
        self.dests.get(key, {}).pop(server, None)

    def change_set(self, name: str, add: Any, remove: Any) -> None:
        self.log("change_set", name, tuple(add), tuple(remove))
        self.sets.setdefault(name, set()).update(add)
        self.sets[name].difference_update(remove)

    async def restore(self, rules: str, *, ensure_jumps: bool = False) -> None:
        self.log("restore", ensure_jumps)
        self.rules = rules

    def apply(self, ops: Any) -> set[Op]:
        """The real applier's entry point: each operation becomes one call above; refused ones returned."""
        failed = set()
        self.refusals = {}
        for op in ops:
            if op in self.refuse:
                failed.add(op)
                self.refusals[op] = f"{op}: error 4105 (Hash is full)"
                continue
            if op.kind in ("set_add", "set_del"):
                name, entry = op.args
                adding = op.kind == "set_add"
                self.change_set(name, (entry,) if adding else (), () if adding else (entry,))
            elif op.kind in ("bind", "unbind"):
                self.bind(op.args if op.kind == "bind" else (), op.args if op.kind == "unbind" else ())
            else:
                getattr(self, op.kind)(*op.args)
        return failed
    async def netfilter(self) -> FakeApplier:
        return self

    async def missing(self, jumps: Any, canary_tables: Any = ()) -> list[str]:
        self.log("missing")
        return list(self.gone)


KEY = VSKey("10.96.0.10", 80, TCP)
S1, S2 = RealServer("10.244.1.11", 8080), RealServer("10.244.1.12", 8080)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_graceful_tcp_drains_then_deletes() -> None:
    fake = FakeApplier()
    fake.add_server(VirtualServer(KEY, "rr"))
    fake.add_dest(KEY, S1)
    fake.dests[KEY][S1][1] = 1  # one active connection
    grace = GracefulTerminator(fake)  # type: ignore[arg-type]
    assert run(grace.remove(KEY, S1)) is False
    assert fake.dests[KEY][S1][0] == 0 and (KEY, S1) in grace
    assert run(grace.check()) == []  # still busy
    fake.dests[KEY][S1][1:] = [0, 0]
    assert run(grace.check()) == [(KEY, S1)]
    assert S1 not in fake.dests[KEY] and len(grace) == 0


def test_graceful_udp_deleted_at_once_and_cancel() -> None:
    fake = FakeApplier()
    udp = VSKey("10.96.0.10", 53, Protocol.UDP)
    fake.add_server(VirtualServer(udp, "rr"))
    fake.add_dest(udp, S1)
    grace = GracefulTerminator(fake)  # type: ignore[arg-type]
    assert run(grace.remove(udp, S1)) is True and S1 not in fake.dests[udp]
    fake.add_server(VirtualServer(KEY, "rr"))
    fake.add_dest(KEY, S2)
    fake.dests[KEY][S2][2] = 3
    run(grace.remove(KEY, S2))
    assert grace.cancel(KEY, S2) and not grace.cancel(KEY, S2)


def test_graceful_max_wait_bounds_the_drain() -> None:
    now = [0.0]
    fake = FakeApplier()
    fake.add_server(VirtualServer(KEY, "rr"))
    fake.add_dest(KEY, S1)
    fake.dests[KEY][S1][1] = 5
    grace = GracefulTerminator(fake, max_wait=60, clock=lambda: now[0])  # type: ignore[arg-type]
    run(grace.remove(KEY, S1))
    now[0] = 59
    assert run(grace.check()) == []
    now[0] = 60
    assert run(grace.check()) == [(KEY, S1)]


@pytest.fixture
def mode(monkeypatch: pytest.MonkeyPatch) -> tuple[IpvsMode, FakeApplier]:
    async def addresses(cidrs: Any, *, family: int | None = None) -> list[str]:
        return ["203.0.113.1"]

    monkeypatch.setattr(mode_module.nodeaddrs, "node_addresses_async", addresses)
    fake = FakeApplier()
    return IpvsMode(Config(proxy_mode="ipvs", node_name=NODE), applier=fake), fake  # type: ignore[arg-type]


def test_mode_adopts_and_changes_only_differences(mode: tuple[IpvsMode, FakeApplier]) -> None:
    m, fake = mode
    # What a previous run left: the wanted service (one dest draining), and a stale one.
    stale = VSKey("10.96.0.99", 80, TCP)
    fake.ensure_sets()
    fake.add_server(VirtualServer(KEY, "rr"))
    fake.add_dest(KEY, S1)
    fake.set_weight(KEY, S1, 0)
    fake.add_server(VirtualServer(stale, "rr"))
    fake.sets[CLUSTER_IP] = {"10.96.0.10,tcp:80", "10.96.0.99,tcp:80"}
    fake.bound = {"10.96.0.10", "10.96.0.99"}
    fake.calls.clear()
    run(m.sync(SyncRequest(state_of((svc(), (LOCAL1,))), None)))
    assert ("add_server", KEY) not in fake.calls  # adopted, not recreated
    assert ("set_weight", KEY, S1, 1) in fake.calls
    assert ("delete_server", stale) in fake.calls
    assert fake.sets[CLUSTER_IP] == {"10.96.0.10,tcp:80"} and fake.bound == {"10.96.0.10"}
    assert fake.calls[-1][0] != "restore" and ("restore", True) in fake.calls
    # a second full sync of the same state changes nothing but rewrites the rules
    fake.calls.clear()
    run(m.sync(SyncRequest(state_of((svc(), (LOCAL1,))), None)))
    assert fake.calls == [("restore", True)]


def test_mode_partial_sync_touches_only_the_change(mode: tuple[IpvsMode, FakeApplier]) -> None:
    m, fake = mode
    other = svc("other", ip="10.96.0.11")
    run(m.sync(SyncRequest(state_of((svc(), (LOCAL1,)), (other, (LOCAL2,))), None)))
    fake.calls.clear()
    state = state_of((svc(), (LOCAL1, LOCAL2)), (other, (LOCAL2,)))
    run(m.sync(SyncRequest(state, frozenset({ServiceName("default", "web")}))))
    # (the hairpin entry of 10.244.1.12 already exists for "other")
    assert fake.calls == [("add_dest", KEY, S2)]
    # an endpoint leaves: drained (weight 0), not deleted while the check has not run
    fake.calls.clear()
    fake.dests[KEY][S1][1] = 1
    state = state_of((svc(), (LOCAL2,)), (other, (LOCAL2,)))
    run(m.sync(SyncRequest(state, frozenset({ServiceName("default", "web")}))))
    assert ("set_weight", KEY, S1, 0) in fake.calls and S1 in fake.dests[KEY]
    # the service goes away entirely
    fake.calls.clear()
    run(m.sync(SyncRequest(state_of((other, (LOCAL2,))), frozenset({ServiceName("default", "web")}))))
    assert ("delete_server", KEY) in fake.calls and KEY not in fake.servers
    assert "10.96.0.10" not in fake.bound and len(m.graceful) == 0


def test_mode_repairs_jumps_found_gone_once_per_sync_period(monkeypatch: pytest.MonkeyPatch) -> None:
    async def addresses(cidrs: Any, *, family: int | None = None) -> list[str]:
        return ["203.0.113.1"]

    monkeypatch.setattr(mode_module.nodeaddrs, "node_addresses_async", addresses)
    now = [100.0]
    monkeypatch.setattr(mode_module.time, "monotonic", lambda: now[0])
    fake = FakeApplier()
    m = IpvsMode(Config(proxy_mode="ipvs", node_name=NODE, sync_period=30.0), applier=fake)  # type: ignore[arg-type]
    repairs = metrics.NETFILTER_REPAIRS.labels(mode="ipvs")._value.get()
    state = state_of((svc(), (LOCAL1,)))
    unchanged = frozenset({ServiceName("default", "web")})
    run(m.sync(SyncRequest(state, None)))
    fake.gone = ["nat PREROUTING -> KUBE-SERVICES"]
    fake.calls.clear()
    run(m.sync(SyncRequest(state, unchanged)))
    assert fake.calls == []  # within the period of the full sync: no check
    now[0] += 30
    run(m.sync(SyncRequest(state, unchanged)))
    assert fake.calls == [("missing",), ("restore", True)]
    assert metrics.NETFILTER_REPAIRS.labels(mode="ipvs")._value.get() == repairs + 1
    fake.gone = []
    fake.calls.clear()
    now[0] += 30
    run(m.sync(SyncRequest(state, unchanged)))
    assert fake.calls == [("missing",)]


def test_mode_failure_forces_a_kernel_reread(mode: tuple[IpvsMode, FakeApplier]) -> None:
    m, fake = mode
    run(m.sync(SyncRequest(state_of((svc(), (LOCAL1,))), None)))

    async def broken(rules: str, *, ensure_jumps: bool = False) -> None:
        raise RuntimeError("iptables-restore failed")

    fake.restore = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        changed = svc(type=ServiceType.NODE_PORT, node_port=30080)  # new set in use: the rules change
        run(m.sync(SyncRequest(state_of((changed, (LOCAL1,))), frozenset({ServiceName("default", "web")}))))
    assert m._held is None  # the next sync re-reads the kernel whatever it is asked


def test_ipvs_requests_encode_what_the_kernel_expects() -> None:
    """The batched IPVS requests decode (with pyroute2's own parser) to the attributes the kernel reads."""
    vs = VirtualServer(KEY, "rr", FLAG_PERSISTENT, 10800)
    for op, cmd in ((Op("add_server", (vs,)), genl_ipvs.IPVS_CMD_NEW_SERVICE),
                    (Op("update_server", (vs,)), genl_ipvs.IPVS_CMD_SET_SERVICE),
                    (Op("delete_server", (KEY,)), genl_ipvs.IPVS_CMD_DEL_SERVICE),
                    (Op("add_dest", (KEY, S1, 1)), genl_ipvs.IPVS_CMD_NEW_DEST),
                    (Op("set_weight", (KEY, S1, 0)), genl_ipvs.IPVS_CMD_SET_DEST),
                    (Op("delete_dest", (KEY, S1)), genl_ipvs.IPVS_CMD_DEL_DEST)):
        build = server_request if "server" in op.kind else dest_request
        req = build(42, op)
        msg = genl_ipvs.ipvsmsg(encode(req, 7))
        msg.decode()
        assert (msg["header"]["type"], msg["header"]["sequence_number"], msg["cmd"]) == (42, 7, cmd)
        svc_attrs = dict(msg.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"])
        assert (svc_attrs["IPVS_SVC_ATTR_ADDR"], svc_attrs["IPVS_SVC_ATTR_PORT"],
                svc_attrs["IPVS_SVC_ATTR_PROTOCOL"]) == ("10.96.0.10", 80, 6)
        if op.kind in ("add_server", "update_server"):
            assert svc_attrs["IPVS_SVC_ATTR_SCHED_NAME"] == "rr"
            assert svc_attrs["IPVS_SVC_ATTR_TIMEOUT"] == 10800
            assert svc_attrs["IPVS_SVC_ATTR_FLAGS"]["flags"] == FLAG_PERSISTENT
        if "dest" in op.kind or op.kind == "set_weight":
            dest = dict(msg.get_attr("IPVS_CMD_ATTR_DEST")["attrs"])
            assert (dest["IPVS_DEST_ATTR_ADDR"], dest["IPVS_DEST_ATTR_PORT"]) == ("10.244.1.11", 8080)
            if op.kind != "delete_dest":
                assert (dest["IPVS_DEST_ATTR_WEIGHT"], dest["IPVS_DEST_ATTR_FWD_METHOD"]) == (op.args[2], 0)


def test_ipset_entries_encode_for_every_set_type() -> None:
    for set_type, entry in (("bitmap:port", "30080"), ("hash:ip", "10.96.0.1"),
                            ("hash:ip,port", "10.96.0.1,udp:53"),
                            ("hash:ip,port,ip", "10.244.1.2,tcp:80,10.244.1.2"),
                            ("hash:ip,port,net", "10.96.0.1,tcp:80,192.0.2.0/24")):
        msg = ipset_msg(encode(ipset_request(True, "S", set_type, entry), 1))
        msg.decode()
        assert msg.get_attr("IPSET_ATTR_SETNAME") == "S"
    for set_type, entry in (("bitmap:port", "http"), ("hash:ip,port", "10.96.0.1"),
                            ("hash:ip,port", "10.96.0.1,gre:1"), ("hash:ip", "a,b,c"), ("list:set", "x")):
        with pytest.raises(ValueError):
            ipset_request(True, "S", set_type, entry)


def _reply(cmd_attrs: list) -> bytes:
    """A dump reply: pyroute2 encodes the attributes as the kernel lays them out."""
    msg = genl_ipvs.ipvsmsg()
    msg["cmd"] = genl_ipvs.IPVS_CMD_NEW_SERVICE
    msg["version"] = 1
    msg["attrs"] = cmd_attrs
    msg["header"]["type"] = 42
    msg.encode()
    return bytes(msg.data)


def test_dump_replies_parse_to_what_the_mode_compares() -> None:
    svc = _reply([("IPVS_CMD_ATTR_SERVICE", {"attrs": [
        ("IPVS_SVC_ATTR_AF", 2), ("IPVS_SVC_ATTR_PROTOCOL", 17), ("IPVS_SVC_ATTR_ADDR", "10.96.0.10"),
        ("IPVS_SVC_ATTR_PORT", 53), ("IPVS_SVC_ATTR_SCHED_NAME", "rr"),
        ("IPVS_SVC_ATTR_FLAGS", {"flags": FLAG_PERSISTENT | 0x0002, "mask": 0xFFFFFFFF}),
        ("IPVS_SVC_ATTR_TIMEOUT", 10800)]})])
    want = VirtualServer(VSKey("10.96.0.10", 53, Protocol.UDP), "rr", FLAG_PERSISTENT, 10800)
    assert parse_service(svc) == want
    dest = _reply([("IPVS_CMD_ATTR_DEST", {"attrs": [
        ("IPVS_DEST_ATTR_ADDR", "10.244.1.11"), ("IPVS_DEST_ATTR_PORT", 8080),
        ("IPVS_DEST_ATTR_FWD_METHOD", 0), ("IPVS_DEST_ATTR_WEIGHT", 1),
        ("IPVS_DEST_ATTR_ACTIVE_CONNS", 3), ("IPVS_DEST_ATTR_INACT_CONNS", 4),
        ("IPVS_DEST_ATTR_ADDR_FAMILY", 2)]})])
    assert parse_dest(dest) == KernelDest(S1, 1, 0, 3, 4)
    # the kernel's 16-byte address form (nf_inet_addr) reads the same
    assert parse_dest(_padded(dest)) == KernelDest(S1, 1, 0, 3, 4)
    fwmark = _reply([("IPVS_CMD_ATTR_SERVICE",
                      {"attrs": [("IPVS_SVC_ATTR_AF", 2), ("IPVS_SVC_ATTR_FWMARK", 7)]})])
    v6 = _reply([("IPVS_CMD_ATTR_SERVICE",
                  {"attrs": [("IPVS_SVC_ATTR_AF", 10), ("IPVS_SVC_ATTR_PROTOCOL", 6)]})])
    assert parse_service(fwmark) is None and parse_service(v6) is None


def _padded(reply: bytes) -> bytes:
    """``reply`` with its IPVS_DEST_ATTR_ADDR widened to the kernel's 16 bytes (lengths fixed up)."""
    import struct

    hdr = 20
    outer_len = struct.unpack_from("=H", reply, hdr)[0]
    inner = reply[hdr + 4:hdr + outer_len]
    addr_len = struct.unpack_from("=H", inner, 0)[0]
    assert addr_len == 8  # 4-byte header + 4-byte IPv4 address
    addr_type = struct.unpack_from("=H", inner, 2)[0]
    widened = struct.pack("=HH", 20, addr_type) + inner[4:8] + bytes(12) + inner[8:]
    outer = struct.pack("=HH", 4 + len(widened), struct.unpack_from("=H", reply, hdr + 2)[0]) + widened
    body = reply[16:hdr] + outer
    return struct.pack("=IHHII", 16 + len(body), *struct.unpack_from("=HHII", reply, 4)) + body


@pytest.mark.parametrize("cut", [0, 3, 16, 20, 24, 31, 47])
def test_truncated_or_garbage_dump_replies_are_skipped(cut: int) -> None:
    svc = _reply([("IPVS_CMD_ATTR_SERVICE", {"attrs": [
        ("IPVS_SVC_ATTR_AF", 2), ("IPVS_SVC_ATTR_PROTOCOL", 6), ("IPVS_SVC_ATTR_ADDR", "10.96.0.10"),
        ("IPVS_SVC_ATTR_PORT", 80)]})])
    assert parse_service(svc[:cut]) is None
    assert parse_dest(svc[:cut]) is None
    assert parse_service(b"\xff" * 64) is None and parse_dest(bytes(200)) is None


class _RecordingSocket:
    """A BatchSocket stand-in: records each batch's operations, refuses the ones it is told to."""

    def __init__(self, kind: str, refuse: dict[str, int], batches: list[tuple[str, list[Op]]]) -> None:
        self.kind, self.refuse, self.batches = kind, refuse, batches

    def run(self, requests: list, *, log_failures: bool = True, ack_each: bool = True) -> Any:
        from proxyd.netlink import BatchResult, Failure

        ops = [r.subject for r in requests]
        self.batches.append((self.kind, ops))
        result = BatchResult()
        for op in ops:
            code = self.refuse.get(op.kind, 0)
            if code:
                result.failures.append(Failure(op, code))
            else:
                result.applied += 1
        return result


def test_applier_batches_by_kind_in_order_and_turns_an_existing_add_into_an_update(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    applier = IpvsApplier()
    batches: list[tuple[str, list[Op]]] = []
    refuse = {"add_server": errno.EEXIST, "add_dest": errno.ENOMEM}
    monkeypatch.setattr(applier, "_batch_socket", lambda kind: _RecordingSocket(kind, refuse, batches))
    monkeypatch.setattr(applier, "_ipvs_family", lambda: 42)
    applier._device_index = 7
    vs = VirtualServer(KEY, "rr")
    ops = [Op("set_add", (CLUSTER_IP, "10.96.0.10,tcp:80")), Op("bind", ("10.96.0.10",)),
           Op("add_server", (vs,)), Op("add_dest", (KEY, S1, 1))]
    with caplog.at_level("ERROR"):
        failed = applier.apply(ops)
    assert [(kind, [op.kind for op in batch]) for kind, batch in batches] == [
        ("ipset", ["set_add"]), ("address", ["bind"]), ("ipvs", ["add_server", "add_dest"]),
        ("ipvs", ["update_server"])]  # the server existed: updated in a second batch
    assert failed == {Op("add_dest", (KEY, S1, 1))} and "Cannot allocate memory" in caplog.text
    applier._pool.shutdown(wait=False)
