"""Userspace mode's applier: the kernel side of a plan (service addresses on ``proxyd0``, listening sockets).

The mode decides (``planner``) and moves the endpoint tables; this object
holds what the kernel holds for it: the addresses on ``proxyd0``
(``addresses.AddressHolder``) and one listening socket per service
``ip:port`` and NodePort. A listener that cannot be opened (port taken by
another program) is logged once and retried at every sync; it does not fail
the sync, like kube-proxy userspace's per-port errors.
"""

from __future__ import annotations

import logging
from collections.abc import Set

from proxyd.model import Protocol
from proxyd.modes.userspace.addresses import AddressHolder
from proxyd.modes.userspace.listeners import SourceFilter, open_socket
from proxyd.modes.userspace.planner import ListenerKey, Plan
from proxyd.modes.userspace.tcp import TcpListener, TcpProxy
from proxyd.modes.userspace.udp import UdpListener, UdpProxy

log = logging.getLogger(__name__)


class Applier:
    """Service addresses and listening sockets of userspace mode."""

    def __init__(self, holder: AddressHolder | None = None) -> None:
        self.holder = holder or AddressHolder()
        self.tcp_listeners: dict[ListenerKey, TcpListener] = {}
        self.udp_listeners: dict[ListenerKey, UdpListener] = {}
        self._bind_errors: dict[ListenerKey, str] = {}

    async def start(self) -> None:
        await self.holder.ensure()

    async def check_addresses(self, *, full: bool) -> None:
        """Full: re-read what the kernel really holds; else the cheap check (device and addresses there)."""
        if full:
            await self.holder.ensure()
        else:
            await self.holder.check()

    async def add_addresses(self, addresses: Set[str]) -> None:
        """Hold ``addresses`` as well as the current ones (new listeners need them first)."""
        await self.holder.apply(self.holder.current | addresses)

    async def set_addresses(self, addresses: Set[str]) -> None:
        """Hold exactly ``addresses`` (old ones go last, after their listeners closed)."""
        await self.holder.apply(addresses)

    def update_listeners(self, plan: Plan, tcp: TcpProxy, udp: UdpProxy) -> None:
        """Open the listeners ``plan`` wants, close the others, set their source filters."""
        for current in (self.tcp_listeners, self.udp_listeners):
            for key in [k for k in current if k not in plan.listeners]:
                current.pop(key).close()
        for key, table_key in plan.listeners.items():
            current = self.tcp_listeners if key.protocol == Protocol.TCP else self.udp_listeners
            listener = current.get(key)
            if listener is not None:
                if listener.key != table_key:
                    listener.retarget(table_key)
                continue
            if key.protocol not in (Protocol.TCP, Protocol.UDP):
                self._bind_failed(key, "userspace mode serves only TCP and UDP")
                continue
            try:
                sock = open_socket(key)
            except OSError as err:
                self._bind_failed(key, err.strerror or str(err))
                continue
            self._bind_errors.pop(key, None)
            if key.protocol == Protocol.TCP:
                self.tcp_listeners[key] = TcpListener(proxy=tcp, sock=sock, key=table_key)
            else:
                self.udp_listeners[key] = UdpListener(proxy=udp, sock=sock, key=table_key)
        for key in [k for k in self._bind_errors if k not in plan.listeners]:
            del self._bind_errors[key]
        for current in (self.tcp_listeners, self.udp_listeners):
            for key, listener in current.items():
                ranges = plan.source_ranges.get(key)
                have = listener.admits.ranges if isinstance(listener.admits, SourceFilter) else None
                if ranges != have:
                    listener.admits = SourceFilter(ranges) if ranges else None

    def _bind_failed(self, key: ListenerKey, why: str) -> None:
        if self._bind_errors.get(key) != why:
            log.error("userspace: cannot listen on %s: %s (retried at every sync)", key, why)
        self._bind_errors[key] = why

    def close_listeners(self) -> None:
        for current in (self.tcp_listeners, self.udp_listeners):
            for listener in current.values():
                listener.close()
            current.clear()

    def close(self) -> None:
        self.holder.close()
