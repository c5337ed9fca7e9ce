"""The daemon's status service: ``proxyd status`` and ``proxyd trace`` answered over a local Unix socket.

What it serves, per service port of the state the last successful sync
handed to the mode: type, addresses, ports, affinity, traffic policies, the
endpoints with their conditions and locality, which of them ``proxyd.policy``
puts in use for cluster-IP and for external traffic, and the mode's
per-endpoint counters (``ProxyMode.status()``: read back from the kernel or,
in userspace mode, from the live connection table). Around that: the mode,
the last sync (time, duration, full or partial, failures in a row), whether
the kernel still matches the last sync, and the recently rejected objects
with their reasons (``proxyd.rejections``). ``trace`` asks the mode where a
packet would go now (``ProxyMode.trace()``) and names the service port the
destination belongs to.

Transport: a Unix stream socket (default ``/run/proxyd/status.sock``,
``--status-socket``; empty disables), mode 0600, so nothing new is reachable
from beyond the node and only root asks. One request per connection: a JSON
object on one line (at most ``MAX_REQUEST`` bytes, read within
``REQUEST_TIMEOUT``), one JSON answer back, then close. Bad requests get
``{"error": ...}``. A socket path held by another live proxyd is left alone
(status is then off for this one, with a warning); a stale one is replaced.

Cost: one pass over the service ports (policy categorisation per port) plus
the mode's read-back (one ``iptables-save``, one IPVS dump, or nothing in
userspace mode); ``bench/status_scale.py`` measures it at 10,000 services.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from proxyd import rejections
from proxyd.introspect import ModeStatus, TracePacket, counter_key
from proxyd.model import Endpoint, ProxyState, ServicePort, ServicePortName
from proxyd.policy import categorize

if TYPE_CHECKING:
    from proxyd.modes.base import ProxyMode

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/proxyd/status.sock"
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0
ANSWER_TIMEOUT = 120.0  # a kernel read-back at tens of thousands of services takes seconds on nft
PROTOCOLS = ("tcp", "udp", "sctp")


class RequestError(ValueError):
    """A request the status service refuses; the message goes back to the client."""


def _endpoint_json(ep: Endpoint, node_name: str, uses: list[str],
                   counters: Mapping[str, Mapping[str, int]] | None) -> dict[str, Any]:
    state = "ready" if ep.ready else ("serving-terminating" if ep.serving and ep.terminating else
                                      "terminating" if ep.terminating else "not-ready")
    out: dict[str, Any] = {"address": str(ep), "state": state, "ready": ep.ready, "serving": ep.serving,
                           "terminating": ep.terminating, "local": ep.is_local(node_name),
                           "node": ep.node_name, "zone": ep.zone, "in_use": uses}
    if counters is not None:
        found = counters.get(str(ep))
        if found is not None:
            out["counters"] = dict(found)
    return out


def port_json(svc: ServicePort, endpoints: tuple[Endpoint, ...], *, node_name: str, node_zone: str | None,
              counters: Mapping[str, Mapping[str, int]] | None = None, detail: bool = True) -> dict[str, Any]:
    """One service port as ``proxyd status --json`` shows it.

    ``detail``: every endpoint with its conditions, use and counters; otherwise (the default for a whole
    node) endpoint counts and the counters summed over endpoints, which keeps the answer for 10,000
    services small.
    """
    cat = categorize(svc, endpoints, node_name=node_name, node_zone=node_zone)
    name = svc.name
    out: dict[str, Any] = {
        "name": str(name), "namespace": name.namespace, "service": name.name, "port_name": name.port,
        "protocol": str(svc.protocol), "type": str(svc.type), "cluster_ip": svc.cluster_ip, "port": svc.port,
        "target_port": svc.target_port, "node_port": svc.node_port, "external_ips": list(svc.external_ips),
        "load_balancer_ips": list(svc.load_balancer_ips),
        "load_balancer_source_ranges": list(svc.load_balancer_source_ranges),
        "session_affinity": "ClientIP" if svc.affinity_timeout else "None",
        "affinity_timeout_seconds": svc.affinity_timeout,
        "external_traffic_policy": ("Local" if svc.external_policy_local else "Cluster") if svc.has_external
        else None,
        "internal_traffic_policy": "Local" if svc.internal_policy_local else "Cluster",
        "health_check_node_port": svc.health_check_node_port, "topology_aware": svc.topology_aware,
        "has_usable_endpoints": cat.has_any,
    }
    if not detail:
        out["endpoint_counts"] = {
            "total": len(endpoints), "ready": sum(1 for ep in endpoints if ep.ready),
            "local": sum(1 for ep in endpoints if ep.is_local(node_name)),
            "terminating": sum(1 for ep in endpoints if ep.terminating),
            "in_use_cluster_ip": len(cat.internal),
            "in_use_external": len(cat.external) if svc.has_external else 0}
        out["counters"] = _summed(counters)
        return out
    internal = {(ep.ip, ep.port) for ep in cat.internal}
    external = {(ep.ip, ep.port) for ep in cat.external} if svc.has_external else set()
    eps = []
    for ep in endpoints:
        key = (ep.ip, ep.port)
        uses = []
        if key in internal:
            uses.append("cluster-ip")
        if key in external:
            uses.append("external")
        eps.append(_endpoint_json(ep, node_name, uses, counters))
    out["endpoints"] = eps
    out["in_use"] = {"cluster_ip": [str(ep) for ep in cat.internal],
                     "external": [str(ep) for ep in cat.external] if svc.has_external else []}
    if counters is not None:
        # Counters of endpoints no longer in the desired state (draining, or drift) are shown too.
        known = {str(ep) for ep in endpoints}
        extra = {ep: dict(c) for ep, c in counters.items() if ep not in known}
        if extra:
            out["other_kernel_endpoints"] = extra
    return out


def select(state: ProxyState, *, namespace: str | None = None,
           name: str | None = None) -> list[ServicePortName]:
    """The service ports a status request asks for, sorted."""
    names: Iterable[ServicePortName] = state.service_ports
    if namespace is not None:
        names = [n for n in names if n.namespace == namespace]
    if name is not None:
        names = [n for n in names if n.name == name]
    return sorted(names)


def services_json(state: ProxyState, names: Iterable[ServicePortName],
                  mode_status: ModeStatus | None, *, detail: bool = True) -> list[dict[str, Any]]:
    zone = state.node_zone
    counters = mode_status.counters if mode_status is not None else {}
    return [port_json(state.service_ports[n], state.endpoints_of(n), node_name=state.node_name,
                      node_zone=zone, counters=counters.get(counter_key(n)), detail=detail)
            for n in names]


def _summed(counters: Mapping[str, Mapping[str, int]] | None) -> dict[str, int]:
    total: dict[str, int] = {}
    for values in (counters or {}).values():
        for key, value in values.items():
            total[key] = total.get(key, 0) + value
    return total


class SummaryCache:
    """Per-port summaries reused between requests while a port's objects are unchanged.

    The tracker hands unchanged services over as the same objects sync after sync, so identity of the
    ServicePort and its endpoint tuple (and the node's zone) says whether a summary is still right;
    only the counters are added fresh. At 10,000 services this saves the policy pass on every request
    but the first after a change.
    """

    def __init__(self) -> None:
        self._items: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...], str | None,
                                                 dict[str, Any]]] = {}

    def summaries(self, state: ProxyState, names: Iterable[ServicePortName],
                  mode_status: ModeStatus | None) -> list[dict[str, Any]]:
        counters = mode_status.counters if mode_status is not None else {}
        zone = state.node_zone
        out = []
        for name in names:
            svc, eps = state.service_ports[name], state.endpoints_of(name)
            cached = self._items.get(name)
            if cached is None or cached[0] is not svc or cached[1] is not eps or cached[2] != zone:
                base = port_json(svc, eps, node_name=state.node_name, node_zone=zone, detail=False)
                self._items[name] = (svc, eps, zone, base)
            else:
                base = cached[3]
            item = dict(base)
            item["counters"] = _summed(counters.get(counter_key(name)))
            out.append(item)
        if len(self._items) > 2 * len(state.service_ports) + 64:
            self._items = {n: v for n, v in self._items.items() if n in state.service_ports}
        return out


def service_for(state: ProxyState, packet: TracePacket, local_ips: Iterable[str]) -> tuple[str, str] | None:
    """(service port, kind of address) that ``packet``'s destination belongs to, if any."""
    proto = packet.protocol.upper()
    local = set(local_ips)
    for name, svc in state.service_ports.items():
        if str(svc.protocol) != proto:
            continue
        if svc.port == packet.port:
            if packet.dst in svc.cluster_ips:  # a dual-stack port: either family's cluster IP
                return str(name), "cluster IP"
            if packet.dst in svc.external_ips:
                return str(name), "external IP"
            if packet.dst in svc.load_balancer_ips:
                return str(name), "load balancer IP"
        if svc.node_port and svc.node_port == packet.port and (packet.dst in local or
                                                               ipaddress.ip_address(packet.dst).is_loopback):
            return str(name), "node port"
    return None


def parse_trace_request(request: Mapping[str, Any]) -> TracePacket:
    try:
        src = str(ipaddress.ip_address(str(request.get("src", ""))))
        dst = str(ipaddress.ip_address(str(request.get("dst", ""))))
    except ValueError as err:
        raise RequestError(f"trace: {err}") from None
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise RequestError("trace: source and destination are of different address families")
    port = request.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise RequestError(f"trace: port must be 1..65535, got {port!r}")
    proto = str(request.get("protocol", "tcp")).lower()
    if proto not in PROTOCOLS:
        raise RequestError(f"trace: protocol must be one of {', '.join(PROTOCOLS)}, got {proto!r}")
    return TracePacket(src, dst, port, proto)


def _optional_text(request: Mapping[str, Any], key: str) -> str | None:
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 253:
        raise RequestError(f"status: {key} must be a string of at most 253 characters")
    return value


class StatusService:
    """Answers status and trace requests from what the daemon and its mode know now."""

    def __init__(self, *, mode: ProxyMode, mode_name: str, node_name: str,
                 failures: Callable[[], tuple[int, str | None]] = lambda: (0, None),
                 healthy: Callable[[], bool] = lambda: False,
                 local_ips: Callable[[], Any] | None = None,
                 syncing: Callable[[], bool] = lambda: False) -> None:
        self.mode = mode
        self.mode_name = mode_name
        self.node_name = node_name
        self._failures = failures
        self._healthy = healthy
        self._local_ips = local_ips
        self._syncing = syncing
        self.state: ProxyState | None = None
        self.last_sync: float | None = None
        self.last_duration: float | None = None
        self.last_full = False
        self.syncs = 0
        self._server: asyncio.AbstractServer | None = None
        self._path: str | None = None
        self._summaries = SummaryCache()
        self._made_dir: str | None = None

    def synced(self, state: ProxyState, *, full: bool, duration: float, when: float | None = None) -> None:
        """Record a successful sync: the state the mode now realises."""
        self.state = state
        self.last_full = full
        self.last_duration = duration
        self.last_sync = time.time() if when is None else when
        self.syncs += 1

    # -- answers -----------------------------------------------------------------------------------

    async def status(self, request: Mapping[str, Any]) -> dict[str, Any]:
        namespace = _optional_text(request, "namespace")
        name = _optional_text(request, "name")
        started = time.perf_counter()
        state = self.state or ProxyState(node_name=self.node_name)
        names = select(state, namespace=namespace, name=name)
        filtered = namespace is not None or name is not None
        detail = request.get("detail")
        if detail is None:
            detail = filtered  # a whole node gets one summary line per service port
        elif not isinstance(detail, bool):
            raise RequestError("status: detail must be true or false")
        try:
            # A filtered request lets the mode read back only those services' kernel objects.
            mode_status = await self.mode.status(names if filtered else None)
        except Exception as err:  # a failing read-back still leaves the desired side worth showing
            log.warning("status: reading the kernel state failed: %s", err)
            mode_status = ModeStatus(matches=None, notes=[f"reading the kernel state failed: {err}"])
        failures, last_error = self._failures()
        return {
            "version": 1, "mode": self.mode_name, "node": self.node_name, "now": time.time(),
            "sync": {"last": self.last_sync, "duration_seconds": self.last_duration,
                     "running": self._syncing(),
                     "full": self.last_full if self.last_sync is not None else None, "syncs": self.syncs,
                     "consecutive_failures": failures, "last_error": last_error, "healthy": self._healthy()},
            "kernel": mode_status.to_json(),
            "service_ports_total": len(state.service_ports),
            "filter": {"namespace": namespace, "name": name}, "detail": detail,
            "services": (services_json(state, names, mode_status, detail=True) if detail
                         else self._summaries.summaries(state, names, mode_status)),
            "rejected": [r.to_json() for r in rejections.RECENT.recent()],
            "answer_seconds": round(time.perf_counter() - started, 6),
        }

    async def trace(self, request: Mapping[str, Any]) -> dict[str, Any]:
        packet = parse_trace_request(request)
        state = self.state or ProxyState(node_name=self.node_name)
        local: Iterable[str] = ()
        if self._local_ips is not None:
            local = await self._local_ips()
        found = service_for(state, packet, local)
        result = await self.mode.trace(packet)
        return {"version": 1, "mode": self.mode_name, "node": self.node_name,
                "packet": {"src": packet.src, "dst": packet.dst, "port": packet.port,
                           "protocol": packet.protocol},
                "service": found[0] if found else None, "address_kind": found[1] if found else None,
                **result.to_json()}

    async def answer(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            return {"error": f"request is not JSON: {err}"}
        if not isinstance(request, dict):
            return {"error": "request must be a JSON object"}
        op = request.get("op")
        try:
            if op == "status":
                return await self.status(request)
            if op == "trace":
                return await self.trace(request)
        except RequestError as err:
            return {"error": str(err)}
        return {"error": f"unknown op {op!r} (want status or trace)"}

    # -- the socket --------------------------------------------------------------------------------

    async def start(self, path: str | None) -> bool:
        """Listen on ``path``; False (with a warning) when it cannot or another proxyd holds it."""
        if not path:
            return False
        try:
            await self._claim(path)
            directory = os.path.dirname(path) or "."
            try:
                os.makedirs(directory, mode=0o755)
                self._made_dir = directory  # removed again at close when empty
            except FileExistsError:
                pass
            old_umask = os.umask(0o177)
            try:
                self._server = await asyncio.start_unix_server(self._handle, path=path,
                                                               limit=MAX_REQUEST + 1)
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
        except OSError as err:
            log.warning("status socket %s: %s; proxyd status and trace are off", path, err.strerror or err)
            return False
        self._path = path
        log.info("status socket: %s", path)
        return True

    @staticmethod
    async def _claim(path: str) -> None:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(probe, path), 2.0)
        except (OSError, TimeoutError):
            os.unlink(path)  # nobody listens: a stale socket a previous run left
            return
        finally:
            probe.close()
        raise OSError(f"another process (a running proxyd?) answers on {path}")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\n"), REQUEST_TIMEOUT)
            except asyncio.LimitOverrunError:
                answer: dict[str, Any] = {"error": f"request larger than {MAX_REQUEST} bytes"}
            except (asyncio.IncompleteReadError, TimeoutError) as err:
                partial = getattr(err, "partial", b"")
                answer = await self.answer(partial) if partial else {"error": "no request"}
            else:
                answer = await asyncio.wait_for(self.answer(raw), ANSWER_TIMEOUT)
            writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), ANSWER_TIMEOUT)
        except Exception as err:
            log.warning("status request failed: %s", err)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._path = None
        if self._made_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._made_dir)  # only when empty: another daemon's socket keeps it
            self._made_dir = None
