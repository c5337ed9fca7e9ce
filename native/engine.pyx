# cython: language_level=3
"""The native TCP and UDP engine of userspace mode (compiled as ``proxyd._engine``).

The hot path is C (``native/engine_core.h``): worker threads started here
never take the GIL. This module is the control surface Python uses at sync
time and for metrics: services (endpoint lists, affinity), listeners, the
descriptor budget, counters, drain and reset. Its pure-Python twin is the
asyncio data path in ``proxyd/modes/userspace/tcp.py``; the adapter both are
used through is ``proxyd/modes/userspace/engine.py``. UDP (``UdpEngine``, one thread
owning every flow) is in ``native/engine_udp.pxi`` and ``native/engine_udp.h``; its twin is
``proxyd/modes/userspace/udp.py``, its adapter ``proxyd/modes/userspace/udp_engine.py``.
"""

import ipaddress
import os
import socket

from libc.stdlib cimport malloc, free, calloc


cdef extern from "engine_core.h" nogil:
    ctypedef struct pe_engine:
        pass
    ctypedef struct pe_svc:
        pass
    ctypedef struct pe_lst:
        pass
    ctypedef struct pe_addr:
        pass
    ctypedef struct pe_ip:
        pass
    ctypedef struct pe_cidr:
        pass
    ctypedef struct pe_epc:
        pass
    ctypedef struct pe_epc_out:
        pe_addr addr
        unsigned long long opened
        unsigned long long bytes_up
        unsigned long long bytes_down
    int PE_NCOUNTERS
    int PE_ATTEMPTS
    pe_engine *pe_engine_new(int nworkers, long fd_limit, int copy, int pipe_size, int pool_max, double ack_hold,
                             double nap, double stream_nap)
    int pe_engine_start(pe_engine *e)
    void pe_engine_stop(pe_engine *e)
    void pe_engine_free(pe_engine *e)
    void pe_engine_reset(pe_engine *e)
    void pe_engine_collect(pe_engine *e)
    long pe_engine_conns(pe_engine *e)
    long pe_engine_fds(pe_engine *e)
    unsigned long long pe_engine_pauses(pe_engine *e)
    unsigned long long pe_engine_naps(pe_engine *e)
    void pe_engine_set_other(pe_engine *e, long n)
    long pe_engine_reset_count(pe_engine *e)
    pe_svc *pe_svc_new()
    void pe_svc_unref(pe_svc *s)
    int pe_svc_set(pe_svc *s, pe_addr *eps, int n, double timeout)
    long pe_svc_sweep(pe_svc *s, double now)
    void pe_svc_read(pe_svc *s, unsigned long long *out)
    long pe_svc_active(pe_svc *s)
    size_t pe_svc_affinity_count(pe_svc *s)
    int pe_pick(pe_svc *s, const pe_ip *ip, double now, const pe_addr *tried, int ntried, pe_addr *out,
                pe_epc **epc)
    int pe_svc_epc_count(pe_svc *s)
    int pe_svc_take_eps(pe_svc *s, pe_epc_out *out, int cap)
    int pe_addr_set(pe_addr *a, int family, const char *packed, int port)
    int pe_addr_get(const pe_addr *a, char *packed, int *port)
    void pe_ip_set(pe_ip *ip, int family, const char *packed)
    void pe_cidr_set(pe_cidr *c, int family, const char *packed, int prefix)
    pe_lst *pe_listener_add(pe_engine *e, int fd, pe_svc *svc, pe_cidr *ranges, int nranges)
    void pe_listener_remove(pe_engine *e, pe_lst *l, int stop)
    size_t sizeof_pe_addr "sizeof(pe_addr)"
    size_t sizeof_pe_cidr "sizeof(pe_cidr)"


COUNTERS = ("opened", "bytes_to_endpoint", "bytes_to_client", "retries", "active")
REJECT_REASONS = ("no endpoint", "all endpoints failed", "source range", "resources", "client gone")


cdef int _packed(str ip, char *out) except -1:
    """4 or 6, with the address packed into out (16 bytes)."""
    if ":" in ip:
        b = socket.inet_pton(socket.AF_INET6, ip)
        fam = 6
    else:
        b = socket.inet_pton(socket.AF_INET, ip)
        fam = 4
    cdef const char *p = b
    cdef Py_ssize_t i
    for i in range(len(b)):
        out[i] = p[i]
    return fam


cdef class Service:
    """One table key's endpoint list, round-robin cursor, ClientIP affinity and counters."""

    cdef pe_svc *svc

    def __cinit__(self):
        self.svc = pe_svc_new()
        if self.svc == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.svc != NULL:
            pe_svc_unref(self.svc)  # connections and listeners keep their own references

    def set_endpoints(self, endpoints, double affinity_timeout):
        """Install a list of (ip, port) (duplicates collapse, first wins); same cursor rule as the conntable."""
        if affinity_timeout != affinity_timeout or affinity_timeout < 0:
            raise ValueError(f"affinity_timeout must be >= 0, got {affinity_timeout!r}")
        seen = set()
        unique = []
        for item in endpoints:
            ip, port = item
            if not isinstance(ip, str) or isinstance(port, bool) or not isinstance(port, int):
                raise TypeError(f"endpoint must be (str, int), got {item!r}")
            if not 0 <= port <= 65535:
                raise ValueError(f"endpoint port out of range: {item!r}")
            if (ip, port) not in seen:
                seen.add((ip, port))
                unique.append((ip, port))
        cdef char buf[16]
        cdef int n = len(unique)
        cdef pe_addr *eps = <pe_addr *>calloc(n if n else 1, sizeof_pe_addr)
        if eps == NULL:
            raise MemoryError()
        cdef int i = 0
        try:
            for ip, port in unique:
                fam = _packed(ip, buf)
                pe_addr_set(<pe_addr *>(<char *>eps + i * sizeof_pe_addr), fam, buf, port)
                i += 1
        except BaseException:
            free(eps)
            raise
        if pe_svc_set(self.svc, eps, n, affinity_timeout) < 0:  # takes eps
            raise MemoryError()

    def counters(self):
        """(opened, bytes to endpoint, bytes to client, retries, active, *rejected per REJECT_REASONS), cumulative."""
        cdef unsigned long long out[16]
        pe_svc_read(self.svc, out)
        return tuple(out[i] for i in range(PE_NCOUNTERS))

    def active(self):
        return pe_svc_active(self.svc)

    def sweep(self, double now):
        """Remove expired affinity entries; how many."""
        return pe_svc_sweep(self.svc, now)

    def affinity_count(self):
        return pe_svc_affinity_count(self.svc)

    def pick(self, str client_ip, double now, exclude=()):
        """The endpoint a new connection from client_ip would get (the engine's own C pick), or None."""
        cdef char buf[16]
        cdef pe_ip ip
        cdef pe_addr out
        cdef int port = 0
        cdef int k = len(exclude)
        cdef int j = 0
        cdef pe_addr *tried = <pe_addr *>calloc(k if k else 1, sizeof_pe_addr)
        if tried == NULL:
            raise MemoryError()
        try:
            fam = _packed(client_ip, buf)
            pe_ip_set(&ip, fam, buf)
            for eip, eport in exclude:
                efam = _packed(eip, buf)
                pe_addr_set(<pe_addr *>(<char *>tried + j * sizeof_pe_addr), efam, buf, eport)
                j += 1
            if not pe_pick(self.svc, &ip, now, tried, k, &out, NULL):
                return None
        finally:
            free(tried)
        return _endpoint(&out)

    def take_endpoint_counts(self):
        """((ip, port), opened, bytes to endpoint, bytes to client) counted since the last call, per endpoint.

        Each count is handed out once (the caller adds the deltas up); endpoints with nothing new are
        left out. An endpoint removed from the list is still reported while connections to it count.
        """
        cdef int cap = pe_svc_epc_count(self.svc)
        if cap == 0:
            return []
        cdef pe_epc_out *out = <pe_epc_out *>calloc(cap, sizeof(pe_epc_out))
        if out == NULL:
            raise MemoryError()
        cdef int k, i
        try:
            k = pe_svc_take_eps(self.svc, out, cap)
            return [(_endpoint(&out[i].addr), out[i].opened, out[i].bytes_up, out[i].bytes_down)
                    for i in range(k)]
        finally:
            free(out)


cdef tuple _endpoint(const pe_addr *a):
    cdef char buf[16]
    cdef int port = 0
    fam = pe_addr_get(a, buf, &port)
    if fam == 4:
        return (socket.inet_ntop(socket.AF_INET, buf[:4]), port)
    return (socket.inet_ntop(socket.AF_INET6, buf[:16]), port)


cdef class Listener:
    """A listening socket handed to the engine (the engine owns the descriptor ``fd``).

    ``fd`` stays open until ``remove_listener`` (and until no worker can still be
    handling an event for it); a replacement listener on the same socket takes
    a duplicate of it.
    """

    cdef pe_lst *lst
    cdef Engine engine
    cdef readonly Service service
    cdef readonly tuple ranges
    cdef readonly int fd


cdef pe_cidr *_cidrs(ranges, int *count) except? NULL:
    """The source ranges as a malloc'd pe_cidr array (NULL and 0 for every source)."""
    cdef char buf[16]
    cdef const unsigned char *pk
    cdef Py_ssize_t i
    cdef int n = 0
    count[0] = 0
    if not ranges:
        return NULL
    nets = [ipaddress.ip_network(r, strict=False) for r in ranges]
    cdef pe_cidr *cidrs = <pe_cidr *>calloc(len(nets) if nets else 1, sizeof_pe_cidr)
    if cidrs == NULL:
        raise MemoryError()
    for net in nets:
        packed = net.network_address.packed
        pk = packed
        for i in range(len(packed)):
            buf[i] = <char>pk[i]
        pe_cidr_set(<pe_cidr *>(<char *>cidrs + n * sizeof_pe_cidr), net.version, buf, net.prefixlen)
        n += 1
    count[0] = n
    return cidrs


cdef class Engine:
    """N worker threads proxying every TCP connection of userspace mode; see engine_core.h."""

    cdef pe_engine *eng
    cdef readonly int workers
    cdef bint started

    def __cinit__(self, int workers, long fd_limit, bint copy=False, int pipe_size=256 * 1024, int pool_max=256,
                  double ack_hold=0.005, double nap=30e-6, double stream_nap=150e-6):
        # ack_hold: how long a connection to a service whose clients speak first keeps the endpoint
        # handshake's last ACK for the client's first bytes to carry it (docs/userspace.md)
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if not 0 <= ack_hold <= 0.2:  # the kernel sends the ACK on its own after 200 ms
            raise ValueError("ack_hold must be within [0, 0.2] seconds")
        # nap: how long a worker under load lets events gather before its next poll (docs/userspace.md);
        # every event of that batch may wait that long, so it stays far below a connection's round trip
        if not 0 <= nap <= 0.001:
            raise ValueError("nap must be within [0, 0.001] seconds")
        # stream_nap: the nap after a batch that moved a stream's worth of bytes; it delays only the tail
        # of a transfer, by at most its length, while each poll then takes more bytes per system call
        if not 0 <= stream_nap <= 0.001:
            raise ValueError("stream_nap must be within [0, 0.001] seconds")
        self.eng = pe_engine_new(workers, fd_limit, copy, pipe_size, pool_max, ack_hold, nap, stream_nap)
        if self.eng == NULL:
            raise OSError("cannot create the engine's epoll sets")
        self.workers = workers

    def start(self):
        if self.started:
            return
        err = pe_engine_start(self.eng)
        self.started = True  # workers that did start are joined by stop()
        if err:
            raise OSError(err, os.strerror(err))

    def add_listener(self, sock, Service service, ranges=None, bint adopt=False):
        """Serve ``service`` on the listening socket ``sock`` (ranges: the source CIDRs it admits, or None).

        The engine duplicates ``sock``'s descriptor; with ``adopt``, ``sock`` is a
        descriptor (int) the engine takes over instead (closed by the engine, also
        when this call fails), so a listener costs the process one descriptor.
        """
        cdef pe_cidr *cidrs = NULL
        cdef int n = 0
        try:
            cidrs = _cidrs(ranges, &n)
        except BaseException:
            if adopt:
                os.close(sock)
            raise
        if adopt:
            fd = sock
        else:
            fd = os.dup(sock.fileno())
            os.set_inheritable(fd, False)
        cdef pe_lst *lst = pe_listener_add(self.eng, fd, service.svc, cidrs, n)
        if lst == NULL:
            free(cidrs)
            os.close(fd)
            raise MemoryError()
        cdef Listener out = Listener.__new__(Listener)
        out.lst = lst
        out.engine = self
        out.service = service
        out.ranges = tuple(ranges) if ranges else None
        out.fd = fd
        return out

    def remove_listener(self, Listener listener, bint stop=True):
        """Stop serving the listener (the engine's descriptor closes once no worker can be using it).

        stop: also stop listening at once (shutdown; clients in the backlog are reset, new ones refused);
        False when another listener takes the same socket over.
        """
        if listener.lst != NULL:
            pe_listener_remove(self.eng, listener.lst, stop)
            listener.lst = NULL

    def set_other_fds(self, long n):
        """Descriptors the rest of the process holds, for the engine's budget."""
        pe_engine_set_other(self.eng, n)

    def connections(self):
        """Connections dialing or pumping, over all workers."""
        return pe_engine_conns(self.eng)

    def fds(self):
        return pe_engine_fds(self.eng)

    def pauses(self):
        return pe_engine_pauses(self.eng)

    def naps(self):
        """Naps the workers took under load before polling again (see ``nap``), all together."""
        return pe_engine_naps(self.eng)

    def collect(self):
        pe_engine_collect(self.eng)

    def reset_all(self):
        """Reset every connection (shutdown after the grace period); the workers do it at their next wake-up."""
        pe_engine_reset(self.eng)

    def reset_count(self):
        return pe_engine_reset_count(self.eng)

    def stop(self):
        """Reset what is left and join the workers (blocks for at most one worker loop)."""
        if self.started:
            with nogil:
                pe_engine_stop(self.eng)
            self.started = False

    def __dealloc__(self):
        if self.eng != NULL:
            with nogil:
                pe_engine_free(self.eng)
            self.eng = NULL


include "engine_udp.pxi"
