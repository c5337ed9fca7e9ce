"""Each family's view of successive sync requests, patched by the change index instead of rebuilt.

``DualStackMode`` hands every per-family proxier ``SyncRequest.for_family``'s
view of the desired state. Rebuilding a view visits every service port and
every endpoint: at 10,000 services of 10 endpoints that is ~60 ms a sync
(measured here), where a partial nftables sync takes ~1 ms. So only a full
request (or the first, or one after a change of node) rebuilds the views; a
partial one copies the previous views' mappings and re-derives just the
ports its change index names (``changed_ports``: every port that appeared,
vanished or differs since the previous request, which the modes' own
partial syncs already rely on). A request without that index rebuilds.

The mappings are copied, never patched in place: a mode keeps the state it
last applied (quarantine holds ports back to it), so a view once handed out
must not change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from types import MappingProxyType

from proxyd.model import Endpoint, ProxyState, ServicePort, ServicePortName, family
from proxyd.modes.base import SyncRequest


class FamilyViews:
    """The last request's per-family views, to derive the next request's from its change index."""

    def __init__(self, families: Sequence[int]) -> None:
        self.families = tuple(families)
        self._base: ProxyState | None = None
        # Each view's own dicts (behind its read-only proxies): ``dict.copy`` of a dict reuses the
        # stored hashes, where copying through the proxy hashes every ServicePortName again (~4x).
        self._dicts: dict[int, tuple[_Ports, _Endpoints]] = {}

    def split(self, request: SyncRequest) -> dict[int, SyncRequest]:
        """``request`` as each family's proxier sees it (``SyncRequest.for_family``, same result)."""
        state, base = request.state, self._base
        names = request.changed_ports
        if (request.changed is None or names is None or base is None or len(self._dicts) != len(self.families)
                or state.node_name != base.node_name or state.node_labels != base.node_labels):
            for fam in self.families:
                view = state.for_family(fam)
                self._dicts[fam] = (dict(view.service_ports), dict(view.endpoints))
        else:
            for fam in self.families:
                ports, endpoints = self._dicts[fam]
                self._dicts[fam] = _patch(ports.copy(), endpoints.copy(), state, names, fam)
        self._base = state
        return {fam: replace(request, state=ProxyState(MappingProxyType(ports), MappingProxyType(endpoints),
                                                       state.node_name, state.node_labels))
                for fam, (ports, endpoints) in self._dicts.items()}

    def forget(self) -> None:
        """Rebuild on the next request (after a failed sync the runner sends a full one anyway)."""
        self._base = None
        self._dicts = {}


_Ports = dict[ServicePortName, ServicePort]
_Endpoints = dict[ServicePortName, tuple[Endpoint, ...]]


def _patch(ports: _Ports, endpoints: _Endpoints, state: ProxyState, names: Iterable[ServicePortName],
           fam: int) -> tuple[_Ports, _Endpoints]:
    """``ports``/``endpoints`` (a copy of the last view's) with the ports ``names`` re-derived from
    ``state``, as ``ProxyState.for_family`` would derive them."""
    for name in names:
        sp = state.service_ports.get(name)
        sp_view = sp.for_family(fam) if sp is not None else None
        if sp_view is None:
            ports.pop(name, None)
            endpoints.pop(name, None)
            continue
        ports[name] = sp_view
        eps = state.endpoints.get(name)
        if eps is None:
            endpoints.pop(name, None)
        else:
            endpoints[name] = _of_family(eps, fam)
    return ports, endpoints


def _of_family(eps: tuple[Endpoint, ...], fam: int) -> tuple[Endpoint, ...]:
    if any(family(ep.ip) != fam for ep in eps):
        return tuple(ep for ep in eps if family(ep.ip) == fam)
    return eps

