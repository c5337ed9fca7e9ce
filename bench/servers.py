"""The programs the benchmark runs around the proxy: nginx and iperf3 backends, HAProxy as the anchor.

Each is started through ``Topology.spawn`` (so the topology kills it on any
exit) inside its namespace and pinned with ``taskset``: backends on the load
CPU, HAProxy on the proxy CPU. Config files are generated here from the
benchmark's addresses; nothing is read from or written to /etc.

HAProxy runs the way it is tuned for raw TCP relaying: ``mode tcp``,
round robin, ``option splice-request`` and ``option splice-response``
(``splice-auto`` barely splices on this kernel, see docs/facts.md),
one thread (a second instance with two threads, unpinned, faces proxyd's
engine with two workers). ``HOLD_SERVER`` accepts and holds connections
without a thread per connection, for the idle-memory measurement.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from netnstopo.topology import Pod, Topology

LOAD_CPU = 0
PROXY_CPU = 1
HTTP_PORT = 80
IPERF_PORT = 5201
PAYLOAD = "1k"  # nginx serves /1k: 1024 bytes


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


def nginx_config(*, workdir: Path, port: int) -> str:
    """A one-worker nginx that serves ``workdir/www`` on ``port`` with long keep-alive."""
    return f"""
user root;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    default_type application/octet-stream;
    server {{
        listen {port} reuseport backlog=4096;
        listen [::]:{port} reuseport backlog=4096;
        root {workdir}/www;
    }}
}}
"""


def haproxy_config(*, listeners: Sequence[tuple[str, int, Sequence[tuple[str, int]]]], nbthread: int = 1,
                   maxconn: int = 4000) -> str:
    """HAProxy in TCP mode; ``listeners``: (bind ip, bind port, [(server ip, port), ...])."""
    out = [
        "global",
        f"    nbthread {nbthread}",
        f"    maxconn {maxconn}",
        "defaults",
        "    mode tcp",
        "    balance roundrobin",
        "    option splice-request",
        "    option splice-response",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
    ]
    for index, (ip, port, servers) in enumerate(listeners):
        out += [f"listen l{index}", f"    bind {_hostport(ip, port)}", f"    maxconn {maxconn}"]
        out += [f"    server s{n} {_hostport(sip, sport)}" for n, (sip, sport) in enumerate(servers)]
    return "\n".join(out) + "\n"


def _hostport(ip: str, port: int) -> str:
    """``ip:port``, or ``[ip]:port`` for IPv6 (HAProxy and URLs both take the brackets)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def wait_tcp(topo: Topology, ns: str, ip: str, port: int, *, timeout: float = 10.0) -> None:
    """Until something accepts on ip:port from ``ns`` (bounded)."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            topo.connect(ns, ip, port, timeout=1.0).close()
            return
        except OSError as err:
            last = err
            time.sleep(0.05)
    raise RuntimeError(f"{ip}:{port} not accepting from {ns} after {timeout}s: {last}")


def start_nginx(topo: Topology, pod: Pod, *, workdir: Path) -> subprocess.Popen[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "www").mkdir(exist_ok=True)
    (workdir / "www" / PAYLOAD).write_bytes(b"x" * 1023 + b"\n")
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(workdir=workdir, port=HTTP_PORT))
    proc = topo.spawn(pod.ns, pinned(LOAD_CPU, ["nginx", "-c", str(conf), "-g", "daemon off;"]),
                      log_name=f"nginx-{pod.name}")
    wait_tcp(topo, pod.ns, pod.ip, HTTP_PORT)
    return proc


def start_iperf3(topo: Topology, pod: Pod) -> subprocess.Popen[str]:
    proc = topo.spawn(pod.ns, pinned(LOAD_CPU, ["iperf3", "-s", "-p", str(IPERF_PORT), "--forceflush"]),
                      log_name=f"iperf3-{pod.name}")
    # A bare connect to the iperf3 control port would count as a failed test: look, do not touch.
    wait_listening(topo, pod.ns, IPERF_PORT)
    return proc


def start_haproxy(topo: Topology, *, workdir: Path,
                  listeners: Sequence[tuple[str, int, Sequence[tuple[str, int]]]], nbthread: int = 1,
                  maxconn: int = 4000, pin: bool = True, timeout: float = 10.0) -> subprocess.Popen[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "haproxy.cfg"
    conf.write_text(haproxy_config(listeners=listeners, nbthread=nbthread, maxconn=maxconn))
    check = subprocess.run(["haproxy", "-c", "-f", str(conf)], capture_output=True, text=True, timeout=10,
                           check=False)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejects its config: {check.stdout}{check.stderr}")
    argv = ["haproxy", "-db", "-f", str(conf)]
    proc = topo.spawn(topo.node, pinned(PROXY_CPU, argv) if pin else argv, log_name=f"haproxy-{workdir.name}")
    for _, port, _ in listeners:
        wait_listening(topo, topo.node, port, timeout=timeout)
    return proc


def wait_listening(topo: Topology, ns: str, port: int, *, timeout: float = 10.0) -> None:
    """Until a TCP socket listens on ``port`` in ``ns``; looks, never connects (iperf3 would count it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = topo.ns_run(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} in {ns} after {timeout}s")


# Accepts on 0.0.0.0:PORT, greets each connection with one byte and holds it, idle, until the peer goes.
HOLD_SERVER = r'''
import resource, select, socket, sys
port = int(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(4096)
srv.setblocking(False)
ep = select.epoll()
ep.register(srv.fileno(), select.EPOLLIN)
held = {}
print("ready", flush=True)
while True:
    for fd, _ in ep.poll(1.0):
        if fd == srv.fileno():
            while True:
                try:
                    conn, _ = srv.accept()
                except BlockingIOError:
                    break
                conn.setblocking(False)
                try:
                    conn.send(b"h")
                except OSError:
                    conn.close()
                    continue
                held[conn.fileno()] = conn
                ep.register(conn.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        else:
            conn = held.pop(fd, None)
            if conn is not None:
                ep.unregister(fd)
                conn.close()
'''
HOLD_PORT = 9100


def start_hold_server(topo: Topology, pod: Pod, *, timeout: float = 10.0) -> subprocess.Popen[str]:
    proc = topo.spawn(pod.ns, pinned(LOAD_CPU, [sys.executable, "-c", HOLD_SERVER, str(HOLD_PORT)]),
                      log_name=f"{pod.name}-hold")
    wait_listening(topo, pod.ns, HOLD_PORT, timeout=timeout)
    return proc
