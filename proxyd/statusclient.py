"""``proxyd status`` and ``proxyd trace``: ask the running daemon over its status socket and print the answer.

The daemon does the work (``proxyd.status``); this module only sends one
JSON request, reads one JSON answer (bounded in size and time) and renders
it as text, or prints it as it came with ``--json``. Exit codes: 0 with an
answer, 1 when the daemon cannot be reached or refuses the request, 2 for
bad arguments.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TextIO

from proxyd.status import DEFAULT_SOCKET

MAX_ANSWER = 512 << 20
TIMEOUT = 150.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"proxyd {self.prog.split()[-1]}: error: {message}\n")


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "status":
        parser = _Parser(prog="proxyd status",
                         description="What proxyd does with each service port on this node: addresses, "
                                     "endpoints and the ones in use, policies, the kernel's counters, the "
                                     "last sync, rejected objects.")
        parser.add_argument("name", nargs="?", help="only this service (all its ports)")
        parser.add_argument("-n", "--namespace", help="only services in this namespace")
        parser.add_argument("--detail", action="store_true", default=None,
                            help="every endpoint of every service (default: only with a namespace or name; "
                                 "otherwise one line per service port)")
    else:
        parser = _Parser(prog="proxyd trace",
                         description="Where would a new connection SRC -> DST:PORT go on this node now, "
                                     "evaluated against the state read back from the kernel.")
        parser.add_argument("src", metavar="SRC", help="source address")
        parser.add_argument("dst", metavar="DST", help="destination address")
        parser.add_argument("port", metavar="PORT", type=int, help="destination port")
        parser.add_argument("--proto", choices=("tcp", "udp", "sctp"), default="tcp",
                            help="protocol (default: tcp)")
    parser.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    parser.add_argument("--socket", default=DEFAULT_SOCKET,
                        help=f"the daemon's --status-socket (default: {DEFAULT_SOCKET})")
    return parser


def ask(path: str, request: dict[str, Any], *, timeout: float = TIMEOUT) -> dict[str, Any]:
    """One request, one answer; OSError/ValueError when the daemon cannot be reached or answers garbage."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks: list[bytes] = []
        size = 0
        while True:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = sock.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
            size += len(data)
            if size > MAX_ANSWER:
                raise ValueError(f"answer larger than {MAX_ANSWER} bytes")
    answer = json.loads(b"".join(chunks))
    if not isinstance(answer, dict):
        raise ValueError("answer is not a JSON object")
    return answer


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    text = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{text} ({max(0.0, now - ts):.1f}s ago)"


def _counters(values: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def render_status(answer: dict[str, Any], out: TextIO) -> None:
    sync = answer["sync"]
    kernel = answer["kernel"]
    now = answer.get("now") or time.time()
    w = out.write
    kind = "full" if sync.get("full") else "partial"
    took = "" if sync.get("duration_seconds") is None else f", took {sync['duration_seconds']:.3f}s ({kind})"
    w(f"mode {answer['mode']}, node {answer['node']}: last sync {_when(sync.get('last'), now)}{took}, "
      f"{'healthy' if sync.get('healthy') else 'NOT healthy'}\n")
    if sync.get("running"):
        w("  a sync is running now: the kernel may be between two states\n")
    if sync.get("consecutive_failures"):
        w(f"  sync failing: {sync['consecutive_failures']} in a row, last error: {sync.get('last_error')}\n")
    if not kernel.get("supported", True):
        w("  kernel state: not reported by this mode\n")
    elif kernel.get("matches") is None:
        w("  kernel state: not compared\n")
    else:
        verdict = "matches the last sync" if kernel["matches"] else "DIFFERS from the last sync"
        w(f"  kernel state: {verdict} (read back in {kernel.get('read_seconds', 0):.3f}s)\n")
    for text in kernel.get("mismatches", []):
        w(f"    - {text}\n")
    for note in kernel.get("notes", []):
        w(f"  note: {note}\n")
    shown = len(answer["services"])
    w(f"  service ports: {shown} shown of {answer['service_ports_total']}\n")
    if not answer.get("detail", True):
        for svc in answer["services"]:
            _summary_line(svc, w)
        _render_rejected(answer, now, w)
        return
    for svc in answer["services"]:
        w("\n")
        w(f"{svc['name']} {svc['protocol']} {svc['type']}  {'  '.join(_addresses(svc))}\n")
        policies = [f"internalTrafficPolicy {svc['internal_traffic_policy']}"]
        if svc["external_traffic_policy"]:
            policies.append(f"externalTrafficPolicy {svc['external_traffic_policy']}")
        affinity = (f"ClientIP {svc['affinity_timeout_seconds']}s" if svc["session_affinity"] == "ClientIP"
                    else "None")
        w(f"  affinity {affinity}; {'; '.join(policies)}")
        if svc["load_balancer_source_ranges"]:
            w(f"; source ranges {', '.join(svc['load_balancer_source_ranges'])}")
        if svc["topology_aware"]:
            w("; topology-aware")
        w("\n")
        if not svc["endpoints"]:
            w("  no endpoints: connections are rejected\n")
        for ep in svc["endpoints"]:
            where = "local" if ep["local"] else f"remote ({ep['node'] or 'no node'})"
            use = ",".join(ep["in_use"]) or "not in use"
            line = f"  {ep['address']:<22} {ep['state']:<20} {where:<16} in use: {use}"
            if ep.get("counters"):
                line += f"  {_counters(ep['counters'])}"
            w(line.rstrip() + "\n")
        for addr, counts in (svc.get("other_kernel_endpoints") or {}).items():
            w(f"  {addr:<22} {'(kernel only)':<20} {'':<16} {_counters(counts)}\n")
    _render_rejected(answer, now, w)


def _addresses(svc: dict[str, Any]) -> list[str]:
    out = [f"{svc['cluster_ip']}:{svc['port']}"]
    if svc["node_port"]:
        out.append(f"NodePort {svc['node_port']}")
    out += [f"externalIP {ip}" for ip in svc["external_ips"]]
    out += [f"LB {ip}" for ip in svc["load_balancer_ips"]]
    return out


def _summary_line(svc: dict[str, Any], w: Any) -> None:
    c = svc["endpoint_counts"]
    use = f"in use {c['in_use_cluster_ip']}"
    if svc["external_traffic_policy"]:
        use += f"/{c['in_use_external']} external"
    line = (f"{svc['name']} {svc['protocol']} {svc['type']}  {'  '.join(_addresses(svc))}  "
            f"endpoints {c['total']} ({c['ready']} ready, {c['local']} local) {use}")
    if svc["session_affinity"] == "ClientIP":
        line += f"  affinity {svc['affinity_timeout_seconds']}s"
    if svc.get("counters"):
        line += f"  {_counters(svc['counters'])}"
    w(line + "\n")


def _render_rejected(answer: dict[str, Any], now: float, w: Any) -> None:
    rejected = answer.get("rejected") or []
    if rejected:
        w("\nrejected objects (most recent first):\n")
        for r in rejected:
            w(f"  {_when(r['at'], now)}  {r['source']} {r['kind']} {r['object']}: {r['reason']}\n")


def render_trace(answer: dict[str, Any], out: TextIO) -> None:
    w = out.write
    p = answer["packet"]
    w(f"trace {p['src']} -> {p['dst']}:{p['port']}/{p['protocol']} on node {answer['node']} "
      f"(mode {answer['mode']})\n")
    if answer.get("source"):
        w(f"  evaluated against: {answer['source']}\n")
    if answer.get("service"):
        w(f"  service {answer['service']} ({answer['address_kind']})\n")
    else:
        w("  no service of the desired state has this address and port\n")
    if not answer.get("supported", True):
        w("  trace not available:\n")
    for note in answer.get("notes", []):
        w(f"  note: {note}\n")
    for path in answer.get("paths", []):
        odds = f"{100 * path['odds']:5.1f}%"
        if path["verdict"] == "ACCEPT":
            masq = "masqueraded" if path["masquerade"] else "not masqueraded"
            w(f"  {odds}  -> {path['endpoint']}  {masq}")
        else:
            w(f"  {odds}  {path['verdict']}")
        w(f"  ({path['reason']})\n" if path.get("reason") else "\n")
        if path["steps"]:
            w(f"          {' > '.join(path['steps'])}\n")


def main(argv: Sequence[str]) -> int:
    command, rest = argv[0], list(argv[1:])
    args = build_parser(command).parse_args(rest)
    if command == "status":
        request: dict[str, Any] = {"op": "status", "namespace": args.namespace, "name": args.name,
                                   "detail": args.detail}
    else:
        request = {"op": "trace", "src": args.src, "dst": args.dst, "port": args.port, "protocol": args.proto}
    try:
        answer = ask(args.socket, request)
    except (OSError, ValueError) as err:
        print(f"proxyd {command}: cannot ask the daemon on {args.socket}: {err}", file=sys.stderr)
        return 1
    if "error" in answer:
        print(f"proxyd {command}: {answer['error']}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(answer, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif command == "status":
        render_status(answer, sys.stdout)
    else:
        render_trace(answer, sys.stdout)
    return 0
