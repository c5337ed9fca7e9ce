"""The README's first command: the bundled standalone example shows round robin."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_standalone_example_round_robins():
    result = subprocess.run([str(ROOT / "examples/standalone/run.sh"), "--once"], capture_output=True,
                            text=True, timeout=90, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [line for line in result.stdout.splitlines() if line.startswith("hello from")]
    assert len(answers) == 4
    assert {line.split()[2] for line in answers} == {"pod2", "pod3"}
    assert "curl -s http://10.96.0.10/" in result.stdout
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert "pxdemo" not in namespaces
