"""The stored results file of one benchmark run: its figures plus which run they come from.

Every benchmark whose figures the docs quote takes ``--save``; it then writes
``bench/results/<name>.json`` as ``{"format": 1, "meta": {...}, ...figures}``
where ``meta`` names the run: ``date`` (UTC), ``commit`` (``git describe``
of the tree that ran, ``-dirty`` when it had uncommitted changes outside ``bench/results``), the
machine (``cpus``, ``cpu``, ``kernel``), ``load average before`` and
``load average after`` (1, 5, 15 min: this machine is shared, so a figure
measured at load 6 is not an idle machine's figure) and the exact
``command``. ``python -m bench.docs_figures`` renders README.md and docs/
from these files only.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _commit() -> str:
    try:
        described = subprocess.run(["git", "describe", "--always", "--abbrev=12"], cwd=REPO,
                                   capture_output=True, text=True, timeout=30, check=False)
        # Results files written by earlier benchmarks of the same session do not make the code dirty.
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)bench/results"], cwd=REPO,
                                 capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    commit = described.stdout.strip()
    if not commit:
        return "?"
    return commit + "-dirty" if changed.stdout.strip() else commit


class Run:
    """Started when a benchmark starts (the load before it), saved when it ends."""

    def __init__(self, command: list[str]) -> None:
        self.command = shlex.join(command)
        self.started = time.time()
        self.load_before = load_average()
        self.commit = _commit()  # the code that runs, even if the tree changes before the save

    def meta(self) -> dict[str, Any]:
        return {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.started)),
            "commit": self.commit,
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "kernel": platform.release(),
            "load average before": self.load_before,
            "load average after": load_average(),
            "seconds": round(time.time() - self.started, 1),
            "command": self.command,
        }

    def save(self, name: str, figures: dict[str, Any], directory: Path = RESULTS) -> Path:
        """Write ``<directory>/<name>.json`` and return its path."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.json"
        path.write_text(json.dumps({"format": 1, "meta": self.meta(), **figures}, indent=1) + "\n")
        return path


def module_command(module: str, argv: list[str]) -> list[str]:
    """The command line a reader reruns: ``python -m MODULE ARGS`` (the interpreter path left out)."""
    return ["python", "-m", module, *argv]
