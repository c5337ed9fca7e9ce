"""SyncRunner under fake time: coalescing, bounds, retries, stop semantics."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from proxyd import metrics
from proxyd.runner import MIN_RETRY_DELAY, SyncRunner


async def settle(rounds: int = 50) -> None:
    """Let every ready task run (no real time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeTime:
    """A monotonic clock and sleep that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.now + max(0.0, seconds), fut)
        self._sleepers.append(entry)
        try:
            await fut
        finally:
            self._sleepers.remove(entry)

    @property
    def sleepers(self) -> int:
        return len(self._sleepers)

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking sleepers in deadline order."""
        target = self.now + seconds
        for _ in range(10_000):
            await settle()
            due = [s for s in self._sleepers if s[0] <= target and not s[1].done()]
            if not due:
                break
            self.now = max(self.now, min(s[0] for s in due))
            for deadline, fut in due:
                if deadline <= self.now:
                    fut.set_result(None)
        else:
            raise AssertionError("advance did not converge")
        self.now = target
        await settle()


class Recorder:
    """A sync function that records when it ran and can fail or take time."""

    def __init__(self, ft: FakeTime, *, duration: float = 0.0) -> None:
        self.ft = ft
        self.duration = duration
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.fail_next = 0
        self.active = 0
        self.max_active = 0
        self.hook = None

    async def __call__(self) -> None:
        self.starts.append(self.ft.now)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.hook is not None:
                self.hook()
            if self.duration:
                await self.ft.sleep(self.duration)
            if self.fail_next:
                self.fail_next -= 1
                raise RuntimeError("boom")
        finally:
            self.active -= 1
            self.ends.append(self.ft.now)

    def rel(self, t0: float = 1000.0) -> list[float]:
        return [round(s - t0, 6) for s in self.starts]


def make(ft: FakeTime, fn: Recorder, *, min_interval: float = 1.0, max_interval: float = 30.0,
         name: str = "test") -> SyncRunner:
    return SyncRunner(fn, name=name, min_interval=min_interval, max_interval=max_interval,
                      clock=ft.clock, wall_clock=ft.wall, sleep=ft.sleep)


@pytest.fixture
def ft() -> FakeTime:
    return FakeTime()


async def test_nothing_happens_until_run(ft: FakeTime) -> None:
    rec = Recorder(ft)
    r = make(ft, rec)
    await r.start()
    await ft.advance(29)
    assert rec.starts == [] and r.last_attempt is None and r.last_success is None
    r.run()
    await settle()
    assert rec.rel() == [29]
    assert r.last_success == ft.wall() and r.last_attempt == ft.wall()
    await r.stop()


async def test_burst_coalesces_into_one_sync(ft: FakeTime) -> None:
    rec = Recorder(ft)
    r = make(ft, rec)
    await r.start()
    for _ in range(100):
        r.run()
    await ft.advance(0.5)
    assert rec.rel() == [0]
    await r.stop()


async def test_min_interval_spaces_syncs(ft: FakeTime) -> None:
    rec = Recorder(ft)
    r = make(ft, rec, min_interval=2.0)
    await r.start()
    r.run()
    await settle()
    await ft.advance(0.5)
    r.run()
    r.run()
    await ft.advance(1.0)
    assert rec.rel() == [0]          # 1.5 s after the first: still too early
    assert r.requested
    await ft.advance(0.5)
    assert rec.rel() == [0, 2.0]
    assert not r.requested
    # A request long after the last sync runs at once.
    await ft.advance(10)
    r.run()
    await settle()
    assert rec.rel() == [0, 2.0, 12.0]
    await r.stop()


async def test_max_interval_forces_periodic_syncs(ft: FakeTime) -> None:
    rec = Recorder(ft, duration=1.0)
    r = make(ft, rec, min_interval=1.0, max_interval=10.0)
    await r.start()
    await ft.advance(35)
    # First at start + 10, then 10 s after each sync *ended* (each takes 1 s).
    assert rec.rel() == [10, 21, 32]
    await r.stop()


async def test_request_during_sync_gives_exactly_one_more(ft: FakeTime) -> None:
    rec = Recorder(ft, duration=5.0)
    r = make(ft, rec, min_interval=1.0)
    await r.start()
    r.run()
    await ft.advance(1)
    assert r.syncing
    for _ in range(10):
        r.run()
    await ft.advance(20)
    # Second sync starts right after the first ends (min interval long passed).
    assert rec.rel() == [0, 5]
    assert rec.max_active == 1
    await r.stop()


async def test_never_two_syncs_at_once_under_pressure(ft: FakeTime) -> None:
    rec = Recorder(ft, duration=0.7)
    r = make(ft, rec, min_interval=0.0, max_interval=1.0)
    await r.start()
    for _ in range(40):
        r.run()
        r.retry_after(0)
        await ft.advance(0.1)
    stopper = asyncio.ensure_future(r.stop())
    await ft.advance(1)  # lets the running sync finish
    await asyncio.wait_for(stopper, timeout=1.0)
    assert rec.max_active == 1
    assert len(rec.starts) >= 5
    assert len(rec.starts) == len(rec.ends)
    for prev_end, nxt in zip(rec.ends, rec.starts[1:], strict=False):
        assert nxt >= prev_end


async def test_failure_retries_with_doubling_backoff_capped(ft: FakeTime) -> None:
    before = metrics.REGISTRY.get_sample_value("proxyd_sync_failures_total", {"mode": "bk"}) or 0.0
    rec = Recorder(ft)
    rec.fail_next = 6
    r = make(ft, rec, min_interval=1.0, max_interval=10.0, name="bk")
    await r.start()
    r.run()
    await ft.advance(60)
    # Failures at 0, 1, 3, 7, 15, 25 (backoff 1, 2, 4, 8, 10 capped); success at 35.
    # Then the periodic syncs, max_interval after each end.
    assert rec.rel() == [0, 1, 3, 7, 15, 25, 35, 45, 55]
    assert r.consecutive_failures == 0 and r.last_error is None
    assert r.last_success == 1_700_000_000.0 + 1055
    after = metrics.REGISTRY.get_sample_value("proxyd_sync_failures_total", {"mode": "bk"})
    assert after == before + 6
    # Backoff was reset by the success: the next failure retries after min_interval.
    rec.fail_next = 1
    r.run()
    await ft.advance(1.5)
    assert rec.rel()[-2:] == [60, 61]
    await r.stop()


async def test_failure_state_is_visible(ft: FakeTime) -> None:
    rec = Recorder(ft)
    r = make(ft, rec)
    await r.start()
    r.run()
    await settle()
    ok_at = r.last_success
    rec.fail_next = 1
    await ft.advance(5)
    r.run()
    await settle()
    assert isinstance(r.last_error, RuntimeError)
    assert r.consecutive_failures == 1
    assert r.last_success == ok_at and r.last_attempt == ft.wall()
    assert r.running
    await r.stop()


async def test_zero_min_interval_backoff_has_a_floor(ft: FakeTime) -> None:
    rec = Recorder(ft)
    rec.fail_next = 3
    r = make(ft, rec, min_interval=0.0, max_interval=5.0)
    await r.start()
    r.run()
    await ft.advance(1.0)
    assert rec.rel() == pytest.approx([0, MIN_RETRY_DELAY, 3 * MIN_RETRY_DELAY, 7 * MIN_RETRY_DELAY])
    await r.stop()


async def test_retry_after_schedules_and_keeps_the_earliest(ft: FakeTime) -> None:
    rec = Recorder(ft)
    r = make(ft, rec, min_interval=1.0, max_interval=100.0)
    await r.start()
    r.retry_after(5)
    r.retry_after(20)  # later: does not postpone the earlier one
    await ft.advance(4.9)
    assert rec.starts == []
    await ft.advance(0.2)
    assert rec.rel() == [5]
    r.retry_after(-3)  # negative: as soon as min_interval allows
    await ft.advance(2)
    assert rec.rel() == [5, 6]
    with pytest.raises(ValueError, match="NaN"):
        r.retry_after(float("nan"))
    await r.stop()


async def test_retry_after_from_inside_the_sync_survives(ft: FakeTime) -> None:
    rec = Recorder(ft)
    r = make(ft, rec, min_interval=1.0, max_interval=100.0)
    rec.hook = lambda: r.retry_after(3) if len(rec.starts) == 1 else None
    await r.start()
    r.run()
    await ft.advance(10)
    assert rec.rel() == [0, 3]
    await r.stop()


async def test_stop_waits_for_running_sync_and_then_nothing_runs(ft: FakeTime) -> None:
    rec = Recorder(ft, duration=10.0)
    r = make(ft, rec)
    await r.start()
    r.run()
    await settle()
    stopper = asyncio.ensure_future(r.stop())
    await ft.advance(5)
    assert not stopper.done() and r.syncing
    await ft.advance(5)
    assert stopper.done()
    await stopper
    assert rec.ends == [1010.0]
    assert not r.running
    r.run()
    await ft.advance(100)
    assert len(rec.starts) == 1
    assert ft.sleepers == 0  # no sleep left behind


async def test_stop_while_idle_returns_promptly(ft: FakeTime) -> None:
    rec = Recorder(ft)
    r = make(ft, rec)
    await r.stop()  # never started: no-op
    await r.start()
    await r.start()  # idempotent
    await settle()
    await asyncio.wait_for(r.stop(), timeout=1.0)
    assert rec.starts == [] and not r.running
    assert ft.sleepers == 0


async def test_restart_after_stop(ft: FakeTime) -> None:
    rec = Recorder(ft)
    r = make(ft, rec)
    await r.start()
    r.run()
    await settle()
    await r.stop()
    r.run()
    await r.start()
    await ft.advance(1)
    assert rec.rel() == [0, 1]
    await r.stop()


async def test_stop_from_inside_the_sync_function(ft: FakeTime) -> None:
    rec = Recorder(ft)
    r = make(ft, rec)
    holder: list[asyncio.Task] = []
    rec.hook = lambda: holder.append(asyncio.ensure_future(r.stop()))
    await r.start()
    r.run()
    await settle()
    await asyncio.wait_for(holder[0], timeout=1.0)
    assert not r.running
    assert len(rec.starts) == 1


async def test_run_before_start_is_remembered(ft: FakeTime) -> None:
    rec = Recorder(ft)
    r = make(ft, rec)
    r.run()
    await r.start()
    await settle()
    assert rec.rel() == [0]
    await r.stop()


async def test_cancelled_error_is_not_swallowed(ft: FakeTime) -> None:
    async def fn() -> None:
        raise asyncio.CancelledError

    r = SyncRunner(fn, name="c", min_interval=1, max_interval=10, clock=ft.clock, sleep=ft.sleep)
    await r.start()
    r.run()
    await settle()
    assert not r.running
    assert r.consecutive_failures == 0


async def test_logs_traceback_once_then_short_lines(ft: FakeTime, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(ft)
    rec.fail_next = 3
    r = make(ft, rec, min_interval=1.0, max_interval=10.0, name="logmode")
    caplog.set_level(logging.ERROR, logger="proxyd.runner")
    await r.start()
    r.run()
    await ft.advance(8)
    records = [rec_ for rec_ in caplog.records if rec_.name == "proxyd.runner"]
    assert len(records) == 3
    assert records[0].exc_info is not None
    assert all(x.exc_info is None for x in records[1:])
    assert "3 in a row" in records[2].getMessage() and "logmode" in records[2].getMessage()
    await r.stop()


@pytest.mark.parametrize(("lo", "hi"), [(-1, 10), (5, 1), (0, 0), (1, float("inf")), (float("nan"), 1)])
def test_bad_intervals_rejected(lo: float, hi: float) -> None:
    async def fn() -> None:
        return None

    with pytest.raises(ValueError):
        SyncRunner(fn, name="x", min_interval=lo, max_interval=hi)


async def test_next_due_reports_the_plan(ft: FakeTime) -> None:
    rec = Recorder(ft)
    r = make(ft, rec, min_interval=2.0, max_interval=30.0)
    await r.start()
    assert r.next_due() == 1030.0
    r.run()
    await settle()
    assert r.next_due() == 1030.0  # periodic, counted from the end of that sync
    r.retry_after(0.5)
    assert r.next_due() == 1002.0  # the retry waits for min_interval
    await r.stop()


async def test_real_clock_and_sleep() -> None:
    """The defaults (monotonic clock, asyncio.sleep) work: a few ms of real time."""
    starts: list[float] = []

    async def fn() -> None:
        starts.append(time.monotonic())

    r = SyncRunner(fn, name="real", min_interval=0.02, max_interval=5.0)
    await r.start()
    r.run()
    await asyncio.sleep(0.005)
    r.run()
    deadline = time.monotonic() + 2.0
    while len(starts) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    await r.stop()
    assert len(starts) == 2
    assert starts[1] - starts[0] >= 0.02 - 1e-3
    assert r.last_success is not None and abs(r.last_success - time.time()) < 5
