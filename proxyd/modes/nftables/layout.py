"""The fixed part of nftables mode's ruleset: names, map types and the chains that never change per service.

One table per address family (``ip proxyd`` now; ``ip6 proxyd`` is the same
text with ``Family(6)``), named so it lives beside other software's tables
and ``--cleanup`` deletes exactly it. Per-service state is held in map and
set elements (``planner``), never in per-service chains, except the few
chains ClientIP affinity needs. The packet flow (kube-proxy's nftables mode,
on a compact layout; docs/nftables.md has a worked example):

* only nat base chains, which netfilter runs for a connection's first packet
  only: established packets evaluate no rule of proxyd's. nat prerouting and
  output (-100) jump to ``services``: ``service-ips`` maps destination .
  protocol . port to a "kind" chain, NodePorts go through
  ``service-nodeports``. A kind chain makes kube-proxy's masquerade decision
  (ClusterIP: from outside the cluster CIDR or --masquerade-all; external
  with Cluster policy: always; external with Local policy: pods and the node
  itself short-circuit to the cluster endpoints; external addresses first
  pass ``firewall-check``, which drops LB traffic from outside
  loadBalancerSourceRanges) and dispatches through a ``*-pick`` verdict map
  to ``<pick>-<protocol>-N``: one chain per protocol and endpoint count N
  whose single rule DNATs to ``key . numgen random mod N`` looked up in a
  backends map (value: endpoint address . port).
* kube-proxy's other new-connection checks, which it runs in filter chains
  on ``ct state new``, follow in the same nat chains (a DNAT ends the
  chain, so they see what was not DNATed, as kube-proxy's post-DNAT checks
  did): ``service-endpoints-check`` / ``nodeport-endpoints-check`` reject
  traffic to services without endpoints (or drop it: internalTrafficPolicy
  Local with none on this node); ``cluster-ips-check`` rejects what is
  still addressed to a ClusterIP, i.e. a port the service does not have.
* nat postrouting (100): an endpoint that reached itself (``hairpin`` set of
  ``addr . addr``) is marked, then marked packets are masqueraded.

nft 1.0.6 constraints honoured here (docs/facts.md): numeric priorities
(``dstnat`` is refused on input/output), ``tcp dport`` (not ``th dport``) in
map value types, ``ct original proto-dst`` is unusable in concatenations.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

TABLE = "proxyd"

# Base chains: (name, type, hook, priority). Only nat chains: netfilter runs them for a connection's
# first packet only, so established packets evaluate no rule of ours (kube-proxy's filter chains,
# which test "ct state new" on every packet, are folded into them; see ``chains``).
BASE_CHAINS: tuple[tuple[str, str, str, int], ...] = (
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)
# Base chains of earlier layouts: a full sync that adopts such a table deletes them.
RETIRED_CHAINS = ("filter-prerouting", "filter-input", "filter-forward", "filter-output",
                  "filter-output-post-dnat")

FIREWALL_CHECK = "firewall-check"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
CLUSTER_IPS_CHECK = "cluster-ips-check"
REJECT_CHAIN = "reject-chain"
MARK_FOR_MASQUERADE = "mark-for-masquerade"
MASQUERADING = "masquerading"
SERVICES = "services"

# Kind chains: how traffic to one service address is masqueraded and which pick map it uses.
SVC_INT = "svc-int"      # ClusterIP
SVC_EXT = "svc-ext"      # externalIP / LB IP, externalTrafficPolicy Cluster
SVC_EXTL = "svc-extl"    # externalIP / LB IP, externalTrafficPolicy Local
SVC_SHORT = "svc-short"  # pods / the node to an external address of a Local service
NP_EXT = "np-ext"
NP_EXTL = "np-extl"
NP_SHORT = "np-short"

# Sets and maps.
CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"
FIREWALL_ALLOW = "firewall-allow"
HAIRPIN = "hairpin"
# A set holding one element that nothing else ever touches: checking that it still exists and
# holds its element is proxyd's cheap test for "someone changed our table" (``nft list tables``
# costs as much as listing everything on nft 1.0.6; listing one small set does not).
CANARY = "canary"


@dataclass(frozen=True, slots=True)
class Pick:
    """One way of choosing an endpoint: a verdict map naming ``<chain>-N`` chains and a backends map."""

    name: str           # verdict map and prefix of its pick chains
    backends: str       # map: key . index -> endpoint address . port
    by_address: bool    # key starts with the destination address (else NodePort: protocol . port)


PICK_SVC = Pick("svc-pick", "svc-backends", True)
PICK_SVC_SHORT = Pick("svc-short-pick", "svc-short-backends", True)
PICK_NP = Pick("np-pick", "np-backends", False)
PICK_NP_SHORT = Pick("np-short-pick", "np-short-backends", False)
PICKS = (PICK_SVC, PICK_SVC_SHORT, PICK_NP, PICK_NP_SHORT)

STICKY_PREFIX = "sticky-"
ENDPOINT_PREFIX = "endpoint-"
AFFINITY_PREFIX = "affinity-"


# One backends map per protocol: its value type names the protocol's port ("tcp dport"), which
# makes nft add a protocol match to the DNAT rule; with "th dport" instead nft 1.0.6 fails every
# later transaction on the table ("conflicting protocols").
PROTOCOLS = ("tcp", "udp", "sctp")


def backends_map(pick: Pick, proto: str) -> str:
    return f"{pick.backends}-{proto}"


def pick_chain(pick: Pick, proto: str, n: int) -> str:
    return f"{pick.name}-{proto}-{n}"


def parse_pick_chain(name: str) -> tuple[Pick, str, int] | None:
    head, _, n = name.rpartition("-")
    head, _, proto = head.rpartition("-")
    for pick in PICKS:
        if head == pick.name and proto in PROTOCOLS and n.isdigit() and int(n) > 0:
            return pick, proto, int(n)
    return None


def is_dynamic_chain(name: str) -> bool:
    """Chains created on demand (pick-N, affinity): the ones a sync may delete."""
    return name.startswith((STICKY_PREFIX, ENDPOINT_PREFIX)) or parse_pick_chain(name) is not None


@dataclass(frozen=True, slots=True)
class Family:
    """What differs between the ``ip`` and ``ip6`` tables."""

    version: int = 4

    def __post_init__(self) -> None:
        if self.version not in (4, 6):
            raise ValueError(f"family must be 4 or 6, got {self.version!r}")

    @property
    def table_family(self) -> str:
        return "ip" if self.version == 4 else "ip6"

    @property
    def addr(self) -> str:
        """Payload keyword: ``ip daddr`` / ``ip6 daddr``."""
        return self.table_family

    @property
    def addr_type(self) -> str:
        return "ipv4_addr" if self.version == 4 else "ipv6_addr"

    @property
    def loopback(self) -> str:
        return "127.0.0.0/8" if self.version == 4 else "::1"

    @property
    def table(self) -> str:
        return f"{self.table_family} {TABLE}"

    @property
    def canary_element(self) -> str:
        return "0.0.0.0" if self.version == 4 else "::"


@dataclass(frozen=True, slots=True)
class LayoutOptions:
    family: Family
    cluster_cidr: str | None
    masquerade_all: bool
    mark: str
    nodeport_addresses: bool  # --nodeport-addresses given: NodePorts only on @nodeport-ips


def _key(fam: Family, pick: Pick | None = None, *, by_address: bool = True) -> str:
    """The lookup key for a service address (or NodePort) of the packet."""
    if pick is not None:
        by_address = pick.by_address
    head = f"{fam.addr} daddr . " if by_address else ""
    return f"{head}meta l4proto . th dport"


def maps(fam: Family) -> list[tuple[str, str]]:
    """(name, definition body) of every set and map of the fixed layout."""
    a = fam.addr_type
    svc_key = f"{a} . inet_proto . inet_service"
    np_key = "inet_proto . inet_service"
    out = [
        (CANARY, f"type {a}"),
        (CLUSTER_IPS, f"type {a}"),
        (NODEPORT_IPS, f"type {a}"),
        (SERVICE_IPS, f"type {svc_key} : verdict"),
        (SERVICE_NODEPORTS, f"type {np_key} : verdict"),
        (NO_ENDPOINT_SERVICES, f"type {svc_key} : verdict"),
        (NO_ENDPOINT_NODEPORTS, f"type {np_key} : verdict"),
        (FIREWALL_IPS, f"type {svc_key}"),
        (FIREWALL_ALLOW, f"type {svc_key} . {a} ; flags interval"),
        (HAIRPIN, f"type {a} . {a}"),
    ]
    for pick in PICKS:
        out.append((pick.name, f"type {svc_key if pick.by_address else np_key} : verdict"))
        for proto in PROTOCOLS:
            # typeof: numgen's type has no name that "type" accepts.
            # counter: every element (one service address or NodePort × endpoint) counts the new
            # connections DNATed to it, read back by ``proxyd status`` (``status.py``).
            out.append((backends_map(pick, proto), f"typeof {_key(fam, pick)} . numgen random mod 2 : "
                                                   f"{fam.addr} daddr . {proto} dport ; counter"))
    return out


def chains(opts: LayoutOptions) -> dict[str, list[str]]:
    """Every fixed chain (base chains first) and its rules."""
    fam = opts.family
    nodeport_match = (f"{fam.addr} daddr @{NODEPORT_IPS}" if opts.nodeport_addresses
                      else f"fib daddr type local {fam.addr} daddr != {fam.loopback}")
    svc_key = _key(fam)
    np_key = _key(fam, by_address=False)
    # kube-proxy's checks ran in filter chains on "ct state new" packets (input, forward, output at
    # -110, output at -90); here they run in the nat chains, which see exactly those packets, in the
    # same order relative to DNAT. A DNAT ends the nat chain, so what follows ``services`` sees only
    # packets it did not DNAT, as kube-proxy's post-DNAT checks saw them with their address unchanged.
    # prerouting: input's checks (nodeport, service) and forward's (service, cluster IPs; a packet
    # to a local address takes input, which has no cluster-ips check).
    # output: service check before DNAT, cluster IPs after, and input's nodeport check for a local
    # destination (the packet comes back in through loopback, where no nat chain runs again).
    out: dict[str, list[str]] = {
        "nat-prerouting": [
            f"jump {SERVICES}", f"jump {NODEPORT_ENDPOINTS_CHECK}", f"jump {SERVICE_ENDPOINTS_CHECK}",
            f"{fam.addr} daddr @{CLUSTER_IPS} fib daddr type != local jump {CLUSTER_IPS_CHECK}"],
        "nat-output": [f"jump {SERVICE_ENDPOINTS_CHECK}", f"jump {SERVICES}", f"jump {CLUSTER_IPS_CHECK}",
                       f"jump {NODEPORT_ENDPOINTS_CHECK}"],
        "nat-postrouting": [
            f"ct status dnat {fam.addr} saddr . {fam.addr} daddr @{HAIRPIN} jump {MARK_FOR_MASQUERADE}",
            f"jump {MASQUERADING}"],
        FIREWALL_CHECK: [f"{svc_key} @{FIREWALL_IPS} {svc_key} . {fam.addr} saddr != @{FIREWALL_ALLOW} drop"],
        SERVICE_ENDPOINTS_CHECK: [f"{svc_key} vmap @{NO_ENDPOINT_SERVICES}"],
        NODEPORT_ENDPOINTS_CHECK: [f"{nodeport_match} {np_key} vmap @{NO_ENDPOINT_NODEPORTS}"],
        CLUSTER_IPS_CHECK: [f"{fam.addr} daddr @{CLUSTER_IPS} reject"],
        REJECT_CHAIN: ["reject"],
        MARK_FOR_MASQUERADE: [f"meta mark set meta mark | {opts.mark}"],
        MASQUERADING: [f"meta mark & {opts.mark} == 0 return",
                       # Clear the bit so a packet that re-traverses the stack is not masqueraded twice.
                       f"meta mark set meta mark ^ {opts.mark}",
                       "masquerade fully-random"],
        SERVICES: [f"{svc_key} vmap @{SERVICE_IPS}", f"{nodeport_match} {np_key} vmap @{SERVICE_NODEPORTS}"],
    }
    internal: list[str] = []
    if opts.masquerade_all:
        internal.append(f"jump {MARK_FOR_MASQUERADE}")
    elif opts.cluster_cidr is not None:
        # Off-cluster traffic to a ClusterIP may bounce off-node: masquerade it.
        internal.append(f"{fam.addr} saddr != {opts.cluster_cidr} jump {MARK_FOR_MASQUERADE}")
    out[SVC_INT] = [*internal, f"{svc_key} vmap @{PICK_SVC.name}"]
    for ext, extl, short, key, pick, short_pick in (
            (SVC_EXT, SVC_EXTL, SVC_SHORT, svc_key, PICK_SVC, PICK_SVC_SHORT),
            (NP_EXT, NP_EXTL, NP_SHORT, np_key, PICK_NP, PICK_NP_SHORT)):
        # Only external addresses reach these chains (nat: a connection's first packet only), so the
        # loadBalancerSourceRanges check costs ClusterIP traffic and established packets nothing.
        fw = [f"jump {FIREWALL_CHECK}"] if pick is PICK_SVC else []
        out[ext] = [*fw, f"jump {MARK_FOR_MASQUERADE}", f"{key} vmap @{pick.name}"]
        local: list[str] = [*fw]
        if opts.cluster_cidr is not None:
            # Pods reaching an external address act as if they went out and back in: Cluster policy.
            local.append(f"{fam.addr} saddr {opts.cluster_cidr} goto {short}")
        local += [f"fib saddr type local jump {MARK_FOR_MASQUERADE}", f"fib saddr type local goto {short}",
                  f"{key} vmap @{pick.name}"]
        out[extl] = local
        out[short] = [f"{key} vmap @{short_pick.name}"]
    return out


def pick_rules(fam: Family, pick: Pick, proto: str, n: int) -> list[str]:
    """The one rule of ``<pick>-<proto>-N``: DNAT to the endpoint at ``numgen random mod N``."""
    return [f"dnat {fam.addr} addr . port to {_key(fam, pick)} . numgen random mod {n} "
            f"map @{backends_map(pick, proto)}"]


def normalise_cidr(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr, strict=False))
