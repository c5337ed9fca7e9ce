"""What serving both families costs a v4-only cluster: a per-family mode alone vs behind DualStackMode.

The daemon runs iptables and nftables mode as one proxier per family
(``DualStackMode``); on a node with IPv6 a v4-only cluster thus also syncs an
IPv6 proxier with an empty view, and every sync splits the state per family.
This times full and incremental syncs of N services x E endpoints (the
``sync_scale`` state and change) with the mode alone and wrapped for (4, 6),
alternately, in a throw-away network namespace it creates and deletes.

    python -m bench.dualstack_sync --mode nftables[,iptables] --services 10000 --repeat 15 [--save]

Prints one JSON object per run. Root needed; figures are noisy on a busy machine (the load average
is printed with each run). ``--save`` writes every run to ``bench/results/dualstack_sync.json`` with
the run's metadata (``bench/runmeta.py``), which ``python -m bench.docs_figures`` renders into
docs/dualstack.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from typing import Any

from bench import runmeta
from bench.sync_scale import BENCH_PORT, _shift, build_state
from proxyd.config import Config
from proxyd.model import ServiceName
from proxyd.modes.base import ProxyMode, SyncRequest
from proxyd.modes.dualstack import DualStackMode


async def run(mode_name: str, wrapped: bool, services: int, endpoints: int, repeat: int) -> dict[str, Any]:
    cls: type[ProxyMode]
    if mode_name == "iptables":
        from proxyd.modes.iptables import IptablesMode as cls
    else:
        from proxyd.modes.nftables import NftablesMode as cls
    config = Config(proxy_mode=mode_name, cluster_cidrs=("10.0.0.0/8",), node_name="bench-node")
    mode = DualStackMode(config, cls, (4, 6)) if wrapped else cls(config)
    await mode.start()
    state = build_state(services, endpoints)
    gc.collect()
    started = time.perf_counter()
    await mode.sync(SyncRequest(state, None))
    full = time.perf_counter() - started
    changed = frozenset({ServiceName("bench", "svc-0")})
    partials = []
    for gen in range(1, repeat + 1):
        started = time.perf_counter()
        await mode.sync(SyncRequest(_shift(state, gen), changed, frozenset({BENCH_PORT})))
        partials.append(time.perf_counter() - started)
    await mode.shutdown()
    await cls.cleanup(config)
    return {"mode": mode_name, "families": "4,6 (DualStackMode)" if wrapped else "4 (mode alone)",
            "services": services, "endpoints": endpoints, "full_s": round(full, 3),
            "incremental_median_ms": round(statistics.median(partials) * 1000, 2),
            "incremental_min_ms": round(min(partials) * 1000, 2), "loadavg_1m": round(os.getloadavg()[0], 2)}


async def inside(args: argparse.Namespace) -> None:
    for mode in args.mode.split(","):
        for _ in range(args.rounds):
            for wrapped in (False, True):
                print(json.dumps(await run(mode, wrapped, args.services, args.endpoints, args.repeat)),
                      flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", default="nftables", help="iptables, nftables or both, comma-separated")
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=15, help="incremental syncs per run")
    parser.add_argument("--rounds", type=int, default=2, help="alone/wrapped pairs")
    parser.add_argument("--save", action="store_true",
                        help="also write bench/results/dualstack_sync.json with the run's metadata")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    if not set(args.mode.split(",")) <= {"iptables", "nftables"}:
        parser.error("--mode: iptables, nftables or both")
    if args.inside:
        asyncio.run(inside(args))
        return 0
    run_meta = runmeta.Run(["python", "-m", "bench.dualstack_sync", *raw])
    ns = f"pxd-dsbench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        argv_inside = [sys.executable, "-m", "bench.dualstack_sync", "--inside", *raw]
        proc = subprocess.run(["ip", "netns", "exec", ns, *argv_inside], timeout=3600, check=False,
                              stdout=subprocess.PIPE, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        return proc.returncode
    if args.save:
        runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        saved = run_meta.save("dualstack_sync", {"repeat": args.repeat, "runs": runs})
        print(f"saved {saved}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
