"""UDP through userspace mode's data path: the engine's UDP thread against its pure-Python twin.

``python -m bench.udp_path`` starts each path in a process of its own
(``--serve native`` / ``--serve twin``: one listener on loopback in front of
one echo endpoint), sends request/response datagrams through it from
``--clients`` client sockets with ``--window`` datagrams in flight each, and
prints per path: requests per second, the proxy process's CPU per request
(one datagram each way: two relays), and the engine/twin ratio. Loopback
only, no namespaces, no root. Rates depend on the Python client and echo
server, which share the machine; the CPU per request is the proxy's own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from proxyd.model import Protocol, ServicePortName

NAME = ServicePortName("bench", "udp", "", Protocol.UDP)


def serve(kind: str, endpoint: tuple[str, int]) -> None:
    """Run one path until stdin closes; print the listener's port first."""
    from proxyd.modes.userspace.listeners import ListenerKey, open_socket
    from proxyd.modes.userspace.planner import TableEntry, TableKey
    from proxyd.modes.userspace.stats import StatsCache

    stats = StatsCache()
    key = TableKey(NAME)
    sock = open_socket(ListenerKey("127.0.0.1", 0, Protocol.UDP))
    entry = TableEntry((endpoint,), 0)
    print(sock.getsockname()[1], flush=True)
    if kind == "native":
        from proxyd.modes.userspace.engine import NativeTcpPath
        from proxyd.modes.userspace.udp_engine import NativeUdpPath

        def stats_of(k: TableKey) -> Any:
            return stats.get(k.name)

        tcp = NativeTcpPath(workers=1, stats_of=stats_of, fd_limit=4096, other_fds=lambda: 0)
        udp = NativeUdpPath(tcp=tcp, stats_of=stats_of, max_flows=65536, idle_timeout=300)
        udp.set_endpoints(key, entry, time.monotonic())
        udp.listen(sock, key)
        sys.stdin.read()
        udp.close()
        return

    async def twin() -> None:
        from proxyd.modes.userspace.conntable import ConnTable
        from proxyd.modes.userspace.udp import UdpProxy

        loop = asyncio.get_running_loop()
        proxy = UdpProxy(loop=loop, table=ConnTable(), stats_of=lambda k: stats.get(k.name), idle_timeout=300)
        proxy.set_endpoints(key, entry, time.monotonic())
        proxy.listen(sock, key)
        await loop.run_in_executor(None, sys.stdin.read)
        proxy.close()

    asyncio.run(twin())


def _echo(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(65535)
            sock.sendto(data, peer)
        except (TimeoutError, BlockingIOError):
            continue
        except OSError:
            return


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, *, seconds: float, clients: int, window: int, size: int) -> dict[str, float]:
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(target=_echo, args=(echo, stop), daemon=True)
    thread.start()
    host, port = echo.getsockname()
    command = [sys.executable, "-m", "bench.udp_path", "--serve", kind, "--endpoint", f"{host}:{port}"]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        service = ("127.0.0.1", int(proc.stdout.readline()))
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(clients)]
        sel = selectors.DefaultSelector()
        payload = b"x" * size
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            s.sendto(payload, service)  # open the flow before measuring
        done = 0
        deadline = time.monotonic() + 10
        while done < clients and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                key.fileobj.recv(65535)  # type: ignore[union-attr]
                done += 1
        for s in socks:
            for _ in range(window):
                s.sendto(payload, service)
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        replies = 0
        end = t0 + seconds
        while time.monotonic() < end:
            events = sel.select(0.2)
            if not events:  # datagrams lost under load: refill every window
                for s in socks:
                    for _ in range(window):
                        s.sendto(payload, service)
            for key, _ in events:
                s = key.fileobj
                try:
                    while True:
                        s.recv(65535)  # type: ignore[union-attr]
                        replies += 1
                        s.sendto(payload, service)  # type: ignore[union-attr]
                except BlockingIOError:
                    pass
        elapsed, cpu = time.monotonic() - t0, _cpu_seconds(proc.pid) - cpu0
        for s in socks:
            s.close()
        return {"requests_per_s": replies / elapsed, "proxy_cpu_us_per_request": cpu / max(replies, 1) * 1e6}
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)
        stop.set()
        echo.close()
        thread.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=("native", "twin"), help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--clients", type=int, default=8, help="client sockets (one flow each)")
    parser.add_argument("--window", type=int, default=16, help="datagrams in flight per client")
    parser.add_argument("--size", type=int, default=64, help="payload bytes per datagram")
    args = parser.parse_args(argv)
    if args.serve:
        host, port = args.endpoint.rsplit(":", 1)
        serve(args.serve, (host, int(port)))
        return 0
    from proxyd.modes.userspace.udp_engine import UdpEngineNative

    kinds = ["twin"] + (["native"] if UdpEngineNative is not None else [])
    results = {k: measure(k, seconds=args.seconds, clients=args.clients, window=args.window, size=args.size)
               for k in kinds}
    print(f"{'udp request/response':<28}{'twin':>12}{'engine':>12}{'ratio':>8}")
    for metric in ("requests_per_s", "proxy_cpu_us_per_request"):
        twin = results["twin"][metric]
        if "native" in results:
            native = results["native"][metric]
            print(f"{metric:<28}{twin:>12,.1f}{native:>12,.1f}{native / twin:>7.2f}x")
        else:
            print(f"{metric:<28}{twin:>12,.1f}{'(not built)':>12}{'-':>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
