"""How many tests of each suite ran, from JUnit XML files, checked against minimum counts.

``scripts/test.sh`` runs this after pytest (host) and after the QEMU guest
(``tests/vm/run-in-vm.sh``). It prints one line per suite (ran = passed +
failed + errors, skipped apart) and exits 1 when any suite ran fewer tests
than its minimum below: a suite that ran nothing (every test skipped,
nothing collected, a missing XML file) has failed, whatever pytest's exit
status said.

``MINIMUMS`` is the one place these numbers live. They are the counts of
the suites on 2026-12-06 (issue 20); suites only grow, so raise a minimum
when tests are added, never lower it to make a run pass.

    python -m tests.suite_counts build/test-results/host.xml build/test-results/vm/ipvs.xml
    python -m tests.suite_counts --suites unit,api host.xml   # check only these suites
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

MINIMUMS: dict[str, int] = {
    "unit": 2600,
    "api": 52,
    "netns": 425,
    "reliability": 48,
    "vm": 48,
}


def suite_of(classname: str, file: str | None) -> str:
    """``tests.unit.test_cli.TestX`` (or file ``tests/unit/...``) -> ``unit``."""
    parts = (file or "").replace("\\", "/").split("/")
    if len(parts) > 1 and parts[0] == "tests":
        return parts[1]
    parts = classname.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "tests" else classname or "?"


def count(paths: list[Path]) -> dict[str, Counter[str]]:
    """Per suite: ``ran``, ``failed``, ``skipped`` (a missing or unreadable file counts as nothing ran)."""
    out: dict[str, Counter[str]] = {}
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as err:
            print(f"suite counts: cannot read {path}: {err}", file=sys.stderr)
            continue
        for case in root.iter("testcase"):
            suite = suite_of(case.get("classname", ""), case.get("file"))
            tally = out.setdefault(suite, Counter())
            if case.find("skipped") is not None:
                tally["skipped"] += 1
                continue
            tally["ran"] += 1
            if case.find("failure") is not None or case.find("error") is not None:
                tally["failed"] += 1
    return out


def check(counts: dict[str, Counter[str]], suites: list[str]) -> list[str]:
    """One message per suite below its minimum."""
    problems = []
    for suite in suites:
        ran = counts.get(suite, Counter())["ran"]
        minimum = MINIMUMS.get(suite, 1)
        if ran == 0:
            problems.append(f"{suite}: no test ran")
        elif ran < minimum:
            problems.append(f"{suite}: {ran} tests ran, expected at least {minimum} (tests/suite_counts.py)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("xml", nargs="+", type=Path, help="JUnit XML files (pytest --junitxml)")
    parser.add_argument("--suites", default=",".join(MINIMUMS),
                        help="comma-separated suites that must have run (default: all)")
    args = parser.parse_args(argv)
    suites = [s for s in args.suites.split(",") if s]
    counts = count(args.xml)
    for suite in sorted(set(suites) | set(counts)):
        tally = counts.get(suite, Counter())
        print(f"suite {suite:<12} ran {tally['ran']:>5} (failed {tally['failed']}, "
              f"skipped {tally['skipped']}), minimum {MINIMUMS.get(suite, 1)}")
    problems = check(counts, suites)
    for problem in problems:
        print(f"suite counts: FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
