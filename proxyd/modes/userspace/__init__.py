"""Userspace proxy mode: proxyd itself accepts every service connection and relays it to an endpoint.

``mode`` (``UserspaceMode``: the sync cycle and lifecycle), ``planner``
(pure: state → addresses, listeners, endpoint tables), ``applier`` (the
kernel side: service addresses as local routes via ``proxyd0``, listening
sockets),
``addresses``, ``listeners``, ``tcp``/``pump``/``udp`` (the data path),
``stats``, ``poller``.
"""

from proxyd.modes.userspace.mode import UserspaceMode

__all__ = ["UserspaceMode"]
