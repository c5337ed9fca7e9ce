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

Not glibc (musl, another libc): nothing to trim, ``trim`` does nothing.
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


def trim() -> bool:
    """Return free heap pages to the system; True when something was released."""
    if _MALLOC_TRIM is None:
        return False
    return bool(_MALLOC_TRIM(0))


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
    outlive its use, and the state holds none.
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
