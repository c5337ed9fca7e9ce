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
* a failed transaction changes nothing in the kernel; the failure is
  counted, the planner forgets that its mirror is valid (next sync full) and
  the exception goes to the runner, which retries with back-off.
* shutdown leaves the table so traffic keeps flowing; ``cleanup`` deletes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

from proxyd import metrics
from proxyd.config import Config
from proxyd.model import Protocol, ServicePort, ServicePortName
from proxyd.modes.base import ProxyMode, SyncRequest
from proxyd.modes.iptables import conntrack
from proxyd.modes.iptables.mode import _node_addresses as iptables_node_addresses
from proxyd.modes.iptables.planner import PortRender
from proxyd.modes.nftables import layout as lay
from proxyd.modes.nftables.applier import Applier
from proxyd.modes.nftables.libnft import Nft
from proxyd.modes.nftables.planner import Plan, Planner, PlannerOptions

log = logging.getLogger(__name__)

# PROXYD_NFT_BACKEND=subprocess forces `nft -f -` (tests and bench compare both).
BACKEND_ENV = "PROXYD_NFT_BACKEND"


# (addresses accepting NodePorts, primary node address): the same answer as iptables mode's.
_node_addresses = iptables_node_addresses


class NftablesMode(ProxyMode):
    """Services realised as elements of a few nftables maps."""

    name = "nftables"

    def __init__(self, config: Config, *, family: int = 4, nft: Nft | None = None) -> None:
        super().__init__(config)
        self.family = family
        self._nft = nft
        self.applier: Applier | None = None
        self.planner = Planner(self._options(node_ips=(), node_ip=None))
        self._ports: Mapping[ServicePortName, ServicePort] = {}
        self._synced = False
        self.last_plan: Plan | None = None

    def _options(self, *, node_ips: tuple[str, ...], node_ip: str | None) -> PlannerOptions:
        c = self.config
        return PlannerOptions(family=self.family, cluster_cidrs=c.cluster_cidrs,
                              masquerade_all=c.masquerade_all, masquerade_bit=c.masquerade_bit,
                              nodeport_addresses=c.nodeport_addresses,
                              node_ips=node_ips, node_ip=node_ip)

    async def start(self) -> None:
        nft = self._nft or Nft(os.environ.get(BACKEND_ENV) or None)
        self.applier = Applier(lay.Family(self.family), nft)
        log.info("nftables: driving %s through %s", lay.Family(self.family).table, nft.backend)
        node_ips, primary = await asyncio.to_thread(_node_addresses, self.config.nodeport_addresses,
                                                    self.family)
        self.planner = Planner(self._options(node_ips=tuple(node_ips), node_ip=primary))

    async def sync(self, request: SyncRequest) -> None:
        if self.applier is None:
            await self.start()
        assert self.applier is not None
        applier = self.applier
        full = request.changed is None or self.planner.needs_full
        present = await applier.canary_present()
        if not full and not present:
            log.warning("nftables: table %s was deleted or flushed behind our back: full resync",
                        lay.Family(self.family).table)
            metrics.NFTABLES_REPAIRS.inc()
            self.planner.invalidate()
            full = True
        if self.config.nodeport_addresses:
            node_ips, _ = await asyncio.to_thread(_node_addresses, self.config.nodeport_addresses,
                                                  self.family)
            self.planner.set_node_ips(node_ips)
        stale: set[str] = set()
        if full and present:
            stale = {c for c in await applier.chains() if lay.is_dynamic_chain(c)}
        stale_sets = {lay.AFFINITY_PREFIX + c[len(lay.ENDPOINT_PREFIX):]
                      for c in stale if c.startswith(lay.ENDPOINT_PREFIX)}
        if full:
            # Rendering every service takes ~0.5 s of CPU at 10,000: keep the event loop (health,
            # metrics, the source) responsive. Partial plans take well under a millisecond.
            plan = await asyncio.to_thread(self.planner.plan, request.state, None, stale_chains=stale,
                                           stale_sets=stale_sets)
        else:
            plan = self.planner.plan(request.state, request.changed)
        if plan.conflicts:
            log.warning("nftables: %d elements claimed by two service ports (same address, protocol and "
                        "port); the first port keeps them", plan.conflicts)
        if not plan.empty:
            try:
                await applier.apply(plan.text)
            except Exception:
                metrics.NFTABLES_SYNC_FAILURES.inc()
                # The transaction changed nothing; the next sync is full.
                self.planner.invalidate()
                raise
        old_ports = self._ports
        old_renders: dict[ServicePortName, PortRender] = {}
        if self._synced:
            # Only UDP ports need conntrack cleanup: re-render just those of the committed state.
            names = set(plan.rerendered) | set(plan.removed) | (set(old_ports) if plan.full else set())
            for name in names:
                if name.protocol == Protocol.UDP:
                    render = self.planner.committed_render(name)
                    if render is not None:
                        old_renders[name] = render
        self.planner.commit(plan)
        self.last_plan = plan
        self._ports = request.state.service_ports
        if self._synced:
            # On the first sync after a start nothing is known about what
            # conntrack holds: clearing every UDP service would break flows
            # the adopted rules still serve correctly.
            await self._clear_conntrack(plan, old_ports, old_renders)
        self._synced = True

    async def _clear_conntrack(self, plan: Plan, old_ports: Mapping[ServicePortName, ServicePort],
                               old_renders: Mapping[ServicePortName, PortRender]) -> None:
        names = set(plan.rerendered) | set(plan.removed)
        if plan.full:
            names |= set(old_ports)
        new_renders = {n: p.render for n, p in plan.ports.items() if n in names}
        flows = conntrack.stale_flows(names, old_ports=old_ports, old_renders=old_renders,
                                      new_ports=self._ports, new_renders=new_renders)
        if not flows:
            return
        try:
            deleted = await asyncio.to_thread(conntrack.clear, flows, family=self.family)
            log.debug("nftables: deleted %d stale UDP conntrack entries", deleted)
        except Exception as err:
            log.warning("nftables: stale UDP conntrack cleanup failed: %s", err)

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
