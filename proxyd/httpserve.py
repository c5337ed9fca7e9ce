"""A small, hardened HTTP/1.x responder for health, metrics and healthCheckNodePorts.

These endpoints are probed by kubelets, load balancers and Prometheus, and
some listen on every node address, so the server is deliberately tiny:
GET/HEAD only, fixed routes, one request per connection, the request head
capped at ``MAX_HEAD`` bytes and ``HEAD_TIMEOUT`` seconds.

One peer cannot starve the others (the kubelet's probe and a load
balancer's check decide whether the node is restarted or gets traffic):
each peer address may hold at most ``MAX_PER_PEER`` connections (a further
one from it is closed at once), and when ``MAX_CLIENTS`` connections are
open, the oldest one still sending its request head is dropped to make
room, so idle sockets cannot hold every slot. Handlers are synchronous
functions that must not block: they read state the daemon already holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

MAX_HEAD = 8192
HEAD_TIMEOUT = 5.0
MAX_CLIENTS = 1024
MAX_PER_PEER = 8

Response = tuple[int, str, bytes]  # status, content type, body
Handler = Callable[[], Response]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class HttpServer:
    """Serves fixed ``routes`` (path → handler) on one address."""

    def __init__(self, routes: Mapping[str, Handler], *, name: str) -> None:
        self.routes = dict(routes)
        self.name = name
        self._server: asyncio.Server | None = None
        self._clients = 0
        self._per_peer: Counter[str] = Counter()
        # Connections still reading their request head, oldest first: the ones to drop when full.
        self._reading: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()

    async def start(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = await asyncio.start_server(
            self._serve, host=host, port=port, family=family, reuse_address=True,
            limit=MAX_HEAD + 1, backlog=128)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else ""
        if self._per_peer[peer] >= MAX_PER_PEER:
            writer.transport.abort()
            return
        if self._clients >= MAX_CLIENTS:
            if not self._reading:
                writer.transport.abort()
                return
            oldest, _ = self._reading.popitem(last=False)
            oldest.transport.abort()
        self._clients += 1
        self._per_peer[peer] += 1
        self._reading[writer] = None
        try:
            status, ctype, body, head_only = await self._respond(reader)
            self._reading.pop(writer, None)
            reason = _REASONS.get(status, "")
            head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                    "X-Content-Type-Options: nosniff\r\n\r\n").encode()
            writer.write(head if head_only else head + body)
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        except (TimeoutError, OSError, ConnectionError):
            pass
        finally:
            self._clients -= 1
            self._per_peer[peer] -= 1
            if self._per_peer[peer] <= 0:
                del self._per_peer[peer]
            self._reading.pop(writer, None)
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except TimeoutError:
            return 408, "text/plain", b"request timeout\n", False
        except asyncio.LimitOverrunError:
            return 431, "text/plain", b"request head too large\n", False
        except asyncio.IncompleteReadError:
            return 400, "text/plain", b"bad request\n", False
        request_line = head.split(b"\r\n", 1)[0]
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, "text/plain", b"bad request\n", False
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"method not allowed\n", False
        path = target.split(b"?", 1)[0].decode("ascii", "replace")
        handler = self.routes.get(path)
        if handler is None:
            return 404, "text/plain", b"404 page not found\n", method == b"HEAD"
        status, ctype, body = handler()
        return status, ctype, body, method == b"HEAD"
