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

A benchmark run inside the QEMU guest (``tests/vm/run-in-vm.sh --cmd``,
which sets ``PROXYD_IN_VM=1``) also records ``guest``: that it ran there,
the emulation, the guest's kernel, CPUs and memory, and the host's kernel
and load average before the guest booted and after it stopped (the guest's
own load average does not show the host's other work, which slows an
emulated CPU). The runner hands the guest the host's ``git describe``
(``PROXYD_BENCH_COMMIT``: the guest runs a copy without ``.git``) and a
directory to save into (``PROXYD_BENCH_RESULTS``), whose files it copies to
``bench/results/`` afterwards, adding the host's load average after
(``python -m bench.runmeta --host-load-after FILE``).
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
    given = os.environ.get("PROXYD_BENCH_COMMIT")
    if given:  # the QEMU guest runs a copy of the tree without .git: the host says which commit it is
        return given
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
            **({"guest": guest_meta()} if os.environ.get("PROXYD_IN_VM") == "1" else {}),
        }

    def save(self, name: str, figures: dict[str, Any], directory: Path | None = None) -> Path:
        """Write ``<directory>/<name>.json`` (default: ``bench/results``, or ``PROXYD_BENCH_RESULTS``
        when set) and return its path."""
        if directory is None:
            directory = Path(os.environ.get("PROXYD_BENCH_RESULTS") or RESULTS)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.json"
        path.write_text(json.dumps({"format": 1, "meta": self.meta(), **figures}, indent=1) + "\n")
        return path


def module_command(module: str, argv: list[str]) -> list[str]:
    """The command line a reader reruns: ``python -m MODULE ARGS`` (the interpreter path left out)."""
    return ["python", "-m", module, *argv]


def _memory_mib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _loads(text: str | None) -> list[float] | None:
    try:
        return [round(float(x), 2) for x in (text or "").split()[:3]] or None
    except ValueError:
        return None


def guest_meta() -> dict[str, Any]:
    """What the QEMU guest run was: emulation, the guest's machine, the host's (from run-in-vm.sh)."""
    return {
        "in QEMU guest": True,
        "emulation": os.environ.get("PROXYD_VM_EMULATION", "?"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory MiB": _memory_mib(),
        "host kernel": os.environ.get("PROXYD_VM_HOST_KERNEL", "?"),
        "host cpus": int(os.environ.get("PROXYD_VM_HOST_CPUS", "0") or 0) or None,
        "host load average before": _loads(os.environ.get("PROXYD_VM_HOST_LOAD")),
    }


def add_host_load_after(path: Path) -> None:
    """Record the host's load average now in the ``guest`` part of a results file the guest wrote."""
    data = json.loads(path.read_text())
    guest = data.get("meta", {}).get("guest")
    if isinstance(guest, dict):
        guest["host load average after"] = load_average()
        path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="annotate results files a QEMU guest run wrote")
    parser.add_argument("--host-load-after", nargs="+", type=Path, required=True, metavar="FILE")
    for file in parser.parse_args().host_load_after:
        add_host_load_after(file)
