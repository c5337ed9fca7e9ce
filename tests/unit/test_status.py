"""The status service, its client's rendering, the rejected-objects registry and JSON logs, without root."""

# Raw requests and expected text read best one per line.
# ruff: noqa: E501

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import socket
import sys
import tempfile

import pytest

from proxyd import rejections
from proxyd.cli import main as cli_main
from proxyd.cli import parse_args
from proxyd.introspect import ModeStatus, TracePacket, TracePath, TraceResult, merge_paths
from proxyd.logformat import EVENT_KEYS, JsonFormatter, event
from proxyd.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName, ServiceType
from proxyd.modes.base import ProxyMode, SyncRequest
from proxyd.modes.ipvs.introspect import build_status as ipvs_status
from proxyd.modes.ipvs.introspect import build_trace as ipvs_trace
from proxyd.modes.ipvs.introspect import dest_counters
from proxyd.modes.ipvs.planner import Plan, RealServer, VirtualServer, VSKey
from proxyd.status import StatusService, parse_trace_request, port_json, service_for
from proxyd.statusclient import ask, render_status, render_trace

NODE = "node1"
WEB = ServicePortName("default", "web", "http", Protocol.TCP)
DNS = ServicePortName("kube-system", "dns", "", Protocol.UDP)


def state() -> ProxyState:
    web = ServicePort(name=WEB, type=ServiceType.NODE_PORT, cluster_ip="10.96.0.10", port=80,
                      protocol=Protocol.TCP, node_port=30080, external_policy_local=True, affinity_timeout=60)
    dns = ServicePort(name=DNS, type=ServiceType.CLUSTER_IP, cluster_ip="10.96.0.53", port=53, protocol=Protocol.UDP)
    eps = (Endpoint("10.244.1.2", 8080, node_name=NODE), Endpoint("10.244.2.2", 8080, node_name="node2"),
           Endpoint("10.244.1.3", 8080, ready=False, serving=True, terminating=True, node_name=NODE))
    return ProxyState(service_ports={WEB: web, DNS: dns}, endpoints={WEB: eps, DNS: ()}, node_name=NODE)


class FakeMode(ProxyMode):
    name = "fake"
    asked: list = []

    async def sync(self, request: SyncRequest) -> None:
        return None

    async def status(self, names=None) -> ModeStatus:
        self.asked.append(names)
        return ModeStatus(matches=True, counters={"default/web:http/TCP": {"10.244.1.2:8080": {"packets": 4},
                                                                          "10.9.9.9:1": {"packets": 1}}})

    async def trace(self, packet: TracePacket) -> TraceResult:
        return TraceResult(source="fake", paths=[TracePath("ACCEPT", "10.244.1.2:8080", 1.0, False, ("a", "b"))])

    @classmethod
    async def cleanup(cls, config) -> None:
        return None


def service() -> StatusService:
    svc = StatusService(mode=FakeMode(parse_args(["--manifests", "/"])), mode_name="fake", node_name=NODE)
    svc.synced(state(), full=True, duration=0.01, when=1000.0)
    return svc


def test_port_json_uses_policy_for_endpoints_in_use():
    web = port_json(state().service_ports[WEB], state().endpoints[WEB], node_name=NODE, node_zone=None)
    by_addr = {ep["address"]: ep for ep in web["endpoints"]}
    assert by_addr["10.244.1.2:8080"]["in_use"] == ["cluster-ip", "external"]
    assert by_addr["10.244.2.2:8080"]["in_use"] == ["cluster-ip"]  # remote: not for Local external traffic
    assert by_addr["10.244.1.3:8080"]["state"] == "serving-terminating"
    assert by_addr["10.244.1.3:8080"]["in_use"] == []  # a ready endpoint exists
    assert web["external_traffic_policy"] == "Local" and web["session_affinity"] == "ClientIP"
    summary = port_json(state().service_ports[WEB], state().endpoints[WEB], node_name=NODE, node_zone=None,
                        counters={"10.244.1.2:8080": {"packets": 2}, "10.244.2.2:8080": {"packets": 3}},
                        detail=False)
    assert summary["endpoint_counts"] == {"total": 3, "ready": 2, "local": 2, "terminating": 1,
                                          "in_use_cluster_ip": 2, "in_use_external": 1}
    assert summary["counters"] == {"packets": 5} and "endpoints" not in summary


def test_status_answer_filters_and_attaches_counters():
    svc = service()
    rejections.RECENT.clear()
    rejections.record("manifests", "Service", "default/bad (in bad.yaml)", "spec.ports[0].port: 70000 > 65535")
    answer = asyncio.run(svc.status({"namespace": "default"}))
    assert answer["detail"] is True and [s["name"] for s in answer["services"]] == ["default/web:http"]
    assert FakeMode.asked[-1] == [WEB]  # the mode is asked for the selected ports only
    [web] = answer["services"]
    assert {ep["address"]: ep.get("counters") for ep in web["endpoints"]}["10.244.1.2:8080"] == {"packets": 4}
    assert web["other_kernel_endpoints"] == {"10.9.9.9:1": {"packets": 1}}
    assert answer["rejected"][0]["reason"].startswith("spec.ports")
    whole = asyncio.run(svc.status({}))
    assert whole["detail"] is False and whole["service_ports_total"] == 2 and FakeMode.asked[-1] is None
    assert whole["sync"]["last"] == 1000.0 and whole["sync"]["full"] is True


@pytest.mark.parametrize("raw", [b"", b"nul\x00l", b"[]", b'"op"', b'{"op": 3}', b'{"op": "status", "name": 7}',
                                 b'{"op": "status", "detail": "yes"}', b'{"op": "trace"}',
                                 b'{"op": "trace", "src": "1.2.3.4", "dst": "1.2.3.5", "port": true}',
                                 b'{"op": "trace", "src": "1.2.3.4", "dst": "1.2.3.5", "port": 80, "protocol": "icmp"}',
                                 b'{"op": "status", "namespace": "' + b"x" * 300 + b'"}', b"\xff\xfe"])
def test_bad_requests_get_an_error(raw):
    assert "error" in asyncio.run(service().answer(raw))


def test_parse_trace_request_and_service_lookup():
    pkt = parse_trace_request({"src": "10.244.1.9", "dst": "10.96.0.10", "port": 80, "protocol": "TCP"})
    assert pkt == TracePacket("10.244.1.9", "10.96.0.10", 80, "tcp")
    assert service_for(state(), pkt, []) == ("default/web:http", "cluster IP")
    assert service_for(state(), TracePacket("1.1.1.1", "192.0.2.1", 30080), ["192.0.2.1"]) == (
        "default/web:http", "node port")
    assert service_for(state(), TracePacket("1.1.1.1", "10.96.0.10", 80, "udp"), []) is None


def test_service_lookup_finds_a_dual_stack_port_by_either_cluster_ip():
    base = state()
    web = dataclasses.replace(base.service_ports[WEB], secondary_cluster_ip="fd00:10:96::10")
    dual = ProxyState(service_ports={WEB: web}, endpoints={WEB: ()}, node_name=NODE)
    for dst in ("10.96.0.10", "fd00:10:96::10"):
        assert service_for(dual, TracePacket("fd00::1", dst, 80), []) == ("default/web:http", "cluster IP")
    assert service_for(base, TracePacket("fd00::1", "fd00:10:96::10", 80), []) is None


def test_socket_round_trip_and_stale_socket():
    async def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "sub", "status.sock")
            os.makedirs(os.path.dirname(path))
            stale = socket.socket(socket.AF_UNIX)
            stale.bind(path)
            stale.close()  # a socket file nobody listens on, as a killed daemon leaves
            svc = service()
            assert await svc.start(path)
            assert os.stat(path).st_mode & 0o777 == 0o600
            answer = await asyncio.to_thread(ask, path, {"op": "trace", "src": "10.244.1.9", "dst": "10.96.0.10",
                                                         "port": 80, "protocol": "tcp"})
            assert answer["service"] == "default/web:http" and answer["paths"][0]["endpoint"] == "10.244.1.2:8080"
            other = service()
            assert not await other.start(path)  # a live daemon keeps its socket
            await svc.close()
            assert not os.path.exists(path)
            made = service()
            deep = os.path.join(tmp, "new", "status.sock")
            assert await made.start(deep)
            await made.close()
            assert not os.path.exists(os.path.dirname(deep))  # a directory it made goes with it

    asyncio.run(run())


def test_render_text():
    svc = service()
    out = io.StringIO()
    render_status(asyncio.run(svc.status({"name": "web"})), out)
    text = out.getvalue()
    assert "default/web:http TCP NodePort  10.96.0.10:80  NodePort 30080" in text
    assert "externalTrafficPolicy Local" in text and "packets=4" in text and "(kernel only)" in text
    out = io.StringIO()
    render_status(asyncio.run(svc.status({})), out)
    assert "endpoints 3 (2 ready, 2 local) in use 2/1 external  affinity 60s  packets=5" in out.getvalue()
    out = io.StringIO()
    render_trace(asyncio.run(svc.trace({"src": "10.244.1.9", "dst": "10.96.0.10", "port": 80})), out)
    assert "100.0%  -> 10.244.1.2:8080  not masqueraded" in out.getvalue() and "a > b" in out.getvalue()


def test_merge_paths_adds_odds():
    a = TracePath("ACCEPT", "1.1.1.1:1", 0.25, False, ("x",))
    merged = merge_paths([a, a, TracePath("ACCEPT", "2.2.2.2:2", 0.5, False, ("y",))])
    assert [(p.endpoint, p.odds) for p in merged] == [("1.1.1.1:1", 0.5), ("2.2.2.2:2", 0.5)]


def test_rejections_are_bounded_and_newest_first():
    reg = rejections.Rejections(limit=3)
    for i in range(5):
        reg.record("kube", "Service", f"ns/s{i}", "bad")
    reg.record("kube", "Service", "ns/s2", "worse")
    assert [r.object for r in reg.recent()] == ["ns/s2", "ns/s4", "ns/s3"]
    assert reg.recent()[0].reason == "worse"
    reg.forget("kube", "Service", "ns/s4")
    assert [r.object for r in reg.recent()] == ["ns/s2", "ns/s3"]
    reg.record("kube", "Service", "x" * 10_000, "y" * 10_000)
    assert len(reg.recent()[0].object) == rejections.MAX_TEXT


def test_json_log_lines_have_stable_keys():
    fmt = JsonFormatter()
    record = logging.LogRecord("proxyd.x", logging.WARNING, __file__, 1, "endpoint %s refused\nsecond line",
                               ("1.2.3.4:80",), None)
    record.__dict__.update(event(service="ns/web:http", endpoint="1.2.3.4:80", reason="loop"))
    line = fmt.format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert set(EVENT_KEYS) <= set(data) and data["service"] == "ns/web:http" and data["level"] == "warning"
    try:
        raise ValueError("boom")
    except ValueError:
        plain = logging.LogRecord("proxyd", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    data = json.loads(fmt.format(plain))
    assert data["service"] is None and data["reason"] is None and "ValueError: boom" in data["error"]


def test_cli_flags_and_subcommands(capsys):
    config = parse_args(["--manifests", "/", "--log-format", "json", "--status-socket", ""])
    assert config.log_format == "json" and config.status_socket is None
    assert parse_args(["--manifests", "/"]).status_socket == "/run/proxyd/status.sock"
    with pytest.raises(Exception):
        parse_args(["--manifests", "/", "--log-format", "xml"])
    with tempfile.TemporaryDirectory() as tmp:
        assert cli_main(["status", "--socket", os.path.join(tmp, "none.sock")]) == 1
    assert "cannot ask the daemon" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["trace", "1.2.3.4"])
    assert exc.value.code == 2


def test_ipvs_status_and_trace_from_a_dumped_table():
    key = VSKey("10.96.0.10", 80, Protocol.TCP)
    vs = VirtualServer(key, "rr")
    table = {key: (vs, {RealServer("10.244.1.2", 8080): {"weight": 1, "active": 2, "connections": 7},
                        RealServer("10.244.2.2", 8080): {"weight": 1, "active": 0, "connections": 3},
                        RealServer("10.244.1.3", 8080): {"weight": 0, "active": 1, "connections": 1}})}
    plan = Plan(servers={key: vs}, destinations={key: (RealServer("10.244.1.2", 8080),
                                                       RealServer("10.244.2.2", 8080))})
    st = state()
    status = ipvs_status(table, plan, st)
    assert status.matches is True
    assert status.counters["default/web:http/TCP"]["10.244.1.2:8080"] == {"active": 2, "connections": 7}
    missing = ipvs_status({}, plan, st)
    assert missing.matches is False and "virtual server 10.96.0.10:80/TCP missing" in missing.mismatches
    trace = ipvs_trace(table, TracePacket("10.244.1.9", "10.96.0.10", 80), st, cluster_cidrs=("10.244.0.0/16",))
    assert {(p.endpoint, p.odds, p.masquerade) for p in trace.paths} == {
        ("10.244.1.2:8080", 0.5, False), ("10.244.2.2:8080", 0.5, False)}  # weight 0: draining, never picked
    outside = ipvs_trace(table, TracePacket("203.0.113.2", "10.96.0.10", 80), st, cluster_cidrs=("10.244.0.0/16",))
    assert all(p.masquerade for p in outside.paths)
    none = ipvs_trace(table, TracePacket("10.244.1.9", "10.96.0.99", 80), st)
    assert none.paths[0].reason.startswith("not a service address")
    assert dest_counters({"IPVS_DEST_ATTR_WEIGHT": 1, "IPVS_DEST_ATTR_STATS": {
        "attrs": [("IPVS_STATS_ATTR_CONNS", 5), ("IPVS_STATS_ATTR_INBYTES", 100), ("IPVS_STATS_ATTR_CPS", 9)]}}) == {
        "weight": 1, "active": 0, "inactive": 0, "connections": 5, "bytes_in": 100}


def test_summary_cache_follows_changes():
    from dataclasses import replace

    from proxyd.status import SummaryCache

    st = state()
    cache = SummaryCache()
    first = {s["name"]: s for s in cache.summaries(st, [WEB, DNS], None)}
    assert first["default/web:http"]["endpoint_counts"]["ready"] == 2
    fewer = dict(st.endpoints)
    fewer[WEB] = st.endpoints[WEB][:1]
    changed = replace(st, endpoints=fewer)
    again = {s["name"]: s for s in cache.summaries(changed, [WEB, DNS], ModeStatus(counters={
        "default/web:http/TCP": {"10.244.1.2:8080": {"packets": 9}}}))}
    assert again["default/web:http"]["endpoint_counts"]["total"] == 1
    assert again["default/web:http"]["counters"] == {"packets": 9}
    assert again["kube-system/dns/UDP".replace("/UDP", "")]["counters"] == {}
    zoned = replace(changed, node_labels={"topology.kubernetes.io/zone": "a"})
    assert cache.summaries(zoned, [WEB], None)[0]["endpoint_counts"]["total"] == 1
