"""Benchmarks for proxyd: ``python -m bench`` compares every proxy mode with HAProxy and the direct path.

``harness`` runs the whole thing; the other modules each do one job (see
their docstrings). The repository root is put on ``sys.path`` so the
network-namespace topology of the tests (``tests.netns.topology``) is
importable however the package is started.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
