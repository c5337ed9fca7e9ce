"""iptables mode's status and trace over rules read back from the kernel, without root.

``data/iptables-{nft,legacy}-save-c.txt`` are real ``iptables-save -c``
output captured on this machine (in a throw-away namespace) after restoring
the planner's rules for the tracer tests' services, ensuring kube-proxy's
jumps and adding one foreign rule (Docker's MASQUERADE). Tracing every flow
of ``test_iptables_tracer.FLOWS`` through that text must give exactly what
tracing the planner's own text gives: the saved forms (counters,
``--set-xmark``, ``--reject-with``, ``--mask``) and the per-packet rule
filter change nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxyd.introspect import TracePacket, TraceResult
from proxyd.model import Endpoint, ProxyState
from proxyd.modes.iptables import chains as ch
from proxyd.modes.iptables.planner import Planner, PlannerOptions
from proxyd.modes.iptables.status import (
    build_status,
    dnat_counters,
    may_match,
    own_rules,
    rule_counts,
    split_counters,
    trace_saved,
)
from proxyd.modes.iptables.tracer import split_host_port
from tests.unit.test_iptables_tracer import FLOWS, FLOWS6, NODE, NODE_IP, NODE_IPS6, SERVICES

DATA = Path(__file__).parent / "data"
SAVED = {tool: (DATA / f"iptables-{tool}-save-c.txt").read_text() for tool in ("nft", "legacy")}


def tables(text: str) -> tuple[str, str]:
    nat = text[text.index("*nat"):]
    filt = text[text.index("*filter"):text.index("*nat")] if text.index("*filter") < text.index("*nat") else \
        text[text.index("*filter"):]
    return nat, filt


def summary(result: TraceResult) -> str:
    """The tracer tests' flow string: sorted endpoints and masq, or the verdict."""
    verdicts = {p.verdict for p in result.paths}
    if verdicts != {"ACCEPT"}:
        return verdicts.pop() if len(verdicts) == 1 else "mixed"
    dests = ", ".join(sorted({p.endpoint or "" for p in result.paths}))
    masq = {p.masquerade for p in result.paths}
    return f"{dests} {'mixed' if len(masq) > 1 else ('masq' if masq.pop() else 'no-masq')}"


def cache():
    state = ProxyState(service_ports={s.name: s for s, _ in SERVICES},
                       endpoints={s.name: e for s, e in SERVICES}, node_name=NODE)
    planner = Planner(PlannerOptions(cluster_cidrs=("10.0.0.0/8",), node_ip=NODE_IP))
    plan = planner.plan(state, None)
    planner.commit(plan)
    return planner.cache


@pytest.mark.parametrize("tool", sorted(SAVED))
@pytest.mark.parametrize(("what", "src", "dst", "proto", "local_origin", "expected"), FLOWS,
                         ids=[f[0] for f in FLOWS])
def test_saved_rules_trace_like_the_planned_ones(tool, what, src, dst, proto, local_origin, expected):
    nat, filt = tables(SAVED[tool])
    ip, _, port = dst.rpartition(":")
    result = trace_saved(nat, filt, TracePacket(src, ip, int(port), proto), node_ips=[NODE_IP, "172.16.0.1"],
                         source="test")
    assert result.supported, result.notes
    assert summary(result) == expected, (what, result)
    assert abs(sum(p.odds for p in result.paths) - 1) < 1e-9
    if local_origin:
        assert any("traced from nat OUTPUT" in note for note in result.notes)


def test_trace_gives_odds_chains_and_reasons():
    nat, filt = tables(SAVED["nft"])
    three = trace_saved(nat, filt, TracePacket("203.0.113.5", NODE_IP, 3012), node_ips=[NODE_IP], source="t")
    assert sorted(p.endpoint for p in three.paths) == ["10.180.0.17:80", "10.180.0.18:80", "10.180.0.19:80"]
    for p in three.paths:
        assert p.odds == pytest.approx(1 / 3, abs=1e-6) and p.masquerade
        assert p.steps[0] == "nat/PREROUTING" and any(s.startswith("nat/KUBE-SEP-") for s in p.steps)
    rejected = trace_saved(nat, filt, TracePacket("10.0.0.2", "172.30.0.44", 80), node_ips=[NODE_IP],
                           source="t")
    [path] = rejected.paths
    assert path.verdict == "REJECT" and path.reason == "ns/empty:p80 has no endpoints"
    dropped = trace_saved(nat, filt, TracePacket("203.0.113.200", "1.2.3.5", 80), node_ips=[NODE_IP],
                          source="t")
    assert [p.verdict for p in dropped.paths] == ["DROP"]
    assert "traffic not accepted" in dropped.paths[0].reason


def test_own_rules_keeps_only_proxyds_chains_and_jumps():
    nat, _ = tables(SAVED["nft"])
    kept = own_rules(nat)
    assert "docker0" not in kept and "172.17.0.0/16" not in kept
    assert "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES" in kept
    assert ":KUBE-SERVICES - [0:0]" in kept and ":PREROUTING" not in kept
    assert "[0:0]" not in kept.replace(" - [0:0]", "")


def test_split_counters_both_forms_and_garbage():
    assert split_counters("[12:3400] -A X -j Y") == (12, 3400, "-A X -j Y")
    assert split_counters("-A KUBE-SEP-A -p tcp -m tcp -c 7 420 -j DNAT --to-destination 1.2.3.4:80") == (
        7, 420, "-A KUBE-SEP-A -p tcp -m tcp -j DNAT --to-destination 1.2.3.4:80")
    for junk in ("", "[", "[a:b] -A X", "-c 1 2", "COMMIT", "\x00" * 100, "[1:2]"):
        _pkts, _nbytes, rest = split_counters(junk)
        assert isinstance(rest, str)
    assert split_counters("-N KUBE-X") == (None, None, "-N KUBE-X")


def test_may_match_only_rules_out_what_cannot_match():
    pkt = TracePacket("10.0.0.2", "172.30.0.41", 80)
    assert may_match("-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-X", pkt)
    assert not may_match("-A KUBE-SERVICES -d 172.30.0.42/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-X", pkt)
    assert not may_match("-A KUBE-NODEPORTS -p tcp -m tcp --dport 3012 -j KUBE-EXT-X", pkt)
    assert may_match("-A KUBE-SVC-X ! -d 172.30.0.42/32 -j KUBE-MARK-MASQ", pkt)  # negations are left alone
    assert may_match("-A KUBE-X ! --dport 81 -j Y", pkt)
    assert may_match("-A KUBE-X -d 172.30.0.0/16 -j Y", pkt)
    assert may_match("-A KUBE-X -d not-an-address -j Y", pkt)


def test_status_counts_and_compares_with_the_plan():
    nat, filt = tables(SAVED["nft"])
    planned = cache()
    clean = build_status(nat, filt, planned)
    assert clean.matches is True, clean.mismatches
    name = next(n for n in planned if n.name == "np")
    ep = Endpoint("10.180.0.18", 80)
    sep = ch.sep_chain(name, ep)
    counted = "\n".join(line.replace("[0:0]", "[5:300]", 1) if line.startswith(f"[0:0] -A {sep} ")
                        and "DNAT" in line else line for line in nat.splitlines())
    status = build_status(counted, filt, planned)
    assert status.counters[f"{name}/TCP"]["10.180.0.18:80"] == {"packets": 5, "bytes": 300}
    assert status.counters[f"{name}/TCP"]["10.180.0.17:80"] == {"packets": 0, "bytes": 0}
    assert dnat_counters(counted)[sep] == (5, 300)
    # A chain someone deleted, a rule someone added, a jump someone removed: each is named.
    svc = ch.svc_chain(name)
    drifted = "\n".join(line for line in counted.splitlines() if f"-A {sep} " not in line)
    drifted = drifted.replace(f":{sep} - [0:0]\n", "") + f"\n[0:0] -A {svc} -j ACCEPT\n"
    drifted = "\n".join(line for line in drifted.splitlines() if "-A POSTROUTING" not in line)
    bad = build_status(drifted, filt, planned)
    assert bad.matches is False
    text = "\n".join(bad.mismatches)
    assert f"chain {sep} missing" in text and f"chain {svc} holds" in text
    assert "jump nat/POSTROUTING -> KUBE-POSTROUTING missing" in text
    only = build_status(counted, filt, planned, [name])
    assert set(only.counters) == {f"{name}/TCP"}


def test_hostile_saved_text_fails_cleanly():
    nat, filt = tables(SAVED["nft"])
    pkt = TracePacket("10.0.0.2", "172.30.0.41", 80)
    for broken in (nat + '\n-A KUBE-SERVICES -d 172.30.0.41/32 -m comment --comment "unterminated -j X\n',
                   nat.replace("-j KUBE-SVC-", "-j KUBE-GONE-"),
                   nat + "\n-A KUBE-SERVICES -d 172.30.0.41/32 -m weird --option 1 -j KUBE-X\n"):
        result = trace_saved(broken, filt, pkt, node_ips=[NODE_IP], source="t")
        assert not result.supported and result.notes, result
    huge = "\n".join(f"[0:0] -A FOREIGN-{i} -m foo --bar {i} -j BAZ" for i in range(50_000))
    assert own_rules(huge + "\n" + nat) == own_rules(nat)
    assert rule_counts("garbage\n-A\n:\n-A KUBE-X\n") == {"KUBE-X": 1}


def test_dispatch_check_of_a_large_node():
    from proxyd.modes.iptables.status import build_dispatch_status

    nat, filt = tables(SAVED["nft"])
    planned = cache()

    def chain(text: str, name: str) -> str:
        return "\n".join(split_counters(line)[2] for line in text.splitlines() if f"-A {name} " in line)

    texts = {"KUBE-SERVICES": chain(nat, "KUBE-SERVICES"), "KUBE-NODEPORTS": chain(nat, "KUBE-NODEPORTS"),
             "nat/builtin": "\n".join(chain(nat, b) for b in ("PREROUTING", "OUTPUT", "POSTROUTING")),
             "filter/builtin": "\n".join(chain(filt, b) for b in ("INPUT", "FORWARD", "OUTPUT"))}
    assert build_dispatch_status(texts, planned).matches is True
    name = next(n for n in planned if n.name == "np")
    svc = ch.svc_chain(name)
    gone = {**texts, "KUBE-SERVICES": "\n".join(line for line in texts["KUBE-SERVICES"].splitlines()
                                                 if svc not in line)}
    bad = build_dispatch_status(gone, planned)
    assert bad.matches is False and any(svc in m and "no jump" in m for m in bad.mismatches)
    assert build_dispatch_status({}, planned).matches is False


# ip6tables-save -c of both back ends after restoring the IPv6 proxier's plan for the tracer tests'
# services moved to IPv6 (tests/unit/test_iptables_tracer.py's SERVICES6, kube-proxy's jump rules
# added): /128 destinations, icmp6-port-unreachable rejects, [ip]:port DNAT targets read back.
SAVED6 = {tool: (DATA / f"ip6tables-{tool}-save-c.txt").read_text() for tool in ("nft", "legacy")}


@pytest.mark.parametrize("tool", sorted(SAVED6))
@pytest.mark.parametrize(("what", "src", "dst", "proto", "local_origin", "expected"), FLOWS6,
                         ids=[f[0] for f in FLOWS6])
def test_saved_ipv6_rules_trace_like_the_planned_ones(tool, what, src, dst, proto, local_origin, expected):
    nat, filt = tables(SAVED6[tool])
    ip, port = split_host_port(dst)
    result = trace_saved(nat, filt, TracePacket(src, ip, port, proto), node_ips=NODE_IPS6, source="test")
    assert result.supported, result.notes
    assert summary(result) == expected, (what, result)
    assert abs(sum(p.odds for p in result.paths) - 1) < 1e-9
    assert "--reject-with icmp6-port-unreachable" in filt and "/128 " in nat
