"""New-connection latency against the number of services, iptables vs nftables mode (kube-proxy's claim).

    python bench/latency_vs_services.py [--services 10,100,1000,10000] [--modes iptables,nftables]
                                        [--connects 400] [--out bench/results]

kube-proxy's headline for its nftables mode: the first packet of a
connection walks a list of rules in iptables mode (KUBE-SERVICES grows
with every service), but does map lookups in nftables mode, so latency
stays flat. For each mode and service count this builds the netns topology
(tests/netns/topology.py), writes N ClusterIP services (10 endpoints each;
the measured one, named to sort last in iptables' list, has a real pod
behind it), starts the real daemon, waits until the service answers, then
times ``--connects`` sequential TCP connects from a pod to the ClusterIP
(SYN → SYN-ACK: the DNAT decision is on that path). Prints p50/p99 per
point and writes ``latency_vs_services.json`` (with the run's metadata,
``bench/runmeta.py``, for ``python -m bench.docs_figures``) and ``.png``
(matplotlib).
The machine is shared and noisy: compare the curves' shapes, not absolute
microseconds.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import runmeta  # noqa: E402
from tests.netns.topology import Topology, netns_available  # noqa: E402

TARGET_IP = "10.96.255.254"
POINT_DEADLINE = 900.0


def _filler_ip(n: int) -> str:
    return f"10.{200 + n // 65536}.{n // 256 % 256}.{n % 256}"


def _manifests(services: int) -> str:
    """N-1 filler services plus the target, as one JSON List (the manifests source reads JSON)."""
    items: list[dict[str, Any]] = []
    for i in range(services - 1):
        name = f"fill-{i:05d}"
        items.append({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": name, "namespace": "default"},
                      "spec": {"type": "ClusterIP", "clusterIP": f"10.97.{i // 256}.{i % 256}",
                               "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]}})
        items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      "metadata": {"name": f"{name}-x", "namespace": "default",
                                   "labels": {"kubernetes.io/service-name": name}},
                      "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
                      "endpoints": [{"addresses": [_filler_ip(i * 10 + j)], "conditions": {"ready": True}}
                                    for j in range(10)]})
    items.append({"apiVersion": "v1", "kind": "Service",
                  "metadata": {"name": "zz-target", "namespace": "default"},
                  "spec": {"type": "ClusterIP", "clusterIP": TARGET_IP,
                           "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]}})
    items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"name": "zz-target-x", "namespace": "default",
                               "labels": {"kubernetes.io/service-name": "zz-target"}},
                  "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
                  "endpoints": [{"addresses": ["10.244.1.11"], "conditions": {"ready": True},
                                 "nodeName": "node1"}]})
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def _connect_times(topo: Topology, ns: str, count: int) -> list[float]:
    out = []
    for _ in range(count):
        sock = topo.tcp_socket(ns)
        sock.settimeout(5)
        t = time.perf_counter()
        sock.connect((TARGET_IP, 80))
        out.append(time.perf_counter() - t)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST: no TIME_WAIT pile-up on the client
    return out


def point(mode: str, services: int, connects: int) -> dict[str, Any]:
    with Topology() as topo:
        topo.start_tcp_server("pod1", 8080)
        topo.write_manifest("services.json", _manifests(services))
        started = time.monotonic()
        proc = topo.start_proxyd(mode, timeout=POINT_DEADLINE)
        ns = topo.pod("pod2").ns
        while True:
            try:
                _connect_times(topo, ns, 1)
                break
            except OSError:
                if time.monotonic() - started > POINT_DEADLINE:
                    raise RuntimeError(f"{mode} {services}: service not reachable: "
                                       f"{topo.log_of(proc)[-500:]}") from None
                time.sleep(0.5)
        ready_s = time.monotonic() - started
        _connect_times(topo, ns, 20)  # warm up
        times = sorted(_connect_times(topo, ns, connects))
        topo.stop_proxyd(proc)
        topo.run_proxyd(["--cleanup"], timeout=600)
    return {"mode": mode, "services": services, "connects": connects, "ready_s": round(ready_s, 1),
            "p50_us": round(statistics.median(times) * 1e6, 1),
            "p99_us": round(times[int(len(times) * 0.99) - 1] * 1e6, 1)}


def plot(points: list[dict[str, Any]], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in sorted({p["mode"] for p in points}):
        mine = sorted((p for p in points if p["mode"] == mode and "p50_us" in p), key=lambda p: p["services"])
        ax.plot([p["services"] for p in mine], [p["p50_us"] for p in mine], marker="o", label=f"{mode} p50")
        ax.plot([p["services"] for p in mine], [p["p99_us"] for p in mine], marker="x", linestyle="--",
                label=f"{mode} p99")
    ax.set_xscale("log")
    ax.set_yscale("log")  # p99 is mostly the busy machine's noise; p50 carries the shape
    ax.set_xlabel("services (10 endpoints each)")
    ax.set_ylabel("TCP connect time to a ClusterIP (µs)")
    ax.set_title("New-connection latency vs number of services")
    ax.legend()
    fig.tight_layout()
    path = out / "latency_vs_services.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", default="10,100,1000,10000",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--modes", default="iptables,nftables", type=lambda s: s.split(","))
    parser.add_argument("--connects", type=int, default=400)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    run = runmeta.Run(["python", "bench/latency_vs_services.py", *raw])
    problem = netns_available()
    if problem:
        print(f"latency_vs_services: {problem}", file=sys.stderr)
        return 2
    points = []
    for services in args.services:
        for mode in args.modes:
            try:
                p = point(mode, services, args.connects)
            except Exception as err:  # one failed point must not lose the others
                p = {"mode": mode, "services": services, "error": str(err)[-400:]}
            points.append(p)
            print(json.dumps(p), file=sys.stderr, flush=True)
    run.save("latency_vs_services", {"connects": args.connects, "points": points}, directory=args.out)
    png = plot(points, args.out)
    print(json.dumps({"points": points, "png": str(png) if png else None}))
    return 0 if all("error" not in p for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
