"""Parse one big manifest file in a short-lived child process, under a memory limit.

Why: parsing a 13.5 MB file builds ~150 MB of raw objects for a moment. In
the daemon those allocations interleave with long-lived ones, and CPython's
and glibc's allocators then keep most of it: RSS grew by 40-100 MB per
re-read of a 10,000-service file. In a child, the raw objects die with the
process; the daemon only ever sees the objects that changed. The child also
limits its own address space (``MEMORY_LIMIT``), so whatever a hostile file
makes the parser do costs the node a bounded, temporary amount.

Protocol (binary, one request per process): stdin carries the number of
known digests (4 bytes, little endian), the digests (16 bytes each) and then
the file's bytes. stdout carries one record per object, read by the parent
as they come: ``K`` + digest for
an object whose digest was known (the parent reuses what it converted
before), ``N`` + digest + length + pickle for a new one; or one ``E`` record
(length + JSON ``[reason, category]``) when the file is unusable. Pickles
hold only the plain values a YAML or JSON parser makes and are read back
with an unpickler that accepts nothing else.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any

DIGEST = 16
MEMORY_LIMIT = 768 * 1024 * 1024  # address space; measured peaks: 13.5 MB JSON 145 MB RSS, YAML 169 MB
TIMEOUT = 300.0
KNOWN = object()  # stands for the raw object of a known digest

_ALLOWED = {("datetime", "datetime"), ("datetime", "date"), ("datetime", "timezone"),
            ("datetime", "timedelta")}


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return getattr(datetime, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain value")


class ChildFailed(Exception):
    """The child could not parse the file; ``reason`` and ``category`` as for any unusable file."""

    def __init__(self, reason: str, category: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.category = category


def parse(data: bytes, *, is_json: bool, known: Any) -> Iterator[tuple[Any, bytes]]:
    """(raw object or ``KNOWN``, digest) of every object, parsed in a child; ``ChildFailed``.

    Records come as the child writes them: the caller converts the first
    objects while the child still parses the rest (on two cores the parse
    costs the start little more than the child's own start). A caller that
    stops early (an error while converting) ends the child.
    """
    digests = list(known)
    request = b"".join([len(digests).to_bytes(4, "little"), *digests, data])
    del data
    argv = [sys.executable, "-m", "proxyd.sources.parsechild", "json" if is_json else "yaml"]
    with tempfile.TemporaryFile() as errors:
        try:
            # Own session: a signal to the daemon's process group is not the parser's (proxyd.daemon).
            # Its complaints go to a file: a pipe nobody reads could stall it.
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                    start_new_session=True, bufsize=1 << 16)
        except OSError as err:
            raise ChildFailed(f"cannot start the parser ({err.strerror})", "unreadable") from None
        assert proc.stdin is not None and proc.stdout is not None
        timed_out = threading.Event()
        timer = threading.Timer(TIMEOUT, _stop, (proc, timed_out))
        timer.daemon = True
        timer.start()
        try:
            # The child reads the whole request before it writes anything: no deadlock.
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(request)
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            del request
            yield from _records(proc.stdout, lambda: _failure(proc, errors, timed_out))
        finally:
            timer.cancel()
            if proc.poll() is None:
                _stop(proc, None)
            proc.stdout.close()
            proc.wait()


def _stop(proc: subprocess.Popen[bytes], timed_out: threading.Event | None) -> None:
    if timed_out is not None:
        timed_out.set()
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)


def _failure(proc: subprocess.Popen[bytes], errors: Any, timed_out: threading.Event) -> ChildFailed | None:
    """Why the child's output ended where it did; None when it exited well."""
    proc.wait()
    if proc.returncode == 0:
        return None
    if timed_out.is_set():
        return ChildFailed(f"does not parse: took longer than {TIMEOUT:.0f}s", "parse")
    errors.seek(0, os.SEEK_END)
    errors.seek(max(0, errors.tell() - (1 << 16)))  # the end says why (a traceback's last line)
    lines = errors.read().decode("utf-8", "replace").strip().splitlines()
    detail = lines[-1][:200] if lines else f"exit {proc.returncode}"
    return ChildFailed(f"does not parse: the parser failed ({_printable(detail)})", "parse")


def _printable(text: str) -> str:
    return text if text.isprintable() else ascii(text)[1:-1]


def _records(out: IO[bytes], failure: Callable[[], ChildFailed | None]) -> Iterator[tuple[Any, bytes]]:
    def exactly(size: int) -> bytes:
        chunk = out.read(size)
        if len(chunk) != size:  # cut short: the child died, or wrote garbage
            raise failure() or ChildFailed("does not parse: the parser's answer is garbled", "parse")
        return chunk

    while True:
        tag = out.read(1)
        if not tag:
            failed = failure()
            if failed is not None:
                raise failed
            return
        if tag == b"K":
            yield KNOWN, exactly(DIGEST)
        elif tag == b"N":
            digest = exactly(DIGEST)
            size = int.from_bytes(exactly(4), "little")
            value = _PlainUnpickler(io.BytesIO(exactly(size))).load()
            yield value, digest
        elif tag == b"E":
            size = int.from_bytes(exactly(4), "little")
            reason, category = json.loads(exactly(size))
            raise ChildFailed(str(reason), str(category))
        else:
            raise ChildFailed("does not parse: the parser's answer is garbled", "parse")


def _main() -> int:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    # In a session of its own the child outlives a daemon killed with its process group: its CPU
    # is bounded here as its memory is (the parent's timeout is gone with the parent).
    with contextlib.suppress(ValueError, OSError):  # a lower hard limit set by the operator stays
        resource.setrlimit(resource.RLIMIT_CPU, (int(TIMEOUT), int(TIMEOUT) + 5))
    from proxyd.sources.manifests import _Unusable, iter_objects

    request = sys.stdin.buffer.read()
    count = int.from_bytes(request[:4], "little")
    end = 4 + DIGEST * count
    known = {request[i:i + DIGEST] for i in range(4, end, DIGEST)}
    data = request[end:]
    del request
    out = sys.stdout.buffer

    def error(reason: str, category: str) -> int:
        blob = json.dumps([reason, category]).encode()
        out.write(b"E" + len(blob).to_bytes(4, "little") + blob)
        out.flush()
        return 0

    try:
        for raw, digest in iter_objects(data, is_json=sys.argv[1] == "json", known=known):
            if digest in known:
                out.write(b"K" + digest)
            else:
                blob = pickle.dumps(raw, protocol=pickle.HIGHEST_PROTOCOL)
                out.write(b"N" + digest + len(blob).to_bytes(4, "little") + blob)
    except _Unusable as err:
        return error(err.reason, err.category)
    except MemoryError:
        return error(f"does not parse: needs more than {MEMORY_LIMIT >> 20} MiB to parse", "parse")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
