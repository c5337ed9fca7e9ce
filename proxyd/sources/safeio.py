"""Reading files proxyd does not trust: regular files only, bounded size, YAML without bombs.

Used by the manifests source (every file of the directory) and by
``--config`` (the KubeProxyConfiguration file).

* ``read_regular(path, max_size)`` opens with ``O_NONBLOCK`` (a path that is
  or became a FIFO or device must not hang the read) and, unless asked to
  follow, ``O_NOFOLLOW``; checks ``fstat`` says regular file; reads at most
  ``max_size + 1`` bytes, so a file growing while read cannot exhaust memory.
* ``load_yaml(text)`` runs two guards on libyaml's event stream before
  anything is composed, because the composer recurses in C (a document
  nested 100k deep crashes the process) and aliases can expand
  exponentially: documents deeper than ``MAX_DEPTH`` or using aliases are
  refused. Then the libyaml safe loader (when available) loads them.

Failures raise ``UnsafeInput`` with a reason for a log line and a
``category`` for the ``proxyd_rejected_objects_total`` reason label.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml

MAX_DEPTH = 100  # Kubernetes objects nest ~15 deep; libyaml crashes at ~100k
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class UnsafeInput(Exception):
    """A file that cannot be read or parsed; ``category`` is the metric's reason label."""

    def __init__(self, reason: str, category: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.category = category


def read_regular(path: str, max_size: int, *, follow: bool = False) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_size`` of them.

    FileNotFoundError passes through (a vanished file is not an error for every caller).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise UnsafeInput(f"cannot open ({err.strerror})", "unreadable") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeInput("not a regular file", "not_regular")
        chunks = []
        total = 0
        while total <= max_size:
            chunk = os.read(fd, min(1 << 20, max_size + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as err:
        raise UnsafeInput(f"cannot read ({err.strerror})", "unreadable") from None
    finally:
        os.close(fd)
    if total > max_size:
        raise UnsafeInput(f"too large (more than {max_size} bytes)", "too_large")
    return b"".join(chunks)


def check_yaml_stream(text: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse aliases and deep nesting before libyaml composes anything."""
    depth = 0
    starts = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
    ends = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, starts):
            depth += 1
            if depth > max_depth:
                raise UnsafeInput(f"does not parse: nested deeper than {max_depth} levels", "parse")
        elif isinstance(event, ends):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            raise UnsafeInput("does not parse: YAML aliases are not allowed", "parse")


def load_yaml(text: str) -> list[Any]:
    """Every document of ``text``, after ``check_yaml_stream``; yaml.YAMLError when it does not parse."""
    check_yaml_stream(text)
    return list(yaml.load_all(text, Loader=_Loader))
