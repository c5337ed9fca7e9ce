"""ipvs mode's answers to ``proxyd status`` and ``proxyd trace``: the IPVS table read back over netlink.

* **status**: one dump of every virtual server of the mode instance's
  address family (IPv4 or IPv6) with its real servers
  and their kernel statistics (connections scheduled, packets and bytes
  each way, active and inactive connections) — ``ipvsadm -Ln --stats`` in
  one answer. It matches the last sync when every planned virtual server
  exists with the planned scheduler and flags and every planned real server
  is present with a non-zero weight (weight 0 means "draining", see
  ``graceful.py``).
* **trace**: the virtual server the kernel holds for ``dst:port/proto``
  (none: the packet is not load balanced by IPVS), its scheduler and real
  servers. For rr/wrr/lc/wlc and friends each real server's odds are its
  share of the weights; for the hashing schedulers (sh, dh, mh) one fixed
  server per source, unknown without the hash, so the odds are shown as
  shares with a note. Masquerading in ipvs mode is decided by iptables
  rules with ipset matches; the trace reports kube-proxy's rule for this
  kind of address (off-cluster source or --masquerade-all for ClusterIPs,
  externally reachable addresses unless a Local policy applies).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Mapping
from typing import Any

from proxyd.introspect import ModeStatus, TracePacket, TracePath, TraceResult, counter_key
from proxyd.model import Protocol, ProxyState, ServicePortName
from proxyd.modes.ipvs.planner import Plan, RealServer, VirtualServer, VSKey

HASHING = ("sh", "dh", "mh", "lblc", "lblcr")
_STAT_NAMES = {"IPVS_STATS_ATTR_CONNS": "connections", "IPVS_STATS_ATTR_INPKTS": "packets_in",
               "IPVS_STATS_ATTR_OUTPKTS": "packets_out", "IPVS_STATS_ATTR_INBYTES": "bytes_in",
               "IPVS_STATS_ATTR_OUTBYTES": "bytes_out"}

_PROTO_NUM = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP, Protocol.SCTP: 132}

KernelTable = dict[VSKey, tuple[VirtualServer, dict[RealServer, dict[str, int]]]]


def _attrs(nla: Any) -> dict[str, Any]:
    if not nla:
        return {}
    return {item[0]: item[1] for item in nla["attrs"]}


def dest_counters(attrs: Mapping[str, Any]) -> dict[str, int]:
    """A real server's weight, connection counts and statistics from its netlink attributes."""
    out = {"weight": int(attrs.get("IPVS_DEST_ATTR_WEIGHT", 0)),
           "active": int(attrs.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0)),
           "inactive": int(attrs.get("IPVS_DEST_ATTR_INACT_CONNS", 0))}
    stats = attrs.get("IPVS_DEST_ATTR_STATS64") or attrs.get("IPVS_DEST_ATTR_STATS")
    for name, value in _attrs(stats).items():
        key = _STAT_NAMES.get(name)
        if key is not None:
            out[key] = int(value)
    return out


def read_table(applier: Any) -> KernelTable:
    """Every virtual server of the applier's family with its real servers and their counters (blocking;
    run in a thread)."""
    from pyroute2 import IPVS
    from pyroute2.ipvs import IPVSService
    from pyroute2.netlink.exceptions import NetlinkError

    out: KernelTable = {}
    # The applier's batched dumps parse only what a sync compares; counters need pyroute2's full decoding.
    ipvs = IPVS()
    try:
        for key, (vs, _dests) in applier.read_servers(with_dests=False).items():
            servers: dict[RealServer, dict[str, int]] = {}
            service = IPVSService(addr=key.ip, port=key.port, protocol=_PROTO_NUM[key.protocol])
            try:
                messages = list(ipvs.dest("dump", service=service))
            except NetlinkError as err:
                if err.code not in (errno.ESRCH, errno.ENOENT):
                    raise
                messages = []
            for msg in messages:
                attrs = _attrs(msg.get_attr("IPVS_CMD_ATTR_DEST"))
                server = RealServer(attrs["IPVS_DEST_ATTR_ADDR"], attrs["IPVS_DEST_ATTR_PORT"])
                servers[server] = dest_counters(attrs)
            out[key] = (vs, servers)
    finally:
        ipvs.close()
    return out


def _owners(state: ProxyState | None) -> dict[VSKey, ServicePortName]:
    """Which service port each virtual server address belongs to."""
    owners: dict[VSKey, ServicePortName] = {}
    if state is None:
        return owners
    for name, svc in state.service_ports.items():
        for ip in (svc.cluster_ip, *svc.external_ips, *svc.load_balancer_ips):
            owners.setdefault(VSKey(ip, svc.port, svc.protocol), name)
    return owners


def build_status(table: KernelTable, plan: Plan | None, state: ProxyState | None) -> ModeStatus:
    """Counters per service port and real server, and the kernel-versus-plan comparison (pure)."""
    result = ModeStatus(matches=None if plan is None else True)
    owners = _owners(state)
    nodeports: dict[tuple[int, Protocol], ServicePortName] = {}
    if state is not None:
        nodeports = {(svc.node_port, svc.protocol): name for name, svc in state.service_ports.items()
                     if svc.node_port}
    for key in sorted(table):
        _vs, servers = table[key]
        name = owners.get(key) or nodeports.get((key.port, key.protocol))
        label = counter_key(name) if name is not None else f"(virtual server {key})"
        per_ep = result.counters.setdefault(label, {})
        for server, counts in servers.items():
            entry = per_ep.setdefault(str(server), {})
            for k, v in counts.items():
                if k != "weight":
                    entry[k] = entry.get(k, 0) + v
    if plan is None:
        result.notes.append("no sync yet: nothing to compare with")
        return result
    for key, want in plan.servers.items():
        have = table.get(key)
        if have is None:
            result.mismatch(f"virtual server {key} missing")
            continue
        if have[0] != want:
            result.mismatch(f"virtual server {key}: kernel has {have[0].scheduler} flags {have[0].flags:#x}, "
                            f"the last sync wrote {want.scheduler} flags {want.flags:#x}")
        for server in plan.destinations.get(key, ()):
            held = have[1].get(server)
            if held is None:
                result.mismatch(f"virtual server {key}: real server {server} missing")
            elif held.get("weight", 0) == 0:
                result.mismatch(f"virtual server {key}: real server {server} has weight 0")
    for key in table:
        if key not in plan.servers:
            result.mismatch(f"virtual server {key} in the kernel but not wanted")
    result.notes.append("counters from the IPVS table (netlink): connections scheduled, packets and bytes "
                        "each way since the real server was added, active/inactive connections now")
    return result


def _masquerade(packet: TracePacket, name: ServicePortName | None, state: ProxyState | None, *,
                cluster_cidrs: tuple[str, ...], masquerade_all: bool) -> tuple[bool, str]:
    if masquerade_all:
        return True, "--masquerade-all"
    svc = state.service_ports.get(name) if (state is not None and name is not None) else None
    src = ipaddress.ip_address(packet.src)
    if svc is not None and packet.dst == svc.cluster_ip:
        cidrs = [c for c in cluster_cidrs if ipaddress.ip_network(c, strict=False).version == src.version]
        if cidrs and src not in ipaddress.ip_network(cidrs[0], strict=False):
            return True, f"source outside the cluster CIDR {cidrs[0]}"
        return False, "cluster IP traffic from inside the cluster CIDR"
    if svc is not None and svc.external_policy_local:
        return False, "externalTrafficPolicy Local keeps the client address"
    return True, "external traffic (NodePort, externalIP, LB IP) is masqueraded"


def build_trace(table: KernelTable, packet: TracePacket, state: ProxyState | None, *,
                cluster_cidrs: tuple[str, ...] = (), masquerade_all: bool = False) -> TraceResult:
    """The IPVS lookup of ``packet`` in a dumped table (pure)."""
    result = TraceResult(source="IPVS table via netlink (read back now)")
    try:
        protocol = Protocol(packet.protocol.upper())
    except ValueError:
        result.supported = False
        result.notes.append(f"unknown protocol {packet.protocol!r}")
        return result
    key = VSKey(packet.dst, packet.port, protocol)
    # NodePorts have one virtual server per node address, so one lookup covers every kind.
    found = table.get(key)
    if found is None:
        result.paths = [TracePath("ACCEPT", str(RealServer(packet.dst, packet.port)), 1.0, False,
                                  (f"no IPVS virtual server {key}",),
                                  "not a service address: not load balanced")]
        return result
    vs, servers = found
    owners = _owners(state)
    name = owners.get(key)
    steps = [f"IPVS virtual server {key} (scheduler {vs.scheduler}"
             + (f", persistence {vs.timeout}s" if vs.timeout else "") + ")"]
    if name is not None:
        steps.append(f"service {name}")
    live = {s: c for s, c in servers.items() if c.get("weight", 0) > 0}
    if not live:
        why = "no real servers with weight > 0"
        result.paths = [TracePath("REJECT", None, 1.0, False, tuple(steps),
                                  f"{name or key} has no endpoints ({why})")]
        return result
    masq, why = _masquerade(packet, name, state, cluster_cidrs=cluster_cidrs, masquerade_all=masquerade_all)
    total = sum(c["weight"] for c in live.values())
    if vs.scheduler in HASHING:
        result.notes.append(f"scheduler {vs.scheduler} hashes the source: one fixed real server per client; "
                            "odds are weight shares over many clients")
    if vs.timeout:
        result.notes.append(f"persistence {vs.timeout}s: a client with a live template keeps its real server")
    result.paths = [TracePath("ACCEPT", str(server), counts["weight"] / total, masq,
                              (*steps, f"real server {server} weight {counts['weight']}"), why)
                    for server, counts in sorted(live.items())]
    return result

