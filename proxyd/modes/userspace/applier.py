"""Userspace mode's applier: the kernel side of a plan (service addresses on ``proxyd0``, listening sockets).

The mode decides (``planner``) and moves the endpoint tables; this object
holds what the kernel holds for it: the service addresses, local routes via
``proxyd0`` (``addresses.AddressHolder``), and one listening socket per service
``ip:port`` and NodePort. A listener that cannot be opened (port taken by
another program, no NET_BIND_SERVICE, no room in the descriptor budget) is
logged once and retried at every sync; it does not fail the sync, like
kube-proxy userspace's per-port errors, and it is named in /healthz
(``listen_failures``) and counted in ``proxyd_listen_failures``.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter
from collections.abc import Iterable

from proxyd import metrics
from proxyd.logformat import event
from proxyd.model import Protocol
from proxyd.modes.userspace.addresses import AddressHolder
from proxyd.modes.userspace.engine import TcpListenerLike, TcpPath
from proxyd.modes.userspace.listeners import OwnListeners, SourceFilter, nonlocal_bind, open_socket
from proxyd.modes.userspace.planner import ListenerKey, Plan, TableKey
from proxyd.modes.userspace.udp_engine import UdpListenerLike, UdpPath

log = logging.getLogger(__name__)

BUDGET_REFUSAL = "no room in the descriptor budget"


def _reason(err: OSError) -> str:
    """The ``proxyd_listen_failures`` reason of a failed bind or listen."""
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission"
    if err.errno == errno.EADDRINUSE:
        return "address_in_use"
    if err.errno in (errno.EMFILE, errno.ENFILE):
        return "descriptors"
    return "other"


class Applier:
    """Service addresses and listening sockets of userspace mode."""

    def __init__(self, holder: AddressHolder | None = None) -> None:
        self.holder = holder or AddressHolder()
        self.tcp_listeners: dict[ListenerKey, TcpListenerLike] = {}
        self.udp_listeners: dict[ListenerKey, UdpListenerLike] = {}
        self._bind_errors: dict[ListenerKey, tuple[str, str]] = {}  # key -> (metric reason, text)
        self._over_budget = 0
        self._failure_reasons: set[str] = set()

    @property
    def bind_errors(self) -> list[ListenerKey]:
        """Listeners not open (retried at every sync)."""
        return list(self._bind_errors)

    def update_listeners(self, plan: Plan, keys: Iterable[ListenerKey], tcp: TcpPath, udp: UdpPath) -> None:
        """Open, retarget, re-filter or close the listeners ``keys`` as ``plan`` wants them."""
        keys = list(keys)
        for key in keys:
            if key not in plan.listeners:
                current = self.tcp_listeners if key.protocol == Protocol.TCP else self.udp_listeners
                gone = current.pop(key, None)
                if gone is not None:
                    gone.close()
                self._bind_errors.pop(key, None)
        # Listeners share the descriptor budget with connections; /healthz, /metrics, the source and
        # netlink keep a reserve neither may take. Ports that do not fit wait for room (next syncs).
        room = tcp.listener_room(len(self.tcp_listeners) + len(self.udp_listeners))
        over: list[ListenerKey] = []
        for key in keys:
            table_key = plan.listeners.get(key)
            if table_key is None:
                continue
            listener: TcpListenerLike | UdpListenerLike | None = (
                self.tcp_listeners.get(key) if key.protocol == Protocol.TCP else self.udp_listeners.get(key))
            if listener is None:
                if key.protocol not in (Protocol.TCP, Protocol.UDP):
                    self._bind_failed(key, "userspace mode serves only TCP and UDP", "protocol", table_key)
                    continue
                if room <= 0:
                    over.append(key)
                    self._bind_errors[key] = ("descriptors", BUDGET_REFUSAL)
                    continue
                try:
                    sock = open_socket(key)
                except OSError as err:
                    self._bind_failed(key, err.strerror or str(err), _reason(err), table_key)
                    continue
                room -= 1
                self._bind_errors.pop(key, None)
                if key.protocol == Protocol.TCP:
                    listener = self.tcp_listeners[key] = tcp.listen(sock, table_key)
                else:
                    listener = self.udp_listeners[key] = udp.listen(sock, table_key)
            elif listener.key != table_key:
                listener.retarget(table_key)
            ranges = plan.source_ranges.get(key)
            have = listener.admits.ranges if isinstance(listener.admits, SourceFilter) else None
            if ranges != have:
                listener.admits = SourceFilter(ranges) if ranges else None
        if len(over) != self._over_budget:
            if over:
                log.error("userspace: descriptor budget (limit %d) full: %d listeners not opened (first %s); "
                          "retried at every sync", tcp.fd_limit, len(over), over[0])
            elif self._over_budget:
                log.info("userspace: every listener fits the descriptor budget again")
            self._over_budget = len(over)
        reasons = Counter(reason for reason, _ in self._bind_errors.values())
        for reason in {*reasons, *self._failure_reasons}:
            metrics.LISTEN_FAILURES.labels(reason).set(reasons.get(reason, 0))
        self._failure_reasons = set(reasons)

    def _bind_failed(self, key: ListenerKey, why: str, reason: str, owner: TableKey | None = None) -> None:
        if self._bind_errors.get(key) != (reason, why):
            log.error("userspace: cannot listen on %s: %s (retried at every sync)", key, why,
                      extra=event(service=None if owner is None else str(owner.name), endpoint=key,
                                  reason=reason))
        self._bind_errors[key] = (reason, why)

    def listen_failures(self) -> dict[str, str]:
        """Service listeners that are not open, and why (for /healthz)."""
        return {str(key): why for key, (_, why) in sorted(self._bind_errors.items())}

    def guard_own_listeners(self, plan: Plan, node_ips: list[str], tcp: TcpPath, udp: UdpPath) -> None:
        """Tell the data path which sockets are its own, so it never connects or sends to them."""
        local = [*node_ips, *self.holder.current, *plan.addresses]
        loose = nonlocal_bind()
        tcp.own = OwnListeners(list(self.tcp_listeners), local, nonlocal_bind=loose)
        udp.own = OwnListeners(list(self.udp_listeners), local, nonlocal_bind=loose)

    def close_listeners(self) -> None:
        for current in (self.tcp_listeners, self.udp_listeners):
            for listener in current.values():
                listener.close()
            current.clear()

    def close(self) -> None:
        self.holder.close()
