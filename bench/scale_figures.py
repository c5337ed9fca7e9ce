"""Render the control-plane and scale figures of README.md and docs/ from their stored results files.

One function per region of ``python -m bench.docs_figures``; each takes the
parsed results file a benchmark wrote with ``--save`` (``bench/runmeta.py``:
``{"meta": {...}, ...figures}``) and returns Markdown. :func:`run_line`
says which run the figures come from and how loaded the machine was, so a
figure from a busy shared machine is never read as an idle machine's.
A point that failed is shown as failed, never left out silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.report import fmt as _fmt

Data = Mapping[str, Any]


def fmt(value: float | None) -> str:
    """Three significant digits (``bench.report.fmt``) without trailing zeros: 0.8 ms, not 0.800 ms."""
    text = _fmt(value)
    if "." in text and "e" not in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _load(values: Sequence[float] | None) -> str:
    if not values:
        return "?"
    return f"{values[0]:.1f}"


def run_line(data: Data) -> str:
    """``run of DATE, commit C, on N CPUs; load average X before, Y after: `command```."""
    meta = data.get("meta", {})
    busy = max([*meta.get("load average before", [0])[:1], *meta.get("load average after", [0])[:1]])
    cpus = meta.get("cpus") or 0
    warning = (" — a loaded machine: wall times include waiting for a core, not an idle machine's figures"
               if cpus and busy >= cpus / 2 else "")
    before, after = _load(meta.get("load average before")), _load(meta.get("load average after"))
    guest = meta.get("guest")
    if isinstance(guest, Mapping):
        return guest_run_line(meta, guest)
    return (f"run of {meta.get('date', '?')}, commit `{meta.get('commit', '?')}`, {cpus or '?'} CPUs "
            f"({meta.get('cpu', '?')}), load average (1 min) {before} before, {after} after{warning}; "
            f"`{meta.get('command', '?')}`")


def guest_run_line(meta: Data, guest: Data) -> str:
    """A run inside the QEMU guest: the guest's kernel and emulation, and the host's load around it.

    The host's load is what slows an emulated CPU (the guest's own load average does not see it).
    """
    host_before, host_after = _load(guest.get("host load average before")), \
        _load(guest.get("host load average after"))
    host_cpus = guest.get("host cpus") or 0
    busy = max([*(guest.get("host load average before") or [0])[:1],
                *(guest.get("host load average after") or [0])[:1]])
    warning = (" — a loaded host: the emulated CPUs shared its cores with other work"
               if host_cpus and busy >= host_cpus / 2 else "")
    return (f"run of {meta.get('date', '?')}, commit `{meta.get('commit', '?')}`, inside the QEMU guest "
            f"(Debian kernel {guest.get('kernel', '?')}, {guest.get('emulation', '?')}) on a "
            f"{host_cpus or '?'}-CPU host (kernel {guest.get('host kernel', '?')}), "
            f"host load average (1 min) {host_before} before, {host_after} after{warning}; "
            f"`tests/vm/run-in-vm.sh --cmd '{meta.get('command', '?')}'`")


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _ok(points: Sequence[Data]) -> list[Data]:
    return [p for p in points if "error" not in p]


def _failed(points: Sequence[Data], label: str) -> list[str]:
    out = []
    for p in points:
        if "error" in p:
            first = str(p["error"]).strip().splitlines()[-1:] or ["?"]
            out.append(f"{label} at {_count(p.get('services'))} services failed in this run: "
                       f"{first[0][:160].replace('|', '/')}.")
    return out


def _s(value: float | None) -> str:
    if value == 0:  # stored to the millisecond
        return "< 1 ms"
    return "–" if value is None else f"{fmt(value)} s"


def _ms(value: float | None) -> str:
    if value is not None and value >= 1:
        return _s(value)
    return "–" if value is None else f"{fmt(value * 1000)} ms"


def _sorted(points: Sequence[Data]) -> list[Data]:
    return sorted(points, key=lambda p: (str(p.get("backend", "")), p.get("services") or 0))


MIB_PER_MB = 1e6 / 2**20


def targets(p: Data, checks: Sequence[tuple[str, str, float, str]]) -> str:
    """``label ≤ limit: met (value)`` per check ``(label, key, limit, unit)``; units ``s``, ``ms``, ``MB``.

    Wall-time verdicts say so: on a loaded machine a wall time over its
    limit may be waiting for a core (the CPU figure next to it tells).
    """
    out = []
    for label, key, limit, unit in checks:
        value = p.get(key)
        if value is None:
            out.append(f"{label} ≤ {fmt(limit)} {unit}: no figure")
            continue
        shown = {"s": value, "ms": value * 1000, "MB": value / MIB_PER_MB}[unit]
        verdict = "met" if shown <= limit else "**not met**"
        cpu = p.get(key.replace("_s", "_cpu_s")) if key.endswith("_s") else None
        also = "" if cpu is None else f"; CPU {fmt(cpu * (1000 if unit == 'ms' else 1))} {unit}"
        out.append(f"{label} ≤ {fmt(limit)} {unit}: {verdict} ({fmt(shown)} {unit}{also})")
    return "; ".join(out)


def _at(points: Sequence[Data], services: int) -> Data | None:
    return next((p for p in _ok(points) if p.get("services") == services), None)


SYNC_TARGETS = {  # at 10,000 services (wall time): issue 12 (nftables), 7 (iptables), 13 (userspace)
    "nftables": [("full sync", "full_s", 2.0, "s"), ("incremental", "incremental_s", 10.0, "ms"),
                 ("RSS", "rss_mib", 150.0, "MB")],
    "iptables": [("full sync", "full_s", 2.0, "s"), ("incremental", "incremental_s", 100.0, "ms")],
    "userspace": [("full sync", "full_s", 1.5, "s"), ("incremental", "incremental_s", 20.0, "ms")],
}


def _listeners_short(p: Data) -> int | None:
    """How many listeners a userspace point held when that was fewer than its services (else None)."""
    held = p.get("rules")
    return held if isinstance(held, int) and held < p["services"] else None


def sync_targets(data: Data) -> str:
    checks = SYNC_TARGETS.get(str(data.get("mode")))
    points = data.get("points", [])
    if not checks:
        return ""
    tenk = [p for p in _ok(points) if p.get("services") == 10000]
    if not tenk:
        return "Targets at 10,000 services: not measured in this run."
    def which(p: Data) -> str:
        return "" if p.get("backend") in (None, "default") else f"{p.get('backend')} back end, "

    def partial(p: Data) -> str:
        held = _listeners_short(p) if data.get("mode") == "userspace" else None
        if held is not None:
            return (f" Not comparable with the targets: only {_count(held)} of the {_count(p['services'])} "
                    "listeners were opened, so this sync did less than the whole work.")
        return ""

    return "\n".join(f"Targets at 10,000 services ({which(p)}wall time): {targets(p, checks)}.{partial(p)}"
                     for p in tenk)


# -- sync_scale: one mode's full and incremental sync -----------------------------------------------

def sync_table(data: Data) -> str:
    """Full and incremental sync, wall (CPU), plan share, RSS and objects held, per back end and size."""
    points = data.get("points", [])
    lines = ["CPU: this process's own user+system time (in-process libraries included; a subprocess's, such "
             "as iptables-restore or `ip -batch`, is not).", "",
             "| back end | services × endpoints | full sync wall (CPU) | plan | incremental wall (CPU) | "
             "RSS | rules or elements held |", "|---|---|---|---|---|---|---|"]
    for p in _sorted(_ok(points)):
        lines.append(f"| {p.get('backend', '?')} | {_count(p['services'])} × {p.get('endpoints', '?')} | "
                     f"{_s(p.get('full_s'))} ({_s(p.get('full_cpu_s'))}) | {_s(p.get('plan_full_s'))} | "
                     f"{_ms(p.get('incremental_s'))} ({_ms(p.get('incremental_cpu_s'))}) | "
                     f"{fmt(p.get('rss_mib'))} MiB | {_count(p.get('rules'))} |")
    failed = _failed(points, str(data.get("mode", "")))
    return "\n".join([*lines, "", sync_targets(data), *failed]).rstrip()


def nftables_anchor(data: Data) -> str:
    """kube-proxy's nftables shape loaded with ``nft -f``, against proxyd's full sync of the same services."""
    lines = ["| services | kube-proxy shape, `nft -f` wall (CPU) | proxyd full sync wall (CPU) | "
             "ratio (wall) | ratio (CPU) |", "|---|---|---|---|---|"]
    for p in _sorted(_ok(data.get("points", []))):
        if "kube_proxy_nft_load_s" not in p:
            why = str(p.get("kube_proxy_nft_error", "not run"))[:120].replace("|", "/")
            lines.append(f"| {_count(p['services'])} | {why} | {_s(p.get('full_s'))} | – | – |")
            continue
        cpu_ratio = (p["kube_proxy_nft_load_cpu_s"] / p["full_cpu_s"]) if p.get("full_cpu_s") else None
        lines.append(f"| {_count(p['services'])} | {_s(p['kube_proxy_nft_load_s'])} "
                     f"({_s(p.get('kube_proxy_nft_load_cpu_s'))}) | {_s(p.get('full_s'))} "
                     f"({_s(p.get('full_cpu_s'))}) | {fmt(p.get('kube_proxy_nft_ratio'))}× | "
                     f"{fmt(cpu_ratio)}× |")
    return "\n".join(lines)


def nftables_docs(data: Data) -> str:
    return (f"`sync_scale` (incremental: one endpoint changed, median of the repeats):\n\n"
            f"{sync_table(data)}\n\n"
            f"The anchor, in the same run and namespace (`bench/kube_proxy_nft.py`):\n\n"
            f"{nftables_anchor(data)}")


def nftables_summary(data: Data) -> str:
    """README's sentence: nftables sync per size and the kube-proxy anchor."""
    parts, anchors = [], []
    for p in _sorted(_ok(data.get("points", []))):
        parts.append(f"{_count(p['services'])} services × {p.get('endpoints', '?')} endpoints sync fully in "
                     f"{_s(p.get('full_s'))} wall / {_s(p.get('full_cpu_s'))} CPU, one endpoint change in "
                     f"{_ms(p.get('incremental_s'))} wall ({_ms(p.get('incremental_cpu_s'))} CPU), "
                     f"RSS {fmt(p.get('rss_mib'))} MiB")
        if "kube_proxy_nft_load_s" in p and p.get("full_cpu_s"):
            anchors.append(f"{_s(p['kube_proxy_nft_load_s'])} at {_count(p['services'])} "
                           f"({fmt(p.get('kube_proxy_nft_ratio'))}× proxyd's full sync in wall time, "
                           f"{fmt(p['kube_proxy_nft_load_cpu_s'] / p['full_cpu_s'])}× in CPU)")
    text = "nftables mode: " + "; ".join(parts) + "." if parts else "nftables mode: no point succeeded."
    text += " " + sync_targets(data)
    if anchors:
        text += (" In the same run kube-proxy's nftables ruleset shape for the same services took "
                 + ", ".join(anchors) + " to load with `nft -f`.")
    failed = _failed(data.get("points", []), "nftables")
    return "\n".join([text, *failed])


def userspace_summary(data: Data) -> str:
    """README's batched-netlink sentence: full sync, its address share, ``ip -batch`` for the same."""
    parts = []
    for p in _sorted(_ok(data.get("points", []))):
        text = (f"{_count(p['services'])} services × {p.get('endpoints', '?')} endpoints: full sync "
                f"{_s(p.get('full_s'))} ({_s(p.get('full_cpu_s'))} CPU)")
        if "addresses_s" in p:
            text += f", {_s(p['addresses_s'])} of it adding the {_count(p['services'])} service IPs"
        if "c_addresses_s" in p:
            text += (f" against {_s(p['c_addresses_s'])} for `ip -batch` adding the same routes "
                     f"({fmt(p.get('addresses_ratio'))}×)")
        text += f"; incremental {_ms(p.get('incremental_s'))}; RSS {fmt(p.get('rss_mib'))} MiB"
        held = _listeners_short(p)
        if held is not None:
            text += (f"; only {_count(held)} of the {_count(p['services'])} listeners held (the descriptor "
                     f"budget was short; the rest were refused)")
        parts.append(text)
    lines = ["userspace mode: " + "; ".join(parts) + "." if parts else "userspace mode: no point succeeded.",
             "", sync_targets(data)]
    return "\n".join(lines + _failed(data.get("points", []), "userspace"))


# -- sync_scale --mode ipvs: proxyd against the C tools, in the QEMU guest ---------------------------

IPVS_RATIO = 1.5  # issue 13: full and incremental sync within 1.5× of the C tools doing the same work


def _ratio(value: Any) -> str:
    return "–" if value is None else f"{fmt(value)}×"


def ipvs_targets(data: Data) -> str:
    """Issue 13's targets at 10,000 services × 10 endpoints: full and incremental within 1.5× of C tools."""
    point = next((p for p in _ok(data.get("points", []))
                  if p.get("services") == 10000 and p.get("endpoints") == 10), None)
    if point is None:
        sizes = ", ".join(f"{_count(p.get('services'))} × {p.get('endpoints', '?')}"
                          for p in _ok(data.get("points", []))) or "none"
        return (f"Targets (within {fmt(IPVS_RATIO)}× of the C tools at 10,000 services × 10 endpoints): not "
                f"measured in this run (sizes measured: {sizes}).")
    out = []
    for label, key in (("full sync", "full_ratio"), ("incremental", "incremental_ratio")):
        ratio = point.get(key)
        verdict = "no figure" if ratio is None else ("met" if ratio <= IPVS_RATIO else "**not met**")
        out.append(f"{label} ≤ {fmt(IPVS_RATIO)}× the C tools: {verdict} ({_ratio(ratio)})")
    return "Targets at 10,000 services × 10 endpoints (wall time): " + "; ".join(out) + "."


def ipvs_table(data: Data) -> str:
    """docs/ipvs.md: proxyd's full and incremental sync next to the C tools doing the same work."""
    lines = ["| services × endpoints | full sync wall (CPU) | plan | C tools, full | ratio | "
             "incremental wall (CPU) | `ipvsadm -R`, incremental | ratio | RSS | virtual servers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    tools = []
    for p in _sorted(_ok(data.get("points", []))):
        lines.append(f"| {_count(p['services'])} × {p.get('endpoints', '?')} | {_s(p.get('full_s'))} "
                     f"({_s(p.get('full_cpu_s'))}) | {_s(p.get('plan_full_s'))} | {_s(p.get('c_full_s'))} | "
                     f"{_ratio(p.get('full_ratio'))} | {_ms(p.get('incremental_s'))} "
                     f"({_ms(p.get('incremental_cpu_s'))}) | {_ms(p.get('c_incremental_s'))} | "
                     f"{_ratio(p.get('incremental_ratio'))} | {fmt(p.get('rss_mib'))} MiB | "
                     f"{_count(p.get('rules'))} |")
        if "c_full_s" in p:
            text = (f"{_count(p['services'])} × {p.get('endpoints', '?')}: `ip -batch` "
                    f"{_s(p.get('c_ip_batch_s'))}, `ipset restore` {_s(p.get('c_ipset_restore_s'))}, "
                    f"`ipvsadm-restore` {_s(p.get('c_ipvsadm_restore_s'))}, `iptables-restore` "
                    f"{_s(p.get('c_iptables_restore_s'))}")
            rest = p["c_full_s"] - (p.get("c_ipset_restore_s") or 0)
            if p.get("c_ipset_restore_s") and rest > 0 and p.get("full_s"):
                # proxyd's full sync includes its set entries: this ratio is the one least in its favour.
                ratio = round(p["full_s"] / rest, 2)
                text += f" (without `ipset restore`: {_s(round(rest, 3))}, ratio {_ratio(ratio)})"
            tools.append(text)
    text = "\n".join(lines)
    if tools:
        text += "\n\nThe C tools' full figure, per tool: " + "; ".join(tools) + "."
    failed = _failed(data.get("points", []), "ipvs")
    return "\n".join([text, "", ipvs_targets(data), *failed]).rstrip()


def ipvs_summary(data: Data) -> str:
    """README's ipvs sentence: the largest size measured, against the C tools."""
    points = _ok(data.get("points", []))
    parts = []
    for p in _sorted(points):
        text = (f"{_count(p['services'])} services × {p.get('endpoints', '?')} endpoints sync fully in "
                f"{_s(p.get('full_s'))}")
        if "c_full_s" in p:
            text += (f" against {_s(p['c_full_s'])} for the C tools doing the same work "
                     f"({_ratio(p.get('full_ratio'))})")
        text += f", one endpoint change in {_ms(p.get('incremental_s'))}"
        if "c_incremental_s" in p:
            text += (f" against {_ms(p['c_incremental_s'])} for `ipvsadm -R` "
                     f"({_ratio(p.get('incremental_ratio'))})")
        parts.append(text)
    text = ("ipvs mode, inside the QEMU guest (software emulation: absolute times are far above real "
            "hardware's, the ratios are the figures to read): " + "; ".join(parts) + "."
            if parts else "ipvs mode: no point succeeded.")
    return "\n".join([text, "", ipvs_targets(data), *_failed(data.get("points", []), "ipvs")])


# -- latency_vs_services ------------------------------------------------------------------------------

def _latency_points(data: Data) -> dict[int, dict[str, Data]]:
    by: dict[int, dict[str, Data]] = {}
    for p in data.get("points", []):
        by.setdefault(int(p.get("services", 0)), {})[str(p.get("mode"))] = p
    return dict(sorted(by.items()))


def _us(p: Data | None, key: str = "p50_us") -> str:
    if p is None:
        return "–"
    if "error" in p:
        return "failed"
    return f"{fmt(p.get(key))} µs"


def latency_table(data: Data) -> str:
    modes = sorted({str(p.get("mode")) for p in data.get("points", [])})
    lines = ["| services | " + " | ".join(f"{m} p50 | {m} p99" for m in modes) + " |",
             "|---|" + "---|---|" * len(modes)]
    for services, got in _latency_points(data).items():
        lines.append(f"| {_count(services)} | "
                     + " | ".join(f"{_us(got.get(m))} | {_us(got.get(m), 'p99_us')}" for m in modes) + " |")
    return (f"TCP connect (SYN → SYN-ACK) from a pod to a ClusterIP whose service sorts last, N services × "
            f"10 endpoints, {_count(data.get('connects', '?'))} connects per point:\n\n" + "\n".join(lines))


def latency_summary(data: Data) -> str:
    points = _latency_points(data)
    if not points:
        return "No latency point stored."
    low, high = min(points), max(points)
    parts = []
    for mode in sorted({m for got in points.values() for m in got}):
        parts.append(f"{mode} {_us(points[low].get(mode))} at {_count(low)} and "
                     f"{_us(points[high].get(mode))} at {_count(high)} services")
    return ("New connections to a ClusterIP (p50 of the connect time, from a pod, to the service that sorts "
            "last): " + "; ".join(parts) + ".")


# -- status_scale ------------------------------------------------------------------------------------

def status_summary(data: Data) -> str:
    parts = []
    for p in data.get("points", []):
        what = ("With nothing to read back (the base mode)" if p.get("mode") == "none"
                else f"In {p.get('mode')} mode (its chains read back: {_s(p.get('kernel_read_s'))})")
        parts.append(f"{what}: the whole-node status of {_count(p.get('services'))} services × "
                     f"{p.get('endpoints', '?')} endpoints {_s(p.get('status_all_s'))} wall "
                     f"({_s(p.get('status_all_cpu_s'))} CPU, {fmt(p.get('answer_mib'))} MiB of JSON), "
                     f"`proxyd status NAME` {_ms(p.get('status_one_s'))}, "
                     f"a trace {_s(p.get('trace_s'))} wall "
                     f"({_s(p.get('trace_cpu_s'))} CPU)")
    return "\n\n".join(f"{part}." for part in parts) if parts else "No status point stored."


def nftables_status(data: Data) -> str:
    """The nftables point of ``status_summary`` (docs/nftables.md)."""
    points = [p for p in data.get("points", []) if p.get("mode") == "nftables"]
    return status_summary({"points": points}) if points else "No nftables point in this run."


# -- e2e_scale ---------------------------------------------------------------------------------------

def _range(values: Sequence[float] | None) -> str:
    return "?" if not values else f"{values[0]:.1f}"


def e2e_table(data: Data) -> str:
    lines = ["| mode | source | healthy after start | one-endpoint change followed (median) | "
             "RSS after first sync | RSS after the changes | peak | load average before → after |",
             "|---|---|---|---|---|---|---|---|"]
    for p in data.get("points", []):
        load = f"{_range(p.get('load_before'))} → {_range(p.get('load_after'))}"
        if "error" in p:
            why = str(p["error"]).splitlines()[0][:100].replace("|", "/")
            lines.append(f"| {p.get('mode')} | {p.get('source')} | failed: {why} | – | – | – | – | {load} |")
            continue
        source = str(p.get("source")) + (f" ({fmt(p['file_mib'])} MiB)" if p.get("file_mib") else "")
        lines.append(f"| {p.get('mode')} | {source} | {_s(p.get('healthy_s'))} | "
                     f"{_s(p.get('change_s'))} (of {len(p.get('change_all_s', []))}) | "
                     f"{fmt(p.get('rss_first_mib'))} MiB | {fmt(p.get('rss_changes_mib'))} MiB "
                     f"({p.get('changes', '?')} changes) | {fmt(p.get('peak_mib'))} MiB | {load} |")
    verdicts = [f"- {p.get('mode')}, {p.get('source')}: {targets(p, E2E_TARGETS)}"
                for p in _ok(data.get("points", []))]
    text = (f"{_count(data.get('services'))} ClusterIP services × {data.get('endpoints', '?')} endpoints:"
            f"\n\n" + "\n".join(lines))
    if data.get("services") == 10000 and verdicts:
        text += "\n\nTargets at 10,000 services (wall time):\n\n" + "\n".join(verdicts)
    return text


E2E_TARGETS = [("healthy", "healthy_s", 3.0, "s"), ("change followed", "change_s", 1.2, "s"),
               ("RSS after the changes", "rss_changes_mib", 150.0, "MB")]


def e2e_idle(data: Data) -> str:
    """The manifests source alone with N one-service files: idle CPU, one full rescan, CPU under rewrites."""
    lines = []
    for p in data.get("points", []):
        if "error" in p:
            lines.append(f"The idle-files run failed: {str(p['error'])[:160]}.")
            continue
        lines.append(f"With {_count(p.get('files'))} small files the manifests source idles at "
                     f"{fmt(p.get('idle_cpu_percent'))} % CPU (a full stat rescan: "
                     f"{fmt(p.get('full_rescan_ms'))} ms) and takes "
                     f"{fmt(p.get('rewrite_20hz_cpu_percent'))} % CPU while one file is rewritten "
                     f"every 50 ms.")
    return "\n".join(lines) or "No idle-files point stored."


# -- quarantine --------------------------------------------------------------------------------------

def quarantine_table(data: Data) -> str:
    lines = ["| mode | sync | services | transactions | extra | log2(N) | refused ports found | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data.get("rows", []):
        lines.append(f"| {r['mode']} | {r['sync']} | {_count(r['services'])} | {r['transactions']} | "
                     f"{r['extra']} | {r['log2_n']} | {r['refused']} | {r['seconds']} |")
    return "One service refused among N (fake appliers: the planner's and the bisection's share only):\n\n" \
        + "\n".join(lines)


# -- iptables_tools ----------------------------------------------------------------------------------

def iptables_tools_table(data: Data) -> str:
    lines = ["| way | write | read back | delete |", "|---|---|---|---|"]
    for way, label in (("python-iptables", "python-iptables (iptc, one commit)"),
                       ("iptables-legacy-restore", "iptables-legacy-restore / -save"),
                       ("iptables-nft-restore", "iptables-nft-restore / -save")):
        r = data.get(way, {})
        if "error" in r or not r:
            lines.append(f"| {label} | {str(r.get('error', 'not run'))[:80]} | – | – |")
            continue
        lines.append(f"| {label} | {_s(r.get('write_s'))} | {_s(r.get('read_s'))} | "
                     f"{_s(r.get('delete_s'))} |")
    return (f"{_count(data.get('rules'))} nat rules `-d <ip> -p tcp -m tcp --dport 80 -j RETURN` in "
            f"{_count(data.get('chains'))} chain(s), written in one transaction, read back, deleted:\n\n"
            + "\n".join(lines))


def _mb(n: Any) -> str:
    return f"{n / 1e6:.1f} MB" if isinstance(n, int) else "?"


def iptables_planner_input(data: Data) -> str:
    """The restore tools alone on the planner's input (``planner_input`` of ``bench/iptables_tools.py``)."""
    inputs: Mapping[str, Data] = data.get("planner_input") or {}
    if not inputs:
        return "Not measured in this run (`--services 0`)."
    flavours = [f for f in ("legacy", "nft") if f in inputs]
    ok = {f: inputs[f] for f in flavours if "error" not in inputs[f]}
    first = next(iter(ok.values()), {})
    rows: list[tuple[str, Callable[[Data], str]]] = [
        ("the full input", lambda r: f"{_s(r.get('full_s'))} ({_count(r.get('lines'))} lines, "
                                     f"{_mb(r.get('bytes'))}, {_count(r.get('transactions'))} "
                                     f"transaction{'s' if r.get('transactions') != 1 else ''})"),
        ("declaring (flushing) one chain", lambda r: _ms(r.get("declare_chain_s"))),
        ("appending `-j RETURN` to a chain no base chain reaches",
         lambda r: _ms(r.get("append_unreachable_s"))),
        ("inserting one jump into `KUBE-SERVICES`", lambda r: _ms(r.get("insert_jump_s"))),
        ("deleting it again", lambda r: _ms(r.get("delete_jump_s"))),
        ("one endpoint of one service changed: the partial plan's restore",
         lambda r: _ms(r.get("incremental_restore_s"))),
        ("… and the planner's share of that change (planning only)",
         lambda r: _ms(r.get("incremental_plan_s"))),
        ("the sync-period check of canaries and jumps (proxyd's code)",
         lambda r: _ms(r.get("canary_check_s"))),
        ("`--cleanup` of the loaded table (proxyd's code)", lambda r: _ms(r.get("cleanup_s"))),
    ]
    lines = ["| restore of | " + " | ".join(flavours) + " |", "|---|" + "---|" * len(flavours)]
    for label, show in rows:
        lines.append(f"| {label} | " + " | ".join(show(ok[f]) if f in ok else "–" for f in flavours) + " |")
    head = (f"The input iptables mode's planner writes for {_count(first.get('services'))} ClusterIP "
            f"services × {_count(first.get('endpoints'))} endpoints "
            f"({_count(first.get('nat_rules'))} nat rules), "
            "through each back end's restore tool alone (`--noflush --counters -w 5`, proxyd's flags) in a "
            "fresh namespace, no proxyd code on the clock; the small transactions run against the loaded "
            f"table, medians of {_count(first.get('repeat'))}:")
    failed = [f"{f}: failed in this run: {str(inputs[f]['error'])[:160].replace('|', '/')}."
              for f in flavours if f not in ok]
    return "\n".join([head, "", *lines, *(["", *failed] if failed else [])])


# -- dualstack_sync ----------------------------------------------------------------------------------

def dualstack_cost(data: Data) -> str:
    """A per-family mode alone against behind ``DualStackMode`` (``bench/dualstack_sync.py --save``)."""
    runs: Sequence[Data] = data.get("runs", [])
    if not runs:
        return "No run stored."
    lines = ["| mode | families | services × endpoints | full sync | incremental (median / min) | load |",
             "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (str(r.get("mode")), str(r.get("families")))):
        lines.append(f"| {r.get('mode')} | {r.get('families')} | {_count(r.get('services'))} × "
                     f"{_count(r.get('endpoints'))} | {_s(r.get('full_s'))} | "
                     f"{fmt(r.get('incremental_median_ms'))} ms / {fmt(r.get('incremental_min_ms'))} ms | "
                     f"{r.get('loadavg_1m', '?')} |")
    return (f"v4-only services, alone and wrapped alternately; incremental = one endpoint of one service "
            f"changed, {_count(data.get('repeat'))} times per run; load = 1-minute load average after the "
            "run:\n\n" + "\n".join(lines))


# -- idle memory (python -m bench.idlemem --save, in the QEMU guest) ---------------------------------

_PROXY_NAMES = {"proxyd-userspace": "proxyd userspace (engine)", "haproxy": "HAProxy"}


def idle_memory(data: Data) -> str:
    """RSS per idle established connection through each proxy, the descriptor limits it ran under and the
    verdict of issue 15 (proxyd ≤ HAProxy); a proxy whose run failed is shown as failed."""
    memory: Mapping[str, Data] = data.get("memory", {})
    limits: Data = data.get("descriptor limits", {})
    asked = data.get("held requested")
    before, hard = limits.get("hard before"), limits.get("hard")
    raised = (f"raised from {_count(before)} to {_count(hard)}" if before != hard
              else f"{_count(hard)}, not raised (no CAP_SYS_RESOURCE)")
    lines = [f"{_count(asked)} idle connections asked for; descriptor hard limit {raised} "
             f"(fs.nr_open {_count(limits.get('nr_open'))}).", "",
             "| proxy | connections held | RSS before | RSS holding | per connection |",
             "|---|---|---|---|---|"]
    failed: list[str] = []
    notes: list[str] = []
    for proxy, got in memory.items():
        name = _PROXY_NAMES.get(proxy, proxy)
        if not isinstance(got, Mapping) or "kib_per_connection" not in got:
            error = str(got.get("error", "no figure") if isinstance(got, Mapping) else got)
            failed.append(f"{name} failed in this run: {error.strip()[-160:].replace('|', '/')}.")
            continue
        short = " (fewer than asked)" if isinstance(asked, int) and got.get("held", 0) < asked else ""
        cells = [f"{_count(got.get('held'))}{short}", f"{_count(got.get('rss_before_kib'))} KiB",
                 f"{_count(got.get('rss_holding_kib'))} KiB", f"{_fmt(got.get('kib_per_connection'))} KiB"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        replaced = got.get("replaced")
        if isinstance(replaced, Mapping) and replaced:
            what = ", ".join(f"{_count(n)} {kind}" for kind, n in replaced.items())
            counters = got.get("proxyd counters", {})
            told = "" if not isinstance(counters, Mapping) or not counters else (
                f" (its counters: {_count(int(counters.get('proxyd_connect_retries_total', 0)))} connect "
                f"retries, {_count(int(counters.get('proxyd_connections_rejected_total', 0)))} connections "
                "rejected)")
            notes.append(f"{name}: {what} while being established, each replaced by a new connection; only "
                         f"held connections are counted{told}.")
    ours = memory.get("proxyd-userspace", {}).get("kib_per_connection")
    theirs = memory.get("haproxy", {}).get("kib_per_connection")
    if isinstance(ours, int | float) and isinstance(theirs, int | float):
        status = "met" if ours <= theirs else "**not met**"
        lines += ["", f"proxyd ≤ HAProxy per idle connection: {_fmt(ours)} KiB vs {_fmt(theirs)} KiB "
                      f"({fmt(ours / theirs if theirs else None)}×): {status}."]
    else:
        lines += ["", "proxyd ≤ HAProxy per idle connection: no verdict (a proxy has no figure in this run)."]
    return "\n".join(lines + (["", *notes, *failed] if notes or failed else []))
