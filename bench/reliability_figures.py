"""Run the reliability suite and print its figures as the Markdown tables of ``docs/reliability.md``.

Usage (root, from the repository)::

    .venv/bin/python -m bench.reliability_figures            # run tests/reliability, print tables
    .venv/bin/python -m bench.reliability_figures --json F   # render figures saved earlier in F

The suite records its numbers through the ``figures`` fixture of
``tests/reliability/conftest.py`` and writes them as JSON to
``$PROXYD_RELIABILITY_FIGURES``; this script sets that variable, runs pytest
(no shell), then renders one table row per test plus the totals the document
quotes: connections held, faults survived, inputs tried, and objects and
connections lost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# Figure keys that count "inputs tried" and "connections held" across tests.
_HELD = ("connections_held", "slow_readers", "half_closed", "endpoint_died_under", "drained",
         "held_through_grace", "half_open", "served_past_black_hole", "refused_dead_service")
_INPUTS = ("requests_tried", "resets", "source_ports", "replaces", "partial_writes", "huge_bytes",
           "hostile_names", "escapes_refused", "loops_refused")
_LOST = ("connections_lost", "probes_failed", "new_connections_failed", "long_lived_connections_lost")


def run_suite(target: Path, extra: list[str]) -> tuple[int, float, str]:
    """Run ``tests/reliability``; (exit code, seconds, pytest's last summary line)."""
    env_path = str(target)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-p", "no:cacheprovider", *extra],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=1800,
        env={**os.environ, "PROXYD_RELIABILITY_FIGURES": env_path})
    elapsed = time.monotonic() - started
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    finished = [line for line in lines if " in " in line and ("passed" in line or "failed" in line)]
    summary = finished[-1] if finished else (lines[-1] if lines else "")
    return proc.returncode, elapsed, summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def render(figures: dict[str, dict[str, Any]]) -> str:
    rows = ["| test | figures |", "|---|---|"]
    held = inputs = lost = 0
    for test, values in sorted(figures.items()):
        if not values:
            continue
        rows.append(f"| `{test}` | " + ", ".join(f"{k} = {_fmt(v)}" for k, v in values.items()) + " |")
        held += sum(int(values.get(k, 0)) for k in _HELD)
        inputs += sum(int(values.get(k, 0)) for k in _INPUTS if k != "huge_bytes")
        lost += sum(int(values.get(k, 0)) for k in _LOST)
    faults = sum(1 for values in figures.values() if values)
    totals = [
        "",
        "| total | value |",
        "|---|---|",
        f"| connections held (sum over tests) | {held} |",
        f"| tests that recorded a survived fault or load | {faults} |",
        f"| hostile or faulty inputs tried | {inputs} |",
        f"| objects and connections lost | {lost} |",
    ]
    return "\n".join(rows + totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", type=Path, help="render figures saved earlier instead of running the suite")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    if args.json:
        figures = json.loads(args.json.read_text())
        print(render(figures))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "figures.json"
        code, elapsed, summary = run_suite(target, args.pytest_args)
        figures = json.loads(target.read_text()) if target.exists() else {}
    print(f"pytest: {summary} (exit {code}, {elapsed:.0f} s wall)\n")
    print(render(figures))
    return code


if __name__ == "__main__":
    sys.exit(main())
