"""Graceful termination of IPVS real servers (kube-proxy's GracefulTerminationManager).

When an endpoint leaves a TCP virtual server its real server is not deleted
at once, which would cut the connections still using it: its weight is set
to 0 (no new connections are scheduled to it) and it joins a queue. A
periodic check deletes each queued real server once the kernel reports no
active and no inactive connection on it. If the endpoint comes back first,
it simply leaves the queue (the mode restores weight 1).

UDP and SCTP real servers are deleted at once, as kube-proxy does: with
``expire_nodest_conn=1`` the kernel drops their stale connection entries at
the next packet, so a flow moves to a live endpoint.

The check is bounded: it runs every ``interval`` seconds, looks at most at
``batch`` queued servers per round (one kernel dump per virtual server, the
deletions in one netlink batch), and
a server still busy after ``max_wait`` seconds is deleted anyway (0 = wait
for ever, kube-proxy's behaviour). All kernel calls go through the
applier's worker thread; callers serialise with the mode's lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxyd.model import Protocol
from proxyd.modes.ipvs.applier import IpvsApplier
from proxyd.modes.ipvs.planner import Op, RealServer, VSKey

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    since: float


class GracefulTerminator:
    """Queue of real servers at weight 0 waiting for their connections to end."""

    def __init__(self, applier: IpvsApplier, *, interval: float = 2.0, batch: int = 500,
                 max_wait: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.applier = applier
        self.interval = interval
        self.batch = batch
        self.max_wait = max_wait
        self.clock = clock
        self.pending: dict[tuple[VSKey, RealServer], _Pending] = {}
        self._task: asyncio.Task[None] | None = None

    def __contains__(self, item: object) -> bool:
        return item in self.pending

    def __len__(self) -> int:
        return len(self.pending)

    async def remove(self, key: VSKey, server: RealServer) -> bool:
        """Start removing ``server`` from ``key``; True when it was deleted at once."""
        if key.protocol is not Protocol.TCP:
            await self._run(Op("delete_dest", (key, server)))
            self.pending.pop((key, server), None)
            return True
        if (key, server) not in self.pending:
            await self._run(Op("set_weight", (key, server, 0)))
            self.pending[(key, server)] = _Pending(self.clock())
        return False

    async def _run(self, *ops: Op) -> set[Op]:
        """Have the applier run ``ops`` (one batch); the refused ones (logged and counted there)."""
        return await self.applier.call(self.applier.apply, list(ops))

    def adopt(self, key: VSKey, server: RealServer) -> None:
        """Queue a real server already at weight 0 (found in the kernel after a restart)."""
        self.pending.setdefault((key, server), _Pending(self.clock()))

    def cancel(self, key: VSKey, server: RealServer) -> bool:
        """The endpoint is back: stop removing it (the caller restores its weight)."""
        return self.pending.pop((key, server), None) is not None

    def forget_server(self, key: VSKey) -> None:
        """The whole virtual server is gone: nothing of it is pending any more."""
        for item in [item for item in self.pending if item[0] == key]:
            del self.pending[item]

    async def check(self) -> list[tuple[VSKey, RealServer]]:
        """One bounded round: delete queued servers without connections; return the deleted ones."""
        deleted: list[tuple[VSKey, RealServer]] = []
        if not self.pending:
            return deleted
        now = self.clock()
        by_server: dict[VSKey, list[RealServer]] = {}
        for key, server in list(self.pending)[: self.batch]:
            by_server.setdefault(key, []).append(server)
        done: list[tuple[VSKey, RealServer]] = []
        for key, servers in by_server.items():
            dests = await self.applier.call(self.applier.read_dests, key)
            for server in servers:
                dest = dests.get(server)
                pending = self.pending.get((key, server))
                if pending is None:
                    continue
                overdue = self.max_wait > 0 and now - pending.since >= self.max_wait
                if dest is None or dest.active + dest.inactive == 0 or overdue:
                    done.append((key, server))
        # Every idle one in one batch; a refused deletion stays queued for the next round.
        refused = await self._run(*(Op("delete_dest", item) for item in done)) if done else set()
        for key, server in done:
            if Op("delete_dest", (key, server)) in refused:
                continue
            del self.pending[(key, server)]
            deleted.append((key, server))
            log.debug("graceful termination: deleted %s from %s", server, key)
        return deleted

    def start(self, lock: asyncio.Lock,
              on_deleted: Callable[[list[tuple[VSKey, RealServer]]], Awaitable[None]] | None = None) -> None:
        """Run ``check`` every ``interval`` seconds under ``lock`` until ``stop``."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(lock, on_deleted), name="ipvs-graceful")

    async def _loop(self, lock: asyncio.Lock,
                    on_deleted: Callable[[list[tuple[VSKey, RealServer]]], Awaitable[None]] | None) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                async with lock:
                    deleted = await self.check()
                    if deleted and on_deleted is not None:
                        await on_deleted(deleted)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed round is retried at the next one
                log.exception("graceful termination check failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
