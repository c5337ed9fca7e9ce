"""Control-plane scale: run each mode's own sync-scale benchmark at several service counts.

The modes' helpers own those scripts (``bench/sync_scale.py``, with a
driver per mode, or a ``bench/sync_scale_<mode>.py``); this module only
finds the one for a mode, runs it once per service count as a subprocess
(``--mode M --services N --json``) and takes the sync times from the JSON
object it prints last: flat for one back end, ``{"points": [...]}`` for
several (iptables runs both its nft and legacy back ends).

Counts run in the outer loop and modes in the inner one, so a slow mode at
30k services cannot starve the others of their small points; once a mode
overruns, its bigger points are not started. Every point
has a timeout bounded by what is left of the run's time budget. A script
that overruns is stopped the way Ctrl-C would stop it (SIGINT to its
process group, so its own cleanup deletes the namespace it made), then
killed; a namespace one of its processes was still in is deleted
afterwards. Nothing is estimated: a missing script, an unsupported mode, a
failure or a timeout is reported as such.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
POINT_CAP = {1000: 90.0, 10000: 180.0, 30000: 240.0}
DEFAULT_CAP = 240.0
MIN_POINT_TIME = 10.0
FULL_KEYS = ("full_s", "full_sync_s", "full_sync_seconds", "full_seconds", "full")
INCREMENTAL_KEYS = ("incremental_s", "incremental_sync_s", "incremental_sync_seconds", "incremental_seconds",
                    "partial_s", "partial_sync_s", "incremental")


def script_for(mode: str, bench_dir: Path | None = None) -> Path | None:
    bench_dir = bench_dir or BENCH
    for candidate in (bench_dir / f"sync_scale_{mode}.py", bench_dir / "sync_scale.py"):
        if candidate.exists():
            return candidate
    return None


def last_json_object(text: str) -> dict[str, Any] | None:
    """The whole output as one JSON object, else the last line that is one."""
    text = text.strip()
    for candidate in (text, *reversed(text.splitlines())):
        candidate = candidate.strip()
        if not candidate.startswith("{"):
            continue
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _seconds(data: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    for key in keys:
        value = data.get(key)
        if isinstance(value, Mapping):  # e.g. {"full": {"seconds": 1.2}} or {"median": ...}
            value = value.get("seconds", value.get("median", value.get("s")))
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
    return None


def extract(data: Mapping[str, Any], services: int) -> dict[str, Any]:
    """A point {services, backend, full_s, incremental_s, rss_mib, raw} from one result object."""
    rss = data.get("rss_mib")
    point: dict[str, Any] = {
        "services": services, "backend": str(data.get("backend", "")),
        "full_s": _seconds(data, FULL_KEYS), "incremental_s": _seconds(data, INCREMENTAL_KEYS),
        "rss_mib": rss if isinstance(rss, int | float) and not isinstance(rss, bool) else None,
        "raw": dict(data),
    }
    if data.get("error"):
        point["error"] = str(data["error"])[-300:]
    elif point["full_s"] is None and point["incremental_s"] is None:
        point["error"] = f"no sync time in the script's output (keys: {', '.join(sorted(data))[:200]})"
    return point


def points_from(data: Mapping[str, Any], services: int) -> list[dict[str, Any]]:
    """Every point of a script's output, flat or ``{"points": [...]}``."""
    raw = data.get("points")
    if isinstance(raw, list):
        return [extract(p, services) for p in raw if isinstance(p, Mapping)] or \
            [{"services": services, "error": "empty points list"}]
    return [extract(data, services)]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo and len(out) < 10_000:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _namespaces_of(pids: Sequence[int]) -> set[str]:
    names: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            got = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True,
                                 timeout=5, check=False)
            names.update(n for n in got.stdout.split() if n.startswith("pxd-"))
    return names


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGINT the script's process group (its cleanup runs), then SIGKILL; delete namespaces it left."""
    leftovers = _namespaces_of([proc.pid, *_descendants(proc.pid)])
    for sig, wait in ((signal.SIGINT, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.communicate(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    for name in leftovers:
        if Path(f"/run/netns/{name}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)


def run_point(script: Path, *, mode: str, services: int, timeout: float) -> list[dict[str, Any]]:
    argv = [sys.executable, str(script), "--mode", mode, "--services", str(services), "--json"]
    # sync_scale.py --mode nftables also loads kube-proxy's ruleset shape (minutes at 10,000
    # services); the full bench has a time budget and reports proxyd's figures only.
    env = {**os.environ, "PROXYD_BENCH_NFT_ANCHOR": os.environ.get("PROXYD_BENCH_NFT_ANCHOR", "0")}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=script.parent.parent, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        return [{"services": services, "error": f"timed out after {timeout:.0f}s"}]
    except BaseException:
        _stop(proc)
        raise
    data = last_json_object(out)
    if data is None:
        detail = (err.strip() or out.strip())[-300:]
        return [{"services": services, "error": f"{script.name} exited {proc.returncode}: {detail}"}]
    return points_from(data, services)


def run_all(*, modes: Sequence[str], services: Sequence[int], skipped: Mapping[str, str],
            deadline: float, log: Callable[[str], None]) -> dict[str, Any]:
    """{mode: {"script", "points"} or {"skipped"}}; no point starts after ``deadline`` (monotonic)."""
    out: dict[str, Any] = {}
    scripts: dict[str, Path] = {}
    for mode in modes:
        script = script_for(mode)
        if f"proxyd-{mode}" in skipped:
            out[mode] = {"skipped": skipped[f"proxyd-{mode}"]}
        elif script is None:
            out[mode] = {"skipped": f"no bench/sync_scale_{mode}.py or bench/sync_scale.py in this checkout"}
        else:
            scripts[mode] = script
            out[mode] = {"script": script.name, "points": []}
    timed_out: dict[str, int] = {}
    for count in services:
        for mode, script in list(scripts.items()):
            if mode in timed_out:
                # A bigger point of a mode that already overran would only burn the budget of the others.
                why = f"not run: {timed_out[mode]} services already timed out"
                out[mode]["points"].append({"services": count, "error": why})
                continue
            left = deadline - time.monotonic()
            if left < MIN_POINT_TIME:
                out[mode]["points"].append({"services": count, "error": "not run: time budget exhausted"})
                continue
            timeout = min(POINT_CAP.get(count, DEFAULT_CAP), left)
            log(f"sync scale: {mode} at {count} services ({script.name}, timeout {timeout:.0f}s)")
            points = run_point(script, mode=mode, services=count, timeout=timeout)
            unsupported = [p for p in points if "invalid choice" in str(p.get("error", ""))]
            if unsupported and len(points) == 1:
                out[mode] = {"skipped": f"{script.name} has no driver for mode {mode}"}
                del scripts[mode]
                continue
            out[mode]["points"] += points
            if any(str(p.get("error", "")).startswith("timed out") for p in points):
                timed_out[mode] = count
    return out
