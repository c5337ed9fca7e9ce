"""``proxyd status``, ``proxyd trace`` and ``--log-format json`` against the real daemon and real traffic.

For each mode this kernel runs (userspace, iptables, nftables with both ways
of driving nft; ipvs runs in the QEMU guest: ``tests/vm/test_ipvs.py``), the
daemon serves three services: ``web``
(three local endpoints, a NodePort), ``empty`` (no endpoints) and an invalid
one in its own file. The test sends connections, then checks that:

* ``status`` names every endpoint with its state and use, says the kernel
  matches the last sync, lists the rejected object with its reason, and its
  per-endpoint counters moved by at least the connections each endpoint
  answered;
* ``trace`` of the same flow names every endpoint with equal odds, and each
  endpoint that really answered is among them; a flow to ``empty`` is
  rejected with the reason; a flow from outside to the NodePort is
  masqueraded;
* every log line is one JSON object with the stable keys.

In nftables mode, an element deleted behind proxyd's back is named as a
mismatch by ``status``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.netns.behaviour import CLUSTER_IP, POD1, POD2, POD3, local_eps, web
from tests.netns.topology import CLIENT_IP, NODE_IP, Topology, endpoint_slice, port, service, wait_until

EMPTY_IP = "10.96.0.20"
NODE_PORT = 30080
PROXYD = Path(sys.executable).parent / "proxyd"


def proxyd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PROXYD), *args], capture_output=True, text=True, timeout=120)


def ask(sock: Path, *args: str) -> dict[str, Any]:
    result = proxyd_cli(*args, "--json", "--socket", str(sock))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def start(topo: Topology, mode: str, env: dict[str, str] | None = None) -> tuple[Any, Path]:
    topo.start_servers(tcp=("pod1", "pod2", "pod3"))
    docs = [*web(endpoints=local_eps(POD1, POD2, POD3), type_="NodePort", node_port=NODE_PORT),
            service("empty", cluster_ip=EMPTY_IP, ports=[port(80, target_port=8080)]),
            endpoint_slice("empty", ports=[{"port": 8080}], endpoints=[])]
    topo.write_manifest("services.yaml", docs)
    # An invalid Service in its own file: rejected with a reason, the rest still served.
    topo.write_manifest("bad.yaml", [service("bad", cluster_ip="10.96.0.30", ports=[port(70000)])])
    sock = topo._tmp / "status.sock"
    proc = topo.start_proxyd(mode, extra_args=("--status-socket", str(sock), "--log-format", "json"), env=env)
    return proc, sock


def endpoints_of(status: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    [svc] = [s for s in status["services"] if s["name"] == name]
    return {ep["address"]: ep for ep in svc["endpoints"]}


def counted(ep: dict[str, Any], mode: str) -> int:
    """Connections the kernel (or the connection table) counted for one endpoint."""
    counters = ep.get("counters", {})
    return counters.get("packets" if mode in ("iptables", "nftables") else "connections", 0)


NFT_SUBPROCESS = {"PROXYD_NFT_BACKEND": "subprocess"}


@pytest.mark.parametrize("mode,env", [("userspace", None), ("iptables", None), ("nftables", None),
                                      ("nftables", NFT_SUBPROCESS)],
                         ids=["userspace", "iptables", "nftables-library", "nftables-subprocess"])
def test_status_and_trace_follow_real_traffic(topology: Topology, mode: str,
                                              env: dict[str, str] | None) -> None:
    proc, sock = start(topology, mode, env)
    eps = {f"{ip}:8080" for ip in (POD1, POD2, POD3)}
    by_pod = {topology.pod(name).name: f"{topology.pod(name).ip}:8080" for name in ("pod1", "pod2", "pod3")}

    before = wait_until(lambda: (s := ask(sock, "status", "--detail")) and s["sync"]["last"] and s,
                        timeout=20, what="a status answer after the first sync")
    assert before["mode"] == mode and before["node"] == "node1"
    assert before["kernel"]["supported"] and before["kernel"]["matches"] is True, before["kernel"]
    web_eps = endpoints_of(before, "default/web")
    assert set(web_eps) == eps
    for ep in web_eps.values():
        assert ep["state"] == "ready" and ep["local"] and ep["in_use"] == ["cluster-ip", "external"], ep
    [empty] = [s for s in before["services"] if s["name"] == "default/empty"]
    assert empty["endpoints"] == [] and not empty["has_usable_endpoints"]
    assert any(r["kind"] == "Service" and "bad" in r["object"] and r["reason"] for r in before["rejected"])
    summary = {s["name"]: s for s in ask(sock, "status")["services"]}
    assert summary["default/web"]["endpoint_counts"] == {"total": 3, "ready": 3, "local": 3, "terminating": 0,
                                                         "in_use_cluster_ip": 3, "in_use_external": 3}
    assert "endpoints" not in summary["default/web"]

    # Real traffic from a pod on the node to the cluster IP.
    client = topology.pod("pod1")
    answered = Counter(by_pod[topology.hello(client.ns, CLUSTER_IP, 80).pod] for _ in range(15))
    assert set(answered) <= eps

    trace = ask(sock, "trace", client.ip, CLUSTER_IP, "80")
    assert trace["service"] == "default/web" and trace["supported"], trace
    accepted = {p["endpoint"]: p for p in trace["paths"] if p["verdict"] == "ACCEPT"}
    assert set(accepted) == eps, trace
    assert set(answered) <= set(accepted)
    assert abs(sum(p["odds"] for p in trace["paths"]) - 1) < 1e-4
    for p in accepted.values():
        assert abs(p["odds"] - 1 / 3) < 1e-3, p
        assert p["steps"], p

    def moved() -> dict[str, Any] | None:
        after = ask(sock, "status", "--namespace", "default", "web")
        got = endpoints_of(after, "default/web")
        ok = all(counted(got[ep], mode) - counted(web_eps[ep], mode) >= n for ep, n in answered.items())
        return after if ok else None

    # Userspace counters are flushed at connection close; the kernel's move at once. Wait generously.
    after = wait_until(moved, timeout=15, what=f"per-endpoint counters to count {dict(answered)}")
    assert [s["name"] for s in after["services"]] == ["default/web"]
    assert after["service_ports_total"] == 2

    rejected = ask(sock, "trace", client.ip, EMPTY_IP, "80")
    assert rejected["service"] == "default/empty"
    assert [p["verdict"] for p in rejected["paths"]] == ["REJECT"], rejected
    assert "no endpoints" in rejected["paths"][0]["reason"]

    external = ask(sock, "trace", CLIENT_IP, NODE_IP, str(NODE_PORT))
    assert external["service"] == "default/web" and external["address_kind"] == "node port"
    outside = {p["endpoint"] for p in external["paths"] if p["verdict"] == "ACCEPT" and p["masquerade"]}
    assert outside == eps, external
    seen = topology.hello(topology.client, NODE_IP, NODE_PORT)
    assert by_pod[seen.pod] in outside

    # The text forms print what the JSON says.
    text = proxyd_cli("status", "--socket", str(sock), "web").stdout
    assert "default/web TCP NodePort" in text and f"{POD1}:8080" in text
    text = proxyd_cli("status", "--socket", str(sock)).stdout
    assert "endpoints 3 (3 ready, 3 local) in use 3/3 external" in text, text
    text = proxyd_cli("trace", client.ip, CLUSTER_IP, "80", "--socket", str(sock)).stdout
    assert "service default/web (cluster IP)" in text and "33.3%" in text

    topology.stop_proxyd(proc)
    lines = [line for line in topology.log_of(proc).splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)
        assert {"ts", "level", "logger", "msg", "service", "endpoint", "reason"} <= set(record), record
    assert any(json.loads(line)["reason"] for line in lines if "bad" in line)
    assert not sock.exists()  # removed on shutdown


@pytest.mark.parametrize("env", [None, NFT_SUBPROCESS], ids=["library", "subprocess"])
def test_nftables_status_names_an_element_deleted_behind_its_back(topology: Topology,
                                                                  env: dict[str, str] | None) -> None:
    _proc, sock = start(topology, "nftables", env)
    first = wait_until(lambda: (s := ask(sock, "status")) and s["sync"]["last"] and s,
                       timeout=20, what="a status answer after the first sync")
    assert first["kernel"]["matches"] is True, first["kernel"]
    listed = topology.ns_run(topology.node, ["nft", "list", "map", "ip", "proxyd", "svc-backends-tcp"]).stdout
    assert f"{CLUSTER_IP} . tcp . 80 . 1 counter packets" in listed, listed
    topology.ns_run(topology.node, ["nft", "delete", "element", "ip", "proxyd", "svc-backends-tcp",
                                    f"{{ {CLUSTER_IP} . tcp . 80 . 1 }}"])
    for args in (("status",), ("status", "web")):
        kernel = ask(sock, *args)["kernel"]
        assert kernel["matches"] is False, (args, kernel)
        gone = f"svc-backends-tcp: element {CLUSTER_IP} . tcp . 80 . 1 : "
        # A dual-stack node names the family of each difference ("IPv4: ...").
        assert any(m.removeprefix("IPv4: ").startswith(gone) and "missing" in m
                   for m in kernel["mismatches"]), (args, kernel)
    # The trace, read back now, sees the hole: the pick chain's numgen finds no element 1.
    trace = ask(sock, "trace", topology.pod("pod1").ip, CLUSTER_IP, "80")
    assert not trace["supported"] and "no element" in " ".join(trace["notes"]), trace
    text = proxyd_cli("status", "--socket", str(sock)).stdout
    assert "svc-backends-tcp" in text, text


def test_status_refuses_bad_requests(topology: Topology) -> None:
    _proc, sock = start(topology, "userspace")
    for args in (("trace", "10.0.0.1", "not-an-ip", "80"), ("trace", "10.0.0.1", "10.96.0.10", "0"),
                 ("trace", "10.0.0.1", "2001:db8::1", "80")):
        result = proxyd_cli(*args, "--socket", str(sock))
        assert result.returncode == 1 and "trace:" in result.stderr, (args, result.stderr)
    import socket as sk

    for raw in (b"not json\n", b"[1, 2]\n", b'{"op": "rm -rf"}\n', b"x" * 100_000):
        with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as s:
            s.settimeout(20)
            s.connect(str(sock))
            s.sendall(raw)
            s.shutdown(sk.SHUT_WR)
            answer = json.loads(s.makefile("rb").read())
        assert "error" in answer, (raw[:20], answer)
    assert "error" not in ask(sock, "status")
    result = proxyd_cli("status", "--socket", str(sock.with_name("absent.sock")))
    assert result.returncode == 1 and "cannot ask the daemon" in result.stderr
