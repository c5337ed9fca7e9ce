"""IpvsMode: realise the desired state with the kernel's IP Virtual Server, as kube-proxy's IPVS proxier.

Sync = plan (``planner.plan_port`` per service port, ``assemble``) then
diff against what the kernel holds and apply only the differences:

* a **full** sync (first sync, periodic resync, retry after a failure)
  first re-reads the kernel — virtual servers with their real servers,
  proxyd's ipsets, the addresses on ``kube-ipvs0`` — and the node
  addresses, and re-plans every service port. On the first sync after a
  restart this is the adoption: whatever a previous proxyd left is kept
  where it is still wanted and only the differences are changed; nothing
  is flushed, so traffic keeps flowing.
* a **partial** sync re-plans only the changed services and diffs against
  the state cached from the previous sync (kept equal to the kernel's by
  applying every change to it), so its cost grows with the change, not the
  cluster. Any error drops the cache: the runner's retry is a full sync.

Apply order, chosen so that no packet meets a half-built service: create
sets and add their new entries, bind new addresses, add/update virtual
servers and their real servers, write the iptables ruleset (only when its
text changed) and the jumps into it, then remove: real servers that left
(gracefully, ``graceful.py``), virtual servers no longer wanted, surplus
addresses, surplus set entries.

Every virtual server in the kernel that the plan does not want is deleted
(kube-proxy owns the node's IPVS table the same way); only IPv4 is handled.
Shutdown leaves everything in place; ``cleanup`` removes ``kube-ipvs0``,
every virtual server, proxyd's ipvs-mode chains and ipsets.
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
from proxyd.modes.base import ProxyMode, SyncRequest
from proxyd.modes.ipvs.applier import IpvsApplier
from proxyd.modes.ipvs.graceful import GracefulTerminator
from proxyd.modes.ipvs.planner import (
    IPSETS,
    Plan,
    PlanContext,
    PortPlan,
    RealServer,
    VirtualServer,
    VSKey,
    assemble,
    iptables_rules,
    plan_port,
    validate_scheduler,
)

log = logging.getLogger(__name__)

WEIGHT = 1


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

    def __init__(self, config: Config, *, applier: IpvsApplier | None = None,
                 graceful_interval: float = 2.0) -> None:
        super().__init__(config)
        self.scheduler = validate_scheduler(config.ipvs_scheduler or "rr")
        self.applier = applier or IpvsApplier()
        self.graceful = GracefulTerminator(self.applier, interval=graceful_interval)
        self._lock = asyncio.Lock()
        self._ctx = PlanContext(scheduler=self.scheduler, node_name=config.node_name)
        self._parts: dict[ServicePortName, PortPlan] = {}
        # What the kernel holds, as of the last sync (None: unknown, re-read at the next sync).
        self._servers: dict[VSKey, VirtualServer] | None = None
        self._dests: dict[VSKey, dict[RealServer, int]] = {}
        self._sets: dict[str, set[str]] = {}
        self._bound: set[str] = set()
        self._rules: str | None = None
        self.last_plan: Plan | None = None
        self._last_state: ProxyState | None = None  # for ``status``/``trace``: names of virtual servers

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
            failed = await applier.call(applier.cleanup)
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
                self._servers = None  # the kernel may hold a half-applied change: re-read it
                raise

    async def _sync(self, request: SyncRequest) -> None:
        state = request.state
        full = request.changed is None or self._servers is None
        if full:
            await self._read_kernel()
            await self._refresh_context(state.node_name or self.config.node_name, state.node_zone)
            self._parts = {}
            names: Iterable[ServicePortName] = state.services
        else:
            changed = request.changed or frozenset()
            zone = state.node_zone
            if zone != self._ctx.node_zone:
                # Topology depends on the node's zone: every port must be re-planned.
                self._ctx = PlanContext(scheduler=self._ctx.scheduler, node_name=self._ctx.node_name,
                                        node_zone=zone, node_ips=self._ctx.node_ips,
                                        local_addresses=self._ctx.local_addresses)
                self._parts = {}
                names = state.services
            else:
                for name in [n for n in self._parts if n.service in changed]:
                    del self._parts[name]
                names = [n for n in state.services if n.service in changed]
        for name in names:
            part = plan_port(state.services[name], state.endpoints_of(name), self._ctx)
            if part.skipped and name not in self._parts:
                log.warning("ipvs: %s", part.skipped)
            self._parts[name] = part
        plan = assemble(self._parts.values())
        for conflict in plan.conflicts:
            log.warning("ipvs: virtual server %s wanted by two service ports; the first keeps it", conflict)
        await self._apply(plan, full=full)
        self.last_plan = plan
        self._last_state = state

    async def _refresh_context(self, node_name: str, zone: str | None) -> None:
        local = await nodeaddrs.node_addresses_async((), family=4)
        wanted = await nodeaddrs.node_addresses_async(self.config.nodeport_addresses, family=4)
        # kube-proxy never serves NodePorts on loopback addresses in ipvs mode.
        node_ips = tuple(ip for ip in wanted if not ipaddress.ip_address(ip).is_loopback)
        self._ctx = PlanContext(scheduler=self.scheduler, node_name=node_name, node_zone=zone,
                                node_ips=node_ips, local_addresses=frozenset(local))

    async def _read_kernel(self) -> None:
        a = self.applier
        await a.call(a.ensure_device)
        await a.call(a.ensure_sets)
        kernel = await a.call(a.read_servers)
        self._servers = {key: vs for key, (vs, _) in kernel.items()}
        self._dests = {key: {srv: d.weight for srv, d in dests.items()} for key, (_, dests) in kernel.items()}
        sets = await a.call(a.read_sets)
        self._sets = {info.name: set(sets.get(info.name, ())) for info in IPSETS}
        self._bound = await a.call(a.read_bound)
        self._rules = None

    async def _apply(self, plan: Plan, *, full: bool) -> None:
        a = self.applier
        assert self._servers is not None
        # 1. set entries that rules and packets will need.
        for name, want in plan.ipsets.items():
            have = self._sets.setdefault(name, set())
            add = want - have
            if add:
                await a.call(a.change_set, name, sorted(add), ())
                have |= add
        # 2. addresses.
        bind = plan.bind - self._bound
        if bind:
            await a.call(a.bind, sorted(bind), ())
            self._bound |= bind
        # 3. virtual servers and their real servers.
        for key, vs in plan.servers.items():
            current = self._servers.get(key)
            if current is None:
                await a.call(a.add_server, vs)
                self._servers[key] = vs
                self._dests[key] = {}
            elif current != vs:
                await a.call(a.update_server, vs)
                self._servers[key] = vs
            have = self._dests.setdefault(key, {})
            for server in plan.destinations.get(key, ()):
                weight = have.get(server)
                if weight is None:
                    await a.call(a.add_dest, key, server, WEIGHT)
                elif weight != WEIGHT:
                    await a.call(a.set_weight, key, server, WEIGHT)
                else:
                    continue
                self.graceful.cancel(key, server)
                have[server] = WEIGHT
        # 4. the fixed iptables ruleset.
        rules = iptables_rules(plan, cluster_cidrs=self.config.cluster_cidrs,
                               masquerade_all=self.config.masquerade_all,
                               masquerade_bit=self.config.masquerade_bit)
        if full or rules != self._rules:
            try:
                await a.call(lambda: a.restore(rules, ensure_jumps=full))
            except Exception:
                metrics.IPTABLES_RESTORE_FAILURES.inc()
                raise
            self._rules = rules
        # 5. real servers that left, gracefully.
        for key, have in self._dests.items():
            if key not in plan.servers:
                continue
            want = set(plan.destinations.get(key, ()))
            for server in [s for s in have if s not in want]:
                if (key, server) in self.graceful:
                    continue
                if have[server] == 0 and key.protocol.value == "TCP":
                    self.graceful.adopt(key, server)  # already draining (left by a previous run)
                    continue
                if await self.graceful.remove(key, server):
                    del have[server]
                else:
                    have[server] = 0
        # 6. virtual servers no longer wanted.
        for key in [k for k in self._servers if k not in plan.servers]:
            await a.call(a.delete_server, key)
            self.graceful.forget_server(key)
            del self._servers[key]
            self._dests.pop(key, None)
        # 7. surplus addresses and set entries.
        unbind = self._bound - plan.bind
        if unbind:
            await a.call(a.bind, (), sorted(unbind))
            self._bound -= unbind
        for name, want in plan.ipsets.items():
            have = self._sets[name]
            remove = have - want
            if remove:
                await a.call(a.change_set, name, (), sorted(remove))
                have -= remove
        nat, _, flt = rules.partition("*filter")
        metrics.IPTABLES_TOTAL_RULES.labels(table="nat").set(nat.count("\n-A "))
        metrics.IPTABLES_TOTAL_RULES.labels(table="filter").set(flt.count("\n-A "))

    async def _on_graceful_deleted(self, deleted: list[tuple[VSKey, RealServer]]) -> None:
        for key, server in deleted:
            self._dests.get(key, {}).pop(server, None)
