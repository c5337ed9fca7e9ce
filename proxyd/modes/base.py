"""The contract between the sync runner and a proxy mode.

Every mode realises the same ``ProxyState``; it differs from the others only
in how. A mode is split into a pure planner (state -> rules/objects, no side
effects) and an applier (the only code that touches the kernel). This module
defines what the daemon calls on a mode; the registry maps ``--proxy-mode``
names to mode classes lazily, so a mode's kernel libraries are imported only
when that mode is used.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Generic, TypeVar

from proxyd.quarantine import Quarantine

if TYPE_CHECKING:
    from proxyd.config import Config
    from proxyd.introspect import ModeStatus, TracePacket, TraceResult
    from proxyd.model import ProxyState, ServiceName, ServicePortName


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """One sync: the full desired state plus what changed since the last one.

    ``changed`` is None for a full sync (first sync, periodic resync, after a
    failure): the mode must then rewrite everything it owns. Otherwise it
    names the services whose ports or endpoints changed, and the mode may
    limit its work to them. ``changed_ports`` (when not None, only with
    ``changed``) indexes the same change by service port: every port that
    appeared, vanished or differs since the previous request. Modes read both
    through ``ports_to_plan``.
    """

    state: ProxyState
    changed: frozenset[ServiceName] | None
    changed_ports: frozenset[ServicePortName] | None = None

    def ports_to_plan(self, known: Iterable[ServicePortName] = ()) -> set[ServicePortName] | None:
        """The service ports a partial sync must re-plan (None for a full sync).

        From the tracker's index (``changed_ports``) when the request has
        it: work proportional to the change. A request naming only services
        (older callers) falls back to scanning the state's ports and
        ``known`` (the ports the mode planned before) for those services.
        """
        if self.changed is None:
            return None
        if self.changed_ports is not None:
            return set(self.changed_ports)
        changed = self.changed
        ports = {n for n in self.state.service_ports if n.service in changed}
        ports.update(n for n in known if n.service in changed)
        return ports

    def for_family(self, fam: int) -> SyncRequest:
        """This request as the proxier of family ``fam`` sees it (``ProxyState.for_family``).

        The change index is kept whole: a changed port the family does not serve (any more) is one
        the family's proxier removes or never had, exactly as a port that vanished.
        """
        return replace(self, state=self.state.for_family(fam))


class ProxyMode(abc.ABC):
    """A way of making services reachable on this node."""

    name: str = ""
    # True for a mode that serves one address family per instance (its constructor takes
    # ``family=4|6``): the daemon then runs one instance per family the node has behind
    # ``proxyd.modes.dualstack.DualStackMode``, as kube-proxy's meta-proxier does.
    per_family: bool = False

    def __init__(self, config: Config) -> None:
        self.config = config
        # Service ports the kernel refused (issue 18): held back, reported in /healthz and metrics.
        self.quarantine = Quarantine(self.name)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare (and adopt what a previous run left) before the first sync."""

    @abc.abstractmethod
    async def sync(self, request: SyncRequest) -> None:
        """Make the kernel/listeners match ``request.state``.

        Raise on failure: the runner keeps the previous state in force from
        the mode's point of view, counts the failure and retries with a full
        sync.
        """

    def quarantined(self) -> dict[str, str]:
        """Service ports held back because the kernel refused them (``ns/name:port/proto`` -> why)."""
        return self.quarantine.report()

    def listen_failures(self) -> dict[str, str]:
        """Sockets the mode should listen on but cannot (``ip:port/proto`` -> why), named in /healthz."""
        return {}

    async def status(self, names: Collection[ServicePortName] | None = None) -> ModeStatus:
        """What the kernel holds, read back now: counters per endpoint, and whether it matches the
        last sync (``proxyd status``). ``names``: only these service ports are asked for (None: all),
        so a mode may read less. Must not block the loop (kernel reads go to a thread)."""
        from proxyd.introspect import unsupported_status

        return unsupported_status(self.name)

    async def trace(self, packet: TracePacket) -> TraceResult:
        """Where ``packet`` would go now, evaluated against state read back from the kernel
        (``proxyd trace``)."""
        from proxyd.introspect import unsupported_trace

        return unsupported_trace(self.name)

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop. Kernel modes leave their rules so traffic keeps flowing."""

    @classmethod
    @abc.abstractmethod
    async def cleanup(cls, config: Config) -> None:
        """Remove everything this mode may ever have created (``--cleanup``)."""


ApplierT = TypeVar("ApplierT")


class AppliedMode(ProxyMode, Generic[ApplierT]):
    """A mode whose applier exists once ``start`` ran (iptables, nftables): the first sync starts it."""

    applier: ApplierT | None = None

    async def started_applier(self) -> ApplierT:
        """The applier, starting the mode first if no sync did yet."""
        if self.applier is None:
            await self.start()
        assert self.applier is not None
        return self.applier


MODES: dict[str, str] = {
    "userspace": "proxyd.modes.userspace:UserspaceMode",
    "iptables": "proxyd.modes.iptables:IptablesMode",
    "ipvs": "proxyd.modes.ipvs:IpvsMode",
    "nftables": "proxyd.modes.nftables:NftablesMode",
}


def mode_class(name: str) -> type[ProxyMode]:
    module_name, _, attr = MODES[name].partition(":")
    cls: type[ProxyMode] = getattr(importlib.import_module(module_name), attr)
    return cls
