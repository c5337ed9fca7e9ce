"""Pure planner of nftables mode: ProxyState -> the elements and chains of the ``proxyd`` table, and the diff.

``render_port`` is one iteration of kube-proxy's per-service-port loop
(pkg/proxy/nftables/proxier.go syncProxyRules) on the compact layout of
``layout``: it returns the map and set elements the port contributes, the
pick chains (``<pick>-N``) it uses and, only for ClientIP affinity, its own
chains and dynamic sets. Endpoint selection is ``proxyd.policy.categorize``'s;
nothing here re-derives it.

``Planner`` mirrors in memory what the kernel holds (committed elements,
chains, sets) and what every port contributed, so a sync sends only
differences: ``plan(state, changed)`` re-renders the changed services'
ports and emits one transaction of element deletes and adds, chains
created (or flushed and refilled when their rules changed) and nothing
else; it never needs to read the kernel. A full plan rewrites everything in
one transaction (add+flush of every chain and map, all elements), which is
atomic, so adopting what a previous run left costs no traffic gap. Chains
and sets that fell out of use are deleted by the *next* plan (kernels
before 6.2 refuse deleting a chain in the transaction that drops the last
map element naming it, as kube-proxy notes). Like the iptables planner, a
plan is computed without touching the planner; ``commit(plan)`` adopts it
once the kernel accepted it.

Two service ports claiming the same key (same address, protocol and port)
cannot both be served: the first in ServicePortName order keeps it, the
other's element is left out and counted in ``Plan.conflicts``.

Text safety: the only text reaching nft is addresses (checked with
``inet_pton``/``ipaddress``), integers, protocol keywords and hashed names.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from proxyd.model import Endpoint, Protocol, ProxyState, ServiceName, ServicePort, ServicePortName
from proxyd.modes.iptables import chains as iptchains
from proxyd.modes.iptables.planner import PortRender
from proxyd.modes.nftables import layout as lay
from proxyd.policy import categorize

_PROTO = {Protocol.TCP: "tcp", Protocol.UDP: "udp", Protocol.SCTP: "sctp"}
REJECT = f"goto {lay.REJECT_CHAIN}"

# Sets whose elements several ports may share (refcounted, no value).
SHARED_SETS = frozenset({lay.CLUSTER_IPS, lay.HAIRPIN})

Element = tuple[str, str, str | None]  # (set or map, key, value or None)
_EMPTY: Mapping = {}
_GONE = "\0gone"  # marks an element a partial plan deletes (never valid nft text)


@dataclass(frozen=True, slots=True)
class PlannerOptions:
    """The node-wide settings a plan depends on (see iptables' PlannerOptions for the meaning)."""

    family: int = 4
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    nodeport_addresses: tuple[str, ...] = ()
    node_ips: tuple[str, ...] = ()
    node_ip: str | None = None

    def __post_init__(self) -> None:
        lay.Family(self.family)
        if not 0 <= self.masquerade_bit <= 31:
            raise ValueError(f"masquerade_bit must be in 0..31, got {self.masquerade_bit!r}")

    @property
    def fam(self) -> lay.Family:
        return lay.Family(self.family)

    @property
    def local_cidr(self) -> str | None:
        for cidr in self.cluster_cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            if net.version == self.family:
                return str(net)
        return None

    @property
    def layout(self) -> lay.LayoutOptions:
        return lay.LayoutOptions(family=self.fam, cluster_cidr=self.local_cidr,
                                 masquerade_all=self.masquerade_all, mark=f"{1 << self.masquerade_bit:#x}",
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
    """One nft transaction and what to adopt once the kernel accepted it."""

    text: str
    full: bool
    ports: dict[ServicePortName, PortPlan]
    rerendered: frozenset[ServicePortName]
    removed: dict[ServicePortName, PortPlan]
    # Full plans: the whole mirror. Partial plans: only what changed (None / _GONE: removed).
    kernel: dict[tuple[str, str], str | None]
    refs: dict[tuple[str, str], int]
    owners: dict[tuple[str, str], ServicePortName | None]
    chains: dict[str, tuple[str, ...] | None]   # dynamic chains
    sets: dict[str, str | None]                 # dynamic (affinity) sets
    doomed_chains: tuple[str, ...]       # unused now: delete in the next plan
    doomed_sets: tuple[str, ...]
    node_ips: tuple[str, ...]
    pick_refs: dict[str, int] = field(default_factory=dict)
    added: int = 0
    deleted: int = 0
    conflicts: int = 0

    @property
    def renders(self) -> dict[ServicePortName, PortRender]:
        return {name: p.render for name, p in self.ports.items()}

    @property
    def empty(self) -> bool:
        return not self.text.strip()


def _safe_ip(ip: str) -> str:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except (OSError, TypeError) as err:
        raise ValueError(f"not an IP address: {ip!r}") from err
    return ip


def _family_of(ip: str) -> int:
    return 6 if ":" in ip else 4


def _addresses(values: Iterable[str], family: int) -> list[str]:
    out = []
    for v in values:
        a = ipaddress.ip_address(v)
        if a.version == family:
            out.append(str(a))
    return out


def _networks(values: Iterable[str], family: int) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for v in values:
        n = ipaddress.ip_network(v, strict=False)
        if n.version == family:
            out.append(n)
    return out


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

    hairpins = {ep.ip for ep in cat.all_reachable if ep.node_name is None or ep.node_name == node_name}
    for ip in sorted(hairpins):
        # Only pods on this node send their traffic through this node's rules.
        elements.append((lay.HAIRPIN, f"{_safe_ip(ip)} . {ip}", None))

    return PortPlan(elements=tuple(_dedup(elements)), picks=tuple(picks), chains=tuple(own_chains),
                    sets=tuple(own_sets),
                    render=PortRender(reachable=cat.all_reachable, has_endpoints=has_endpoints,
                                      n_endpoints=len(endpoints)))


def _dedup(elements: list[Element]) -> list[Element]:
    seen: set[tuple[str, str]] = set()
    out = []
    for e in elements:
        k = (e[0], e[1])
        if k not in seen:
            seen.add(k)
            out.append(e)
    return out


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


def _pick_rules(fam: lay.Family, chain: str) -> tuple[str, ...]:
    parsed = lay.parse_pick_chain(chain)
    assert parsed is not None, chain
    return tuple(lay.pick_rules(fam, *parsed))


def _affinity_body(fam: lay.Family, timeout: int) -> str:
    return f"type {fam.addr_type} ; flags dynamic,timeout ; timeout {timeout}s"


def _join(ep: Endpoint) -> str:
    ip = _safe_ip(ep.ip)
    return f"[{ip}]:{ep.port}" if ":" in ip else f"{ip}:{ep.port}"


class Planner:
    """Plans transactions from ProxyStates, mirroring the kernel's elements for partial syncs."""

    def __init__(self, options: PlannerOptions) -> None:
        self.options = options
        self._ports: dict[ServicePortName, PortPlan] = {}
        self._by_service: dict[ServiceName, set[ServicePortName]] = {}
        self._kernel: dict[tuple[str, str], str | None] = {}
        self._refs: dict[tuple[str, str], int] = {}
        self._owners: dict[tuple[str, str], ServicePortName] = {}
        self._chains: dict[str, tuple[str, ...]] = {}
        self._pick_refs: dict[str, int] = {}
        self._sets: dict[str, str] = {}
        self._doomed_chains: tuple[str, ...] = ()
        self._doomed_sets: tuple[str, ...] = ()
        self._node_ips: tuple[str, ...] = ()
        self._valid = False

    @property
    def needs_full(self) -> bool:
        return not self._valid

    @property
    def ports(self) -> Mapping[ServicePortName, PortPlan]:
        return self._ports

    @property
    def kernel(self) -> Mapping[tuple[str, str], str | None]:
        """The elements the kernel holds, as far as the planner knows."""
        return self._kernel

    @property
    def dynamic_chains(self) -> Mapping[str, tuple[str, ...]]:
        return self._chains

    def invalidate(self) -> None:
        self._valid = False

    def set_node_ips(self, node_ips: Iterable[str]) -> None:
        ips = tuple(node_ips)
        if ips != self.options.node_ips:
            fields = {f: getattr(self.options, f) for f in PlannerOptions.__dataclass_fields__}
            fields["node_ips"] = ips
            self.options = PlannerOptions(**fields)

    def _wanted_node_ips(self) -> tuple[str, ...]:
        if not self.options.nodeport_addresses:
            return ()
        out = []
        for ip in self.options.node_ips:
            a = ipaddress.ip_address(ip)
            if a.version == self.options.family and not a.is_loopback:
                out.append(str(a))
        return tuple(sorted(set(out)))

    # -- planning ---------------------------------------------------------

    def plan(self, state: ProxyState, changed: frozenset[ServiceName] | None, *,
             stale_chains: Iterable[str] = (), stale_sets: Iterable[str] = ()) -> Plan:
        """The transaction from the committed state to ``state``.

        ``changed`` None (or nothing committed yet) gives a full plan;
        ``stale_chains``/``stale_sets`` are dynamic chains and sets found in
        the kernel (after a restart): a full plan empties them now and the
        next plan deletes them.
        """
        fam = self.options.family
        names: Iterable[ServicePortName]
        if changed is None or not self._valid:
            full = True
            names = sorted(n for n, sp in state.services.items() if _family_of(sp.cluster_ip) == fam)
        else:
            full = False
            wanted: set[ServicePortName] = set()
            for svc in changed:
                wanted.update(self._by_service.get(svc, ()))
            wanted.update(n for n, sp in state.services.items()
                          if n.service in changed and _family_of(sp.cluster_ip) == fam)
            names = sorted(wanted)

        ports = self._ports
        removed: dict[ServicePortName, PortPlan] = {}
        zone = state.node_zone
        fresh: dict[ServicePortName, PortPlan] = {}
        for name in names:
            sp = state.services.get(name)
            if sp is None or _family_of(sp.cluster_ip) != fam:
                old = None if full else ports.get(name)
                if old is not None:
                    removed[name] = old
                continue
            fresh[name] = render_port(sp, state.endpoints.get(name, ()), options=self.options,
                                      node_name=state.node_name, node_zone=zone)
        if full:
            return self._plan_full(fresh, stale_chains, stale_sets)
        return self._plan_partial(ports, fresh, removed)

    @staticmethod
    def _aggregate(refs: dict, owners: dict, name: ServicePortName, plan: PortPlan, sign: int,
                   conflicts: list[int], base_refs: Mapping = _EMPTY, base_owners: Mapping = _EMPTY,
                   ) -> set[tuple[str, str]]:
        """Add (sign 1) or remove (-1) a port's elements from the desired aggregate; the keys touched.

        ``refs``/``owners`` are written; reads fall back to ``base_*`` (the
        committed aggregate) so a partial plan never copies it. An owner of
        None in ``owners`` means "no owner any more".
        """
        touched = set()
        for set_name, key, _ in plan.elements:
            k = (set_name, key)
            if set_name in SHARED_SETS:
                refs[k] = refs.get(k, base_refs.get(k, 0)) + sign
                touched.add(k)
                continue
            owner = owners[k] if k in owners else base_owners.get(k)
            if sign > 0:
                if owner is None:
                    owners[k] = name
                    touched.add(k)
                elif owner != name:
                    conflicts[0] += 1
            elif owner == name:
                owners[k] = None
                touched.add(k)
        return touched

    def _plan_full(self, fresh: dict[ServicePortName, PortPlan], stale_chains: Iterable[str],
                   stale_sets: Iterable[str]) -> Plan:
        opts = self.options
        fam = opts.fam
        table = fam.table
        refs: dict[tuple[str, str], int] = {}
        owners: dict[tuple[str, str], ServicePortName] = {}
        kernel: dict[tuple[str, str], str | None] = {}
        conflicts = [0]
        for name, p in fresh.items():
            self._aggregate(refs, owners, name, p, 1, conflicts)
        by_set: dict[str, list[str]] = {}
        values = {}
        for name, p in fresh.items():
            for set_name, key, value in p.elements:
                k = (set_name, key)
                if set_name in SHARED_SETS or owners.get(k) == name:
                    values[k] = value
        for (set_name, key), value in values.items():
            kernel[(set_name, key)] = value
            by_set.setdefault(set_name, []).append(key if value is None else f"{key} : {value}")
        node_ips = self._wanted_node_ips()
        for ip in node_ips:
            kernel[(lay.NODEPORT_IPS, ip)] = None
            by_set.setdefault(lay.NODEPORT_IPS, []).append(ip)
        by_set[lay.CANARY] = [fam.canary_element]

        chains, sets, pick_refs = self._dynamic(fresh)
        out = [f"add table {table}"]
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
        known = set(stale_chains) | set(self._chains) | set(self._doomed_chains)
        stale_c = sorted(c for c in known if lay.is_dynamic_chain(c) and c not in chains)
        for chain in stale_c:
            out.append(f"add chain {table} {chain}")
        # Flush every chain before any map is flushed: rules may reference maps.
        for chain in (*fixed, *chains, *stale_c):
            out.append(f"flush chain {table} {chain}")
        for set_name, body in sets.items():
            out.append(f"add set {table} {set_name} {{ {body} ; }}")
        for set_name, body in lay.maps(fam):
            kind = "map" if ":" in body else "set"
            out.append(f"add {kind} {table} {set_name} {{ {body} ; }}")
            out.append(f"flush {kind} {table} {set_name}")
        stale_s = sorted(s for s in set(stale_sets) | set(self._sets) if s not in sets)
        # Nothing references them once the chains above are flushed; "add" first makes the delete
        # succeed whether or not the set still exists.
        for set_name in stale_s:
            out.append(f"add set {table} {set_name} {{ {_affinity_body(fam, 1)} ; }}")
            out.append(f"delete set {table} {set_name}")
        for chain, rules in (*fixed.items(), *chains.items()):
            out.extend(f"add rule {table} {chain} {r}" for r in rules)
        for set_name, items in by_set.items():
            for i in range(0, len(items), 4096):
                out.append(f"add element {table} {set_name} {{ {', '.join(items[i:i + 4096])} }}")
        text = "\n".join(out) + "\n"
        return Plan(text=text, full=True, ports=fresh, rerendered=frozenset(fresh), removed={},
                    kernel=kernel, refs=refs, owners=owners, chains=chains, sets=sets,
                    doomed_chains=tuple(stale_c), doomed_sets=(), node_ips=node_ips,
                    pick_refs=pick_refs, added=len(kernel), conflicts=conflicts[0])

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

    def _plan_partial(self, ports: Mapping[ServicePortName, PortPlan], fresh: dict[ServicePortName, PortPlan],
                      removed: dict[ServicePortName, PortPlan]) -> Plan:
        table = self.options.fam.table
        refs: dict[tuple[str, str], int] = {}
        owners: dict[tuple[str, str], ServicePortName | None] = {}
        conflicts = [0]
        touched: set[tuple[str, str]] = set()
        olds = {name: ports[name] for name in fresh if name in ports}
        olds.update(removed)
        for name, old in olds.items():
            touched |= self._aggregate(refs, owners, name, old, -1, conflicts, self._refs, self._owners)
        for name, new in fresh.items():
            touched |= self._aggregate(refs, owners, name, new, 1, conflicts, self._refs, self._owners)

        def owner_of(k: tuple[str, str]) -> ServicePortName | None:
            return owners[k] if k in owners else self._owners.get(k)

        desired: dict[tuple[str, str], str | None] = {}
        for name, new in fresh.items():
            for set_name, key, value in new.elements:
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
            if owner is not None and owner not in fresh and owner in ports:
                for set_name, key, value in ports[owner].elements:
                    if (set_name, key) == k:
                        desired[k] = value
        node_ips = self._wanted_node_ips()
        for ip in set(node_ips) | set(self._node_ips):
            k = (lay.NODEPORT_IPS, ip)
            touched.add(k)
            if ip in node_ips:
                desired[k] = None

        kernel = self._kernel
        deletes: dict[str, list[str]] = {}
        adds: dict[str, list[str]] = {}
        changes: dict[tuple[str, str], str | None] = {}
        gone: list[tuple[str, str]] = []
        for k in sorted(touched):
            have = k in kernel
            want = k in desired
            if have and want and kernel[k] == desired[k]:
                continue
            if have:
                deletes.setdefault(k[0], []).append(k[1])
                gone.append(k)
            if want:
                value = desired[k]
                adds.setdefault(k[0], []).append(k[1] if value is None else f"{k[1]} : {value}")
                changes[k] = value

        # Dynamic chains and sets: refcounted pick chains, per-port affinity chains.
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
        fam = self.options.fam
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
        for set_name, body in set_updates.items():
            if body is not None and self._sets.get(set_name) != body:
                out.append(f"add set {table} {set_name} {{ {body} ; }}")
        for chain, rules in chain_updates.items():
            if rules is not None and (self._chains.get(chain) != rules or chain in self._doomed_chains):
                out.append(f"add chain {table} {chain}")
                out.append(f"flush chain {table} {chain}")
                out.extend(f"add rule {table} {chain} {r}" for r in rules)
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
        return Plan(text=text, full=False, ports=dict(fresh), rerendered=frozenset(fresh), removed=removed,
                    kernel={**changes, **{k: _GONE for k in gone if k not in changes}}, refs=refs,
                    owners=owners, chains=chain_updates, sets=set_updates, doomed_chains=doomed_c,
                    doomed_sets=(), node_ips=node_ips, pick_refs=pick_refs,
                    added=len(changes), deleted=len(gone), conflicts=conflicts[0])

    def commit(self, plan: Plan) -> None:
        """Adopt ``plan``: the kernel now holds what it describes."""
        if plan.full:
            self._ports = plan.ports
            self._by_service = {}
            for name in plan.ports:
                self._by_service.setdefault(name.service, set()).add(name)
            self._kernel = plan.kernel
            self._refs = plan.refs
            self._owners = {k: v for k, v in plan.owners.items() if v is not None}
            self._chains = dict(plan.chains)  # type: ignore[arg-type]
            self._sets = dict(plan.sets)  # type: ignore[arg-type]
            self._pick_refs = plan.pick_refs
        else:
            for name in plan.removed:
                self._ports.pop(name, None)
                names = self._by_service.get(name.service)
                if names is not None:
                    names.discard(name)
                    if not names:
                        del self._by_service[name.service]
            for name, p in plan.ports.items():
                self._ports[name] = p
                self._by_service.setdefault(name.service, set()).add(name)
            for k, v in plan.kernel.items():
                if v is _GONE:
                    self._kernel.pop(k, None)
                else:
                    self._kernel[k] = v
            for k, count in plan.refs.items():
                if count > 0:
                    self._refs[k] = count
                else:
                    self._refs.pop(k, None)
            for k, owner in plan.owners.items():
                if owner is None:
                    self._owners.pop(k, None)
                else:
                    self._owners[k] = owner
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
        self._doomed_chains = plan.doomed_chains
        self._doomed_sets = plan.doomed_sets
        self._node_ips = plan.node_ips
        self._valid = True
