"""Command line and KubeProxyConfiguration file → Config; the ``proxyd`` entry point.

Flags keep kube-proxy's names and meanings. A ``--config`` file is read
first and flags given on the command line override it. Every value is
validated here; a bad one exits 2 with one line naming the flag (or the
config field). Exit codes: 0 after a clean shutdown, 2 for bad flags or
configuration, 1 for any other fatal error.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, NoReturn

import yaml

from proxyd import __version__
from proxyd.config import Config, ConfigError, HostPort
from proxyd.modes.base import MODES
from proxyd.sources.allocate import parse_cluster_ranges, parse_port_range
from proxyd.sources.safeio import UnsafeInput, load_yaml, read_regular

log = logging.getLogger("proxyd")

IPVS_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh")
CONFIG_API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
CONFIG_KIND = "KubeProxyConfiguration"
MAX_CONFIG_BYTES = 1 << 20


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3,
                   "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds from a Go duration ("30s", "1m30s", "500ms"); ValueError otherwise."""
    text = text.strip()
    if text in ("0", "+0", "-0"):
        return 0.0
    if text.startswith("-"):
        raise ValueError("must not be negative")
    body = text.removeprefix("+")
    pos, total = 0, 0.0
    while pos < len(body):
        match = _DURATION_PART.match(body, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r} (want e.g. 30s, 1m, 500ms)")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not body:
        raise ValueError("empty duration")
    return total


def parse_cidrs(text: str) -> tuple[str, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        out.append(str(ipaddress.ip_network(part, strict=False)))
    return tuple(out)


def parse_cluster_cidrs(text: str) -> tuple[str, ...]:
    """``--cluster-cidr``: one CIDR, or two of different families (kube-proxy's dual-stack form)."""
    cidrs = parse_cidrs(text)
    if len(cidrs) > 2:
        raise ValueError("at most two CIDRs, one per IP family (e.g. 10.244.0.0/16,fd00:10:244::/48)")
    if len(cidrs) == 2 and (":" in cidrs[0]) == (":" in cidrs[1]):
        raise ValueError("two CIDRs must be one IPv4 and one IPv6 (e.g. 10.244.0.0/16,fd00:10:244::/48)")
    return cidrs


def parse_nodeport_addresses(text: str) -> tuple[str, ...]:
    """``--nodeport-addresses``: CIDRs of either family; kube-proxy's ``primary`` is refused by name."""
    if any(part.strip() == "primary" for part in text.split(",")):
        raise ValueError("'primary' (kube-proxy's node-IP shorthand) is not supported: give the node's "
                         "CIDRs, e.g. 192.0.2.0/24,2001:db8::/64")
    return parse_cidrs(text)


def parse_host_port(text: str, default_port: int) -> HostPort | None:
    """kube-proxy's bind-address form: "IP:PORT", "[v6]:PORT" or a bare IP; "" disables."""
    text = text.strip()
    if not text:
        return None
    host, port = text, default_port
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"invalid address {text!r}")
        host = text[1:close]
        rest = text[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"invalid address {text!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    if "%" in host:  # a zone ("fe80::1%eth0"): kube-proxy's address parser refuses it too
        raise ValueError(f"invalid address {text!r}: no zone (%) allowed")
    host = str(ipaddress.ip_address(host))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return HostPort(host, port)


def _node_name(text: str) -> str:
    name = text.strip().lower()
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name):
        raise ValueError(f"invalid node name {text!r}")
    return name


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"want true or false, got {value!r}")


# Each settable field: (flag, Config attribute, parser of a flag string or config value).
_PARSERS: dict[str, Callable[[Any], Any]] = {
    "proxy_mode": lambda v: _choice(v, tuple(MODES)),
    "kubeconfig": lambda v: str(v) or None,
    "manifests": lambda v: str(v) or None,
    "node_name": _node_name,
    "cluster_cidrs": lambda v: parse_cluster_cidrs(v if isinstance(v, str) else ",".join(v)),
    "masquerade_all": _bool,
    "nodeport_addresses": lambda v: parse_nodeport_addresses(v if isinstance(v, str) else ",".join(v)),
    "healthz_bind_address": lambda v: parse_host_port(str(v), 10256),
    "metrics_bind_address": lambda v: parse_host_port(str(v), 10249),
    "sync_period": parse_duration,
    "min_sync_period": parse_duration,
    "ipvs_scheduler": lambda v: _choice(v or "rr", IPVS_SCHEDULERS),
    "ipvs_strict_arp": _bool,
    "udp_idle_timeout": parse_duration,
    "masquerade_bit": lambda v: _int_range(v, 0, 31),
    "userspace_workers": lambda v: _int_range(v, 1, 1024),
    "verbosity": lambda v: _int_range(v, 0, 10),
    "service_cluster_ip_range": lambda v: tuple(str(n) for n in parse_cluster_ranges(str(v))),
    "service_node_port_range": lambda v: parse_port_range(str(v)),
    "status_socket": lambda v: str(v) or None,
    "log_format": lambda v: _choice(v, ("text", "json")),
}


def _choice(value: Any, choices: Sequence[str]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return text


def _int_range(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"want an integer, got {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"{number} is not in {low}..{high}")
    return number


# KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1), every field at
# every depth: (key path, Config attribute, parser). A None attribute is a
# field kube-proxy knows that means nothing to proxyd: accepted and ignored.
# A path ending in ``*`` accepts any key below it (free-form maps). Anything
# else is refused, as kube-proxy's strict decoding does. When several paths
# set one attribute the later wins: the per-mode syncPeriod over the older
# top-level one. Top-level syncPeriod/minSyncPeriod and udpIdleTimeout come
# from older releases.
_CONFIG_TABLE: tuple[tuple[str, str | None, Callable[[Any], Any] | None], ...] = (
    ("apiVersion", None, None),
    ("kind", None, None),
    ("featureGates.*", None, None),
    ("mode", "proxy_mode", _PARSERS["proxy_mode"]),
    ("clientConnection.kubeconfig", "kubeconfig", _PARSERS["kubeconfig"]),
    ("clientConnection.acceptContentTypes", None, None),
    ("clientConnection.contentType", None, None),
    ("clientConnection.qps", None, None),
    ("clientConnection.burst", None, None),
    ("logging.verbosity", "verbosity", _PARSERS["verbosity"]),
    ("logging.format", "log_format", _PARSERS["log_format"]),
    ("logging.flushFrequency", None, None),
    ("logging.vmodule", None, None),
    ("logging.options.*", None, None),
    ("hostnameOverride", "node_name", _PARSERS["node_name"]),
    ("bindAddress", None, None),
    ("healthzBindAddress", "healthz_bind_address", _PARSERS["healthz_bind_address"]),
    ("metricsBindAddress", "metrics_bind_address", _PARSERS["metrics_bind_address"]),
    ("bindAddressHardFail", None, None),
    ("enableProfiling", None, None),
    ("showHiddenMetricsForVersion", None, None),
    ("syncPeriod", "sync_period", _PARSERS["sync_period"]),
    ("minSyncPeriod", "min_sync_period", _PARSERS["min_sync_period"]),
    ("iptables.masqueradeAll", "masquerade_all", _PARSERS["masquerade_all"]),
    ("iptables.masqueradeBit", "masquerade_bit", _PARSERS["masquerade_bit"]),
    ("iptables.localhostNodePorts", None, None),
    ("iptables.snatNodeInternalIP", None, None),
    ("iptables.syncPeriod", "sync_period", _PARSERS["sync_period"]),
    ("iptables.minSyncPeriod", "min_sync_period", _PARSERS["min_sync_period"]),
    ("ipvs.scheduler", "ipvs_scheduler", _PARSERS["ipvs_scheduler"]),
    ("ipvs.strictARP", "ipvs_strict_arp", _PARSERS["ipvs_strict_arp"]),
    ("ipvs.syncPeriod", "sync_period", _PARSERS["sync_period"]),
    ("ipvs.minSyncPeriod", "min_sync_period", _PARSERS["min_sync_period"]),
    ("ipvs.excludeCIDRs", None, None),
    ("ipvs.tcpTimeout", None, None),
    ("ipvs.tcpFinTimeout", None, None),
    ("ipvs.udpTimeout", None, None),
    ("nftables.masqueradeAll", None, None),
    ("nftables.masqueradeBit", None, None),
    ("nftables.syncPeriod", None, None),
    ("nftables.minSyncPeriod", None, None),
    ("winkernel.networkName", None, None),
    ("winkernel.sourceVip", None, None),
    ("winkernel.enableDSR", None, None),
    ("winkernel.rootHnsEndpointName", None, None),
    ("winkernel.forwardHealthCheckVip", None, None),
    ("windowsRunAsService", None, None),
    ("detectLocalMode", None, None),
    ("detectLocal.bridgeInterface", None, None),
    ("detectLocal.interfaceNamePrefix", None, None),
    ("clusterCIDR", "cluster_cidrs", _PARSERS["cluster_cidrs"]),
    ("nodePortAddresses", "nodeport_addresses", _PARSERS["nodeport_addresses"]),
    ("oomScoreAdj", None, None),
    ("conntrack.maxPerCore", None, None),
    ("conntrack.min", None, None),
    ("conntrack.tcpEstablishedTimeout", None, None),
    ("conntrack.tcpCloseWaitTimeout", None, None),
    ("conntrack.tcpBeLiberal", None, None),
    ("conntrack.udpTimeout", None, None),
    ("conntrack.udpStreamTimeout", None, None),
    ("configSyncPeriod", None, None),
    ("portRange", None, None),
    ("udpIdleTimeout", "udp_idle_timeout", _PARSERS["udp_idle_timeout"]),
)
_CONFIG_LEAVES = {path for path, _, _ in _CONFIG_TABLE if not path.endswith(".*")}
_CONFIG_OPEN = {path[:-2] for path, _, _ in _CONFIG_TABLE if path.endswith(".*")}
_CONFIG_STRUCTS = {path.rsplit(".", i)[0] for path in _CONFIG_LEAVES | _CONFIG_OPEN
                   for i in range(1, path.count(".") + 1)}
# Empty strings mean "not set", except where kube-proxy gives "" a meaning (disable the server).
_EMPTY_MEANS_SOMETHING = {"healthz_bind_address", "metrics_bind_address"}


def _check_keys(node: Mapping[Any, Any], prefix: str = "") -> None:
    """ConfigError naming the first key path (at any depth) the table does not know."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if path in _CONFIG_OPEN or path in _CONFIG_LEAVES:
            continue
        if path not in _CONFIG_STRUCTS:
            raise ConfigError(f"--config: unknown field {path!r}")
        if isinstance(value, Mapping):
            _check_keys(value, f"{path}.")
        elif value is not None:
            raise ConfigError(f"--config: field {path}: want an object, got {type(value).__name__}")


def _lookup(doc: Mapping[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def load_config_file(path: str) -> dict[str, Any]:
    """Config attributes set by a KubeProxyConfiguration file."""
    try:
        data = read_regular(path, MAX_CONFIG_BYTES, follow=True)
        docs = [doc for doc in load_yaml(data.decode("utf-8-sig")) if doc is not None]
    except FileNotFoundError:
        raise ConfigError(f"--config: cannot read {path!r}: no such file") from None
    except UnsafeInput as err:
        raise ConfigError(f"--config: {path!r}: {err.reason}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, ValueError) as err:
        raise ConfigError(f"--config: {path!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if len(docs) != 1:
        raise ConfigError(f"--config: {path!r} holds {len(docs)} documents, want one KubeProxyConfiguration")
    doc = docs[0]
    if not isinstance(doc, Mapping):
        raise ConfigError(f"--config: {path!r} does not hold a KubeProxyConfiguration object")
    if doc.get("kind") != CONFIG_KIND or doc.get("apiVersion") != CONFIG_API_VERSION:
        raise ConfigError(f"--config: want kind {CONFIG_KIND} apiVersion {CONFIG_API_VERSION}, "
                          f"got kind {doc.get('kind')!r} apiVersion {doc.get('apiVersion')!r}")
    _check_keys(doc)
    values: dict[str, Any] = {}
    for field_path, attr, parser in _CONFIG_TABLE:
        if attr is None or parser is None:
            continue
        node = _lookup(doc, field_path)
        if node is None or (node == "" and attr not in _EMPTY_MEANS_SOMETHING):
            continue
        try:
            values[attr] = parser(node)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"--config: field {field_path}: {err}") from None
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming the flag, as the contract asks; usage stays in --help.
        self.exit(2, f"proxyd: error: {message}\n")


_FLAG_ATTRS = {
    "--proxy-mode": "proxy_mode",
    "--kubeconfig": "kubeconfig",
    "--manifests": "manifests",
    "--hostname-override": "node_name",
    "--cluster-cidr": "cluster_cidrs",
    "--nodeport-addresses": "nodeport_addresses",
    "--healthz-bind-address": "healthz_bind_address",
    "--metrics-bind-address": "metrics_bind_address",
    "--sync-period": "sync_period",
    "--min-sync-period": "min_sync_period",
    "--ipvs-scheduler": "ipvs_scheduler",
    "--udp-timeout": "udp_idle_timeout",
    "--iptables-masquerade-bit": "masquerade_bit",
    "--userspace-workers": "userspace_workers",
    "--v": "verbosity",
    "--service-cluster-ip-range": "service_cluster_ip_range",
    "--service-node-port-range": "service_node_port_range",
    "--status-socket": "status_socket",
    "--log-format": "log_format",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="proxyd",
        description="Node-local L4 service proxy that replaces kube-proxy. Serves every Service on this "
                    "node from the API server or a directory of manifests.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 after SIGTERM/SIGINT and a clean shutdown, 2 for bad flags or "
               "configuration, 1 for any other fatal error.\n\n"
               "proxyd check DIR [flags]: read a manifests directory as the daemon would, offline, and "
               "print what would be served and what is refused (see proxyd check --help).")
    add = parser.add_argument
    add("--proxy-mode", metavar="MODE",
        help=f"{', '.join(MODES)} (default: iptables)")
    add("--kubeconfig", metavar="PATH",
        help="read the cluster through the API server with this kubeconfig "
             "(default: in-cluster config when KUBERNETES_SERVICE_HOST is set)")
    add("--manifests", metavar="DIR",
        help="standalone source: a directory of Service/EndpointSlice/Endpoints manifests (YAML or JSON), "
             "re-read on change; wins over the API server")
    add("--hostname-override", metavar="NAME",
        help="this node's name, for Local traffic policies and topology (default: the host name)")
    add("--cluster-cidr", metavar="CIDR[,CIDR]",
        help="pod ranges, at most one per family; traffic from outside them to a ClusterIP is masqueraded")
    add("--masquerade-all", action="store_const", const=True, default=None,
        help="masquerade all service traffic (default: false)")
    add("--nodeport-addresses", metavar="CIDR[,CIDR]",
        help="node addresses in these ranges (either family) accept NodePort traffic "
             "(default: all local addresses)")
    add("--healthz-bind-address", metavar="HOST:PORT",
        help="serve /healthz and /livez here (default: 0.0.0.0:10256; empty disables)")
    add("--metrics-bind-address", metavar="HOST:PORT",
        help="serve /metrics and /proxyMode here (default: 127.0.0.1:10249; empty disables)")
    add("--sync-period", metavar="DURATION",
        help="full resync at least this often (default: 30s)")
    add("--min-sync-period", metavar="DURATION",
        help="at most one sync this often; bursts of changes coalesce (default: 1s)")
    add("--ipvs-scheduler", metavar="NAME",
        help=f"IPVS scheduler: {', '.join(IPVS_SCHEDULERS)} (default: rr)")
    add("--ipvs-strict-arp", action="store_const", const=True, default=None,
        help="ipvs: set arp_ignore=1 and arp_announce=2 (default: false)")
    add("--udp-timeout", metavar="DURATION",
        help="userspace: idle time after which a UDP flow is closed (default: 250ms)")
    add("--userspace-workers", metavar="N",
        help="userspace: threads of the native TCP engine, 1..1024 (default: the CPUs proxyd may use)")
    add("--iptables-masquerade-bit", metavar="BIT",
        help="bit of the fwmark that marks packets to masquerade, 0..31 (default: 14)")
    add("--config", metavar="FILE",
        help="a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) file; flags given on the command "
             "line win")
    add("--cleanup", action="store_true",
        help="remove every rule, address, interface and set that any mode of proxyd may have created, "
             "then exit 0")
    add_allocation_flags(parser)
    add("-v", "--v", dest="verbosity_flag", metavar="LEVEL", help="log verbosity, 0..10 (default: 0)")
    add("--log-format", metavar="FORMAT",
        help="text, or json: one object per line with stable keys ts, level, logger, msg, service, "
             "endpoint, reason (default: text)")
    add("--status-socket", metavar="PATH",
        help="answer `proxyd status` and `proxyd trace` on this Unix socket (mode 0600) "
             "(default: /run/proxyd/status.sock; empty disables)")
    add("--version", action="version", version=f"proxyd {__version__}")
    return parser


def add_allocation_flags(parser: argparse.ArgumentParser) -> None:
    """The manifests source's allocation flags (kube-apiserver's names); ``proxyd check`` takes them too."""
    parser.add_argument(
        "--service-cluster-ip-range", metavar="CIDR[,CIDR]",
        help="--manifests: allocate a cluster IP from this range (one per family) to every non-headless "
             "Service without one; without it such a Service is refused (command line only, not a "
             "KubeProxyConfiguration field)")
    parser.add_argument(
        "--service-node-port-range", metavar="MIN-MAX",
        help="--manifests: allocate nodePorts (and healthCheckNodePorts) from this range to "
             "NodePort/LoadBalancer ports without one (default: 30000-32767)")


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Config from argv (and a --config file); raises ConfigError naming the flag."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_config_file(args.config))
    for flag, attr in _FLAG_ATTRS.items():
        dest = "verbosity_flag" if flag == "--v" else flag[2:].replace("-", "_")
        raw = getattr(args, dest)
        if raw is None:
            continue
        try:
            values[attr] = _PARSERS[attr](raw)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{flag}: {err}") from None
    if args.masquerade_all:
        values["masquerade_all"] = True
    if args.ipvs_strict_arp:
        values["ipvs_strict_arp"] = True
    values = {key: value for key, value in values.items() if value is not None or key in (
        "healthz_bind_address", "metrics_bind_address", "status_socket")}
    config = replace(Config(), config_file=args.config, cleanup=args.cleanup, **values)
    _validate(config, environ)
    return config


def _validate(config: Config, environ: Mapping[str, str]) -> None:
    if config.sync_period <= 0:
        raise ConfigError("--sync-period: must be greater than 0")
    if config.min_sync_period > config.sync_period:
        raise ConfigError("--min-sync-period: must be less than or equal to --sync-period")
    if config.udp_idle_timeout <= 0:
        raise ConfigError("--udp-timeout: must be greater than 0")
    if config.cleanup:
        return
    if config.manifests is not None and not os.path.isdir(config.manifests):
        raise ConfigError(f"--manifests: {config.manifests!r} is not a directory")
    if config.manifests is None and config.kubeconfig is None:
        if not environ.get("KUBERNETES_SERVICE_HOST"):
            raise ConfigError("no source: give --manifests DIR or --kubeconfig PATH, or run in a cluster "
                              "(KUBERNETES_SERVICE_HOST unset)")
    if config.manifests is None and config.kubeconfig is not None and not os.path.isfile(config.kubeconfig):
        raise ConfigError(f"--kubeconfig: {config.kubeconfig!r} is not a readable file")


def setup_logging(verbosity: int, log_format: str = "text") -> None:
    from proxyd.logformat import formatter

    level = logging.DEBUG if verbosity >= 4 else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter(log_format))
    if verbosity < 8:
        # pyroute2's and asyncio's debug output drowns proxyd's own at -v 4 (and
        # pyroute2 sets levels on its own loggers, so filter at the handler).
        def quiet(record: logging.LogRecord) -> bool:
            return record.levelno >= logging.WARNING or not record.name.startswith(("pyroute2", "asyncio"))

        for handler in logging.getLogger().handlers:
            handler.addFilter(quiet)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # Subcommands, not flags: every existing `proxyd --flag …` line keeps its meaning.
    if args[:1] == ["check"]:
        from proxyd import check

        return check.main(args[1:])
    if args and args[0] in ("status", "trace"):
        from proxyd import statusclient

        return statusclient.main(args)
    try:
        config = parse_args(argv)
    except ConfigError as err:
        print(f"proxyd: error: {err}", file=sys.stderr)
        return 2
    setup_logging(config.verbosity, config.log_format)
    from proxyd import daemon

    try:
        if config.cleanup:
            return daemon.run_cleanup(config)
        return daemon.run(config)
    except KeyboardInterrupt:
        return 0
    except Exception as err:  # the top of the process: say what and why, exit 1
        log.exception("fatal: %s", err)
        print(f"proxyd: fatal: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
