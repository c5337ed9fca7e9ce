"""Fixtures for the IPVS tests, which run inside the QEMU guest (``tests/vm/run-in-vm.sh``).

Every test here is marked ``ipvs`` (and ``netns``): the host's ``pytest -m
"not ipvs"`` leaves them out. Outside the guest they skip with the reason
when the kernel has no IPVS; inside it (``PROXYD_IN_VM=1``, set by
``run-in-vm.sh``) a missing IPVS or ``ip netns`` fails every test.

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

from tests.capability import in_vm, mark_items
from tests.netns.topology import Topology, in_netns, netns_skip_reason


def _ipvs_missing() -> str | None:
    from proxyd.modes.ipvs.applier import ipvs_available

    return ipvs_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if "tests/vm/" in str(item.fspath).replace("\\", "/")]
    if not mine:
        return
    if in_vm():
        # The guest exists to provide IPVS: without it every test fails instead of skipping.
        mark_items(mine, "vm", pytest.mark.ipvs, also_required=_ipvs_missing)
        return
    mark_items(mine, "vm", pytest.mark.ipvs)
    reason = None if netns_skip_reason() else _ipvs_missing()
    for item in mine:
        if reason and item.get_closest_marker("skip") is None:
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


def _reset(node_ns: str) -> list[str]:
    try:
        return reset_node(node_ns)
    except Exception as err:  # the reset itself broke: as bad as a partial one
        return [f"reset raised {err!r}"]


class GuestTopology(Topology):
    """A per-test view of the session's namespaces; start-up waits fit for software emulation."""

    shared: Topology | None = None
    # Set when a reset failed: the next test must not see what that test left behind.
    dirty: list[str] | None = None

    def __enter__(self) -> GuestTopology:
        base = type(self).shared
        if base is None:
            return super().__enter__()  # type: ignore[return-value]
        if type(self).dirty is not None:
            base = type(self).rebuild_shared()
        # Same namespaces and pods; nothing of them is ours to delete on close.
        self.node, self.node2, self.client = base.node, base.node2, base.client
        self.pod_list = list(base.pod_list)
        return self

    @classmethod
    def rebuild_shared(cls) -> Topology:
        """Delete the session's namespaces (and with them every IPVS object in them), build new ones."""
        old = cls.shared
        cls.shared = None
        if old is not None:
            old.close()
        fresh = Topology()
        fresh.__enter__()
        cls.shared, cls.dirty = fresh, None
        return fresh

    def close(self) -> None:
        super().close()
        if type(self).shared is not None:
            failed = _reset(self.node)
            if failed:  # one more try: a busy guest can lose a race with the dying daemon
                failed = _reset(self.node)
            with contextlib.suppress(Exception):
                self.ns_run(self.node, ["conntrack", "-F"], check=False)
            if failed:
                type(self).dirty = failed
            assert not failed, f"node reset failed (the next test gets fresh namespaces): {failed}"

    def start_proxyd(self, *args: Any, timeout: float = 120.0, **kwargs: Any) -> subprocess.Popen[str]:
        # The daemon needs ~15 s to start under emulation (imports, first full sync).
        return super().start_proxyd(*args, timeout=timeout, **kwargs)

    def run_proxyd(self, args: Any, *, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        # ``--cleanup`` imports and cleans every mode: ~40 s under emulation.
        return super().run_proxyd(args, timeout=timeout)


@pytest.fixture(scope="session")
def shared_namespaces() -> Iterator[Topology]:
    missing = _ipvs_missing() if in_vm() else None
    if missing:  # fail before spending a minute of emulation on namespaces nothing can use
        pytest.fail(f"capability this environment must have is missing: {missing}", pytrace=False)
    base = Topology()
    base.__enter__()
    GuestTopology.shared, GuestTopology.dirty = base, None
    try:
        yield base
    finally:
        # Close whichever set is current (a failed reset may have replaced the first one).
        current, GuestTopology.shared = GuestTopology.shared, None
        if current is not None:
            current.close()
        if current is not base:
            base.close()


@pytest.fixture
def topology(shared_namespaces: Topology) -> Iterator[Topology]:
    with GuestTopology(prefix=shared_namespaces.prefix) as topo:
        yield topo
