"""A compact map from 64-bit key hashes to values: the nftables planner's mirror of one set or map.

Why not a dict: at 10,000 services × 10 endpoints the mirror holds ~230,000
keys; a dict of int keys costs ~85 bytes per entry (the int object, the
table slot), and those small objects, made while a full plan's transient
strings are, pin the allocator's arenas long after the strings are gone.
Here the keys are one sorted ``array('q')`` (8 bytes each) and the values
one list (a pointer each, to objects that exist anyway: the owning
``ServicePortName`` or a small, cached count): ~16 bytes per key, in two
big blocks that ``malloc`` returns whole.

Lookups bisect the array (O(log n)). Changes go to a small dict in front
of it (a partial sync changes a few keys), merged into the arrays when it
outgrows an eighth of them: amortised O(1) per change, and a sync never
moves the arrays.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

V = TypeVar("V")

_GONE = object()  # an overlay entry deleting a key of the arrays
_MERGE_MIN = 1024
_LIMIT = 2**63


class KeyIndex(Generic[V]):
    """hash -> value, sorted arrays plus an overlay of recent changes."""

    __slots__ = ("_keys", "_len", "_overlay", "_values")

    def __init__(self, items: Mapping[int, V] | None = None) -> None:
        keys = sorted(items) if items else []
        self._keys = array("q", keys)
        self._values: list[V] = [items[k] for k in keys] if items else []
        self._overlay: dict[int, V | object] = {}
        self._len = len(keys)

    def _base(self, h: int) -> int:
        """Index of ``h`` in the arrays, -1 when absent."""
        i = bisect_left(self._keys, h)
        return i if i < len(self._keys) and self._keys[i] == h else -1

    def get(self, h: int, default: V | None = None) -> V | None:
        v = self._overlay.get(h, self)
        if v is not self:
            return default if v is _GONE else v  # type: ignore[return-value]
        i = self._base(h)
        return self._values[i] if i >= 0 else default

    def __contains__(self, h: object) -> bool:
        return isinstance(h, int) and self.get(h, _GONE) is not _GONE  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._len

    def __setitem__(self, h: int, value: V) -> None:
        if not -_LIMIT <= h < _LIMIT:
            # hash() never gives one; refused now rather than when the overlay is merged.
            raise OverflowError(f"key {h} does not fit in 64 bits")
        if h not in self:
            self._len += 1
        self._overlay[h] = value
        self._maybe_merge()

    def pop(self, h: int, default: V | None = None) -> V | None:
        value = self.get(h, _GONE)  # type: ignore[arg-type]
        if value is _GONE:
            return default
        self._len -= 1
        if self._base(h) >= 0:
            self._overlay[h] = _GONE
        else:
            del self._overlay[h]
        self._maybe_merge()
        return value

    def items(self) -> Iterator[tuple[int, V]]:
        for h, v in zip(self._keys, self._values, strict=True):
            if h not in self._overlay:
                yield h, v
        for h, o in self._overlay.items():
            if o is not _GONE:
                yield h, o  # type: ignore[misc]

    def to_dict(self) -> dict[int, V]:
        return dict(self.items())

    def copy(self) -> KeyIndex[V]:
        out: KeyIndex[V] = KeyIndex()
        out._keys, out._values = array("q", self._keys), list(self._values)
        out._overlay, out._len = dict(self._overlay), self._len
        return out

    def _maybe_merge(self) -> None:
        if len(self._overlay) > max(_MERGE_MIN, len(self._keys) // 8):
            merged = KeyIndex(self.to_dict())
            self._keys, self._values, self._overlay = merged._keys, merged._values, {}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KeyIndex):
            return self.to_dict() == other.to_dict()
        if isinstance(other, dict):
            return self.to_dict() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"KeyIndex({self._len} keys, {len(self._overlay)} in the overlay)"
