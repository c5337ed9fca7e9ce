"""Fixtures for the IPVS tests, which run inside the QEMU guest (``tests/vm/run-in-vm.sh``).

Every test here is marked ``ipvs`` (and ``netns``): the host's ``pytest -m
"not ipvs"`` leaves them out, and anywhere else they skip with the reason
when the kernel has no IPVS or namespaces are not usable.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.netns.topology import Topology, netns_available


def _unavailable() -> str | None:
    reason = netns_available()
    if reason:
        return reason
    from proxyd.modes.ipvs.applier import ipvs_available

    return ipvs_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if "tests/vm/" in str(item.fspath).replace("\\", "/")]
    if not mine:
        return
    reason = _unavailable()
    for item in mine:
        item.add_marker(pytest.mark.ipvs)
        item.add_marker(pytest.mark.netns)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"ipvs tests: {reason} (run tests/vm/run-in-vm.sh)"))


class GuestTopology(Topology):
    """The shared topology with start-up waits fit for software emulation (the daemon takes ~15 s)."""

    def start_proxyd(self, *args: Any, timeout: float = 120.0, **kwargs: Any) -> subprocess.Popen[str]:
        return super().start_proxyd(*args, timeout=timeout, **kwargs)


@pytest.fixture
def topology() -> Iterator[Topology]:
    with GuestTopology() as topo:
        yield topo
