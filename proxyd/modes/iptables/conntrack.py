"""Stale UDP conntrack cleanup over netlink (pyroute2), as kube-proxy's conntrack.CleanStaleEntries.

UDP has no connection close: once conntrack has an entry DNATing a client's
flow to an endpoint, every later datagram of that flow follows the entry,
not the rules. So when an endpoint of a UDP service goes away, its entries
must be deleted or the flow keeps blackholing into the dead pod; and when a
UDP service gets its first endpoint after rejecting, entries created while
it rejected must go so the next datagram is DNATed. TCP needs none of this
(a dead endpoint resets; established connections must survive).

``stale_flows`` (pure) decides what to delete from the previous and new
renderings; ``clear`` dumps UDP entries once over NETLINK_NETFILTER and
deletes the matching ones in netlink batches. Both are blocking: call ``clear`` in a worker
thread. Errors are the caller's to log: a failed cleanup must never fail
a sync whose rules were applied. ``clear_stale`` does all that for the
iptables and nftables modes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK

from proxyd.model import Protocol, ServicePort, ServicePortName
from proxyd.modes.iptables.planner import PortRender
from proxyd.netlink import NETLINK_NETFILTER, BatchSocket, Request

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, order=True)
class Flow:
    """Delete UDP entries with this original destination (ip and/or port) DNATed to ``nat_ip``.

    A None field matches anything; at least one of dst/dport is always set.
    """

    dst: str | None
    dport: int | None
    nat_ip: str | None

    def matches(self, orig_dst: str, orig_dport: int, reply_src: str) -> bool:
        return ((self.dst is None or self.dst == orig_dst)
                and (self.dport is None or self.dport == orig_dport)
                and (self.nat_ip is None or self.nat_ip == reply_src))


def _service_ips(sp: ServicePort) -> list[str]:
    return [sp.cluster_ip, *sp.external_ips, *sp.load_balancer_ips]


def stale_flows(names: Iterable[ServicePortName], *,
                old_ports: Mapping[ServicePortName, ServicePort],
                old_renders: Mapping[ServicePortName, PortRender],
                new_ports: Mapping[ServicePortName, ServicePort],
                new_renders: Mapping[ServicePortName, PortRender]) -> list[Flow]:
    """Flows to delete after moving ``names`` from the old rendering to the new one."""
    flows: set[Flow] = set()
    for name in names:
        if name.protocol != Protocol.UDP:
            continue
        op, orr = old_ports.get(name), old_renders.get(name)
        np, nr = new_ports.get(name), new_renders.get(name)
        if op is not None and orr is not None:
            keep = {(e.ip, e.port) for e in nr.reachable} if nr is not None else set()
            for ep in orr.reachable:
                if (ep.ip, ep.port) in keep:
                    continue
                for ip in _service_ips(op):
                    flows.add(Flow(ip, op.port, ep.ip))
                if op.node_port:
                    flows.add(Flow(None, op.node_port, ep.ip))
        if (np is not None and nr is not None and nr.has_endpoints
                and not (orr is not None and orr.has_endpoints)):
            # Entries made while the service rejected would keep rejecting.
            for ip in _service_ips(np):
                flows.add(Flow(ip, np.port, None))
            if np.node_port:
                flows.add(Flow(None, np.node_port, None))
    return sorted(flows, key=lambda f: (f.dst or "", f.dport or 0, f.nat_ip or ""))


def clear(flows: list[Flow], *, family: int = 4) -> int:
    """Delete every UDP conntrack entry matching one of ``flows``; returns how many. Blocking.

    One dump, then every deletion in netlink batches (``proxyd.netlink``):
    after an endpoint of a busy UDP service goes there can be thousands. An
    entry already gone is not an error; one the kernel refuses otherwise is
    logged and counted and does not stop the others.
    """
    if not flows:
        return 0
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    requests: list[Request] = []
    # The socket's family, not the filter tuple's, decides what the kernel dumps: pyroute2 stamps
    # every request with it (AF_INET unless told), so an IPv6 dump needs an AF_INET6 socket.
    with Conntrack(nfgen_family=af) as ct:
        for entry in ct.dump_entries(tuple_orig=NFCTAttrTuple(family=af, proto=socket.IPPROTO_UDP)):
            o, r = entry.tuple_orig, entry.tuple_reply
            if o.proto != socket.IPPROTO_UDP:
                continue
            if any(f.matches(o.daddr, o.dport, r.saddr) for f in flows):
                requests.append(delete_request(af, o.saddr, o.sport, o.daddr, o.dport))
    if not requests:
        return 0
    with BatchSocket(NETLINK_NETFILTER, kind="conntrack") as sock:
        return sock.run(requests).applied


async def clear_stale(mode: str, family: int, names: Iterable[ServicePortName], *,
                      old_ports: Mapping[ServicePortName, ServicePort],
                      old_renders: Mapping[ServicePortName, PortRender],
                      new_ports: Mapping[ServicePortName, ServicePort],
                      new_renders: Mapping[ServicePortName, PortRender]) -> None:
    """After ``mode``'s sync: delete the stale flows of ``names`` in a worker thread; a failure is logged."""
    flows = stale_flows(names, old_ports=old_ports, old_renders=old_renders,
                        new_ports=new_ports, new_renders=new_renders)
    if not flows:
        return
    try:
        deleted = await asyncio.to_thread(clear, flows, family=family)
        log.debug("%s: deleted %d stale UDP conntrack entries", mode, deleted)
    except Exception as err:
        log.warning("%s: stale UDP conntrack cleanup failed: %s", mode, err)


def delete_request(af: int, saddr: str, sport: int, daddr: str, dport: int) -> Request:
    """Delete the UDP conntrack entry whose original tuple is this; an entry already gone is harmless."""
    from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_DELETE, NFCTAttrTuple, nfct_msg

    msg = nfct_msg.create_from(tuple_orig=NFCTAttrTuple(family=af, saddr=saddr, daddr=daddr,
                                                        proto=socket.IPPROTO_UDP, sport=sport, dport=dport))
    msg["nfgen_family"] = af
    return Request(msg, IPCTNL_MSG_CT_DELETE | (NFNL_SUBSYS_CTNETLINK << 8), 0,
                   f"udp {saddr}:{sport} -> {daddr}:{dport}", frozenset({errno.ENOENT}))
