"""Holding service addresses on this node: the ``proxyd0`` port-less bridge, over netlink (pyroute2).

Method: every ClusterIP, externalIP and LB ingress IP is added as a host
address (/32, /128 with ``nodad``) to ``proxyd0``, a Linux bridge with no
ports. The kernel then treats those IPs as local (a ``local`` route in the
local table), so proxyd's sockets can bind them and packets to them, from
this node or routed in from outside, are delivered to those sockets. The
bridge has no ports, so nothing is ever transmitted through it. (The kernel
here has no ``dummy`` link type, which kube-proxy's ipvs mode uses for the
same purpose with ``kube-ipvs0``.)

Only addresses on ``proxyd0`` are touched; on start the holder adopts what a
previous run left there and afterwards adds or removes only the difference.
Link-local addresses the kernel puts on the bridge itself are ignored.

Additions and removals go to the kernel in batches (``proxyd.netlink``):
10,000 addresses are a few dozen ``send`` calls, not 10,000 round trips,
and one refused address fails only itself. Every netlink call is blocking
and runs in one dedicated worker thread, so the event loop never waits on
the kernel and calls never interleave.
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
from proxyd.netlink import NETLINK_ROUTE, BatchSocket, address_request, dump_addresses

log = logging.getLogger(__name__)

DEVICE = "proxyd0"
ENOENT, EEXIST, EADDRNOTAVAIL, ENODEV = 2, 17, 99, 19

T = TypeVar("T")


def _host_prefix(ip: str) -> int:
    return 128 if ":" in ip else 32


class AddressHolder:
    """Owns the addresses on ``proxyd0``; create with ``ensure()``, then ``apply()`` desired sets."""

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
        self._index, self.current = await self._call(self._ensure_sync)
        if self.current:
            log.info("adopted %d service addresses on %s", len(self.current), self.device)
        return set(self.current)

    async def check(self) -> bool:
        """Re-create and re-adopt the device if someone removed it; True when it was intact."""
        def lookup() -> list[int]:
            with IPRoute() as ipr:
                return list(ipr.link_lookup(ifname=self.device))

        if self._index is not None and await self._call(lookup) == [self._index]:
            return True
        log.warning("%s was missing; recreating it", self.device)
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
            return index, _service_addresses(self._batch_socket(), index)

    async def apply(self, desired: Iterable[str]) -> tuple[int, int]:
        """Add what is missing and remove what is extra; (added, removed).

        An address the kernel refuses is logged and left out (``failed``); a
        vanished device or a failed removal raises, failing the sync.
        """
        current = self.current
        # What ``current`` holds is canonical already: only new text needs parsing (10k per sync else).
        want = {ip if ip in current else str(ipaddress.ip_address(ip)) for ip in desired}
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
        add_set = {ip if ip in current else str(ipaddress.ip_address(ip)) for ip in add} - current
        remove_set = {ip if ip in current else str(ipaddress.ip_address(ip)) for ip in remove} & current
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
            requests = [address_request(False, index, ip) for ip in sorted(remove)]
            result = sock.run(requests, log_failures=False)
            failed = {f.subject: f for f in result.failures}
            self.current.difference_update(ip for ip in remove if ip not in failed)
            if failed:
                first = next(iter(failed.values()))
                raise NetlinkError(first.code, f"cannot remove {len(failed)} addresses from {self.device}: "
                                               f"{first}")
        if add:
            result = sock.run([address_request(True, index, ip) for ip in sorted(add)], log_failures=False)
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


def _service_addresses(sock: BatchSocket, index: int) -> set[str]:
    out = set()
    for _family, prefixlen, addr in dump_addresses(sock, index):
        ip = ipaddress.ip_address(addr)
        if ip.is_link_local or prefixlen != ip.max_prefixlen:
            continue
        out.add(str(ip))
    return out
