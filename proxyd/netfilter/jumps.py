"""Jump rules from the built-in chains into a mode's own chains, and reading them back.

kube-proxy keeps, per proxier, a table of "jump chains" (``iptablesJumpChains``
in pkg/proxy/iptables and pkg/proxy/ipvs): each built-in chain that must send
packets to one of its chains, with a comment naming why. They cannot be part
of an ``iptables-restore --noflush`` input without owning the whole built-in
chain, so they are ensured one by one (``-C`` then ``-I``: prepended) and read
back to verify them. Both iptables and ipvs mode describe theirs with ``Jump``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# (table, chain, target, comment): what identifies a jump, whatever its other matches
JumpKey = tuple[str, str, str, str]


@dataclass(frozen=True, slots=True)
class Jump:
    """``-t table -A chain [extra] -m comment --comment comment -j target``."""

    table: str
    chain: str  # the built-in chain the jump sits in
    target: str
    comment: str
    extra: tuple[str, ...] = ()  # matches before the comment, e.g. ``-m conntrack --ctstate NEW``

    def args(self) -> list[str]:
        """The argv after ``-t T -C/-I/-D CHAIN``, unquoted as exec passes it."""
        return [*self.extra, "-m", "comment", "--comment", self.comment, "-j", self.target]

    def restore_line(self, op: str = "-A") -> str:
        """The rule as an ``iptables-restore`` / ``iptables-save`` line (``op`` ``-I``: prepended)."""
        return " ".join([f"{op} {self.chain}", *self.extra, "-m comment --comment", f'"{self.comment}"',
                         f"-j {self.target}"])

    @property
    def key(self) -> JumpKey:
        return (self.table, self.chain, self.target, self.comment)

    def __str__(self) -> str:
        return f"{self.table} {self.chain} -> {self.target}"


def restore_lines(jumps: Iterable[Jump], table: str) -> list[str]:
    """The jumps of ``table`` as restore lines, in the order they end up in the kernel.

    Each is prepended in turn, so the last one ensured comes first.
    """
    return [j.restore_line() for j in reversed(tuple(jumps)) if j.table == table]


def saved_jumps(saved: str, table: str = "") -> set[JumpKey]:
    """(table, chain, target, comment) of the comment-carrying jumps in ``iptables-save``/``-S`` output.

    ``-S`` output has no ``*table`` header: ``table`` names it.
    """
    return {key for key, _ in saved_rules(saved, table)}


def saved_rules(saved: str, table: str = "") -> list[tuple[JumpKey, str]]:
    """Every ``-A`` rule with a target in ``iptables-save``/``-S`` output: ((table, chain, target, comment),
    the line). ``-S`` output has no ``*table`` header: ``table`` names it."""
    found = []
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if not line.startswith("-A ") or " -j " not in line:
            continue
        chain = line.split()[1]
        target = line.rsplit(" -j ", 1)[1].split()[0]
        comment = ""
        if '--comment "' in line:
            comment = line.split('--comment "', 1)[1].split('"', 1)[0]
        elif "--comment " in line:
            comment = line.split("--comment ", 1)[1].split()[0]
        found.append(((table, chain, target, comment), line))
    return found
