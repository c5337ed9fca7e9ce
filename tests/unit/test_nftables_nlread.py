"""``nlread``: nf_tables set element messages decoded by key, built here byte by byte (no root).

The encodings follow linux/netfilter/nf_tables.h; the netns tests read a
real kernel's dumps through the same code (``tests/netns/test_operability.py``:
``proxyd status NAME`` and ``proxyd trace`` in nftables mode).
"""

from __future__ import annotations

import struct

import pytest

from proxyd.modes.nftables import layout as lay
from proxyd.modes.nftables import nlread as nl

V4, V6 = lay.Family(4), lay.Family(6)
NESTED = 0x8000
BACKENDS = ("addr", "proto", "port", "index")


def attr(atype: int, value: bytes, nested: bool = False) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), atype | (NESTED if nested else 0)) + value
    return raw + b"\0" * (-len(raw) % 4)


def verdict(code: int, chain: str | None = None) -> bytes:
    inner = attr(nl.VERDICT_CODE, struct.pack(">i", code))
    if chain:
        inner += attr(nl.VERDICT_CHAIN, chain.encode() + b"\0")
    return attr(nl.DATA_VERDICT, inner, True)


def counter(packets: int, nbytes: int) -> bytes:
    data = attr(nl.COUNTER_BYTES, struct.pack(">Q", nbytes))
    data += attr(nl.COUNTER_PACKETS, struct.pack(">Q", packets))
    return attr(nl.EXPR_NAME, b"counter\0") + attr(nl.EXPR_DATA, data, True)


def element(key: bytes, data: bytes | None = None, expr: bytes | None = None, *,
            listed: bool = True) -> bytes:
    inner = attr(nl.ELEM_KEY, attr(nl.DATA_VALUE, key), True)
    if data is not None:
        inner += attr(nl.ELEM_DATA, data, True)
    if expr is not None:
        inner += (attr(nl.ELEM_EXPRESSIONS, attr(1, expr, True), True) if listed
                  else attr(nl.ELEM_EXPR, expr, True))
    return attr(nl.LIST_ELEM, inner, True)


def message(set_name: str, *elements: bytes) -> bytes:
    body = struct.pack("=BBH", 2, 0, 0) + attr(nl.LIST_TABLE, b"proxyd\0")
    body += attr(nl.LIST_SET, set_name.encode() + b"\0")
    body += attr(nl.LIST_ELEMENTS, b"".join(elements), True)
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | 12, 2, 1, 0) + body


@pytest.mark.parametrize("text,fields,fam,size", [
    ("10.96.0.5 . tcp . 80 . 3", BACKENDS, V4, 16),
    ("2001:db8::5 . udp . 53 . 0", BACKENDS, V6, 28),
    ("tcp . 30080 . 1", ("proto", "port", "index"), V4, 12),
    ("10.96.0.1", ("addr",), V4, 4),
    ("10.244.1.2 . 10.244.1.2", ("addr", "addr"), V4, 8),
    ("10.0.0.1 . 8080", ("addr", "port"), V4, 8),
])
def test_keys_round_trip(text: str, fields: tuple[str, ...], fam: lay.Family, size: int) -> None:
    raw = nl.encode_key(text, fields, fam)
    assert len(raw) == size and nl.decode_key(raw, fields, fam) == text


def test_key_layout_is_the_kernels() -> None:
    raw = nl.encode_key("10.96.0.5 . tcp . 80 . 3", BACKENDS, V4)
    assert raw == bytes([10, 96, 0, 5, 6, 0, 0, 0, 0, 80, 0, 0]) + struct.pack("=I", 3)


@pytest.mark.parametrize("text,fields,fam", [
    ("10.96.0.5 . tcp", BACKENDS, V4), ("2001:db8::1", ("addr",), V4), ("10.0.0.1", ("addr",), V6),
    ("not-an-ip", ("addr",), V4), ("10.0.0.1 . 70000", ("addr", "port"), V4),
])
def test_bad_keys_are_refused(text: str, fields: tuple[str, ...], fam: lay.Family) -> None:
    with pytest.raises((ValueError, struct.error)):
        nl.encode_key(text, fields, fam)


def test_a_message_decodes_to_elements_with_values_and_counters() -> None:
    key0 = nl.encode_key("10.96.0.5 . tcp . 80 . 0", BACKENDS, V4)
    key1 = nl.encode_key("10.96.0.5 . tcp . 80 . 1", BACKENDS, V4)
    value = attr(nl.DATA_VALUE, nl.encode_key("10.244.1.2 . 8080", ("addr", "port"), V4))
    msg = message("svc-backends-tcp", element(key0, value, counter(3, 180)),
                  element(key1, value, counter(4, 240), listed=False))
    assert list(nl.decode_message(msg, "svc-backends-tcp", V4)) == [
        ("10.96.0.5 . tcp . 80 . 0", "10.244.1.2 . 8080", (3, 180)),
        ("10.96.0.5 . tcp . 80 . 1", "10.244.1.2 . 8080", (4, 240))]
    svc = nl.encode_key("10.96.0.5 . tcp . 80", ("addr", "proto", "port"), V4)
    dns = nl.encode_key("10.96.0.6 . udp . 53", ("addr", "proto", "port"), V4)
    verdicts = message("service-ips", element(svc, verdict(-4, "svc-int")), element(dns, verdict(0)))
    assert [(k, v) for k, v, _ in nl.decode_message(verdicts, "service-ips", V4)] == [
        ("10.96.0.5 . tcp . 80", "goto svc-int"), ("10.96.0.6 . udp . 53", "drop")]


@pytest.mark.parametrize("msg", [
    b"short",
    message("service-ips", element(b"\x01\x02\x03", verdict(-4, "x"))),  # key of the wrong size
    message("service-ips", element(nl.encode_key("10.0.0.1 . tcp . 80", ("addr", "proto", "port"), V4),
                                   verdict(-42))),  # unknown verdict
    message("service-ips", element(nl.encode_key("10.0.0.1 . tcp . 80", ("addr", "proto", "port"), V4))),
    message("cluster-ips", element(bytes(4), verdict(0))),  # a value in a set
    message("cluster-ips", attr(7, b"junk")),  # not an element
])
def test_malformed_messages_are_refused(msg: bytes) -> None:
    set_name = "cluster-ips" if b"cluster-ips" in msg else "service-ips"
    with pytest.raises(ValueError):
        list(nl.decode_message(msg, set_name, V4))


def test_raw_set_decodes_only_the_messages_holding_a_key() -> None:
    def msg(first: int) -> bytes:
        return message("cluster-ips", *(element(nl.encode_key(f"10.96.0.{i}", ("addr",), V4))
                                        for i in range(first, first + 10)))

    raw = nl.RawSet(V4, "cluster-ips", [msg(0), msg(10), message("cluster-ips", attr(7, b"junk"))])
    assert "10.96.0.12" in raw and raw.get("10.96.0.3", "x") is None and "10.96.0.99" not in raw
    assert raw.get("not an address", "absent") == "absent"
    assert len(raw._pending) == 1  # the broken message is never decoded for these lookups
    with pytest.raises(ValueError):
        list(raw)  # iterating decodes everything, the broken message included


def test_unknown_sets_are_not_dumped() -> None:
    with pytest.raises(ValueError):
        nl.dump(V4, "firewall-allow")
    assert all(name in nl.KEYS for name in nl.KEYS if "backends" in name)
    assert set(nl.KEYS) >= {lay.backends_map(p, proto) for p in lay.PICKS for proto in lay.PROTOCOLS}
