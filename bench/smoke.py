"""Smoke benchmark: proxyd userspace next to the direct path, measured in one run (< 60 s, root).

    python bench/smoke.py [--seconds 3] [--rounds 1] [--haproxy] [--json out.json]

Builds a ``Topology`` (tests/netns/topology.py), starts iperf3 and nginx in
pod1 and proxyd in userspace mode on the node, and measures from the
external client namespace:

* bulk throughput (one iperf3 TCP stream, MB/s) to the pod directly and
  through proxyd's NodePort;
* new-connection rate (wrk with ``Connection: close``, so one request per
  connection, against nginx) directly and through proxyd;
* keep-alive request rate (wrk, 32 persistent connections);
* proxyd's CPU time per GB moved, per new connection and per keep-alive
  request (from /proc), and wrk's p99 latency of new connections.

``--haproxy`` also runs HAProxy in the node namespace (``mode tcp``, round
robin, splice-request/-response forced, one thread, pinned to CPU 1 like
proxyd; config from ``bench/servers.py``) on ports of its own and measures
it the same way in the same run, interleaved with proxyd, so the ratios
compare like with like on a noisy machine. ``--rounds N`` repeats every
measurement and reports medians.

When the machine has two CPUs, proxyd is pinned to CPU 1 and load and
backends to CPU 0 (as in docs/facts.md), so the numbers compare with the
HAProxy anchors there. It is a smoke test: one short run, no statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.servers import haproxy_config, wait_listening
from tests.netns.topology import (
    NODE_IP,
    Topology,
    endpoint,
    endpoint_slice,
    netns_available,
    port,
    service,
)

POD_IP = "10.244.1.11"
IPERF_PORT, NGINX_PORT = 5201, 8081
IPERF_NODEPORT, NGINX_NODEPORT = 30201, 30081
HAPROXY_IPERF_PORT, HAPROXY_NGINX_PORT = 31201, 31081

NGINX_CONF = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{ listen {port}; location / {{ return 200 "ok\\n"; }} }}
}}
"""


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if (os.cpu_count() or 1) >= 2 else argv


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def iperf(topo: Topology, ip: str, port_: int, seconds: float) -> float:
    """MB/s received over one TCP stream."""
    argv = ["iperf3", "-c", ip, "-p", str(port_), "-t", str(seconds), "-J"]
    out = topo.ns_run(topo.client, pinned(0, argv), timeout=seconds + 20)
    result = json.loads(out.stdout)
    return result["end"]["sum_received"]["bytes"] / result["end"]["sum_received"]["seconds"] / 1e6


def _latency_us(text: str) -> float:
    number, unit = float(text[:-2] if text.endswith(("us", "ms")) else text[:-1]), text.lstrip("0123456789.")
    return number * {"us": 1.0, "ms": 1e3, "s": 1e6}[unit]


def wrk(topo: Topology, ip: str, port_: int, seconds: float, *, close: bool) -> tuple[float, float]:
    """(requests per second, p99 latency in µs); with ``close`` every request is a new connection."""
    argv = ["wrk", "-t1", "-c32", f"-d{max(1, round(seconds))}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    out = topo.ns_run(topo.client, pinned(0, [*argv, f"http://{ip}:{port_}/"]), timeout=seconds + 20)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    p99 = re.search(r"^\s+99%\s+([\d.]+[mu]?s)\s*$", out.stdout, re.MULTILINE)
    if not match or not p99:
        raise RuntimeError(f"wrk output not understood: {out.stdout}\n{out.stderr}")
    errors = re.search(r"Socket errors: (.*)", out.stdout)
    if errors:
        print(f"  wrk socket errors ({ip}:{port_}): {errors.group(1)}", file=sys.stderr)
    return float(match.group(1)), _latency_us(p99.group(1))


def start_haproxy(topo: Topology, workdir: Path) -> subprocess.Popen[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "haproxy.cfg"
    conf.write_text(haproxy_config(listeners=[(NODE_IP, HAPROXY_IPERF_PORT, [(POD_IP, IPERF_PORT)]),
                                              (NODE_IP, HAPROXY_NGINX_PORT, [(POD_IP, NGINX_PORT)])]))
    proc = topo.spawn(topo.node, pinned(1, ["haproxy", "-db", "-f", str(conf)]), log_name="haproxy")
    for port_ in (HAPROXY_IPERF_PORT, HAPROXY_NGINX_PORT):
        wait_listening(topo, topo.node, port_)
    return proc


def measure_proxy(topo: Topology, name: str, pid: int, ports: tuple[int, int], seconds: float, *,
                  bulk: bool, results: dict[str, list[float]]) -> None:
    """One round of bulk, new-connection and keep-alive measurements through one proxy."""
    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    bulk_port, http_port = ports
    if bulk:
        cpu0 = cpu_seconds(pid)
        rate = iperf(topo, NODE_IP, bulk_port, seconds)
        add(f"bulk_{name}_MBps", rate)
        add(f"{name}_cpu_s_per_GB", (cpu_seconds(pid) - cpu0) / (rate * seconds / 1e3))
    user0, sys0 = cpu_split(pid)
    rate, p99 = wrk(topo, NODE_IP, http_port, seconds, close=True)
    user1, sys1 = cpu_split(pid)
    add(f"conn_{name}_per_s", rate)
    add(f"{name}_cpu_us_per_conn", (user1 + sys1 - user0 - sys0) / (rate * seconds) * 1e6)
    add(f"{name}_user_us_per_conn", (user1 - user0) / (rate * seconds) * 1e6)
    add(f"conn_{name}_p99_us", p99)
    cpu0 = cpu_seconds(pid)
    rate, _ = wrk(topo, NODE_IP, http_port, seconds, close=False)
    add(f"ka_{name}_per_s", rate)
    add(f"{name}_cpu_us_per_req", (cpu_seconds(pid) - cpu0) / (rate * seconds) * 1e6)


def measure(seconds: float, *, bulk: bool = True, haproxy: bool = False, rounds: int = 1,
            proxyd_env: dict[str, str] | None = None) -> dict[str, float]:
    """Direct path, proxyd userspace (and HAProxy) in one topology; medians over ``rounds``."""
    samples: dict[str, list[float]] = {}
    with Topology(pods=1, pods2=0) as topo:
        for ns in (topo.client, topo.node, topo.pod("pod1").ns):
            # Tens of thousands of short connections per run: TIME_WAIT reuse and a wide port range.
            topo.sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65000")
            topo.sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")
            topo.sysctl(ns, "net.core.somaxconn", "4096")
        pod = topo.pod("pod1")
        nginx_dir = topo.manifests.parent / "nginx"
        nginx_dir.mkdir()
        (nginx_dir / "nginx.conf").write_text(NGINX_CONF.format(dir=nginx_dir, port=NGINX_PORT))
        topo.spawn(pod.ns, pinned(0, ["iperf3", "-s", "-p", str(IPERF_PORT)]), log_name="iperf3")
        topo.spawn(pod.ns, pinned(0, ["nginx", "-c", str(nginx_dir / "nginx.conf"), "-p", str(nginx_dir)]),
                   log_name="nginx")
        topo.write_manifest("bench.yaml", [
            service("bench", cluster_ip="10.96.0.10", type_="NodePort", ports=[
                port(IPERF_PORT, name="iperf", target_port=IPERF_PORT, node_port=IPERF_NODEPORT),
                port(80, name="http", target_port=NGINX_PORT, node_port=NGINX_NODEPORT)]),
            endpoint_slice("bench", ports=[{"name": "iperf", "port": IPERF_PORT},
                                           {"name": "http", "port": NGINX_PORT}],
                           endpoints=[endpoint(POD_IP)]),
        ])
        proxyd = topo.start_proxyd("userspace", env=proxyd_env)
        if (os.cpu_count() or 1) >= 2:
            topo.ns_run(topo.node, ["taskset", "-a", "-p", "-c", "1", str(proxyd.pid)])
        haproxy_proc = start_haproxy(topo, topo.manifests.parent / "haproxy") if haproxy else None
        time.sleep(0.3)  # let iperf3 and nginx finish starting

        for _ in range(rounds):
            if bulk:
                samples.setdefault("bulk_direct_MBps", []).append(iperf(topo, POD_IP, IPERF_PORT, seconds))
            samples.setdefault("conn_direct_per_s", []).append(
                wrk(topo, POD_IP, NGINX_PORT, seconds, close=True)[0])
            measure_proxy(topo, "proxyd", proxyd.pid, (IPERF_NODEPORT, NGINX_NODEPORT), seconds,
                          bulk=bulk, results=samples)
            if haproxy_proc is not None:
                measure_proxy(topo, "haproxy", haproxy_proc.pid, (HAPROXY_IPERF_PORT, HAPROXY_NGINX_PORT),
                              seconds, bulk=bulk, results=samples)
        topo.stop_proxyd(proxyd)
    return {key: statistics.median(values) for key, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every measurement; report medians")
    parser.add_argument("--haproxy", action="store_true",
                        help="also measure HAProxy (mode tcp, splice forced, 1 thread) in the same run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    why = netns_available()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    results = measure(args.seconds, haproxy=args.haproxy, rounds=max(1, args.rounds))

    width = max(len(k) for k in results)
    print(f"{'metric':<{width}}  value")
    for key, value in results.items():
        print(f"{key:<{width}}  {value:,.3g}" if value < 100 else f"{key:<{width}}  {value:,.1f}")
    print(f"(bulk: proxyd/direct = {results['bulk_proxyd_MBps'] / results['bulk_direct_MBps']:.2f}; "
          f"new connections: proxyd/direct = "
          f"{results['conn_proxyd_per_s'] / results['conn_direct_per_s']:.2f}; "
          f"run took {time.monotonic() - started:.1f}s)")
    if args.haproxy:
        ratios = {name: results[f"proxyd_{name}"] / results[f"haproxy_{name}"]
                  for name in ("cpu_us_per_conn", "cpu_us_per_req", "cpu_s_per_GB")}
        ratios["bulk_MBps"] = results["bulk_proxyd_MBps"] / results["bulk_haproxy_MBps"]
        ratios["conn_p99_us"] = results["conn_proxyd_p99_us"] / results["conn_haproxy_p99_us"]
        print("proxyd/haproxy: " + "; ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
