"""KubeSource against the fake API server, through the real kubernetes_asyncio client.

Covers the reflector state machine: paginated lists and first sync only after
complete lists, watch events, resume after a dropped stream without a
relist, relist after 410 (as a status and in the stream) noticing deletions
made during the gap, bookmarks, HTTP errors with backoff and credential
reload, an API outage with the tracker kept, hostile streams, and scale.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import time

import pytest

from proxyd import metrics
from proxyd.config import Config
from proxyd.model import ServiceName
from proxyd.sources.kube import PROXY_LABEL_SELECTOR, Backoff, KubeConfigError, KubeSource
from proxyd.tracker import Tracker
from tests.api.conftest import NODE, endpoint_slice, node, seed, service, wait_for
from tests.api.fake_apiserver import write_kubeconfig

SVC_A = ServiceName("default", "a")


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def endpoints_of(tracker: Tracker, name: ServiceName) -> list[str]:
    sl = [tracker.slice(k) for k in [("default", f"{name.name}-1"), ("default", f"{name.name}-2")]]
    return sorted(ep.ip for s in sl if s is not None for ep in s.endpoints)


# ---------------------------------------------------------------- lists and first sync


async def test_first_sync_only_after_complete_paginated_lists(fake, start_source):
    seed(fake, 1200)
    # The slice list fails twice before it succeeds: the services are in by then.
    fake.fail(500, resource="endpointslices", verb="list", times=2)
    run = await start_source()
    await wait_for(lambda: run.source.resource_versions.get("services") is not None, what="services listed")
    await wait_for(lambda: len(fake.requests_for("endpointslices", "list")) >= 2, what="slice list retried")
    assert len(run.tracker) == 1200
    assert not run.source.ready.is_set(), "ready before the EndpointSlice list completed"
    await asyncio.wait_for(run.source.ready.wait(), 20)
    assert run.tracker.slice(("default", "s1199-1")) is not None
    assert run.changes == [], "on_change before ready"

    pages = fake.requests_for("services", "list")
    assert [p.query.get("limit") for p in pages] == ["500"] * 3
    assert "continue" not in pages[0].query and all(p.query.get("continue") for p in pages[1:])
    for req in fake.requests:
        if req.resource in ("services", "endpointslices"):
            assert req.query["labelSelector"] == PROXY_LABEL_SELECTOR
        else:
            assert req.query["fieldSelector"] == f"metadata.name={NODE}"
    # The first watch starts from the list's resourceVersion.
    await wait_for(lambda: fake.watch_count() == 3, what="three watches")
    watch = fake.requests_for("services", "watch")[0]
    assert watch.query["resourceVersion"] == run.source.resource_versions["services"]
    assert watch.query["allowWatchBookmarks"].lower() == "true"
    assert run.tracker.node_labels["topology.kubernetes.io/zone"] == "zone-a"


async def test_node_list_forbidden_does_not_block_the_first_sync(fake, start_source):
    seed(fake)
    fake.fail(403, resource="nodes", times=1000)
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    assert run.tracker.service(SVC_A) is not None
    assert dict(run.tracker.node_labels) == {}
    fake.fail_next.clear()
    await wait_for(lambda: run.tracker.node_labels.get("topology.kubernetes.io/zone") == "zone-a",
                   what="node labels once allowed")


async def test_expired_continue_token_restarts_the_list(fake, start_source):
    seed(fake, 30)
    run = await start_source(page_limit=10)
    # Expire tokens as soon as the first page was served.
    await wait_for(lambda: bool(fake.requests_for("services", "list")), what="first page")
    fake.expire_continue_tokens()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    assert len(run.tracker) == 30


async def test_list_restarted_after_its_first_page_keeps_every_object(fake, start_source, monkeypatch):
    # The continue token expires right after the first page: the restarted
    # list must deliver the first page's objects again (they were converted
    # but never reached the tracker).
    seed(fake, 30)
    real = fake._list
    served: list[str] = []

    def first_page_then_expire(record, resource, matches):
        response = real(record, resource, matches)
        served.append(resource)
        if served.count("services") == 1 and resource == "services":
            fake.expire_continue_tokens()
        return response

    monkeypatch.setattr(fake, "_list", first_page_then_expire)
    run = await start_source(page_limit=10)
    await asyncio.wait_for(run.source.ready.wait(), 10)
    assert served.count("services") > 3  # restarted: 1 + 3 pages at least
    assert len(run.tracker) == 30


async def test_watch_events_reach_the_tracker(fake, start_source):
    seed(fake)
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    await wait_for(lambda: fake.watch_count() == 3, what="watches")
    fake.apply("services", service("b", "10.96.9.9"))
    fake.apply("endpointslices", endpoint_slice("a-1", "a", ["10.244.0.1", "10.244.0.2"]))
    await wait_for(lambda: run.tracker.service(ServiceName("default", "b")) is not None, what="b added")
    await wait_for(lambda: endpoints_of(run.tracker, SVC_A) == ["10.244.0.1", "10.244.0.2"], what="scaled")
    fake.delete("services", "default", "b")
    await wait_for(lambda: run.tracker.service(ServiceName("default", "b")) is None, what="b deleted")
    # Edited into service-proxy-name: the server's selector turns it into DELETED.
    other_proxy = {"service.kubernetes.io/service-proxy-name": "x"}
    fake.apply("services", service("a", "10.96.0.1", labels=other_proxy))
    await wait_for(lambda: run.tracker.service(SVC_A) is None, what="a selected away")
    fake.apply("nodes", node(zone="zone-b"))
    await wait_for(lambda: run.tracker.node_labels.get("topology.kubernetes.io/zone") == "zone-b",
                   what="zone change")
    assert run.changes, "on_change never called"
    assert time.time() - sample("proxyd_source_last_event_timestamp_seconds") < 30
    assert not fake.requests_for("services", "list")[1:], "a relist happened"


# ---------------------------------------------------------------- dropped streams, 410, bookmarks


@pytest.mark.parametrize("truncate", [False, True], ids=["clean-end", "truncated-chunk"])
async def test_dropped_stream_resumes_without_relist(fake, start_source, truncate):
    seed(fake)
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    await wait_for(lambda: fake.watch_count() == 3, what="watches")
    fake.apply("services", service("b", "10.96.9.9"))
    await wait_for(lambda: run.tracker.service(ServiceName("default", "b")) is not None, what="b")
    seen_rv = run.source.resource_versions["services"]
    before = sample("proxyd_source_reconnects_total", kind="services", reason="dropped")

    fake.drop_watches("services", truncate=truncate)
    # A change while the stream is down is replayed by the resumed watch.
    fake.apply("services", service("c", "10.96.9.10"))
    await wait_for(lambda: run.tracker.service(ServiceName("default", "c")) is not None, what="c")
    watches = fake.requests_for("services", "watch")
    assert len(watches) >= 2
    assert watches[1].query["resourceVersion"] == seen_rv
    assert len(fake.requests_for("services", "list")) == 1, "a dropped stream must not relist"
    if truncate:
        assert sample("proxyd_source_reconnects_total", kind="services", reason="dropped") > before


async def test_backoff_does_not_creep_over_healthy_streams(fake, start_source):
    """Each drop after a working stream is a first failure: resumed at once, every time."""
    seed(fake)
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    for i in range(5):
        await wait_for(lambda: fake.watch_count("services") >= 1, what="watch")
        fake.apply("services", service(f"d{i}", f"10.96.6.{i + 1}"))
        name = ServiceName("default", f"d{i}")
        await wait_for(lambda n=name: run.tracker.service(n) is not None, what="event")
        watches = len(fake.requests_for("services", "watch"))
        fake.drop_watches("services", truncate=True)
        await wait_for(lambda w=watches: len(fake.requests_for("services", "watch")) > w, what="resume")
    assert run.sleeps and all(d == 0.0 for d in run.sleeps), run.sleeps


@pytest.mark.parametrize("as_status", [False, True], ids=["in-stream-error", "http-410"])
async def test_relist_after_410_notices_deletions(fake, start_source, as_status):
    fake.gone_as_status = as_status
    seed(fake, 3)
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    await wait_for(lambda: fake.watch_count() == 3, what="watches")

    if as_status:
        # The stream drops; meanwhile an object goes and history is compacted:
        # the resumed watch gets HTTP 410.
        fake.event_delay = 0.0
        await fake.outage()
        fake.delete("services", "default", "s1")
        fake.compact()
        await fake.recover()
    else:
        fake.delete("services", "default", "s1")
        fake.compact()
        fake.expire_watches("services")
        # The in-stream 410 could arrive before or after the DELETED event;
        # either way the relist must leave s1 gone.
    await wait_for(lambda: len(fake.requests_for("services", "list")) >= 2, what="relist")
    await wait_for(lambda: run.tracker.service(ServiceName("default", "s1")) is None, what="s1 gone")
    assert run.tracker.service(ServiceName("default", "s2")) is not None
    assert sample("proxyd_source_reconnects_total", kind="services", reason="expired") >= 1
    relist = fake.requests_for("services", "list")[-1]
    assert "resourceVersion" not in relist.query or relist.query["resourceVersion"] in ("", "0")


async def test_lists_convert_without_the_cyclic_gc_and_initial_ones_freeze(fake, start_source, monkeypatch):
    from proxyd.sources import kube

    collector: list[bool] = []
    frozen: list[str] = []
    real = kube.service_from_dict

    def spy(raw, notes=None):
        collector.append(gc.isenabled())
        return real(raw, notes)

    monkeypatch.setattr(kube, "service_from_dict", spy)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append("freeze"))
    seed(fake, 3)
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    assert collector == [False] * 3 and gc.isenabled()
    assert len(frozen) == 3  # services, slices and the node: each initial list, once
    await wait_for(lambda: fake.watch_count() == 3, what="watches")
    fake.apply("services", service("s9", "10.96.0.99"))
    await wait_for(lambda: len(collector) == 4, what="watch event converted")
    assert collector[3] is True  # one event: the collector as usual
    fake.compact()
    fake.expire_watches("services")
    await wait_for(lambda: len(fake.requests_for("services", "list")) >= 2, what="relist")
    await wait_for(lambda: len(fake.requests_for("services", "watch")) >= 2, what="watching after the relist")
    assert len(frozen) == 3 and gc.isenabled()  # a relist pauses the collector but freezes nothing


async def test_relist_converts_only_what_changed(fake, start_source, monkeypatch):
    from proxyd.sources import kube

    converted: list[str] = []
    real = kube.service_from_dict

    def counting(raw, notes=None):
        converted.append(raw["metadata"]["name"])
        return real(raw, notes)

    monkeypatch.setattr(kube, "service_from_dict", counting)
    seed(fake, 50)
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    await wait_for(lambda: fake.watch_count() == 3, what="watches")
    assert len(converted) == 50
    converted.clear()
    # s7 changes while the watch is gone and its history compacted: a relist.
    fake.event_delay = 0.0
    await fake.outage()
    fake.apply("services", service("s7", "10.96.0.8", port=81))
    fake.compact()
    await fake.recover()
    await wait_for(lambda: len(fake.requests_for("services", "list")) >= 2, what="relist")
    await wait_for(lambda: run.tracker.service(ServiceName("default", "s7")).ports[0].port == 81,
                   what="s7 changed")
    assert converted == ["s7"]
    assert len(run.tracker) == 50


async def test_bookmarks_advance_the_resource_version(fake, start_source):
    seed(fake)
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    await wait_for(lambda: fake.watch_count() == 3, what="watches")
    # Events for other kinds move the shared counter; a bookmark carries it.
    fake.apply("endpointslices", endpoint_slice("x-1", "x", ["10.244.7.7"]))
    fake.bookmark()
    target = str(fake.rv)
    await wait_for(lambda: run.source.resource_versions["services"] == target, what="bookmark RV")
    fake.compact()  # history before the bookmark is gone: only the bookmark RV is still valid
    fake.drop_watches("services")
    await wait_for(lambda: len(fake.requests_for("services", "watch")) >= 2, what="resume")
    assert fake.requests_for("services", "watch")[1].query["resourceVersion"] == target
    await asyncio.sleep(0.2)
    assert len(fake.requests_for("services", "list")) == 1, "resuming from a bookmark must not relist"


# ---------------------------------------------------------------- errors, outage


@pytest.mark.parametrize("status", [401, 403, 500, 503])
async def test_http_errors_back_off_and_recover(fake, start_source, status):
    seed(fake)
    fake.fail(status, resource="services", verb="list", times=4)
    run = await start_source(backoff=Backoff(initial=0.5, cap=4.0, rng=lambda: 1.0))
    await asyncio.wait_for(run.source.ready.wait(), 10)
    assert [d for d in run.sleeps if d > 0][:4] == [0.5, 1.0, 2.0, 4.0]
    assert sample("proxyd_source_reconnects_total", kind="services", reason=f"http-{status}") >= 4


async def test_401_reloads_credentials(fake, start_source, kubeconfig):
    seed(fake)
    fake.fail(401, resource="services", verb="list")
    # The token rotates: the next attempt must carry the new one.
    write_kubeconfig(kubeconfig, fake.url, token="rotated")
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    lists = fake.requests_for("services", "list")
    assert lists[-1].authorization == "Bearer rotated"


def test_backoff_grows_with_jitter_and_is_capped():
    values = iter([0.0, 1.0] * 20)
    backoff = Backoff(initial=0.5, cap=30.0, rng=lambda: next(values))
    delays = [backoff.delay(n) for n in range(1, 11)]
    assert delays[:4] == [0.25, 1.0, 1.0, 4.0]
    assert max(delays) <= 30.0 and delays[-1] == 30.0
    assert Backoff(initial=0.5, cap=30.0).delay(10_000) <= 30.0


async def outage(fake, start_source, seconds: float, *, real_sleep: bool) -> None:
    seed(fake, 5)
    run = await start_source(real_sleep=real_sleep, backoff=Backoff(initial=0.5, cap=30.0))
    await asyncio.wait_for(run.source.ready.wait(), 10)
    await wait_for(lambda: fake.watch_count() == 3, what="watches")
    await wait_for(lambda: sample("proxyd_source_connected") == 1, what="connected")
    before = run.tracker.take().state
    lists_before = len(fake.requests_for("services", "list"))

    await fake.outage()
    started = time.monotonic()
    await wait_for(lambda: sample("proxyd_source_connected") == 0, what="disconnected")
    while time.monotonic() - started < seconds:
        await asyncio.sleep(0.5)
        # Nothing is removed while the API is down.
        assert len(run.tracker) == 5 and not run.tracker.pending
    reconnects = sum(run.sleeps)
    assert reconnects > 0
    if real_sleep:
        assert max(run.sleeps) <= 30.0
    fake.apply("services", service("late", "10.96.8.8"))  # made while we could not see it
    await fake.recover()
    await wait_for(lambda: run.tracker.service(ServiceName("default", "late")) is not None,
                   timeout=45.0 if real_sleep else 10.0, what="recovery after the outage")
    await wait_for(lambda: sample("proxyd_source_connected") == 1, timeout=45.0, what="reconnected")
    after = run.tracker.take().state
    assert {k: v for k, v in after.service_ports.items() if k.name != "late"} == dict(before.service_ports)
    # History survived the outage: resumed, no relist.
    assert len(fake.requests_for("services", "list")) == lists_before


async def test_outage_keeps_state_fast_clock(fake, start_source):
    seconds = float(os.environ.get("PROXYD_OUTAGE_SECONDS", "3"))
    await outage(fake, start_source, seconds, real_sleep=False)


@pytest.mark.slow
async def test_outage_60s_real_backoff(fake, start_source):
    await outage(fake, start_source, 60.0, real_sleep=True)


async def test_idle_stream_is_resumed(fake, start_source):
    seed(fake)
    run = await start_source(watch_idle_timeout=0.3)
    await asyncio.wait_for(run.source.ready.wait(), 10)
    await wait_for(lambda: len(fake.requests_for("nodes", "watch")) >= 2, what="idle reconnect")
    assert sample("proxyd_source_reconnects_total", kind="nodes", reason="idle") >= 1
    assert len(fake.requests_for("nodes", "list")) == 1


async def test_slow_stream_still_delivers(fake, start_source):
    seed(fake)
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    await wait_for(lambda: fake.watch_count() == 3, what="watches")
    fake.event_delay = 0.05
    for i in range(10):
        fake.apply("services", service(f"slow{i}", f"10.96.5.{i + 1}"))
    await wait_for(lambda: run.tracker.service(ServiceName("default", "slow9")) is not None,
                   what="slow events")


# ---------------------------------------------------------------- hostile input


async def test_hostile_stream_does_not_kill_the_source(fake, start_source):
    seed(fake)
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    await wait_for(lambda: fake.watch_count() == 3, what="watches")

    def count(reason: str) -> float:
        return sample("proxyd_rejected_objects_total", source="kube", kind="services", reason=reason)

    invalid, too_large, bad_json = count("invalid"), count("too-large"), count("bad-json")
    # Lines the stream survives: bad objects are skipped, the stream goes on.
    skipped = [
        b'{"type": "ADDED", "object": {"metadata": {"name": "x", "namespace": "default",'
        b' "resourceVersion": "1"}, "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": "eighty"}]}}}',
        b'{"type": "ADDED", "object": {"metadata": {"name": 12}}}',
        b'{"type": "WEIRD", "object": {"metadata": {"name": "q"}}}',
        json.dumps({"type": "ADDED", "object": {
            "metadata": {"name": "huge", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.7", "externalIPs": ["10.1.1.1"] * 200_000}}}).encode(),
        b'{"pad": "' + b"x" * (17 * 1024 * 1024) + b'"}',  # over MAX_EVENT_BYTES
    ]
    watches = len(fake.requests_for("services", "watch"))
    for line in skipped:
        assert fake.inject_line("services", line) == 1
    fake.apply("services", service("mid", "10.96.7.6"))
    await wait_for(lambda: run.tracker.service(ServiceName("default", "mid")) is not None, timeout=20,
                   what="event after skipped lines")
    assert len(fake.requests_for("services", "watch")) == watches, "a skippable line broke the stream"
    assert count("invalid") >= invalid + 2
    assert count("too-large") >= too_large + 1

    # Lines that make the stream untrustworthy: it is closed and resumed.
    broken = [
        b"this is not json",
        b'{"type": "ADDED"',
        b"[1, 2, 3]",
        b'{"type": 7, "object": {}}',
        b'{"type": "ADDED", "object": "a string"}',
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the recursion limit
        b'{"type": "ERROR", "object": {"code": 500, "message": "internal"}}',
    ]
    for line in broken:
        watches = len(fake.requests_for("services", "watch"))
        # (a dead stream of the fake may linger until its next write fails)
        await wait_for(lambda: fake.watch_count("services") >= 1, what="watch open")
        await asyncio.sleep(0.05)
        assert fake.inject_line("services", line) >= 1
        await wait_for(lambda: len(fake.requests_for("services", "watch")) > watches, what="resumed watch")
    assert count("bad-json") >= bad_json + 3

    fake.apply("services", service("after", "10.96.7.7"))
    await wait_for(lambda: run.tracker.service(ServiceName("default", "after")) is not None, timeout=20,
                   what="events after hostile input")
    assert not run.task.done()
    assert run.tracker.service(ServiceName("default", "x")) is None
    assert run.tracker.service(ServiceName("default", "huge")) is None
    assert len(fake.requests_for("services", "list")) == 1


async def test_invalid_update_keeps_previous_good_version(fake, start_source, caplog):
    seed(fake)
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    await wait_for(lambda: fake.watch_count() == 3, what="watches")
    good = run.tracker.service(SVC_A)
    bad = service("a", "10.96.0.1")
    bad["spec"]["ports"][0]["port"] = 70000
    fake.apply("services", bad)
    await wait_for(lambda: "default/a" in caplog.text and "65535" in caplog.text, what="log line")
    assert run.tracker.service(SVC_A) == good
    # A relist (410) must keep it too.
    fake.expire_watches("services")
    await wait_for(lambda: len(fake.requests_for("services", "list")) >= 2, what="relist")
    await wait_for(lambda: fake.watch_count("services") == 1, what="watch back")
    assert run.tracker.service(SVC_A) == good
    # A deletion always applies.
    fake.delete("services", "default", "a")
    await wait_for(lambda: run.tracker.service(SVC_A) is None, what="deleted")


async def test_list_with_hostile_items(fake, start_source):
    seed(fake)
    fake.objects["services"][("default", "zz")] = {"metadata": {"name": "zz", "namespace": "default"},
                                                   "spec": {"clusterIP": ["not", "a", "string"]}}
    fake.objects["services"][("default", "zzz")] = {"metadata": {"name": "zzz", "namespace": "default"},
                                                    "spec": "nonsense"}
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    assert run.tracker.service(SVC_A) is not None
    assert len(run.tracker) == 1


# ---------------------------------------------------------------- configuration


async def test_no_configuration_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    source = KubeSource(Tracker(NODE), config=Config(node_name=NODE), on_change=lambda: None)
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        await source.run()


@pytest.mark.parametrize("content", ["", "just a string", "{\"clusters\": 5}", "\x00\xff garbage: ["])
async def test_broken_kubeconfig_is_a_clear_error(tmp_path, content):
    path = tmp_path / "kc"
    path.write_text(content)
    source = KubeSource(Tracker(NODE), config=Config(kubeconfig=str(path), node_name=NODE),
                        on_change=lambda: None)
    with pytest.raises(KubeConfigError, match="kubeconfig"):
        await source.run()


# ---------------------------------------------------------------- scale


async def test_10000_services_listed_and_watched(fake, start_source, capsys):
    count = 10_000
    seed(fake, count)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 120)
    listed = time.perf_counter() - started
    assert len(run.tracker) == count
    await wait_for(lambda: fake.watch_count() == 3, what="watches")
    snapshot = run.tracker.take()
    assert len(snapshot.state.service_ports) == count

    started = time.perf_counter()
    for i in range(1, count):
        fake.apply("endpointslices", endpoint_slice(f"s{i}-1", f"s{i}", [f"10.250.{i // 250}.{i % 250 + 1}"]))
    last = ("default", f"s{count - 1}-1")
    await wait_for(lambda: run.tracker.slice(last).endpoints[0].ip.startswith("10.250."),
                   timeout=120, what="10k watch events")
    watched = time.perf_counter() - started
    changed = run.tracker.take().changed
    assert len(changed) == count - 1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with capsys.disabled():  # shown in CI logs even under -q
        print(f"\n10k services + 10k slices: list+convert {listed:.2f}s, 10k slice events {watched:.2f}s, "
              f"max RSS {rss / 1024:.0f} MiB (before {rss_before / 1024:.0f} MiB, includes the fake server)")


def test_fake_label_selectors_match_like_the_api_server():
    from tests.api.fake_apiserver import label_matches, parse_label_selector

    def obj(**labels: str) -> dict:
        return {"metadata": {"labels": labels}}

    kube_proxy = parse_label_selector(PROXY_LABEL_SELECTOR)
    assert label_matches(kube_proxy, obj(app="x"))
    assert not label_matches(kube_proxy, obj(**{"service.kubernetes.io/headless": ""}))
    assert not label_matches(kube_proxy, obj(**{"service.kubernetes.io/service-proxy-name": "other"}))
    reqs = parse_label_selector("app!=web,tier in (a, b),env,!skip,ver==2")
    assert label_matches(reqs, obj(app="db", tier="a", env="p", ver="2"))
    assert not label_matches(reqs, obj(app="web", tier="a", env="p", ver="2"))
    assert not label_matches(reqs, obj(app="db", tier="c", env="p", ver="2"))
    assert not label_matches(reqs, obj(app="db", tier="a", ver="2"))
    assert not label_matches(reqs, obj(app="db", tier="a", env="p", ver="2", skip="1"))
    with pytest.raises(ValueError):
        parse_label_selector("bad key=1")
