"""Run the reliability suite, store its figures as a named run, and render them as Markdown.

Usage (root, from the repository)::

    .venv/bin/python -m bench.reliability_figures            # run tests/reliability, store, print tables
    .venv/bin/python -m bench.reliability_figures --json F   # render a stored run (no tests run)

The suite records its numbers through the ``figures`` fixture of
``tests/reliability/conftest.py`` and writes them, with every test's outcome,
as JSON to ``$PROXYD_RELIABILITY_FIGURES``; this script sets that variable,
runs pytest (no shell), and stores the result with what identifies the run
(date, commit, kernel, CPUs, load, pytest's summary) in
``bench/results/reliability.json`` (``--out``). ``python -m
bench.docs_figures`` turns that file into the figures of
``docs/reliability.md``.

A figure counts only when its test passed: a failed test's numbers may have
been recorded before the assert that failed, so they are listed as not
counted and left out of the totals.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "reliability.json"

# Figure keys that count "inputs tried" and "connections held" across tests.
_HELD = ("connections_held", "slow_readers", "half_closed", "endpoint_died_under", "drained",
         "held_through_grace", "half_open", "served_past_black_hole", "refused_dead_service")
_INPUTS = ("requests_tried", "resets", "source_ports", "replaces", "partial_writes",
           "hostile_names", "escapes_refused", "loops_refused")
_LOST = ("connections_lost", "probes_failed", "new_connections_failed", "long_lived_connections_lost")


def run_suite(target: Path, extra: list[str]) -> tuple[int, float, str]:
    """Run ``tests/reliability``; (exit code, seconds, pytest's last summary line)."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-p", "no:cacheprovider", *extra],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=3600,
        env={**os.environ, "PROXYD_RELIABILITY_FIGURES": str(target)})
    elapsed = time.monotonic() - started
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    finished = [line for line in lines if " in " in line and ("passed" in line or "failed" in line)]
    summary = finished[-1].strip("= ") if finished else (lines[-1] if lines else "")
    return proc.returncode, elapsed, summary


def _command(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                              cwd=REPO).stdout.strip()
    except OSError:
        return ""


def run_meta(code: int, elapsed: float, summary: str, load_start: str) -> dict[str, Any]:
    """What names the run: when, on which code and machine, and how it ended."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _command(["git", "rev-parse", "--short", "HEAD"]),
        "dirty": bool(_command(["git", "status", "--porcelain", "--untracked-files=no"])),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "load average at start": load_start,
        "load average at end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "pytest": summary,
        "exit code": code,
        "wall seconds": round(elapsed),
    }


def tests_of(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{test: {"outcome", "figures"}} from a stored run (format 2); a bare old-format dict of
    figures has no outcomes, so nothing in it counts."""
    if data.get("format") == 2 or "tests" in data:
        return data.get("tests", {})
    return {test: {"outcome": "unknown", "figures": values} for test, values in data.items()
            if isinstance(values, dict)}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def totals(tests: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Sums over passed tests only."""
    held = inputs = lost = faults = 0
    for entry in tests.values():
        values = entry.get("figures") or {}
        if entry.get("outcome") != "passed" or not values:
            continue
        faults += 1
        held += sum(int(values.get(k, 0)) for k in _HELD)
        inputs += sum(int(values.get(k, 0)) for k in _INPUTS)
        lost += sum(int(values.get(k, 0)) for k in _LOST)
    return {"held": held, "faults": faults, "inputs": inputs, "lost": lost}


def render(data: dict[str, Any], *, source: str = "") -> str:
    """The Markdown of a stored run: who/when, outcomes, per-test figures (passed only), totals."""
    tests = tests_of(data)
    meta = data.get("meta", {})
    outcomes = Counter(entry.get("outcome", "unknown") for entry in tests.values())
    lines = []
    if meta:
        where = f" (`{source}`)" if source else ""
        dirty = " with uncommitted changes" if meta.get("dirty") else ""
        lines.append(f"Run of {meta.get('date', '?')}{where} at commit `{meta.get('commit', '?')}`{dirty}, "
                     f"kernel {meta.get('kernel', '?')}, {meta.get('cpus', '?')} CPUs, load average "
                     f"{meta.get('load average at start', '?')} at start: **{meta.get('pytest', '?')}** "
                     f"(exit {meta.get('exit code', '?')}, {meta.get('wall seconds', '?')} s wall).")
        lines.append("")
    lines.append(f"{len(tests)} tests: " + ", ".join(f"{n} {state}" for state, n in sorted(outcomes.items()))
                 + ". Figures count only when their test passed.")
    lines += ["", "| test | figures |", "|---|---|"]
    for test, entry in sorted(tests.items()):
        values = entry.get("figures") or {}
        if entry.get("outcome") == "passed" and values:
            lines.append(f"| `{test}` | " + ", ".join(f"{k} = {_fmt(v)}" for k, v in values.items()) + " |")
    not_counted = sorted(test for test, entry in tests.items() if entry.get("outcome") != "passed")
    if not_counted:
        lines += ["", "Not counted (the test did not pass):", ""]
        lines += [f"- `{test}`: {tests[test].get('outcome', 'unknown')}" for test in not_counted]
    t = totals(tests)
    lines += [
        "",
        "| total (passed tests only) | value |",
        "|---|---|",
        f"| connections held (sum over tests) | {t['held']} |",
        f"| tests that recorded a survived fault or load | {t['faults']} |",
        f"| hostile or faulty inputs tried | {t['inputs']} |",
        f"| objects and connections lost | {t['lost']} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", type=Path, help="render a stored run instead of running the suite")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to store the run (JSON)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    if args.json:
        print(render(json.loads(args.json.read_text()), source=str(args.json)))
        return 0
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "figures.json"
        code, elapsed, summary = run_suite(target, args.pytest_args)
        data = json.loads(target.read_text()) if target.exists() else {"format": 2, "tests": {}}
    data = {"format": 2, "meta": run_meta(code, elapsed, summary, load_start), "tests": tests_of(data)}
    if args.pytest_args:
        data["meta"]["pytest arguments"] = args.pytest_args
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(render(data, source=os.path.relpath(args.out, REPO)))
    print(f"\nstored in {args.out}; `python -m bench.docs_figures` puts it into docs/reliability.md")
    return code


if __name__ == "__main__":
    sys.exit(main())
