"""The vocabulary every layer of proxyd speaks: immutable value types.

Sources turn raw Kubernetes objects into ``Service`` and ``EndpointSlice``
values (validated, so nothing downstream re-checks them). The tracker merges
those into a ``ProxyState``: one ``ServicePort`` per (service, port, protocol)
and the merged, de-duplicated ``Endpoint`` tuple serving it. Modes read only
``ProxyState``; policy decides which of its endpoints serve which traffic.

Nothing here does I/O. Every type is frozen and hashable so that states can
be compared cheaply (``==``) to find what changed between two syncs.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds; Kubernetes' default for ClientIP


class Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class ServiceType(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


@dataclass(frozen=True, slots=True, order=True)
class ServiceName:
    """namespace/name of a Service."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """One port of one Service: kube-proxy's ServicePortName.

    ``port`` is the port's name ("" when the service has a single unnamed
    port). ``str()`` gives kube-proxy's form ``ns/name:port`` (``ns/name``
    when unnamed), which is also the input of its chain-name hashes.
    """

    namespace: str
    name: str
    port: str
    protocol: Protocol

    @property
    def service(self) -> ServiceName:
        return ServiceName(self.namespace, self.name)

    def __str__(self) -> str:
        suffix = f":{self.port}" if self.port else ""
        return f"{self.namespace}/{self.name}{suffix}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """Everything a mode needs to serve one port of one Service.

    Addresses are strings in canonical form (``ipaddress`` round-trip);
    ``family(ip)`` tells v4 from v6. ``cluster_ip`` is the primary cluster IP
    (``spec.clusterIPs[0]``) and ``secondary_cluster_ip`` the other family's
    of a dual-stack service ("" when single-stack); external IPs, LB ingress
    IPs and source ranges hold both families. A mode that serves one family
    reads the port through ``for_family`` (kube-proxy's per-family proxier
    view). ``node_port`` and
    ``health_check_node_port`` are 0 when absent. ``affinity_timeout`` is 0
    when sessionAffinity is None, else the ClientIP timeout in seconds.
    ``target_port`` is what the Service asked for (number or name): the
    actual backend port comes from each Endpoint.
    """

    name: ServicePortName
    type: ServiceType
    cluster_ip: str
    port: int
    protocol: Protocol
    target_port: int | str = 0
    node_port: int = 0
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    affinity_timeout: int = 0
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0
    # Topology-aware routing requested (annotation service.kubernetes.io/
    # topology-mode=Auto or trafficDistribution=PreferClose).
    topology_aware: bool = False
    secondary_cluster_ip: str = ""

    @property
    def cluster_ips(self) -> tuple[str, ...]:
        """Every cluster IP, primary first (one per family)."""
        if self.secondary_cluster_ip:
            return (self.cluster_ip, self.secondary_cluster_ip)
        return (self.cluster_ip,)

    def for_family(self, fam: int) -> ServicePort | None:
        """This port as family ``fam`` serves it: that family's cluster IP and only that family's
        external IPs, LB IPs and source ranges; None when the service has no cluster IP of ``fam``.

        Returns ``self`` when nothing of the other family is present (the common single-stack case
        costs no copy).
        """
        if family(self.cluster_ip) == fam:
            cluster_ip = self.cluster_ip
        elif self.secondary_cluster_ip and family(self.secondary_cluster_ip) == fam:
            cluster_ip = self.secondary_cluster_ip
        else:
            return None
        external_ips = _of_family(self.external_ips, fam)
        lb_ips = _of_family(self.load_balancer_ips, fam)
        ranges = _of_family(self.load_balancer_source_ranges, fam)
        if (not self.secondary_cluster_ip and external_ips is self.external_ips
                and lb_ips is self.load_balancer_ips and ranges is self.load_balancer_source_ranges):
            return self
        return replace(self, cluster_ip=cluster_ip, secondary_cluster_ip="", external_ips=external_ips,
                       load_balancer_ips=lb_ips, load_balancer_source_ranges=ranges)

    @property
    def external_addresses(self) -> tuple[str, ...]:
        """externalIPs then LB ingress IPs: the 'external' destinations."""
        return self.external_ips + self.load_balancer_ips

    @property
    def has_external(self) -> bool:
        """True when this port takes traffic from outside the cluster."""
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)

    @property
    def uses_local_external(self) -> bool:
        """externalTrafficPolicy: Local applies (only for external traffic)."""
        return self.external_policy_local and self.has_external


@dataclass(frozen=True, slots=True)
class Conditions:
    """What EndpointSlices say of one endpoint address besides the address itself.

    Held once per distinct value (``conditions``) and shared by every ``SliceEndpoint`` and
    ``Endpoint`` saying the same: a cluster has few (ready or not, times its nodes), and six
    slots on each of 100,000 endpoints at 10,000 services, twice (slices and merged), were 7 MB.
    """

    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: tuple[str, ...] = ()


_CONDITIONS: dict[tuple[bool, bool, bool, str | None, str | None, tuple[str, ...]], Conditions] = {}
# Bounded, so that hostile input (a distinct node, zone or hint list per endpoint) cannot grow it: past
# the bound, conditions are built per endpoint, as equal (``==``) as shared ones.
_CONDITIONS_MAX = 4096


def conditions(ready: bool = True, serving: bool = True, terminating: bool = False,
               node_name: str | None = None, zone: str | None = None,
               zone_hints: tuple[str, ...] = ()) -> Conditions:
    """The shared ``Conditions`` of these values."""
    key = (ready, serving, terminating, node_name, zone, zone_hints)
    held = _CONDITIONS.get(key)
    if held is None:
        held = Conditions(ready, serving, terminating, node_name, zone, zone_hints)
        if len(_CONDITIONS) < _CONDITIONS_MAX:
            _CONDITIONS[key] = held
    return held


class _EndpointAddress:
    """What ``SliceEndpoint`` and ``Endpoint`` share: an address's ``Conditions``, read as attributes."""

    __slots__ = ()
    conditions: Conditions

    @property
    def ready(self) -> bool:
        return self.conditions.ready

    @property
    def serving(self) -> bool:
        return self.conditions.serving

    @property
    def terminating(self) -> bool:
        return self.conditions.terminating

    @property
    def node_name(self) -> str | None:
        return self.conditions.node_name

    @property
    def zone(self) -> str | None:
        return self.conditions.zone

    @property
    def zone_hints(self) -> tuple[str, ...]:
        return self.conditions.zone_hints

    def is_local(self, node_name: str) -> bool:
        node = self.conditions.node_name
        return node is not None and node == node_name


def _set_conditions(obj: object, given: Conditions | None, ready: bool, serving: bool, terminating: bool,
                    node_name: str | None, zone: str | None, zone_hints: tuple[str, ...]) -> None:
    object.__setattr__(obj, "conditions", given if given is not None else conditions(
        ready, serving, terminating, node_name, zone, tuple(zone_hints)))


@dataclass(frozen=True, slots=True, init=False)
class Endpoint(_EndpointAddress):
    """One backend address:port of one service port, after merging slices.

    Built as ``Endpoint(ip, port, ready=..., node_name=...)``, or with a ``conditions`` already held.
    """

    ip: str
    port: int
    conditions: Conditions

    def __init__(self, ip: str, port: int, *, ready: bool = True, serving: bool = True,
                 terminating: bool = False, node_name: str | None = None, zone: str | None = None,
                 zone_hints: tuple[str, ...] = (), conditions: Conditions | None = None) -> None:
        object.__setattr__(self, "ip", ip)
        object.__setattr__(self, "port", port)
        _set_conditions(self, conditions, ready, serving, terminating, node_name, zone, zone_hints)

    def __str__(self) -> str:
        if ":" in self.ip:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class Service:
    """A validated Service as a source delivers it: one ServicePort per port.

    Services proxyd must not serve (headless, ExternalName, labelled with
    service-proxy-name or headless) are never built: the source drops them.
    """

    name: ServiceName
    ports: tuple[ServicePort, ...]


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int
    protocol: Protocol


@dataclass(frozen=True, slots=True, init=False)
class SliceEndpoint(_EndpointAddress):
    """One entry of an EndpointSlice's ``endpoints`` list (first address)."""

    ip: str
    conditions: Conditions

    def __init__(self, ip: str, *, ready: bool = True, serving: bool = True, terminating: bool = False,
                 node_name: str | None = None, zone: str | None = None, zone_hints: tuple[str, ...] = (),
                 conditions: Conditions | None = None) -> None:
        object.__setattr__(self, "ip", ip)
        _set_conditions(self, conditions, ready, serving, terminating, node_name, zone, zone_hints)

    def at_port(self, port: int) -> Endpoint:
        """This address as the endpoint of one service port (sharing its conditions)."""
        return Endpoint(self.ip, port, conditions=self.conditions)


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """A validated EndpointSlice (or an Endpoints object converted to one)."""

    namespace: str
    name: str
    service: str
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[SliceEndpoint, ...]
    address_family: int = 4

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def service_name(self) -> ServiceName:
        return ServiceName(self.namespace, self.service)


_EMPTY: Mapping[Any, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ProxyState:
    """The desired state handed to a mode at each sync.

    ``service_ports`` holds every ServicePort to serve; ``endpoints`` maps each of
    them to its merged endpoints (possibly empty: the port then rejects).
    ``node_name`` and ``node_labels`` are this node's, for Local policies and
    topology.
    """

    service_ports: Mapping[ServicePortName, ServicePort] = field(default_factory=lambda: _EMPTY)
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]] = field(default_factory=lambda: _EMPTY)
    node_name: str = ""
    node_labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    @property
    def node_zone(self) -> str | None:
        return self.node_labels.get("topology.kubernetes.io/zone")

    def endpoints_of(self, name: ServicePortName) -> tuple[Endpoint, ...]:
        return self.endpoints.get(name, ())

    def for_family(self, fam: int) -> ProxyState:
        """The state one family's proxier serves (kube-proxy's meta-proxier split).

        Service ports without a cluster IP of ``fam`` are left out, the others are seen through
        ``ServicePort.for_family`` and keep only endpoints of ``fam`` (an EndpointSlice holds one
        family; a dual-stack service has a slice per family).
        """
        ports: dict[ServicePortName, ServicePort] = {}
        endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
        for name, sp in self.service_ports.items():
            view = sp.for_family(fam)
            if view is None:
                continue
            ports[name] = view
            eps = self.endpoints.get(name)
            if eps is not None:
                if any(family(ep.ip) != fam for ep in eps):
                    eps = tuple(ep for ep in eps if family(ep.ip) == fam)
                endpoints[name] = eps
        return ProxyState(MappingProxyType(ports), MappingProxyType(endpoints), self.node_name,
                          self.node_labels)


def family(ip: str) -> int:
    """4 or 6 for a textual address or CIDR."""
    return 6 if ":" in ip else 4


def _of_family(values: tuple[str, ...], fam: int) -> tuple[str, ...]:
    """``values`` (addresses or CIDRs) of family ``fam``; ``values`` itself when all are."""
    if all(family(v) == fam for v in values):
        return values
    return tuple(v for v in values if family(v) == fam)


def canonical_ip(text: str) -> str:
    """``str(ipaddress.ip_address(text))``: the canonical text of an address; ValueError when not one.

    Ten times faster for IPv4 (100,000 endpoints at 10,000 services): glibc's
    ``inet_pton`` takes exactly the dotted quads ``ipaddress`` takes (no
    leading zeros, no short forms), and ``inet_ntop`` writes them back as
    ``ipaddress`` does; IPv6 text goes through ``ipaddress`` (its spelling of
    embedded IPv4 differs).
    """
    if ":" not in text:
        try:
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text))
        except (OSError, ValueError):
            pass  # ipaddress gives the error message
    return str(ipaddress.ip_address(text))
