"""Fixtures for the API-server source tests: an in-process fake API server, a
kubeconfig pointing at it, object builders and a running KubeSource."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxyd.config import Config
from proxyd.sources.kube import Backoff, KubeSource
from proxyd.tracker import Tracker
from tests.api.fake_apiserver import FakeApiServer, write_kubeconfig

NODE = "node-a"


def service(name: str, ip: str, *, port: int = 80, namespace: str = "default",
            labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = labels
    return {"kind": "Service", "apiVersion": "v1", "metadata": meta,
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": port, "protocol": "TCP"}], **spec}}


def endpoint_slice(name: str, svc: str, ips: list[str], *, port: int = 8080,
                   namespace: str = "default", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": svc, **(labels or {})}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": NODE}
                          for ip in ips]}


def node(name: str = NODE, *, zone: str = "zone-a") -> dict[str, Any]:
    return {"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone,
                                                  "kubernetes.io/hostname": name}}}


def seed(fake: FakeApiServer, count: int = 1) -> None:
    """``count`` services (the first named "a") with one slice each, and this node."""
    for i in range(count):
        name = "a" if i == 0 else f"s{i}"
        fake.apply("services", service(name, f"10.96.{i // 250}.{i % 250 + 1}"))
        fake.apply("endpointslices", endpoint_slice(f"{name}-1", name, [f"10.244.{i // 250}.{i % 250 + 1}"]))
    fake.apply("nodes", node())


def seed_minimal(fake: FakeApiServer) -> None:
    seed(fake, 1)


async def wait_for(predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Running:
    """A KubeSource running against the fake, with what it did."""

    source: KubeSource
    tracker: Tracker
    task: asyncio.Task
    changes: list[float] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def fake() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def kubeconfig(tmp_path: Any, fake: FakeApiServer) -> str:
    return write_kubeconfig(str(tmp_path / "kubeconfig"), fake.url)


@pytest.fixture
async def start_source(kubeconfig: str) -> AsyncIterator[Callable[..., Any]]:
    """start_source(**kwargs) → Running; sleeps are recorded and shortened (fake backoff clock)."""
    running: list[Running] = []

    async def start(*, real_sleep: bool = False, max_sleep: float = 0.02, **kwargs: Any) -> Running:
        tracker = Tracker(NODE)
        holder: dict[str, Running] = {}
        sleeps: list[float] = []

        async def sleep(delay: float) -> None:
            sleeps.append(delay)
            await asyncio.sleep(delay if real_sleep else min(delay, max_sleep))

        kwargs.setdefault("backoff", Backoff())
        kwargs.setdefault("watch_idle_timeout", 30.0)
        source = KubeSource(tracker, config=Config(kubeconfig=kubeconfig, node_name=NODE),
                            on_change=lambda: holder["r"].changes.append(time.monotonic()),
                            sleep=sleep, **kwargs)
        task = asyncio.create_task(source.run())
        run = Running(source=source, tracker=tracker, task=task, sleeps=sleeps)
        holder["r"] = run
        running.append(run)
        return run

    try:
        yield start
    finally:
        for run in running:
            await run.stop()
