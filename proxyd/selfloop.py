"""Endpoints that point back at proxyd itself are refused, in every mode, before a mode sees them.

The API server accepts an EndpointSlice whose address is a Service's own
ClusterIP, an externalIP, an LB ingress IP, or a node address on a NodePort.
In userspace mode such an endpoint makes one client connection fan out into
an endless chain of proxied connections (each one accepted by proxyd's own
listener) until descriptors run out, and UDP datagrams circulate; in the
kernel modes it is a black hole at best. ``SelfEndpoints`` removes, from the
desired state handed to the mode, every endpoint ``(ip, port)`` of a service
port with protocol P when ``(ip, port, P)`` is an address proxyd serves:

* a ClusterIP, externalIP or LB ingress IP with a service port's port and
  protocol;
* a node address (those accepting NodePorts) with a service's nodePort and
  protocol.

Each refused endpoint is logged once (until it stops being refused) and
counted in ``proxyd_rejected_objects_total{kind="EndpointSlice",
reason="self_endpoint"}``. The rest of the slice is kept.

Work is proportional to what changed: served addresses are kept per service
port and endpoints are indexed by address, so a partial sync re-checks the
changed services and the services whose endpoints hit an address that just
started or stopped being served (those are added to ``changed``, so the
mode re-plans them). A full sync or a change of node addresses re-checks
everything. With nothing refused the state passes through untouched.

The userspace data path has its own, independent guard (it never connects
to one of its own listening sockets): see ``modes/userspace/tcp.py``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from types import MappingProxyType

from proxyd import metrics
from proxyd.model import Endpoint, ProxyState, ServiceName, ServicePort, ServicePortName

log = logging.getLogger(__name__)

REASON = "self_endpoint"

Key = tuple[str, int, str]  # (ip, port, protocol)


def _served_keys(svc: ServicePort) -> tuple[frozenset[Key], tuple[int, str] | None]:
    proto = str(svc.protocol)
    keys = {(ip, svc.port, proto) for ip in (svc.cluster_ip, *svc.external_addresses) if ip}
    return frozenset(keys), ((svc.node_port, proto) if svc.node_port else None)


class SelfEndpoints:
    """Filters a ``ProxyState`` sync after sync; see the module docstring."""

    def __init__(self, *, source: str) -> None:
        self._source = source
        self._served: Counter[Key] = Counter()
        self._nodeports: Counter[tuple[int, str]] = Counter()
        self._by_port: dict[ServicePortName, tuple[frozenset[Key], tuple[int, str] | None]] = {}
        # Endpoint address -> service ports that have an endpoint there.
        self._index: dict[Key, set[ServicePortName]] = {}
        self._indexed: dict[ServicePortName, frozenset[Key]] = {}
        self._refused: dict[ServicePortName, frozenset[tuple[str, int]]] = {}
        self._node_ips: frozenset[str] | None = None

    @property
    def refused(self) -> dict[ServicePortName, frozenset[tuple[str, int]]]:
        return dict(self._refused)

    def filter(self, state: ProxyState, changed: frozenset[ServiceName] | None,
               node_ips: Sequence[str]) -> tuple[ProxyState, frozenset[ServiceName] | None]:
        """The state without self endpoints, and ``changed`` plus services whose refusals changed."""
        ips = frozenset(node_ips)
        if changed is None or ips != self._node_ips:
            self._rebuild(state, ips)
            affected: Iterable[ServicePortName] = list(state.services)
            gone = [n for n in self._refused if n not in state.services]
        else:
            affected, gone = self._update(state, changed)
        more: set[ServiceName] = set()
        for name in gone:
            if self._refused.pop(name, None):
                more.add(name.service)
        for name in affected:
            if self._check(state, name):
                more.add(name.service)
        if changed is not None and not more <= changed:
            changed = changed | more
        if not self._refused:
            return state, changed
        endpoints = dict(state.endpoints)
        for name, bad in self._refused.items():
            endpoints[name] = tuple(ep for ep in endpoints.get(name, ()) if (ep.ip, ep.port) not in bad)
        return ProxyState(services=state.services, endpoints=MappingProxyType(endpoints),
                          node_name=state.node_name, node_labels=state.node_labels), changed

    # ---- bookkeeping -----------------------------------------------------------------------------

    def _rebuild(self, state: ProxyState, ips: frozenset[str]) -> None:
        self._node_ips = ips
        self._served.clear()
        self._nodeports.clear()
        self._by_port.clear()
        self._index.clear()
        self._indexed.clear()
        for name, svc in state.services.items():
            self._add_port(name, svc)
            self._reindex(name, state.endpoints_of(name))

    def _add_port(self, name: ServicePortName, svc: ServicePort) -> None:
        keys, nodeport = _served_keys(svc)
        self._by_port[name] = (keys, nodeport)
        self._served.update(keys)
        if nodeport is not None:
            self._nodeports[nodeport] += 1

    def _remove_port(self, name: ServicePortName) -> tuple[frozenset[Key], tuple[int, str] | None]:
        keys, nodeport = self._by_port.pop(name, (frozenset(), None))
        self._served.subtract(keys)
        for key in keys:
            if self._served[key] <= 0:
                del self._served[key]
        if nodeport is not None:
            self._nodeports[nodeport] -= 1
            if self._nodeports[nodeport] <= 0:
                del self._nodeports[nodeport]
        return keys, nodeport

    def _reindex(self, name: ServicePortName, endpoints: Iterable[Endpoint]) -> None:
        proto = str(name.protocol)
        new = frozenset((ep.ip, ep.port, proto) for ep in endpoints)
        old = self._indexed.get(name, frozenset())
        for key in old - new:
            owners = self._index.get(key)
            if owners is not None:
                owners.discard(name)
                if not owners:
                    del self._index[key]
        for key in new - old:
            self._index.setdefault(key, set()).add(name)
        if new:
            self._indexed[name] = new
        else:
            self._indexed.pop(name, None)

    def _update(self, state: ProxyState,
                changed: frozenset[ServiceName]) -> tuple[set[ServicePortName], list[ServicePortName]]:
        """Apply the changed services; the service ports to re-check and those that are gone."""
        moved_keys: set[Key] = set()
        moved_nodeports: set[tuple[int, str]] = set()
        affected: set[ServicePortName] = set()
        gone: list[ServicePortName] = []
        touched = [n for n in self._by_port if n.service in changed]
        touched += [n for n in state.services if n.service in changed and n not in self._by_port]
        for name in touched:
            keys, nodeport = self._remove_port(name)
            svc = state.services.get(name)
            if svc is not None:
                self._add_port(name, svc)
                new_keys, new_nodeport = self._by_port[name]
                moved_keys |= keys ^ new_keys
                if nodeport != new_nodeport:
                    moved_nodeports.update(p for p in (nodeport, new_nodeport) if p is not None)
                affected.add(name)
            else:
                moved_keys |= keys
                if nodeport is not None:
                    moved_nodeports.add(nodeport)
                gone.append(name)
            self._reindex(name, state.endpoints_of(name))
        for key in moved_keys:
            affected.update(self._index.get(key, ()))
        for port, proto in moved_nodeports:
            for ip in self._node_ips or ():
                affected.update(self._index.get((ip, port, proto), ()))
        return {n for n in affected if n in state.services}, gone

    def _is_self(self, ip: str, port: int, proto: str) -> bool:
        if (ip, port, proto) in self._served:
            return True
        return (port, proto) in self._nodeports and ip in (self._node_ips or ())

    def _check(self, state: ProxyState, name: ServicePortName) -> bool:
        """Recompute the refused endpoints of one service port; True when they changed."""
        proto = str(name.protocol)
        bad = frozenset((ep.ip, ep.port) for ep in state.endpoints_of(name)
                        if self._is_self(ep.ip, ep.port, proto))
        old = self._refused.get(name, frozenset())
        if bad == old:
            return False
        for ip, port in sorted(bad - old):
            host = f"[{ip}]" if ":" in ip else ip
            log.warning("%s/%s: endpoint %s:%d is an address proxyd serves itself; refused", name, proto,
                        host, port)
            metrics.REJECTED_OBJECTS.labels(self._source, "EndpointSlice", REASON).inc()
        if bad:
            self._refused[name] = bad
        else:
            self._refused.pop(name, None)
        return True
