"""Smoke benchmark: proxyd userspace next to the direct path, measured in one run (< 60 s, root).

    python bench/smoke.py [--seconds 3] [--json out.json]

Builds a ``Topology`` (tests/netns/topology.py), starts iperf3 and nginx in
pod1 and proxyd in userspace mode on the node, and measures from the
external client namespace:

* bulk throughput (one iperf3 TCP stream, MB/s) to the pod directly and
  through proxyd's NodePort;
* new-connection rate (wrk with ``Connection: close``, so one request per
  connection, against nginx) directly and through proxyd;
* proxyd's CPU time per GB moved and per new connection (from /proc).

When the machine has two CPUs, proxyd is pinned to CPU 1 and load and
backends to CPU 0 (as in docs/facts.md), so the numbers compare with the
HAProxy anchors there. It is a smoke test: one short run, no statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.netns.topology import NODE_IP, Topology, endpoint, endpoint_slice, netns_available, port, service

POD_IP = "10.244.1.11"
IPERF_PORT, NGINX_PORT = 5201, 8081
IPERF_NODEPORT, NGINX_NODEPORT = 30201, 30081

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
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def iperf(topo: Topology, ip: str, port_: int, seconds: float) -> float:
    """MB/s received over one TCP stream."""
    argv = ["iperf3", "-c", ip, "-p", str(port_), "-t", str(seconds), "-J"]
    out = topo.ns_run(topo.client, pinned(0, argv), timeout=seconds + 20)
    result = json.loads(out.stdout)
    return result["end"]["sum_received"]["bytes"] / result["end"]["sum_received"]["seconds"] / 1e6


def wrk_close(topo: Topology, ip: str, port_: int, seconds: float) -> float:
    """Requests (= new connections) per second."""
    argv = ["wrk", "-t1", "-c32", f"-d{max(1, round(seconds))}s", "-H", "Connection: close",
            f"http://{ip}:{port_}/"]
    out = topo.ns_run(topo.client, pinned(0, argv), timeout=seconds + 20)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    if not match:
        raise RuntimeError(f"wrk output not understood: {out.stdout}\n{out.stderr}")
    errors = re.search(r"Socket errors: (.*)", out.stdout)
    if errors:
        print(f"  wrk socket errors ({ip}:{port_}): {errors.group(1)}", file=sys.stderr)
    return float(match.group(1))


def measure(seconds: float, *, bulk: bool = True,
            proxyd_env: dict[str, str] | None = None) -> dict[str, float]:
    """Direct path and proxyd userspace in one topology: MB/s, connections/s, proxyd CPU."""
    results: dict[str, float] = {}
    with Topology(pods=1, pods2=0) as topo:
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
        time.sleep(0.3)  # let iperf3 and nginx finish starting

        if bulk:
            results["bulk_direct_MBps"] = iperf(topo, POD_IP, IPERF_PORT, seconds)
            cpu0 = cpu_seconds(proxyd.pid)
            results["bulk_proxyd_MBps"] = iperf(topo, NODE_IP, IPERF_NODEPORT, seconds)
            moved_gb = results["bulk_proxyd_MBps"] * seconds / 1e3
            results["proxyd_cpu_s_per_GB"] = (cpu_seconds(proxyd.pid) - cpu0) / moved_gb

        results["conn_direct_per_s"] = wrk_close(topo, POD_IP, NGINX_PORT, seconds)
        cpu0 = cpu_seconds(proxyd.pid)
        results["conn_proxyd_per_s"] = wrk_close(topo, NODE_IP, NGINX_NODEPORT, seconds)
        conns = results["conn_proxyd_per_s"] * seconds
        results["proxyd_cpu_us_per_conn"] = (cpu_seconds(proxyd.pid) - cpu0) / conns * 1e6
        topo.stop_proxyd(proxyd)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    why = netns_available()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    results = measure(args.seconds)

    width = max(len(k) for k in results)
    print(f"{'metric':<{width}}  value")
    for key, value in results.items():
        print(f"{key:<{width}}  {value:,.1f}")
    print(f"(bulk: proxyd/direct = {results['bulk_proxyd_MBps'] / results['bulk_direct_MBps']:.2f}; "
          f"new connections: proxyd/direct = "
          f"{results['conn_proxyd_per_s'] / results['conn_direct_per_s']:.2f}; "
          f"run took {time.monotonic() - started:.1f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
