"""Memory management around big, short-lived allocations: the C heap's free pages back to the system,
and the cyclic garbage collector paused while many long-lived objects are built.

Why: glibc keeps what a program frees in its arenas (the main heap, and one
per thread that allocated: the worker threads that read manifests and run
restores have their own), and its mmap threshold grows with every big block
freed, so the next big block comes from an arena too. A daemon that builds
a 30 MB restore input or reads a 13 MB file now and then would keep each
peak as RSS. ``malloc_trim(0)`` returns the free pages of every arena, not
only those at the top. It costs a walk of the free lists (milliseconds),
so it runs after the big events only: a big file read, a full sync.

``bound_malloc`` (the daemon at start, and benchmarks that drive a mode
without the daemon) fixes glibc's thresholds and caps its
arenas: see there why big temporary work in worker threads needs it.
A freezing ``gc_paused`` empties Python's free lists afterwards, see there.

Not glibc (musl, another libc): nothing to trim or tune, ``trim`` and
``bound_malloc`` do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import threading
from collections.abc import Callable, Iterator


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
        return trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
# Blocks from this size on get their own mapping (glibc's default start, 128 KiB, fixed a little higher:
# a 10,000-entry dict or list is one such block and goes back to the system when freed).
MMAP_THRESHOLD = 256 << 10
# An arena's free top beyond this is returned as soon as a free makes it so.
TRIM_THRESHOLD = 1 << 20
# The main arena and one for every other thread.
ARENA_MAX = 2


def _load_mallopt() -> Callable[[int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        func = libc.mallopt
        func.argtypes = [ctypes.c_int, ctypes.c_int]
        func.restype = ctypes.c_int
        mallopt: Callable[[int, int], int] = func
        return mallopt
    except (OSError, AttributeError):
        return None


_MALLOPT = _load_mallopt() if _MALLOC_TRIM is not None else None


def trim() -> bool:
    """Return free heap pages to the system; True when something was released."""
    if _MALLOC_TRIM is None:
        return False
    return bool(_MALLOC_TRIM(0))


def bound_malloc() -> bool:
    """Fixed mmap and trim thresholds and at most ``ARENA_MAX`` arenas; True when glibc took them.

    For a process whose worker threads do big temporary work: the manifests
    source re-reading a 13 MB file (without this, iptables mode at 10,000
    services grew from 115 to 142 MiB in three changes), or libnftables
    taking a 100,000-element transaction (it builds an expression tree per
    element, ~400 MB of small blocks at 10,000 services × 10 endpoints, in
    the arena of the thread that runs it, and frees it at the end). Left to its defaults glibc
    (1) raises its mmap threshold, up to 32 MiB, each time a big mapped block
    is freed, so the next big blocks (dicts and lists of 10,000 entries, the
    plan's text) come from arenas where small long-lived blocks pin them;
    (2) raises the trim threshold with it (to 64 MiB), and ``malloc_trim``
    never shrinks the free top of a thread's arena, so up to that much stays
    resident in each; (3) gives each new worker thread its own arena (up to
    8 per core), each keeping such a top. Measured at 10,000 services
    (nftables, end to end, both sources): ~10 MiB less RSS after the first
    sync and after 20 changes, a peak ~12 MiB lower, and far less spread
    between runs. Values set with ``mallopt`` stay fixed (no dynamic
    adjustment). ``M_ARENA_MAX`` only bounds arenas created afterwards:
    call it before the threads that will do the big work allocate.
    """
    if _MALLOPT is None:
        return False
    done = True
    for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                         (M_ARENA_MAX, ARENA_MAX)):
        done = bool(_MALLOPT(param, value)) and done
    return done


_pause_lock = threading.Lock()
_pauses = 0  # blocks inside gc_paused now, in every thread and task
_enabled_before = False  # whether the collector ran before the first of them


@contextlib.contextmanager
def gc_paused(*, freeze: bool = False) -> Iterator[None]:
    """The cyclic garbage collector off for the block, and as it was once no such block is left.

    Building tens of thousands of objects that live on (a 13 MB manifest's
    objects, a full sync's plan) triggers collection after collection over an
    ever larger heap; what is built there is not cyclic, so nothing is lost.

    Blocks may overlap in any order (a full sync awaiting the kernel while a
    worker thread reads a manifest, two lists of the API source): the
    collector comes back when the last one ends, whichever that is.

    ``freeze``: what is alive at the end moves out of the collector's
    generations (``gc.freeze``), for what a start builds and keeps (a million
    objects at 10,000 services). Else the first allocation after the block
    starts a collection of everything the block made (0.1-0.2 s at that
    size), and later full collections walk it all again. Frozen objects are
    still freed by reference count; only a reference cycle among them would
    outlive its use, and the state holds none. Once frozen, one collection
    runs (cheap: the generations are nearly empty now) for what it does
    besides: it empties the interpreter's free lists. A build leaves
    thousands of freed tuples, lists and dicts there, scattered over the
    allocator's 1 MiB arenas, and each keeps its arena (RSS) alive: ~9 MiB
    at 10,000 services after nftables mode's first sync.
    """
    global _pauses, _enabled_before
    with _pause_lock:
        if _pauses == 0:
            _enabled_before = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if freeze:
                gc.freeze()
            if _pauses == 0 and _enabled_before:
                gc.enable()
        if freeze:
            # Outside the lock: a finaliser it runs may pause the collector itself.
            gc.collect()
