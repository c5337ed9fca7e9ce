"""Userspace mode's pure planner: desired state → addresses to hold, sockets to listen on, endpoint lists.

No I/O here. For every service port the planner decides:

* which service addresses this node must own so that the kernel delivers
  their packets to proxyd's sockets: the ClusterIP, every externalIP and
  every LB ingress IP (held on the ``proxyd0`` bridge by ``addresses.py``);
* which sockets to listen on: ``(ip, port, protocol)`` for the ClusterIP,
  the externalIPs and LB IPs, and ``(node ip, nodePort, protocol)`` for each
  node address accepting NodePorts (``0.0.0.0`` when every address does);
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

Planning is per service port (``plan_port``) so a sync can re-plan only the
services that changed and reuse the rest (``Planner``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from proxyd.model import Endpoint, Protocol, ProxyState, ServiceName, ServicePort, ServicePortName, family
from proxyd.policy import categorize

WILDCARD = {4: "0.0.0.0", 6: "::"}


@dataclass(frozen=True, slots=True, order=True)
class ListenerKey:
    """One listening socket: the address, port and protocol it is bound to."""

    ip: str
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True, order=True)
class TableKey:
    """A connection-table entry: one service port's endpoints for one kind of traffic.

    ``id`` is the string the connection table is keyed by
    (``ns/name:port/TCP``, with ``/external`` appended for external traffic),
    computed once here so the data path never formats it.
    """

    name: ServicePortName
    external: bool = False
    id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.id:
            suffix = "/external" if self.external else ""
            object.__setattr__(self, "id", f"{self.name}/{self.name.protocol}{suffix}")

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
class Plan:
    """The whole node: addresses to hold, listeners (→ the table key they serve), tables."""

    addresses: frozenset[str] = frozenset()
    listeners: Mapping[ListenerKey, TableKey] = field(default_factory=dict)
    tables: Mapping[TableKey, TableEntry] = field(default_factory=dict)
    conflicts: tuple[str, ...] = ()
    source_ranges: Mapping[ListenerKey, tuple[str, ...]] = field(default_factory=dict)


def _pairs(endpoints: Iterable[Endpoint]) -> tuple[tuple[str, int], ...]:
    seen: dict[tuple[str, int], None] = {}
    for ep in endpoints:
        seen.setdefault((ep.ip, ep.port), None)
    return tuple(seen)


def plan_port(svc: ServicePort, endpoints: Sequence[Endpoint], *, node_name: str, node_zone: str | None,
              nodeport_ips: Sequence[str]) -> PortPlan:
    """The addresses, listeners and table entries of one service port.

    ``nodeport_ips`` are the node addresses accepting NodePorts (a wildcard
    address for all of them); only those of the service's family are used.
    """
    fam = family(svc.cluster_ip)
    filters: tuple[tuple[ListenerKey, tuple[str, ...]], ...] = ()
    cat = categorize(svc, endpoints, node_name=node_name, node_zone=node_zone)
    internal = TableKey(svc.name, external=False)
    tables = [(internal, TableEntry(_pairs(cat.internal), svc.affinity_timeout))]
    listeners = [(ListenerKey(svc.cluster_ip, svc.port, svc.protocol), internal)]
    addresses = [svc.cluster_ip]
    if svc.has_external:
        external = TableKey(svc.name, external=True)
        tables.append((external, TableEntry(_pairs(cat.external), svc.affinity_timeout)))
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
    return PortPlan(addresses=tuple(dict.fromkeys(addresses)), listeners=tuple(listeners),
                    tables=tuple(tables), source_ranges=filters)


def merge(ports: Mapping[ServicePortName, PortPlan]) -> Plan:
    """Combine per-port plans; the first service port (sorted) keeps a contested listener."""
    addresses: set[str] = set()
    listeners: dict[ListenerKey, TableKey] = {}
    tables: dict[TableKey, TableEntry] = {}
    conflicts: list[str] = []
    ranges: dict[ListenerKey, tuple[str, ...]] = {}
    for name in sorted(ports):
        plan = ports[name]
        addresses.update(plan.addresses)
        tables.update(plan.tables)
        own = dict(plan.source_ranges)
        for key, table in plan.listeners:
            owner = listeners.get(key)
            if owner is None:
                listeners[key] = table
                if key in own:
                    ranges[key] = own[key]
            elif owner.name != table.name:
                conflicts.append(f"{key} wanted by {table.name} is already served by {owner.name}")
            # The same port serving itself twice (an externalIP equal to the
            # ClusterIP) keeps its first, more specific use.
    return Plan(addresses=frozenset(addresses), listeners=listeners, tables=tables,
                conflicts=tuple(conflicts), source_ranges=ranges)


class Planner:
    """Re-plans only the service ports of changed services; merges the rest from its cache."""

    def __init__(self) -> None:
        self._ports: dict[ServicePortName, PortPlan] = {}
        self._inputs: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]] = {}
        self._context: tuple[str, str | None, tuple[str, ...]] | None = None

    def plan(self, state: ProxyState, *, changed: frozenset[ServiceName] | None,
             nodeport_ips: Sequence[str]) -> Plan:
        context = (state.node_name, state.node_zone, tuple(nodeport_ips))
        if context != self._context:
            # Node name, zone or addresses moved: every port may plan differently.
            changed = None
            self._context = context
            self._ports.clear()
            self._inputs.clear()
        if changed is None:
            names: Iterable[ServicePortName] = list(state.service_ports)
            for gone in set(self._ports) - set(state.service_ports):
                del self._ports[gone]
                del self._inputs[gone]
        else:
            names = [n for n in state.service_ports if n.service in changed or n not in self._ports]
            for gone in [n for n in self._ports if n.service in changed and n not in state.service_ports]:
                del self._ports[gone]
                del self._inputs[gone]
        for name in names:
            svc = state.service_ports[name]
            eps = state.endpoints_of(name)
            if self._inputs.get(name) == (svc, eps):
                continue
            self._inputs[name] = (svc, eps)
            self._ports[name] = plan_port(svc, eps, node_name=state.node_name, node_zone=state.node_zone,
                                          nodeport_ips=nodeport_ips)
        return merge(self._ports)


def nodeport_listen_ips(cidrs: Sequence[str], node_ips: Sequence[str]) -> list[str]:
    """Where NodePorts listen: the wildcards when no CIDR restricts them, else the matching node IPs."""
    if not cidrs:
        return [WILDCARD[4]]
    return list(node_ips)
