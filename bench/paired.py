"""Paired runs: one userspace comparison's two sides alone, alternated over many rounds.

``python -m bench`` interleaves a dozen paths, five rounds each. On a shared, noisy host every path
moves by a third or more between rounds, and a ratio near parity then turns on a round or two. This
runs only the two sides of the userspace targets: HAProxy and proxyd userspace, one worker against
HAProxy's one pinned thread or two workers against its two threads, for one metric, over more rounds,
with the full run's setup, load generators and CPU meter (``bench/harness.py``); which side goes
first alternates from round to round. It prints the ratio of medians for that metric's targets, with
each side's spread and the rounds in which proxyd did better. It supplements the full run; it does
not replace it.

    sudo .venv/bin/python -m bench.paired --metric keepalive [--workers 2] [--rounds 10] [--save]

``--save`` writes ``bench/results/paired-<metric>-<workers>w.json`` (``bench/runmeta.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from bench import dataplane, harness, paths, report, runmeta
from netnstopo.topology import Topology

METRICS = ("bulk", "keepalive", "newconn")
ROUNDS = 10


def sides(workers: int) -> tuple[str, str]:
    """(HAProxy's path, proxyd's path) of the comparison for this many workers."""
    return (report.HAPROXY, report.USERSPACE) if workers == 1 else (report.HAPROXY_2T, report.USERSPACE_2W)


def targets(metric: str, workers: int) -> list[report.Target]:
    """The full run's targets of proxyd's side that this metric measures."""
    ours = sides(workers)[1]
    return [t for t in report.TARGETS
            if t.path == ours and report.METRIC_BY_KEY[t.metric].sample_metric == metric]


def rounds_won(samples: Sequence[Mapping[str, Any]], target: report.Target) -> tuple[int, int]:
    """(rounds in which proxyd's side did better than HAProxy's on ``target``'s metric, rounds with both)."""
    field = report.METRIC_BY_KEY[target.metric].field
    by_round: dict[Any, dict[str, float]] = {}
    for sample in samples:
        got = report.stat([sample.get(field)])
        if got is not None and not sample.get("error"):
            by_round.setdefault(sample.get("round"), {})[sample.get("path", "")] = got.median
    both = [r for r in by_round.values() if target.path in r and target.baseline in r]
    higher = report.METRIC_BY_KEY[target.metric].higher_is_better
    won = sum(1 for r in both if (r[target.path] > r[target.baseline]) == higher
              and r[target.path] != r[target.baseline])
    return won, len(both)


def verdict_lines(results: Mapping[str, Any]) -> list[str]:
    """One line per target: ratio of medians, both sides' medians and spreads, rounds won, verdict."""
    summary = report.summarise(results.get("samples", []))
    chosen = targets(results["plan"]["metric"], results["plan"]["workers"])
    out = []
    for verdict in report.judge(summary, {}, chosen):
        target, metric = verdict.target, report.METRIC_BY_KEY[verdict.target.metric]
        if verdict.ratio is None:
            out.append(f"{metric.label}: no data ({verdict.why})")
            continue
        won, rounds = rounds_won(results["samples"], target)
        ours, theirs = summary[target.path][metric.key], summary[target.baseline][metric.key]
        out.append(f"{target.path} vs {target.baseline}: {metric.label} = {verdict.ratio:.3f}x "
                   f"(target {target.op} {target.threshold:g}x): {verdict.status}; "
                   f"medians {report.cell(ours)} vs {report.cell(theirs)} {metric.unit}; "
                   f"proxyd better in {won} of {rounds} rounds")
    return out


def _log(message: str) -> None:
    print(f"[paired {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(metric: str, workers: int, plan: harness.Plan) -> dict[str, Any]:
    haproxy_name, proxyd_name = sides(workers)
    results: dict[str, Any] = {"plan": {**asdict(plan), "metric": metric, "workers": workers},
                               "paths": [haproxy_name, proxyd_name], "samples": [], "notes": []}
    with Topology(pods=3, pods2=0) as topo:
        _log(f"topology {topo.prefix} up; starting backends and HAProxy")
        one, two = harness.setup(topo)
        script = dataplane.write_wrk_script(topo.manifests.parent)
        ours = paths.ProxydPath(topo, "userspace", workers=None if workers == 1 else workers)
        for round_ in range(plan.rounds):
            order = [haproxy_name, proxyd_name] if round_ % 2 == 0 else [proxyd_name, haproxy_name]
            for name in order:
                _log(f"round {round_ + 1}/{plan.rounds}: {name} {metric}")
                if name == haproxy_name:
                    running = paths.haproxy(one) if workers == 1 else paths.haproxy2(two)
                else:
                    running = ours.start()
                try:
                    results["samples"] += harness.measure_path(
                        topo, name=name, running=running, plan=plan, round_=round_, script=script,
                        metrics=(metric,))
                finally:
                    if name == proxyd_name:
                        note = ours.stop()
                        if note:
                            results["notes"].append(f"round {round_} {name}: {note}")
    return results


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--metric", required=True, choices=METRICS, help="what both sides are measured on")
    parser.add_argument("--workers", type=int, default=1, choices=(1, 2),
                        help="1: one pinned worker against one HAProxy thread; 2: two workers against two")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"rounds, each side measured once in each (default {ROUNDS})")
    parser.add_argument("--seconds", type=int, default=harness.FULL.seconds, help="seconds per measurement")
    parser.add_argument("--save", action="store_true",
                        help="write bench/results/paired-<metric>-<workers>w.json with the run's metadata")
    args = parser.parse_args(argv)
    if not 2 <= args.rounds <= 50:
        parser.error("--rounds must be 2..50")
    if not 1 <= args.seconds <= 120:
        parser.error("--seconds must be 1..120")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    problem = harness.cannot_run()
    if problem:
        print(f"paired: {problem}", file=sys.stderr)
        return 2
    harness.unwind_on_signals()
    started = runmeta.Run(runmeta.module_command("bench.paired", raw))
    plan = harness.overridden(harness.FULL, rounds=args.rounds, seconds=args.seconds)
    try:
        results = run(args.metric, args.workers, plan)
    except KeyboardInterrupt:
        _log("interrupted: namespaces and processes removed; nothing saved")
        return 130
    lines = verdict_lines(results)
    for line in lines:
        print(line)
    if args.save:
        name = f"paired-{args.metric}-{args.workers}w"
        print(f"saved {started.save(name, {**results, 'verdicts': lines})}", file=sys.stderr)
    failed = [s for s in results["samples"] if s.get("error")]
    return 1 if failed or not results["samples"] else 0


if __name__ == "__main__":
    sys.exit(main())
