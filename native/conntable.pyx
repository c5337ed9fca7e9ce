# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
# cython: binding=False, embedsignature=True
"""Cython connection table of userspace mode (built as ``proxyd.modes.userspace._conntable``).

The twin of ``proxyd/modes/userspace/_conntable_py.py`` with identical observable behaviour;
``proxyd/modes/userspace/conntable.py`` documents the contract. What differs is the layout,
chosen for the per-connection hot path (pick, open, close):

* each key maps to one ``_Key`` object: one dict lookup on a ``str`` whose
  hash is cached, skipped altogether when the same key object comes again (a
  connection's pick and open usually follow each other). It holds the endpoint
  list and a C array of active counts aligned with it, so open/close are a
  pointer compare plus an integer increment when the caller hands back the
  tuple ``pick`` returned (equality through a dict is the fallback);
* counts of endpoints that left the list (connections still draining) move to
  a small per-key dict and back if the endpoint returns;
* ClientIP affinity entries and UDP flows each sit in a dict plus an
  intrusive doubly linked LRU ring (one per key for affinity, one per table for
  flows): a refresh moves pointers instead of deleting and re-inserting a dict
  entry, and a UDP lookup does not build a ``(key, client)`` tuple. A ring's
  order equals the insertion order of the twin's LRU dict, so evictions,
  expiries and sweeps remove the same entries in the same order.

Methods take ``str`` keys and client IPs and a float ``now`` (C-typed); the
twin is more lenient with other hashable keys, which callers must not rely on.
"""

cimport cython
from cpython.long cimport PyLong_AsSsize_t
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport PyObject

import math

cdef object _NO_KEY = object()


cdef list _normalise(object endpoints):
    """Validate, type and de-duplicate (first occurrence wins): the twin's ``_normalise``."""
    cdef list out = []
    cdef set seen = set()
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


cdef double _check_timeout(object value) except? -1.0:
    cdef double v = float(value)
    if math.isnan(v) or v < 0:
        raise ValueError(f"affinity_timeout must be >= 0, got {value!r}")
    return v


@cython.final
cdef class _Aff:
    pass


@cython.final
cdef class _Key:
    def __cinit__(self):
        self.eps = []
        self.index = {}
        self.counts = NULL
        self.n = 0
        self.orphans = {}
        self.present = False
        self.cursor = 0
        self.last_slot = 0
        self.timeout = 0.0
        self.affinity = {}
        self.aff_head = _Aff()
        self.aff_head.prev = self.aff_head
        self.aff_head.next = self.aff_head

    def __dealloc__(self):
        cdef _Aff e, nxt
        PyMem_Free(self.counts)
        # break the ring's reference cycles so entries are freed without waiting for the GC
        if self.aff_head is None:
            return
        e = self.aff_head.next
        while e is not None and e is not self.aff_head:
            nxt = e.next
            e.prev = None
            e.next = None
            e = nxt
        self.aff_head.prev = None
        self.aff_head.next = None

    cdef void aff_link_tail(self, _Aff e) noexcept:
        cdef _Aff tail = self.aff_head.prev
        e.prev = tail
        e.next = self.aff_head
        tail.next = e
        self.aff_head.prev = e

    cdef void aff_unlink(self, _Aff e) noexcept:
        e.prev.next = e.next
        e.next.prev = e.prev
        e.prev = None
        e.next = None

    cdef Py_ssize_t aff_clear(self) except -1:
        """Drop every entry, breaking the ring's reference cycles; returns how many there were."""
        cdef _Aff e = self.aff_head.next
        cdef _Aff nxt
        cdef Py_ssize_t n = 0
        while e is not None and e is not self.aff_head:
            nxt = e.next
            e.prev = None
            e.next = None
            e = nxt
            n += 1
        self.aff_head.prev = self.aff_head
        self.aff_head.next = self.aff_head
        self.affinity = {}
        return n

    cdef Py_ssize_t slot_of(self, object endpoint) noexcept:
        """Slot of ``endpoint`` in eps, -1 if absent; identity first, equality as fallback."""
        cdef Py_ssize_t i
        cdef PyObject *p
        if self.last_slot < self.n and self.eps[self.last_slot] is endpoint:
            return self.last_slot
        if self.n <= 16:
            for i in range(self.n):
                if self.eps[i] is endpoint:
                    return i
        p = PyDict_GetItem(self.index, endpoint)
        if p is NULL:
            return -1
        # index values are the small ints set_endpoints stored: the conversion cannot fail
        return PyLong_AsSsize_t(<object>p)


@cython.final
cdef class _Flow:
    pass


@cython.final
cdef class ConnTable:
    """Per-connection state of userspace mode; see ``proxyd.modes.userspace.conntable`` for the contract."""

    def __init__(self, *, max_udp_flows=65536):
        if isinstance(max_udp_flows, bool) or not isinstance(max_udp_flows, int) or max_udp_flows < 1:
            raise ValueError(f"max_udp_flows must be a positive int, got {max_udp_flows!r}")
        self.max_udp = max_udp_flows
        self.keys = {}
        self.total = 0
        self.aff_count = 0
        self.head = _Flow()
        self.head.prev = self.head
        self.head.next = self.head
        self.udp_keys = {}
        self.udp_n = 0
        # a sentinel no caller can pass, so even a None key goes through the dict
        self.last_key = _NO_KEY
        self.last_k = None

    def __dealloc__(self):
        # break the LRU ring's reference cycles so flows (and the caller's sockets) are freed promptly
        cdef _Flow f, nxt
        if self.head is None:
            return
        f = self.head.next
        while f is not None and f is not self.head:
            nxt = f.next
            f.prev = None
            f.next = None
            f = nxt
        self.head.prev = None
        self.head.next = None

    cdef _Key _key_or_none(self, str key):
        # a connection's pick, open and close usually pass the same key object in a row
        if key is self.last_key:
            return self.last_k
        cdef PyObject *p = PyDict_GetItem(self.keys, key)
        if p is NULL:
            return None
        self.last_key = key
        self.last_k = <_Key>p
        return self.last_k

    cdef _Key _key_for(self, str key):
        cdef _Key k = self._key_or_none(key)
        if k is None:
            k = _Key()
            self.keys[key] = k
            self.last_key = key
            self.last_k = k
        return k

    cdef void _forget_if_idle(self, str key, _Key k) except *:
        if not k.present and k.n == 0 and not k.orphans:
            del self.keys[key]
            if self.last_k is k:
                self.last_key = _NO_KEY
                self.last_k = None

    # -- services ------------------------------------------------------------------------------

    def set_endpoints(self, str key, endpoints, affinity_timeout, now):
        cdef list new = _normalise(endpoints)
        cdef double timeout = _check_timeout(affinity_timeout)
        cdef _Key k = self._key_for(key)
        cdef list old
        cdef dict index, aff
        cdef Py_ssize_t i, j, nnew
        cdef long *counts
        cdef PyObject *p
        if not k.present:
            # a key that only held draining counts starts afresh, like a new service in the twin
            k.present = True
            k.cursor = 0
            k.timeout = 0.0
        old = k.eps
        if new != old:
            index = {}
            nnew = len(new)
            for i in range(nnew):
                index[new[i]] = i
            nxt = old[k.cursor] if old else None
            if nxt is not None and nxt in index:
                k.cursor = index[nxt]
            else:
                k.cursor = k.cursor % nnew if nnew else 0
            counts = <long *>PyMem_Malloc((nnew if nnew else 1) * sizeof(long))
            if counts is NULL:
                raise MemoryError()
            for j in range(nnew):
                ep = new[j]
                p = PyDict_GetItem(k.index, ep)
                if p is not NULL:
                    counts[j] = k.counts[<Py_ssize_t><object>p]
                elif ep in k.orphans:
                    counts[j] = k.orphans.pop(ep)
                else:
                    counts[j] = 0
            for i in range(k.n):
                if k.counts[i] and old[i] not in index:
                    k.orphans[old[i]] = k.counts[i]
            PyMem_Free(k.counts)
            k.counts = counts
            k.n = nnew
            k.eps = new
            k.index = index
            k.last_slot = 0
        k.timeout = timeout
        aff = k.affinity
        if aff:
            if timeout == 0.0:
                self.aff_count -= k.aff_clear()
            else:
                index = k.index
                gone = [e for e in aff.values() if (<_Aff>e).endpoint not in index]
                for e in gone:
                    del aff[(<_Aff>e).client]
                    k.aff_unlink(<_Aff>e)
                self.aff_count -= len(gone)
        flows = self.udp_keys.get(key)
        if not flows:
            return []
        index = k.index
        dropped = [f for f in (<dict>flows).values() if (<_Flow>f).endpoint not in index]
        return self._drop_flows(key, flows, dropped)

    def remove_service(self, str key):
        cdef PyObject *p = PyDict_GetItem(self.keys, key)
        cdef _Key k
        cdef Py_ssize_t i
        if p is not NULL:
            k = <_Key>p
            if k.present:
                self.aff_count -= k.aff_clear()
                for i in range(k.n):
                    if k.counts[i]:
                        k.orphans[k.eps[i]] = k.counts[i]
                PyMem_Free(k.counts)
                k.counts = NULL
                k.n = 0
                k.eps = []
                k.index = {}
                k.cursor = 0
                k.last_slot = 0
                k.timeout = 0.0
                k.present = False
                self._forget_if_idle(key, k)
        flows = self.udp_keys.get(key)
        if not flows:
            return []
        return self._drop_flows(key, flows, list((<dict>flows).values()))

    cdef list _drop_flows(self, str key, dict flows, list dropped):
        cdef list out = []
        cdef _Flow f
        for f in dropped:
            del flows[f.client]
            self._unlink(f)
            out.append((f.client, f.endpoint, f.value))
        if not flows:
            del self.udp_keys[key]
        return out

    def services(self):
        return sorted([key for key, k in self.keys.items() if (<_Key>k).present])

    # -- picking -------------------------------------------------------------------------------

    def pick(self, str key, str client_ip, double now, exclude=()):
        cdef PyObject *p
        cdef _Key k = self._key_or_none(key)
        cdef _Aff e
        cdef Py_ssize_t n, i, k_, start
        cdef bint has_excl
        cdef double timeout
        if k is None or not k.present:
            return None
        has_excl = bool(exclude)
        timeout = k.timeout
        if timeout > 0.0:
            p = PyDict_GetItem(k.affinity, client_ip)
            if p is not NULL:
                e = <_Aff>p
                if now - e.last_used < timeout:
                    if not has_excl or e.endpoint not in exclude:
                        e.last_used = now
                        if e.next is not k.aff_head:
                            k.aff_unlink(e)
                            k.aff_link_tail(e)
                        return e.endpoint
                else:
                    del k.affinity[client_ip]
                    k.aff_unlink(e)
                    self.aff_count -= 1
        n = k.n
        start = k.cursor
        for k_ in range(n):
            i = start + k_
            if i >= n:
                i -= n
            ep = k.eps[i]
            if has_excl and ep in exclude:
                continue
            k.cursor = i + 1 if i + 1 < n else 0
            k.last_slot = i
            if timeout > 0.0:
                p = PyDict_GetItem(k.affinity, client_ip)
                if p is NULL:
                    e = _Aff()
                    e.client = client_ip
                    k.affinity[client_ip] = e
                    self.aff_count += 1
                else:
                    # a live entry whose endpoint was excluded: rebind it
                    e = <_Aff>p
                    k.aff_unlink(e)
                e.endpoint = ep
                e.last_used = now
                k.aff_link_tail(e)
            return ep
        return None

    # -- active connections --------------------------------------------------------------------

    def open(self, str key, endpoint):
        cdef _Key k = self._key_for(key)
        cdef Py_ssize_t slot = k.slot_of(endpoint)
        cdef PyObject *p
        if slot >= 0:
            k.counts[slot] += 1
        else:
            p = PyDict_GetItem(k.orphans, endpoint)
            k.orphans[endpoint] = (<object>p + 1) if p is not NULL else 1
        self.total += 1

    def close(self, str key, endpoint):
        cdef PyObject *p
        cdef _Key k = self._key_or_none(key)
        cdef Py_ssize_t slot
        cdef long c
        if k is None:
            return
        slot = k.slot_of(endpoint)
        if slot >= 0:
            if k.counts[slot] == 0:
                return
            k.counts[slot] -= 1
            self.total -= 1
            return
        p = PyDict_GetItem(k.orphans, endpoint)
        if p is NULL:
            return
        c = <object>p
        self.total -= 1
        if c > 1:
            k.orphans[endpoint] = c - 1
            return
        del k.orphans[endpoint]
        self._forget_if_idle(key, k)

    def active(self, str key):
        cdef PyObject *p = PyDict_GetItem(self.keys, key)
        cdef _Key k
        cdef Py_ssize_t i
        cdef dict out = {}
        if p is NULL:
            return out
        k = <_Key>p
        for i in range(k.n):
            if k.counts[i]:
                out[k.eps[i]] = k.counts[i]
        out.update(k.orphans)
        return out

    def total_active(self):
        return self.total

    # -- UDP flows -----------------------------------------------------------------------------

    cdef void _unlink(self, _Flow f) noexcept:
        f.prev.next = f.next
        f.next.prev = f.prev
        f.prev = None
        f.next = None
        self.udp_n -= 1

    cdef void _move_to_tail(self, _Flow f) noexcept:
        cdef _Flow tail
        if f.next is self.head:
            return
        f.prev.next = f.next
        f.next.prev = f.prev
        tail = self.head.prev
        f.prev = tail
        f.next = self.head
        tail.next = f
        self.head.prev = f

    def udp_get(self, str key, client, double now):
        cdef PyObject *p = PyDict_GetItem(self.udp_keys, key)
        cdef _Flow f
        if p is NULL:
            return None
        p = PyDict_GetItem(<dict>p, client)
        if p is NULL:
            return None
        f = <_Flow>p
        f.last_used = now
        self._move_to_tail(f)
        return (f.endpoint, f.value)

    def udp_set(self, str key, client, endpoint, value, double now):
        cdef PyObject *p = PyDict_GetItem(self.udp_keys, key)
        cdef dict flows
        cdef _Flow f, victim, tail
        cdef list evicted
        if p is not NULL:
            flows = <dict>p
            p = PyDict_GetItem(flows, client)
            if p is not NULL:
                f = <_Flow>p
                old_ep = f.endpoint
                old_value = f.value
                f.endpoint = endpoint
                f.value = value
                f.last_used = now
                self._move_to_tail(f)
                if old_value is value:
                    return []
                return [(key, client, old_ep, old_value)]
        evicted = []
        while self.udp_n >= self.max_udp:
            victim = self.head.next
            vflows = <dict>self.udp_keys[victim.key]
            del vflows[victim.client]
            if not vflows:
                del self.udp_keys[victim.key]
            self._unlink(victim)
            evicted.append((victim.key, victim.client, victim.endpoint, victim.value))
        f = _Flow()
        f.key = key
        f.client = client
        f.endpoint = endpoint
        f.value = value
        f.last_used = now
        tail = self.head.prev
        f.prev = tail
        f.next = self.head
        tail.next = f
        self.head.prev = f
        self.udp_n += 1
        # looked up again: evictions above may have removed this key's dict
        p = PyDict_GetItem(self.udp_keys, key)
        if p is NULL:
            flows = {}
            self.udp_keys[key] = flows
        else:
            flows = <dict>p
        flows[client] = f
        return evicted

    def udp_expire(self, double now, double idle_timeout):
        cdef list out = []
        cdef _Flow f = self.head.next
        cdef _Flow nxt
        while f is not self.head:
            if now - f.last_used < idle_timeout:
                break
            nxt = f.next
            flows = <dict>self.udp_keys[f.key]
            del flows[f.client]
            if not flows:
                del self.udp_keys[f.key]
            self._unlink(f)
            out.append((f.key, f.client, f.endpoint, f.value))
            f = nxt
        return out

    def udp_count(self):
        return self.udp_n

    # -- affinity expiry -----------------------------------------------------------------------

    def sweep(self, double now):
        cdef long removed = 0
        cdef _Key k
        cdef _Aff e, nxt
        cdef double timeout
        for kobj in self.keys.values():
            k = <_Key>kobj
            timeout = k.timeout
            e = k.aff_head.next
            # "not <" rather than ">=" so a NaN clock behaves as in the twin
            while e is not k.aff_head and not (now - e.last_used < timeout):
                nxt = e.next
                del k.affinity[e.client]
                k.aff_unlink(e)
                removed += 1
                e = nxt
        self.aff_count -= removed
        return removed

    def affinity_count(self):
        return self.aff_count
