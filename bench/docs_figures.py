"""Write every generated figure of README.md and docs/ from the stored results files, in one command.

    .venv/bin/python -m bench.docs_figures            # rewrite the marked regions
    .venv/bin/python -m bench.docs_figures --check    # exit 1 when a region differs from its source

A region is the text between ``<!-- figures:NAME ... -->`` and
``<!-- /figures:NAME -->``; only that text is replaced, so prose around it
stays as written. Each region says which stored run it comes from:

* ``bench-dataplane``, ``bench-targets``, ``programming``
  (README.md), ``userspace-engine`` (docs/userspace.md):
  ``bench/results/full.json``, written by ``python -m bench``;
* ``reliability`` (docs/reliability.md): ``bench/results/reliability.json``,
  written by ``python -m bench.reliability_figures`` (figures of failed tests
  are not counted);
* the scale figures (``bench/scale_figures.py`` renders them), each from the
  file its benchmark writes with ``--save`` (``bench/runmeta.py``: date,
  commit, CPUs, load average before and after, the exact command, all
  quoted in the region):

  - ``nftables-summary`` (README.md), ``nftables-sync`` (docs/nftables.md):
    ``bench/results/sync_scale-nftables.json``,
    ``python -m bench.sync_scale --mode nftables --services 1000,10000 --save``
    (the kube-proxy anchor, ``bench/kube_proxy_nft.py``, runs in it);
  - ``userspace-sync`` (README.md), ``userspace-sync-docs`` (docs/userspace.md):
    ``sync_scale-userspace.json``,
    ``python -m bench.sync_scale --mode userspace --services 1000,10000 --save``;
  - ``iptables-sync`` (docs/iptables.md): ``sync_scale-iptables.json``,
    ``python -m bench.sync_scale --mode iptables --backend nft,legacy --services 1000,10000 --save``;
  - ``latency-summary`` (README.md), ``latency-vs-services``
    (docs/nftables.md): ``latency_vs_services.json``,
    ``python bench/latency_vs_services.py --services 10,100,1000,10000 --connects 1000``;
  - ``status-scale`` (README.md), ``nftables-status`` (docs/nftables.md): ``status_scale.json``,
    ``python bench/status_scale.py --services 10000 --save``;
  - ``e2e-scale``, ``e2e-scale-1k`` (README.md): ``e2e_scale-10000.json``,
    ``e2e_scale-1000.json``,
    ``python -m bench.e2e_scale --services N --modes userspace,iptables,nftables
    --formats json --api --save``;
    ``e2e-idle`` (README.md): ``e2e_scale-idle.json``,
    ``python -m bench.e2e_scale --idle-files 10000 --save``;
  - ``quarantine`` (docs/reliability.md): ``quarantine.json``,
    ``python -m bench.quarantine --services 10000 --save``;
  - ``iptables-tools``, ``iptables-restore`` (docs/iptables.md):
    ``iptables_tools.json``, ``python bench/iptables_tools.py --rules 10000 --save``;
  - ``dualstack-cost`` (docs/dualstack.md): ``dualstack_sync.json``,
    ``python -m bench.dualstack_sync --mode nftables,iptables --services 10000 --save``;
  - ``ipvs-summary`` (README.md), ``ipvs-sync`` (docs/ipvs.md):
    ``sync_scale-ipvs.json``, inside the QEMU guest (this host's kernel has
    no IPVS): ``tests/vm/run-in-vm.sh --cmd 'python -m bench.sync_scale
    --mode ipvs --services 1000,10000 --save'``, which copies the file the
    guest saved to ``bench/results/``;
  - ``idlemem-guest`` (README.md): ``idlemem-guest.json``, the memory per
    idle connection with 10,000 held through proxyd and HAProxy, inside the
    QEMU guest (where the descriptor hard limit can be raised):
    ``tests/vm/run-in-vm.sh --cmd 'python -m bench.idlemem --held 10000
    --save'`` (with longer timeouts for the emulated CPU);
  - ``paired-keepalive-1w``, ``paired-keepalive-2w``, ``paired-bulk-1w``
    (README.md): ``paired-<metric>-<workers>w.json``, HAProxy and proxyd
    userspace alone, alternated:
    ``python -m bench.paired --metric keepalive|bulk [--workers 2] --rounds 12 --save``.

Every benchmark above needs root (network namespaces) except quarantine.

Generated cells (``<!-- fig TEST KEY [UNIT] -->`` … ``<!-- /fig -->``) put one
figure of a reliability test into a sentence or a table cell of any of these
files, from ``bench/results/reliability.json``: TEST is the end of the test's
node id (after ``::``), KEY a figure it records; a test that did not pass
gives no figure. ``--check`` also runs ``bench/figure_lint.py``: a figure typed
in outside generated text fails it unless it is a listed design constant or
sits in a historic block naming its commit.

A number that belongs in the docs but has no stored run behind it is not
written by hand into a region: rerun the benchmark, then this command.
``tests/unit/test_docs_figures.py`` fails when a region was edited by hand
or its results file changed without this command being run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench import figure_lint, paired, reliability_figures, scale_figures
from bench.paths import HAPROXY2, IPV6, USERSPACE_2W
from bench.report import (
    DIRECT,
    HAPROXY,
    METRIC_BY_KEY,
    USERSPACE,
    Stat,
    fmt,
    judge,
    stat,
    summarise,
)

REPO = Path(__file__).resolve().parent.parent
FULL = "bench/results/full.json"
RELIABILITY = "bench/results/reliability.json"
_R = "bench/results/"

_COLUMNS = {DIRECT: "direct", HAPROXY: "HAProxy (splice)", USERSPACE: "proxyd userspace",
            "proxyd-iptables": "proxyd iptables", "proxyd-ipvs": "proxyd ipvs",
            "proxyd-nftables": "proxyd nftables", HAPROXY2: "HAProxy 2 threads",
            USERSPACE_2W: "proxyd userspace 2 workers"}
_SINGLE_FAMILY = (HAPROXY2, USERSPACE_2W)  # the two-core case runs on IPv4 only
_COLUMNS |= {path + IPV6: name for path, name in list(_COLUMNS.items()) if path not in _SINGLE_FAMILY}
_SHORT = {DIRECT: "direct", HAPROXY: "HAProxy", USERSPACE: "userspace", "proxyd-iptables": "iptables",
          "proxyd-ipvs": "ipvs", "proxyd-nftables": "nftables", HAPROXY2: "HAProxy 2 threads",
          USERSPACE_2W: "userspace 2 workers"}
_SHORT |= {path + IPV6: name + " IPv6" for path, name in list(_SHORT.items()) if path not in _SINGLE_FAMILY}
_TARGET_LABEL = {"bulk_gbps": "bulk throughput", "bulk_cpu_per_gb": "CPU per GB",
                 "ka_cpu": "CPU per keep-alive request", "nc_cpu": "CPU per new connection",
                 "nc_p99": "new-connection p99", "nc_cps": "new-connection rate"}


def _load(rel: str) -> dict[str, Any]:
    return json.loads((REPO / rel).read_text())


def _source(rel: str, data: Mapping[str, Any], target: str = "README.md") -> str:
    meta = data.get("meta", {})
    link = "../" * target.count("/") + rel  # relative to the file the region is in
    if "command" in meta:  # a --save file of bench/runmeta.py: name the whole run
        return (f"*Generated by `python -m bench.docs_figures` from [`{rel}`]({link}): "
                f"{scale_figures.run_line(data)}.*")
    run = f"run `{meta['run']}` of {meta['date']}" if "run" in meta else f"run of {meta.get('date', '?')}"
    return f"*Generated by `python -m bench.docs_figures` from [`{rel}`]({link}) ({run}).*"


# -- README: the full benchmark run ----------------------------------------------------------------

def _kernel_path(path: str) -> bool:
    return path.removesuffix(IPV6) in ("proxyd-iptables", "proxyd-ipvs", "proxyd-nftables")


def _dataplane(data: Mapping[str, Any]) -> str:
    summary = summarise(data.get("samples", []))
    paths = [p for p in _COLUMNS if p in summary]
    meta = data.get("meta", {})

    def value(path: str, key: str, show: Callable[[float], str]) -> str:
        got: Stat | None = summary.get(path, {}).get(key)
        return "–" if got is None else show(got.median)

    def cpu(path: str, key: str, show: Callable[[float], str]) -> str:
        if path.removesuffix(IPV6) == DIRECT:
            return "–"
        if _kernel_path(path):
            return "(kernel)"
        return value(path, key, show)

    rows = [
        ("bulk, 1 TCP stream", lambda p: value(p, "bulk_gbps", lambda v: f"{fmt(v)} Gbit/s")),
        ("proxy CPU per GB", lambda p: cpu(p, "bulk_cpu_per_gb", lambda v: f"{fmt(v)} s")),
        ("keep-alive 1 KiB requests", lambda p: value(p, "ka_rps", lambda v: f"{fmt(v)}/s")),
        ("proxy CPU per keep-alive request", lambda p: cpu(p, "ka_cpu", lambda v: f"{fmt(v)} µs")),
        ("new connections", lambda p: value(p, "nc_cps", lambda v: f"{fmt(v)}/s")),
        ("new-connection p99", lambda p: value(p, "nc_p99", lambda v: f"{fmt(v / 1000)} ms")),
        ("proxy CPU per new connection", lambda p: cpu(p, "nc_cpu", lambda v: f"{fmt(v)} µs")),
    ]
    lines = [f"Run `{meta.get('run', '?')}` of {meta.get('date', '?')}: {meta.get('rounds', '?')} rounds × "
             f"{meta.get('seconds per run', '?')} s, interleaved, medians; kernel {meta.get('kernel', '?')}, "
             f"{meta.get('cpu', '?')}, {meta.get('pinning', '')}; load average "
             f"{meta.get('load average at start', '?')} at start."
             + "".join(f" {note[0].upper()}{note[1:]}." for note in data.get("notes", []))]
    for title, family in (("IPv4", [p for p in paths if not p.endswith(IPV6)]),
                          ("IPv6", [p for p in paths if p.endswith(IPV6)])):
        if not family:
            continue
        lines += ["", f"{title}:", "", "| metric | " + " | ".join(_COLUMNS[p] for p in family) + " |",
                  "|---|" + "---|" * len(family)]
        for label, show in rows:
            cells = [show(p) for p in family]
            if any(cell not in ("–", "(kernel)") for cell in cells):
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    memory = data.get("memory", {})
    if memory:
        lines += ["", "Memory per idle established connection (RSS of the proxy process while holding N idle "
                  "connections, minus before, over N): " + "; ".join(
                      f"{_SHORT.get(path, path)} {fmt(m['kib_per_connection'])} KiB ({m['held']:,} held)"
                      for path, m in memory.items() if isinstance(m, Mapping) and "kib_per_connection" in m
                      and "held" in m) + "."]
    return "\n".join(lines)


def _overlap(a: Stat | None, b: Stat | None) -> bool:
    return a is not None and b is not None and a.low <= b.high and b.low <= a.high


def _threshold(value: float) -> str:
    return f"{value:.1f}" if round(value, 1) == value else f"{value:g}"


def _targets(data: Mapping[str, Any], only: Callable[[str], bool] = lambda path: True) -> str:
    summary = summarise(data.get("samples", []))
    skipped: Mapping[str, str] = data.get("skipped", {})
    lines = ["| comparison | ratio | target | |", "|---|---|---|---|"]
    no_data: dict[str, str] = {}
    for verdict in judge(summary, skipped):
        target = verdict.target
        if not only(target.path):
            continue
        if verdict.ratio is None:
            no_data.setdefault(target.path, verdict.why)
            continue
        op = "≥" if target.op == ">=" else "≤"
        status = "met" if verdict.status == "met" else "**not met**"
        if verdict.status != "met" and _overlap(summary[target.path].get(target.metric),
                                                summary[target.baseline].get(target.metric)):
            status += " (within the min–max spread of both)"
        label = _TARGET_LABEL.get(target.metric, METRIC_BY_KEY[target.metric].label)
        lines.append(f"| {_SHORT[target.path]} / {_COLUMNS[target.baseline].split(' ')[0]}, {label} | "
                     f"{verdict.ratio:.2f}× | {op} {_threshold(target.threshold)}× | {status} |")
    for path, why in no_data.items():
        # "proxyd-ipvs: kernel lacks IP_VS: /proc/... absent; ..." -> "kernel lacks IP_VS"
        short = why.split(": ", 2)[1] if why.count(": ") >= 1 else why
        short = short.replace("|", "/")
        lines.append(f"| {_SHORT.get(path, path)} / direct | – | – | no data in this run: {short} |")
    return "\n".join(lines)


def _userspace_engine(data: Mapping[str, Any]) -> str:
    """docs/userspace.md: the engine's ratios against HAProxy and its idle memory, from the full run."""
    meta = data.get("meta", {})
    userspace = (USERSPACE, USERSPACE_2W, USERSPACE + IPV6)
    summary = summarise(data.get("samples", []))
    lines = [f"Run `{meta.get('run', '?')}` of {meta.get('date', '?')} ({meta.get('cpu', '?')}, kernel "
             f"{meta.get('kernel', '?')}, load average {meta.get('load average at start', '?')} at start). "
             "Single core: proxy pinned to CPU 1, load and backends on CPU 0, one engine worker; two cores: "
             "`--userspace-workers 2` against HAProxy `nbthread 2`, both unpinned.", "",
             _targets(data, only=lambda path: path in userspace), "",
             "| path | CPU per new connection | CPU per keep-alive request | CPU per GB |",
             "|---|---|---|---|"]
    for path in (HAPROXY, USERSPACE, HAPROXY2, USERSPACE_2W, HAPROXY + IPV6, USERSPACE + IPV6):
        got = summary.get(path, {})
        if not got:
            continue
        cells = [f"{fmt(got[key].median)} {unit}" if got.get(key) else "–"
                 for key, unit in (("nc_cpu", "µs"), ("ka_cpu", "µs"), ("bulk_cpu_per_gb", "s"))]
        family = " IPv6" if path.endswith(IPV6) else ""
        lines.append(f"| {_COLUMNS[path]}{family} | " + " | ".join(cells) + " |")
    memory = data.get("memory", {})
    held = {path: m for path, m in memory.items() if isinstance(m, Mapping) and "kib_per_connection" in m}
    if held:
        lines += ["", "| proxy | connections held | RSS before | RSS holding | per connection |",
                  "|---|---|---|---|---|"]
        lines += [f"| {_COLUMNS.get(path, path)} | {m['held']:,} | {m['rss_before_kib']:,} KiB | "
                  f"{m['rss_holding_kib']:,} KiB | {fmt(m['kib_per_connection'])} KiB |"
                  for path, m in held.items()]
    return "\n".join(lines)


def _programming(data: Mapping[str, Any]) -> str:
    latency = data.get("control", {}).get("programming", {})
    parts = []
    for mode in sorted(latency):
        got = stat(latency[mode].get("seconds", []))
        if got is not None:
            parts.append(f"{mode} {fmt(got.median * 1000)} ms (p50 of {got.n})")
    return "Network programming latency (manifest change to traffic following it): " + ", ".join(parts) + "."


def _paired(data: Mapping[str, Any]) -> str:
    """A paired run (bench/paired.py): its plan and one line per target it measured."""
    plan = data.get("plan", {})
    one = plan.get("workers") == 1
    sides = ("one proxyd worker pinned to CPU 1 against HAProxy's one pinned thread" if one
             else "two proxyd workers against HAProxy's two threads, both unpinned")
    rounds, seconds, metric = plan.get("rounds", "?"), plan.get("seconds", "?"), plan.get("metric", "?")
    head = f"{rounds} rounds × {seconds} s of `{metric}`, {sides}, the side going first alternating:"
    return "\n".join([head, "", *(f"- {line}" for line in paired.verdict_lines(data))])


# -- docs/reliability.md ---------------------------------------------------------------------------

def _reliability(data: Mapping[str, Any]) -> str:
    return reliability_figures.render(dict(data), source=RELIABILITY)


# -- generated cells: one figure of a reliability test, inside a sentence or a table cell -----------

CELL = re.compile(r"(<!-- fig (?P<test>\S+) (?P<key>\w+)(?: (?P<unit>[^>]*?))? -->)"
                  r"(?P<value>.*?)(<!-- /fig -->)", re.DOTALL)


def _cell_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not value.is_integer():
        return f"{value:g}"
    return f"{int(value):,}"


def cell(data: Mapping[str, Any], test: str, key: str, unit: str = "") -> str:
    """The text of ``<!-- fig TEST KEY UNIT -->``: figure KEY of the test whose node id ends in
    ``::TEST``, from the stored reliability run; a test that did not pass gives no figure."""
    tests = reliability_figures.tests_of(dict(data))
    matches = [entry for node, entry in tests.items() if node.endswith(f"::{test}")]
    if len(matches) != 1:
        return "(not in the stored run)" if not matches else f"(ambiguous test name {test})"
    entry = matches[0]
    if entry.get("outcome") != "passed":
        return f"(not counted: the test {entry.get('outcome', 'did not pass')})"
    value = (entry.get("figures") or {}).get(key)
    if value is None:
        return f"(no {key} in the stored run)"
    shown = " → ".join(_cell_number(v) for v in value) if isinstance(value, list) else _cell_number(value)
    return f"{shown} {unit}" if unit else shown


def update_cells(text: str, data: Mapping[str, Any]) -> str:
    """``text`` with every generated cell rewritten from the stored reliability run ``data``."""
    return CELL.sub(lambda m: m.group(1) + cell(data, m["test"], m["key"], m["unit"] or "") + m.group(6),
                    text)


# name -> (file, results file, renderer)
REGIONS: dict[str, tuple[str, str, Callable[[Mapping[str, Any]], str]]] = {
    "bench-dataplane": ("README.md", FULL, _dataplane),
    "bench-targets": ("README.md", FULL, _targets),
    "userspace-engine": ("docs/userspace.md", FULL, _userspace_engine),
    "programming": ("README.md", FULL, _programming),
    "reliability": ("docs/reliability.md", RELIABILITY, _reliability),
    "status-scale": ("README.md", _R + "status_scale.json", scale_figures.status_summary),
    "userspace-sync": ("README.md", _R + "sync_scale-userspace.json", scale_figures.userspace_summary),
    "userspace-sync-docs": ("docs/userspace.md", _R + "sync_scale-userspace.json",
                            scale_figures.userspace_summary),
    "nftables-summary": ("README.md", _R + "sync_scale-nftables.json", scale_figures.nftables_summary),
    "latency-summary": ("README.md", _R + "latency_vs_services.json", scale_figures.latency_summary),
    "e2e-scale": ("README.md", _R + "e2e_scale-10000.json", scale_figures.e2e_table),
    "e2e-scale-1k": ("README.md", _R + "e2e_scale-1000.json", scale_figures.e2e_table),
    "e2e-idle": ("README.md", _R + "e2e_scale-idle.json", scale_figures.e2e_idle),
    "nftables-sync": ("docs/nftables.md", _R + "sync_scale-nftables.json", scale_figures.nftables_docs),
    "latency-vs-services": ("docs/nftables.md", _R + "latency_vs_services.json",
                            scale_figures.latency_table),
    "iptables-sync": ("docs/iptables.md", _R + "sync_scale-iptables.json", scale_figures.sync_table),
    "quarantine": ("docs/reliability.md", _R + "quarantine.json", scale_figures.quarantine_table),
    "iptables-tools": ("docs/iptables.md", _R + "iptables_tools.json", scale_figures.iptables_tools_table),
    "iptables-restore": ("docs/iptables.md", _R + "iptables_tools.json",
                         scale_figures.iptables_planner_input),
    "dualstack-cost": ("docs/dualstack.md", _R + "dualstack_sync.json", scale_figures.dualstack_cost),
    "nftables-status": ("docs/nftables.md", _R + "status_scale.json", scale_figures.nftables_status),
    "ipvs-summary": ("README.md", _R + "sync_scale-ipvs.json", scale_figures.ipvs_summary),
    "ipvs-sync": ("docs/ipvs.md", _R + "sync_scale-ipvs.json", scale_figures.ipvs_table),
    "idlemem-guest": ("README.md", _R + "idlemem-guest.json", scale_figures.idle_memory),
    "paired-keepalive-1w": ("README.md", _R + "paired-keepalive-1w.json", _paired),
    "paired-keepalive-2w": ("README.md", _R + "paired-keepalive-2w.json", _paired),
    "paired-bulk-1w": ("README.md", _R + "paired-bulk-1w.json", _paired),
}


def region_pattern(name: str) -> re.Pattern[str]:
    name = re.escape(name)
    return re.compile(rf"(<!-- figures:{name}\b[^>]*-->\n)(.*?)(<!-- /figures:{name} -->)", re.DOTALL)


def rendered(name: str) -> str:
    target, source, render = REGIONS[name]
    data = _load(source)
    return f"{_source(source, data, target)}\n\n{render(data).rstrip()}\n"


def update(text: str, name: str) -> tuple[str, bool]:
    """``text`` with region ``name`` regenerated, and whether the region was found."""
    pattern = region_pattern(name)
    if not pattern.search(text):
        return text, False
    body = rendered(name)
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text, count=1), True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a region is stale")
    args = parser.parse_args(argv)
    status = 0
    cells = _load(RELIABILITY)
    for file in sorted({f for f, _, _ in REGIONS.values()} | set(figure_lint.docs())):
        path = REPO / file
        text = original = path.read_text()
        text = update_cells(text, cells)
        for name, (target, src, _) in REGIONS.items():
            if target != file:
                continue
            if not (REPO / src).exists():
                # Left as it is: the region keeps what it had until its benchmark has been run.
                print(f"{file}: figures:{name}: no results file {src} (run its benchmark with --save)",
                      file=sys.stderr)
                status = 1
                continue
            text, found = update(text, name)
            if not found:
                print(f"{file}: no region figures:{name}", file=sys.stderr)
                status = 1
        if text != original:
            if args.check:
                sources = ", ".join(sorted({src for f, src, _ in REGIONS.values() if f == file}
                                           | ({RELIABILITY} if CELL.search(original) else set())))
                print(f"{file}: generated figures differ from {sources}; run python -m bench.docs_figures",
                      file=sys.stderr)
                status = 1
            else:
                path.write_text(text)
                print(f"{file}: figures rewritten")
        else:
            print(f"{file}: figures up to date")
    if args.check:
        # Figures typed in outside the generated text: no stored run backs them.
        for line in figure_lint.check(REPO):
            print(line, file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
