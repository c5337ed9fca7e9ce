"""What a mode reports about itself: the value types of ``ProxyMode.status()`` and ``ProxyMode.trace()``.

The daemon's status service (``proxyd.status``) combines the desired state,
the policy's choice of endpoints and these per-mode reports into the answer
of ``proxyd status`` and ``proxyd trace``. A mode reports only what it reads
back from the kernel (or, in userspace mode, from its own connection
table), never what its planner intended, so an operator sees drift.

Everything here is plain data with a ``to_json()`` giving JSON-ready dicts
whose keys are a stable interface for scripts (``proxyd status --json``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# Per-endpoint counter names a mode may report (absent ones are simply not shown).
COUNTER_NAMES = (
    "packets", "bytes",  # iptables: new connections (first packets) DNATed to the endpoint, and their bytes
    "connections", "active", "inactive",  # ipvs / userspace
    "packets_in", "packets_out", "bytes_in", "bytes_out",  # ipvs
    "bytes_to_endpoint", "bytes_to_client",  # userspace
)

MAX_MISMATCHES = 20  # a status answer names at most this many differences


@dataclass(slots=True)
class ModeStatus:
    """The kernel's side of ``proxyd status``.

    ``counters``: service port (``ns/name:port/PROTO``) -> endpoint
    (``ip:port``) -> counter -> value. ``matches``: whether what the
    kernel holds equals what the last sync asked for (None: this mode
    cannot tell); ``mismatches`` names up to ``MAX_MISMATCHES`` differences.
    ``supported`` is False for a mode that has no status hook.
    """

    supported: bool = True
    matches: bool | None = None
    mismatches: list[str] = field(default_factory=list)
    counters: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    read_seconds: float = 0.0

    def mismatch(self, text: str) -> None:
        self.matches = False
        if len(self.mismatches) < MAX_MISMATCHES:
            self.mismatches.append(text)

    def to_json(self) -> dict[str, Any]:
        return {"supported": self.supported, "matches": self.matches, "mismatches": list(self.mismatches),
                "notes": list(self.notes), "read_seconds": round(self.read_seconds, 6)}


@dataclass(frozen=True, slots=True)
class TracePacket:
    """The first packet of a new flow: ``src`` -> ``dst``:``port``/``protocol`` (lower case)."""

    src: str
    dst: str
    port: int
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True)
class TracePath:
    """One way the packet can go.

    ``verdict``: ``ACCEPT`` (delivered to ``endpoint``, or to this node
    itself when ``endpoint`` is the original destination), ``DROP`` or
    ``REJECT``. ``odds``: the probability of this path (paths of one trace
    add up to 1). ``steps``: the chains or decisions on the way.
    """

    verdict: str
    endpoint: str | None
    odds: float
    masquerade: bool
    steps: tuple[str, ...] = ()
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "endpoint": self.endpoint, "odds": round(self.odds, 6),
                "masquerade": self.masquerade, "steps": list(self.steps), "reason": self.reason}


@dataclass(slots=True)
class TraceResult:
    """Where a packet would go on this node now, as the kernel (or the connection table) holds it."""

    supported: bool = True
    source: str = ""  # what the trace was evaluated against, e.g. "iptables-nft-save (nat, filter)"
    paths: list[TracePath] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"supported": self.supported, "source": self.source,
                "paths": [p.to_json() for p in self.paths], "notes": list(self.notes)}


def merge_paths(paths: list[TracePath]) -> list[TracePath]:
    """Paths with equal verdict, endpoint, masquerade and steps merged (odds added), most likely first."""
    merged: dict[tuple[Any, ...], TracePath] = {}
    for p in paths:
        key = (p.verdict, p.endpoint, p.masquerade, p.steps, p.reason)
        old = merged.get(key)
        merged[key] = p if old is None else TracePath(p.verdict, p.endpoint, old.odds + p.odds, p.masquerade,
                                                      p.steps, p.reason)
    return sorted(merged.values(), key=lambda p: (-p.odds, p.endpoint or "", p.verdict))


def unsupported_status(mode: str) -> ModeStatus:
    return ModeStatus(supported=False, notes=[f"{mode} mode does not report kernel state yet"])


def unsupported_trace(mode: str) -> TraceResult:
    return TraceResult(supported=False, notes=[f"{mode} mode has no packet tracer yet"])


def counter_key(name: Any) -> str:
    """The ``counters`` key of a ServicePortName: ``ns/name:port/PROTO``."""
    return f"{name}/{name.protocol}"


def as_int_map(values: Mapping[str, Any]) -> dict[str, int]:
    return {k: int(v) for k, v in values.items() if k in COUNTER_NAMES}


class TraceOutcome(Protocol):
    """Where one path of a rule tracer ends (``proxyd.modes.iptables.tracer.Outcome``)."""

    @property
    def verdict(self) -> str: ...  # "ACCEPT", "DROP" or "REJECT"

    @property
    def destination(self) -> str: ...  # "ip:port" ("[ip]:port" for IPv6) the packet is delivered to

    @property
    def masquerade(self) -> bool: ...


class RuleTracer(Protocol):
    """A packet walk through rules read back from the kernel (the iptables and nftables tracers)."""

    def is_local(self, ip: str) -> bool: ...

    def trace_paths(self, *, src: str, dst: str, port: int, protocol: str = "tcp",
                    local_origin: bool = False) -> Sequence[tuple[TraceOutcome, tuple[str, ...], float]]: ...


def trace_rules(build: Callable[[], RuleTracer], packet: TracePacket, *, source: str, rules: str,
                local_hook: str, original: str,
                refusal: Callable[[str, tuple[str, ...]], str]) -> TraceResult:
    """``packet`` through the rules a kernel mode read back: the trace step both netfilter modes share.

    ``build`` makes the tracer (it may fail on rules it cannot read, as the walk may: either gives
    an unsupported result naming ``rules``); a packet from one of the node's own addresses is
    traced from ``local_hook``, and the result says so. ``original`` is the packet's destination as
    the tracer writes it (``ip:port``, ``[ip]:port``): a path delivered there was not translated.
    ``refusal(verdict, steps)`` says why a path ends in DROP or REJECT, in the mode's terms.
    """
    result = TraceResult(source=source)
    try:
        tracer = build()
        local_origin = tracer.is_local(packet.src)
        raw = tracer.trace_paths(src=packet.src, dst=packet.dst, port=packet.port, protocol=packet.protocol,
                                 local_origin=local_origin)
    except (ValueError, KeyError, IndexError) as err:
        result.supported = False
        result.notes.append(f"cannot trace through {rules}: {err}")
        return result
    if local_origin:
        result.notes.append(f"{packet.src} is this node: traced from {local_hook}")
    paths = []
    for outcome, steps, odds in raw:
        endpoint = None if outcome.verdict != "ACCEPT" else outcome.destination
        reason = ""
        if outcome.verdict in ("DROP", "REJECT"):
            reason = refusal(outcome.verdict, steps)
        elif endpoint == original:
            reason = "not a service address: not translated"
        paths.append(TracePath(outcome.verdict, endpoint, odds, outcome.masquerade, steps, reason))
    result.paths = merge_paths(paths)
    return result
