"""The daemon's sync step: full versus partial syncs, failure handling, health and metrics."""

from __future__ import annotations

import asyncio
import gc
import os
import signal

import pytest

from proxyd import daemon, metrics
from proxyd.config import Config
from proxyd.model import (
    Protocol,
    ServiceName,
    ServicePortName,
)
from proxyd.modes.base import ProxyMode, SyncRequest
from tests.builders import TCP, endpoint_slice, service, service_port, slice_endpoint


class FakeMode(ProxyMode):
    name = "fake"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.requests: list[SyncRequest] = []
        self.fail = False

    async def sync(self, request: SyncRequest) -> None:
        self.requests.append(request)
        if self.fail:
            raise RuntimeError("kernel said no")

    @classmethod
    async def cleanup(cls, config: Config) -> None:
        pass


@pytest.fixture
def made(tmp_path, monkeypatch):
    monkeypatch.setattr(daemon, "build_mode", FakeMode)
    config = Config(proxy_mode="userspace", manifests=str(tmp_path), node_name="node1")
    return daemon.Daemon(config)


async def test_first_sync_is_full_then_partial(made):
    made.tracker.update_service(ServiceName("default", "a"),
                                service("default", "a", service_port("a", "10.96.0.1")))
    await made._sync()
    assert made.mode.requests[-1].changed is None
    assert made.mode.requests[-1].changed_ports is None
    assert made.health.healthy()
    made.tracker.update_slice(("default", "a-1"), endpoint_slice("default", "a-1", "a", [("", 8080, TCP)],
                                                                   [slice_endpoint("10.244.1.2")]))
    await made._sync()
    request = made.mode.requests[-1]
    assert request.changed == frozenset({ServiceName("default", "a")})
    # the tracker's port index travels with the partial request
    assert request.changed_ports == frozenset({ServicePortName("default", "a", "", Protocol.TCP)})
    served = request.state.endpoints_of(ServicePortName("default", "a", "", Protocol.TCP))
    assert [str(ep) for ep in served] == ["10.244.1.2:8080"]


async def test_failure_makes_the_retry_full_and_keeps_health_waiting(made):
    await made._sync()
    synced = sample(metrics.SYNC_DURATION, "_count")
    made.mode.fail = True
    made.tracker.update_service(ServiceName("default", "b"),
                                service("default", "b", service_port("b", "10.96.0.2")))
    with pytest.raises(RuntimeError):
        await made._sync()
    assert made.health._oldest_queued is not None
    made.mode.fail = False
    await made._sync()
    assert made.mode.requests[-1].changed is None  # the change taken by the failed sync is not lost
    assert ServicePortName("default", "b", "", Protocol.TCP) in made.mode.requests[-1].state.service_ports
    assert made.health.healthy() and made.health._oldest_queued is None
    assert sample(metrics.SYNC_DURATION, "_count") == synced + 1  # only successes are timed


async def test_periodic_full_sync(made, monkeypatch):
    await made._sync()
    await made._sync()
    assert made.mode.requests[-1].changed == frozenset()
    made._last_full -= daemon.FULL_SYNC_PERIOD
    await made._sync()
    assert made.mode.requests[-1].changed is None


async def test_full_syncs_run_without_the_cyclic_gc_and_the_first_freezes_what_it_built(made, monkeypatch):
    seen: list[bool] = []
    frozen: list[str] = []
    real_sync = made.mode.sync

    async def sync(request: SyncRequest) -> None:
        seen.append(gc.isenabled())
        await real_sync(request)

    monkeypatch.setattr(made.mode, "sync", sync)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append("freeze"))
    assert gc.isenabled()
    await made._sync()  # the first: full
    assert seen == [False] and frozen == ["freeze"] and gc.isenabled()
    await made._sync()  # partial: the collector runs as usual, nothing more is frozen
    assert seen == [False, True] and frozen == ["freeze"]
    made._last_full -= daemon.FULL_SYNC_PERIOD
    await made._sync()  # a later full sync: paused, but what it replaced is not kept frozen
    assert seen == [False, True, False] and frozen == ["freeze"] and gc.isenabled()
    made.mode.fail = True
    made._needs_full = True
    with pytest.raises(RuntimeError):
        await made._sync()
    assert gc.isenabled()  # a failed sync gives the collector back too


def sample(metric, suffix: str) -> float:
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith(suffix):
                return s.value
    raise AssertionError(suffix)


async def test_network_programming_latency_recorded(made):
    before = sample(metrics.NETWORK_PROGRAMMING_DURATION, "_count")
    made.tracker.update_service(ServiceName("default", "c"),
                                service("default", "c", service_port("c", "10.96.0.3")))
    await made._sync()
    assert sample(metrics.NETWORK_PROGRAMMING_DURATION, "_count") == before + 1
    await made._sync()  # nothing changed: nothing to measure
    assert sample(metrics.NETWORK_PROGRAMMING_DURATION, "_count") == before + 1


# ------------------------------------------------------------------ dual-stack (issue 16)


def dual_daemon(tmp_path, monkeypatch, families: tuple[int, ...], nodeport_addresses: tuple[str, ...] = ()):
    monkeypatch.setattr(daemon, "build_mode", FakeMode)
    monkeypatch.setattr(daemon, "node_families", lambda: families)
    return daemon.Daemon(Config(proxy_mode="userspace", manifests=str(tmp_path), node_name="node1",
                                nodeport_addresses=nodeport_addresses))


async def test_health_check_node_ports_listen_on_both_families_wildcards(tmp_path, monkeypatch):
    assert await dual_daemon(tmp_path, monkeypatch, (4, 6))._healthcheck_addresses() == ["0.0.0.0", "::"]
    assert await dual_daemon(tmp_path, monkeypatch, (4,))._healthcheck_addresses() == ["0.0.0.0"]


async def test_health_check_node_ports_follow_nodeport_addresses_per_family(tmp_path, monkeypatch):
    asked: list[tuple[tuple[str, ...], int | None]] = []

    async def addresses(cidrs, *, family=None, per_family=False):
        asked.append((tuple(cidrs), family))
        return {4: ["192.0.2.1"], 6: ["2001:db8::1"]}[family]

    monkeypatch.setattr(daemon.nodeaddrs, "node_addresses_async", addresses)
    # Only IPv4 CIDRs: IPv6 stays on every IPv6 address, as kube-proxy's per-family NodePortAddresses.
    made = dual_daemon(tmp_path, monkeypatch, (4, 6), ("192.0.2.0/24",))
    assert await made._healthcheck_addresses() == ["192.0.2.1", "::"]
    assert asked == [(("192.0.2.0/24",), 4)]
    both = dual_daemon(tmp_path, monkeypatch, (4, 6), ("2001:db8::/64", "192.0.2.0/24"))
    assert await both._healthcheck_addresses() == ["192.0.2.1", "2001:db8::1"]


# ------------------------------------------------------------------ a stop during the mode's start


class ToolKilledAtStart(FakeMode):
    """A start whose tool dies of a signal, as when a supervisor signals the daemon's whole cgroup."""

    signal_first = True
    stopping: asyncio.Event

    async def start(self) -> None:
        if self.signal_first:
            os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own handler takes it
            await asyncio.wait_for(ToolKilledAtStart.stopping.wait(), timeout=30)
        raise RuntimeError("iptables-nft -w 5 -t mangle -N KUBE-PROXY-CANARY... exited -15")


def _quiet_daemon(tmp_path, monkeypatch) -> daemon.Daemon:
    monkeypatch.setattr(daemon, "build_mode", ToolKilledAtStart)
    ToolKilledAtStart.stopping = asyncio.Event()
    original = daemon._stop_requested

    def seen(sig, stop):
        original(sig, stop)
        ToolKilledAtStart.stopping.set()

    monkeypatch.setattr(daemon, "_stop_requested", seen)
    # No HTTP servers and no status socket: nothing of the host is touched.
    return daemon.Daemon(Config(proxy_mode="userspace", manifests=str(tmp_path), node_name="node1",
                                healthz_bind_address=None, metrics_bind_address=None, status_socket=None))


async def test_a_start_failing_because_of_the_stop_signal_is_a_clean_stop(tmp_path, monkeypatch, caplog):
    made = _quiet_daemon(tmp_path, monkeypatch)
    caplog.set_level("INFO", "proxyd.daemon")
    assert await made.serve() == 0
    messages = [r.getMessage() for r in caplog.records]
    assert "SIGTERM received: stopping" in messages
    interrupted = "start interrupted by the stop request (RuntimeError: iptables-nft"
    assert any(m.startswith(interrupted) for m in messages), messages


async def test_a_start_failing_on_its_own_is_still_fatal(tmp_path, monkeypatch):
    made = _quiet_daemon(tmp_path, monkeypatch)
    monkeypatch.setattr(ToolKilledAtStart, "signal_first", False)
    with pytest.raises(RuntimeError, match="exited -15"):
        await made.serve()
