"""Fixtures for the IPVS tests, which run inside the QEMU guest (``tests/vm/run-in-vm.sh``).

Every test here is marked ``ipvs`` (and ``netns``): the host's ``pytest -m
"not ipvs"`` leaves them out, and anywhere else they skip with the reason
when the kernel has no IPVS or namespaces are not usable.

Under software emulation every process start costs seconds, and building
the namespaces of a ``Topology`` takes ~80 of them. So the namespaces are
built once per session, and each test gets a ``GuestTopology``: a view of
the same namespaces with its own manifests directory and its own
processes, which on exit kills what the test started and resets the node
namespace's IPVS state (``IpvsApplier.cleanup`` and ``remove_rules`` run inside it: no virtual
server, no ``kube-ipvs0``, no KUBE chains or sets) and its conntrack table,
so every test starts from a clean node as with a fresh topology.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.netns.topology import Topology, in_netns, netns_available


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


def reset_node(node_ns: str) -> list[str]:
    """Remove everything ipvs mode may have left in ``node_ns``; return what could not be removed."""
    from proxyd.modes.ipvs.applier import IpvsApplier, remove_rules

    with in_netns(node_ns):
        # pyroute2 sockets and iptables processes made on this thread live in node_ns.
        applier = IpvsApplier()
        try:
            return applier.cleanup() + asyncio.run(remove_rules())
        finally:
            applier._close_sockets()


class GuestTopology(Topology):
    """A per-test view of the session's namespaces; start-up waits fit for software emulation."""

    shared: Topology | None = None

    def __enter__(self) -> GuestTopology:
        base = type(self).shared
        if base is None:
            return super().__enter__()  # type: ignore[return-value]
        # Same namespaces and pods; nothing of them is ours to delete on close.
        self.node, self.node2, self.client = base.node, base.node2, base.client
        self.pod_list = list(base.pod_list)
        return self

    def close(self) -> None:
        super().close()
        if type(self).shared is not None:
            failed = reset_node(self.node)
            with contextlib.suppress(Exception):
                self.ns_run(self.node, ["conntrack", "-F"], check=False)
            assert not failed, f"node reset failed: {failed}"

    def start_proxyd(self, *args: Any, timeout: float = 120.0, **kwargs: Any) -> subprocess.Popen[str]:
        # The daemon needs ~15 s to start under emulation (imports, first full sync).
        return super().start_proxyd(*args, timeout=timeout, **kwargs)

    def run_proxyd(self, args: Any, *, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        # ``--cleanup`` imports and cleans every mode: ~40 s under emulation.
        return super().run_proxyd(args, timeout=timeout)


@pytest.fixture(scope="session")
def shared_namespaces() -> Iterator[Topology]:
    with Topology() as base:
        GuestTopology.shared = base
        try:
            yield base
        finally:
            GuestTopology.shared = None


@pytest.fixture
def topology(shared_namespaces: Topology) -> Iterator[Topology]:
    with GuestTopology(prefix=shared_namespaces.prefix) as topo:
        yield topo
