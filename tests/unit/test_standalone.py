"""Issue 21 without root: kubectl-generated manifests through the manifests source and ``proxyd check``.

The same code path as the daemon (``ManifestSource`` → ``Tracker``), real
``kubectl --dry-run=client`` output for every service type, a hand-written
Endpoints object next to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxyd import check
from proxyd.metrics import REGISTRY
from proxyd.model import ServiceType
from proxyd.sources.allocate import Allocator, Ranges
from proxyd.sources.manifests import ManifestSource
from proxyd.tracker import Tracker
from tests.kubectl import SERVICE_TYPES, endpoints, kubectl_service

LOGGER = "proxyd.sources.manifests"
RANGE = ipaddress.ip_network("10.96.0.0/16")
RANGES = Ranges(cluster=(RANGE,))
ROOT = Path(__file__).resolve().parents[2]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"source": "manifests", **labels}) or 0.0


def write_kubectl_dir(directory: Path, types=SERVICE_TYPES) -> None:
    for type_ in types:
        name = f"web-{type_}"
        eps = yaml.safe_dump(endpoints(name, ["10.244.1.2", "10.244.1.3"]))
        (directory / f"{name}.yaml").write_text(kubectl_service(type_, name) + "---\n" + eps)


def scan(directory: Path, ranges: Ranges = RANGES, node: str = "node1") -> tuple[Tracker, ManifestSource]:
    """One full read as the daemon does it at start (its worker-thread scan, then the tracker)."""
    tracker = Tracker(node)
    source = ManifestSource(str(directory), tracker, on_change=lambda: None, use_inotify=False,
                            allocator=Allocator(ranges))
    source.read_all()
    return tracker, source


def served(tracker: Tracker) -> dict:
    return {str(name): port for name, port in tracker.take().state.service_ports.items()}


@pytest.mark.parametrize("type_", SERVICE_TYPES)
def test_kubectl_service_is_served_after_allocation(tmp_path, type_, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    write_kubectl_dir(tmp_path, [type_])
    tracker, _ = scan(tmp_path)
    state = tracker.take().state
    (name,) = state.service_ports
    port = state.service_ports[name]
    assert str(name) == f"default/web-{type_}:80-8080"
    assert ipaddress.ip_address(port.cluster_ip) in RANGE
    assert port.type is ServiceType({"clusterip": "ClusterIP", "nodeport": "NodePort",
                                     "loadbalancer": "LoadBalancer"}[type_])
    if type_ == "clusterip":
        assert port.node_port == 0
    else:
        assert 30000 <= port.node_port <= 32767
    assert sorted(e.ip for e in state.endpoints[name]) == ["10.244.1.2", "10.244.1.3"]
    (line,) = [r.getMessage() for r in caplog.records if "allocated" in r.getMessage()]
    assert f"Service default/web-{type_}: allocated clusterIP {port.cluster_ip}" in line


@pytest.mark.parametrize("type_", SERVICE_TYPES)
def test_kubectl_service_without_range_is_refused_naming_the_flag(tmp_path, type_, caplog):
    write_kubectl_dir(tmp_path, [type_])
    before = sample("proxyd_rejected_objects_total", kind="Service", reason="no_cluster_ip")
    tracker, source = scan(tmp_path, Ranges())
    assert tracker.take().state.service_ports == {}
    (line,) = [r for r in caplog.records
               if r.name == LOGGER and "no --service-cluster-ip-range" in r.getMessage()]
    assert line.levelno == logging.ERROR
    assert line.getMessage() == (
        f"manifests web-{type_}.yaml: Service default/web-{type_} is refused: spec.clusterIP: missing, "
        "and no --service-cluster-ip-range to allocate one from (set spec.clusterIP, or start proxyd with "
        "--service-cluster-ip-range CIDR)")
    assert sample("proxyd_rejected_objects_total", kind="Service", reason="no_cluster_ip") == before + 1
    # Once per content: another scan of the unchanged directory says nothing more.
    source.read_all()
    assert len([r for r in caplog.records if "no --service-cluster-ip-range" in r.getMessage()]) == 1


def test_allocation_agrees_across_restarts_and_file_order(tmp_path):
    write_kubectl_dir(tmp_path)
    first = served(scan(tmp_path)[0])
    assert len({p.cluster_ip for p in first.values()}) == 3
    assert served(scan(tmp_path)[0]) == first  # a restart
    # Another VM with the same files written in another order (other inodes, mtimes).
    other = tmp_path / "other"
    other.mkdir()
    for path in sorted(tmp_path.glob("*.yaml"), reverse=True):
        (other / path.name).write_text(path.read_text())
    assert served(scan(other)[0]) == first


def test_explicit_addresses_are_never_allocated(tmp_path):
    write_kubectl_dir(tmp_path)
    first = served(scan(tmp_path)[0])
    taken = first["default/web-nodeport:80-8080"]
    # Someone writes a service holding exactly what web-nodeport was given: the explicit one wins.
    (tmp_path / "pinned.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "pinned"},
        "spec": {"type": "NodePort", "clusterIP": taken.cluster_ip,
                 "ports": [{"port": 81, "nodePort": taken.node_port}]}}))
    now = served(scan(tmp_path)[0])
    assert now["default/pinned"].cluster_ip == taken.cluster_ip
    assert now["default/web-nodeport:80-8080"].cluster_ip != taken.cluster_ip
    assert now["default/web-nodeport:80-8080"].node_port != taken.node_port


def test_every_object_not_served_is_logged_once_with_a_reason(tmp_path, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    docs = [
        yaml.safe_load(kubectl_service("clusterip", "headless", tcp="", extra=("--clusterip=None",))),
        yaml.safe_load(kubectl_service("externalname", "ext", tcp="",
                                       extra=("--external-name=example.com",))),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mine", "labels": {
            "service.kubernetes.io/service-proxy-name": "other"}}, "spec": {"ports": [{"port": 1}]}},
        {"just": "a mapping"},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "exposed"},
         "spec": {"clusterIP": "10.96.0.10", "externalIPs": ["0.0.0.0", "127.0.0.2", "169.254.169.254",
                                                             "192.0.2.10"], "ports": [{"port": 80}]}},
    ]
    (tmp_path / "all.yaml").write_text(yaml.safe_dump_all(docs))
    counts = {r: sample("proxyd_ignored_objects_total", kind=k, reason=r) for k, r in (
        ("Service", "headless"), ("Service", "external_name"), ("other", "unsupported_kind"),
        ("Service", "service_proxy_name"), ("unknown", "no_kind"))}
    refused = {r: sample("proxyd_rejected_objects_total", kind="Service", reason=r)
               for r in ("unspecified_ip", "loopback_ip", "link_local_ip")}
    tracker, source = scan(tmp_path)
    state = tracker.take().state
    assert {str(n) for n in state.service_ports} == {"default/exposed"}
    assert next(iter(state.service_ports.values())).external_ips == ("192.0.2.10",)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    expect = [
        (logging.INFO, "Service default/headless spec.clusterIP: headless"),
        (logging.INFO, "Service default/ext spec.type: ExternalName"),
        (logging.INFO, "v1 ConfigMap default/settings is ignored: a kind proxyd does not use"),
        (logging.INFO, "Service default/mine metadata.labels: labelled service.kubernetes.io/service-proxy"),
        (logging.WARNING, "object #5 is ignored: no apiVersion and kind"),
        (logging.WARNING, "Service default/exposed spec.externalIPs[0]: 0.0.0.0 may not be unspecified"),
        (logging.WARNING, "spec.externalIPs[1]: 127.0.0.2 may not be in the loopback range"),
        (logging.WARNING, "spec.externalIPs[2]: 169.254.169.254 may not be in the link-local range"),
    ]
    for level, fragment in expect:
        assert [m for lv, m in messages if lv == level and fragment in m], (fragment, messages)
    assert len(messages) == len(expect)
    for (kind, reason), before in zip((("Service", "headless"), ("Service", "external_name"),
                                       ("other", "unsupported_kind"), ("Service", "service_proxy_name"),
                                       ("unknown", "no_kind")), counts.values(), strict=True):
        assert sample("proxyd_ignored_objects_total", kind=kind, reason=reason) == before + 1, reason
    for reason, before in refused.items():
        assert sample("proxyd_rejected_objects_total", kind="Service", reason=reason) == before + 1
    source.read_all()
    assert len([r for r in caplog.records if r.name == LOGGER]) == len(expect)


async def test_running_source_allocates_and_applies_changes(tmp_path):
    write_kubectl_dir(tmp_path, ["nodeport"])
    tracker = Tracker("node1")
    changes: list[int] = []
    source = ManifestSource(str(tmp_path), tracker, on_change=lambda: changes.append(1),
                            allocator=Allocator(RANGES), rescan_interval=0.2)
    task = asyncio.create_task(source.run())
    try:
        await asyncio.wait_for(source.ready.wait(), 10)
        before = served(tracker)["default/web-nodeport:80-8080"]
        write_kubectl_dir(tmp_path, ["clusterip"])
        for _ in range(200):
            if "default/web-clusterip:80-8080" in served(tracker):
                break
            await asyncio.sleep(0.05)
        now = served(tracker)
        assert now["default/web-nodeport:80-8080"] == before  # unchanged service undisturbed
        assert ipaddress.ip_address(now["default/web-clusterip:80-8080"].cluster_ip) in RANGE
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ------------------------------------------------------------------ proxyd check


def run_check(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return check.main(list(argv), out=out), out.getvalue()


def test_check_prints_what_would_be_served_for_every_type(tmp_path):
    write_kubectl_dir(tmp_path)
    code, text = run_check(str(tmp_path), "--service-cluster-ip-range", str(RANGE),
                           "--hostname-override", "n1")
    print(text)
    assert code == 0
    tracker, _ = scan(tmp_path)
    for type_ in SERVICE_TYPES:
        port = served(tracker)[f"default/web-{type_}:80-8080"]
        block = text.split(f"default/web-{type_}:80-8080/TCP", 1)[1].split("\n\n", 1)[0]
        assert f"[web-{type_}.yaml]" in block
        assert f"clusterIP   {port.cluster_ip}:80 (allocated)  → targetPort 8080" in block
        if port.node_port:
            assert f"nodePort    {port.node_port} on node addresses (allocated)" in block
        assert "endpoints: 10.244.1.2:8080 (ready), 10.244.1.3:8080 (ready)" in block
        assert ("policies: externalTrafficPolicy Cluster, internalTrafficPolicy Cluster, "
                "sessionAffinity None") in block
    assert text.rstrip().endswith("3 service ports servable, 0 refused, 0 ignored: everything is servable")


def test_check_without_range_lists_each_refusal_and_exits_1(tmp_path):
    write_kubectl_dir(tmp_path)
    (tmp_path / "broken.yaml").write_text("kind: Service\nspec: [unclosed\n")
    code, text = run_check(str(tmp_path))
    print(text)
    assert code == 1
    for type_ in SERVICE_TYPES:
        assert (f"  web-{type_}.yaml: Service default/web-{type_} is refused: spec.clusterIP: missing, "
                "and no --service-cluster-ip-range to allocate one from") in text
    assert "  broken.yaml: the file does not parse" in text
    assert text.rstrip().endswith("0 service ports servable, 4 refused, 0 ignored: 4 refused")


def test_check_bad_flags_and_directory_exit_2(tmp_path, capsys):
    assert run_check(str(tmp_path / "missing"))[0] == 2
    assert run_check(str(tmp_path), "--service-cluster-ip-range", "10.0.0.0/33")[0] == 2
    assert "--service-cluster-ip-range" in capsys.readouterr().err
    assert run_check(str(tmp_path), "--service-node-port-range", "9-1")[0] == 2
    assert "--service-node-port-range" in capsys.readouterr().err


def test_check_is_a_subcommand_of_the_real_command(tmp_path):
    """Through the console script, unprivileged: `proxyd check` and the daemon's flags side by side."""
    write_kubectl_dir(tmp_path, ["nodeport"])
    proxyd = str(Path(sys.executable).parent / "proxyd")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Without any capability (as root: an empty bounding set; otherwise the user has none anyway).
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"] if os.geteuid() == 0 else []
    argv = [*drop, proxyd, "check", str(tmp_path), "--service-cluster-ip-range", "10.96.0.0/16"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "default/web-nodeport:80-8080/TCP  NodePort" in result.stdout
    # The daemon's own parsing is unchanged by the subcommand.
    bad = subprocess.run([proxyd, "--proxy-mode", "bogus", "--manifests", str(tmp_path)], capture_output=True,
                         text=True, timeout=60, env=env, check=False)
    assert bad.returncode == 2 and "--proxy-mode" in bad.stderr


# ------------------------------------------------------------------ the flags


def test_allocation_flags_parse(tmp_path):
    from proxyd.cli import parse_args

    config = parse_args(["--manifests", str(tmp_path)], environ={})
    assert config.service_cluster_ip_range == () and config.service_node_port_range == (30000, 32767)
    config = parse_args(["--manifests", str(tmp_path), "--service-cluster-ip-range",
                         "10.96.0.0/12, fd00::/108", "--service-node-port-range", "31000-31999"], environ={})
    assert config.service_cluster_ip_range == ("10.96.0.0/12", "fd00::/108")
    assert config.service_node_port_range == (31000, 31999)
    from proxyd.daemon import allocator_for

    assert allocator_for(config).ranges == Ranges(cluster=(ipaddress.ip_network("10.96.0.0/12"),
                                                           ipaddress.ip_network("fd00::/108")),
                                                  node_ports=(31000, 31999))


@pytest.mark.parametrize(("argv", "flag"), [
    (["--service-cluster-ip-range", "10.96.0.0/33"], "--service-cluster-ip-range"),
    (["--service-cluster-ip-range", "10.0.0.0/8,10.1.0.0/16"], "--service-cluster-ip-range"),
    (["--service-node-port-range", "32767-30000"], "--service-node-port-range"),
    (["--service-node-port-range", "abc"], "--service-node-port-range"),
])
def test_bad_allocation_flags_name_the_flag(tmp_path, argv, flag):
    from proxyd.cli import ConfigError, parse_args

    with pytest.raises(ConfigError, match=flag):
        parse_args(["--manifests", str(tmp_path), *argv], environ={})


def test_ranges_are_not_kube_proxy_configuration_fields(tmp_path):
    """kube-proxy has no such field: a KubeProxyConfiguration naming one is refused (strict decoding)."""
    from proxyd.cli import ConfigError, load_config_file

    path = tmp_path / "config.yaml"
    path.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                    "serviceClusterIPRange: 10.96.0.0/12\n")
    with pytest.raises(ConfigError, match="serviceClusterIPRange"):
        load_config_file(str(path))


def test_hand_written_endpoints_that_reach_nothing_are_reported(tmp_path, caplog):
    """The likeliest VM mistakes: a port name that is not kubectl's, a slice for no Service."""
    (tmp_path / "web.yaml").write_text(kubectl_service("clusterip", "web") + "---\n"
                                       + yaml.safe_dump(endpoints("web", ["10.244.1.2"], port_name="http")))
    (tmp_path / "orphan.yaml").write_text(yaml.safe_dump(endpoints("nosuch", ["10.244.1.3"])))
    tracker, source = scan(tmp_path)
    state = tracker.take().state
    (name,) = state.service_ports
    assert state.endpoints.get(name, ()) == ()
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert ("manifests web.yaml: Service default/web port 80-8080/TCP: no endpoint port of that name in its "
            "EndpointSlices/Endpoints (http/TCP), so it has no endpoints") in messages
    assert "manifests orphan.yaml: Endpoints default/nosuch is ignored: no Service default/nosuch in the " \
           "directory" in messages
    source.read_all()
    assert len([r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]) == 2
    code, text = run_check(str(tmp_path), "--service-cluster-ip-range", str(RANGE))
    assert code == 0 and "[port_name_mismatch]" in text and "[no_service]" in text


def test_other_kinds_are_summed_up_per_kind(tmp_path, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}", "namespace": "web"}}
            for i in range(500)]
    (tmp_path / "all.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": pods}))
    before = sample("proxyd_ignored_objects_total", kind="other", reason="unsupported_kind")
    ManifestSource(str(tmp_path), Tracker("node1"), on_change=lambda: None, use_inotify=False).read_all()
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert line == "manifests all.yaml: 500 v1 Pod objects (web/p0, web/p1, web/p2, …) are ignored: a kind " \
                   "proxyd does not use"
    assert sample("proxyd_ignored_objects_total", kind="other", reason="unsupported_kind") == before + 500


def test_incremental_merge_hands_the_tracker_only_what_allocation_changed(tmp_path):
    """Allocation spans the directory, the tracker still gets only what changed (issue 19 with issue 21)."""
    write_kubectl_dir(tmp_path)
    tracker, source = scan(tmp_path)
    taken = served(tracker)["default/web-nodeport:80-8080"]
    pushed: list[str] = []
    real = tracker.update_service

    def counting(name, svc):
        pushed.append(str(name))
        return real(name, svc)

    tracker.update_service = counting  # type: ignore[method-assign]
    # Endpoints only: nothing is allocated again, no Service is handed over.
    eps = yaml.safe_dump(endpoints("web-clusterip", ["10.244.1.9"]))
    path = tmp_path / "web-clusterip.yaml"
    path.write_text(kubectl_service("clusterip", "web-clusterip") + "---\n" + eps)
    assert source.read_all()
    assert pushed == []
    state = tracker.take().state
    (name,) = [n for n in state.service_ports if n.service.name == "web-clusterip"]
    assert [e.ip for e in state.endpoints[name]] == ["10.244.1.9"]
    # A new Service pins the address web-nodeport was given: it moves, the other two are not touched.
    (tmp_path / "pinned.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "pinned"},
        "spec": {"clusterIP": taken.cluster_ip, "ports": [{"port": 81}]}}))
    assert source.read_all()
    assert sorted(pushed) == ["default/pinned", "default/web-nodeport"]
    assert served(tracker)["default/web-nodeport:80-8080"].cluster_ip != taken.cluster_ip
    # What the incremental merge holds is what a fresh read of the directory gives.
    assert served(tracker) == served(scan(tmp_path)[0])


# ------------------------------------------------------------------ dual-stack (issue 16)

DUAL_STACK_DIR = """\
apiVersion: v1
kind: Service
metadata: {name: dual}
spec:
  ipFamilyPolicy: PreferDualStack
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: v6}
spec:
  ipFamilies: [IPv6]
  clusterIP: fd00:10:96::53
  ports: [{port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: strict}
spec:
  ipFamilyPolicy: RequireDualStack
  ports: [{port: 81}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: dual}
subsets:
- addresses: [{ip: 10.244.1.2}, {ip: "fd00:10:244:1::2"}]
  ports: [{port: 8080}]
"""


def test_check_shows_both_cluster_ips_and_both_families_endpoints(tmp_path):
    (tmp_path / "dual.yaml").write_text(DUAL_STACK_DIR)
    code, text = run_check(str(tmp_path), "--service-cluster-ip-range", "10.96.0.0/16,fd00:10:96::/112")
    print(text)
    assert code == 0, text
    tracker, _ = scan(tmp_path, Ranges(cluster=(RANGE, ipaddress.ip_network("fd00:10:96::/112"))))
    port = served(tracker)["default/dual"]
    v4, v6 = port.cluster_ips
    assert ipaddress.ip_address(v4) in RANGE and ipaddress.ip_address(v6).version == 6
    block = text.split("default/dual/TCP", 1)[1].split("\n\n", 1)[0]
    assert f"clusterIP   {v4}:80 (allocated)  → targetPort 8080" in block
    assert f"clusterIP   [{v6}]:80 (allocated)  → targetPort 8080" in block
    assert "10.244.1.2:8080 (ready)" in block and "[fd00:10:244:1::2]:8080 (ready)" in block
    assert "clusterIP   [fd00:10:96::53]:53  → targetPort 53" in text


def test_check_refuses_require_dual_stack_with_a_range_of_one_family(tmp_path):
    (tmp_path / "dual.yaml").write_text(DUAL_STACK_DIR)
    code, text = run_check(str(tmp_path), "--service-cluster-ip-range", "10.96.0.0/16")
    print(text)
    assert code == 1
    assert ("Service default/strict is refused: spec.ipFamilyPolicy: RequireDualStack, and "
            "--service-cluster-ip-range has only an IPv4 range") in text
    # PreferDualStack falls back to the one family; the IPv6 service has its own address.
    block = text.split("default/dual/TCP", 1)[1].split("\n\n", 1)[0]
    assert block.count("clusterIP   ") == 1
