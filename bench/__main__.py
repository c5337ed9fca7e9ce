"""Entry point of ``python -m bench`` (see ``bench.harness``)."""

from __future__ import annotations

from bench.harness import main

raise SystemExit(main())
