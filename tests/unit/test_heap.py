"""``heap.gc_paused``: overlapping pauses in any order, from tasks and threads, give the collector back."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from proxyd import heap


@pytest.fixture(autouse=True)
def collector_on():
    assert gc.isenabled()
    yield
    assert gc.isenabled(), "a test left the cyclic GC off"


def test_nested_pauses():
    with heap.gc_paused():
        assert not gc.isenabled()
        with heap.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_pauses_ending_out_of_order_give_the_collector_back_at_the_last():
    first, second = heap.gc_paused(), heap.gc_paused()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first one ends while the second still runs
    assert not gc.isenabled()
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_collector_off_before_stays_off():
    gc.disable()
    try:
        with heap.gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_exception_ends_the_pause():
    with pytest.raises(RuntimeError), heap.gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


async def test_tasks_awaiting_inside_pauses_interleaved():
    order: list[str] = []

    async def paused(name: str, hold: float) -> None:
        with heap.gc_paused():
            order.append(f"{name} in")
            await asyncio.sleep(hold)
            order.append(f"{name} out {gc.isenabled()}")

    await asyncio.gather(paused("long", 0.05), paused("short", 0.01))
    assert order == ["long in", "short in", "short out False", "long out False"]
    assert gc.isenabled()


def test_threads_and_the_loop_overlapping():
    inside = threading.Event()
    leave = threading.Event()

    def worker() -> None:
        with heap.gc_paused():
            inside.set()
            assert leave.wait(10)

    thread = threading.Thread(target=worker)
    with heap.gc_paused():
        thread.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the thread's pause outlives this one
    leave.set()
    thread.join(10)
    assert gc.isenabled()


def test_freeze_at_the_end(monkeypatch):
    frozen: list[bool] = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(gc.isenabled()))
    with heap.gc_paused():
        pass
    assert frozen == []
    with heap.gc_paused(freeze=True):
        pass
    assert frozen == [False]  # frozen before the collector could walk what the block built
