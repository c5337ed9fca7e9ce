"""``--mode ipvs`` for bench/sync_scale.py: full and incremental sync time of the IPVS mode.

Needs a kernel with IPVS, so run it inside the QEMU guest:

    tests/vm/run-in-vm.sh --cmd 'python bench/sync_scale.py --mode ipvs --services 1000,10000'

(software emulation: absolute times are several times those of real
hardware; compare modes on the same kernel, not with the host's numbers).

``IpvsDriver`` has the ``Driver`` interface of ``bench/sync_scale.py``
(``start``/``full``/``partial``/``rules``/``close``), which registers it as
``--mode ipvs``; run as a script, this module is a shorthand for
``bench/sync_scale.py --mode ipvs``.

``plan`` times are the pure planner's share (``plan_port`` + ``assemble``);
the rest is diffing and kernel calls (netlink per virtual/real server, one
iptables-restore when the ruleset text changes). ``rules`` reports the
number of virtual servers held.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proxyd.config import Config  # noqa: E402
from proxyd.model import ProxyState, ServiceName  # noqa: E402
from proxyd.modes.base import SyncRequest  # noqa: E402
from proxyd.modes.ipvs import mode as ipvs_mode  # noqa: E402
from proxyd.modes.ipvs.mode import IpvsMode  # noqa: E402


class IpvsDriver:
    """Drives proxyd.modes.ipvs.IpvsMode and splits planner time from apply time."""

    def __init__(self, backend: str = "default") -> None:
        del backend  # ipvs has a single back end (netlink + iptables-restore)
        self.mode = IpvsMode(Config(proxy_mode="ipvs", cluster_cidrs=("10.0.0.0/8",), node_name="bench-node"))
        self._plan_time = 0.0

    async def start(self) -> None:
        await self.mode.start()
        plan_port, assemble = ipvs_mode.plan_port, ipvs_mode.assemble

        def timed(func: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return func(*args, **kwargs)
                finally:
                    self._plan_time += time.perf_counter() - t
            return wrapper

        # The mode module looks these up at call time: time them where they are used.
        ipvs_mode.plan_port = timed(plan_port)  # type: ignore[assignment]
        ipvs_mode.assemble = timed(assemble)  # type: ignore[assignment]

    async def _sync(self, request: SyncRequest) -> dict[str, float]:
        self._plan_time = 0.0
        t = time.perf_counter()
        await self.mode.sync(request)
        return {"total": time.perf_counter() - t, "plan": self._plan_time}

    async def full(self, state: ProxyState) -> dict[str, float]:
        return await self._sync(SyncRequest(state, None))

    async def partial(self, state: ProxyState, changed: frozenset[ServiceName]) -> dict[str, float]:
        return await self._sync(SyncRequest(state, changed))

    def rules(self) -> int:
        plan = self.mode.last_plan
        return len(plan.servers) if plan else 0

    async def close(self) -> None:
        await self.mode.shutdown()


def main(argv: list[str] | None = None) -> int:
    from bench import sync_scale

    raw = list(sys.argv[1:] if argv is None else argv)
    if "--mode" not in raw:
        raw = ["--mode", "ipvs", *raw]
    return sync_scale.main(raw)


if __name__ == "__main__":
    sys.exit(main())
