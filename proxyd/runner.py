"""When to sync: kube-proxy's BoundedFrequencyRunner, on asyncio.

The runner owns one background task that calls an async sync function:

* ``run()`` asks for a sync. Requests coalesce: however many arrive, at most
  one sync follows, and a request made while a sync is running causes one
  more sync after it (the running one may have read the state too early).
* Syncs start at most once per ``min_interval`` (measured start to start),
  so a burst of events costs one sync, and at least once per
  ``max_interval`` after the previous one ended, so drift is repaired even
  when nothing is reported.
* A sync that raises is logged (traceback the first time, one line while it
  keeps failing), counted in ``proxyd_sync_failures_total{mode=...}`` and
  retried after a backoff that starts at ``min_interval`` (at least 100 ms,
  so a zero minimum cannot spin) and doubles up to ``max_interval``; the
  first success resets it. ``retry_after(seconds)`` asks for the same from
  outside (or from inside the sync function).
* Never two syncs at once: only the background task calls the function.
  ``stop()`` lets a running sync finish; it never cancels one halfway,
  because a half-applied ruleset is worse than a late one.

Time comes from an injectable ``clock`` (monotonic) and ``sleep`` so tests
drive the runner with fake time; ``wall_clock`` only stamps
``last_attempt``/``last_success`` for health and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from proxyd import metrics

log = logging.getLogger(__name__)

MIN_RETRY_DELAY = 0.1  # seconds; floor of the failure backoff

SyncFunction = Callable[[], Awaitable[None]]


class SyncRunner:
    """Run ``fn`` when asked, bounded in frequency, retried on failure."""

    def __init__(
        self,
        fn: SyncFunction,
        *,
        name: str,
        min_interval: float,
        max_interval: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not (min_interval >= 0 and max_interval > 0 and min_interval <= max_interval):
            raise ValueError(
                f"need 0 <= min_interval <= max_interval and max_interval > 0, "
                f"got {min_interval!r}, {max_interval!r}")
        if math.isinf(max_interval) or math.isnan(max_interval):
            raise ValueError(f"max_interval must be finite, got {max_interval!r}")
        self.name = name
        self.min_interval = float(min_interval)
        self.max_interval = float(max_interval)
        self._fn = fn
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep

        self._base_backoff = min(max(self.min_interval, MIN_RETRY_DELAY), self.max_interval)
        self._backoff = self._base_backoff
        self._requested = False
        self._retry_at: float | None = None
        self._last_start: float | None = None
        self._last_end: float | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._syncing = False

        self.last_attempt: float | None = None  # wall time a sync last started
        self.last_success: float | None = None  # wall time a sync last succeeded
        self.last_error: Exception | None = None
        self.consecutive_failures = 0
        self.syncs = 0  # syncs attempted, for tests and debugging

    # ---- control -------------------------------------------------------

    def run(self) -> None:
        """Request a sync as soon as min_interval allows (coalesced)."""
        self._requested = True
        self._wake.set()

    def retry_after(self, seconds: float) -> None:
        """Make sure a sync happens no later than ``seconds`` from now.

        An earlier scheduled sync is kept; min_interval still applies.
        """
        if math.isnan(seconds):
            raise ValueError("retry delay is NaN")
        at = self._clock() + max(0.0, seconds)
        if self._retry_at is None or at < self._retry_at:
            self._retry_at = at
        self._wake.set()

    async def start(self) -> None:
        """Start the background loop (idempotent). No sync happens until
        ``run()`` is called or max_interval passes."""
        if self._task is not None and not self._task.done():
            return
        self._stopping = False
        if self._last_end is None:
            self._last_end = self._clock()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"sync-runner-{self.name}")

    async def stop(self) -> None:
        """Stop the loop, waiting for a running sync to finish first."""
        task = self._task
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        if asyncio.current_task() is task:
            # Called from inside the sync function: the loop ends after it.
            return
        try:
            await asyncio.shield(task)
        finally:
            if task.done():
                self._task = None

    # ---- introspection -------------------------------------------------

    @property
    def running(self) -> bool:
        """The background loop is alive."""
        return self._task is not None and not self._task.done()

    @property
    def syncing(self) -> bool:
        """A sync is in progress right now."""
        return self._syncing

    @property
    def requested(self) -> bool:
        """A sync was asked for and has not started yet."""
        return self._requested

    def next_due(self, now: float | None = None) -> float:
        """Monotonic time of the next sync, given what is known at ``now``."""
        if now is None:
            now = self._clock()
        base = self._last_end if self._last_end is not None else now
        due = base + self.max_interval
        if self._requested:
            due = min(due, now)
        if self._retry_at is not None:
            due = min(due, self._retry_at)
        if self._last_start is not None:
            due = max(due, self._last_start + self.min_interval)
        return due

    # ---- the loop ------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            # Clear before computing: a run() after this point sets it again
            # and the wait below returns at once.
            self._wake.clear()
            now = self._clock()
            due = self.next_due(now)
            if due <= now:
                await self._sync_once()
                # A sync function that never awaits must not starve the
                # loop (sources, health) even if syncs follow back to back.
                await asyncio.sleep(0)
                continue
            await self._wait(due - now)

    async def _wait(self, seconds: float) -> None:
        waiter = asyncio.ensure_future(self._wake.wait())
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (waiter, sleeper):
                if not fut.done():
                    fut.cancel()
            # Let the cancellations land so no task outlives the wait.
            await asyncio.gather(waiter, sleeper, return_exceptions=True)

    async def _sync_once(self) -> None:
        self._requested = False
        self._retry_at = None  # this sync is the retry; fn may ask for another
        self._last_start = self._clock()
        self.last_attempt = self._wall()
        self.syncs += 1
        self._syncing = True
        try:
            await self._fn()
        except Exception as exc:  # a bad sync must never kill the loop
            self._failed(exc)
        else:
            self.last_success = self._wall()
            self.last_error = None
            self.consecutive_failures = 0
            self._backoff = self._base_backoff
        finally:
            self._syncing = False
            self._last_end = self._clock()

    def _failed(self, exc: Exception) -> None:
        self.last_error = exc
        self.consecutive_failures += 1
        metrics.SYNC_FAILURES.labels(mode=self.name).inc()
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.max_interval)
        if self.consecutive_failures == 1:
            log.exception("sync (%s) failed; retrying in %.3gs", self.name, delay)
        else:
            log.error("sync (%s) failed again (%d in a row): %s: %s; retrying in %.3gs",
                      self.name, self.consecutive_failures, type(exc).__name__, exc, delay)
        self.retry_after(delay)
