"""How long ``proxyd status`` and ``proxyd trace`` take at scale (target: status < 1 s at 10,000 services).

    python bench/status_scale.py [--services 10000] [--endpoints 10] [--mode none,iptables,nftables]
                                 [--repeat 5] [--json]

Runs inside a throw-away network namespace (the script re-executes itself
with ``ip netns exec`` and deletes the namespace afterwards). For each mode
it builds a ProxyState of N ClusterIP services × E endpoints, syncs the real
mode once (``none``: the base mode, which reads nothing back, so the figure
is the daemon's own share: policy, JSON, socket; ``iptables``: the real
IptablesMode on the back end proxyd picks here, so the figure includes
``iptables-save -c`` of the nat and filter tables; ``nftables``: the real
NftablesMode through libnftables, so the figure includes its ``nft list``
read-backs), starts the real
``StatusService`` on a Unix socket and asks it through the real client
(``proxyd.statusclient.ask``), as ``proxyd status --json`` does:

* ``status_all_s``: every service port, with kernel counters (median);
* ``status_one_s``: ``proxyd status NAME`` (one service; still one kernel read);
* ``render_all_s``: turning the all-services answer into text;
* ``trace_s``: one ``proxyd trace`` to a ClusterIP;
* ``answer_mib``: size of the all-services JSON answer; ``kernel_read_s``:
  the mode's own read-back time as it reports it;
* ``status_all_cpu_s`` / ``trace_cpu_s``: CPU seconds one answer costs
  (server and client share this process; iptables processes are counted as
  children), the figure to compare on a busy machine where wall time
  mostly measures waiting for a core.

``--save`` also writes ``bench/results/status_scale.json`` (the points and
the run's metadata, ``bench/runmeta.py``) for ``python -m bench.docs_figures``.
Output: a table on stderr; with ``--json`` one JSON object on the last stdout line.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import runmeta  # noqa: E402
from bench.sync_scale import INSIDE_ENV, build_state, default_backend, in_netns  # noqa: E402
from proxyd.config import Config  # noqa: E402
from proxyd.modes.base import ProxyMode, SyncRequest  # noqa: E402
from proxyd.status import StatusService  # noqa: E402
from proxyd.statusclient import ask, render_status  # noqa: E402


class NoKernelMode(ProxyMode):
    """The base contract's defaults: status() and trace() report 'not supported', nothing is read."""

    name = "none"

    async def sync(self, request: SyncRequest) -> None:
        return None

    @classmethod
    async def cleanup(cls, config: Config) -> None:
        return None


def make_mode(mode: str) -> ProxyMode:
    if mode == "none":
        return NoKernelMode(Config())
    if mode == "nftables":
        from proxyd.modes.nftables import NftablesMode

        return NftablesMode(Config(cluster_cidrs=("10.0.0.0/8",)))
    from proxyd.modes.iptables import IptablesMode
    from proxyd.netfilter.backend import Backend

    return IptablesMode(Config(cluster_cidrs=("10.0.0.0/8",)), backend=Backend(default_backend("iptables")))


async def measure(mode_name: str, services: int, endpoints: int, repeat: int) -> dict[str, Any]:
    state = build_state(services, endpoints)
    mode = make_mode(mode_name)
    await mode.start()
    started = time.perf_counter()
    await mode.sync(SyncRequest(state, None))
    sync_s = time.perf_counter() - started
    service = StatusService(mode=mode, mode_name=mode_name, node_name=state.node_name)
    service.synced(state, full=True, duration=sync_s)
    with tempfile.TemporaryDirectory(prefix="pxd-status-") as tmp:
        path = os.path.join(tmp, "status.sock")
        assert await service.start(path)
        try:
            def timed(request: dict[str, Any]) -> tuple[float, dict[str, Any]]:
                t0 = time.perf_counter()
                answer = ask(path, request)
                return time.perf_counter() - t0, answer

            def cpu() -> float:
                kids = resource.getrusage(resource.RUSAGE_CHILDREN)
                return time.process_time() + kids.ru_utime + kids.ru_stime

            async def median(request: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
                runs = []
                for _ in range(repeat):
                    c0 = cpu()
                    wall, answer = await asyncio.to_thread(timed, request)
                    runs.append((wall, cpu() - c0, answer))
                return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
                        runs[-1][2])

            all_s, all_cpu, answer = await median({"op": "status"})
            one_s, _, one = await median({"op": "status", "namespace": "bench", "name": "svc-1"})
            trace_s, trace_cpu, trace = await median({"op": "trace", "src": "10.128.0.1", "dst": "10.96.0.5",
                                                      "port": 80, "protocol": "tcp"})
            size = len(json.dumps(answer, separators=(",", ":")))
            t0 = time.perf_counter()
            render_status(answer, io.StringIO())
            render_s = time.perf_counter() - t0
        finally:
            await service.close()
    if mode_name != "none":
        await mode.cleanup(Config())
    assert len(answer["services"]) == services and len(one["services"]) == 1
    assert "error" not in trace
    return {"mode": mode_name, "services": services, "endpoints": endpoints, "sync_s": round(sync_s, 3),
            "status_all_s": round(all_s, 3), "status_one_s": round(one_s, 3),
            "render_all_s": round(render_s, 3),
            "trace_s": round(trace_s, 3), "answer_mib": round(size / 2**20, 1),
            "status_all_cpu_s": round(all_cpu, 3), "trace_cpu_s": round(trace_cpu, 3),
            "kernel_read_s": answer["kernel"]["read_seconds"], "kernel_matches": answer["kernel"]["matches"]}


def report(r: dict[str, Any]) -> None:
    print(f"{r['mode']:>9} {r['services']:>6} svc x {r['endpoints']} eps: "
          f"status(all) {r['status_all_s']:.3f}s "
          f"status(one) {r['status_one_s']:.3f}s render {r['render_all_s']:.3f}s trace {r['trace_s']:.3f}s "
          f"answer {r['answer_mib']} MiB kernel read {r['kernel_read_s']:.3f}s (sync {r['sync_s']:.1f}s); "
          f"CPU per answer: status(all) {r['status_all_cpu_s']:.3f}s trace {r['trace_cpu_s']:.3f}s",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--mode", default="none,iptables,nftables",
                        type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", action="store_true",
                        help="also write bench/results/status_scale.json with the run's metadata")
    args = parser.parse_args(raw)
    if os.environ.get(INSIDE_ENV) != "1":
        if os.geteuid() != 0:
            print("status_scale: needs root (network namespaces)", file=sys.stderr)
            return 2
        return in_netns(raw, (sys.executable, "-m", "bench.status_scale"))
    run = runmeta.Run(["python", "bench/status_scale.py", *raw])
    results = []
    for mode in args.mode:
        result = asyncio.run(measure(mode, args.services, args.endpoints, args.repeat))
        report(result)
        results.append(result)
    if args.save:
        print(f"saved {run.save('status_scale', {'points': results})}", file=sys.stderr)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"points": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
