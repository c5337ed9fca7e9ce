"""The only code of iptables mode that touches the kernel, through the shared netfilter layer.

Binds ``proxyd.netfilter.Netfilter`` to iptables mode's jump rules and chains
(``chains``): restores of a plan, jumps from the built-in chains, canaries in
mangle, nat and filter, the every-sync-period check of both, and cleanup.
"""

from __future__ import annotations

from proxyd.modes.iptables import chains as ch
from proxyd.netfilter import Backend, Netfilter, cleanup_everywhere


class Applier:
    """Kernel operations of iptables mode for one back end and family."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.netfilter = Netfilter(backend)

    async def ensure_canaries(self) -> None:
        await self.netfilter.ensure_canaries()

    async def ensure_jumps(self) -> None:
        await self.netfilter.ensure_jumps(ch.JUMP_RULES)

    async def missing(self) -> list[str]:
        """Canaries and jumps gone from any table (empty: all present)."""
        return await self.netfilter.missing(ch.JUMP_RULES)

    async def chains(self, table: str) -> set[str]:
        return await self.netfilter.chains(table)

    async def restore(self, text: str) -> None:
        await self.netfilter.restore(text)

    async def cleanup(self) -> list[str]:
        """Remove iptables mode's jumps and chains from this back end; returns the problems met."""
        return await self.netfilter.cleanup(ch.JUMP_RULES, ch.CLEANUP_CHAINS, ch.owned_chain)


async def cleanup_all() -> list[str]:
    """iptables mode's cleanup in both back ends and both families."""
    return await cleanup_everywhere(ch.JUMP_RULES, ch.CLEANUP_CHAINS, ch.owned_chain)
