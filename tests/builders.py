"""Builders of the model values tests need: one signature per kind of object, defaults a test can name.

Every unit test builds its ServicePorts, Endpoints, ProxyStates, Services
and EndpointSlices here; a module that wants other defaults binds them with
``functools.partial`` (e.g. the iptables golden tests' ``port_name="p80"``),
so that a change to the model is made in one place. Manifests as a user
writes them (dicts) come from ``netnstopo.topology`` (``service``, ``port``,
``endpoint_slice``, ``endpoint``), shared with the benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from proxyd.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Protocol,
    ProxyState,
    Service,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServiceType,
    SliceEndpoint,
)

TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP


def port_name(name: str = "web", port: str = "", protocol: Protocol = TCP,
              namespace: str = "default") -> ServicePortName:
    return ServicePortName(namespace, name, port, protocol)


def service_port(name: str | ServicePortName = "web", ip: str = "10.96.0.10", *, namespace: str = "default",
                 port_name: str = "", port: int = 80, protocol: Protocol | None = None,
                 type: ServiceType = ServiceType.CLUSTER_IP, **fields: Any) -> ServicePort:
    """A ServicePort; ``name`` is the service's name, or a whole ServicePortName (its protocol wins)."""
    if isinstance(name, ServicePortName):
        spn = name
    else:
        spn = ServicePortName(namespace, name, port_name, protocol or TCP)
    return ServicePort(name=spn, type=type, cluster_ip=ip, port=port, protocol=spn.protocol, **fields)


def _split(addr: str, port: int) -> tuple[str, int]:
    """``ip``, ``ip:port`` or ``[v6]:port``."""
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        return host, int(rest[1:])
    if addr.count(":") == 1:
        host, _, number = addr.partition(":")
        return host, int(number)
    return addr, port


def endpoint(addr: str, port: int = 8080, *, node: str | None = None, **conditions: Any) -> Endpoint:
    """An Endpoint at ``addr`` (an IP, or ``ip:port``); ``serving`` follows ``ready`` unless given."""
    ip, number = _split(addr, port)
    conditions.setdefault("serving", conditions.get("ready", True))
    return Endpoint(ip, number, node_name=node, **conditions)


def slice_endpoint(ip: str, *, node: str | None = None, **conditions: Any) -> SliceEndpoint:
    """One entry of an EndpointSlice; ``serving`` follows ``ready`` unless given."""
    conditions.setdefault("serving", conditions.get("ready", True))
    return SliceEndpoint(ip, node_name=node, **conditions)


def state(*entries: tuple[ServicePort, Iterable[Endpoint]], node: str = "node1",
          labels: Mapping[str, str] | None = None) -> ProxyState:
    """The ProxyState serving ``entries`` (service port, its endpoints) on ``node``."""
    return ProxyState(service_ports=MappingProxyType({sp.name: sp for sp, _ in entries}),
                      endpoints=MappingProxyType({sp.name: tuple(eps) for sp, eps in entries}),
                      node_name=node, node_labels=MappingProxyType(dict(labels or {})))


def service(namespace: str, name: str, *ports: ServicePort) -> Service:
    """A Service with ``ports`` (default: one ClusterIP port 80 of 10.96.0.10)."""
    return Service(name=ServiceName(namespace, name),
                   ports=ports or (service_port(name, namespace=namespace),))


def endpoint_slice(namespace: str, name: str, service: str, ports: Iterable[tuple[str, int, Protocol]],
                   endpoints: Iterable[SliceEndpoint]) -> EndpointSlice:
    """An EndpointSlice of ``service``; ``ports`` as (name, port, protocol)."""
    return EndpointSlice(namespace=namespace, name=name, service=service,
                         ports=tuple(EndpointPort(n, p, proto) for n, p, proto in ports),
                         endpoints=tuple(endpoints))
