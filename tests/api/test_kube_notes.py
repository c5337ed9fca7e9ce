"""The API source gets the same per-address validation and reports (issues 14.5 and 21).

An API server refuses these addresses itself; one that lets them through
(an old or patched server, a mirror, a fake) must not make proxyd serve
them either. Each refusal is logged once per content and counted with its
reason; the rest of the object is served. A Service without a cluster IP
is refused as incomplete: the API source allocates nothing.
"""

from __future__ import annotations

import asyncio
import logging

from proxyd.metrics import REGISTRY
from proxyd.model import ServiceName
from tests.api.conftest import endpoint_slice, node, service, wait_for


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"source": "kube", **labels}) or 0.0


async def test_special_addresses_refused_per_address_and_reported_once(fake, start_source, caplog):
    caplog.set_level(logging.INFO, "proxyd.sources.kube")
    before = {r: sample("proxyd_rejected_objects_total", kind=k, reason=r)
              for k, r in (("services", "unspecified_ip"), ("endpointslices", "loopback_ip"))}
    fake.apply("services", service("web", "10.96.0.10", externalIPs=["0.0.0.0", "192.0.2.10"]))
    fake.apply("endpointslices", endpoint_slice("web-1", "web", ["127.0.0.1", "10.244.0.5"]))
    fake.apply("services", service("bare", ""))
    fake.apply("nodes", node())
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    svc = run.tracker.service(ServiceName("default", "web"))
    assert svc is not None and svc.ports[0].external_ips == ("192.0.2.10",)
    await wait_for(lambda: [e.ip for e in run.tracker.take().state.endpoints.get(svc.ports[0].name, ())]
                   == ["10.244.0.5"], what="the good endpoint only")
    assert run.tracker.service(ServiceName("default", "bare")) is None
    messages = [r.getMessage() for r in caplog.records if r.name == "proxyd.sources.kube"]
    assert [m for m in messages if "spec.externalIPs[0]: 0.0.0.0 may not be unspecified" in m]
    assert [m for m in messages if "endpoints[0].addresses[0]: 127.0.0.1 may not be in the loopback" in m]
    assert [m for m in messages if "'default/bare': skipped: spec.clusterIP: missing" in m]
    assert sample("proxyd_rejected_objects_total", kind="services", reason="unspecified_ip") == \
        before["unspecified_ip"] + 1
    assert sample("proxyd_rejected_objects_total", kind="endpointslices", reason="loopback_ip") == \
        before["loopback_ip"] + 1
    # An unrelated update of the same object repeats nothing.
    fake.apply("services", service("web", "10.96.0.10", externalIPs=["0.0.0.0", "192.0.2.10"],
                                   sessionAffinity="ClientIP"))
    await wait_for(lambda: run.tracker.service(ServiceName("default", "web")).ports[0].affinity_timeout > 0,
                   what="the update")
    assert len([r for r in caplog.records if "0.0.0.0 may not be unspecified" in r.getMessage()]) == 1
