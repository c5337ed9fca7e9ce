"""What the iptables and nftables planners share: their options and whether they know the kernel.

Both keep a mirror of what the kernel holds so that a sync sends only
differences. Until a full plan was committed, or after ``invalidate`` (a
failed transaction, tables flushed by someone else), the mirror is not
trusted and the next plan is full.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """The node-wide settings both planners' plans depend on (each mode's PlannerOptions adds its own).

    ``nodeport_addresses`` are --nodeport-addresses CIDRs (empty: every local
    address, matched with ``-m addrtype --dst-type LOCAL``); ``node_ips`` are
    this node's addresses inside them (used only when CIDRs are given).
    ``node_ip`` is the primary node address (LB source ranges that contain it
    also admit the LB IPs as sources, as kube-proxy does).
    """

    family: int = 4
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    nodeport_addresses: tuple[str, ...] = ()
    node_ips: tuple[str, ...] = ()
    node_ip: str | None = None

    def __post_init__(self) -> None:
        if self.family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, got {self.family!r}")
        if not 0 <= self.masquerade_bit <= 31:
            raise ValueError(f"masquerade_bit must be in 0..31, got {self.masquerade_bit!r}")

    @property
    def mark(self) -> str:
        """The masquerade mark bit as a hexadecimal mask."""
        return f"{1 << self.masquerade_bit:#x}"

    @property
    def local_cidr(self) -> str | None:
        """kube-proxy's LocalTrafficDetector by cluster CIDR: the first CIDR of this family."""
        for cidr in self.cluster_cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            if net.version == self.family:
                return str(net)
        return None


OptionsT = TypeVar("OptionsT", bound=NodeOptions)


class MirrorPlanner(Generic[OptionsT]):
    """Base of the iptables and nftables planners (they add the planning)."""

    def __init__(self, options: OptionsT) -> None:
        self.options = options
        self._valid = False  # False until a full plan was committed

    @property
    def needs_full(self) -> bool:
        return not self._valid

    def invalidate(self) -> None:
        """Forget what the kernel holds: the next plan is full."""
        self._valid = False

    def set_node_ips(self, node_ips: Iterable[str]) -> None:
        """Update this node's NodePort addresses."""
        ips = tuple(node_ips)
        if ips != self.options.node_ips:
            self.options = dataclasses.replace(self.options, node_ips=ips)
