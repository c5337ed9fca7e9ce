"""Per-service metrics of the userspace data path, kept off the per-connection path.

``prometheus_client`` takes a lock and checks labels on every ``inc``; at
tens of thousands of connections a second that is a measurable share of the
CPU per connection, and creating its labelled children costs ~40 µs per
service port (0.4 s of a 10,000-service sync). So the data path only
touches plain ints on a ``Stats`` object bound once per service port, and
one collector (``SERIES``, in ``proxyd.metrics.REGISTRY``) turns every
port's ints into the series at scrape time:

* active connections/flows: ``proxyd_active_connections`` reads the int at
  scrape time, so it is always exact;
* connections opened and bytes moved: accumulated and added to the
  totals by ``StatsCache.flush()``, which the mode calls every second
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

import time
import weakref
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxyd import metrics
from proxyd.model import ServicePortName

TO_ENDPOINT = "to_endpoint"
TO_CLIENT = "to_client"
FLUSH_INTERVAL = 1.0


# Never written: a ``Stats`` replaces them by its own dict before its first count.
_NO_REJECTIONS: dict[str, int] = {}
_NO_ENDPOINTS: dict[tuple[str, int], list[int]] = {}


class Stats:
    """The counts of one service port (one protocol), as ``SERIES`` exports them."""

    __slots__ = ("_dirty", "active", "by_endpoint", "bytes_in", "bytes_out", "created", "label", "live",
                 "pending_in", "pending_out", "pending_total", "protocol", "rejected", "retried", "total")

    def __init__(self, name: ServicePortName, dirty: set[Stats]) -> None:
        self.label = str(name)
        self.protocol = name.protocol.value  # the enum's own string, not a copy per port
        self.created = time.time()  # the counters' ``_created`` series, as prometheus_client's children had
        self._dirty = dirty
        self.active = 0
        self.pending_total = 0
        self.pending_in = 0
        self.pending_out = 0
        self.total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.retried = 0
        # Both start as the shared empty dicts and get their own at the first count: most of 10,000
        # service ports never see a rejection or a connection through this node (1.3 MB of empty dicts).
        self.rejected: dict[str, int] = _NO_REJECTIONS  # reason -> connections (a series once it happened)
        self.live: list[Callable[[], int]] = []
        # endpoint -> [connections opened, bytes to the endpoint, bytes to the client]
        self.by_endpoint: dict[tuple[str, int], list[int]] = _NO_ENDPOINTS

    def _endpoint(self, ep: tuple[str, int]) -> list[int]:
        counts = self.by_endpoint.get(ep)
        if counts is None:
            if self.by_endpoint is _NO_ENDPOINTS:
                self.by_endpoint = {}
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
        if self.rejected is _NO_REJECTIONS:
            self.rejected = {}
        self.rejected[reason] = self.rejected.get(reason, 0) + count

    def retry(self, count: int = 1) -> None:
        """Connect attempts that failed and moved on to the next endpoint."""
        self.retried += count

    def flush(self) -> None:
        self.total += self.pending_total
        self.bytes_in += self.pending_in
        self.bytes_out += self.pending_out
        self.pending_total = self.pending_in = self.pending_out = 0


class StatsCache:
    """One ``Stats`` per service port name, created on first use; ``flush`` pushes pending counts."""

    def __init__(self) -> None:
        self._by_name: dict[ServicePortName, Stats] = {}
        self._dirty: set[Stats] = set()
        SERIES.caches.add(self)

    def all(self) -> Iterable[Stats]:
        return self._by_name.values()

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


class _Series:
    """The per-service-port series of every live ``StatsCache``, built at scrape time.

    The names, help texts and labels are those the ``prometheus_client``
    children had; ports of the same label (from two caches, in tests) are summed.
    """

    def __init__(self) -> None:
        self.caches: weakref.WeakSet[StatsCache] = weakref.WeakSet()

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily, CounterMetricFamily,
                             CounterMetricFamily]:
        return (
            GaugeMetricFamily("proxyd_active_connections", "Open proxied TCP connections and UDP flows",
                              labels=["service", "protocol"]),
            CounterMetricFamily("proxyd_connections_total", "Proxied TCP connections and UDP flows opened",
                                labels=["service", "protocol"]),
            CounterMetricFamily("proxyd_bytes_total", "Bytes proxied", labels=["service", "direction"]),
            CounterMetricFamily("proxyd_connect_retries_total",
                                "Backend connects that failed and moved to the next endpoint",
                                labels=["service"]),
            CounterMetricFamily("proxyd_connections_rejected_total",
                                "Connections refused: no endpoint, or every endpoint failed",
                                labels=["service", "reason"]),
        )

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        active, total, moved, retries, rejected = families = self._families()
        # (family, labels) -> [value, created]: summed over caches, the oldest creation kept
        values: dict[tuple[int, tuple[str, ...]], list[float]] = {}

        def add(i: int, labels: tuple[str, ...], value: float, created: float) -> None:
            have = values.get((i, labels))
            if have is None:
                values[(i, labels)] = [value, created]
            else:
                have[0] += value
                have[1] = min(have[1], created)

        for cache in list(self.caches):
            for st in list(cache.all()):
                created = st.created
                add(0, (st.label, st.protocol), st._active(), created)
                add(1, (st.label, st.protocol), st.total, created)
                add(2, (st.label, TO_ENDPOINT), st.bytes_in, created)
                add(2, (st.label, TO_CLIENT), st.bytes_out, created)
                add(3, (st.label,), st.retried, created)
                for reason, count in st.rejected.items():
                    add(4, (st.label, reason), count, created)
        for (i, labels), (value, created) in values.items():
            if i == 0:
                active.add_metric(labels, value)
            else:
                (total, moved, retries, rejected)[i - 1].add_metric(labels, value, created=created)
        return list(families)


SERIES = _Series()
metrics.REGISTRY.register(SERIES)
