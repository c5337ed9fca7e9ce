"""healthCheckNodePort servers: one HTTP server per port of services with externalTrafficPolicy Local.

``ServiceHealthServers`` (kube-proxy's pkg/proxy/healthcheck service
servers) answers kube-proxy's JSON body with 200 while this node has a
local endpoint and the proxier is healthy (``health.ProxierHealth``), 503
otherwise, so that cloud load balancers steer traffic only to nodes that
can serve it. Reconciled after every sync.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from proxyd.health import ProxierHealth
from proxyd.httpserve import HttpServer, Response
from proxyd.model import ProxyState, ServiceName
from proxyd.policy import local_endpoint_counts

log = logging.getLogger(__name__)


class ServiceHealthServers:
    """healthCheckNodePort servers, reconciled after every sync."""

    def __init__(self, *, addresses: Callable[[], Awaitable[list[str]]], health: ProxierHealth) -> None:
        self._addresses = addresses
        self._health = health
        self._servers: dict[int, list[HttpServer]] = {}
        self._answers: dict[int, tuple[ServiceName, int]] = {}

    def _answer(self, port: int) -> Response:
        service, count = self._answers[port]
        proxy_healthy = self._health.healthy()
        body = json.dumps({"service": {"namespace": service.namespace, "name": service.name},
                           "localEndpoints": count, "serviceProxyHealthy": proxy_healthy}).encode()
        return (200 if count > 0 and proxy_healthy else 503), "application/json", body

    async def update(self, state: ProxyState) -> None:
        # kube-proxy's LocalReadyEndpoints: distinct local ready IPs per service, over all its ports
        # (two pods behind two ports are 2, not 4).
        counts = local_endpoint_counts(state)
        wanted: dict[int, tuple[ServiceName, int]] = {}
        for name, svc in state.service_ports.items():
            if not svc.health_check_node_port or not svc.uses_local_external:
                continue
            wanted[svc.health_check_node_port] = (name.service, counts.get(name.service, 0))
        self._answers = wanted
        for port in set(self._servers) - set(wanted):
            for server in self._servers.pop(port):
                await server.close()
        for port in set(wanted) - set(self._servers):
            servers = []
            for host in await self._addresses():
                answer = lambda port=port: self._answer(port)  # noqa: E731
                # Cloud load balancers probe "/" or "/healthz" (kube-proxy's mux answered both).
                server = HttpServer({"/": answer, "/healthz": answer}, name=f"healthcheck:{port}")
                try:
                    await server.start(host, port)
                except OSError as err:
                    log.warning("healthCheckNodePort %d on %s: cannot listen: %s", port, host, err)
                    continue
                servers.append(server)
            self._servers[port] = servers

    async def close(self) -> None:
        for servers in self._servers.values():
            for server in servers:
                await server.close()
        self._servers.clear()
