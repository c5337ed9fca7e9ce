"""One data-path measurement: run a load generator from the client namespace and meter the proxy's CPU.

Three kinds, each returning one raw sample dict (see ``bench.report``):

* ``bulk`` — one TCP stream, ``iperf3 -c`` for N seconds against the
  iperf3 server in a backend pod; throughput and proxy CPU per GB;
* ``keepalive`` — ``wrk`` with keep-alive connections fetching a 1 KiB file
  from nginx backends; request rate, p50/p99, proxy CPU per request;
* ``newconn`` — the same with ``Connection: close``, so every request is a
  new TCP connection; connection rate, p50/p99, proxy CPU per connection.

The load generator is pinned to the load CPU. The meter is started just
before the generator and read just after it exits, so the proxy CPU counted
is the CPU spent while that load ran. A tool that fails, times out or
reports errors on more than ``MAX_ERROR_SHARE`` of its requests yields a
sample with an ``error`` field, which the report leaves out of the medians.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import WRK_SCRIPT, CpuMeter, MeasureError, parse_iperf3, parse_wrk
from bench.servers import LOAD_CPU, PAYLOAD, pinned
from netnstopo.topology import Topology

MAX_ERROR_SHARE = 0.01
WRK_THREADS = 1


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where a path's client connects: HTTP (nginx behind it) and bulk (iperf3 behind it)."""

    http: tuple[str, int]
    bulk: tuple[str, int]


def write_wrk_script(directory: Path) -> Path:
    path = directory / "pxdbench.lua"
    path.write_text(WRK_SCRIPT)
    return path


def _failed(metric: str, error: str) -> dict[str, Any]:
    return {"metric": metric, "error": error}


def bulk(topo: Topology, *, target: tuple[str, int], seconds: int, meter: CpuMeter) -> dict[str, Any]:
    ip, port = target
    argv = pinned(LOAD_CPU, ["iperf3", "-c", ip, "-p", str(port), "-t", str(seconds), "-J",
                             "--connect-timeout", "3000"])
    meter.start()
    try:
        proc = topo.ns_run(topo.client, argv, timeout=seconds + 20, check=False)
    except subprocess.TimeoutExpired:
        return _failed("bulk", "iperf3 timed out")
    cpu = meter.stop()
    try:
        result = parse_iperf3(proc.stdout)
    except MeasureError as err:
        return _failed("bulk", f"{err} (rc {proc.returncode}, stderr {proc.stderr.strip()[:200]!r})")
    gigabytes = result.bytes / 1e9
    return {"metric": "bulk", "gbps": result.gbps, "bytes": result.bytes, "seconds": result.seconds,
            "cpu_s": cpu, "cpu_per_gb": cpu / gigabytes}


def http(topo: Topology, *, target: tuple[str, int], seconds: int, connections: int, close: bool,
         meter: CpuMeter, script: Path) -> dict[str, Any]:
    """``keepalive`` (close=False) or ``newconn`` (close=True) sample."""
    metric = "newconn" if close else "keepalive"
    ip, port = target
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s",
            "-s", str(script)]
    if close:
        argv += ["-H", "Connection: close"]
    host = f"[{ip}]" if ":" in ip else ip
    argv.append(f"http://{host}:{port}/{PAYLOAD}")
    meter.start()
    try:
        proc = topo.ns_run(topo.client, pinned(LOAD_CPU, argv), timeout=seconds + 20, check=False)
    except subprocess.TimeoutExpired:
        return _failed(metric, "wrk timed out")
    cpu = meter.stop()
    try:
        result = parse_wrk(proc.stdout)
    except MeasureError as err:
        return _failed(metric, f"{err} (rc {proc.returncode}, stderr {proc.stderr.strip()[:200]!r})")
    sample: dict[str, Any] = {"metric": metric, "requests": result.requests, "seconds": result.seconds,
                              "p50_us": result.p50_us, "p99_us": result.p99_us, "errors": result.errors,
                              "cpu_s": cpu}
    if close:
        sample.update(cps=result.rate, cpu_per_conn_us=cpu / result.requests * 1e6)
    else:
        sample.update(rps=result.rate, cpu_per_req_us=cpu / result.requests * 1e6)
    if result.errors > MAX_ERROR_SHARE * result.requests:
        sample["error"] = f"{result.errors} errors in {result.requests} requests"
    return sample
