"""The daemon as an attack surface, end to end: what it listens on, and how its HTTP servers take abuse.

``tests/unit/test_httpserve.py`` covers the HTTP responder alone; here the
real daemon's /healthz server and a healthCheckNodePort server (which listen
where clients and load balancers can reach them) get unknown paths, path
traversal, other methods, oversized heads, a slowloris and a flood of idle
connections, while a service keeps carrying traffic. The listening sockets
of the daemon are audited: only what the configuration asks for.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import pytest

from proxyd.httpserve import HEAD_TIMEOUT, MAX_CLIENTS
from tests.netns.topology import (
    NODE_IP,
    NODE_IP_TO_NODE2,
    Topology,
    endpoint,
    endpoint_slice,
    port,
    service,
    wait_until,
)
from tests.reliability.harness import close_all, healthz, metric_sum, require_mode, start_daemon

CLUSTER_IP = "10.96.0.10"
HCNP = 32100


def demo(topo: Topology) -> object:
    topo.start_tcp_server("pod1", 8080)
    topo.write_manifest("web.yaml", [
        service("web", cluster_ip=CLUSTER_IP, type_="LoadBalancer", external_local=True,
                health_check_node_port=HCNP, ports=[port(80, target_port=8080, node_port=30080)]),
        endpoint_slice("web", ports=[{"port": 8080}], endpoints=[endpoint("10.244.1.11")]),
    ])
    return start_daemon(topo, "userspace", extra_args=["--healthz-bind-address", f"0.0.0.0:{10256}"])


def raw(topo: Topology, ns: str, ip: str, port_: int, request: bytes, *, timeout: float = 3.0) -> str:
    """Send raw bytes; the status code as text, or "closed" when the server hung up without one."""
    with topo.connect(ns, ip, port_, timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                data += chunk
    if not data.startswith(b"HTTP/"):
        return "closed"
    return data.split()[1].decode()


@pytest.mark.slow
def test_health_servers_answer_only_their_paths_and_bound_requests(topology: Topology, figures: dict) -> None:
    proc = demo(topology)
    tried = 0
    for ip, port_ in ((NODE_IP, 10256), (NODE_IP, HCNP)):
        for request, allowed in (
            (b"GET /metrics HTTP/1.0\r\n\r\n", {"404"}),
            (b"GET /../../etc/passwd HTTP/1.0\r\n\r\n", {"404", "400"}),
            (b"GET /healthz/../metrics HTTP/1.0\r\n\r\n", {"404", "400"}),
            (b"POST /healthz HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", {"405"}),
            (b"GET /healthz HTTP/1.0\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n", {"431", "400", "closed"}),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)), {"400", "closed"}),
            (b"GET /healthz HTTP/1.0\r\n\r\n", {"200"}),
        ):
            got = raw(topology, topology.client, ip, port_, request)
            tried += 1
            assert got in allowed, f"{ip}:{port_} {request[:40]!r} -> {got}"

    # Slowloris: a head that never ends is cut after the head timeout.
    with topology.connect(topology.client, NODE_IP, 10256, timeout=HEAD_TIMEOUT + 5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: 1\r\n")
        started = time.monotonic()
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass
        cut_after = time.monotonic() - started
    assert cut_after <= HEAD_TIMEOUT + 2, f"a stalled request was held {cut_after:.1f}s"

    # A flood of idle connections: bounded, shed, and the server answers again afterwards.
    idle = []
    try:
        for _ in range(MAX_CLIENTS * 2):
            idle.append(topology.connect(topology.client, NODE_IP, 10256, timeout=2))
        # The data path does not care.
        assert topology.hello(topology.pod("pod3").ns, CLUSTER_IP, 80).pod == "pod1"
        wait_until(lambda: raw(topology, topology.client, NODE_IP, 10256,
                               b"GET /healthz HTTP/1.0\r\n\r\n", timeout=2) == "200",
                   timeout=HEAD_TIMEOUT + 5, what="/healthz answers again after the idle flood")
    finally:
        close_all(idle)
    assert proc.poll() is None and healthz(topology) == 200  # type: ignore[attr-defined]
    figures.update(requests_tried=tried + 1 + len(idle), slowloris_cut_seconds=round(cut_after, 2))


def test_listening_sockets_are_only_the_configured_ones(topology: Topology) -> None:
    proc = demo(topology)
    pid = proc.pid  # type: ignore[attr-defined]
    out = topology.ns_run(topology.node, ["ss", "-lntupH"]).stdout
    mine = sorted({line.split()[4] for line in out.splitlines() if f"pid={pid}," in line})
    expected = {
        "0.0.0.0:10256",  # /healthz (as configured here) ...
        "[::]:10256",  # ... a wildcard serves both families, as kube-proxy's Go listener does
        "127.0.0.1:10249",  # /metrics: loopback only
        f"0.0.0.0:{HCNP}",  # healthCheckNodePort, on each family the node serves
        f"[::]:{HCNP}",
        f"{CLUSTER_IP}:80",  # the service
    }
    # NodePort listeners: one per node address (all addresses by default) or the wildcard.
    extra = [addr for addr in mine if addr not in expected and not addr.endswith(":30080")]
    assert not extra, f"unexpected listening sockets: {extra}\n{out}"
    assert expected <= set(mine), f"missing listeners: {expected - set(mine)}\n{out}"
    assert not any(addr.startswith(("0.0.0.0:10249", "*:10249", "[::]:10249")) for addr in mine)
    assert healthz(topology) == 200


def test_crafted_names_cannot_inject_into_iptables_rules(topology: Topology, figures: dict) -> None:
    """Names, labels and annotations built to break out of iptables-restore input, end to end.

    Invalid names are refused (counted); a valid service carrying hostile
    labels and annotations is served, and none of that text reaches the
    kernel's ruleset; no sync fails because of it.
    """
    require_mode("iptables")
    topology.start_tcp_server("pod1", 8080)
    payload = '" -j ACCEPT\n-A INPUT -j DROP-INJECTED\nCOMMIT\n# '
    hostile_names = [f"web{payload}", "web -j ACCEPT", "web\x00nul", "WEB", "-A", "a" * 300, "web;reboot"]
    docs = []
    for i, name in enumerate(hostile_names):
        docs.append(service(name, cluster_ip=f"10.96.1.{i + 1}", ports=[port(80, target_port=8080)]))
        docs.append(endpoint_slice(name, name=f"hostile-{i}", ports=[{"port": 8080}],
                                   endpoints=[endpoint("10.244.1.11")]))
    ok = service("web", cluster_ip=CLUSTER_IP, ports=[port(80, name="http", target_port=8080)],
                 labels={"app": "web"})
    ok["metadata"]["annotations"] = {"note": payload, "x": "\x1b[31m"}
    docs += [ok, endpoint_slice("web", ports=[{"name": "http", "port": 8080}],
                                endpoints=[endpoint("10.244.1.11")])]
    # A hostile port name and namespace on otherwise valid objects.
    docs.append(service("svc2", cluster_ip="10.96.0.20", namespace=f"ns{payload}",
                        ports=[port(80, target_port=8080)]))
    docs.append(service("svc3", cluster_ip="10.96.0.21",
                        ports=[port(80, name=f"p{payload}", target_port=8080)]))
    topology.write_manifest("hostile.yaml", docs)
    proc = start_daemon(topology, "iptables")
    assert topology.hello(topology.client, CLUSTER_IP, 80).pod == "pod1"
    rules = "\n".join(topology.ns_run(topology.node, [tool], check=False).stdout
                      for tool in ("iptables-nft-save", "iptables-legacy-save"))
    for marker in ("DROP-INJECTED", "-A INPUT -j DROP", "reboot", "\x1b", "web -j ACCEPT"):
        assert marker not in rules, f"{marker!r} reached the ruleset"
    for i in range(len(hostile_names)):
        assert f"10.96.1.{i + 1}" not in rules, f"hostile service #{i} was programmed"
    rejected = metric_sum(topology, "proxyd_rejected_objects_total")
    failures = metric_sum(topology, "proxyd_sync_failures_total")
    log = topology.log_of(proc)  # type: ignore[arg-type]
    assert "\x1b" not in log and "\nCOMMIT" not in log
    assert proc.poll() is None and healthz(topology) == 200  # type: ignore[attr-defined]
    figures.update(hostile_objects=len(hostile_names) * 2 + 2, rejected=rejected, sync_failures=failures)
    assert failures == 0, "a crafted object made iptables-restore fail"
    assert rejected >= len(hostile_names)


def test_idle_connection_flood_from_one_source_does_not_take_health_down(topology: Topology) -> None:
    """One client holding idle connections must not make /healthz or a healthCheckNodePort fail for others.

    Both listen on every node address. The kubelet's probe (from the node)
    and a cloud load balancer's check (from elsewhere) decide whether the
    node gets restarted or gets traffic; an unauthenticated peer with a few
    hundred sockets must not be able to decide that for them.
    """
    demo(topology)
    idle = []
    try:
        for port_ in (10256, HCNP):
            for _ in range(MAX_CLIENTS * 2):
                idle.append(topology.connect(topology.client, NODE_IP, port_, timeout=2))
        time.sleep(0.2)
        kubelet = raw(topology, topology.node, "127.0.0.1", 10256, b"GET /healthz HTTP/1.0\r\n\r\n")
        balancer = raw(topology, topology.node2, NODE_IP_TO_NODE2, HCNP, b"GET / HTTP/1.0\r\n\r\n")
    finally:
        close_all(idle)
    assert (kubelet, balancer) == ("200", "200"), (
        f"while one client held {len(idle)} idle connections: /healthz -> {kubelet}, "
        f"healthCheckNodePort -> {balancer}")


_HIJACK = r"""
import json, re, socket, sys
caps = re.search(r"^CapEff:\s*(\S+)$", open("/proc/self/status").read(), re.M).group(1)
out = {"caps": caps, "binds": []}
for proto, ip, port in json.loads(sys.argv[1]):
    for reuseport in (True, False):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((ip, port))
            if proto == "TCP":
                sock.listen(8)
            got = "bound"
        except OSError as err:
            got = err.strerror
        out["binds"].append([proto, ip, port, reuseport, got])
        sock.close()
print(json.dumps(out))
"""


def test_nobody_else_can_bind_proxyds_listeners(topology: Topology, figures: dict) -> None:
    """A capability-less root process cannot join proxyd's ClusterIP or NodePort sockets (issue 14.6).

    With ``SO_REUSEPORT`` on proxyd's listeners any process of the same user (root) could bind the
    same address and port and receive a share of the connections; with ``SO_REUSEADDR`` on a UDP
    socket any process at all could. Tried here with both options, from the node's namespace.
    """
    topology.start_tcp_server("pod1", 8080)
    topology.start_udp_server("pod1", 5353)
    topology.write_manifest("web.yaml", [
        service("web", cluster_ip=CLUSTER_IP, type_="NodePort",
                ports=[port(5000, name="tcp", target_port=8080, node_port=30080),
                       port(5001, name="udp", protocol="UDP", target_port=5353, node_port=30053)]),
        endpoint_slice("web", ports=[{"name": "tcp", "port": 8080},
                                     {"name": "udp", "port": 5353, "protocol": "UDP"}],
                       endpoints=[endpoint("10.244.1.11")]),
    ])
    start_daemon(topology, "userspace")
    assert topology.hello(topology.client, NODE_IP, 30080).pod == "pod1"
    targets = [["TCP", CLUSTER_IP, 5000], ["UDP", CLUSTER_IP, 5001], ["TCP", "0.0.0.0", 30080],
               ["TCP", NODE_IP, 30080], ["UDP", "0.0.0.0", 30053], ["UDP", NODE_IP, 30053]]
    result = topology.ns_run(topology.node, ["capsh", "--drop=all", f"--shell={sys.executable}", "--",
                                             "-c", _HIJACK, json.dumps(targets)])
    report = json.loads(result.stdout)
    assert int(report["caps"], 16) == 0, report
    bound = [b for b in report["binds"] if b[4] == "bound"]
    figures.update(bind_attempts=len(report["binds"]), bound=len(bound))
    assert not bound, f"another process joined proxyd's listeners: {bound}"
    # Still proxyd's: every client reaches the service.
    assert topology.hello(topology.client, NODE_IP, 30080).pod == "pod1"
    assert topology.udp_hello(topology.client, NODE_IP, 30053)[0].pod == "pod1"
