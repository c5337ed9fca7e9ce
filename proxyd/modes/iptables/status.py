"""iptables mode's answers to ``proxyd status`` and ``proxyd trace``, read back from the kernel.

Everything is read from the kernel through the back end the mode uses,
off the event loop:

* **status**: the packet/byte counters of each endpoint's DNAT rule (the
  ``KUBE-SEP-*`` chain's last rule). The nat table sees only the first
  packet of each connection, so ``packets`` counts new connections (and
  UDP flows) sent to that endpoint; ``bytes`` are those first packets'
  bytes. Whether the kernel matches the last sync: every chain the planner
  committed exists with the planned number of rules, and the jumps from the
  built-in chains are in place. For a few services (``proxyd status
  NAME``) only their chains are listed (``iptables -S CHAIN -v``,
  milliseconds each), so the answer is fast on any node. For the whole
  node, one ``iptables-save -c`` per table up to ``WHOLE_NODE_SAVE``
  service ports; above that a full dump costs too much (measured here: 37 s
  for the nat table of 10,000 services × 10 endpoints on the nft back end),
  so only the dispatch chains (``KUBE-SERVICES``, ``KUBE-NODEPORTS``) and
  the jumps are listed: every service's dispatch rules must be there, and
  per-endpoint counters are left to a request that names services.
* **trace**: the chains the packet can enter, fetched one by one from the
  built-in chains on (``iptables -S CHAIN``), skipping rules whose
  destination address or port cannot match the packet, so a trace lists a
  few dozen chains however large the ruleset is. Built-in chains keep only
  their jumps into proxyd's chains (rules of other software use matches
  the tracer does not model). The packet-flow tracer (``tracer.py``) then
  lists every path with its chains and odds.

Parsing is strict about what it keeps and tolerant of what it drops: a line
that is not a rule of a kept chain is skipped, and a kept rule the tracer
cannot model makes the trace fail with that reason instead of guessing.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable, Mapping

from proxyd.introspect import ModeStatus, TracePacket, TraceResult, counter_key, trace_rules
from proxyd.model import ServicePortName
from proxyd.modes.iptables import chains as ch
from proxyd.modes.iptables.planner import PortRender
from proxyd.modes.iptables.tracer import Tracer, host_port
from proxyd.netfilter.backend import run

_COUNTED = re.compile(r"^\[(\d+):(\d+)\]\s+(.*)$")
_INLINE_COUNTERS = re.compile(r" -c (\d+) (\d+)(?= |$)")  # how ``iptables -S -v`` prints them
_DEST = re.compile(r"(?<!! )-d (\S+)")
_DPORT = re.compile(r"(?<!! )--dport (\d+)(?= |$)")
MAX_TRACE_CHAINS = 4096  # chains one trace may fetch (a loop or a hostile ruleset cannot run away)
SMALL_STATUS = 64  # service ports up to which status lists their chains instead of saving tables
WHOLE_NODE_SAVE = 500  # service ports up to which a whole-node status dumps the tables (~0.5 s on nft)
_BUILTIN = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
MAX_SAVE_BYTES = 1 << 30  # a save larger than this is refused rather than parsed


def split_counters(line: str) -> tuple[int | None, int | None, str]:
    """``[pkts:bytes] -A ...`` (save) or ``-A ... -c pkts bytes ...`` (``-S -v``) -> (pkts, bytes, rule);
    lines without counters come back with None counters."""
    match = _COUNTED.match(line)
    if match is not None:
        return int(match.group(1)), int(match.group(2)), match.group(3)
    inline = _INLINE_COUNTERS.search(line)
    if inline is not None and line.startswith("-A "):
        return int(inline.group(1)), int(inline.group(2)), line[:inline.start()] + line[inline.end():]
    return None, None, line


def may_match(rule: str, packet: TracePacket) -> bool:
    """False when the rule's destination address or port rules the packet out (cheap, before parsing).

    Only positive ``-d``/``--dport`` are looked at, so a False is always right; anything else is left to
    the tracer.
    """
    dest = _DEST.search(rule)
    if dest is not None:
        try:
            if ipaddress.ip_address(packet.dst) not in ipaddress.ip_network(dest.group(1), strict=False):
                return False
        except ValueError:
            return True
    dport = _DPORT.search(rule)
    return dport is None or int(dport.group(1)) == packet.port


def _chain_of(rule: str) -> str | None:
    if not rule.startswith("-A "):
        return None
    parts = rule.split(None, 2)
    return parts[1] if len(parts) > 1 else None


def _target_of(rule: str) -> str | None:
    idx = rule.rfind(" -j ")
    if idx < 0:
        return None
    parts = rule[idx + 4:].split(None, 1)
    return parts[0] if parts else None


def own_rules(save_text: str, packet: TracePacket | None = None) -> str:
    """A saved table (with or without ``-c``) reduced to proxyd's chains and the jumps into them.

    The result is iptables-restore text the tracer parses: the ``*table``
    header, ``:KUBE-*`` declarations, ``-A`` rules of ``KUBE-*`` chains and
    rules of built-in chains that jump to a ``KUBE-*`` chain, then COMMIT. With ``packet``, rules that
    cannot match it (``may_match``) are left out too.
    """
    out: list[str] = []
    for raw in save_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*") or line == "COMMIT":
            out.append(line)
            continue
        if line.startswith(":"):
            name = line[1:].split(None, 1)[0] if len(line) > 1 else ""
            if name.startswith("KUBE-"):
                out.append(f":{name} - [0:0]")
            continue
        _, _, rule = split_counters(line)
        chain = _chain_of(rule)
        if chain is None or (packet is not None and not may_match(rule, packet)):
            continue
        if chain.startswith("KUBE-"):
            out.append(rule)
        elif chain in _BUILTIN and (_target_of(rule) or "").startswith("KUBE-"):
            out.append(rule)
    return "\n".join(out) + "\n"


def rule_counts(save_text: str) -> dict[str, int]:
    """Rules per chain in a saved table."""
    counts: dict[str, int] = {}
    for raw in save_text.splitlines():
        line = raw.strip()
        if line.startswith(":"):
            name = line[1:].split(None, 1)
            if name:
                counts.setdefault(name[0], 0)
            continue
        chain = _chain_of(split_counters(line)[2])
        if chain is not None:
            counts[chain] = counts.get(chain, 0) + 1
    return counts


def dnat_counters(save_text: str) -> dict[str, tuple[int, int]]:
    """``KUBE-SEP-*`` chain -> (packets, bytes) of its DNAT rule, from ``iptables-save -c`` or ``-S -v``."""
    out: dict[str, tuple[int, int]] = {}
    for raw in save_text.splitlines():
        if "-j DNAT" not in raw:
            continue
        pkts, nbytes, rule = split_counters(raw.strip())
        chain = _chain_of(rule)
        if pkts is None or nbytes is None or chain is None or not chain.startswith(ch.SEP_PREFIX):
            continue
        old = out.get(chain, (0, 0))
        out[chain] = (old[0] + pkts, old[1] + nbytes)
    return out


def chain_rule_counts(render: PortRender) -> dict[str, int]:
    """The planned number of rules of each of a port's own chains (kept by the cache without the rules)."""
    return dict(zip(render.chains, render.chain_counts, strict=True))


def build_status(nat_save: str, filter_save: str, cache: Mapping[ServicePortName, PortRender],
                 names: Iterable[ServicePortName] | None = None) -> ModeStatus:
    """Counters per endpoint and the kernel-versus-plan comparison (pure; tests feed it saved text).

    ``names``: only these service ports (the text then needs to hold only their chains and the built-in
    chains).
    """
    status = ModeStatus(matches=True)
    counters = dnat_counters(nat_save)
    kernel_rules = rule_counts(nat_save)
    for name in sorted(cache if names is None else [n for n in names if n in cache]):
        render = cache[name]
        per_ep: dict[str, dict[str, int]] = {}
        for ep in render.reachable:
            pkts, nbytes = counters.get(ch.sep_chain(name, ep), (0, 0))
            per_ep[str(ep)] = {"packets": pkts, "bytes": nbytes}
        if per_ep:
            status.counters[counter_key(name)] = per_ep
        for chain, want in chain_rule_counts(render).items():
            have = kernel_rules.get(chain)
            if have is None:
                status.mismatch(f"{name}: chain {chain} missing from the nat table")
            elif have != want:
                status.mismatch(f"{name}: chain {chain} holds {have} rules, the last sync wrote {want}")
    builtin_rules = {table: [rule for rule in (split_counters(raw.strip())[2] for raw in text.splitlines())
                             if (_chain_of(rule) or "") in _BUILTIN]
                     for table, text in (("nat", nat_save), ("filter", filter_save))}
    for jump in ch.JUMP_RULES:
        head = f"-A {jump.chain} "
        if not any(rule.startswith(head) and _target_of(rule) == jump.target and jump.comment in rule
                   for rule in builtin_rules[jump.table]):
            status.mismatch(f"jump {jump.table}/{jump.chain} -> {jump.target} missing")
    return status


async def save_tables(save_argv: Iterable[str], tables: Iterable[str] = ("nat", "filter")) -> dict[str, str]:
    """``iptables-save -c -t T`` for each table (one process each; the caller times it)."""
    out = {}
    for table in tables:
        text = await run([*save_argv, "-c", "-t", table], time_limit=60.0)
        if len(text) > MAX_SAVE_BYTES:
            raise ValueError(f"iptables-save -t {table} printed more than {MAX_SAVE_BYTES} bytes")
        out[table] = text
    return out


async def list_chain(iptables_argv: list[str], table: str, chain: str, *,
                     counters: bool = False) -> str | None:
    """``iptables -t T -S CHAIN [-v]``; None when the chain does not exist."""
    from proxyd.netfilter.backend import IptablesError

    try:
        return await run([*iptables_argv, "-t", table, "-S", chain, *(["-v"] if counters else [])],
                         time_limit=30.0)
    except IptablesError:
        return None


async def read_status(save_argv: list[str], iptables_argv: list[str],
                      cache: Mapping[ServicePortName, PortRender],
                      names: Iterable[ServicePortName] | None = None) -> ModeStatus:
    started = time.perf_counter()
    wanted = None if names is None else [n for n in names if n in cache]
    if wanted is not None and len(wanted) <= SMALL_STATUS:
        nat: list[str] = []
        for name in wanted:
            for chain in cache[name].chains:
                text = await list_chain(iptables_argv, "nat", chain, counters=True)
                if text is not None:
                    nat.append(text)
        saved: dict[str, list[str]] = {table: [] for table in ("nat", "filter")}
        for table, builtin in dict.fromkeys((j.table, j.chain) for j in ch.JUMP_RULES):
            text = await list_chain(iptables_argv, table, builtin)
            if text is not None:
                saved[table].append(text)
        status = build_status("\n".join(nat + saved["nat"]), "\n".join(saved["filter"]), cache, wanted)
        how = f"{iptables_argv[0]} -S CHAIN -v of the selected services' chains"
    elif len(cache if wanted is None else wanted) > WHOLE_NODE_SAVE:
        status = await _dispatch_status(iptables_argv, cache)
        status.read_seconds = time.perf_counter() - started
        return status
    else:
        tables = await save_tables(save_argv)
        status = build_status(tables["nat"], tables["filter"], cache, wanted)
        how = f"{save_argv[0]} -c"
    status.notes.append(f"counters from {how}; nat rules count the first packet of each connection, so "
                        "'packets' are new connections")
    status.read_seconds = time.perf_counter() - started
    return status


def trace_saved(nat_save: str, filter_save: str, packet: TracePacket, *, node_ips: Iterable[str],
                source: str) -> TraceResult:
    """Trace ``packet`` through saved tables (pure; tests feed it saved text)."""
    text = own_rules(nat_save, packet) + own_rules(filter_save, packet)
    return trace_rules(lambda: Tracer(text, node_ips=node_ips, jumps=False), packet, source=source,
                       rules="the rules read back", local_hook="nat OUTPUT",
                       original=host_port(packet.dst, packet.port), refusal=_refusal)


def _refusal(verdict: str, steps: tuple[str, ...]) -> str:
    """Why a path ends in DROP or REJECT: the reason the deciding rule's comment gives, else its chain."""
    last = steps[-1] if steps else ""
    return last.partition(" (")[2].rstrip(")") or f"{verdict.lower()} by {last}"


def dispatch_targets(rules: Iterable[str]) -> set[tuple[str, str]]:
    """(chain, per-service target) of every jump from a dispatch chain to a per-service chain."""
    out = set()
    for rule in rules:
        chain, target = _chain_of(rule), _target_of(rule)
        if chain is not None and target is not None and ch.is_service_chain(target):
            out.add((chain, target))
    return out


def build_dispatch_status(texts: Mapping[str, str],
                          cache: Mapping[ServicePortName, PortRender]) -> ModeStatus:
    """Whole-node check of a large node from its dispatch chains only (pure)."""
    status = ModeStatus(matches=True)
    have = dispatch_targets(line.strip() for text in texts.values() for line in text.splitlines())
    want: dict[tuple[str, str], ServicePortName] = {}
    for name, render in cache.items():
        for pair in dispatch_targets((*render.nat_services, *render.nat_nodeports)):
            want[pair] = name
    for pair in sorted(set(want) - have):
        status.mismatch(f"{want[pair]}: no jump {pair[0]} -> {pair[1]} in the nat table")
    for pair in sorted(have - set(want)):
        status.mismatch(f"jump {pair[0]} -> {pair[1]} in the nat table but not in the last sync")
    builtin = {table: [line.strip() for line in texts.get(f"{table}/builtin", "").splitlines()]
               for table in ("nat", "filter")}
    for jump in ch.JUMP_RULES:
        if not any(_chain_of(r) == jump.chain and _target_of(r) == jump.target and jump.comment in r
                   for r in builtin[jump.table]):
            status.mismatch(f"jump {jump.table}/{jump.chain} -> {jump.target} missing")
    return status


async def _dispatch_status(iptables_argv: list[str],
                           cache: Mapping[ServicePortName, PortRender]) -> ModeStatus:
    texts: dict[str, str] = {}
    for chain in (ch.KUBE_SERVICES, ch.KUBE_NODEPORTS):
        texts[chain] = await list_chain(iptables_argv, "nat", chain) or ""
    for table in ("nat", "filter"):
        parts = []
        for builtin in dict.fromkeys(j.chain for j in ch.JUMP_RULES if j.table == table):
            parts.append(await list_chain(iptables_argv, table, builtin) or "")
        texts[f"{table}/builtin"] = "\n".join(parts)
    status = build_dispatch_status(texts, cache)
    status.notes.append(f"{len(cache)} service ports: checked the dispatch chains only (a whole-table dump "
                        "costs seconds at this size); name a namespace or service for per-endpoint counters")
    return status


async def fetch_for_trace(iptables_argv: list[str], packet: TracePacket) -> tuple[str, str, int]:
    """The chains ``packet`` can enter, as saved-table text for nat and filter, and how many were listed."""
    texts: dict[str, list[str]] = {"nat": ["*nat"], "filter": ["*filter"]}
    queue = [("nat", "PREROUTING"), ("nat", "OUTPUT"), ("nat", "POSTROUTING"),
             ("filter", "INPUT"), ("filter", "FORWARD"), ("filter", "OUTPUT")]
    seen = set(queue)
    fetched = 0
    while queue:
        table, chain = queue.pop(0)
        fetched += 1
        if fetched > MAX_TRACE_CHAINS:
            raise ValueError(f"more than {MAX_TRACE_CHAINS} chains on the way: refusing to go on")
        text = await list_chain(iptables_argv, table, chain)
        if text is None:
            continue  # the tracer reports a jump to a missing chain with its name
        if chain.startswith("KUBE-"):
            texts[table].append(f":{chain} - [0:0]")
        for line in text.splitlines():
            rule = line.strip()
            if not rule.startswith("-A ") or not may_match(rule, packet):
                continue
            target = _target_of(rule) or ""
            if chain in _BUILTIN and not target.startswith("KUBE-"):
                continue
            texts[table].append(rule)
            if target.startswith("KUBE-") and (table, target) not in seen:
                seen.add((table, target))
                queue.append((table, target))
    return "\n".join(texts["nat"]) + "\nCOMMIT\n", "\n".join(texts["filter"]) + "\nCOMMIT\n", fetched


async def read_trace(iptables_argv: list[str], packet: TracePacket, node_ips: Iterable[str]) -> TraceResult:
    try:
        nat, filt, fetched = await fetch_for_trace(iptables_argv, packet)
    except ValueError as err:
        return TraceResult(supported=False, notes=[str(err)])
    return trace_saved(nat, filt, packet, node_ips=node_ips,
                       source=f"{iptables_argv[0]} -S of {fetched} chains on the way (read back now)")
