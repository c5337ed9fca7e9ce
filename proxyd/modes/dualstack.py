"""One proxier per address family behind one mode: kube-proxy's meta-proxier.

Modes that realise one family per instance (``ProxyMode.per_family``:
iptables with ``iptables``/``ip6tables``, nftables with its ``ip``/``ip6``
tables, ipvs with per-family ipsets) run as one instance per family the node
serves. Each instance sees only its family's view of the desired state
(``SyncRequest.for_family``; partial requests patch the previous views,
``familyviews``), so planners stay single-family and a dual-stack
service is served on both of its cluster IPs, each with its own family's
endpoints.

Which families a node serves is decided once at start (``node_families``):
IPv4 always, IPv6 when the kernel has it enabled. A node without IPv6 serves
IPv4 only and says so once; each service port that then has no cluster IP of
a served family is logged once ("IPv6 is not served on this node: ns/name:port
not proxied") and counted in ``proxyd_ignored_objects_total{kind="Service",
reason="family_not_served"}``, again only if it goes away and comes back.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from proxyd import metrics
from proxyd.introspect import ModeStatus, TracePacket, TraceResult
from proxyd.logformat import event
from proxyd.model import family
from proxyd.modes.base import ProxyMode, SyncRequest, mode_class
from proxyd.modes.familyviews import FamilyViews

if TYPE_CHECKING:
    from proxyd.config import Config
    from proxyd.model import ServicePortName

log = logging.getLogger(__name__)

UNSERVED_REASON = "family_not_served"

# Present when the kernel has IPv6 and it is not disabled for this namespace.
_IF_INET6 = "/proc/net/if_inet6"


def node_families(*, if_inet6: str = _IF_INET6) -> tuple[int, ...]:
    """The families this node serves: (4,) or (4, 6)."""
    try:
        with open(if_inet6, "rb"):
            pass
    except OSError:
        return (4,)
    try:
        with open("/proc/sys/net/ipv6/conf/all/disable_ipv6", "rb") as f:
            if f.read().strip() == b"1":
                return (4,)
    except OSError:
        pass
    return (4, 6)


class DualStackMode(ProxyMode):
    """``families`` instances of a per-family mode, synced one after the other with their family's view."""

    def __init__(self, config: Config, mode_cls: type[ProxyMode], families: Sequence[int]) -> None:
        self.name = mode_cls.name
        super().__init__(config)
        if not families:
            raise ValueError("no address family to serve")
        self.families = tuple(families)
        self._views = FamilyViews(self.families)  # each family's view, patched by partial requests
        # One constructor signature for every per-family mode: (config, *, family=4|6).
        self.proxiers: dict[int, ProxyMode] = {fam: mode_cls(config, family=fam)  # type: ignore[call-arg]
                                               for fam in self.families}
        self._source = "manifests" if config.manifests is not None else "kube"
        # Service ports already reported as of a family this node does not serve (logged once each).
        self._unserved: set[ServicePortName] = set()
        if len(self.families) == 1:
            log.info("%s: this node serves IPv%d only (IPv6 is %s); services of the other family are "
                     "not proxied", self.name, self.families[0],
                     "disabled" if self.families == (4,) else "the only family")

    async def start(self) -> None:
        for proxier in self.proxiers.values():
            await proxier.start()

    async def sync(self, request: SyncRequest) -> None:
        if len(self.families) < 2:
            self._report_unserved(request)
        # Every family is attempted even when one fails, so a broken ip6tables does not starve IPv4;
        # the first failure is raised afterwards and the runner retries with a full sync.
        failure: BaseException | None = None
        requests = self._views.split(request)
        for fam, proxier in self.proxiers.items():
            try:
                await proxier.sync(requests[fam])
            except Exception as err:
                log.error("%s: IPv%d sync failed: %s", self.name, fam, err)
                failure = failure or err
        if failure is not None:
            self._views.forget()
            raise failure

    def _report_unserved(self, request: SyncRequest) -> None:
        """Log and count, once per service port, the ports no served family can proxy."""
        ports = request.state.service_ports
        todo = request.ports_to_plan(self._unserved)
        names = ports.keys() if todo is None else todo
        seen: set[ServicePortName] = set()
        for name in names:
            sp = ports.get(name)
            if sp is None or any(family(ip) in self.families for ip in sp.cluster_ips):
                continue
            seen.add(name)
            if name in self._unserved:
                continue
            missing = "/".join(f"IPv{f}" for f in sorted({family(ip) for ip in sp.cluster_ips}))
            log.warning("%s is not served on this node: %s not proxied", missing, name,
                        extra=event(service=str(name), reason=UNSERVED_REASON))
            metrics.IGNORED_OBJECTS.labels(source=self._source, kind="Service", reason=UNSERVED_REASON).inc()
        if todo is None:
            self._unserved = seen
        else:
            self._unserved = (self._unserved - set(todo)) | seen

    def quarantined(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for proxier in self.proxiers.values():
            out.update(proxier.quarantined())
        return out

    def listen_failures(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for proxier in self.proxiers.values():
            out.update(proxier.listen_failures())
        return out

    async def status(self, names: Collection[ServicePortName] | None = None) -> ModeStatus:
        merged = ModeStatus()
        for fam, proxier in self.proxiers.items():
            part = await proxier.status(names)
            merged.supported = merged.supported and part.supported
            if part.matches is False:
                merged.matches = False
            elif part.matches is True and merged.matches is None:
                merged.matches = True
            for text in part.mismatches:
                merged.mismatch(f"IPv{fam}: {text}")
            for key, per_endpoint in part.counters.items():
                merged.counters.setdefault(key, {}).update(per_endpoint)
            merged.notes.extend(f"IPv{fam}: {note}" for note in part.notes)
            merged.read_seconds += part.read_seconds
        return merged

    async def trace(self, packet: TracePacket) -> TraceResult:
        fam = family(packet.dst)
        proxier = self.proxiers.get(fam)
        if proxier is None:
            return TraceResult(supported=False, notes=[f"this node does not serve IPv{fam}"])
        return await proxier.trace(packet)

    async def shutdown(self) -> None:
        for proxier in self.proxiers.values():
            await proxier.shutdown()

    @classmethod
    async def cleanup(cls, config: Config) -> None:
        """The wrapped mode's cleanup, once: a per-family mode's cleanup removes every family's state."""
        mode_cls = mode_class(config.proxy_mode)
        if not mode_cls.per_family:
            raise ValueError(f"{config.proxy_mode} mode does not run one instance per family")
        await mode_cls.cleanup(config)


def build_mode(config: Config) -> ProxyMode:
    """The mode ``--proxy-mode`` names: per-family modes behind ``DualStackMode``, others as they are."""
    mode_cls = mode_class(config.proxy_mode)
    if mode_cls.per_family:
        return DualStackMode(config, mode_cls, node_families())
    return mode_cls(config)
