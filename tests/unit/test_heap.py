"""``heap.gc_paused``: overlapping pauses in any order, from tasks and threads, give the collector back;
a freezing pause empties the free lists; ``heap.bound_malloc`` fixes glibc's thresholds and arenas."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from proxyd import heap

ROOT = Path(__file__).resolve().parents[2]


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


def test_freeze_empties_the_free_lists(monkeypatch):
    # Freed tuples wait in the interpreter's free lists (2,000 per size), each keeping its 1 MiB arena:
    # the freezing pause ends with a collection, which empties them.
    monkeypatch.setattr(gc, "freeze", lambda: None)  # the test process's objects stay collectable
    with heap.gc_paused(freeze=True):
        junk = [(i, i + 1, i + 2) for i in range(10_000)]
        del junk
        before = sys.getallocatedblocks()
    assert sys.getallocatedblocks() < before - 1500


# Run in a child: mallopt changes the whole process. Prints JSON: blocks mapped for a 1 MiB request made
# after a 4 MiB block was freed, and the arenas after 6 threads allocated at once.
_MALLOC_PROBE = r"""
import ctypes, json, os, sys, tempfile, threading
from proxyd import heap
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
bound = heap.bound_malloc() if sys.argv[1] == "bound" else None
libc.free(libc.malloc(4 << 20))  # by default this raises the mmap threshold to 4 MiB
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
mapped = libc.mallinfo2().hblks - before
libc.free(block)
start, leave = threading.Barrier(7), threading.Event()
def work():
    held = libc.malloc(1000)
    start.wait(10)
    leave.wait(10)
    libc.free(held)
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
start.wait(10)
path = os.path.join(tempfile.mkdtemp(), "info.xml")
out = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, out)
libc.fclose(out)
leave.set()
for t in threads:
    t.join(10)
print(json.dumps({"bound": bound, "mapped": mapped, "arenas": open(path).read().count("<heap nr=")}))
"""


def _malloc_probe(arg: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, arg], capture_output=True, text=True,
                          timeout=60, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_bound_malloc_fixes_the_mmap_threshold_and_caps_arenas():
    default, bound = _malloc_probe("default"), _malloc_probe("bound")
    # The default behaviour the bound exists for, seen in the same run: a freed 4 MiB block makes the
    # next 1 MiB one come from an arena, and six threads allocating at once get arenas of their own.
    assert default["mapped"] == 0 and isinstance(default["arenas"], int) and default["arenas"] >= 4
    assert bound["bound"] is True
    assert bound["mapped"] == 1
    assert bound["arenas"] == heap.ARENA_MAX
