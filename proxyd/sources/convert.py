"""Raw Kubernetes objects (decoded JSON/YAML) → validated model values.

Shared by the manifests source and the API-server source. Everything here is
pure: a function takes one decoded object (whatever a file or the wire gave,
so possibly hostile) and returns a model value, ``None`` for an object proxyd
must ignore, or raises ``InvalidObject`` with a short, printable reason.
No other exception escapes: a wrong type anywhere is an invalid object, never
a ``TypeError`` in the daemon.

What is "valid" follows the API server's own validation where proxyd relies
on it (names, IPs, ports, protocols), because kube-proxy trusts the API server
and never sees such objects. Anything that ends up in a model value is either
a canonical IP/CIDR, a number, an enum, or a string matching a Kubernetes name
grammar (DNS-1123/1035 labels and subdomains, label values), so no field can
carry a newline, a space, a quote or an iptables option into rules or logs.

What is kept follows kube-proxy (pkg/proxy/serviceport.go,
endpointslicecache.go): a ServicePort holds every cluster IP (primary first,
one per family) and the external IPs, LB ingress IPs and source ranges of
both families (a family's proxier reads its own through
``ServicePort.for_family``), LB ingress IPs with ``ipMode: Proxy`` skipped, endpoint
conditions ``ready``/``serving`` nil meaning true and ``terminating`` nil
meaning false.

Nothing is dropped silently. What proxyd does not serve in an otherwise
valid object is described by a ``Note`` appended to the caller's ``notes``
list: an address the API server would refuse (``ValidateEndpointIP`` /
``ValidateNonSpecialIP``: unspecified, loopback, link-local, and here also
any multicast address) in endpoints, externalIPs or LB ingress IPs is
refused alone and the rest of the object kept; an object proxyd ignores by
design (headless, ExternalName, another proxy's, a slice without a service)
gets a note saying why. The sources log each note once and count it.

Services are converted in two steps so that the manifests source can fill
in what only an API server would (``proxyd.sources.allocate``):
``service_spec`` validates into a ``ServiceSpec`` whose cluster IP and node
ports may be missing, ``build_service`` turns a complete spec into the model
value. ``service_from_dict`` does both, for sources whose objects come
complete (the API server always allocates).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from proxyd.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    EndpointPort,
    EndpointSlice,
    Protocol,
    Service,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServiceType,
    SliceEndpoint,
    canonical_ip,
    family,
)

T = TypeVar("T")

LABEL_SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_SKIP_MIRROR = "endpointslice.kubernetes.io/skip-mirror"
ANNOTATION_TOPOLOGY_MODE = "service.kubernetes.io/topology-mode"
ANNOTATION_TOPOLOGY_HINTS = "service.kubernetes.io/topology-aware-hints"
MIRROR_PREFIX = "endpoints-mirror:"

MAX_AFFINITY_TIMEOUT = 86400  # API validation: 0 < timeoutSeconds <= 86400
MAX_SLICE_ENDPOINTS = 1000  # API validation of discovery.k8s.io/v1
MAX_SLICE_PORTS = 100
MAX_MIRRORED_PER_SUBSET = 1000  # the mirroring controller's maxEndpointsPerSubset
# Anything bigger than this in one list is not a real object; refusing early
# keeps a hostile document from costing minutes of validation.
MAX_LIST = 100_000

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")

_SERVICE_TYPES = {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"}
_PROTOCOLS = {p.value: p for p in Protocol}


@dataclass(frozen=True, slots=True)
class Note:
    """A part of an object proxyd does not serve, and why: one log line and one metric each.

    ``refused``: the API server would refuse it (a warning, ``proxyd_rejected_objects_total``);
    otherwise proxyd leaves it alone by design, as kube-proxy does (info,
    ``proxyd_ignored_objects_total``). ``category`` is the metric's reason label.
    """

    path: str
    reason: str
    category: str
    refused: bool


class InvalidObject(ValueError):
    """An object that must not be programmed; ``reason`` says why (one printable line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- primitives


def show(value: object) -> str:
    """A short, single-line, escape-safe rendering of an offending value for reasons and logs."""
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:40] + "…"
        return ascii(text)
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, int):
        text = str(value) if abs(value) < 10**30 else "a huge number"
        return text
    return f"a {type(value).__name__}"


def _fail(path: str, message: str) -> InvalidObject:
    return InvalidObject(f"{path}: {message}")


def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if type(value) is not dict and not isinstance(value, Mapping):  # a dict needs no ABC check
        raise _fail(path, f"must be an object, not {show(value)}")
    return value


def _opt_mapping(parent: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        return {}
    return _mapping(value, f"{path}.{key}")


def _opt_list(parent: Mapping[str, Any], key: str, path: str, *, limit: int = MAX_LIST) -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(f"{path}.{key}", f"must be a list, not {show(value)}")
    if len(value) > limit:
        raise _fail(f"{path}.{key}", f"too many entries ({len(value)} > {limit})")
    return value


def _opt_str(parent: Mapping[str, Any], key: str, path: str) -> str | None:
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(f"{path}.{key}", f"must be a string, not {show(value)}")
    return value


def _opt_bool(parent: Mapping[str, Any], key: str, path: str) -> bool | None:
    value = parent.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise _fail(f"{path}.{key}", f"must be true or false, not {show(value)}")


def _int(value: object, path: str) -> int:
    # bool is an int in Python but never a number in Kubernetes JSON.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"must be an integer, not {show(value)}")
    return value


def _port(value: object, path: str) -> int:
    number = _int(value, path)
    if not 1 <= number <= 65535:
        raise _fail(path, f"must be between 1 and 65535, not {show(number)}")
    return number


def _opt_port(parent: Mapping[str, Any], key: str, path: str) -> int:
    """0 when absent or 0 (unset in the API), else a valid port."""
    value = parent.get(key)
    if value is None or (type(value) is int and value == 0):
        return 0
    return _port(value, f"{path}.{key}")


def _matches(pattern: re.Pattern[str], value: str, max_len: int) -> bool:
    return len(value) <= max_len and pattern.fullmatch(value) is not None


def _name(value: object, path: str, *, pattern: re.Pattern[str], max_len: int, what: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"must be a string, not {show(value)}")
    if not _matches(pattern, value, max_len):
        raise _fail(path, f"{show(value)} is not a valid {what}")
    return value


def _dns_label(value: object, path: str) -> str:
    return _name(value, path, pattern=_DNS1123_LABEL, max_len=63, what="DNS-1123 label")


def _service_name(value: object, path: str) -> str:
    return _name(value, path, pattern=_DNS1035_LABEL, max_len=63, what="service name (DNS-1035 label)")


def _subdomain(value: object, path: str) -> str:
    return _name(value, path, pattern=_DNS1123_SUBDOMAIN, max_len=253, what="DNS-1123 subdomain")


def _label_value(value: object, path: str) -> str:
    return _name(value, path, pattern=_LABEL_VALUE, max_len=63, what="label value")


def _is_iana_svc_name(value: str) -> bool:
    # RFC 6335: at most 15 characters, at least one letter, no leading,
    # trailing or doubled hyphen.
    return (_matches(_IANA_SVC_NAME, value, 15) and "--" not in value
            and any("a" <= c <= "z" for c in value))


def _label_key_ok(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and not (prefix and _matches(_DNS1123_SUBDOMAIN, prefix, 253)):
        return False
    return bool(name) and _matches(_LABEL_VALUE, name, 63)


def _ip(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"must be a string, not {show(value)}")
    # ipaddress accepts a scope ("fe80::1%eth0"), which is not an address the
    # API allows and would carry arbitrary text: refuse it.
    if "%" in value or len(value) > 45:
        raise _fail(path, f"{show(value)} is not a valid IP address")
    try:
        return canonical_ip(value)
    except ValueError:
        raise _fail(path, f"{show(value)} is not a valid IP address") from None


_SPECIAL_REASONS = {
    "unspecified_ip": "may not be unspecified",
    "loopback_ip": "may not be in the loopback range (127.0.0.0/8, ::1/128)",
    "link_local_ip": "may not be in the link-local range (169.254.0.0/16, fe80::/10)",
    "multicast_ip": "may not be multicast (224.0.0.0/4, ff00::/8)",
}


def special_address(ip: str) -> tuple[str, str] | None:
    """(metric reason, message) when ``ip`` is not a usable service or endpoint address, else None.

    kube's ValidateEndpointIP/ValidateNonSpecialIP refuse unspecified,
    loopback, link-local unicast and link-local multicast addresses in
    endpoints and externalIPs: served, they let any client reach the node's
    own loopback-only services (a NodePort to 127.0.0.1:10249 exposes
    /metrics) or make a listener bind the wildcard address. kube allows
    other multicast addresses, which its own comment calls a bug; proxyd
    refuses every multicast address since no connection can be made to one.
    An IPv4-mapped IPv6 address is judged by its IPv4 address, as Go does.
    """
    kind = _special_kind(ip)
    return None if kind is None else (kind, f"{ip} {_SPECIAL_REASONS[kind]}")


def _special_kind(ip: str) -> str | None:
    if ":" not in ip:
        # IPv4 (every endpoint at 10,000 services) by its leading bytes, without ipaddress: the
        # ranges of the properties below (test_convert checks that both always agree).
        with contextlib.suppress(OSError, ValueError):
            return _special_v4(socket.inet_pton(socket.AF_INET, ip))
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        return "unspecified_ip"
    if addr.is_loopback:
        return "loopback_ip"
    if addr.is_link_local:
        return "link_local_ip"
    if addr.is_multicast:
        return "multicast_ip"
    return None


def _special_v4(packed: bytes) -> str | None:
    """``_special_kind`` of an IPv4 address by its 4 bytes."""
    first = packed[0]
    if packed == b"\0\0\0\0":
        return "unspecified_ip"
    if first == 127:
        return "loopback_ip"
    if first == 169 and packed[1] == 254:
        return "link_local_ip"
    if 224 <= first <= 239:
        return "multicast_ip"
    return None


def _usable(ip: str, path: str, notes: list[Note]) -> bool:
    """False (and a refusal noted) for an address the API server would refuse."""
    special = special_address(ip)
    if special is None:
        return True
    notes.append(Note(path, f"{special[1]}; refused, the rest of the object is kept", special[0], True))
    return False


def _cidr(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"must be a string, not {show(value)}")
    # API validation lets whitespace padding through; kube-proxy trims it.
    text = value.strip()
    if "/" not in text or "%" in text or len(text) > 49:
        raise _fail(path, f"{show(value)} is not a valid CIDR")
    try:
        # Host bits may be set, as Go's net.ParseCIDR allows: keep the network.
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise _fail(path, f"{show(value)} is not a valid CIDR") from None


def _protocol(value: object, path: str) -> Protocol:
    if value is None or value == "":
        return Protocol.TCP  # API defaulting
    if isinstance(value, str) and value in _PROTOCOLS:
        return _PROTOCOLS[value]
    raise _fail(path, f"unknown protocol {show(value)}")


def _labels(meta: Mapping[str, Any], key: str, path: str) -> dict[str, str]:
    raw = _opt_mapping(meta, key, path)
    if len(raw) > MAX_LIST:
        raise _fail(f"{path}.{key}", "too many entries")
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _fail(f"{path}.{key}", f"keys and values must be strings ({show(k)}: {show(v)})")
        out[k] = v
    return out


def _metadata(obj: Mapping[str, Any], *,
              name_check: Callable[[object, str], str]) -> tuple[str, str, Mapping[str, Any]]:
    """(namespace, name, metadata) with the namespace defaulted to "default"."""
    meta = _opt_mapping(obj, "metadata", "")
    raw_name = meta.get("name")
    if raw_name is None or raw_name == "":
        raise InvalidObject("metadata.name: missing")
    name = name_check(raw_name, "metadata.name")
    raw_ns = meta.get("namespace")
    namespace = "default" if raw_ns is None or raw_ns == "" else _dns_label(raw_ns, "metadata.namespace")
    namespace = sys.intern(namespace)  # shared by every object of the namespace (memory at 10k services)
    return namespace, name, meta


def _guard(fn: Callable[[], T]) -> T:
    """Run a conversion; any stray exception becomes InvalidObject.

    The helpers above already check every type; this is the backstop that
    keeps a missed case (or a RecursionError on a pathological value) from
    reaching the caller as anything but an invalid object.
    """
    try:
        return fn()
    except InvalidObject:
        raise
    except (TypeError, KeyError, AttributeError, ValueError, IndexError, RecursionError,
            OverflowError, UnicodeError) as err:
        raise InvalidObject(f"malformed object ({type(err).__name__})") from None


# ---------------------------------------------------------------- Service


@dataclass(frozen=True, slots=True)
class PortSpec:
    """One validated ``spec.ports[]`` entry; ``node_port`` 0 when none is set."""

    name: str
    protocol: Protocol
    port: int
    target_port: int | str
    node_port: int = 0


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A valid Service whose cluster IP and node ports may still be missing.

    Addresses are canonical and of both families; refused addresses are already gone
    (noted by ``service_spec``).
    """

    name: ServiceName
    type: ServiceType
    cluster_ips: tuple[str, ...]  # () when none is set: to allocate
    families: tuple[int, ...]  # spec.ipFamilies, in order; () for the cluster's default
    ports: tuple[PortSpec, ...]
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    source_ranges: tuple[str, ...] = ()
    affinity_timeout: int = 0
    external_policy: str = "Cluster"
    internal_policy: str = "Cluster"
    health_check_node_port: int = 0
    topology_aware: bool = False
    allocate_lb_node_ports: bool = True
    # spec.ipFamilyPolicy as the API server defaults it: RequireDualStack when two cluster IPs or two
    # families are given, else SingleStack.
    ip_family_policy: str = "SingleStack"

    @property
    def dual_stack(self) -> bool:
        """PreferDualStack or RequireDualStack: a cluster IP of each family the cluster has."""
        return self.ip_family_policy != "SingleStack"

    def wanted_families(self, available: tuple[int, ...]) -> tuple[int, ...]:
        """The families to hold a cluster IP of, primary first, in a cluster whose service ranges are of
        ``available`` (primary first): kube-apiserver's initIPFamilyFields.

        ipFamilies, else the families of the cluster IPs set, else the cluster's primary family; a
        dual-stack policy adds the other family when the cluster has it. A family missing from
        ``available`` stays in (the caller refuses it).
        """
        fams = list(self.families)
        for ip in self.cluster_ips[len(fams):]:
            fams.append(family(ip))
        if not fams:
            fams.append(available[0] if available else 4)
        if self.dual_stack and len(fams) < 2 and len(available) >= 2:
            fams.append(6 if fams[0] == 4 else 4)
        return tuple(fams)

    def needs_node_port(self, port: PortSpec) -> bool:
        """True for a NodePort/LoadBalancer port without one that the API server would allocate."""
        if port.node_port or self.type is ServiceType.CLUSTER_IP:
            return False
        return self.type is ServiceType.NODE_PORT or self.allocate_lb_node_ports

    @property
    def needs_health_check_node_port(self) -> bool:
        # apiservice.NeedsHealthCheck: LoadBalancer with externalTrafficPolicy Local.
        return (self.type is ServiceType.LOAD_BALANCER and self.external_policy == "Local"
                and not self.health_check_node_port)

    @property
    def complete(self) -> bool:
        return (bool(self.cluster_ips) and not self.needs_health_check_node_port
                and not any(self.needs_node_port(p) for p in self.ports))

    def explicit_ips(self) -> tuple[str, ...]:
        """Every address this manifest sets itself: never handed out to another service."""
        return (*self.cluster_ips, *self.external_ips, *self.load_balancer_ips)

    def explicit_ports(self) -> tuple[int, ...]:
        ports = tuple(p.node_port for p in self.ports if p.node_port)
        return (*ports, self.health_check_node_port) if self.health_check_node_port else ports


def service_from_dict(obj: object, notes: list[Note] | None = None) -> Service | None:
    """A Service v1 as a validated Service, or None when proxyd must ignore it (a note says why).

    For objects that come complete from an API server: one without a cluster
    IP is invalid (kube-apiserver always allocates one), a NodePort or
    LoadBalancer port without a node port is served without one.
    """
    spec = service_spec(obj, notes)
    if spec is None:
        return None
    if not spec.cluster_ips:
        raise _fail("spec.clusterIP", "missing (an API server always allocates one: incomplete object)")
    return build_service(spec)


def service_spec(obj: object, notes: list[Note] | None = None) -> ServiceSpec | None:
    """A Service v1 validated into a ServiceSpec, or None (and a note) when proxyd ignores it."""
    return _noted(_service, obj, notes)


def _noted(fn: Callable[[object, list[Note]], T], obj: object, notes: list[Note] | None) -> T:
    """``fn(obj, notes)`` guarded; its notes reach the caller only when the object is valid."""
    found: list[Note] = []
    value = _guard(lambda: fn(obj, found))
    if notes is not None:
        notes.extend(found)
    return value


def _ignored(notes: list[Note], path: str, reason: str, category: str) -> None:
    notes.append(Note(path, reason, category, False))


def _service(obj: object, notes: list[Note]) -> ServiceSpec | None:
    obj = _mapping(obj, "object")
    namespace, name, meta = _metadata(obj, name_check=_service_name)
    labels = _labels(meta, "labels", "metadata")
    # kube-proxy's informer selects these away: another proxy owns the service,
    # or it is headless by label.
    if LABEL_SERVICE_PROXY_NAME in labels:
        owner = show(labels[LABEL_SERVICE_PROXY_NAME])
        _ignored(notes, "metadata.labels",
                 f"labelled {LABEL_SERVICE_PROXY_NAME}={owner}: another proxy's", "service_proxy_name")
        return None
    if LABEL_HEADLESS in labels:
        _ignored(notes, "metadata.labels", f"labelled {LABEL_HEADLESS}: headless, nothing to proxy",
                 "headless_label")
        return None
    spec = _opt_mapping(obj, "spec", "")
    status = _opt_mapping(obj, "status", "")

    raw_type = spec.get("type")
    if raw_type is None or raw_type == "":
        raw_type = "ClusterIP"
    if not isinstance(raw_type, str) or raw_type not in _SERVICE_TYPES:
        raise _fail("spec.type", f"unknown service type {show(raw_type)}")
    if raw_type == "ExternalName":
        _ignored(notes, "spec.type", "ExternalName: a DNS alias, nothing to proxy", "external_name")
        return None
    svc_type = ServiceType(raw_type)

    cluster_ips = _cluster_ips(spec)
    if cluster_ips is None:
        _ignored(notes, "spec.clusterIP", "headless (clusterIP: None): DNS serves it, nothing to proxy",
                 "headless")
        return None
    families, policy = _families(spec, cluster_ips)
    external_ips = _addresses(_opt_list(spec, "externalIPs", "spec"), "spec.externalIPs", notes)
    lb_ips = _lb_ips(status, notes) if svc_type is ServiceType.LOAD_BALANCER else ()
    source_ranges = tuple(_cidr(v, f"spec.loadBalancerSourceRanges[{i}]")
                          for i, v in enumerate(_opt_list(spec, "loadBalancerSourceRanges", "spec")))
    if svc_type is not ServiceType.LOAD_BALANCER:
        source_ranges = ()
    affinity = _affinity(spec)
    etp = _policy(spec, "externalTrafficPolicy")
    itp = _policy(spec, "internalTrafficPolicy")
    hc_port = _opt_port(spec, "healthCheckNodePort", "spec")
    # apiservice.NeedsHealthCheck: only LoadBalancer services with policy Local.
    if not (svc_type is ServiceType.LOAD_BALANCER and etp == "Local"):
        hc_port = 0
    allocate_lb = _opt_bool(spec, "allocateLoadBalancerNodePorts", "spec")
    topology = _topology_aware(meta, spec)

    ports: list[PortSpec] = []
    seen_names: set[tuple[str, Protocol]] = set()
    seen_ports: set[tuple[int, Protocol]] = set()
    for i, raw_port in enumerate(_opt_list(spec, "ports", "spec")):
        path = f"spec.ports[{i}]"
        entry = _mapping(raw_port, path)
        port_name = _opt_str(entry, "name", path) or ""
        if port_name:
            _dns_label(port_name, f"{path}.name")
        protocol = _protocol(entry.get("protocol"), f"{path}.protocol")
        if "port" not in entry:
            raise _fail(f"{path}.port", "missing")
        number = _port(entry.get("port"), f"{path}.port")
        target = _target_port(entry.get("targetPort"), number, f"{path}.targetPort")
        node_port = _opt_port(entry, "nodePort", path)
        if svc_type is ServiceType.CLUSTER_IP:
            node_port = 0
        if (port_name, protocol) in seen_names:
            raise _fail(path, f"duplicate port name {show(port_name)} for {protocol}")
        if (number, protocol) in seen_ports:
            raise _fail(path, f"duplicate port {number}/{protocol}")
        seen_names.add((port_name, protocol))
        seen_ports.add((number, protocol))
        ports.append(PortSpec(port_name, protocol, number, target, node_port))
    if not ports:
        _ignored(notes, "spec.ports", "no ports: nothing to serve", "no_ports")
    return ServiceSpec(
        name=ServiceName(namespace, name), type=svc_type, cluster_ips=cluster_ips, families=families,
        ports=tuple(ports), external_ips=external_ips, load_balancer_ips=lb_ips, source_ranges=source_ranges,
        affinity_timeout=affinity, external_policy=etp, internal_policy=itp, health_check_node_port=hc_port,
        topology_aware=topology, allocate_lb_node_ports=allocate_lb is not False, ip_family_policy=policy)


def build_service(spec: ServiceSpec) -> Service:
    """The model value of a spec that has its cluster IP (and, where wanted, its node ports)."""
    if not spec.cluster_ips:
        raise ValueError(f"{spec.name}: no cluster IP to build with")
    cluster_ip, secondary = spec.cluster_ips[0], spec.cluster_ips[1] if len(spec.cluster_ips) > 1 else ""
    external_ips = _unique(spec.external_ips)
    lb_ips = _unique(spec.load_balancer_ips)
    source_ranges = _unique(spec.source_ranges)
    # apiservice.ExternalPolicyLocal: Local only matters for a service that is
    # reachable from outside at all.
    externally_accessible = spec.type is not ServiceType.CLUSTER_IP or bool(external_ips)
    external_local = spec.external_policy == "Local" and externally_accessible
    ports = tuple(ServicePort(
        name=ServicePortName(spec.name.namespace, spec.name.name, p.name, p.protocol),
        type=spec.type,
        cluster_ip=cluster_ip,
        port=p.port,
        protocol=p.protocol,
        target_port=p.target_port,
        node_port=p.node_port,
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        load_balancer_source_ranges=source_ranges,
        affinity_timeout=spec.affinity_timeout,
        external_policy_local=external_local,
        internal_policy_local=spec.internal_policy == "Local",
        health_check_node_port=spec.health_check_node_port,
        topology_aware=spec.topology_aware,
        secondary_cluster_ip=secondary,
    ) for p in spec.ports)
    return Service(spec.name, ports)


def _cluster_ips(spec: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The canonical cluster IPs, primary first; () when none is set; None for a headless service."""
    primary = _opt_str(spec, "clusterIP", "spec")
    ips = _opt_list(spec, "clusterIPs", "spec", limit=2)
    if primary == "None" or (ips and ips[0] == "None"):
        return None
    for i, ip in enumerate(ips):
        if not isinstance(ip, str):
            raise _fail(f"spec.clusterIPs[{i}]", f"must be a string, not {show(ip)}")
    if not primary:
        if not ips or ips[0] == "":
            return ()
        primary = ips[0]
    primary = _ip(primary, "spec.clusterIP")
    canonical = [_ip(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(ips)]
    if canonical and canonical[0] != primary:
        raise _fail("spec.clusterIPs[0]", "must equal spec.clusterIP")
    if len(canonical) == 2 and family(canonical[0]) == family(canonical[1]):
        raise _fail("spec.clusterIPs", "two addresses of the same family")
    canonical = canonical or [primary]
    for i, ip in enumerate(canonical):
        # The API server only hands out addresses of its service range; one of
        # these would make proxyd capture the node's own or a wildcard address.
        special = special_address(ip)
        if special is not None:
            raise _fail(f"spec.clusterIPs[{i}]" if ips else "spec.clusterIP", special[1])
    return tuple(canonical)


def _families(spec: Mapping[str, Any], cluster_ips: tuple[str, ...]) -> tuple[tuple[int, ...], str]:
    """(spec.ipFamilies, the effective ipFamilyPolicy), checked against the cluster IPs as
    kube-apiserver checks them (ValidateServiceClusterIPsRelatedFields, initIPFamilyFields):
    ipFamilies[i] is the family of clusterIPs[i], and SingleStack allows one of each.
    """
    out: list[int] = []
    for i, value in enumerate(_opt_list(spec, "ipFamilies", "spec", limit=2)):
        if value not in ("IPv4", "IPv6"):
            raise _fail(f"spec.ipFamilies[{i}]", f"unknown IP family {show(value)}")
        fam = 4 if value == "IPv4" else 6
        if fam in out:
            raise _fail("spec.ipFamilies", "the same family twice")
        out.append(fam)
    for i, ip in enumerate(cluster_ips[:len(out)]):
        if family(ip) != out[i]:
            raise _fail(f"spec.clusterIPs[{i}]",
                        f"expected an IPv{out[i]} address as spec.ipFamilies[{i}] says, not {ip}")
    policy = spec.get("ipFamilyPolicy")
    if policy not in (None, "", "SingleStack", "PreferDualStack", "RequireDualStack"):
        raise _fail("spec.ipFamilyPolicy", f"unknown IP family policy {show(policy)}")
    if not policy:
        # The API server's default: never switch a service between single and dual stack implicitly.
        policy = "RequireDualStack" if len(cluster_ips) == 2 or len(out) == 2 else "SingleStack"
    if policy == "SingleStack":
        if len(cluster_ips) == 2:
            raise _fail("spec.ipFamilyPolicy", "SingleStack with two cluster IPs (must be RequireDualStack "
                        "or PreferDualStack when spec.clusterIPs holds both families)")
        if len(out) == 2:
            raise _fail("spec.ipFamilyPolicy", "SingleStack with two IP families (must be RequireDualStack "
                        "or PreferDualStack when spec.ipFamilies holds both families)")
    return tuple(out), str(policy)


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def _addresses(raw: list[Any], path: str, notes: list[Note]) -> tuple[str, ...]:
    """Valid addresses with the ones the API server refuses left out (and noted)."""
    out: list[str] = []
    for i, value in enumerate(raw):
        ip = _ip(value, f"{path}[{i}]")
        if _usable(ip, f"{path}[{i}]", notes):
            out.append(ip)
    return tuple(out)


def _lb_ips(status: Mapping[str, Any], notes: list[Note]) -> tuple[str, ...]:
    lb = _opt_mapping(status, "loadBalancer", "status")
    ips: list[str] = []
    for i, raw in enumerate(_opt_list(lb, "ingress", "status.loadBalancer")):
        path = f"status.loadBalancer.ingress[{i}]"
        entry = _mapping(raw, path)
        ip = _opt_str(entry, "ip", path)
        mode = _opt_str(entry, "ipMode", path)
        if mode not in (None, "VIP", "Proxy"):
            raise _fail(f"{path}.ipMode", f"unknown ipMode {show(mode)}")
        _opt_str(entry, "hostname", path)
        # Hostname-only ingress, or a proxying LB (ipMode Proxy) that must
        # keep seeing the traffic itself: nothing for the node to capture.
        if not ip or mode == "Proxy":
            continue
        canonical = _ip(ip, f"{path}.ip")
        if _usable(canonical, f"{path}.ip", notes):
            ips.append(canonical)
    return tuple(ips)


def _affinity(spec: Mapping[str, Any]) -> int:
    kind = spec.get("sessionAffinity")
    if kind is None or kind == "" or kind == "None":
        return 0
    if kind != "ClientIP":
        raise _fail("spec.sessionAffinity", f"unknown session affinity {show(kind)}")
    config = _opt_mapping(spec, "sessionAffinityConfig", "spec")
    client = _opt_mapping(config, "clientIP", "spec.sessionAffinityConfig")
    raw = client.get("timeoutSeconds")
    if raw is None:
        return DEFAULT_AFFINITY_TIMEOUT
    timeout = _int(raw, "spec.sessionAffinityConfig.clientIP.timeoutSeconds")
    if not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        raise _fail("spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    f"must be between 1 and {MAX_AFFINITY_TIMEOUT}, not {show(timeout)}")
    return timeout


def _policy(spec: Mapping[str, Any], key: str) -> str:
    value = spec.get(key)
    if value is None or value == "":
        return "Cluster"
    if value not in ("Cluster", "Local"):
        raise _fail(f"spec.{key}", f"unknown policy {show(value)}")
    return str(value)


def _target_port(value: object, port: int, path: str) -> int | str:
    if value is None or value == "" or (type(value) is int and value == 0):
        return port  # API defaulting: targetPort = port
    if isinstance(value, str):
        if not _is_iana_svc_name(value):
            raise _fail(path, f"{show(value)} is not a valid port name (IANA_SVC_NAME)")
        return value
    return _port(value, path)


def _topology_aware(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    annotations = _labels(meta, "annotations", "metadata")
    # kube-proxy reads topology-mode, falling back to the deprecated
    # topology-aware-hints; both accept "Auto" and "auto".
    hints = annotations.get(ANNOTATION_TOPOLOGY_MODE, annotations.get(ANNOTATION_TOPOLOGY_HINTS))
    if hints in ("Auto", "auto"):
        return True
    distribution = _opt_str(spec, "trafficDistribution", "spec")
    return distribution in ("PreferClose", "PreferSameZone")


# ---------------------------------------------------------------- EndpointSlice


def slice_from_dict(obj: object, notes: list[Note] | None = None) -> EndpointSlice | None:
    """An EndpointSlice (discovery.k8s.io/v1), or None (and a note) when it serves nothing proxyd handles."""
    return _noted(_slice, obj, notes)


def _slice(obj: object, notes: list[Note]) -> EndpointSlice | None:
    obj = _mapping(obj, "object")
    namespace, name, meta = _metadata(obj, name_check=_subdomain)
    labels = _labels(meta, "labels", "metadata")
    service = labels.get(LABEL_SERVICE_NAME)
    if service is None:
        _ignored(notes, "metadata.labels", f"no {LABEL_SERVICE_NAME} label: belongs to no service",
                 "no_service_label")
        return None
    _service_name(service, f"metadata.labels[{LABEL_SERVICE_NAME}]")
    address_type = obj.get("addressType")
    if address_type == "FQDN":
        _ignored(notes, "addressType", "FQDN endpoints: kube-proxy does not serve them", "fqdn")
        return None
    if address_type not in ("IPv4", "IPv6"):
        raise _fail("addressType", f"unknown address type {show(address_type)}")
    fam = 4 if address_type == "IPv4" else 6

    ports: list[EndpointPort] = []
    seen: set[str] = set()
    for i, raw in enumerate(_opt_list(obj, "ports", "", limit=MAX_SLICE_PORTS)):
        path = f"ports[{i}]"
        entry = _mapping(raw, path)
        port_name = _opt_str(entry, "name", path) or ""
        if port_name:
            _dns_label(port_name, f"{path}.name")
        if port_name in seen:
            raise _fail(path, f"duplicate port name {show(port_name)}")
        seen.add(port_name)
        protocol = _protocol(entry.get("protocol"), f"{path}.protocol")
        if entry.get("port") is None:
            # A port with no number serves nothing (kube-proxy skips it).
            _ignored(notes, f"{path}.port", "missing: this port serves nothing", "no_port_number")
            continue
        ports.append(EndpointPort(port_name, _port(entry["port"], f"{path}.port"), protocol))

    endpoints: list[SliceEndpoint] = []
    for i, raw in enumerate(_opt_list(obj, "endpoints", "", limit=MAX_SLICE_ENDPOINTS)):
        endpoint = _plain_endpoint(raw) if fam == 4 else None
        if endpoint is None:
            endpoint = _slice_endpoint(raw, f"endpoints[{i}]", fam, notes)
        if endpoint is not None:
            endpoints.append(endpoint)
    return EndpointSlice(namespace=namespace, name=name, service=service, ports=tuple(ports),
                         endpoints=tuple(endpoints), address_family=fam)


def _slice_endpoint(raw: object, path: str, fam: int, notes: list[Note]) -> SliceEndpoint | None:
    # The hot loop of a big list (100,000 endpoints at 10,000 services): the common shapes (a
    # dict, canonical IPv4 text, a node name seen before) take the short way, and a sub-path is
    # only spelled out for the error that needs it.
    entry = raw if type(raw) is dict else _mapping(raw, path)
    addresses = _opt_list(entry, "addresses", path, limit=100)
    canonical = [_ip(a, f"{path}.addresses[{j}]") for j, a in enumerate(addresses)]
    for j, ip in enumerate(canonical):
        if family(ip) != fam:
            raise _fail(f"{path}.addresses[{j}]", f"{show(ip)} is not an IPv{fam} address")
    if not canonical:
        _ignored(notes, f"{path}.addresses", "empty: kube-proxy ignores an endpoint without an address",
                 "no_address")
        return None
    conditions = entry.get("conditions")
    if conditions is None:
        ready = serving = terminating = None
    else:
        conditions_path = f"{path}.conditions"
        conditions = _mapping(conditions, conditions_path)
        ready = _opt_bool(conditions, "ready", conditions_path)
        serving = _opt_bool(conditions, "serving", conditions_path)
        terminating = _opt_bool(conditions, "terminating", conditions_path)
    node = _opt_str(entry, "nodeName", path)
    node = _node_name(node, path) if node else None
    zone = _opt_str(entry, "zone", path)
    if zone is not None:
        _label_value(zone, f"{path}.zone")
    zones: list[str] = []
    if entry.get("hints") is not None:
        hints = _opt_mapping(entry, "hints", path)
        for k, hint in enumerate(_opt_list(hints, "forZones", f"{path}.hints", limit=MAX_SLICE_ENDPOINTS)):
            hint_path = f"{path}.hints.forZones[{k}]"
            zone_name = _label_value(_mapping(hint, hint_path).get("name"), f"{hint_path}.name")
            if not zone_name:
                raise _fail(f"{hint_path}.name", "missing")
            if zone_name not in zones:
                zones.append(zone_name)
    # kube-proxy uses the first address: the endpoint stands or falls with it.
    if not _usable(canonical[0], f"{path}.addresses[0]", notes):
        return None
    return SliceEndpoint(
        ip=canonical[0],
        # kube-proxy's reading of the API: ready and serving nil mean true,
        # terminating nil means false.
        ready=ready is None or ready,
        serving=serving is None or serving,
        terminating=bool(terminating),
        node_name=node,
        # Interned: the same few zone names repeat on every endpoint.
        zone=sys.intern(zone) if zone else None,
        zone_hints=tuple(zones),
    )


def _plain_endpoint(raw: object) -> SliceEndpoint | None:
    """The usual IPv4 endpoint the short way, else None: ``_slice_endpoint`` then decides.

    Usual: one usable IPv4 address in canonical text, conditions true, false
    or absent, a node name already checked (or none), no zone, no hints. What
    comes out is what ``_slice_endpoint`` makes of it (test_convert compares
    both on every shape); anything else, valid or not, takes its way, which
    alone reports.
    """
    if type(raw) is not dict:
        return None
    addresses = raw.get("addresses")
    if type(addresses) is not list or len(addresses) != 1:
        return None
    ip = addresses[0]
    if type(ip) is not str or len(ip) > 15:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET, ip)
    except (OSError, ValueError):
        return None
    if socket.inet_ntop(socket.AF_INET, packed) != ip or _special_v4(packed) is not None:
        return None
    conditions = raw.get("conditions")
    if conditions is None:
        ready = serving = terminating = None
    elif type(conditions) is dict:
        ready, serving = conditions.get("ready"), conditions.get("serving")
        terminating = conditions.get("terminating")
        for value in (ready, serving, terminating):
            if value is not None and value is not True and value is not False:
                return None
    else:
        return None
    node = raw.get("nodeName")
    if node is not None:
        if type(node) is not str:
            return None
        if node:
            node = _NODE_NAMES.get(node)
            if node is None:
                return None
        else:
            node = None
    if raw.get("zone") is not None or raw.get("hints") is not None:
        return None
    return SliceEndpoint(ip=ip, ready=ready is None or ready, serving=serving is None or serving,
                         terminating=bool(terminating), node_name=node)


# Node names already checked, each held once: every endpoint names its node, and a cluster has few.
# Bounded, so that hostile input cannot grow it: past the bound, names are checked every time.
_NODE_NAMES: dict[str, str] = {}
_NODE_NAMES_MAX = 4096


def _node_name(value: str, path: str) -> str:
    """A valid ``nodeName`` (a DNS-1123 subdomain), interned; InvalidObject otherwise."""
    known = _NODE_NAMES.get(value)
    if known is not None:
        return known
    name = sys.intern(_subdomain(value, f"{path}.nodeName"))
    if len(_NODE_NAMES) < _NODE_NAMES_MAX:
        _NODE_NAMES[name] = name
    return name


# ---------------------------------------------------------------- Endpoints (mirroring)


def slices_from_endpoints(obj: object, notes: list[Note] | None = None) -> list[EndpointSlice]:
    """A v1 Endpoints object as the EndpointSlice mirroring controller would slice it.

    Subsets with the same ports and address family share a slice; at most
    1000 addresses per subset are mirrored (ready ones first), like the
    controller. Slices are named ``endpoints-mirror:<name>:<n>`` so that they
    never collide with real slices (a real slice name cannot contain ':').
    """
    return _noted(_mirror, obj, notes)


def _mirror(obj: object, notes: list[Note]) -> list[EndpointSlice]:
    obj = _mapping(obj, "object")
    namespace, name, meta = _metadata(obj, name_check=_service_name)
    labels = _labels(meta, "labels", "metadata")
    if labels.get(LABEL_SKIP_MIRROR) == "true":
        _ignored(notes, "metadata.labels", f"labelled {LABEL_SKIP_MIRROR}=true: not mirrored into a slice",
                 "skip_mirror")
        return []
    groups: dict[tuple[int, tuple[EndpointPort, ...]], dict[str, SliceEndpoint]] = {}
    for i, raw_subset in enumerate(_opt_list(obj, "subsets", "")):
        path = f"subsets[{i}]"
        subset = _mapping(raw_subset, path)
        ports: list[EndpointPort] = []
        for j, raw_port in enumerate(_opt_list(subset, "ports", path, limit=MAX_SLICE_PORTS)):
            port_path = f"{path}.ports[{j}]"
            entry = _mapping(raw_port, port_path)
            port_name = _opt_str(entry, "name", port_path) or ""
            if port_name:
                _dns_label(port_name, f"{port_path}.name")
            if any(p.name == port_name for p in ports):
                raise _fail(port_path, f"duplicate port name {show(port_name)}")
            if "port" not in entry:
                raise _fail(f"{port_path}.port", "missing")
            ports.append(EndpointPort(port_name, _port(entry.get("port"), f"{port_path}.port"),
                                      _protocol(entry.get("protocol"), f"{port_path}.protocol")))
        key_ports = tuple(sorted(ports, key=lambda p: (p.name, p.protocol, p.port)))
        added = over = 0
        for field_name, ready in (("addresses", True), ("notReadyAddresses", False)):
            for j, raw_address in enumerate(_opt_list(subset, field_name, path)):
                address_path = f"{path}.{field_name}[{j}]"
                address = _mapping(raw_address, address_path)
                ip = _ip(address.get("ip"), f"{address_path}.ip")
                node = _opt_str(address, "nodeName", address_path)
                if node:
                    _subdomain(node, f"{address_path}.nodeName")
                if not _usable(ip, f"{address_path}.ip", notes):
                    continue
                if added >= MAX_MIRRORED_PER_SUBSET:
                    over += 1  # validated, but over the controller's per-subset cap
                    continue
                added += 1
                group = groups.setdefault((family(ip), key_ports), {})
                # Mirrored slices only carry "ready"; serving is then read
                # as nil → true and terminating as false, as for any slice.
                group.setdefault(ip, SliceEndpoint(ip=ip, ready=ready, serving=True, terminating=False,
                                                   node_name=node or None))
        if over:
            _ignored(notes, path, f"{over} addresses over the mirroring controller's cap "
                     f"({MAX_MIRRORED_PER_SUBSET} per subset) left out", "over_mirror_cap")
    slices = []
    for n, ((fam, ports_key), members) in enumerate(groups.items()):
        slices.append(EndpointSlice(namespace=namespace, name=f"{MIRROR_PREFIX}{name}:{n}", service=name,
                                    ports=ports_key, endpoints=tuple(members.values()),
                                    address_family=fam))
    return slices


def is_mirror(slice_: EndpointSlice) -> bool:
    """True for a slice made by ``slices_from_endpoints``."""
    return slice_.name.startswith(MIRROR_PREFIX)


# ---------------------------------------------------------------- Node


def node_labels_from_dict(obj: object) -> tuple[str, dict[str, str]]:
    """(node name, labels) of a Node v1; every label key and value is checked."""
    return _guard(lambda: _node(obj))


def _node(obj: object) -> tuple[str, dict[str, str]]:
    obj = _mapping(obj, "object")
    meta = _opt_mapping(obj, "metadata", "")
    raw_name = meta.get("name")
    if raw_name is None or raw_name == "":
        raise InvalidObject("metadata.name: missing")
    name = _subdomain(raw_name, "metadata.name")
    labels = _labels(meta, "labels", "metadata")
    for key, value in labels.items():
        if not _label_key_ok(key):
            raise _fail("metadata.labels", f"{show(key)} is not a valid label key")
        _label_value(value, f"metadata.labels[{key}]")
    return name, labels
