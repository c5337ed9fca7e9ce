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


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block, and as it was after it (nests).

    Building tens of thousands of objects that live on (a 13 MB manifest's
    objects, a full sync's plan) triggers collection after collection over an
    ever larger heap; what is built there is not cyclic, so nothing is lost.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
