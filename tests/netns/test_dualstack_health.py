"""Dual-stack health (issue 16): healthCheckNodePort servers and the healthz/metrics servers on both families.

healthCheckNodePort servers are the daemon's, not a mode's, so userspace mode (which needs no
kernel rules for them) runs these. Without ``--nodeport-addresses`` they listen on 0.0.0.0 and
[::] (the IPv6 socket is IPv6-only, so both bind); with CIDRs of one family only, the other family
keeps every address (kube-proxy's per-family NodePortAddresses). A wildcard healthz or metrics
address answers on both families, as kube-proxy's Go listener on 0.0.0.0 or [::] does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.netns.topology import (
    HEALTHZ,
    NODE_IP,
    NODE_IP6,
    NODE_IP6_TO_NODE2,
    NODE_IP_TO_NODE2,
    endpoint,
    endpoint_slice,
    port,
    service,
    wait_until,
)

HC_PORT = 32101


def local_lb_service(topology) -> None:
    pod = topology.pod_list[0]
    topology.start_tcp_server(pod, 8080)
    topology.write_manifest("demo.yaml", [
        service("web", cluster_ip="10.96.0.10", type_="LoadBalancer", external_local=True,
                health_check_node_port=HC_PORT, ports=[port(80, target_port=8080, node_port=30080)]),
        endpoint_slice("web", ports=[{"port": 8080}], endpoints=[endpoint(pod.ip, node="node1")]),
    ])


def answers(topology, host: str) -> dict:
    last: list[tuple[int, str]] = []

    def ok() -> tuple[int, str] | None:
        last[:] = [topology.http_get(topology.client, host, HC_PORT, "/")]
        return last[0] if last[0][0] == 200 else None

    try:
        _, body = wait_until(ok, timeout=30, what=f"healthCheckNodePort 200 on {host}")
    except TimeoutError as err:
        raise AssertionError(f"{err}; last answer {last}") from None
    return json.loads(body)


def test_health_check_node_port_answers_on_the_node_s_ipv4_and_ipv6_addresses(topology):
    local_lb_service(topology)
    proc = topology.start_proxyd("userspace")
    for host in (NODE_IP, NODE_IP6, NODE_IP6_TO_NODE2):
        answer = answers(topology, host)
        assert answer["service"] == {"namespace": "default", "name": "web"}
        assert answer["localEndpoints"] == 1
    # Moved away: 503 on both families.
    topology.write_manifest("demo.yaml", [
        service("web", cluster_ip="10.96.0.10", type_="LoadBalancer", external_local=True,
                health_check_node_port=HC_PORT, ports=[port(80, target_port=8080, node_port=30080)]),
        endpoint_slice("web", ports=[{"port": 8080}], endpoints=[endpoint(topology.pod_list[0].ip,
                                                                          node="node2")]),
    ])
    for host in (NODE_IP, NODE_IP6):
        wait_until(lambda h=host: topology.http_get(topology.client, h, HC_PORT, "/")[0] == 503, timeout=30,
                   what=f"healthCheckNodePort 503 on {host}")
    assert "families=IPv4+IPv6" in topology.log_of(proc)
    assert topology.stop_proxyd(proc) == 0


def test_nodeport_addresses_of_one_family_leave_the_other_family_on_every_address(topology):
    local_lb_service(topology)
    proc = topology.start_proxyd("userspace", extra_args=["--nodeport-addresses", f"{NODE_IP}/32"])
    answers(topology, NODE_IP)
    answers(topology, NODE_IP6)
    answers(topology, NODE_IP6_TO_NODE2)
    # The other IPv4 node address is outside the CIDR: nothing listens there.
    assert topology.http_get(topology.client, NODE_IP_TO_NODE2, HC_PORT, "/", timeout=1)[0] == 0
    assert topology.stop_proxyd(proc) == 0


def test_healthz_and_metrics_on_ipv6_bind_addresses(topology):
    local_lb_service(topology)
    # [::]:port is every address of both families: start_proxyd's wait on 127.0.0.1 proves the IPv4 twin.
    proc = topology.start_proxyd("userspace", extra_args=[
        "--healthz-bind-address", f"[::]:{HEALTHZ[1]}", "--metrics-bind-address", "[::1]:10249"])
    assert topology.http_get(topology.node, *HEALTHZ, "/healthz")[0] == 200
    assert topology.http_get(topology.client, NODE_IP6, HEALTHZ[1], "/healthz")[0] == 200
    assert topology.http_get(topology.client, NODE_IP, HEALTHZ[1], "/livez")[0] == 200
    status, body = topology.http_get(topology.node, "::1", 10249, "/metrics")
    assert status == 200 and "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in body
    # [::1] is that address only.
    assert topology.http_get(topology.node, "127.0.0.1", 10249, "/metrics", timeout=1)[0] == 0
    assert topology.http_get(topology.client, NODE_IP6, 10249, "/metrics", timeout=1)[0] == 0
    assert topology.stop_proxyd(proc) == 0


def test_healthz_on_an_ipv6_address_only(topology):
    local_lb_service(topology)
    proc = topology.spawn(topology.node, [
        *topology_proxyd_argv(topology), "--healthz-bind-address", f"[{NODE_IP6}]:10256"],
        log_name="proxyd-healthz6")
    wait_until(lambda: topology.http_get(topology.client, NODE_IP6, 10256, "/healthz")[0] == 200, timeout=30,
               what="healthz on the node's IPv6 address")
    assert topology.http_get(topology.client, NODE_IP, 10256, "/healthz", timeout=1)[0] == 0
    assert topology.stop_proxyd(proc) == 0


def topology_proxyd_argv(topology) -> list[str]:
    return [str(Path(sys.executable).parent / "proxyd"), "--proxy-mode", "userspace", "--manifests",
            str(topology.manifests), "--hostname-override", topology.node_name,
            "--metrics-bind-address", "", "--status-socket", ""]
