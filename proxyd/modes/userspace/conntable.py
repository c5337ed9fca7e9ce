"""Userspace mode's per-connection state: endpoint lists, round robin, ClientIP affinity, UDP flows.

``ConnTable`` is the one object the userspace data path consults on every new
connection or datagram. Two implementations share one contract:
``ConnTablePy`` (``proxyd/modes/userspace/_conntable_py.py``, the reference) and
``ConnTableNative`` (the Cython extension ``proxyd.modes.userspace._conntable`` built from
``native/conntable.pyx``). ``ConnTable`` is the extension when it imports and
the twin otherwise; ``PROXYD_NO_EXTENSIONS=1`` in the environment forces the
twin (as ``AIOHTTP_NO_EXTENSIONS`` does). ``NATIVE`` says which one is in use.
The extension is built by ``setup.py`` on ``pip install .``/``pip install -e .``;
without a compiler the pure package installs, unless
``PROXYD_REQUIRE_EXTENSIONS=1`` (set in CI) makes a failed build fatal.

Semantics (identical in both; the property tests compare them step by step):

* Keys are opaque strings naming a service port (e.g. ``"ns/svc:80/TCP"``);
  client IPs are strings; UDP clients are any hashable address (the
  ``recvfrom`` tuple). Endpoints are ``(ip: str, port: int)`` tuples; ``pick``
  returns the stored tuple, and handing that same object back to
  ``open``/``close`` is the extension's fast path. Time is whatever clock the
  caller passes as ``now`` (seconds, float); it must not go backwards, since
  expiry walks entries in least-recently-used order and stops at the first
  live one (that is what makes expiry O(expired) instead of O(table)).
* ``set_endpoints`` installs a key's list atomically (duplicates collapse, the
  first occurrence keeps its place). The round-robin cursor keeps pointing at
  the endpoint that was due next if it is still present; otherwise it keeps its
  index (modulo the new length). An unchanged list leaves the cursor alone.
  Affinity entries to removed endpoints are dropped; ``affinity_timeout`` 0
  disables affinity and drops all of the key's entries. UDP flows of the key
  whose endpoint was removed are removed and returned as
  ``(client, endpoint, value)`` in flow-creation order so the caller can close
  their sockets (the client's next datagram then opens a flow to a live
  endpoint, as conntrack cleanup gives in the kernel modes).
* ``remove_service`` forgets the key's endpoints and affinity and returns all
  its UDP flows the same way. Active-connection counts are *not* reset:
  established TCP connections survive endpoint changes and are still counted
  until the caller ``close``s them.
* ``pick``: with affinity on (timeout > 0), a live entry for the client IP
  (``now - last_used < timeout``) whose endpoint is not in ``exclude`` wins and
  is refreshed (the round-robin cursor does not move, as in kube-proxy's
  userspace load balancer). An expired entry is removed on the spot (lazy
  expiry; ``sweep`` removes the rest). Otherwise round robin from the cursor,
  skipping ``exclude`` (the endpoints a connect already failed on), and the
  cursor moves past the chosen endpoint; with affinity on the choice is
  recorded for the client. None when the key is unknown or every endpoint is
  excluded. ``exclude`` is only tested with ``in``: pass a set for long lists.
* ``open``/``close`` count active connections per key and endpoint; close
  never goes below zero and ignores unknown keys and endpoints. ``active``
  returns a copy holding only non-zero counts.
* UDP flows: one per ``(key, client)``; ``value`` is the caller's (its backend
  socket). ``udp_get`` refreshes the flow. ``udp_set`` creates or replaces a
  flow; creating one in a full table (``max_udp_flows``) evicts the least
  recently used flows first and returns them as ``(key, client, endpoint,
  value)``; replacing a flow's value with a different object returns the old
  flow the same way, so the old socket gets closed too. ``udp_expire`` removes
  and returns, least recently used first, the flows idle for at least
  ``idle_timeout``.
* ``sweep`` removes expired affinity entries (``now - last_used >= timeout``)
  and returns how many; ``affinity_count`` counts stored entries, which may
  include expired ones not yet swept or lazily removed.

Failure modes: bad endpoint lists (wrong types, port out of range) and a
negative or NaN ``affinity_timeout`` raise ``TypeError``/``ValueError`` before
anything changes, so a bad sync cannot leave a half-installed key.
"""

from __future__ import annotations

import os

from proxyd.modes.userspace._conntable_py import ConnTable as ConnTablePy

ConnTableNative: type | None
try:
    from proxyd.modes.userspace._conntable import ConnTable as _Native

    ConnTableNative = _Native
except ImportError:  # no compiler at install time: the pure twin serves
    ConnTableNative = None

NATIVE: bool = ConnTableNative is not None and not os.environ.get("PROXYD_NO_EXTENSIONS")

ConnTable: type = ConnTableNative if NATIVE else ConnTablePy  # type: ignore[assignment]

__all__ = ["NATIVE", "ConnTable", "ConnTableNative", "ConnTablePy"]
