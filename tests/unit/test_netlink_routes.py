"""proxyd.netlink without a kernel: packed ``local`` route requests, one-ACK-per-chunk batches, dump parsing.

A fake socket stands in for the kernel: it answers each request the way
rtnetlink does (an error answer for a failed request whether or not it asked
an ACK, an ACK of success only when asked) and can drop answers the way a
full receive buffer does (``ENOBUFS`` on the next ``recv``). The real kernel
runs the same requests in tests/netns/test_netlink.py.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from proxyd import netlink
from proxyd.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLMSG_DONE,
    NLMSG_ERROR,
    RT_SCOPE_HOST,
    RT_TABLE_LOCAL,
    RTM_DELROUTE,
    RTM_GETROUTE,
    RTM_NEWROUTE,
    RTN_LOCAL,
    RTPROT_KERNEL,
    RTPROT_STATIC,
    BatchSocket,
    dump_local_routes,
    encode,
    local_route_request,
    parse_attrs,
)

HDR = struct.Struct("=IHHII")
RTMSG = struct.Struct("=BBBBBBBBI")


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each message in ``data``."""
    off = 0
    while off + HDR.size <= len(data):
        length, mtype, flags, seq, _pid = HDR.unpack_from(data, off)
        yield mtype, flags, seq, data[off + HDR.size:off + length]
        off += (length + 3) & ~3


def error_answer(seq: int, code: int) -> bytes:
    body = struct.pack("=i", -code) + HDR.pack(HDR.size, 0, 0, seq, 0)
    return HDR.pack(HDR.size + len(body), NLMSG_ERROR, 0x100, seq, 0) + body


class FakeKernel:
    """The socket under a BatchSocket: ``verdict(payload) -> errno`` decides each request."""

    def __init__(self, verdict: Callable[[bytes], int], *, drop_after: int | None = None) -> None:
        self.verdict = verdict
        self.queue: list[bytes] = []
        self.sent: list[tuple[int, int, bytes]] = []  # (type, flags, payload) of every request
        self.drop_after = drop_after  # answers that fit the "receive buffer" of one send
        self.overrun = False
        self.replies: list[bytes] = []  # dump replies, served after a dump request

    def send(self, data: bytes) -> int:
        queued = 0
        for mtype, flags, seq, payload in messages(data):
            self.sent.append((mtype, flags, payload))
            if mtype == RTM_GETROUTE:
                self.queue.append(b"".join(r[:8] + struct.pack("=I", seq) + r[12:] for r in self.replies)
                                  + HDR.pack(HDR.size + 4, NLMSG_DONE, 2, seq, 0) + b"\0" * 4)
                continue
            code = self.verdict(payload)
            if code or flags & NLM_F_ACK:
                if self.drop_after is not None and queued >= self.drop_after:
                    self.overrun = True
                    continue
                self.queue.append(error_answer(seq, code))
                queued += 1
        return len(data)

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self.overrun:
            self.overrun = False
            raise OSError(errno.ENOBUFS, "No buffer space available")
        if not self.queue:
            raise BlockingIOError
        return self.queue.pop(0)

    def setsockopt(self, *args: object) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def no_select(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake has answered everything before select would be asked.
    monkeypatch.setattr(netlink, "_readable", lambda sock, timeout: True)


def batch_socket(kernel: FakeKernel, **kwargs: int) -> BatchSocket:
    sock = BatchSocket.__new__(BatchSocket)
    sock.kind = "route"
    sock.protocol = 0
    sock.chunk_bytes = kwargs.get("chunk_bytes", netlink.CHUNK_BYTES)
    sock.chunk_messages = kwargs.get("chunk_messages", netlink.CHUNK_MESSAGES)
    sock.sock = kernel  # type: ignore[assignment]
    sock._seq = 0
    sock._read_size = 1 << 16
    return sock


def route_fields(payload: bytes) -> tuple[tuple[int, ...], dict[int, bytes]]:
    return RTMSG.unpack_from(payload), dict(parse_attrs(payload, RTMSG.size, len(payload)))


def dst_of(payload: bytes) -> str:
    header, attrs = route_fields(payload)
    return socket.inet_ntop(header[0], attrs[1])


# -- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("ip", "family", "size"), [("10.96.0.10", socket.AF_INET, 4),
                                                    ("fd00:96::a", socket.AF_INET6, 16)])
def test_local_route_request_is_what_ip_route_add_local_sends(ip: str, family: int, size: int) -> None:
    add = local_route_request(True, 7, ip)
    assert add.msg_type == RTM_NEWROUTE and add.flags == NLM_F_CREATE | NLM_F_EXCL
    assert add.subject == ip and errno.EEXIST in add.ok
    header, attrs = route_fields(add.msg)
    assert header == (family, size * 8, 0, 0, RT_TABLE_LOCAL, RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL, 0)
    assert attrs == {1: socket.inet_pton(family, ip), 4: struct.pack("=I", 7)}
    delete = local_route_request(False, 7, ip, subject="svc")
    assert delete.msg_type == RTM_DELROUTE and delete.flags == 0 and delete.subject == "svc"
    assert delete.ok == {errno.ESRCH, errno.ENOENT}
    # A delete names the protocol: it can only ever match a route proxyd added.
    assert route_fields(delete.msg)[0][5] == RTPROT_STATIC


@pytest.mark.parametrize("bad", ["", "10.96.0", "10.96.0.256", "fd00:::1", "10.96.0.1/32", "x" * 10_000,
                                 "1.2.3.4\0", "::ffff:1.2.3.4.5"])
def test_malformed_address_text_is_refused_when_the_request_is_built(bad: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        local_route_request(True, 1, bad)


def test_packed_payload_gets_its_header_and_ack_flag() -> None:
    req = local_route_request(True, 3, "10.96.0.1")
    data = encode(req, 42)
    length, mtype, flags, seq, pid = HDR.unpack_from(data)
    assert (length, mtype, seq, pid) == (len(data), RTM_NEWROUTE, 42, 0)
    assert flags & NLM_F_ACK and flags & NLM_F_CREATE and data[HDR.size:] == req.msg
    assert not HDR.unpack_from(encode(req, 43, ack=False))[2] & NLM_F_ACK


# -- one ACK per chunk ------------------------------------------------------------------------


def ips(n: int) -> list[str]:
    return [f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}" for i in range(n)]


def test_one_ack_per_chunk_and_a_failure_in_the_middle_fails_alone() -> None:
    wanted = ips(1000)
    bad = {wanted[500], wanted[501]}
    kernel = FakeKernel(lambda p: errno.EINVAL if dst_of(p) in bad else 0)
    result = batch_socket(kernel).run([local_route_request(True, 1, ip) for ip in wanted], ack_each=False,
                                      log_failures=False)
    assert result.applied == 998 and result.resent == 0
    assert sorted((f.subject, f.code) for f in result.failures) == sorted((ip, errno.EINVAL) for ip in bad)
    asked = [flags & NLM_F_ACK for _t, flags, _p in kernel.sent]
    # Only each chunk's last request asked an ACK: one per chunk.
    assert sum(1 for a in asked if a) == result.chunks == -(-1000 // netlink.CHUNK_MESSAGES)
    assert asked[-1]


def test_harmless_errors_count_as_applied_without_acks() -> None:
    kernel = FakeKernel(lambda p: errno.EEXIST)
    result = batch_socket(kernel).run([local_route_request(True, 1, ip) for ip in ips(300)], ack_each=False)
    assert result.applied == 300 and not result.failures


def test_dropped_answers_send_the_chunk_again_and_count_each_failure_once() -> None:
    """Every request fails and only 3 answers fit per send: chunks shrink until every answer is read."""
    kernel = FakeKernel(lambda p: errno.ENODEV, drop_after=3)
    result = batch_socket(kernel).run([local_route_request(True, 99, ip) for ip in ips(400)], ack_each=False,
                                      log_failures=False)
    assert result.resent > 0 and result.applied == 0
    assert sorted(f.subject for f in result.failures) == sorted(ips(400))  # each once, none lost


def test_answers_lost_with_the_closing_ack_resend_only_what_is_unknown() -> None:
    # The first chunk's answers are all dropped (its closing ACK too): it is sent again whole.
    state = {"first": True}

    def verdict(payload: bytes) -> int:
        return 0

    kernel = FakeKernel(verdict, drop_after=0)
    sock = batch_socket(kernel, chunk_messages=50)
    original_send = kernel.send

    def send_once_dropping(data: bytes) -> int:
        if state["first"]:
            state["first"] = False
            return original_send(data)
        kernel.drop_after = None
        return original_send(data)

    kernel.send = send_once_dropping  # type: ignore[method-assign]
    result = sock.run([local_route_request(True, 1, ip) for ip in ips(120)], ack_each=False)
    assert result.applied == 120 and not result.failures and result.resent == 50


# -- dumps ------------------------------------------------------------------------------------


def route_reply(ip: str, *, oif: int = 5, proto: int = RTPROT_STATIC, rtype: int = RTN_LOCAL,
                table: int = RT_TABLE_LOCAL, dst_len: int | None = None, dst: bytes | None = None,
                extra: bytes = b"") -> bytes:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    raw = socket.inet_pton(family, ip) if dst is None else dst
    body = RTMSG.pack(family, len(raw) * 8 if dst_len is None else dst_len, 0, 0, min(table, 255), proto,
                      RT_SCOPE_HOST, rtype, 0)
    body += struct.pack("=HHI", 8, 15, table)  # RTA_TABLE
    body += struct.pack("=HH", 4 + len(raw), 1) + raw + b"\0" * ((4 - len(raw) % 4) % 4)
    body += struct.pack("=HHI", 8, 4, oif) + extra
    return HDR.pack(HDR.size + len(body), 24, 2, 0, 0) + body


def test_dump_keeps_only_proxyds_host_local_routes_via_the_link() -> None:
    kernel = FakeKernel(lambda p: 0)
    kernel.replies = [
        route_reply("10.96.0.1"), route_reply("fd00:96::1"),
        route_reply("10.96.0.2", oif=6),  # another link
        route_reply("10.96.0.3", proto=RTPROT_KERNEL),  # the kernel's route of an address
        route_reply("10.96.0.4", rtype=1),  # unicast
        route_reply("10.96.0.5", table=254),  # main table
        route_reply("10.96.0.0", dst_len=24),  # not a host route
        route_reply("10.96.0.6", dst=b"\x0a\x60"),  # truncated address
        route_reply("10.96.0.7", extra=b"\xff\xff\x01\x00"),  # a garbage attribute after the good ones
    ]
    found = dump_local_routes(batch_socket(kernel), 5)
    assert sorted(found) == [(socket.AF_INET, "10.96.0.1"), (socket.AF_INET, "10.96.0.7"),
                             (socket.AF_INET6, "fd00:96::1")]
    # Both dumps asked the kernel to filter: table local, via link 5.
    dumps = [payload for mtype, _f, payload in kernel.sent if mtype == RTM_GETROUTE]
    assert len(dumps) == 2
    for payload in dumps:
        header, attrs = route_fields(payload)
        assert header[4] == RT_TABLE_LOCAL and attrs[15] == struct.pack("=I", 255)
        assert attrs[4] == struct.pack("=I", 5)


def test_dump_survives_hostile_replies() -> None:
    kernel = FakeKernel(lambda p: 0)
    short = HDR.pack(HDR.size + 4, 24, 2, 0, 0) + b"\0" * 4  # shorter than an rtmsg
    lying = bytearray(route_reply("10.96.0.9"))
    struct.pack_into("=H", lying, HDR.size + RTMSG.size + 8, 0xFFFF)  # RTA_DST longer than the message
    kernel.replies = [short, bytes(lying), route_reply("10.96.0.8")]
    assert dump_local_routes(batch_socket(kernel), 5) == [(socket.AF_INET, "10.96.0.8")]


def test_dump_of_many_routes() -> None:
    kernel = FakeKernel(lambda p: 0)
    kernel.replies = [route_reply(ip) for ip in ips(20_000)]
    found = dump_local_routes(batch_socket(kernel), 5)
    assert len(found) == 20_000 and found[-1] == (socket.AF_INET, ips(20_000)[-1])
