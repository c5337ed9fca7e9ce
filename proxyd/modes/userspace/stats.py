"""Per-service metrics of the userspace data path, kept off the per-connection path.

``prometheus_client`` takes a lock and checks labels on every ``inc``; at
tens of thousands of connections a second that is a measurable share of the
CPU per connection. So the data path only touches plain ints on a ``Stats``
object bound once per service port:

* active connections/flows: ``proxyd_active_connections`` reads the int at
  scrape time (``set_function``), so it is always exact;
* connections opened and bytes moved: accumulated and added to the
  counters by ``StatsCache.flush()``, which the mode calls every second
  (scrapes lag by at most that); connections also report their bytes every
  few seconds while open, not only at close;
* connect retries and rejections are rare and recorded directly;
* per endpoint (for ``proxyd status``, not exported as metrics: endpoint
  labels would grow without bound): connections opened and bytes each way,
  one dict lookup per event.

With the native engine (``engine.py``) the counts live in C atomics per
table key; ``live`` holds the engine's readers of active connections (the
gauge adds them, so it stays exact), ``add_counts`` takes the deltas the
mode reads every flush, and ``add_endpoint_counts`` the per-endpoint deltas
the engine hands out (so ``by_endpoint`` reads as with the asyncio path).
"""

from __future__ import annotations

from collections.abc import Callable

from proxyd import metrics
from proxyd.model import ServicePortName

TO_ENDPOINT = "to_endpoint"
TO_CLIENT = "to_client"
FLUSH_INTERVAL = 1.0


class Stats:
    """The metrics of one service port (one protocol)."""

    __slots__ = ("_bytes_in", "_bytes_out", "_dirty", "_rejected", "_total", "active", "by_endpoint", "label",
                 "live", "pending_in", "pending_out", "pending_total", "retries")

    def __init__(self, name: ServicePortName, dirty: set[Stats]) -> None:
        self.label = str(name)
        protocol = str(name.protocol)
        self._dirty = dirty
        self.active = 0
        self.pending_total = 0
        self.pending_in = 0
        self.pending_out = 0
        self.live: list[Callable[[], int]] = []
        metrics.ACTIVE_CONNECTIONS.labels(self.label, protocol).set_function(self._active)
        self._total = metrics.CONNECTIONS_TOTAL.labels(self.label, protocol)
        self.retries = metrics.CONNECT_RETRIES.labels(self.label)
        self._bytes_in = metrics.BYTES_TOTAL.labels(self.label, TO_ENDPOINT)
        self._bytes_out = metrics.BYTES_TOTAL.labels(self.label, TO_CLIENT)
        self._rejected: dict[str, object] = {}
        # endpoint -> [connections opened, bytes to the endpoint, bytes to the client]
        self.by_endpoint: dict[tuple[str, int], list[int]] = {}

    def _endpoint(self, ep: tuple[str, int]) -> list[int]:
        counts = self.by_endpoint.get(ep)
        if counts is None:
            counts = self.by_endpoint[ep] = [0, 0, 0]
        return counts

    def _active(self) -> int:
        return self.active + sum(read() for read in self.live)

    def add_counts(self, opened: int, to_endpoint: int, to_client: int) -> None:
        """Connections opened and bytes moved elsewhere (the native engine) since the last call."""
        if opened or to_endpoint or to_client:
            self.pending_total += opened
            self.pending_in += to_endpoint
            self.pending_out += to_client
            self._dirty.add(self)

    def add_endpoint_counts(self, ep: tuple[str, int], opened: int, to_endpoint: int, to_client: int) -> None:
        """One endpoint's connections opened and bytes moved by the native engine since the last call."""
        counts = self._endpoint(ep)
        counts[0] += opened
        counts[1] += to_endpoint
        counts[2] += to_client

    def opened(self, ep: tuple[str, int] | None = None) -> None:
        self.active += 1
        self.pending_total += 1
        self._dirty.add(self)
        if ep is not None:
            self._endpoint(ep)[0] += 1

    def closed(self, to_endpoint: int, to_client: int, ep: tuple[str, int] | None = None) -> None:
        self.active -= 1
        self._moved(to_endpoint, to_client, ep)

    def add_bytes(self, to_endpoint: int, to_client: int, ep: tuple[str, int] | None = None) -> None:
        if to_endpoint or to_client:
            self._moved(to_endpoint, to_client, ep)

    def _moved(self, to_endpoint: int, to_client: int, ep: tuple[str, int] | None) -> None:
        self.pending_in += to_endpoint
        self.pending_out += to_client
        self._dirty.add(self)
        if ep is not None:
            counts = self._endpoint(ep)
            counts[1] += to_endpoint
            counts[2] += to_client

    def reject(self, reason: str) -> None:
        self.reject_many(reason, 1)

    def reject_many(self, reason: str, count: int) -> None:
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = metrics.CONNECTIONS_REJECTED.labels(self.label, reason)
        child.inc(count)  # type: ignore[attr-defined]

    def flush(self) -> None:
        if self.pending_total:
            self._total.inc(self.pending_total)
            self.pending_total = 0
        if self.pending_in:
            self._bytes_in.inc(self.pending_in)
            self.pending_in = 0
        if self.pending_out:
            self._bytes_out.inc(self.pending_out)
            self.pending_out = 0


class StatsCache:
    """One ``Stats`` per service port name, created on first use; ``flush`` pushes pending counts."""

    def __init__(self) -> None:
        self._by_name: dict[ServicePortName, Stats] = {}
        self._dirty: set[Stats] = set()

    def get(self, name: ServicePortName) -> Stats:
        stats = self._by_name.get(name)
        if stats is None:
            stats = self._by_name[name] = Stats(name, self._dirty)
        return stats

    def peek(self, name: ServicePortName) -> Stats | None:
        """The port's stats if any connection or flow has used it (never creates one)."""
        return self._by_name.get(name)

    def flush(self) -> None:
        dirty = list(self._dirty)
        self._dirty.clear()
        for stats in dirty:
            stats.flush()
