"""The only code of nftables mode that touches the kernel: transactions, drift check, listing, cleanup.

Every call goes through one long-lived ``libnft.Nft`` (libnftables in
process, ``nft -f -`` where the library is missing) in a worker thread, so
a big transaction never blocks the event loop.

* ``apply(text)``: one transaction; a rejected one changes nothing.
* ``canary_present()``: lists the one-element ``canary`` set of our table
  (~0.1 ms; ``list tables`` costs ~150 ms at 1,000 services on nft 1.0.6
  because nft fetches everything first). A missing table, set or element
  means someone deleted or flushed our table (``nft flush ruleset``, a
  firewall reload): the mode repairs with a full sync. The table itself is
  never listed.
* ``chains()``: names of the chains in our table — read only before a full
  sync, to find dynamic chains a previous run left.
* ``cleanup()``: delete the table in both families.
"""

from __future__ import annotations

import asyncio
import logging

from proxyd.modes.nftables import layout as lay
from proxyd.modes.nftables.libnft import Nft, NftError

log = logging.getLogger(__name__)


class Applier:
    def __init__(self, family: lay.Family, nft: Nft | None = None) -> None:
        self.family = family
        self.nft = nft or Nft()

    async def apply(self, text: str) -> None:
        await asyncio.to_thread(self.nft.run, text)

    async def canary_present(self) -> bool:
        """True while our table, its canary set and the set's one element exist (~0.1 ms)."""
        try:
            items = await asyncio.to_thread(self.nft.run_json,
                                            f"list set {self.family.table} {lay.CANARY}")
        except NftError:
            return False
        for item in items:
            found = item.get("set")
            if isinstance(found, dict) and found.get("name") == lay.CANARY:
                return self.family.canary_element in (found.get("elem") or ())
        return False

    async def chains(self) -> set[str]:
        items = await asyncio.to_thread(self.nft.run_json, f"list chains {self.family.table_family}")
        out = set()
        for item in items:
            chain = item.get("chain")
            if (isinstance(chain, dict) and chain.get("table") == lay.TABLE
                    and isinstance(chain.get("name"), str)):
                out.add(chain["name"])
        return out

    async def cleanup(self) -> list[str]:
        """Delete proxyd's table in both families; the problems met."""
        problems = []
        for version in (4, 6):
            fam = lay.Family(version)
            try:
                present = await asyncio.to_thread(_has_table, self.nft, fam)
                if present:
                    await asyncio.to_thread(self.nft.run, f"delete table {fam.table}")
            except Exception as err:
                problems.append(f"{fam.table}: {err}")
        return problems


def _has_table(nft: Nft, fam: lay.Family) -> bool:
    for item in nft.run_json(f"list tables {fam.table_family}"):
        table = item.get("table")
        if isinstance(table, dict) and table.get("name") == lay.TABLE:
            return True
    return False
