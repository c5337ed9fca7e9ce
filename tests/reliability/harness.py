"""Helpers of the reliability suite: the real daemon under faults, load and hostile input.

What this module adds to ``netnstopo/topology.py``:

* ``start_daemon`` — the daemon with an optional descriptor limit (``prlimit``
  on the spawned process: soft = hard, because userspace mode lifts its soft
  limit to the hard one), extra environment (a wrapper first on ``PATH``) and
  without waiting for health when a test wants to watch it come up;
* ``start_load_server`` — an asyncio backend that holds thousands of connections in
  one process (the topology's thread-per-connection server would not), in
  ``echo``, ``flood`` (send forever, for slow readers) or ``rst`` (reset
  every connection at once) style;
* ``open_many`` / ``echo_all`` — thousands of client sockets from the test
  process without threads, and a check that every one still carries bytes;
* ``rss_kib`` / ``fd_count`` — what the daemon holds, from ``/proc``;
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import selectors
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.netns.topology import HEALTHZ, METRICS, Topology, in_netns, wait_until

PROXYD = str(Path(sys.executable).parent / "proxyd")


def mode_available(mode: str) -> str | None:
    """None when ``mode`` can run here, else why not (the reason for a failure)."""
    try:
        from proxyd.modes.base import MODES, mode_class
    except ImportError as err:  # pragma: no cover - the package is installed editable
        return f"proxyd not importable: {err}"
    if mode not in MODES:
        return f"{mode} mode is not registered in proxyd.modes.base.MODES"
    try:
        mode_class(mode)
    except (ImportError, AttributeError) as err:
        return f"{mode} mode not importable yet: {err}"
    with contextlib.suppress(ImportError):
        importlib.import_module(f"proxyd.modes.{mode}")
    return None


def require_mode(mode: str) -> None:
    # Every mode this suite runs (userspace, iptables) is part of proxyd on this kernel: fail, never skip.
    why = mode_available(mode)
    if why:
        pytest.fail(why, pytrace=False)


# --- the daemon ---------------------------------------------------------------------------------

def start_daemon(topo: Topology, mode: str, *, extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, nofile: int | None = None,
                 manifests: Path | None = None, wait_healthy: bool = True,
                 timeout: float = 25.0) -> Any:
    """Start proxyd in the node namespace (as ``Topology.start_proxyd`` does, plus limits and env)."""
    argv = [PROXYD, "--proxy-mode", mode, "--manifests", str(manifests or topo.manifests),
            "--hostname-override", topo.node_name,
            "--healthz-bind-address", f"{HEALTHZ[0]}:{HEALTHZ[1]}",
            "--metrics-bind-address", f"{METRICS[0]}:{METRICS[1]}",
            "--cluster-cidr", "10.244.0.0/16", *extra_args]
    if nofile is not None:
        # prlimit execs the daemon: the spawned pid stays the daemon's own.
        argv = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *argv]
    proc = topo.spawn(topo.node, argv, log_name=f"proxyd-{mode}", env=env)
    if not wait_healthy:
        return proc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxyd exited {proc.returncode}: {topo.log_of(proc)[-3000:]}")
        if topo.http_get(topo.node, *HEALTHZ, "/healthz")[0] == 200:
            return proc
        time.sleep(0.05)
    raise RuntimeError(f"proxyd not healthy after {timeout}s: {topo.log_of(proc)[-3000:]}")


def healthz(topo: Topology) -> int:
    return topo.http_get(topo.node, *HEALTHZ, "/healthz")[0]


def metric_sum(topo: Topology, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels`` (0 when absent)."""
    status, body = topo.http_get(topo.node, *METRICS, "/metrics", timeout=5)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}: {body[:200]}")
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        base, _, rest = sample.partition("{")
        if base != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        if all(found.get(k) == v for k, v in (labels or {}).items()):
            total += float(value)
    return total


def rss_kib(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match, f"no VmRSS for {pid}"
    return int(match.group(1))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> int:
    """The process's hard descriptor limit (userspace mode raises its soft limit to it)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[4])
    raise AssertionError(f"no descriptor limit for {pid}")


# --- a backend for thousands of connections -----------------------------------------------------

_LOAD_SERVER = r'''
import asyncio, resource, socket, sys
name, style, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
CHUNK = b"x" * 65536

async def serve(reader, writer):
    peer = writer.get_extra_info("peername")
    try:
        if style == "rst":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()
            return
        writer.write(f"{name} {peer[0]} {peer[1]} {port}\n".encode())
        if style == "flood":
            while True:  # a slow reader on the other side makes drain() wait: TCP backpressure
                writer.write(CHUNK)
                await writer.drain()
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.write(b"BYE\n")
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(serve, "0.0.0.0", port, backlog=8192, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''


def start_load_server(topo: Topology, pod_name: str, port_: int, *, style: str = "echo") -> Any:
    """An asyncio greeting+echo (or flood) server in a pod; waits until it listens."""
    pod = topo.pod(pod_name)
    proc = topo.spawn(pod.ns, [sys.executable, "-c", _LOAD_SERVER, pod.name, style, str(port_)],
                      log_name=f"{pod.name}-load{port_}")
    deadline = time.monotonic() + 10
    while "ready" not in topo.log_of(proc):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"load server {pod_name}:{port_} did not start: {topo.log_of(proc)}")
        time.sleep(0.02)
    return proc


# --- many clients -------------------------------------------------------------------------------

def open_many(ns: str, ip: str, port_: int, count: int, *, timeout: float = 5.0,
              reset_ok: bool = False) -> list[socket.socket]:
    """``count`` connected TCP sockets from namespace ``ns`` (blocking connects, one after another).

    With ``reset_ok``, a connection reset before ``connect()`` returned (the handshake completed,
    then an RST came before this thread ran again: an endpoint that resets at once, on a busy
    machine) is left out of the result instead of failing: that client was told already.
    """
    socks: list[socket.socket] = []
    try:
        with in_netns(ns):
            for _ in range(count):
                sock = socket.socket()
                socks.append(sock)
                sock.settimeout(timeout)
                try:
                    sock.connect((ip, port_))
                except ConnectionResetError:
                    if not reset_ok:
                        raise
                    socks.pop().close()
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def read_lines(socks: Sequence[socket.socket], *, timeout: float) -> list[bytes | None]:
    """The first line each socket receives: ``b""`` when it ended (EOF or reset) first, None on timeout."""
    out: list[bytes | None] = [None] * len(socks)
    bufs = [b""] * len(socks)
    sel = selectors.DefaultSelector()
    try:
        for i, sock in enumerate(socks):
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, i)
        pending = len(socks)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                i = key.data
                try:
                    data = socks[i].recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    bufs[i] += data
                if not data or b"\n" in bufs[i]:
                    sel.unregister(socks[i])
                    pending -= 1
                    out[i] = bufs[i].split(b"\n", 1)[0] if b"\n" in bufs[i] else b""
    finally:
        sel.close()
    return out


def echo_all(socks: Sequence[socket.socket], payload: bytes = b"ping\n", *, timeout: float = 30.0) -> int:
    """Send ``payload`` on every socket and count those that echo it back whole."""
    for sock in socks:
        sock.setblocking(True)
        sock.settimeout(timeout)
        with contextlib.suppress(OSError):
            sock.sendall(payload)
    answers = read_lines(socks, timeout=timeout)
    return sum(1 for a in answers if a and a + b"\n" == payload)


def close_all(socks: Sequence[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


__all__ = [
    "PROXYD", "close_all", "echo_all", "fd_count", "healthz", "metric_sum", "mode_available", "nofile_limit",
    "open_many", "read_lines", "require_mode", "rss_kib", "start_daemon", "start_load_server", "wait_until",
]
