"""The health/metrics HTTP responder: its routes, and hostile clients on loopback."""

from __future__ import annotations

import asyncio

import pytest

from proxyd import httpserve
from proxyd.httpserve import HttpServer


@pytest.fixture
async def server():
    srv = HttpServer({"/ok": lambda: (200, "text/plain", b"fine"),
                      "/down": lambda: (503, "application/json", b"{}")}, name="test")
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.close()


async def exchange(port: int, request: bytes, *, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def test_routes(server):
    answer = await exchange(server.port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nfine")
    answer = await exchange(server.port, b"GET /down?verbose=1 HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 ")
    answer = await exchange(server.port, b"HEAD /ok HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /elsewhere HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /ok/../ok HTTP/1.1\r\n\r\n", b"404"),
    (b"POST /ok HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"405"),
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET /ok SPDY/9\r\n\r\n", b"400"),
    (b"\x00\xff\x10 \r\n\r\n", b"400"),
])
async def test_rejections(server, request_bytes, status):
    answer = await exchange(server.port, request_bytes)
    assert answer.split(b" ")[1] == status


async def test_oversized_head(server):
    huge_header = b"X: " + b"a" * (httpserve.MAX_HEAD * 4) + b"\r\n"
    answer = await exchange(server.port, b"GET /ok HTTP/1.1\r\n" + huge_header + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431")


async def test_truncated_request(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /ok HT")
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400")


async def test_slow_client_times_out(server, monkeypatch):
    monkeypatch.setattr(httpserve, "HEAD_TIMEOUT", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /ok HTTP/1.1\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408")


async def test_per_peer_cap(server, monkeypatch):
    monkeypatch.setattr(httpserve, "MAX_PER_PEER", 2)
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /ok HTTP/1.1\r\n\r\n")
    try:
        answer = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        answer = b""
    assert answer == b""
    for _, w in idle:
        w.close()
    await asyncio.sleep(0.05)
    # Its slots come back once the idle ones are gone.
    assert (await exchange(server.port, b"GET /ok HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")


async def test_full_server_drops_the_oldest_idle_connection(server, monkeypatch):
    monkeypatch.setattr(httpserve, "MAX_CLIENTS", 2)
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert (await exchange(server.port, b"GET /ok HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
    oldest_reader = idle[0][0]
    try:
        dropped = await asyncio.wait_for(oldest_reader.read(), 5)
    except ConnectionResetError:
        dropped = b""
    assert dropped == b""  # evicted without an answer
    for _, w in idle:
        w.close()
