"""Holding service addresses on this node: ``local`` routes via the port-less bridge ``proxyd0``.

Method: every ClusterIP, externalIP and LB ingress IP, IPv4 or IPv6, gets a
host route of type ``local`` in the kernel's ``local`` table, through
``proxyd0``, a Linux bridge with no ports::

    local 10.96.0.10 dev proxyd0 table local proto static scope host
    local fd00:96::10 dev proxyd0 table local proto static

That route is all that makes an IP local: packets to it, from this node or
routed in from outside, are delivered to the sockets bound to it, and an
IPv4 socket can bind it (an IPv6 one needs ``IPV6_FREEBIND``, which every
listener sets). No address is added to any device, so nothing runs per
address beyond one route insert (an address also joins multicast groups and
runs DAD for IPv6, and the kernel's per-device address list makes each
addition cost more than the one before); service IPs never show up in the
node's address list (``proxyd.nodeaddrs``, NodePort addresses); nothing
answers NDP for them (neighbour solicitations are answered only for
addresses of the receiving device), and ARP answers them exactly as it would
an address on ``proxyd0``: with the default ``arp_ignore=0`` for any local
IP, with ``arp_ignore`` ≥ 1 not at all (kube-proxy's ``strictARP``). The
bridge has no ports, so nothing is ever transmitted through it. (The kernel
here has no ``dummy`` link type, which kube-proxy's ipvs mode uses for the
same purpose with ``kube-ipvs0`` and addresses.)

Ownership: only ``local`` routes through ``proxyd0`` with protocol
``static`` are proxyd's; at start the holder adopts what a previous run
left and afterwards adds or removes only the difference. Routes the kernel
makes for the bridge's own link-local address are ignored. Deleting
``proxyd0`` (``--cleanup``) deletes every route through it. Addresses an
earlier proxyd held on ``proxyd0`` as device addresses are converted to
routes when found (once, at start).

Additions and removals go to the kernel in batches (``proxyd.netlink``),
packed with ``struct`` and acknowledged per chunk (``ack_each=False``):
10,000 routes are a few dozen ``send`` calls, not 10,000 round trips, and
one refused route fails only itself. Every netlink call is blocking and runs
in one dedicated worker thread, so the event loop never waits on the kernel
and calls never interleave.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from proxyd import metrics
from proxyd.model import canonical_ip
from proxyd.netlink import (
    IFF_UP,
    NETLINK_ROUTE,
    BatchSocket,
    address_request,
    dump_addresses,
    dump_local_routes,
    link_state,
    local_route_request,
)

log = logging.getLogger(__name__)

DEVICE = "proxyd0"
ENOENT, EEXIST, EADDRNOTAVAIL, ENODEV = 2, 17, 99, 19

T = TypeVar("T")


class AddressHolder:
    """Owns the service IPs routed locally via ``proxyd0``; create with ``ensure()``, then ``apply()`` sets.

    Addresses are text, IPv4 or IPv6 (canonical after the first ``apply``).
    """

    def __init__(self, device: str = DEVICE) -> None:
        self.device = device
        self.current: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._index: int | None = None
        self.failed: dict[str, int] = {}  # address -> errno of its last failed add
        self._sock: BatchSocket | None = None  # opened and used in the worker thread only

    async def _call(self, func: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, func)

    async def ensure(self) -> set[str]:
        """Create (if missing) and bring up the device; adopt and return the service IPs on it."""
        before = self.current
        self._index, self.current = await self._call(self._ensure_sync)
        # Logged when the kernel held other than proxyd thought (a start, or routes changed behind its
        # back), not at every full sync.
        if self.current != before:
            if before:
                log.warning("%s holds %d service addresses, not the %d proxyd held (%d missing, %d extra)",
                            self.device, len(self.current), len(before), len(before - self.current),
                            len(self.current - before))
            else:
                log.info("adopted %d service addresses routed via %s", len(self.current), self.device)
        return set(self.current)

    async def check(self) -> bool:
        """Re-create (or bring up) and re-adopt the device if someone removed it (or set it down).

        True when it was intact. One netlink request on the batch socket: a
        partial sync pays well under a millisecond for it. A device set down
        loses its IPv6 routes (the kernel flushes them), so it counts as gone.
        """
        def intact() -> bool:
            if self._index is None:
                return False
            state = link_state(self._batch_socket(), self._index)
            return state is not None and state[0] == self.device and bool(state[1] & IFF_UP)

        if await self._call(intact):
            return True
        log.warning("%s was missing or down; recreating it", self.device)
        await self.ensure()
        return False

    def _ensure_sync(self) -> tuple[int, set[str]]:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.device)
            if not found:
                try:
                    ipr.link("add", ifname=self.device, kind="bridge")
                except NetlinkError as err:
                    if err.code != EEXIST:
                        raise
                found = ipr.link_lookup(ifname=self.device)
            index = found[0]
            ipr.link("set", index=index, state="up")
        sock = self._batch_socket()
        _convert_device_addresses(sock, index, self.device)
        return index, _held(sock, index)

    async def apply(self, desired: Iterable[str]) -> tuple[int, int]:
        """Add what is missing and remove what is extra; (added, removed).

        An address the kernel refuses is logged and left out (``failed``); a
        vanished device or a failed removal raises, failing the sync.
        """
        current = self.current
        # What ``current`` holds is canonical already: only new text needs parsing (10k per sync else).
        want = {ip if ip in current else canonical_ip(ip) for ip in desired}
        for ip in [ip for ip in self.failed if ip not in want]:
            del self.failed[ip]
        if self._index is None:
            await self.ensure()  # (re)creates the device and re-reads what it holds
        return await self._change(want - self.current, self.current - want)

    async def update(self, *, add: Iterable[str], remove: Iterable[str]) -> tuple[int, int]:
        """Add and remove just these addresses (a partial sync); (added, removed).

        Costs what is passed, not what is held. Errors as ``apply``.
        """
        current = self.current
        add_set = {ip if ip in current else canonical_ip(ip) for ip in add} - current
        remove_set = {ip if ip in current else canonical_ip(ip) for ip in remove} & current
        remove_set -= add_set
        if self._index is None:
            await self.ensure()
            add_set -= self.current
            remove_set &= self.current
        return await self._change(add_set, remove_set)

    async def _change(self, add: set[str], remove: set[str]) -> tuple[int, int]:
        """Send these changes, if any; (added, removed)."""
        if not add and not remove:
            return 0, 0
        try:
            await self._call(lambda: self._apply_sync(add, remove))
        except NetlinkError as err:
            if err.code == ENODEV:
                self._index = None  # recreate the device at the next apply
            raise
        return len(add), len(remove)

    def _apply_sync(self, add: set[str], remove: set[str]) -> None:
        assert self._index is not None
        index = self._index
        sock = self._batch_socket()
        # Removal first: an address moving between services is then never
        # held twice. One batch each way; a refused address fails only itself.
        if remove:
            requests = [local_route_request(False, index, ip) for ip in sorted(remove)]
            result = sock.run(requests, log_failures=False, ack_each=False)
            failed = {f.subject: f for f in result.failures}
            self.current.difference_update(ip for ip in remove if ip not in failed)
            if failed:
                first = next(iter(failed.values()))
                raise NetlinkError(first.code, f"cannot remove {len(failed)} addresses from {self.device}: "
                                               f"{first}")
        if add:
            requests = [local_route_request(True, index, ip) for ip in sorted(add)]
            result = sock.run(requests, log_failures=False, ack_each=False)
            refused = {str(f.subject): f for f in result.failures}
            gone = [f for f in refused.values() if f.code == ENODEV]
            for ip in add:
                failure = refused.get(ip)
                if failure is None:
                    self.failed.pop(ip, None)
                    self.current.add(ip)
                elif failure.code != ENODEV:
                    # One address the kernel refuses (IPv6 disabled, say) must
                    # not stop every other service: log it once, retry next sync.
                    if self.failed.get(ip) != failure.code:
                        log.error("cannot add %s to %s: %s", ip, self.device, failure)
                        metrics.NETLINK_FAILURES.labels(kind="address").inc()
                    self.failed[ip] = failure.code
            if gone:
                raise NetlinkError(ENODEV, f"{self.device} went away")  # the retry recreates it

    def _batch_socket(self) -> BatchSocket:
        if self._sock is None:
            self._sock = BatchSocket(NETLINK_ROUTE, kind="address")
        return self._sock

    def close(self) -> None:
        def close_socket() -> None:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

        self._pool.submit(close_socket)
        self._pool.shutdown(wait=False)

    @staticmethod
    def delete_device(device: str = DEVICE) -> bool:
        """Delete the holder device (blocking; for cleanup). True when it existed."""
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=device)
            if not found:
                return False
            try:
                ipr.link("del", index=found[0])
            except NetlinkError as err:
                if err.code != ENODEV:
                    raise
                return False
            return True


def _held(sock: BatchSocket, index: int) -> set[str]:
    """The service IPs proxyd's ``local`` routes via link ``index`` hold, as canonical text."""
    return {canonical_ip(ip) for _family, ip in dump_local_routes(sock, index)}


def _device_addresses(sock: BatchSocket, index: int) -> list[str]:
    """Host addresses (not link-local) on link ``index``: what an earlier proxyd held as addresses."""
    out = []
    for _family, prefixlen, addr in dump_addresses(sock, index):
        ip = ipaddress.ip_address(addr)
        if not ip.is_link_local and prefixlen == ip.max_prefixlen:
            out.append(str(ip))
    return out


def _convert_device_addresses(sock: BatchSocket, index: int, device: str) -> None:
    """Turn service addresses an earlier proxyd put on ``device`` into ``local`` routes (once).

    The address goes first (its own ``local`` route would refuse ours as
    existing), then the route: each IP is not local for the time between
    the two batches (milliseconds), once, at the first start after an
    upgrade. A failure is logged; the sync then adds whatever is missing.
    """
    legacy = _device_addresses(sock, index)
    if not legacy:
        return
    removed = sock.run([address_request(False, index, ip) for ip in legacy], ack_each=False)
    gone = [ip for ip in legacy if ip not in removed.failed_subjects]
    added = sock.run([local_route_request(True, index, ip) for ip in gone], ack_each=False)
    log.info("converted %d service addresses on %s into local routes (%d failed)", len(gone), device,
             len(removed.failures) + len(added.failures))
