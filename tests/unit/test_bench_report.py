"""The benchmark's report side on synthetic samples: medians, ratios, verdicts, Markdown, parsers, plots.

No root and no network: these check that numbers measured elsewhere are
summarised and judged correctly, and that garbled tool output becomes a
``MeasureError`` (a failed sample), never a wrong number.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import report, sync_scale
from bench.harness import parse_args
from bench.measure import (
    CLK_TCK,
    WRK_MARK,
    CpuMeter,
    MeasureError,
    parse_cpu_busy,
    parse_iperf3,
    parse_pid_stat,
    parse_wrk,
)
from bench.report import DIRECT, HAPROXY, USERSPACE, Stat, Target
from bench.servers import haproxy_config, nginx_config


def bulk(path: str, gbps: float, cpu_per_gb: float, round_: int = 0, **extra: object) -> dict:
    return {"round": round_, "path": path, "metric": "bulk", "gbps": gbps, "cpu_per_gb": cpu_per_gb, **extra}


def newconn(path: str, cps: float, p99: float, cpu: float, round_: int = 0) -> dict:
    return {"round": round_, "path": path, "metric": "newconn", "cps": cps, "p50_us": p99 / 2, "p99_us": p99,
            "cpu_per_conn_us": cpu}


def keepalive(path: str, rps: float, cpu: float, round_: int = 0) -> dict:
    return {"round": round_, "path": path, "metric": "keepalive", "rps": rps, "p50_us": 100.0,
            "p99_us": 300.0, "cpu_per_req_us": cpu}


def full_samples() -> list[dict]:
    """Three rounds of every metric for direct, haproxy, userspace and iptables."""
    samples = []
    for r, jitter in enumerate((1.0, 1.1, 0.9)):
        samples += [bulk(DIRECT, 14 * jitter, 0.01, r), bulk(HAPROXY, 8 * jitter, 0.44, r),
                    bulk(USERSPACE, 9 * jitter, 0.40, r), bulk("proxyd-iptables", 13.5 * jitter, 0.02, r)]
        samples += [keepalive(DIRECT, 40000, 1, r), keepalive(HAPROXY, 20000, 24, r),
                    keepalive(USERSPACE, 19000, 30, r), keepalive("proxyd-iptables", 39000, 2, r)]
        samples += [newconn(DIRECT, 12000 * jitter, 2000, 5, r), newconn(HAPROXY, 6000, 10000, 109, r),
                    newconn(USERSPACE, 5000, 16000, 150, r),
                    newconn("proxyd-iptables", 9000 * jitter, 1500, 9, r)]
    return samples


# --- statistics ----------------------------------------------------------------------------------

def test_stat_median_min_max_ignores_unusable_values() -> None:
    got = report.stat([3, 1.0, None, float("nan"), True, "7", 2, float("inf")])
    assert got == Stat(median=2.0, low=1.0, high=3.0, n=3)


def test_stat_even_count_median_is_mean_of_middle_pair() -> None:
    assert report.stat([4, 1, 3, 2]).median == 2.5


def test_stat_of_nothing_is_none() -> None:
    assert report.stat([]) is None
    assert report.stat([None, "x"]) is None


def test_summarise_maps_fields_and_leaves_failed_samples_out() -> None:
    samples = [bulk(HAPROXY, 8, 0.4, 0), bulk(HAPROXY, 6, 0.5, 1),
               bulk(HAPROXY, 100, 0.1, 2, error="iperf3: boom"),
               {"path": HAPROXY, "metric": "bulk"},  # no fields: contributes nothing
               {"metric": "bulk", "gbps": 1}]  # no path: ignored
    summary = report.summarise(samples)
    assert summary[HAPROXY]["bulk_gbps"] == Stat(7.0, 6.0, 8.0, 2)
    assert summary[HAPROXY]["bulk_cpu_per_gb"] == Stat(0.45, 0.4, 0.5, 2)
    assert "ka_rps" not in summary[HAPROXY]


# --- verdicts ------------------------------------------------------------------------------------

def verdicts_by_key(samples: list[dict], skipped: dict | None = None) -> dict:
    summary = report.summarise(samples)
    return {(v.target.path, v.target.metric): v for v in report.judge(summary, skipped or {})}


def test_targets_cover_issues_7_and_15() -> None:
    keys = {(t.path, t.baseline, t.metric, t.op, t.threshold) for t in report.TARGETS}
    for path, base in ((USERSPACE, HAPROXY), (report.USERSPACE_2W, report.HAPROXY_2T)):
        assert (path, base, "bulk_gbps", ">=", 1.0) in keys
        assert (path, base, "bulk_cpu_per_gb", "<=", 1.0) in keys
        assert (path, base, "ka_cpu", "<=", 1.0) in keys
        assert (path, base, "nc_cpu", "<=", 0.9) in keys
        assert (path, base, "nc_cps", ">=", 1.0) in keys
        assert (path, base, "nc_p99", "<=", 1.2) in keys
    for path in ("proxyd-iptables", "proxyd-ipvs"):
        assert (path, DIRECT, "bulk_gbps", ">=", 0.95) in keys
        assert (path, DIRECT, "nc_cps", ">=", 0.8) in keys


def test_ipv6_paths_are_judged_against_the_ipv6_baselines() -> None:
    """Issue 16: each IPv6 path against its IPv6 anchor, on what the IPv6 paths measure (bulk, newconn)."""
    keys = {(t.path, t.baseline, t.metric) for t in report.TARGETS}
    assert (report.USERSPACE6, report.HAPROXY6, "bulk_gbps") in keys
    assert (report.USERSPACE6, report.HAPROXY6, "nc_cpu") in keys
    assert not any(t.path.endswith(report.IPV6) and t.metric.startswith("ka_") for t in report.TARGETS)
    for path in ("proxyd-iptables-ipv6", "proxyd-nftables-ipv6"):
        assert (path, report.DIRECT6, "bulk_gbps") in keys and (path, report.DIRECT6, "nc_cps") in keys
    samples = [bulk(report.DIRECT6, 12, 0.01), bulk("proxyd-iptables-ipv6", 11.7, 0.02),
               bulk(DIRECT, 100, 0.01), newconn(report.DIRECT6, 10000, 2000, 5),
               newconn("proxyd-iptables-ipv6", 7000, 1500, 9)]
    got = verdicts_by_key(samples)
    assert got[("proxyd-iptables-ipv6", "bulk_gbps")].ratio == pytest.approx(11.7 / 12)
    assert got[("proxyd-iptables-ipv6", "nc_cps")].status == "not met"
    assert got[(report.USERSPACE6, "bulk_gbps")].status == "no data"
    assert report.ordered_paths({report.DIRECT6, "proxyd-userspace-ipv6", DIRECT, report.USERSPACE_2W}) == [
        DIRECT, report.USERSPACE_2W, report.DIRECT6, report.USERSPACE6]


def test_haproxy_and_urls_bracket_ipv6() -> None:
    conf = haproxy_config(listeners=[("2001:db8:203::1", 8080, [("fd00:10:244:1::11", 80)])])
    assert "bind [2001:db8:203::1]:8080" in conf and "server s0 [fd00:10:244:1::11]:80" in conf
    assert "listen [::]:80 " in nginx_config(workdir=Path("/w"), port=80)


def test_judge_ratios_of_medians_and_verdicts() -> None:
    got = verdicts_by_key(full_samples())
    v = got[(USERSPACE, "bulk_gbps")]
    assert v.ratio == pytest.approx(9 / 8) and v.status == "met"
    v = got[(USERSPACE, "bulk_cpu_per_gb")]
    assert v.ratio == pytest.approx(0.40 / 0.44) and v.status == "met"
    v = got[(USERSPACE, "ka_cpu")]
    assert v.ratio == pytest.approx(30 / 24) and v.status == "not met"
    v = got[(USERSPACE, "nc_p99")]
    assert v.ratio == pytest.approx(1.6) and v.status == "not met"
    v = got[("proxyd-iptables", "nc_cps")]
    assert v.ratio == pytest.approx(0.75) and v.status == "not met"
    v = got[("proxyd-iptables", "bulk_gbps")]
    assert v.ratio == pytest.approx(13.5 / 14) and v.status == "met"


def test_judge_threshold_is_inclusive() -> None:
    summary = {"a": {"m": Stat(1.5, 1.5, 1.5, 1)}, "b": {"m": Stat(1.0, 1.0, 1.0, 1)}}
    le = report.judge(summary, {}, [Target("m", "a", "b", "<=", 1.5)])[0]
    ge = report.judge(summary, {}, [Target("m", "a", "b", ">=", 1.5)])[0]
    above = report.judge(summary, {}, [Target("m", "a", "b", "<=", 1.49)])[0]
    assert (le.status, ge.status, above.status) == ("met", "met", "not met")


def test_judge_no_data_names_the_skip_reason() -> None:
    got = verdicts_by_key(full_samples(), {"proxyd-ipvs": "kernel lacks IP_VS"})
    v = got[("proxyd-ipvs", "bulk_gbps")]
    assert v.status == "no data" and v.ratio is None and "kernel lacks IP_VS" in v.why


def test_judge_missing_baseline_and_zero_baseline() -> None:
    only_user = [bulk(USERSPACE, 9, 0.4)]
    v = verdicts_by_key(only_user)[(USERSPACE, "bulk_gbps")]
    assert v.status == "no data" and "haproxy: no samples" in v.why
    zero = [bulk(USERSPACE, 9, 0.4), bulk(HAPROXY, 0, 0.0)]
    v = verdicts_by_key(zero)[(USERSPACE, "bulk_cpu_per_gb")]
    assert v.status == "no data" and "median is 0" in v.why


# --- formatting ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "text"), [
    (None, "–"), (0, "0"), (0.44123, "0.441"), (8.75, "8.75"), (12.345, "12.3"), (109.4, "109"),
    (23455.2, "23,455"), (-2.5, "-2.50"),
])
def test_fmt_three_significant_digits(value: float | None, text: str) -> None:
    assert report.fmt(value) == text


def test_ordered_paths_known_first_then_alphabetical() -> None:
    got = report.ordered_paths({"zz", "proxyd-iptables", DIRECT, "aa", HAPROXY})
    assert got == [DIRECT, HAPROXY, "proxyd-iptables", "aa", "zz"]


def test_markdown_table_ratios_skips_failures_and_control() -> None:
    samples = [*full_samples(), bulk(HAPROXY, 1, 1, 3, error="iperf3: connection | refused")]
    results = {
        "meta": {"run": "quick"}, "paths": [DIRECT, HAPROXY, USERSPACE, "proxyd-iptables", "proxyd-ipvs"],
        "skipped": {"proxyd-ipvs": "kernel lacks IP_VS: /proc/net/ip_vs absent"},
        "cpu_notes": {"proxyd-iptables": "busy time of CPU 1"},
        "samples": samples, "notes": ["time budget reached"],
        "control": {
            "sync_scale": {"iptables": {"points": [{"services": 10000, "error": "timed out"},
                                                   {"services": 1000, "backend": "nft", "full_s": 0.12,
                                                    "incremental_s": 0.01, "rss_mib": 52.5}]},
                           "ipvs": {"skipped": "kernel lacks IP_VS"}},
            "programming": {"userspace": {"seconds": [0.1, 0.12, 0.3]},
                            "iptables": {"seconds": [], "error": "x"}},
        },
    }
    md = report.markdown(results)
    assert "| metric | unit | direct | haproxy | proxyd-userspace | proxyd-iptables | proxyd-ipvs |" in md
    # Medians with min–max whiskers, the failed sample left out (haproxy bulk median stays 8).
    assert "| bulk throughput, 1 TCP stream | Gbit/s | 14.0 (12.6–15.4) | 8.00 (7.20–8.80) |" in md
    assert "| proxyd-userspace | haproxy | bulk throughput, 1 TCP stream | 1.125× | >= 1× | met |" in md
    assert "| proxyd-iptables | direct | new-connection rate | 0.750× | >= 0.8× | not met |" in md
    assert "kernel lacks IP_VS: /proc/net/ip_vs absent" in md
    assert "connection \\| refused" in md  # pipes escaped, table not broken
    assert "Note: time budget reached" in md
    assert "| iptables | nft | 1000 | 0.120 | 0.0100 | 52.5 |  |" in md
    assert "| iptables | – | 10000 | – | – | – | timed out |" in md
    assert "| ipvs | – | – | – | – | – | skipped: kernel lacks IP_VS |" in md
    assert "| userspace | 3 | 120 | 300 |  |" in md
    assert "| iptables | 0 | – | – | x |" in md
    # Every table row has the same number of cells as its header.
    for block in md.split("\n\n"):
        rows = [r for r in block.splitlines() if r.startswith("|")]
        if rows:
            widths = {r.replace("\\|", "").count("|") for r in rows}
            assert len(widths) == 1, block


def test_markdown_without_samples_says_so() -> None:
    md = report.markdown({"samples": [], "skipped": {}})
    assert "No path was measured." in md
    assert md.count("no data") == len(report.TARGETS)


def test_verdict_lines_one_per_target() -> None:
    lines = report.verdict_lines({"samples": full_samples(), "skipped": {"proxyd-ipvs": "no IPVS"}})
    assert len(lines) == len(report.TARGETS)
    assert any(line.endswith(": met") and "bulk throughput" in line and USERSPACE in line for line in lines)
    assert any("not met" in line for line in lines)
    assert any("no data (proxyd-ipvs: no IPVS)" in line for line in lines)


# --- tool output parsers -------------------------------------------------------------------------

def wrk_line(**overrides: object) -> str:
    data = {"requests": 20000, "duration_us": 2000000, "bytes": 1, "connect_errors": 0, "read_errors": 0,
            "write_errors": 0, "status_errors": 0, "timeouts": 0, "p50_us": 300, "p99_us": 900,
            "mean_us": 310.5}
    data.update(overrides)
    return WRK_MARK + json.dumps(data)


def test_parse_wrk() -> None:
    out = "Running 2s test @ http://x\n  Latency Distribution\n     50%  300us\n"
    out += wrk_line(read_errors=3) + "\n"
    got = parse_wrk(out)
    assert (got.requests, got.seconds, got.p50_us, got.p99_us, got.errors) == (20000, 2.0, 300.0, 900.0, 3)
    assert got.rate == 10000


@pytest.mark.parametrize("out", [
    "", "Running 2s test\n", wrk_line() + "\n" + wrk_line(), WRK_MARK + "{not json", WRK_MARK + "[1, 2]",
    wrk_line(requests=0), wrk_line(duration_us=0), wrk_line(requests=-1), wrk_line(p99_us="900"),
    wrk_line(timeouts=True), wrk_line(requests=1.5), WRK_MARK + json.dumps({"requests": 1}),
    WRK_MARK + "x" * 1_000_000,
])
def test_parse_wrk_rejects_garbage(out: str) -> None:
    with pytest.raises(MeasureError):
        parse_wrk(out)


def iperf_json(**received: object) -> str:
    received = {"bytes": 2_000_000_000, "seconds": 2.0, **received}
    return json.dumps({"start": {}, "end": {"sum_received": received}})


def test_parse_iperf3() -> None:
    got = parse_iperf3(iperf_json())
    assert got.bytes == 2_000_000_000 and got.gbps == pytest.approx(8.0)


@pytest.mark.parametrize("out", [
    "", "iperf3: error - unable to connect", "[]", json.dumps({"error": "unable to connect to server"}),
    json.dumps({"end": {}}), json.dumps({"end": []}), iperf_json(bytes=0), iperf_json(bytes=True),
    iperf_json(bytes="5"), iperf_json(seconds=0), iperf_json(seconds=-1.0), iperf_json(seconds=float("nan")),
    iperf_json(seconds=float("inf")), "{" * 100_000,
])
def test_parse_iperf3_rejects_garbage(out: str) -> None:
    with pytest.raises(MeasureError):
        parse_iperf3(out)


def test_parse_pid_stat_survives_hostile_comm() -> None:
    fields = ["S"] + ["0"] * 10 + [str(3 * CLK_TCK), str(CLK_TCK)] + ["0"] * 30
    text = "4242 (evil) name) (x) " + " ".join(fields)  # the kernel wraps comm in one pair of parens
    assert parse_pid_stat(text) == pytest.approx(4.0)


@pytest.mark.parametrize("text", ["", "4242 no parens S 1 2", "4242 (x) S 1 2 3", "1 (x) S " + "a " * 20])
def test_parse_pid_stat_rejects_garbage(text: str) -> None:
    with pytest.raises(MeasureError):
        parse_pid_stat(text)


PROC_STAT = """cpu  100 0 50 1000 0 0 10 0 0 0
cpu0 60 0 30 400 0 0 5 0 0 0
cpu1 40 1 20 600 3 2 5 1 0 0
intr 1 2 3
"""


def test_parse_cpu_busy() -> None:
    busy, total = parse_cpu_busy(PROC_STAT, 1)
    assert busy == pytest.approx((40 + 1 + 20 + 2 + 5 + 1) / CLK_TCK)
    assert total == pytest.approx((69 + 600 + 3) / CLK_TCK)


@pytest.mark.parametrize(("text", "cpu"), [
    (PROC_STAT, 7), ("cpu1 1 2 x 4 5 6 7 8", 1), ("cpu1 1 2 3", 1), ("", 0),
])
def test_parse_cpu_busy_rejects_garbage(text: str, cpu: int) -> None:
    with pytest.raises(MeasureError):
        parse_cpu_busy(text, cpu)


def test_cpu_meter_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError):
        CpuMeter()
    with pytest.raises(ValueError):
        CpuMeter(pid=1, cpu=1)


def test_cpu_meter_measures_the_cpu_this_process_burns() -> None:
    """The meter behind the README's CPU figures must agree with the kernel's own account."""
    import os
    import subprocess
    import sys
    import time

    meter = CpuMeter(pid=os.getpid())
    meter.start()
    before = time.process_time()
    while time.process_time() - before < 0.3:  # burn 0.3 s of CPU, however busy the machine is
        sum(i * i for i in range(10_000))
    burned = time.process_time() - before
    measured = meter.stop()
    # /proc ticks are 10 ms: allow two ticks on each side, nothing more.
    assert burned - 0.02 <= measured <= burned + 0.05, (burned, measured)

    # a sleeping process burns (almost) nothing, however long the wait
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)  # let its start-up CPU land before the meter starts
        idle = CpuMeter(pid=sleeper.pid)
        idle.start()
        time.sleep(0.3)
        assert idle.stop() <= 0.02
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)


def test_cpu_meter_on_a_cpu_counts_busy_ticks_only(monkeypatch) -> None:
    import builtins
    import io

    from bench import measure

    stats = iter([
        "cpu  9 9 9 9 9 9 9 9\ncpu1 100 0 50 1000 10 0 0 0\n",
        "cpu  9 9 9 9 9 9 9 9\ncpu1 160 0 80 5000 90 5 5 0\n",
    ])
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: io.StringIO(next(stats))
                        if path == "/proc/stat" else real_open(path, *a, **k))
    meter = CpuMeter(cpu=1)
    meter.start()
    # busy = user + nice + system + irq + softirq + steal: (60 + 30 + 5 + 5) ticks; idle and iowait are not
    assert meter.stop() == pytest.approx(100 / measure.CLK_TCK)


@given(st.text(max_size=400))
def test_parsers_only_ever_raise_measure_error(text: str) -> None:
    for parse in (parse_wrk, parse_iperf3, parse_pid_stat, lambda t: parse_cpu_busy(t, 1)):
        try:
            parse(text)
        except MeasureError:
            pass


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12))
def test_iperf3_parser_on_arbitrary_json(value: object) -> None:
    try:
        got = parse_iperf3(json.dumps({"end": {"sum_received": value}}))
    except MeasureError:
        return
    assert got.bytes > 0 and got.seconds > 0 and math.isfinite(got.gbps)


# --- sync-scale output ---------------------------------------------------------------------------

def test_last_json_object_picks_the_final_object_line() -> None:
    out = 'building 1000 services\n{"partial": 1\n{"full_s": 0.5}\ntrailing text\n'
    assert sync_scale.last_json_object(out) == {"full_s": 0.5}
    assert sync_scale.last_json_object(json.dumps({"a": {"b": 1}}, indent=2)) == {"a": {"b": 1}}
    assert sync_scale.last_json_object("[1]\nnope") is None


def test_extract_takes_one_key_per_figure() -> None:
    got = sync_scale.extract({"full_s": 1.5, "incremental_s": 0.02, "rss_mib": 60}, 1000)
    assert (got["services"], got["full_s"], got["incremental_s"], got["rss_mib"]) == (1000, 1.5, 0.02, 60)
    assert "error" not in got
    bad = sync_scale.extract({"full_s": -1, "incremental_s": True, "other": 3}, 10)
    assert bad["full_s"] is None and bad["incremental_s"] is None and "other" in bad["error"]
    # other spellings are not figures
    other = sync_scale.extract({"full_sync_seconds": 1.5, "incremental": {"median": 0.02}}, 10)
    assert other["full_s"] is None and "error" in other


def test_points_from_flat_and_list_outputs() -> None:
    flat = sync_scale.points_from({"backend": "legacy", "full_s": 2.0, "incremental_s": 0.3, "rss_mib": 58},
                                  1000)
    assert [(p["backend"], p["full_s"], p["rss_mib"]) for p in flat] == [("legacy", 2.0, 58)]
    many = sync_scale.points_from({"points": [{"backend": "nft", "full_s": 1.0}, "junk",
                                              {"backend": "legacy", "error": "restore failed"}]}, 30000)
    assert [p["backend"] for p in many] == ["nft", "legacy"]
    assert all(p["services"] == 30000 for p in many)
    assert many[1]["error"] == "restore failed"
    assert sync_scale.points_from({"points": []}, 5)[0]["error"] == "empty points list"


def fake_command(tmp_path, body: str) -> tuple[str, str]:
    script = tmp_path / "fake_sync_scale.py"
    script.write_text("import sys, time\n" + body)
    return (sys.executable, str(script))


def test_run_point_parses_output_and_reports_failures(tmp_path) -> None:
    cmd = fake_command(tmp_path, "print('noise'); print('{\"full_s\": 0.5, \"backend\": \"x\"}')\n")
    assert sync_scale.run_point(mode="iptables", services=10, timeout=30, command=cmd)[0]["full_s"] == 0.5
    cmd = fake_command(tmp_path, "print('boom', file=sys.stderr); sys.exit(3)\n")
    got = sync_scale.run_point(mode="iptables", services=10, timeout=30, command=cmd)[0]
    assert "exited 3" in got["error"] and "boom" in got["error"]


def test_run_point_stops_an_overrunning_point(tmp_path) -> None:
    import time

    cmd = fake_command(tmp_path, "time.sleep(60)\n")
    start = time.monotonic()
    got = sync_scale.run_point(mode="iptables", services=10, timeout=0.5, command=cmd)[0]
    assert "timed out" in got["error"] and time.monotonic() - start < 20


def test_run_all_respects_deadline_and_skips(tmp_path, monkeypatch) -> None:
    import time

    cmd = fake_command(tmp_path, "print('{\"full_s\": 1}')\n")
    got = sync_scale.run_all(modes=["iptables", "ipvs", "warp"], services=[1000],
                             skipped={"proxyd-ipvs": "no IPVS"}, deadline=time.monotonic() + 100,
                             log=lambda _: None, command=cmd)
    assert got["ipvs"] == {"skipped": "no IPVS"}
    assert "no driver for mode warp" in got["warp"]["skipped"]
    assert [p["full_s"] for p in got["iptables"]["points"]] == [1.0]
    got = sync_scale.run_all(modes=["iptables"], services=[1000, 10000], skipped={},
                             deadline=time.monotonic() + 1, log=lambda _: None, command=cmd)
    assert [p["error"] for p in got["iptables"]["points"]] == ["not run: time budget exhausted"] * 2
    cmd = fake_command(tmp_path, "time.sleep(30)\n")
    monkeypatch.setattr(sync_scale, "POINT_CAP", {1000: 0.5})
    got = sync_scale.run_all(modes=["iptables"], services=[1000, 30000], skipped={},
                             deadline=time.monotonic() + 100, log=lambda _: None, command=cmd)
    errors = [p["error"] for p in got["iptables"]["points"]]
    assert errors == ["timed out after 0s", "not run: 1000 services already timed out"]


# --- configs and command line --------------------------------------------------------------------

def test_haproxy_config_is_the_tuned_tcp_anchor() -> None:
    cfg = haproxy_config(listeners=[("203.0.113.1", 8080, [("10.244.1.11", 80), ("10.244.1.12", 80)])])
    for line in ("nbthread 1", "mode tcp", "balance roundrobin", "option splice-request",
                 "option splice-response", "bind 203.0.113.1:8080", "server s0 10.244.1.11:80",
                 "server s1 10.244.1.12:80"):
        assert line in cfg
    assert "splice-auto" not in cfg


def test_nginx_config_paths_stay_in_workdir(tmp_path) -> None:
    cfg = nginx_config(workdir=tmp_path, port=80)
    assert f"root {tmp_path}/www;" in cfg and f"pid {tmp_path}/nginx.pid;" in cfg
    assert "worker_processes 1;" in cfg and "/etc/" not in cfg and "/var/" not in cfg


def test_parse_args_validates() -> None:
    args = parse_args(["--quick", "--modes", "userspace, iptables"])
    assert args.quick and args.modes == ["userspace", "iptables"]
    for bad in (["--modes", "nft"], ["--rounds", "0"], ["--seconds", "1000"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


# --- plots ---------------------------------------------------------------------------------------

def test_plots_write_pngs(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from bench import plots

    results = {"samples": full_samples(), "control": {
        "sync_scale": {"iptables": {"points": [{"services": 1000, "full_s": 0.1, "incremental_s": 0.01},
                                               {"services": 10000, "full_s": 0.9, "incremental_s": None}]}},
        "programming": {"userspace": {"seconds": [0.1, 0.2]}}}}
    for maker, name in ((plots.dataplane, "d.png"), (plots.control, "c.png")):
        out = maker(results, tmp_path / name)
        assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.dataplane({"samples": []}, tmp_path / "none.png") is None
    assert plots.control({}, tmp_path / "none2.png") is None


def test_memory_verdict() -> None:
    memory = {USERSPACE: {"held": 10000, "rss_before_kib": 40000, "rss_holding_kib": 48000,
                          "kib_per_connection": 0.8},
              HAPROXY: {"held": 10000, "rss_before_kib": 9000, "rss_holding_kib": 40000,
                        "kib_per_connection": 3.1}}
    assert report.memory_lines(memory)[0].endswith(": met")
    memory[USERSPACE]["kib_per_connection"] = 3.2
    assert report.memory_lines(memory)[0].endswith(": not met")
    assert report.memory_lines({USERSPACE: {"error": "boom"}})[0].endswith("no data")
    md = report.markdown({"memory": memory})
    assert "Memory per idle established connection" in md and "| haproxy | 10000 |" in md
