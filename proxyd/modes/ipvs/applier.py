"""ipvs mode's applier: the only code of the mode that talks to the kernel.

Changes to IPVS virtual and real servers, ipset entries and the addresses
on the ``kube-ipvs0`` dummy device are the mode's operations (``Op``, from
the pure ``planner.diff``), run by ``apply`` as netlink batches
(``proxyd.netlink``: requests packed here with ``struct`` in the layout
pyroute2's message classes give them, many per send, one bad object
failing alone). Reads, set creation and the
graceful-termination checks use pyroute2's sockets; sysctls go through
/proc/sys. Those methods are blocking and are called from one dedicated
worker thread (``IpvsApplier.call``), so the event loop never waits on the
kernel and calls never interleave; pyroute2 sockets are opened in that
thread and stay there. The small fixed iptables ruleset and its jumps go
through the shared netfilter layer (``proxyd.netfilter``: back-end
detection, asynchronous ``iptables-restore --noflush``), as in iptables mode.

The applier reads what the kernel holds (``read_servers``, ``read_sets``,
``read_bound``) so that the mode can diff against it and change only
differences: nothing is ever flushed except by ``cleanup``.

One applier serves one address family (``family``), as its mode instance
does: the IPv4 and IPv6 instances share ``kube-ipvs0`` and the IPVS table,
so every read is filtered by family (each instance sees, diffs and deletes
only its family's addresses and virtual servers), the IPv6 sets carry
kube-proxy's ``KUBE-6-`` names (``planner.set_name``; plans use the IPv4
names, mapped here) and the rules go through ``ip6tables``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import logging
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from pyroute2 import IPRoute, IPSet
from pyroute2.ipset import PortEntry
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket
from pyroute2.netlink.generic import ipvs as genl_ipvs
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_IPSET
from pyroute2.netlink.nfnetlink.ipset import IPSET_CMD_ADD, IPSET_CMD_DEL

from proxyd import metrics
from proxyd.model import Protocol
from proxyd.model import family as ip_family
from proxyd.modes.ipvs.planner import (
    DEVICE,
    FILTER_CHAINS,
    FLAG_HASHED,
    IPSET_BY_NAME,
    IPSETS,
    JUMPS,
    NAT_CHAINS,
    Op,
    RealServer,
    VirtualServer,
    VSKey,
    host_bits,
    set_name,
)
from proxyd.netfilter import Backend, Netfilter, cleanup_everywhere, detect
from proxyd.netlink import (
    NETLINK_GENERIC,
    NETLINK_NETFILTER,
    NETLINK_ROUTE,
    BatchSocket,
    NetlinkBatchError,
    Request,
    address_request,
    dump_addresses,
    parse_attrs,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

FWD_MASQ = 0  # IP_VS_CONN_F_MASQ (pyroute2's IPVSDest would default to 3, direct routing)
IPSET_EXIST = 4103  # IPSET_ERR_EXIST: element already added / not added
_PROTO_NUM = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP, Protocol.SCTP: 132}
_NUM_PROTO = {v: k for k, v in _PROTO_NUM.items()}
_PROTO_BY_NAME = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": 132}
_NAME_BY_PROTO = {v: k for k, v in _PROTO_BY_NAME.items()}


@dataclass(frozen=True, slots=True)
class KernelDest:
    """A real server as the kernel reports it."""

    server: RealServer
    weight: int
    fwd_method: int
    active: int
    inactive: int


# --- ipset entry text <-> pyroute2 -----------------------------------------------------------

def _port_entry(text: str) -> PortEntry:
    proto, _, port = text.partition(":")
    if proto not in _PROTO_BY_NAME or not port.isdigit():
        raise ValueError(f"bad proto:port {text!r}")
    return PortEntry(int(port), _PROTO_BY_NAME[proto])


IPSET_PROTOCOL = 6  # the oldest protocol revision every kernel with ipset accepts


_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_FAMILY_OF_AF = {socket.AF_INET: 4, socket.AF_INET6: 6}


def _ip_attr(ip: str) -> dict[str, Any]:
    kind = "IPSET_ATTR_IPADDR_IPV6" if ip_family(ip) == 6 else "IPSET_ATTR_IPADDR_IPV4"
    return {"attrs": [(kind, ip)]}


def ipset_data(set_type: str, entry: str) -> list[tuple[str, Any]]:
    """IPSET_ATTR_DATA attributes of an entry in ``ipset save`` text; ValueError when it does not fit."""
    parts = entry.split(",")
    if set_type == "bitmap:port" and len(parts) == 1 and parts[0].isdigit():
        return [("IPSET_ATTR_PORT_FROM", int(parts[0]))]
    if set_type == "hash:ip" and len(parts) == 1:
        return [("IPSET_ATTR_IP_FROM", _ip_attr(parts[0]))]
    tuple_types = ("hash:ip,port", "hash:ip,port,ip", "hash:ip,port,net")
    if set_type in tuple_types and len(parts) == set_type.count(",") + 1:
        port = _port_entry(parts[1])
        data: list[tuple[str, Any]] = [("IPSET_ATTR_IP_FROM", _ip_attr(parts[0])),
                                       ("IPSET_ATTR_PORT_FROM", port.port),
                                       ("IPSET_ATTR_PROTO", port.protocol)]
        if len(parts) == 3:
            ip2, _, cidr = parts[2].partition("/")
            data.append(("IPSET_ATTR_IP2", _ip_attr(ip2)))
            if set_type == "hash:ip,port,net":
                data.append(("IPSET_ATTR_CIDR2", int(cidr) if cidr else host_bits(ip_family(ip2))))
        return data
    raise ValueError(f"entry {entry!r} does not fit a {set_type} set")


_NLA_HDR = struct.Struct("=HH")


def _attr(atype: int, value: bytes) -> bytes:
    """One netlink attribute: header, value, padding to 4 bytes."""
    size = _NLA_HDR.size + len(value)
    return _NLA_HDR.pack(size, atype) + value + b"\0" * (-size % 4)


# ipset attribute numbers (include/uapi/linux/netfilter/ipset/ip_set.h) and flags, for packing requests.
_NLA_F_NESTED, _NLA_F_NET_BYTEORDER = 1 << 15, 1 << 14
_IPSET_ATTR_PROTOCOL, _IPSET_ATTR_SETNAME, _IPSET_ATTR_DATA = 1, 2, 7
_IPSET_IPADDR = {"IPSET_ATTR_IPADDR_IPV4": (1, socket.AF_INET),
                 "IPSET_ATTR_IPADDR_IPV6": (2, socket.AF_INET6)}
_IPSET_DATA = {  # name in ``ipset_data`` -> (attribute type with its flags, value packer)
    "IPSET_ATTR_IP_FROM": (1 | _NLA_F_NESTED, None),
    "IPSET_ATTR_IP2": (20 | _NLA_F_NESTED, None),
    "IPSET_ATTR_PORT_FROM": (4 | _NLA_F_NET_BYTEORDER, struct.Struct("!H").pack),
    "IPSET_ATTR_PROTO": (7 | _NLA_F_NET_BYTEORDER, struct.Struct("!B").pack),
    "IPSET_ATTR_CIDR2": (21 | _NLA_F_NET_BYTEORDER, struct.Struct("!B").pack),
}
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id


def _ipset_value(name: str, value: Any) -> bytes:
    """One IPSET_ATTR_DATA attribute of ``ipset_data``'s list, packed."""
    atype, pack = _IPSET_DATA[name]
    if pack is not None:
        return _attr(atype, pack(value))
    (kind, ip), = value["attrs"]
    inner, af = _IPSET_IPADDR[kind]
    try:
        raw = socket.inet_pton(af, ip)
    except (OSError, ValueError) as err:
        raise ValueError(f"not an IP address: {str(ip)[:64]!r}") from err
    return _attr(atype, _attr(inner | _NLA_F_NET_BYTEORDER, raw))


def ipset_request(add: bool, name: str, set_type: str, entry: str, *, subject: object = None,
                  family: int = 4) -> Request:
    """Add (or delete) one entry of set ``name`` (its kernel name: ``set_name``) of a ``family`` set; an
    entry already there (or already gone) is harmless.

    Packed with ``struct`` in the layout pyroute2's ``ipset_msg`` gives it (as the IPVS requests below:
    one per service in a full sync); ``ValueError`` when the entry does not fit the set type.
    """
    try:
        data = b"".join(_ipset_value(attr, value) for attr, value in ipset_data(set_type, entry))
        setname = name.encode("ascii") + b"\0"
        payload = (_NFGEN.pack(_AF[family], 0, 0) + _attr(_IPSET_ATTR_PROTOCOL, bytes((IPSET_PROTOCOL,)))
                   + _attr(_IPSET_ATTR_SETNAME, setname) + _attr(_IPSET_ATTR_DATA | _NLA_F_NESTED, data))
    except struct.error as err:
        raise ValueError(f"entry {entry!r}: {err}") from err
    cmd = IPSET_CMD_ADD if add else IPSET_CMD_DEL
    named = subject if subject is not None else f"{name} {entry}"
    return Request(payload, cmd | (NFNL_SUBSYS_IPSET << 8), 0, named, frozenset({IPSET_EXIST}))


def _nested_ip(value: Any) -> str:
    for name, ip in value.get("attrs", ()):  # IPSET_ATTR_IPADDR_IPV4/6
        if name.startswith("IPSET_ATTR_IPADDR"):
            return str(ip)
    raise ValueError(f"no address in {value!r}")


def entry_text(set_type: str, data: Any) -> str:
    """``ipset save`` text of one listed element (an IPSET_ATTR_DATA nla)."""
    attrs = {item[0]: item[1] for item in data.get("attrs", ())}
    if set_type == "bitmap:port":
        return str(attrs["IPSET_ATTR_PORT_FROM"])
    ip = _nested_ip(attrs["IPSET_ATTR_IP_FROM"])
    if set_type == "hash:ip":
        return ip
    proto = _NAME_BY_PROTO.get(attrs.get("IPSET_ATTR_PROTO", 0), str(attrs.get("IPSET_ATTR_PROTO")))
    text = f"{ip},{proto}:{attrs.get('IPSET_ATTR_PORT_FROM', attrs.get('IPSET_ATTR_PORT'))}"
    if set_type == "hash:ip,port":
        return text
    ip2 = _nested_ip(attrs["IPSET_ATTR_IP2"])
    if set_type == "hash:ip,port,net":
        full = host_bits(ip_family(ip2))
        cidr = attrs.get("IPSET_ATTR_CIDR2", full)
        return f"{text},{ip2}" if cidr == full else f"{text},{ip2}/{cidr}"
    return f"{text},{ip2}"


# --- virtual servers -----------------------------------------------------------------------

# The kernel keeps the netmask attribute's 4 bytes as they come: a mask for IPv4, and for IPv6 a prefix
# length it reads in host byte order (1-128, else EINVAL; ipvsadm and kube-proxy's libipvs send a native
# u32).
_NETMASK = {4: b"\xff\xff\xff\xff", 6: (128).to_bytes(4, sys.byteorder)}
# IPVS attribute numbers (include/uapi/linux/ip_vs.h): requests and dump replies.
_SVC_AF, _SVC_PROTOCOL, _SVC_ADDR, _SVC_PORT, _SVC_SCHED, _SVC_FLAGS, _SVC_TIMEOUT = 1, 2, 3, 4, 6, 7, 8
_SVC_NETMASK = 9
_DEST_ADDR, _DEST_PORT, _DEST_FWD, _DEST_WEIGHT, _DEST_ACTIVE, _DEST_INACTIVE, _DEST_AF = 1, 2, 3, 4, 7, 8, 11
_DEST_U_THRESH, _DEST_L_THRESH = 5, 6
# Nests, not flagged NLA_F_NESTED (as pyroute2 and ipvsadm send them).
_CMD_ATTR_SERVICE, _CMD_ATTR_DEST = 1, 2

# Requests are packed here with ``struct``, in the layout pyroute2's ``ipvsmsg`` gives them (tests/unit
# decode them with its parser): a full sync of 10,000 services × 10 endpoints sends 110,000 of them, and
# pyroute2 took ~160 µs to encode one real server on this host (packed: ~3 µs), many times more under
# the QEMU guest's emulation, where ipvsadm-restore's C encoder is what proxyd is measured against.
_GENL_HDR_S = struct.Struct("=BBH")  # genlmsghdr: cmd, version, reserved
_U16 = struct.Struct("=H")
_U32S = struct.Struct("=I")
_BE16 = struct.Struct("!H")
_FLAGS_MASK = struct.Struct("=II")
_CMD = {"add_server": genl_ipvs.IPVS_CMD_NEW_SERVICE, "update_server": genl_ipvs.IPVS_CMD_SET_SERVICE,
        "delete_server": genl_ipvs.IPVS_CMD_DEL_SERVICE, "add_dest": genl_ipvs.IPVS_CMD_NEW_DEST,
        "set_weight": genl_ipvs.IPVS_CMD_SET_DEST, "delete_dest": genl_ipvs.IPVS_CMD_DEL_DEST}


def _packed_ip(ip: str) -> tuple[int, bytes]:
    """(address family, raw address) of ``ip``; ValueError when it is none."""
    af = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        return af, socket.inet_pton(af, ip)
    except (OSError, ValueError) as err:
        raise ValueError(f"not an IP address: {ip[:64]!r}") from err


@functools.lru_cache(maxsize=4096)
def _key_attrs_packed(key: VSKey) -> bytes:
    """AF, protocol, address and port of a virtual server (the diff sends a server's requests together)."""
    af, raw = _packed_ip(key.ip)
    return (_attr(_SVC_AF, _U16.pack(af)) + _attr(_SVC_PROTOCOL, _U16.pack(_PROTO_NUM[key.protocol]))
            + _attr(_SVC_ADDR, raw) + _attr(_SVC_PORT, _BE16.pack(key.port)))


def _genl(cmd: int, *attrs: bytes) -> bytes:
    return _GENL_HDR_S.pack(cmd, genl_ipvs.GENL_VERSION, 0) + b"".join(attrs)


def server_request(family_id: int, op: Op) -> Request:
    """The IPVS generic-netlink request of a virtual-server ``op`` (add/update/delete_server).

    ``ValueError`` when the object cannot be encoded (not an address, a number out of range...).
    """
    try:
        if op.kind == "delete_server":
            payload = _genl(_CMD[op.kind], _attr(_CMD_ATTR_SERVICE, _key_attrs_packed(op.args[0])))
            return Request(payload, family_id, 0, op, frozenset({errno.ESRCH, errno.ENOENT}))
        vs: VirtualServer = op.args[0]
        service = (_key_attrs_packed(vs.key) + _attr(_SVC_SCHED, vs.scheduler.encode("ascii") + b"\0")
                   + _attr(_SVC_FLAGS, _FLAGS_MASK.pack(vs.flags, 0xFFFFFFFF))
                   + _attr(_SVC_TIMEOUT, _U32S.pack(vs.timeout))
                   + _attr(_SVC_NETMASK, _NETMASK[ip_family(vs.key.ip)]))
    except struct.error as err:
        raise ValueError(f"{op}: {err}") from err
    return Request(_genl(_CMD[op.kind], _attr(_CMD_ATTR_SERVICE, service)), family_id, 0, op)


@functools.lru_cache(maxsize=4096)
def _service_attr(key: VSKey) -> bytes:
    """IPVS_CMD_ATTR_SERVICE naming virtual server ``key``: the first half of each of its real servers'
    requests."""
    return _attr(_CMD_ATTR_SERVICE, _key_attrs_packed(key))


# The constant parts of a real server's attributes, per address family and per weight: a full sync packs
# 100,000 of these, so each is a few concatenations.
_DEST_AF_ADDR: dict[int, bytes] = {
    af: _attr(_DEST_AF, _U16.pack(af)) + _NLA_HDR.pack(_NLA_HDR.size + size, _DEST_ADDR)
    for af, size in ((socket.AF_INET, 4), (socket.AF_INET6, 16))}
_DEST_PORT_HDR = _NLA_HDR.pack(_NLA_HDR.size + 2, _DEST_PORT)
_DEST_FWD_ATTR = _attr(_DEST_FWD, _U32S.pack(FWD_MASQ))
_DEST_THRESH = _attr(_DEST_U_THRESH, _U32S.pack(0)) + _attr(_DEST_L_THRESH, _U32S.pack(0))


@functools.lru_cache(maxsize=64)
def _weight_tail(weight: int) -> bytes:
    return _DEST_FWD_ATTR + _attr(_DEST_WEIGHT, _U32S.pack(weight)) + _DEST_THRESH


_GENL_OF = {kind: _GENL_HDR_S.pack(cmd, genl_ipvs.GENL_VERSION, 0) for kind, cmd in _CMD.items()}
_DEST_OK_GONE = frozenset({errno.ESRCH, errno.ENOENT})


def dest_request(family_id: int, op: Op) -> Request:
    """The IPVS generic-netlink request of a real-server ``op`` (add_dest/set_weight/delete_dest).

    ``ValueError`` when the object cannot be encoded.
    """
    key: VSKey = op.args[0]
    server: RealServer = op.args[1]
    try:
        service = _service_attr(key)
        af, raw = _packed_ip(server.ip)
        # address (4 or 16 bytes: no padding), then the port (2 bytes + 2 of padding)
        dest = _DEST_AF_ADDR[af] + raw + _DEST_PORT_HDR + _BE16.pack(server.port) + b"\0\0"
        if op.kind != "delete_dest":
            dest += _weight_tail(op.args[2])
        nest = _NLA_HDR.pack(_NLA_HDR.size + len(dest), _CMD_ATTR_DEST)
        payload = _GENL_OF[op.kind] + service + nest + dest
    except struct.error as err:
        raise ValueError(f"{op}: {err}") from err
    if op.kind == "delete_dest":
        return Request(payload, family_id, 0, op, _DEST_OK_GONE)
    return Request(payload, family_id, 0, op)


_GENL_HDR = 20  # nlmsghdr + genlmsghdr


def _nested(data: bytes, outer: int) -> dict[int, bytes]:
    """The attributes inside attribute ``outer`` of a generic-netlink message (empty when absent)."""
    for atype, value in parse_attrs(data, _GENL_HDR, len(data)):
        if atype == outer:
            return dict(parse_attrs(value, 0, len(value)))
    return {}


def _u32(value: bytes | None) -> int:
    return int.from_bytes(value[:4], sys.byteorder) if value is not None and len(value) >= 4 else 0


def _addr_len(af: int) -> int:
    return 16 if af == socket.AF_INET6 else 4


def parse_service(data: bytes, family: int = 4) -> VirtualServer | None:
    """The virtual server (of ``family``: 4 or 6) of one IPVS service dump reply; None for other
    families, fwmark services and garbage."""
    want = _AF[family]
    attrs = _nested(data, _CMD_ATTR_SERVICE)
    af, proto = attrs.get(_SVC_AF), attrs.get(_SVC_PROTOCOL)
    addr, port = attrs.get(_SVC_ADDR), attrs.get(_SVC_PORT)
    if af is None or len(af) < 2 or int.from_bytes(af[:2], sys.byteorder) != want:
        return None
    protocol = _NUM_PROTO.get(int.from_bytes(proto[:2], sys.byteorder)) if proto and len(proto) >= 2 else None
    size = _addr_len(want)
    if protocol is None or addr is None or len(addr) < size or port is None or len(port) < 2:
        return None
    key = VSKey(socket.inet_ntop(want, addr[:size]), int.from_bytes(port[:2], "big"), protocol)
    sched = attrs.get(_SVC_SCHED, b"").split(b"\0", 1)[0].decode("ascii", "replace")
    flags = _u32(attrs.get(_SVC_FLAGS)) & ~FLAG_HASHED
    return VirtualServer(key, sched, flags, _u32(attrs.get(_SVC_TIMEOUT)))


def parse_dest(data: bytes, family: int = 4) -> KernelDest | None:
    """The real server (of ``family``) of one IPVS destination dump reply; None for others and garbage.

    Kernels before 4.x send no address family for a real server: it is then its service's.
    """
    want = _AF[family]
    attrs = _nested(data, _CMD_ATTR_DEST)
    addr, port, af = attrs.get(_DEST_ADDR), attrs.get(_DEST_PORT), attrs.get(_DEST_AF)
    if af is not None and (len(af) < 2 or int.from_bytes(af[:2], sys.byteorder) != want):
        return None
    size = _addr_len(want)
    if addr is None or len(addr) < size or port is None or len(port) < 2:
        return None
    server = RealServer(socket.inet_ntop(want, addr[:size]), int.from_bytes(port[:2], "big"))
    return KernelDest(server, _u32(attrs.get(_DEST_WEIGHT)), _u32(attrs.get(_DEST_FWD)),
                      _u32(attrs.get(_DEST_ACTIVE)), _u32(attrs.get(_DEST_INACTIVE)))


_SOCKET_OF = {"set_add": "ipset", "set_del": "ipset", "bind": "address", "unbind": "address",
              "add_server": "ipvs", "update_server": "ipvs", "delete_server": "ipvs",
              "add_dest": "ipvs", "set_weight": "ipvs", "delete_dest": "ipvs"}
_PROTOCOL_OF = {"ipset": NETLINK_NETFILTER, "address": NETLINK_ROUTE, "ipvs": NETLINK_GENERIC}
# An add that finds its object there (a race with another writer) becomes an update.
_AS_UPDATE = {"add_server": "update_server", "add_dest": "set_weight"}


class IpvsApplier:
    """Blocking kernel operations of one address family, run one at a time on a private worker thread."""

    def __init__(self, *, backend: Backend | None = None, family: int = 4) -> None:
        if family not in _AF:
            raise ValueError(f"address family must be 4 or 6, not {family!r}")
        self.family = family
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ipvs-kernel")
        self._ipset: IPSet | None = None
        self._ipr: IPRoute | None = None
        self._backend = backend
        self._netfilter: Netfilter | None = None
        self._device_index: int | None = None
        self._batch: dict[str, BatchSocket] = {}
        self._family_id: int | None = None
        # The kernel's reason for each operation the last ``apply`` saw refused (for the quarantine).
        self.refusals: dict[Op, str] = {}

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    async def aclose(self) -> None:
        await self.call(self._close_sockets)
        self._pool.shutdown(wait=False)

    def _close_sockets(self) -> None:
        for sock in (self._ipset, self._ipr):
            if sock is not None:
                with contextlib.suppress(Exception):
                    sock.close()
        self._ipset = self._ipr = None
        for batch in self._batch.values():
            batch.close()
        self._batch.clear()

    def _batch_socket(self, kind: str) -> BatchSocket:
        sock = self._batch.get(kind)
        if sock is None:
            sock = self._batch[kind] = BatchSocket(_PROTOCOL_OF[kind], kind=kind)
        return sock

    # -- operations (the mode's diff), in batches ----------------------------------------

    def apply(self, ops: Sequence[Op]) -> set[Op]:
        """Run ``ops`` in order, one netlink batch per run of the same kind; return the ones refused.

        A refused operation is logged and counted
        (``proxyd_netlink_failures_total``) and fails only itself: the rest
        of its batch applies. Operations of different kinds keep their
        order (set entries before the addresses before the servers).
        """
        failed: set[Op] = set()
        self.refusals = {}
        for kind, group in itertools.groupby(ops, key=lambda op: _SOCKET_OF[op.kind]):
            batch = list(group)
            requests: list[Request] = []
            for op in batch:
                try:
                    requests.append(self._request(op))
                except (ValueError, KeyError) as err:
                    log.error("ipvs: cannot apply %s: %s", op, err)
                    metrics.NETLINK_FAILURES.labels(kind=kind).inc()
                    failed.add(op)
                    self.refusals[op] = f"cannot apply {op}: {err}"
            sock = self._batch_socket(kind)
            # One ACK per chunk, not per request: the kernel still answers each refused request, and
            # at 130,000 requests per full sync the ACKs are a real share of both sides' work.
            result = sock.run(requests, log_failures=False, ack_each=False)
            refused = [(cast(Op, f.subject), f) for f in result.failures]
            exists = [op for op, f in refused if f.code == errno.EEXIST and op.kind in _AS_UPDATE]
            if exists:
                updates = {Op(_AS_UPDATE[op.kind], op.args): op for op in exists}
                retry = sock.run([self._request(update) for update in updates], log_failures=False,
                                 ack_each=False)
                refused = [(op, f) for op, f in refused if op not in exists]
                refused += [(updates[cast(Op, f.subject)], f) for f in retry.failures]
            for op, failure in refused:
                log.error("ipvs: cannot apply %s", failure)
                metrics.NETLINK_FAILURES.labels(kind=kind).inc()
                failed.add(op)
                self.refusals[op] = str(failure)
        return failed

    def _request(self, op: Op) -> Request:
        kind = op.kind
        if kind in ("set_add", "set_del"):
            name, entry = op.args
            if ip_family(entry.split(",", 1)[0]) != self.family and IPSET_BY_NAME[name].type != "bitmap:port":
                raise ValueError(f"entry {entry!r} is not IPv{self.family}")
            return ipset_request(kind == "set_add", set_name(name, self.family), IPSET_BY_NAME[name].type,
                                 entry, subject=op, family=self.family)
        if kind in ("bind", "unbind"):
            index = self._device_index if self._device_index is not None else self.ensure_device()
            return address_request(kind == "bind", index, op.args[0], subject=op)
        if kind in ("add_server", "update_server", "delete_server"):
            return server_request(self._ipvs_family(), op)
        return dest_request(self._ipvs_family(), op)

    def _ipvs_family(self) -> int:
        """IPVS's generic-netlink family id (the kernel assigns it when ip_vs loads)."""
        if self._family_id is None:
            with GenericNetlinkSocket() as ctrl:
                ctrl.bind(genl_ipvs.GENL_NAME, genl_ipvs.ipvsmsg)
                self._family_id = int(ctrl.prid)
        return self._family_id

    # Sockets are opened lazily in the worker thread and kept open.
    @property
    def ipset(self) -> IPSet:
        if self._ipset is None:
            self._ipset = IPSet()
        return self._ipset

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    # -- host setup ------------------------------------------------------------------------

    @staticmethod
    def load_modules(scheduler: str) -> None:
        """Load ip_vs when it is not loaded yet; failures are left to the first netlink call to report.

        Scheduler modules (``ip_vs_rr``, ``ip_vs_sh``, ...) are loaded by the
        kernel itself when a virtual server first names them.
        """
        del scheduler
        if os.path.exists("/proc/net/ip_vs"):
            return
        for module in ("ip_vs", "nf_conntrack"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["modprobe", module], capture_output=True, timeout=30, check=False,
                               start_new_session=True)

    @staticmethod
    def set_sysctls(values: Mapping[str, int]) -> list[str]:
        """Write sysctls (keys like ``net/ipv4/vs/conntrack``); return the ones that failed."""
        failed = []
        for key, value in values.items():
            path = Path("/proc/sys") / key
            try:
                if path.read_text().strip() != str(value):
                    path.write_text(f"{value}\n")
            except OSError as err:
                log.warning("cannot set sysctl %s=%s: %s", key, value, err)
                failed.append(key)
        return failed

    # -- kube-ipvs0 ------------------------------------------------------------------------

    def ensure_device(self) -> int:
        """Create the dummy device if missing (left down, as kube-proxy does); return its index."""
        found = self.ipr.link_lookup(ifname=DEVICE)
        if not found:
            try:
                self.ipr.link("add", ifname=DEVICE, kind="dummy")
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise
            found = self.ipr.link_lookup(ifname=DEVICE)
        index: int = found[0]
        self._device_index = index
        return index

    def read_bound(self) -> set[str]:
        index = self._device_index if self._device_index is not None else self.ensure_device()
        # One dump, each reply parsed once for just its address.
        # Only this family's: the other family's instance owns the rest of the device.
        return {ip for _fam, _plen, ip in dump_addresses(self._batch_socket("address"), index,
                                                          family=_AF[self.family])}

    # -- IPVS ------------------------------------------------------------------------------

    def read_servers(self, *, with_dests: bool = True, family: int | None = None
                     ) -> dict[VSKey, tuple[VirtualServer, dict[RealServer, KernelDest]]]:
        """Every virtual server of this family in the kernel with its real servers (unread without
        ``with_dests``); the other family's belong to the other instance.

        One dump of the virtual servers and one per virtual server of its
        real servers (the kernel dumps real servers per service), each reply
        parsed once for the few attributes compared (``parse_service``,
        ``parse_dest``), not decoded whole.
        """
        out: dict[VSKey, tuple[VirtualServer, dict[RealServer, KernelDest]]] = {}
        sock = self._batch_socket("ipvs")
        for _type, data in sock.dump(_genl(genl_ipvs.IPVS_CMD_GET_SERVICE), self._ipvs_family()):
            vs = parse_service(data, family or self.family)
            if vs is not None:  # fwmark services and the other family's are not this instance's
                out[vs.key] = (vs, self.read_dests(vs.key) if with_dests else {})
        return out

    def read_dests(self, key: VSKey) -> dict[RealServer, KernelDest]:
        try:
            request = _genl(genl_ipvs.IPVS_CMD_GET_DEST, _attr(_CMD_ATTR_SERVICE, _key_attrs_packed(key)))
        except (ValueError, struct.error):
            return {}  # not an address or port: the kernel cannot hold it
        try:
            replies = self._batch_socket("ipvs").dump(request, self._ipvs_family())
        except NetlinkBatchError as err:
            if err.errno in (errno.ESRCH, errno.ENOENT):
                return {}
            raise
        dests: dict[RealServer, KernelDest] = {}
        for _type, data in replies:
            dest = parse_dest(data, ip_family(key.ip))
            if dest is not None:
                dests[dest.server] = dest
        return dests

    # -- ipsets ----------------------------------------------------------------------------

    def ensure_sets(self) -> None:
        for info in IPSETS:
            kwargs: dict[str, Any] = {"exclusive": False, "comment": False}
            if info.type == "bitmap:port":
                kwargs["bitmap_ports_range"] = (0, 65535)
            self.ipset.create(set_name(info.name, self.family), stype=info.type, family=_AF[self.family],
                              **kwargs)

    def read_sets(self) -> dict[str, set[str]]:
        """Entries of this family's ipsets as ``ipset save`` text, keyed by the plan's (IPv4) set names
        (sets missing in the kernel are absent)."""
        out: dict[str, set[str]] = {}
        by_kernel_name = {set_name(info.name, self.family): info for info in IPSETS}
        for msg in self.ipset.list():
            info = by_kernel_name.get(msg.get_attr("IPSET_ATTR_SETNAME"))
            if info is None:
                continue
            name = info.name
            bucket = out.setdefault(name, set())
            adt = msg.get_attr("IPSET_ATTR_ADT")
            if not adt:
                continue
            for data in adt.get_attrs("IPSET_ATTR_DATA"):
                try:
                    bucket.add(entry_text(info.type, data))
                except (KeyError, ValueError) as err:
                    log.warning("unreadable element in ipset %s: %s", name, err)
        return out

    def destroy_sets(self, families: Sequence[int] = (4, 6)) -> list[str]:
        failed = []
        for fam in families:
            for info in IPSETS:
                name = set_name(info.name, fam)
                try:
                    self.ipset.destroy(name)
                except NetlinkError as err:
                    if err.code != errno.ENOENT:
                        failed.append(f"{name}: {err}")
        return failed

    # -- iptables --------------------------------------------------------------------------

    async def netfilter(self) -> Netfilter:
        """This family's netfilter layer (iptables or ip6tables) in the host's back end, detected once."""
        if self._netfilter is None:
            backend = self._backend
            if backend is None:
                backend = await asyncio.to_thread(detect, family=self.family)
            self._netfilter = Netfilter(backend)
        return self._netfilter

    async def restore(self, rules: str, *, ensure_jumps: bool = False) -> None:
        """Apply ``rules`` in one ``iptables-restore --noflush`` transaction, then ensure the jumps."""
        netfilter = await self.netfilter()
        await netfilter.restore(rules)
        if ensure_jumps:
            await netfilter.ensure_jumps(JUMPS)

    # -- cleanup ---------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Remove kube-ipvs0, every virtual server of both families and proxyd's ipsets of both families;
        return errors. The iptables part goes with ``remove_rules``.
        """
        failed: list[str] = []
        try:
            for fam in (4, 6):
                # One dump of the virtual servers (their real servers go with them), one batch of deletions.
                held = self.read_servers(with_dests=False, family=fam)
                gone = [Op("delete_server", (key,)) for key in held]
                refused = self.apply(gone)
                failed.extend(f"cannot delete virtual server {op.args[0]}" for op in gone if op in refused)
        except (NetlinkError, OSError) as err:
            # No IPVS in this kernel (the family does not resolve): nothing to remove.
            log.debug("IPVS not available for cleanup: %s", err)
        try:
            found = self.ipr.link_lookup(ifname=DEVICE)
            if found:
                self.ipr.link("del", index=found[0])
        except NetlinkError as err:
            failed.append(f"delete {DEVICE}: {err}")
        try:
            failed.extend(self.destroy_sets())
        except (NetlinkError, OSError) as err:
            log.debug("ipset not available for cleanup: %s", err)
        return failed


async def remove_rules() -> list[str]:
    """Unlink and delete ipvs mode's chains in both back ends; return errors (missing things are not)."""
    return await cleanup_everywhere(JUMPS, {"nat": NAT_CHAINS, "filter": FILTER_CHAINS}, families=(4, 6))


def ipvs_available() -> str | None:
    """None when IPVS can be used in this kernel, else why not."""
    if not os.path.exists("/proc/net/ip_vs"):
        IpvsApplier.load_modules("rr")
    if not os.path.exists("/proc/net/ip_vs"):
        return "this kernel has no IPVS (/proc/net/ip_vs missing after modprobe ip_vs)"
    return None
