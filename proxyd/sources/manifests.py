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
directory with this very class and prints those. An object that is invalid
or refused and has no earlier good version is kept as "defined, nothing to
serve" (like a headless service): it still wins a name clash as the file
that sorts last, and its endpoints are not reported as orphans.

Change detection is inotify (through ctypes: no extra dependency) on the
directory, with a 100 ms debounce and a slow safety rescan, or polling of
stat signatures every 0.5 s where inotify is unavailable. Either way, a scan
only re-reads files whose stat signature changed and only re-parses files
whose bytes changed, so unchanged services are never disturbed; the merged
full set then goes to ``tracker.replace_all``, which records only real
differences. Scans (listing, reading, YAML parsing) run in a worker thread so
the event loop never blocks on a big file.

Files are read and YAML is loaded through ``safeio`` (regular files only,
bounded size; no aliases, bounded nesting, libyaml's safe loader).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import gc
import hashlib
import json
import logging
import os
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from proxyd import metrics, rejections
from proxyd.logformat import event as log_event
from proxyd.model import EndpointSlice, Service, ServiceName
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
from proxyd.sources.safeio import UnsafeInput, load_yaml, read_regular

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_SIZE = 16 * 1024 * 1024
POLL_INTERVAL = 0.5
DEBOUNCE = 0.1
# With inotify, still look every few seconds: a symlinked file whose target
# changes in place elsewhere produces no event in the directory.
SAFETY_RESCAN = 5.0
# A directory of thousands of kubectl-made services logs a summary, not a line each.
MAX_ALLOCATION_LINES = 50

_SOURCE = "manifests"

# (kind, namespace, name); Node objects use namespace "".
ObjKey = tuple[str, str, str]

_KINDS = {
    ("v1", "Service"): "Service",
    ("discovery.k8s.io/v1", "EndpointSlice"): "EndpointSlice",
    ("v1", "Endpoints"): "Endpoints",
    ("v1", "Node"): "Node",
}


class TrackerLike(Protocol):
    node_name: str

    def replace_all(self, services: Any, slices: Any) -> bool: ...

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


@dataclass
class _FileState:
    signature: tuple[Any, ...] | None = None
    digest: bytes | None = None
    failure: tuple[Any, ...] | None = None  # the last file-level failure logged, to log it once
    objects: dict[ObjKey, Any] = field(default_factory=dict)


def _printable(text: str, limit: int = 300) -> str:
    """Text safe for one log line: non-printable characters escaped, length bounded."""
    if not text.isprintable():
        text = ascii(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "…"


# ---------------------------------------------------------------- parsing


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building a big, acyclic object tree.

    Building a kubectl dump's objects triggers collection after collection
    over an ever larger heap: a 3 MB YAML file takes 5.5 s with the GC on and
    1.7 s with it paused. Nothing built here is cyclic, so nothing is lost.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_documents(data: bytes, *, is_json: bool) -> list[Any]:
    """The decoded documents of one file; ``_Unusable`` when it does not parse."""
    try:
        text = data.decode("utf-8-sig")
        if is_json:
            return [json.loads(text)]
        with _gc_paused():
            return load_yaml(text)
    except _Unusable:
        raise
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        raise _Unusable(f"does not parse: {where}{_printable(str(err.problem or err))}", "parse") from None
    except json.JSONDecodeError as err:
        raise _Unusable(f"does not parse: line {err.lineno} column {err.colno}: {err.msg}", "parse") from None
    except UnicodeDecodeError:
        raise _Unusable("does not parse: not UTF-8 text", "parse") from None
    except RecursionError:
        raise _Unusable("does not parse: nested too deeply", "parse") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as err:
        raise _Unusable(f"does not parse: {_printable(str(err))}", "parse") from None


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
            | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
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

    def drain(self) -> bool:
        """Read all queued events; True when the watch is gone (directory deleted or moved)."""
        lost = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return lost
            except OSError:
                return True
            if not data:
                return lost
            offset = 0
            while offset + self._HEADER.size <= len(data):
                _wd, mask, _cookie, length = self._HEADER.unpack_from(data, offset)
                if mask & (self.IN_IGNORED | self.IN_DELETE_SELF | self.IN_MOVE_SELF):
                    lost = True
                offset += self._HEADER.size + length

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


# ---------------------------------------------------------------- the source


class ManifestSource:
    """Feeds the tracker from a manifests directory; ``ready`` is set after the first full read."""

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
        self.watching = False  # True while inotify (not polling) detects changes
        self.scans = 0  # completed scans, for tests and debugging
        self._files: dict[str, _FileState] = {}
        self._dir_error: str | None = None
        self._duplicates: set[tuple[ObjKey, str, str]] = set()
        self._node_labels: dict[str, str] | None = None
        # Node ports are allocated from the default range even without flags,
        # as kube-apiserver does; cluster IPs only with a range.
        self.allocator = allocator if allocator is not None else Allocator(Ranges())
        self.report = report
        self._allocation_notes: set[tuple[str, str]] = set()
        self._unmatched: set[tuple[str, str, str, str]] = set()
        self._wake = asyncio.Event()
        self._watch_lost = False

    # ------------------------------------------------------------ loop side

    async def run(self) -> None:
        if not self._directory_exists():
            raise ManifestError(f"--manifests {_printable(self.directory)}: not a directory")
        watcher = self._start_watcher()
        try:
            await self._apply(initial=True)
            self.ready.set()
            while True:
                if watcher is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.rescan_interval)
                        # Coalesce the burst an editor or `kubectl ... > file` makes.
                        await asyncio.sleep(DEBOUNCE)
                    self._wake.clear()
                    if self._watch_lost:
                        # The directory was deleted or moved: poll until it is back.
                        self._stop_watcher(watcher)
                        watcher = None
                else:
                    await asyncio.sleep(self.poll_interval)
                    if self.use_inotify and self._directory_exists():
                        watcher = self._start_watcher()
                await self._apply(initial=False)
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
        if watcher.drain():
            self._watch_lost = True
        self._wake.set()

    async def _apply(self, *, initial: bool) -> None:
        result = await asyncio.to_thread(self._scan)
        self.scans += 1
        if result is None and not initial:
            return
        services, slices, labels = result if result is not None else self._merge()
        changed = self.tracker.replace_all(services, slices)
        if labels != self._node_labels:
            changed = self.tracker.set_node_labels(labels) or changed
            self._node_labels = labels
        metrics.SOURCE_LAST_EVENT_TIMESTAMP.set(time.time())
        # The first read is followed by the daemon's first sync anyway.
        if changed and not initial:
            self.on_change()

    # ------------------------------------------------------------ worker thread side

    def _scan(self) -> tuple[list[Service], list[EndpointSlice], dict[str, str]] | None:
        """Re-read what changed; the merged content when any file's objects changed, else None."""
        try:
            names = sorted(n for n in os.listdir(self.directory)
                           if n.endswith(SUFFIXES) and not n.startswith("."))
            real_dir = os.path.realpath(self.directory, strict=True)
        except OSError as err:
            reason = err.strerror or str(err)
            if reason != self._dir_error:
                log.error("manifests %s: cannot list the directory (%s); keeping the current content",
                          _printable(self.directory), reason)
                self._dir_error = reason
            return None
        self._dir_error = None
        changed = False
        for gone in [n for n in self._files if n not in names]:
            changed |= bool(self._files.pop(gone).objects)
        for name in names:
            changed |= self._refresh(name, real_dir)
        return self._merge() if changed else None

    def _refresh(self, name: str, real_dir: str) -> bool:
        """Bring one file's state up to date; True when its objects changed."""
        path = os.path.join(self.directory, name)
        state = self._files.get(name)
        try:
            data, signature = self._read(path, real_dir, state)
        except FileNotFoundError:
            # Gone between listing and reading, or a dangling symlink: deleted.
            if state is not None:
                del self._files[name]
                return bool(state.objects)
            return False
        except _Unusable as err:
            if state is None:
                state = self._files[name] = _FileState()
            self._reject_file(name, state, err)
            return False
        if state is None:
            state = self._files[name] = _FileState()
        if data is None:
            return False  # same stat signature: unchanged
        state.signature = signature
        state.failure = None
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest == state.digest:
            return False
        state.digest = digest
        try:
            docs = parse_documents(data, is_json=name.endswith(".json"))
        except _Unusable as err:
            self._reject_file(name, state, err)
            return False
        objects = self._convert_all(name, docs, state.objects)
        if objects == state.objects:
            return False
        state.objects = objects
        return True

    def _read(self, path: str, real_dir: str,
              state: _FileState | None) -> tuple[bytes | None, tuple[Any, ...]]:
        """(bytes or None when the stat signature is unchanged, signature)."""
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
        signature = (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
        if state is not None and state.signature == signature:
            return None, signature
        if not stat.S_ISREG(st.st_mode):
            raise _Unusable("not a regular file", "not_regular")
        if st.st_size > self.max_file_size:
            raise _Unusable(f"too large ({st.st_size} bytes > {self.max_file_size})", "too_large")
        # The path may have become a FIFO or a symlink since the stat: read_regular
        # neither hangs nor follows.
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

    def _convert_all(self, name: str, docs: list[Any], previous: dict[ObjKey, Any]) -> dict[ObjKey, Any]:
        objects: dict[ObjKey, Any] = {}
        other_kinds: dict[str, list[str]] = {}
        for index, raw in enumerate(_objects(docs)):
            if not isinstance(raw, dict):
                self._reject_object(name, index, "object", "not a Kubernetes object")
                continue
            api_version, kind = raw.get("apiVersion"), raw.get("kind")
            if not isinstance(api_version, str) or not isinstance(kind, str):
                self._report(name, f"object #{index + 1}", "is ignored: no apiVersion and kind, not a "
                             "Kubernetes object", "no_kind", kind="unknown", refused=False,
                             level=logging.WARNING)
                continue
            our_kind = _KINDS.get((api_version, kind))
            if our_kind is None:
                key = _identity(kind, raw)
                other_kinds.setdefault(f"{api_version} {kind}", []).append(
                    f"{key[1]}/{key[2]}" if key else f"#{index + 1}")
                continue
            metrics.SOURCE_EVENTS.labels(source=_SOURCE, kind=our_kind).inc()
            notes: list[Note] = []
            try:
                key, value = _convert(our_kind, raw, notes)
                if isinstance(value, ServiceSpec) and (why := self.allocator.missing(value)) is not None:
                    raise _Refused(why, "no_cluster_ip")
            except InvalidObject as err:
                key = _identity(our_kind, raw)
                what = f"{our_kind} {key[1]}/{key[2]}" if key and key[1] else f"{our_kind} #{index + 1}"
                category = err.category if isinstance(err, _Refused) else "invalid"
                self._reject_object(name, index, _printable(what), err.reason, kind=our_kind,
                                    category=category)
                if key is not None:
                    # The last good version stays; else None: defined, but nothing to serve.
                    objects[key] = previous.get(key)
                continue
            what = _printable(f"{our_kind} {key[1]}/{key[2]}" if key[1] else f"{our_kind} {key[2]}")
            for note in notes:
                level = logging.WARNING if note.refused else logging.INFO
                self._report(name, what, f"{note.path}: {note.reason}", note.category, kind=our_kind,
                             refused=note.refused, level=level)
            objects[key] = value
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
        return objects

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

    def _merge(self) -> tuple[list[Service], list[EndpointSlice], dict[str, str]]:
        """Every file's objects merged; the file that sorts last wins a name clash."""
        merged: dict[ObjKey, tuple[str, Any]] = {}
        duplicates: set[tuple[ObjKey, str, str]] = set()
        for name in sorted(self._files):
            for key, value in self._files[name].objects.items():
                earlier = merged.get(key)
                if earlier is not None:
                    duplicates.add((key, earlier[0], name))
                merged[key] = (name, value)
        for key, loser, winner in sorted(duplicates - self._duplicates):
            log.warning("manifests: %s %s/%s is defined in %s and %s; using %s", key[0], key[1], key[2],
                        _printable(loser), _printable(winner), _printable(winner))
            if self.report is not None:
                self.report(Finding(loser, f"{key[0]} {key[1]}/{key[2]}", f"is ignored: also defined in "
                                    f"{_printable(winner)}, which wins", "duplicate", False))
        self._duplicates = duplicates

        specs: list[ServiceSpec] = []
        slices: list[EndpointSlice] = []
        mirrored: list[EndpointSlice] = []
        labels: dict[str, str] = {}
        node_name = getattr(self.tracker, "node_name", None)
        for (kind, _ns, obj_name), (_file, value) in merged.items():
            if value is None:
                continue
            if kind == "Service":
                specs.append(value)
            elif kind == "EndpointSlice":
                slices.append(value)
            elif kind == "Endpoints":
                mirrored.extend(value)
            elif kind == "Node" and obj_name == node_name:
                labels = dict(value)
        # Endpoints only stand in for slices: a service that has real slices
        # (kubectl output often holds both) must not get its endpoints twice.
        with_slices = {s.service_name for s in slices if not is_mirror(s)}
        slices.extend(s for s in mirrored if s.service_name not in with_slices)
        services = self.allocator.services(specs)
        self._report_allocation(merged)
        self._report_unmatched(merged, services, slices)
        return services, slices, labels

    def _report_unmatched(self, merged: dict[ObjKey, tuple[str, Any]], services: list[Service],
                          slices: list[EndpointSlice]) -> None:
        """Endpoints that reach no service port, the likeliest mistake in hand-written manifests.

        A slice (or Endpoints object) naming a Service the directory does not
        define serves nothing; a service port whose name no slice of its
        service carries gets no endpoints (kubectl names ports "80-8080").
        Each is logged once (a warning) and counted as ignored.
        """
        found: set[tuple[str, str, str, str]] = set()
        ports: dict[ServiceName, set[tuple[str, str]]] = {}
        for sl in slices:
            kind, name = ("Endpoints", sl.service) if is_mirror(sl) else ("EndpointSlice", sl.name)
            key = (kind, sl.namespace, name)
            ports.setdefault(sl.service_name, set()).update((p.name, p.protocol) for p in sl.ports)
            if ("Service", sl.namespace, sl.service) not in merged and key in merged:
                reason = f"is ignored: no Service {sl.service_name} in the directory"
                found.add((merged[key][0], f"{kind} {sl.namespace}/{name}", reason, "no_service"))
        for svc in services:
            have = ports.get(svc.name)
            if not have:
                continue
            file = merged[("Service", svc.name.namespace, svc.name.name)][0]
            for port in svc.ports:
                if (port.name.port, port.protocol) not in have:
                    names = ", ".join(sorted(f"{n or '(unnamed)'}/{p}" for n, p in have))
                    shown = port.name.port or "(unnamed)"
                    reason = (f"port {shown}/{port.protocol}: no endpoint port of that name in its "
                              f"EndpointSlices/Endpoints ({names}), so it has no endpoints")
                    found.add((file, f"Service {svc.name}", reason, "port_name_mismatch"))
        for file, what, reason, category in sorted(found - self._unmatched):
            self._report(file, _printable(what), reason, category, kind="unmatched", refused=False,
                         level=logging.WARNING)
        self._unmatched = found

    def _report_allocation(self, merged: dict[ObjKey, tuple[str, Any]]) -> None:
        """Log what allocation assigned and what it could not, once each until it changes."""
        last = self.allocator.last
        lines: set[tuple[str, str]] = set()
        for svc, why in last.failures.items():
            lines.add((merged[("Service", svc.namespace, svc.name)][0], f"Service {svc}|{why}"))
        for svc, got in last.assigned.items():
            parts = [f"clusterIP {got.cluster_ip}"] if got.cluster_ip else []
            parts += [f"nodePort {port} for port {name or '(unnamed)'}/{proto}"
                      for name, proto, port in got.node_ports]
            if got.health_check_node_port:
                parts.append(f"healthCheckNodePort {got.health_check_node_port}")
            file = merged[("Service", svc.namespace, svc.name)][0]
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
