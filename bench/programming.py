"""Network-programming latency: from a manifest file change to traffic following it.

A service with one endpoint (a greeting backend in pod A) is served by a
running proxyd. Each sample atomically replaces the manifest file so the
endpoint becomes pod B (then A again, and so on) and polls fresh
connections to the service until one is greeted by the new pod. The time
from the rename to that greeting is the sample: it covers the source's
change detection, the tracker, the sync runner and the mode's apply, i.e.
what kube-proxy calls network programming latency.

Samples are spaced by more than ``--min-sync-period`` (default 1 s) so the
rate limiter, which is working as designed, is not what gets measured.
Every poll and wait is bounded; a sample that times out is recorded as an
error, not dropped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from netnstopo.topology import Pod, Topology, endpoint, endpoint_slice, port, service

SERVICE = "bench-prog"
VIP = "10.96.0.12"
PROG_PORT = 9000
FILENAME = "bench-prog.yaml"
POLL_INTERVAL = 0.005
SAMPLE_TIMEOUT = 10.0
SPACING = 1.2  # > default --min-sync-period (1 s)


def manifest(pod: Pod) -> list[dict[str, Any]]:
    ports = [port(PROG_PORT, name="p", target_port=PROG_PORT)]
    return [service(SERVICE, cluster_ip=VIP, ports=ports),
            endpoint_slice(SERVICE, ports=[{"name": "p", "port": PROG_PORT}], endpoints=[endpoint(pod.ip)])]


def _answering_pod(topo: Topology) -> str | None:
    try:
        return topo.hello(topo.client, VIP, PROG_PORT, timeout=1.0).pod
    except (OSError, ValueError):
        return None


def wait_for(topo: Topology, pod: Pod, *, timeout: float = SAMPLE_TIMEOUT) -> float | None:
    """Seconds until a new connection to the service is greeted by ``pod``; None on timeout."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if _answering_pod(topo) == pod.name:
            return time.monotonic() - start
        time.sleep(POLL_INTERVAL)
    return None


def measure(topo: Topology, *, pods: Sequence[Pod], samples: int) -> dict[str, Any]:
    """Flip the service's endpoint between ``pods[0]`` and ``pods[1]`` ``samples`` times."""
    first, second = pods[0], pods[1]
    topo.write_manifest(FILENAME, manifest(first))
    if wait_for(topo, first, timeout=SAMPLE_TIMEOUT) is None:
        return {"seconds": [], "error": f"service never reached {first.name} (initial state)"}
    seconds: list[float] = []
    errors: list[str] = []
    current = first
    for index in range(samples):
        time.sleep(SPACING)
        target = second if current is first else first
        topo.write_manifest(FILENAME, manifest(target))
        current = target  # the file now says ``target`` whether or not traffic follows
        took = wait_for(topo, target)
        if took is None:
            errors.append(f"sample {index}: traffic did not reach {target.name} in {SAMPLE_TIMEOUT}s")
            continue
        seconds.append(took)
    out: dict[str, Any] = {"seconds": seconds}
    if errors:
        out["error"] = "; ".join(errors)
    return out
