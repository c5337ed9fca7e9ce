"""Fixtures for the reliability suite (helpers live in ``harness.py``).

Every test here runs the real ``proxyd`` in a fresh ``Topology`` (see
``netnstopo/topology.py``), so the directory is marked ``netns`` and
skipped without root (failed as root without ``ip netns``), like ``tests/netns``. Long tests are also marked
``slow``; they still run in CI (the whole directory stays under ~8 minutes).
``figures`` collects numbers for ``docs/reliability.md``: printed at the end
of the run, and written as JSON to ``$PROXYD_RELIABILITY_FIGURES`` when set
(``bench/reliability_figures.py`` runs the suite that way and renders them).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.capability import mark_items
from tests.netns.topology import Topology

_FIGURES: dict[str, dict[str, Any]] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_items(items, "reliability")


def _raise_own_descriptor_limit() -> None:
    """The client side of the load tests holds thousands of sockets in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# At import, not in pytest_sessionstart: that hook only runs for the
# conftests pytest loads first, which this one is not under `pytest tests`.
_raise_own_descriptor_limit()


_OUTCOMES: dict[str, str] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Each reliability test's outcome: a figure counts only when its test passed (asserts included)."""
    outcome = yield
    if "tests/reliability/" not in str(item.fspath).replace("\\", "/"):
        return
    report = outcome.get_result()
    nodeid = item.nodeid
    if report.skipped:
        _OUTCOMES.setdefault(nodeid, "skipped")
    elif report.failed:
        _OUTCOMES[nodeid] = "failed" if report.when == "call" else "error"
    elif report.when == "call":
        _OUTCOMES.setdefault(nodeid, "passed")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES and not _OUTCOMES:
        return
    terminalreporter.section("reliability figures")
    for test, values in sorted(_FIGURES.items()):
        state = _OUTCOMES.get(test, "unknown")
        mark = "" if state == "passed" else f" [{state.upper()}: not counted]"
        terminalreporter.write_line(f"{test}{mark}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    target = os.environ.get("PROXYD_RELIABILITY_FIGURES")
    if target:
        # Format 2: every test's outcome next to its figures (bench/reliability_figures.py reads it).
        tests = {test: {"outcome": _OUTCOMES.get(test, "unknown"), "figures": _FIGURES.get(test, {})}
                 for test in sorted(set(_OUTCOMES) | set(_FIGURES))}
        Path(target).write_text(json.dumps({"format": 2, "tests": tests}, indent=2, sort_keys=True,
                                           default=str))


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A dict whose content is reported under this test's node id."""
    values: dict[str, Any] = {}
    _FIGURES[request.node.nodeid] = values
    return values


@pytest.fixture
def topology() -> Iterator[Topology]:
    with Topology() as topo:
        yield topo


