"""Which iptables back end to drive (legacy x_tables or nf_tables), and running its tools (async).

Two rulesets can coexist in one kernel: iptables-legacy writes x_tables,
iptables-nft writes nf_tables, and each tool sees only its own. proxyd must
write where the host's other components (kubelet, CNI, firewalld) write, so
it detects the back end exactly like Kubernetes' iptables-wrapper
(kubernetes-sigs/iptables-wrappers):

1. a ``KUBE-IPTABLES-HINT`` or ``KUBE-KUBELET-CANARY`` chain in the mangle
   table of nf_tables -> nft; else the same in legacy -> legacy;
2. otherwise count rules (``^-`` lines of ``*-save``): legacy if it holds
   more than nft, else nft.

Both steps read the IPv4 and the IPv6 rulesets (``iptables-*`` and
``ip6tables-*``) and make one decision for both families, as the wrapper
does: the two per-family proxiers always use the same back end.

``PROXYD_IPTABLES_BACKEND=legacy|nft`` overrides detection (tests run both).

All tools are run as argv lists (never a shell) by ``run``, an asyncio
subprocess with a timeout, so the event loop never blocks on a big
iptables-restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ENV_OVERRIDE = "PROXYD_IPTABLES_BACKEND"
# Lines per iptables-nft-restore transaction in big inputs (a full sync's
# service chains, cleanup): iptables-nft-restore is quadratic in the size of
# one input; 4k lines cost ~0.2 s each here, one 32k-line input ~8 s.
NFT_CHUNK_LINES = 4000
BACKENDS = ("legacy", "nft")
HINT_CHAINS = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)\b", re.M)
# A full restore of 100k endpoints through iptables-nft takes minutes here
# (docs/iptables.md); killing it halfway would only make the retry start over.
DEFAULT_TIMEOUT = 900.0
# kube-proxy's restore wait flags; also given to iptables for the xtables lock.
WAIT = ("-w", "5")


class IptablesError(RuntimeError):
    """An iptables tool failed; carries argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(argv[:3])}... exited {returncode}: {stderr.strip()[:500]}")


@dataclass(frozen=True, slots=True)
class Backend:
    name: str  # "legacy" or "nft"
    family: int = 4

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ValueError(f"unknown iptables backend {self.name!r}")

    @property
    def _stem(self) -> str:
        return "ip6tables" if self.family == 6 else "iptables"

    @property
    def iptables(self) -> list[str]:
        return [f"{self._stem}-{self.name}", *WAIT]

    @property
    def save(self) -> list[str]:
        return [f"{self._stem}-{self.name}-save"]

    @property
    def restore(self) -> list[str]:
        return [f"{self._stem}-{self.name}-restore", "--noflush", "--counters", *WAIT]

    @property
    def chunk_lines(self) -> int:
        """How many lines a big input is split into transactions of; 0: never split.

        Legacy copies the whole table per transaction, so splitting would only multiply that.
        """
        return NFT_CHUNK_LINES if self.name == "nft" else 0


def choose(*, nft_mangle: str, legacy_save: str, nft_save: str) -> str:
    """iptables-wrapper's decision from the tools' outputs (pure)."""
    if HINT_CHAINS.search(nft_mangle):
        return "nft"
    if HINT_CHAINS.search(legacy_save):
        return "legacy"
    legacy_rules = sum(1 for line in legacy_save.splitlines() if line.startswith("-"))
    nft_rules = sum(1 for line in nft_save.splitlines() if line.startswith("-"))
    return "legacy" if legacy_rules > nft_rules else "nft"


def _output(argv: list[str], timeout: float = 5.0) -> str:
    try:
        # Own session: a signal to the daemon's process group is not the tool's (proxyd.daemon).
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              start_new_session=True)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def detect(*, family: int = 4, environ: Mapping[str, str] | None = None) -> Backend:
    """The back end to use on this host (blocking; runs the save tools once)."""
    env = os.environ if environ is None else environ
    forced = env.get(ENV_OVERRIDE, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_OVERRIDE} must be legacy or nft, got {forced!r}")
        return Backend(forced, family)
    # One decision for both families, from both families' rulesets, as iptables-wrapper makes it
    # (kubelet may leave its hint chain in only one of them): the IPv4 and IPv6 proxiers must
    # write where each other and the host write.
    stems = ("iptables", "ip6tables")
    name = choose(nft_mangle="".join(_output([f"{s}-nft-save", "-t", "mangle"]) for s in stems),
                  legacy_save="".join(_output([f"{s}-legacy-save"]) for s in stems),
                  nft_save="".join(_output([f"{s}-nft-save"]) for s in stems))
    return Backend(name, family)


async def run(argv: Sequence[str], *, stdin: str | None = None, time_limit: float = DEFAULT_TIMEOUT) -> str:
    """Run ``argv`` (no shell); its stdout, or IptablesError on non-zero exit or timeout."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)  # a signal to the daemon's process group is not the tool's (proxyd.daemon)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None),
                                          time_limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise IptablesError(argv, None, f"timed out after {time_limit}s") from None
    except asyncio.CancelledError:
        # The caller gave up (a status read at shutdown): in its own session the tool would outlive it.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise IptablesError(argv, proc.returncode, err.decode(errors="replace"))
    return out.decode(errors="replace")


def chains_of(save_text: str, table: str) -> set[str]:
    """Chain names declared in ``table`` of iptables-save output."""
    out: set[str] = set()
    current = None
    for line in save_text.splitlines():
        if line.startswith("*"):
            current = line[1:].strip()
        elif line.startswith(":") and current == table:
            out.add(line[1:].split(" ", 1)[0])
    return out
