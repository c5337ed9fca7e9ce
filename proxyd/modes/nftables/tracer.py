"""A packet-flow tracer over generated nft transactions (kube-proxy's ``tracePacket``), no root needed.

It loads the text the planner produced (``add chain/set/map/rule/element``,
``flush``, ``delete``: a full plan, optionally followed by partial ones, so
tests also check that a chain of partial transactions leaves what a full
one would) and walks the first packet of a new connection through the base
chains in hook and priority order, the way netfilter would: prerouting (or
output for locally originated packets) -> routing decision (local
destination -> input, else forward) -> postrouting. ``numgen random`` forks
the walk over every value, so one trace lists every endpoint a packet can
reach; dynamic (affinity) sets are empty, as for a first packet.

Only the statements proxyd generates are understood; anything else raises
``ValueError`` so a test can never pass by silently ignoring a rule. A map
lookup a DNAT rule needs that finds no element also raises: a
``numgen random mod N`` with fewer than N backends is a planner bug.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from proxyd.modes.iptables.tracer import Outcome, host_port, split_host_port

_A = r"(?:ip6?)"
_KEY = rf"(?:({_A}) daddr \. )?meta l4proto \. th dport"
_ADDR = r"[0-9a-fA-F.:/]+"

# (regex, statement kind); groups become the statement's arguments. Longest forms first.
_STATEMENTS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), k) for p, k in (
    (r"ct state new", "ct_new"),
    (r"ct status dnat", "ct_dnat"),
    (rf"{_A} saddr \. {_A} daddr @(\S+)", "pair_in"),
    (rf"{_KEY} \. {_A} saddr != @(\S+)", "key_saddr_not_in"),
    (rf"{_KEY} vmap @(\S+)", "vmap"),
    (rf"{_KEY} @(\S+)", "key_in"),
    (r"fib daddr type local", "daddr_local"),
    (r"fib daddr type != local", "daddr_not_local"),
    (r"fib saddr type local", "saddr_local"),
    (rf"{_A} daddr != ({_ADDR})", "daddr_not_cidr"),
    (rf"{_A} daddr @(\S+)", "daddr_in"),
    (rf"{_A} saddr != ({_ADDR})", "saddr_not_cidr"),
    (rf"{_A} saddr @(\S+)", "saddr_in"),
    (rf"{_A} saddr ({_ADDR})", "saddr_cidr"),
    (r"meta mark set meta mark \| (0x[0-9a-f]+)", "mark_or"),
    (r"meta mark set meta mark \^ (0x[0-9a-f]+)", "mark_xor"),
    (r"meta mark & (0x[0-9a-f]+) == 0", "mark_clear"),
    (r"meta l4proto (tcp|udp|sctp)", "proto"),
    (rf"dnat {_A} addr \. port to {_KEY} \. numgen random mod (\d+) map @(\S+)", "dnat_map"),
    (r"dnat to (\S+)", "dnat"),
    (r"numgen random mod (\d+) vmap \{ ([^}]*) \}", "numgen_vmap"),
    (rf"update @(\S+) \{{ {_A} saddr \}}", "update"),
    (r"masquerade fully-random", "masquerade"),
    (r"(jump|goto) (\S+)", "jump"),
    (r"(drop|reject|return|accept)", "verdict"),
))

_HOOKS = {"prerouting", "input", "forward", "output", "postrouting"}


@dataclass(frozen=True, slots=True)
class Statement:
    kind: str
    args: tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class Packet:
    src: str
    dst: str
    dport: int
    protocol: str
    mark: int = 0
    dnat: str | None = None
    steps: tuple[str, ...] = ()  # chains entered so far (for ``trace_paths``)
    odds: float = 1.0  # probability of this path, from ``numgen random`` forks


def parse_rule(text: str) -> tuple[Statement, ...]:
    out = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        for regex, kind in _STATEMENTS:
            m = regex.match(text, pos)
            if m is not None and (m.end() == len(text) or text[m.end()] == " "):
                out.append(Statement(kind, m.groups()))
                pos = m.end() + 1
                break
        else:
            raise ValueError(f"unsupported statement at {text[pos:]!r} in rule {text!r}")
    return tuple(out)


def _split_elements(body: str) -> list[str]:
    return [e.strip() for e in body.split(",") if e.strip()]


class Ruleset:
    """The table as a sequence of nft commands leaves it (the subset proxyd writes)."""

    _CMD = re.compile(r"^(add|flush|delete) (table|chain|set|map|rule|element) (ip6?) (\S+)(?: (\S+))?(.*)$")

    def __init__(self) -> None:
        self.chains: dict[str, list[tuple[Statement, ...]]] = {}
        self.base: dict[str, tuple[str, str, int]] = {}  # chain -> (type, hook, priority)
        self.sets: dict[str, dict[str, str | None]] = {}

    def load(self, text: str) -> Ruleset:
        for raw in text.splitlines():
            line = raw.strip()
            if line:
                self._command(line)
        return self

    def _command(self, line: str) -> None:
        m = self._CMD.match(line)
        if m is None:
            raise ValueError(f"unsupported command {line!r}")
        op, what, _family, _table, name, rest = m.groups()
        rest = rest.strip()
        if what == "table":
            if op == "delete":
                self.chains.clear()
                self.base.clear()
                self.sets.clear()
            return
        assert name is not None
        if what == "chain":
            if op == "add":
                self.chains.setdefault(name, [])
                hook = re.match(r"\{ type (\w+) hook (\w+) priority (-?\d+) ; \}", rest)
                if hook is not None:
                    if hook.group(2) not in _HOOKS:
                        raise ValueError(f"unknown hook in {line!r}")
                    self.base[name] = (hook.group(1), hook.group(2), int(hook.group(3)))
            elif op == "flush":
                self._chain(name).clear()
            else:
                if self._chain(name):
                    raise ValueError(f"deleting non-empty chain {name}")
                self._check_unreferenced(name)
                del self.chains[name]
                self.base.pop(name, None)
        elif what in ("set", "map"):
            if op == "add":
                self.sets.setdefault(name, {})
            elif op == "flush":
                self._set(name).clear()
            else:
                self._set(name)
                del self.sets[name]
        elif what == "rule":
            if op != "add":
                raise ValueError(f"unsupported command {line!r}")
            self._chain(name).append(parse_rule(rest))
        elif what == "element":
            body = re.fullmatch(r"\{ (.*) \}", rest)
            if body is None:
                raise ValueError(f"bad element list in {line!r}")
            target = self._set(name)
            for element in _split_elements(body.group(1)):
                key, sep, value = element.partition(" : ")
                if op == "add":
                    if key in target and target[key] != (value if sep else None):
                        raise ValueError(f"element {key!r} of {name} exists with another value")
                    target[key] = value if sep else None
                elif op == "delete":
                    if key not in target:
                        raise ValueError(f"deleting missing element {key!r} of {name}")
                    del target[key]
                else:
                    raise ValueError(f"unsupported command {line!r}")

    def _chain(self, name: str) -> list[tuple[Statement, ...]]:
        if name not in self.chains:
            raise ValueError(f"no chain {name}")
        return self.chains[name]

    def _set(self, name: str) -> dict[str, str | None]:
        if name not in self.sets:
            raise ValueError(f"no set {name}")
        return self.sets[name]

    def _check_unreferenced(self, chain: str) -> None:
        for set_name, elements in self.sets.items():
            for value in elements.values():
                if value is not None and value.split()[-1] == chain:
                    raise ValueError(f"chain {chain} is still referenced by {set_name}")


def _in(addr: str, cidr: str) -> bool:
    return ipaddress.ip_address(addr) in ipaddress.ip_network(cidr, strict=False)


Path = tuple[str | None, Packet]  # (verdict or None when the chain fell through / returned, packet)


class Tracer:
    """Traces packets through one ruleset on a node with the given local addresses."""

    def __init__(self, *texts: str, node_ips: Iterable[str]) -> None:
        self.ruleset = Ruleset()
        for text in texts:
            self.ruleset.load(text)
        self.node_ips = frozenset(str(ipaddress.ip_address(ip)) for ip in node_ips)

    def is_local(self, ip: str) -> bool:
        """Whether ``ip`` is this node's (one of ``node_ips``, or loopback)."""
        return ip in self.node_ips or ipaddress.ip_address(ip).is_loopback

    def _key(self, pkt: Packet, by_address: str | None) -> str:
        head = f"{pkt.dst} . " if by_address else ""
        return f"{head}{pkt.protocol} . {pkt.dport}"

    def _elements(self, name: str) -> dict[str, str | None]:
        elements = self.ruleset.sets.get(name)
        if elements is None:
            raise ValueError(f"rule refers to missing set {name}")
        return elements

    # -- walking ----------------------------------------------------------

    def _run(self, chain: str, pkt: Packet, depth: int = 0) -> list[Path]:
        if depth > 16:
            raise ValueError(f"jump loop at {chain}")
        rules = self.ruleset.chains.get(chain)
        if rules is None:
            raise ValueError(f"jump to missing chain {chain}")
        return self._from(rules, 0, replace(pkt, steps=(*pkt.steps, chain)), depth)

    def _from(self, rules: list[tuple[Statement, ...]], start: int, pkt: Packet, depth: int) -> list[Path]:
        out: list[Path] = []
        if start >= len(rules):
            return [(None, pkt)]
        for verdict, p in self._statements(rules[start], 0, pkt, depth):
            if verdict == "continue":
                out.extend(self._from(rules, start + 1, p, depth))
            elif verdict == "goto-done":
                out.append((None, p))
            else:
                out.append((verdict, p))
        return out

    def _statements(self, stmts: tuple[Statement, ...], i: int, pkt: Packet, depth: int) -> list[Path]:
        """Paths of one rule from statement ``i``: ("continue", p) means the next rule runs."""
        while i < len(stmts):
            s = stmts[i]
            k, a = s.kind, s.args
            if k in ("ct_new", "update"):
                pass
            elif k == "ct_dnat":
                if pkt.dnat is None:
                    return [("continue", pkt)]
            elif k == "pair_in":
                if f"{pkt.src} . {pkt.dst}" not in self._elements(a[0] or ""):
                    return [("continue", pkt)]
            elif k == "key_in":
                if self._key(pkt, a[0]) not in self._elements(a[1] or ""):
                    return [("continue", pkt)]
            elif k == "key_saddr_not_in":
                key = self._key(pkt, a[0])
                allowed = any(e.rpartition(" . ")[0] == key and _in(pkt.src, e.rpartition(" . ")[2])
                              for e in self._elements(a[1] or ""))
                if allowed:
                    return [("continue", pkt)]
            elif k == "daddr_local":
                if not self.is_local(pkt.dst):
                    return [("continue", pkt)]
            elif k == "daddr_not_local":
                if self.is_local(pkt.dst):
                    return [("continue", pkt)]
            elif k == "saddr_local":
                if not self.is_local(pkt.src):
                    return [("continue", pkt)]
            elif k == "daddr_not_cidr":
                if _in(pkt.dst, a[0] or ""):
                    return [("continue", pkt)]
            elif k == "daddr_in":
                if pkt.dst not in self._elements(a[0] or ""):
                    return [("continue", pkt)]
            elif k == "saddr_not_cidr":
                if _in(pkt.src, a[0] or ""):
                    return [("continue", pkt)]
            elif k == "saddr_cidr":
                if not _in(pkt.src, a[0] or ""):
                    return [("continue", pkt)]
            elif k == "saddr_in":
                # Only dynamic affinity sets are matched by source: empty for a first packet.
                self._elements(a[0] or "")
                return [("continue", pkt)]
            elif k == "mark_or":
                pkt = replace(pkt, mark=pkt.mark | int(a[0] or "0", 16))
            elif k == "mark_xor":
                pkt = replace(pkt, mark=pkt.mark ^ int(a[0] or "0", 16))
            elif k == "mark_clear":
                if pkt.mark & int(a[0] or "0", 16):
                    return [("continue", pkt)]
            elif k == "proto":
                if pkt.protocol != a[0]:
                    return [("continue", pkt)]
            elif k == "vmap":
                value = self._elements(a[1] or "").get(self._key(pkt, a[0]))
                if value is None:
                    return [("continue", pkt)]
                return self._verdict(value, pkt, depth)
            elif k == "dnat_map":
                n, backends = int(a[1] or "0"), self._elements(a[2] or "")
                out: list[Path] = []
                for j in range(n):
                    dest = backends.get(f"{self._key(pkt, a[0])} . {j}")
                    if dest is None:
                        raise ValueError(f"{a[2]} has no element {self._key(pkt, a[0])} . {j} (mod {n})")
                    ip, _, port = dest.partition(" . ")
                    out.append(("dnat", _dnat(replace(pkt, odds=pkt.odds / n), ip, int(port))))
                return out
            elif k == "dnat":
                to_ip, to_port = split_host_port(a[0] or "")
                return [("dnat", _dnat(pkt, to_ip, to_port))]
            elif k == "numgen_vmap":
                out = []
                entries = dict(e.split(" : ") for e in _split_elements(a[1] or ""))
                if sorted(entries) != [str(j) for j in range(int(a[0] or "0"))]:
                    raise ValueError(f"numgen vmap does not cover 0..{a[0]}: {entries}")
                for value in entries.values():
                    out.extend(self._verdict(value, replace(pkt, odds=pkt.odds / len(entries)), depth))
                return out
            elif k == "masquerade":
                return [("masquerade", pkt)]
            elif k in ("jump", "verdict"):
                return self._verdict(" ".join(x for x in a if x), pkt, depth)
            else:  # pragma: no cover - _STATEMENTS and this list go together
                raise ValueError(f"unhandled statement {k}")
            i += 1
        return [("continue", pkt)]

    def _verdict(self, value: str, pkt: Packet, depth: int) -> list[Path]:
        word, _, chain = value.partition(" ")
        if word in ("drop", "reject", "accept"):
            return [(word, pkt)]
        if word == "return":
            return [("goto-done", pkt)]
        if word not in ("jump", "goto"):
            raise ValueError(f"unsupported verdict {value!r}")
        out: list[Path] = []
        for verdict, p in self._run(chain, pkt, depth + 1):
            if verdict is None:
                out.append(("continue" if word == "jump" else "goto-done", p))
            else:
                out.append((verdict, p))
        return out

    def _hook(self, hook: str, paths: list[Packet]) -> list[Path]:
        chains = sorted((prio, name) for name, (_t, h, prio) in self.ruleset.base.items() if h == hook)
        current: list[Path] = [(None, p) for p in paths]
        for _prio, name in chains:
            nxt: list[Path] = []
            for verdict, p in current:
                if verdict in ("drop", "reject"):
                    nxt.append((verdict, p))
                    continue
                for v, q in self._run(name, p):
                    # accept / dnat / masquerade end this base chain only.
                    nxt.append((v if v in ("drop", "reject") else (
                        "masquerade" if v == "masquerade" or verdict == "masquerade" else None), q))
            current = nxt
        return current

    def trace(self, *, src: str, dst: str, port: int, protocol: str = "tcp",
              local_origin: bool = False) -> list[Outcome]:
        """Every way the first packet ``src`` -> ``dst:port`` can end."""
        seen: dict[Outcome, None] = {}
        for o, _, _ in self.trace_paths(src=src, dst=dst, port=port, protocol=protocol,
                                        local_origin=local_origin):
            seen.setdefault(o, None)
        return list(seen)

    def trace_paths(self, *, src: str, dst: str, port: int, protocol: str = "tcp",
                    local_origin: bool = False) -> list[tuple[Outcome, tuple[str, ...], float]]:
        """``trace`` with, for each path, the chains it entered and its probability (paths add up to 1)."""
        pkt = Packet(src=src, dst=dst, dport=port, protocol=protocol.lower())
        outcomes: list[tuple[Outcome, tuple[str, ...], float]] = []
        first = self._hook("output" if local_origin else "prerouting", [pkt])
        for verdict, p in first:
            if verdict in ("drop", "reject"):
                dropped = Outcome(verdict.upper(), host_port(p.dst, p.dport), False, False)
                outcomes.append((dropped, p.steps, p.odds))
                continue
            local = self.is_local(p.dst)
            if not local_origin:
                second = self._hook("input" if local else "forward", [p])
            else:
                second = [(None, p)]
            for v2, q in second:
                if v2 in ("drop", "reject"):
                    dropped = Outcome(v2.upper(), host_port(q.dst, q.dport), False, local)
                    outcomes.append((dropped, q.steps, q.odds))
                    continue
                masq = False
                steps = q.steps
                if not local or local_origin:
                    for v3, r in self._hook("postrouting", [q]):
                        if v3 == "masquerade":
                            masq, steps = True, r.steps
                delivered = Outcome("ACCEPT", host_port(q.dst, q.dport), masq, local and not local_origin)
                outcomes.append((delivered, steps, q.odds))
        return outcomes


def _dnat(pkt: Packet, ip: str, port: int) -> Packet:
    return replace(pkt, dst=str(ipaddress.ip_address(ip)), dport=port, dnat=host_port(ip, port))

