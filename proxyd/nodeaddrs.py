"""This node's own addresses, filtered by ``--nodeport-addresses``, read over netlink.

NodePorts and healthCheckNodePort servers listen on the node's addresses
that fall inside the ``--nodeport-addresses`` CIDRs (kube-proxy's
``GetNodeIPs``); with no CIDRs every local address qualifies. With
``per_family``, CIDRs apply per address family as kube-proxy's per-family
``NodePortAddresses`` do: a family none of the CIDRs is of keeps all of its
addresses (``--nodeport-addresses 192.0.2.0/24`` leaves every IPv6 address
accepting IPv6 NodePorts). Addresses held
on the interfaces proxyd itself creates to own service IPs (``kube-ipvs0``
for ipvs) are service addresses, not node addresses, and are never
returned. Userspace mode holds its service IPs as ``local`` routes via
``proxyd0``, which are no addresses at all; ``proxyd0`` stays excluded for
the addresses an earlier proxyd held there (converted at its next start).

The netlink dump is a blocking call: call ``node_addresses`` from a worker
thread (``node_addresses_async`` does) when on the event loop with many
addresses; one dump on a node takes well under a millisecond.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

from proxyd.netlink import NETLINK_ROUTE, BatchSocket, dump_link_addresses

# Devices whose addresses are service IPs owned by proxyd's modes.
HOLDER_DEVICES = frozenset({"proxyd0", "kube-ipvs0"})


def filter_addresses(addresses: Iterable[str], cidrs: Iterable[str], *,
                     per_family: bool = False) -> list[str]:
    """Addresses inside any of ``cidrs`` (all of them when ``cidrs`` is empty), sorted, unique;
    with ``per_family``, all addresses of a family that no CIDR is of.

    Pure; unparseable addresses or CIDRs raise ValueError.
    """
    networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    constrained = {net.version for net in networks} if per_family else {4, 6} if networks else set()
    out = set()
    for text in addresses:
        addr = ipaddress.ip_address(text)
        if addr.version not in constrained or any(addr.version == net.version and addr in net
                                                  for net in networks):
            out.add(str(addr))
    return sorted(out, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))


def local_addresses(*, family: int | None = None) -> list[str]:
    """Every address configured on this namespace's interfaces except proxyd's holders.

    One raw dump (``proxyd.netlink``): a holder's addresses (up to one per
    service on ``kube-ipvs0``) are skipped after reading one header each.
    pyroute2 decoded every attribute of every reply, ~60 µs each: 0.5–0.7 s
    of CPU per sync at 10,000 held addresses.
    """
    families = {4: socket.AF_INET, 6: socket.AF_INET6}
    skip = set()
    for name in HOLDER_DEVICES:
        try:
            skip.add(socket.if_nametoindex(name))
        except OSError:
            continue  # no such device
    with BatchSocket(NETLINK_ROUTE, kind="address", sndbuf=None) as sock:
        found = dump_link_addresses(sock, family=families[family] if family else socket.AF_UNSPEC,
                                    skip_links=frozenset(skip))
    return [addr for _link, _family, _prefixlen, addr in found]


def node_addresses(cidrs: Iterable[str], *, family: int | None = None, per_family: bool = False) -> list[str]:
    """Local addresses accepting NodePort traffic for ``--nodeport-addresses`` = ``cidrs``."""
    return filter_addresses(local_addresses(family=family), cidrs, per_family=per_family)


async def node_addresses_async(cidrs: Iterable[str], *, family: int | None = None,
                               per_family: bool = False) -> list[str]:
    """``node_addresses`` in a worker thread, so the event loop never waits on netlink."""
    cidrs = tuple(cidrs)
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: node_addresses(cidrs, family=family, per_family=per_family))
