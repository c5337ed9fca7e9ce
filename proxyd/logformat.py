"""Log output: kube-proxy-like text lines, or one JSON object per line (``--log-format json``).

JSON lines have stable keys so log pipelines can index them without
parsing messages: ``ts`` (RFC 3339, UTC, microseconds), ``level``
(``debug``/``info``/``warning``/``error``/``critical``), ``logger``,
``msg`` (the formatted message), and always ``service``, ``endpoint`` and
``reason`` — null unless the event is about one (callers pass them with
``extra=event(service=..., endpoint=..., reason=...)``). A traceback, when
there is one, goes in ``error`` as one string; nothing spans lines.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
EVENT_KEYS = ("service", "endpoint", "reason")


def event(*, service: object = None, endpoint: object = None, reason: object = None) -> dict[str, Any]:
    """``extra=`` for a log call about one service / endpoint / reason (values shown with ``str``)."""
    return {"service": None if service is None else str(service),
            "endpoint": None if endpoint is None else str(endpoint),
            "reason": None if reason is None else str(reason)}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in EVENT_KEYS:
            value = getattr(record, key, None)
            out[key] = None if value is None else str(value)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["error"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
