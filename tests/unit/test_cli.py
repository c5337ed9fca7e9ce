"""Command line and KubeProxyConfiguration parsing: every flag, every rejection."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from proxyd.cli import ConfigError, parse_args, parse_duration, parse_host_port
from proxyd.config import HostPort

SPEC_FLAGS = ["--proxy-mode", "--kubeconfig", "--manifests", "--hostname-override", "--cluster-cidr",
              "--masquerade-all", "--nodeport-addresses", "--healthz-bind-address", "--metrics-bind-address",
              "--sync-period", "--min-sync-period", "--ipvs-scheduler", "--config", "--cleanup", "--version",
              "--help"]


@pytest.fixture
def manifests(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    return str(path)


def parse(*argv: str, env: dict | None = None):
    return parse_args(list(argv), environ=env or {})


def test_defaults_with_manifests(manifests):
    config = parse("--manifests", manifests)
    assert config.proxy_mode == "iptables"
    assert config.healthz_bind_address == HostPort("0.0.0.0", 10256)
    assert config.metrics_bind_address == HostPort("127.0.0.1", 10249)
    assert config.sync_period == 30.0
    assert config.min_sync_period == 1.0
    assert config.ipvs_scheduler == "rr"
    assert config.cluster_cidrs == ()
    assert not config.masquerade_all


def test_every_flag(manifests, tmp_path):
    config = parse("--manifests", manifests, "--proxy-mode", "userspace", "--hostname-override", "Node-1",
                   "--cluster-cidr", "10.244.0.0/16, fd00:10:244::/48", "--masquerade-all",
                   "--nodeport-addresses", "203.0.113.0/24", "--healthz-bind-address", "127.0.0.1:9999",
                   "--metrics-bind-address", "[::1]:9998", "--sync-period", "1m30s",
                   "--min-sync-period", "500ms", "--ipvs-scheduler", "sh", "-v", "4")
    assert config.proxy_mode == "userspace"
    assert config.node_name == "node-1"
    assert config.cluster_cidrs == ("10.244.0.0/16", "fd00:10:244::/48")
    assert config.masquerade_all
    assert config.nodeport_addresses == ("203.0.113.0/24",)
    assert config.healthz_bind_address == HostPort("127.0.0.1", 9999)
    assert config.metrics_bind_address == HostPort("::1", 9998)
    assert config.sync_period == 90.0
    assert config.min_sync_period == 0.5
    assert config.ipvs_scheduler == "sh"
    assert config.verbosity == 4


@pytest.mark.parametrize("mode", ["userspace", "iptables", "ipvs", "nftables"])
def test_every_mode_is_accepted(mode: str, manifests: str) -> None:
    assert parse("--proxy-mode", mode, "--manifests", manifests).proxy_mode == mode


@pytest.mark.parametrize(("argv", "flag"), [
    (["--proxy-mode", "bogus"], "--proxy-mode"),
    (["--sync-period", "30"], "--sync-period"),
    (["--sync-period=-1s"], "--sync-period"),
    (["--sync-period", "0s"], "--sync-period"),
    (["--min-sync-period", "1h"], "--min-sync-period"),
    (["--cluster-cidr", "10.0.0.0/33"], "--cluster-cidr"),
    (["--cluster-cidr", "10.244.0.0/16,10.245.0.0/16"], "--cluster-cidr"),
    (["--cluster-cidr", "fd00:1::/48,fd00:2::/48"], "--cluster-cidr"),
    (["--cluster-cidr", "10.244.0.0/16,fd00:1::/48,10.245.0.0/16"], "--cluster-cidr"),
    (["--nodeport-addresses", "primary"], "--nodeport-addresses"),
    (["--nodeport-addresses", "192.0.2.0/24,primary"], "--nodeport-addresses"),
    (["--healthz-bind-address", "[::1"], "--healthz-bind-address"),
    (["--healthz-bind-address", "::1:10256"], "--healthz-bind-address"),
    (["--metrics-bind-address", "[fe80::1%eth0]:1"], "--metrics-bind-address"),
    (["--nodeport-addresses", "nope"], "--nodeport-addresses"),
    (["--healthz-bind-address", "1.2.3.4:99999"], "--healthz-bind-address"),
    (["--metrics-bind-address", "localhost:1"], "--metrics-bind-address"),
    (["--ipvs-scheduler", "fastest"], "--ipvs-scheduler"),
    (["--hostname-override", "bad name\n"], "--hostname-override"),
    (["--v", "x"], "--v"),
])
def test_bad_values_name_the_flag(manifests, argv, flag):
    with pytest.raises(ConfigError, match=flag):
        parse("--manifests", manifests, *argv)


def test_no_source_is_one_clear_error():
    with pytest.raises(ConfigError, match="no source"):
        parse()


def test_in_cluster_env_is_a_source():
    config = parse(env={"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    assert config.manifests is None and config.kubeconfig is None


def test_manifests_must_be_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="--manifests"):
        parse("--manifests", str(tmp_path / "missing"))


def test_cleanup_needs_no_source():
    assert parse("--cleanup").cleanup


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("1m", 60), ("1h30m", 5400), ("500ms", 0.5), ("1.5s", 1.5), ("0", 0), ("100us", 1e-4),
])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "s", "1d", "1s2", "--1s", "1 s", "x" * 10000])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_dual_stack_flags(manifests):
    config = parse("--manifests", manifests, "--cluster-cidr", "fd00:10:244::/48,10.244.0.0/16",
                   "--nodeport-addresses", "2001:db8:203::/64,203.0.113.0/24,::1/128",
                   "--healthz-bind-address", "[::]:10256", "--metrics-bind-address", "[::1]")
    assert config.cluster_cidrs == ("fd00:10:244::/48", "10.244.0.0/16")
    assert config.nodeport_addresses == ("2001:db8:203::/64", "203.0.113.0/24", "::1/128")
    assert config.healthz_bind_address == HostPort("::", 10256)
    assert config.metrics_bind_address == HostPort("::1", 10249)
    assert str(config.healthz_bind_address) == "[::]:10256"
    with pytest.raises(ConfigError, match="one IPv4 and one IPv6"):
        parse("--manifests", manifests, "--cluster-cidr", "10.244.0.0/16,10.245.0.0/16")
    with pytest.raises(ConfigError, match="'primary'"):
        parse("--manifests", manifests, "--nodeport-addresses", "primary")


def test_dual_stack_cluster_cidr_in_a_config_file(manifests, tmp_path):
    path = write_config(tmp_path, """
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        clusterCIDR: 10.244.0.0/16,fd00:10:244::/48
        nodePortAddresses: ["2001:db8::/64"]
    """)
    config = parse("--manifests", manifests, "--config", path)
    assert config.cluster_cidrs == ("10.244.0.0/16", "fd00:10:244::/48")
    assert config.nodeport_addresses == ("2001:db8::/64",)


def test_bind_address_forms():
    assert parse_host_port("0.0.0.0", 10256) == HostPort("0.0.0.0", 10256)
    assert parse_host_port("[::]:1", 2) == HostPort("::", 1)
    assert parse_host_port("", 2) is None


def write_config(tmp_path, body: str):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_config_file_and_flags_win(manifests, tmp_path):
    path = write_config(tmp_path, """\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: ipvs
        clusterCIDR: 10.244.0.0/16
        hostnameOverride: from-config
        healthzBindAddress: 127.0.0.1:7000
        nodePortAddresses: ["203.0.113.0/24"]
        iptables:
          masqueradeAll: true
          syncPeriod: 10s
          minSyncPeriod: 2s
        ipvs:
          scheduler: wlc
          strictARP: true
        conntrack:
          maxPerCore: 32768
        """)
    config = parse("--manifests", manifests, "--config", path, "--proxy-mode", "userspace")
    assert config.proxy_mode == "userspace"  # the flag wins
    assert config.cluster_cidrs == ("10.244.0.0/16",)
    assert config.node_name == "from-config"
    assert config.healthz_bind_address == HostPort("127.0.0.1", 7000)
    assert config.nodeport_addresses == ("203.0.113.0/24",)
    assert config.masquerade_all
    assert config.sync_period == 10.0 and config.min_sync_period == 2.0
    assert config.ipvs_scheduler == "wlc" and config.ipvs_strict_arp
    assert config.config_file == path


@pytest.mark.parametrize(("body", "match"), [
    ("kind: Nope\napiVersion: v1\n", "KubeProxyConfiguration"),
    ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nbogusField: 1\n",
     "bogusField"),
    ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: warp\n", "mode"),
    ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables:\n"
     "  masqueradeAll: yes-please\n", "iptables.masqueradeAll"),
    ("{{{{", "not valid YAML"),
    ("- a\n- b\n", "does not hold"),
])
def test_bad_config_files(manifests, tmp_path, body, match):
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError, match=match):
        parse("--manifests", manifests, "--config", path)


HEADER = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"


@pytest.mark.parametrize(("body", "path"), [
    ("iptables: {masqueradeBitt: 3}\n", "iptables.masqueradeBitt"),
    ("ipvs: {strictArp: true}\n", "ipvs.strictArp"),
    ("conntrack: {maxPerCore: 1, tcpEstablishedTimout: 1s}\n", "conntrack.tcpEstablishedTimout"),
    ("logging: {verbosity: 2, formt: json}\n", "logging.formt"),
    ("detectLocal: {clusterCIDRs: [10.0.0.0/8]}\n", "detectLocal.clusterCIDRs"),
    ("clientConnection: {kubeconfig: /x, extra: {deeper: 1}}\n", "clientConnection.extra"),
    ("mode: iptables\nmasqueradeAll: true\n", "masqueradeAll"),
])
def test_unknown_nested_config_keys_exit_2_naming_the_path(manifests, tmp_path, body, path):
    config = write_config(tmp_path, HEADER + body)
    result = run_cli("--manifests", manifests, "--config", config)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and repr(path) in lines[0], result.stderr


@pytest.mark.parametrize("body", [
    "iptables: 3\n",
    "ipvs: [strictARP]\n",
])
def test_config_sections_must_be_objects(manifests, tmp_path, body):
    with pytest.raises(ConfigError, match="want an object"):
        parse("--manifests", manifests, "--config", write_config(tmp_path, HEADER + body))


def test_every_kube_proxy_field_is_accepted(manifests, tmp_path):
    path = write_config(tmp_path, HEADER + textwrap.dedent("""\
        featureGates: {AnyGate: true, Another: false}
        clientConnection: {kubeconfig: "", acceptContentTypes: "", contentType: application/json, qps: 5,
                           burst: 10}
        logging: {format: text, flushFrequency: 5s, verbosity: 3, vmodule: [],
                  options: {json: {infoBufferSize: "0"}, text: {splitStream: false}}}
        hostnameOverride: node-a
        bindAddress: 0.0.0.0
        healthzBindAddress: ""
        metricsBindAddress: 127.0.0.1:10249
        bindAddressHardFail: false
        enableProfiling: false
        showHiddenMetricsForVersion: ""
        mode: iptables
        iptables: {masqueradeAll: false, masqueradeBit: 14, localhostNodePorts: true,
                   snatNodeInternalIP: false, syncPeriod: 30s, minSyncPeriod: 1s}
        ipvs: {syncPeriod: 30s, minSyncPeriod: 0s, scheduler: "", excludeCIDRs: null, strictARP: false,
               tcpTimeout: 0s, tcpFinTimeout: 0s, udpTimeout: 0s}
        nftables: {masqueradeAll: false, masqueradeBit: 14, syncPeriod: 30s, minSyncPeriod: 1s}
        winkernel: {networkName: "", sourceVip: "", enableDSR: false, rootHnsEndpointName: "",
                    forwardHealthCheckVip: false}
        windowsRunAsService: false
        detectLocalMode: ClusterCIDR
        detectLocal: {bridgeInterface: "", interfaceNamePrefix: ""}
        clusterCIDR: 10.244.0.0/16
        nodePortAddresses: null
        oomScoreAdj: -999
        conntrack: {maxPerCore: 32768, min: 131072, tcpEstablishedTimeout: 24h0m0s,
                    tcpCloseWaitTimeout: 1h0m0s, tcpBeLiberal: false, udpTimeout: 0s, udpStreamTimeout: 0s}
        configSyncPeriod: 15m0s
        portRange: ""
        """))
    config = parse("--manifests", manifests, "--config", path)
    assert config.node_name == "node-a" and config.verbosity == 3 and config.healthz_bind_address is None
    assert config.cluster_cidrs == ("10.244.0.0/16",) and config.sync_period == 30.0


def test_huge_config_file_rejected(manifests, tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="too large"):
        parse("--manifests", manifests, "--config", str(path))


def test_missing_config_file(manifests, tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        parse("--manifests", manifests, "--config", str(tmp_path / "absent.yaml"))


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxyd.cli", *argv], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin"})


def test_help_documents_every_spec_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in SPEC_FLAGS:
        assert flag in result.stdout, flag


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("proxyd ")


@pytest.mark.parametrize(("argv", "flag"), [
    (["--no-such-flag"], "--no-such-flag"),
    (["--sync-period", "soon"], "--sync-period"),
    (["--proxy-mode"], "--proxy-mode"),
])
def test_bad_flag_exits_2_with_one_line(argv, flag):
    result = run_cli(*argv)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], result.stderr


def test_no_source_exits_2():
    result = run_cli()
    assert result.returncode == 2
    assert "no source" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_userspace_workers(manifests):
    assert parse("--manifests", manifests).userspace_workers == 0  # 0: as many as the CPUs usable
    assert parse("--manifests", manifests, "--userspace-workers", "3").userspace_workers == 3
    for bad in ("0", "-1", "1025", "two", "1.5", "9" * 5000):
        with pytest.raises(ConfigError, match="--userspace-workers"):
            parse("--manifests", manifests, "--userspace-workers", bad)
