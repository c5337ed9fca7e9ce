"""Userspace mode's UDP data path: the engine's UDP thread, or its pure-Python twin, behind one interface.

``NativeUdpPath`` drives ``proxyd._engine.UdpEngine`` (``native/engine_udp.pxi``
with its C core ``native/engine_udp.h``): one thread that owns every UDP flow,
receives and sends in batches (``recvmmsg``/``sendmmsg``) and picks endpoints
in the engine's per-key ``Service`` (round robin, ClientIP affinity), with no
Python per datagram. ``udp.UdpProxy`` is its twin (asyncio, flows in the
shared connection table). The engine serves UDP whenever it serves TCP
(``engine.NATIVE``; ``PROXYD_NO_EXTENSIONS=1`` selects both twins).

What crosses the Python boundary, and when (never per datagram or flow):

* at each sync: listeners (a duplicate of the bound socket, the key's
  ``Service``, the source ranges it admits; a new key or new ranges
  reconfigure it in place), endpoint lists and affinity timeouts per table
  key without proxyd's own UDP listeners, then the flows whose endpoint left
  their list close (under the UDP thread's lock, before the sync goes on);
* every ``FLUSH_INTERVAL`` and before a scrape: the keys' cumulative
  counters (flows opened, bytes each way, rejections per reason; the same
  ``Service`` counters as TCP) turned into metric deltas, per-endpoint
  deltas for ``proxyd status``, and the number of flows evicted from a full
  table (``proxyd_udp_flows_evicted_total``);
* at scrape time: open flows per key (``proxyd_active_connections``);
* at shutdown: listeners go, every flow closes, the thread is joined.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any, Protocol

from proxyd import metrics
from proxyd.modes.userspace.engine import NativeTcpPath, _EngineListener, _NativeKeys
from proxyd.modes.userspace.listeners import OwnListeners, SourceFilter
from proxyd.modes.userspace.planner import TableEntry, TableKey
from proxyd.modes.userspace.stats import Stats
from proxyd.modes.userspace.udp import receive_pktinfo

UdpEngineNative: Any = None
try:
    import proxyd._engine
except ImportError:  # no compiler at install time: the twin serves
    pass
else:
    UdpEngineNative = getattr(proxyd._engine, "UdpEngine", None)

__all__ = ["NativeUdpPath", "UdpListenerLike", "UdpPath"]


class UdpListenerLike(Protocol):
    """A UDP listener as the applier holds it: its table key and the sources it admits can change."""

    @property
    def key(self) -> TableKey: ...
    @property
    def admits(self) -> Callable[[str], bool] | None: ...
    @admits.setter
    def admits(self, value: Callable[[str], bool] | None) -> None: ...
    def retarget(self, key: TableKey) -> None: ...
    def close(self) -> None: ...


class UdpPath(Protocol):
    """What userspace mode and its applier ask of the UDP data path (``NativeUdpPath``, ``udp.UdpProxy``)."""

    native: bool

    @property
    def own(self) -> OwnListeners: ...
    @own.setter
    def own(self, value: OwnListeners) -> None: ...
    def listen(self, sock: socket.socket, key: TableKey) -> UdpListenerLike: ...
    def set_endpoints(self, key: TableKey, entry: TableEntry, now: float) -> None: ...
    def remove_service(self, key: TableKey) -> None: ...
    def sweep(self, now: float) -> None: ...
    def flush(self) -> None: ...
    def flow_fds(self) -> int: ...
    def close(self) -> None: ...


class _NativeUdpListener(_EngineListener):
    """One bound UDP socket served by the UDP thread; a new key or source filter reconfigures it there."""

    __slots__ = ("handle", "path", "sock")

    def __init__(self, path: NativeUdpPath, sock: socket.socket, key: TableKey) -> None:
        self.path = path
        self.sock = sock
        self.key = key
        self._admits: SourceFilter | None = None
        receive_pktinfo(sock)
        self.handle: Any = path.engine.add_listener(sock, path.service(key).service, None)
        path.listeners.add(self)

    def _replace(self) -> None:
        # A UDP listener is reconfigured in place (its flows keep their sockets).
        ranges = self._admits.ranges if self._admits is not None else None
        self.path.engine.configure(self.handle, self.path.service(self.key).service, ranges or None)

    def close(self) -> None:
        """Stop receiving; flows of this listener end by idle timeout or endpoint changes (as the twin's)."""
        if self not in self.path.listeners:
            return
        self.path.listeners.discard(self)
        self.path.engine.remove_listener(self.handle)
        with contextlib.suppress(OSError):
            self.sock.close()


class NativeUdpPath(_NativeKeys):
    """The engine's UDP thread: it owns every flow; Python configures it and reads counters.

    Flow bound, idle timeout and eviction order are the twin's (the mode's
    ``max_flows``, ``--udp-timeout``, least recently used first). Each flow's
    socket counts in the TCP engine's descriptor budget at once (the UDP
    thread adds it to the engine's count), so connections and flows share
    one budget and a flow that would touch the reserve is refused
    (``resources``), as the twin's ``has_room`` refuses it.
    """

    native = True
    own_verb = "sent to"

    def __init__(self, *, tcp: NativeTcpPath, stats_of: Callable[[TableKey], Stats], max_flows: int,
                 idle_timeout: float) -> None:
        assert UdpEngineNative is not None
        super().__init__(stats_of=stats_of)
        self.engine = UdpEngineNative(tcp.engine, max_flows, max(idle_timeout, 0.01))
        self.listeners: set[_NativeUdpListener] = set()
        self._evicted = 0
        self.engine.start()

    def listen(self, sock: socket.socket, key: TableKey) -> _NativeUdpListener:
        return _NativeUdpListener(self, sock, key)

    def changed(self) -> None:
        self.engine.recheck()

    def flow_fds(self) -> int:
        return 0  # the engine counts its flow sockets (and its listeners' duplicates) itself

    def flows(self) -> int:
        return int(self.engine.flows())

    def flush(self) -> None:
        self.flush_services()
        evicted = int(self.engine.evicted())
        if evicted != self._evicted:
            metrics.UDP_FLOWS_EVICTED.inc(evicted - self._evicted)
            self._evicted = evicted

    def close(self) -> None:
        """Shutdown: every listener and flow closes, the UDP thread is joined."""
        for listener in list(self.listeners):
            listener.close()
        self.engine.stop()
        self.engine.close_flows()
        self.flush()
        for svc in (*self.services.values(), *self.retired):
            svc.retire()
