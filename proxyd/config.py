"""Config: the validated settings of one proxyd run.

Built by ``proxyd.cli`` from the command line and an optional
KubeProxyConfiguration file (flags given on the command line win). Every
other layer reads this frozen value and nothing else of the command line.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field


class ConfigError(Exception):
    """A bad flag, configuration file or kubeconfig: exit code 2; ``str()`` names the flag."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Config:
    proxy_mode: str = "iptables"
    kubeconfig: str | None = None
    manifests: str | None = None
    node_name: str = field(default_factory=lambda: socket.gethostname().lower())
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    # CIDRs whose local addresses accept NodePort traffic; empty = all local addresses.
    nodeport_addresses: tuple[str, ...] = ()
    healthz_bind_address: HostPort | None = HostPort("0.0.0.0", 10256)
    metrics_bind_address: HostPort | None = HostPort("127.0.0.1", 10249)
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    ipvs_scheduler: str = "rr"
    # ipvs: kube-proxy's --ipvs-strict-arp
    ipvs_strict_arp: bool = False
    # userspace: idle timeout of a UDP flow (kube-proxy's --udp-timeout).
    udp_idle_timeout: float = 0.25
    # userspace: native engine worker threads; 0 = as many as the CPUs proxyd may use.
    userspace_workers: int = 0
    # kube-proxy's masqueradeBit (iptables.masqueradeBit): 0x4000 by default.
    masquerade_bit: int = 14
    config_file: str | None = None
    cleanup: bool = False
    verbosity: int = 0
    # manifests source: where missing cluster IPs and node ports are allocated
    # from (kube-apiserver's flags; not KubeProxyConfiguration fields).
    service_cluster_ip_range: tuple[str, ...] = ()
    service_node_port_range: tuple[int, int] = (30000, 32767)
    # proxyd status / trace: a local Unix socket (None disables); --status-socket.
    status_socket: str | None = "/run/proxyd/status.sock"
    # --log-format: "text" (kube-proxy-like lines) or "json" (one object per line).
    log_format: str = "text"
