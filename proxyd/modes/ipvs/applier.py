"""ipvs mode's applier: the only code of the mode that talks to the kernel.

IPVS virtual and real servers, ipsets and the ``kube-ipvs0`` dummy device
go through pyroute2 (generic netlink, nfnetlink, rtnetlink); sysctls through
/proc/sys. Those methods are blocking and are called from one dedicated
worker thread (``IpvsApplier.call``), so the event loop never waits on the
kernel and calls never interleave; pyroute2 sockets are opened in that
thread and stay there. The small fixed iptables ruleset and its jumps go
through the shared netfilter layer (``proxyd.netfilter``: back-end
detection, asynchronous ``iptables-restore --noflush``), as in iptables mode.

The applier reads what the kernel holds (``read_servers``, ``read_sets``,
``read_bound``) so that the mode can diff against it and change only
differences: nothing is ever flushed except by ``cleanup``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPVS, IPRoute, IPSet, IPVSDest, IPVSService
from pyroute2.ipset import PortEntry
from pyroute2.netlink.exceptions import NetlinkError

from proxyd.model import Protocol
from proxyd.modes.ipvs.planner import (
    DEVICE,
    FILTER_CHAINS,
    FLAG_HASHED,
    IPSET_BY_NAME,
    IPSETS,
    JUMPS,
    NAT_CHAINS,
    RealServer,
    VirtualServer,
    VSKey,
)
from proxyd.netfilter import Backend, Netfilter, cleanup_everywhere, detect

log = logging.getLogger(__name__)

T = TypeVar("T")

FWD_MASQ = 0  # IP_VS_CONN_F_MASQ; pyroute2's IPVSDest defaults to 3 (direct routing)
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


def entry_args(set_type: str, entry: str) -> tuple[Any, str]:
    """(entry, etype) for pyroute2's IPSet.add/delete from ``ipset save`` text."""
    parts = entry.split(",")
    if set_type == "bitmap:port" and len(parts) == 1 and parts[0].isdigit():
        return int(parts[0]), "port"
    if set_type == "hash:ip" and len(parts) == 1:
        return parts[0], "ip"
    if set_type == "hash:ip,port" and len(parts) == 2:
        return (parts[0], _port_entry(parts[1])), "ip,port"
    if set_type == "hash:ip,port,ip" and len(parts) == 3:
        return (parts[0], _port_entry(parts[1]), parts[2]), "ip,port,ip"
    if set_type == "hash:ip,port,net" and len(parts) == 3:
        return (parts[0], _port_entry(parts[1]), parts[2]), "ip,port,net"
    raise ValueError(f"entry {entry!r} does not fit a {set_type} set")


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
        cidr = attrs.get("IPSET_ATTR_CIDR2", 32)
        return f"{text},{ip2}" if cidr == 32 else f"{text},{ip2}/{cidr}"
    return f"{text},{ip2}"


# --- virtual servers -----------------------------------------------------------------------

def _attrs(msg: Any, outer: str) -> dict[str, Any]:
    inner = msg.get_attr(outer)
    return {item[0]: item[1] for item in inner["attrs"]} if inner else {}


def service_of(vs: VirtualServer) -> IPVSService:
    return IPVSService(addr=vs.key.ip, port=vs.key.port, protocol=_PROTO_NUM[vs.key.protocol],
                       sched_name=vs.scheduler, flags={"flags": vs.flags, "mask": 0xFFFFFFFF},
                       timeout=vs.timeout)


def key_service(key: VSKey) -> IPVSService:
    return IPVSService(addr=key.ip, port=key.port, protocol=_PROTO_NUM[key.protocol])


class IpvsApplier:
    """Blocking kernel operations, run one at a time on a private worker thread."""

    def __init__(self, *, backend: Backend | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ipvs-kernel")
        self._ipvs: IPVS | None = None
        self._ipset: IPSet | None = None
        self._ipr: IPRoute | None = None
        self._backend = backend
        self._netfilter: Netfilter | None = None
        self._device_index: int | None = None

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    async def aclose(self) -> None:
        await self.call(self._close_sockets)
        self._pool.shutdown(wait=False)

    def _close_sockets(self) -> None:
        for sock in (self._ipvs, self._ipset, self._ipr):
            if sock is not None:
                with contextlib.suppress(Exception):
                    sock.close()
        self._ipvs = self._ipset = self._ipr = None

    # Sockets are opened lazily in the worker thread and kept open.
    @property
    def ipvs(self) -> IPVS:
        if self._ipvs is None:
            self._ipvs = IPVS()
        return self._ipvs

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
                subprocess.run(["modprobe", module], capture_output=True, timeout=30, check=False)

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
        out = set()
        for msg in self.ipr.get_addr(index=index, family=socket.AF_INET):
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if addr:
                out.add(addr)
        return out

    def bind(self, add: Iterable[str], remove: Iterable[str]) -> None:
        index = self._device_index if self._device_index is not None else self.ensure_device()
        for ip in add:
            try:
                self.ipr.addr("add", index=index, address=ip, prefixlen=32)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise
        for ip in remove:
            try:
                self.ipr.addr("del", index=index, address=ip, prefixlen=32)
            except NetlinkError as err:
                if err.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                    raise

    # -- IPVS ------------------------------------------------------------------------------

    def read_servers(self) -> dict[VSKey, tuple[VirtualServer, dict[RealServer, KernelDest]]]:
        """Every IPv4 virtual server in the kernel with its real servers."""
        out: dict[VSKey, tuple[VirtualServer, dict[RealServer, KernelDest]]] = {}
        for msg in self.ipvs.service("dump"):
            attrs = _attrs(msg, "IPVS_CMD_ATTR_SERVICE")
            proto = _NUM_PROTO.get(attrs.get("IPVS_SVC_ATTR_PROTOCOL", 0))
            if (attrs.get("IPVS_SVC_ATTR_AF") != socket.AF_INET or proto is None
                    or "IPVS_SVC_ATTR_ADDR" not in attrs):
                continue  # fwmark or IPv6 services: not proxyd's
            key = VSKey(attrs["IPVS_SVC_ATTR_ADDR"], attrs["IPVS_SVC_ATTR_PORT"], proto)
            flags = attrs.get("IPVS_SVC_ATTR_FLAGS", {}).get("flags", 0) & ~FLAG_HASHED
            vs = VirtualServer(key, attrs.get("IPVS_SVC_ATTR_SCHED_NAME", ""), flags,
                               attrs.get("IPVS_SVC_ATTR_TIMEOUT", 0))
            out[key] = (vs, self.read_dests(key))
        return out

    def read_dests(self, key: VSKey) -> dict[RealServer, KernelDest]:
        dests: dict[RealServer, KernelDest] = {}
        try:
            messages = list(self.ipvs.dest("dump", service=key_service(key)))
        except NetlinkError as err:
            if err.code in (errno.ESRCH, errno.ENOENT):
                return dests
            raise
        for msg in messages:
            d = _attrs(msg, "IPVS_CMD_ATTR_DEST")
            server = RealServer(d["IPVS_DEST_ATTR_ADDR"], d["IPVS_DEST_ATTR_PORT"])
            dests[server] = KernelDest(server, d.get("IPVS_DEST_ATTR_WEIGHT", 0),
                                       d.get("IPVS_DEST_ATTR_FWD_METHOD", 0),
                                       d.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0),
                                       d.get("IPVS_DEST_ATTR_INACT_CONNS", 0))
        return dests

    def add_server(self, vs: VirtualServer) -> None:
        try:
            self.ipvs.service("add", service=service_of(vs))
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise
            self.ipvs.service("set", service=service_of(vs))

    def update_server(self, vs: VirtualServer) -> None:
        self.ipvs.service("set", service=service_of(vs))

    def delete_server(self, key: VSKey) -> None:
        try:
            self.ipvs.service("del", service=key_service(key))
        except NetlinkError as err:
            if err.code not in (errno.ESRCH, errno.ENOENT):
                raise

    def add_dest(self, key: VSKey, server: RealServer, weight: int = 1) -> None:
        dest = IPVSDest(addr=server.ip, port=server.port, fwd_method=FWD_MASQ, weight=weight)
        try:
            self.ipvs.dest("add", service=key_service(key), dest=dest)
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise
            self.ipvs.dest("set", service=key_service(key), dest=dest)

    def set_weight(self, key: VSKey, server: RealServer, weight: int) -> None:
        dest = IPVSDest(addr=server.ip, port=server.port, fwd_method=FWD_MASQ, weight=weight)
        self.ipvs.dest("set", service=key_service(key), dest=dest)

    def delete_dest(self, key: VSKey, server: RealServer) -> None:
        try:
            self.ipvs.dest("del", service=key_service(key), dest=IPVSDest(addr=server.ip, port=server.port))
        except NetlinkError as err:
            if err.code not in (errno.ESRCH, errno.ENOENT):
                raise

    # -- ipsets ----------------------------------------------------------------------------

    def ensure_sets(self) -> None:
        for info in IPSETS:
            kwargs: dict[str, Any] = {"exclusive": False, "comment": False}
            if info.type == "bitmap:port":
                kwargs["bitmap_ports_range"] = (0, 65535)
            self.ipset.create(info.name, stype=info.type, family=socket.AF_INET, **kwargs)

    def read_sets(self) -> dict[str, set[str]]:
        """Entries of proxyd's ipsets as ``ipset save`` text (sets missing in the kernel are absent)."""
        out: dict[str, set[str]] = {}
        for msg in self.ipset.list():
            name = msg.get_attr("IPSET_ATTR_SETNAME")
            info = IPSET_BY_NAME.get(name)
            if info is None:
                continue
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

    def change_set(self, name: str, add: Iterable[str], remove: Iterable[str]) -> None:
        set_type = IPSET_BY_NAME[name].type
        for entry in remove:
            value, etype = entry_args(set_type, entry)
            try:
                self.ipset.delete(name, value, etype=etype)
            except NetlinkError as err:
                if err.code != IPSET_EXIST:
                    raise
        for entry in add:
            value, etype = entry_args(set_type, entry)
            self.ipset.add(name, value, etype=etype, exclusive=False)

    def destroy_sets(self) -> list[str]:
        failed = []
        for info in IPSETS:
            try:
                self.ipset.destroy(info.name)
            except NetlinkError as err:
                if err.code != errno.ENOENT:
                    failed.append(f"{info.name}: {err}")
        return failed

    # -- iptables --------------------------------------------------------------------------

    async def netfilter(self) -> Netfilter:
        """The netfilter layer for IPv4 in the host's back end (detected once)."""
        if self._netfilter is None:
            backend = self._backend
            if backend is None:
                backend = await asyncio.to_thread(detect, family=4)
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
        """Remove kube-ipvs0, every IPv4 virtual server and proxyd's ipsets; return errors.

        The iptables part goes with ``remove_rules``.
        """
        failed: list[str] = []
        try:
            for key in list(self.read_servers()):
                self.delete_server(key)
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
    return await cleanup_everywhere(JUMPS, {"nat": NAT_CHAINS, "filter": FILTER_CHAINS}, families=(4,))


def ipvs_available() -> str | None:
    """None when IPVS can be used in this kernel, else why not."""
    if not os.path.exists("/proc/net/ip_vs"):
        IpvsApplier.load_modules("rr")
    if not os.path.exists("/proc/net/ip_vs"):
        return "this kernel has no IPVS (/proc/net/ip_vs missing after modprobe ip_vs)"
    return None
