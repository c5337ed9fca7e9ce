"""Fixtures for the network-namespace tests: skip cleanly without root or ``ip netns``.

Every test in this directory is marked ``netns``. ``topology`` gives a fresh
``Topology`` (node, client, node2, three pods on node1 and one on node2) and
tears it down afterwards, also when the test fails.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netns.topology import Topology, netns_available

_UNAVAILABLE = netns_available()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/netns/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.netns)
            if _UNAVAILABLE:
                item.add_marker(pytest.mark.skip(reason=f"netns tests: {_UNAVAILABLE}"))


@pytest.fixture
def topology() -> Iterator[Topology]:
    with Topology() as topo:
        yield topo
