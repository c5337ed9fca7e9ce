"""Memory per idle established connection: N connections held through a proxy, its RSS before and during.

The client (this process, in the client namespace) opens ``HELD``
connections one after another to the proxy, which relays each to the hold
server on pod1 (``servers.HOLD_SERVER``: one byte of greeting, then
silence); a connection counts once its greeting byte came back through the
proxy, so it is established end to end. The proxy's VmRSS is read before
and while all are held; the difference divided by the number held is the
user-space memory one idle connection costs that proxy. Kernel socket
buffers are the same for every proxy and are not in RSS.

``python -m bench`` runs this case after the data path (``harness.idle_memory``).
It also runs on its own, in a topology of one pod:

    python -m bench.idlemem --held 10000 [--proxies proxyd-userspace,haproxy] [--save]

``--save`` writes ``bench/results/idlemem[-guest].json`` (``-guest`` when it
ran inside the QEMU guest, ``PROXYD_IN_VM=1``) with the run's metadata
(``bench/runmeta.py``). Holding N connections takes about 2.5 N descriptors
in the proxy (HAProxy sizes its limit that way up front), so the process
raises its descriptor hard limit to that where it may (root with
CAP_SYS_RESOURCE, as in the guest: ``tests/vm/run-in-vm.sh --cmd 'python -m
bench.idlemem --held 10000 --save'``); where it may not (this host: hard
limit 20,000), fewer are held and the file says how many.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import paths, report, runmeta
from bench.servers import HOLD_PORT, start_haproxy, start_hold_server
from netnstopo.topology import METRICS, NODE_IP, Topology, endpoint, endpoint_slice, in_netns, port, service

HELD = 10_000
CONNECT_TIMEOUT = 5.0
GREETING_TIMEOUT = 60.0
NOFILE_SPARE = 1024  # descriptors beyond the connections: listeners, logs, the runtime's own
PROXIES = (report.USERSPACE, report.HAPROXY)
MAX_HELD = 200_000
WINDOW = 256  # connections awaiting their greeting at once (below every accept queue of the path)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(f"no VmRSS for pid {pid}")


def nofile_needed(held: int) -> int:
    """The descriptor limit under which both proxies hold ``held`` connections (``possible`` inverted)."""
    return NOFILE_SPARE + -(-held * 5 // 2)


def possible(held: int) -> int:
    """How many of ``held`` connections both proxies can hold here, within the descriptor hard limit every
    process of the run inherits (raising it needs CAP_SYS_RESOURCE, which containers often lack).

    Two descriptors per connection, but HAProxy sizes its limit from ``maxconn`` up front as 2.5 per
    connection (sockets, plus pipes for a quarter of them) and refuses to start above the hard limit;
    both proxies hold the same number, so that bound applies to both."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return held
    return max(0, min(held, (hard - NOFILE_SPARE) * 2 // 5))


def _nr_open() -> int:
    """The kernel's ceiling for any process's descriptor limit (fs.nr_open)."""
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 1 << 20


def raise_nofile(held: int) -> dict[str, int]:
    """Raise this process's descriptor limits so that ``held`` connections fit, as far as it may.

    The hard limit goes up to ``nofile_needed(held)`` (never above fs.nr_open) when this process may raise
    it (root with CAP_SYS_RESOURCE: the QEMU guest); where it may not, it stays. The soft limit goes to the
    hard one. Every process started afterwards (the hold server, proxyd, HAProxy) inherits both. Returns
    the limits before and after, for the results file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limits = {"soft before": soft, "hard before": hard}
    want = min(nofile_needed(held), _nr_open())
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):  # no CAP_SYS_RESOURCE: keep the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = want if hard == resource.RLIM_INFINITY else hard  # RLIM_INFINITY is -1: no plain comparison
    if soft != resource.RLIM_INFINITY and soft < top:
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return limits | {"soft": soft, "hard": hard}


class _Greetings:
    """Connections waiting for their one-byte greeting, and what became of each: greeted, closed, reset."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.waiting: dict[int, socket.socket] = {}
        self.counts = {"greeted": 0, "closed": 0, "reset": 0, "not connected": 0}

    def add(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.waiting[sock.fileno()] = sock
        self.ep.register(sock.fileno(), select.EPOLLIN)

    def poll(self, timeout: float) -> None:
        for fd, _ in self.ep.poll(timeout):
            sock = self.waiting.pop(fd, None)
            if sock is None:
                continue
            self.ep.unregister(fd)
            try:
                got = sock.recv(1)
            except BlockingIOError:  # woken without data: still waiting
                self.add(sock)
                continue
            except OSError:
                self.counts["reset"] += 1
                sock.close()  # its descriptors in the proxy go too: only held connections stay
                continue
            if got == b"h":
                self.counts["greeted"] += 1
            else:
                self.counts["closed"] += 1
                sock.close()

    def close(self) -> None:
        self.ep.close()


def _hold(target: tuple[str, int], held: int, socks: list[socket.socket], *, window: int,
          connect_timeout: float, greeting_timeout: float) -> dict[str, int]:
    """Open connections to ``target`` (appended to ``socks``) until ``held`` are greeted, at most ``window``
    waiting for their greeting at a time, so that neither the proxy's nor the backend's accept queue
    overflows on a slow (emulated) CPU: the figure is idle memory, not burst handling.

    One the proxy closes or resets while it is being established is closed here and replaced by a new one,
    at most ``held // 10 + 100`` times in all; the counts (greeted, closed, reset, not connected, never
    answered, opened) say how many."""
    greetings = _Greetings()
    counts = greetings.counts
    budget = held + held // 10 + 100
    opened = 0
    deadline = time.monotonic() + greeting_timeout
    try:
        while counts["greeted"] < held and time.monotonic() < deadline:
            waiting = len(greetings.waiting)
            if counts["greeted"] + waiting < held and waiting < window and opened < budget:
                opened += 1
                sock = socket.socket()
                socks.append(sock)
                sock.settimeout(connect_timeout)
                try:
                    sock.connect(target)
                except ConnectionResetError:  # accepted and reset before the connect returned
                    counts["reset"] += 1
                    sock.close()
                    continue
                except OSError:  # refused or timed out: counted, replaced
                    counts["not connected"] += 1
                    sock.close()
                    continue
                greetings.add(sock)
                greetings.poll(0)
            elif waiting:
                greetings.poll(0.5)
            else:
                break  # the budget of replacements is spent
        return counts | {"never answered": len(greetings.waiting), "opened": opened}
    finally:
        greetings.close()


def measure(topo: Topology, *, pid: int, target: tuple[str, int], held: int = HELD,
            log: Callable[[str], None] = lambda _: None, connect_timeout: float = CONNECT_TIMEOUT,
            greeting_timeout: float = GREETING_TIMEOUT, window: int = WINDOW) -> dict[str, Any]:
    """Hold ``held`` idle connections (fewer when descriptors are capped: ``possible``) through the proxy
    ``pid`` to ``target``; its RSS per connection."""
    raise_nofile(held)
    held = possible(held)
    before = rss_kib(pid)
    socks: list[socket.socket] = []
    try:
        with in_netns(topo.client):
            counts = _hold(target, held, socks, window=window, connect_timeout=connect_timeout,
                           greeting_timeout=greeting_timeout)
        time.sleep(1.0)  # let the proxy settle (pools, lazily freed buffers)
        holding = rss_kib(pid)
        greeted = counts["greeted"]
        log(f"  {greeted} of {held} connections established end to end ({counts}); "
            f"RSS {before} -> {holding} KiB")
        if greeted < held:
            return {"error": f"only {greeted} of {held} connections were established end to end: {counts}"}
        # Replaced connections (closed or reset by the proxy while being established) are said, not hidden.
        replaced = {k: v for k, v in counts.items() if k in ("closed", "reset", "not connected") and v}
        return {"held": held, "rss_before_kib": before, "rss_holding_kib": holding,
                "kib_per_connection": round((holding - before) / held, 3),
                **({"replaced": replaced} if replaced else {})}
    finally:
        for sock in socks:
            sock.close()


def write_hold_manifest(topo: Topology) -> None:
    """The service proxyd relays to the hold server on the first pod."""
    hold_port = [port(HOLD_PORT, name="hold", target_port=HOLD_PORT)]
    topo.write_manifest("bench-hold.yaml", [
        service("bench-hold", cluster_ip=paths.HOLD_VIP, ports=hold_port),
        endpoint_slice("bench-hold", ports=[{"name": "hold", "port": HOLD_PORT}],
                       endpoints=[endpoint(topo.pod_list[0].ip)])])


# proxyd's own account of connections it could not complete (docs/userspace.md, proxyd/metrics.py)
PROXYD_COUNTERS = ("proxyd_connections_total", "proxyd_connect_retries_total",
                   "proxyd_connections_rejected_total", "proxyd_accept_pauses_total")


_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{.*\})?\s+(\S+)")


def metric_sums(text: str, names: Sequence[str] = PROXYD_COUNTERS) -> dict[str, float]:
    """Each named family summed over its labels, from a Prometheus text exposition (malformed lines
    skipped: the figure is context, never worth failing the run)."""
    sums: dict[str, float] = {}
    for line in text.splitlines()[:100_000]:
        match = _SAMPLE.match(line)
        if match is None or match.group(1) not in names:
            continue
        try:
            value = float(match.group(2))
        except ValueError:
            continue
        if math.isfinite(value):
            sums[match.group(1)] = sums.get(match.group(1), 0.0) + value
    return sums


def through_proxyd(topo: Topology, *, held: int, log: Callable[[str], None], start_timeout: float = 20.0,
                   **timeouts: float) -> dict[str, Any]:
    """``held`` idle connections through proxyd's userspace mode (pinned, one engine worker)."""
    path = paths.ProxydPath(topo, "userspace", start_timeout=start_timeout, ready=(paths.HOLD_VIP, HOLD_PORT))
    got: dict[str, Any] = {"error": "interrupted"}
    try:
        running = path.start()
        assert running.meter.pid is not None
        got = measure(topo, pid=running.meter.pid, held=held, target=(paths.HOLD_VIP, HOLD_PORT), log=log,
                      **timeouts)
        status, body = topo.http_get(topo.node, *METRICS, "/metrics", timeout=30.0)
        if status == 200:
            got["proxyd counters"] = metric_sums(body)
            log(f"  proxyd counters: {got['proxyd counters']}")
    except (RuntimeError, OSError) as err:
        got = {"error": f"{type(err).__name__}: {err}"[-500:]}
    finally:
        if "error" in got and path.proc is not None:
            got["log tail"] = topo.log_of(path.proc)[-1500:]
            log(f"  proxyd log tail: {got['log tail']}")
        try:
            note = path.stop()
        except (subprocess.TimeoutExpired, OSError) as err:  # the figure stands; the topology kills the rest
            note = f"{type(err).__name__}: {err}"
        if note:
            log(f"  stopping proxyd: {note[-500:]}")
    return got


def through_haproxy(topo: Topology, *, held: int, log: Callable[[str], None], start_timeout: float = 10.0,
                    **timeouts: float) -> dict[str, Any]:
    """``held`` idle connections through HAProxy (one thread, pinned as in the data path)."""
    raise_nofile(held)
    held = possible(held)
    try:
        # HAProxy sizes its descriptor needs from maxconn (2.5 per connection) and refuses to start beyond
        # the hard limit: give it just what the measurement holds.
        backend = [(topo.pod_list[0].ip, HOLD_PORT)]
        proc = start_haproxy(topo, workdir=topo.manifests.parent / "bench" / "haproxy-hold",
                             maxconn=held + 16, timeout=start_timeout,
                             listeners=[(NODE_IP, paths.HAPROXY_HOLD_PORT, backend)])
    except RuntimeError as err:
        return {"error": f"did not start: {err}"[-500:]}
    try:
        return measure(topo, pid=proc.pid, held=held, target=(NODE_IP, paths.HAPROXY_HOLD_PORT), log=log,
                       **timeouts)
    except OSError as err:
        return {"error": f"{type(err).__name__}: {err}"[-500:]}
    finally:
        proc.kill()
        proc.wait(timeout=10)


def results_name() -> str:
    """``idlemem-guest`` inside the QEMU guest, else ``idlemem``: a host run never replaces the guest's."""
    return "idlemem-guest" if os.environ.get("PROXYD_IN_VM") == "1" else "idlemem"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.idlemem", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--held", type=int, default=HELD, help=f"idle connections to hold (default {HELD:,})")
    parser.add_argument("--proxies", default=",".join(PROXIES),
                        help=f"comma separated, from {', '.join(PROXIES)} (default: both, in that order)")
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT,
                        help="seconds for each connect (raise it in the emulated guest)")
    parser.add_argument("--greeting-timeout", type=float, default=GREETING_TIMEOUT,
                        help="seconds for every held connection's greeting to come back through the proxy")
    parser.add_argument("--start-timeout", type=float, default=20.0,
                        help="seconds for a proxy to come up (healthy and accepting)")
    parser.add_argument("--save", action="store_true",
                        help="write bench/results/idlemem[-guest].json with the run's metadata")
    args = parser.parse_args(argv)
    if not 1 <= args.held <= MAX_HELD:
        parser.error(f"--held must be 1..{MAX_HELD:,}")
    proxies = [p.strip() for p in args.proxies.split(",") if p.strip()]
    unknown = sorted(set(proxies) - set(PROXIES))
    if unknown or not proxies:
        parser.error(f"--proxies: unknown or none: {', '.join(unknown)}; choose from {', '.join(PROXIES)}")
    args.proxies = list(dict.fromkeys(proxies))
    for name in ("connect_timeout", "greeting_timeout", "start_timeout"):
        if not 0 < getattr(args, name) <= 3600:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 3600] seconds")
    return args


def _log(message: str) -> None:
    print(f"[idlemem {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both proxies' figures and the descriptor limits they ran under."""
    limits = raise_nofile(args.held)
    limits["nr_open"] = _nr_open()
    held = possible(args.held)
    _log(f"descriptor limits {limits}: {held:,} of {args.held:,} connections can be held")
    memory: dict[str, Any] = {}
    timeouts = {"connect_timeout": args.connect_timeout, "greeting_timeout": args.greeting_timeout}
    with Topology(pods=1, pods2=0) as topo:
        for ns in (topo.client, topo.node, topo.pod_list[0].ns):
            topo.sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65000")
            topo.sysctl(ns, "net.core.somaxconn", "4096")
        start_hold_server(topo, topo.pod_list[0], timeout=args.start_timeout)
        write_hold_manifest(topo)
        for proxy in args.proxies:
            _log(f"{held:,} idle connections through {proxy}")
            through = through_proxyd if proxy == report.USERSPACE else through_haproxy
            memory[proxy] = through(topo, held=held, log=_log, start_timeout=args.start_timeout, **timeouts)
    return {"held requested": args.held, "descriptor limits": limits, "memory": memory}


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if os.geteuid() != 0:
        print("idlemem: needs root (network namespaces)", file=sys.stderr)
        return 2
    started = runmeta.Run(runmeta.module_command("bench.idlemem", raw))
    figures = run(args)
    for proxy, got in figures["memory"].items():
        print(f"{proxy}: {got}")
    for line in report.memory_lines(figures["memory"]):
        print(line)
    if args.save:
        print(f"saved {started.save(results_name(), figures)}", file=sys.stderr)
    return 0 if all("error" not in m for m in figures["memory"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
