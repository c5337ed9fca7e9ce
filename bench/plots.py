"""PNG plots of a results dict: data-path bars per metric and control-plane curves.

``dataplane.png``: one panel per metric, one bar per path at the median with
min–max whiskers. ``control.png``: sync time against service count per mode
(full and incremental) and network-programming latency per mode. matplotlib
is an optional dependency (the ``bench`` extra); without it the report is
still written and the caller is told plots were skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.report import METRICS, ordered_paths, stat, summarise


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def dataplane(results: Mapping[str, Any], out: Path) -> Path | None:
    summary = summarise(results.get("samples", []))
    paths = ordered_paths(summary)
    if not paths:
        return None
    plt = _pyplot()
    cols = 2
    rows = (len(METRICS) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.2 * rows))
    for ax, metric in zip(axes.flat, METRICS, strict=False):
        names, medians, below, above = [], [], [], []
        for path in paths:
            got = summary[path].get(metric.key)
            if got is None:
                continue
            names.append(path.removeprefix("proxyd-"))
            medians.append(got.median)
            below.append(got.median - got.low)
            above.append(got.high - got.median)
        ax.bar(names, medians, yerr=[below, above], capsize=4, color="#4c72b0")
        ax.set_title(f"{metric.label} ({'higher' if metric.higher_is_better else 'lower'} is better)",
                     fontsize=9)
        ax.set_ylabel(metric.unit)
        ax.tick_params(axis="x", labelsize=8)
    for ax in list(axes.flat)[len(METRICS):]:
        ax.set_visible(False)
    fig.suptitle("proxyd data path: median over rounds, whiskers min–max")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def control(results: Mapping[str, Any], out: Path) -> Path | None:
    ctl = results.get("control", {})
    scale = {m: e for m, e in ctl.get("sync_scale", {}).items() if e.get("points")}
    latency = {m: stat(e.get("seconds", [])) for m, e in ctl.get("programming", {}).items()}
    latency = {m: s for m, s in latency.items() if s is not None}
    if not scale and not latency:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for mode, entry in sorted(scale.items()):
        backends = sorted({str(p.get("backend") or "") for p in entry["points"]})
        for backend in backends:
            label = f"{mode}/{backend}" if backend else mode
            for key, style in (("full_s", "-o"), ("incremental_s", "--x")):
                points = [(p["services"], p[key]) for p in entry["points"]
                          if str(p.get("backend") or "") == backend and isinstance(p.get(key), int | float)
                          and isinstance(p.get("services"), int)]
                if points:
                    xs, ys = zip(*sorted(points), strict=True)
                    left.plot(xs, ys, style, label=f"{label} {key.removesuffix('_s')}")
    left.set_xlabel("services")
    if scale:
        left.set_yscale("log")
    left.set_ylabel("sync time (s)")
    left.set_title("sync time vs service count")
    if scale:
        left.legend(fontsize=8)
    modes = sorted(latency)
    right.bar(modes, [latency[m].median * 1e3 for m in modes],
              yerr=[[(latency[m].median - latency[m].low) * 1e3 for m in modes],
                    [(latency[m].high - latency[m].median) * 1e3 for m in modes]], capsize=4, color="#55a868")
    right.set_ylabel("ms")
    right.set_title("network programming latency (median, min–max)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
