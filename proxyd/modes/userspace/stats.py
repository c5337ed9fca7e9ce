"""Per-service metric handles for the userspace data path, looked up once per service, not per packet.

``prometheus_client``'s ``.labels()`` is a dict lookup under a lock; the data
path must not pay it per connection. ``Stats`` binds every labelled child of
one service port once, and the hot path only calls ``inc``/``dec`` on them.
Byte counts are not recorded per splice: connections accumulate plain ints
and the mode flushes them every few seconds and at close (``add_bytes``).
"""

from __future__ import annotations

from proxyd import metrics
from proxyd.model import ServicePortName

TO_ENDPOINT = "to_endpoint"
TO_CLIENT = "to_client"


class Stats:
    """The metric children of one service port (one protocol)."""

    __slots__ = ("_bytes_in", "_bytes_out", "_rejected", "active", "label", "retries", "total")

    def __init__(self, name: ServicePortName) -> None:
        self.label = str(name)
        protocol = str(name.protocol)
        self.active = metrics.ACTIVE_CONNECTIONS.labels(self.label, protocol)
        self.total = metrics.CONNECTIONS_TOTAL.labels(self.label, protocol)
        self.retries = metrics.CONNECT_RETRIES.labels(self.label)
        self._bytes_in = metrics.BYTES_TOTAL.labels(self.label, TO_ENDPOINT)
        self._bytes_out = metrics.BYTES_TOTAL.labels(self.label, TO_CLIENT)
        self._rejected: dict[str, object] = {}

    def reject(self, reason: str) -> None:
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = metrics.CONNECTIONS_REJECTED.labels(self.label, reason)
        child.inc()  # type: ignore[attr-defined]

    def add_bytes(self, to_endpoint: int, to_client: int) -> None:
        if to_endpoint:
            self._bytes_in.inc(to_endpoint)
        if to_client:
            self._bytes_out.inc(to_client)


class StatsCache:
    """One ``Stats`` per service port name, created on first use."""

    def __init__(self) -> None:
        self._by_name: dict[ServicePortName, Stats] = {}

    def get(self, name: ServicePortName) -> Stats:
        stats = self._by_name.get(name)
        if stats is None:
            stats = self._by_name[name] = Stats(name)
        return stats
