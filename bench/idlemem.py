"""Memory per idle established connection: N connections held through a proxy, its RSS before and during.

The client (this process, in the client namespace) opens ``HELD``
connections one after another to the proxy, which relays each to the hold
server on pod1 (``servers.HOLD_SERVER``: one byte of greeting, then
silence); a connection counts once its greeting byte came back through the
proxy, so it is established end to end. The proxy's VmRSS is read before
and while all are held; the difference divided by the number held is the
user-space memory one idle connection costs that proxy. Kernel socket
buffers are the same for every proxy and are not in RSS.
"""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from netnstopo.topology import Topology, in_netns

HELD = 10_000
CONNECT_TIMEOUT = 5.0
GREETING_TIMEOUT = 60.0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(f"no VmRSS for pid {pid}")


def possible(held: int) -> int:
    """How many of ``held`` connections both proxies can hold here, within the descriptor hard limit every
    process of the run inherits (raising it needs CAP_SYS_RESOURCE, which containers often lack).

    Two descriptors per connection, but HAProxy sizes its limit from ``maxconn`` up front as 2.5 per
    connection (sockets, plus pipes for a quarter of them) and refuses to start above the hard limit;
    both proxies hold the same number, so that bound applies to both."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return held
    return max(0, min(held, (hard - 1024) * 2 // 5))


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _greeted(socks: list[socket.socket], *, timeout: float) -> int:
    """Wait for the one-byte greeting on every socket; how many got it."""
    ep = select.epoll()
    waiting = {s.fileno(): s for s in socks}
    for fd in waiting:
        ep.register(fd, select.EPOLLIN)
    got = 0
    deadline = time.monotonic() + timeout
    try:
        while waiting and time.monotonic() < deadline:
            for fd, _ in ep.poll(0.5):
                sock = waiting.pop(fd, None)
                if sock is None:
                    continue
                ep.unregister(fd)
                with contextlib.suppress(OSError):
                    if sock.recv(1) == b"h":
                        got += 1
    finally:
        ep.close()
    return got


def measure(topo: Topology, *, pid: int, target: tuple[str, int], held: int = HELD,
            log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Hold ``held`` idle connections (fewer when descriptors are capped: ``possible``) through the proxy
    ``pid`` to ``target``; its RSS per connection."""
    _raise_nofile()
    held = possible(held)
    before = rss_kib(pid)
    socks: list[socket.socket] = []
    try:
        with in_netns(topo.client):
            for _ in range(held):
                sock = socket.socket()
                socks.append(sock)
                sock.settimeout(CONNECT_TIMEOUT)
                sock.connect(target)
        for sock in socks:
            sock.setblocking(False)
        greeted = _greeted(socks, timeout=GREETING_TIMEOUT)
        time.sleep(1.0)  # let the proxy settle (pools, lazily freed buffers)
        holding = rss_kib(pid)
        log(f"  {greeted} of {held} connections established end to end; RSS {before} -> {holding} KiB")
        if greeted < held:
            return {"error": f"only {greeted} of {held} connections were established end to end"}
        return {"held": held, "rss_before_kib": before, "rss_holding_kib": holding,
                "kib_per_connection": round((holding - before) / held, 3)}
    finally:
        for sock in socks:
            sock.close()
