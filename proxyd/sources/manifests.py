"""Standalone source: a directory of Kubernetes manifests, re-read on change (SPEC §2).

Every ``*.yaml``, ``*.yml`` and ``*.json`` file directly in the directory is
read (dot files are skipped: editors' lock and swap files). A file may hold
several YAML documents and ``kind: List`` objects, so the output of
``kubectl get svc,endpointslices -A -o yaml`` works as is. Service,
EndpointSlice, Endpoints (mirrored into slices) and this node's Node object
are used; other kinds are ignored silently.

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
* A vanished file (or a dangling symlink) is a deletion: its objects go.
* The directory itself failing to list keeps everything as it was.

Change detection is inotify (through ctypes: no extra dependency) on the
directory, with a 100 ms debounce and a slow safety rescan, or polling of
stat signatures every 0.5 s where inotify is unavailable. Either way, a scan
only re-reads files whose stat signature changed and only re-parses files
whose bytes changed, so unchanged services are never disturbed; the merged
full set then goes to ``tracker.replace_all``, which records only real
differences. Scans (listing, reading, YAML parsing) run in a worker thread so
the event loop never blocks on a big file.

YAML is loaded with the libyaml safe loader when available. Two guards run
first on the event stream, because libyaml's composer recurses in C (a
document nested 100k deep crashes the process) and aliases can expand
exponentially: documents deeper than ``MAX_DEPTH`` or using aliases are
refused.
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
from proxyd.model import EndpointSlice, Service
from proxyd.sources.convert import (
    InvalidObject,
    is_mirror,
    node_labels_from_dict,
    service_from_dict,
    slice_from_dict,
    slices_from_endpoints,
)

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_SIZE = 16 * 1024 * 1024
MAX_DEPTH = 100  # Kubernetes objects nest ~15 deep; libyaml crashes at ~100k
POLL_INTERVAL = 0.5
DEBOUNCE = 0.1
# With inotify, still look every few seconds: a symlinked file whose target
# changes in place elsewhere produces no event in the directory.
SAFETY_RESCAN = 5.0

_SOURCE = "manifests"
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

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


class _Unusable(Exception):
    """A file that cannot be read or parsed; ``category`` is the metric's reason label."""

    def __init__(self, reason: str, category: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.category = category


@dataclass
class _FileState:
    signature: tuple | None = None
    digest: bytes | None = None
    failure: tuple | None = None  # the last file-level failure logged, to log it once
    objects: dict[ObjKey, Any] = field(default_factory=dict)


def _printable(text: str, limit: int = 300) -> str:
    """Text safe for one log line: non-printable characters escaped, length bounded."""
    if not text.isprintable():
        text = ascii(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "…"


# ---------------------------------------------------------------- parsing


def _check_yaml_stream(text: str) -> None:
    """Refuse aliases and deep nesting before libyaml composes anything."""
    depth = 0
    starts = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
    ends = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, starts):
            depth += 1
            if depth > MAX_DEPTH:
                raise _Unusable(f"does not parse: nested deeper than {MAX_DEPTH} levels", "parse")
        elif isinstance(event, ends):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            raise _Unusable("does not parse: YAML aliases are not allowed", "parse")


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
        _check_yaml_stream(text)
        with _gc_paused():
            return list(yaml.load_all(text, Loader=_Loader))
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


def _identity(kind: str, raw: dict) -> ObjKey | None:
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


def _convert(kind: str, raw: dict) -> tuple[ObjKey, Any]:
    """(key, model value) of one object; InvalidObject when it is invalid."""
    if kind == "Service":
        svc = service_from_dict(raw)
        if svc is not None:
            return (kind, svc.name.namespace, svc.name.name), svc
        key = _identity(kind, raw)
        if key is None:
            raise InvalidObject("metadata: missing name")
        return key, None  # defined but ignored (headless, ExternalName, …)
    if kind == "EndpointSlice":
        sl = slice_from_dict(raw)
        if sl is not None:
            return (kind, sl.namespace, sl.name), sl
        key = _identity(kind, raw)
        if key is None:
            raise InvalidObject("metadata: missing name")
        return key, None
    if kind == "Endpoints":
        mirrored = tuple(slices_from_endpoints(raw))
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

    def _read(self, path: str, real_dir: str, state: _FileState | None) -> tuple[bytes | None, tuple]:
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
        # O_NONBLOCK: should the path have become a FIFO since the stat, open
        # must not hang; O_NOFOLLOW: nor may it have become a symlink.
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise _Unusable(f"cannot open ({err.strerror})", "unreadable") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _Unusable("not a regular file", "not_regular")
            chunks = []
            total = 0
            while total <= self.max_file_size:
                chunk = os.read(fd, min(1 << 20, self.max_file_size + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except OSError as err:
            raise _Unusable(f"cannot read ({err.strerror})", "unreadable") from None
        finally:
            os.close(fd)
        if total > self.max_file_size:
            raise _Unusable(f"too large (more than {self.max_file_size} bytes)", "too_large")
        return b"".join(chunks), signature

    def _reject_file(self, name: str, state: _FileState, err: _Unusable) -> None:
        failure = (err.reason, state.digest, state.signature)
        if failure == state.failure:
            return
        state.failure = failure
        kept = f"keeping its last good content ({len(state.objects)} objects)" if state.objects else "skipped"
        log.error("manifests %s: %s; %s", _printable(name), err.reason, kept,
                  extra=log_event(reason=err.reason))
        metrics.REJECTED_OBJECTS.labels(source=_SOURCE, kind="file", reason=err.category).inc()
        rejections.record(_SOURCE, "file", _printable(name), f"{err.reason}; {kept}")

    def _convert_all(self, name: str, docs: list[Any], previous: dict[ObjKey, Any]) -> dict[ObjKey, Any]:
        objects: dict[ObjKey, Any] = {}
        for index, raw in enumerate(_objects(docs)):
            if not isinstance(raw, dict):
                self._reject_object(name, index, "object", "not a Kubernetes object")
                continue
            api_version, kind = raw.get("apiVersion"), raw.get("kind")
            if not isinstance(api_version, str) or not isinstance(kind, str):
                continue
            our_kind = _KINDS.get((api_version, kind))
            if our_kind is None:
                continue  # another kind: ignored silently
            metrics.SOURCE_EVENTS.labels(source=_SOURCE, kind=our_kind).inc()
            try:
                key, value = _convert(our_kind, raw)
            except InvalidObject as err:
                key = _identity(our_kind, raw)
                what = f"{our_kind} {key[1]}/{key[2]}" if key and key[1] else f"{our_kind} #{index + 1}"
                self._reject_object(name, index, _printable(what), err.reason, kind=our_kind)
                if key is not None and key in previous:
                    objects[key] = previous[key]
                continue
            objects[key] = value
        return objects

    def _reject_object(self, name: str, index: int, what: str, reason: str, *, kind: str = "unknown") -> None:
        log.error("manifests %s: %s is invalid, skipped: %s", _printable(name), what, _printable(reason),
                  extra=log_event(service=what, reason=_printable(reason)))
        metrics.REJECTED_OBJECTS.labels(source=_SOURCE, kind=kind, reason="invalid").inc()
        rejections.record(_SOURCE, kind, f"{what.removeprefix(kind + ' ')} (in {_printable(name)})",
                          _printable(reason))

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
        self._duplicates = duplicates

        services: list[Service] = []
        slices: list[EndpointSlice] = []
        mirrored: list[EndpointSlice] = []
        labels: dict[str, str] = {}
        node_name = getattr(self.tracker, "node_name", None)
        for (kind, _ns, obj_name), (_file, value) in merged.items():
            if value is None:
                continue
            if kind == "Service":
                services.append(value)
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
        return services, slices, labels
