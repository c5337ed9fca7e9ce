"""Wiring and lifecycle: source → tracker → sync runner → mode, plus health and metrics.

Start-up order matters: the HTTP servers come up first (so /livez answers
and a bad bind address fails fast), then the mode adopts what a previous run
left, then the source lists everything. The first sync runs only once the
source says its initial content is complete, so a node is never programmed
from half a list. After that, every change requests a sync through the
bounded-frequency runner, and the runner also syncs every ``--sync-period``.

A sync takes the tracker's snapshot and hands it to the mode. Syncs are
partial (only changed services) except the first, any after a failure, and
one an hour (kube-proxy's FullSyncPeriod), which rewrite everything the mode
owns. A failed sync keeps the previous kernel state, marks health as
waiting, and is retried by the runner.

SIGTERM/SIGINT stop the runner and the source, then ``mode.shutdown()``:
kernel modes leave their rules in place so traffic keeps flowing while
proxyd is down; userspace mode drains its connections. A stop during
``mode.start()`` lets the start finish (it is short and bounded), then shuts
down the same way: exit 0.

Helper processes (iptables tools, nft, modprobe, the manifest parser) run in
a session of their own (``start_new_session``), so a signal sent to the
daemon's whole process group (Ctrl-C in a terminal, ``kill -TERM -PGID``, a
test harness's ``killpg``) reaches the daemon alone, which lets the tool in
flight finish and stops in order. A supervisor that signals every process of
the daemon's cgroup (systemd's default ``KillMode``) still reaches the tool:
a start that fails while a stop is requested is part of the stop, logged,
not a fatal error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from proxyd import heap, metrics, nodeaddrs
from proxyd.config import Config, ConfigError, HostPort
from proxyd.fdlimit import raise_fd_limit
from proxyd.health import ProxierHealth, health_routes, metrics_routes
from proxyd.healthcheck import ServiceHealthServers
from proxyd.httpserve import HttpServer, Response
from proxyd.model import family
from proxyd.modes.base import MODES, SyncRequest, mode_class
from proxyd.modes.dualstack import DualStackMode, build_mode, node_families
from proxyd.runner import SyncRunner
from proxyd.selfloop import SelfEndpoints
from proxyd.sources.allocate import Allocator, Ranges
from proxyd.status import StatusService
from proxyd.tracker import Tracker

if TYPE_CHECKING:
    from proxyd.sources.kube import KubeSource
    from proxyd.sources.manifests import ManifestSource

log = logging.getLogger(__name__)

FULL_SYNC_PERIOD = 3600.0  # kube-proxy's proxyutil.FullSyncPeriod


class FatalError(Exception):
    """Start-up cannot continue; the message says what and why."""


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.tracker = Tracker(config.node_name)
        self.mode = build_mode(config)
        # The address families this node serves: healthCheckNodePorts and the start log follow them.
        self.families = self.mode.families if isinstance(self.mode, DualStackMode) else node_families()
        self.health = ProxierHealth(timeout=2 * config.sync_period, listen_failures=self.mode.listen_failures,
                                    quarantined=self.mode.quarantined)
        self.runner = SyncRunner(self._sync, min_interval=config.min_sync_period,
                                 max_interval=config.sync_period, name=config.proxy_mode)
        self.source = self._make_source()
        self.service_health = ServiceHealthServers(addresses=self._healthcheck_addresses, health=self.health)
        self._servers: list[HttpServer] = []
        self._needs_full = True
        self._last_full = 0.0
        self._unapplied_since: float | None = None
        self.self_endpoints = SelfEndpoints(source="manifests" if config.manifests is not None else "kube")
        self.status = StatusService(
            mode=self.mode, mode_name=config.proxy_mode, node_name=config.node_name,
            failures=lambda: (self.runner.consecutive_failures,
                              None if self.runner.last_error is None else
                              f"{type(self.runner.last_error).__name__}: {self.runner.last_error}"),
            healthy=self.health.healthy,
            local_ips=lambda: nodeaddrs.node_addresses_async(()), syncing=lambda: self.runner.syncing)
        metrics.HEALTHY.set_function(lambda: 1 if self.health.healthy() else 0)

    def _make_source(self) -> ManifestSource | KubeSource:
        if self.config.manifests is not None:
            from proxyd.sources.manifests import ManifestSource

            return ManifestSource(self.config.manifests, self.tracker, on_change=self._on_change,
                                  allocator=allocator_for(self.config))
        from proxyd.sources.kube import KubeSource

        if self.config.service_cluster_ip_range:
            log.info("--service-cluster-ip-range applies to --manifests only: the API server allocates "
                     "cluster IPs and node ports itself")

        return KubeSource(self.tracker, config=self.config, on_change=self._on_change)

    async def _healthcheck_addresses(self) -> list[str]:
        """Where healthCheckNodePort servers listen: per family, the node addresses in that family's
        ``--nodeport-addresses`` CIDRs, or the family's wildcard when none is of it (kube-proxy's
        per-family NodePortAddresses). The IPv6 wildcard socket is IPv6-only, so both can bind.
        """
        out: list[str] = []
        for fam in self.families:
            cidrs = [c for c in self.config.nodeport_addresses if family(c) == fam]
            if not cidrs:
                out.append("0.0.0.0" if fam == 4 else "::")
            else:
                out += await nodeaddrs.node_addresses_async(cidrs, family=fam)
        return out

    def _on_change(self) -> None:
        self.health.queued()
        self.runner.run()

    async def _sync(self) -> None:
        # A full sync builds long-lived objects only: no cyclic GC meanwhile (heap.gc_paused). What
        # the first one built (the whole state, and what the source's initial read left) stays out
        # of later collections.
        now = time.monotonic()
        full = self._needs_full or now - self._last_full >= FULL_SYNC_PERIOD
        with heap.gc_paused(freeze=self._last_full == 0.0) if full else contextlib.nullcontext():
            await self._sync_now(now, full)

    async def _sync_now(self, now: float, full: bool) -> None:
        snapshot = self.tracker.take()
        if snapshot.oldest_change is not None and self._unapplied_since is None:
            self._unapplied_since = snapshot.oldest_change
        started = time.perf_counter()
        try:
            node_ips = await nodeaddrs.node_addresses_async(self.config.nodeport_addresses, per_family=True)
            # Endpoints that are proxyd's own addresses would loop: no mode ever sees them.
            request = self.self_endpoints.filter(
                SyncRequest(snapshot.state, None if full else snapshot.changed,
                            None if full else snapshot.changed_ports), node_ips)
            await self.mode.sync(request)
        except Exception:
            # What the tracker handed over is no longer "pending" there, so the
            # retry must be a full sync to pick it up again.
            self._needs_full = True
            self.health.queued()
            raise
        elapsed = time.perf_counter() - started
        metrics.SYNC_DURATION.observe(elapsed)
        (metrics.SYNC_FULL_DURATION if full else metrics.SYNC_PARTIAL_DURATION).observe(elapsed)
        metrics.SYNC_LAST_TIMESTAMP.set(time.time())
        if full:
            self._needs_full = False
            self._last_full = now
            # A full sync built the whole ruleset once (tens of MB at 10,000 services): return the pages.
            await asyncio.to_thread(heap.trim)
        if self._unapplied_since is not None:
            metrics.NETWORK_PROGRAMMING_DURATION.observe(time.monotonic() - self._unapplied_since)
            self._unapplied_since = None
        self.health.updated()
        self.status.synced(request.state, full=full, duration=elapsed)
        log.debug("synced %s: %d service ports, %s, %.3fs", self.config.proxy_mode,
                  len(request.state.service_ports),
                  "full" if request.changed is None else f"{len(request.changed)} changed", elapsed)
        try:
            await self.service_health.update(request.state)
        except Exception:
            log.exception("healthCheckNodePort servers: update failed")

    async def _serve_http(self, address: HostPort | None, routes: dict[str, Callable[[], Response]],
                          what: str) -> None:
        if address is None:
            return
        server = HttpServer(routes, name=what)
        try:
            await server.start(address.host, address.port)
        except OSError as err:
            flag = "--healthz-bind-address" if what == "healthz" else "--metrics-bind-address"
            raise FatalError(f"cannot listen on {address} ({flag}): {err.strerror}") from None
        self._servers.append(server)
        # A wildcard address is every address, as kube-proxy's (Go's) listener on 0.0.0.0 or [::] is a
        # dual-stack socket: the other family's wildcard too, when the node serves it.
        other = {"0.0.0.0": ("::", 6), "::": ("0.0.0.0", 4)}.get(address.host)
        if other is not None and other[1] in self.families:
            second = HttpServer(routes, name=what)
            try:
                await second.start(other[0], address.port)
            except OSError as err:
                log.warning("%s: cannot also listen on %s: %s", what, HostPort(other[0], address.port),
                            err.strerror)
            else:
                self._servers.append(second)

    async def serve(self) -> int:
        limit = raise_fd_limit()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _stop_requested, sig, stop)
        await self._serve_http(self.config.healthz_bind_address, health_routes(self.health), "healthz")
        await self._serve_http(self.config.metrics_bind_address,
                               metrics_routes(self.health, self.config.proxy_mode), "metrics")
        await self.status.start(self.config.status_socket)
        log.info("proxyd starting: mode=%s node=%s source=%s families=%s descriptors=%d",
                 self.config.proxy_mode, self.config.node_name,
                 f"manifests {self.config.manifests}" if self.config.manifests else "API server",
                 "+".join(f"IPv{f}" for f in self.families), limit)
        source_task: asyncio.Task[None] | None = None
        try:
            try:
                await self.mode.start()
            except Exception as err:
                if not stop.is_set():
                    raise
                # The stop signal reached a tool of the start too (a whole cgroup was signalled).
                log.warning("start interrupted by the stop request (%s: %s); shutting down",
                            type(err).__name__, err)
                return 0
            source_task = asyncio.create_task(self.source.run(), name="source")
            stop_task = asyncio.create_task(stop.wait())
            ready_task = asyncio.create_task(self.source.ready.wait())
            await asyncio.wait({source_task, stop_task, ready_task}, return_when=asyncio.FIRST_COMPLETED)
            ready_task.cancel()
            if source_task.done():
                source_task.result()
                raise FatalError("the source stopped before delivering its initial content")
            if not stop.is_set():
                log.info("initial content complete; first sync")
                await self.runner.start()
                self.runner.run()
                await asyncio.wait({source_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                if source_task.done() and not stop.is_set():
                    source_task.result()
                    raise FatalError("the source stopped unexpectedly")
            stop_task.cancel()
            log.info("shutting down")
            return 0
        finally:
            await self._shutdown(source_task)

    async def _shutdown(self, source_task: asyncio.Task[None] | None) -> None:
        with contextlib.suppress(Exception):
            await self.runner.stop()
        if source_task is not None and not source_task.done():
            source_task.cancel()
            with contextlib.suppress(BaseException):
                await source_task
        try:
            await self.mode.shutdown()
        except Exception:
            log.exception("mode shutdown failed")
        await self.service_health.close()
        await self.status.close()
        for server in self._servers:
            await server.close()


def _stop_requested(sig: signal.Signals, stop: asyncio.Event) -> None:
    if not stop.is_set():
        log.info("%s received: stopping", sig.name)
    stop.set()


def allocator_for(config: Config) -> Allocator:
    """The manifests source's allocator for the configured ranges."""
    return Allocator(Ranges(cluster=tuple(ipaddress.ip_network(c) for c in config.service_cluster_ip_range),
                            node_ports=config.service_node_port_range))


def _run_loop(coro_factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return asyncio.run(coro_factory())
    code: int = uvloop.run(coro_factory())
    return code


def run(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; the process exit code."""
    # Before any thread allocates: every mode's big temporary work (a re-read 13 MB manifest, a
    # libnftables transaction) runs in worker threads, whose arenas would keep it resident.
    heap.bound_malloc()
    try:
        return _run_loop(lambda: Daemon(config).serve())
    except ConfigError as err:
        log.error("configuration: %s", err)
        print(f"proxyd: error: {err}", file=sys.stderr)
        return 2
    except FatalError as err:
        log.error("fatal: %s", err)
        return 1


def run_cleanup(config: Config) -> int:
    """``--cleanup``: every mode removes everything it may have created."""

    async def clean() -> int:
        failed = 0
        for name in MODES:
            try:
                await mode_class(name).cleanup(config)
                log.info("cleanup: %s done", name)
            except Exception as err:
                failed += 1
                log.error("cleanup: %s failed: %s", name, err)
        return 1 if failed else 0

    return _run_loop(clean)
