"""Turning raw benchmark samples into medians, ratios, target verdicts and a Markdown report.

Pure functions over plain dicts (the same dicts the JSON file holds), so the
whole report can be rebuilt from a results file and is unit-tested without
root. A sample is one measurement of one path in one round::

    {"round": 0, "path": "haproxy", "metric": "bulk", "gbps": 8.7, "cpu_per_gb": 0.44, ...}

``METRICS`` says which sample field becomes which reported quantity;
``TARGETS`` are the acceptance ratios (issue 7 for the kernel modes, issue 15
for userspace: one pinned core each, and two workers against two HAProxy
threads; issue 16: the same for the IPv6 paths against the IPv6 baselines);
``memory_lines`` judges the idle-connection memory (issue 15). A ratio is always
median(path) / median(baseline); a verdict is "met", "not met" or "no data"
(baseline or path missing, skipped, or a zero baseline), never a guess.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DIRECT = "direct"
HAPROXY = "haproxy"
USERSPACE = "proxyd-userspace"
HAPROXY_2T = "haproxy-2t"
USERSPACE_2W = "proxyd-userspace-2w"
KERNEL_PATHS = ("proxyd-iptables", "proxyd-ipvs", "proxyd-nftables")
IPV6 = "-ipv6"  # the IPv6 twin of a path (issue 16): bulk and new connections only
DIRECT6, HAPROXY6, USERSPACE6 = DIRECT + IPV6, HAPROXY + IPV6, USERSPACE + IPV6
KERNEL_PATHS6 = tuple(p + IPV6 for p in KERNEL_PATHS)
PATH_ORDER = (DIRECT, HAPROXY, USERSPACE, *KERNEL_PATHS, HAPROXY_2T, USERSPACE_2W,
              DIRECT6, HAPROXY6, USERSPACE6, *KERNEL_PATHS6)


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    sample_metric: str  # "bulk", "keepalive" or "newconn"
    field: str
    label: str
    unit: str
    higher_is_better: bool


METRICS: tuple[Metric, ...] = (
    Metric("bulk_gbps", "bulk", "gbps", "bulk throughput, 1 TCP stream", "Gbit/s", True),
    Metric("bulk_cpu_per_gb", "bulk", "cpu_per_gb", "proxy CPU per GB", "CPU-s/GB", False),
    Metric("ka_rps", "keepalive", "rps", "keep-alive 1 KiB request rate", "req/s", True),
    Metric("ka_p50", "keepalive", "p50_us", "keep-alive p50 latency", "µs", False),
    Metric("ka_p99", "keepalive", "p99_us", "keep-alive p99 latency", "µs", False),
    Metric("ka_cpu", "keepalive", "cpu_per_req_us", "proxy CPU per keep-alive request", "µs", False),
    Metric("nc_cps", "newconn", "cps", "new-connection rate", "conn/s", True),
    Metric("nc_p50", "newconn", "p50_us", "new-connection p50 latency", "µs", False),
    Metric("nc_p99", "newconn", "p99_us", "new-connection p99 latency", "µs", False),
    Metric("nc_cpu", "newconn", "cpu_per_conn_us", "proxy CPU per new connection", "µs", False),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}


@dataclass(frozen=True, slots=True)
class Target:
    metric: str  # a key of METRIC_BY_KEY
    path: str
    baseline: str
    op: str  # ">=" or "<="
    threshold: float


def _targets() -> tuple[Target, ...]:
    # issue 15: the native engine below HAProxy's CPU per connection, on one core and on two
    userspace = [("bulk_gbps", ">=", 1.0), ("bulk_cpu_per_gb", "<=", 1.0), ("ka_cpu", "<=", 1.0),
                 ("nc_cpu", "<=", 0.9), ("nc_cps", ">=", 1.0), ("nc_p99", "<=", 1.2)]
    kernel = [("bulk_gbps", ">=", 0.95), ("nc_cps", ">=", 0.8)]
    out = [Target(m, USERSPACE, HAPROXY, op, t) for m, op, t in userspace]
    out += [Target(m, USERSPACE_2W, HAPROXY_2T, op, t) for m, op, t in userspace]
    out += [Target(m, path, DIRECT, op, t) for path in KERNEL_PATHS for m, op, t in kernel]
    # IPv6 (issue 16): the same targets against the IPv6 baselines, for what the IPv6 paths measure
    measured6 = ("bulk_", "nc_")
    out += [Target(m, USERSPACE6, HAPROXY6, op, t) for m, op, t in userspace if m.startswith(measured6)]
    out += [Target(m, path, DIRECT6, op, t) for path in KERNEL_PATHS6 for m, op, t in kernel]
    return tuple(out)


TARGETS: tuple[Target, ...] = _targets()


@dataclass(frozen=True, slots=True)
class Stat:
    median: float
    low: float
    high: float
    n: int


@dataclass(frozen=True, slots=True)
class Verdict:
    target: Target
    ratio: float | None
    status: str  # "met", "not met", "no data"
    why: str = ""


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, bool, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def stat(values: Iterable[Any]) -> Stat | None:
    """Median, min, max and count of the usable numbers in ``values``; None when there are none."""
    numbers = [v for v in (_number(x) for x in values) if v is not None]
    if not numbers:
        return None
    return Stat(statistics.median(numbers), min(numbers), max(numbers), len(numbers))


def summarise(samples: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Stat]]:
    """{path: {metric key: Stat}} over every sample without an ``error``."""
    values: dict[str, dict[str, list[Any]]] = {}
    for sample in samples:
        if sample.get("error"):
            continue
        path = sample.get("path")
        if not isinstance(path, str):
            continue
        for metric in METRICS:
            if sample.get("metric") == metric.sample_metric and metric.field in sample:
                values.setdefault(path, {}).setdefault(metric.key, []).append(sample[metric.field])
    out: dict[str, dict[str, Stat]] = {}
    for path, by_key in values.items():
        for key, raw in by_key.items():
            got = stat(raw)
            if got is not None:
                out.setdefault(path, {})[key] = got
    return out


def judge(summary: Mapping[str, Mapping[str, Stat]], skipped: Mapping[str, str],
          targets: Sequence[Target] = TARGETS) -> list[Verdict]:
    """One verdict per target: ratio of medians against its threshold."""
    verdicts = []
    for target in targets:
        missing = [p for p in (target.path, target.baseline) if target.metric not in summary.get(p, {})]
        if missing:
            reasons = [f"{p}: {skipped[p]}" if p in skipped else f"{p}: no samples" for p in missing]
            verdicts.append(Verdict(target, None, "no data", "; ".join(reasons)))
            continue
        value = summary[target.path][target.metric].median
        base = summary[target.baseline][target.metric].median
        if base == 0:
            verdicts.append(Verdict(target, None, "no data", f"{target.baseline} median is 0"))
            continue
        ratio = value / base
        ok = ratio >= target.threshold if target.op == ">=" else ratio <= target.threshold
        verdicts.append(Verdict(target, ratio, "met" if ok else "not met"))
    return verdicts


def ordered_paths(paths: Iterable[str]) -> list[str]:
    """Known paths in a fixed order, unknown ones after them alphabetically."""
    paths = set(paths)
    return [p for p in PATH_ORDER if p in paths] + sorted(paths - set(PATH_ORDER))


def fmt(value: float | None) -> str:
    """Three significant digits, no exponent for everyday magnitudes."""
    if value is None:
        return "–"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    digits = max(0, 2 - math.floor(math.log10(magnitude)))
    return f"{value:.{digits}f}"


def cell(got: Stat | None) -> str:
    if got is None:
        return "–"
    if got.n == 1 or got.low == got.high:
        return fmt(got.median)
    return f"{fmt(got.median)} ({fmt(got.low)}–{fmt(got.high)})"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(results: Mapping[str, Any]) -> str:
    """The whole Markdown report from a results dict (as written to JSON)."""
    samples = results.get("samples", [])
    skipped: Mapping[str, str] = results.get("skipped", {})
    summary = summarise(samples)
    paths = ordered_paths(set(summary) | set(results.get("paths", [])))
    meta = results.get("meta", {})
    lines = ["# proxyd benchmark", ""]
    if meta:
        lines.append(" · ".join(f"{k}: {_escape(str(v))}" for k, v in meta.items()))
        lines.append("")
    lines += ["## Data path", "",
              "Median over rounds (min–max in brackets). Rounds interleave the paths.", ""]
    if paths:
        lines.append("| metric | unit | " + " | ".join(paths) + " |")
        lines.append("|---|---|" + "---|" * len(paths))
        for metric in METRICS:
            row = [cell(summary.get(p, {}).get(metric.key)) for p in paths]
            lines.append(f"| {metric.label} | {metric.unit} | " + " | ".join(row) + " |")
    else:
        lines.append("No path was measured.")
    lines.append("")
    for note in results.get("notes", []):
        lines.append(f"Note: {_escape(str(note))}")
    if results.get("notes"):
        lines.append("")
    cpu_notes = results.get("cpu_notes", {})
    if cpu_notes:
        lines += ["How proxy CPU is measured:", ""]
        lines += [f"- `{p}`: {_escape(str(cpu_notes[p]))}" for p in ordered_paths(cpu_notes)]
        lines.append("")
    if skipped:
        lines += ["Skipped:", ""]
        lines += [f"- `{p}`: {_escape(str(skipped[p]))}" for p in ordered_paths(skipped)]
        lines.append("")
    errors = [s for s in samples if s.get("error")]
    if errors:
        lines += [f"Failed samples ({len(errors)}, left out of the medians):", ""]
        lines += [f"- round {s.get('round')} `{s.get('path')}` {s.get('metric')}: "
                  f"{_escape(str(s['error']))[:300]}" for s in errors[:20]]
        lines.append("")
    lines += memory_markdown(results.get("memory", {}))
    lines += ["## Targets (issues 7, 15 and 16)", "", "| path | vs | metric | ratio | target | verdict |",
              "|---|---|---|---|---|---|"]
    for verdict in judge(summary, skipped):
        target = verdict.target
        ratio = "–" if verdict.ratio is None else f"{verdict.ratio:.3f}×"
        status = verdict.status + (f" ({_escape(verdict.why)})" if verdict.why else "")
        lines.append(f"| {target.path} | {target.baseline} | {METRIC_BY_KEY[target.metric].label} | {ratio} "
                     f"| {target.op} {target.threshold:g}× | {status} |")
    lines.append("")
    lines += control_markdown(results.get("control", {}))
    return "\n".join(lines).rstrip() + "\n"


def control_markdown(control: Mapping[str, Any]) -> list[str]:
    """Sync-scale and network-programming sections (empty when nothing was measured)."""
    lines: list[str] = []
    scale = control.get("sync_scale", {})
    if scale:
        lines += ["## Control plane: sync time vs service count", "",
                  "Each mode's own sync-scale script (10 endpoints per service): the first full sync, and "
                  "the median incremental sync after one endpoint of one service changed.", "",
                  "| mode | back end | services | full sync s | incremental sync s | RSS MiB | note |",
                  "|---|---|---|---|---|---|---|"]
        for mode in sorted(scale):
            entry = scale[mode]
            if entry.get("skipped"):
                lines.append(f"| {mode} | – | – | – | – | – | skipped: {_escape(str(entry['skipped']))} |")
                continue
            for point in sorted(entry.get("points", []), key=lambda p: (str(p.get("backend", "")),
                                                                         _number(p.get("services")) or 0)):
                note = _escape(str(point.get("error", "")))[:200]
                backend = _escape(str(point.get("backend") or "–"))
                times = [fmt(_number(point.get(k))) for k in ("full_s", "incremental_s", "rss_mib")]
                lines.append(f"| {mode} | {backend} | {point.get('services', '–')} | " + " | ".join(times)
                             + f" | {note} |")
        lines.append("")
    latency = control.get("programming", {})
    if latency:
        lines += ["## Control plane: network programming latency", "",
                  "Time from a manifest file change (atomic rename) to new connections reaching the new "
                  "endpoint.",
                  "", "| mode | samples | p50 ms | max ms | note |", "|---|---|---|---|---|"]
        for mode in sorted(latency):
            entry = latency[mode]
            got = stat(entry.get("seconds", []))
            note = _escape(str(entry.get("skipped") or entry.get("error") or ""))[:200]
            if got is None:
                lines.append(f"| {mode} | 0 | – | – | {note} |")
            else:
                lines.append(f"| {mode} | {got.n} | {fmt(got.median * 1e3)} | {fmt(got.high * 1e3)} "
                             f"| {note} |")
        lines.append("")
    return lines


def memory_markdown(memory: Mapping[str, Any]) -> list[str]:
    """The idle-connection memory table: RSS per connection held through each proxy."""
    if not memory:
        return []
    lines = ["## Memory per idle established connection", "",
             "Resident memory of the proxy process (VmRSS) while holding N idle connections, minus before, "
             "divided by N (kernel socket memory is the same for both and not included).", "",
             "| proxy | connections held | RSS before (KiB) | RSS holding (KiB) | KiB per connection |",
             "|---|---|---|---|---|"]
    for name in ordered_paths(memory):
        m = memory[name]
        if m.get("error"):
            lines.append(f"| {name} | – | – | – | failed: {_escape(str(m['error']))[:200]} |")
            continue
        lines.append(f"| {name} | {m.get('held')} | {m.get('rss_before_kib')} | {m.get('rss_holding_kib')} "
                     f"| {fmt(_number(m.get('kib_per_connection')))} |")
    lines += [""] + [f"- {line}" for line in memory_lines(memory)] + [""]
    return lines


def memory_lines(memory: Mapping[str, Any]) -> list[str]:
    """proxyd's idle-connection memory against HAProxy's (target: not more)."""
    ours = _number(memory.get(USERSPACE, {}).get("kib_per_connection"))
    theirs = _number(memory.get(HAPROXY, {}).get("kib_per_connection"))
    if ours is None or theirs is None:
        return ["memory per idle connection, proxyd-userspace vs haproxy: no data"]
    status = "met" if ours <= theirs else "not met"
    return [f"memory per idle connection: proxyd-userspace {fmt(ours)} KiB vs haproxy {fmt(theirs)} KiB "
            f"(target <= haproxy): {status}"]


def verdict_lines(results: Mapping[str, Any]) -> list[str]:
    """One line per target for the terminal: ``met`` / ``not met`` / ``no data``."""
    summary = summarise(results.get("samples", []))
    out = []
    for verdict in judge(summary, results.get("skipped", {})):
        target = verdict.target
        ratio = "n/a" if verdict.ratio is None else f"{verdict.ratio:.3f}x"
        extra = f" ({verdict.why})" if verdict.why else ""
        out.append(f"{target.path} vs {target.baseline}: {METRIC_BY_KEY[target.metric].label} = {ratio} "
                   f"(target {target.op} {target.threshold:g}x): {verdict.status}{extra}")
    if results.get("memory"):
        out += memory_lines(results["memory"])
    return out
