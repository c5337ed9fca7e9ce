"""/healthz semantics (kube-proxy's ProxierHealthServer) and healthCheckNodePort answers."""

from __future__ import annotations

import json

from proxyd.health import ProxierHealth


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(timeout: float = 60.0) -> tuple[ProxierHealth, FakeClock]:
    clock = FakeClock()
    return ProxierHealth(timeout=timeout, clock=clock, wall=lambda: 1.7e9 + clock.now), clock


def test_unhealthy_until_first_sync():
    health, _ = make()
    assert not health.healthy()
    status, ctype, body = health.healthz()
    assert status == 503 and ctype == "application/json"
    assert json.loads(body)["lastUpdated"] == ""
    health.updated()
    assert health.healthy()
    status, _, body = health.healthz()
    assert status == 200
    assert set(json.loads(body)) == {"lastUpdated", "currentTime", "nodeEligible"}


def test_queued_change_turns_unhealthy_only_after_timeout():
    health, clock = make(timeout=60)
    health.updated()
    health.queued()
    clock.now += 59
    assert health.healthy()
    health.queued()  # a later queue does not move the oldest timestamp
    clock.now += 2
    assert not health.healthy()
    health.updated()
    assert health.healthy()


def test_failed_syncs_keep_oldest_queue_time():
    health, clock = make(timeout=10)
    health.updated()
    for _ in range(5):  # a failing sync re-queues each time
        health.queued()
        clock.now += 3
    assert not health.healthy()


def _lb_local_state(ports: int, pods: tuple[str, ...]):
    from proxyd.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName, ServiceType

    services = {}
    endpoints = {}
    for i in range(ports):
        name = ServicePortName("default", "web", f"p{i}", Protocol.TCP)
        services[name] = ServicePort(name=name, type=ServiceType.LOAD_BALANCER, cluster_ip="10.96.0.10",
                                     port=80 + i, protocol=Protocol.TCP, node_port=30080 + i,
                                     external_policy_local=True, health_check_node_port=32100)
        endpoints[name] = tuple(Endpoint(ip=ip, port=8080 + i, node_name="node1") for ip in pods)
    return ProxyState(service_ports=services, endpoints=endpoints, node_name="node1")


async def test_health_check_node_port_counts_distinct_local_ips_over_ports():
    """Two local pods behind two ports are 2 local endpoints (kube-proxy's LocalReadyEndpoints), not 4."""
    from proxyd.healthcheck import ServiceHealthServers

    health, _ = make()
    health.updated()
    async def no_address() -> list[str]:
        return []

    servers = ServiceHealthServers(addresses=no_address, health=health)  # no address: answers only
    await servers.update(_lb_local_state(2, ("10.244.1.11", "10.244.1.12")))
    status, _, body = servers._answer(32100)
    assert status == 200
    assert json.loads(body)["localEndpoints"] == 2
    await servers.update(_lb_local_state(3, ("10.244.1.11",)))
    assert json.loads(servers._answer(32100)[2])["localEndpoints"] == 1
    await servers.close()


def test_healthz_body_names_listen_failures_keeping_the_status():
    failures = {"10.96.0.10:53/UDP": "Permission denied", "10.96.0.10:53/TCP": "Permission denied"}
    health = ProxierHealth(timeout=60, listen_failures=lambda: failures)
    health.updated()
    status, _, body = health.healthz()
    answer = json.loads(body)
    assert status == 200
    assert answer["listenFailures"] == failures and answer["listenFailuresTotal"] == 2
    failures.clear()
    assert "listenFailures" not in json.loads(health.healthz()[2])
