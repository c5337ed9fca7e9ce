"""The shared netfilter layer (``proxyd.netfilter``) against the kernel, on both back ends.

iptables mode's use of it is covered through the daemon (test_iptables.py);
here ipvs mode's iptables part, which otherwise runs only in the QEMU guest:
its ruleset restored asynchronously, its jumps ensured once however often
asked, ``missing`` naming exactly what someone deleted (canary included, in
nat too), and ``cleanup`` leaving nothing of it.
"""

from __future__ import annotations

import asyncio

import pytest

from proxyd.modes.ipvs.applier import IpvsApplier
from proxyd.modes.ipvs.planner import FILTER_CHAINS, JUMPS, NAT_CHAINS, Plan, iptables_rules
from proxyd.netfilter import CANARY, Backend, Netfilter
from tests.netns.topology import Topology, in_netns


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_ipvs_rules_jumps_verification_and_cleanup(topology: Topology, backend: str) -> None:
    nf = Netfilter(Backend(backend, 4))
    save = [f"iptables-{backend}-save"]

    async def scenario() -> None:
        await applier.call(applier.ensure_sets)  # the rules match ipvs mode's ipsets
        await nf.restore(iptables_rules(Plan()))
        await nf.ensure_canaries()
        assert await nf.missing(JUMPS) == [str(j) for j in JUMPS]
        await nf.ensure_jumps(JUMPS)
        await nf.ensure_jumps(JUMPS)  # idempotent: -C finds them
        assert await nf.missing(JUMPS) == []
        rules = await nf.iptables("-t", "nat", "-S", "PREROUTING")
        assert rules.count("-j KUBE-SERVICES") == 1
        await nf.iptables("-t", "nat", "-D", "PREROUTING", *JUMPS[1].args())
        await nf.iptables("-t", "nat", "-X", CANARY)
        assert await nf.missing(JUMPS) == [f"nat {CANARY}", "nat PREROUTING -> KUBE-SERVICES"]
        await nf.iptables("-t", "filter", "-F")
        missing = await nf.missing(JUMPS)
        assert all(str(j) in missing for j in JUMPS if j.table == "filter")
        problems = await nf.cleanup(JUMPS, {"nat": (*NAT_CHAINS, CANARY), "filter": (*FILTER_CHAINS, CANARY),
                                            "mangle": (CANARY,)})
        assert problems == []

    with in_netns(topology.node):
        applier = IpvsApplier()
        try:
            asyncio.run(scenario())
        finally:
            asyncio.run(applier.call(applier.destroy_sets))
            asyncio.run(applier.aclose())
    text = topology.ns_run(topology.node, save).stdout
    assert "KUBE-" not in text, text
