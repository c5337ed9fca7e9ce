"""Find measured-looking figures in README.md and docs/*.md that no stored run backs.

A figure is digits with a unit (``ms``, ``s``, ``µs``, ``MiB``, ``GB``, ``×``,
``%``, ``conn/s`` …). It may appear in these places only:

* inside a generated region (``<!-- figures:NAME -->`` … ``<!-- /figures:NAME -->``)
  or a generated cell (``<!-- fig TEST KEY [UNIT] -->`` … ``<!-- /fig -->``),
  both written by ``python -m bench.docs_figures`` from a stored results file;
* inside a historic block (``<!-- historic: WHAT, commit HEX -->`` …
  ``<!-- /historic -->``): a one-off measurement of old code or of a third-party
  tool, kept as a record of that commit, not as a figure of today's proxyd;
* after ``≤``, ``≥``, ``<`` or ``>``: a target or the bound a test asserts,
  not a measurement;
* in code (fenced blocks and inline ``code``: commands and flag values);
* in a phrase of ``ALLOWED``: a design constant (timeout, limit, default,
  target) with the reason it is one; ``tests/unit/test_docs_figures.py``
  checks the ones that matter against the code.

Anything else is a typed-in measurement: generate it, move it into a
historic block with its commit, or drop it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_UNIT = (r"(?:ms|µs|us|ns|s|sec|seconds?|min|minutes?|hours?|KiB|MiB|GiB|kB|KB|MB|GB|×|x|%"
         r"|Gbit/s|Mbit/s|conn/s|connections/s|requests/s|req/s|rps)")
_NUMBER = r"\d[\d,]*(?:\.\d+)?"
FIGURE = re.compile(rf"(?<![\w.\-/]){_NUMBER}(?:\s?(?:–|-|to)\s?{_NUMBER})?\s?{_UNIT}(?![\w])")

_REGION = re.compile(r"<!-- figures:([\w-]+)\b[^>]*-->\n.*?<!-- /figures:\1 -->", re.DOTALL)
_CELL = re.compile(r"<!-- fig [^>]*-->.*?<!-- /fig -->", re.DOTALL)
_HISTORIC = re.compile(r"<!-- historic:([^>]*)-->(.*?)<!-- /historic -->", re.DOTALL)
_COMMIT = re.compile(r"\bcommit [0-9a-f]{7,40}\b")
_BOUND = re.compile(r"[≤≥<>]\s?$")
_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
_CODE = re.compile(r"`[^`\n]*`")


@dataclass(frozen=True)
class Allowed:
    """A phrase of ``file`` whose figures are design constants, not measurements."""

    file: str
    phrase: str
    reason: str


_RETRY = "kube-proxy userspace's per-attempt connect timeouts: DIAL_TIMEOUTS (proxyd/modes/userspace/tcp.py)"
_KEEPALIVE = "TCP keepalive of proxied sockets: KEEPALIVE_* in proxyd/modes/userspace/listeners.py"
_UNHEALTHY = "/healthz turns 503 after 2 x the sync period (kube-proxy's healthz rule, proxyd/health.py)"
_TEST = "an input of the test named in the row (what is done to proxyd), not a measurement"
_REL, _USP, _KUBE = "docs/reliability.md", "docs/userspace.md", "docs/kubernetes.md"
_BENCH = "a parameter of the benchmark's method, set in its code"
_ACK_HOLD = "the engine's ack_hold default in native/engine.pyx"

# Kept small on purpose: each entry is a constant of the code, of kube-proxy or of the kernel, or an
# input of a test or benchmark; the figure must match the code (the test file checks the main ones).
ALLOWED: tuple[Allowed, ...] = (
    Allowed("README.md", "(after 250 ms, 500 ms, 1 s, 2 s,", _RETRY),
    Allowed("README.md", "waited longer than 2 × `--sync-period`", _UNHEALTHY),
    Allowed("README.md", "Files of 1 MiB or more are parsed", "BIG_FILE in proxyd/sources/manifests.py"),
    Allowed(_USP, "timeouts\n   250 ms, 500 ms, 1 s, 2 s.", _RETRY),
    Allowed(_USP, "into a 16 KiB stack buffer", "PE_SMALL in native/engine_core.h"),
    Allowed(_USP, "up to\n   5 ms (a sixth FIFO list", _ACK_HOLD),
    Allowed(_USP, "`ack_hold` (5 ms; the\nkernel would send it itself after 200 ms)",
            f"{_ACK_HOLD}; TCP_DELACK_MAX, the kernel's longest delayed ACK"),
    Allowed(_USP, "`PE_NAP_BYTES`, 64 KiB, moved)", "PE_NAP_BYTES in native/engine_core.h"),
    Allowed(_USP, "the engine's `nap`\n(30 µs)", "the engine's nap default in native/engine.pyx"),
    Allowed(_USP, "the engine's `stream_nap` (150 µs)", "the stream_nap default in native/engine.pyx"),
    Allowed(_USP, "(15 s idle, 15 s interval)", _KEEPALIVE),
    Allowed(_USP, "the keepalive timer for 15 s after", _KEEPALIVE),
    Allowed(_USP, "ends or after 1 s.", "the engine's byte-count flush interval"),
    Allowed(_USP, "retries after 20 ms;", "STARVED_RETRY in proxyd/modes/userspace/pump.py"),
    Allowed(_USP, "at most every 10 s);", "PAUSE_LOG_EVERY in proxyd/modes/userspace/engine.py"),
    Allowed(_USP, "polled every 50 ms until", "DRAIN_POLL in proxyd/modes/userspace/engine.py"),
    Allowed(_USP, "or the 5 s grace passed", "SHUTDOWN_GRACE in proxyd/modes/userspace/mode.py"),
    Allowed(_USP, "data up to 300 kB", _TEST),
    Allowed(_REL, "every 20–50 ms during the whole fault", "the prober's interval in the tests"),
    Allowed(_REL, "after 5 s idle every one", _TEST),
    Allowed(_REL, "(as kube-proxy); 5 s idle then", _TEST),
    Allowed(_REL, "one log line per 10 s)", "PAUSE_LOG_EVERY in proxyd/modes/userspace/engine.py"),
    Allowed(_REL, "its two 64 KiB buffers", "COPY_BUFFER in proxyd/modes/userspace/pump.py"),
    Allowed(_REL, "(15 s idle, 15 s interval, as", _KEEPALIVE),
    Allowed(_REL, "150 s with the default 9", "15 s + 9 probes x 15 s: keepalive constants"),
    Allowed(_REL, "reaped after 15 s + 9 × 15 s = 150 s", "the same sum"),
    Allowed(_REL, "the reaping in\n  30 s.", "15 s idle + 1 probe x 15 s in the test's namespace"),
    Allowed(_REL, "kube-proxy's 250 ms / 500 ms /", _RETRY),
    Allowed(_REL, "waited 2 × `--sync-period`", _UNHEALTHY),
    Allowed(_REL, "503 after 2 × sync period", _UNHEALTHY),
    Allowed(_REL, "wrapper blocks 8 s", _TEST),
    Allowed(_REL, "while proxyd was down (3 s)", _TEST),
    Allowed(_REL, "60 atomic replaces in 3 s", _TEST),
    Allowed(_REL, "| 100 MB file |", _TEST),
    Allowed(_REL, "| 15.9 MB file of", _TEST),
    Allowed(_REL, "for 2 MB hostile files", _TEST),
    Allowed(_REL, "one rewritten every 50 ms", _TEST),
    Allowed(_REL, "a 64 KiB header", _TEST),
    Allowed(_REL, "60 s outage", _TEST),
    Allowed(_REL, "files of 1 MiB or more in a child", "BIG_FILE in proxyd/sources/manifests.py"),
    Allowed(_REL, "limited to 768 MiB", "MEMORY_LIMIT in proxyd/sources/parsechild.py"),
    Allowed(_REL, "every 5 s and `stat`s every file every 60 s",
            "SAFETY_RESCAN and FULL_RESCAN in proxyd/sources/manifests.py"),
    Allowed(_REL, "only seen by the 5 s safety rescan", "SAFETY_RESCAN in proxyd/sources/manifests.py"),
    Allowed(_REL, "`SHUTDOWN_GRACE` (5 s)", "SHUTDOWN_GRACE in proxyd/modes/userspace/mode.py"),
    Allowed(_REL, "cut after the 5 s head timeout", "HEAD_TIMEOUT in proxyd/httpserve.py"),
    Allowed(_REL, "lent pipes: 256 KiB per busy", "PIPE_SIZE in proxyd/modes/userspace/pump.py"),
    Allowed("docs/nftables.md", "above 1 MiB of commands", "TRIM_ABOVE in proxyd/modes/nftables/libnft.py"),
    Allowed("docs/iptables.md", "time limit is 900 s", "DEFAULT_TIMEOUT in proxyd/netfilter/backend.py"),
    Allowed("docs/ipvs.md", "every 2 s a bounded", "graceful_interval in proxyd/modes/ipvs/mode.py"),
    Allowed("docs/ipvs.md", "TIME_WAIT timeout (2 min)", "the kernel's IPVS TCP TIME_WAIT timeout"),
    Allowed("docs/ipvs.md", "(default 3600 s)", "VM_TIMEOUT's default in tests/vm/run-in-vm.sh"),
    Allowed(_KUBE, "a random 5–10 min server timeout", "the API server's watch timeout"),
    Allowed(_KUBE, "silent for 150 s", "watch_idle_timeout in proxyd/sources/kube.py"),
    Allowed(_KUBE, "0.5 s to 30 s with jitter", "Backoff's initial and cap in proxyd/sources/kube.py"),
    Allowed("docs/bench.md", "fetching a 1 KiB file", _BENCH),
    Allowed("docs/bench.md", "5 ms, at most 10 s). Changes are spaced 1.2 s apart", _BENCH),
    Allowed("docs/bench.md", "`--min-sync-period` (1 s)", "min_sync_period's default in proxyd/config.py"),
    Allowed("docs/bench.md", "(1k: 90 s, 10k: 180 s, 30k: 240 s)", _BENCH),
    Allowed("docs/bench.md", "costs a 1 s SYN retransmit", "the kernel's initial SYN retransmission timeout"),
    Allowed("docs/bench.md", "2 rounds of 1 s runs", _BENCH),
)


def docs() -> list[str]:
    """The files checked, relative to the repository."""
    return ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]


def _blank(text: str, span: tuple[int, int]) -> str:
    start, end = span
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


def problems(file: str, text: str, allowed: tuple[Allowed, ...] = ALLOWED) -> list[str]:
    """One line per unbacked figure, allow-list phrase not found, or historic block without a commit."""
    found: list[str] = []
    for entry in allowed:
        if entry.file != file:
            continue
        start = text.find(entry.phrase)
        if start < 0:
            found.append(f"{file}: allow-listed phrase not found (drop it from ALLOWED): {entry.phrase!r}")
            continue
        while start >= 0:
            text = _blank(text, (start, start + len(entry.phrase)))
            start = text.find(entry.phrase)
    for match in _HISTORIC.finditer(text):
        if not _COMMIT.search(match.group(1)):
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"{file}:{line}: historic block without 'commit HEX' in its header")
    for pattern in (_REGION, _CELL, _HISTORIC, _FENCE, _CODE):
        for match in list(pattern.finditer(text)):
            text = _blank(text, match.span())
    for match in FIGURE.finditer(text):
        if _BOUND.search(text, 0, match.start()):
            continue
        line = text.count("\n", 0, match.start()) + 1
        context = " ".join(text[max(0, match.start() - 40):match.end() + 10].split())
        found.append(f"{file}:{line}: unbacked figure {match.group(0)!r} in “…{context}…”")
    return found


def check(root: Path = REPO) -> list[str]:
    """Every problem in README.md and docs/*.md."""
    return [line for file in docs() for line in problems(file, (root / file).read_text())]


if __name__ == "__main__":
    import sys

    lines = check()
    print("\n".join(lines) or "no unbacked figure")
    sys.exit(1 if lines else 0)
