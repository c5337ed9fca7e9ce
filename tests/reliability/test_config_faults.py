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

# A hang is what these tests catch: anything still running after this long never started.
HANG_SECONDS = 90.0
# How much longer than the same command on a harmless file a hostile file may take. Measured
# against that baseline (not as an absolute limit) so that a busy machine's slow process start
# and a full ``--cleanup`` do not count against the file.
EXTRA_SECONDS = 5.0
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
                                 timeout=HANG_SECONDS)
    except subprocess.TimeoutExpired:
        return None, "", time.monotonic() - started
    return result.returncode, result.stderr, time.monotonic() - started


def baseline(topo: Topology, text: str, *, want: int) -> float:
    """Seconds the same command takes on a harmless regular file holding ``text`` (exiting ``want``)."""
    path = topo.manifests.parent / "config-baseline"
    path.write_text(text)
    code, stderr, took = start(topo, str(path))
    assert code == want, f"the baseline run exited {code}, want {want}: {stderr[-500:]}"
    return took


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink-loop", "endless-device", "deep-list",
                                  "deep-map", "binary"])
def test_unusable_config_file_is_refused_quickly_naming_the_flag(topology: Topology, kind: str) -> None:
    # A regular file proxyd refuses the same way (exit 2 naming --config), for comparison.
    usual = baseline(topology, HEADER + "notAField: [\n", want=2)
    code, stderr, took = start(topology, make(kind, topology.manifests.parent))
    assert code is not None, f"--config {kind}: proxyd still running after {took:.0f}s (hangs at start)"
    assert "Traceback" not in stderr, f"--config {kind}: a traceback instead of a message:\n{stderr[-1500:]}"
    assert code == 2, f"--config {kind}: exit {code}, want 2:\n{stderr[-500:]}"
    assert "--config" in stderr
    assert took < usual + EXTRA_SECONDS, f"--config {kind}: {took:.1f}s to refuse ({usual:.1f}s: bad file)"


def test_alias_bomb_in_an_ignored_field_does_not_expand(topology: Topology) -> None:
    path = topology.manifests.parent / "config-bomb"
    path.write_text(_alias_bomb())
    usual = baseline(topology, HEADER, want=0)
    code, stderr, took = start(topology, str(path))
    assert code is not None and took < usual + EXTRA_SECONDS, f"took {took:.1f}s ({usual:.1f}s: no bomb)"
    assert "Traceback" not in stderr
    assert code in (0, 2), stderr[-500:]
