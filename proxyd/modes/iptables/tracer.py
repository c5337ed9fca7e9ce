"""A packet-flow tracer over generated iptables-restore text (kube-proxy's ``tracePacket``), no root needed.

It walks the first packet of a new connection through the nat and filter
tables the planner wrote, plus kube-proxy's jump rules from the built-in
chains, the way netfilter would: nat PREROUTING (or OUTPUT for locally
originated packets) -> routing decision (local destination -> INPUT, else
FORWARD) -> filter -> nat POSTROUTING. ``-m statistic`` rules fork the walk
(both "matched" and "not matched" are followed), so one trace lists every
endpoint a packet can reach; ``-m recent --rcheck`` never matches (no
affinity entry exists for a first packet) and ``--set`` has no effect.

Only the matches and targets proxyd generates are understood; anything else
raises ``ValueError`` so a test can never pass by silently ignoring a rule.
Tests read as flows: ``trace(...)`` -> the set of endpoints reached (or
"REJECT"/"DROP"), and whether the packet was masqueraded.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, replace

from proxyd.modes.iptables import chains as ch

_BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


@dataclass(frozen=True, slots=True)
class Rule:
    chain: str
    matches: tuple[tuple[bool, str, tuple[str, ...]], ...]  # (negated, option, values)
    target: str | None
    target_args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Packet:
    src: str
    dst: str
    dport: int
    protocol: str  # "tcp" / "udp" / "sctp"
    mark: int = 0
    dnat: str | None = None  # "ip:port" once DNATed
    path: tuple[str, ...] = ()  # "table/chain" entered so far (for ``trace_paths``)
    odds: float = 1.0  # probability of this path, from ``-m statistic`` forks


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where one possible path of a packet ends."""

    verdict: str  # "ACCEPT" (delivered), "DROP", "REJECT"
    destination: str  # "ip:port" the packet is delivered to (DNAT target or original)
    masquerade: bool
    local: bool  # delivered to this node (INPUT) rather than forwarded

    def __str__(self) -> str:
        if self.verdict != "ACCEPT":
            return self.verdict
        return self.destination + (" (masq)" if self.masquerade else "")


_OPTION_ARITY = {
    "-m": 1, "-p": 1, "-s": 1, "-d": 1, "--dport": 1, "--comment": 1, "--dst-type": 1, "--src-type": 1,
    "--mark": 1, "--ctstate": 1, "--mode": 1, "--probability": 1, "--name": 1, "--seconds": 1,
    "--rcheck": 0, "--reap": 0, "--set": 0, "--rsource": 0,
    "--mask": 1,  # iptables-save prints the recent match's default mask
}
# --set-xmark and --reject-with are how iptables-save prints rules read back from the kernel.
_TARGET_ARITY = {"--to-destination": 1, "--or-mark": 1, "--xor-mark": 1, "--random-fully": 0,
                 "--set-xmark": 1, "--reject-with": 1}


def parse(text: str) -> dict[str, dict[str, list[Rule]]]:
    """Restore text -> {table: {chain: [rules]}}. ``-X`` deletes a chain; ``-D``/``-I`` patch it."""
    tables: dict[str, dict[str, list[Rule]]] = {}
    table: dict[str, list[Rule]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = tables.setdefault(line[1:], {})
            continue
        if table is None:
            raise ValueError(f"rule outside a table: {line!r}")
        if line.startswith(":"):
            name = line[1:].split()[0]
            table[name] = []  # a chain line flushes the chain, as with --noflush
            continue
        argv = shlex.split(line)
        op = argv[0]
        if op == "-X":
            table.pop(argv[1], None)
            continue
        if op in ("-A", "-D"):
            rule = _parse_rule(argv[1], argv[2:])
            rules = table.setdefault(argv[1], [])
            if op == "-A":
                rules.append(rule)
            else:
                rules.remove(rule)  # ValueError, as iptables-restore fails, when absent
        elif op == "-I":
            pos = int(argv[2])
            table.setdefault(argv[1], []).insert(pos - 1, _parse_rule(argv[1], argv[3:]))
        else:
            raise ValueError(f"unsupported command {op!r} in {line!r}")
    return tables


def _parse_rule(chain: str, args: list[str]) -> Rule:
    matches: list[tuple[bool, str, tuple[str, ...]]] = []
    target: str | None = None
    target_args: list[str] = []
    i = 0
    negate = False
    while i < len(args):
        tok = args[i]
        if tok == "!":
            negate = True
            i += 1
            continue
        if tok == "-j":
            target = args[i + 1]
            i += 2
            while i < len(args):
                opt = args[i]
                if opt not in _TARGET_ARITY:
                    raise ValueError(f"unknown target option {opt!r} in chain {chain}")
                n = _TARGET_ARITY[opt]
                target_args.extend(args[i:i + 1 + n])
                i += 1 + n
            break
        if tok not in _OPTION_ARITY:
            raise ValueError(f"unknown match option {tok!r} in chain {chain}: {args}")
        n = _OPTION_ARITY[tok]
        matches.append((negate, tok, tuple(args[i + 1:i + 1 + n])))
        negate = False
        i += 1 + n
    return Rule(chain, tuple(matches), target, tuple(target_args))


def _in(addr: str, cidr: str) -> bool:
    return ipaddress.ip_address(addr) in ipaddress.ip_network(cidr, strict=False)


def host_port(ip: str, port: int) -> str:
    """``ip:port``, ``[ip]:port`` for IPv6 (net.JoinHostPort): how outcomes name a destination."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_host_port(text: str) -> tuple[str, int]:
    """``host_port``'s inverse: (``ip``, ``port``) of ``ip:port`` or ``[ip]:port``."""
    ip, _, port = text.rpartition(":")
    return ip.removeprefix("[").removesuffix("]"), int(port)


class Tracer:
    """Traces packets through one ruleset on a node with the given local addresses."""

    def __init__(self, text: str, *, node_ips: Iterable[str], jumps: bool = True) -> None:
        """``jumps``: add kube-proxy's jumps from the built-in chains (False when ``text`` was read
        back from the kernel and already holds them)."""
        self.tables = parse(text)
        for table in ("filter", "nat"):
            chains = self.tables.setdefault(table, {})
            for line in ch.jump_rules_text(table) if jumps else ():
                argv = shlex.split(line)
                chains.setdefault(argv[1], []).append(_parse_rule(argv[1], argv[2:]))
        self.node_ips = frozenset(str(ipaddress.ip_address(ip)) for ip in node_ips)

    def is_local(self, ip: str) -> bool:
        """Whether ``ip`` is this node's (one of ``node_ips``, or loopback)."""
        return ip in self.node_ips or ipaddress.ip_address(ip).is_loopback

    # -- matching ---------------------------------------------------------

    def _match(self, rule: Rule, pkt: Packet) -> list[bool]:
        """Possible results of matching (two when a statistic match forks)."""
        results = [True]
        for negate, opt, vals in rule.matches:
            if opt in ("-m", "--comment", "--mode", "--name", "--seconds", "--reap", "--set", "--rsource",
                       "--mask"):
                continue
            if opt == "--probability":
                results = [r and b for r in results for b in (True, False)]
                continue
            if opt == "--rcheck":
                ok = False
            elif opt == "-p":
                ok = pkt.protocol == vals[0]
            elif opt == "-s":
                ok = _in(pkt.src, vals[0])
            elif opt == "-d":
                ok = _in(pkt.dst, vals[0])
            elif opt == "--dport":
                ok = pkt.dport == int(vals[0])
            elif opt == "--dst-type":
                ok = self._addrtype(pkt.dst, vals[0])
            elif opt == "--src-type":
                ok = self._addrtype(pkt.src, vals[0])
            elif opt == "--mark":
                value, _, mask = vals[0].partition("/")
                m = int(mask, 16) if mask else 0xFFFFFFFF
                ok = (pkt.mark & m) == int(value, 16)
            elif opt == "--ctstate":
                ok = "NEW" in vals[0].split(",")  # first packet of a connection
            else:
                raise ValueError(f"unsupported match {opt}")
            if negate:
                ok = not ok
            if not ok:
                return [False]
        return sorted(set(results), reverse=True)

    def _addrtype(self, ip: str, kind: str) -> bool:
        if kind != "LOCAL":
            raise ValueError(f"unsupported addrtype {kind}")
        return self.is_local(ip)

    # -- walking ----------------------------------------------------------

    def _run(self, table: str, chain: str, pkt: Packet, depth: int = 0) -> list[tuple[str | None, Packet]]:
        """Every (verdict or None for 'fell through/RETURN', packet) path through ``chain``."""
        if depth > 32:
            raise ValueError(f"jump loop at {table}/{chain}")
        pkt = replace(pkt, path=(*pkt.path, f"{table}/{chain}"))
        rules = self.tables.get(table, {}).get(chain)
        if rules is None:
            if chain in _BUILTIN:
                return [(None, pkt)]
            raise ValueError(f"jump to missing chain {table}/{chain}")
        return self._from(table, rules, 0, pkt, depth)

    def _from(self, table: str, rules: list[Rule], start: int, pkt: Packet,
              depth: int) -> list[tuple[str | None, Packet]]:
        out: list[tuple[str | None, Packet]] = []
        for idx in range(start, len(rules)):
            rule = rules[idx]
            results = self._match(rule, pkt)
            if results == [False]:
                continue
            if False in results:
                # Forked: the not-matching branch continues with the next rule.
                p = _probability(rule)
                out.extend(self._from(table, rules, idx + 1, replace(pkt, odds=pkt.odds * (1 - p)), depth))
                pkt = replace(pkt, odds=pkt.odds * p)
            target = rule.target
            if target is None:
                continue
            if target in ("ACCEPT", "DROP", "REJECT"):
                out.append((target, replace(pkt, path=(*pkt.path, _verdict_step(table, rule)))))
                return out
            if target == "RETURN":
                out.append((None, pkt))
                return out
            if target == "DNAT":
                dest = rule.target_args[rule.target_args.index("--to-destination") + 1]
                ip, port = split_host_port(dest)
                out.append(("DNAT", replace(pkt, dst=ip, dport=port, dnat=dest)))
                return out
            if target == "MARK":
                if "--or-mark" in rule.target_args:
                    pkt = replace(pkt, mark=pkt.mark | int(rule.target_args[1], 16))
                elif "--set-xmark" in rule.target_args:
                    value, _, mask = rule.target_args[1].partition("/")
                    m = int(mask, 16) if mask else 0xFFFFFFFF
                    pkt = replace(pkt, mark=(pkt.mark & ~m & 0xFFFFFFFF) ^ int(value, 16))
                else:
                    pkt = replace(pkt, mark=pkt.mark ^ int(rule.target_args[1], 16))
                continue
            if target == "MASQUERADE":
                out.append(("MASQUERADE", pkt))
                return out
            # Jump to a user chain; paths that fall through continue here.
            for verdict, after in self._run(table, target, pkt, depth + 1):
                if verdict is None:
                    out.extend(self._from(table, rules, idx + 1, after, depth))
                else:
                    out.append((verdict, after))
            return out
        out.append((None, pkt))
        return out

    def trace(self, *, src: str, dst: str, port: int, protocol: str = "tcp",
              local_origin: bool = False) -> list[Outcome]:
        """Every way the first packet ``src`` -> ``dst:port`` can end."""
        return _dedup([o for o, _, _ in self.trace_paths(src=src, dst=dst, port=port, protocol=protocol,
                                                         local_origin=local_origin)])

    def trace_paths(self, *, src: str, dst: str, port: int, protocol: str = "tcp",
                    local_origin: bool = False) -> list[tuple[Outcome, tuple[str, ...], float]]:
        """``trace`` with, for each path, the chains it entered and its probability (paths add up to 1)."""
        pkt = Packet(src=src, dst=dst, dport=port, protocol=protocol.lower())
        outcomes: list[tuple[Outcome, tuple[str, ...], float]] = []
        for verdict, p in self._run("nat", "OUTPUT" if local_origin else "PREROUTING", pkt):
            if verdict not in (None, "DNAT"):
                raise ValueError(f"unexpected nat verdict {verdict}")
            local = self.is_local(p.dst)
            hook = "OUTPUT" if local_origin else ("INPUT" if local else "FORWARD")
            for fverdict, fp in self._run("filter", hook, p):
                if fverdict in ("DROP", "REJECT"):
                    dropped = Outcome(fverdict, host_port(fp.dst, fp.dport), False, local)
                    outcomes.append((dropped, fp.path, fp.odds))
                    continue
                masq = False
                path = fp.path
                if not local or local_origin:
                    for pverdict, pp in self._run("nat", "POSTROUTING", fp):
                        if pverdict == "MASQUERADE":
                            masq = True
                            path = pp.path
                outcome = Outcome("ACCEPT", host_port(fp.dst, fp.dport), masq, local and not local_origin)
                outcomes.append((outcome, path, fp.odds))
        return outcomes


def _verdict_step(table: str, rule: Rule) -> str:
    """``table/chain -j VERDICT`` plus the rule's comment, which says why (kube-proxy writes it there)."""
    comment = next((vals[0] for _neg, opt, vals in rule.matches if opt == "--comment" and vals), "")
    step = f"{table}/{rule.chain} -j {rule.target}"
    return f"{step} ({comment})" if comment else step


def _probability(rule: Rule) -> float:
    for _negate, opt, vals in rule.matches:
        if opt == "--probability":
            return float(vals[0])
    raise ValueError(f"a forked rule without --probability in {rule.chain}")


def _dedup(outcomes: list[Outcome]) -> list[Outcome]:
    seen: dict[Outcome, None] = {}
    for o in outcomes:
        seen.setdefault(o, None)
    return list(seen)


def flow(tracer: Tracer, *, src: str, dst: str, protocol: str = "tcp", local_origin: bool = False) -> str:
    """One-line summary: sorted reachable endpoints (``ip:port``, comma-separated) or the verdict,
    then ``masq`` / ``no-masq`` when delivered (all paths agree on masquerading or it says ``mixed``).
    ``dst`` is ``ip:port`` (``[ip]:port`` for IPv6), endpoints are written the same way.
    """
    ip, port = split_host_port(dst)
    outs = tracer.trace(src=src, dst=ip, port=port, protocol=protocol, local_origin=local_origin)
    verdicts = {o.verdict for o in outs}
    if verdicts != {"ACCEPT"}:
        if len(verdicts) == 1:
            return verdicts.pop()
        return "mixed: " + ", ".join(sorted(str(o) for o in outs))
    dests = ", ".join(sorted({o.destination for o in outs}))
    masq = {o.masquerade for o in outs}
    tag = "mixed" if len(masq) > 1 else ("masq" if masq.pop() else "no-masq")
    return f"{dests} {tag}"
