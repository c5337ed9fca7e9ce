"""Userspace per-service-port series: plain counts on ``Stats``, turned into series at scrape time.

The collector (``stats.SERIES``) must give what the ``prometheus_client``
children gave: the same names, help texts, labels and values, a zero series
per port from the moment the port exists, rejections once a reason happened.
"""

from __future__ import annotations

import gc

from prometheus_client.parser import text_string_to_metric_families

from proxyd import metrics
from proxyd.model import Protocol, ServicePortName
from proxyd.modes.userspace.stats import TO_CLIENT, TO_ENDPOINT, StatsCache

WEB = ServicePortName("stats-test", "web", "http", Protocol.TCP)
DNS = ServicePortName("stats-test", "dns", "", Protocol.UDP)


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of this test's services in the rendered exposition."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.labels.get("service", "").startswith("stats-test/"):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_counts_become_series_at_scrape_time() -> None:
    cache = StatsCache()
    web = cache.get(WEB)
    cache.get(DNS)
    got = scrape()
    # Every port has its zero series from the start.
    assert value(got, "proxyd_connections_total", service="stats-test/web:http", protocol="TCP") == 0
    assert value(got, "proxyd_active_connections", service="stats-test/dns", protocol="UDP") == 0
    assert value(got, "proxyd_bytes_total", service="stats-test/web:http", direction=TO_ENDPOINT) == 0
    assert value(got, "proxyd_connect_retries_total", service="stats-test/web:http") == 0
    assert value(got, "proxyd_connections_created", service="stats-test/web:http",
                 protocol="TCP") == web.created
    assert not [k for k in got if k[0].startswith("proxyd_connections_rejected")]

    web.opened(("10.244.0.1", 8080))
    web.opened()
    web.closed(100, 2000, ("10.244.0.1", 8080))
    web.retry()
    web.retry(2)
    web.reject("no endpoint")
    web.reject_many("no endpoint", 4)
    web.live.append(lambda: 3)  # the native engine's active connections of this port
    got = scrape()
    assert value(got, "proxyd_active_connections", service="stats-test/web:http", protocol="TCP") == 1 + 3
    assert value(got, "proxyd_connect_retries_total", service="stats-test/web:http") == 3
    assert value(got, "proxyd_connections_rejected_total", service="stats-test/web:http",
                 reason="no endpoint") == 5
    # Opened and moved are pushed every flush (the mode's, once a second): not before it.
    assert value(got, "proxyd_connections_total", service="stats-test/web:http", protocol="TCP") == 0
    cache.flush()
    got = scrape()
    assert value(got, "proxyd_connections_total", service="stats-test/web:http", protocol="TCP") == 2
    assert value(got, "proxyd_bytes_total", service="stats-test/web:http", direction=TO_ENDPOINT) == 100
    assert value(got, "proxyd_bytes_total", service="stats-test/web:http", direction=TO_CLIENT) == 2000
    assert web.by_endpoint == {("10.244.0.1", 8080): [1, 100, 2000]}

    # Two caches with the same port (two modes in one process) add up; a cache that is gone is not read.
    other = StatsCache()
    other.get(WEB).opened()
    other.flush()
    assert value(scrape(), "proxyd_connections_total", service="stats-test/web:http", protocol="TCP") == 3
    del cache, web, other
    gc.collect()
    assert scrape() == {}


def test_ten_thousand_ports_cost_no_prometheus_child() -> None:
    cache = StatsCache()
    for i in range(10_000):
        cache.get(ServicePortName("stats-test", f"s{i}", "", Protocol.TCP))
    got = scrape()
    assert sum(1 for name, _ in got if name == "proxyd_connections_total") == 10_000
    del cache
    gc.collect()
