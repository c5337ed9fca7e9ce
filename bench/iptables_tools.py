"""Writing and reading N nat rules three ways: python-iptables, iptables-legacy-restore, iptables-nft-restore;
then the restore tools alone on the input iptables mode's planner writes.

    python -m bench.iptables_tools [--rules 10000] [--chains 1] [--services 10000] [--repeat 5] [--json]

Runs inside a throw-away network namespace (re-executes itself there with
``ip netns exec``; the host's rules are never touched). For each way it
writes N rules (``-d <ip> -p tcp -m tcp --dport 80 -j RETURN``) spread over
``--chains`` user chains of the nat table, in one transaction, then reads
them back (iptc: walking the rules; tools: ``*-save``), then deletes them.

Then, per back end (``planner_input``, ``--services 0`` skips it): the full
input the planner writes for ``--services`` ClusterIP services × 10
endpoints (``bench.sync_scale.build_state``; on nft in the planner's
chunks) goes through the restore tool with the mode's own flags, no proxyd
code on the clock (``full_s``, ``transactions``, ``lines``, ``bytes``);
then small transactions against the loaded table, each the median of
``--repeat``: declaring (flushing) a chain, appending a ``-j RETURN`` to a
chain no base chain reaches, inserting and deleting one jump in
``KUBE-SERVICES`` (reached from ``PREROUTING``/``OUTPUT``); the
incremental plan of one endpoint change (``incremental_restore_s``, with
the planner's share ``incremental_plan_s``); the mode's own
once-per-sync-period check of canaries and jumps (``canary_check_s``) and
its ``--cleanup`` of the loaded table (``cleanup_s``).

The point is to choose the right tool for each job in iptables mode: the
numbers go into docs/iptables.md. ``--save`` writes
``bench/results/iptables_tools.json`` (``iptables_tools-chainsN.json`` when
``--chains`` is not 1) with the run's metadata (``bench/runmeta.py``), which
``python -m bench.docs_figures`` renders.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

INSIDE_ENV = "PROXYD_BENCH_INSIDE_NETNS"


def _ip(i: int) -> str:
    return f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"


def restore_text(rules: int, chains: int) -> str:
    lines = ["*nat"]
    lines += [f":KUBE-BENCH-{c} - [0:0]" for c in range(chains)]
    lines += [f"-A KUBE-BENCH-{i % chains} -d {_ip(i)} -p tcp -m tcp --dport 80 -j RETURN"
              for i in range(rules)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def delete_text(chains: int) -> str:
    return "\n".join(["*nat", *(f":KUBE-BENCH-{c} - [0:0]" for c in range(chains)),
                      *(f"-X KUBE-BENCH-{c}" for c in range(chains)), "COMMIT", ""])


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def with_tool(flavour: str, rules: int, chains: int) -> dict[str, float]:
    restore = [f"iptables-{flavour}-restore", "--noflush"]
    save = [f"iptables-{flavour}-save", "-t", "nat"]
    text = restore_text(rules, chains)
    write = timed(lambda: subprocess.run(restore, input=text, text=True, check=True, timeout=600))
    out: list[str] = []
    read = timed(lambda: out.append(subprocess.run(save, capture_output=True, text=True, check=True,
                                                   timeout=600).stdout))
    count = sum(1 for line in out[0].splitlines() if line.startswith("-A KUBE-BENCH-"))
    assert count == rules, (flavour, count)
    delete = timed(lambda: subprocess.run(restore, input=delete_text(chains), text=True, check=True,
                                          timeout=600))
    return {"write_s": round(write, 4), "read_s": round(read, 4), "delete_s": round(delete, 4)}


def with_iptc(rules: int, chains: int) -> dict[str, float]:
    import iptc

    table = iptc.Table(iptc.Table.NAT)

    def write() -> None:
        table.autocommit = False
        made = [table.create_chain(f"KUBE-BENCH-{c}") for c in range(chains)]
        for i in range(rules):
            rule = iptc.Rule()
            rule.dst = _ip(i)
            rule.protocol = "tcp"
            match = rule.create_match("tcp")
            match.dport = "80"
            rule.target = iptc.Target(rule, "RETURN")
            made[i % chains].append_rule(rule)
        table.commit()
        table.autocommit = True

    def read() -> None:
        table.refresh()  # iptc keeps a snapshot; see docs/facts.md
        count = sum(len(chain.rules) for chain in table.chains if chain.name.startswith("KUBE-BENCH-"))
        assert count == rules, count

    def delete() -> None:
        table.refresh()
        table.autocommit = False
        for c in range(chains):
            chain = iptc.Chain(table, f"KUBE-BENCH-{c}")
            chain.flush()
            chain.delete()
        table.commit()
        table.autocommit = True

    return {"write_s": round(timed(write), 4), "read_s": round(timed(read), 4),
            "delete_s": round(timed(delete), 4)}


# -- the planner's input ----------------------------------------------------------------------------

ENDPOINTS = 10  # per service, as bench.sync_scale
PROBE_CHAIN = "KUBE-BENCH-PROBE"  # a chain of this benchmark's own in the loaded table
PROBE_JUMP = f"KUBE-SERVICES -d 192.0.2.1/32 -p tcp -m tcp --dport 80 -j {PROBE_CHAIN}"


def _restore(argv: list[str], text: str) -> float:
    """Seconds one restore of ``text`` takes; raises with the tool's message when it fails."""
    t = time.perf_counter()
    proc = subprocess.run(argv, input=text, text=True, capture_output=True, timeout=1800, check=False)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {proc.stderr.strip()[:300]}")
    return took


def _median(repeat: int, once: Callable[[], float]) -> float:
    return round(statistics.median(once() for _ in range(repeat)), 4)


def _nat(*lines: str) -> str:
    return "\n".join(["*nat", *lines, "COMMIT", ""])


async def planner_input(flavour: str, services: int, repeat: int) -> dict[str, Any]:
    """The restore tool of back end ``flavour`` on the planner's full input, then on small transactions."""
    from bench.sync_scale import build_state
    from proxyd.config import Config
    from proxyd.model import Endpoint
    from proxyd.modes.iptables import IptablesMode
    from proxyd.netfilter.backend import Backend

    backend = Backend(flavour)
    mode = IptablesMode(Config(cluster_cidrs=("10.0.0.0/8",)), backend=backend)
    await mode.start()  # canaries, and the planner's options for this back end (chunking on nft)
    assert mode.applier is not None
    await mode.applier.ensure_jumps()  # on the empty table: PREROUTING/OUTPUT reach KUBE-SERVICES
    state = build_state(services, ENDPOINTS)
    plan = mode.planner.plan(state, None)
    restore = backend.restore
    full = sum(_restore(restore, chunk) for chunk in plan.chunks)
    mode.planner.commit(plan)
    out: dict[str, Any] = {
        "services": services, "endpoints": ENDPOINTS, "nat_rules": plan.nat_rules,
        "lines": sum(chunk.count("\n") for chunk in plan.chunks),
        "bytes": sum(len(chunk.encode()) for chunk in plan.chunks),
        "transactions": len(plan.chunks), "full_s": round(full, 4)}
    out["declare_chain_s"] = _median(repeat, lambda: _restore(restore, _nat(f":{PROBE_CHAIN} - [0:0]")))
    out["append_unreachable_s"] = _median(repeat, lambda: _restore(restore, _nat(
        f":{PROBE_CHAIN} - [0:0]", f"-A {PROBE_CHAIN} -j RETURN")))

    def jump_in_and_out() -> tuple[float, float]:
        return _restore(restore, _nat(f"-I {PROBE_JUMP}")), _restore(restore, _nat(f"-D {PROBE_JUMP}"))

    pairs = [jump_in_and_out() for _ in range(repeat)]
    out["insert_jump_s"] = round(statistics.median(p[0] for p in pairs), 4)
    out["delete_jump_s"] = round(statistics.median(p[1] for p in pairs), 4)
    _restore(restore, _nat(f":{PROBE_CHAIN} - [0:0]", f"-X {PROBE_CHAIN}"))
    # One endpoint of one service changes, back and forth: the partial plan and its restore.
    first = next(iter(state.service_ports))
    moved = dataclasses.replace(state, endpoints={**state.endpoints, first: (
        Endpoint("10.255.255.254", 8080), *state.endpoints[first][1:])})
    plans, restores = [], []
    for i in range(repeat):
        target = moved if i % 2 == 0 else state
        t = time.perf_counter()
        step = mode.planner.plan(target, frozenset({first.service}), changed_ports=frozenset({first}))
        plans.append(time.perf_counter() - t)
        assert not step.full, "the incremental plan was full"
        restores.append(sum(_restore(restore, chunk) for chunk in step.chunks))
        mode.planner.commit(step)
    out["incremental_plan_s"] = round(statistics.median(plans), 4)
    out["incremental_restore_s"] = round(statistics.median(restores), 4)
    # The once-per-sync-period check of canaries and jumps, as the mode runs it (proxyd's code).
    checks = []
    for _ in range(repeat):
        t = time.perf_counter()
        missing = await mode.applier.missing()
        checks.append(time.perf_counter() - t)
        assert not missing, missing
    out["canary_check_s"] = round(statistics.median(checks), 4)
    out["repeat"] = repeat
    # --cleanup's share for this back end and family (proxyd's code; chunked on nft), which also
    # leaves the namespace unloaded for the next back end.
    t = time.perf_counter()
    problems = await mode.applier.cleanup()
    out["cleanup_s"] = round(time.perf_counter() - t, 4)
    if problems:
        out["cleanup_problems"] = problems[:5]
    return out


def inside(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"rules": args.rules, "chains": args.chains}
    result["iptables-legacy-restore"] = with_tool("legacy", args.rules, args.chains)
    result["iptables-nft-restore"] = with_tool("nft", args.rules, args.chains)
    try:
        result["python-iptables"] = with_iptc(args.rules, args.chains)
    except ImportError as err:
        result["python-iptables"] = {"error": f"not installed: {err}"}
    if args.services:
        inputs: dict[str, Any] = {}
        for flavour in ("legacy", "nft"):
            try:
                inputs[flavour] = asyncio.run(planner_input(flavour, args.services, args.repeat))
            except Exception as err:  # reported as failed, never left out
                inputs[flavour] = {"error": f"{type(err).__name__}: {err}"}
        result["planner_input"] = inputs
    return result


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--chains", type=int, default=1)
    parser.add_argument("--services", type=int, default=10_000,
                        help="services × 10 endpoints of the planner's input (0: skip that part)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per small transaction (median)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", action="store_true",
                        help="also write bench/results/iptables_tools.json with the run's metadata")
    args = parser.parse_args(raw)
    if args.rules < 1 or args.chains < 1 or args.repeat < 1 or args.services < 0:
        parser.error("--rules, --chains and --repeat must be positive, --services not negative")
    if os.environ.get(INSIDE_ENV) != "1":
        ns = f"pxd-bench-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
        try:
            return subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, *raw], check=False,
                                  timeout=3600, env={**os.environ, INSIDE_ENV: "1"}).returncode
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script in the namespace
    from bench import runmeta

    run = runmeta.Run(["python", "bench/iptables_tools.py", *raw])
    result = inside(args)
    if args.save:
        name = "iptables_tools" if args.chains == 1 else f"iptables_tools-chains{args.chains}"
        print(f"saved {run.save(name, result)}", file=sys.stderr)
    for way in ("python-iptables", "iptables-legacy-restore", "iptables-nft-restore"):
        r = result[way]
        if "error" in r:
            print(f"{way:24} {r['error']}", file=sys.stderr)
        else:
            print(f"{way:24} write {r['write_s']:.3f}s  read {r['read_s']:.3f}s  delete {r['delete_s']:.3f}s "
                  f"({args.rules} rules, {args.chains} chains)", file=sys.stderr)
    for flavour, r in result.get("planner_input", {}).items():
        print(f"planner input, {flavour:6} {json.dumps(r)}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
