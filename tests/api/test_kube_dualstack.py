"""Dual-stack objects through the API source (issue 16): IPv6 slices and dual-stack Services reach
the tracker, and each family's view of its state; bad mixes are refused with a log line and a metric."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from proxyd.metrics import REGISTRY
from proxyd.model import ServiceName
from tests.api.conftest import endpoint_slice, node, service, wait_for

V4, V6 = "10.96.0.20", "fd00:10:96::20"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"source": "kube", **labels}) or 0.0


def ipv6_slice(name: str, svc: str, ips: list[str]) -> dict[str, Any]:
    obj = endpoint_slice(name, svc, ips)
    obj["addressType"] = "IPv6"
    return obj


async def test_dual_stack_service_and_ipv6_slice_reach_each_family_s_state(fake, start_source):
    fake.apply("services", service("web", V6, clusterIPs=[V6, V4], ipFamilies=["IPv6", "IPv4"],
                                   ipFamilyPolicy="PreferDualStack",
                                   externalIPs=["2001:db8:2::1", "192.0.2.1"]))
    fake.apply("services", service("v6only", "fd00:10:96::21", clusterIPs=["fd00:10:96::21"],
                                   ipFamilies=["IPv6"]))
    fake.apply("endpointslices", endpoint_slice("web-4", "web", ["10.244.0.5"]))
    fake.apply("endpointslices", ipv6_slice("web-6", "web", ["fd00:10:244:1::5"]))
    fake.apply("endpointslices", ipv6_slice("v6only-6", "v6only", ["FD00:10:244:1::6"]))
    fake.apply("nodes", node())
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    svc = run.tracker.service(ServiceName("default", "web"))
    assert svc is not None and svc.ports[0].cluster_ips == (V6, V4)
    name = svc.ports[0].name
    await wait_for(lambda: len(run.tracker.take().state.endpoints.get(name, ())) == 2, what="both slices")
    state = run.tracker.take().state
    v4, v6 = state.for_family(4), state.for_family(6)
    assert v6.service_ports[name].cluster_ip == V6
    assert v6.service_ports[name].external_ips == ("2001:db8:2::1",)
    assert [e.ip for e in v6.endpoints_of(name)] == ["fd00:10:244:1::5"]
    assert v4.service_ports[name].cluster_ip == V4
    assert [e.ip for e in v4.endpoints_of(name)] == ["10.244.0.5"]
    only6 = next(n for n in state.service_ports if n.name == "v6only")
    assert only6 not in v4.service_ports
    assert [e.ip for e in v6.endpoints_of(only6)] == ["fd00:10:244:1::6"]


async def test_bad_family_mixes_are_refused_with_a_log_line_and_a_metric(fake, start_source, caplog):
    caplog.set_level(logging.INFO, "proxyd.sources.kube")
    before_slices = sample("proxyd_rejected_objects_total", kind="endpointslices", reason="invalid")
    before_services = sample("proxyd_rejected_objects_total", kind="services", reason="invalid")
    fake.apply("services", service("web", V4))
    # An IPv6 address in an IPv4 slice, and a SingleStack service with two cluster IPs.
    fake.apply("endpointslices", endpoint_slice("web-mixed", "web", ["10.244.0.5", "fd00:10:244:1::5"]))
    fake.apply("services", service("single", V4, clusterIPs=[V4, V6], ipFamilyPolicy="SingleStack"))
    fake.apply("services", service("order", V4, clusterIPs=[V4, V6], ipFamilies=["IPv6", "IPv4"]))
    fake.apply("nodes", node())
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    assert run.tracker.service(ServiceName("default", "web")) is not None
    assert run.tracker.service(ServiceName("default", "single")) is None
    assert run.tracker.service(ServiceName("default", "order")) is None
    svc = run.tracker.service(ServiceName("default", "web"))
    assert run.tracker.take().state.endpoints.get(svc.ports[0].name, ()) == ()
    messages = [r.getMessage() for r in caplog.records if r.name == "proxyd.sources.kube"]
    assert [m for m in messages if "web-mixed" in m and "endpoints[1].addresses[0]" in m
            and "is not an IPv4 address" in m]
    assert [m for m in messages if "default/single" in m and "SingleStack with two cluster IPs" in m]
    assert [m for m in messages if "default/order" in m and "expected an IPv6 address" in m]
    assert sample("proxyd_rejected_objects_total", kind="endpointslices", reason="invalid") == \
        before_slices + 1
    assert sample("proxyd_rejected_objects_total", kind="services", reason="invalid") == before_services + 2
