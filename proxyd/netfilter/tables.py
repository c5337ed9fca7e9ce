"""The kernel side of every iptables-driven mode: restores, base-chain jumps, canaries, cleanup.

One ``Netfilter`` per back end and family (``backend``). What it does is
kube-proxy's pkg/util/iptables, shared by iptables mode and ipvs mode's
iptables part:

* ``restore(text)`` feeds ``iptables-restore --noflush --counters -w`` on
  stdin, as an asyncio subprocess: one atomic transaction per call, chains
  the caller does not own are never touched (``--noflush``), and a rejected
  input changes nothing.
* ``ensure_jumps(jumps)`` makes sure the built-in chains jump to the mode's
  chains, each prepended once as kube-proxy's EnsureRule does, the absent
  ones of a table inserted in one transaction.
* Canaries: an empty ``KUBE-PROXY-CANARY`` chain in mangle, nat and filter.
  Whoever flushes a table (a firewall reload, ``iptables -t nat -F; -X``)
  removes it with the mode's chains.
* ``missing(jumps)`` is the cheap check every sync period runs: which
  canaries and jumps are gone, in every table the mode uses. It lists only
  the built-in chains and the canary, never the big per-service chains. On
  legacy IPv4 hosts it reads the live ruleset in process through
  python-iptables (libiptc, no fork); elsewhere through ``iptables -S``.
* ``cleanup(...)`` removes jumps and chains like kube-proxy's
  CleanupLeftovers; ``cleanup_everywhere`` does it in both back ends and
  both families.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from proxyd.netfilter.backend import BACKENDS, Backend, IptablesError, chains_of, run
from proxyd.netfilter.jumps import Jump, JumpKey, saved_jumps, saved_rules

CANARY = "KUBE-PROXY-CANARY"
CANARY_TABLES = ("mangle", "nat", "filter")


def _exists_error(err: IptablesError) -> bool:
    text = err.stderr.lower()
    return "already exists" in text or "file exists" in text


def _never(chain: str) -> bool:
    return False


class Netfilter:
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

    async def ensure_jumps(self, jumps: Iterable[Jump]) -> None:
        """Make sure each of ``jumps`` is there once, prepended as kube-proxy's EnsureRule does (``-I``).

        What is there is read as ``missing`` reads it (a listing per built-in chain, none per jump),
        and the absent jumps of a table go in one ``iptables-restore`` transaction: a full sync of
        ipvs mode ensures nine jumps per family, and one process per check, per chain creation and
        per insertion made that dozens of processes. When a target chain does not exist yet (iptables
        mode ensures its jumps before its first restore creates them) the transaction fails as a
        whole, and that table's jumps are ensured one by one: ``-N`` the target, ``-C`` then ``-I``.
        """
        jumps = tuple(jumps)
        _, present = await self._read(jumps, ())
        absent = [j for j in jumps if j.key not in present]
        for table in dict.fromkeys(j.table for j in absent):
            mine = [j for j in absent if j.table == table]
            inserts = [j.restore_line("-I") for j in mine]
            try:
                await self.restore("\n".join([f"*{table}", *inserts, "COMMIT", ""]))
            except IptablesError:
                for jump in mine:
                    await self.ensure_chain(jump.table, jump.target)
                    try:
                        await self.iptables("-t", jump.table, "-C", jump.chain, *jump.args())
                    except IptablesError:
                        await self.iptables("-t", jump.table, "-I", jump.chain, *jump.args())

    async def ensure_canaries(self, tables: Iterable[str] = CANARY_TABLES) -> None:
        for table in tables:
            await self.ensure_chain(table, CANARY)

    async def missing(self, jumps: Collection[Jump],
                      canary_tables: Collection[str] = CANARY_TABLES) -> list[str]:
        """What is gone of the canaries in ``canary_tables`` and of ``jumps``; empty when all is there."""
        jumps, canary_tables = tuple(jumps), tuple(canary_tables)
        no_canary, present = await self._read(jumps, canary_tables)
        out: list[str] = []
        for table in dict.fromkeys([*canary_tables, *(j.table for j in jumps)]):
            if table in no_canary:
                out.append(f"{table} {CANARY}")
            out += [str(j) for j in jumps if j.table == table and j.key not in present]
        return out

    async def _read(self, jumps: tuple[Jump, ...],
                    canary_tables: tuple[str, ...]) -> tuple[set[str], set[JumpKey]]:
        """The tables of ``canary_tables`` without their canary, and the keys of the jumps present.

        It lists only the built-in chains the jumps sit in, never the big per-service chains. On legacy IPv4
        it reads the live ruleset in process through python-iptables (libiptc, no fork).
        """
        if self.backend.name == "legacy" and self.backend.family == 4:
            try:
                return await asyncio.to_thread(_iptc_read, jumps, canary_tables)
            except ImportError:
                pass
        no_canary: set[str] = set()
        present: set[JumpKey] = set()
        for table in dict.fromkeys([*canary_tables, *(j.table for j in jumps)]):
            if table in canary_tables:
                try:
                    await self.iptables("-t", table, "-S", CANARY)
                except IptablesError:
                    no_canary.add(table)
            for chain in dict.fromkeys(j.chain for j in jumps if j.table == table):
                try:
                    present |= saved_jumps(await self.iptables("-t", table, "-S", chain), table)
                except IptablesError:
                    pass  # the table itself is gone: every jump in it is missing
        return no_canary, present

    async def save(self, table: str) -> str:
        return await run([*self.backend.save, "-t", table])

    async def chains(self, table: str) -> set[str]:
        return chains_of(await self.save(table), table)

    async def restore(self, text: str) -> None:
        await run(self.backend.restore, stdin=text)

    async def cleanup(self, jumps: Iterable[Jump], chains: Mapping[str, Iterable[str]],
                      owned: Callable[[str], bool] = _never) -> list[str]:
        """Remove ``jumps``, then the ``chains`` of each table and every chain ``owned`` says is ours.

        One ``iptables-save`` of every table tells what is there, so a back end holding nothing of ours
        costs one process (``--cleanup`` and the IPVS guest's resets run it in both back ends and
        families). Each table with something to remove then gets one transaction (legacy; nft's are
        split as ``cleanup_inputs`` says) that deletes the jumps found, every copy, by their saved text,
        then flushes and deletes the chains. Returns the problems met; missing things are not problems.
        """
        jumps = tuple(jumps)
        try:
            saved = await run(self.backend.save)
        except (IptablesError, OSError) as err:
            return [f"{self.backend.name}: save failed: {err}"]
        ours = {j.key for j in jumps}
        found = saved_rules(saved)
        problems: list[str] = []
        for table in dict.fromkeys([*(j.table for j in jumps), *chains]):
            existing = chains_of(saved, table)
            fixed = tuple(chains.get(table, ()))
            victims = [c for c in fixed if c in existing]
            victims += sorted(c for c in existing if c not in victims and owned(c))
            unjump = [f"-D {line[3:]}" for key, line in found if key[0] == table and key in ours]
            if not victims and not unjump:
                continue
            try:
                for text in cleanup_inputs(table, victims, self.backend.chunk_lines, first=unjump):
                    await self.restore(text)
            except (IptablesError, OSError) as err:
                # Something else still references one of them: delete one by one
                # so everything that can go does go.
                problems.append(f"{self.backend.name} {table}: {err}")
                for jump in (j for j in jumps if j.table == table):
                    for _ in range(16):  # a rule may have been inserted several times
                        try:
                            await self.iptables("-t", table, "-D", jump.chain, *jump.args())
                        except IptablesError:
                            break
                for c in victims:
                    for op in ("-F", "-X"):
                        try:
                            await self.iptables("-t", table, op, c)
                        except IptablesError as e:
                            problems.append(f"{self.backend.name} {table} {op} {c}: {e.stderr.strip()}")
        return problems


async def cleanup_everywhere(jumps: Iterable[Jump], chains: Mapping[str, Iterable[str]],
                             owned: Callable[[str], bool] = _never,
                             families: Iterable[int] = (4, 6)) -> list[str]:
    """``cleanup`` in every back end and family whose tools are installed."""
    jumps, chains = tuple(jumps), {t: tuple(c) for t, c in chains.items()}
    problems: list[str] = []
    for name in BACKENDS:
        for family in families:
            backend = Backend(name, family)
            if shutil.which(backend.save[0]) is None:
                continue
            problems += await Netfilter(backend).cleanup(jumps, chains, owned)
    return problems


def cleanup_inputs(table: str, victims: list[str], chunk: int, first: Sequence[str] = ()) -> list[str]:
    """iptables-restore inputs that run ``first`` (e.g. ``-D`` lines), then flush, then delete, ``victims``.

    ``chunk`` 0: one transaction (legacy copies the whole table per transaction anyway). Otherwise
    transactions of at most ``chunk`` lines: every chain is flushed before any is deleted, so no
    deletion meets a jump from a chain not yet flushed, whatever the order.
    """
    flushes = [f":{c} - [0:0]" for c in victims]
    deletes = [f"-X {c}" for c in victims]
    groups = [[*first, *flushes, *deletes]] if not chunk else [
        lines[i:i + chunk] for lines in (list(first), flushes, deletes) for i in range(0, len(lines), chunk)]
    return ["\n".join([f"*{table}", *group, "COMMIT", ""]) for group in groups if group]


def _iptc_read(jumps: tuple[Jump, ...], canary_tables: tuple[str, ...]) -> tuple[set[str], set[JumpKey]]:
    import iptc  # python-iptables: reads legacy x_tables in process

    no_canary: set[str] = set()
    present: set[JumpKey] = set()
    for name in dict.fromkeys([*canary_tables, *(j.table for j in jumps)]):
        table = iptc.Table(name)
        table.refresh()  # iptc caches a table snapshot (docs/facts.md)
        if name in canary_tables and not table.is_chain(CANARY):
            no_canary.add(name)
        for chain in dict.fromkeys(j.chain for j in jumps if j.table == name):
            if not table.is_chain(chain):
                continue
            for rule in iptc.Chain(table, chain).rules:
                comment = ""
                for match in rule.matches:
                    if match.name == "comment":
                        comment = match.get_all_parameters().get("comment", [""])[0].strip('"')
                present.add((name, chain, rule.target.name, comment))
    return no_canary, present
