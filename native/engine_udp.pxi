# The UDP control surface of proxyd._engine (included by engine.pyx; its C core is engine_udp.h).
#
# One UDP thread owns every flow (see engine_udp.h). Python hands it listeners (a duplicate of the
# bound socket, the Service it feeds, the source ranges it admits), says when endpoint lists
# changed, and reads the flow count and evictions; packet and byte counters are the Service's.

cimport cython


cdef extern from "engine_udp.h" nogil:
    ctypedef struct pu_engine:
        pass
    ctypedef struct pu_lst:
        pass
    int PU_BATCH
    pu_engine *pu_engine_new(pe_engine *e, long max_flows, double idle)
    int pu_engine_start(pu_engine *u)
    void pu_engine_stop(pu_engine *u)
    void pu_engine_free(pu_engine *u)
    pu_lst *pu_listener_add(pu_engine *u, int fd, pe_svc *svc, pe_cidr *ranges, int nranges)
    void pu_listener_set(pu_engine *u, pu_lst *l, pe_svc *svc, pe_cidr *ranges, int nranges)
    void pu_listener_remove(pu_engine *u, pu_lst *l)
    void pu_recheck(pu_engine *u)
    void pu_close_flows(pu_engine *u)
    long pu_flows(pu_engine *u)
    unsigned long long pu_evicted(pu_engine *u)


UDP_BATCH = PU_BATCH


cdef class UdpListener:
    """A bound UDP socket handed to the UDP thread (which owns a duplicate of its descriptor)."""

    cdef pu_lst *lst
    cdef readonly Service service
    cdef readonly tuple ranges


@cython.no_gc_clear  # __dealloc__ needs self.engine alive (the flows' descriptors count in it)
cdef class UdpEngine:
    """The UDP thread of userspace mode: every UDP flow, batched receive and send; see engine_udp.h."""

    cdef pu_engine *u
    cdef readonly Engine engine  # the descriptor budget is the TCP engine's
    cdef bint started

    def __cinit__(self, Engine engine not None, long max_flows, double idle_timeout):
        if max_flows < 1:
            raise ValueError("max_flows must be >= 1")
        if idle_timeout != idle_timeout or idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be > 0, got {idle_timeout!r}")
        self.u = pu_engine_new(engine.eng, max_flows, idle_timeout)
        if self.u == NULL:
            raise OSError("cannot create the UDP engine's epoll set")
        self.engine = engine

    def start(self):
        if self.started:
            return
        err = pu_engine_start(self.u)
        if err:
            raise OSError(err, os.strerror(err))
        self.started = True

    def add_listener(self, sock, Service service not None, ranges=None):
        """Serve ``service`` on the bound UDP socket ``sock`` (ranges: the source CIDRs it admits, or None)."""
        if sock.type != socket.SOCK_DGRAM:
            raise ValueError("a UDP listener needs a datagram socket")
        cdef int n = 0
        cdef pe_cidr *cidrs = _cidrs(ranges, &n)
        fd = os.dup(sock.fileno())
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)
        cdef pu_lst *lst = pu_listener_add(self.u, fd, service.svc, cidrs, n)
        if lst == NULL:
            free(cidrs)
            os.close(fd)
            raise MemoryError()
        cdef UdpListener out = UdpListener.__new__(UdpListener)
        out.lst = lst
        out.service = service
        out.ranges = tuple(ranges) if ranges else None
        return out

    def configure(self, UdpListener listener not None, Service service not None, ranges=None):
        """Point the listener at another service or source ranges (its flows keep replying through it)."""
        if listener.lst == NULL:
            raise ValueError("the listener was removed")
        cdef int n = 0
        cdef pe_cidr *cidrs = _cidrs(ranges, &n)
        pu_listener_set(self.u, listener.lst, service.svc, cidrs, n)
        listener.service = service
        listener.ranges = tuple(ranges) if ranges else None

    def remove_listener(self, UdpListener listener not None):
        """Stop receiving on the listener and close the engine's descriptor of it now."""
        if listener.lst != NULL:
            pu_listener_remove(self.u, listener.lst)
            listener.lst = NULL

    def recheck(self):
        """Endpoint lists changed: flows whose endpoint left their service close before this returns."""
        with nogil:
            pu_recheck(self.u)

    def close_flows(self):
        """Close every flow (shutdown)."""
        pu_close_flows(self.u)

    def flows(self):
        return pu_flows(self.u)

    def evicted(self):
        """Flows closed because the table was full (least recently used first), since the start."""
        return pu_evicted(self.u)

    def stop(self):
        """Join the UDP thread (flows stay until close_flows or deallocation)."""
        if self.started:
            with nogil:
                pu_engine_stop(self.u)
            self.started = False

    def __dealloc__(self):
        if self.u != NULL:
            with nogil:
                pu_engine_free(self.u)
            self.u = NULL
