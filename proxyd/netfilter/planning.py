"""What the iptables and nftables planners share: their options and whether they know the kernel.

Both keep a mirror of what the kernel holds so that a sync sends only
differences. Until a full plan was committed, or after ``invalidate`` (a
failed transaction, tables flushed by someone else), the mirror is not
trusted and the next plan is full.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar, Generic, Protocol, TypeVar


class NodeOptions(Protocol):
    """A planner's options: a frozen dataclass holding this node's NodePort addresses."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def node_ips(self) -> tuple[str, ...]: ...


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
