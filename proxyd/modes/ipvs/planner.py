"""ipvs mode's pure planner: desired state → IPVS virtual/real servers, ipset entries, iptables rules.

No I/O here; it follows kube-proxy's IPVS proxier (pkg/proxy/ipvs/proxier.go):

* one **virtual server** per (IP, port, protocol): the ClusterIP, every
  externalIP, every LB ingress IP, and every node address accepting
  NodePorts (``--nodeport-addresses``) with the nodePort. All use the
  configured scheduler; ClientIP affinity is IPVS persistence (flag
  ``persistent`` with the affinity timeout); ``mh`` adds the source-hash
  flag as kube-proxy does.
* **real servers** (masquerade forwarding, weight 1) are the endpoints that
  ``proxyd.policy.categorize`` gives each kind of traffic: ClusterIP
  traffic uses ``internal``, externalIP / LB / NodePort traffic uses
  ``external``. A virtual server with no real server makes the kernel
  answer with ICMP port unreachable, so a client is refused at once.
  Unlike kube-proxy, an external virtual server under
  externalTrafficPolicy Local with no local endpoint gets no real server
  (proxyd's rule in every mode, docs/ipvs.md: no local endpoint, no
  service) instead of falling back to
  remote endpoints.
* **addresses** to hold on ``kube-ipvs0``: every ClusterIP, and every
  externalIP / LB IP that is not already a node address.
* **ipset entries**, written in ``ipset save`` syntax (``10.0.0.1,tcp:80``)
  so that tests read naturally and the applier can diff them against what
  the kernel lists; the set names and types are kube-proxy's.
* the small fixed **iptables ruleset** (``iptables-restore --noflush``
  input) that matches those sets: masquerade marks, NodePort and LB
  chains, the LB source-range firewall, and KUBE-IPVS-FILTER, which rejects
  new connections to service addresses on ports that are no service.

Planning is per service port (``plan_port``) so that a partial sync
re-plans only the services that changed; ``Assembly`` merges the pieces
incrementally (``assemble`` in one go).
``diff`` compares a plan with what the kernel holds (``Held``) and returns
the operations (``Op``) that the applier runs, in batches.

A plan is for one address family (``PlanContext.family``), as kube-proxy's
per-family proxiers: the mode runs one instance per family behind
``DualStackMode``. Plans always use the IPv4 set names above; the kernel
names of the IPv6 sets are kube-proxy's ``KUBE-6-`` ones (``set_name``),
mapped where sets meet the kernel (the applier) and the rules
(``iptables_rules``), so both families' sets coexist.
"""

from __future__ import annotations

import ipaddress
import operator
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxyd.model import Endpoint, Protocol, ServicePort, family
from proxyd.netfilter.jumps import Jump
from proxyd.policy import categorize

DEVICE = "kube-ipvs0"
SCHEDULERS = frozenset({"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh"})

# IPVS service flags (include/uapi/linux/ip_vs.h).
FLAG_PERSISTENT = 0x0001
FLAG_HASHED = 0x0002  # set by the kernel on every service; never compared
# kube-proxy's FlagSourceHash for "mh": IP_VS_SVC_F_SCHED2, i.e. mh-port (hash source IP and port).
FLAG_SOURCE_HASH = 0x0010

# ipsets: (name, type, comment), kube-proxy's names and types.
LOOP_BACK = "KUBE-LOOP-BACK"
CLUSTER_IP = "KUBE-CLUSTER-IP"
EXTERNAL_IP = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
LOAD_BALANCER = "KUBE-LOAD-BALANCER"
LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS = "KUBE-IPVS-IPS"


@dataclass(frozen=True, slots=True)
class SetInfo:
    name: str
    type: str
    comment: str

    @property
    def match(self) -> str:
        """The ``--match-set`` direction flags for a destination match."""
        return "dst" if self.type in ("bitmap:port", "hash:ip") else "dst,dst"


IPSETS: tuple[SetInfo, ...] = (
    SetInfo(LOOP_BACK, "hash:ip,port,ip", "Kubernetes endpoints dst ip:port, source ip for solving hairpin "
                       "purpose"),
    SetInfo(CLUSTER_IP, "hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"),
    SetInfo(EXTERNAL_IP, "hash:ip,port", "Kubernetes service external ip + port for masquerade and filter "
                         "purpose"),
    SetInfo(EXTERNAL_IP_LOCAL, "hash:ip,port",
            "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    SetInfo(LOAD_BALANCER, "hash:ip,port", "Kubernetes service lb portal"),
    SetInfo(LOAD_BALANCER_FW, "hash:ip,port", "Kubernetes service load balancer ip + port for load balancer "
                              "with sourceRange"),
    SetInfo(LOAD_BALANCER_LOCAL, "hash:ip,port",
            "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    SetInfo(LOAD_BALANCER_SOURCE_IP, "hash:ip,port,ip",
            "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
    SetInfo(LOAD_BALANCER_SOURCE_CIDR, "hash:ip,port,net",
            "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
    SetInfo(NODE_PORT_TCP, "bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"),
    SetInfo(NODE_PORT_LOCAL_TCP, "bitmap:port", "Kubernetes nodeport TCP port with "
                                 "externalTrafficPolicy=local"),
    SetInfo(NODE_PORT_UDP, "bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"),
    SetInfo(NODE_PORT_LOCAL_UDP, "bitmap:port", "Kubernetes nodeport UDP port with "
                                 "externalTrafficPolicy=local"),
    SetInfo(NODE_PORT_SCTP, "hash:ip,port", "Kubernetes nodeport SCTP port for masquerade purpose with type "
                            "'hash ip:port'"),
    SetInfo(NODE_PORT_LOCAL_SCTP, "hash:ip,port",
            "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"),
    SetInfo(HEALTH_CHECK_NODE_PORT, "bitmap:port", "Kubernetes health check node port"),
    SetInfo(IPVS_IPS, "hash:ip", "IPVS service IPs, to reject traffic to their other ports"),
)
IPSET_BY_NAME: Mapping[str, SetInfo] = {s.name: s for s in IPSETS}

IPSET_NAME_MAX = 31  # IPSET_MAXNAMELEN - 1


def set_name(name: str, fam: int) -> str:
    """The kernel name of set ``name`` for family ``fam``: kube-proxy renames IPv6 sets
    ``KUBE-`` -> ``KUBE-6-`` (cut to ipset's 31 characters) so both families' sets coexist."""
    if fam != 6 or not name.startswith("KUBE-"):
        return name
    return ("KUBE-6-" + name[len("KUBE-"):])[:IPSET_NAME_MAX]


def host_bits(fam: int) -> int:
    return 128 if fam == 6 else 32

_NODE_PORT_SETS = {
    Protocol.TCP: (NODE_PORT_TCP, NODE_PORT_LOCAL_TCP),
    Protocol.UDP: (NODE_PORT_UDP, NODE_PORT_LOCAL_UDP),
    Protocol.SCTP: (NODE_PORT_SCTP, NODE_PORT_LOCAL_SCTP),
}

# iptables chains (table, chain) and the jumps into them from built-in chains.
NAT_CHAINS = ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-MARK-MASQ")
FILTER_CHAINS = ("KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL",
                 "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER")


JUMPS: tuple[Jump, ...] = (
    Jump("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
    Jump("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
    Jump("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
    Jump("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
    Jump("filter", "INPUT", "KUBE-NODE-PORT", "kubernetes health check rules"),
    Jump("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    Jump("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    Jump("filter", "INPUT", "KUBE-IPVS-FILTER", "kubernetes ipvs access filter"),
    Jump("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER", "kubernetes ipvs access filter"),
)


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True, slots=True, order=True)
class VSKey:
    """A virtual server's identity in the kernel."""

    ip: str
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        return f"{_hostport(self.ip, self.port)}/{self.protocol}"


@dataclass(frozen=True, slots=True, order=True)
class RealServer:
    ip: str
    port: int

    def __str__(self) -> str:
        return _hostport(self.ip, self.port)


@dataclass(frozen=True, slots=True)
class VirtualServer:
    """A virtual server as proxyd wants it: what is compared with the kernel's."""

    key: VSKey
    scheduler: str
    flags: int = 0
    timeout: int = 0


@dataclass(frozen=True, slots=True)
class PlanContext:
    """What, besides the state, the plan depends on.

    ``node_ips``: node addresses accepting NodePorts (``--nodeport-addresses``
    applied, loopback excluded). ``local_addresses``: every address of the
    node outside ``kube-ipvs0``; an externalIP or LB IP among them is not
    bound to the device (it is already local).
    """

    scheduler: str = "rr"
    node_name: str = ""
    family: int = 4
    node_zone: str | None = None
    node_ips: tuple[str, ...] = ()
    local_addresses: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PortPlan:
    """Everything one service port contributes to the plan."""

    servers: tuple[VirtualServer, ...] = ()
    destinations: tuple[tuple[VSKey, tuple[RealServer, ...]], ...] = ()
    entries: tuple[tuple[str, str], ...] = ()  # (set name, entry)
    bind: tuple[str, ...] = ()
    # LB (ip, protocol, port) the node itself must not reach (source ranges exclude it).
    no_node_access: tuple[tuple[str, str, int], ...] = ()
    skipped: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    servers: Mapping[VSKey, VirtualServer] = field(default_factory=dict)
    destinations: Mapping[VSKey, tuple[RealServer, ...]] = field(default_factory=dict)
    ipsets: Mapping[str, frozenset[str]] = field(default_factory=dict)
    bind: frozenset[str] = frozenset()
    no_node_access: tuple[tuple[str, str, int], ...] = ()
    conflicts: tuple[str, ...] = ()


# --- the kernel diff: what the kernel holds + the plan -> operations -----------------------------

WEIGHT = 1  # every wanted real server's weight; 0 marks one draining (graceful termination)


@dataclass(frozen=True, slots=True)
class Op:
    """One kernel change for the applier. ``kind`` is one of ``OP_KINDS``; ``args`` as listed there."""

    kind: str
    args: tuple[Any, ...]

    def __str__(self) -> str:
        return f"{self.kind} {' '.join(map(str, self.args))}"


OP_KINDS = {
    "set_add": "(set name, entry)", "set_del": "(set name, entry)",
    "bind": "(ip,)", "unbind": "(ip,)",
    "add_server": "(VirtualServer,)", "update_server": "(VirtualServer,)", "delete_server": "(VSKey,)",
    "add_dest": "(VSKey, RealServer, weight)", "set_weight": "(VSKey, RealServer, weight)",
    "delete_dest": "(VSKey, RealServer)",
}


@dataclass(slots=True)
class Held:
    """What the kernel holds, as far as the mode knows (read at a full sync, then kept by ``record``)."""

    servers: dict[VSKey, VirtualServer] = field(default_factory=dict)
    dests: dict[VSKey, dict[RealServer, int]] = field(default_factory=dict)  # real server -> weight
    sets: dict[str, set[str]] = field(default_factory=dict)
    bound: set[str] = field(default_factory=set)

    def record(self, op: Op) -> None:
        """The kernel applied ``op``."""
        kind, args = op.kind, op.args
        if kind == "set_add":
            self.sets.setdefault(args[0], set()).add(args[1])
        elif kind == "set_del":
            self.sets.get(args[0], set()).discard(args[1])
        elif kind == "bind":
            self.bound.add(args[0])
        elif kind == "unbind":
            self.bound.discard(args[0])
        elif kind in ("add_server", "update_server"):
            self.servers[args[0].key] = args[0]
            self.dests.setdefault(args[0].key, {})
        elif kind == "delete_server":
            self.servers.pop(args[0], None)
            self.dests.pop(args[0], None)
        elif kind in ("add_dest", "set_weight"):
            self.dests.setdefault(args[0], {})[args[1]] = args[2]
        elif kind == "delete_dest":
            self.dests.get(args[0], {}).pop(args[1], None)
        else:
            raise ValueError(f"unknown operation {kind!r}")


@dataclass(frozen=True, slots=True)
class Diff:
    """The operations taking the kernel from ``Held`` to a plan, in two phases around the iptables rules.

    ``before``: set entries, addresses, virtual servers and real servers the
    rules and packets will need. ``after``: what goes away — TCP real
    servers drained (weight 0, then ``drain`` queues them for graceful
    termination), other real servers deleted, virtual servers, addresses and
    set entries no longer wanted. ``adopt``: real servers a previous run
    left draining (weight 0), to queue without a kernel change.
    ``restored``: real servers wanted again (added or back to weight 1),
    whose draining, if any, must stop.
    """

    before: tuple[Op, ...] = ()
    after: tuple[Op, ...] = ()
    drain: tuple[tuple[VSKey, RealServer], ...] = ()
    adopt: tuple[tuple[VSKey, RealServer], ...] = ()
    restored: tuple[tuple[VSKey, RealServer], ...] = ()


def diff(plan: Plan, held: Held, *, keys: Iterable[VSKey] | None = None,
         draining: Container[tuple[VSKey, RealServer]] = ()) -> Diff:
    """The operations that make the kernel (``held``) match ``plan``. Pure.

    ``keys`` limits the virtual/real server part to those virtual servers
    (a partial sync: the servers of the changed ports, before and after);
    None compares every one. Set entries and addresses are compared whole
    (set differences, done in C). ``draining``: real servers already queued
    for graceful termination, left alone.
    """
    before: list[Op] = []
    after: list[Op] = []
    drain: list[tuple[VSKey, RealServer]] = []
    adopt: list[tuple[VSKey, RealServer]] = []
    restored: list[tuple[VSKey, RealServer]] = []
    for name, want in plan.ipsets.items():
        before.extend(Op("set_add", (name, e)) for e in sorted(want - held.sets.get(name, set())))
    before.extend(Op("bind", (ip,)) for ip in sorted(plan.bind - held.bound))
    if keys is None:
        wanted: Iterable[VSKey] = plan.servers
        gone: Iterable[VSKey] = [k for k in held.servers if k not in plan.servers]
    else:
        keys = sorted(set(keys))
        wanted = [k for k in keys if k in plan.servers]
        gone = [k for k in keys if k in held.servers and k not in plan.servers]
    for key in wanted:
        vs = plan.servers[key]
        current = held.servers.get(key)
        if current is None:
            before.append(Op("add_server", (vs,)))
        elif current != vs:
            before.append(Op("update_server", (vs,)))
        have = held.dests.get(key, {}) if current is not None else {}
        want_dests = plan.destinations.get(key, ())
        for server in want_dests:
            weight = have.get(server)
            if weight is None:
                before.append(Op("add_dest", (key, server, WEIGHT)))
            elif weight != WEIGHT:
                before.append(Op("set_weight", (key, server, WEIGHT)))
            else:
                continue
            restored.append((key, server))
        keep = set(want_dests)
        for server, weight in have.items():
            if server in keep or (key, server) in draining:
                continue
            if key.protocol is not Protocol.TCP:
                # UDP/SCTP: deleted at once; expire_nodest_conn moves their flows.
                after.append(Op("delete_dest", (key, server)))
            elif weight == 0:
                adopt.append((key, server))  # already draining (left by a previous run)
            else:
                after.append(Op("set_weight", (key, server, 0)))
                drain.append((key, server))
    after.extend(Op("delete_server", (key,)) for key in gone)
    after.extend(Op("unbind", (ip,)) for ip in sorted(held.bound - plan.bind))
    for name, want in plan.ipsets.items():
        after.extend(Op("set_del", (name, e)) for e in sorted(held.sets.get(name, set()) - want))
    return Diff(before=tuple(before), after=tuple(after), drain=tuple(drain), adopt=tuple(adopt),
                restored=tuple(restored))


def proto_name(protocol: Protocol) -> str:
    return protocol.value.lower()


_SERVER_ORDER = operator.attrgetter("ip", "port")


def _dests(endpoints: Iterable[Endpoint], fam: int) -> tuple[RealServer, ...]:
    # IPVS masquerading cannot cross families: a real server is of its virtual server's family.
    out = {RealServer(ep.ip, ep.port) for ep in endpoints if family(ep.ip) == fam and 0 < ep.port < 65536}
    # The dataclass order, (ip, port), without its generated __lt__ (a third of planning at scale).
    return tuple(sorted(out, key=_SERVER_ORDER))


def plan_port(svc: ServicePort, endpoints: tuple[Endpoint, ...], ctx: PlanContext) -> PortPlan:
    """The virtual servers, real servers, set entries and addresses of one service port."""
    fam = ctx.family
    if family(svc.cluster_ip) != fam:
        # The dual-stack wrapper hands each family's instance only its family's ports; a port of the
        # other family reaching this instance is a caller's mistake, named rather than mis-planned.
        return PortPlan(skipped=f"{svc.name}: cluster IP {svc.cluster_ip} is not IPv{fam} (this "
                                f"proxier serves IPv{fam})")
    proto = proto_name(svc.protocol)
    cat = categorize(svc, endpoints, node_name=ctx.node_name, node_zone=ctx.node_zone)
    flags = 0
    timeout = 0
    if svc.affinity_timeout:
        flags |= FLAG_PERSISTENT
        timeout = svc.affinity_timeout
    if ctx.scheduler == "mh":
        flags |= FLAG_SOURCE_HASH
    internal = _dests(cat.internal, fam)
    # Under externalTrafficPolicy Local, external traffic only ever reaches local endpoints.
    external = _dests(cat.local if svc.uses_local_external else cat.cluster, fam)

    servers: list[VirtualServer] = []
    dests: list[tuple[VSKey, tuple[RealServer, ...]]] = []
    entries: list[tuple[str, str]] = []
    bind: list[str] = []
    no_node: list[tuple[str, str, int]] = []

    def server(ip: str, port: int, real: tuple[RealServer, ...]) -> None:
        key = VSKey(ip, port, svc.protocol)
        servers.append(VirtualServer(key, ctx.scheduler, flags, timeout))
        dests.append((key, real))

    for ep in endpoints:
        # Hairpin: a local pod reaching itself through the service is masqueraded.
        if ep.is_local(ctx.node_name) and family(ep.ip) == fam and ep.port:
            entries.append((LOOP_BACK, f"{ep.ip},{proto}:{ep.port},{ep.ip}"))

    entries.append((CLUSTER_IP, f"{svc.cluster_ip},{proto}:{svc.port}"))
    server(svc.cluster_ip, svc.port, internal)
    bind.append(svc.cluster_ip)

    for ip in svc.external_ips:
        if family(ip) != fam:
            continue
        ext_set = EXTERNAL_IP_LOCAL if svc.external_policy_local else EXTERNAL_IP
        entries.append((ext_set, f"{ip},{proto}:{svc.port}"))
        server(ip, svc.port, external)
        if ip not in ctx.local_addresses:
            bind.append(ip)

    node_ips_in_ranges = [ipaddress.ip_address(ip) for ip in ctx.node_ips]
    for ip in svc.load_balancer_ips:
        if family(ip) != fam:
            continue
        entry = f"{ip},{proto}:{svc.port}"
        entries.append((LOAD_BALANCER, entry))
        if svc.external_policy_local:
            entries.append((LOAD_BALANCER_LOCAL, entry))
        ranges = [ipaddress.ip_network(c, strict=False) for c in svc.load_balancer_source_ranges]
        ranges = [r for r in ranges if r.version == fam]
        if ranges:
            entries.append((LOAD_BALANCER_FW, entry))
            for net in ranges:
                text = str(net.network_address) if net.prefixlen == host_bits(fam) else str(net)
                entries.append((LOAD_BALANCER_SOURCE_CIDR, f"{entry},{text}"))
            # The node reaches an LB IP held locally with the LB IP itself as source.
            if any(addr in net for net in ranges for addr in node_ips_in_ranges):
                entries.append((LOAD_BALANCER_SOURCE_IP, f"{entry},{ip}"))
            else:
                no_node.append((ip, proto, svc.port))
        server(ip, svc.port, external)
        if ip not in ctx.local_addresses:
            bind.append(ip)

    node_ips = tuple(ip for ip in ctx.node_ips if family(ip) == fam)
    if svc.node_port and node_ips:
        np_set, np_local_set = _NODE_PORT_SETS[svc.protocol]
        if svc.protocol is Protocol.SCTP:
            np_entries = [f"{ip},sctp:{svc.node_port}" for ip in node_ips]
        else:
            np_entries = [str(svc.node_port)]
        for entry in np_entries:
            entries.append((np_set, entry))
            if svc.external_policy_local:
                entries.append((np_local_set, entry))
        for ip in node_ips:
            server(ip, svc.node_port, external)

    if svc.health_check_node_port:
        entries.append((HEALTH_CHECK_NODE_PORT, str(svc.health_check_node_port)))

    return PortPlan(servers=tuple(servers), destinations=tuple(dests), entries=tuple(entries),
                    bind=tuple(bind), no_node_access=tuple(no_node))


class Assembly:
    """Per-port plans merged into the node's plan, kept up to date one port at a time.

    Putting (or dropping) one port costs only what that port contributes:
    reference counts for set entries, addresses and no-node-access triples,
    and for each virtual server the ports claiming it, of which the first
    (by ``order``: the service port name, or the position for ``assemble``)
    keeps it; the others are reported as conflicts when they want it
    differently. A partial sync thus re-merges only the changed ports.
    """

    def __init__(self) -> None:
        self.parts: dict[Any, PortPlan] = {}
        self._claims: dict[VSKey, dict[Any, tuple[VirtualServer, tuple[RealServer, ...] | None]]] = {}
        self.servers: dict[VSKey, VirtualServer] = {}
        self.destinations: dict[VSKey, tuple[RealServer, ...]] = {}
        self._conflicts: dict[VSKey, int] = {}
        self._entries: dict[str, dict[str, int]] = {info.name: {} for info in IPSETS}
        self._bind: dict[str, int] = {}
        self._no_node: dict[tuple[str, str, int], int] = {}

    def put(self, order: Any, part: PortPlan | None) -> set[VSKey]:
        """Set (or with None drop) one port's plan; returns the virtual servers it touched."""
        touched: set[VSKey] = set()
        old = self.parts.pop(order, None)
        if old is not None:
            for vs in old.servers:
                self._claims[vs.key].pop(order, None)
                touched.add(vs.key)
            for name, entry in old.entries:
                _unref(self._entries[name], entry)
            for ip in old.bind:
                _unref(self._bind, ip)
            for item in old.no_node_access:
                _unref(self._no_node, item)
        if part is not None:
            self.parts[order] = part
            dests = dict(part.destinations)
            for vs in part.servers:
                self._claims.setdefault(vs.key, {})[order] = (vs, dests.get(vs.key))
                touched.add(vs.key)
            for name, entry in part.entries:
                refs = self._entries[name]
                refs[entry] = refs.get(entry, 0) + 1
            for ip in part.bind:
                self._bind[ip] = self._bind.get(ip, 0) + 1
            for item in part.no_node_access:
                self._no_node[item] = self._no_node.get(item, 0) + 1
        for key in touched:
            self._settle(key)
        return touched

    def _settle(self, key: VSKey) -> None:
        claims = self._claims.get(key)
        if not claims:
            self._claims.pop(key, None)
            self.servers.pop(key, None)
            self.destinations.pop(key, None)
            self._conflicts.pop(key, None)
            return
        winner = min(claims)
        vs, dests = claims[winner]
        self.servers[key] = vs
        if dests is None:
            self.destinations.pop(key, None)
        else:
            self.destinations[key] = dests
        differing = sum(1 for other, _ in claims.values() if other != vs)
        if differing:
            self._conflicts[key] = differing
        else:
            self._conflicts.pop(key, None)

    def plan(self) -> Plan:
        sets = {name: frozenset(refs) for name, refs in self._entries.items()}
        # Bound addresses are service IPs: the set lets KUBE-IPVS-FILTER reject their other ports.
        sets[IPVS_IPS] = frozenset(self._bind)
        conflicts = tuple(str(key) for key in sorted(self._conflicts) for _ in range(self._conflicts[key]))
        return Plan(servers=dict(self.servers), destinations=dict(self.destinations), ipsets=sets,
                    bind=frozenset(self._bind), no_node_access=tuple(sorted(self._no_node)),
                    conflicts=conflicts)


def _unref(refs: dict[Any, int], item: Any) -> None:
    left = refs[item] - 1
    if left:
        refs[item] = left
    else:
        del refs[item]


def assemble(parts: Iterable[PortPlan]) -> Plan:
    """Merge per-port plans. Two ports wanting one virtual server: the first keeps it (conflict noted)."""
    merged = Assembly()
    for index, part in enumerate(parts):
        merged.put(index, part)
    return merged.plan()


def _q(text: str) -> str:
    return f'"{text}"'


def iptables_rules(plan: Plan, *, cluster_cidrs: Iterable[str] = (), masquerade_all: bool = False,
                   masquerade_bit: int = 14, random_fully: bool = True, family: int = 4) -> str:
    """``iptables-restore --noflush`` input for the nat and filter tables of ``family``
    (``ip6tables-restore`` input for 6: the same chains, the ``KUBE-6-`` sets).

    Chains are declared (so they are flushed and rewritten whole); rules that
    match a set are only written when the set has entries, as kube-proxy
    does, so the ruleset stays a few dozen lines whatever the cluster size.
    """
    fam = family
    mark = f"{1 << masquerade_bit:#08x}"
    nonempty = {name for name, entries in plan.ipsets.items() if entries}
    nat: list[str] = ["*nat", *(f":{c} - [0:0]" for c in NAT_CHAINS)]
    flt: list[str] = ["*filter", *(f":{c} - [0:0]" for c in FILTER_CHAINS)]

    def setmatch(name: str, how: str | None = None) -> str:
        return f"-m set --match-set {set_name(name, fam)} {how or IPSET_BY_NAME[name].match}"

    def comment(name: str) -> str:
        return f"-m comment --comment {_q(IPSET_BY_NAME[name].comment)}"

    nat.append(f"-A KUBE-SERVICES -s {'::1/128' if fam == 6 else '127.0.0.0/8'} -j RETURN")
    if LOOP_BACK in nonempty:
        nat.append(f"-A KUBE-POSTROUTING {comment(LOOP_BACK)} {setmatch(LOOP_BACK, 'dst,dst,src')} -j "
                   f"MASQUERADE")
    if LOAD_BALANCER in nonempty:
        nat.append(f"-A KUBE-SERVICES {comment(LOAD_BALANCER)} {setmatch(LOAD_BALANCER)} -j "
                   f"KUBE-LOAD-BALANCER")
    if LOAD_BALANCER_LOCAL in nonempty:
        nat.append(f"-A KUBE-LOAD-BALANCER {comment(LOAD_BALANCER_LOCAL)} {setmatch(LOAD_BALANCER_LOCAL)} "
                   f"-j RETURN")
    for proto, (np_set, np_local) in (("tcp", (NODE_PORT_TCP, NODE_PORT_LOCAL_TCP)),
                                      ("udp", (NODE_PORT_UDP, NODE_PORT_LOCAL_UDP)),
                                      ("sctp", (NODE_PORT_SCTP, NODE_PORT_LOCAL_SCTP))):
        if np_local in nonempty:
            nat.append(f"-A KUBE-NODE-PORT -p {proto} {comment(np_local)} {setmatch(np_local)} -j RETURN")
        if np_set in nonempty:
            nat.append(f"-A KUBE-NODE-PORT -p {proto} {comment(np_set)} {setmatch(np_set)} -j KUBE-MARK-MASQ")
    if LOAD_BALANCER_FW in nonempty:
        flt.append(f"-A KUBE-PROXY-FIREWALL {comment(LOAD_BALANCER_FW)} {setmatch(LOAD_BALANCER_FW)} "
                   "-j KUBE-SOURCE-RANGES-FIREWALL")
    for name in (LOAD_BALANCER_SOURCE_CIDR, LOAD_BALANCER_SOURCE_IP):
        if name in nonempty:
            flt.append(f"-A KUBE-SOURCE-RANGES-FIREWALL {comment(name)} {setmatch(name, 'dst,dst,src')} -j "
                       f"RETURN")

    if CLUSTER_IP in nonempty:
        base = f"-A KUBE-SERVICES {comment(CLUSTER_IP)} {setmatch(CLUSTER_IP)}"
        cidrs = [c for c in cluster_cidrs if (6 if ":" in c else 4) == fam]
        if masquerade_all:
            nat.append(f"{base} -j KUBE-MARK-MASQ")
        elif cidrs:
            # Off-cluster traffic to a ClusterIP is masqueraded (kube-proxy's local detector).
            nat.extend(f"{base} ! -s {cidr} -j KUBE-MARK-MASQ" for cidr in cidrs[:1])
        else:
            # Node-originated traffic gets a service VIP as source (they are local): masquerade it.
            nat.append(f"-A KUBE-SERVICES {comment(CLUSTER_IP)} {setmatch(CLUSTER_IP, 'src,dst')} "
                       "-j KUBE-MARK-MASQ")
    for name, masq in ((EXTERNAL_IP, True), (EXTERNAL_IP_LOCAL, False)):
        if name not in nonempty:
            continue
        base = f"-A KUBE-SERVICES {comment(name)} {setmatch(name)}"
        if masq:
            nat.append(f"{base} -j KUBE-MARK-MASQ")
        nat.append(f"{base} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT")
        nat.append(f"{base} -m addrtype --dst-type LOCAL -j ACCEPT")
    nat.append("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
    nat.append("-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ")
    flt.append("-A KUBE-SOURCE-RANGES-FIREWALL -j DROP")
    for ip, proto, port in plan.no_node_access:
        flt.append(f"-A KUBE-IPVS-OUT-FILTER -s {ip} -m ipvs --vaddr {ip} --vproto {proto} --vport {port} "
                   f"-j DROP")
    # Accept what IPVS will handle, in case later rules of other software would drop it.
    for name in (CLUSTER_IP, LOAD_BALANCER):
        if name in nonempty:
            nat.append(f"-A KUBE-SERVICES {setmatch(name)} -j ACCEPT")
    flt.append(f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
               f"-m mark --mark {mark}/{mark} -j ACCEPT")
    flt.append('-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
               "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    flt.append(f"-A KUBE-NODE-PORT {comment(HEALTH_CHECK_NODE_PORT)} {setmatch(HEALTH_CHECK_NODE_PORT)} -j "
               f"ACCEPT")
    for name in (LOAD_BALANCER, CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL, HEALTH_CHECK_NODE_PORT):
        flt.append(f"-A KUBE-IPVS-FILTER {setmatch(name)} -j RETURN")
    flt.append(f"-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW {setmatch(IPVS_IPS)} -j REJECT")

    nat.append(f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN")
    nat.append(f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}")
    snat = ('-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j '
            'MASQUERADE')
    nat.append(snat + (" --random-fully" if random_fully else ""))
    nat.append(f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}")
    nat.append("COMMIT")
    flt.append("COMMIT")
    return "\n".join(nat + flt) + "\n"


def validate_scheduler(name: str) -> str:
    """The scheduler name, or ValueError naming the allowed ones."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown IPVS scheduler {name!r}; use one of {', '.join(sorted(SCHEDULERS))}")
    return name
