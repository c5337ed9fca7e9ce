"""What userspace mode's address holder holds in a test namespace, read with ``ip`` (the oracle).

Service IPs are ``local`` routes via ``proxyd0`` with protocol ``static``
(``proxyd/modes/userspace/addresses.py``), not device addresses.
"""

from __future__ import annotations

from tests.netns.topology import Topology


def holder_addresses(topo: Topology) -> set[str]:
    """The service IPs (both families) held by proxyd's ``local`` routes via ``proxyd0`` on the node."""
    out = topo.ns_run(topo.node, ["ip", "-o", "route", "show", "table", "all", "dev", "proxyd0", "proto",
                                  "static", "type", "local"], check=False)
    if out.returncode != 0:
        return set()
    return {line.split()[1] for line in out.stdout.splitlines()}


def device_addresses(topo: Topology) -> set[str]:
    """Addresses on ``proxyd0`` itself, link-local ones aside: proxyd never puts any there."""
    out = topo.ns_run(topo.node, ["ip", "-o", "addr", "show", "dev", "proxyd0"], check=False)
    if out.returncode != 0:
        return set()
    return {line.split()[3].split("/")[0] for line in out.stdout.splitlines()
            if not line.split()[3].startswith("fe80:")}
