"""Session-wide guards: no test may leave proxyd's objects in the host's own network namespace,
and no test runs without a capability the environment is meant to have.

Every test that starts the daemon or a mode does so inside namespaces it
creates. If anything proxyd creates (the ``proxyd0`` or ``kube-ipvs0``
holder devices) shows up in the namespace the test run itself is in, some
test touched the host, and the run fails loudly instead of leaving it there.
When ``ip`` itself fails the guard cannot look, so it fails too (as root:
without root no test touches the network).

Tests marked ``capability_missing`` by ``tests/capability.py`` (root without
``ip netns``; the QEMU guest without IPVS) fail here with the reason.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import HealthCheck, settings

from tests.capability import fail_if_missing

# The suite runs on shared, busy machines: a per-example deadline or a "too slow" health check would
# fail a property test on the machine's load, not on the property. Tests keep their own bounds.
settings.register_profile("busy-machine", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("busy-machine")

HOLDERS = ("proxyd0", "kube-ipvs0")


def _host_holders() -> set[str]:
    """proxyd's holder devices in this process's namespace; raises when ``ip`` cannot tell."""
    try:
        # The machine may be busy: a generous timeout, and a failure is an error, not "none".
        proc = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"host-leak guard: `ip -o link show` failed: {err}") from err
    if proc.returncode != 0 or ": lo:" not in proc.stdout:
        raise RuntimeError(f"host-leak guard: `ip -o link show` exited {proc.returncode}: "
                           f"{proc.stderr.strip()[:500]!r}")
    out = proc.stdout
    return {name for name in HOLDERS if f": {name}:" in out or f": {name}@" in out}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "capability_missing(reason): the environment lacks a capability it "
                                       "must have; the test fails")


@pytest.fixture(scope="session", autouse=True)
def host_namespace_untouched():
    if os.geteuid() != 0:
        yield
        return
    try:
        before = _host_holders()
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    yield
    try:
        leaked = _host_holders() - before
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    assert not leaked, f"tests left {sorted(leaked)} in the host network namespace"


@pytest.fixture(autouse=True)
def _capability_present(request: pytest.FixtureRequest) -> None:
    fail_if_missing(request.node)
