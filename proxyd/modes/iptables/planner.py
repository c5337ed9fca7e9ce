"""Pure planner of iptables mode: ProxyState -> iptables-restore input for the filter and nat tables.

A port of kube-proxy's ``syncProxyRules`` (pkg/proxy/iptables/proxier.go):
the same chains (KUBE-SERVICES, KUBE-SVC-*, KUBE-SVL-*, KUBE-EXT-*, KUBE-FW-*,
KUBE-SEP-*, KUBE-NODEPORTS, KUBE-EXTERNAL-SERVICES, KUBE-POSTROUTING,
KUBE-MARK-MASQ, KUBE-PROXY-FIREWALL, KUBE-FORWARD) with the same rule text,
so that operators' tools, dashboards and habits carry over and a node can
switch between kube-proxy and proxyd without a flush. Endpoint selection is
``proxyd.policy.categorize``'s; nothing here re-implements it.

Only addresses of the planner's family (4 or 6) are used: a service port
whose ClusterIP is of the other family is skipped, and external IPs, LB IPs,
source ranges and endpoints of the other family are dropped.

Determinism: services are rendered in sorted ServicePortName order and every
output line is a pure function of the state, so equal states give equal
text (golden tests rely on it).

Partial syncs (cost proportional to the change): every service port's
rendering is cached. A full plan declares (and so flushes) every chain proxyd
owns and rewrites it, and deletes service chains that exist but are not
wanted. A partial plan re-renders only the ports of changed services; it
declares and rewrites their own chains, deletes their chains that went away,
and patches KUBE-SERVICES / KUBE-NODEPORTS in the nat table with ``-D`` of
the lines that disappeared and ``-I ... 1`` of the new ones instead of
rewriting them (rules of different service ports in those chains match
disjoint destinations, so their order does not matter; the NodePort tail
rule stays last because new lines are inserted at the top). This is where
proxyd goes beyond kube-proxy's MinimizeIPTablesRestore, which rewrites both
chains on every sync: at 10,000 services that rewrite alone costs more than
the whole change. If the kernel does not hold what the cache says, a ``-D``
fails, iptables-restore rejects the whole transaction (nothing changes) and
the caller falls back to a full sync. The filter table is small and always
rewritten, as kube-proxy does.

A plan is computed without touching the planner; ``commit(plan)`` adopts
its cache only once the kernel accepted it, so a failed apply never leaves
the cache describing rules the kernel does not hold.

Text safety: the only text derived from object names is the
``ns/name:port`` in ``-m comment --comment`` (names are validated DNS labels
already; ``_comment`` still replaces anything outside a safe alphabet, so a
quote or newline can never reach iptables-restore). Addresses and CIDRs are
re-parsed with ``ipaddress`` before use.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from proxyd.model import Endpoint, ProxyState, ServiceName, ServicePort, ServicePortName, family
from proxyd.modes.iptables import chains as ch
from proxyd.netfilter.planning import MirrorPlanner, NodeOptions
from proxyd.netfilter.render import PROTO as _PROTO
from proxyd.netfilter.render import addresses as _addresses
from proxyd.netfilter.render import networks as _networks
from proxyd.netfilter.render import safe_ip as _safe_ip
from proxyd.policy import categorize, uses_cluster_endpoints, uses_local_endpoints

# kube-proxy: above this many endpoints in total, comments are left out of
# the per-endpoint rules (40% less restore input).
LARGE_CLUSTER_ENDPOINTS = 1000

NODEPORTS_COMMENT = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'

# Service port names are DNS labels, "/" and ":"; nothing else may reach the
# restore input (some comments are unquoted, as kube-proxy writes them).
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-./:_")


def compute_probability(n: int) -> str:
    """kube-proxy's computeProbability: 1/n formatted with %0.10f."""
    return f"{1.0 / n:0.10f}"


def _comment(text: str) -> str:
    """``text`` made safe for a quoted iptables-restore argument (max 256 bytes in xt_comment)."""
    return "".join(c if c in _SAFE else "_" for c in text)[:240]


@dataclass(frozen=True, slots=True)
class PlannerOptions(NodeOptions):
    """The node-wide settings a plan depends on (``NodeOptions``'s, and iptables mode's own)."""

    random_fully: bool = True
    conntrack_liberal: bool = False
    # Split full plans into transactions of about this many service-chain
    # rules (0: one transaction). iptables-nft-restore --noflush is quadratic
    # in the size of one input (docs/iptables.md); legacy is not, and pays a
    # whole-table copy per transaction, so only the nft back end sets this.
    chunk_rules: int = 0
    large_cluster_endpoints: int = LARGE_CLUSTER_ENDPOINTS


@dataclass(frozen=True, slots=True)
class PortRender:
    """Everything one service port contributes to the ruleset.

    A fresh rendering holds its own chains' rules as one text
    (``rules_text``, one line per rule; ``chain_rules`` splits it): tens of
    thousands of small strings that outlive the port's rendering would keep
    the allocator's pages of a whole full plan in use. The planner's cache
    keeps the ``committed()`` form, without them: a partial plan writes
    only re-rendered ports' rules, and those rules are nine tenths of a
    rendering (50 MB at 10,000 services × 10 endpoints). ``chain_counts``
    (rules per own chain) and ``rules_digest`` stay, for the
    kernel-versus-plan check and to tell an unchanged port.
    """

    filter_services: tuple[str, ...] = ()
    filter_external: tuple[str, ...] = ()
    filter_firewall: tuple[str, ...] = ()
    filter_nodeports: tuple[str, ...] = ()
    nat_services: tuple[str, ...] = ()
    nat_nodeports: tuple[str, ...] = ()
    chain_names: str = ""  # own nat chains, declaration order, space-separated (``chains``)
    rules_text: str = ""  # "-A <own chain> ..." lines joined by newlines ("" once committed)
    # For conntrack cleanup: every endpoint this node may DNAT to, and
    # whether the port currently has usable endpoints at all.
    reachable: tuple[Endpoint, ...] = ()
    has_endpoints: bool = False
    n_endpoints: int = 0  # as given (before family filtering): for large-cluster mode
    chain_counts: tuple[int, ...] = ()  # rules of each of ``chains``, in that order
    rules_digest: bytes = b""  # of ``rules_text``: equal renderings have equal digests

    @property
    def busy_filter(self) -> bool:
        return bool(self.filter_services or self.filter_external or self.filter_firewall
                    or self.filter_nodeports)

    @property
    def chains(self) -> tuple[str, ...]:
        """Own nat chains in declaration order (kept as one string: 11 names a port at 10 endpoints)."""
        return tuple(self.chain_names.split(" ")) if self.chain_names else ()

    @property
    def chain_rules(self) -> tuple[str, ...]:
        """The "-A <own chain> ..." lines of a fresh rendering (none once committed)."""
        return tuple(self.rules_text.split("\n")) if self.rules_text else ()

    @property
    def n_chain_rules(self) -> int:
        return sum(self.chain_counts)

    @property
    def nat_total(self) -> int:
        return len(self.nat_services) + len(self.nat_nodeports) + self.n_chain_rules

    def committed(self) -> PortRender:
        """This rendering as the cache keeps it: everything but the text of its own chains' rules."""
        if not self.rules_text:
            return self
        return PortRender(self.filter_services, self.filter_external, self.filter_firewall,
                          self.filter_nodeports, self.nat_services, self.nat_nodeports, self.chain_names, "",
                          self.reachable, self.has_endpoints, self.n_endpoints, self.chain_counts,
                          self.rules_digest)


@dataclass(slots=True)
class Plan:
    """One iptables-restore transaction and the cache to adopt once it is applied."""

    full: bool
    cache: dict[ServicePortName, PortRender]
    chains: set[str]  # full plans: every service chain; partial: the chains added
    large: bool
    tail: tuple[str, ...]
    rerendered: frozenset[ServicePortName] = frozenset()
    removed: dict[ServicePortName, PortRender] = field(default_factory=dict)
    deleted_chains: tuple[str, ...] = ()
    filter_rules: int = 0
    nat_rules: int = 0  # nat rules the kernel holds once applied
    endpoints: int = 0  # endpoints of the planned ports (large-cluster mode)
    busy: frozenset[ServicePortName] = frozenset()  # ports with filter rules
    # The transactions to apply in order; one unless chunking.
    # Each keeps every service self-consistent: a service's chains are
    # flushed and refilled in one transaction, KUBE-SERVICES and the deletes
    # of stale chains come last.
    chunks: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The whole restore input (the chunks one after the other); joined on demand, never kept twice."""
        return self.chunks[0] if len(self.chunks) == 1 else "".join(self.chunks)


class Planner(MirrorPlanner[PlannerOptions]):
    """Renders ProxyStates into restore input, caching per service port for partial syncs."""

    def __init__(self, options: PlannerOptions) -> None:
        super().__init__(options)
        self._cache: dict[ServicePortName, PortRender] = {}
        self._by_service: dict[ServiceName, set[ServicePortName]] = {}
        self._endpoints = 0
        self._nat_total = 0
        self._busy: frozenset[ServicePortName] = frozenset()
        self._large: bool | None = None
        self._tail: tuple[str, ...] = ()

    @property
    def cache(self) -> Mapping[ServicePortName, PortRender]:
        return self._cache

    # -- planning ---------------------------------------------------------

    def plan(self, state: ProxyState, changed: frozenset[ServiceName] | None, *,
             existing_chains: Iterable[str] = (),
             changed_ports: frozenset[ServicePortName] | None = None) -> Plan:
        """The restore input taking the kernel from the committed state to ``state``.

        ``changed`` None (or no committed full plan yet) gives a full plan;
        ``changed_ports``, the tracker's index of the change by port, spares
        the partial plan any look-up over every port;
        ``existing_chains`` are nat chains found in the kernel (iptables-save),
        so a full plan also deletes service chains a previous run left.
        """
        opts = self.options
        tail = self._tail_rules()
        if changed is not None and self._valid and tail == self._tail:
            plan = self._plan_partial(state, changed, tail, changed_ports)
            if plan is not None:
                return plan
        ports = {name: sp for name, sp in state.service_ports.items() if family(sp.cluster_ip) == opts.family}
        total = sum(len(state.endpoints.get(name, ())) for name in ports)
        large = total > opts.large_cluster_endpoints
        return self._plan_full(state, ports, large, tail, existing_chains, total)

    def commit(self, plan: Plan) -> None:
        """Adopt ``plan``'s cache: the kernel now holds what it describes."""
        if plan.full:
            self._by_service = {}
            for name in plan.cache:
                self._by_service.setdefault(name.service, set()).add(name)
        else:
            for name in plan.removed:
                names = self._by_service.get(name.service)
                if names is not None:
                    names.discard(name)
                    if not names:
                        del self._by_service[name.service]
            for name in plan.rerendered:
                self._by_service.setdefault(name.service, set()).add(name)
        self._cache = plan.cache
        self._endpoints = plan.endpoints
        self._nat_total = plan.nat_rules
        self._busy = plan.busy
        self._large = plan.large
        self._tail = plan.tail
        self._valid = True

    def _render_all(self, state: ProxyState, ports: Mapping[ServicePortName, ServicePort],
                    names: Iterable[ServicePortName], large: bool) -> dict[ServicePortName, PortRender]:
        zone = state.node_zone
        return {name: render_port(ports[name], state.endpoints.get(name, ()), options=self.options,
                                  node_name=state.node_name, node_zone=zone, large=large)
                for name in names}

    def _plan_full(self, state: ProxyState, ports: Mapping[ServicePortName, ServicePort], large: bool,
                   tail: tuple[str, ...], existing_chains: Iterable[str], total: int) -> Plan:
        order = sorted(ports)
        cache = self._render_all(state, ports, order, large)
        wanted: set[str] = set()
        for r in cache.values():
            wanted.update(r.chains)
        # The service chains the kernel holds as far as we know: those of the committed renderings
        # (not kept as a set of their own: 110,000 names at 10,000 services).
        held = {c for r in self._cache.values() for c in r.chains}
        stale = sorted(c for c in held.union(existing_chains) if ch.is_service_chain(c) and c not in wanted)
        del held
        busy = frozenset(n for n in order if cache[n].busy_filter)
        # The committed forms before the text: what lives on is allocated before what dies.
        committed = _committed(cache)
        if self.options.chunk_rules > 0:
            return self._plan_full_chunked(cache, committed, order, wanted, stale, large, tail, total, busy)
        filt = self._filter_section(cache, busy)
        nat: list[str] = ["*nat"]
        nat.extend(f":{c} - [0:0]" for c in ch.NAT_TOP_CHAINS)
        for name in order:
            nat.extend(f":{c} - [0:0]" for c in cache[name].chains)
        nat.extend(f":{c} - [0:0]" for c in stale)
        nat.extend(self._fixed_nat_rules())
        for name in order:
            nat.extend(cache[name].nat_services)
        nat.extend(tail)
        for name in order:
            nat.extend(cache[name].nat_nodeports)
        nat.extend(r for r in (cache[name].rules_text for name in order) if r)
        nat.extend(f"-X {c}" for c in stale)
        nat.append("COMMIT")
        nat_rules = 4 + len(tail) + sum(r.nat_total for r in cache.values())
        text = "\n".join(filt + nat) + "\n"
        del nat, cache
        return Plan(full=True, cache=committed, chains=wanted,
                    large=large, tail=tail, rerendered=frozenset(order), deleted_chains=tuple(stale),
                    filter_rules=sum(1 for line in filt if line.startswith("-A ")), nat_rules=nat_rules,
                    endpoints=total, busy=busy, chunks=[text])

    def _plan_full_chunked(self, cache: dict[ServicePortName, PortRender],
                           committed: dict[ServicePortName, PortRender], order: list[ServicePortName],
                           wanted: set[str], stale: list[str], large: bool, tail: tuple[str, ...], total: int,
                           busy: frozenset[ServicePortName]) -> Plan:
        limit = self.options.chunk_rules
        fixed = self._fixed_nat_rules()
        chunks: list[str] = []
        decl: list[str] = [f":{ch.KUBE_MARK_MASQ} - [0:0]"]  # service rules jump to it: make sure it exists
        rules: list[str] = [line for line in fixed if line.startswith(f"-A {ch.KUBE_MARK_MASQ} ")]
        count = len(rules)
        for name in order:
            r = cache[name]
            decl.extend(f":{c} - [0:0]" for c in r.chains)
            if r.rules_text:
                rules.append(r.rules_text)
                count += r.n_chain_rules
            if count >= limit:
                chunks.append("\n".join(["*nat", *decl, *rules, "COMMIT", ""]))
                decl, rules, count = [], [], 0
        if rules or decl:
            chunks.append("\n".join(["*nat", *decl, *rules, "COMMIT", ""]))
        filt = self._filter_section(cache, busy)
        nat: list[str] = ["*nat"]
        nat.extend(f":{c} - [0:0]" for c in ch.NAT_TOP_CHAINS)
        nat.extend(f":{c} - [0:0]" for c in stale)
        nat.extend(fixed)
        for name in order:
            nat.extend(cache[name].nat_services)
        nat.extend(tail)
        for name in order:
            nat.extend(cache[name].nat_nodeports)
        nat.extend(f"-X {c}" for c in stale)
        nat.append("COMMIT")
        chunks.append("\n".join(filt + nat) + "\n")
        nat_rules = 4 + len(tail) + sum(r.nat_total for r in cache.values())
        return Plan(full=True, cache=committed, chains=wanted, large=large,
                    tail=tail, rerendered=frozenset(order), deleted_chains=tuple(stale),
                    filter_rules=sum(1 for line in filt if line.startswith("-A ")), nat_rules=nat_rules,
                    endpoints=total, busy=busy, chunks=chunks)

    def _plan_partial(self, state: ProxyState, changed: frozenset[ServiceName],
                      tail: tuple[str, ...],
                      changed_ports: frozenset[ServicePortName] | None = None) -> Plan | None:
        """A partial plan, or None when only a full one will do (large-cluster mode flips).

        Work is proportional to the ports of ``changed`` services (plus set
        differences of the port names, done in C): nothing iterates over
        every service.
        """
        old = self._cache
        fam = self.options.family
        candidates: set[ServicePortName] = set()
        if changed_ports is not None:
            # The tracker's index names every port that appeared, vanished or differs.
            candidates.update(changed_ports)
        else:
            for svc in changed:
                candidates.update(self._by_service.get(svc, ()))
            # Ports the tracker did not name but that appeared or vanished anyway.
            candidates.update(state.service_ports.keys() - old.keys())
            candidates.update(old.keys() - state.service_ports.keys())
        touched: list[ServicePortName] = []
        removed: dict[ServicePortName, PortRender] = {}
        for name in candidates:
            sp = state.service_ports.get(name)
            if sp is not None and family(sp.cluster_ip) == fam:
                touched.append(name)
            elif name in old:
                removed[name] = old[name]
        total = self._endpoints
        total -= sum(old[n].n_endpoints for n in touched if n in old)
        total -= sum(r.n_endpoints for r in removed.values())
        total += sum(len(state.endpoints.get(n, ())) for n in touched)
        large = total > self.options.large_cluster_endpoints
        if large != self._large:
            return None
        fresh = self._render_all(state, state.service_ports, touched, large)
        cache = dict(old)
        for name in removed:
            del cache[name]
        cache.update(_committed(fresh))

        added: set[str] = set()
        declare: list[str] = []
        delete_lines: list[str] = []
        insert_lines: list[str] = []
        dead: set[str] = set()
        nat_total = self._nat_total
        for name in sorted(touched):
            new = fresh[name]
            prev = old.get(name)
            if prev == cache[name]:
                # A changed service can have unchanged ports: leave them be.
                del fresh[name]
                continue
            new_chains = new.chains
            declare.extend(new_chains)
            added.update(new_chains)
            nat_total += new.nat_total
            if prev is not None:
                nat_total -= prev.nat_total
                dead.update(c for c in prev.chains if c not in new_chains)
                _delta(prev.nat_services + prev.nat_nodeports, new.nat_services + new.nat_nodeports,
                       delete_lines, insert_lines)
            else:
                _delta((), new.nat_services + new.nat_nodeports, delete_lines, insert_lines)
        for name in sorted(removed):
            prev = removed[name]
            dead.update(prev.chains)
            nat_total -= prev.nat_total
            _delta(prev.nat_services + prev.nat_nodeports, (), delete_lines, insert_lines)
        # Chain names hash the port name, so a chain dead for one port is
        # never wanted by another.
        stale = sorted(dead)
        busy = set(self._busy)
        busy.difference_update(removed)
        for name in touched:
            if cache[name].busy_filter:
                busy.add(name)
            else:
                busy.discard(name)

        filt = self._filter_section(cache, busy)
        nat: list[str] = ["*nat"]
        nat.extend(f":{c} - [0:0]" for c in declare)
        nat.extend(f":{c} - [0:0]" for c in stale)
        nat.extend(delete_lines)
        nat.extend(insert_lines)
        nat.extend(r for r in (fresh[name].rules_text for name in sorted(fresh)) if r)
        nat.extend(f"-X {c}" for c in stale)
        nat.append("COMMIT")
        text = "\n".join(filt + nat) + "\n"
        return Plan(full=False, cache=cache, chains=added,
                    large=large, tail=tail, rerendered=frozenset(fresh), removed=removed,
                    deleted_chains=tuple(stale), chunks=[text],
                    filter_rules=sum(1 for line in filt if line.startswith("-A ")),
                    nat_rules=nat_total, endpoints=total, busy=frozenset(busy))

    # -- fixed parts ------------------------------------------------------

    def _filter_section(self, cache: Mapping[ServicePortName, PortRender],
                        busy_names: Iterable[ServicePortName]) -> list[str]:
        out = ["*filter"]
        out.extend(f":{c} - [0:0]" for c in ch.FILTER_TOP_CHAINS)
        # Only the few ports with filter rules (no endpoints, Local without
        # local endpoints, source ranges, health checks) are visited.
        busy = [cache[n] for n in sorted(busy_names)]
        for r in busy:
            out.extend(r.filter_nodeports)
        for r in busy:
            out.extend(r.filter_services)
        for r in busy:
            out.extend(r.filter_external)
        for r in busy:
            out.extend(r.filter_firewall)
        mark = self.options.mark
        if not self.options.conntrack_liberal:
            out.append(f"-A {ch.KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP")
        out.append(f'-A {ch.KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" '
                   f"-m mark --mark {mark}/{mark} -j ACCEPT")
        out.append(f'-A {ch.KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
                   f"-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
        out.append("COMMIT")
        return out

    def _fixed_nat_rules(self) -> list[str]:
        mark = self.options.mark
        masq = (f'-A {ch.KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" '
                f"-j MASQUERADE")
        if self.options.random_fully:
            masq += " --random-fully"
        return [
            f"-A {ch.KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
            # Clear the mark so a packet that re-traverses the stack is not masqueraded twice.
            f"-A {ch.KUBE_POSTROUTING} -j MARK --xor-mark {mark}",
            masq,
            f"-A {ch.KUBE_MARK_MASQ} -j MARK --or-mark {mark}",
        ]

    def _tail_rules(self) -> tuple[str, ...]:
        """The KUBE-SERVICES -> KUBE-NODEPORTS jump(s), which must stay last."""
        opts = self.options
        head = f"-A {ch.KUBE_SERVICES} -m comment --comment {NODEPORTS_COMMENT}"
        if not opts.nodeport_addresses:
            # proxyd never sets route_localnet, so localhost NodePorts are off
            # (kube-proxy with --iptables-localhost-nodeports=false).
            loop = "::1/128" if opts.family == 6 else "127.0.0.0/8"
            return (f"{head} -m addrtype --dst-type LOCAL ! -d {loop} -j {ch.KUBE_NODEPORTS}",)
        out = []
        for ip in opts.node_ips:
            addr = ipaddress.ip_address(ip)
            if addr.version != opts.family or addr.is_loopback:
                continue
            out.append(f"{head} -d {addr} -j {ch.KUBE_NODEPORTS}")
        return tuple(out)


def _committed(renders: dict[ServicePortName, PortRender]) -> dict[ServicePortName, PortRender]:
    return {name: r.committed() for name, r in renders.items()}


def _delta(old: tuple[str, ...], new: tuple[str, ...], deletes: list[str], inserts: list[str]) -> None:
    """-D lines for rules that went away, -I ... 1 lines for new ones (top-level chains only)."""
    new_set = set(new)
    old_set = set(old)
    for line in old:
        if line not in new_set:
            deletes.append("-D" + line[2:])
    for line in new:
        if line not in old_set:
            chain, _, rest = line[3:].partition(" ")
            inserts.append(f"-I {chain} 1 {rest}")


def _endpoint_text(ep: Endpoint) -> str:
    """kube-proxy's endpoint string (net.JoinHostPort), from a checked address."""
    ip = _safe_ip(ep.ip)
    return f"[{ip}]:{ep.port}" if ":" in ip else f"{ip}:{ep.port}"


def render_port(svc: ServicePort, endpoints: tuple[Endpoint, ...], *, options: PlannerOptions,
                node_name: str, node_zone: str | None, large: bool) -> PortRender:
    """One iteration of kube-proxy's per-service-port loop in syncProxyRules."""
    fam = options.family
    name = svc.name
    proto = _PROTO[svc.protocol]
    spn = _comment(str(name))
    mark_masq = ch.KUBE_MARK_MASQ
    eps = tuple(ep for ep in endpoints if family(ep.ip) == fam)
    cat = categorize(svc, eps, node_name=node_name, node_zone=node_zone)
    cluster_ip = _safe_ip(svc.cluster_ip)
    external_ips = _addresses(svc.external_ips, fam)
    lb_ips = _addresses(svc.load_balancer_ips, fam)
    source_ranges = _networks(svc.load_balancer_source_ranges, fam)
    port = svc.port

    cluster_chain = ch.svc_chain(name)
    uses_cluster_chain = bool(cat.cluster) and uses_cluster_endpoints(svc)
    local_chain = ch.svl_chain(name)
    uses_local_chain = bool(cat.local) and uses_local_endpoints(svc)
    has_endpoints = cat.has_any

    internal_chain = cluster_chain
    has_internal = has_endpoints
    if svc.internal_policy_local:
        internal_chain = local_chain
        if not cat.local:
            has_internal = False
    external_local = svc.uses_local_external
    external_policy_chain = cluster_chain
    has_external = has_endpoints
    if external_local:
        external_policy_chain = local_chain
        if not cat.local:
            has_external = False
    external_chain = ch.ext_chain(name)
    uses_external_chain = has_endpoints and svc.has_external
    lb_chain = external_chain
    fw = ch.fw_chain(name)
    uses_fw = has_endpoints and bool(lb_ips) and bool(source_ranges)
    if uses_fw:
        lb_chain = fw

    internal_target = external_target = ""
    internal_comment = external_comment = ""
    if not has_endpoints:
        internal_target = external_target = "REJECT"
        internal_comment = external_comment = f'"{spn} has no endpoints"'
    else:
        if not has_internal:
            internal_target = "DROP"
            internal_comment = f'"{spn} has no local endpoints"'
        if not has_external:
            external_target = "DROP"
            external_comment = f'"{spn} has no local endpoints"'

    f_services: list[str] = []
    f_external: list[str] = []
    f_firewall: list[str] = []
    f_nodeports: list[str] = []
    n_services: list[str] = []
    n_nodeports: list[str] = []
    own: list[str] = []
    rules: list[str] = []
    match = f"-m {proto} -p {proto}"

    # Capture the ClusterIP.
    if has_internal:
        n_services.append(f'-A {ch.KUBE_SERVICES} -m comment --comment "{spn} cluster IP" {match} '
                          f"-d {cluster_ip} --dport {port} -j {internal_chain}")
    else:
        f_services.append(f"-A {ch.KUBE_SERVICES} -m comment --comment {internal_comment} {match} "
                          f"-d {cluster_ip} --dport {port} -j {internal_target}")

    for ip in external_ips:
        if has_endpoints:
            n_services.append(f'-A {ch.KUBE_SERVICES} -m comment --comment "{spn} external IP" {match} '
                              f"-d {ip} --dport {port} -j {external_chain}")
        if not has_external:
            f_external.append(f"-A {ch.KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} "
                              f"{match} -d {ip} --dport {port} -j {external_target}")

    for ip in lb_ips:
        if has_endpoints:
            n_services.append(f'-A {ch.KUBE_SERVICES} -m comment --comment "{spn} loadbalancer IP" {match} '
                              f"-d {ip} --dport {port} -j {lb_chain}")
        if uses_fw:
            f_firewall.append(f'-A {ch.KUBE_PROXY_FIREWALL} -m comment --comment "{spn} traffic not accepted '
                              f'by {fw}" {match} -d {ip} --dport {port} -j DROP')
    if not has_external:
        for ip in lb_ips:
            f_external.append(f"-A {ch.KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} "
                              f"{match} -d {ip} --dport {port} -j {external_target}")

    if svc.node_port:
        if has_endpoints:
            n_nodeports.append(f"-A {ch.KUBE_NODEPORTS} -m comment --comment {spn} {match} "
                               f"--dport {svc.node_port} -j {external_chain}")
        if not has_external:
            f_external.append(f"-A {ch.KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} "
                              f"-m addrtype --dst-type LOCAL {match} --dport {svc.node_port} "
                              f"-j {external_target}")

    if svc.health_check_node_port:
        f_nodeports.append(f'-A {ch.KUBE_NODEPORTS} -m comment --comment "{spn} health check node port" '
                           f"-m tcp -p tcp --dport {svc.health_check_node_port} -j ACCEPT")

    local_cidr = options.local_cidr
    if has_internal:
        head = (f'-A {internal_chain} -m comment --comment "{spn} cluster IP" {match} '
                f"-d {cluster_ip} --dport {port}")
        if options.masquerade_all:
            rules.append(f"{head} -j {mark_masq}")
        elif local_cidr is not None:
            # Off-cluster traffic to a ClusterIP may bounce off-node: masquerade it.
            rules.append(f"{head} ! -s {local_cidr} -j {mark_masq}")

    if uses_external_chain:
        own.append(external_chain)
        if not external_local:
            rules.append(f'-A {external_chain} -m comment --comment "masquerade traffic for {spn} '
                         f'external destinations" -j {mark_masq}')
        else:
            if local_cidr is not None:
                # Pods on this node reaching an external address act as if they
                # went out to the LB and back in: Cluster policy.
                rules.append(f'-A {external_chain} -m comment --comment "pod traffic for {spn} external '
                             f'destinations" -s {local_cidr} -j {cluster_chain}')
            rules.append(f'-A {external_chain} -m comment --comment "masquerade LOCAL traffic for {spn} '
                         f'external destinations" -m addrtype --src-type LOCAL -j {mark_masq}')
            rules.append(f'-A {external_chain} -m comment --comment "route LOCAL traffic for {spn} '
                         f'external destinations" -m addrtype --src-type LOCAL -j {cluster_chain}')
        if has_external:
            rules.append(f"-A {external_chain} -j {external_policy_chain}")

    if uses_fw:
        own.append(fw)
        head = f'-A {fw} -m comment --comment "{spn} loadbalancer IP"'
        allow_from_node = False
        node_ip = ipaddress.ip_address(options.node_ip) if options.node_ip else None
        for net in source_ranges:
            rules.append(f"{head} -s {net} -j {external_chain}")
            if node_ip is not None and node_ip.version == net.version and node_ip in net:
                allow_from_node = True
        if allow_from_node:
            for ip in lb_ips:
                rules.append(f"{head} -s {ip} -j {external_chain}")
        rules.append(f'-A {fw} -m comment --comment "other traffic to {spn} will be dropped by '
                     f'KUBE-PROXY-FIREWALL"')

    affinity = svc.affinity_timeout > 0
    # One hash per endpoint (it is the costly part of rendering).
    seps = {ep: ch.sep_chain(name, _endpoint_text(ep)) for ep in cat.all_reachable}
    if uses_cluster_chain:
        own.append(cluster_chain)
        _service_to_endpoints(rules, spn=spn, svc=svc, chain=cluster_chain, endpoints=cat.cluster,
                              large=large, seps=seps)
    if uses_local_chain:
        own.append(local_chain)
        _service_to_endpoints(rules, spn=spn, svc=svc, chain=local_chain, endpoints=cat.local, large=large,
                              seps=seps)

    for ep in cat.all_reachable:
        sep = seps[ep]
        own.append(sep)
        head = f"-A {sep}" if large else f"-A {sep} -m comment --comment {spn}"
        # Hairpin: an endpoint reaching itself through the service must be SNATed.
        rules.append(f"{head} -s {ep.ip} -j {mark_masq}")
        recent = f" -m recent --name {sep} --set" if affinity else ""
        rules.append(f"{head}{recent} {match} -j DNAT --to-destination {ep}")

    counts = dict.fromkeys(own, 0)
    for rule in rules:
        chain = rule[3:rule.index(" ", 3)]  # every rule here is "-A <own chain> ..."
        counts[chain] = counts.get(chain, 0) + 1
    text = "\n".join(rules)
    del rules  # the lines die here, port by port: only the joined text lives on
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest() if text else b""
    return PortRender(
        filter_services=tuple(f_services), filter_external=tuple(f_external),
        filter_firewall=tuple(f_firewall), filter_nodeports=tuple(f_nodeports),
        nat_services=tuple(n_services), nat_nodeports=tuple(n_nodeports),
        chain_names=" ".join(own), rules_text=text, reachable=cat.all_reachable,
        has_endpoints=has_endpoints, n_endpoints=len(endpoints),
        chain_counts=tuple(counts[c] for c in own), rules_digest=digest)


def _service_to_endpoints(rules: list[str], *, spn: str, svc: ServicePort, chain: str,
                          endpoints: tuple[Endpoint, ...], large: bool, seps: Mapping[Endpoint, str]) -> None:
    """kube-proxy's writeServiceToEndpointRules: affinity checks, then a random spread."""
    if svc.affinity_timeout > 0:
        for ep in endpoints:
            sep = seps[ep]
            head = f"-A {chain}" if large else f'-A {chain} -m comment --comment "{spn} -> {ep}"'
            rules.append(f"{head} -m recent --name {sep} --rcheck --seconds {svc.affinity_timeout} "
                         f"--reap -j {sep}")
    n = len(endpoints)
    for i, ep in enumerate(endpoints):
        sep = seps[ep]
        head = f"-A {chain}" if large else f'-A {chain} -m comment --comment "{spn} -> {ep}"'
        if i < n - 1:
            rules.append(f"{head} -m statistic --mode random --probability {_probability(n - i)} -j {sep}")
        else:
            rules.append(f"{head} -j {sep}")


_PROBABILITIES: dict[int, str] = {}


def _probability(n: int) -> str:
    # Formatting floats is a measurable part of rendering 100k endpoints.
    p = _PROBABILITIES.get(n)
    if p is None:
        p = _PROBABILITIES[n] = compute_probability(n)
    return p
