"""The real daemon's lifecycle and observability: health, metrics, healthCheckNodePort, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from tests.api.fake_apiserver import write_kubeconfig
from tests.netns.topology import (
    HEALTHZ,
    NODE_IP,
    endpoint,
    endpoint_slice,
    port,
    service,
    wait_until,
)

PROXYD = str(Path(sys.executable).parent / "proxyd")


def demo_manifests(topology, *, node: str = "node1") -> None:
    pod = topology.pod_list[0]
    topology.start_tcp_server(pod, 8080)
    topology.write_manifest("demo.yaml", [
        service("web", cluster_ip="10.96.0.10", type_="LoadBalancer", external_local=True,
                health_check_node_port=32100, ports=[port(80, target_port=8080, node_port=30080)]),
        endpoint_slice("web", ports=[{"port": 8080}], endpoints=[endpoint(pod.ip, node=node)]),
    ])


def test_default_bind_addresses_health_and_metrics(topology):
    demo_manifests(topology)
    proc = topology.spawn(topology.node, [PROXYD, "--proxy-mode", "userspace", "--manifests",
                                          str(topology.manifests), "--hostname-override", "node1"],
                          log_name="proxyd-defaults")
    # /healthz on 0.0.0.0:10256 by default: reachable from outside the node.
    _, body = wait_until(
        lambda: (r := topology.http_get(topology.client, NODE_IP, 10256, "/healthz"))[0] == 200 and r,
        timeout=20, what="healthz from the client")
    payload = json.loads(body)
    assert payload["lastUpdated"] and payload["nodeEligible"] is True
    assert topology.http_get(topology.client, NODE_IP, 10256, "/livez")[0] == 200
    assert topology.http_get(topology.client, NODE_IP, 10256, "/metrics")[0] == 404
    # /metrics on 127.0.0.1:10249 by default: not reachable from outside.
    assert topology.http_get(topology.client, NODE_IP, 10249, "/metrics", timeout=1)[0] == 0
    assert topology.http_get(topology.node, "127.0.0.1", 10249, "/metrics")[0] == 200
    names = ("kubeproxy_sync_proxy_rules_duration_seconds_count",
             "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
             "kubeproxy_network_programming_duration_seconds_count",
             "kubeproxy_sync_proxy_rules_service_changes_total",
             "kubeproxy_sync_proxy_rules_endpoint_changes_total")
    before = {name: topology.metric_sum(name) for name in names}
    assert all(v is not None for v in before.values()), before
    # The first sync has happened (healthz 200): it was timed and stamped, and counted what it applied.
    assert before["kubeproxy_sync_proxy_rules_duration_seconds_count"] >= 1
    assert before["kubeproxy_sync_proxy_rules_last_timestamp_seconds"] > 1.7e9
    assert before["kubeproxy_sync_proxy_rules_service_changes_total"] >= 1
    assert before["kubeproxy_sync_proxy_rules_endpoint_changes_total"] >= 1
    # A change to the service and its endpoints moves every one of them.
    pod2 = topology.pod_list[1]
    topology.write_manifest("demo.yaml", [
        service("web", cluster_ip="10.96.0.10", type_="LoadBalancer", external_local=True,
                health_check_node_port=32100, ports=[port(80, target_port=8080, node_port=30081)]),
        endpoint_slice("web", ports=[{"port": 8080}], endpoints=[endpoint(pod2.ip, node="node1")]),
    ])
    after = wait_until(
        lambda: (now := {name: topology.metric_sum(name) for name in names})
        and all(now[name] > before[name] for name in names) and now,
        timeout=30, what=f"every sync metric moves after a change (before {before})")
    assert after["kubeproxy_network_programming_duration_seconds_count"] >= 1
    assert topology.http_get(topology.node, "127.0.0.1", 10249, "/proxyMode") == (200, "userspace")
    assert topology.stop_proxyd(proc) == 0


def test_sigterm_and_sigint_exit_zero(topology):
    demo_manifests(topology)
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = topology.start_proxyd("userspace")
        assert topology.kill(proc, sig=sig, wait=15) == 0, topology.log_of(proc)


@pytest.mark.parametrize("mode", ["userspace", "iptables"])
def test_healthz_503_with_its_body_before_the_first_sync(topology, tmp_path, mode):
    """An API server that never answers: the first sync never happens, /healthz says 503 meanwhile."""
    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(str(kubeconfig), "http://127.0.0.1:9")  # nothing listens on the discard port
    proc = topology.spawn(topology.node, [
        PROXYD, "--proxy-mode", mode, "--kubeconfig", str(kubeconfig), "--hostname-override", "node1",
        "--healthz-bind-address", f"{HEALTHZ[0]}:{HEALTHZ[1]}"], log_name=f"proxyd-nosync-{mode}")
    # /livez answers once the process serves HTTP; /healthz is served by the same server.
    wait_until(lambda: proc.poll() is not None
               or topology.http_get(topology.node, *HEALTHZ, "/livez")[0] == 200, timeout=60, what="livez")
    # The mode has started and the source has met the silent API server: the steady "never synced"
    # state, not the start (whose own stop is tested below).
    wait_until(lambda: proc.poll() is not None or "relisting in" in topology.log_of(proc), timeout=60,
               what="the source's first failed list")
    assert proc.poll() is None, topology.log_of(proc)[-2000:]
    status, body = topology.http_get(topology.node, *HEALTHZ, "/healthz")
    assert status == 503, (status, body)
    payload = json.loads(body)
    assert set(payload) == {"lastUpdated", "currentTime", "nodeEligible"}, payload
    assert payload["lastUpdated"] == "" and payload["currentTime"].endswith("+0000 UTC")
    assert topology.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds") in (None, 0.0)
    assert topology.stop_proxyd(proc) == 0


_SLOW_TOOL = """#!/bin/sh
# Stand-in for {name}: its first call says so (with its pid), takes {delay} s, then runs the real tool.
first=0
if mkdir {state}/first 2>/dev/null; then
    first=1; echo $$ > {state}/pid; mv {state}/pid {state}/started; sleep {delay}
fi
"{real}" "$@"
rc=$?
[ $first = 1 ] && touch {state}/finished
exit $rc
"""


def _slow_iptables(tmp_path: Path, delay: float) -> tuple[dict[str, str], Path]:
    """A PATH whose ``iptables-nft`` is slow on its first call (the start's canary), and its state dir."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    real = shutil.which("iptables-nft")
    assert real is not None, "iptables-nft is part of the test environment"
    tool = bin_dir / "iptables-nft"
    tool.write_text(_SLOW_TOOL.format(name="iptables-nft", state=state, delay=delay, real=real))
    tool.chmod(0o755)
    path = f"{bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return {"PATH": path, "PROXYD_IPTABLES_BACKEND": "nft"}, state


def _start_with_slow_canary(topology, tmp_path: Path, delay: float):
    demo_manifests(topology)
    env, state = _slow_iptables(tmp_path, delay)
    proc = topology.spawn(topology.node, [
        PROXYD, "--proxy-mode", "iptables", "--manifests", str(topology.manifests), "--hostname-override",
        "node1", "--healthz-bind-address", f"{HEALTHZ[0]}:{HEALTHZ[1]}"], log_name="proxyd-slowstart",
        env=env)
    wait_until(lambda: proc.poll() is not None or (state / "started").exists(), timeout=60,
               what="the start's first iptables-nft call")
    assert proc.poll() is None, topology.log_of(proc)[-2000:]
    return proc, state


def test_sigterm_to_the_process_group_during_start_lets_the_tool_finish_and_exits_0(topology, tmp_path):
    """Ctrl-C or ``kill -TERM -PGID`` while the start runs an iptables tool: the tool is not the target."""
    proc, state = _start_with_slow_canary(topology, tmp_path, delay=3)
    code = topology.kill(proc, sig=signal.SIGTERM, wait=60)  # the daemon's whole process group
    log = topology.log_of(proc)
    assert code == 0, log[-3000:]
    assert (state / "finished").exists(), "the tool in flight was killed with the daemon's group"
    assert "SIGTERM received: stopping" in log and "Traceback" not in log, log[-3000:]


def test_sigterm_reaching_the_start_tool_too_exits_0(topology, tmp_path):
    """A supervisor that signals the whole cgroup (systemd's default) kills the tool as well: still a stop."""
    proc, state = _start_with_slow_canary(topology, tmp_path, delay=30)
    tool = int((state / "started").read_text())
    os.killpg(proc.pid, signal.SIGTERM)
    wait_until(lambda: "SIGTERM received: stopping" in topology.log_of(proc), timeout=30,
               what="the daemon saw its SIGTERM")
    os.killpg(tool, signal.SIGTERM)  # the tool is the leader of its own session (proxyd.daemon)
    code = topology.stop_proxyd(proc, timeout=60)
    log = topology.log_of(proc)
    assert code == 0, log[-3000:]
    assert "start interrupted by the stop request" in log and "Traceback" not in log, log[-3000:]
    assert not (state / "finished").exists()


@pytest.mark.parametrize("mode", ["userspace", "iptables"])
def test_health_check_node_port_follows_local_endpoints(topology, mode):
    demo_manifests(topology)
    proc = topology.start_proxyd(mode)
    _, body = wait_until(
        lambda: (r := topology.http_get(topology.client, NODE_IP, 32100, "/"))[0] == 200 and r,
        timeout=30, what="healthCheckNodePort 200")
    answer = json.loads(body)
    assert answer["service"] == {"namespace": "default", "name": "web"}
    assert answer["localEndpoints"] == 1
    assert topology.http_get(topology.client, NODE_IP, 32100, "/healthz")[0] == 200
    assert topology.http_get(topology.client, NODE_IP, 32100, "/other")[0] == 404
    # The only endpoint moves to another node: this node must stop attracting LB traffic.
    demo_manifests(topology, node="node2")
    _, body = wait_until(
        lambda: (r := topology.http_get(topology.client, NODE_IP, 32100, "/"))[0] == 503 and r,
        timeout=30, what="healthCheckNodePort 503")
    assert json.loads(body)["localEndpoints"] == 0
    topology.stop_proxyd(proc)


def test_unusable_bind_address_exits_1_naming_it(topology):
    demo_manifests(topology)
    result = topology.run_proxyd(["--proxy-mode", "userspace", "--manifests", str(topology.manifests),
                                  "--healthz-bind-address", "192.0.2.77:10256"])
    assert result.returncode == 1
    assert "--healthz-bind-address" in result.stderr


def test_invalid_object_is_counted_and_others_keep_working(topology):
    demo_manifests(topology)
    topology.write_manifest("bad.yaml", [
        service("broken", cluster_ip="10.96.0.300", ports=[port(80)]),
    ])
    proc = topology.start_proxyd("userspace")
    assert topology.hello(topology.node, "10.96.0.10", 80).pod == topology.pod_list[0].name
    rejected = wait_until(lambda: topology.metric("proxyd_rejected_objects_total") or None, timeout=30,
                          what="rejected-object metric")
    assert rejected >= 1
    assert proc.poll() is None
    assert topology.http_get(topology.node, *HEALTHZ, "/healthz")[0] == 200
    topology.stop_proxyd(proc)


def test_unusable_kubeconfig_exits_2_naming_it(topology, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: 7\n")
    result = topology.run_proxyd(["--proxy-mode", "userspace", "--kubeconfig", str(kubeconfig),
                                  "--healthz-bind-address", "127.0.0.1:10256"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--kubeconfig" in result.stderr.strip().splitlines()[-1]


def test_userspace_uses_the_native_connection_table(topology):
    """The daemon says which connection table it runs; with the extension built it must be the native one."""
    import proxyd.modes.userspace.conntable

    demo_manifests(topology)
    proc = topology.start_proxyd("userspace")
    topology.stop_proxyd(proc)
    line = next(line for line in topology.log_of(proc).splitlines() if "connection table:" in line)
    print(line)
    expected = "native (Cython extension)" if proxyd.modes.userspace.conntable.NATIVE else "pure-Python twin"
    assert expected in line
    if os.environ.get("PROXYD_REQUIRE_EXTENSIONS") == "1":
        assert proxyd.modes.userspace.conntable.NATIVE, "the Cython extension is required but not built"


def test_userspace_uses_the_native_tcp_engine(topology):
    """The daemon names its TCP data path; with the extension built (and required in CI) it is the engine."""
    import proxyd.modes.userspace.engine as engine

    demo_manifests(topology)
    proc = topology.start_proxyd("userspace")
    topology.stop_proxyd(proc)
    line = next(line for line in topology.log_of(proc).splitlines() if "TCP data path:" in line)
    expected = "native engine" if engine.NATIVE else "pure-Python twin"
    assert expected in line, line
    if os.environ.get("PROXYD_REQUIRE_EXTENSIONS") == "1":
        assert engine.NATIVE, "the native TCP engine is required but not built"


def test_health_check_node_port_counts_distinct_local_pods_over_ports(topology):
    """Two local pods behind two ports: kube-proxy's LocalReadyEndpoints answers 2, not 4."""
    pods = [p.ip for p in topology.pod_list[:2]]
    topology.write_manifest("two.yaml", [
        service("web", cluster_ip="10.96.0.10", type_="LoadBalancer", external_local=True,
                health_check_node_port=32100,
                ports=[port(80, name="http", target_port=8080, node_port=30080),
                       port(443, name="https", target_port=8443, node_port=30443)]),
        endpoint_slice("web", ports=[{"name": "http", "port": 8080}, {"name": "https", "port": 8443}],
                       endpoints=[endpoint(ip) for ip in pods]),
    ])
    proc = topology.start_proxyd("userspace")
    _, body = wait_until(
        lambda: (r := topology.http_get(topology.client, NODE_IP, 32100, "/"))[0] == 200 and r,
        timeout=10, what="healthCheckNodePort 200")
    assert json.loads(body)["localEndpoints"] == 2
    topology.stop_proxyd(proc)
