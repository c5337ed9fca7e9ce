"""The only code of iptables mode that touches the kernel: restore, jump rules, canaries, cleanup.

* ``restore(text)`` feeds a plan to ``iptables-restore --noflush --counters
  -w`` on stdin: one atomic transaction per call, chains proxyd does not own
  are never touched (``--noflush``), and a rejected input changes nothing.
* ``ensure_jumps()`` makes sure the built-in chains jump to proxyd's chains
  (``iptables -C`` then ``-I`` as kube-proxy's EnsureRule); it cannot be part
  of the restore without owning all of PREROUTING etc., so it runs once per
  full sync.
* Canaries: an empty ``KUBE-PROXY-CANARY`` chain in mangle, nat and filter.
  If something flushes the tables (a firewall reload), the canary vanishes
  with our chains; ``canary_present()`` notices and the mode resyncs fully
  (kube-proxy's iptables Monitor). On legacy hosts the check goes through
  python-iptables (in process, no fork); on nft through the tool.
* ``cleanup()`` removes every jump and chain proxyd (or kube-proxy) creates,
  in the given back end, like kube-proxy's CleanupLeftovers.

Every call is async: tools run as asyncio subprocesses, libiptc calls in a
worker thread.
"""

from __future__ import annotations

import asyncio
import logging

from proxyd.modes.iptables import chains as ch
from proxyd.modes.iptables.backend import Backend, IptablesError, chains_of, run

log = logging.getLogger(__name__)

CANARY_TABLES = ("mangle", "nat", "filter")
# Chains cleanup removes from each table, besides every per-service chain.
CLEANUP_CHAINS = {
    "nat": (ch.KUBE_SERVICES, ch.KUBE_NODEPORTS, ch.KUBE_POSTROUTING, ch.KUBE_MARK_MASQ,
            ch.KUBE_PROXY_CANARY),
    "filter": (ch.KUBE_SERVICES, ch.KUBE_EXTERNAL_SERVICES, ch.KUBE_FORWARD, ch.KUBE_NODEPORTS,
               ch.KUBE_PROXY_FIREWALL, ch.KUBE_PROXY_CANARY),
    "mangle": (ch.KUBE_PROXY_CANARY,),
}


def _exists_error(err: IptablesError) -> bool:
    text = err.stderr.lower()
    return "already exists" in text or "file exists" in text


class Applier:
    """Kernel operations for one back end and family."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def iptables(self, *args: str) -> str:
        return await run([*self.backend.iptables, *args])

    async def ensure_chain(self, table: str, chain: str) -> bool:
        """Create ``chain`` unless it exists; True when it already existed."""
        try:
            await self.iptables("-t", table, "-N", chain)
        except IptablesError as err:
            if _exists_error(err):
                return True
            raise
        return False

    async def ensure_jumps(self) -> None:
        for table, builtin, extra, comment, target in ch.JUMP_RULES:
            await self.ensure_chain(table, target)
            args = ch.jump_rule_args(extra, comment, target)
            try:
                await self.iptables("-t", table, "-C", builtin, *args)
            except IptablesError:
                await self.iptables("-t", table, "-I", builtin, *args)

    async def ensure_canaries(self) -> None:
        for table in CANARY_TABLES:
            await self.ensure_chain(table, ch.KUBE_PROXY_CANARY)

    async def canary_present(self, tables: tuple[str, ...] = ("mangle", "filter")) -> bool:
        """True while every canary in ``tables`` exists (default: the two small tables, cheap)."""
        if self.backend.name == "legacy" and self.backend.family == 4:
            try:
                return await asyncio.to_thread(_iptc_has_chains, tables, ch.KUBE_PROXY_CANARY)
            except ImportError:
                pass
        for table in tables:
            try:
                await self.iptables("-t", table, "-S", ch.KUBE_PROXY_CANARY)
            except IptablesError:
                return False
        return True

    async def save(self, table: str) -> str:
        return await run([*self.backend.save, "-t", table])

    async def chains(self, table: str) -> set[str]:
        return chains_of(await self.save(table), table)

    async def restore(self, text: str) -> None:
        await run(self.backend.restore, stdin=text)

    async def cleanup(self) -> list[str]:
        """Remove proxyd's jumps and chains from this back end; returns the problems met."""
        problems: list[str] = []
        for table, builtin, extra, comment, target in ch.JUMP_RULES:
            args = ch.jump_rule_args(extra, comment, target)
            for _ in range(16):  # a rule may have been inserted several times
                try:
                    await self.iptables("-t", table, "-D", builtin, *args)
                except IptablesError:
                    break
        for table, fixed in CLEANUP_CHAINS.items():
            try:
                existing = await self.chains(table)
            except (IptablesError, OSError) as err:
                problems.append(f"{self.backend.name} {table}: save failed: {err}")
                continue
            victims = [c for c in fixed if c in existing]
            victims += sorted(c for c in existing
                              if ch.is_service_chain(c) or c.startswith(ch.LEGACY_CHAIN_PREFIXES))
            if not victims:
                continue
            try:
                for text in cleanup_inputs(table, victims, self.backend.chunk_lines):
                    await self.restore(text)
            except (IptablesError, OSError) as err:
                # Something else still references one of them: delete one by one
                # so everything that can go does go.
                problems.append(f"{self.backend.name} {table}: {err}")
                for c in victims:
                    for op in ("-F", "-X"):
                        try:
                            await self.iptables("-t", table, op, c)
                        except IptablesError as e:
                            problems.append(f"{self.backend.name} {table} {op} {c}: {e.stderr.strip()}")
        return problems


def cleanup_inputs(table: str, victims: list[str], chunk: int) -> list[str]:
    """iptables-restore inputs that flush, then delete, ``victims`` of ``table``.

    ``chunk`` 0: one transaction (legacy copies the whole table per transaction anyway). Otherwise
    transactions of at most ``chunk`` lines: every chain is flushed before any is deleted, so no
    deletion meets a jump from a chain not yet flushed, whatever the order.
    """
    flushes = [f":{c} - [0:0]" for c in victims]
    deletes = [f"-X {c}" for c in victims]
    groups = [flushes + deletes] if not chunk else [
        lines[i:i + chunk] for lines in (flushes, deletes) for i in range(0, len(lines), chunk)]
    return ["\n".join([f"*{table}", *group, "COMMIT", ""]) for group in groups]


def _iptc_has_chains(tables: tuple[str, ...], chain: str) -> bool:
    import iptc  # python-iptables: reads legacy x_tables in process

    for name in tables:
        table = iptc.Table(name)
        table.refresh()  # iptc caches a table snapshot; see docs/facts.md
        if not table.is_chain(chain):
            return False
    return True
