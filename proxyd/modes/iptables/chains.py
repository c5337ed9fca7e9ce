"""kube-proxy's iptables chain names, byte for byte.

Chain names are a prefix plus the first 16 characters of the base32 (RFC
4648, upper case, padded) encoding of sha256(servicePortName + protocol
[+ endpoint]), where the service port name is ``ns/name[:port]`` and the
protocol is lower case (pkg/proxy/iptables/proxier.go ``portProtoHash`` and
``servicePortEndpointChainName``). Keeping the exact algorithm means a node
switching from kube-proxy to proxyd (or back) finds the same chains, and
operators' scripts and muscle memory keep working.

Hashing is the hot part of rendering 100k endpoint chains, so results are
memoised (bounded) per input string.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from proxyd.model import Endpoint, ServicePortName
from proxyd.netfilter import CANARY, Jump, restore_lines

# Top-level chains, as kube-proxy names them.
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_PROXY_CANARY = CANARY

SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
FW_PREFIX = "KUBE-FW-"
EXT_PREFIX = "KUBE-EXT-"
SEP_PREFIX = "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, SEP_PREFIX, FW_PREFIX, EXT_PREFIX)

# Older kube-proxy releases created these; cleanup removes them too.
LEGACY_CHAIN_PREFIXES = ("KUBE-XLB-",)

FILTER_TOP_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS,
                     KUBE_PROXY_FIREWALL)
NAT_TOP_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)


# Small: a partial sync re-renders a few ports (their names hit); a full sync hashes each name once anyway,
# and 200,000 cached names (10,000 services × 10 endpoints) held 17 MiB for the daemon's life.
@lru_cache(maxsize=1 << 12)
def _hash16(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(digest)[:16].decode()


def port_proto_hash(name: ServicePortName) -> str:
    """kube-proxy's portProtoHash(servicePortName.String(), lower(protocol))."""
    return _hash16(str(name) + name.protocol.value.lower())


def svc_chain(name: ServicePortName) -> str:
    """KUBE-SVC-*: Cluster-policy endpoint dispatch."""
    return SVC_PREFIX + port_proto_hash(name)


def svl_chain(name: ServicePortName) -> str:
    """KUBE-SVL-*: Local-policy endpoint dispatch."""
    return SVL_PREFIX + port_proto_hash(name)


def fw_chain(name: ServicePortName) -> str:
    """KUBE-FW-*: loadBalancerSourceRanges filtering."""
    return FW_PREFIX + port_proto_hash(name)


def ext_chain(name: ServicePortName) -> str:
    """KUBE-EXT-*: external traffic (NodePort, externalIPs, LB IPs)."""
    return EXT_PREFIX + port_proto_hash(name)


def sep_chain(name: ServicePortName, endpoint: Endpoint | str) -> str:
    """KUBE-SEP-*: one endpoint; ``endpoint`` as ``ip:port`` (``[ip]:port`` for v6)."""
    return SEP_PREFIX + _hash16(str(name) + name.protocol.value.lower() + str(endpoint))


def is_service_chain(chain: str) -> bool:
    """True for per-service chains proxyd/kube-proxy create and may delete."""
    return chain.startswith(SERVICE_CHAIN_PREFIXES)


# The jump rules from the built-in chains, as kube-proxy's iptablesJumpChains.
# Each is ensured with ``iptables -C || iptables -I`` (prepended) on every
# full sync, verified every sync period and removed by cleanup.
_NEW = ("-m", "conntrack", "--ctstate", "NEW")
JUMP_RULES: tuple[Jump, ...] = (
    Jump("filter", "INPUT", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", _NEW),
    Jump("filter", "FORWARD", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", _NEW),
    Jump("filter", "INPUT", KUBE_NODEPORTS, "kubernetes health check service ports"),
    Jump("filter", "FORWARD", KUBE_SERVICES, "kubernetes service portals", _NEW),
    Jump("filter", "OUTPUT", KUBE_SERVICES, "kubernetes service portals", _NEW),
    Jump("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    Jump("filter", "INPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    Jump("filter", "OUTPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    Jump("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    Jump("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
)

# Chains cleanup removes from each table, besides every per-service chain.
CLEANUP_CHAINS = {
    "nat": (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ, KUBE_PROXY_CANARY),
    "filter": (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL,
               KUBE_PROXY_CANARY),
    "mangle": (KUBE_PROXY_CANARY,),
}


def jump_rules_text(table: str) -> list[str]:
    """The jump rules of ``table`` as iptables-restore lines, in the order they end up in the kernel."""
    return restore_lines(JUMP_RULES, table)


def owned_chain(chain: str) -> bool:
    """True for chains cleanup deletes besides the fixed ones (per-service, older releases')."""
    return is_service_chain(chain) or chain.startswith(LEGACY_CHAIN_PREFIXES)
