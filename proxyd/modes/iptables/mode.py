"""iptables mode's mode class: kube-proxy's iptables proxier, in Python.

Each sync turns the desired state into one iptables-restore transaction
(``planner``), applies it (``applier``) and then deletes stale UDP conntrack
entries (``conntrack``). The shape follows kube-proxy's syncProxyRules:

* start: detect the back end (legacy or nft, ``proxyd.netfilter``), create
  the canary chains. Nothing is flushed: rules a previous run left keep serving
  until the first sync, which is full and replaces proxyd's chains
  atomically (and deletes per-service chains nobody wants any more).
* full sync (first, periodic, after a failure, after the canary vanished):
  ensure the jump rules from the built-in chains, read which nat chains
  exist, rewrite every chain proxyd owns.
* partial sync: rewrite only the chains of changed services and patch
  KUBE-SERVICES/KUBE-NODEPORTS (see ``planner``).
* once per sync period (the runner syncs at least that often) the first
  sync checks that the canaries in mangle, nat and filter and every jump
  from the built-in chains are still there (``Applier.missing``: a listing
  of the built-in chains, never the big ones); anything gone is logged,
  counted in ``proxyd_netfilter_repairs_total{mode="iptables"}`` and turns
  the sync into a full one, which recreates it all.
* a failed restore changes nothing in the kernel (one transaction); it is
  counted, a failed partial one is retried at once as a full one (the cache
  may be stale), and if that fails too the ports of the transaction are
  bisected (``proxyd.quarantine.isolate_ports``): the ports the kernel refuses are
  quarantined and keep their last good rules (none if new), the others are
  applied. A clean sync stays one transaction. Only a failure that remains
  without any candidate port (node-wide) goes to the runner, which retries.
* shutdown leaves every rule in place so traffic keeps flowing while proxyd
  is down; ``cleanup`` removes everything in both back ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable, Collection, Mapping

from proxyd import metrics
from proxyd.config import Config
from proxyd.introspect import ModeStatus, TracePacket, TraceResult
from proxyd.model import ProxyState, ServiceName, ServicePort, ServicePortName
from proxyd.modes.base import AppliedMode, SyncRequest
from proxyd.modes.iptables import conntrack
from proxyd.modes.iptables.applier import Applier, cleanup_all
from proxyd.modes.iptables.planner import Plan, Planner, PlannerOptions, PortRender
from proxyd.netfilter import Backend, detect
from proxyd.netfilter.backend import IptablesError
from proxyd.quarantine import hold_back, isolate_ports

log = logging.getLogger(__name__)

RESOURCE_PROBLEM = 4  # iptables-restore's exit code when the xtables lock could not be taken

__all__ = ["IptablesMode"]

# Rules each family's instance owns, per table: the gauge counts every rule proxyd owns, so with an
# iptables and an ip6tables instance it is their sum (each setting it would hide the other's).
_OWNED_RULES: dict[tuple[int, str], int] = {}


def _count_rules(family: int, table: str, n: int) -> None:
    _OWNED_RULES[(family, table)] = n
    total = sum(v for (_fam, t), v in _OWNED_RULES.items() if t == table)
    metrics.IPTABLES_TOTAL_RULES.labels(table).set(total)


def family_cidrs(cidrs: Collection[str], family: int) -> tuple[str, ...]:
    """The ``--nodeport-addresses`` CIDRs of ``family`` (kube-proxy's NewNodePortAddresses).

    None of that family given means every address of that family, as when no CIDR is given at all:
    ``--nodeport-addresses 192.168.0.0/16`` limits IPv4 NodePorts and leaves IPv6 ones on every
    IPv6 node address.
    """
    return tuple(c for c in cidrs if ipaddress.ip_network(c, strict=False).version == family)


def _node_addresses(cidrs: tuple[str, ...], family: int) -> tuple[list[str], str | None]:
    """(addresses accepting NodePorts, primary node address) — blocking netlink dump.

    ``cidrs`` are this family's (``family_cidrs``); none: NodePorts match every local address.
    """
    from proxyd.nodeaddrs import filter_addresses, local_addresses

    local = local_addresses(family=family)
    node_ips = filter_addresses(local, cidrs) if cidrs else []
    primary = next((a for a in filter_addresses(local, ())
                    if not ipaddress.ip_address(a).is_loopback
                    and not ipaddress.ip_address(a).is_link_local), None)
    return node_ips, primary


def _all_local_addresses(family: int) -> list[str]:
    """Every address of this node (what ``-m addrtype --dst-type LOCAL`` matches) — blocking netlink dump."""
    from proxyd.nodeaddrs import local_addresses

    return list(local_addresses(family=family))


class IptablesMode(AppliedMode[Applier]):
    """Services realised as iptables NAT rules (kube-proxy's default mode)."""

    name = "iptables"
    # One instance per family (``iptables``/``ip6tables``) behind ``DualStackMode``, as kube-proxy runs
    # one proxier per family.
    per_family = True

    def __init__(self, config: Config, *, backend: Backend | None = None, family: int = 4,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config)
        self._clock = clock
        self._verified: float | None = None  # when canaries and jumps were last known present
        self.family = family
        self._backend = backend
        self.applier: Applier | None = None
        self._nodeport_cidrs = family_cidrs(config.nodeport_addresses, family)
        self.planner = Planner(PlannerOptions(
            family=family, cluster_cidrs=config.cluster_cidrs, masquerade_all=config.masquerade_all,
            masquerade_bit=config.masquerade_bit, nodeport_addresses=self._nodeport_cidrs))
        self._ports: Mapping[ServicePortName, ServicePort] = {}
        self._good = ProxyState()  # what the kernel was last seen to accept (quarantined ports keep it)
        self._synced = False
        self.last_plan: Plan | None = None

    async def start(self) -> None:
        backend = self._backend
        if backend is None:
            backend = await asyncio.to_thread(detect, family=self.family)
        self.applier = Applier(backend)
        log.info("iptables: using the %s back end", backend.name)
        node_ips, primary = await asyncio.to_thread(_node_addresses, self._nodeport_cidrs, self.family)
        self.planner = Planner(dataclasses.replace(self.planner.options, node_ips=tuple(node_ips),
                                                   node_ip=primary, chunk_rules=backend.chunk_lines))
        try:
            await self.applier.ensure_canaries()
        except IptablesError as err:
            if err.returncode not in (None, RESOURCE_PROBLEM):
                raise
            # Another program holds the xtables lock (or the tool hung): the node's problem of the
            # moment, not a reason to die. The first sync is full and creates them, with the runner's
            # retries and back-off, as kube-proxy's first sync does.
            log.warning("iptables: canaries not created at start (%s); the first sync creates them", err)

    async def sync(self, request: SyncRequest) -> None:
        applier = await self.started_applier()
        full = request.changed is None or self.planner.needs_full
        now = self._clock()
        if not full and (self._verified is None or now - self._verified >= self.config.sync_period):
            missing = await applier.missing()
            if missing:
                log.warning("iptables: %s gone (tables flushed by someone else?): full resync",
                            ", ".join(missing))
                metrics.NETFILTER_REPAIRS.labels(mode=self.name).inc()
                self.planner.invalidate()
                full = True
            else:
                self._verified = now
        if self._nodeport_cidrs:
            node_ips, _ = await asyncio.to_thread(_node_addresses, self._nodeport_cidrs, self.family)
            self.planner.set_node_ips(node_ips)
        existing: set[str] = set()
        if full:
            await applier.ensure_canaries()
            await applier.ensure_jumps()
            if self.planner.needs_full:
                # After a start, a failure or a flush the planner does not know
                # which chains the kernel holds: ask (iptables-save of a big nat
                # table takes seconds on nft, so not on every full sync).
                existing = await applier.chains("nat")
        retried = request.ports_to_plan(self.planner.cache.keys()) if not full else None
        desired = hold_back(request.state, self._good, self.quarantine.held(retried))
        old_renders = self.planner.cache
        old_ports = self._ports
        touched: set[ServicePortName] = set()  # ports re-rendered or removed by the plans applied
        changed_ports = None if full else request.changed_ports
        refused: dict[ServicePortName, str] = {}
        counted = False
        try:
            err = await self._attempt(desired, None if full else request.changed, changed_ports, existing,
                                      touched)
            if err is not None:
                counted = True
                metrics.IPTABLES_RESTORE_FAILURES.inc()
                if not full:
                    metrics.IPTABLES_PARTIAL_RESTORE_FAILURES.inc()
                    # The cache may not describe the kernel (rules flushed by someone else): a full
                    # plan settles that before any service is blamed.
                    self.planner.invalidate()
                    existing = await applier.chains("nat")
                    err = await self._attempt(desired, None, None, existing, touched)
            if err is not None:
                refused = await isolate_ports(
                    self.name, "restore failed", err, fam=self.family, desired=desired,
                    good=lambda: self._good, retried=retried, invalidate=self.planner.invalidate,
                    apply=lambda state, include: self._attempt(
                        state, frozenset(n.service for n in include), include, existing, touched))
        except Exception:
            if not counted:
                metrics.IPTABLES_RESTORE_FAILURES.inc()
                if not full:
                    metrics.IPTABLES_PARTIAL_RESTORE_FAILURES.inc()
            raise
        self.quarantine.settle(retried, refused)
        plan = self.last_plan
        assert plan is not None
        self._ports = self._good.service_ports
        _count_rules(self.family, "filter", plan.filter_rules)
        _count_rules(self.family, "nat", plan.nat_rules)
        if self._synced:
            # On the first sync after a start nothing is known about what
            # conntrack holds; clearing every UDP service would break flows
            # that the adopted rules still serve correctly.
            await self._clear_conntrack(touched, full, old_ports, old_renders, self._ports)
        self._synced = True
        if full:
            self._verified = now  # a full sync has just ensured the canaries and jumps

    async def _attempt(self, state: ProxyState, changed: frozenset[ServiceName] | None,
                       changed_ports: frozenset[ServicePortName] | None, existing: set[str],
                       touched: set[ServicePortName]) -> str | None:
        """Plan ``state`` and apply it; None once the kernel holds it, else the kernel's refusal.

        A failed single transaction changed nothing, so the cache still
        describes the kernel; with a chunked full plan, earlier chunks may
        have rewritten some services (each one whole): the planner then
        forgets what the kernel holds and the next plan is full.
        """
        assert self.applier is not None
        plan: Plan | None = None
        applied = 0
        try:
            plan = self.planner.plan(state, changed, existing_chains=existing, changed_ports=changed_ports)
            # A partial plan that re-renders and removes nothing would only rewrite the filter table
            # with what it holds: the other family's changes (a v4-only cluster's IPv6 proxier sees
            # every change as one of no port of its own) cost no ip6tables-restore.
            if plan.full or plan.rerendered or plan.removed:
                for chunk in plan.chunks:
                    await self.applier.restore(chunk)
                    applied += 1
        except Exception as err:
            if applied:
                self.planner.invalidate()
            if isinstance(err, IptablesError) and err.returncode in (None, RESOURCE_PROBLEM):
                # Timed out or the xtables lock is held: the node's problem, not one service's.
                self.planner.invalidate()
                raise
            return str(err) or type(err).__name__
        self.planner.commit(plan)
        # Its counts and change index, not its text nor its chain names: a full plan's restore input
        # is tens of MB at 10,000 services, held until the next sync for nothing.
        self.last_plan = dataclasses.replace(plan, chunks=[], chains=set())
        self._good = state
        touched.update(plan.rerendered)
        touched.update(plan.removed)
        if plan.full:
            touched.update(plan.cache)
        return None

    async def _clear_conntrack(self, touched: set[ServicePortName], full: bool,
                               old_ports: Mapping[ServicePortName, ServicePort],
                               old_renders: Mapping[ServicePortName, PortRender],
                               new_ports: Mapping[ServicePortName, ServicePort]) -> None:
        names = set(touched)
        if full:
            names |= set(old_ports)
        await conntrack.clear_stale(self.name, self.family, names, old_ports=old_ports,
                                    old_renders=old_renders, new_ports=new_ports,
                                    new_renders=self.planner.cache)

    async def status(self, names: Collection[ServicePortName] | None = None) -> ModeStatus:
        """Counters of each endpoint's DNAT rule and kernel-versus-plan, read back from the kernel."""
        from proxyd.modes.iptables import status

        if self.applier is None:
            return ModeStatus(matches=None, notes=["iptables: not started yet"])
        backend = self.applier.backend
        result = await status.read_status(backend.save, backend.iptables, self.planner.cache, names)
        if not self._synced:
            result.matches = None
            result.notes.append("no sync yet: nothing to compare with")
        return result

    async def trace(self, packet: TracePacket) -> TraceResult:
        """The packet walked through the nat and filter tables read back from the kernel now."""
        from proxyd.modes.iptables import status

        if self.applier is None:
            return TraceResult(supported=False, notes=["iptables: not started yet"])
        node_ips = await asyncio.to_thread(_all_local_addresses, self.family)
        return await status.read_trace(self.applier.backend.iptables, packet, node_ips)

    async def shutdown(self) -> None:
        """Leave every rule: traffic keeps flowing while proxyd is down."""

    @classmethod
    async def cleanup(cls, config: Config) -> None:
        for p in await cleanup_all():
            log.warning("iptables cleanup: %s", p)
