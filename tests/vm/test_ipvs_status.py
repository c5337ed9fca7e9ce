"""``proxyd status`` and ``proxyd trace`` in ipvs mode, against real traffic (QEMU guest only).

The same scenario as ``tests/netns/test_operability.py`` (run there for
userspace and iptables modes on the host kernel, which has no IPVS): the
real daemon serves ``web`` (three local endpoints, a NodePort) and ``empty``
(no endpoints); status must show the IPVS table matching the last sync and
each real server's connection counter moving by at least the connections
it answered; trace must name every real server with equal odds under
``rr``, include the ones that answered, reject ``empty`` and masquerade
external NodePort traffic. Run with ``tests/vm/run-in-vm.sh``.
"""

from __future__ import annotations

from collections import Counter

from tests.netns.behaviour import CLUSTER_IP, POD1, POD2, POD3
from tests.netns.test_operability import EMPTY_IP, NODE_PORT, ask, endpoints_of, start
from tests.netns.topology import CLIENT_IP, NODE_IP, Topology, wait_until


def test_ipvs_status_and_trace_follow_real_traffic(topology: Topology) -> None:
    _proc, sock = start(topology, "ipvs")
    eps = {f"{ip}:8080" for ip in (POD1, POD2, POD3)}
    by_pod = {name: f"{topology.pod(name).ip}:8080" for name in ("pod1", "pod2", "pod3")}
    before = wait_until(lambda: (s := ask(sock, "status", "--detail")) and s["sync"]["last"] and s,
                        timeout=120, what="a status answer after the first sync")
    assert before["mode"] == "ipvs" and before["kernel"]["matches"] is True, before["kernel"]
    web_eps = endpoints_of(before, "default/web")
    assert set(web_eps) == eps

    client = topology.pod("pod1")
    answered = Counter(by_pod[topology.hello(client.ns, CLUSTER_IP, 80).pod] for _ in range(12))
    trace = ask(sock, "trace", client.ip, CLUSTER_IP, "80")
    assert trace["service"] == "default/web", trace
    accepted = {p["endpoint"]: p for p in trace["paths"] if p["verdict"] == "ACCEPT"}
    assert set(accepted) == eps and set(answered) <= set(accepted)
    for p in accepted.values():
        assert abs(p["odds"] - 1 / 3) < 1e-3 and not p["masquerade"], p

    def moved() -> bool:
        got = endpoints_of(ask(sock, "status", "web"), "default/web")
        return all(got[ep].get("counters", {}).get("connections", 0)
                   - web_eps[ep].get("counters", {}).get("connections", 0) >= n for ep, n in answered.items())

    wait_until(moved, timeout=60, what=f"IPVS connection counters to count {dict(answered)}")

    rejected = ask(sock, "trace", client.ip, EMPTY_IP, "80")
    assert [p["verdict"] for p in rejected["paths"]] == ["REJECT"]
    assert "no endpoints" in rejected["paths"][0]["reason"]
    external = ask(sock, "trace", CLIENT_IP, NODE_IP, str(NODE_PORT))
    assert {p["endpoint"] for p in external["paths"] if p["masquerade"]} == eps, external
