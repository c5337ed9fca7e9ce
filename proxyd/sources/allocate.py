"""What an API server fills in, for the manifests source: cluster IPs and node ports.

On a host without an API server, Services written by hand or generated with
``kubectl create service … --dry-run=client -o yaml`` have no
``spec.clusterIP`` and, for NodePort and LoadBalancer services, no
``nodePort``. kube-apiserver would allocate them from
``--service-cluster-ip-range`` and ``--service-node-port-range``; proxyd
takes the same flags and does the same for the manifests source.

Allocation here is a pure function of the directory's content, so that a
restart, or a second VM given the same directory, arrives at the same
addresses without any state kept on disk:

* every address and port some manifest sets explicitly (cluster IPs of
  either family, externalIPs, LB ingress IPs, nodePorts,
  healthCheckNodePorts) is taken first and never handed out;
* the services that need something are visited in name order
  (namespace/name, then port name and protocol); each starts at a slot
  derived from a hash of its identity (BLAKE2b of ``namespace/name`` for
  a cluster IP, ``namespace/name/port/protocol`` for a node port) and takes
  the first free one from there. Collisions are thus resolved in a stable
  order, and one service's assignment only moves if an explicit address
  takes its slot or a service that sorts before it collides with it.
* as kube-apiserver does, dynamic assignments come from the upper part of a
  range first and the lower "static" band (1/16 of the range, 16 to 256
  entries) only when the upper part is full, so hand-picked low addresses
  (10.96.0.10 for DNS) rarely meet an allocated one. IPv4 ranges never
  hand out their network and broadcast addresses, IPv6 ranges their first.

Families follow kube-apiserver (``ServiceSpec.wanted_families``): a
SingleStack service (or one without a policy) gets one cluster IP of the
family it asks for in ``spec.ipFamilies``, else of the first range's; a
PreferDualStack or RequireDualStack one gets one of each family the ranges
have, primary first (``ipFamilies[0]``, else the first range's family).
RequireDualStack with a range of one family only is refused, as the API
server refuses it. A manifest that sets ``clusterIP``/``clusterIPs`` keeps
exactly those. The API source never needs any
of this: kube-apiserver always allocates, and an object arriving without a
cluster IP is refused there as incomplete.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from proxyd.model import Protocol, Service, ServiceName
from proxyd.sources.convert import ServiceSpec, build_service

DEFAULT_NODE_PORT_RANGE = (30000, 32767)
CLUSTER_RANGE_FLAG = "--service-cluster-ip-range"
NODE_PORT_RANGE_FLAG = "--service-node-port-range"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RangeError(ValueError):
    """A range flag's value cannot be used; the message says why."""


def parse_cluster_ranges(text: str) -> tuple[Network, ...]:
    """``CIDR[,CIDR]``: at most one range per family, as kube-apiserver accepts."""
    ranges: list[Network] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise RangeError(f"{part!r} is not a CIDR") from None
        if any(r.version == net.version for r in ranges):
            raise RangeError("at most one range per IP family")
        if net.num_addresses < (4 if net.version == 4 else 2):
            raise RangeError(f"{part} is too small to allocate from")
        ranges.append(net)
    if len(ranges) > 2:
        raise RangeError("at most two ranges (one IPv4, one IPv6)")
    return tuple(ranges)


def parse_port_range(text: str) -> tuple[int, int]:
    """kube's PortRange: ``MIN-MAX``, ``BASE+SIZE`` or a single port; inclusive bounds."""
    text = text.strip()
    try:
        if "-" in text:
            low_text, _, high_text = text.partition("-")
            low, high = int(low_text), int(high_text)
        elif "+" in text:
            base_text, _, size_text = text.partition("+")
            low = int(base_text)
            high = low + int(size_text)
        else:
            low = high = int(text)
    except ValueError:
        raise RangeError(f"{text!r} is not a port range (want e.g. 30000-32767)") from None
    if not 1 <= low <= high <= 65535:
        raise RangeError(f"{text!r} is not a port range within 1-65535")
    return low, high


@dataclass(frozen=True, slots=True)
class Ranges:
    """Where addresses and ports are allocated from; no cluster range: cluster IPs are not allocated."""

    cluster: tuple[Network, ...] = ()
    node_ports: tuple[int, int] = DEFAULT_NODE_PORT_RANGE

    def for_family(self, fam: int) -> Network | None:
        return next((r for r in self.cluster if r.version == fam), None)

    @property
    def default_family(self) -> int:
        return self.cluster[0].version if self.cluster else 4

    @property
    def families(self) -> tuple[int, ...]:
        """The families of the ranges, primary (the first range's) first."""
        return tuple(r.version for r in self.cluster)


@dataclass(frozen=True, slots=True)
class Assigned:
    """What allocation filled in for one service (for ``proxyd check`` and the log)."""

    cluster_ips: tuple[str, ...] = ()  # primary first
    node_ports: tuple[tuple[str, Protocol, int], ...] = ()  # (port name, protocol, nodePort)
    health_check_node_port: int = 0

    @property
    def cluster_ip(self) -> str | None:
        """The primary cluster IP allocated, if any."""
        return self.cluster_ips[0] if self.cluster_ips else None


@dataclass
class Allocation:
    """The outcome for a whole directory."""

    specs: dict[ServiceName, ServiceSpec] = field(default_factory=dict)  # complete, every service
    assigned: dict[ServiceName, Assigned] = field(default_factory=dict)
    failures: dict[ServiceName, str] = field(default_factory=dict)  # a range was full


def missing(spec: ServiceSpec, ranges: Ranges) -> str | None:
    """Why ``spec`` cannot be completed with ``ranges`` (the refusal's text), or None."""
    if spec.cluster_ips:
        return None
    if not ranges.cluster:
        return (f"spec.clusterIP: missing, and no {CLUSTER_RANGE_FLAG} to allocate one from "
                f"(set spec.clusterIP, or start proxyd with {CLUSTER_RANGE_FLAG} CIDR)")
    available = ranges.families
    if spec.ip_family_policy == "RequireDualStack" and len(available) < 2:
        return (f"spec.ipFamilyPolicy: RequireDualStack, and {CLUSTER_RANGE_FLAG} has only an "
                f"IPv{available[0]} range (give one range per family to serve dual-stack services)")
    for fam in spec.wanted_families(available):
        if ranges.for_family(fam) is None:
            return (f"spec.clusterIP: missing, and {CLUSTER_RANGE_FLAG} has no IPv{fam} range "
                    f"to allocate one from (spec.ipFamilies asks for IPv{fam})")
    return None


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _static_band(size: int) -> int:
    # kube-apiserver's calculateRangeOffset: min(max(16, size/16), 256), none below 16.
    if size < 16:
        return 0
    band = min(max(16, size // 16), 256)
    # A range no bigger than its band has no dynamic part: then all of it is.
    return band if band < size else 0


def _probe(start: int, size: int) -> Iterator[int]:
    """Offsets 0..size-1: the upper band from ``start`` on, wrapping, then the lower band."""
    band = _static_band(size)
    first = band + start % (size - band)
    yield from range(first, size)
    yield from range(band, first)
    yield from ((start + i) % band for i in range(band))


class _Space:
    """One range of integers (addresses as ints, or ports) with the taken ones."""

    def __init__(self, low: int, size: int, taken: set[int]) -> None:
        self.low = low
        self.size = size
        self.taken = taken
        self.free = size - sum(1 for v in taken if low <= v < low + size)

    def take(self, key: str) -> int | None:
        if self.free <= 0:
            return None  # full: say so at once instead of walking the whole range
        # Each probe step either returns or passes a taken value, so this ends
        # after at most len(taken) + 1 steps: cheap even for an IPv6 /64.
        for offset in _probe(_hash(key), self.size):
            value = self.low + offset
            if value not in self.taken:
                self.taken.add(value)
                self.free -= 1
                return value
        return None

    def give_back(self, value: int) -> None:
        if value in self.taken:
            self.taken.discard(value)
            self.free += 1


@functools.lru_cache(maxsize=1 << 16)
def _ip_int(ip: str) -> tuple[int, int]:
    """(family, integer) of a canonical address; cached: the same explicit addresses come every change."""
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)


def _ip_space(net: Network, taken: set[int]) -> _Space:
    # IPv4: never the network or the broadcast address; IPv6: never the
    # subnet-router anycast (the first).
    size = net.num_addresses - (2 if net.version == 4 else 1)
    return _Space(int(net.network_address) + 1, size, taken)


def allocate(specs: Iterable[ServiceSpec], ranges: Ranges,
             memo: dict[int, tuple[ServiceSpec, Assigned, ServiceSpec]] | None = None) -> Allocation:
    """Complete every spec that can be; deterministic in the set of specs, whatever their order.

    ``memo`` (owned by the caller, updated here) hands back last time's completed spec when a spec
    object got the same assignment again, so an unchanged service keeps its identity.
    """
    out = Allocation()
    new_memo: dict[int, tuple[ServiceSpec, Assigned, ServiceSpec]] = {}
    pending: list[ServiceSpec] = []
    taken_ips: dict[int, set[int]] = {4: set(), 6: set()}
    taken_ports: set[int] = set()
    for spec in specs:
        for ip in spec.explicit_ips():
            fam, value = _ip_int(ip)
            taken_ips[fam].add(value)
        taken_ports.update(spec.explicit_ports())
        if spec.complete:
            out.specs[spec.name] = spec
        else:
            pending.append(spec)
    ip_spaces: dict[int, _Space] = {r.version: _ip_space(r, taken_ips[r.version]) for r in ranges.cluster}
    low, high = ranges.node_ports
    ports = _Space(low, high - low + 1, taken_ports)
    for spec in sorted(pending, key=lambda s: (s.name.namespace, s.name.name)):
        if missing(spec, ranges) is not None:
            continue  # refused by the caller when the object was read
        key = f"{spec.name.namespace}/{spec.name.name}"
        cluster_ips: list[str] = []
        if not spec.cluster_ips:
            for fam in spec.wanted_families(ranges.families):
                address = ip_spaces[fam].take(f"{key}/IPv{fam}")
                if address is None:
                    out.failures[spec.name] = (f"spec.clusterIP: missing, and {CLUSTER_RANGE_FLAG} "
                                               f"{ranges.for_family(fam)} is full")
                    break
                cluster_ips.append(str(ipaddress.ip_address(address)))
            if spec.name in out.failures:
                for ip in cluster_ips:  # give back what the other family took
                    fam, value = _ip_int(ip)
                    ip_spaces[fam].give_back(value)
                continue
        given: list[tuple[str, Protocol, int]] = []
        for port in sorted(spec.ports, key=lambda p: (p.name, p.protocol)):
            if spec.needs_node_port(port):
                node_port = ports.take(f"{key}/{port.name}/{port.protocol}")
                if node_port is None:
                    break
                given.append((port.name, port.protocol, node_port))
        if len(given) != sum(1 for p in spec.ports if spec.needs_node_port(p)):
            out.failures[spec.name] = (f"spec.ports[].nodePort: missing, and {NODE_PORT_RANGE_FLAG} "
                                       f"{low}-{high} is full")
            continue
        hc_port = 0
        if spec.needs_health_check_node_port:
            hc_value = ports.take(f"{key}/healthCheckNodePort")
            if hc_value is None:
                out.failures[spec.name] = (f"spec.healthCheckNodePort: missing, and {NODE_PORT_RANGE_FLAG} "
                                           f"{low}-{high} is full")
                continue
            hc_port = hc_value
        got = Assigned(tuple(cluster_ips), tuple(given), hc_port)
        remembered = memo.get(id(spec)) if memo is not None else None
        if remembered is not None and remembered[0] is spec and remembered[1] == got:
            done = remembered[2]  # the same assignment as last time: no new objects
        else:
            done = _completed(spec, got)
        if memo is not None:
            new_memo[id(spec)] = (spec, got, done)
        out.specs[spec.name] = done
        out.assigned[spec.name] = got
    if memo is not None:
        memo.clear()
        memo.update(new_memo)
    return out


def _completed(spec: ServiceSpec, got: Assigned) -> ServiceSpec:
    by_port = {(name, proto): value for name, proto, value in got.node_ports}
    ports = tuple(replace(p, node_port=by_port.get((p.name, p.protocol), p.node_port)) for p in spec.ports)
    return replace(spec, cluster_ips=got.cluster_ips or spec.cluster_ips, ports=ports,
                   health_check_node_port=got.health_check_node_port or spec.health_check_node_port)


class Allocator:
    """``allocate`` plus a cache of built Services, for a source that re-merges on every change."""

    def __init__(self, ranges: Ranges) -> None:
        self.ranges = ranges
        self.last = Allocation()
        # id(spec as read) → (that spec, the spec built from, its Service). The
        # source keeps a spec object for as long as its file is unchanged, so
        # identity finds it without hashing every spec on every change.
        self._built: dict[int, tuple[ServiceSpec, ServiceSpec, Service]] = {}
        self._last_specs: list[ServiceSpec] = []
        self._memo: dict[int, tuple[ServiceSpec, Assigned, ServiceSpec]] = {}
        self._last_services: list[Service] = []
        # For ``update``: what it handed out last, and the specs still missing something.
        self._current: dict[ServiceName, Service] = {}
        self._incomplete: set[ServiceName] = set()

    def missing(self, spec: ServiceSpec) -> str | None:
        return missing(spec, self.ranges)

    def services(self, specs: Iterable[ServiceSpec]) -> list[Service]:
        """The Services of ``specs`` after allocation; ``last`` holds what was assigned and what failed."""
        specs = list(specs)
        if len(specs) == len(self._last_specs) and all(a is b for a, b in zip(specs, self._last_specs,
                                                                              strict=True)):
            # The very same Services as last time (only endpoints changed): the same answer.
            return list(self._last_services)
        if all(s.complete for s in specs):
            # Nothing to allocate (a kubectl dump of a cluster): skip the global pass.
            self.last = Allocation(specs={s.name: s for s in specs})
            read = {s.name: s for s in specs}
        else:
            self.last = allocate(specs, self.ranges, self._memo)
            read = {s.name: s for s in specs if s.name in self.last.specs}
        built: dict[int, tuple[ServiceSpec, ServiceSpec, Service]] = {}
        for name, done in self.last.specs.items():
            original = read[name]
            entry = self._built.get(id(original))
            if entry is None or entry[0] is not original or entry[1] is not done:
                entry = (original, done, build_service(done))
            built[id(original)] = entry
        self._built = built
        self._last_specs = specs
        self._last_services = [entry[2] for entry in built.values()]
        return list(self._last_services)

    def update(self, specs: Mapping[ServiceName, ServiceSpec],
               changed: Iterable[ServiceName]) -> dict[ServiceName, Service | None]:
        """The Services whose outcome changed since the last call (None: no longer served).

        For a source that merges incrementally: ``specs`` holds every Service
        spec now, ``changed`` names those whose spec changed since the last
        call. Allocation ties services together (an explicit address anywhere
        takes a slot, collisions are resolved in name order), so while any
        spec misses something the whole set goes through ``services`` (which
        reuses what did not change) and only the Services that differ come
        back; so does the first change after one that allocated or refused
        anything, which brings ``last`` up to date. A set where every
        spec is complete (a kubectl dump) needs no allocation: then only the
        changed specs are built, and a change costs what it changed.
        """
        changed = set(changed)
        for name in changed:
            spec = specs.get(name)
            if spec is None or spec.complete:
                self._incomplete.discard(name)
            else:
                self._incomplete.add(name)
        out: dict[ServiceName, Service | None] = {}
        if self._incomplete or self.last.assigned or self.last.failures:
            now = {svc.name: svc for svc in self.services(specs.values())}
            for name, svc in now.items():
                before = self._current.get(name)
                if before is not svc and before != svc:
                    out[name] = svc
            out.update((name, None) for name in self._current.keys() - now.keys())
            self._current = now
            return out
        for name in changed:
            spec = specs.get(name)
            before = self._current.get(name)
            if spec is None:
                self.last.specs.pop(name, None)
                if before is not None:
                    del self._current[name]
                    out[name] = None
                continue
            self.last.specs[name] = spec
            svc = build_service(spec)
            if before is None or before != svc:
                self._current[name] = svc
                out[name] = svc
        return out

    def served(self, name: ServiceName) -> Service | None:
        """The Service ``update`` last handed out under ``name``."""
        return self._current.get(name)
