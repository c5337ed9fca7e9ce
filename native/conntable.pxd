cimport cython

# Declarations of the Cython connection table (compiled as proxyd.modes.userspace._conntable).
# The pure twin is proxyd/modes/userspace/_conntable_py.py; conntable.py beside it documents the shared
# contract.

@cython.final
cdef class _Aff:
    # one ClientIP affinity entry, linked into its key's LRU ring
    cdef object client
    cdef object endpoint
    cdef double last_used
    cdef _Aff prev
    cdef _Aff next


@cython.final
cdef class _Key:
    # one service port: endpoints in round-robin order, their active counts in a C array
    cdef list eps
    cdef dict index              # endpoint -> slot in eps
    cdef long *counts            # active connections per slot, len(eps) long
    cdef Py_ssize_t n
    cdef dict orphans            # endpoint -> active count, for endpoints no longer in eps
    cdef bint present            # False once removed while connections drain
    cdef Py_ssize_t cursor
    cdef Py_ssize_t last_slot    # slot of the last pick: open() right after pick() hits it
    cdef double timeout
    cdef dict affinity           # client ip -> _Aff
    cdef _Aff aff_head           # sentinel of the affinity LRU ring: aff_head.next is least recently used

    cdef Py_ssize_t slot_of(self, object endpoint) noexcept
    cdef void aff_link_tail(self, _Aff e) noexcept
    cdef void aff_unlink(self, _Aff e) noexcept
    cdef Py_ssize_t aff_clear(self) except -1


@cython.final
cdef class _Flow:
    # one UDP flow, linked into the table's LRU list
    cdef object key
    cdef object client
    cdef object endpoint
    cdef object value
    cdef double last_used
    cdef _Flow prev
    cdef _Flow next


@cython.final
cdef class ConnTable:
    cdef Py_ssize_t max_udp
    cdef dict keys               # key -> _Key
    cdef long total
    cdef long aff_count
    cdef _Flow head              # sentinel of the LRU ring: head.next is least recently used
    cdef dict udp_keys           # key -> {client: _Flow} in creation order
    cdef Py_ssize_t udp_n
    cdef object last_key         # key of the last pick/open/close and its _Key: skips a dict lookup
    cdef _Key last_k

    cdef _Key _key_for(self, str key)
    cdef _Key _key_or_none(self, str key)
    cdef void _forget_if_idle(self, str key, _Key k) except *
    cdef list _drop_flows(self, str key, dict flows, list dropped)
    cdef void _unlink(self, _Flow f) noexcept
    cdef void _move_to_tail(self, _Flow f) noexcept
