"""The most recent rejected objects, with their reasons, for ``proxyd status``.

Sources and the self-endpoint filter already log each rejection and count it
in ``proxyd_rejected_objects_total``; they also call ``record`` so an
operator asking ``proxyd status`` sees *which* object was refused and why
without searching the logs. Bounded: the last ``LIMIT`` distinct
(source, kind, object) are kept, a repeat moves to the front with its newest
reason and time, so a flapping object cannot push the others out one by
one. ``forget`` drops an object once it is accepted again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

LIMIT = 200
MAX_TEXT = 512  # characters of an object name or reason kept (sources already make them printable)


@dataclass(frozen=True, slots=True)
class Rejection:
    source: str
    kind: str
    object: str
    reason: str
    at: float  # wall time

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "object": self.object, "reason": self.reason,
                "at": round(self.at, 3)}


class Rejections:
    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._items: OrderedDict[tuple[str, str, str], Rejection] = OrderedDict()

    def record(self, source: str, kind: str, obj: str, reason: str, *, at: float | None = None) -> None:
        key = (source, kind, obj[:MAX_TEXT])
        self._items.pop(key, None)
        self._items[key] = Rejection(source, kind, obj[:MAX_TEXT], reason[:MAX_TEXT],
                                     time.time() if at is None else at)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def forget(self, source: str, kind: str, obj: str) -> None:
        self._items.pop((source, kind, obj[:MAX_TEXT]), None)

    def recent(self) -> list[Rejection]:
        """Newest first."""
        return list(reversed(self._items.values()))

    def clear(self) -> None:
        self._items.clear()


RECENT = Rejections()


def record(source: str, kind: str, obj: str, reason: str) -> None:
    RECENT.record(source, kind, obj, reason)


def forget(source: str, kind: str, obj: str) -> None:
    RECENT.forget(source, kind, obj)
