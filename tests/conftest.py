"""Session-wide guard: no test may leave proxyd's objects in the host's own network namespace.

Every test that starts the daemon or a mode does so inside namespaces it
creates. If anything proxyd creates (the ``proxyd0`` or ``kube-ipvs0``
holder devices) shows up in the namespace the test run itself is in, some
test touched the host, and the run fails loudly instead of leaving it there.
"""

from __future__ import annotations

import os
import subprocess

import pytest

HOLDERS = ("proxyd0", "kube-ipvs0")


def _host_holders() -> set[str]:
    try:
        out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {name for name in HOLDERS if f": {name}:" in out or f": {name}@" in out}


@pytest.fixture(scope="session", autouse=True)
def host_namespace_untouched():
    before = _host_holders() if os.geteuid() == 0 else set()
    yield
    if os.geteuid() == 0:
        leaked = _host_holders() - before
        assert not leaked, f"tests left {sorted(leaked)} in the host network namespace"
