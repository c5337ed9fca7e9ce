"""The netlink requests ipvs mode packs with ``struct`` are byte for byte what pyroute2 encodes.

pyroute2's message classes are the reference: each request (virtual and
real servers, ipset entries, ``kube-ipvs0`` addresses, both families) is
built again here through pyroute2 from its attribute list, as the applier
did before it packed them itself, and the two encodings must be equal.
Malformed and hostile objects raise ``ValueError``, which the applier turns
into a failure of that one object.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import pytest
from pyroute2.netlink.generic import ipvs as genl_ipvs
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_IPSET
from pyroute2.netlink.nfnetlink.ipset import IPSET_CMD_ADD, IPSET_CMD_DEL, ipset_msg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from proxyd import netlink
from proxyd.model import Protocol
from proxyd.modes.ipvs.applier import (
    FWD_MASQ,
    IPSET_PROTOCOL,
    IpvsApplier,
    dest_request,
    ipset_data,
    ipset_request,
    server_request,
)
from proxyd.modes.ipvs.planner import FLAG_PERSISTENT, FLAG_SOURCE_HASH, Op, RealServer, VirtualServer, VSKey

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
PROTO = {Protocol.TCP: 6, Protocol.UDP: 17, Protocol.SCTP: 132}
MASK = {4: "255.255.255.255", 6: socket.inet_ntoa((128).to_bytes(4, sys.byteorder))}


def _fam(ip: str) -> int:
    return 6 if ":" in ip else 4


def _msg(cmd: int, attrs: list[tuple[str, Any]]) -> Any:
    msg = genl_ipvs.ipvsmsg()
    msg["cmd"] = cmd
    msg["version"] = genl_ipvs.GENL_VERSION
    msg["attrs"] = attrs
    return msg


def _key(key: VSKey) -> list[tuple[str, Any]]:
    return [("IPVS_SVC_ATTR_AF", AF[_fam(key.ip)]), ("IPVS_SVC_ATTR_PROTOCOL", PROTO[key.protocol]),
            ("IPVS_SVC_ATTR_ADDR", key.ip), ("IPVS_SVC_ATTR_PORT", key.port)]


def reference(op: Op) -> Any:
    """The request as pyroute2 encodes it from attributes."""
    if op.kind == "delete_server":
        return _msg(genl_ipvs.IPVS_CMD_DEL_SERVICE, [("IPVS_CMD_ATTR_SERVICE", {"attrs": _key(op.args[0])})])
    if op.kind in ("add_server", "update_server"):
        vs: VirtualServer = op.args[0]
        attrs = [*_key(vs.key), ("IPVS_SVC_ATTR_SCHED_NAME", vs.scheduler),
                 ("IPVS_SVC_ATTR_FLAGS", {"flags": vs.flags, "mask": 0xFFFFFFFF}),
                 ("IPVS_SVC_ATTR_TIMEOUT", vs.timeout), ("IPVS_SVC_ATTR_NETMASK", MASK[_fam(vs.key.ip)])]
        cmd = genl_ipvs.IPVS_CMD_NEW_SERVICE if op.kind == "add_server" else genl_ipvs.IPVS_CMD_SET_SERVICE
        return _msg(cmd, [("IPVS_CMD_ATTR_SERVICE", {"attrs": attrs})])
    key, server = op.args[0], op.args[1]
    service = ("IPVS_CMD_ATTR_SERVICE", {"attrs": _key(key)})
    dest: list[tuple[str, Any]] = [("IPVS_DEST_ATTR_ADDR_FAMILY", AF[_fam(server.ip)]),
                                   ("IPVS_DEST_ATTR_ADDR", server.ip), ("IPVS_DEST_ATTR_PORT", server.port)]
    if op.kind == "delete_dest":
        return _msg(genl_ipvs.IPVS_CMD_DEL_DEST, [service, ("IPVS_CMD_ATTR_DEST", {"attrs": dest})])
    dest += [("IPVS_DEST_ATTR_FWD_METHOD", FWD_MASQ), ("IPVS_DEST_ATTR_WEIGHT", op.args[2]),
             ("IPVS_DEST_ATTR_U_THRESH", 0), ("IPVS_DEST_ATTR_L_THRESH", 0)]
    cmd = genl_ipvs.IPVS_CMD_NEW_DEST if op.kind == "add_dest" else genl_ipvs.IPVS_CMD_SET_DEST
    return _msg(cmd, [service, ("IPVS_CMD_ATTR_DEST", {"attrs": dest})])


def _bytes(req: netlink.Request, seq: int = 7) -> bytes:
    return netlink.encode(req, seq)


def _ref_bytes(msg: Any, req: netlink.Request, seq: int = 7) -> bytes:
    return netlink.encode(netlink.Request(msg, req.msg_type, req.flags, req.subject), seq)


CASES = [
    (VSKey("10.96.0.10", 80, Protocol.TCP), RealServer("10.244.1.11", 8080), VirtualServer(
        VSKey("10.96.0.10", 80, Protocol.TCP), "rr", 0, 0)),
    (VSKey("10.96.0.53", 53, Protocol.UDP), RealServer("10.244.1.2", 5353), VirtualServer(
        VSKey("10.96.0.53", 53, Protocol.UDP), "sh", FLAG_PERSISTENT, 10800)),
    (VSKey("192.0.2.1", 65535, Protocol.SCTP), RealServer("10.244.9.9", 1), VirtualServer(
        VSKey("192.0.2.1", 65535, Protocol.SCTP), "mh", FLAG_SOURCE_HASH, 0)),
    (VSKey("2001:db8::a", 443, Protocol.TCP), RealServer("2001:db8:1::5", 8443), VirtualServer(
        VSKey("2001:db8::a", 443, Protocol.TCP), "wlc", FLAG_PERSISTENT, 60)),
]


@pytest.mark.parametrize(("key", "server", "vs"), CASES, ids=lambda c: str(c))
def test_ipvs_requests_are_pyroute2s_bytes(key: VSKey, server: RealServer, vs: VirtualServer) -> None:
    for op in (Op("add_server", (vs,)), Op("update_server", (vs,)), Op("delete_server", (key,)),
               Op("add_dest", (key, server, 1)), Op("set_weight", (key, server, 0)),
               Op("delete_dest", (key, server))):
        req = (server_request if "server" in op.kind else dest_request)(42, op)
        assert isinstance(req.msg, bytes) and req.subject is op
        assert _bytes(req) == _ref_bytes(reference(op), req), op


@pytest.mark.parametrize(("set_type", "entry", "family"), [
    ("bitmap:port", "30080", 4), ("bitmap:port", "0", 4), ("hash:ip", "10.96.0.1", 4),
    ("hash:ip,port", "10.96.0.1,udp:53", 4), ("hash:ip,port", "10.96.0.1,sctp:65535", 4),
    ("hash:ip,port,ip", "10.244.1.2,tcp:80,10.244.1.2", 4),
    ("hash:ip,port,net", "10.96.0.1,tcp:80,192.0.2.0/24", 4),
    ("hash:ip,port,net", "10.96.0.1,tcp:80,192.0.2.7", 4),
    ("hash:ip", "2001:db8::9", 6), ("hash:ip,port", "2001:db8::1,tcp:80", 6),
    ("hash:ip,port,ip", "2001:db8::2,udp:53,2001:db8::2", 6),
    ("hash:ip,port,net", "2001:db8::1,tcp:80,2001:db8:203::/64", 6),
])
def test_ipset_requests_are_pyroute2s_bytes(set_type: str, entry: str, family: int) -> None:
    for add in (True, False):
        req = ipset_request(add, "KUBE-TEST", set_type, entry, family=family)
        msg = ipset_msg()
        msg["nfgen_family"] = AF[family]
        msg["attrs"] = [("IPSET_ATTR_PROTOCOL", IPSET_PROTOCOL), ("IPSET_ATTR_SETNAME", "KUBE-TEST"),
                        ("IPSET_ATTR_DATA", {"attrs": ipset_data(set_type, entry)})]
        cmd = IPSET_CMD_ADD if add else IPSET_CMD_DEL
        assert req.msg_type == cmd | (NFNL_SUBSYS_IPSET << 8)
        assert _bytes(req) == _ref_bytes(msg, req)


@pytest.mark.parametrize("ip", ["10.96.0.1", "203.0.113.255", "2001:db8::5"])
def test_address_requests_are_pyroute2s_bytes(ip: str) -> None:
    for add in (True, False):
        req = netlink.address_request(add, 7, ip)
        msg = ifaddrmsg()
        msg["family"] = AF[_fam(ip)]
        msg["prefixlen"] = 128 if _fam(ip) == 6 else 32
        msg["index"] = 7
        attrs: list[tuple[str, Any]] = [("IFA_LOCAL", ip), ("IFA_ADDRESS", ip)]
        if add and _fam(ip) == 6:
            attrs.append(("IFA_FLAGS", netlink.IFA_F_NODAD))
        msg["attrs"] = attrs
        assert _bytes(req) == _ref_bytes(msg, req)


K = VSKey("10.96.0.10", 80, Protocol.TCP)
S = RealServer("10.244.1.1", 8080)
HOSTILE_OPS = [
    Op("add_server", (VirtualServer(VSKey("10.96.0.300", 80, Protocol.TCP), "rr"),)),
    Op("add_server", (VirtualServer(VSKey("not-an-ip" * 1000, 80, Protocol.TCP), "rr"),)),
    Op("add_server", (VirtualServer(VSKey("10.96.0.1", 70000, Protocol.TCP), "rr"),)),
    Op("add_server", (VirtualServer(K, "rr", 0, 2**40),)),
    Op("add_server", (VirtualServer(K, "rr\u00e9"),)),
    Op("add_dest", (K, RealServer("10.244.1.1", -1), 1)),
    Op("add_dest", (K, RealServer("::ffff:zz", 80), 1)),
    Op("add_dest", (K, S, 2**33)),
    Op("delete_dest", (K, RealServer("", 80))),
]


@pytest.mark.parametrize("op", HOSTILE_OPS, ids=lambda op: str(op)[:40])
def test_hostile_ipvs_objects_raise_value_error(op: Op) -> None:
    with pytest.raises(ValueError):
        (server_request if "server" in op.kind else dest_request)(42, op)


class CountingSocket:
    """Stands in for the IPVS batch socket: every request it is handed applies."""

    def __init__(self) -> None:
        self.sent: list[netlink.Request] = []

    def run(self, requests: list[netlink.Request], **_: Any) -> netlink.BatchResult:
        self.sent += requests
        return netlink.BatchResult(applied=len(requests))


def test_a_hostile_object_fails_alone_in_its_batch() -> None:
    good = [Op("add_dest", (K, RealServer(f"10.244.1.{i}", 8080), 1)) for i in range(1, 6)]
    ops = [*good[:2], *HOSTILE_OPS, *good[2:]]
    applier = IpvsApplier()
    try:
        applier._family_id = 42  # no kernel here: the family id is the kernel's, any number encodes
        sock = CountingSocket()
        applier._batch["ipvs"] = sock  # type: ignore[assignment]
        failed = applier.apply(ops)
    finally:
        applier._batch.clear()
        applier._pool.shutdown(wait=False)
    assert failed == set(HOSTILE_OPS)
    assert [r.subject for r in sock.sent] == good
    assert all(op in applier.refusals for op in HOSTILE_OPS)


@pytest.mark.parametrize(("set_type", "entry"), [
    ("hash:ip,port", "10.0.0.1,tcp:70000"), ("hash:ip", "300.1.1.1"), ("hash:ip", "x" * 100_000),
    ("hash:ip,port,net", "10.0.0.1,tcp:80,10.0.0.0/999"), ("bitmap:port", "99999999"),
    ("hash:ip,port", "10.0.0.1,icmp:1"),
])
def test_hostile_ipset_entries_raise_value_error(set_type: str, entry: str) -> None:
    with pytest.raises(ValueError):
        ipset_request(True, "S", set_type, entry)


@pytest.mark.parametrize("ip", ["", "10.0.0", "10.0.0.256", "fe80::1%eth0", "a" * 100_000])
def test_hostile_addresses_raise_value_error(ip: str) -> None:
    with pytest.raises(ValueError):
        netlink.address_request(True, 7, ip)
