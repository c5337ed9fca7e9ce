"""The README's first command: the bundled standalone example shows round robin, over IPv4 and IPv6.

The example gets namespace names of its own (``PXDEMO_PREFIX``) so that a
concurrent run cannot collide with it, and on a timeout it gets SIGTERM, not
SIGKILL, so its EXIT trap removes what it made; whatever is still left
after that is removed here, and the test fails saying so.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{prefix}-")]


def test_standalone_example_round_robins():
    prefix = f"pxdemo{secrets.token_hex(3)}"
    proc = subprocess.Popen([str(ROOT / "examples/standalone/run.sh"), "--once"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PXDEMO_PREFIX": prefix})
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # run.sh's trap kills its children and deletes its namespaces
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=30)
        stderr = f"run.sh timed out after 180 s\n{stderr}"
    finally:
        left = _namespaces(prefix)
        for ns in left:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, stderr[-2000:]
    assert not left, f"run.sh left {left} behind"
    answers = [line for line in stdout.splitlines() if line.startswith("hello from")]
    assert len(answers) == 8, stdout
    ipv4, ipv6 = answers[:4], answers[4:]
    assert {line.split()[2] for line in ipv4} == {"pod2", "pod3"}
    # The dual-stack service over IPv6: round robin too, and the pods see the node's IPv6 address.
    assert {line.split()[2] for line in ipv6} == {"pod2", "pod3"}
    assert all("came from fd00:10:244:1::1)" in line for line in ipv6), ipv6
    assert "curl -s http://10.96.0.10/" in stdout
    assert "curl -s -g http://[fd00:10:96::12]/" in stdout
    assert f"{prefix}-node" in stdout  # the names it was given are the names it used
