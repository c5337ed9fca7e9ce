"""bench/paired.py without a network: arguments, which targets a metric covers, rounds won, verdict lines."""

from __future__ import annotations

from typing import Any

import pytest

from bench import paired, report


def _ka(round_: int, path: str, cpu: Any, **extra: Any) -> dict[str, Any]:
    return {"round": round_, "path": path, "metric": "keepalive", "cpu_per_req_us": cpu, **extra}


def test_defaults_and_bounds() -> None:
    args = paired.parse_args(["--metric", "keepalive"])
    assert (args.workers, args.rounds, args.seconds, args.save) == (1, paired.ROUNDS, 5, False)
    for bad in (["--metric", "bogus"], ["--metric", "bulk", "--rounds", "1"],
                ["--metric", "bulk", "--rounds", "51"], ["--metric", "bulk", "--seconds", "0"],
                ["--metric", "bulk", "--workers", "3"], []):
        with pytest.raises(SystemExit):
            paired.parse_args(bad)


def test_targets_are_the_full_runs_targets_of_that_metric() -> None:
    assert [t.metric for t in paired.targets("keepalive", 1)] == ["ka_cpu"]
    assert {t.metric for t in paired.targets("newconn", 2)} == {"nc_cpu", "nc_cps", "nc_p99"}
    two = {(report.USERSPACE_2W, report.HAPROXY_2T)}
    assert {(t.path, t.baseline) for t in paired.targets("bulk", 2)} == two
    assert all(t in report.TARGETS for m in paired.METRICS for w in (1, 2) for t in paired.targets(m, w))


def test_rounds_won_counts_only_rounds_with_both_sides_and_no_ties() -> None:
    target = paired.targets("keepalive", 1)[0]  # lower is better
    samples = [
        _ka(0, report.USERSPACE, 30.0), _ka(0, report.HAPROXY, 35.0),  # won
        _ka(1, report.USERSPACE, 40.0), _ka(1, report.HAPROXY, 35.0),  # lost
        _ka(2, report.USERSPACE, 35.0), _ka(2, report.HAPROXY, 35.0),  # tie: not won
        _ka(3, report.USERSPACE, 20.0),  # HAProxy missing: not counted
        _ka(4, report.USERSPACE, 20.0, error="died"), _ka(4, report.HAPROXY, 35.0),
        _ka(5, report.USERSPACE, float("nan")), _ka(5, report.HAPROXY, 35.0),
        _ka(6, report.USERSPACE, True), _ka(6, report.HAPROXY, "35"),
    ]
    assert paired.rounds_won(samples, target) == (1, 3)
    rate = next(t for t in paired.targets("newconn", 1) if t.metric == "nc_cps")  # higher is better
    conn = [{"round": 0, "path": report.USERSPACE, "metric": "newconn", "cps": 6000.0},
            {"round": 0, "path": report.HAPROXY, "metric": "newconn", "cps": 5000.0}]
    assert paired.rounds_won(conn, rate) == (1, 1)


def test_verdict_lines() -> None:
    samples = [_ka(r, report.USERSPACE, 30.0 + r) for r in range(3)]
    samples += [_ka(r, report.HAPROXY, 32.0) for r in range(3)]
    results = {"plan": {"metric": "keepalive", "workers": 1}, "samples": samples}
    (line,) = paired.verdict_lines(results)
    assert "= 0.969x (target <= 1x): met" in line and "better in 2 of 3 rounds" in line, line
    empty = {"plan": {"metric": "bulk", "workers": 2}, "samples": []}
    assert all("no data" in line for line in paired.verdict_lines(empty))
    assert len(paired.verdict_lines(empty)) == 2
