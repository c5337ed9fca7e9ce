"""Pure-Python connection table of userspace mode (the twin of ``native/conntable.pyx``).

See ``proxyd.modes.userspace.conntable`` for the semantics both implementations share; this
module is the reference: the Cython extension must behave identically, and
``tests/unit/test_conntable.py`` checks that with random operation sequences.

Ordering is part of the observable behaviour (it decides which flows a full
table evicts and the order of returned lists), so every ordered structure here
is a plain ``dict`` used as an LRU (``pop`` then re-insert moves an entry to the
end); the extension uses the same dict operations in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

Endpoint = tuple[str, int]
Flow = tuple[str, object, Endpoint, object]


class _Service:
    """One service port: its endpoint list, round-robin cursor and affinity entries."""

    __slots__ = ("affinity", "cursor", "endpoints", "index", "timeout")

    def __init__(self) -> None:
        self.endpoints: list[Endpoint] = []
        self.index: dict[Endpoint, int] = {}
        self.cursor = 0
        self.timeout = 0.0
        # client ip -> [endpoint, last_used], least recently used first
        self.affinity: dict[str, list[Any]] = {}


class _UdpFlow:
    __slots__ = ("client", "endpoint", "key", "last_used", "value")

    def __init__(self, key: str, client: object, endpoint: Endpoint, value: object, now: float) -> None:
        self.key = key
        self.client = client
        self.endpoint = endpoint
        self.value = value
        self.last_used = now


def _normalise(endpoints: Sequence[tuple[str, int]]) -> list[Endpoint]:
    """Validate, type and de-duplicate (first occurrence wins) an endpoint list."""
    out: list[Endpoint] = []
    seen: set[Endpoint] = set()
    for item in endpoints:
        ip, port = item
        if not isinstance(ip, str) or isinstance(port, bool) or not isinstance(port, int):
            raise TypeError(f"endpoint must be (str, int), got {item!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"endpoint port out of range: {item!r}")
        ep = (ip, port)
        if ep not in seen:
            seen.add(ep)
            out.append(ep)
    return out


def _check_timeout(value: float) -> float:
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"affinity_timeout must be >= 0, got {value!r}")
    return value


class ConnTable:
    """Per-connection state of userspace mode; see ``proxyd.modes.userspace.conntable`` for the contract."""

    def __init__(self, *, max_udp_flows: int = 65536) -> None:
        if isinstance(max_udp_flows, bool) or not isinstance(max_udp_flows, int) or max_udp_flows < 1:
            raise ValueError(f"max_udp_flows must be a positive int, got {max_udp_flows!r}")
        self._max_udp = max_udp_flows
        self._services: dict[str, _Service] = {}
        # key -> {endpoint: open connections}; outlives the service while connections drain
        self._active: dict[str, dict[Endpoint, int]] = {}
        self._total_active = 0
        self._affinity_count = 0
        # (key, client) -> flow, least recently used first
        self._udp: dict[tuple[str, object], _UdpFlow] = {}
        # key -> {client: flow}, in creation order, so a sync touches only its key's flows
        self._udp_by_key: dict[str, dict[object, _UdpFlow]] = {}

    # -- services -------------------------------------------------------------------------------

    def set_endpoints(
        self, key: str, endpoints: Sequence[tuple[str, int]], affinity_timeout: float, now: float
    ) -> list[Any]:
        new = _normalise(endpoints)
        timeout = _check_timeout(affinity_timeout)
        svc = self._services.get(key)
        if svc is None:
            svc = self._services[key] = _Service()
        old = svc.endpoints
        if new != old:
            index = {ep: i for i, ep in enumerate(new)}
            # keep serving from the endpoint the cursor pointed at, wherever it moved
            nxt = old[svc.cursor] if old else None
            if nxt is not None and nxt in index:
                svc.cursor = index[nxt]
            else:
                svc.cursor = svc.cursor % len(new) if new else 0
            svc.endpoints = new
            svc.index = index
        svc.timeout = timeout
        aff = svc.affinity
        if aff:
            if timeout == 0.0:
                self._affinity_count -= len(aff)
                svc.affinity = {}
            else:
                index = svc.index
                gone = [ip for ip, entry in aff.items() if entry[0] not in index]
                for ip in gone:
                    del aff[ip]
                self._affinity_count -= len(gone)
        flows = self._udp_by_key.get(key)
        if not flows:
            return []
        index = svc.index
        dropped = [f for f in flows.values() if f.endpoint not in index]
        return self._drop_flows(key, flows, dropped)

    def remove_service(self, key: str) -> list[Any]:
        svc = self._services.pop(key, None)
        if svc is not None:
            self._affinity_count -= len(svc.affinity)
        flows = self._udp_by_key.get(key)
        if not flows:
            return []
        return self._drop_flows(key, flows, list(flows.values()))

    def _drop_flows(self, key: str, flows: dict[object, _UdpFlow], dropped: list[_UdpFlow]) -> list[Any]:
        udp = self._udp
        out = []
        for f in dropped:
            del flows[f.client]
            del udp[(key, f.client)]
            out.append((f.client, f.endpoint, f.value))
        if not flows:
            del self._udp_by_key[key]
        return out

    def services(self) -> list[str]:
        return sorted(self._services)

    # -- picking --------------------------------------------------------------------------------

    def pick(
        self, key: str, client_ip: str, now: float, exclude: Collection[tuple[str, int]] = ()
    ) -> tuple[str, int] | None:
        svc = self._services.get(key)
        if svc is None:
            return None
        timeout = svc.timeout
        aff = svc.affinity
        if timeout > 0.0:
            entry = aff.get(client_ip)
            if entry is not None:
                ep: tuple[str, int] = entry[0]
                if now - entry[1] < timeout:
                    if ep not in exclude:
                        del aff[client_ip]
                        entry[1] = now
                        aff[client_ip] = entry
                        return ep
                else:
                    del aff[client_ip]
                    self._affinity_count -= 1
        eps = svc.endpoints
        n = len(eps)
        start = svc.cursor
        for k in range(n):
            i = start + k
            if i >= n:
                i -= n
            ep = eps[i]
            if ep in exclude:
                continue
            svc.cursor = i + 1 if i + 1 < n else 0
            if timeout > 0.0:
                old = aff.pop(client_ip, None)
                if old is None:
                    self._affinity_count += 1
                aff[client_ip] = [ep, now]
            return ep
        return None

    # -- active connections ---------------------------------------------------------------------

    def open(self, key: str, endpoint: tuple[str, int]) -> None:
        counts = self._active.get(key)
        if counts is None:
            counts = self._active[key] = {}
        counts[endpoint] = counts.get(endpoint, 0) + 1
        self._total_active += 1

    def close(self, key: str, endpoint: tuple[str, int]) -> None:
        counts = self._active.get(key)
        if counts is None:
            return
        n = counts.get(endpoint)
        if n is None:
            return
        self._total_active -= 1
        if n > 1:
            counts[endpoint] = n - 1
            return
        del counts[endpoint]
        if not counts:
            del self._active[key]

    def active(self, key: str) -> dict[tuple[str, int], int]:
        return dict(self._active.get(key, {}))

    def total_active(self) -> int:
        return self._total_active

    # -- UDP flows ------------------------------------------------------------------------------

    def udp_get(self, key: str, client: tuple[str, int], now: float) -> tuple[tuple[str, int], object] | None:
        fk = (key, client)
        udp = self._udp
        f = udp.pop(fk, None)
        if f is None:
            return None
        f.last_used = now
        udp[fk] = f
        return (f.endpoint, f.value)

    def udp_set(
        self, key: str, client: tuple[str, int], endpoint: tuple[str, int], value: object, now: float
    ) -> list[Any]:
        fk = (key, client)
        udp = self._udp
        f = udp.pop(fk, None)
        if f is not None:
            old_ep, old_value = f.endpoint, f.value
            f.endpoint, f.value, f.last_used = endpoint, value, now
            udp[fk] = f
            # a replaced value (the caller's old backend socket) is handed back to be closed
            return [] if old_value is value else [(key, client, old_ep, old_value)]
        evicted = []
        while len(udp) >= self._max_udp:
            victim = next(iter(udp.values()))
            self._unlink(victim)
            evicted.append((victim.key, victim.client, victim.endpoint, victim.value))
        f = _UdpFlow(key, client, endpoint, value, now)
        udp[fk] = f
        flows = self._udp_by_key.get(key)
        if flows is None:
            flows = self._udp_by_key[key] = {}
        flows[client] = f
        return evicted

    def _unlink(self, f: _UdpFlow) -> None:
        del self._udp[(f.key, f.client)]
        flows = self._udp_by_key[f.key]
        del flows[f.client]
        if not flows:
            del self._udp_by_key[f.key]

    def udp_expire(self, now: float, idle_timeout: float) -> list[Any]:
        out = []
        for f in self._udp.values():
            if now - f.last_used < idle_timeout:
                break
            out.append(f)
        for f in out:
            self._unlink(f)
        return [(f.key, f.client, f.endpoint, f.value) for f in out]

    def udp_count(self) -> int:
        return len(self._udp)

    # -- affinity expiry ------------------------------------------------------------------------

    def sweep(self, now: float) -> int:
        removed = 0
        for svc in self._services.values():
            aff = svc.affinity
            if not aff:
                continue
            timeout = svc.timeout
            dead = []
            for ip, entry in aff.items():
                if now - entry[1] < timeout:
                    break
                dead.append(ip)
            for ip in dead:
                del aff[ip]
            removed += len(dead)
        self._affinity_count -= removed
        return removed

    def affinity_count(self) -> int:
        return self._affinity_count
