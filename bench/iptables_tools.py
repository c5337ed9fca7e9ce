"""Writing and reading N nat rules three ways: python-iptables, iptables-legacy-restore, iptables-nft-restore.

    python -m bench.iptables_tools [--rules 10000] [--chains 1] [--json]

Runs inside a throw-away network namespace (re-executes itself there with
``ip netns exec``; the host's rules are never touched). For each way it
writes N rules (``-d <ip> -p tcp -m tcp --dport 80 -j RETURN``) spread over
``--chains`` user chains of the nat table, in one transaction, then reads
them back (iptc: walking the rules; tools: ``*-save``), then deletes them.
The point is to choose the right tool for each job in iptables mode: the
numbers go into docs/iptables.md. ``--save`` writes
``bench/results/iptables_tools.json`` (``iptables_tools-chainsN.json`` when
``--chains`` is not 1) with the run's metadata (``bench/runmeta.py``), which
``python -m bench.docs_figures`` renders.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
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


def inside(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"rules": args.rules, "chains": args.chains}
    result["iptables-legacy-restore"] = with_tool("legacy", args.rules, args.chains)
    result["iptables-nft-restore"] = with_tool("nft", args.rules, args.chains)
    try:
        result["python-iptables"] = with_iptc(args.rules, args.chains)
    except ImportError as err:
        result["python-iptables"] = {"error": f"not installed: {err}"}
    return result


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--chains", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", action="store_true",
                        help="also write bench/results/iptables_tools.json with the run's metadata")
    args = parser.parse_args(raw)
    if args.rules < 1 or args.chains < 1:
        parser.error("--rules and --chains must be positive")
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
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
