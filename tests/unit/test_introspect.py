"""The trace step both netfilter modes share (``proxyd.introspect.trace_rules``), against a fake tracer."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from proxyd.introspect import TracePacket, trace_rules
from proxyd.modes.iptables.tracer import Tracer as IptablesTracer
from proxyd.modes.nftables.tracer import Tracer as NftablesTracer


@dataclass(frozen=True)
class Outcome:
    verdict: str
    destination: str
    masquerade: bool


class FakeTracer:
    def __init__(self, paths, *, local: frozenset[str] = frozenset()) -> None:
        self.paths = paths
        self.local = local
        self.asked: list[bool] = []

    def is_local(self, ip: str) -> bool:
        return ip in self.local

    def trace_paths(self, *, src, dst, port, protocol="tcp", local_origin=False):
        self.asked.append(local_origin)
        return self.paths


def trace(tracer, packet: TracePacket, **kwargs):
    args = {"source": "rules read now", "rules": "the rules read back", "local_hook": "nat OUTPUT",
            "original": f"{packet.dst}:{packet.port}",
            "refusal": lambda verdict, steps: f"{verdict} in {steps[-1]}"}
    return trace_rules(lambda: tracer, packet, **{**args, **kwargs})


def test_paths_get_their_reasons_and_merge() -> None:
    packet = TracePacket("10.0.0.9", "10.96.0.10", 80)
    tracer = FakeTracer([
        (Outcome("ACCEPT", "10.244.1.2:8080", True), ("KUBE-SERVICES", "KUBE-SVC-X"), 0.25),
        (Outcome("ACCEPT", "10.244.1.2:8080", True), ("KUBE-SERVICES", "KUBE-SVC-X"), 0.25),
        (Outcome("REJECT", "10.96.0.10:80", False), ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"), 0.25),
        (Outcome("ACCEPT", "10.96.0.10:80", False), ("PREROUTING",), 0.25),
    ])
    result = trace(tracer, packet)
    assert result.supported and result.source == "rules read now" and result.notes == []
    assert tracer.asked == [False]
    got = [(p.verdict, p.endpoint, p.odds, p.reason) for p in result.paths]
    assert got == [("ACCEPT", "10.244.1.2:8080", 0.5, ""),  # most likely first (merge_paths)
                   ("REJECT", None, 0.25, "REJECT in KUBE-EXTERNAL-SERVICES"),
                   ("ACCEPT", "10.96.0.10:80", 0.25, "not a service address: not translated")]


def test_a_packet_from_the_node_is_traced_from_the_local_hook() -> None:
    tracer = FakeTracer([(Outcome("DROP", "10.96.0.10:80", False), ("x",), 1.0)],
                        local=frozenset({"127.0.0.1"}))
    result = trace(tracer, TracePacket("127.0.0.1", "10.96.0.10", 80), local_hook="the output hook")
    assert tracer.asked == [True]
    assert result.notes == ["127.0.0.1 is this node: traced from the output hook"]


@pytest.mark.parametrize("error", [ValueError("unsupported match --foo"), KeyError("KUBE-SVC-Y"),
                                   IndexError()])
def test_rules_it_cannot_read_give_an_unsupported_answer(error: Exception) -> None:
    def build():
        raise error

    result = trace_rules(build, TracePacket("10.0.0.9", "10.96.0.10", 80), source="s",
                         rules="the ruleset read back", local_hook="h", original="10.96.0.10:80",
                         refusal=lambda verdict, steps: "")
    assert not result.supported and result.paths == []
    assert result.notes == [f"cannot trace through the ruleset read back: {error}"]


@pytest.mark.parametrize("tracer", [IptablesTracer("", node_ips=["192.0.2.1"]),
                                    NftablesTracer(node_ips=["192.0.2.1", "2001:db8::1"])])
def test_both_tracers_say_which_addresses_are_the_node_s(tracer) -> None:
    assert tracer.is_local("192.0.2.1") and tracer.is_local("127.0.0.1")
    assert not tracer.is_local("192.0.2.2")
    assert isinstance(tracer, IptablesTracer) or (tracer.is_local("2001:db8::1") and tracer.is_local("::1"))
