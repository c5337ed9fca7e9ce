"""A hostile or broken ``--config`` file: proxyd must refuse it at once, naming the flag, exit code 2.

README ("Flags"): a bad value exits 2 with one line naming the flag. The
file the user names is read, but it may be the wrong kind of file (a FIFO
nobody writes, a directory, a device that never ends, a symlink loop) or
YAML built to exhaust the parser (deep nesting, an alias bomb). None of
them may hang the start, print a traceback, or take more than a few
seconds. ``--cleanup`` is used as the action so that a config that *is*
accepted does no more than clean an empty namespace; the commands run in
the topology's node namespace, never on the host.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.netns.topology import Topology

LIMIT_SECONDS = 5.0
HEADER = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"


def _alias_bomb() -> str:
    lines = ['  x0: &x0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  x{i}: &x{i} [" + ",".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 12)]
    return HEADER + "featureGates:\n" + "\n".join(lines) + "\n"


def make(kind: str, root: Path) -> str:
    path = root / f"config-{kind}"
    if kind == "fifo":
        os.mkfifo(path)  # nobody ever writes: reading it must not block the start
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink-loop":
        os.symlink(path.name, path)
    elif kind == "endless-device":
        return "/dev/zero"
    elif kind == "deep-list":
        path.write_text("[" * 100_000)
    elif kind == "deep-map":
        path.write_text(HEADER + "clientConnection: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 64)
    return str(path)


def start(topo: Topology, config: str) -> tuple[int | None, str, float]:
    started = time.monotonic()
    try:
        result = topo.run_proxyd(["--config", config, "--manifests", str(topo.manifests), "--cleanup"],
                                 timeout=LIMIT_SECONDS + 2)
    except subprocess.TimeoutExpired:
        return None, "", time.monotonic() - started
    return result.returncode, result.stderr, time.monotonic() - started


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink-loop", "endless-device", "deep-list",
                                  "deep-map", "binary"])
def test_unusable_config_file_is_refused_quickly_naming_the_flag(topology: Topology, kind: str) -> None:
    code, stderr, took = start(topology, make(kind, topology.manifests.parent))
    assert code is not None, f"--config {kind}: proxyd still running after {took:.0f}s (hangs at start)"
    assert "Traceback" not in stderr, f"--config {kind}: a traceback instead of a message:\n{stderr[-1500:]}"
    assert code == 2, f"--config {kind}: exit {code}, want 2:\n{stderr[-500:]}"
    assert "--config" in stderr
    assert took < LIMIT_SECONDS, f"--config {kind}: {took:.1f}s to refuse"


def test_alias_bomb_in_an_ignored_field_does_not_expand(topology: Topology) -> None:
    path = topology.manifests.parent / "config-bomb"
    path.write_text(_alias_bomb())
    code, stderr, took = start(topology, str(path))
    assert code is not None and took < LIMIT_SECONDS, f"took {took:.1f}s"
    assert "Traceback" not in stderr
    assert code in (0, 2), stderr[-500:]
