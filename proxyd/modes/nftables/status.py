"""nftables mode's answers to ``proxyd status`` and ``proxyd trace``, read back from the kernel.

Everything is read in a worker thread, through the mode's ``libnft.Nft``
(libnftables in process, JSON output) or ``nlread``, and compared with the planner's
mirror of what the last sync committed (``Planner.kernel``, the fixed
layout, ``Planner.dynamic_chains``) — never with what the planner would
write now.

* **counters**: every element of a backends map (``<pick>-backends-<proto>``:
  one service address or NodePort × one endpoint) carries a counter (the
  maps are declared with ``counter``). The map is looked up by the DNAT rule
  of a pick chain, in the nat hooks, which see the first packet of each
  connection only: ``packets`` are new connections (and UDP flows) DNATed to
  the endpoint, ``bytes`` their first packets' bytes, as in iptables mode.
  An endpoint reached through several addresses of a port (cluster IP,
  external IPs, NodePort) sums its elements. Ports with ClientIP affinity
  DNAT in their own endpoint chains, not through the maps: no counters.
* **matches**: each map and set read is compared element by element with
  the mirror (missing, unexpected and different elements named, at most
  ``MAX_MISMATCHES``); chains must exist with their hooks and their rules
  must equal the planned ones. Rules come from a terse ``list ruleset``,
  which on nft 1.0.6 skips set elements (~1 ms at any size; ``list table``
  or ``list chain`` fetch every element first: seconds at 100,000). Elements
  are what costs, so what is read depends on the size:

  - a node of at most ``FULL_READ_ELEMENTS`` backend elements: the whole
    table (``list table``: rules, every element, every counter);
  - a larger node: the rules and the dispatch maps and sets
    (``DISPATCH_SETS``, listed by nft); per-endpoint counters are left to a
    request that names services (listing the backends maps would cost ~2
    CPU-s at 10,000 services × 10 endpoints);
  - a request naming service ports: the rules and those ports' elements of
    every map and set they use, dumped straight from nf_tables and decoded
    by key (``nlread``; their backends elements bring the counters).

* **trace**: the rules, then each set the walk looks into, read when it
  first does (``LazySets``: ``nlread`` for the fixed layout's sets, nft for
  the others), walked by the packet-flow tracer (``tracer.py``) for every
  path with its chains and odds.

The kernel's JSON is turned back into the text the planner writes
(``rule_text``, ``element_text``); anything outside that vocabulary raises
``Unsupported``, which makes a rule count as a mismatch and a trace fail
with the reason rather than guess.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxyd.introspect import ModeStatus, TracePacket, TraceResult, counter_key, trace_rules
from proxyd.model import ProxyState, ServicePortName
from proxyd.modes.iptables.tracer import host_port
from proxyd.modes.nftables import layout as lay
from proxyd.modes.nftables import nlread
from proxyd.modes.nftables.libnft import Nft, NftError
from proxyd.modes.nftables.planner import SHARED_SETS, Planner, render_port
from proxyd.modes.nftables.tracer import Tracer, parse_rule

FULL_READ_ELEMENTS = 5_000  # backend elements up to which a whole-node status lists the whole table
DISPATCH_SETS = (lay.SERVICE_IPS, lay.SERVICE_NODEPORTS, lay.NO_ENDPOINT_SERVICES, lay.NO_ENDPOINT_NODEPORTS,
                 lay.CLUSTER_IPS)
MAX_ELEMENTS = 5_000_000  # a listing with more elements than this is refused rather than held in memory
BACKENDS = frozenset(lay.backends_map(pick, proto) for pick in lay.PICKS for proto in lay.PROTOCOLS)
_PROTO_NUMBERS = {6: "tcp", 17: "udp", 132: "sctp"}


class Unsupported(ValueError):
    """A rule or element outside what proxyd writes."""


# -- the kernel's JSON, back into the planner's text -----------------------------------------------


def _atom(value: Any, types: tuple[str, ...] = ()) -> str:
    """An element or right-hand value: address, number, protocol, prefix, range, concatenation.

    ``types``: the set's key types; a number where the type is ``inet_proto`` is printed as its name
    (``Nft.run_json`` asks for numeric protocols).
    """
    if isinstance(value, bool):
        raise Unsupported(f"unexpected value {value!r}")
    if isinstance(value, int):
        if types[:1] == ("inet_proto",) and value in _PROTO_NUMBERS:
            return _PROTO_NUMBERS[value]
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "concat" in value:
            parts = value["concat"]
            return " . ".join(_atom(v, types[i:i + 1]) for i, v in enumerate(parts))
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "range" in value:
            low, high = value["range"]
            return f"{_atom(low)}-{_atom(high)}"
        if "elem" in value:
            return _atom(value["elem"]["val"], types)
    raise Unsupported(f"unsupported value {value!r}")


def _verdict(value: Any) -> str | None:
    """``goto x`` / ``jump x`` / ``drop`` ... of a verdict dict; None when it is not one."""
    if not isinstance(value, dict) or len(value) != 1:
        return None
    (word, arg), = value.items()
    if word in ("jump", "goto"):
        return f"{word} {arg['target']}"
    if word in ("drop", "accept", "return", "continue"):
        return str(word)
    return None


def element_text(key: Any, value: Any = None, types: tuple[str, ...] = ()) -> tuple[
        str, str | None, tuple[int, int] | None]:
    """One element of a JSON listing -> (key text, value text or None, (packets, bytes) or None)."""
    counter = None
    if isinstance(key, dict) and isinstance(key.get("elem"), dict):
        found = key["elem"].get("counter")
        if isinstance(found, dict):
            counter = (int(found.get("packets", 0)), int(found.get("bytes", 0)))
    text = _atom(key, types)
    if value is None:
        return text, None, counter
    verdict = _verdict(value)
    return text, verdict if verdict is not None else _atom(value), counter


def _expr(e: Any, *, hex_numbers: bool = False) -> str:
    """A left-hand expression (or an operand of one) as the planner writes it."""
    if isinstance(e, bool):
        raise Unsupported(f"unexpected operand {e!r}")
    if isinstance(e, int):
        return f"{e:#x}" if hex_numbers else str(e)
    if isinstance(e, str):
        return e
    if not isinstance(e, dict) or len(e) != 1:
        raise Unsupported(f"unsupported expression {e!r}")
    (kind, arg), = e.items()
    if kind == "payload":
        proto, fld = arg["protocol"], arg["field"]
        if proto in ("tcp", "udp", "sctp") and fld == "dport":
            # nft 1.0.6 prints a map key's "th dport" as the map type's "tcp dport": the same bytes
            # (transport header offset 2, no protocol dependency in the rule).
            proto = "th"
        return f"{proto} {fld}"
    if kind == "meta":
        return f"meta {arg['key']}"
    if kind == "ct":
        return f"ct {arg['key']}"
    if kind == "concat":
        return " . ".join(_expr(x) for x in arg)
    if kind == "numgen":
        if arg.get("offset", 0):
            raise Unsupported(f"numgen with an offset: {arg!r}")
        return f"numgen {arg['mode']} mod {arg['mod']}"
    if kind == "fib":
        flags = arg.get("flags", [])
        flags = [flags] if isinstance(flags, str) else list(flags)
        return f"fib {' '.join(flags)} {arg['result']}"
    if kind in ("&", "|", "^"):
        left, right = arg
        return f"{_expr(left)} {kind} {_expr(right, hex_numbers=True)}"
    if kind in ("prefix", "range", "set"):
        return _atom(e) if kind != "set" else _anonymous(arg)
    raise Unsupported(f"unsupported expression {kind}: {arg!r}")


def _anonymous(items: Any) -> str:
    """An anonymous set or verdict map ``{ 0 : goto a, 1 : goto b }``."""
    parts = []
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, list) and len(item) == 2:
            verdict = _verdict(item[1])
            parts.append(f"{_atom(item[0])} : {verdict if verdict is not None else _atom(item[1])}")
        else:
            parts.append(_atom(item))
    return "{ " + ", ".join(parts) + " }"


def _right(value: Any, *, hex_numbers: bool) -> str:
    if isinstance(value, str):
        return value  # "@set", "new", "local", an address
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:#x}" if hex_numbers and value else str(value)
    if isinstance(value, dict) and "set" in value:
        return _anonymous(value["set"])
    return _atom(value)


def _match(arg: Mapping[str, Any]) -> str:
    op, left, right = arg["op"], arg["left"], arg["right"]
    lhs = _expr(left)
    mark = lhs == "meta mark"
    if lhs == "meta l4proto" and isinstance(right, int) and right in _PROTO_NUMBERS:
        right = _PROTO_NUMBERS[right]
    rhs = _right(right, hex_numbers=mark)
    if op in ("==", "in"):
        return f"{lhs} {rhs}"
    if op == "!=":
        return f"{lhs} != {rhs}"
    raise Unsupported(f"unsupported match operator {op!r}")


def _statement(s: Any, maps: Mapping[str, str]) -> str | None:
    """One statement of a rule; None for a counter (it changes no path)."""
    if not isinstance(s, dict) or len(s) != 1:
        raise Unsupported(f"unsupported statement {s!r}")
    (kind, arg), = s.items()
    if kind == "match":
        # "meta mark & 0x4000 == 0": the planner writes the comparison with a mask explicitly.
        if isinstance(arg["left"], dict) and "&" in arg["left"] and arg["op"] == "==":
            return f"{_expr(arg['left'])} == {_right(arg['right'], hex_numbers=False)}"
        return _match(arg)
    verdict = _verdict(s)
    if verdict is not None:
        return verdict
    if kind == "counter":
        return None
    if kind == "vmap":
        data = arg["data"]
        target = data if isinstance(data, str) else _right(data, hex_numbers=False)
        return f"{_expr(arg['key'])} vmap {target}"
    if kind == "mangle":
        return f"{_expr(arg['key'])} set {_expr(arg['value'])}"
    if kind == "reject":
        if arg and arg.get("expr") not in (None, "port-unreachable"):
            raise Unsupported(f"reject with {arg!r}")
        return "reject"
    if kind == "masquerade":
        flags = (arg or {}).get("flags", [])
        flags = [flags] if isinstance(flags, str) else list(flags)
        return " ".join(["masquerade", *flags])
    if kind == "set":
        elem = arg["elem"]
        return f"{arg['op']} {arg['set']} {{ {_expr(elem)} }}"
    if kind == "dnat":
        addr = arg.get("addr")
        if isinstance(addr, dict) and "map" in addr:
            data = addr["map"]["data"]
            fam = arg.get("family", "")
            # nft 1.0.6 lists "dnat ip to KEY map @m" without "addr . port" (facts.md); a map whose
            # values are address . port is what the planner wrote with "addr . port".
            value_type = maps.get(str(data).lstrip("@"), "")
            words = ["dnat", *([fam] if fam else []), *(["addr . port"] if " . " in value_type else []),
                     "to", _expr(addr["map"]["key"]), "map", str(data)]
            return " ".join(words)
        if isinstance(addr, str) and "port" in arg:
            host = f"[{addr}]" if ":" in addr else addr
            return f"dnat to {host}:{arg['port']}"
        raise Unsupported(f"unsupported dnat {arg!r}")
    raise Unsupported(f"unsupported statement {kind}: {arg!r}")


def rule_text(exprs: Iterable[Any], maps: Mapping[str, str] | None = None) -> str:
    """A rule's JSON ``expr`` list as the planner writes the rule (counters left out)."""
    parts = [_statement(s, maps or {}) for s in exprs]
    return " ".join(p for p in parts if p is not None)


# -- one read of the kernel ---------------------------------------------------------------------------


@dataclass(slots=True)
class Snapshot:
    """What one read found in our table. ``rules`` is None for chains whose rules were not read."""

    table: bool = False
    chains: set[str] = field(default_factory=set)
    base: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    rules: dict[str, list[str]] | None = None
    bad_rules: dict[str, str] = field(default_factory=dict)  # chain -> why one of its rules is not understood
    sets: dict[str, dict[str, str | None]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)       # set name -> its value type ("" for a set)
    counters: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    elements: int = 0
    asked: set[str] = field(default_factory=set)              # maps and sets listed one by one
    declared: set[str] = field(default_factory=set)           # maps and sets the listings named

    def add(self, items: Iterable[Mapping[str, Any]], fam: lay.Family, *, elements: bool = True) -> None:
        """Fold one JSON listing (``Nft.run_json``) of objects of our table in.

        ``elements`` False: a terse listing, whose sets carry no elements (their contents are not known).
        """
        rules: list[Mapping[str, Any]] = []
        for item in items:
            for kind in ("table", "chain", "set", "map", "rule"):
                obj = item.get(kind)
                if not isinstance(obj, dict) or obj.get("table", obj.get("name")) != lay.TABLE:
                    continue
                if obj.get("family") != fam.table_family:
                    continue
                if kind == "table":
                    self.table = True
                elif kind == "chain":
                    self._chain(obj)
                elif kind == "rule":
                    rules.append(obj)
                else:
                    self._set(obj, kind, elements)
        if rules:
            if self.rules is None:
                self.rules = {}
            for obj in rules:
                chain = str(obj.get("chain"))
                try:
                    text = rule_text(obj.get("expr") or [], self.kinds)
                except (Unsupported, KeyError, TypeError, ValueError) as err:
                    self.bad_rules.setdefault(chain, str(err)[:200])
                    continue
                self.rules.setdefault(chain, []).append(text)

    def _chain(self, obj: Mapping[str, Any]) -> None:
        name = str(obj.get("name"))
        self.table = True
        self.chains.add(name)
        if self.rules is not None:
            self.rules.setdefault(name, [])
        if "hook" in obj:
            self.base[name] = (str(obj.get("type")), str(obj.get("hook")), int(obj.get("prio", 0)))

    def _set(self, obj: Mapping[str, Any], kind: str, elements: bool = True) -> None:
        name = str(obj.get("name"))
        self.table = True
        data = obj.get("map") if kind == "map" else ""
        self.kinds[name] = data if isinstance(data, str) else "?"
        self.declared.add(name)
        if not elements:
            return
        elems = obj.get("elem") or []
        if not isinstance(elems, list):
            raise ValueError(f"{name}: elements are not a list")
        self.elements += len(elems)
        if self.elements > MAX_ELEMENTS:
            raise ValueError(f"more than {MAX_ELEMENTS} elements listed: refusing to go on")
        raw_types = obj.get("type")
        types = tuple(str(t) for t in raw_types) if isinstance(raw_types, list) else (str(raw_types),)
        out: dict[str, str | None] = {}
        counted: dict[str, tuple[int, int]] = {}
        for e in elems:
            if kind == "map":
                if not isinstance(e, list) or len(e) != 2:
                    raise ValueError(f"{name}: malformed map element {e!r:.100}")
                key, value, counter = element_text(e[0], e[1], types)
            else:
                key, value, counter = element_text(e, None, types)
            out[key] = value
            if counter is not None:
                counted[key] = counter
        self.sets[name] = out
        if counted:
            self.counters[name] = counted


def _list(nft: Nft, command: str) -> list[dict[str, Any]]:
    try:
        return nft.run_json(command)
    except NftError as err:
        if "No such file or directory" in str(err):
            return []  # the object is gone: the comparison names it
        raise


def read_table(nft: Nft, fam: lay.Family) -> Snapshot:
    """``list table``: chains, rules, every element and counter (blocking; run in a thread)."""
    snap = Snapshot(rules={})
    snap.add(_list(nft, f"list table {fam.table}"), fam)
    return snap


def read_rules(nft: Nft, fam: lay.Family) -> Snapshot:
    """Chains, rules and set declarations without elements: a terse ``list ruleset`` (~1 ms at any size)."""
    snap = Snapshot(rules={})
    snap.add(nft.run_json(f"list ruleset {fam.table_family}", terse=True), fam, elements=False)
    return snap


def _kind(fam: lay.Family, name: str) -> str:
    return next(("map" if ":" in body else "set" for n, body in lay.maps(fam) if n == name), "set")


def read_set(nft: Nft, fam: lay.Family, snap: Snapshot, name: str, *, raw: bool) -> None:
    """One map or set into ``snap``: straight from nf_tables (``nlread``, decoded on demand) when
    ``raw`` and it is a set ``nlread`` decodes, else listed by nft."""
    snap.asked.add(name)
    if raw and name in nlread.KEYS:
        found = nlread.read(fam, name)
        if found is not None:
            snap.sets[name] = found
        return
    snap.add(_list(nft, f"list {_kind(fam, name)} {fam.table} {name}"), fam)


def read_sets(nft: Nft, fam: lay.Family, names: Iterable[str], *, raw: bool = False) -> Snapshot:
    """The rules (``read_rules``) and the named maps and sets (blocking; run in a thread)."""
    snap = read_rules(nft, fam)
    for name in names:
        read_set(nft, fam, snap, name, raw=raw)
    return snap


# -- comparing with the last sync ----------------------------------------------------------------------


def _canonical(text: str | None) -> str | None:
    """An element key or value with addresses and prefixes normalised (``1.2.3.4/32`` -> ``1.2.3.4``)."""
    if text is None:
        return None
    parts = []
    for part in text.split(" . "):
        try:
            if "/" in part:
                net = ipaddress.ip_network(part, strict=False)
                part = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
            elif ":" in part or part.count(".") == 3:
                part = str(ipaddress.ip_address(part))
        except ValueError:
            pass
        parts.append(part)
    return " . ".join(parts)


def compare_elements(status: ModeStatus, set_name: str, want: Mapping[str, str | None],
                     have: Mapping[str, str | None] | None, *, keys: Iterable[str] | None = None) -> None:
    """Name the elements of ``set_name`` that differ (``keys``: only these; default every one)."""
    if have is None:
        if want or keys is None:
            status.mismatch(f"{set_name}: missing from the kernel")
        return
    extra = {}
    if keys is None:
        keys = want.keys()
        extra = {k: v for k, v in have.items() if k not in want}
    missing: dict[str, str | None] = {}
    for key in keys:
        if key not in want:
            continue
        value = want[key]
        if key in have:
            if have[key] != value and _canonical(have[key]) != _canonical(value):
                status.mismatch(f"{set_name}: element {key} is {have[key]} in the kernel, "
                                f"the last sync wrote {value}")
        else:
            missing[key] = value
    if missing and extra:
        # The same element spelt differently (a /32 prefix, an IPv6 address) is no difference.
        canon_extra = {_canonical(k): k for k in extra}
        for key in list(missing):
            found = canon_extra.get(_canonical(key))
            if found is not None and _canonical(extra[found]) == _canonical(missing[key]):
                del missing[key]
                del extra[found]
    for key, value in sorted(missing.items()):
        shown = key if value is None else f"{key} : {value}"
        status.mismatch(f"{set_name}: element {shown} missing from the kernel (the last sync wrote it)")
    for key, value in sorted(extra.items()):
        shown = key if value is None else f"{key} : {value}"
        status.mismatch(f"{set_name}: element {shown} in the kernel but not in the last sync")


def _normal_rule(rule: str) -> str:
    return " ".join(rule.split())


def compare_chains(status: ModeStatus, snap: Snapshot, fixed: Mapping[str, list[str]],
                   dynamic: Mapping[str, tuple[str, ...]]) -> None:
    """Every planned chain exists, base chains hook where planned, and read rules equal the planned ones."""
    base = {name: (typ, hook, prio) for name, typ, hook, prio in lay.BASE_CHAINS}
    for chain, planned in (*fixed.items(), *dynamic.items()):
        if chain not in snap.chains:
            status.mismatch(f"chain {chain} missing from the kernel")
            continue
        if chain in base and snap.base.get(chain) != base[chain]:
            status.mismatch(f"chain {chain}: hook {snap.base.get(chain)} in the kernel, the last sync "
                            f"wrote {base[chain]}")
        if chain in snap.bad_rules:
            status.mismatch(f"chain {chain}: a rule proxyd does not write: {snap.bad_rules[chain]}")
            continue
        if snap.rules is None:
            continue
        have = [_normal_rule(r) for r in snap.rules.get(chain, [])]
        want = [_normal_rule(r) for r in planned]
        if have != want:
            pairs = [(h, w) for h, w in zip(have, want, strict=False) if h != w]
            odd = pairs[0][0] if pairs else (have[len(want)] if len(have) > len(want) else None)
            first = f" (first differing: {odd!r})" if odd is not None else ""
            status.mismatch(f"chain {chain}: {len(have)} rules in the kernel differ from the {len(want)} "
                            f"the last sync wrote{first}")


# -- status -----------------------------------------------------------------------------------------------


def _endpoint(value: str | None) -> str | None:
    """``10.0.0.1 . 8080`` (a backends map value) -> ``10.0.0.1:8080`` (as ``Endpoint.__str__``)."""
    if value is None:
        return None
    ip, _, port = value.partition(" . ")
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def port_counters(snap: Snapshot,
                  elements: Iterable[tuple[str, str, str | None]]) -> dict[str, dict[str, int]]:
    """Per endpoint, the counters of a port's backends elements (summed over its addresses)."""
    out: dict[str, dict[str, int]] = {}
    for set_name, key, _ in elements:
        if set_name not in BACKENDS:
            continue
        held = snap.sets.get(set_name, {})
        ep = _endpoint(held.get(key))  # decodes a raw set's element (and its counter) first
        counts = held.counters if isinstance(held, nlread.RawSet) else snap.counters.get(set_name, {})
        counted = counts.get(key)
        if counted is None or ep is None:
            continue
        per = out.setdefault(ep, {"packets": 0, "bytes": 0})
        per["packets"] += counted[0]
        per["bytes"] += counted[1]
    return out


def build_status(snap: Snapshot, planner: Planner, state: ProxyState,
                 names: Collection[ServicePortName] | None, *, whole_table: bool,
                 mirror: Mapping[str, Mapping[str, str | None]] | None = None) -> ModeStatus:
    """Counters per endpoint and the kernel-versus-last-sync comparison (pure; tests feed it snapshots).

    ``names``: the request's service ports (None: the whole node). ``whole_table``: ``snap`` holds the
    whole table (a whole-node comparison of every set and rule). ``mirror``: ``planner.kernel`` when
    already rendered (in a worker thread: ``Planner.kernel_renderer``).
    """
    status = ModeStatus(matches=True)
    fam = planner.options.fam
    if not snap.table:
        status.mismatch(f"table {fam.table} missing from the kernel")
        return status
    if mirror is None:
        mirror = planner.kernel if names is None else planner.kernel_for(names)
    fixed = lay.chains(planner.options.layout)
    wanted_sets = {name: mirror.get(name, {}) for name, _ in lay.maps(fam)}
    wanted_sets[lay.CANARY] = {fam.canary_element: None}
    if names is None:
        compare_chains(status, snap, fixed, planner.dynamic_chains)
        for set_name, want in wanted_sets.items():
            if whole_table or set_name in snap.asked:
                compare_elements(status, set_name, want, snap.sets.get(set_name))
    else:
        compare_chains(status, snap, {}, {})
        by_set: dict[str, set[str]] = {}
        for name in names:
            plan = _render(planner, state, name)
            if plan is None:
                continue
            for set_name, key, _ in plan.elements:
                by_set.setdefault(set_name, set()).add(key)
            for chain, _ in plan.chains:
                if chain not in snap.chains:
                    status.mismatch(f"{name}: chain {chain} missing from the kernel")
            for chain in plan.picks:
                if chain not in snap.chains:
                    status.mismatch(f"{name}: chain {chain} missing from the kernel")
        for set_name, keys in sorted(by_set.items()):
            want = mirror.get(set_name, {})
            if set_name in SHARED_SETS:
                keys = {k for k in keys if k in want}
            compare_elements(status, set_name, want, snap.sets.get(set_name), keys=sorted(keys))
    if snap.counters or any(isinstance(snap.sets.get(b), nlread.RawSet) for b in BACKENDS):
        for name in sorted(state.service_ports if names is None else names):
            plan = _render(planner, state, name)
            if plan is None:
                continue
            per = port_counters(snap, plan.elements)
            if per:
                status.counters[counter_key(name)] = per
    return status


def _render(planner: Planner, state: ProxyState, name: ServicePortName) -> Any:
    svc = state.service_ports.get(name)
    if svc is None:
        return None
    try:
        ipaddress.ip_address(svc.cluster_ip)
    except ValueError:
        return None
    if ipaddress.ip_address(svc.cluster_ip).version != planner.options.family:
        return None
    return render_port(svc, state.endpoints.get(name, ()), options=planner.options, node_name=state.node_name,
                       node_zone=state.node_zone)


def keys_for(planner: Planner, state: ProxyState, names: Iterable[ServicePortName]) -> dict[str, set[str]]:
    """The maps and sets the given ports have elements in, and those elements' keys."""
    found: dict[str, set[str]] = {}
    for name in names:
        plan = _render(planner, state, name)
        if plan is not None:
            for set_name, key, _ in plan.elements:
                found.setdefault(set_name, set()).add(key)
    return found


def read_keys(nft: Nft, fam: lay.Family, keys: Mapping[str, Iterable[str]]) -> Snapshot:
    """The rules and the given elements of each map and set, with their counters (blocking).

    Sets ``nlread`` decodes come straight from nf_tables and only the messages holding these keys are
    decoded, here in the worker thread, so the comparison afterwards costs nothing.
    """
    snap = read_rules(nft, fam)
    for name, wanted in keys.items():
        read_set(nft, fam, snap, name, raw=True)
        held = snap.sets.get(name)
        if isinstance(held, nlread.RawSet):
            for key in wanted:
                held.get(key)
    return snap


async def read_status(nft: Nft, planner: Planner, state: ProxyState,
                      names: Collection[ServicePortName] | None, *,
                      run: Callable[..., Any]) -> ModeStatus:
    """Read back (in a worker thread through ``run``, i.e. ``asyncio.to_thread``) and compare."""
    fam = planner.options.fam
    started = time.perf_counter()
    backends = sum(planner.count(k) for k in BACKENDS)
    wanted = None if names is None else [n for n in names if n in state.service_ports]
    if wanted is None and backends <= FULL_READ_ELEMENTS:
        snap = await run(read_table, nft, fam)
        how = f"nft list table {fam.table}"
        whole = True
    elif wanted is None:
        snap = await run(read_sets, nft, fam, DISPATCH_SETS)
        how = f"nft list ruleset (terse) and the dispatch maps ({', '.join(DISPATCH_SETS)})"
        whole = False
    else:
        snap = await run(read_keys, nft, fam, keys_for(planner, state, wanted))
        how = ("nft list ruleset (terse) and the selected service ports' elements dumped from nf_tables "
               "(nlread)")
        whole = False
    mirror = await run(planner.kernel_renderer()) if wanted is None else None
    status = build_status(snap, planner, state, wanted, whole_table=whole, mirror=mirror)
    status.notes.append(f"read with {how}; counters are per backends-map element (service address or "
                        "NodePort x endpoint) and count new connections (the nat hooks see a connection's "
                        "first packet)")
    if wanted is None and not whole:
        status.notes.append(f"{backends} backend elements: checked the rules and the dispatch maps only "
                            "(the backends maps cost seconds to list at this size on nft 1.0.6); name a "
                            "namespace or service for per-endpoint counters")
    status.read_seconds = time.perf_counter() - started
    return status


# -- trace --------------------------------------------------------------------------------------------------


class LazySets(dict[str, dict[str, str | None]]):
    """The tracer's sets, each read from the kernel when the walk first looks into it (``read_set``)."""

    def __init__(self, nft: Nft, fam: lay.Family, snap: Snapshot) -> None:
        super().__init__()
        self.nft, self.fam, self.snap = nft, fam, snap
        self.read: list[str] = []

    def get(self, name: str, default: Any = None) -> Any:
        if not dict.__contains__(self, name) and name in self.snap.declared and name not in self.snap.asked:
            read_set(self.nft, self.fam, self.snap, name, raw=True)
            self.read.append(name)
            if name in self.snap.sets:
                dict.__setitem__(self, name, self.snap.sets[name])
        return dict.get(self, name, default)


def tracer_for(snap: Snapshot, node_ips: Iterable[str],
               sets: dict[str, dict[str, str | None]] | None = None) -> Tracer:
    """The packet-flow tracer loaded with what was read back (rules must have been read); ``sets``
    replaces the snapshot's sets (``LazySets``)."""
    if snap.rules is None:
        raise ValueError("no rules were read")
    if snap.bad_rules:
        chain, why = sorted(snap.bad_rules.items())[0]
        raise ValueError(f"chain {chain} holds a rule the tracer does not model: {why}")
    tracer = Tracer(node_ips=node_ips)
    ruleset = tracer.ruleset
    for chain in snap.chains:
        ruleset.chains[chain] = [parse_rule(r) for r in snap.rules.get(chain, [])]
    ruleset.base.update(snap.base)
    if sets is not None:
        ruleset.sets = sets
    else:
        for name, elements in snap.sets.items():
            ruleset.sets[name] = dict(elements)
    return tracer


def _reason(verdict: str, steps: tuple[str, ...]) -> str:
    """Why a path ends in DROP or REJECT, from the chain that decided (the last one entered)."""
    last = steps[-1] if steps else ""
    before = steps[-2] if len(steps) > 1 else ""
    checks = (lay.SERVICE_ENDPOINTS_CHECK, lay.NODEPORT_ENDPOINTS_CHECK)
    if last == lay.FIREWALL_CHECK:
        return "source outside the service's loadBalancerSourceRanges (firewall-check)"
    if last == lay.CLUSTER_IPS_CHECK:
        return "a cluster IP, but not a port of its service (cluster-ips-check)"
    if last == lay.REJECT_CHAIN and before in checks:
        return f"the service has no endpoints ({before} -> reject-chain)"
    if last in checks and verdict == "DROP":
        return f"no endpoint on this node for internalTrafficPolicy Local ({last}: drop)"
    if verdict == "DROP" and last:
        return f"no endpoint on this node for externalTrafficPolicy Local ({last}: pick map drops)"
    return f"{verdict.lower()} by {last or 'a base chain'}"


def trace_snapshot(snap: Snapshot, packet: TracePacket, *, node_ips: Iterable[str], source: str,
                   sets: dict[str, dict[str, str | None]] | None = None) -> TraceResult:
    """Trace ``packet`` through what was read back (pure unless ``sets`` reads lazily; tests feed it
    snapshots)."""
    return trace_rules(lambda: tracer_for(snap, node_ips, sets), packet, source=source,
                       rules="the ruleset read back", local_hook="the output hook",
                       original=host_port(packet.dst, packet.port),  # outcomes name IPv6 as [ip]:port
                       refusal=_reason)


def trace_now(nft: Nft, fam: lay.Family, packet: TracePacket, node_ips: Iterable[str]) -> TraceResult:
    """Read the rules, then trace, reading each set the walk looks into (blocking; run in a thread)."""
    try:
        snap = read_rules(nft, fam)
    except (NftError, ValueError) as err:
        return TraceResult(supported=False, notes=[f"reading {fam.table} failed: {err}"])
    if not snap.table:
        return TraceResult(supported=False, notes=[f"table {fam.table} is not in the kernel"])
    sets = LazySets(nft, fam, snap)
    try:
        result = trace_snapshot(snap, packet, node_ips=node_ips, source="", sets=sets)
    except (NftError, OSError) as err:
        return TraceResult(supported=False, notes=[f"reading {fam.table} failed: {err}"])
    result.source = (f"nft list ruleset (terse: {len(snap.chains)} chains of {fam.table}) and the sets on "
                     f"the way dumped from nf_tables ({', '.join(sets.read) or 'none'}), read back now")
    return result
