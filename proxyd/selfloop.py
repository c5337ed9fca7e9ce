"""Endpoints that point back at proxyd itself are refused, in every mode, before a mode sees them.

The API server accepts an EndpointSlice whose address is a Service's own
ClusterIP, an externalIP, an LB ingress IP, or a node address on a NodePort.
In userspace mode such an endpoint makes one client connection fan out into
an endless chain of proxied connections (each one accepted by proxyd's own
listener) until descriptors run out, and UDP datagrams circulate; in the
kernel modes it is a black hole at best. ``SelfEndpoints`` removes, from the
desired state handed to the mode, every endpoint ``(ip, port)`` of a service
port with protocol P when ``(ip, port, P)`` is an address proxyd serves:

* a ClusterIP (either of a dual-stack service's), externalIP or LB ingress
  IP with a service port's port and protocol;
* a node address of either family (those accepting NodePorts) with a
  service's nodePort and protocol.

Each refused endpoint is logged once (until it stops being refused) and
counted in ``proxyd_rejected_objects_total{kind="EndpointSlice",
reason="self_endpoint"}``. The rest of the slice is kept.

Work follows what changed: served addresses are counted per service port,
so a partial sync re-checks the changed services, the services with a
refused endpoint (few), and — only when some address started being served
(a new service, a new IP or port) — the endpoints of every service, looking
for the new addresses by IP (one pass over the endpoint tuples, no index
kept: an index of every endpoint would cost tens of MB at 30k services). A
full sync or a change of node addresses re-checks everything. With nothing
refused the state passes through untouched.

The userspace data path has its own, independent guard (it never connects
to one of its own listening sockets): see ``modes/userspace/tcp.py``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from types import MappingProxyType
from typing import Any

from proxyd import metrics, rejections
from proxyd.logformat import event
from proxyd.model import Protocol, ProxyState, ServiceName, ServicePort, ServicePortName
from proxyd.modes.base import SyncRequest

log = logging.getLogger(__name__)

REASON = "self_endpoint"

Key = tuple[str, int, Protocol]  # (ip, port, protocol)


def _served_keys(svc: ServicePort) -> tuple[tuple[Key, ...], tuple[int, Protocol] | None]:
    proto, number = svc.protocol, svc.port
    # Both cluster IPs of a dual-stack service (each family's proxier serves one).
    keys: tuple[Key, ...] = tuple((ip, number, proto) for ip in svc.cluster_ips if ip)
    if svc.external_ips or svc.load_balancer_ips:
        keys += tuple((ip, number, proto) for ip in svc.external_addresses)
    return keys, ((svc.node_port, proto) if svc.node_port else None)


class SelfEndpoints:
    """Filters a ``ProxyState`` sync after sync; see the module docstring."""

    def __init__(self, *, source: str) -> None:
        self._source = source
        self._served: Counter[Key] = Counter()
        self._served_ips: Counter[str] = Counter()
        self._nodeports: Counter[tuple[int, Protocol]] = Counter()
        self._by_port: dict[ServicePortName, tuple[tuple[Key, ...], tuple[int, Protocol] | None]] = {}
        self._refused: dict[ServicePortName, frozenset[tuple[str, int]]] = {}
        self._node_ips: frozenset[str] = frozenset()
        self._started = False

    @property
    def refused(self) -> dict[ServicePortName, frozenset[tuple[str, int]]]:
        return dict(self._refused)

    def filter(self, request: SyncRequest, node_ips: Sequence[str]) -> SyncRequest:
        """``request`` without self endpoints, its change index grown by ports whose refusals changed."""
        state, changed, changed_ports = request.state, request.changed, request.changed_ports
        ips = frozenset(node_ips)
        if changed is None or ips != self._node_ips or not self._started:
            self._rebuild(state, ips)
            affected: Iterable[ServicePortName] = state.service_ports
        else:
            affected = self._update(state, changed)
        more: set[ServicePortName] = set()
        for name in [n for n in self._refused if n not in state.service_ports]:
            del self._refused[name]
            more.add(name)
        for name in affected:
            if self._check(state, name):
                more.add(name)
        if changed is not None:
            services = {n.service for n in more}
            if not services <= changed:
                changed = changed | services
            if changed_ports is not None and not more <= changed_ports:
                changed_ports = changed_ports | more
        if self._refused:
            endpoints = dict(state.endpoints)
            for name, bad in self._refused.items():
                endpoints[name] = tuple(ep for ep in endpoints.get(name, ()) if (ep.ip, ep.port) not in bad)
            state = ProxyState(service_ports=state.service_ports, endpoints=MappingProxyType(endpoints),
                               node_name=state.node_name, node_labels=state.node_labels)
        return SyncRequest(state, changed, changed_ports)

    # ---- bookkeeping -----------------------------------------------------------------------------

    def _rebuild(self, state: ProxyState, ips: frozenset[str]) -> None:
        self._started = True
        self._node_ips = ips
        self._served.clear()
        self._served_ips.clear()
        self._nodeports.clear()
        self._by_port.clear()
        for name, svc in state.service_ports.items():
            self._add_port(name, svc)

    def _add_port(self, name: ServicePortName, svc: ServicePort) -> None:
        keys, nodeport = _served_keys(svc)
        self._by_port[name] = (keys, nodeport)
        served, served_ips = self._served, self._served_ips
        for key in keys:
            served[key] = served.get(key, 0) + 1
            served_ips[key[0]] = served_ips.get(key[0], 0) + 1
        if nodeport is not None:
            self._nodeports[nodeport] += 1

    def _remove_port(self, name: ServicePortName) -> tuple[tuple[Key, ...], tuple[int, Protocol] | None]:
        keys, nodeport = self._by_port.pop(name, ((), None))
        for key in keys:
            _decrement(self._served, key)
            _decrement(self._served_ips, key[0])
        if nodeport is not None:
            _decrement(self._nodeports, nodeport)
        return keys, nodeport

    def _update(self, state: ProxyState, changed: frozenset[ServiceName]) -> set[ServicePortName]:
        """Apply the changed services' addresses; the service ports to re-check."""
        added_ips: set[str] = set()
        affected: set[ServicePortName] = set(self._refused)
        # Plain tuples: building a ServiceName per port would cost more than the rest of the sync here.
        wanted = {(c.namespace, c.name) for c in changed}
        touched = [n for n in self._by_port if (n.namespace, n.name) in wanted]
        touched += [n for n in state.service_ports
                    if (n.namespace, n.name) in wanted and n not in self._by_port]
        for name in touched:
            keys, nodeport = self._remove_port(name)
            svc = state.service_ports.get(name)
            if svc is None:
                continue
            self._add_port(name, svc)
            new_keys, new_nodeport = self._by_port[name]
            added_ips.update(ip for ip, _, _ in set(new_keys) - set(keys))
            if new_nodeport is not None and new_nodeport != nodeport:
                added_ips |= self._node_ips
            affected.add(name)
        if added_ips:
            # Some address started being served: find the endpoints already pointing at it.
            for name, eps in state.endpoints.items():
                if name not in affected and any(ep.ip in added_ips for ep in eps):
                    affected.add(name)
        return {n for n in affected if n in state.service_ports}

    def _check(self, state: ProxyState, name: ServicePortName) -> bool:
        """Recompute the refused endpoints of one service port; True when they changed."""
        eps = state.endpoints_of(name)
        old = self._refused.get(name, frozenset())
        if not old:
            served_ips, node_ips = self._served_ips, self._node_ips
            for ep in eps:
                if ep.ip in served_ips or ep.ip in node_ips:
                    break
            else:
                return False  # the common case, without building anything
        proto = name.protocol
        bad = frozenset((ep.ip, ep.port) for ep in eps if self._is_self(ep.ip, ep.port, proto))
        if bad == old:
            return False
        for ip, port in sorted(bad - old):
            host = f"[{ip}]" if ":" in ip else ip
            log.warning("%s/%s: endpoint %s:%d is an address proxyd serves itself; refused", name, proto,
                        host, port, extra=event(service=name, endpoint=f"{host}:{port}", reason=REASON))
            metrics.REJECTED_OBJECTS.labels(self._source, "EndpointSlice", REASON).inc()
            rejections.record(self._source, "EndpointSlice", f"{name}/{proto} endpoint {host}:{port}",
                              "an address proxyd serves itself (would loop)")
        if bad:
            self._refused[name] = bad
        else:
            self._refused.pop(name, None)
        return True

    def _is_self(self, ip: str, port: int, proto: Protocol) -> bool:
        if (ip, port, proto) in self._served:
            return True
        return (port, proto) in self._nodeports and ip in self._node_ips


def _decrement(counter: Counter[Any], key: object) -> None:
    left = counter[key] - 1
    if left > 0:
        counter[key] = left
    else:
        del counter[key]
