"""nftables mode: kube-proxy's nftables proxier on a compact map-based ruleset.

Each sync turns the desired state into one nft transaction (``planner``:
only the elements and chains that differ), applies it (``applier``) and
then deletes stale UDP conntrack entries (iptables mode's ``conntrack``
helper, shared). The life cycle:

* start: nothing is flushed. Rules a previous run left keep serving until
  the first sync, which is full: it rewrites the table in one atomic
  transaction (no traffic gap) and empties dynamic chains nobody wants any
  more (deleted by the next sync).
* full sync (first, hourly, after a failure, after the table vanished):
  list our chain names once, then rewrite everything.
* every other sync: check the canary set (cheap); if the table was
  deleted or flushed behind our back, the sync becomes full and repairs
  it. Otherwise only differences are sent; the table is never listed.
* a failed transaction changes nothing in the kernel (nor in the planner's
  mirror, which adopts only committed plans); it is counted, a failed
  partial one is retried at once as a full one, and if that fails too the
  ports of the transaction are bisected (``proxyd.quarantine.isolate_ports``): the
  refused ports are quarantined with their last good elements (none if new),
  the others applied. Only a node-wide failure goes to the runner, which
  retries with back-off.
* shutdown leaves the table so traffic keeps flowing; ``cleanup`` deletes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from proxyd import metrics
from proxyd.config import Config
from proxyd.introspect import ModeStatus, TracePacket, TraceResult
from proxyd.model import Protocol, ProxyState, ServiceName, ServicePort, ServicePortName
from proxyd.modes.base import AppliedMode, SyncRequest
from proxyd.modes.iptables import conntrack
from proxyd.modes.iptables.mode import _node_addresses as iptables_node_addresses
from proxyd.modes.iptables.mode import family_cidrs
from proxyd.modes.iptables.planner import PortRender
from proxyd.modes.nftables import layout as lay
from proxyd.modes.nftables.applier import Applier
from proxyd.modes.nftables.libnft import Nft
from proxyd.modes.nftables.planner import Plan, Planner, PlannerOptions
from proxyd.quarantine import hold_back, isolate_ports

log = logging.getLogger(__name__)

# PROXYD_NFT_BACKEND=subprocess forces `nft -f -` (tests and bench compare both).
BACKEND_ENV = "PROXYD_NFT_BACKEND"


# (addresses accepting NodePorts, primary node address): the same answer as iptables mode's.
_node_addresses = iptables_node_addresses


@dataclass(slots=True)
class _Track:
    """What the plans applied during one sync touched, for stale UDP conntrack cleanup."""

    old_renders: dict[ServicePortName, PortRender]
    new_renders: dict[ServicePortName, PortRender]
    touched: set[ServicePortName]
    synced: bool


class NftablesMode(AppliedMode[Applier]):
    """Services realised as elements of a few nftables maps."""

    name = "nftables"
    # One instance per family (its ``ip`` / ``ip6 proxyd`` table) behind ``DualStackMode``, as
    # kube-proxy's nftables mode runs one proxier per family.
    per_family = True

    def __init__(self, config: Config, *, family: int = 4, nft: Nft | None = None) -> None:
        super().__init__(config)
        self.family = family
        self._nodeport_cidrs = family_cidrs(config.nodeport_addresses, family)
        self._nft = nft
        self.applier: Applier | None = None
        self.planner = Planner(self._options(node_ips=(), node_ip=None))
        self._ports: Mapping[ServicePortName, ServicePort] = {}
        self._good = ProxyState()  # what the kernel last accepted (quarantined ports keep it)
        self._synced = False
        self._replaced = False  # the table was replaced whole once since start (see sync)
        self.last_plan: Plan | None = None

    def _options(self, *, node_ips: tuple[str, ...], node_ip: str | None) -> PlannerOptions:
        c = self.config
        return PlannerOptions(family=self.family, cluster_cidrs=c.cluster_cidrs,
                              masquerade_all=c.masquerade_all, masquerade_bit=c.masquerade_bit,
                              nodeport_addresses=self._nodeport_cidrs,
                              node_ips=node_ips, node_ip=node_ip)

    async def start(self) -> None:
        nft = self._nft or Nft(os.environ.get(BACKEND_ENV) or None)
        self.applier = Applier(lay.Family(self.family), nft)
        log.info("nftables: driving %s through %s", lay.Family(self.family).table, nft.backend)
        node_ips, primary = await asyncio.to_thread(_node_addresses, self._nodeport_cidrs, self.family)
        self.planner = Planner(self._options(node_ips=tuple(node_ips), node_ip=primary))

    async def sync(self, request: SyncRequest) -> None:
        applier = await self.started_applier()
        full = request.changed is None or self.planner.needs_full
        present = await applier.canary_present()
        if not full and not present:
            log.warning("nftables: table %s was deleted or flushed behind our back: full resync",
                        lay.Family(self.family).table)
            metrics.NFTABLES_REPAIRS.inc()
            self.planner.invalidate()
            full = True
        if self._nodeport_cidrs:
            node_ips, _ = await asyncio.to_thread(_node_addresses, self._nodeport_cidrs, self.family)
            self.planner.set_node_ips(node_ips)
        stale = await self._stale() if full and present else set()
        retried = request.ports_to_plan(self._ports.keys()) if not full else None
        desired = hold_back(request.state, self._good, self.quarantine.held(retried))
        old_ports = self._ports
        old_renders: dict[ServicePortName, PortRender] = {}
        new_renders: dict[ServicePortName, PortRender] = {}
        touched: set[ServicePortName] = set()
        track = _Track(old_renders, new_renders, touched, self._synced)
        err = await self._attempt(desired, None if full else request.changed, stale, track)
        refused: dict[ServicePortName, str] = {}
        if err is not None:
            metrics.NFTABLES_SYNC_FAILURES.inc()
            if not full:
                # The mirror may not describe the kernel: a full transaction settles that before any
                # service is blamed.
                self.planner.invalidate()
                stale = await self._stale()
                err = await self._attempt(desired, None, stale, track)
        if err is not None and not self._replaced:
            # Every full transaction fails on a table whose maps an older proxyd declared otherwise
            # (nft will not redefine a map): replace the whole table, atomically, once per start,
            # before blaming any service.
            self._replaced = True
            log.warning("nftables: full transaction refused (%s); replacing table %s in one transaction",
                        err.strip().splitlines()[-1] if err.strip() else err, lay.Family(self.family).table)
            self.planner.invalidate()
            err = await self._attempt(desired, None, set(), track, replace=True)
        if err is not None:
            refused = await isolate_ports(
                self.name, "transaction failed", err, fam=self.family, desired=desired,
                good=lambda: self._good, retried=retried, invalidate=self.planner.invalidate,
                apply=lambda state, include: self._attempt(
                    state, frozenset(n.service for n in include), stale, track))
        self.quarantine.settle(retried, refused)
        self._ports = self._good.service_ports
        if self._synced:
            # On the first sync after a start nothing is known about what
            # conntrack holds: clearing every UDP service would break flows
            # the adopted rules still serve correctly.
            await self._clear_conntrack(touched | (set(old_ports) if full else set()), old_ports,
                                        old_renders, new_renders)
        self._synced = True

    async def _stale(self) -> set[str]:
        assert self.applier is not None
        return {c for c in await self.applier.chains() if lay.is_dynamic_chain(c) or c in lay.RETIRED_CHAINS}

    async def _attempt(self, state: ProxyState, changed: frozenset[ServiceName] | None, stale: set[str],
                       track: _Track, *, replace: bool = False) -> str | None:
        """Plan ``state`` and apply it in one transaction; None once applied, else the kernel's refusal.

        The planner's mirror adopts a plan only once the kernel committed it
        (a failed transaction changes nothing, in the kernel or the mirror).
        """
        assert self.applier is not None
        try:
            if changed is None or self.planner.needs_full:
                stale_sets = {lay.AFFINITY_PREFIX + c[len(lay.ENDPOINT_PREFIX):]
                              for c in stale if c.startswith(lay.ENDPOINT_PREFIX)}
                # Rendering every service takes ~0.5 s of CPU at 10,000: keep the event loop
                # (health, metrics, the source) responsive. Partial plans take well under a ms.
                plan = await asyncio.to_thread(self.planner.plan, state, None, stale_chains=stale,
                                               stale_sets=stale_sets, replace=replace)
            else:
                plan = self.planner.plan(state, changed)
            if not plan.empty:
                await self.applier.apply(plan.text)
        except Exception as err:
            return str(err) or type(err).__name__
        if plan.conflicts:
            log.warning("nftables: %d elements claimed by two service ports (same address, protocol and "
                        "port); the first port keeps them", plan.conflicts)
        names = set(plan.rerendered) | set(plan.removed) | (set(self._ports) if plan.full else set())
        if track.synced:
            # Only UDP ports need conntrack cleanup: re-render just those of the committed state,
            # once (the first plan of a sync holds the state before it).
            for name in names:
                if name.protocol == Protocol.UDP and name not in track.old_renders:
                    render = self.planner.committed_render(name)
                    if render is not None:
                        track.old_renders[name] = render
        self.planner.commit(plan)
        self.last_plan = plan.applied()
        self._good = state
        track.touched.update(names)
        track.new_renders.update((n, p.render) for n, p in plan.ports.items())
        for name in plan.removed:
            track.new_renders.pop(name, None)
        return None

    async def _clear_conntrack(self, names: set[ServicePortName],
                               old_ports: Mapping[ServicePortName, ServicePort],
                               old_renders: Mapping[ServicePortName, PortRender],
                               new_renders: Mapping[ServicePortName, PortRender]) -> None:
        await conntrack.clear_stale(self.name, self.family, names, old_ports=old_ports,
                                    old_renders=old_renders, new_ports=self._ports, new_renders=new_renders)

    async def status(self, names: Collection[ServicePortName] | None = None) -> ModeStatus:
        """Per-endpoint counters of the backends maps and kernel-versus-last-sync (``status.py``)."""
        from proxyd.modes.nftables import status

        if self.applier is None or not self._synced:
            return ModeStatus(matches=None, notes=["nftables: no sync yet: nothing to compare with"])
        before = self.last_plan
        result = await status.read_status(self.applier.nft, self.planner, self._good, names,
                                          run=asyncio.to_thread)
        if self.last_plan is not before:
            result.matches = None
            result.mismatches.clear()
            result.notes.append("a sync committed during the read: run status again to compare")
        return result

    async def trace(self, packet: TracePacket) -> TraceResult:
        """The packet walked through the table read back from the kernel now (``status.py``)."""
        from proxyd.modes.iptables.mode import _all_local_addresses
        from proxyd.modes.nftables import status

        if self.applier is None:
            return TraceResult(supported=False, notes=["nftables: not started yet"])
        node_ips = await asyncio.to_thread(_all_local_addresses, self.family)
        before = self.last_plan
        result = await asyncio.to_thread(status.trace_now, self.applier.nft, lay.Family(self.family), packet,
                                         node_ips)
        if self.last_plan is not before:
            result.notes.append("a sync committed during the trace: its sets may come from both sides of it")
        return result

    async def shutdown(self) -> None:
        """Leave the table: traffic keeps flowing while proxyd is down."""

    @classmethod
    async def cleanup(cls, config: Config) -> None:
        try:
            nft = Nft(os.environ.get(BACKEND_ENV) or None)
        except OSError as err:
            log.info("nftables cleanup: %s; nothing to do", err)
            return
        problems = await Applier(lay.Family(4), nft).cleanup()
        for p in problems:
            log.warning("nftables cleanup: %s", p)
        if problems:
            raise RuntimeError("; ".join(problems))
