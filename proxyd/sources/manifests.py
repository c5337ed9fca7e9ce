"""Standalone source: a directory of Kubernetes manifests, re-read on change.

Every ``*.yaml``, ``*.yml`` and ``*.json`` file directly in the directory is
read (dot files are skipped: editors' lock and swap files). A file may hold
several YAML documents and ``kind: List`` objects, so the output of
``kubectl get svc,endpointslices -A -o yaml`` works as is. Service,
EndpointSlice, Endpoints (mirrored into slices) and this node's Node object
are used; other kinds are ignored, each with one info line and a count in
``proxyd_ignored_objects_total``.

Failure modes, by design:

* A file that cannot be used (does not parse, too large, not a regular file,
  a symlink loop or a symlink leading out of the directory) is logged once
  with its name and the reason, counted in ``proxyd_rejected_objects_total``,
  and the objects it held at its last good read stay in force.
* An invalid object is logged once and counted the same way; its previous
  good version from the same file (if any) stays in force, the rest of the
  file applies.
* "Once" means once per content: nothing is logged again until the file
  changes (a ``touch`` that leaves the bytes alone does not count).
* The same object in two files: the file that sorts last wins, logged once.
* What an object holds that proxyd does not serve (``convert.Note``: an
  address the API server would refuse, a headless service, …) is logged
  once per content with file, object and reason, and counted with the
  reason as label; the rest of the object applies.
* A Service without a cluster IP or node port gets one from
  ``proxyd.sources.allocate`` (the flags name the ranges), or, without a
  ``--service-cluster-ip-range``, is refused naming the flag.
* A vanished file (or a dangling symlink) is a deletion: its objects go.
* The directory itself failing to list keeps everything as it was.

Everything reported goes through ``_report``, which also hands a
``Finding`` to an optional ``report`` callback: ``proxyd check`` reads the
directory with this very class (``read_all``) and prints those. An object
that is invalid or refused and has no earlier good version is kept as
"defined, nothing to serve" (like a headless service): it still wins a name
clash as the file that sorts last, and its endpoints are not reported as
orphans.

Change detection is inotify (through ctypes: no extra dependency) on the
directory, with a 100 ms debounce after a file is written in place (one
renamed into place is complete and read at once), or polling of stat signatures every 0.5 s
where inotify is unavailable. Work per change follows the change, not the
directory (10,000 files, one rewritten every 50 ms: 1.6 % CPU):

* inotify names the files that changed: only those are looked at. The
  safety rescan re-checks symlinked entries every 5 s (their targets change
  without an event here) and files written to but not closed (a stalled
  writer), and stats every file every 60 s; a file is read
  only when its stat signature changed, parsed only when its bytes did.
* Every object carries a digest of its source text: an object whose text
  did not change is not converted again (nor logged again if invalid).
* Files are merged incrementally (the file that sorts last wins a name
  clash) and only objects whose merged value changed reach the tracker, one
  ``update_service``/``update_slice`` each.
* Allocation depends on the whole directory (an explicit address anywhere
  takes a slot; collisions are resolved in name order across all files), so
  whenever a Service's merged spec changes, ``Allocator.update`` runs over
  every merged Service spec and hands back only the Services whose result
  changed; those alone reach the tracker. A change of endpoints alone does
  not allocate, nor does a directory in which no Service needs anything
  allocated (a kubectl dump): then only the changed Services are built.
* Endpoints that reach no service port (no such Service, port names that
  match nothing) are looked at again only for the services a change touched.

Parsing is bounded by what a file holds, whatever its shape:
JSON goes through ``json.loads`` unless it is dense in containers; YAML (and
dense JSON) through ``yamlstream``, which builds values from libyaml's event
stream one object at a time and refuses aliases, merge keys, nesting deeper
than ``MAX_DEPTH``, objects of more than 300,000 nodes and files of more than
100,000 objects. Files of 1 MiB or more are parsed in a short-lived child
process under a memory limit (``parsechild``), so the raw objects of a big
file never fragment the daemon's heap: at 10,000 services × 10 endpoints the
daemon's RSS after 20 rewrites of a 13 MB file equals its RSS after one.
Except a re-read of a big ``kind: List`` (JSON, or YAML in the block style
kubectl writes) in which at most ``REREAD_NEW_ITEMS`` items are new: its
items are found and digested by their text in the daemon
(``_json_list_spans``, ``yamlstream.split_list``) and only the new ones are
built, so there is no process to start and no document to build (13 MB at
10,000 services re-read in 0.6 s as JSON, 1.5 s as YAML, on a loaded 2-core
machine: ``bench/state_memory.py``).
Listing, reading and parsing run in a worker thread (small files first, then
big ones one by one, each applied as soon as it is read), so the event loop
never blocks and a good file never waits behind a huge one. Files are
read through ``safeio.read_regular`` (regular files only, bounded size,
never hanging on a FIFO nor following a symlink swapped in).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import logging
import operator
import os
import stat
import struct
import time
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from proxyd import heap, metrics, rejections
from proxyd.logformat import event as log_event
from proxyd.model import EndpointSlice, Service, ServiceName
from proxyd.sources import parsechild, yamlstream
from proxyd.sources.allocate import Allocator, Ranges
from proxyd.sources.convert import (
    InvalidObject,
    Note,
    ServiceSpec,
    is_mirror,
    node_labels_from_dict,
    service_spec,
    slice_from_dict,
    slices_from_endpoints,
)
from proxyd.sources.safeio import UnsafeInput, read_regular

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_SIZE = 16 * 1024 * 1024
MAX_DEPTH = 100  # Kubernetes objects nest ~15 deep; libyaml crashes at ~100k
LIMITS = yamlstream.Limits(max_depth=MAX_DEPTH)
JSON_BYTES_PER_CONTAINER = 24
TRIM_AFTER = 1 << 20  # bytes: reading a file at least this big is followed by a heap trim
BIG_FILE = 1 << 20  # bytes: files at least this big are read and applied one by one, after the others
# A big List re-read with at most this many new items is read in the daemon, not in a child.
REREAD_NEW_ITEMS = 1000
POLL_INTERVAL = 0.5
DEBOUNCE = 0.1
# With inotify, still look every few seconds at the entries that are
# symlinks: a symlinked file whose target changes in place elsewhere produces
# no event in the directory. Every file is looked at (stat only) less often,
# in case an event was missed.
SAFETY_RESCAN = 5.0
FULL_RESCAN = 60.0
# A directory of thousands of kubectl-made services logs a summary, not a line each.
MAX_ALLOCATION_LINES = 50

_SOURCE = "manifests"


@functools.cache
def _events(kind: str) -> Any:
    """proxyd_source_events_total of one kind, looked up once (labels() costs more than the count)."""
    return metrics.SOURCE_EVENTS.labels(source=_SOURCE, kind=kind)


# The order of ServiceName (namespace, then name) as a key: 10,000 names sort without one Python-level
# comparison each.
_by_name = operator.attrgetter("namespace", "name")

# (kind, namespace, name); Node objects use namespace "".
ObjKey = tuple[str, str, str]
# (file, its objects before, after)
_Change = tuple[str, dict[ObjKey, Any], dict[ObjKey, Any]]

_KINDS = {
    ("v1", "Service"): "Service",
    ("discovery.k8s.io/v1", "EndpointSlice"): "EndpointSlice",
    ("v1", "Endpoints"): "Endpoints",
    ("v1", "Node"): "Node",
}


class TrackerLike(Protocol):
    node_name: str

    def update_service(self, name: ServiceName, svc: Any) -> bool: ...

    def update_slice(self, key: tuple[str, str], sl: Any) -> bool: ...

    def set_node_labels(self, labels: Any) -> bool: ...


class ManifestError(Exception):
    """The manifests directory cannot be used at all."""


class _Refused(InvalidObject):
    """A valid object proxyd cannot serve as written (no cluster IP and no range to allocate one)."""

    def __init__(self, reason: str, category: str) -> None:
        super().__init__(reason)
        self.category = category


_Unusable = UnsafeInput


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing reported about the directory: what was refused or ignored, where, and why."""

    file: str
    what: str  # "Service default/web", "EndpointSlice #3", …
    reason: str
    category: str  # the metric's reason label
    refused: bool  # refused (an error or warning) rather than ignored by design (info)


# What a content digest stood for at the last read: (key or None, model value,
# or one of these markers).
_INVALID = "invalid"  # logged once; the previous good version (if any) stays
_IGNORED = "ignored"  # another kind, or not an object: nothing to do


@dataclass(slots=True)
class _FileState:
    signature: tuple[Any, ...] | None = None
    digest: bytes | None = None
    failure: tuple[Any, ...] | None = None  # the last file-level failure logged, to log it once
    objects: dict[ObjKey, Any] = field(default_factory=dict)
    # Object content digest -> (key, value): an object whose text did not
    # change is not converted (nor logged) again.
    known: dict[bytes, tuple[ObjKey | None, Any]] = field(default_factory=dict)


def _printable(text: str, limit: int = 300) -> str:
    """Text safe for one log line: non-printable characters escaped, length bounded."""
    if not text.isprintable():
        text = ascii(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "…"


# ---------------------------------------------------------------- parsing


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _Unusable("does not parse: not UTF-8 text", "parse") from None


def _json_fast_path(text: str, size: int) -> bool:
    """Whether ``json.loads`` of the whole text is safe: a top-level object, not too many containers.

    ``json.loads`` is the fastest parser there is (13.5 MB in 0.1 s) but
    builds the whole document at once; a file dense in empty containers
    (``{"items":[{},{},…]}``) would cost ~80 bytes of memory per input
    byte. Such files take the streaming path, whose memory is bounded per
    object. A real object has far fewer than one container per 24 bytes.
    """
    head = text.lstrip(" \t\r\n")[:1]
    if head != "{":
        return False
    containers = text.count("{") + text.count("[")
    return containers * JSON_BYTES_PER_CONTAINER <= size + JSON_BYTES_PER_CONTAINER * 10_000


def _json_items(text: str, known: Container[bytes] | None = None) -> Iterator[tuple[Any, bytes]]:
    """(object, digest) of a JSON document: a List's items, or the document itself.

    A List's items are digested by their text (``_json_list_spans``); an item
    whose digest is in ``known`` comes as (None, digest): not built.
    """
    spans = _json_list_spans(text)
    if spans is None:
        yield from _objects_with_digests([json.loads(text)])
        return
    if len(spans) > LIMITS.max_items:
        raise _Unusable(f"does not parse: more than {LIMITS.max_items} objects", "parse")
    yield from _json_span_items(text, spans, known)


def _json_span_items(text: str, spans: list[tuple[int, bytes]],
                     known: Container[bytes] | None) -> Iterator[tuple[Any, bytes]]:
    for start, digest in spans:
        if known is not None and digest in known:
            yield None, digest
        else:
            yield _JSON.raw_decode(text, start)[0], digest


_JSON = json.JSONDecoder()
_JSON_SPACE = frozenset(" \t\n\r")


def _json_skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _JSON_SPACE:
        i += 1
    return i


def _json_list_spans(text: str) -> list[tuple[int, bytes]] | None:
    """(offset, digest of its text) of each item of a JSON ``kind: List``; None for anything else.

    The top-level object is walked key by key and every value decoded by the
    C decoder (``raw_decode``) and dropped at once, so at most one raw item is
    alive whatever the file's size: a re-read learns which items changed
    without building the document (``json.loads`` of 13 MB builds ~150 MB).
    None — also for text ``json.loads`` would refuse, a repeated ``items``
    key or nesting the decoder cannot follow — sends the caller to the whole
    document's decoder, which gives the answer (or the error) it always gave.
    """
    try:
        i = _json_skip(text, 0)
        if text[i:i + 1] != "{":
            return None
        i = _json_skip(text, i + 1)
        spans: list[tuple[int, bytes]] | None = None
        kind: Any = None
        if text[i:i + 1] != "}":
            while True:
                if text[i:i + 1] != '"':
                    return None
                key, i = _JSON.raw_decode(text, i)
                i = _json_skip(text, i)
                if text[i:i + 1] != ":":
                    return None
                i = _json_skip(text, i + 1)
                if key == "items" and text[i:i + 1] == "[":
                    if spans is not None:
                        return None  # json.loads keeps the last one: let it decide
                    spans = []
                    i = _json_skip(text, i + 1)
                    if text[i:i + 1] != "]":
                        while True:
                            _item, end = _JSON.raw_decode(text, i)
                            del _item
                            spans.append((i, hashlib.blake2b(text[i:end].encode("utf-8", "surrogatepass"),
                                                             digest_size=16).digest()))
                            i = _json_skip(text, end)
                            if text[i:i + 1] == "]":
                                break
                            if text[i:i + 1] != ",":
                                return None
                            i = _json_skip(text, i + 1)
                    i += 1
                else:
                    value, i = _JSON.raw_decode(text, i)
                    if key == "kind":
                        kind = value
                    elif key == "items":
                        return None  # items that are not a list: the whole document is reported
                    del value
                i = _json_skip(text, i)
                if text[i:i + 1] == "}":
                    break
                if text[i:i + 1] != ",":
                    return None
                i = _json_skip(text, i + 1)
        if _json_skip(text, i + 1) != len(text) or kind != "List":
            return None
        return spans
    except (ValueError, RecursionError):
        return None


def _digest_json(value: Any) -> bytes:
    try:
        text = json.dumps(value, ensure_ascii=False, check_circular=False)
    except (TypeError, ValueError):
        text = repr(value)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _objects_with_digests(docs: list[Any]) -> Iterator[tuple[Any, bytes]]:
    for obj in _objects(docs):
        yield obj, _digest_json(obj)


def _yaml_items(text: str, known: Container[bytes] | None) -> Iterator[tuple[Any, bytes]]:
    """(object, digest) of every object of a YAML stream, one at a time (see ``yamlstream``).

    A List item whose digest is in ``known`` comes as (None, digest): not built.
    """
    pending: list[tuple[Any, bytes]] = []
    own: tuple[Any, bytes] | None = None
    for entry in yamlstream.iter_objects(text, LIMITS, known):
        if type(entry) is yamlstream.Item:
            if entry.listed:
                # Whether these are a List's items is known at the document's end.
                pending.append((entry.value, entry.digest))
            else:
                own = (entry.value, entry.digest)
            continue
        assert isinstance(entry, yamlstream.DocumentEnd)
        if entry.is_list:
            yield from pending
        elif own is not None:
            for obj in _objects([own[0]]):
                yield obj, own[1] if obj is own[0] else _digest_json(obj)
        pending.clear()
        own = None


def iter_objects(data: bytes, *, is_json: bool,
                 known: Container[bytes] | None = None) -> Iterator[tuple[Any, bytes]]:
    """Every object of one file with a digest of its content; ``_Unusable`` when it does not parse.

    JSON (a ``.json`` file, or a YAML file that is JSON) goes through
    ``json.loads`` when it looks like real objects, everything else through
    the streaming YAML reader, whose memory is bounded per object. Objects
    come one at a time: callers convert and drop them, raw objects never
    pile up. With ``known``, YAML List items whose digest is in it are not built
    (they come as None): the caller has their outcome already.
    """
    return _guarded(data, is_json=is_json, known=known)


@contextlib.contextmanager
def _parse_errors() -> Iterator[None]:
    """Every way a parser fails, as one ``_Unusable`` of category "parse"."""
    try:
        yield
    except _Unusable:
        raise
    except yamlstream.ParseError as err:
        raise _Unusable(f"does not parse: {_printable(err.reason)}", "parse") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        raise _Unusable(f"does not parse: {where}{_printable(str(err.problem or err))}", "parse") from None
    except RecursionError:
        raise _Unusable("does not parse: nested too deeply", "parse") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as err:
        raise _Unusable(f"does not parse: {_printable(str(err))}", "parse") from None


def _guarded(data: bytes, *, is_json: bool,
             known: Container[bytes] | None = None) -> Iterator[tuple[Any, bytes]]:
    text = _decode(data)
    with _parse_errors():
        if _json_fast_path(text, len(data)):
            try:
                yield from _json_items(text, known)
                return
            except json.JSONDecodeError as err:
                if is_json:
                    raise _Unusable(f"does not parse: line {err.lineno} column {err.colno}: {err.msg}",
                                    "parse") from None
                # YAML that starts like JSON but is not: the YAML reader says what is wrong.
        yield from _yaml_items(text, known)


def parse_documents(data: bytes, *, is_json: bool) -> list[Any]:
    """The decoded documents of one file; ``_Unusable`` when it does not parse.

    Built with the same bounded readers as the source (a List's fields and
    items reassembled into one document); for tools and tests.
    """
    text = _decode(data)
    with _parse_errors():
        if _json_fast_path(text, len(data)):
            try:
                with heap.gc_paused():
                    return [json.loads(text)]
            except json.JSONDecodeError as err:
                if is_json:
                    raise _Unusable(f"does not parse: line {err.lineno} column {err.colno}: {err.msg}",
                                    "parse") from None
        docs: list[Any] = []
        items: list[Any] = []
        own: Any = None
        for entry in yamlstream.iter_objects(text, LIMITS):
            if type(entry) is yamlstream.Item:
                if entry.listed:
                    items.append(entry.value)
                else:
                    own = entry.value
            else:
                assert isinstance(entry, yamlstream.DocumentEnd)
                if entry.streamed:
                    own = {**own, "items": items}
                docs.append(own)
                items, own = [], None
        return docs


def _objects(docs: list[Any]) -> Iterator[Any]:
    """Each document, with ``kind: List`` objects opened into their items."""
    for doc in docs:
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items")
            if items is None:
                continue
            if isinstance(items, list):
                yield from items
            else:
                yield items  # reported as "not a Kubernetes object"
        else:
            yield doc


def _identity(kind: str, raw: dict[str, Any]) -> ObjKey | None:
    """The object's key as far as its raw metadata tells, to find its previous version."""
    meta = raw.get("metadata")
    if not isinstance(meta, dict):
        return None
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    if kind == "Node":
        return (kind, "", name)
    namespace = meta.get("namespace") or "default"
    if not isinstance(namespace, str):
        return None
    return (kind, namespace, name)


def _convert(kind: str, raw: dict[str, Any], notes: list[Note]) -> tuple[ObjKey, Any]:
    """(key, value) of one object, a ServiceSpec for a Service; InvalidObject when it is invalid."""
    if kind == "Service":
        svc = service_spec(raw, notes)
        if svc is not None:
            return (kind, svc.name.namespace, svc.name.name), svc
        key = _identity(kind, raw)
        if key is None:
            raise InvalidObject("metadata: missing name")
        return key, None  # defined but ignored (headless, ExternalName, …)
    if kind == "EndpointSlice":
        sl = slice_from_dict(raw, notes)
        if sl is not None:
            return (kind, sl.namespace, sl.name), sl
        key = _identity(kind, raw)
        if key is None:
            raise InvalidObject("metadata: missing name")
        return key, None
    if kind == "Endpoints":
        mirrored = tuple(slices_from_endpoints(raw, notes))
        key = _identity(kind, raw)
        if key is None:
            raise InvalidObject("metadata: missing name")
        return key, mirrored
    name, labels = node_labels_from_dict(raw)
    return (kind, "", name), labels


# ---------------------------------------------------------------- inotify


class _Inotify:
    """A non-blocking inotify instance watching one directory (Linux, via ctypes)."""

    IN_MODIFY = 0x00000002
    IN_ATTRIB = 0x00000004
    IN_CLOSE_WRITE = 0x00000008
    IN_MOVED_FROM = 0x00000040
    IN_MOVED_TO = 0x00000080
    IN_CREATE = 0x00000100
    IN_DELETE = 0x00000200
    IN_DELETE_SELF = 0x00000400
    IN_MOVE_SELF = 0x00000800
    IN_Q_OVERFLOW = 0x00004000
    IN_IGNORED = 0x00008000
    IN_ONLYDIR = 0x01000000
    IN_NONBLOCK = os.O_NONBLOCK
    IN_CLOEXEC = os.O_CLOEXEC
    MASK = (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CREATE | IN_ATTRIB
            | IN_MODIFY | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
    WRITES = IN_CLOSE_WRITE | IN_CREATE | IN_ATTRIB
    _HEADER = struct.Struct("iIII")

    def __init__(self, directory: str) -> None:
        libc_name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            raise OSError(errno.ENOSYS, "inotify is not available")
        fd = libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        wd = libc.inotify_add_watch(fd, os.fsencode(directory), ctypes.c_uint32(self.MASK))
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, os.strerror(err))
        self.fd = fd

    def drain(self, names: set[str], modified: set[str]) -> tuple[bool, bool, bool]:
        """Read all queued events, adding the names they carry to ``names``.

        Names only written to (``IN_MODIFY``: a writer still has the file
        open) go to ``modified`` instead. Returns (watch lost: the directory
        was deleted or moved, overflow: events were dropped so the names are
        incomplete, written: a manifest was written in place rather than
        renamed into place or removed, so more writes may follow).
        """
        lost = overflow = written = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return lost, overflow, written
            except OSError:
                return True, overflow, written
            if not data:
                return lost, overflow, written
            offset = 0
            size = self._HEADER.size
            while offset + size <= len(data):
                _wd, mask, _cookie, length = self._HEADER.unpack_from(data, offset)
                if mask & (self.IN_IGNORED | self.IN_DELETE_SELF | self.IN_MOVE_SELF):
                    lost = True
                if mask & self.IN_Q_OVERFLOW:
                    overflow = True
                if length:
                    name = os.fsdecode(data[offset + size:offset + size + length].split(b"\0", 1)[0])
                    (modified if mask == self.IN_MODIFY else names).add(name)
                    if mask & self.WRITES and _candidate(name):
                        written = True
                offset += size + length

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


# ---------------------------------------------------------------- the source


class ManifestSource:
    """Feeds the tracker from a manifests directory; ``ready`` is set after the first full read.

    Work per change is proportional to the change: inotify names the files
    that changed and only those are looked at; a rewritten file is parsed
    again, but only its objects whose text changed are converted, and only
    objects whose merged value changed reach the tracker (one
    ``update_service``/``update_slice`` each).
    """

    def __init__(
        self,
        directory: str,
        tracker: TrackerLike,
        *,
        on_change: Callable[[], None],
        use_inotify: bool = True,
        poll_interval: float = POLL_INTERVAL,
        max_file_size: int = MAX_FILE_SIZE,
        rescan_interval: float = SAFETY_RESCAN,
        full_rescan_interval: float = FULL_RESCAN,
        child_parse_size: int | None = BIG_FILE,
        allocator: Allocator | None = None,
        report: Callable[[Finding], None] | None = None,
    ) -> None:
        self.directory = str(directory)
        self.tracker = tracker
        self.on_change = on_change
        self.ready = asyncio.Event()
        self.use_inotify = use_inotify
        self.poll_interval = poll_interval
        self.max_file_size = max_file_size
        self.rescan_interval = rescan_interval
        self.full_rescan_interval = full_rescan_interval
        # Files at least this big are parsed in a child process (see parsechild); None: never.
        self.child_parse_size = child_parse_size
        self.watching = False  # True while inotify (not polling) detects changes
        self.scans = 0  # completed scans, for tests and debugging
        self.reads = 0  # files read (opened and read whole), for tests and debugging
        self._files: dict[str, _FileState] = {}
        self._symlinks: set[str] = set()  # entries that are symlinks (their targets get no events)
        self._dir_error: str | None = None
        self._wake = asyncio.Event()
        self._watch_lost = False
        self._names: set[str] = set()  # named by inotify since the last scan
        # Written to but not closed yet: looked at by the next safety rescan
        # (a writer stalling with the file open), not at every write.
        self._modified: set[str] = set()
        self._written = False  # a manifest was written in place since the last scan
        self._overflow = False
        self._last_full = 0.0
        # Merged view: which files define each key (sorted; the last wins),
        # and what was handed to the tracker.
        self._owners: dict[ObjKey, list[str]] = {}
        self._applied: dict[ObjKey, Any] = {}
        self._duplicates: dict[ObjKey, set[tuple[str, str]]] = {}
        self._real_slices: dict[ServiceName, int] = {}
        self._mirror_wanted: dict[ServiceName, tuple[EndpointSlice, ...]] = {}
        self._mirror_applied: dict[ServiceName, dict[tuple[str, str], EndpointSlice]] = {}
        self._node_labels: dict[str, str] | None = None
        # Node ports are allocated from the default range even without flags,
        # as kube-apiserver does; cluster IPs only with a range.
        self.allocator = allocator if allocator is not None else Allocator(Ranges())
        self.report = report
        # The merged Service specs (what allocation runs over).
        self._specs: dict[ServiceName, ServiceSpec] = {}
        self._allocation_notes: set[tuple[str, str]] = set()
        # What the tracker holds as endpoints, per service (real slices, or
        # mirrored ones): to find endpoints that reach no service port.
        self._endpoints_of: dict[ServiceName, dict[tuple[str, str], EndpointSlice]] = {}
        self._unmatched: dict[ServiceName, set[tuple[str, str, str, str]]] = {}

    # ------------------------------------------------------------ loop side

    async def run(self) -> None:
        if not self._directory_exists():
            raise ManifestError(f"--manifests {_printable(self.directory)}: not a directory")
        watcher = self._start_watcher()
        try:
            await self._apply(initial=True, names=None)
            self.ready.set()
            while True:
                names: set[str] | None = None
                if watcher is not None:
                    woken = False
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.rescan_interval)
                        woken = True
                        if self._written:
                            # Coalesce the burst an editor or `kubectl ... > file` makes.
                            # A file renamed into place is complete: read it at once.
                            await asyncio.sleep(DEBOUNCE)
                    self._wake.clear()
                    self._written = False
                    names, self._names = self._names, set()
                    if self._overflow or self._watch_lost:
                        names = None
                        self._overflow = False
                    elif not woken:
                        # The safety rescan: symlinked entries often, everything now and then.
                        names = self._symlinks | self._modified
                        self._modified = set()
                        if time.monotonic() - self._last_full >= self.full_rescan_interval:
                            names = None
                    elif any(not _candidate(n) for n in names):
                        # A dot entry or a directory moved (a ConfigMap's ..data swap):
                        # symlinked files may now lead elsewhere.
                        names |= self._symlinks
                    if self._watch_lost:
                        # The directory was deleted or moved: poll until it is back.
                        self._stop_watcher(watcher)
                        watcher = None
                else:
                    await asyncio.sleep(self.poll_interval)
                    if self.use_inotify and self._directory_exists():
                        watcher = self._start_watcher()
                await self._apply(initial=False, names=names)
        finally:
            if watcher is not None:
                self._stop_watcher(watcher)

    def _directory_exists(self) -> bool:
        return os.path.isdir(self.directory)

    def _start_watcher(self) -> _Inotify | None:
        if not self.use_inotify:
            return None
        try:
            watcher = _Inotify(self.directory)
        except (OSError, AttributeError) as err:
            if getattr(err, "errno", None) not in (errno.ENOENT, errno.ENOTDIR):
                # No inotify here (or no instances left): poll from now on.
                self.use_inotify = False
                log.info("manifests: inotify unavailable (%s); polling every %.1fs", err, self.poll_interval)
            return None
        self._watch_lost = False
        asyncio.get_running_loop().add_reader(watcher.fd, self._on_inotify, watcher)
        self.watching = True
        return watcher

    def _stop_watcher(self, watcher: _Inotify) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(watcher.fd)
        watcher.close()
        self.watching = False

    def _on_inotify(self, watcher: _Inotify) -> None:
        names_before = len(self._names)
        lost, overflow, written = watcher.drain(self._names, self._modified)
        if written:
            self._written = True
        if lost:
            self._watch_lost = True
        if overflow:
            self._overflow = True
        if lost or overflow or len(self._names) != names_before:
            self._wake.set()

    async def _apply(self, *, initial: bool, names: set[str] | None) -> None:
        # The first read builds what lives on (20,000 objects and their merged view at 10,000
        # services): the cyclic GC would scan the growing heap again and again for nothing, then
        # walk all of it in the first collection after (a fifth of the start's CPU); see heap.
        with heap.gc_paused(freeze=True) if initial else contextlib.nullcontext():
            changes, big = await asyncio.to_thread(self._scan, names)
            self._commit_and_notify(changes, initial=initial)
            # Big files one at a time, each applied as soon as it is read: the
            # small files above are in force already, whatever a big one costs.
            for name in big:
                changes = await asyncio.to_thread(self._scan_files, [name], None)
                self._commit_and_notify(changes, initial=initial)
        self.scans += 1

    def _commit_and_notify(self, changes: list[_Change], *, initial: bool) -> None:
        changed = self._commit(changes)
        metrics.SOURCE_LAST_EVENT_TIMESTAMP.set(time.time())
        # The first read is followed by the daemon's first sync anyway.
        if changed and not initial:
            self.on_change()

    def read_all(self) -> bool:
        """One full read of the directory into the tracker, in this thread; True when anything changed.

        What ``run`` does at start (and its safety rescan every
        ``full_rescan_interval``), without a loop: for ``proxyd check`` and tests.
        """
        changes, big = self._scan(None)
        changed = self._commit(changes)
        for name in big:
            changed |= self._commit(self._scan_files([name], None))
        self.scans += 1
        return changed

    # ------------------------------------------------------------ worker thread side

    def _scan(self, names: set[str] | None) -> tuple[list[_Change], list[str]]:
        """Re-read what changed (all files when ``names`` is None, else those named).

        Returns the changes of the small files, read now, and the names of
        big files (``BIG_FILE`` bytes or more at their last read) left for
        ``_scan_files`` one by one.
        """
        try:
            if names is None:
                with os.scandir(self.directory) as it:
                    entries = {e.name: e for e in it if _candidate(e.name)}
            else:
                entries = None
        except OSError as err:
            reason = err.strerror or str(err)
            if reason != self._dir_error:
                log.error("manifests %s: cannot list the directory (%s); keeping the current content",
                          _printable(self.directory), reason)
                self._dir_error = reason
            return [], []
        self._dir_error = None
        changes: list[_Change] = []
        if entries is not None:
            self._last_full = time.monotonic()
            for gone in [n for n in self._files if n not in entries]:
                self._forget(gone, changes)
            todo = sorted(entries)
        else:
            assert names is not None
            todo = sorted(n for n in names if _candidate(n))
        sizes = {n: self._size(n, entries) for n in todo}
        small = [n for n in todo if sizes[n] < BIG_FILE]
        big = sorted((n for n in todo if sizes[n] >= BIG_FILE), key=sizes.__getitem__)
        more = self._scan_files(small, entries)
        return changes + more, big

    def _scan_files(self, names: list[str], entries: dict[str, os.DirEntry[str]] | None) -> list[_Change]:
        changes: list[_Change] = []
        try:
            real_dir = os.path.realpath(self.directory, strict=True)
        except OSError:
            return changes  # the directory went away: the next scan reports it
        for name in names:
            entry = entries.get(name) if entries is not None else None
            old = self._files[name].objects if name in self._files else {}
            new = self._refresh(name, real_dir, entry)
            if new is not None and new is not old:
                changes.append((name, old, new))
        return changes

    def _size(self, name: str, entries: dict[str, os.DirEntry[str]] | None) -> int:
        """The file's size at its last read; for a new file, its size now (0 when unknown)."""
        state = self._files.get(name)
        if state is not None and state.signature is not None:
            return int(state.signature[3])
        try:
            entry = entries.get(name) if entries is not None else None
            if entry is not None:
                return entry.stat().st_size
            return os.stat(os.path.join(self.directory, name)).st_size
        except OSError:
            return 0

    def _forget(self, name: str, changes: list[_Change]) -> None:
        state = self._files.pop(name, None)
        self._symlinks.discard(name)
        if state is not None and state.objects:
            changes.append((name, state.objects, {}))

    def _refresh(self, name: str, real_dir: str, entry: os.DirEntry[str] | None) -> dict[ObjKey, Any] | None:
        """Bring one file's state up to date; its objects (the same dict when unchanged)."""
        path = os.path.join(self.directory, name)
        state = self._files.get(name)
        try:
            data, signature = self._read(path, name, real_dir, state, entry)
        except FileNotFoundError:
            # Gone between listing and reading, or a dangling symlink: deleted.
            if state is not None:
                del self._files[name]
                self._symlinks.discard(name)
                return {}
            return None
        except _Unusable as err:
            if state is None:
                state = self._files[name] = _FileState()
            self._reject_file(name, state, err)
            return state.objects
        if state is None:
            state = self._files[name] = _FileState()
        if data is None:
            return state.objects  # same stat signature: unchanged
        state.signature = signature
        state.failure = None
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest == state.digest:
            return state.objects
        state.digest = digest
        is_json = name.endswith(".json")
        items: Iterable[tuple[Any, bytes]] | None = None
        if self.child_parse_size is not None and len(data) >= self.child_parse_size:
            # A List whose items mostly did not change is re-read here (only the new items are
            # built, no process to start); anything else goes to a child.
            items = _reread(data, state.known) if state.known else None
            if items is None:
                items = _from_child(data, is_json=is_json, known=state.known)
        else:
            items = iter_objects(data, is_json=is_json, known=state.known)
        try:
            with heap.gc_paused():
                objects, known = self._convert_all(name, items, state.objects, state.known)
        except _Unusable as err:
            self._reject_file(name, state, err)
            return state.objects
        finally:
            del data
            if signature[3] >= TRIM_AFTER:
                _trim_heap()
        state.known = known
        if objects == state.objects:
            return state.objects
        state.objects = objects
        return objects

    def _read(self, path: str, name: str, real_dir: str, state: _FileState | None,
              entry: os.DirEntry[str] | None) -> tuple[bytes | None, tuple[Any, ...]]:
        """(bytes or None when the stat signature is unchanged, signature)."""
        is_link = entry.is_symlink() if entry is not None else stat.S_ISLNK(os.lstat(path).st_mode)
        if is_link:
            self._symlinks.add(name)
            try:
                real = os.path.realpath(path, strict=True)
            except FileNotFoundError:
                raise
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise _Unusable("symlink loop", "unreadable") from None
                raise _Unusable(f"cannot resolve ({err.strerror})", "unreadable") from None
            if os.path.commonpath([real_dir, real]) != real_dir:
                raise _Unusable("symlink points outside the directory", "outside_dir")
            st = os.stat(real)
        else:
            self._symlinks.discard(name)
            real = os.path.join(real_dir, name)
            st = entry.stat(follow_symlinks=False) if entry is not None else os.lstat(path)
        signature = (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
        if state is not None and state.signature == signature:
            return None, signature
        if not stat.S_ISREG(st.st_mode):
            raise _Unusable("not a regular file", "not_regular")
        if st.st_size > self.max_file_size:
            raise _Unusable(f"too large ({st.st_size} bytes > {self.max_file_size})", "too_large")
        # The path may have become a FIFO or a symlink since the stat: read_regular
        # neither hangs nor follows.
        self.reads += 1
        return read_regular(real, self.max_file_size), signature

    def _reject_file(self, name: str, state: _FileState, err: _Unusable) -> None:
        failure = (err.reason, state.digest, state.signature)
        if failure == state.failure:
            return
        state.failure = failure
        kept = f"keeping its last good content ({len(state.objects)} objects)" if state.objects else "skipped"
        log.error("manifests %s: %s; %s", _printable(name), err.reason, kept,
                  extra=log_event(reason=err.reason))
        metrics.REJECTED_OBJECTS.labels(source=_SOURCE, kind="file", reason=err.category).inc()
        if self.report is not None:
            self.report(Finding(name, "the file", f"{err.reason}; {kept}", err.category, True))
        rejections.record(_SOURCE, "file", _printable(name), f"{err.reason}; {kept}")

    def _convert_all(
        self,
        name: str,
        items: Iterable[tuple[Any, bytes]],
        previous: dict[ObjKey, Any],
        known: dict[bytes, tuple[ObjKey | None, Any]] | None = None,
    ) -> tuple[dict[ObjKey, Any], dict[bytes, tuple[ObjKey | None, Any]]]:
        """(objects by key, digest memory) of one file's (raw object, digest) pairs.

        An object whose digest was seen at the previous read is not converted
        again: its earlier outcome is reused (and an invalid one, or what it
        holds that is not served, is not logged again). ``known`` is updated
        in place, and only for objects that changed: a re-read of a big file
        then leaves no new long-lived small objects scattered among the freed
        raw ones, which would pin the allocator's arenas (measured: +100 MB
        RSS per re-read of 13.5 MB).
        """
        known = {} if known is None else known
        objects: dict[ObjKey, Any] = {}
        seen: set[bytes] = set()
        added: list[bytes] = []
        other_kinds: dict[str, list[str]] = {}
        try:
            for index, (raw, digest) in enumerate(items):
                hit = known.get(digest)
                if hit is None:
                    hit = self._convert_one(name, index, raw, other_kinds)
                    known[digest] = hit
                    added.append(digest)
                del raw
                seen.add(digest)
                key, value = hit
                if key is None or value is _IGNORED:
                    continue
                if value is _INVALID:
                    # The last good version stays; else None: defined, but nothing to serve.
                    objects[key] = previous.get(key)
                    continue
                objects[key] = value
        except BaseException:
            for digest in added:
                known.pop(digest, None)
            raise
        if len(seen) != len(known):
            for digest in [d for d in known if d not in seen]:
                del known[digest]
        # One line per kind, not per object: `kubectl get all -o yaml` holds hundreds of Pods.
        for kind_name, names in other_kinds.items():
            if len(names) == 1:
                what, verb = f"{kind_name} {names[0]}", "is"
            else:
                more = ", …" if len(names) > 3 else ""
                what, verb = f"{len(names)} {kind_name} objects ({', '.join(names[:3])}{more})", "are"
            self._report(name, _printable(what), f"{verb} ignored: a kind proxyd does not use",
                         "unsupported_kind", kind="other", refused=False, level=logging.INFO,
                         count=len(names))
        return objects, known

    def _convert_one(self, name: str, index: int, raw: Any,
                     other_kinds: dict[str, list[str]]) -> tuple[ObjKey | None, Any]:
        """(key, value) of an object not seen before, reported; other kinds go to ``other_kinds``."""
        if not isinstance(raw, dict):
            self._reject_object(name, index, "object", "not a Kubernetes object")
            return None, _IGNORED
        api_version, kind = raw.get("apiVersion"), raw.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str):
            self._report(name, f"object #{index + 1}", "is ignored: no apiVersion and kind, not a "
                         "Kubernetes object", "no_kind", kind="unknown", refused=False,
                         level=logging.WARNING)
            return None, _IGNORED
        our_kind = _KINDS.get((api_version, kind))
        if our_kind is None:
            key = _identity(kind, raw)
            other_kinds.setdefault(f"{api_version} {kind}", []).append(
                f"{key[1]}/{key[2]}" if key else f"#{index + 1}")
            return None, _IGNORED
        _events(our_kind).inc()
        notes: list[Note] = []
        try:
            key, value = _convert(our_kind, raw, notes)
            if isinstance(value, ServiceSpec) and (why := self.allocator.missing(value)) is not None:
                raise _Refused(why, "no_cluster_ip")
        except InvalidObject as err:
            ident = _identity(our_kind, raw)
            what = f"{our_kind} {ident[1]}/{ident[2]}" if ident and ident[1] else f"{our_kind} #{index + 1}"
            category = err.category if isinstance(err, _Refused) else "invalid"
            self._reject_object(name, index, _printable(what), err.reason, kind=our_kind, category=category)
            return ident, _INVALID
        what = _printable(f"{our_kind} {key[1]}/{key[2]}" if key[1] else f"{our_kind} {key[2]}")
        for note in notes:
            level = logging.WARNING if note.refused else logging.INFO
            self._report(name, what, f"{note.path}: {note.reason}", note.category, kind=our_kind,
                         refused=note.refused, level=level)
        return key, value

    def _reject_object(self, name: str, index: int, what: str, reason: str, *, kind: str = "unknown",
                       category: str = "invalid") -> None:
        verb = "is invalid, skipped" if category == "invalid" else "is refused"
        self._report(name, what, f"{verb}: {reason}", category, kind=kind, refused=True, level=logging.ERROR)

    def _report(self, name: str, what: str, reason: str, category: str, *, kind: str, refused: bool,
                level: int, count: int = 1) -> None:
        """One log line and one count for something not served; the ``report`` callback gets it too.

        ``reason`` reads after the object: "is refused: …", "is ignored: …" or "spec.x: …".
        """
        log.log(level, "manifests %s: %s %s", _printable(name), what, _printable(reason),
                extra=log_event(service=what, reason=_printable(reason)))
        counter = metrics.REJECTED_OBJECTS if refused else metrics.IGNORED_OBJECTS
        counter.labels(source=_SOURCE, kind=kind, reason=category).inc(count)
        if refused:
            rejections.record(_SOURCE, kind, f"{what.removeprefix(kind + ' ')} (in {_printable(name)})",
                              _printable(reason))
        if self.report is not None:
            self.report(Finding(name, what, reason, category, refused))

    # ------------------------------------------------------------ merge (loop side)

    def _commit(self, changes: list[_Change]) -> bool:
        """Fold changed files into the merged view; hand what changed to the tracker."""
        touched: set[ObjKey] = set()
        for name, old, new in changes:
            for key in old.keys() - new.keys():
                owners = self._owners[key]
                owners.remove(name)
                if not owners:
                    del self._owners[key]
                touched.add(key)
            for key, value in new.items():
                if key not in old:
                    owners = self._owners.setdefault(key, [])
                    owners.append(name)
                    owners.sort()
                    touched.add(key)
                elif old[key] is not value:
                    touched.add(key)
        changed = False
        mirrors: set[ServiceName] = set()
        specs: set[ServiceName] = set()  # Services whose merged spec changed
        affected: set[ServiceName] = set()  # services whose endpoints' match may have changed
        for key in sorted(touched):
            winners = self._owners.get(key)
            self._note_duplicates(key, winners)
            value = self._files[winners[-1]].objects[key] if winners else None
            previous = self._applied.get(key)
            kind, namespace, name = key
            if kind in ("Service", "Endpoints"):
                affected.add(ServiceName(namespace, name))  # its file may be another now
            elif kind == "EndpointSlice":
                affected.update(sl.service_name for sl in (previous, value) if sl is not None)
            if value is previous or value == previous:
                continue
            if value is None:
                del self._applied[key]
            else:
                self._applied[key] = value
            changed |= self._push(key, previous, value, mirrors, specs)
        for service in sorted(mirrors, key=_by_name):
            changed |= self._apply_mirror(service)
        affected |= mirrors
        if specs:
            changed |= self._serve(specs, affected)
        if affected:
            self._report_unmatched(affected)
        return changed

    def _note_duplicates(self, key: ObjKey, owners: list[str] | None) -> None:
        if (owners is None or len(owners) == 1) and key not in self._duplicates:
            return  # defined once, and was: the usual case, 20,000 times in a first read
        pairs = {(owners[i], owners[i + 1]) for i in range(len(owners) - 1)} if owners else set()
        before = self._duplicates.get(key, set())
        for loser, winner in sorted(pairs - before):
            log.warning("manifests: %s %s/%s is defined in %s and %s; using %s", key[0], key[1], key[2],
                        _printable(loser), _printable(winner), _printable(winner))
            if self.report is not None:
                self.report(Finding(loser, f"{key[0]} {key[1]}/{key[2]}", f"is ignored: also defined in "
                                    f"{_printable(winner)}, which wins", "duplicate", False))
        if pairs:
            self._duplicates[key] = pairs
        else:
            self._duplicates.pop(key, None)

    def _push(self, key: ObjKey, previous: Any, value: Any, mirrors: set[ServiceName],
              specs: set[ServiceName]) -> bool:
        kind, namespace, name = key
        if kind == "Service":
            # Served after allocation, which looks at every Service (_serve).
            service = ServiceName(namespace, name)
            if value is None:
                self._specs.pop(service, None)
            else:
                self._specs[service] = value
            specs.add(service)
            return False
        if kind == "EndpointSlice":
            for sl, step in ((previous, -1), (value, 1)):
                if sl is not None and not is_mirror(sl):
                    owner = sl.service_name
                    count = self._real_slices.get(owner, 0) + step
                    if count:
                        self._real_slices[owner] = count
                    else:
                        self._real_slices.pop(owner, None)
                    mirrors.add(owner)
            return self._set_slice((namespace, name), previous, value)
        if kind == "Endpoints":
            owner = ServiceName(namespace, name)
            if value:
                self._mirror_wanted[owner] = value
            else:
                self._mirror_wanted.pop(owner, None)
            mirrors.add(owner)
            return False
        node_name = getattr(self.tracker, "node_name", None)
        if name != node_name:
            return False
        labels = dict(value) if value else {}
        if labels == self._node_labels:
            return False
        self._node_labels = labels
        return self.tracker.set_node_labels(labels)

    def _set_slice(self, key: tuple[str, str], previous: EndpointSlice | None,
                   value: EndpointSlice | None) -> bool:
        """One slice to the tracker, and into the per-service index of what it holds."""
        if previous is not None:
            held = self._endpoints_of.get(previous.service_name)
            if held is not None:
                held.pop(key, None)
                if not held:
                    del self._endpoints_of[previous.service_name]
        if value is not None:
            self._endpoints_of.setdefault(value.service_name, {})[key] = value
        return self.tracker.update_slice(key, value)

    def _apply_mirror(self, service: ServiceName) -> bool:
        """Endpoints only stand in for slices: a service with real slices gets no mirrored ones."""
        wanted = () if self._real_slices.get(service) else self._mirror_wanted.get(service, ())
        applied = self._mirror_applied.get(service, {})
        new = {sl.key: sl for sl in wanted}
        changed = False
        for key in [k for k in applied if k not in new]:
            changed |= self._set_slice(key, applied[key], None)
        for key, sl in new.items():
            if applied.get(key) != sl:
                changed |= self._set_slice(key, applied.get(key), sl)
        if new:
            self._mirror_applied[service] = new
        else:
            self._mirror_applied.pop(service, None)
        return changed

    def _serve(self, specs: set[ServiceName], affected: set[ServiceName]) -> bool:
        """Allocate after Service specs changed; hand the tracker the Services whose outcome changed.

        ``Allocator.update`` looks at every merged spec when allocation is
        involved (it is a function of the whole directory) but returns only
        what differs, so an unrelated Service is never handed over again.
        """
        outcome = self.allocator.update(self._specs, specs)
        changed = False
        for service in sorted(outcome, key=_by_name):
            changed |= self.tracker.update_service(service, outcome[service])
        affected.update(outcome)
        self._report_allocation()
        return changed

    def _file_of(self, key: ObjKey) -> str:
        owners = self._owners.get(key)
        return owners[-1] if owners else "?"

    def _report_unmatched(self, services: set[ServiceName]) -> None:
        """Endpoints that reach no service port, the likeliest mistake in hand-written manifests.

        A slice (or Endpoints object) naming a Service the directory does not
        define serves nothing; a service port whose name no slice of its
        service carries gets no endpoints (kubectl names ports "80-8080").
        Each is logged once (a warning) and counted as ignored. Looked at for
        the ``services`` a change touched only.
        """
        for service in sorted(services, key=_by_name):
            found: set[tuple[str, str, str, str]] = set()
            held = self._endpoints_of.get(service, {})
            have: set[tuple[str, Any]] = set()
            defined = ("Service", service.namespace, service.name) in self._owners
            for sl in held.values():
                kind, name = ("Endpoints", sl.service) if is_mirror(sl) else ("EndpointSlice", sl.name)
                key = (kind, sl.namespace, name)
                have.update((p.name, p.protocol) for p in sl.ports)
                if not defined and key in self._owners:
                    reason = f"is ignored: no Service {sl.service_name} in the directory"
                    found.add((self._file_of(key), f"{kind} {sl.namespace}/{name}", reason, "no_service"))
            svc: Service | None = self.allocator.served(service)
            if have and svc is not None:
                file = self._file_of(("Service", service.namespace, service.name))
                for port in svc.ports:
                    if (port.name.port, port.protocol) not in have:
                        names = ", ".join(sorted(f"{n or '(unnamed)'}/{p}" for n, p in have))
                        shown = port.name.port or "(unnamed)"
                        reason = (f"port {shown}/{port.protocol}: no endpoint port of that name in its "
                                  f"EndpointSlices/Endpoints ({names}), so it has no endpoints")
                        found.add((file, f"Service {svc.name}", reason, "port_name_mismatch"))
            before = self._unmatched.get(service, set())
            for file, what, reason, category in sorted(found - before):
                self._report(file, _printable(what), reason, category, kind="unmatched", refused=False,
                             level=logging.WARNING)
            if found:
                self._unmatched[service] = found
            else:
                self._unmatched.pop(service, None)

    def _report_allocation(self) -> None:
        """Log what allocation assigned and what it could not, once each until it changes."""
        last = self.allocator.last
        if not last.failures and not last.assigned and not self._allocation_notes:
            return
        lines: set[tuple[str, str]] = set()
        for svc, why in last.failures.items():
            lines.add((self._file_of(("Service", svc.namespace, svc.name)), f"Service {svc}|{why}"))
        for svc, got in last.assigned.items():
            parts = [f"clusterIP{'s' if len(got.cluster_ips) > 1 else ''} {', '.join(got.cluster_ips)}"
                     ] if got.cluster_ips else []
            parts += [f"nodePort {port} for port {name or '(unnamed)'}/{proto}"
                      for name, proto, port in got.node_ports]
            if got.health_check_node_port:
                parts.append(f"healthCheckNodePort {got.health_check_node_port}")
            file = self._file_of(("Service", svc.namespace, svc.name))
            lines.add((file, f"Service {svc}|+allocated " + ", ".join(parts)))
        new = sorted(lines - self._allocation_notes)
        shown = 0
        for file, line in new:
            what, _, text = line.partition("|")
            if text.startswith("+"):
                shown += 1
                if shown <= MAX_ALLOCATION_LINES:
                    log.info("manifests %s: %s: %s", _printable(file), what, text[1:])
            else:
                self._report(file, _printable(what), f"is refused: {text}", "range_full", kind="Service",
                             refused=True, level=logging.ERROR)
        if shown > MAX_ALLOCATION_LINES:
            log.info("manifests: %d more allocations not logged one by one (proxyd check DIR lists all)",
                     shown - MAX_ALLOCATION_LINES)
        self._allocation_notes = lines


def _reread(data: bytes, known: Container[bytes]) -> list[tuple[Any, bytes]] | None:
    """(object or None when known, digest) of a ``kind: List`` with at most ``REREAD_NEW_ITEMS`` new items.

    JSON by ``_json_list_spans``, block-style YAML by ``yamlstream.split_list``:
    the items are found and digested without building them, and only the new
    ones are built, so the daemon's heap sees what changed, not the file.
    None for anything else (the child parses it).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    if not _json_fast_path(text, len(data)):
        return yamlstream.split_list(text, LIMITS, known, REREAD_NEW_ITEMS)
    spans = _json_list_spans(text)
    if spans is None or len(spans) > LIMITS.max_items:
        return None
    if sum(1 for _, digest in spans if digest not in known) > REREAD_NEW_ITEMS:
        return None
    return list(_json_span_items(text, spans, known))


def _from_child(data: bytes, *, is_json: bool, known: dict[bytes, Any]) -> Iterator[tuple[Any, bytes]]:
    """``iter_objects`` run in a child process: only objects whose digest is not ``known`` come back."""
    try:
        yield from parsechild.parse(data, is_json=is_json, known=known)
    except parsechild.ChildFailed as err:
        raise _Unusable(err.reason, err.category) from None


def _trim_heap() -> None:
    """Give the C heap's free pages back after a big file was read (``proxyd.heap``).

    Reading runs in a worker thread, whose glibc arena keeps what a 13.5 MB
    parse freed (its mmap threshold grows with every big free), so RSS would
    climb with each re-read of a big file.
    """
    heap.trim()



def _candidate(name: str) -> bool:
    """A name the source reads: a manifest suffix, not a dot file (editors' lock and swap files)."""
    return name.endswith(SUFFIXES) and not name.startswith(".")
