"""Batched netlink: many requests per ``sendmsg``, one ACK each, every error mapped back to its object.

Every mode that talks netlink (service routes via ``proxyd0``, addresses on ``kube-ipvs0``,
ipset entries, IPVS virtual and real servers, conntrack deletions) sends its
changes through ``BatchSocket.run``. Requests are pyroute2 message objects
(``ifaddrmsg``, ``ipset_msg``, ``ipvsmsg``, ``nfct_msg``): pyroute2 encodes
them, this module only packs them, sends them and reads the answers.

How a batch goes:

* Each request gets its own sequence number and ``NLM_F_ACK`` (or, with
  ``ack_each=False``, only each chunk's last request asks an ACK and the
  others answer only when they fail: see ``BatchSocket.run``); encoded
  requests are packed into chunks of at most ``chunk_bytes`` bytes and
  ``chunk_messages`` messages, and each chunk is one ``send``. The kernel
  runs a chunk's requests one after another inside that ``send`` and
  queues one answer per request, so when ``send`` returns every answer of
  the chunk is either in the receive queue or was dropped because the queue
  was full (``ENOBUFS``). The answers are read without waiting.
* An answer with an error fails only its own request: the others in the
  chunk were applied (netlink requests are independent). Errors the caller
  lists as harmless (``EEXIST`` for an add, ``ENOENT`` for a delete) count
  as success; any other is logged with the object and counted in
  ``proxyd_netlink_failures_total{kind}``, and returned to the caller.
* A chunk whose answers did not all fit the receive buffer (more ACKs than
  one socket buffer holds) is handled, not lost: the requests without an
  answer are sent again in smaller chunks. Resending is safe because the
  callers' harmless errors make every request idempotent (an add that had
  been applied answers ``EEXIST``).
* ``NETLINK_CAP_ACK`` keeps error answers short (the kernel does not echo
  the request back); ``NETLINK_EXT_ACK`` adds the kernel's reason text to
  the log line when it has one.

Requests are pyroute2 message objects, or payloads packed with ``struct``
where the count is large and the layout small: the ``local`` routes
holding userspace mode's service addresses (``local_route_request``), the
addresses on ``kube-ipvs0`` (``address_request``), and ipvs mode's set
entries and virtual and real servers (``proxyd.modes.ipvs.applier``), each
in the layout pyroute2 gives it (unit tests compare the bytes).

``dump`` sends one dump request and returns the raw messages, so callers
parse each reply once with what they need (``parse_attrs``) instead of
pyroute2 decoding every attribute of tens of thousands of replies.

A ``BatchSocket`` is blocking and not thread-safe: callers use it from their
one kernel worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from proxyd import metrics

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
NETLINK_GENERIC = 16

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_ACK_TLVS = 0x200  # on an error answer: extended-ack attributes follow

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_CAP_ACK = 10
NLMSGERR_ATTR_MSG = 1
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32

_HDR = struct.Struct("=IHHII")
_ERR = struct.Struct("=i")
_FLAGS = struct.Struct("=H")
_NLA = struct.Struct("=HH")

# Defaults: 64 KiB of requests per send stays far below the default send
# buffer (the kernel refuses a send larger than it); 256 answers per chunk
# fit a 1 MiB receive buffer even at the kernel's ~1 KiB truesize per ACK.
CHUNK_BYTES = 64 * 1024
CHUNK_MESSAGES = 256
RCVBUF = 1 << 20
SNDBUF = 1 << 20
MAX_ROUNDS = 32  # resend rounds for answers lost to a full receive buffer
DUMP_TIMEOUT = 30.0


class NetlinkBatchError(OSError):
    """The batch itself could not be run (socket error, answers never came)."""


@dataclass(slots=True)
class Request:
    """One object's netlink request.

    ``msg`` is a pyroute2 message with its payload filled in, or the
    payload already packed (``bytes``: everything after the netlink header);
    the batcher sets the header. Packed payloads are for the hot paths:
    pyroute2 takes ~70 µs to encode one message, more than the kernel takes
    to apply it (10,000 service routes: 0.7 s of encoding against 0.1 s of
    kernel work). ``subject`` names the object in logs and is handed back on
    failure. ``ok`` lists the errno values that mean "already so".
    """

    msg: Any
    msg_type: int
    flags: int
    subject: object
    ok: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Failure:
    """A request the kernel refused: its object, the errno and the kernel's reason if it gave one."""

    subject: object
    code: int
    reason: str = ""

    def __str__(self) -> str:
        text = os.strerror(self.code) if 0 < self.code < 4096 else f"error {self.code}"
        return f"{self.subject}: {text}" + (f" ({self.reason})" if self.reason else "")


@dataclass(slots=True)
class BatchResult:
    """What a batch did: requests that succeeded, and the ones that did not."""

    applied: int = 0
    failures: list[Failure] = field(default_factory=list)
    resent: int = 0  # requests sent again because their answer was dropped
    chunks: int = 0

    @property
    def failed_subjects(self) -> set[object]:
        return {f.subject for f in self.failures}


def encode(req: Request, seq: int, *, ack: bool = True) -> bytes:
    """The request's bytes: header type, flags (+ACK unless ``ack`` is False), sequence number ``seq``."""
    msg = req.msg
    flags = req.flags | NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    if isinstance(msg, bytes):
        return _HDR.pack(_HDR.size + len(msg), req.msg_type, flags, seq, 0) + msg
    header = msg["header"]
    header["type"] = req.msg_type
    header["flags"] = flags
    header["sequence_number"] = seq
    header["pid"] = 0
    msg.reset()
    msg.encode()
    return bytes(msg.data)


class BatchSocket:
    """A raw netlink socket of one protocol that runs batches of requests."""

    def __init__(self, protocol: int, *, kind: str, chunk_bytes: int = CHUNK_BYTES,
                 chunk_messages: int = CHUNK_MESSAGES, rcvbuf: int | None = RCVBUF,
                 sndbuf: int | None = SNDBUF) -> None:
        if chunk_bytes < 64 or chunk_messages < 1:
            raise ValueError("chunks must hold at least one request")
        self.kind = kind
        self.protocol = protocol
        self.chunk_bytes = chunk_bytes
        self.chunk_messages = chunk_messages
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        try:
            self.sock.bind((0, 0))
            for opt, value in ((SO_SNDBUFFORCE, sndbuf), (SO_RCVBUFFORCE, rcvbuf)):
                if value is not None:
                    _set_buffer(self.sock, opt, value)
            for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                try:
                    self.sock.setsockopt(SOL_NETLINK, opt, 1)
                except OSError:
                    pass  # older kernels: full echoes, no reason text
        except BaseException:
            self.sock.close()
            raise
        self._seq = 0
        self._read_size = 1 << 16

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> BatchSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = self._seq + 1 if self._seq < 0xFFFFFFFF else 1
        return self._seq

    # -- batches -------------------------------------------------------------------------

    def run(self, requests: Iterable[Request], *, log_failures: bool = True,
            ack_each: bool = True) -> BatchResult:
        """Send every request; return how many applied and which failed.

        Raises ``NetlinkBatchError`` only when the socket itself fails;
        refused objects are reported in the result (and logged and counted
        unless ``log_failures`` is False, for callers that retry them).

        ``ack_each=False`` asks an ACK of each chunk's last request only: the
        kernel still answers every failed request (an error answer needs no
        ``NLM_F_ACK``) and runs a chunk's requests in order, so once the last
        one's ACK is read, every request without an error answer applied.
        That saves one ``recv`` per request (10,000 per full sync of service
        routes). A chunk whose answers overran the receive buffer is sent
        again whole (the requests are idempotent, as for ``ack_each``).
        """
        result = BatchResult()
        pending = list(requests)
        limit = self.chunk_messages
        for _ in range(MAX_ROUNDS):
            if not pending:
                break
            lost: list[Request] = []
            start = 0
            while start < len(pending):
                start = self._run_chunk(pending, start, limit, result, lost, ack_each)
            if lost:
                result.resent += len(lost)
                # The answers did not fit: fewer requests per chunk from now on.
                limit = max(1, min(limit, len(lost)) // 2)
            pending = lost
        else:
            if pending:
                raise NetlinkBatchError(errno.ENOBUFS,
                                        f"{self.kind}: {len(pending)} requests never answered")
        if log_failures:
            for failure in result.failures:
                log.error("netlink %s: cannot apply %s", self.kind, failure)
                metrics.NETLINK_FAILURES.labels(kind=self.kind).inc()
        return result

    def _run_chunk(self, pending: list[Request], start: int, limit: int, result: BatchResult,
                   lost: list[Request], ack_each: bool = True) -> int:
        """Send requests from ``start`` as one chunk; return the index after the last one sent."""
        by_seq: dict[int, Request] = {}
        parts: list[bytes] = []
        size = 0
        index = start
        while index < len(pending) and len(by_seq) < limit:
            req = pending[index]
            seq = self._next_seq()
            try:
                data = encode(req, seq, ack=ack_each)
            except (ValueError, OSError, TypeError, KeyError, struct.error) as err:
                # An object pyroute2 cannot encode (bad address text...) fails alone.
                self._seq -= 1
                result.failures.append(Failure(req.subject, errno.EINVAL, f"cannot encode: {err}"))
                index += 1
                continue
            if by_seq and size + len(data) > self.chunk_bytes:
                self._seq -= 1  # not sent in this chunk: its number is reused by the next
                break
            parts.append(data)
            by_seq[seq] = req
            size += len(data)
            index += 1
        if not parts:
            return index
        marker = None
        if not ack_each:
            # Only the chunk's last request asks an ACK: its answer closes the chunk.
            last = bytearray(parts[-1])
            _FLAGS.pack_into(last, 6, _FLAGS.unpack_from(last, 6)[0] | NLM_F_ACK)
            parts[-1] = bytes(last)
            marker = self._seq
        payload = b"".join(parts)
        try:
            self.sock.send(payload)
        except OSError as err:
            raise NetlinkBatchError(err.errno, f"{self.kind}: send of {len(by_seq)} requests: {err}") from err
        result.chunks += 1
        overrun = self._collect(by_seq, result, marker=marker)
        if by_seq and not overrun and (marker is None or marker in by_seq):
            # Every answer is queued before send() returns; none and no
            # overrun means the kernel is processing asynchronously:
            # wait for the rest (bounded).
            overrun = self._collect(by_seq, result, wait=DUMP_TIMEOUT, marker=marker)
        if by_seq and marker is not None and marker not in by_seq and not overrun:
            result.applied += len(by_seq)  # no error answer before the closing ACK: applied
            by_seq.clear()
        lost.extend(by_seq.values())
        return index

    def _collect(self, by_seq: dict[int, Request], result: BatchResult, *, wait: float = 0.0,
                 marker: int | None = None) -> bool:
        """Read queued answers; remove answered requests from ``by_seq``. True if some were dropped.

        With a ``marker`` (the one request of the chunk asking an ACK), stops once it is answered.
        """
        overrun = False
        while by_seq and (marker is None or marker in by_seq):
            if wait and not _readable(self.sock, wait):
                break
            try:
                data = self.sock.recv(self._read_size, 0 if wait else socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    overrun = True  # some answers were dropped; the rest are still queued
                    continue
                raise NetlinkBatchError(err.errno, f"{self.kind}: receive: {err}") from err
            for msg_type, _flags, seq, payload_off, end in _messages(data):
                if msg_type != NLMSG_ERROR:
                    continue
                req = by_seq.pop(seq, None)
                if req is None:
                    continue  # an answer to an earlier, abandoned chunk
                code = -_ERR.unpack_from(data, payload_off)[0]
                if code == 0 or code in req.ok:
                    result.applied += 1
                else:
                    result.failures.append(Failure(req.subject, code, _ext_ack_reason(data, payload_off, end,
                                                                                        _flags)))
        return overrun

    # -- dumps ---------------------------------------------------------------------------

    def dump(self, msg: Any, msg_type: int, *, flags: int = NLM_F_DUMP) -> list[tuple[int, bytes]]:
        """Send one dump request; return every reply as (type, message bytes), header included.

        ``msg`` is a pyroute2 message or the packed payload, as in ``Request``.
        """
        seq = self._next_seq()
        if isinstance(msg, bytes):
            request = _HDR.pack(_HDR.size + len(msg), msg_type, flags | NLM_F_REQUEST, seq, 0) + msg
        else:
            header = msg["header"]
            header["type"] = msg_type
            header["flags"] = flags | NLM_F_REQUEST
            header["sequence_number"] = seq
            header["pid"] = 0
            msg.reset()
            msg.encode()
            request = bytes(msg.data)
        try:
            self.sock.send(request)
        except OSError as err:
            raise NetlinkBatchError(err.errno, f"{self.kind}: dump request: {err}") from err
        out: list[tuple[int, bytes]] = []
        while True:
            if not _readable(self.sock, DUMP_TIMEOUT):
                raise NetlinkBatchError(errno.ETIMEDOUT, f"{self.kind}: dump did not finish")
            try:
                data = self.sock.recv(1 << 20)
            except OSError as err:
                # ENOBUFS here means the dump lost replies: a partial view must not be used.
                raise NetlinkBatchError(err.errno, f"{self.kind}: dump: {err}") from err
            for mtype, _flags, mseq, payload_off, end in _messages(data):
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    code = -_ERR.unpack_from(data, payload_off)[0]
                    if code == 0:
                        return out
                    raise NetlinkBatchError(code, f"{self.kind}: dump: {os.strerror(code)}")
                out.append((mtype, data[payload_off - _HDR.size:end]))


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` has something to read within ``timeout`` seconds.

    ``poll``, not ``select``: a userspace proxy holds tens of thousands of
    descriptors, and ``select`` refuses any numbered 1024 or above.
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _set_buffer(sock: socket.socket, force_opt: int, value: int) -> None:
    plain = socket.SO_SNDBUF if force_opt == SO_SNDBUFFORCE else socket.SO_RCVBUF
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, value)  # root: beyond rmem_max/wmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, value)


def _messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, payload offset, end) of each netlink message in ``data``; stops at garbage."""
    off = 0
    size = len(data)
    while off + _HDR.size <= size:
        length, mtype, flags, seq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size or off + length > size:
            return  # truncated or malformed: nothing after it can be trusted
        yield mtype, flags, seq, off + _HDR.size, off + length
        off += (length + 3) & ~3


def _ext_ack_reason(data: bytes, payload_off: int, end: int, flags: int) -> str:
    """The kernel's NLMSGERR_ATTR_MSG text of an error answer, if any."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    # nlmsgerr: error (4) + the request's header (16; only the header with NETLINK_CAP_ACK).
    orig_len = _HDR.unpack_from(data, payload_off + 4)[0] if payload_off + 20 <= end else 0
    off = payload_off + 4 + (_HDR.size if flags & 0x100 else orig_len)  # NLM_F_CAPPED
    for atype, value in parse_attrs(data, off, end):
        if atype == NLMSGERR_ATTR_MSG:
            return value.rstrip(b"\0").decode("utf-8", "replace")
    return ""


def parse_attrs(data: bytes, off: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each attribute in ``data[off:end]`` (flag bits stripped); stops at garbage."""
    while off + _NLA.size <= end:
        length, atype = _NLA.unpack_from(data, off)
        if length < _NLA.size or off + length > end:
            return
        yield atype & 0x3FFF, data[off + _NLA.size:off + length]
        off += (length + 3) & ~3


# -- addresses (rtnetlink) -------------------------------------------------------------------

RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
IFA_F_NODAD = 0x02
_IFADDRMSG = struct.Struct("=BBBBI")
_ADDR_ADD_OK = frozenset({errno.EEXIST})
_ADDR_DEL_OK = frozenset({errno.EADDRNOTAVAIL, errno.ENOENT})


def address_request(add: bool, index: int, ip: str, *, subject: object = None) -> Request:
    """Add (or delete) host address ``ip`` (/32 or /128) on link ``index``; an IPv6 add skips DAD.

    Packed with ``struct`` in the layout pyroute2's ``ifaddrmsg`` gives it (ipvs mode binds one per
    service in a full sync); ``ValueError`` when ``ip`` is not an address.
    """
    family = _AF_INET6 if ":" in ip else _AF_INET
    try:
        raw = socket.inet_pton(family, ip)
    except (OSError, ValueError) as err:
        raise ValueError(f"not an IP address: {ip[:64]!r}") from err
    attr = _NLA.pack(_NLA.size + len(raw), IFA_LOCAL) + raw
    payload = _IFADDRMSG.pack(family, len(raw) * 8, 0, 0, index) + attr
    payload += _NLA.pack(_NLA.size + len(raw), IFA_ADDRESS) + raw
    if add:
        if family == _AF_INET6:
            payload += _U32_ATTR.pack(_U32_ATTR.size, IFA_FLAGS, IFA_F_NODAD)
        return Request(payload, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, subject or ip, _ADDR_ADD_OK)
    return Request(payload, RTM_DELADDR, 0, subject or ip, _ADDR_DEL_OK)


def dump_addresses(sock: BatchSocket, index: int, *, family: int = socket.AF_UNSPEC
                   ) -> list[tuple[int, int, str]]:
    """(family, prefixlen, address) of every address on link ``index``, parsed in one pass."""
    return [(fam, prefixlen, addr) for link, fam, prefixlen, addr in dump_link_addresses(sock, family=family)
            if link == index]


def dump_link_addresses(sock: BatchSocket, *, family: int = socket.AF_UNSPEC,
                        skip_links: frozenset[int] = frozenset()) -> list[tuple[int, int, int, str]]:
    """(link, family, prefixlen, address) of every address, links in ``skip_links`` aside.

    One dump, parsed once; a skipped link's replies cost one header read
    (``kube-ipvs0`` may hold tens of thousands of service addresses).
    """
    req = ifaddrmsg()
    req["family"] = family
    out: list[tuple[int, int, int, str]] = []
    for _mtype, data in sock.dump(req, RTM_GETADDR):
        if len(data) < _HDR.size + _IFADDRMSG.size:
            continue
        fam, prefixlen, _flags, _scope, link = _IFADDRMSG.unpack_from(data, _HDR.size)
        if link in skip_links or fam not in (socket.AF_INET, socket.AF_INET6):
            continue
        found: dict[int, bytes] = {}
        for atype, value in parse_attrs(data, _HDR.size + _IFADDRMSG.size, len(data)):
            if atype in (IFA_ADDRESS, IFA_LOCAL):
                found[atype] = value
        raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
        if raw is None or len(raw) != (4 if fam == socket.AF_INET else 16):
            continue
        out.append((link, fam, prefixlen, socket.inet_ntop(fam, raw)))
    return out


# -- local routes (rtnetlink) ----------------------------------------------------------------

RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTA_DST = 1
RTA_OIF = 4
RTA_TABLE = 15
RT_TABLE_LOCAL = 255
RTN_LOCAL = 2
RT_SCOPE_HOST = 254
RTPROT_KERNEL = 2  # routes the kernel made for an address
# Marks the routes proxyd adds: adoption takes only these, a removal matches only these.
RTPROT_STATIC = 4
NETLINK_GET_STRICT_CHK = 12  # dumps filtered by the kernel (table, output link)
_RTMSG = struct.Struct("=BBBBBBBBI")
_U32_ATTR = struct.Struct("=HHI")
_U32 = struct.Struct("=I")


_AF_INET, _AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
_ROUTE_HEADERS = {  # family -> (rtmsg of an add or delete, RTA_DST attribute header)
    fam: (_RTMSG.pack(fam, size * 8, 0, 0, RT_TABLE_LOCAL, RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL, 0),
          _NLA.pack(_NLA.size + size, RTA_DST))
    for fam, size in ((_AF_INET, 4), (_AF_INET6, 16))
}
_ADD_OK = frozenset({errno.EEXIST})
_DEL_OK = frozenset({errno.ESRCH, errno.ENOENT})  # not there: IPv4 answers ESRCH, IPv6 ESRCH or ENOENT


def local_route_request(add: bool, index: int, ip: str, *, subject: object = None) -> Request:
    """Add (or delete) the ``local`` route of host ``ip`` (/32 or /128) via link ``index``, table local.

    What the kernel makes for an address, without the address: the IP is
    local (sockets bind it, packets to it are delivered here), and nothing is
    added to any device's address list. Packed with ``struct`` (10,000 per
    full sync). ``ValueError`` when ``ip`` is not an address. A delete matches only a route proxyd added
    (protocol ``static``), never the one the kernel keeps for an address.
    """
    family = _AF_INET6 if ":" in ip else _AF_INET
    header, dst = _ROUTE_HEADERS[family]
    try:
        raw = socket.inet_pton(family, ip)
    except (OSError, ValueError) as err:
        raise ValueError(f"not an IP address: {ip[:64]!r}") from err
    payload = header + dst + raw + _U32_ATTR.pack(_U32_ATTR.size, RTA_OIF, index)
    if add:
        return Request(payload, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, subject or ip, _ADD_OK)
    return Request(payload, RTM_DELROUTE, 0, subject or ip, _DEL_OK)


def dump_local_routes(sock: BatchSocket, index: int) -> list[tuple[int, str]]:
    """(family, address) of every host ``local`` route proxyd added via link ``index`` (table local).

    One dump per family. The kernel filters by table, type, protocol and
    link where it checks dump requests strictly (``NETLINK_GET_STRICT_CHK``,
    Linux ≥ 4.20); every reply is checked here again, so an older kernel's
    full dump gives the same answer.
    """
    try:
        sock.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
    except OSError:
        pass  # older kernel: unfiltered dumps, filtered below
    out: list[tuple[int, str]] = []
    filters = _U32_ATTR.pack(_U32_ATTR.size, RTA_TABLE, RT_TABLE_LOCAL) + _U32_ATTR.pack(_U32_ATTR.size,
                                                                                          RTA_OIF, index)
    base = _HDR.size + _RTMSG.size
    for family, size in ((_AF_INET, 4), (_AF_INET6, 16)):
        req = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_LOCAL, RTPROT_STATIC, 0, RTN_LOCAL, 0) + filters
        for _mtype, data in sock.dump(req, RTM_GETROUTE):
            if len(data) < base:
                continue
            fam, dst_len, _src, _tos, table, proto, _scope, rtype, _f = _RTMSG.unpack_from(data, _HDR.size)
            if fam != family or dst_len != size * 8 or rtype != RTN_LOCAL or proto != RTPROT_STATIC:
                continue
            dst = oif = None
            for atype, value in parse_attrs(data, base, len(data)):
                if atype == RTA_DST:
                    dst = value
                elif atype == RTA_OIF and len(value) == 4:
                    oif = _U32.unpack(value)[0]
                elif atype == RTA_TABLE and len(value) == 4:
                    table = _U32.unpack(value)[0]
            if oif == index and table == RT_TABLE_LOCAL and dst is not None and len(dst) == size:
                out.append((family, socket.inet_ntop(family, dst)))
    return out


# -- links (rtnetlink) -----------------------------------------------------------------------

RTM_NEWLINK = 16
RTM_GETLINK = 18
IFLA_IFNAME = 3
IFF_UP = 0x1
_IFINFOMSG = struct.Struct("=BxHiII")


def link_state(sock: BatchSocket, index: int) -> tuple[str, int] | None:
    """(name, flags) of link ``index``, or None when there is no such link. One request, no dump."""
    req = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
    try:
        replies = sock.dump(req, RTM_GETLINK, flags=NLM_F_ACK)
    except NetlinkBatchError as err:
        if err.errno == errno.ENODEV:
            return None
        raise
    for mtype, data in replies:
        if mtype != RTM_NEWLINK or len(data) < _HDR.size + _IFINFOMSG.size:
            continue
        _family, _type, link, flags, _change = _IFINFOMSG.unpack_from(data, _HDR.size)
        if link != index:
            continue
        for atype, value in parse_attrs(data, _HDR.size + _IFINFOMSG.size, len(data)):
            if atype == IFLA_IFNAME:
                return value.rstrip(b"\0").decode("utf-8", "replace"), flags
    return None
