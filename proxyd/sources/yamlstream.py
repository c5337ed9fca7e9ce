"""A streaming, bounded YAML loader for manifests: libyaml's events, our own constructor.

PyYAML's ``CSafeLoader`` parses in C but composes a node tree of the whole
document and then constructs Python objects from it in Python: a 13.5 MB
``kind: List`` of 10,000 services costs ~5 s and ~900 MB at its peak, and a
15.9 MB ``[{},{},…]`` drove a daemon to 3.8 GB. This module reads the same
libyaml event stream (``CSafeLoader.get_event``) and builds plain Python
values straight from it, one object at a time:

* A document that is a mapping with an ``items`` sequence (``kind: List``,
  whatever the key order: kubectl writes ``items`` before ``kind``) is
  streamed: each item is built, handed to the caller and dropped before the
  next one is read, so peak memory is one item plus what the caller keeps.
* Bounds checked while parsing, so a hostile file stops early: nesting
  deeper than ``max_depth``, more than ``max_nodes`` nodes in one object, more
  than ``max_items`` items in one file, aliases, merge keys and collection
  tags other than plain maps and sequences are refused (``ParseError``).
* Scalars resolve exactly as SafeLoader resolves them (its resolver and
  scalar constructors), through a bounded cache: the few distinct plain
  scalars of a manifest (``TCP``, ``true``, ``80``, a node name) are built
  once and shared, which also saves memory in what the caller keeps.
* Every object comes with a digest of its source text (with its column and
  the document's tag directives), so a caller can tell an unchanged object
  in a rewritten file without comparing or keeping raw copies.

Documents that are not a List are yielded whole (one object, node budget
applies). Nothing here knows about Kubernetes kinds beyond the ``items`` key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Container, Iterator
from dataclasses import dataclass
from typing import Any

import yaml

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"
_VALUE = "tag:yaml.org,2002:value"
_SCALAR_CACHE = 65536  # distinct scalars remembered per parse (memory bound)
_IMMUTABLE = (str, int, float, bool, bytes, type(None))


class ParseError(Exception):
    """The text cannot be used; ``reason`` is one printable line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    max_depth: int = 100
    max_nodes: int = 300_000  # per object: a real one has at most tens of thousands
    max_items: int = 100_000  # per file (Lists' items plus plain documents)


@dataclass(frozen=True, slots=True)
class Item:
    """One object read from a file.

    ``document`` counts documents from 0; ``listed`` is True for an entry of
    a List document's ``items`` (only meaningful once ``Document`` says the
    document's kind is List). ``digest`` identifies its source text.
    """

    value: Any
    digest: bytes
    document: int
    listed: bool


@dataclass(frozen=True, slots=True)
class DocumentEnd:
    """End of document ``document``.

    ``is_list`` when its top-level ``kind`` is ``List``; ``streamed`` when
    its ``items`` came as listed items (a List's or not).
    """

    document: int
    is_list: bool
    streamed: bool = False


class _Builder:
    def __init__(self, text: str, limits: Limits, known: Container[bytes] | None = None) -> None:
        self.text = text
        self.limits = limits
        self.known = known
        self.loader = _Loader(text)
        self.event = self.loader.get_event  # bound once: called for every event
        self.cache: dict[tuple[str | None, str, bool], Any] = {}
        self.nodes = 0
        self.items = 0
        self.salt = b""

    def close(self) -> None:
        self.loader.dispose()

    # ---- values ----------------------------------------------------------

    def node(self, event: Any, depth: int, *, key: bool = False) -> Any:
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            raise ParseError(f"an object has more than {self.limits.max_nodes} nodes")
        cls = type(event)
        if cls is yaml.ScalarEvent:
            return self.scalar(event, key=key)
        if cls is yaml.MappingStartEvent:
            self.check_collection(event, _MAP, depth)
            out: dict[Any, Any] = {}
            while True:
                ev = self.event()
                if type(ev) is yaml.MappingEndEvent:
                    return out
                k = self.node(ev, depth + 1, key=True)
                v = self.node(self.event(), depth + 1)
                try:
                    out[k] = v
                except TypeError:
                    raise ParseError("a mapping key is not hashable") from None
        if cls is yaml.SequenceStartEvent:
            self.check_collection(event, _SEQ, depth)
            seq: list[Any] = []
            while True:
                ev = self.event()
                if type(ev) is yaml.SequenceEndEvent:
                    return seq
                seq.append(self.node(ev, depth + 1))
        if cls is yaml.AliasEvent:
            raise ParseError("YAML aliases are not allowed")
        raise ParseError(f"unexpected {cls.__name__}")  # pragma: no cover - libyaml orders events

    def check_collection(self, event: Any, tag: str, depth: int) -> None:
        if depth >= self.limits.max_depth:
            raise ParseError(f"nested deeper than {self.limits.max_depth} levels")
        if event.anchor is not None:
            raise ParseError("YAML aliases are not allowed")  # an anchor is only there to be aliased
        if event.tag not in (None, "!", tag):
            raise ParseError(f"YAML tag {_show(event.tag)} is not allowed")

    def scalar(self, event: Any, *, key: bool) -> Any:
        if event.anchor is not None:
            raise ParseError("YAML aliases are not allowed")
        tag = event.tag
        value = event.value
        plain = event.implicit[0]
        if tag is None or tag == "!":
            if not plain:
                return value  # quoted, or the non-specific "!": a string
            cache_key: tuple[str | None, str, bool] = (None, value, key)
        else:
            cache_key = (tag, value, key)
        hit = self.cache.get(cache_key, _MISSING)
        if hit is not _MISSING:
            return hit
        if tag is None or tag == "!":
            tag = self.loader.resolve(yaml.ScalarNode, value, event.implicit)
        if tag == _MERGE:
            raise ParseError("YAML merge keys are not allowed")
        if tag == _VALUE:
            if not key:
                raise ParseError("a '=' value is not allowed here")
            tag = _STR  # what SafeLoader makes of a '=' key
        if tag == _STR:
            out: Any = value
        else:
            constructor = self.loader.yaml_constructors.get(tag)
            if constructor is None:
                raise ParseError(f"YAML tag {_show(tag)} is not allowed")
            try:
                out = constructor(self.loader, yaml.ScalarNode(tag, value, None, None, event.style))
            except yaml.YAMLError as err:
                raise ParseError(_show(getattr(err, "problem", None) or str(err), 120)) from None
            except (ValueError, TypeError, OverflowError) as err:
                raise ParseError(f"bad {tag.rpartition(':')[2]} value: {_show(str(err), 80)}") from None
        if isinstance(out, _IMMUTABLE) and len(self.cache) < _SCALAR_CACHE:
            self.cache[cache_key] = out
        return out

    def known_or_built(self, first: Any, index: int) -> Item:
        """A List item: its events recorded, and built only when its digest is not known.

        Building is about half the cost of reading an object; a re-read file
        whose objects are mostly unchanged skips it for all of those.
        """
        events = [first]
        depth = 1 if type(first) in (yaml.MappingStartEvent, yaml.SequenceStartEvent) else 0
        limit = 2 * self.limits.max_nodes
        while depth:
            ev = self.event()
            events.append(ev)
            cls = type(ev)
            if cls is yaml.MappingStartEvent or cls is yaml.SequenceStartEvent:
                depth += 1
                if depth + 2 > self.limits.max_depth:
                    raise ParseError(f"nested deeper than {self.limits.max_depth} levels")
            elif cls is yaml.MappingEndEvent or cls is yaml.SequenceEndEvent:
                depth -= 1
            if len(events) > limit:
                raise ParseError(f"an object has more than {self.limits.max_nodes} nodes")
        following = self.loader.peek_event()
        digest = self.item_digest(first.start_mark, following.start_mark)
        if self.known is not None and digest in self.known:
            return Item(None, digest, index, True)
        replay = iter(events)
        next(replay)
        live = self.event
        self.event = replay.__next__
        try:
            value = self.node(first, 2)
        finally:
            self.event = live
        return Item(value, digest, index, True)

    def digest(self, start: Any, end: Any) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(b"S")
        h.update(self.salt)
        h.update(start.column.to_bytes(4, "little"))
        h.update(self.text[start.index:end.index].encode("utf-8", "surrogatepass"))
        return h.digest()

    def item_digest(self, start: Any, end: Any) -> bytes:
        """A List item's digest: by its lines (``split_list``'s) when it starts a line with ``- ``.

        The lines run from the item's ``- `` to the line of the next event
        (the next item's ``- ``, or the key after the list): exactly what
        ``split_list`` cuts from the text without parsing it. Other items
        (flow style, indented, on the line after their ``-``) keep the span
        digest; the two never collide (a different first byte).
        """
        text = self.text
        line = text.rfind("\n", 0, start.index) + 1
        stop = text.rfind("\n", 0, end.index) + 1
        # What follows must start its line: the next "- " (with its item on that line) or a key.
        follows = end.index == stop or (end.index - stop == 2 and text[stop] == "-")
        if start.index - line != 2 or text[line] != "-" or stop <= line or not follows:
            return self.digest(start, end)
        return _line_digest(self.salt, text, line, stop)

    def counted(self) -> None:
        self.items += 1
        if self.items > self.limits.max_items:
            raise ParseError(f"more than {self.limits.max_items} objects")

    # ---- documents ---------------------------------------------------------

    def documents(self) -> Iterator[Item | DocumentEnd]:
        ev = self.event()  # StreamStart
        index = 0
        while True:
            ev = self.event()
            if type(ev) is yaml.StreamEndEvent:
                return
            # DocumentStart: tag directives change what the text means.
            self.salt = repr(ev.tags).encode() if ev.tags else b""
            first = self.event()
            if type(first) is yaml.MappingStartEvent:
                yield from self.mapping_document(first, index)
            else:
                self.nodes = 0
                value = self.node(first, 0)
                end = self.event()  # DocumentEnd
                if value is not None:
                    self.counted()
                    yield Item(value, self.digest(first.start_mark, end.start_mark), index, False)
                yield DocumentEnd(index, False)
                index += 1
                continue
            self.event()  # DocumentEnd
            index += 1

    def mapping_document(self, start: Any, index: int) -> Iterator[Item | DocumentEnd]:
        """A top-level mapping: its ``items`` sequence streamed, the rest built as one object."""
        self.check_collection(start, _MAP, 0)
        self.nodes = 0
        rest: dict[Any, Any] = {}
        streamed = False
        last = start
        while True:
            ev = self.event()
            if type(ev) is yaml.MappingEndEvent:
                last = ev
                break
            k = self.node(ev, 1, key=True)
            first = self.event()
            if k == "items" and type(first) is yaml.SequenceStartEvent:
                self.check_collection(first, _SEQ, 1)
                outer_nodes = self.nodes
                while True:
                    ev = self.event()
                    if type(ev) is yaml.SequenceEndEvent:
                        break
                    self.nodes = 0
                    self.counted()
                    if self.known is not None:
                        yield self.known_or_built(ev, index)
                        continue
                    value = self.node(ev, 2)
                    # The item's text runs to where the next event starts.
                    following = self.loader.peek_event()
                    yield Item(value, self.item_digest(ev.start_mark, following.start_mark), index, True)
                self.nodes = outer_nodes
                streamed = True
                rest.pop(k, None)
                continue
            v = self.node(first, 1)
            try:
                rest[k] = v
            except TypeError:
                raise ParseError("a mapping key is not hashable") from None
        # A List whose items were not a sequence goes out whole: the caller
        # reports it as it reports any malformed List.
        is_list = streamed and rest.get("kind") == "List"
        if not is_list:
            self.counted()
        # A List's own fields come too (``parse_documents`` rebuilds the document).
        yield Item(rest, self.digest(start.start_mark, last.end_mark), index, False)
        yield DocumentEnd(index, is_list, streamed)


_MISSING = object()


def _line_digest(salt: bytes, text: str, start: int, stop: int) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(b"L")
    h.update(salt)
    h.update(text[start:stop].encode("utf-8", "surrogatepass"))
    return h.digest()


# Line breaks libyaml knows besides "\n": a file holding one is not split by lines.
_OTHER_BREAKS = ("\r", "\x85", "\u2028", "\u2029")
_ITEMS_KEY = re.compile(r"^items:[ ]*(?:#[^\n]*)?$", re.M)
_DOCUMENT_MARK = re.compile(r"^(?:---|\.\.\.|%)", re.M)
# Where the items end: the first line at column 0 that is not an item ("- …"), a continuation
# (indented), a comment or blank.
_AFTER_ITEMS = re.compile(r"^(?:[^ \-#\n]|-[^ \n])", re.M)
_ITEM_START = re.compile(r"^-(?=[ \n])", re.M)


def split_list(text: str, limits: Limits, known: Container[bytes],
               max_new: int) -> list[tuple[Any, bytes]] | None:
    """(value, or None when its digest is ``known``; digest) of each item of a block-style ``kind: List``.

    For a re-read of a big List in which few items changed: the items are cut
    from the text by lines (the ``- `` at column 0 that kubectl and PyYAML
    write), digested as ``Builder.item_digest`` digests them, and only the
    items whose digest is not known (at most ``max_new``) are parsed, each
    alone. None when the text is not such a List or anything is not as
    expected — the caller then parses the whole text, which gives the
    answer (or the error) it always gave.

    Why cutting by lines is safe: an item parsed alone (or known, i.e. parsed
    before as one complete item) leaves no quote, bracket or block scalar
    open, so the next ``- `` at column 0 starts the next item for the real
    parser too; a line that would continue something still open makes the
    piece before it fail to parse alone. The text before ``items:`` must parse
    alone for the same reason, and with what follows the items it must be a
    mapping whose ``kind`` is ``List`` (and holds no other ``items``).
    """
    if any(c in text for c in _OTHER_BREAKS) or _DOCUMENT_MARK.search(text):
        return None
    keys = list(_ITEMS_KEY.finditer(text))
    if len(keys) != 1:
        return None
    head = keys[0].start()
    first = keys[0].end() + 1
    after = _AFTER_ITEMS.search(text, first)
    end = after.start() if after is not None else len(text)
    starts = [m.start() for m in _ITEM_START.finditer(text, first, end)]
    # Only comments and blank lines may come between ``items:`` and the first item.
    if not starts or not all(not line.strip(" ") or line.lstrip(" ").startswith("#")
                             for line in text[first:starts[0]].split("\n")):
        return None
    if len(starts) > limits.max_items:
        return None
    bounds = [*starts, end]
    out: list[tuple[Any, bytes]] = []
    new = 0
    for i in range(len(starts)):
        digest = _line_digest(b"", text, bounds[i], bounds[i + 1])
        if digest in known:
            out.append((None, digest))
            continue
        new += 1
        if new > max_new:
            return None
        value = _alone(text[bounds[i]:bounds[i + 1]], limits)
        if not isinstance(value, list) or len(value) != 1:
            return None
        out.append((value[0], digest))
    frame = _alone(text[:head], limits, empty_ok=True)
    rest = _alone(text[:head] + text[end:], limits, empty_ok=True)
    if frame is not None and not isinstance(frame, dict):
        return None
    if not isinstance(rest, dict) or rest.get("kind") != "List" or "items" in rest:
        return None
    return out


def _alone(text: str, limits: Limits, *, empty_ok: bool = False) -> Any:
    """The one value of ``text`` parsed by itself; None when it is empty (``empty_ok``) or not one value."""
    try:
        entries = list(iter_objects(text, limits))
    except (ParseError, yaml.YAMLError, RecursionError):
        return _BAD
    items = [e for e in entries if isinstance(e, Item)]
    if not items:
        return None if empty_ok else _BAD
    if len(items) != 1 or items[0].listed:
        return _BAD
    return items[0].value


_BAD: Any = object()  # not None, not a list or dict: fails every check above


def _show(value: object, limit: int = 60) -> str:
    text = str(value)
    if not text.isprintable():
        text = ascii(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "…"


def iter_objects(text: str, limits: Limits = Limits(),
                 known: Container[bytes] | None = None) -> Iterator[Item | DocumentEnd]:
    """Items and document ends of a YAML stream; ``ParseError`` (or ``yaml.YAMLError``) when it is bad.

    A caller keeps the items of a document and decides at its ``DocumentEnd``:
    for a List, the ``listed`` items are the objects (the one unlisted item
    holds the List's own fields); otherwise the one unlisted item is the
    object (a document that is null gives none). A List item whose digest
    is in ``known`` comes with ``value`` None: it is not built at all.
    """
    builder = _Builder(text, limits, known)
    try:
        yield from builder.documents()
    finally:
        builder.close()
