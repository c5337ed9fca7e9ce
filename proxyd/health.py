"""Health state of the proxier and what /healthz, /livez and the metrics port answer.

``ProxierHealth`` follows kube-proxy's ProxierHealthServer: it is healthy
once the first sync has been applied and no queued change (or failed sync)
has waited longer than the health timeout (2 × sync period). ``/livez``
only says the event loop answers. The HTTP servers live elsewhere
(``httpserve``; the healthCheckNodePort servers in ``healthcheck``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from proxyd import metrics
from proxyd.httpserve import Response

MAX_FAILURES_SHOWN = 20  # listen failures named in the /healthz body (the total is given too)


def _rfc3339(wall: float | None) -> str:
    if wall is None:
        return ""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d %H:%M:%S.%f +0000 UTC")


class ProxierHealth:
    """Timestamps that say whether the proxier keeps up with its changes."""

    def __init__(self, *, timeout: float, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 listen_failures: Callable[[], Mapping[str, str]] = dict,
                 quarantined: Callable[[], Mapping[str, str]] = dict) -> None:
        self.timeout = timeout
        self._listen_failures = listen_failures
        self._quarantined = quarantined
        self._clock = clock
        self._wall = wall
        self.last_updated: float | None = None  # wall time of the last successful sync
        self._oldest_queued: float | None = None  # monotonic time of the oldest unapplied change

    def queued(self) -> None:
        """A change (or a failed sync) is waiting to be applied."""
        if self._oldest_queued is None:
            self._oldest_queued = self._clock()
            metrics.SYNC_LAST_QUEUED_TIMESTAMP.set(self._wall())

    def updated(self) -> None:
        """A sync succeeded: everything queued before it is applied."""
        self._oldest_queued = None
        self.last_updated = self._wall()

    def healthy(self) -> bool:
        if self.last_updated is None:
            return False
        return self._oldest_queued is None or self._clock() - self._oldest_queued < self.timeout

    def healthz(self) -> Response:
        answer: dict[str, object] = {"lastUpdated": _rfc3339(self.last_updated),
                                     "currentTime": _rfc3339(self._wall()),
                                     "nodeEligible": True}
        failures = self._listen_failures()
        if failures:
            # A port that cannot be listened on (taken, no NET_BIND_SERVICE, no descriptor) is named
            # here and in proxyd_listen_failures; the status stays: /healthz also steers load balancers
            # for every other service of the node, which one bad port must not take away.
            names = sorted(failures)
            answer["listenFailures"] = {name: failures[name] for name in names[:MAX_FAILURES_SHOWN]}
            answer["listenFailuresTotal"] = len(names)
        quarantined = self._quarantined()
        if quarantined:
            # Service ports the kernel refused (proxyd.quarantine): the rest of the node is applied,
            # so the status stays, as for listen failures.
            names = sorted(quarantined)
            answer["quarantined"] = {name: quarantined[name] for name in names[:MAX_FAILURES_SHOWN]}
            answer["quarantinedTotal"] = len(names)
        body = json.dumps(answer).encode()
        return (200 if self.healthy() else 503), "application/json", body


def livez() -> Response:
    return 200, "text/plain", b"ok"


def health_routes(health: ProxierHealth) -> dict[str, Callable[[], Response]]:
    return {"/healthz": health.healthz, "/livez": livez}


def metrics_routes(health: ProxierHealth, mode: str) -> dict[str, Callable[[], Response]]:
    return {
        "/metrics": lambda: (200, "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
        "/proxyMode": lambda: (200, "text/plain", mode.encode()),
        "/healthz": health.healthz,
        "/livez": livez,
    }
