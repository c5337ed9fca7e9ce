"""Reading what the load generators and the kernel report: wrk, iperf3, /proc CPU counters.

Parsers are pure (text in, numbers out) and reject anything they do not
recognise with ``MeasureError`` instead of guessing, so a truncated or
garbled tool output becomes a failed sample, never a wrong number.

CPU accounting: a userspace proxy's cost is its own utime + stime from
``/proc/<pid>/stat`` (all threads). A kernel-mode proxy has no process on
the data path: its cost is softirq work, so the meter reads the busy time
of the proxy's CPU (CPU 1, where nothing else is pinned) from ``/proc/stat``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
# wrk's Lua ``done`` hook prints one line with this prefix (see WRK_SCRIPT).
WRK_MARK = "PXDBENCH "
WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'PXDBENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,'
    .. '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""
_WRK_INT_FIELDS = ("requests", "duration_us", "bytes", "connect_errors", "read_errors", "write_errors",
                   "status_errors", "timeouts", "p50_us", "p99_us")


class MeasureError(ValueError):
    """A tool's output could not be turned into a measurement."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    p50_us: float
    p99_us: float
    errors: int  # connect + read + write + timeouts + non-2xx/3xx answers

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


@dataclass(frozen=True, slots=True)
class IperfResult:
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes * 8 / self.seconds / 1e9


def parse_wrk(output: str) -> WrkResult:
    """The PXDBENCH line of wrk's output (from WRK_SCRIPT)."""
    lines = [line for line in output.splitlines() if line.startswith(WRK_MARK)]
    if len(lines) != 1:
        raise MeasureError(f"expected one {WRK_MARK.strip()} line in wrk output, found {len(lines)}")
    try:
        data = json.loads(lines[0][len(WRK_MARK):])
    except json.JSONDecodeError as err:
        raise MeasureError(f"wrk summary is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise MeasureError("wrk summary is not an object")
    for key in _WRK_INT_FIELDS:
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MeasureError(f"wrk summary field {key!r} is not a non-negative integer: {value!r}")
    if data["duration_us"] == 0:
        raise MeasureError("wrk ran for 0 µs")
    if data["requests"] == 0:
        raise MeasureError("wrk completed no request")
    error_keys = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    errors = sum(data[k] for k in error_keys)
    return WrkResult(requests=data["requests"], seconds=data["duration_us"] / 1e6,
                     p50_us=float(data["p50_us"]), p99_us=float(data["p99_us"]), errors=errors)


def parse_iperf3(output: str) -> IperfResult:
    """Bytes and seconds the iperf3 receiver counted, from ``iperf3 -J``."""
    try:
        data = json.loads(output)
    except json.JSONDecodeError as err:
        raise MeasureError(f"iperf3 output is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise MeasureError("iperf3 output is not an object")
    if data.get("error"):
        raise MeasureError(f"iperf3: {data['error']}")
    received = data.get("end", {}).get("sum_received") if isinstance(data.get("end"), dict) else None
    if not isinstance(received, dict):
        raise MeasureError("iperf3 output has no end.sum_received")
    count, seconds = received.get("bytes"), received.get("seconds")
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise MeasureError(f"iperf3 received bytes not a positive integer: {count!r}")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) \
            or seconds <= 0:
        raise MeasureError(f"iperf3 seconds not a positive number: {seconds!r}")
    return IperfResult(bytes=count, seconds=float(seconds))


def parse_pid_stat(text: str) -> float:
    """utime + stime in seconds from the text of ``/proc/<pid>/stat``."""
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    head, sep, rest = text.rpartition(")")
    if not sep or not head:
        raise MeasureError("not a /proc/<pid>/stat line")
    fields = rest.split()
    try:
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    except (IndexError, ValueError):
        raise MeasureError("/proc/<pid>/stat too short or not numeric") from None
    return (utime + stime) / CLK_TCK


def parse_cpu_busy(text: str, cpu: int) -> tuple[float, float]:
    """(busy, total) seconds of one CPU from the text of ``/proc/stat``."""
    name = f"cpu{cpu}"
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            try:
                ticks = [int(x) for x in parts[1:9]]
            except ValueError:
                raise MeasureError(f"/proc/stat {name} not numeric") from None
            if len(ticks) < 8:
                raise MeasureError(f"/proc/stat {name} has {len(ticks)} fields, want 8")
            user, nice, system, idle, iowait, irq, softirq, steal = ticks
            busy = user + nice + system + irq + softirq + steal
            return busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK
    raise MeasureError(f"/proc/stat has no {name} line")


class CpuMeter:
    """CPU seconds consumed between ``start()`` and ``stop()`` by a process or by one CPU."""

    def __init__(self, *, pid: int | None = None, cpu: int | None = None) -> None:
        if (pid is None) == (cpu is None):
            raise ValueError("give exactly one of pid or cpu")
        self.pid, self.cpu = pid, cpu
        self._start = 0.0

    def read(self) -> float:
        if self.pid is not None:
            with open(f"/proc/{self.pid}/stat") as f:
                return parse_pid_stat(f.read())
        with open("/proc/stat") as f:
            return parse_cpu_busy(f.read(), self.cpu or 0)[0]

    def start(self) -> None:
        self._start = self.read()

    def stop(self) -> float:
        return self.read() - self._start

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid} if self.pid is not None else {"cpu": self.cpu}
