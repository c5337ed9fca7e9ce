"""Quarantine: service ports the kernel refused, held back so they never block the rest of the node.

Every mode shares this record (issue 18). A service port lands here when
the kernel refuses what it needs: an iptables-restore or nft transaction
that fails only when the port is in it (found by ``isolate``, which bisects
the ports of a failed transaction), or a per-object netlink failure (ipvs
virtual/real servers and ipset entries, userspace addresses). While it is
quarantined the port keeps what the kernel last accepted for it (or nothing
if it never applied): ``hold_back`` builds the state a mode applies. It is
retried at the next full sync or when it changes, and cleared once it
applies.

Reporting: one log line per port when it enters the quarantine (with the
kernel's reason), ``proxyd_quarantined_service_ports{mode}`` (gauge) and
``proxyd_quarantined_total{mode,reason}`` (counter; the reason label is a
short class, the kernel's full text is in the log and in /healthz), and
``/healthz`` names the quarantine in its body while answering 200.

A mode that runs one instance per address family (``DualStackMode``) has
one quarantine per family; the quarantines of one mode share a tally, so
each change sets the mode's gauge to the node's total, never to one
family's count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from proxyd import metrics
from proxyd.model import Endpoint, ProxyState, ServicePort, ServicePortName, family

log = logging.getLogger(__name__)

K = TypeVar("K")

MAX_REASON = 300  # characters of the kernel's message kept per port


@dataclass(frozen=True, slots=True)
class Entry:
    """Why and since when (wall clock) a port is quarantined."""

    mode: str
    reason: str
    since: float


def reason_class(reason: str) -> str:
    """A bounded label for the counter: the kind of refusal, never free text."""
    text = reason.lower()
    if "errno" in text or "error 4353" in text or "ipset" in text:
        return "netlink"
    if "restore" in text or "iptables" in text or "line " in text:
        return "restore"
    if "nft" in text or "transaction" in text:
        return "transaction"
    if "bind" in text or "address" in text:
        return "address"
    return "other"


def _short(reason: str) -> str:
    return re.sub(r"\s+", " ", reason).strip()[:MAX_REASON] or "refused"


class _Tally:
    """The live quarantines of one mode (one per address family): the gauge is their sum."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        # Weak: a mode instance that is dropped (tests, a rebuilt mode) leaves the sum with it.
        self.members: weakref.WeakSet[Quarantine] = weakref.WeakSet()

    def publish(self) -> None:
        metrics.QUARANTINED_PORTS.labels(mode=self.mode).set(sum(len(q) for q in self.members))


_TALLIES: dict[str, _Tally] = {}


class Quarantine:
    """One mode's quarantined service ports (of one address family): name -> Entry."""

    def __init__(self, mode: str, *, wall: Callable[[], float] = time.time) -> None:
        self.mode = mode
        self._wall = wall
        self._entries: dict[ServicePortName, Entry] = {}
        self._tally = _TALLIES.setdefault(mode, _Tally(mode))
        self._tally.members.add(self)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def entries(self) -> Mapping[ServicePortName, Entry]:
        return self._entries

    def held(self, retried: Collection[ServicePortName] | None) -> set[ServicePortName]:
        """The quarantined ports not retried by this sync (``retried`` None: a full sync retries all)."""
        if retried is None or not self._entries:
            return set()
        return {n for n in self._entries if n not in retried}

    def add(self, name: ServicePortName, reason: str) -> None:
        """``name`` was refused: log it once, count it, keep the kernel's reason."""
        reason = _short(reason)
        old = self._entries.get(name)
        if old is not None:
            if old.reason != reason:
                self._entries[name] = dataclasses.replace(old, reason=reason)
            return
        self._entries[name] = Entry(self.mode, reason, self._wall())
        log.warning("%s: service port %s quarantined (the kernel refused it; the other services are "
                    "applied, it keeps its last good state): %s", self.mode, name, reason)
        metrics.QUARANTINED_TOTAL.labels(mode=self.mode, reason=reason_class(reason)).inc()
        self._gauge()

    def clear(self, names: Iterable[ServicePortName]) -> None:
        """These ports applied (or were deleted): out of the quarantine."""
        cleared = [n for n in names if self._entries.pop(n, None) is not None]
        for name in cleared:
            log.info("%s: service port %s applied: out of quarantine", self.mode, name)
        if cleared:
            self._gauge()

    def settle(self, retried: Collection[ServicePortName] | None,
               refused: Mapping[ServicePortName, str]) -> None:
        """After a sync: ``refused`` enter, every other retried quarantined port applied."""
        for name, reason in refused.items():
            self.add(name, reason)
        if not self._entries:
            return
        if retried is None:
            self.clear([n for n in list(self._entries) if n not in refused])
        else:
            self.clear([n for n in retried if n in self._entries and n not in refused])

    def report(self) -> dict[str, str]:
        """``ns/name:port/proto`` -> reason, for /healthz."""
        return {f"{n}/{n.protocol.value}": e.reason for n, e in self._entries.items()}

    def _gauge(self) -> None:
        self._tally.publish()


def hold_back(state: ProxyState, good: ProxyState, held: Collection[ServicePortName]) -> ProxyState:
    """``state`` with the ports in ``held`` as ``good`` has them (absent if ``good`` lacks them).

    O(ports) copy, paid only while something is held back.
    """
    if not held:
        return state
    ports: dict[ServicePortName, ServicePort] = dict(state.service_ports)
    eps: dict[ServicePortName, tuple[Endpoint, ...]] = dict(state.endpoints)
    for name in held:
        sp = good.service_ports.get(name)
        if sp is None:
            ports.pop(name, None)
        else:
            ports[name] = sp
        if name in good.endpoints:
            eps[name] = good.endpoints[name]
        else:
            eps.pop(name, None)
    return dataclasses.replace(state, service_ports=ports, endpoints=eps)


class NodeWideFailure(RuntimeError):
    """The transaction fails even without any of the candidate ports: not one object's fault."""


MAX_ISOLATED = 16  # refused ports isolated one by one per sync; beyond, the rest is quarantined as a block


def trial_budget(n: int, found: int) -> int:
    """How many trials ``isolate`` may run: ~2·log2(n) per refused port found, for up to MAX_ISOLATED."""
    return 8 + 2 * min(found + 1, MAX_ISOLATED) * (math.ceil(math.log2(n + 1)) + 2)


class _Exhausted(Exception):
    pass


async def isolate(candidates: Sequence[K], first_error: str,
                  attempt: Callable[[frozenset[K]], Awaitable[str | None]]) -> tuple[dict[K, str], int]:
    """Find which ``candidates`` make a transaction fail, by bisection.

    Applying every candidate failed with ``first_error``. ``attempt(include)``
    applies the not-yet-applied candidates in ``include`` (every other
    pending candidate held back) in one transaction, keeps it when the kernel
    accepts it and returns None, or returns the kernel's error (nothing
    changed). Returns (refused port -> reason, trials run).

    With one refused port among n: each level tries one half; a half that
    applies is kept and the other half holds the refusal; a half that fails
    is split further and its sibling is deferred to one final transaction
    with every other deferred group. So ceil(log2(n)) + 1 trials. When that
    final transaction fails too before anything applied, the bare
    transaction (no candidate) is tried once: if it fails as well the
    failure is node-wide (``NodeWideFailure``) and nobody is quarantined. A
    budget bounds the trials when the kernel fails at random.
    """
    refused: dict[K, str] = {}
    trials = 0
    proven = False  # a trial applied: the kernel accepts the transaction without the refused ports

    async def run(group: Sequence[K]) -> str | None:
        nonlocal trials, proven
        if trials >= trial_budget(len(candidates), len(refused)):
            raise _Exhausted
        trials += 1
        err = await attempt(frozenset(group))
        if err is None:
            proven = True
        return err

    work: list[tuple[list[K], str]] = [(list(candidates), first_error)]  # groups known to fail
    deferred: list[K] = []
    try:
        while work or deferred:
            if not work:
                group = list(deferred)
                err = await run(group)
                deferred = []
                if err is not None:
                    if not proven:
                        # Nothing applied yet, whatever was sent: is it any candidate's fault at all?
                        base = await run(())
                        if base is not None:
                            raise NodeWideFailure(base)
                    work.append((group, err))
                continue
            group, err = work[-1]
            if len(group) == 1:
                work.pop()
                refused[group[0]] = err
                continue
            mid = len(group) // 2
            first, second = group[:mid], group[mid:]
            err_first = await run(first)
            work.pop()
            if err_first is None:
                work.append((second, err))  # the whole failed, the first half applied
                continue
            work.append((first, err_first))
            deferred.extend(second)
    except _Exhausted:
        # The kernel refuses more than can be isolated one by one (or fails at random): what is
        # still unresolved is quarantined as a block and retried at the next full sync.
        for group, err in work:
            for key in group:
                refused[key] = f"not isolated after {trials} transactions: {err}"
        for key in deferred:
            refused[key] = f"not isolated after {trials} transactions: {first_error}"
    if refused and not proven:
        # Only one candidate, refused by inference: make sure the kernel takes the rest.
        trials += 1
        base = await attempt(frozenset())
        if base is not None:
            raise NodeWideFailure(base)
    return refused, trials


async def isolate_ports(mode: str, failure: str, first_error: str, *, fam: int, desired: ProxyState,
                        good: Callable[[], ProxyState], retried: Collection[ServicePortName] | None,
                        apply: Callable[[ProxyState, frozenset[ServicePortName]], Awaitable[str | None]],
                        invalidate: Callable[[], None]) -> dict[ServicePortName, str]:
    """Bisect the ports of a mode's failed transaction; apply the others, return the refused ones -> reason.

    What iptables and nftables modes share around ``isolate``: the candidates
    (``retried``, or on a full sync every port of family ``fam`` desired or
    last good), the state each trial applies (``desired`` with the pending
    ports not included held back at ``good()``, which moves as trials apply)
    and the reporting. ``apply(state, include)`` is the mode's transaction
    (None once the kernel holds it); ``invalidate`` makes the mode's planner
    forget what the kernel holds: the first trial that applies is a full
    plan, later ones only bring in their ports. ``failure`` names what failed
    in the log ("restore failed").
    """
    invalidate()
    if retried is None:
        names = {n for n, sp in desired.service_ports.items() if family(sp.cluster_ip) == fam}
        names.update(n for n, sp in good().service_ports.items() if family(sp.cluster_ip) == fam)
    else:
        names = set(retried)
    candidates = sorted(names)
    pending = set(candidates)
    log.warning("%s: %s (%s); isolating the refused service ports among %d",
                mode, failure, first_error.strip()[:200], len(candidates))

    async def attempt(include: frozenset[ServicePortName]) -> str | None:
        err = await apply(hold_back(desired, good(), pending - include), include)
        if err is None:
            pending.difference_update(include)
        return err

    try:
        refused, trials = await isolate(candidates, first_error, attempt)
    except NodeWideFailure:
        invalidate()
        raise
    metrics.QUARANTINE_TRIALS.labels(mode=mode).inc(trials)
    log.info("%s: %d service port(s) refused, the others applied, in %d more transactions",
             mode, len(refused), trials)
    return refused
