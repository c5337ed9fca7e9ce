"""Which endpoints serve which traffic: kube-proxy's ``CategorizeEndpoints``.

Every mode asks this module, and only this module, which of a service port's
endpoints its traffic may reach, so that all modes agree (pkg/proxy/
topology.go). The rules, in kube-proxy's order:

* "Usable" means ready; when no endpoint is ready, serving-and-terminating
  endpoints are used instead (independently for the cluster and the local
  set), so a rolling update never blackholes a service.
* Cluster endpoints exist when the port takes cluster-wide traffic: its
  internalTrafficPolicy is Cluster, or it is externally reachable (NodePort,
  externalIPs, LB IPs) — even with externalTrafficPolicy Local, because
  traffic from pods on this node to an external address short-circuits to
  the cluster set.
* Local endpoints exist when a Local policy applies: internalTrafficPolicy
  Local, or externalTrafficPolicy Local on an externally reachable port.
* Topology-aware routing (the service asked for it, every ready endpoint has
  a zone hint and at least one is hinted for this node's zone) restricts the
  cluster set to endpoints hinted for this zone. It never applies to the
  local set and falls back to all endpoints rather than to none.

Which set a packet uses: ``internal`` for ClusterIP traffic, ``external`` for
NodePort / externalIP / LB traffic from outside (see ``Categorized``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from proxyd.model import Endpoint, ProxyState, ServiceName, ServicePort


@dataclass(frozen=True, slots=True)
class Categorized:
    """The endpoint sets of one service port, as kube-proxy computes them.

    ``cluster``: usable endpoints for Cluster-policy traffic (topology
    applied). For an internal-only port with internalTrafficPolicy Local,
    kube-proxy has no cluster set; here it is the local set, so that code
    reading ``cluster`` for ClusterIP traffic still does the right thing.
    ``local``: usable endpoints on this node, empty when no Local policy
    applies. ``all_reachable``: union of the two (what this node may ever
    send to, e.g. for conntrack cleanup and affinity). ``has_any``: some usable
    endpoint exists anywhere in the cluster, even if none is reachable from
    here; False means "reject" (no endpoints), True with an empty set means
    "drop" (only remote ones under a Local policy).
    """

    cluster: tuple[Endpoint, ...] = ()
    local: tuple[Endpoint, ...] = ()
    all_reachable: tuple[Endpoint, ...] = ()
    has_any: bool = False
    internal_local: bool = False
    external_local: bool = False

    @property
    def internal(self) -> tuple[Endpoint, ...]:
        """Endpoints for traffic to the ClusterIP."""
        return self.local if self.internal_local else self.cluster

    @property
    def external(self) -> tuple[Endpoint, ...]:
        """Endpoints for traffic from outside to NodePort/externalIPs/LB IPs."""
        return self.local if self.external_local else self.cluster


def uses_cluster_endpoints(svc: ServicePort) -> bool:
    # Even with externalTrafficPolicy Local an externally reachable port needs
    # cluster endpoints: pods on this node reaching an external IP get them.
    return not svc.internal_policy_local or svc.has_external


def uses_local_endpoints(svc: ServicePort) -> bool:
    return svc.internal_policy_local or svc.uses_local_external


def _usable(ep: Endpoint) -> bool:
    return ep.ready or (ep.serving and ep.terminating)


def _topology_zone(svc: ServicePort, endpoints: Sequence[Endpoint], node_zone: str | None) -> str | None:
    """The zone to restrict cluster endpoints to, or None for no restriction.

    Only ready endpoints count: hints on unready ones neither enable nor
    disable filtering. With no ready endpoint hinted for this zone the hints
    are ignored (fall back to every endpoint, never to none).
    """
    if not svc.topology_aware or not node_zone:
        return None
    has_ready = False
    has_for_zone = False
    for ep in endpoints:
        if not ep.ready:
            continue
        has_ready = True
        if not ep.zone_hints:
            return None
        if node_zone in ep.zone_hints:
            has_for_zone = True
    if not has_ready or not has_for_zone:
        return None
    return node_zone


def categorize(
    svc: ServicePort,
    endpoints: Sequence[Endpoint],
    *,
    node_name: str,
    node_zone: str | None,
) -> Categorized:
    """Split ``endpoints`` of ``svc`` into the sets each kind of traffic uses.

    Output tuples keep the input order (the tracker sorts endpoints), so
    equal inputs give equal outputs and planners stay deterministic.
    """
    internal_local = svc.internal_policy_local
    external_local = svc.uses_local_external
    if not endpoints:
        return Categorized(internal_local=internal_local, external_local=external_local)

    cluster: tuple[Endpoint, ...] = ()
    has_any = False
    zone: str | None = None
    if uses_cluster_endpoints(svc):
        zone = _topology_zone(svc, endpoints, node_zone)
        cluster = tuple(ep for ep in endpoints if ep.ready and (zone is None or zone in ep.zone_hints))
        if not cluster:
            # Topology already fell back when this zone had no ready endpoint,
            # so an empty set here means nothing is ready anywhere.
            cluster = tuple(ep for ep in endpoints if ep.serving and ep.terminating)
        has_any = bool(cluster)

    if not uses_local_endpoints(svc):
        return Categorized(cluster=cluster, all_reachable=cluster, has_any=has_any,
                           internal_local=internal_local, external_local=external_local)

    has_local_ready = False
    has_local_serving_terminating = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            if ep.is_local(node_name):
                has_local_ready = True
        elif ep.serving and ep.terminating:
            has_any = True
            if ep.is_local(node_name):
                has_local_serving_terminating = True

    use_serving_terminating = False
    local: tuple[Endpoint, ...] = ()
    if has_local_ready:
        local = tuple(ep for ep in endpoints if ep.ready and ep.is_local(node_name))
    elif has_local_serving_terminating:
        use_serving_terminating = True
        local = tuple(ep for ep in endpoints
                      if ep.serving and ep.terminating and ep.is_local(node_name))

    if not uses_cluster_endpoints(svc):
        return Categorized(cluster=local, local=local, all_reachable=local, has_any=has_any,
                           internal_local=internal_local, external_local=external_local)

    if zone is None and not use_serving_terminating:
        # cluster holds every ready endpoint and local only ready ones, so
        # cluster is already the union.
        all_reachable = cluster
    else:
        # cluster may miss local endpoints that are terminating or hinted
        # for another zone: merge, keyed by address as kube-proxy does.
        keep = {(ep.ip, ep.port) for ep in cluster}
        keep.update((ep.ip, ep.port) for ep in local)
        all_reachable = tuple(ep for ep in endpoints if (ep.ip, ep.port) in keep and _usable(ep))
        all_reachable = _dedup(all_reachable)
    return Categorized(cluster=cluster, local=local, all_reachable=all_reachable, has_any=has_any,
                       internal_local=internal_local, external_local=external_local)


def _dedup(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    seen: set[tuple[str, int]] = set()
    out: list[Endpoint] = []
    for ep in endpoints:
        key = (ep.ip, ep.port)
        if key not in seen:
            seen.add(key)
            out.append(ep)
    return tuple(out)


def local_endpoint_count(svc: ServicePort | None, endpoints: Iterable[Endpoint], node_name: str) -> int:
    """Local ready endpoints, as a healthCheckNodePort server reports them.

    kube-proxy counts distinct IPs of ready endpoints on this node across all
    ports of a service (one health check per service), so pass the
    endpoints of every port of the service. ``svc`` is accepted for symmetry
    with ``categorize`` and not needed for the count.
    """
    del svc
    return len({ep.ip for ep in endpoints if ep.ready and ep.is_local(node_name)})


def local_endpoint_counts(state: ProxyState) -> Mapping[ServiceName, int]:
    """``local_endpoint_count`` for every service that has a healthCheckNodePort."""
    ips: dict[ServiceName, set[str]] = {}
    for name, port in state.service_ports.items():
        if not port.health_check_node_port:
            continue
        bucket = ips.setdefault(name.service, set())
        for ep in state.endpoints.get(name, ()):
            if ep.ready and ep.is_local(state.node_name):
                bucket.add(ep.ip)
    return {svc: len(found) for svc, found in ips.items()}
