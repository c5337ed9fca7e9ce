"""Userspace mode's answers to ``proxyd status`` and ``proxyd trace``, from its own live objects.

In this mode proxyd itself is the data path, so "the kernel" is the set of
listening sockets that are really open, the addresses really held (local
routes via ``proxyd0``) and the endpoint lists installed in the connection table:

* **status**: per service port and endpoint, the connections open now (the
  connection table's count), connections opened and bytes each way (the
  per-endpoint tallies of ``stats.py``); it matches the last sync when
  every planned listener is open, every planned address is held and every
  planned table entry is installed.
* **trace**: which listener takes ``dst:port/proto`` (a specific address
  first, then a wildcard NodePort listener on a node address), whether its
  source ranges admit ``src``, and the endpoint list of the table entry it
  feeds: round robin gives each endpoint equal odds over many connections
  (ClientIP affinity keeps a client that already has a live entry on its
  endpoint). proxyd connects to the endpoint from the node, so the endpoint
  always sees a node address: reported as masquerade.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from proxyd.introspect import ModeStatus, TracePacket, TracePath, TraceResult, counter_key
from proxyd.model import Protocol
from proxyd.modes.userspace.listeners import SourceFilter
from proxyd.modes.userspace.planner import WILDCARD, ListenerKey, Plan, TableKey

if TYPE_CHECKING:
    from proxyd.modes.userspace import UserspaceMode


def _ep_text(ep: tuple[str, int]) -> str:
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"


def status(mode: UserspaceMode, plan: Plan | None) -> ModeStatus:
    result = ModeStatus(matches=None if plan is None else True)
    table = mode.table
    for key in sorted(mode.tables):
        per_ep: dict[str, dict[str, int]] = result.counters.setdefault(counter_key(key.name), {})
        active = table.active(key.id) if table is not None else {}
        stats = mode.stats.peek(key.name)
        for ep in mode.tables[key].endpoints:
            entry = per_ep.setdefault(_ep_text(ep), {"active": 0, "connections": 0, "bytes_to_endpoint": 0,
                                                     "bytes_to_client": 0})
            entry["active"] += active.get(ep, 0)
        if stats is not None:
            for ep, (opened, to_ep, to_client) in stats.by_endpoint.items():
                entry = per_ep.setdefault(_ep_text(ep), {"active": 0, "connections": 0,
                                                         "bytes_to_endpoint": 0, "bytes_to_client": 0})
                # Both table keys of a port share one Stats: assign, never add.
                entry["connections"] = opened
                entry["bytes_to_endpoint"] = to_ep
                entry["bytes_to_client"] = to_client
    if plan is None:
        result.notes.append("no sync yet: nothing to compare with")
        return result
    for listener in sorted(plan.listeners):
        if listener not in mode.applier.tcp_listeners and listener not in mode.applier.udp_listeners:
            why = mode.listen_failures().get(str(listener), "not open")
            result.mismatch(f"listener {listener} ({plan.listeners[listener].name}) not open: {why}")
    missing = plan.addresses - mode.applier.holder.current
    for ip in sorted(missing)[:5]:
        result.mismatch(f"address {ip} not held (no local route via proxyd0)")
    for table_key, table_entry in plan.tables.items():
        if mode.tables.get(table_key) != table_entry:
            result.mismatch(f"connection table entry {table_key} differs from the last sync")
    result.notes.append("per-endpoint counters: connections open now ('active'), opened since start, "
                        "bytes each way (TCP while open and at close; UDP as they move with the engine, "
                        "at flow close with the twin)")
    return result


def _listener_for(mode: UserspaceMode, packet: TracePacket, protocol: Protocol,
                  local_ips: set[str]) -> tuple[ListenerKey, object] | None:
    listeners = mode.applier.tcp_listeners if protocol == Protocol.TCP else mode.applier.udp_listeners
    exact = ListenerKey(packet.dst, packet.port, protocol)
    if exact in listeners:
        return exact, listeners[exact]
    fam = 6 if ":" in packet.dst else 4
    wildcard = ListenerKey(WILDCARD[fam], packet.port, protocol)
    if wildcard in listeners and (packet.dst in local_ips or ipaddress.ip_address(packet.dst).is_loopback):
        return wildcard, listeners[wildcard]
    return None


def trace(mode: UserspaceMode, packet: TracePacket, local_ips: set[str]) -> TraceResult:
    result = TraceResult(source="userspace listeners and connection table (live)")
    try:
        protocol = Protocol(packet.protocol.upper())
    except ValueError:
        result.paths = [TracePath("REJECT", None, 1.0, False, (), f"userspace mode serves only TCP and UDP, "
                                                                   f"not {packet.protocol}")]
        return result
    found = _listener_for(mode, packet, protocol, local_ips)
    if found is None:
        if protocol == Protocol.UDP and packet.dst in mode.applier.holder.current:
            why = ("no proxyd listener on this service address and port: a UDP service port without "
                   "endpoints holds none, so the kernel answers ICMP port unreachable")
        else:
            why = ("no proxyd listener on this address and port: not a service here "
                   "(the node's own stack answers, usually with a reset)")
        result.paths = [TracePath("REJECT", None, 1.0, False, (f"no listener {packet.dst}:{packet.port}/"
                                                               f"{protocol}",), why)]
        return result
    key, listener = found
    table_key: TableKey = listener.key  # type: ignore[attr-defined]
    steps = [f"listener {key}", f"service {table_key.name} "
             f"({'external' if table_key.external else 'cluster IP'} traffic, table {table_key.id})"]
    admits = getattr(listener, "admits", None)
    if isinstance(admits, SourceFilter):
        if not admits(packet.src):
            steps.append(f"source {packet.src} outside loadBalancerSourceRanges {', '.join(admits.ranges)}")
            result.paths = [TracePath("REJECT", None, 1.0, False, tuple(steps),
                                      "source not in loadBalancerSourceRanges: connection closed")]
            return result
        steps.append(f"source {packet.src} admitted by loadBalancerSourceRanges")
    entry = mode.tables.get(table_key)
    endpoints = entry.endpoints if entry is not None else ()
    if not endpoints:
        steps.append("no usable endpoints")
        result.paths = [TracePath("REJECT", None, 1.0, False, tuple(steps),
                                  f"{table_key.name} has no endpoints: connection closed")]
        return result
    if entry is not None and entry.affinity_timeout:
        steps.append(f"ClientIP affinity {entry.affinity_timeout}s: a client with a live entry keeps its "
                     "endpoint; otherwise round robin")
    else:
        steps.append(f"round robin over {len(endpoints)} endpoints")
    odds = 1.0 / len(endpoints)
    result.paths = [TracePath("ACCEPT", _ep_text(ep), odds, True, (*steps, f"connect {_ep_text(ep)}"),
                              "proxied: the endpoint sees a node address")
                    for ep in endpoints]
    return result
