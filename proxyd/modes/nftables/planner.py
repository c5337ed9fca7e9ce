"""Pure planner of nftables mode: ProxyState -> the elements and chains of the ``proxyd`` table, and the diff.

``render_port`` is one iteration of kube-proxy's per-service-port loop
(pkg/proxy/nftables/proxier.go syncProxyRules) on the compact layout of
``layout``: it returns the map and set elements the port contributes, the
pick chains (``<pick>-<proto>-N``) it uses and, only for ClientIP
affinity, its own chains and dynamic sets. Endpoint selection is ``proxyd.policy.categorize``'s;
nothing here re-derives it.

``Planner`` mirrors in memory what the kernel holds (who owns each map
key, reference counts of shared set elements, dynamic chains and sets) and
the last committed state, so a sync sends only differences:
``plan(state, changed)`` renders the previous and the new version of just
the changed services' ports and emits one transaction of element deletes
and adds, chains created (or flushed and refilled when their rules
changed) and nothing else; it never reads the kernel and never walks every
service. A full plan rewrites everything in
one transaction (add+flush of every chain and map, all elements), which is
atomic, so adopting what a previous run left costs no traffic gap. Chains
that fell out of use are emptied now and deleted by the *next* plan (kernels
before 6.2 refuse deleting a chain in the transaction that drops the last
map element naming it, as kube-proxy notes). Like the iptables planner, a
plan is computed without touching the planner; ``commit(plan)`` adopts it
once the kernel accepted it.

The mirror is compact: a key is held as its ``hash()`` (in a ``KeyIndex``:
a sorted 64-bit array, not the text) and maps hold the owning port, not the
value. Element texts are
rendered again when needed: a partial plan re-renders the changed ports'
previous version anyway (the value the kernel holds for a key is what its
owner rendered), and ``kernel`` (status, tests) renders the committed state.
At 10,000 services × 10 endpoints this is ~3.5 MiB instead of ~40 MiB of
key and value strings. A hash collision between two keys of one set would need
two of ~10^5 keys to share 64 random bits (about one chance in 10^9 per
set, and the per-process hash secret keeps it from being arranged).

Two service ports claiming the same key (same address, protocol and port)
cannot both be served: the first in ServicePortName order keeps it, the
other's element is left out and counted in ``Plan.conflicts``.

Text safety: the only text reaching nft is addresses (checked with
``inet_pton``/``ipaddress``), integers, protocol keywords and hashed names.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxyd.model import Endpoint, ProxyState, ServiceName, ServicePort, ServicePortName
from proxyd.model import family as _family_of
from proxyd.modes.iptables import chains as iptchains
from proxyd.modes.iptables.planner import PortRender
from proxyd.modes.nftables import layout as lay
from proxyd.modes.nftables.keyindex import KeyIndex
from proxyd.netfilter.planning import MirrorPlanner, NodeOptions
from proxyd.netfilter.render import PROTO as _PROTO
from proxyd.netfilter.render import addresses as _addresses
from proxyd.netfilter.render import networks as _networks
from proxyd.netfilter.render import safe_ip as _safe_ip
from proxyd.policy import categorize

REJECT = f"goto {lay.REJECT_CHAIN}"

# Sets whose elements several ports may share (refcounted, no value).
SHARED_SETS = frozenset({lay.CLUSTER_IPS, lay.HAIRPIN})

Element = tuple[str, str, str | None]  # (set or map, key, value or None)
_EMPTY: Mapping[Any, Any] = {}
# Mirror of one set or map: hash(key) -> owning port (maps) or reference count (shared sets).
Owned = KeyIndex[ServicePortName]
Counts = KeyIndex[int]
_KEEP = object()  # a partial plan leaves this element as the kernel holds it


@dataclass(frozen=True, slots=True)
class PlannerOptions(NodeOptions):
    """The node-wide settings a plan depends on (``NodeOptions``'s)."""

    @property
    def fam(self) -> lay.Family:
        return lay.Family(self.family)

    @property
    def layout(self) -> lay.LayoutOptions:
        return lay.LayoutOptions(family=self.fam, cluster_cidr=self.local_cidr,
                                 masquerade_all=self.masquerade_all, mark=self.mark,
                                 nodeport_addresses=bool(self.nodeport_addresses))


@dataclass(frozen=True, slots=True)
class PortPlan:
    """Everything one service port contributes to the table."""

    elements: tuple[Element, ...] = ()
    picks: tuple[str, ...] = ()                          # shared <pick>-N chains it uses
    chains: tuple[tuple[str, tuple[str, ...]], ...] = ()  # own chains (affinity) and their rules
    sets: tuple[tuple[str, str], ...] = ()               # own dynamic sets (affinity) and definitions
    render: PortRender = field(default_factory=PortRender)  # for stale UDP conntrack cleanup


@dataclass(slots=True)
class Plan:
    """One nft transaction and what to adopt once the kernel accepted it.

    A full plan carries the whole mirror (``owners``, ``refs``: set name ->
    hash(key) -> owning port / reference count) and, until it is applied,
    the element texts (``kernel``); a partial one only the entries that
    change (``owner_delta``, ``ref_delta``, keyed by (set, key text)).
    """

    text: str
    full: bool
    state: ProxyState
    ports: dict[ServicePortName, PortPlan]   # the ports (re-)rendered by this plan
    removed: frozenset[ServicePortName]
    by_service: dict[ServiceName, tuple[ServicePortName, ...] | None]  # None: the service has no port left
    kernel: dict[str, dict[str, str | None]] = field(default_factory=dict)
    owners: dict[str, Owned] = field(default_factory=dict)
    refs: dict[str, Counts] = field(default_factory=dict)
    owner_delta: dict[tuple[str, str], ServicePortName | None] = field(default_factory=dict)
    ref_delta: dict[tuple[str, str], int] = field(default_factory=dict)
    chains: dict[str, tuple[str, ...] | None] = field(default_factory=dict)  # dynamic chains
    sets: dict[str, str | None] = field(default_factory=dict)                # dynamic (affinity) sets
    pick_refs: dict[str, int] = field(default_factory=dict)
    doomed_chains: tuple[str, ...] = ()   # unused now: delete in the next plan
    node_ips: tuple[str, ...] = ()
    added: int = 0
    deleted: int = 0
    conflicts: int = 0

    @property
    def rerendered(self) -> frozenset[ServicePortName]:
        return frozenset(self.ports)

    @property
    def empty(self) -> bool:
        return not self.text.strip()

    def applied(self) -> Plan:
        """This plan as a mode keeps it once the kernel took it: what changed, not the text or renderings.

        A full plan's text, element texts and per-port renderings are tens of
        MB at 10,000 services; the mirror it carries is the planner's own
        (shared, no copy).
        """
        return dataclasses.replace(self, text="", kernel={}, ports=dict.fromkeys(self.ports, _APPLIED))


_APPLIED = PortPlan()  # stands for a port's rendering in an applied plan


def _suffix(chain: str) -> str:
    return chain.rsplit("-", 1)[-1].lower()


def render_port(svc: ServicePort, endpoints: tuple[Endpoint, ...], *, options: PlannerOptions,
                node_name: str, node_zone: str | None) -> PortPlan:
    """The elements, pick chains and affinity chains of one service port."""
    fam = options.fam
    proto = _PROTO[svc.protocol]
    eps = tuple(ep for ep in endpoints if _family_of(ep.ip) == options.family)
    cat = categorize(svc, eps, node_name=node_name, node_zone=node_zone)
    cluster_ip = _safe_ip(svc.cluster_ip)
    external_ips = _addresses(svc.external_ips, options.family)
    lb_ips = _addresses(svc.load_balancer_ips, options.family)
    ranges = _networks(svc.load_balancer_source_ranges, options.family)
    port = svc.port
    has_endpoints = cat.has_any
    internal = cat.internal
    external_local = svc.uses_local_external
    external = cat.local if external_local else cat.cluster

    elements: list[Element] = [(lay.CLUSTER_IPS, cluster_ip, None)]
    picks: list[str] = []
    own_chains: list[tuple[str, tuple[str, ...]]] = []
    own_sets: list[tuple[str, str]] = []
    sticky: dict[tuple[Endpoint, ...], str] = {}
    affinity = svc.affinity_timeout > 0

    def target(pick: lay.Pick, key: str, chosen: tuple[Endpoint, ...]) -> None:
        """Elements sending ``key`` of ``pick`` to ``chosen`` (drop when empty)."""
        if not chosen:
            elements.append((pick.name, key, "drop"))
            return
        if affinity:
            chain = sticky.get(chosen)
            if chain is None:
                chain = sticky[chosen] = _sticky_chain(svc, chosen, len(sticky), fam, own_chains, own_sets)
            elements.append((pick.name, key, f"goto {chain}"))
            return
        n = len(chosen)
        chain = lay.pick_chain(pick, proto, n)
        if chain not in picks:
            picks.append(chain)
        elements.append((pick.name, key, f"goto {chain}"))
        backends = lay.backends_map(pick, proto)
        for i, ep in enumerate(chosen):
            elements.append((backends, f"{key} . {i}", f"{_safe_ip(ep.ip)} . {ep.port}"))

    svc_key = f"{cluster_ip} . {proto} . {port}"
    if not has_endpoints:
        elements.append((lay.NO_ENDPOINT_SERVICES, svc_key, REJECT))
    elif not internal:
        # internalTrafficPolicy Local without a local endpoint.
        elements.append((lay.NO_ENDPOINT_SERVICES, svc_key, "drop"))
    else:
        elements.append((lay.SERVICE_IPS, svc_key, f"goto {lay.SVC_INT}"))
        target(lay.PICK_SVC, svc_key, internal)

    kind = lay.SVC_EXTL if external_local else lay.SVC_EXT
    for ip in (*external_ips, *lb_ips):
        key = f"{ip} . {proto} . {port}"
        if not has_endpoints:
            elements.append((lay.NO_ENDPOINT_SERVICES, key, REJECT))
            continue
        elements.append((lay.SERVICE_IPS, key, f"goto {kind}"))
        target(lay.PICK_SVC, key, external)
        if external_local:
            target(lay.PICK_SVC_SHORT, key, cat.cluster)

    if has_endpoints and lb_ips and ranges:
        node_ip = ipaddress.ip_address(options.node_ip) if options.node_ip else None
        allow_lb = node_ip is not None and any(node_ip.version == n.version and node_ip in n for n in ranges)
        for ip in lb_ips:
            key = f"{ip} . {proto} . {port}"
            elements.append((lay.FIREWALL_IPS, key, None))
            for net in ranges:
                elements.append((lay.FIREWALL_ALLOW, f"{key} . {net}", None))
            if allow_lb:
                # The node's own address is allowed: so are LB IPs as sources (kube-proxy).
                for src in lb_ips:
                    elements.append((lay.FIREWALL_ALLOW, f"{key} . {src}", None))

    if svc.node_port:
        key = f"{proto} . {svc.node_port}"
        if not has_endpoints:
            elements.append((lay.NO_ENDPOINT_NODEPORTS, key, REJECT))
        else:
            np_kind = lay.NP_EXTL if external_local else lay.NP_EXT
            elements.append((lay.SERVICE_NODEPORTS, key, f"goto {np_kind}"))
            target(lay.PICK_NP, key, external)
            if external_local:
                target(lay.PICK_NP_SHORT, key, cat.cluster)

    hairpins = {ep.ip for ep in cat.all_reachable if ep.node_name == node_name}
    for ip in sorted(hairpins):
        # Only pods on this node send their traffic through this node's rules (an endpoint
        # without a node name is not a pod here).
        elements.append((lay.HAIRPIN, f"{_safe_ip(ip)} . {ip}", None))

    # A key may come twice (an external IP equal to an LB IP): the mirror's dicts collapse it.
    return PortPlan(elements=tuple(elements), picks=tuple(picks), chains=tuple(own_chains),
                    sets=tuple(own_sets),
                    render=PortRender(reachable=cat.all_reachable, has_endpoints=has_endpoints,
                                      n_endpoints=len(endpoints)))


def _sticky_chain(svc: ServicePort, chosen: tuple[Endpoint, ...], index: int, fam: lay.Family,
                  own_chains: list[tuple[str, tuple[str, ...]]], own_sets: list[tuple[str, str]]) -> str:
    """kube-proxy's affinity: a dynamic set of client addresses per endpoint, checked before the spread.

    Endpoint chains and sets are shared by the port's sticky chains (so the
    ClusterIP and NodePort of a service share affinity, as in kube-proxy);
    the set name carries the timeout so a changed timeout makes a new set.
    """
    name = svc.name
    base = _suffix(iptchains.svc_chain(name))
    chain = f"{lay.STICKY_PREFIX}{base}" + (f"-{index}" if index else "")
    existing = {c for c, _ in own_chains}
    rules: list[str] = []
    targets: list[str] = []
    for ep in chosen:
        h = _suffix(iptchains.sep_chain(name, f"{ep}/{svc.affinity_timeout}"))
        ep_chain, aff = f"{lay.ENDPOINT_PREFIX}{h}", f"{lay.AFFINITY_PREFIX}{h}"
        if ep_chain not in existing:
            existing.add(ep_chain)
            own_sets.append((aff, _affinity_body(fam, svc.affinity_timeout)))
            own_chains.append((ep_chain, (f"update @{aff} {{ {fam.addr} saddr }}",
                                          f"meta l4proto {_PROTO[svc.protocol]} dnat to {_join(ep)}")))
        rules.append(f"{fam.addr} saddr @{aff} goto {ep_chain}")
        targets.append(ep_chain)
    spread = ", ".join(f"{i} : goto {c}" for i, c in enumerate(targets))
    rules.append(f"numgen random mod {len(targets)} vmap {{ {spread} }}")
    own_chains.append((chain, tuple(rules)))
    return chain


def _order(name: ServicePortName) -> tuple[str, str, str, str]:
    """ServicePortName's own order as a plain tuple: sorting 10,000 names by it is ~10× faster."""
    return (name.namespace, name.name, name.port, name.protocol.value)


def _pick_rules(fam: lay.Family, chain: str) -> tuple[str, ...]:
    parsed = lay.parse_pick_chain(chain)
    assert parsed is not None, chain
    return tuple(lay.pick_rules(fam, *parsed))


def _affinity_body(fam: lay.Family, timeout: int) -> str:
    return f"type {fam.addr_type} ; flags dynamic,timeout ; timeout {timeout}s"


def _join(ep: Endpoint) -> str:
    ip = _safe_ip(ep.ip)
    return f"[{ip}]:{ep.port}" if ":" in ip else f"{ip}:{ep.port}"


class Planner(MirrorPlanner[PlannerOptions]):
    """Plans transactions from ProxyStates, mirroring the kernel's elements for partial syncs.

    What it keeps between syncs is the compact mirror of the kernel's
    elements (set -> hash(key) -> owning port, or reference count for shared
    sets) and the last committed ProxyState. It keeps no per-port
    rendering: a partial plan re-renders a changed port's previous version
    from the previous state (cheap for a few ports, and memory stays
    bounded by the kernel's elements).
    """

    def __init__(self, options: PlannerOptions) -> None:
        super().__init__(options)
        self._state = ProxyState()
        # Tuples, not sets: a service has one port or a few (48 bytes instead of 216 for one).
        self._by_service: dict[ServiceName, tuple[ServicePortName, ...]] = {}
        self._owners: dict[str, Owned] = {}
        self._refs: dict[str, Counts] = {}
        self._chains: dict[str, tuple[str, ...]] = {}
        self._sets: dict[str, str] = {}
        self._pick_refs: dict[str, int] = {}
        self._doomed_chains: tuple[str, ...] = ()
        self._node_ips: tuple[str, ...] = ()

    @property
    def kernel(self) -> Mapping[str, Mapping[str, str | None]]:
        """The elements the kernel holds (set -> key -> value), as far as the planner knows.

        Rendered from the committed state, keeping what the mirror holds
        (about a second at 10,000 services: for status and tests, never on a
        sync's path).
        """
        return self.kernel_renderer()()

    def kernel_renderer(self) -> Callable[[], dict[str, dict[str, str | None]]]:
        """``kernel`` as a function of a copy of the mirror taken now: it may run in a worker thread
        while the event loop commits further plans (the copy is a few ms; the rendering is the second)."""
        if not self._valid:
            return dict
        state, node_ips = self._state, self._node_ips
        owners = {k: v.copy() for k, v in self._owners.items()}
        refs = {k: v.copy() for k, v in self._refs.items()}

        def render() -> dict[str, dict[str, str | None]]:
            out: dict[str, dict[str, str | None]] = {}
            for name in sorted(state.service_ports, key=_order):
                p = self._render(state, name)
                if p is None:
                    continue
                for set_name, key, value in p.elements:
                    if set_name in SHARED_SETS:
                        if hash(key) in refs.get(set_name, _EMPTY):
                            out.setdefault(set_name, {})[key] = None
                    elif owners.get(set_name, _EMPTY).get(hash(key)) == name:
                        out.setdefault(set_name, {}).setdefault(key, value)
            if node_ips:
                out[lay.NODEPORT_IPS] = dict.fromkeys(node_ips)
            return out

        return render

    def kernel_for(self, names: Iterable[ServicePortName]) -> dict[str, dict[str, str | None]]:
        """``kernel`` restricted to the keys the ports ``names`` render (valued as their owners render
        them): proportional to those ports, for a status of a few services."""
        out: dict[str, dict[str, str | None]] = {}
        if not self._valid:
            return out
        renders: dict[ServicePortName, PortPlan | None] = {}

        def rendered(name: ServicePortName) -> PortPlan | None:
            if name not in renders:
                renders[name] = self._render(self._state, name)
            return renders[name]

        for name in names:
            p = rendered(name)
            for set_name, key, _ in p.elements if p is not None else ():
                if set_name in SHARED_SETS:
                    if hash(key) in self._refs.get(set_name, _EMPTY):
                        out.setdefault(set_name, {})[key] = None
                    continue
                owner = self._owners.get(set_name, _EMPTY).get(hash(key))
                held = rendered(owner) if owner is not None else None
                value = next((v for s, k, v in held.elements if s == set_name and k == key), _KEEP) \
                    if held is not None else _KEEP
                if value is not _KEEP:
                    out.setdefault(set_name, {})[key] = value  # type: ignore[assignment]
        return out

    def count(self, set_name: str) -> int:
        """How many elements the kernel holds in ``set_name`` (without rendering them)."""
        if set_name == lay.NODEPORT_IPS:
            return len(self._node_ips)
        return len(self._refs.get(set_name, _EMPTY) if set_name in SHARED_SETS
                   else self._owners.get(set_name, _EMPTY))

    @property
    def mirror(self) -> tuple[dict[str, dict[int, ServicePortName]], dict[str, dict[int, int]],
                              tuple[str, ...]]:
        """The compact mirror (owners, reference counts, node IPs), for comparing two planners."""
        return ({k: v.to_dict() for k, v in self._owners.items() if len(v)},
                {k: v.to_dict() for k, v in self._refs.items() if len(v)},
                self._node_ips)

    @property
    def elements(self) -> int:
        return (sum(len(v) for v in self._owners.values()) + sum(len(v) for v in self._refs.values())
                + len(self._node_ips))

    @property
    def dynamic_chains(self) -> Mapping[str, tuple[str, ...]]:
        return self._chains

    def _wanted_node_ips(self) -> tuple[str, ...]:
        if not self.options.nodeport_addresses:
            return ()
        out = []
        for ip in self.options.node_ips:
            a = ipaddress.ip_address(ip)
            if a.version == self.options.family and not a.is_loopback:
                out.append(str(a))
        return tuple(sorted(set(out)))

    def _render(self, state: ProxyState, name: ServicePortName) -> PortPlan | None:
        sp = state.service_ports.get(name)
        if sp is None or _family_of(sp.cluster_ip) != self.options.family:
            return None
        return render_port(sp, state.endpoints.get(name, ()), options=self.options,
                           node_name=state.node_name, node_zone=state.node_zone)

    def committed_render(self, name: ServicePortName) -> PortRender | None:
        """What the committed state rendered for ``name`` (for conntrack cleanup)."""
        plan = self._render(self._state, name) if self._valid else None
        return plan.render if plan is not None else None

    # -- planning ---------------------------------------------------------

    def plan(self, state: ProxyState, changed: frozenset[ServiceName] | None, *,
             stale_chains: Iterable[str] = (), stale_sets: Iterable[str] = (), replace: bool = False) -> Plan:
        """The transaction from the committed state to ``state``.

        ``changed`` None (or nothing committed yet) gives a full plan;
        ``stale_chains``/``stale_sets`` are dynamic chains and sets found in
        the kernel (after a restart): a full plan empties them now and the
        next plan deletes them; an older layout's base chains among them
        (``layout.RETIRED_CHAINS``) it deletes at once. ``replace`` (full plans only) deletes the
        whole table first, in the same transaction: for a table whose maps
        were declared otherwise (an older proxyd's layout), which nft refuses
        to redefine. The swap is atomic; only affinity entries are lost.
        """
        if changed is None or not self._valid or replace:
            if replace:
                return self._plan_full(state, (), (), replace=True)
            return self._plan_full(state, stale_chains, stale_sets)
        return self._plan_partial(state, changed)

    def _candidates(self, state: ProxyState, changed: frozenset[ServiceName]) -> set[ServicePortName]:
        """Port names whose rendering may differ: those of ``changed`` services, and any port that
        appeared or vanished. Proportional to the change unless ports appeared (then one pass over
        the names, in C)."""
        old = self._state.service_ports
        new = state.service_ports
        names: set[ServicePortName] = set()
        gone = 0
        for svc in changed:
            for name in self._by_service.get(svc, ()):
                names.add(name)
                if name not in new:
                    gone += 1
        if len(new) != len(old) - gone:
            names.update(new.keys() - old.keys())
            names.update(old.keys() - new.keys())
        return names

    def _plan_full(self, state: ProxyState, stale_chains: Iterable[str], stale_sets: Iterable[str], *,
                   replace: bool = False) -> Plan:
        opts = self.options
        fam = opts.fam
        table = fam.table
        kernel: dict[str, dict[str, str | None]] = {}
        owners: dict[str, dict[int, ServicePortName]] = {}
        refs: dict[str, dict[int, int]] = {}
        conflicts = 0
        fresh: dict[ServicePortName, PortPlan] = {}
        ordered = sorted(state.service_ports, key=_order)
        # What outlives the plan is made before the renderings: small long-lived objects made among
        # tens of MB of short-lived ones would keep the allocator's arenas (RSS) after those are freed.
        members: dict[ServiceName, list[ServicePortName]] = {}
        for name in ordered:
            members.setdefault(name.service, []).append(name)
        by_service: dict[ServiceName, tuple[ServicePortName, ...] | None] = {
            svc: tuple(names) for svc, names in members.items()}
        del members
        for name in ordered:
            p = self._render(state, name)
            if p is None:
                continue
            fresh[name] = p
            for set_name, key, value in p.elements:
                h = hash(key)
                if set_name in SHARED_SETS:
                    counts = refs.setdefault(set_name, {})
                    counts[h] = counts.get(h, 0) + 1
                    kernel.setdefault(set_name, {})[key] = None
                    continue
                who = owners.setdefault(set_name, {})
                if h in who:
                    if who[h] != name:
                        conflicts += 1
                    continue
                who[h] = name
                kernel.setdefault(set_name, {})[key] = value
        node_ips = self._wanted_node_ips()
        if node_ips:
            kernel[lay.NODEPORT_IPS] = dict.fromkeys(node_ips)
        canary = {lay.CANARY: [fam.canary_element]}

        chains, sets, pick_refs = self._dynamic(fresh)
        # "add" first makes the delete succeed whether or not the table exists.
        out = [f"add table {table}", f"delete table {table}", f"add table {table}"] if replace else [
            f"add table {table}"]
        fixed = lay.chains(opts.layout)
        base = {c[0]: c for c in lay.BASE_CHAINS}
        for chain in fixed:
            if chain in base:
                _, typ, hook, prio = base[chain]
                out.append(f"add chain {table} {chain} {{ type {typ} hook {hook} priority {prio} ; }}")
            else:
                out.append(f"add chain {table} {chain}")
        for chain in chains:
            out.append(f"add chain {table} {chain}")
        stale_chains = set(stale_chains)
        known = set() if replace else stale_chains | set(self._chains) | set(self._doomed_chains)
        stale_c = sorted(c for c in known if lay.is_dynamic_chain(c) and c not in chains)
        for chain in stale_c:
            out.append(f"add chain {table} {chain}")
        # Flush every chain before any map is flushed: rules may reference maps.
        for chain in (*fixed, *chains, *stale_c):
            out.append(f"flush chain {table} {chain}")
        for chain in sorted(c for c in stale_chains if c in lay.RETIRED_CHAINS):
            # An older layout's base chain (a table adopted after an upgrade): emptied, as "delete"
            # needs, and deleted; nothing jumps to a base chain.
            out.extend((f"flush chain {table} {chain}", f"delete chain {table} {chain}"))
        for set_name, body in sets.items():
            out.append(f"add set {table} {set_name} {{ {body} ; }}")
        for set_name, body in lay.maps(fam):
            kind = "map" if ":" in body else "set"
            out.append(f"add {kind} {table} {set_name} {{ {body} ; }}")
            out.append(f"flush {kind} {table} {set_name}")
        stale_s = [] if replace else sorted(s for s in set(stale_sets) | set(self._sets) if s not in sets)
        # Nothing references them once the chains above are flushed; "add" first makes the delete
        # succeed whether or not the set still exists.
        for set_name in stale_s:
            out.append(f"add set {table} {set_name} {{ {_affinity_body(fam, 1)} ; }}")
            out.append(f"delete set {table} {set_name}")
        for chain, rules in (*fixed.items(), *chains.items()):
            out.extend(f"add rule {table} {chain} {r}" for r in rules)
        listed = [(n, [k if v is None else f"{k} : {v}" for k, v in e.items()]) for n, e in kernel.items()]
        for set_name, items in (*listed, *canary.items()):
            for i in range(0, len(items), 4096):
                out.append(f"add element {table} {set_name} {{ {', '.join(items[i:i + 4096])} }}")
        text = "\n".join(out) + "\n"
        return Plan(text=text, full=True, state=state, ports=fresh, removed=frozenset(),
                    by_service=by_service, kernel=kernel, chains=dict[str, tuple[str, ...] | None](chains),
                    owners={k: KeyIndex(v) for k, v in owners.items()},
                    refs={k: KeyIndex(v) for k, v in refs.items()},
                    sets=sets, pick_refs=pick_refs, doomed_chains=tuple(stale_c), node_ips=node_ips,  # type: ignore[arg-type]
                    added=sum(len(v) for v in kernel.values()), conflicts=conflicts)

    def _dynamic(self, ports: Mapping[ServicePortName, PortPlan]) -> tuple[
            dict[str, tuple[str, ...]], dict[str, str], dict[str, int]]:
        fam = self.options.fam
        chains: dict[str, tuple[str, ...]] = {}
        sets: dict[str, str] = {}
        pick_refs: dict[str, int] = {}
        for p in ports.values():
            for chain in p.picks:
                pick_refs[chain] = pick_refs.get(chain, 0) + 1
                if chain not in chains:
                    chains[chain] = _pick_rules(fam, chain)
            for chain, rules in p.chains:
                chains[chain] = rules
            for set_name, body in p.sets:
                sets[set_name] = body
        return chains, sets, pick_refs

    def _plan_partial(self, state: ProxyState, changed: frozenset[ServiceName]) -> Plan:
        table = self.options.fam.table
        names = self._candidates(state, changed)
        olds: dict[ServicePortName, PortPlan] = {}
        fresh: dict[ServicePortName, PortPlan] = {}
        removed: set[ServicePortName] = set()
        members_of: dict[ServiceName, set[ServicePortName]] = {}
        for name in sorted(names, key=_order):
            old = self._render(self._state, name)
            if old is not None:
                olds[name] = old
            new = self._render(state, name)
            if new is not None:
                fresh[name] = new
            elif old is not None:
                removed.add(name)
        for name in names:
            svc = name.service
            if svc not in members_of:
                members_of[svc] = set(self._by_service.get(svc, ()))
            members = members_of[svc]
            if name in state.service_ports:
                members.add(name)
            else:
                members.discard(name)
        by_service: dict[ServiceName, tuple[ServicePortName, ...] | None] = {
            svc: tuple(sorted(m, key=_order)) if m else None for svc, m in members_of.items()}

        refs: dict[tuple[str, str], int] = {}
        owners: dict[tuple[str, str], ServicePortName | None] = {}
        conflicts = 0
        touched: set[tuple[str, str]] = set()
        # What the kernel holds for the map keys of re-rendered ports: their previous rendering's values.
        held_values: dict[tuple[str, str], str | None] = {}

        def owner_of(k: tuple[str, str]) -> ServicePortName | None:
            if k in owners:
                return owners[k]
            return self._owners.get(k[0], _EMPTY).get(hash(k[1]))

        for sign, plans in ((-1, olds), (1, fresh)):
            for name, p in plans.items():
                for set_name, key, value in p.elements:
                    k = (set_name, key)
                    if set_name in SHARED_SETS:
                        refs[k] = refs.get(k, self._refs.get(set_name, _EMPTY).get(hash(key), 0) or 0) + sign
                        touched.add(k)
                        continue
                    if sign < 0 and k not in held_values and \
                            self._owners.get(set_name, _EMPTY).get(hash(key)) == name:
                        held_values[k] = value
                    owner = owner_of(k)
                    if sign > 0:
                        if owner is None:
                            owners[k] = name
                            touched.add(k)
                        elif owner != name:
                            conflicts += 1
                    elif owner == name:
                        owners[k] = None
                        touched.add(k)

        desired: dict[tuple[str, str], str | object | None] = {}
        for name, p in fresh.items():
            for set_name, key, value in p.elements:
                k = (set_name, key)
                if k in touched and (set_name in SHARED_SETS or owner_of(k) == name):
                    desired[k] = value
        for k in touched:
            if k in desired:
                continue
            if k[0] in SHARED_SETS:
                if refs.get(k, 0) > 0:
                    desired[k] = None
                continue
            owner = owner_of(k)
            if owner is not None and owner not in fresh:
                # Kept by a port this plan does not re-render: its value is unchanged.
                desired[k] = _KEEP
        node_ips = self._wanted_node_ips()
        for ip in set(node_ips) | set(self._node_ips):
            k = (lay.NODEPORT_IPS, ip)
            touched.add(k)
            if ip in node_ips:
                desired[k] = None

        deletes: dict[str, list[str]] = {}
        adds: dict[str, list[str]] = {}
        added = deleted = 0
        for k in sorted(touched):
            set_name, key = k
            current: str | object | None = None
            if set_name == lay.NODEPORT_IPS:
                held = key in self._node_ips
            elif set_name in SHARED_SETS:
                held = (self._refs.get(set_name, _EMPTY).get(hash(key), 0) or 0) > 0
            else:
                held = hash(key) in self._owners.get(set_name, _EMPTY)
                current = held_values.get(k, _KEEP)  # not re-rendered (never here): rewrite it
            want = k in desired
            if want and (desired[k] is _KEEP or (held and current == desired[k])):
                continue
            if held:
                deletes.setdefault(set_name, []).append(key)
                deleted += 1
            if want:
                shown = desired[k]
                adds.setdefault(set_name, []).append(key if shown is None else f"{key} : {shown}")
                added += 1

        # Dynamic chains and sets: refcounted pick chains, per-port affinity chains.
        fam = self.options.fam
        pick_refs: dict[str, int] = {}
        chain_updates: dict[str, tuple[str, ...] | None] = {}
        set_updates: dict[str, str | None] = {}
        for old in olds.values():
            for chain in old.picks:
                pick_refs[chain] = pick_refs.get(chain, self._pick_refs.get(chain, 0)) - 1
            for chain, _ in old.chains:
                chain_updates[chain] = None
            for set_name, _ in old.sets:
                set_updates[set_name] = None
        for new in fresh.values():
            for chain in new.picks:
                pick_refs[chain] = pick_refs.get(chain, self._pick_refs.get(chain, 0)) + 1
            for chain, rules in new.chains:
                chain_updates[chain] = rules
            for set_name, body in new.sets:
                set_updates[set_name] = body
        for chain, count in pick_refs.items():
            if count > 0 and chain not in self._chains:
                chain_updates[chain] = _pick_rules(fam, chain)
            elif count <= 0:
                chain_updates[chain] = None

        out: list[str] = []
        for chain in self._doomed_chains:
            if chain_updates.get(chain) is None:
                # Emptied by an earlier transaction; "add" first makes this idempotent.
                out.append(f"add chain {table} {chain}")
                out.append(f"delete chain {table} {chain}")
        for set_name, new_body in set_updates.items():
            if new_body is not None and self._sets.get(set_name) != new_body:
                out.append(f"add set {table} {set_name} {{ {new_body} ; }}")
        for chain, new_rules in chain_updates.items():
            if new_rules is not None and (self._chains.get(chain) != new_rules
                                          or chain in self._doomed_chains):
                out.append(f"add chain {table} {chain}")
                out.append(f"flush chain {table} {chain}")
                out.extend(f"add rule {table} {chain} {r}" for r in new_rules)
        for set_name, keys in deletes.items():
            out.append(f"delete element {table} {set_name} {{ {', '.join(keys)} }}")
        for set_name, items in adds.items():
            out.append(f"add element {table} {set_name} {{ {', '.join(items)} }}")
        doomed_c = tuple(c for c, rules in chain_updates.items() if rules is None and c in self._chains)
        doomed_s = tuple(s for s, body in set_updates.items() if body is None and s in self._sets)
        for chain in doomed_c:
            # Emptied now (nothing may jump to it once its elements are gone), deleted next time.
            out.append(f"flush chain {table} {chain}")
        for set_name in doomed_s:
            # Only the endpoint chain flushed above referenced it.
            out.append(f"delete set {table} {set_name}")
        text = "\n".join(out) + ("\n" if out else "")
        return Plan(text=text, full=False, state=state, ports=fresh, removed=frozenset(removed),
                    by_service=by_service, owner_delta=owners, ref_delta=refs,
                    chains=chain_updates, sets=set_updates, pick_refs=pick_refs, doomed_chains=doomed_c,
                    node_ips=node_ips, added=added, deleted=deleted, conflicts=conflicts)

    @staticmethod
    def _index(indexes: dict[str, KeyIndex[Any]], set_name: str) -> KeyIndex[Any]:
        index = indexes.get(set_name)
        if index is None:
            index = indexes[set_name] = KeyIndex()
        return index

    def commit(self, plan: Plan) -> None:
        """Adopt ``plan``: the kernel now holds what it describes."""
        if plan.full:
            self._by_service = {k: v for k, v in plan.by_service.items() if v}
            self._owners = plan.owners
            self._refs = plan.refs
            self._chains = dict(plan.chains)  # type: ignore[arg-type]
            self._sets = dict(plan.sets)  # type: ignore[arg-type]
            self._pick_refs = dict(plan.pick_refs)
        else:
            for svc, members in plan.by_service.items():
                if members:
                    self._by_service[svc] = members
                else:
                    self._by_service.pop(svc, None)
            for (set_name, key), count in plan.ref_delta.items():
                if count > 0:
                    self._index(self._refs, set_name)[hash(key)] = count
                elif (counts := self._refs.get(set_name)) is not None:
                    counts.pop(hash(key), None)
            for (set_name, key), owner in plan.owner_delta.items():
                if owner is None:
                    if (owned := self._owners.get(set_name)) is not None:
                        owned.pop(hash(key), None)
                else:
                    self._index(self._owners, set_name)[hash(key)] = owner
            for chain, rules in plan.chains.items():
                if rules is None:
                    self._chains.pop(chain, None)
                else:
                    self._chains[chain] = rules
            for set_name, body in plan.sets.items():
                if body is None:
                    self._sets.pop(set_name, None)
                else:
                    self._sets[set_name] = body
            for chain, count in plan.pick_refs.items():
                if count > 0:
                    self._pick_refs[chain] = count
                else:
                    self._pick_refs.pop(chain, None)
        self._state = plan.state
        self._doomed_chains = plan.doomed_chains
        self._node_ips = plan.node_ips
        self._valid = True
