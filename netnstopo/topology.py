"""A throw-away network of namespaces that looks like a small cluster, for tests and benchmarks.

Mode-agnostic and free of pytest and of proxyd, so that ``tests/`` and
``bench/`` both import it.
``Topology`` builds, inside uniquely named namespaces (``<prefix>-...``):

* ``node`` — the node under test (where proxyd runs): lo up, ip_forward on,
  rp_filter off, and a default route to a port-less bridge ``pxdgw0`` so that
  locally originated traffic to a ClusterIP is routed (and can be DNATed)
  without ever leaving the namespace;
* pods ``10.244.1.<n>/32``, each in its own namespace with one routed veth
  (pod side ``eth0``; node side ``vp<n>`` holding the gateway 10.244.1.1/32
  and a /32 route to the pod); the pod's default route is via the node;
* ``client`` — an outside client on 203.0.113.2/24 (node 203.0.113.1/24),
  default route via the node;
* ``node2`` — a second node on 198.51.100.2/24 (node 198.51.100.1/24) with
  its own pods ``10.244.2.<n>`` (the node routes 10.244.2.0/24 via node2 and
  node2 routes 10.244.1.0/24 and everything else via the node).

Every link is dual-stack, routed the same way for IPv6 (addresses without
duplicate address detection, so they are usable at once): the client on
2001:db8:203::2/64 (node ::1), node2 on 2001:db8:198::2/64 (node ::1), pods
``fd00:10:244:1::<10+n>/128`` behind the gateway ``fd00:10:244:1::1`` (on
node2 ``fd00:10:244:2::…``), and ``pxdgw0`` as the IPv6 default route too.
``Pod.ip6`` is a pod's IPv6 address; ``client_ip(6)`` and friends name an
address by family. Backends answer on both families.

No route leaves the machine: every address lives in a namespace made here.
Clients run inside the test process: ``socket_in(ns, ...)`` creates a socket
inside a namespace (setns on the calling thread, then back), so tests need
no helper processes on the client side. Backends are small Python servers
started in pod namespaces (``start_tcp_server``/``start_udp_server``) that
greet every connection with ``"<name> <peer-ip> <peer-port> <port>\\n"`` and then
echo; the UDP one answers each datagram with the greeting plus the payload.

Teardown (``close()``, also on ``__exit__`` and when ``__enter__`` fails
half-way) kills every process started here and deletes every namespace
made here, and keeps going when one step fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CLONE_NEWNET = 0x40000000
NODE_IP = "203.0.113.1"
CLIENT_IP = "203.0.113.2"
NODE_IP_TO_NODE2 = "198.51.100.1"
NODE2_IP = "198.51.100.2"
POD_GATEWAY = "10.244.1.1"
POD2_GATEWAY = "10.244.2.1"
NODE_IP6 = "2001:db8:203::1"
CLIENT_IP6 = "2001:db8:203::2"
NODE_IP6_TO_NODE2 = "2001:db8:198::1"
NODE2_IP6 = "2001:db8:198::2"
POD_GATEWAY6 = "fd00:10:244:1::1"
POD2_GATEWAY6 = "fd00:10:244:2::1"
CLUSTER_CIDRS = "10.244.0.0/16,fd00:10:244::/48"
HEALTHZ = ("127.0.0.1", 10256)
METRICS = ("127.0.0.1", 10249)

_libc = ctypes.CDLL(None, use_errno=True)
# setns() changes the calling thread only; the lock keeps two helpers of this
# module from interleaving their switches on one thread.
_setns_lock = threading.Lock()


class CommandFailed(RuntimeError):
    pass


def run(argv: Sequence[str], *, timeout: float = 20.0, check: bool = True,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one command (argv list, no shell) with a timeout; raise on failure when ``check``."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          input=input_text, check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def netns_available() -> str | None:
    """None when namespaces can be used here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    try:
        # A busy machine can take seconds to start `ip`: a slow answer is not a missing capability.
        run(["ip", "netns", "list"], timeout=60)
    except (OSError, CommandFailed, subprocess.TimeoutExpired) as err:
        return f"ip netns unavailable: {err}"
    return None


def netns_skip_reason() -> str | None:
    """Why the namespace tests may be skipped here: only without root.

    As root (CI, the guest) namespaces are a capability the environment is
    meant to have, so a failing ``ip netns`` fails the tests
    (``tests/capability.py``), never skips them.
    """
    return "needs root" if os.geteuid() != 0 else None


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Switch the calling thread into namespace ``name`` for the block, then back."""
    with _setns_lock:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if _libc.setns(target, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(target)
            try:
                yield
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen as root
                    raise OSError(ctypes.get_errno(), "setns back failed")
        finally:
            os.close(own)


def af(ip: str) -> socket.AddressFamily:
    """The socket family of a textual address."""
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def socket_in(ns: str, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket living in namespace ``ns`` (it stays there whatever thread uses it)."""
    with in_netns(ns):
        return socket.socket(family, type_)


# --- backends -----------------------------------------------------------------------------------

_SERVER = r'''
import os, socket, sys, threading
name, proto, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def serve_tcp(conn, peer):
    try:
        conn.sendall(f"{name} {peer[0]} {peer[1]} {port}\n".encode())
        while True:
            data = conn.recv(262144)
            if not data:
                break
            conn.sendall(data)
        conn.sendall(b"BYE\n")
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()
def tcp_loop(srv):
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=serve_tcp, args=(conn, peer), daemon=True).start()
def udp_loop(srv):
    while True:
        data, peer = srv.recvfrom(65535)
        srv.sendto(f"{name} {peer[0]} {peer[1]} {port} ".encode() + data, peer)
# One socket per family (IPv6 only on the v6 one), so IPv4 peers show as a.b.c.d, never ::ffff:a.b.c.d.
loops = []
for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    srv = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    srv.bind((host, port))
    if proto == "tcp":
        srv.listen(1024)
    loops.append(threading.Thread(target=tcp_loop if proto == "tcp" else udp_loop, args=(srv,), daemon=True))
for t in loops:
    t.start()
print("ready", flush=True)
for t in loops:
    t.join()
'''


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    ns: str
    ip: str
    node: str  # "node1" or "node2"
    ip6: str = ""

    def address(self, fam: int) -> str:
        """This pod's address of family ``fam`` (4 or 6)."""
        return self.ip6 if fam == 6 else self.ip


@dataclass(frozen=True, slots=True)
class Greeting:
    """What a backend said when a connection or datagram reached it."""

    pod: str
    peer_ip: str
    peer_port: int
    port: int  # the backend port that answered

    @classmethod
    def parse(cls, line: bytes) -> Greeting:
        name, ip, peer_port, port = line.decode().split()[:4]
        return cls(name, ip, int(peer_port), int(port))


@dataclass
class Topology:
    """Namespaces node, client, node2 and pods; see the module docstring.

    ``pods`` and ``pods2`` give how many pods to make on each node. Use as a
    context manager; everything is removed on exit.
    """

    prefix: str = field(default_factory=lambda: f"pxd-{secrets.token_hex(3)}")
    pods: int = 3
    pods2: int = 1
    node_name: str = "node1"

    def __post_init__(self) -> None:
        self.node = f"{self.prefix}-node"
        self.node2 = f"{self.prefix}-node2"
        self.client = f"{self.prefix}-client"
        self.pod_list: list[Pod] = []
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[str]] = []
        self._tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.manifests = self._tmp / "manifests"
        self.manifests.mkdir()

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Topology:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        for key in ("all", "default"):
            self.sysctl(name, f"net.ipv4.conf.{key}.rp_filter", "0")
            # Addresses usable at once (no tentative state), and no router solicitations to wait on.
            self.sysctl(name, f"net.ipv6.conf.{key}.accept_dad", "0")
            self.sysctl(name, f"net.ipv6.conf.{key}.disable_ipv6", "0")
        self.ns_run(name, ["ip", "link", "set", "lo", "up"])

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.ns_run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])

    def build(self) -> None:
        for name in (self.node, self.node2, self.client):
            self._add_ns(name)
        for ns in (self.node, self.node2):
            self.sysctl(ns, "net.ipv4.ip_forward", "1")
            self.sysctl(ns, "net.ipv6.conf.all.forwarding", "1")
        # Locally originated traffic to a ClusterIP needs some route before
        # nat OUTPUT can DNAT it; a bridge without ports keeps it in here.
        self.ns_run(self.node, ["ip", "link", "add", "pxdgw0", "type", "bridge"])
        self.ns_run(self.node, ["ip", "link", "set", "pxdgw0", "up"])
        self.ns_run(self.node, ["ip", "route", "add", "default", "dev", "pxdgw0"])
        self.ns_run(self.node, ["ip", "-6", "route", "add", "default", "dev", "pxdgw0"])

        self._veth(self.node, "vc", (f"{NODE_IP}/24", f"{NODE_IP6}/64"),
                   self.client, (f"{CLIENT_IP}/24", f"{CLIENT_IP6}/64"))
        self.ns_run(self.client, ["ip", "route", "add", "default", "via", NODE_IP])
        self.ns_run(self.client, ["ip", "-6", "route", "add", "default", "via", NODE_IP6])
        self._veth(self.node, "vn2", (f"{NODE_IP_TO_NODE2}/24", f"{NODE_IP6_TO_NODE2}/64"),
                   self.node2, (f"{NODE2_IP}/24", f"{NODE2_IP6}/64"))
        self.ns_run(self.node, ["ip", "route", "add", "10.244.2.0/24", "via", NODE2_IP])
        self.ns_run(self.node, ["ip", "-6", "route", "add", "fd00:10:244:2::/64", "via", NODE2_IP6])
        self.ns_run(self.node2, ["ip", "route", "add", "default", "via", NODE_IP_TO_NODE2])
        self.ns_run(self.node2, ["ip", "-6", "route", "add", "default", "via", NODE_IP6_TO_NODE2])

        for i in range(1, self.pods + 1):
            self._pod(self.node, f"pod{i}", (f"10.244.1.{10 + i}", f"fd00:10:244:1::{10 + i}"),
                      (POD_GATEWAY, POD_GATEWAY6), "node1")
        for i in range(1, self.pods2 + 1):
            self._pod(self.node2, f"pod2-{i}", (f"10.244.2.{10 + i}", f"fd00:10:244:2::{10 + i}"),
                      (POD2_GATEWAY, POD2_GATEWAY6), "node2")

    def _veth(self, left_ns: str, left: str, left_cidrs: Sequence[str], right_ns: str,
              right_cidrs: Sequence[str], right: str = "eth0") -> None:
        # Create inside the left namespace so host-wide names never collide.
        self.ns_run(left_ns, ["ip", "link", "add", left, "type", "veth", "peer", "name", right,
                              "netns", right_ns])
        for ns, dev, cidrs in ((left_ns, left, left_cidrs), (right_ns, right, right_cidrs)):
            for cidr in cidrs:
                self.ns_run(ns, ["ip", "addr", "add", cidr, "dev", dev, *(["nodad"] if ":" in cidr else [])])
            self.sysctl(ns, f"net.ipv4.conf.{dev}.rp_filter", "0")
            self.ns_run(ns, ["ip", "link", "set", dev, "up"])

    def _pod(self, host_ns: str, name: str, ips: tuple[str, str], gateways: tuple[str, str],
             node: str) -> None:
        ns = f"{self.prefix}-{name}"
        self._add_ns(ns)
        dev = f"v{name.replace('-', '')}"[:15]
        self._veth(host_ns, dev, [f"{gateways[0]}/32", f"{gateways[1]}/128"], ns,
                   [f"{ips[0]}/32", f"{ips[1]}/128"])
        for ip, gateway, bits, flag in ((ips[0], gateways[0], 32, "-4"), (ips[1], gateways[1], 128, "-6")):
            self.ns_run(host_ns, ["ip", flag, "route", "add", f"{ip}/{bits}", "dev", dev, "src", gateway])
            self.ns_run(ns, ["ip", flag, "route", "add", gateway, "dev", "eth0", "scope", "link"])
            self.ns_run(ns, ["ip", flag, "route", "add", "default", "via", gateway])
        self.pod_list.append(Pod(name, ns, ips[0], node, ips[1]))

    def close(self) -> None:
        """Kill every process and delete every namespace made here; never raises.

        Every process gets SIGKILL (its whole session) first and is reaped
        afterwards, with a wait far beyond the product's own grace periods
        (the userspace drain is 5 s); a process that will not die does not
        stop the namespaces from being deleted.
        """
        procs = list(reversed(self._procs))
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60.0
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        self._procs.clear()
        for ns in reversed(self._namespaces):
            with contextlib.suppress(Exception):
                run(["ip", "netns", "del", ns], timeout=60, check=False)
        self._namespaces.clear()
        with contextlib.suppress(Exception):
            for path in sorted(self._tmp.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            self._tmp.rmdir()

    # -- commands and processes --------------------------------------------------------------------

    def pod(self, name: str) -> Pod:
        for pod in self.pod_list:
            if pod.name == name:
                return pod
        raise KeyError(name)

    def ns_run(self, ns: str, argv: Sequence[str], *, timeout: float = 20.0,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check)

    def spawn(self, ns: str, argv: Sequence[str], *, log_name: str | None = None,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        """Start a long-running process in ``ns``; its output goes to a log file (``log_path``)."""
        log_path = self._tmp / f"{log_name or Path(argv[0]).name}-{len(self._procs)}.log"
        out = open(log_path, "w")
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True,
                                    env={**os.environ, **(env or {})})
        finally:
            out.close()
        proc.log_path = log_path  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[str], *, sig: int = signal.SIGKILL,
             wait: float = 10.0) -> int | None:
        """Signal a process started by ``spawn`` (its whole session) and reap it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            # SIGKILL cannot be ignored, but a busy machine may take a while to reap.
            return proc.wait(timeout=30)
        finally:
            if sig == signal.SIGKILL and proc in self._procs:
                self._procs.remove(proc)

    def log_of(self, proc: subprocess.Popen[str]) -> str:
        try:
            return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
        except (OSError, AttributeError):
            return ""

    def _wait_ready(self, proc: subprocess.Popen[str], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready" in self.log_of(proc):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"{what} did not start: {self.log_of(proc)[-2000:]}")

    def start_tcp_server(self, pod: Pod | str, port: int) -> subprocess.Popen[str]:
        """Greeting + echo TCP server on 0.0.0.0:port in the pod; waits until it listens."""
        return self.start_servers(tcp=(pod,), tcp_port=port)[0]

    def start_udp_server(self, pod: Pod | str, port: int) -> subprocess.Popen[str]:
        return self.start_servers(udp=(pod,), udp_port=port)[0]

    def start_servers(self, *, tcp: Iterable[Pod | str] = (), udp: Iterable[Pod | str] = (),
                      tcp_port: int = 8080, udp_port: int = 5353) -> list[subprocess.Popen[str]]:
        """TCP servers (as ``start_tcp_server``) then UDP servers, started together; waits until all listen.

        Their interpreters start side by side: under software emulation (the IPVS guest) a Python start
        takes seconds, and a test of three pods used to pay it three times in a row. ``-S``: the server
        needs only the standard library, and skipping ``site`` (the venv's ``.pth`` hooks) makes the
        interpreter start about four times faster.
        """
        started = []
        for kind, pods, port in (("tcp", tcp, tcp_port), ("udp", udp, udp_port)):
            for pod in pods:
                pod = self.pod(pod) if isinstance(pod, str) else pod
                proc = self.spawn(pod.ns, [sys.executable, "-S", "-c", _SERVER, pod.name, kind, str(port)],
                                  log_name=f"{pod.name}-{kind}{port}")
                started.append((proc, f"{kind} server {pod.name}:{port}"))
        for proc, what in started:
            self._wait_ready(proc, what)
        return [proc for proc, _ in started]

    # -- clients -----------------------------------------------------------------------------------

    def tcp_socket(self, ns: str, fam: int = 4) -> socket.socket:
        return socket_in(ns, socket.AF_INET6 if fam == 6 else socket.AF_INET, socket.SOCK_STREAM)

    def udp_socket(self, ns: str, fam: int = 4) -> socket.socket:
        return socket_in(ns, socket.AF_INET6 if fam == 6 else socket.AF_INET, socket.SOCK_DGRAM)

    def connect(self, ns: str, ip: str, port: int, *, timeout: float = 5.0) -> socket.socket:
        sock = socket_in(ns, af(ip))
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def hello(self, ns: str, ip: str, port: int, *, timeout: float = 5.0) -> Greeting:
        """Connect, read the backend's greeting, close."""
        with self.connect(ns, ip, port, timeout=timeout) as sock:
            return Greeting.parse(read_line(sock))

    def udp_hello(self, ns: str, ip: str, port: int, *, payload: bytes = b"ping", timeout: float = 3.0,
                  sock: socket.socket | None = None) -> tuple[Greeting, bytes, tuple[str, int]]:
        """Send one datagram; (greeting, echoed payload, reply source). Reuse ``sock`` to stay one flow."""
        own = sock is None
        sock = sock or socket_in(ns, af(ip), socket.SOCK_DGRAM)
        try:
            sock.settimeout(timeout)
            sock.sendto(payload, (ip, port))
            data, source = sock.recvfrom(65535)
        finally:
            if own:
                sock.close()
        name, peer_ip, peer_port, port, rest = data.split(b" ", 4)
        return Greeting(name.decode(), peer_ip.decode(), int(peer_port), int(port)), rest, source[:2]

    # -- the daemon --------------------------------------------------------------------------------

    def start_proxyd(self, mode: str, manifests_dir: Path | str | None = None,
                     extra_args: Iterable[str] = (), *, timeout: float = 20.0,
                     env: Mapping[str, str] | None = None,
                     wrapper: Sequence[str] = ()) -> subprocess.Popen[str]:
        """Start the real daemon in the node namespace and wait for /healthz 200.

        ``env`` adds environment variables; ``wrapper`` is a command prefix
        (e.g. ``["prlimit", "--nofile=64:64"]``).
        """
        exe = Path(sys.executable).parent / "proxyd"
        argv = [str(exe), "--proxy-mode", mode, "--manifests", str(manifests_dir or self.manifests),
                "--hostname-override", self.node_name,
                "--healthz-bind-address", f"{HEALTHZ[0]}:{HEALTHZ[1]}",
                "--metrics-bind-address", f"{METRICS[0]}:{METRICS[1]}",
                "--cluster-cidr", CLUSTER_CIDRS,
                # Each daemon's status socket lives with the topology, never in the host's /run.
                "--status-socket", str(self._tmp / f"status-{len(self._procs)}.sock"), *extra_args]
        proc = self.spawn(self.node, [*wrapper, *argv], log_name=f"proxyd-{mode}", env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"proxyd exited {proc.returncode}: {self.log_of(proc)[-3000:]}")
            if self.http_get(self.node, *HEALTHZ, "/healthz")[0] == 200:
                return proc
            time.sleep(0.05)
        raise RuntimeError(f"proxyd not healthy after {timeout}s: {self.log_of(proc)[-3000:]}")

    def stop_proxyd(self, proc: subprocess.Popen[str], *, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait: the daemon's clean shutdown path; returns its exit code."""
        code = self.kill(proc, sig=signal.SIGTERM, wait=timeout)
        if proc in self._procs:
            self._procs.remove(proc)
        return code

    def run_proxyd(self, args: Sequence[str], *, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run proxyd to completion in the node namespace (e.g. ``--cleanup``)."""
        exe = Path(sys.executable).parent / "proxyd"
        return self.ns_run(self.node, [str(exe), *args], timeout=timeout, check=False)

    def http_get(self, ns: str, host: str, port: int, path: str, *, timeout: float = 2.0) -> tuple[int, str]:
        """A minimal HTTP/1.0 GET from inside ``ns``; (0, error) when it cannot connect."""
        try:
            with self.connect(ns, host, port, timeout=timeout) as sock:
                sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                chunks = []
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
        except OSError as err:
            return 0, str(err)
        raw = b"".join(chunks).decode(errors="replace")
        head, _, body = raw.partition("\r\n\r\n")
        try:
            return int(head.split()[1]), body
        except (IndexError, ValueError):
            return 0, raw

    def healthz_json(self) -> tuple[int, dict[str, Any]]:
        """proxyd's /healthz: (status, decoded body; {} when the body is not JSON)."""
        status, body = self.http_get(self.node, *HEALTHZ, "/healthz")
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {}

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """One sample from proxyd's /metrics (None when absent)."""
        status, body = self.http_get(self.node, *METRICS, "/metrics")
        if status != 200:
            return None
        want = labels or {}
        for line in body.splitlines():
            if not line.startswith(name):
                continue
            metric, _, value = line.rpartition(" ")
            base, _, rest = metric.partition("{")
            if base != name:
                continue
            found = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part)
            if all(found.get(k) == json.dumps(v) for k, v in want.items()):
                return float(value)
        return None

    def metric_sum(self, name: str) -> float | None:
        """The sum of every sample of ``name`` (all label sets) in /metrics; None when absent."""
        status, body = self.http_get(self.node, *METRICS, "/metrics")
        if status != 200:
            return None
        values = [float(line.rpartition(" ")[2]) for line in body.splitlines()
                  if line.split("{", 1)[0].split(" ", 1)[0] == name]
        return sum(values) if values else None

    # -- manifests ---------------------------------------------------------------------------------

    def write_manifest(self, filename: str, docs: Iterable[Mapping[str, Any]] | str,
                       directory: Path | None = None) -> Path:
        return write_manifest(directory or self.manifests, filename, docs)

    def remove_manifest(self, filename: str, directory: Path | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            ((directory or self.manifests) / filename).unlink()


def read_line(sock: socket.socket, limit: int = 4096) -> bytes:
    """Read up to and including the first newline (bytes after it are lost; greetings come alone)."""
    buf = b""
    while b"\n" not in buf:
        data = sock.recv(limit - len(buf))
        if not data:
            raise ConnectionError(f"EOF before a full line (got {buf!r})")
        buf += data
        if len(buf) >= limit:
            raise ConnectionError("line too long")
    return buf


# --- manifest builders ----------------------------------------------------------------------------

def write_manifest(directory: Path | str, filename: str, docs: Iterable[Mapping[str, Any]] | str) -> Path:
    """Write YAML documents (or raw text) atomically: temp file in the same dir, then rename."""
    directory = Path(directory)
    text = docs if isinstance(docs, str) else yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False)
    tmp = directory / f".{filename}.{secrets.token_hex(4)}.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / filename)
    return directory / filename


def port(port: int, *, name: str | None = None, protocol: str = "TCP", target_port: int | str | None = None,
         node_port: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"port": port, "protocol": protocol}
    if name is not None:
        out["name"] = name
    if target_port is not None:
        out["targetPort"] = target_port
    if node_port is not None:
        out["nodePort"] = node_port
    return out


def service(name: str, *, cluster_ip: str, ports: Sequence[Mapping[str, Any]], namespace: str = "default",
            type_: str = "ClusterIP", external_ips: Sequence[str] = (), lb_ips: Sequence[str] = (),
            affinity_timeout: int | None = None, external_local: bool = False, internal_local: bool = False,
            health_check_node_port: int | None = None, source_ranges: Sequence[str] = (),
            labels: Mapping[str, str] | None = None, external_name: str | None = None,
            cluster_ips: Sequence[str] = (), family_policy: str | None = None) -> dict[str, Any]:
    """A v1 Service as a dict; ``cluster_ip="None"`` makes it headless.

    ``cluster_ips`` (primary first, one per family) makes it dual-stack: ``clusterIPs`` and
    ``ipFamilies`` follow them, ``ipFamilyPolicy`` is ``family_policy`` (RequireDualStack for two).
    """
    spec: dict[str, Any] = {"type": type_, "clusterIP": cluster_ip, "ports": [dict(p) for p in ports]}
    if cluster_ips:
        spec["clusterIPs"] = list(cluster_ips)
        spec["ipFamilies"] = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips]
        dual = len(cluster_ips) > 1
        spec["ipFamilyPolicy"] = family_policy or ("RequireDualStack" if dual else "SingleStack")
    if external_name is not None:
        spec = {"type": "ExternalName", "externalName": external_name, "ports": spec["ports"]}
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    if external_local:
        spec["externalTrafficPolicy"] = "Local"
    if internal_local:
        spec["internalTrafficPolicy"] = "Local"
    if health_check_node_port is not None:
        spec["healthCheckNodePort"] = health_check_node_port
    if source_ranges:
        spec["loadBalancerSourceRanges"] = list(source_ranges)
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    if labels:
        obj["metadata"]["labels"] = dict(labels)
    if lb_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return obj


def endpoint(ip: str, *, node: str | None = "node1", ready: bool = True, serving: bool | None = None,
             terminating: bool = False) -> dict[str, Any]:
    conditions: dict[str, Any] = {"ready": ready, "serving": ready if serving is None else serving,
                                  "terminating": terminating}
    out: dict[str, Any] = {"addresses": [ip], "conditions": conditions}
    if node is not None:
        out["nodeName"] = node
    return out


def endpoint_slice(service_name: str, *, ports: Sequence[Mapping[str, Any]],
                   endpoints: Sequence[Mapping[str, Any]], namespace: str = "default",
                   name: str | None = None, address_type: str = "IPv4") -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice; ``ports`` items: {"name"?, "port", "protocol"?}."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service_name}-slice", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": address_type,
        "ports": [{"protocol": "TCP", **dict(p)} for p in ports],
        "endpoints": [dict(e) for e in endpoints],
    }


def wait_until(predicate: Any, *, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as err:  # the predicate may fail while things settle
            last_error = err
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s (last error: {last_error!r})")
        time.sleep(interval)


class ConnectProber(threading.Thread):
    """New TCP connections to ``ip:port`` from ``ns`` every ``interval`` s, each connect bounded below
    the kernel's first SYN retransmission (1 s).

    A SYN sent while a rule is missing is dropped; the client would only
    retry it after 1 s, so a connect timeout of 0.9 s turns any gap in the
    rules, however short, into a failed probe, at ``interval`` resolution
    (a 2 s timeout would hide gaps under 1 s behind the retransmission).
    Completing the handshake is kernel work only, so a busy machine does
    not make it slow; the greeting that follows gets a generous timeout.
    """

    CONNECT_TIMEOUT = 0.9

    def __init__(self, topo: Topology, ns: str, ip: str, port: int, *, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.topo, self.ns, self.ip, self.port, self.interval = topo, ns, ip, port, interval
        self.ok = 0
        self.failed: list[str] = []
        self.longest_gap = 0.0  # seconds between two successful connects
        self._halt = threading.Event()

    def run(self) -> None:
        last_ok = None
        # Ends by itself once the topology is gone, should the test fail before stop().
        while not self._halt.is_set() and os.path.exists(f"/run/netns/{self.ns}"):
            sock = socket_in(self.ns)
            try:
                sock.settimeout(self.CONNECT_TIMEOUT)
                sock.connect((self.ip, self.port))
                sock.settimeout(30)
                Greeting.parse(read_line(sock))
                now = time.monotonic()
                if last_ok is not None:
                    self.longest_gap = max(self.longest_gap, now - last_ok)
                last_ok = now
                self.ok += 1
            except (OSError, ValueError) as err:
                self.failed.append(f"{time.strftime('%X')} {err!r}")
            finally:
                sock.close()
            self._halt.wait(self.interval)

    def stop(self) -> tuple[int, list[str]]:
        self._halt.set()
        self.join(timeout=60)
        return self.ok, self.failed


FAKE_API_PORT = 16443  # where tests and bench run ``tests.api.fake_apiserver`` in the node namespace


def fake_api(topo: Topology, action: str, payload: Mapping[str, Any] | None = None, *,
             timeout: float = 5.0) -> Any:
    """POST /fake/<action> to the fake API server in the node namespace; its JSON answer.

    RuntimeError unless the fake answers 200.
    """
    body = json.dumps(payload or {}).encode()
    with topo.connect(topo.node, "127.0.0.1", FAKE_API_PORT, timeout=timeout) as sock:
        sock.sendall(b"POST /fake/%s HTTP/1.0\r\nHost: fake\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (action.encode(), len(body), body))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"fake API server: {data[:300]!r}")
    return json.loads(rest)
