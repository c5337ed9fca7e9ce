"""Reading elements of proxyd's maps straight from nf_tables over netlink, looked up by key.

nft 1.0.6 turns every element of a set it lists into an expression tree
first: ~2 CPU-s for the 100,000 elements of a backends map at 10,000
services × 10 endpoints, even when one service's elements are wanted
(``get element`` fills the same cache). The kernel's own dump of that map
is a few MB and takes milliseconds. So ``proxyd status NAME`` and ``proxyd
trace`` ask the kernel directly (``NFT_MSG_GETSETELEM`` dump) and decode
only the dump messages that hold a wanted key (found by a byte search for
the key's netlink encoding): cost proportional to the answer, plus one copy
of the dump.

Only the fixed layout's sets are decoded here (``KEYS``: field types of
each set's key, and whether its value is a verdict or an address . port);
an interval set (``firewall-allow``) or an affinity set is read through nft.
Decoding is strict: a malformed message, an unknown attribute shape or a
field of the wrong size raises ``ValueError`` (the caller reports it)
instead of producing an element that is not in the kernel.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
from collections.abc import Iterator
from typing import Any

from proxyd.modes.nftables import layout as lay
from proxyd.netlink import parse_attrs

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
# nf_tables attribute numbers (linux/netfilter/nf_tables.h)
LIST_TABLE, LIST_SET, LIST_ELEMENTS = 1, 2, 3
LIST_ELEM = 1
ELEM_KEY, ELEM_DATA, ELEM_EXPR, ELEM_EXPRESSIONS = 1, 2, 7, 10
DATA_VALUE, DATA_VERDICT = 1, 2
VERDICT_CODE, VERDICT_CHAIN = 1, 2
EXPR_NAME, EXPR_DATA = 1, 2
COUNTER_BYTES, COUNTER_PACKETS = 1, 2
_VERDICTS = {0: "drop", 1: "accept", -1: "continue", -5: "return"}
_JUMPS = {-3: "jump", -4: "goto"}
_PROTOS = {6: "tcp", 17: "udp", 132: "sctp"}
_PROTO_NUMBERS = {v: k for k, v in _PROTOS.items()}
_HDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
DUMP_TIMEOUT = 30.0
MAX_DUMP_BYTES = 1 << 30

# Key fields: "addr", "proto", "port", "index" (numgen's 32-bit host-order integer).
_SVC = ("addr", "proto", "port")
_NP = ("proto", "port")
KEYS: dict[str, tuple[tuple[str, ...], str | None]] = {
    lay.CANARY: (("addr",), None), lay.CLUSTER_IPS: (("addr",), None), lay.NODEPORT_IPS: (("addr",), None),
    lay.SERVICE_IPS: (_SVC, "verdict"), lay.NO_ENDPOINT_SERVICES: (_SVC, "verdict"),
    lay.SERVICE_NODEPORTS: (_NP, "verdict"), lay.NO_ENDPOINT_NODEPORTS: (_NP, "verdict"),
    lay.FIREWALL_IPS: (_SVC, None), lay.HAIRPIN: (("addr", "addr"), None),
}
for _pick in lay.PICKS:
    KEYS[_pick.name] = (_SVC if _pick.by_address else _NP, "verdict")
    for _proto in lay.PROTOCOLS:
        KEYS[lay.backends_map(_pick, _proto)] = ((*(_SVC if _pick.by_address else _NP), "index"), "endpoint")


def _field_size(kind: str, fam: lay.Family) -> int:
    return {"addr": 4 if fam.version == 4 else 16, "proto": 1, "port": 2, "index": 4}[kind]


def encode_key(text: str, fields: tuple[str, ...], fam: lay.Family) -> bytes:
    """``10.96.0.5 . tcp . 80 . 0`` -> the key's bytes as the kernel holds them (fields padded to 4)."""
    parts = text.split(" . ")
    if len(parts) != len(fields):
        raise ValueError(f"key {text!r} does not have {len(fields)} fields")
    out = b""
    for kind, part in zip(fields, parts, strict=True):
        if kind == "addr":
            raw = ipaddress.ip_address(part).packed
            if len(raw) != _field_size("addr", fam):
                raise ValueError(f"{part} is not an IPv{fam.version} address")
        elif kind == "proto":
            raw = bytes([_PROTO_NUMBERS[part] if part in _PROTO_NUMBERS else int(part)])
        elif kind == "port":
            raw = struct.pack(">H", int(part))
        else:
            raw = struct.pack("=I", int(part))
        out += raw + b"\0" * (-len(raw) % 4) if len(fields) > 1 else raw
    return out


def decode_key(raw: bytes, fields: tuple[str, ...], fam: lay.Family) -> str:
    """The reverse of ``encode_key``."""
    parts = []
    off = 0
    for kind in fields:
        size = _field_size(kind, fam)
        chunk = raw[off:off + size]
        if len(chunk) != size:
            raise ValueError(f"key of {len(raw)} bytes is too short for {fields}")
        if kind == "addr":
            parts.append(str(ipaddress.ip_address(chunk)))
        elif kind == "proto":
            parts.append(_PROTOS.get(chunk[0], str(chunk[0])))
        elif kind == "port":
            parts.append(str(struct.unpack(">H", chunk)[0]))
        else:
            parts.append(str(struct.unpack("=I", chunk)[0]))
        off += size + (-size % 4 if len(fields) > 1 else 0)
    if off != len(raw):
        raise ValueError(f"key of {len(raw)} bytes is too long for {fields}")
    return " . ".join(parts)


def _nested(value: bytes, want: int) -> bytes:
    for atype, inner in parse_attrs(value, 0, len(value)):
        if atype == want:
            return inner
    raise ValueError(f"attribute {want} missing")


def _verdict(value: bytes) -> str:
    code = chain = None
    for atype, inner in parse_attrs(value, 0, len(value)):
        if atype == VERDICT_CODE and len(inner) == 4:
            code = struct.unpack(">i", inner)[0]
        elif atype == VERDICT_CHAIN:
            chain = inner.rstrip(b"\0").decode("ascii", "replace")
    if code in _JUMPS and chain:
        return f"{_JUMPS[code]} {chain}"
    if code in _VERDICTS:
        return _VERDICTS[code]
    raise ValueError(f"unknown verdict {code!r}")


def _counter(value: bytes) -> tuple[int, int] | None:
    name = data = None
    for atype, inner in parse_attrs(value, 0, len(value)):
        if atype == EXPR_NAME:
            name = inner.rstrip(b"\0")
        elif atype == EXPR_DATA:
            data = inner
    if name != b"counter" or data is None:
        return None
    pkts = nbytes = 0
    for atype, inner in parse_attrs(data, 0, len(data)):
        if atype == COUNTER_PACKETS and len(inner) == 8:
            pkts = struct.unpack(">Q", inner)[0]
        elif atype == COUNTER_BYTES and len(inner) == 8:
            nbytes = struct.unpack(">Q", inner)[0]
    return pkts, nbytes


Element = tuple[str, str | None, tuple[int, int] | None]  # key, value, (packets, bytes)


def decode_message(msg: bytes, set_name: str, fam: lay.Family) -> Iterator[Element]:
    """Every element of one ``NFT_MSG_NEWSETELEM`` message (header included) of ``set_name``."""
    fields, value_kind = KEYS[set_name]
    if len(msg) < _HDR.size + 4:
        raise ValueError("short set element message")
    for atype, value in parse_attrs(msg, _HDR.size + 4, len(msg)):
        if atype != LIST_ELEMENTS:
            continue
        for etype, elem in parse_attrs(value, 0, len(value)):
            if etype != LIST_ELEM:
                raise ValueError(f"unexpected attribute {etype} in an element list")
            key = data = None
            counter = None
            for a, inner in parse_attrs(elem, 0, len(elem)):
                if a == ELEM_KEY:
                    key = decode_key(_nested(inner, DATA_VALUE), fields, fam)
                elif a == ELEM_DATA:
                    if value_kind == "verdict":
                        data = _verdict(_nested(inner, DATA_VERDICT))
                    else:
                        data = decode_key(_nested(inner, DATA_VALUE), ("addr", "port"), fam)
                elif a == ELEM_EXPR:
                    counter = _counter(inner)
                elif a == ELEM_EXPRESSIONS:
                    for _, expr in parse_attrs(inner, 0, len(inner)):
                        counter = _counter(expr) or counter
            if key is None:
                raise ValueError("element without a key")
            if (data is None) != (value_kind is None):
                raise ValueError(f"element {key} of {set_name}: value does not fit the set")
            yield key, data, counter


def _request(fam: lay.Family, set_name: str, seq: int) -> bytes:
    def attr(atype: int, value: bytes) -> bytes:
        raw = _NLA.pack(_NLA.size + len(value), atype) + value
        return raw + b"\0" * (-len(raw) % 4)

    family = socket.AF_INET if fam.version == 4 else socket.AF_INET6
    body = struct.pack("=BBH", family, 0, 0) + attr(LIST_TABLE, lay.TABLE.encode() + b"\0") + \
        attr(LIST_SET, set_name.encode() + b"\0")
    mtype = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM
    return _HDR.pack(_HDR.size + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def dump(fam: lay.Family, set_name: str) -> list[bytes] | None:
    """The raw ``NEWSETELEM`` messages of one set (blocking); None when the set does not exist."""
    if set_name not in KEYS:
        raise ValueError(f"{set_name} is not a set this reader decodes")
    seq = int.from_bytes(os.urandom(4), "little") or 1
    out: list[bytes] = []
    total = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        sock.send(_request(fam, set_name, seq))
        while True:
            if not select.select([sock], [], [], DUMP_TIMEOUT)[0]:
                raise TimeoutError(f"nf_tables dump of {set_name} did not finish")
            data = sock.recv(1 << 20)
            total += len(data)
            if total > MAX_DUMP_BYTES:
                raise ValueError(f"dump of {set_name} larger than {MAX_DUMP_BYTES} bytes")
            off = 0
            while off + _HDR.size <= len(data):
                length, mtype, _flags, mseq, _pid = _HDR.unpack_from(data, off)
                if length < _HDR.size or off + length > len(data):
                    raise ValueError("truncated netlink message")
                msg = data[off:off + length]
                off += (length + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", msg, _HDR.size)[0]
                    if code == 0:
                        return out
                    if code == errno.ENOENT:
                        return None
                    raise OSError(code, f"nf_tables dump of {set_name}: {os.strerror(code)}")
                if mtype == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM:
                    out.append(msg)


class RawSet(dict[str, str | None]):
    """One set's elements from a kernel dump, decoded on demand: a lookup decodes only the messages
    holding the key's bytes; iteration decodes everything. ``counters`` fills as messages are decoded."""

    def __init__(self, fam: lay.Family, set_name: str, messages: list[bytes]) -> None:
        super().__init__()
        self.fam = fam
        self.set_name = set_name
        self.fields = KEYS[set_name][0]
        self._pending = list(messages)
        self.counters: dict[str, tuple[int, int]] = {}

    def _decode(self, msg: bytes) -> None:
        for key, value, counter in decode_message(msg, self.set_name, self.fam):
            dict.__setitem__(self, key, value)
            if counter is not None:
                self.counters[key] = counter

    def _load_key(self, key: str) -> None:
        if dict.__contains__(self, key) or not self._pending:
            return
        try:
            needle = encode_key(key, self.fields, self.fam)
        except (ValueError, KeyError):
            return  # not a key this set can hold
        keep = []
        for msg in self._pending:
            if needle in msg:
                self._decode(msg)
            else:
                keep.append(msg)
        self._pending = keep

    def _load_all(self) -> None:
        for msg in self._pending:
            self._decode(msg)
        self._pending = []

    def get(self, key: str, default: Any = None) -> Any:
        self._load_key(key)
        return dict.get(self, key, default)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self._load_key(key)
        return dict.__contains__(self, key)

    def __getitem__(self, key: str) -> str | None:
        self._load_key(key)
        return dict.__getitem__(self, key)

    def __iter__(self) -> Iterator[str]:
        self._load_all()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._load_all()
        return dict.__len__(self)

    def items(self):  # type: ignore[no-untyped-def]
        self._load_all()
        return dict.items(self)

    def keys(self):  # type: ignore[no-untyped-def]
        self._load_all()
        return dict.keys(self)

    def values(self):  # type: ignore[no-untyped-def]
        self._load_all()
        return dict.values(self)


def read(fam: lay.Family, set_name: str) -> RawSet | None:
    """One set, dumped now, decoded on demand (blocking); None when it does not exist."""
    messages = dump(fam, set_name)
    return None if messages is None else RawSet(fam, set_name, messages)
