"""Userspace mode's pure planner: desired state → addresses to hold, sockets to listen on, endpoint lists.

No I/O here. For every service port the planner decides:

* which service addresses this node must own so that the kernel delivers
  their packets to proxyd's sockets: the ClusterIP, every externalIP and
  every LB ingress IP (held on the ``proxyd0`` bridge by ``addresses.py``);
* which sockets to listen on: ``(ip, port, protocol)`` for the ClusterIP,
  the externalIPs and LB IPs, and ``(node ip, nodePort, protocol)`` for each
  node address accepting NodePorts (``0.0.0.0`` when every address does);
  none for a UDP port without any endpoint, so the kernel refuses its
  datagrams with a port unreachable, as kube-proxy's REJECT does;
* which LB-IP listeners admit only ``loadBalancerSourceRanges`` sources;
* which endpoints each kind of traffic may reach, as ``proxyd.policy``
  categorises them: ClusterIP traffic uses ``internal``, traffic to a
  NodePort / externalIP / LB IP uses ``external`` (only local endpoints under
  externalTrafficPolicy Local). The two sets are separate entries of the
  connection table (``TableKey``), each with the service's ClientIP affinity
  timeout.

Two service ports wanting the same ``(ip, port, protocol)`` (say, two
services with one externalIP and port) cannot both have it: the first in
sorted order keeps it and the conflict is reported, like kube-proxy
userspace failing to open the second port.

Without ``SO_REUSEPORT`` (see ``listeners.py``) a wildcard NodePort
listener and a service address with the same port and protocol cannot both
be bound; when that happens the NodePort listens on each node address
(``local_ips``) instead of the wildcard, and the service address keeps its
own, more specific listener — the split the kernel made when both shared
the port.

Planning is per service port (``plan_port``) and the per-port plans are
merged incrementally (``Merged``), so a partial sync re-plans and re-merges
only the ports the tracker names as changed and hands the mode only what
differs (``Plan.changes``): its cost follows the change, not the cluster.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from proxyd.model import Endpoint, Protocol, ProxyState, ServiceName, ServicePort, ServicePortName, family
from proxyd.policy import categorize

WILDCARD = {4: "0.0.0.0", 6: "::"}


@dataclass(frozen=True, slots=True, order=True)
class ListenerKey:
    """One listening socket: the address, port and protocol it is bound to.

    The hash is computed once (a dataclass's own hashes a fresh tuple and the
    protocol enum's name in Python at every dict lookup: a third of a
    10,000-service plan went there).
    """

    ip: str
    port: int
    protocol: Protocol
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.ip, self.port, self.protocol.value)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True, order=True)
class TableKey:
    """A connection-table entry: one service port's endpoints for one kind of traffic.

    ``family`` is the address family of the listeners it feeds and of its
    endpoints: a dual-stack service port has one entry per family, each
    holding only that family's endpoints (kube-proxy's per-family proxiers).
    ``id`` is the string the connection table is keyed by
    (``ns/name:port/TCP``, with ``/external`` appended for external traffic
    and ``/IPv6`` for the IPv6 family), computed once here so the data path
    never formats it.
    """

    name: ServicePortName
    external: bool = False
    id: str = field(default="", compare=False)
    family: int = 4
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.id:
            suffix = "/external" if self.external else ""
            if self.family == 6:
                suffix += "/IPv6"
            object.__setattr__(self, "id", f"{self.name}/{self.name.protocol}{suffix}")
        # Computed once, as ListenerKey's (from the compared fields: ``id`` may be given otherwise).
        object.__setattr__(self, "_hash", hash((self.name, self.external, self.family)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True, slots=True)
class TableEntry:
    endpoints: tuple[tuple[str, int], ...]
    affinity_timeout: int


@dataclass(frozen=True, slots=True)
class PortPlan:
    """What one service port needs."""

    addresses: tuple[str, ...]
    listeners: tuple[tuple[ListenerKey, TableKey], ...]
    tables: tuple[tuple[TableKey, TableEntry], ...]
    # Listeners that admit only some sources (LB IPs with loadBalancerSourceRanges).
    source_ranges: tuple[tuple[ListenerKey, tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class PlanChanges:
    """What a partial plan changed since the previous plan: only these need applying."""

    tables: frozenset[TableKey] = frozenset()  # added, changed or removed
    listeners: frozenset[ListenerKey] = frozenset()  # added, removed, retargeted or re-filtered
    added_addresses: frozenset[str] = frozenset()
    removed_addresses: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Plan:
    """The whole node: addresses to hold, listeners (→ the table key they serve), tables.

    ``changes`` is None for a full plan (apply everything); a partial plan
    says what differs from the previous one.
    """

    addresses: frozenset[str] = frozenset()
    listeners: Mapping[ListenerKey, TableKey] = field(default_factory=dict)
    tables: Mapping[TableKey, TableEntry] = field(default_factory=dict)
    conflicts: tuple[str, ...] = ()
    source_ranges: Mapping[ListenerKey, tuple[str, ...]] = field(default_factory=dict)
    changes: PlanChanges | None = field(default=None, compare=False)


def _pairs(endpoints: Iterable[Endpoint]) -> tuple[tuple[str, int], ...]:
    """(ip, port) of each endpoint, duplicates dropped (the first kept)."""
    return tuple(dict.fromkeys([(ep.ip, ep.port) for ep in endpoints]))


def plan_port(svc: ServicePort, endpoints: Sequence[Endpoint], *, node_name: str, node_zone: str | None,
              nodeport_ips: Sequence[str], families: Collection[int] = (4, 6)) -> PortPlan:
    """The addresses, listeners and table entries of one service port, every family it has.

    Each family is planned on its own view of the port (``ServicePort.for_family``:
    its cluster IP, external/LB IPs and source ranges) with only its own
    endpoints, and the plans are joined: a dual-stack port listens on both
    cluster IPs, each listener feeding a table of its family's endpoints.
    ``nodeport_ips`` are the node addresses accepting NodePorts (a wildcard
    address per family for all of them); each family uses only its own.
    Families the node does not serve (not in ``families``) are left out.
    """
    if not svc.secondary_cluster_ip:
        fam = family(svc.cluster_ip)
        if fam not in families:
            return _NOTHING
        # A port without external or LB IPs or ranges is its own view (for_family would say so, slower).
        plain = not (svc.external_ips or svc.load_balancer_ips or svc.load_balancer_source_ranges)
        view = svc if plain else (svc.for_family(fam) or svc)
        return _plan_family(view, fam, _of_family(endpoints, fam), node_name=node_name, node_zone=node_zone,
                            nodeport_ips=nodeport_ips)
    parts = []
    for fam in (4, 6):
        half = svc.for_family(fam) if fam in families else None
        if half is not None:
            parts.append(_plan_family(half, fam, _of_family(endpoints, fam), node_name=node_name,
                                      node_zone=node_zone, nodeport_ips=nodeport_ips))
    return PortPlan(addresses=tuple(dict.fromkeys(ip for p in parts for ip in p.addresses)),
                    listeners=tuple(item for p in parts for item in p.listeners),
                    tables=tuple(item for p in parts for item in p.tables),
                    source_ranges=tuple(item for p in parts for item in p.source_ranges))


_NOTHING = PortPlan(addresses=(), listeners=(), tables=())


def _of_family(endpoints: Sequence[Endpoint], fam: int) -> Sequence[Endpoint]:
    """Only ``fam``'s endpoints (the sequence itself when nothing is dropped: the usual case)."""
    v6 = fam == 6
    for ep in endpoints:
        if (":" in ep.ip) != v6:
            return tuple(ep for ep in endpoints if family(ep.ip) == fam)
    return endpoints


def _plan_family(svc: ServicePort, fam: int, endpoints: Sequence[Endpoint], *, node_name: str,
                 node_zone: str | None, nodeport_ips: Sequence[str]) -> PortPlan:
    """One family's plan of one port; ``svc`` is that family's view, ``endpoints`` of that family."""
    filters: tuple[tuple[ListenerKey, tuple[str, ...]], ...] = ()
    cat = categorize(svc, endpoints, node_name=node_name, node_zone=node_zone)
    internal = TableKey(svc.name, external=False, family=fam)
    internal_entry = TableEntry(_pairs(cat.internal), svc.affinity_timeout)
    tables = [(internal, internal_entry)]
    listeners = [(ListenerKey(svc.cluster_ip, svc.port, svc.protocol), internal)]
    # A UDP port with no endpoint anywhere holds no socket, so the kernel answers its datagrams with a
    # port unreachable (kube-proxy's REJECT). Endpoints that exist but are all remote under a Local
    # policy keep the listener: those datagrams are dropped (kube-proxy's DROP).
    refuse = svc.protocol == Protocol.UDP and not cat.has_any
    addresses = [svc.cluster_ip]
    if svc.has_external:
        external = TableKey(svc.name, external=True, family=fam)
        # Under the Cluster policy both kinds of traffic use the same endpoints: one entry held for both.
        tables.append((external, internal_entry if cat.external is cat.internal
                       else TableEntry(_pairs(cat.external), svc.affinity_timeout)))
        for ip in svc.external_addresses:
            addresses.append(ip)
            listeners.append((ListenerKey(ip, svc.port, svc.protocol), external))
        if svc.load_balancer_source_ranges:
            # kube-proxy filters only traffic to the LB IPs, not NodePorts or externalIPs.
            ranges = tuple(r for r in svc.load_balancer_source_ranges if family(r) == fam)
            if ranges:
                filters = tuple((ListenerKey(ip, svc.port, svc.protocol), ranges)
                                for ip in svc.load_balancer_ips)
        if svc.node_port:
            for ip in nodeport_ips:
                if family(ip) == fam:
                    listeners.append((ListenerKey(ip, svc.node_port, svc.protocol), external))
    if refuse:
        listeners, filters = [], ()
    return PortPlan(addresses=tuple(dict.fromkeys(addresses)), listeners=tuple(listeners),
                    tables=tuple(tables), source_ranges=filters)


# One listener's claimants: (name, table) when one port claims it, else name -> table.
_Claims = tuple[ServicePortName, TableKey] | dict[ServicePortName, TableKey]


class Merged:
    """Per-port plans combined into the node's plan, kept up to date one port at a time.

    Putting (or dropping) one port costs only that port's addresses,
    listeners and tables: address reference counts, and for each listener
    the ports claiming it, so the first claimant in sorted order keeps it
    and the others are reported as conflicts. What changed since the last
    ``take_changes`` is recorded for a partial apply.
    """

    def __init__(self, local_ips: Sequence[str] = ()) -> None:
        self.local_ips = tuple(local_ips)
        self.ports: dict[ServicePortName, PortPlan] = {}
        self.addresses: dict[str, int] = {}  # address -> how many ports want it
        # The ports claiming each listener: the one (name, table) pair of the usual uncontested listener
        # (a dict each was 2.4 MB at 10,000 services), a dict name -> table when several claim it.
        self.claims: dict[ListenerKey, _Claims] = {}
        # The claims' winners as planned, then as listened on (a contested wildcard split per local IP).
        self.wanted: dict[ListenerKey, TableKey] = {}
        self.wanted_ranges: dict[ListenerKey, tuple[str, ...]] = {}
        self.listeners: dict[ListenerKey, TableKey] = {}
        self.ranges: dict[ListenerKey, tuple[str, ...]] = {}
        self._specific: dict[tuple[int, Protocol, int], int] = {}  # (port, protocol, family) -> count
        self._counted: set[ListenerKey] = set()  # the specific keys counted there
        self._expanded: dict[ListenerKey, tuple[ListenerKey, ...]] = {}  # wildcard -> keys it stands on
        self._wild_groups: set[tuple[int, Protocol, int]] = set()  # (port, protocol, family) of _expanded
        self.conflicts: dict[ListenerKey, tuple[str, ...]] = {}
        self.tables: dict[TableKey, TableEntry] = {}
        self._tables_changed: set[TableKey] = set()
        self._listeners_changed: set[ListenerKey] = set()
        self._added: set[str] = set()
        self._removed: set[str] = set()

    def put(self, name: ServicePortName, plan: PortPlan | None) -> None:
        """Set (or with None drop) one service port's plan."""
        touched: set[ListenerKey] = set()
        old = self.ports.pop(name, None)
        if old is not None:
            for ip in old.addresses:
                left = self.addresses[ip] - 1
                if left:
                    self.addresses[ip] = left
                else:
                    del self.addresses[ip]
                    if ip in self._added:
                        self._added.discard(ip)
                    else:
                        self._removed.add(ip)
            for key, _table in old.listeners:
                self._unclaim(key, name)
                touched.add(key)
            for tkey, _entry in old.tables:
                del self.tables[tkey]
                self._tables_changed.add(tkey)
        if plan is not None:
            self.ports[name] = plan
            for ip in plan.addresses:
                count = self.addresses.get(ip, 0)
                self.addresses[ip] = count + 1
                if not count:
                    if ip in self._removed:
                        self._removed.discard(ip)
                    else:
                        self._added.add(ip)
            for key, table in plan.listeners:
                # The same port serving itself twice (an externalIP equal to
                # the ClusterIP) keeps its first, more specific use.
                self._claim(key, name, table)
                touched.add(key)
            for tkey, entry in plan.tables:
                if self.tables.get(tkey) != entry or old is None:
                    self._tables_changed.add(tkey)
                self.tables[tkey] = entry
        for key in touched:
            self._settle(key)

    def _claim(self, key: ListenerKey, name: ServicePortName, table: TableKey) -> None:
        claims = self.claims.get(key)
        if claims is None:
            self.claims[key] = (name, table)
        elif isinstance(claims, tuple):
            if claims[0] != name:  # else the port's first use of the key stays
                self.claims[key] = {claims[0]: claims[1], name: table}
        else:
            claims.setdefault(name, table)

    def _unclaim(self, key: ListenerKey, name: ServicePortName) -> None:
        claims = self.claims.get(key)
        if claims is None:
            return
        if isinstance(claims, tuple):
            if claims[0] == name:
                del self.claims[key]
            return
        claims.pop(name, None)
        if len(claims) == 1:
            self.claims[key] = next(iter(claims.items()))

    def _settle(self, key: ListenerKey) -> None:
        claims = self.claims.get(key)
        if claims is None:
            self.conflicts.pop(key, None)
            self.wanted.pop(key, None)
            self.wanted_ranges.pop(key, None)
        else:
            if isinstance(claims, tuple):  # the usual case: no order to settle, no conflict
                winner, table = claims
                lost: tuple[str, ...] = ()
            else:
                winner = min(claims)
                table = claims[winner]
                lost = tuple(f"{key} wanted by {claims[n].name} is already served by {table.name}"
                             for n in sorted(claims) if n != winner)
            self.wanted[key] = table
            ranges = None
            for ranged, their in self.ports[winner].source_ranges:
                if ranged == key:
                    ranges = their
                    break
            if ranges:
                self.wanted_ranges[key] = ranges
            else:
                self.wanted_ranges.pop(key, None)
            if lost:
                self.conflicts[key] = lost
            else:
                self.conflicts.pop(key, None)
        self._project(key)

    def _project(self, key: ListenerKey) -> None:
        """Carry one planned listener into ``listeners``, splitting a contested wildcard."""
        fam = family(key.ip)
        group = (key.port, key.protocol, fam)
        if key.ip not in _WILDCARDS:
            counted = key in self._counted
            if (key in self.wanted) != counted:
                left = self._specific.get(group, 0) + (-1 if counted else 1)
                if left:
                    self._specific[group] = left
                else:
                    del self._specific[group]
                if counted:
                    self._counted.discard(key)
                else:
                    self._counted.add(key)
            self._show(key, self.wanted.get(key), self.wanted_ranges.get(key))
            if group not in self._wild_groups:
                return  # no wildcard of this port wanted or split: nothing below can change
        wildcard = ListenerKey(WILDCARD[fam], key.port, key.protocol)
        table = self.wanted.get(wildcard)
        shown: dict[ListenerKey, TableKey] = {}
        if table is not None:
            if group in self._specific:
                for ip in self.local_ips:
                    split = ListenerKey(ip, key.port, key.protocol)
                    if family(ip) == fam and split not in self.wanted:
                        shown[split] = table
            else:
                shown[wildcard] = table
        for old in self._expanded.get(wildcard, ()):
            if old not in shown and (old == wildcard or old not in self.wanted):
                self._show(old, None, None)
        for split, split_table in shown.items():
            self._show(split, split_table, self.wanted_ranges.get(wildcard))
        if table is None:
            self._expanded.pop(wildcard, None)
            self._wild_groups.discard(group)
        else:
            self._expanded[wildcard] = tuple(shown)
            self._wild_groups.add(group)

    def _show(self, key: ListenerKey, table: TableKey | None, ranges: tuple[str, ...] | None) -> None:
        if self.listeners.get(key) != table or self.ranges.get(key) != ranges:
            self._listeners_changed.add(key)
        if table is None:
            self.listeners.pop(key, None)
        else:
            self.listeners[key] = table
        if ranges:
            self.ranges[key] = ranges
        else:
            self.ranges.pop(key, None)

    def take_changes(self) -> PlanChanges:
        changes = PlanChanges(tables=frozenset(self._tables_changed),
                              listeners=frozenset(self._listeners_changed),
                              added_addresses=frozenset(self._added),
                              removed_addresses=frozenset(self._removed))
        self._tables_changed.clear()
        self._listeners_changed.clear()
        self._added.clear()
        self._removed.clear()
        return changes

    def plan(self, changes: PlanChanges | None = None) -> Plan:
        return Plan(addresses=frozenset(self.addresses), listeners=dict(self.listeners),
                    tables=dict(self.tables),
                    conflicts=tuple(sorted(c for texts in self.conflicts.values() for c in texts)),
                    source_ranges=dict(self.ranges), changes=changes)


def merge(ports: Mapping[ServicePortName, PortPlan], local_ips: Sequence[str] = ()) -> Plan:
    """Combine per-port plans; the first service port (sorted) keeps a contested listener.

    A wildcard listener whose port and protocol some specific address also
    listens on is replaced by one listener per address of ``local_ips`` of
    its family (an address already listened on keeps its own listener).
    """
    merged = Merged(local_ips)
    for name, plan in ports.items():
        merged.put(name, plan)
    return merged.plan()


class Planner:
    """Re-plans only the changed service ports; keeps the rest (and their merge) from the last plan."""

    def __init__(self) -> None:
        self._merged = Merged()
        self._inputs: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]] = {}
        self._context: tuple[str, str | None, tuple[str, ...], tuple[str, ...], tuple[int, ...]] | None = None

    def plan(self, state: ProxyState, *, changed: frozenset[ServiceName] | None,
             nodeport_ips: Sequence[str], local_ips: Sequence[str] = (),
             changed_ports: Iterable[ServicePortName] | None = None,
             families: Sequence[int] = (4, 6)) -> Plan:
        """The node's plan; a partial one (``changes`` set) when ``changed`` is not None.

        ``changed_ports`` (the tracker's index) names the ports to re-plan;
        without it the ports of ``changed`` services are looked up by a scan.
        ``local_ips`` (the node's addresses) stand in for a contested wildcard.
        ``families`` are the address families the node serves.
        """
        context = (state.node_name, state.node_zone, tuple(nodeport_ips), tuple(local_ips), tuple(families))
        if context != self._context:
            # Node name, zone or addresses moved: every port may plan differently.
            changed = None
            self._context = context
            self._inputs.clear()
        if changed is None:
            old_inputs = self._inputs
            old_ports = self._merged.ports
            self._merged = Merged(local_ips)
            self._inputs = inputs = {}
            node_name, node_zone, endpoints = state.node_name, state.node_zone, state.endpoints
            put = self._merged.put
            for name, svc in state.service_ports.items():
                eps = endpoints.get(name, ())
                part = old_ports.get(name)
                if part is None or old_inputs.get(name) != (svc, eps):
                    part = plan_port(svc, eps, node_name=node_name, node_zone=node_zone,
                                     nodeport_ips=nodeport_ips, families=families)
                inputs[name] = (svc, eps)
                put(name, part)
            self._merged.take_changes()
            return self._merged.plan()
        if changed_ports is None:
            names: Iterable[ServicePortName] = (
                {n for n in state.service_ports if n.service in changed}
                | {n for n in self._merged.ports if n.service in changed})
        else:
            names = changed_ports
        for name in names:
            svc_port = state.service_ports.get(name)
            if svc_port is None:
                if name in self._merged.ports:
                    self._merged.put(name, None)
                self._inputs.pop(name, None)
                continue
            eps = state.endpoints_of(name)
            if self._inputs.get(name) == (svc_port, eps):
                continue
            self._inputs[name] = (svc_port, eps)
            self._merged.put(name, plan_port(svc_port, eps, node_name=state.node_name,
                                             node_zone=state.node_zone, nodeport_ips=nodeport_ips,
                                             families=families))
        return self._merged.plan(self._merged.take_changes())


_WILDCARDS = frozenset(WILDCARD.values())


def nodeport_node_ips(cidrs: Sequence[str], local_ips: Sequence[str],
                      families: Sequence[int] = (4,)) -> list[str]:
    """The node addresses accepting NodePorts, per family like kube-proxy's ``--nodeport-addresses``.

    For each family served, the local addresses inside that family's CIDRs,
    or every local address of the family when no CIDR of it is given. IPv6
    link-local addresses are left out: a socket binds them only with a
    scope (interface), and kube-proxy does not serve NodePorts on them.
    """
    out: list[str] = []
    for fam in families:
        mine = [ipaddress.ip_network(c, strict=False) for c in cidrs if family(c) == fam]
        for ip in local_ips:
            if family(ip) != fam:
                continue
            addr = ipaddress.ip_address(ip)
            if (fam == 6 and addr.is_link_local) or (mine and not any(addr in net for net in mine)):
                continue
            out.append(ip)
    return out


def nodeport_listen_ips(cidrs: Sequence[str], node_ips: Sequence[str],
                        families: Sequence[int] = (4,)) -> list[str]:
    """Where NodePorts listen: per family, the wildcard when no CIDR of the family restricts them,
    else that family's matching node IPs (``node_ips`` as ``nodeport_node_ips`` gives them)."""
    out: list[str] = []
    for fam in families:
        if not any(family(c) == fam for c in cidrs):
            out.append(WILDCARD[fam])
        else:
            out.extend(ip for ip in node_ips if family(ip) == fam)
    return out
