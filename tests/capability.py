"""Which missing capabilities skip a test and which fail it (pytest side of the rule).

A capability the environment is meant to have must never turn into a
silent skip: as root (CI, the QEMU guest) a broken ``ip netns`` fails every
namespace test, and inside the guest (``PROXYD_IN_VM`` set by
``tests/vm/run-in-vm.sh``) a kernel without IPVS fails every IPVS test. Only
a run without root skips the namespace tests, with the reason.

The per-directory conftests call ``mark_items``; the root conftest's
autouse fixture fails a test that carries a ``capability_missing`` marker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tests.netns.topology import netns_available, netns_skip_reason

MISSING = "capability_missing"


def in_vm() -> bool:
    """True inside the QEMU guest, where IPVS is part of the environment's promise."""
    return os.environ.get("PROXYD_IN_VM") == "1"


def mark_items(items: Sequence[pytest.Item], subdir: str, *markers: Any,
               also_required: Callable[[], str | None] | None = None) -> None:
    """Mark the tests under ``tests/<subdir>/``: ``netns`` plus ``markers``; skip them without
    root; make them fail when root lacks ``ip netns`` or ``also_required`` names a missing capability."""
    mine = [item for item in items if f"tests/{subdir}/" in str(item.fspath).replace("\\", "/")]
    if not mine:
        return
    skip = netns_skip_reason()
    broken = None if skip else (netns_available() or (also_required() if also_required else None))
    for item in mine:
        item.add_marker(pytest.mark.netns)
        for marker in markers:
            item.add_marker(marker)
        if skip:
            item.add_marker(pytest.mark.skip(reason=f"{subdir} tests: {skip}"))
        elif broken:
            item.add_marker(getattr(pytest.mark, MISSING)(broken))


def fail_if_missing(node: pytest.Item) -> None:
    marker = node.get_closest_marker(MISSING)
    if marker is not None:
        pytest.fail(f"capability this environment must have is missing: {marker.args[0]}", pytrace=False)


def fail_or_skip_without_netns() -> None:
    """For a single test needing namespaces outside the netns directories: skip without root, else
    fail when ``ip netns`` does not work."""
    skip = netns_skip_reason()
    if skip:
        pytest.skip(f"netns tests: {skip}")
    broken = netns_available()
    if broken:
        pytest.fail(f"capability this environment must have is missing: {broken}", pytrace=False)


def require_tool(found: bool, what: str) -> None:
    """A tool ``scripts/setup.sh --test`` installs: skipped without root (a developer's machine),
    a failure as root (CI), where setup.sh ran."""
    if found:
        return
    if netns_skip_reason():
        pytest.skip(f"{what} not installed")
    pytest.fail(f"{what} not installed (scripts/setup.sh --test installs it)", pytrace=False)
