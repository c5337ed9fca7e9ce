"""Fixtures for the network-namespace tests: skipped without root, failed when root has no ``ip netns``.

Every test in this directory is marked ``netns``. ``topology`` gives a fresh
``Topology`` (node, client, node2, three pods on node1 and one on node2) and
tears it down afterwards, also when the test fails.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.capability import mark_items
from tests.netns.topology import Topology


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_items(items, "netns")


@pytest.fixture
def topology() -> Iterator[Topology]:
    with Topology() as topo:
        yield topo
