"""/healthz semantics (kube-proxy's ProxierHealthServer) and healthCheckNodePort answers."""

from __future__ import annotations

import json

from proxyd.health import ProxierHealth


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(timeout: float = 60.0) -> tuple[ProxierHealth, FakeClock]:
    clock = FakeClock()
    return ProxierHealth(timeout=timeout, clock=clock, wall=lambda: 1.7e9 + clock.now), clock


def test_unhealthy_until_first_sync():
    health, _ = make()
    assert not health.healthy()
    status, ctype, body = health.healthz()
    assert status == 503 and ctype == "application/json"
    assert json.loads(body)["lastUpdated"] == ""
    health.updated()
    assert health.healthy()
    status, _, body = health.healthz()
    assert status == 200
    assert set(json.loads(body)) == {"lastUpdated", "currentTime", "nodeEligible"}


def test_queued_change_turns_unhealthy_only_after_timeout():
    health, clock = make(timeout=60)
    health.updated()
    health.queued()
    clock.now += 59
    assert health.healthy()
    health.queued()  # a later queue does not move the oldest timestamp
    clock.now += 2
    assert not health.healthy()
    health.updated()
    assert health.healthy()


def test_failed_syncs_keep_oldest_queue_time():
    health, clock = make(timeout=10)
    health.updated()
    for _ in range(5):  # a failing sync re-queues each time
        health.queued()
        clock.now += 3
    assert not health.healthy()
