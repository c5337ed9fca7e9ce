"""nftables mode's ``status``/``trace`` over the kernel's JSON listing, without root.

``data/nft-list-table.json`` is a real ``list table ip proxyd`` of nft 1.0.6
(libnftables, as ``Nft.run_json`` asks: numeric protocols) after loading the
full plan of the tracer tests' services (affinity, source ranges, Local
policies, NodePorts, a service without endpoints). Read back, it must equal
what the planner committed, and tracing it must give every flow the
planner-text tracer gives. Then the listing is damaged in the ways drift and
hostile input take.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from proxyd.config import Config
from proxyd.introspect import MAX_MISMATCHES, ModeStatus, TracePacket
from proxyd.model import Protocol as L4
from proxyd.model import ServicePortName
from proxyd.modes.iptables.tracer import flow
from proxyd.modes.nftables import layout as lay
from proxyd.modes.nftables import status as nst
from proxyd.modes.nftables.mode import NftablesMode
from proxyd.modes.nftables.planner import Planner
from tests.unit.test_nftables_tracer import FLOWS, NODE_IPS, TRACER, _options, _state

DATA = Path(__file__).parent / "data" / "nft-list-table.json"
FAM = lay.Family(4)
EMPTY = ServicePortName("ns", "empty", "p80", L4.TCP)
NP = ServicePortName("ns", "np", "p80", L4.TCP)


def listing() -> list[dict[str, Any]]:
    return list(json.loads(DATA.read_text())["nftables"])


def snapshot(items: list[dict[str, Any]] | None = None) -> nst.Snapshot:
    snap = nst.Snapshot(rules={})
    snap.add(listing() if items is None else items, FAM)
    return snap


def committed() -> Planner:
    planner = Planner(_options())
    planner.commit(planner.plan(_state(), None))
    return planner


def find(items: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [obj] = [i[kind] for i in items if kind in i and i[kind].get("name") == name]
    return obj


def test_the_listing_reads_back_as_what_the_planner_committed() -> None:
    snap = snapshot()
    planner = committed()
    assert snap.table and not snap.bad_rules
    fixed = lay.chains(planner.options.layout)
    for chain, rules in (*fixed.items(), *planner.dynamic_chains.items()):
        assert snap.rules is not None and snap.rules[chain] == list(rules), chain
    for name, elements in planner.kernel.items():
        assert snap.sets[name] == elements, name
    status = nst.build_status(snap, planner, _state(), None, whole_table=True)
    assert status.matches is True and status.mismatches == []


@pytest.mark.parametrize("what,src,dst,proto,local,expected", FLOWS, ids=[f[0] for f in FLOWS])
def test_every_flow_traces_alike_through_the_listing(what: str, src: str, dst: str, proto: str, local: bool,
                                                     expected: str) -> None:
    tracer = nst.tracer_for(snapshot(), NODE_IPS)
    got = flow(tracer, src=src, dst=dst, protocol=proto, local_origin=local)  # type: ignore[arg-type]
    assert got == flow(TRACER, src=src, dst=dst, protocol=proto, local_origin=local) == expected  # type: ignore[arg-type]


def trace(snap: nst.Snapshot, src: str, dst: str, port: int) -> Any:
    return nst.trace_snapshot(snap, TracePacket(src, dst, port), node_ips=NODE_IPS, source="s")


def test_trace_lists_paths_with_odds_steps_and_reasons() -> None:
    snap = snapshot()
    result = trace(snap, "10.0.0.2", "172.30.0.52", 80)
    assert result.supported and result.source == "s"
    assert {p.endpoint for p in result.paths} == {"10.180.0.17:80", "10.180.0.18:80", "10.180.0.19:80"}
    assert abs(sum(p.odds for p in result.paths) - 1) < 1e-9
    for p in result.paths:
        assert abs(p.odds - 1 / 3) < 1e-9 and p.verdict == "ACCEPT" and not p.masquerade
        assert p.steps[:3] == ("nat-prerouting", "services", "svc-int"), p.steps
        assert "svc-pick-tcp-3" in p.steps
    outside = trace(snap, "203.0.113.5", "192.168.0.2", 3012)
    assert outside.paths and all(p.masquerade and "np-ext" in p.steps for p in outside.paths)
    rejected = trace(snap, "10.0.0.2", "172.30.0.44", 80)
    [path] = rejected.paths
    assert path.verdict == "REJECT" and "no endpoints" in path.reason and path.endpoint is None
    firewall = trace(snap, "203.0.113.200", "1.2.3.5", 80)
    assert [p.verdict for p in firewall.paths] == ["DROP"]
    assert "loadBalancerSourceRanges" in firewall.paths[0].reason
    nolocal = trace(snap, "203.0.113.5", "192.168.0.2", 3007)
    assert [p.verdict for p in nolocal.paths] == ["DROP"]
    assert "externalTrafficPolicy" in nolocal.paths[0].reason
    wrong_port = trace(snap, "10.0.0.2", "172.30.0.41", 81)
    assert [p.verdict for p in wrong_port.paths] == ["REJECT"]
    assert "cluster-ips-check" in wrong_port.paths[0].reason
    own = trace(snap, NODE_IPS[0], "172.30.0.41", 80)
    assert any("this node" in n for n in own.notes) and own.paths[0].masquerade
    affinity = trace(snap, "10.0.0.2", "172.30.0.53", 80)
    assert {p.endpoint for p in affinity.paths} == {"10.180.0.20:80", "10.180.0.21:80"}
    assert all(abs(p.odds - 0.5) < 1e-9 for p in affinity.paths)


def test_counters_per_endpoint_summed_over_a_ports_addresses() -> None:
    items = listing()
    for name, n in (("svc-backends-tcp", 3), ("np-backends-tcp", 5)):
        for elem in find(items, "map", name)["elem"]:
            key, value = elem
            if value["concat"][0] == "10.180.0.18":
                key["elem"]["counter"] = {"packets": n, "bytes": 60 * n}
    planner = committed()
    status = nst.build_status(snapshot(items), planner, _state(), None, whole_table=True)
    per = status.counters["ns/np:p80/TCP"]
    assert per["10.180.0.18:80"] == {"packets": 8, "bytes": 480}
    assert per["10.180.0.17:80"] == {"packets": 0, "bytes": 0}
    assert "ns/sticky:p80/TCP" not in status.counters  # affinity DNATs in its own chains: no map element
    named = nst.build_status(snapshot(items), planner, _state(), [NP], whole_table=False)
    assert list(named.counters) == ["ns/np:p80/TCP"] and named.matches is True


def test_element_deleted_changed_or_added_behind_our_back_is_named() -> None:
    items = listing()
    backends = find(items, "map", "svc-backends-tcp")
    gone = backends["elem"].pop(0)
    gone_key = nst.element_text(gone[0], gone[1], ("ipv4_addr", "inet_proto", "inet_service", "integer"))
    backends["elem"][0][1]["concat"][1] = 9999
    find(items, "set", "cluster-ips")["elem"].append("172.31.0.1")
    status = nst.build_status(snapshot(items), committed(), _state(), None, whole_table=True)
    assert status.matches is False
    text = "\n".join(status.mismatches)
    assert f"svc-backends-tcp: element {gone_key[0]} : {gone_key[1]} missing from the kernel" in text
    assert ". 9999 in the kernel, the last sync wrote" in text
    assert "cluster-ips: element 172.31.0.1 in the kernel but not in the last sync" in text


def test_missing_table_set_chain_and_changed_rules_are_named() -> None:
    planner = committed()
    assert nst.build_status(nst.Snapshot(rules={}), planner, _state(), None, whole_table=True).mismatches == [
        "table ip proxyd missing from the kernel"]
    items = [i for i in listing() if not ("map" in i and i["map"]["name"] == "svc-pick")
             and not ("chain" in i and i["chain"]["name"] == "masquerading")
             and not ("rule" in i and i["rule"]["chain"] == "masquerading")]
    rule = next(i["rule"] for i in items if "rule" in i and i["rule"]["chain"] == "svc-int")
    rule["expr"][0]["match"]["right"]["prefix"]["len"] = 16
    text = "\n".join(nst.build_status(snapshot(items), planner, _state(), None, whole_table=True).mismatches)
    assert "svc-pick: missing from the kernel" in text
    assert "chain masquerading missing from the kernel" in text
    assert "chain svc-int: 2 rules in the kernel differ" in text and "10.0.0.0/16" in text


def test_a_rule_proxyd_does_not_write_is_a_mismatch_and_stops_the_trace() -> None:
    items = listing()
    rule = next(i["rule"] for i in items if "rule" in i and i["rule"]["chain"] == "services")
    rule["expr"].insert(0, {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}})
    rule["expr"].insert(0, {"queue": {"num": 1}})
    snap = snapshot(items)
    status = nst.build_status(snap, committed(), _state(), None, whole_table=True)
    assert any(m.startswith("chain services: a rule proxyd does not write") for m in status.mismatches)
    result = trace(snap, "10.0.0.2", "172.30.0.41", 80)
    assert not result.supported and "services" in result.notes[0]


def test_protocol_names_or_numbers_and_counters_on_rules_read_alike() -> None:
    items = listing()
    for item in items:
        for kind in ("map", "set"):
            for elem in (item.get(kind) or {}).get("elem", []):
                key = elem[0] if isinstance(elem, list) else elem
                inner = key["elem"]["val"] if isinstance(key, dict) and "elem" in key else key
                if isinstance(inner, dict) and "concat" in inner:
                    inner["concat"] = [{6: "tcp", 17: "udp"}.get(v, v) if i == 1 else v
                                       for i, v in enumerate(inner["concat"])]
        if "rule" in item:
            item["rule"]["expr"].insert(0, {"counter": {"packets": 5, "bytes": 300}})
    status = nst.build_status(snapshot(items), committed(), _state(), None, whole_table=True)
    assert status.matches is True, status.mismatches


def test_element_spelt_differently_is_no_difference() -> None:
    status = ModeStatus(matches=True)
    nst.compare_elements(status, "firewall-allow", {"1.2.3.5 . tcp . 80 . 203.0.113.7/32": None},
                         {"1.2.3.5 . tcp . 80 . 203.0.113.7": None})
    nst.compare_elements(status, "hairpin", {"2001:db8:0:0::1 . 2001:db8::1": None},
                         {"2001:db8::1 . 2001:db8::1": None})
    assert status.matches is True and not status.mismatches


def test_at_most_max_mismatches_are_named() -> None:
    status = ModeStatus(matches=True)
    nst.compare_elements(status, "cluster-ips", {f"10.96.{i // 256}.{i % 256}": None for i in range(500)}, {})
    assert status.matches is False and len(status.mismatches) == MAX_MISMATCHES


@pytest.mark.parametrize("bad", [
    [{"map": {"family": "ip", "table": "proxyd", "name": "service-ips", "map": "verdict", "elem": "x"}}],
    [{"map": {"family": "ip", "table": "proxyd", "name": "service-ips", "map": "verdict", "elem": [["a"]]}}],
    [{"set": {"family": "ip", "table": "proxyd", "name": "cluster-ips", "elem": [{"weird": 1}]}}],
    [{"set": {"family": "ip", "table": "proxyd", "name": "cluster-ips", "elem": [True]}}],
])
def test_malformed_listings_are_refused(bad: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError):
        nst.Snapshot().add(bad, FAM)


def test_other_tables_families_and_junk_are_ignored() -> None:
    snap = nst.Snapshot()
    snap.add([{"metainfo": {}}, {"table": {"family": "ip", "name": "other"}},
              {"set": {"family": "ip", "table": "other", "name": "cluster-ips", "elem": ["1.1.1.1"]}},
              {"set": {"family": "ip6", "table": "proxyd", "name": "cluster-ips", "elem": ["::1"]}},
              {"chain": "not a dict"},
              {"rule": {"family": "ip", "table": "other", "chain": "x", "expr": [1]}}], FAM)
    assert not snap.table and not snap.sets and not snap.chains and not snap.bad_rules


def test_a_huge_listing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nst, "MAX_ELEMENTS", 100)
    items = [{"set": {"family": "ip", "table": "proxyd", "name": "cluster-ips",
                      "elem": [f"10.0.0.{i}" for i in range(101)]}}]
    with pytest.raises(ValueError, match="more than 100"):
        nst.Snapshot().add(items, FAM)


class FakeNft:
    """Answers list commands from the captured listing; records what was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.items = listing()

    def run_json(self, command: str, *, terse: bool = False) -> list[dict[str, Any]]:
        self.asked.append(command + (" (terse)" if terse else ""))
        words = command.split()
        if words[1] == "table":
            return self.items
        if words[1] == "ruleset":
            assert terse
            out = copy.deepcopy(self.items)
            for item in out:
                for kind in ("set", "map"):
                    (item.get(kind) or {}).pop("elem", None)
            return out
        kind, name = words[1], words[-1]
        return [i for i in self.items if kind in i and i[kind]["name"] == name]


async def _thread(fn: Any, *args: Any) -> Any:
    return fn(*args)


def test_what_a_status_reads_depends_on_the_size_and_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nst.nlread, "KEYS", {})  # every set through nft: no netlink without root
    planner, state = committed(), _state()
    nft = FakeNft()
    whole = asyncio.run(nst.read_status(nft, planner, state, None, run=_thread))  # type: ignore[arg-type]
    assert nft.asked == ["list table ip proxyd"] and whole.matches is True
    assert "ns/np:p80/TCP" in whole.counters
    nft.asked.clear()
    named = asyncio.run(nst.read_status(nft, planner, state, [NP], run=_thread))  # type: ignore[arg-type]
    assert "list table ip proxyd" not in nft.asked and "list map ip proxyd np-backends-tcp" in nft.asked
    assert "list ruleset ip (terse)" in nft.asked
    assert named.matches is True and list(named.counters) == ["ns/np:p80/TCP"]
    monkeypatch.setattr(nst, "FULL_READ_ELEMENTS", 1)
    nft.asked.clear()
    large = asyncio.run(nst.read_status(nft, planner, state, None, run=_thread))  # type: ignore[arg-type]
    assert not any("backends" in a or a.startswith("list table") for a in nft.asked), nft.asked
    assert "list ruleset ip (terse)" in nft.asked
    assert large.matches is True and not large.counters and any("dispatch" in n for n in large.notes)
    nft.items = [x for x in nft.items if not ("map" in x and x["map"]["name"] == "service-ips")]
    broken = asyncio.run(nst.read_status(nft, planner, state, None, run=_thread))  # type: ignore[arg-type]
    assert broken.mismatches == ["service-ips: missing from the kernel"]


def test_the_mode_says_nothing_to_compare_before_its_first_sync() -> None:
    mode = NftablesMode(Config())
    status = asyncio.run(mode.status())
    assert status.matches is None and status.supported
    trace = asyncio.run(mode.trace(TracePacket("10.0.0.1", "10.96.0.1", 80)))
    assert not trace.supported


def test_the_captured_listing_is_the_kernels_not_the_planners() -> None:
    """Guard against regenerating the fixture from planner text: it holds the kernel's spellings."""
    items = listing()
    dnat = next(i["rule"] for i in items if "rule" in i and i["rule"]["chain"].startswith("svc-pick-tcp-"))
    key = dnat["expr"][0]["dnat"]["addr"]["map"]["key"]["concat"]
    assert {"payload": {"protocol": "tcp", "field": "dport"}} in key  # nft prints "tcp dport", we write th
    assert copy.deepcopy(items) == items


def test_trace_now_reads_the_rules_then_only_the_sets_on_the_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nst.nlread, "KEYS", {})
    nft = FakeNft()
    result = nst.trace_now(nft, FAM, TracePacket("10.0.0.2", "172.30.0.52", 80), NODE_IPS)  # type: ignore[arg-type]
    assert result.supported and {p.endpoint for p in result.paths} == {"10.180.0.17:80", "10.180.0.18:80",
                                                                      "10.180.0.19:80"}
    assert nft.asked[0] == "list ruleset ip (terse)"
    assert "list map ip proxyd svc-backends-tcp" in nft.asked and not any("np-" in a for a in nft.asked)
    assert "svc-backends-tcp" in result.source
    nft.items = [i for i in nft.items if not ("table" in i or "chain" in i or "rule" in i or "map" in i
                                              or "set" in i)]
    gone = nst.trace_now(nft, FAM, TracePacket("10.0.0.2", "172.30.0.52", 80), NODE_IPS)  # type: ignore[arg-type]
    assert not gone.supported and "not in the kernel" in gone.notes[0]
