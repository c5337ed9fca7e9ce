"""Where the daemon's memory goes at N services × E endpoints: each stage's heap, in one process.

    python -m bench.state_memory --services 10000 --endpoints 10 [--format yaml|json]
                                 [--modes iptables,nftables,userspace] [--changes 20] [--top 12]
                                 [--no-trace] [--json]

What the daemon holds, without the daemon's sockets, namespaces or kernel:
the manifests source reads one ``kind: List`` file of N ClusterIP services ×
E endpoints (``bench.e2e_scale.objects``, the same file the end-to-end
benchmark writes) into the tracker, the tracker's snapshot goes to each
mode's pure planner (full plan, committed as if the kernel accepted it),
then one endpoint of service 0 is changed ``--changes`` times (the file
rewritten, re-read, a partial plan committed each time).

Printed per stage: the Python heap traced by ``tracemalloc`` (what the
stage keeps alive, MiB) and the process's RSS; with ``--top`` the
allocation sites holding the most after the first full sync. ``--no-trace``
reports RSS only (tracemalloc's own bookkeeping roughly doubles RSS). A
separate child process reports what importing the API source
(``kubernetes_asyncio``) costs, which a manifests daemon never pays.

Memory figures do not depend on the machine's load; the seconds printed
beside them do.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_WRITER = """
import sys
from bench.e2e_scale import objects, render
services, endpoints, fmt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for ip, path in zip(("10.250.0.1", "10.250.0.2"), sys.argv[4:]):
    with open(path, "w") as handle:
        handle.write(render(objects(services, endpoints, first_endpoint=ip), fmt))
"""


def rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def import_cost(module: str) -> float:
    """MiB of RSS that importing ``module`` adds to a fresh interpreter that already imported proxyd."""
    code = ("import proxyd.daemon, proxyd.sources.manifests\n"
            "def rss():\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith('VmRSS:'):\n"
            "            return int(line.split()[1])\n"
            f"before = rss()\nimport {module}\nprint((rss() - before) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120)
    return round(float(out.stdout.strip()), 1)


class Stages:
    def __init__(self, trace: bool) -> None:
        self.trace = trace
        self.rows: list[dict[str, Any]] = []
        self._t = time.perf_counter()

    def mark(self, stage: str) -> dict[str, Any]:
        gc.collect()
        row: dict[str, Any] = {"stage": stage, "seconds": round(time.perf_counter() - self._t, 2),
                               "rss_mib": rss_mib()}
        if self.trace:
            current, peak = tracemalloc.get_traced_memory()
            row["heap_mib"] = round(current / 2**20, 1)
            row["heap_peak_mib"] = round(peak / 2**20, 1)
            tracemalloc.reset_peak()
        self.rows.append(row)
        shown = "  ".join(f"{k} {v}" for k, v in row.items() if k != "stage")
        print(f"{stage:<34} {shown}", file=sys.stderr, flush=True)
        self._t = time.perf_counter()
        return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--format", default="yaml", choices=("yaml", "json"))
    parser.add_argument("--modes", default="iptables,nftables,userspace",
                        type=lambda s: [m for m in s.split(",") if m])
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--no-trace", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    # What a daemon imports (its modes, the manifests source, uvloop), so the first stage is its baseline.
    import uvloop  # noqa: F401

    import proxyd.daemon
    import proxyd.modes.iptables.mode
    import proxyd.modes.nftables.mode
    import proxyd.modes.userspace.mode  # noqa: F401
    from proxyd.modes.iptables import planner as ipt
    from proxyd.modes.nftables import planner as nft
    from proxyd.modes.userspace import planner as us
    from proxyd.sources.manifests import ManifestSource
    from proxyd.tracker import Tracker

    trace = not args.no_trace
    if trace:
        tracemalloc.start(8 if args.top else 1)
    stages = Stages(trace)
    stages.mark("imports")
    result: dict[str, Any] = {"services": args.services, "endpoints": args.endpoints, "format": args.format}
    with tempfile.TemporaryDirectory(prefix="pxd-mem-") as tmp:
        path = Path(tmp) / f"all.{args.format}"
        # Both versions written by a child: the generator's objects are not the daemon's.
        versions = [Path(tmp) / f".v{n}" for n in range(2)]
        subprocess.run([sys.executable, "-c", _WRITER, str(args.services), str(args.endpoints), args.format,
                        *map(str, versions)], check=True, timeout=600, cwd=ROOT)
        shutil.copyfile(versions[0], path)
        result["file_mib"] = round(path.stat().st_size / 2**20, 1)
        stages.mark("file written")
        tracker = Tracker("node1")
        source = ManifestSource(tmp, tracker, on_change=lambda: None)
        source.read_all()
        stages.mark("source read (tracker filled)")
        snapshot = tracker.take()
        stages.mark("tracker snapshot")
        planners: dict[str, Any] = {}
        for mode in args.modes:
            if mode == "iptables":
                p: Any = ipt.Planner(ipt.PlannerOptions(family=4, cluster_cidrs=("10.244.0.0/16",)))
                plan = p.plan(snapshot.state, None)
                p.commit(plan)
            elif mode == "nftables":
                p = nft.Planner(nft.PlannerOptions(family=4, cluster_cidrs=("10.244.0.0/16",)))
                plan = p.plan(snapshot.state, None)
                p.commit(plan)
            elif mode == "userspace":
                p = us.Planner()
                plan = p.plan(snapshot.state, changed=None, nodeport_ips=("0.0.0.0",), families=(4,))
            else:
                parser.error(f"unknown mode {mode}")
            del plan
            planners[mode] = p
            stages.mark(f"{mode} full plan committed")
        state = snapshot.state
        del snapshot
        if trace and args.top:
            top = tracemalloc.take_snapshot().statistics("traceback")[:args.top]
            result["top"] = []
            print("largest allocation sites (size MiB, blocks, innermost proxyd frame):", file=sys.stderr)
            for stat in top:
                frames = [f for f in stat.traceback if "/proxyd/" in f.filename] or list(stat.traceback)
                where = f"{frames[-1].filename.rsplit('/proxyd/', 1)[-1]}:{frames[-1].lineno}"
                size = round(stat.size / 2**20, 1)
                result["top"].append({"site": where, "mib": size, "blocks": stat.count})
                print(f"  {size:7.1f} {stat.count:9d}  {where}", file=sys.stderr)
        timings: dict[str, list[float]] = {"source": [], "take": [], **{m: [] for m in planners}}
        for n in range(args.changes):
            tmp_path = Path(tmp) / ".next"
            shutil.copyfile(versions[(n + 1) % 2], tmp_path)
            os.replace(tmp_path, path)
            t0 = time.perf_counter()
            source.read_all()
            t1 = time.perf_counter()
            snapshot = tracker.take()
            t2 = time.perf_counter()
            timings["source"].append(t1 - t0)
            timings["take"].append(t2 - t1)
            for mode, p in planners.items():
                t2 = time.perf_counter()
                if mode == "userspace":
                    p.plan(snapshot.state, changed=snapshot.changed, nodeport_ips=("0.0.0.0",),
                           changed_ports=snapshot.changed_ports, families=(4,))
                elif mode == "iptables":
                    p.commit(p.plan(snapshot.state, snapshot.changed, changed_ports=snapshot.changed_ports))
                else:
                    p.commit(p.plan(snapshot.state, snapshot.changed))
                timings[mode].append(time.perf_counter() - t2)
            state = snapshot.state
            del snapshot
            if n == 0:
                result["after_1"] = stages.mark("after 1 change")
        if args.changes:
            result["after_changes"] = stages.mark(f"after {args.changes} changes")
            result["change_seconds"] = {k: round(statistics.median(v), 3) for k, v in timings.items()}
            print("one change, median seconds per step (file re-read, tracker, each planner): "
                  + ", ".join(f"{k} {v}" for k, v in result["change_seconds"].items()), file=sys.stderr)
        del state
    result["stages"] = stages.rows
    result["import_kubernetes_asyncio_mib"] = import_cost("proxyd.sources.kube")
    print(f"importing the API source (kubernetes_asyncio) adds {result['import_kubernetes_asyncio_mib']} MiB",
          file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
