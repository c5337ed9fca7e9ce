"""IpvsMode: realise the desired state with the kernel's IP Virtual Server, as kube-proxy's IPVS proxier.

Sync = plan (``planner.plan_port`` per service port, merged by
``planner.Assembly``), then
``planner.diff`` (pure) against what the kernel holds (``Held``) gives the
operations, which the applier runs in netlink batches
(``proxyd.netlink``): only the differences are applied.

* a **full** sync (first sync, periodic resync, retry after a failure)
  first re-reads the kernel — virtual servers with their real servers,
  proxyd's ipsets, the addresses on ``kube-ipvs0`` — and the node
  addresses, and re-plans every service port. On the first sync after a
  restart this is the adoption: whatever a previous proxyd left is kept
  where it is still wanted and only the differences are changed; nothing
  is flushed, so traffic keeps flowing.
* a **partial** sync re-plans only the changed service ports (the
  tracker's index, ``SyncRequest.changed_ports``) and diffs only their
  virtual servers against the state cached from the previous sync (kept
  equal to the kernel's by recording every applied operation), so its
  cost grows with the change, not the cluster. An object the kernel
  refuses is logged and counted and retried at the next sync that looks at
  it; any other error drops the cache: the runner's retry is a full sync.

Apply order, chosen so that no packet meets a half-built service: create
sets and add their new entries, bind new addresses, add/update virtual
servers and their real servers, write the iptables ruleset (only when its
text changed, or when the once-per-sync-period check finds a jump from the
built-in chains gone) and the jumps into it, then remove: real servers that left
(gracefully, ``graceful.py``), virtual servers no longer wanted, surplus
addresses, surplus set entries.

Every virtual server in the kernel that the plan does not want is deleted
(kube-proxy owns the node's IPVS table the same way).

One instance serves one address family (``per_family``: the daemon runs an
IPv4 and, when the node has IPv6, an IPv6 instance behind
``DualStackMode``, kube-proxy's meta-proxier). The two share
``kube-ipvs0`` and the IPVS table; each reads, diffs and removes only its
family's addresses and virtual servers there, and owns its family's ipsets
(``KUBE-6-`` names for IPv6) and rules (iptables or ip6tables). NodePorts of
a family are served on that family's node addresses (loopback and IPv6
link-local excluded: IPVS cannot tell the interface of a link-local one).
Shutdown leaves everything in place; ``cleanup`` removes ``kube-ipvs0``,
every virtual server, proxyd's ipvs-mode chains and ipsets, of both families.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Collection, Iterable

from proxyd import metrics, nodeaddrs
from proxyd.config import Config
from proxyd.introspect import ModeStatus, TracePacket, TraceResult
from proxyd.model import ProxyState, ServicePortName
from proxyd.model import family as family_of
from proxyd.modes.base import ProxyMode, SyncRequest
from proxyd.modes.ipvs.applier import IpvsApplier, remove_rules
from proxyd.modes.ipvs.graceful import GracefulTerminator
from proxyd.modes.ipvs.planner import (
    IPSETS,
    JUMPS,
    WEIGHT,
    Assembly,
    Held,
    Op,
    Plan,
    PlanContext,
    RealServer,
    VSKey,
    diff,
    iptables_rules,
    plan_port,
    validate_scheduler,
)

log = logging.getLogger(__name__)


def ipvs_sysctls(*, strict_arp: bool, kernel_release: str | None = None) -> dict[str, int]:
    """The sysctls kube-proxy's IPVS proxier sets, for this kernel."""
    values = {
        "net/ipv4/vs/conntrack": 1,
        "net/ipv4/vs/expire_nodest_conn": 1,
        "net/ipv4/vs/expire_quiescent_template": 1,
        "net/ipv4/ip_forward": 1,
    }
    release = kernel_release if kernel_release is not None else os.uname().release
    try:
        major, minor = (int(part) for part in release.split("-")[0].split(".")[:2])
    except ValueError:
        major, minor = 0, 0
    # conn_reuse_mode=0 works around a bug fixed in 5.9 (kubernetes#93297); newer kernels keep theirs.
    if (4, 1) <= (major, minor) < (5, 9):
        values["net/ipv4/vs/conn_reuse_mode"] = 0
    if strict_arp:
        values["net/ipv4/conf/all/arp_ignore"] = 1
        values["net/ipv4/conf/all/arp_announce"] = 2
    return values


class IpvsMode(ProxyMode):
    name = "ipvs"
    per_family = True

    def __init__(self, config: Config, *, family: int = 4, applier: IpvsApplier | None = None,
                 graceful_interval: float = 2.0) -> None:
        super().__init__(config)
        if family not in (4, 6):
            raise ValueError(f"address family must be 4 or 6, not {family!r}")
        self.family = family
        self.scheduler = validate_scheduler(config.ipvs_scheduler or "rr")
        self.applier = applier or IpvsApplier(family=family)
        self.graceful = GracefulTerminator(self.applier, interval=graceful_interval)
        self._lock = asyncio.Lock()
        self._ctx = PlanContext(scheduler=self.scheduler, node_name=config.node_name, family=family)
        self._assembly = Assembly()  # the per-port plans, merged
        # What the kernel holds, as of the last sync (None: unknown, re-read at the next sync).
        self._held: Held | None = None
        self._rules: str | None = None
        self.last_plan: Plan | None = None
        self._verified: float | None = None  # when the jumps were last known present
        self._last_state: ProxyState | None = None  # for ``status``/``trace``: names of virtual servers
        self._refused: dict[ServicePortName, str] = {}  # ports whose objects the kernel refused this sync

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.applier.call(self.applier.load_modules, self.scheduler)
        failed = await self.applier.call(
            self.applier.set_sysctls, ipvs_sysctls(strict_arp=self.config.ipvs_strict_arp))
        if "net/ipv4/vs/conntrack" in failed:
            raise RuntimeError("cannot set net.ipv4.vs.conntrack=1: is IPVS (ip_vs) available in this "
                               "kernel?")
        await self.applier.call(self.applier.ensure_device)
        self.graceful.start(self._lock, self._on_graceful_deleted)

    async def status(self, names: Collection[ServicePortName] | None = None) -> ModeStatus:
        """IPVS stats per real server and kernel-versus-plan, from one netlink dump."""
        from proxyd.modes.ipvs import introspect

        started = time.perf_counter()
        async with self._lock:
            table = await self.applier.call(introspect.read_table, self.applier)
        result = introspect.build_status(table, self.last_plan, self._last_state)
        result.read_seconds = time.perf_counter() - started
        return result

    async def trace(self, packet: TracePacket) -> TraceResult:
        """The IPVS lookup of ``packet`` in the table read back now."""
        from proxyd.modes.ipvs import introspect

        async with self._lock:
            table = await self.applier.call(introspect.read_table, self.applier)
        return introspect.build_trace(table, packet, self._last_state,
                                      cluster_cidrs=self.config.cluster_cidrs,
                                      masquerade_all=self.config.masquerade_all)

    async def shutdown(self) -> None:
        # Everything stays in the kernel so traffic keeps flowing; the next start adopts it.
        await self.graceful.stop()
        await self.applier.aclose()

    @classmethod
    async def cleanup(cls, config: Config) -> None:
        applier = IpvsApplier()
        try:
            # Rules first: an ipset a rule still matches on cannot be destroyed.
            failed = await remove_rules()
            failed += await applier.call(applier.cleanup)
        finally:
            await applier.aclose()
        if failed:
            raise RuntimeError("; ".join(failed))

    # -- sync ----------------------------------------------------------------------------------

    async def sync(self, request: SyncRequest) -> None:
        async with self._lock:
            try:
                await self._sync(request)
            except BaseException:
                self._held = None  # the kernel may hold a half-applied change: re-read it
                raise

    async def _sync(self, request: SyncRequest) -> None:
        state = request.state
        full = request.changed is None or self._held is None
        keys: set[VSKey] | None = None
        retried: set[ServicePortName] | None = None  # ports this sync looks at again (None: every one)
        if full:
            await self._read_kernel()
            await self._refresh_context(state.node_name or self.config.node_name, state.node_zone)
            self._assembly = Assembly()
            names: Iterable[ServicePortName] = state.service_ports
        elif state.node_zone != self._ctx.node_zone:
            # Topology depends on the node's zone: every port must be re-planned.
            self._ctx = PlanContext(scheduler=self._ctx.scheduler, node_name=self._ctx.node_name,
                                    family=self.family, node_zone=state.node_zone,
                                    node_ips=self._ctx.node_ips, local_addresses=self._ctx.local_addresses)
            self._assembly = Assembly()
            names = state.service_ports
        else:
            # The tracker's index: planning, merging and diffing follow the changed ports.
            ports = request.ports_to_plan(self._assembly.parts) or set()
            retried = ports
            keys = set()
            for name in ports:
                if name not in state.service_ports:
                    keys |= self._assembly.put(name, None)
            names = [n for n in ports if n in state.service_ports]
        for name in names:
            part = plan_port(state.service_ports[name], state.endpoints_of(name), self._ctx)
            if part.skipped and name not in self._assembly.parts:
                log.warning("ipvs: %s", part.skipped)
            touched = self._assembly.put(name, part)
            if keys is not None:
                keys |= touched
        plan = self._assembly.plan()
        for conflict in plan.conflicts:
            log.warning("ipvs: virtual server %s wanted by two service ports; the first keeps it", conflict)
        self._refused = {}
        await self._apply(plan, full=full, keys=keys)
        self.last_plan = plan
        self._last_state = state
        # Objects the kernel refused fail only themselves (the rest applied, they are retried by the
        # next sync that looks at them); their service ports are reported like any mode's quarantine.
        self.quarantine.settle(retried, self._refused)

    async def _refresh_context(self, node_name: str, zone: str | None) -> None:
        local = await nodeaddrs.node_addresses_async((), family=self.family)
        # --nodeport-addresses without a CIDR of this family: every address of it (kube-proxy's rule).
        cidrs = [c for c in self.config.nodeport_addresses if family_of(c) == self.family]
        wanted = await nodeaddrs.node_addresses_async(cidrs, family=self.family)
        # kube-proxy never serves NodePorts on loopback addresses in ipvs mode; an IPv6 link-local
        # address is one per interface, which a virtual server cannot tell apart.
        addrs = [ipaddress.ip_address(ip) for ip in wanted]
        node_ips = tuple(str(a) for a in addrs if not (a.is_loopback or a.is_link_local))
        self._ctx = PlanContext(scheduler=self.scheduler, node_name=node_name, family=self.family,
                                node_zone=zone, node_ips=node_ips, local_addresses=frozenset(local))

    async def _read_kernel(self) -> None:
        a = self.applier
        await a.call(a.ensure_device)
        await a.call(a.ensure_sets)
        kernel = await a.call(a.read_servers)
        sets = await a.call(a.read_sets)
        self._held = Held(
            servers={key: vs for key, (vs, _) in kernel.items()},
            dests={key: {srv: d.weight for srv, d in dests.items()} for key, (_, dests) in kernel.items()},
            sets={info.name: set(sets.get(info.name, ())) for info in IPSETS},
            bound=await a.call(a.read_bound))
        self._rules = None

    async def _apply(self, plan: Plan, *, full: bool, keys: set[VSKey] | None) -> None:
        """Diff (pure) against what the kernel holds, then have the applier run the operations.

        An operation the kernel refuses is logged and counted by the applier
        and left out of ``_held``, so the next sync that looks at it tries
        again; the sync itself goes on (one bad object does not stop the rest).
        """
        a = self.applier
        held = self._held
        assert held is not None
        changes = diff(plan, held, keys=keys, draining=self.graceful)
        # 1-3. set entries, addresses, virtual and real servers the rules and packets need.
        failed = await a.call(a.apply, changes.before) if changes.before else set()
        self._record(changes.before, failed)
        for key, server in changes.restored:
            if Op("add_dest", (key, server, WEIGHT)) not in failed and \
                    Op("set_weight", (key, server, WEIGHT)) not in failed:
                self.graceful.cancel(key, server)
        # 4. the fixed iptables ruleset.
        rules = iptables_rules(plan, cluster_cidrs=self.config.cluster_cidrs,
                               masquerade_all=self.config.masquerade_all,
                               masquerade_bit=self.config.masquerade_bit, family=self.family)
        repair = not full and await self._jumps_gone()
        if full or repair or rules != self._rules:
            try:
                await a.restore(rules, ensure_jumps=full or repair)
            except Exception:
                metrics.IPTABLES_RESTORE_FAILURES.inc()
                raise
            self._rules = rules
            if full or repair:
                self._verified = time.monotonic()  # the jumps have just been ensured
        # 5-7. what goes away: real servers (TCP ones drained), virtual servers, addresses, entries.
        failed = await a.call(a.apply, changes.after) if changes.after else set()
        self._record(changes.after, failed)
        for key, server in changes.drain:
            if Op("set_weight", (key, server, 0)) not in failed:
                self.graceful.adopt(key, server)
        for key, server in changes.adopt:
            self.graceful.adopt(key, server)
        for op in changes.after:
            if op.kind == "delete_server" and op not in failed:
                self.graceful.forget_server(op.args[0])
        nat, _, flt = rules.partition("*filter")
        metrics.IPTABLES_TOTAL_RULES.labels(table="nat").set(nat.count("\n-A "))
        metrics.IPTABLES_TOTAL_RULES.labels(table="filter").set(flt.count("\n-A "))

    async def _jumps_gone(self) -> bool:
        """Once per sync period: has someone deleted a jump into the ruleset (or flushed a table)?

        Lists only the built-in chains; a full sync ensures the jumps anyway.
        """
        now = time.monotonic()
        if self._verified is not None and now - self._verified < self.config.sync_period:
            return False
        self._verified = now
        missing = await (await self.applier.netfilter()).missing(JUMPS, canary_tables=())
        if missing:
            log.warning("ipvs: %s gone (tables flushed by someone else?): rewriting the rules",
                        ", ".join(missing))
            metrics.NETFILTER_REPAIRS.labels(mode=self.name).inc()
        return bool(missing)

    def _record(self, ops: Iterable[Op], failed: set[Op]) -> None:
        assert self._held is not None
        for op in ops:
            if op not in failed:
                self._held.record(op)
        if failed:
            self._blame(failed)

    def _blame(self, failed: set[Op]) -> None:
        """The service ports whose objects (virtual/real servers, set entries, addresses) were refused.

        Looks over every port's plan: paid only when the kernel refused something.
        """
        reasons = self.applier.refusals
        for name, part in self._assembly.parts.items():
            keys = {vs.key for vs in part.servers}
            entries = set(part.entries)
            binds = set(part.bind)
            for op in failed:
                kind, args = op.kind, op.args
                if kind in ("set_add", "set_del"):
                    hit = (args[0], args[1]) in entries
                elif kind in ("bind", "unbind"):
                    hit = args[0] in binds
                elif kind in ("add_server", "update_server"):
                    hit = args[0].key in keys
                else:  # delete_server (key,), real server operations (key, ...)
                    hit = args[0] in keys
                if hit and isinstance(name, ServicePortName):
                    self._refused.setdefault(name, reasons.get(op, f"refused: {op}"))

    async def _on_graceful_deleted(self, deleted: list[tuple[VSKey, RealServer]]) -> None:
        if self._held is None:
            return
        for key, server in deleted:
            self._held.dests.get(key, {}).pop(server, None)
