"""iptables mode: kube-proxy's iptables proxier, in Python.

Each sync turns the desired state into one iptables-restore transaction
(``planner``), applies it (``applier``) and then deletes stale UDP conntrack
entries (``conntrack``). The shape follows kube-proxy's syncProxyRules:

* start: detect the back end (legacy or nft, ``backend``), create the
  canary chains. Nothing is flushed: rules a previous run left keep serving
  until the first sync, which is full and replaces proxyd's chains
  atomically (and deletes per-service chains nobody wants any more).
* full sync (first, periodic, after a failure, after the canary vanished):
  ensure the jump rules from the built-in chains, read which nat chains
  exist, rewrite every chain proxyd owns.
* partial sync: rewrite only the chains of changed services and patch
  KUBE-SERVICES/KUBE-NODEPORTS (see ``planner``). A missing canary turns it
  into a full sync.
* a failed restore changes nothing in the kernel (one transaction); the
  planner keeps describing what the kernel holds, forgets that it is valid
  (next sync is full), the failure is counted and the exception goes to the
  runner, which retries.
* shutdown leaves every rule in place so traffic keeps flowing while proxyd
  is down; ``cleanup`` removes everything in both back ends.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Collection, Mapping

from proxyd import metrics
from proxyd.config import Config
from proxyd.introspect import ModeStatus, TracePacket, TraceResult
from proxyd.model import ServicePort, ServicePortName
from proxyd.modes.base import ProxyMode, SyncRequest
from proxyd.modes.iptables import conntrack
from proxyd.modes.iptables.applier import Applier
from proxyd.modes.iptables.backend import BACKENDS, Backend, detect
from proxyd.modes.iptables.planner import Plan, Planner, PlannerOptions

log = logging.getLogger(__name__)

__all__ = ["IptablesMode"]

def _node_addresses(cidrs: tuple[str, ...], family: int) -> tuple[list[str], str | None]:
    """(addresses accepting NodePorts, primary node address) — blocking netlink dump."""
    from proxyd.nodeaddrs import filter_addresses, local_addresses

    local = [a for a in local_addresses(family=family)]
    node_ips = filter_addresses(local, cidrs) if cidrs else []
    import ipaddress

    primary = next((a for a in filter_addresses(local, ())
                    if not ipaddress.ip_address(a).is_loopback
                    and not ipaddress.ip_address(a).is_link_local), None)
    return node_ips, primary


def _all_local_addresses(family: int) -> list[str]:
    """Every address of this node (what ``-m addrtype --dst-type LOCAL`` matches) — blocking netlink dump."""
    from proxyd.nodeaddrs import local_addresses

    return list(local_addresses(family=family))


class IptablesMode(ProxyMode):
    """Services realised as iptables NAT rules (kube-proxy's default mode)."""

    name = "iptables"

    def __init__(self, config: Config, *, backend: Backend | None = None, family: int = 4) -> None:
        super().__init__(config)
        self.family = family
        self._backend = backend
        self.applier: Applier | None = None
        self.planner = Planner(PlannerOptions(
            family=family, cluster_cidrs=config.cluster_cidrs, masquerade_all=config.masquerade_all,
            masquerade_bit=config.masquerade_bit, nodeport_addresses=config.nodeport_addresses))
        self._ports: Mapping[ServicePortName, ServicePort] = {}
        self._synced = False
        self.last_plan: Plan | None = None

    async def start(self) -> None:
        backend = self._backend or await asyncio.to_thread(detect, family=self.family)
        self.applier = Applier(backend)
        log.info("iptables: using the %s back end", backend.name)
        node_ips, primary = await asyncio.to_thread(_node_addresses, self.config.nodeport_addresses,
                                                    self.family)
        fields = {f: getattr(self.planner.options, f) for f in PlannerOptions.__dataclass_fields__}
        fields.update(node_ips=tuple(node_ips), node_ip=primary,
                      chunk_rules=backend.chunk_lines)
        self.planner = Planner(PlannerOptions(**fields))
        await self.applier.ensure_canaries()

    async def sync(self, request: SyncRequest) -> None:
        if self.applier is None:
            await self.start()
        assert self.applier is not None
        applier = self.applier
        full = request.changed is None or self.planner.needs_full
        if not full and not await applier.canary_present():
            log.warning("iptables: canary chain gone (tables flushed by someone else?): full resync")
            self.planner.invalidate()
            full = True
        if self.config.nodeport_addresses:
            node_ips, _ = await asyncio.to_thread(_node_addresses, self.config.nodeport_addresses,
                                                  self.family)
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
        plan = self.planner.plan(request.state, None if full else request.changed, existing_chains=existing)
        try:
            for chunk in plan.chunks:
                await applier.restore(chunk)
        except Exception:
            metrics.IPTABLES_RESTORE_FAILURES.inc()
            if not plan.full:
                metrics.IPTABLES_PARTIAL_RESTORE_FAILURES.inc()
            # A failed transaction changed nothing, so the cache still
            # describes the kernel; with a chunked full plan, earlier chunks
            # may have rewritten some services (each one whole). Either way
            # the next sync is full and re-reads which chains exist.
            self.planner.invalidate()
            raise
        old_renders = self.planner.cache
        old_ports = self._ports
        self.planner.commit(plan)
        self.last_plan = plan
        # Other-family ports have no rendering, so conntrack cleanup never
        # looks at them: no need to filter (which would cost O(services)).
        new_ports = request.state.services
        self._ports = new_ports
        metrics.IPTABLES_TOTAL_RULES.labels("filter").set(plan.filter_rules)
        metrics.IPTABLES_TOTAL_RULES.labels("nat").set(plan.nat_rules)
        if self._synced:
            # On the first sync after a start nothing is known about what
            # conntrack holds; clearing every UDP service would break flows
            # that the adopted rules still serve correctly.
            await self._clear_conntrack(plan, old_ports, old_renders, new_ports)
        self._synced = True

    async def _clear_conntrack(self, plan: Plan, old_ports: Mapping[ServicePortName, ServicePort],
                               old_renders: Mapping,
                               new_ports: Mapping[ServicePortName, ServicePort]) -> None:
        names = set(plan.rerendered) | set(plan.removed)
        if plan.full:
            names |= set(old_ports)
        flows = conntrack.stale_flows(names, old_ports=old_ports, old_renders=old_renders,
                                      new_ports=new_ports, new_renders=plan.cache)
        if not flows:
            return
        try:
            deleted = await asyncio.to_thread(conntrack.clear, flows, family=self.family)
            log.debug("iptables: deleted %d stale UDP conntrack entries", deleted)
        except Exception as err:
            log.warning("iptables: stale UDP conntrack cleanup failed: %s", err)

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
        problems: list[str] = []
        for name in BACKENDS:
            for family in (4, 6):
                backend = Backend(name, family)
                if shutil.which(backend.save[0]) is None:
                    continue
                problems += await Applier(backend).cleanup()
        for p in problems:
            log.warning("iptables cleanup: %s", p)
