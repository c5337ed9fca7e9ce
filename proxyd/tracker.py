"""Merge Services and EndpointSlices into the desired ``ProxyState``.

The tracker is the only place that knows how raw objects become a state;
sources feed it events (or whole lists), the sync loop takes a snapshot.
It is built for large clusters (tens of thousands of service ports):

* **Change tracking drops no-ops**, as kube-proxy's servicechangetracker and
  endpointschangetracker do: for every service touched since the last
  ``take()`` it remembers the value at that take, and forgets the change as
  soon as the current value is equal again. A burst that ends where it
  started costs nothing.
* **Work is proportional to what changed.** Events only record; ``take()``
  recomputes the ports and merged endpoints of touched services only and
  patches the long-lived port/endpoint dicts in place. A snapshot is a
  read-only view over a fresh shallow copy of those dicts (cheap even at 30k
  entries), so a mode may keep old snapshots while the tracker moves on.
* **Endpoint merge as kube-proxy's endpointslicecache:** for a service port
  (namespace, service, port name, protocol), endpoints come from every slice
  of that service with a port of the same name and protocol. One endpoint per
  (ip, port); when slices disagree a ready copy beats an unready one, then a
  local one beats a remote one, then the slice that sorts first by name wins.
  Slices are visited by name and the result is sorted by (ip, port)
  (numerically, IPv4 before IPv6), so
  equal inputs always give equal (``==``) states. Endpoints of a family the
  service has no ClusterIP of are skipped (an IPv4 service never DNATs to an
  IPv6 pod); a dual-stack service keeps both families' endpoints, and each
  family's proxier reads its own through ``ProxyState.for_family``. Slices for services that do not exist are
  kept and apply when the service appears.
* ``changed`` in a snapshot lists exactly the services whose ports or
  endpoints differ from the previous snapshot (a slice edit that merges to the
  same endpoints is not a change). A node label change marks every service
  changed, because topology decisions depend on the node's zone.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from proxyd import metrics
from proxyd.model import (
    Endpoint,
    EndpointSlice,
    ProxyState,
    Service,
    ServiceName,
    ServicePort,
    ServicePortName,
    family,
)

SliceKey = tuple[str, str]

# Slices of one service indexed in a tuple; more go to a set.
_FEW_SLICES = 8

# Sentinel for "not recorded yet" in the change maps (None means "absent").
_UNSET = object()


@dataclass(frozen=True, slots=True)
class TrackerSnapshot:
    """What ``Tracker.take()`` returns.

    ``changed``: services whose ports or endpoints differ from the previous
    snapshot (all of them after a node label change). ``changed_ports``: the
    index of the same change by service port — every port that appeared,
    vanished, or whose ServicePort or endpoints differ (every port after a
    node label change) — so a mode plans a partial sync from it in time
    proportional to the change. ``oldest_change``: the
    monotonic time of the first change recorded since the previous take
    (None when nothing was pending), for network-programming latency.
    """

    state: ProxyState
    changed: frozenset[ServiceName]
    oldest_change: float | None
    changed_ports: frozenset[ServicePortName] = frozenset()


def merge_endpoints(
    port: ServicePort,
    slices: Iterable[EndpointSlice],
    *,
    node_name: str,
) -> tuple[Endpoint, ...]:
    """The merged endpoints of one service port from its service's slices.

    ``slices`` must all belong to the port's service; they are visited in
    name order whatever order they come in.
    """
    want_family: int | None = family(port.cluster_ip) if port.cluster_ip else None
    if port.secondary_cluster_ip:
        want_family = None  # dual-stack: both families' endpoints
    v6 = want_family == 6  # family(ip) == 6, inline: this loop sees every endpoint of a full take
    pname = port.name.port
    proto = port.protocol
    merged: dict[tuple[str, int], Endpoint] = {}
    for sl in sorted(slices, key=_slice_name):
        for eport in sl.ports:
            if eport.name != pname or eport.protocol != proto or eport.port <= 0:
                continue
            number = eport.port
            for sep in sl.endpoints:
                ip = sep.ip
                if want_family is not None and (":" in ip) != v6:
                    continue
                key = (ip, number)
                if key in merged and not _beats(sep.ready, sep.node_name, merged[key], node_name):
                    continue
                merged[key] = sep.at_port(number)
    if not merged:
        return ()
    return tuple(merged[k] for k in sorted(merged, key=_endpoint_sort_key))


def _slice_name(sl: EndpointSlice) -> str:
    return sl.name


def _endpoint_sort_key(key: tuple[str, int]) -> tuple[int, bytes, int]:
    # Numeric address order (10.0.0.9 before 10.0.0.10) so rules and logs read
    # naturally; packed big-endian bytes compare numerically and inet_pton is
    # far cheaper than ipaddress. Family first: v4 before v6.
    ip, port = key
    if ":" in ip:
        return (6, socket.inet_pton(socket.AF_INET6, ip), port)
    return (4, socket.inet_pton(socket.AF_INET, ip), port)


def _beats(ready: bool, node: str | None, old: Endpoint, node_name: str) -> bool:
    """Whether a later duplicate replaces the endpoint already merged."""
    if ready != old.ready:
        return ready
    new_local = node is not None and node == node_name
    return new_local and not old.is_local(node_name)


def service_ports(svc: Service) -> dict[ServicePortName, ServicePort]:
    """A service's ports by name; a repeated name keeps the last (as kube-proxy)."""
    return {p.name: p for p in svc.ports}


class Tracker:
    """Current Services, EndpointSlices and node labels; snapshots on demand.

    Mutators return True when they changed the tracker's current content
    (an identical re-delivery, as after a relist, returns False). They never
    raise on well-typed input.
    """

    def __init__(self, node_name: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.node_name = node_name
        self._clock = clock
        self._services: dict[ServiceName, Service] = {}
        self._slices: dict[SliceKey, EndpointSlice] = {}
        # A service's slice keys: a tuple while few (a set costs 216 bytes even for the one slice most
        # services have: 2 MB at 10,000 services), a set past _FEW_SLICES (no quadratic cost for many).
        self._slices_by_service: dict[ServiceName, tuple[SliceKey, ...] | set[SliceKey]] = {}
        self._node_labels: Mapping[str, str] = MappingProxyType({})

        # Value at the last take() of each service / slice touched since.
        self._svc_base: dict[ServiceName, Service | None] = {}
        self._slice_base: dict[SliceKey, EndpointSlice | None] = {}
        # Which services a pending slice change affects (a slice may move
        # between services, so both old and new owner are recorded).
        self._slice_owners: dict[SliceKey, set[ServiceName]] = {}
        # How many pending slices name each service: its keys are the
        # services with pending endpoint changes (the *_PENDING gauge).
        self._owner_refs: dict[ServiceName, int] = {}
        self._labels_base: Mapping[str, str] | None = None
        self._first_change: float | None = None

        # The live state, patched in place by take().
        self._ports: dict[ServicePortName, ServicePort] = {}
        self._endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
        # Each served service's ports as of the last take: the Service's own tuple, not a copy of names.
        self._served_ports: dict[ServiceName, tuple[ServicePort, ...]] = {}

    # ---- queries -------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Some change is recorded that the last snapshot does not have."""
        return bool(self._svc_base or self._slice_base or self._labels_base is not None)

    @property
    def oldest_pending(self) -> float | None:
        """Monotonic time of the oldest change not yet taken, or None."""
        return self._first_change if self.pending else None

    @property
    def node_labels(self) -> Mapping[str, str]:
        return self._node_labels

    def service(self, name: ServiceName) -> Service | None:
        return self._services.get(name)

    def slice(self, key: SliceKey) -> EndpointSlice | None:
        return self._slices.get(key)

    def __len__(self) -> int:
        return len(self._services)

    # ---- mutators ------------------------------------------------------

    def update_service(self, name: ServiceName, svc: Service | None) -> bool:
        """Set (or with None delete) one service."""
        if svc is not None and svc.name != name:
            raise ValueError(f"service {svc.name} delivered under name {name}")
        old = self._services.get(name)
        if old == svc:
            return False
        if svc is None:
            del self._services[name]
        else:
            self._services[name] = svc
        metrics.SERVICE_CHANGES_TOTAL.inc()
        base = self._svc_base.get(name, _UNSET)
        if base is _UNSET:
            self._svc_base[name] = old
            self._note_change()
        elif base == svc:
            del self._svc_base[name]
        metrics.SERVICE_CHANGES_PENDING.set(len(self._svc_base))
        self._settle()
        return True

    def update_slice(self, key: SliceKey, sl: EndpointSlice | None) -> bool:
        """Set (or with None delete) one EndpointSlice, keyed (namespace, name)."""
        if sl is not None and sl.key != key:
            raise ValueError(f"slice {sl.key} delivered under key {key}")
        old = self._slices.get(key)
        if old == sl:
            return False
        if old is not None:
            self._unindex_slice(old.service_name, key)
        if sl is None:
            del self._slices[key]
        else:
            self._slices[key] = sl
            self._index_slice(sl.service_name, key)
        metrics.ENDPOINT_CHANGES_TOTAL.inc()
        base = self._slice_base.get(key, _UNSET)
        if base is _UNSET:
            self._slice_base[key] = old
            self._note_change()
        elif base == sl:
            del self._slice_base[key]
            self._drop_owners(key)
        if key in self._slice_base:
            for s in (old, sl):
                if s is not None:
                    self._add_owner(key, s.service_name)
        metrics.ENDPOINT_CHANGES_PENDING.set(len(self._owner_refs))
        self._settle()
        return True

    def replace_all(
        self,
        services: Iterable[Service] | None,
        slices: Iterable[EndpointSlice] | None,
    ) -> bool:
        """Make the content exactly these objects (a full list).

        Only differences are recorded, so a relist that returns what we have
        is free. None leaves that kind untouched (a source that relists
        services and slices separately). Duplicate names: the last wins.
        """
        changed = False
        if services is not None:
            wanted = {s.name: s for s in services}
            for name in [n for n in self._services if n not in wanted]:
                changed |= self.update_service(name, None)
            for name, svc in wanted.items():
                changed |= self.update_service(name, svc)
        if slices is not None:
            wanted_sl = {s.key: s for s in slices}
            for key in [k for k in self._slices if k not in wanted_sl]:
                changed |= self.update_slice(key, None)
            for key, sl in wanted_sl.items():
                changed |= self.update_slice(key, sl)
        return changed

    def set_node_labels(self, labels: Mapping[str, str]) -> bool:
        """Set this node's labels (its zone drives topology-aware routing)."""
        new = MappingProxyType(dict(labels))
        if new == self._node_labels:
            return False
        if self._labels_base is None:
            self._labels_base = self._node_labels
            self._note_change()
        elif self._labels_base == new:
            self._labels_base = None
        self._node_labels = new
        self._settle()
        return True

    # ---- snapshot ------------------------------------------------------

    def take(self) -> TrackerSnapshot:
        """Apply every pending change and return the new state.

        Only services touched since the last take are recomputed; the
        returned mappings are private copies the tracker never mutates.
        """
        oldest = self.oldest_pending
        dirty: set[ServiceName] = set(self._svc_base)
        dirty.update(self._owner_refs)
        changed: set[ServiceName] = set()
        changed_ports: set[ServicePortName] = set()
        for name in dirty:
            if self._recompute(name, changed_ports):
                changed.add(name)
        if self._labels_base is not None:
            changed.update(self._served_ports)
            changed_ports.update(self._ports)
        self._svc_base.clear()
        self._slice_base.clear()
        self._slice_owners.clear()
        self._owner_refs.clear()
        self._labels_base = None
        self._first_change = None
        metrics.SERVICE_CHANGES_PENDING.set(0)
        metrics.ENDPOINT_CHANGES_PENDING.set(0)
        state = ProxyState(
            service_ports=MappingProxyType(dict(self._ports)),
            endpoints=MappingProxyType(dict(self._endpoints)),
            node_name=self.node_name,
            node_labels=self._node_labels,
        )
        return TrackerSnapshot(state=state, changed=frozenset(changed), oldest_change=oldest,
                               changed_ports=frozenset(changed_ports))

    # ---- internals -----------------------------------------------------

    def _recompute(self, name: ServiceName, changed_ports: set[ServicePortName]) -> bool:
        """Rebuild one service's ports and endpoints; True if they changed.

        The names of its ports that appeared, vanished or differ are added to
        ``changed_ports``.
        """
        svc = self._services.get(name)
        old_names = {p.name: None for p in self._served_ports.get(name, ())}  # a name may repeat
        new_ports = service_ports(svc) if svc is not None else {}
        slices = [self._slices[k] for k in self._slices_by_service.get(name, ())]
        new_eps = {pn: merge_endpoints(p, slices, node_name=self.node_name)
                   for pn, p in new_ports.items()}

        changed = False
        for pn in old_names:
            if pn not in new_ports:
                changed = True
                changed_ports.add(pn)
                del self._ports[pn]
                del self._endpoints[pn]
        for pn, port in new_ports.items():
            eps = new_eps[pn]
            if self._ports.get(pn) != port or self._endpoints.get(pn) != eps:
                changed = True
                changed_ports.add(pn)
            self._ports[pn] = port
            self._endpoints[pn] = eps
        if svc is not None and new_ports:
            self._served_ports[name] = svc.ports
        else:
            self._served_ports.pop(name, None)
        return changed

    def _index_slice(self, name: ServiceName, key: SliceKey) -> None:
        keys = self._slices_by_service.get(name, ())
        if isinstance(keys, set):
            keys.add(key)
        elif key not in keys:
            self._slices_by_service[name] = (*keys, key) if len(keys) < _FEW_SLICES else {*keys, key}

    def _unindex_slice(self, name: ServiceName, key: SliceKey) -> None:
        keys = self._slices_by_service.get(name)
        if keys is None:
            return
        if isinstance(keys, set):
            keys.discard(key)
        elif key in keys:
            keys = tuple(k for k in keys if k != key)
            self._slices_by_service[name] = keys
        if not keys:
            del self._slices_by_service[name]

    def _note_change(self) -> None:
        if self._first_change is None:
            self._first_change = self._clock()

    def _settle(self) -> None:
        # Everything pending was undone: the next change starts a new clock.
        if not self.pending:
            self._first_change = None

    def _add_owner(self, key: SliceKey, name: ServiceName) -> None:
        owners = self._slice_owners.setdefault(key, set())
        if name not in owners:
            owners.add(name)
            self._owner_refs[name] = self._owner_refs.get(name, 0) + 1

    def _drop_owners(self, key: SliceKey) -> None:
        for name in self._slice_owners.pop(key, ()):
            left = self._owner_refs[name] - 1
            if left:
                self._owner_refs[name] = left
            else:
                del self._owner_refs[name]
