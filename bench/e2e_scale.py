"""End to end at scale: the real daemon, N services × E endpoints, real traffic, per mode and source.

    python -m bench.e2e_scale --services 10000 --endpoints 10 --modes userspace,iptables
                              [--formats yaml,json] [--api] [--samples 5] [--changes 20] [--json]
    python -m bench.e2e_scale --idle-files 10000 [--idle-seconds 30]

For each mode (``--modes``: any mode ``proxyd --proxy-mode`` accepts, so
nftables just works once it exists) and each source:

* ``manifests`` (one per ``--formats``): one file in ``--manifests``, a
  ``kind: List`` of N ClusterIP services with a slice of E endpoints each
  (13.5 MB of YAML at 10,000 × 10, the shape of ``kubectl get -o yaml``);
* ``api`` (``--api``): the fake API server (``python -m
  tests.api.fake_apiserver --preload``) in the node namespace serving the
  same objects; the daemon lists 10,000 + 10,000 and watches.

it starts ``proxyd`` in a network namespace (``netnstopo.topology``) and
prints: ``healthy_s`` (start to /healthz 200), ``change_s`` (median of
``--samples``: from the one-endpoint change — the file renamed into place,
or the watch event applied — until a new connection from a pod to the
service reaches the new endpoint), ``rss_first_mib`` (after the first
sync), ``rss_changes_mib`` (after ``--changes`` changes), ``peak_mib``
(VmHWM). Service 0 has one endpoint that alternates between two real pods;
the others point at addresses nobody answers (never connected to).

``--idle-files`` measures the manifests source alone (in this process, no
namespace): CPU used while N one-service files sit idle (the safety rescan),
the cost of one full stat rescan, and CPU while one file is rewritten every
50 ms.

Figures are wall-clock on a shared machine: record the load next to them.
``--save`` also writes ``bench/results/e2e_scale-N.json`` (N the service
count; ``e2e_scale-idle.json`` for ``--idle-files``) with every point, the
load average before and after each, and the run's metadata
(``bench/runmeta.py``), for ``python -m bench.docs_figures``.
Output: a table on stderr; with ``--json`` one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench import runmeta
from netnstopo.topology import (
    FAKE_API_PORT,
    HEALTHZ,
    METRICS,
    Topology,
    fake_api,
    netns_available,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
PROXYD = str(Path(sys.executable).parent / "proxyd")
PORT = 8080
# userspace mode holds a listener per service port: give it the hard limit.
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _ip(first: int, n: int) -> str:
    return f"10.{first + n // 65536}.{(n // 256) % 256}.{n % 256}"


def cluster_ip(i: int) -> str:
    return _ip(96, i + 1)


def objects(services: int, endpoints: int, *, first_endpoint: str) -> list[dict[str, Any]]:
    """Services svc-0..N-1 and one slice each; svc-0's single endpoint is ``first_endpoint``."""
    out: list[dict[str, Any]] = []
    for i in range(services):
        out.append({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": f"svc-{i}", "namespace": "bench"},
                    "spec": {"clusterIP": cluster_ip(i),
                             "ports": [{"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP"}]}})
        out.append(slice_of(i, [first_endpoint] if i == 0 else
                            [_ip(128, i * endpoints + j) for j in range(endpoints)]))
    return out


def slice_of(i: int, ips: list[str]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc-{i}-abcde", "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node1"}
                          for ip in ips]}


def render(items: list[dict[str, Any]], fmt: str) -> str:
    doc = {"apiVersion": "v1", "kind": "List", "items": items}
    if fmt == "json":
        return json.dumps(doc)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(doc, Dumper=dumper, sort_keys=False)


def memory(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def answer(topo: Topology, ip: str) -> str | None:
    """Which pod answers ip:80 for a new connection from pod3 (None when refused or silent)."""
    try:
        return topo.hello(topo.pod("pod3").ns, ip, 80, timeout=1.0).pod
    except (OSError, ValueError):
        return None


def follow(topo: Topology, change: Callable[[], None], want: str, *, timeout: float = 60.0) -> float:
    """Seconds from ``change()`` until new connections reach ``want``."""
    started = time.monotonic()
    change()
    wait_until(lambda: answer(topo, cluster_ip(0)) == want, timeout=timeout, interval=0.01,
               what=f"traffic to {want}")
    return time.monotonic() - started


def run_case(*, mode: str, source: str, services: int, endpoints: int, samples: int,
             changes: int) -> dict[str, Any]:
    """One (mode, source) point in a fresh topology."""
    fmt = source.partition("-")[2] or "json"
    result: dict[str, Any] = {"mode": mode, "source": source, "services": services, "endpoints": endpoints}
    with Topology(pods=3, pods2=0) as topo:
        pod1, pod2 = topo.pod("pod1"), topo.pod("pod2")
        for pod in (pod1, pod2):
            topo.start_tcp_server(pod, PORT)
        items = objects(services, endpoints, first_endpoint=pod1.ip)
        extra = ["--min-sync-period", "1s"]
        wrapper = ["prlimit", f"--nofile={NOFILE}:{NOFILE}"]
        work = topo.manifests.parent
        if source == "api":
            preload = work / "preload.json"
            preload.write_text(json.dumps({"items": items}))
            del items
            fake = topo.spawn(topo.node, [sys.executable, "-m", "tests.api.fake_apiserver",
                                          "--host", "127.0.0.1", "--port", str(FAKE_API_PORT),
                                          "--preload", str(preload)],
                              log_name="fake-apiserver", env={"PYTHONPATH": str(ROOT)})
            wait_until(lambda: "listening" in topo.log_of(fake) or fake.poll() is not None, timeout=120,
                       what="fake API server")
            kubeconfig = work / "kubeconfig"
            kubeconfig.write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{FAKE_API_PORT}"}}],
                "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
            argv = [*wrapper, PROXYD, "--proxy-mode", mode, "--kubeconfig", str(kubeconfig),
                    "--hostname-override", "node1", "--healthz-bind-address", f"{HEALTHZ[0]}:{HEALTHZ[1]}",
                    "--metrics-bind-address", f"{METRICS[0]}:{METRICS[1]}", "--cluster-cidr", "10.244.0.0/16",
                    *extra]

            def change_to(pod_ip: str) -> Callable[[], None]:
                payload = {"resource": "endpointslices", "object": slice_of(0, [pod_ip])}
                return lambda: fake_api(topo, "apply", payload, timeout=30)
        else:
            path = topo.manifests / f"all.{fmt}"
            path.write_text(render(items, fmt))
            result["file_mib"] = round(path.stat().st_size / 2**20, 1)
            # Both versions rendered up front: the measured time is proxyd's, not the generator's.
            texts = {pod.ip: render(objects(services, endpoints, first_endpoint=pod.ip), fmt)
                     for pod in (pod1, pod2)}
            del items
            argv = [*wrapper, PROXYD, "--proxy-mode", mode, "--manifests", str(topo.manifests),
                    "--hostname-override", "node1", "--healthz-bind-address", f"{HEALTHZ[0]}:{HEALTHZ[1]}",
                    "--metrics-bind-address", f"{METRICS[0]}:{METRICS[1]}", "--cluster-cidr", "10.244.0.0/16",
                    *extra]

            def change_to(pod_ip: str) -> Callable[[], None]:
                def write() -> None:
                    tmp = topo.manifests / f".all.{secrets.token_hex(3)}.tmp"
                    tmp.write_text(texts[pod_ip])
                    os.replace(tmp, path)
                return write

        started = time.monotonic()
        proc = topo.spawn(topo.node, argv, log_name=f"proxyd-{mode}")
        try:
            wait_until(lambda: proc.poll() is not None
                       or topo.http_get(topo.node, *HEALTHZ, "/healthz", timeout=1.0)[0] == 200,
                       timeout=600, interval=0.05, what="proxyd healthy")
            if proc.poll() is not None:
                raise RuntimeError(f"proxyd exited: {topo.log_of(proc)[-2000:]}")
            result["healthy_s"] = round(time.monotonic() - started, 2)
            wait_until(lambda: answer(topo, cluster_ip(0)) == "pod1", timeout=60, what="service 0 answers")
            first = memory(proc.pid)
            result["rss_first_mib"] = first["VmRSS"]
            times = []
            target = {pod1.ip: pod2, pod2.ip: pod1}
            current = pod1
            for n in range(max(samples, changes)):
                nxt = target[current.ip]
                seconds = follow(topo, change_to(nxt.ip), nxt.name)
                current = nxt
                if n < samples:
                    times.append(seconds)
                if n == 0:
                    result["rss_after_1_mib"] = memory(proc.pid)["VmRSS"]
            result["change_s"] = round(statistics.median(times), 3)
            result["change_all_s"] = [round(t, 3) for t in times]
            final = memory(proc.pid)
            result["rss_changes_mib"] = final["VmRSS"]
            result["changes"] = max(samples, changes)
            result["peak_mib"] = final["VmHWM"]
        except Exception as err:
            result["error"] = f"{type(err).__name__}: {err}"[-600:]
            result["log"] = topo.log_of(proc)[-1500:]
        finally:
            stopped = time.monotonic()
            try:
                topo.stop_proxyd(proc, timeout=120)
                result["stop_s"] = round(time.monotonic() - stopped, 1)
            except Exception as err:  # a daemon slow to die under load must not lose the figures
                result["stop_error"] = f"{type(err).__name__}: {err}"[-300:]
    return result


# ---------------------------------------------------------------- the manifests source alone


def idle(files: int, seconds: float) -> dict[str, Any]:
    """CPU of the manifests source with ``files`` one-service files: idle, full rescan, 20 Hz rewrites."""
    from proxyd.sources.manifests import ManifestSource
    from proxyd.tracker import Tracker

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    async def main(directory: Path) -> dict[str, Any]:
        def svc(i: int, port: int = 80) -> str:
            return json.dumps({"apiVersion": "v1", "kind": "Service",
                               "metadata": {"name": f"s{i}", "namespace": "bench"},
                               "spec": {"clusterIP": cluster_ip(i), "ports": [{"port": port}]}})
        for i in range(files):
            (directory / f"s{i:05}.json").write_text(svc(i))
        tracker = Tracker("node1")
        changes: list[float] = []
        source = ManifestSource(str(directory), tracker, on_change=lambda: changes.append(time.monotonic()))
        task = asyncio.create_task(source.run())
        started = time.monotonic()
        await asyncio.wait_for(source.ready.wait(), 600)
        out: dict[str, Any] = {"files": files, "ready_s": round(time.monotonic() - started, 2)}
        tracker.take()
        await asyncio.sleep(1.0)
        c0, t0 = cpu(), time.monotonic()
        await asyncio.sleep(seconds)
        out["idle_cpu_percent"] = round(100 * (cpu() - c0) / (time.monotonic() - t0), 2)
        c0 = cpu()
        await asyncio.to_thread(source._scan, None)
        full = cpu() - c0
        out["full_rescan_ms"] = round(1000 * full, 1)
        out["full_rescan_cpu_percent"] = round(100 * full / source.full_rescan_interval, 2)
        c0, t0 = cpu(), time.monotonic()
        rewrites = int(10 / 0.05)
        for n in range(rewrites):
            tmp = directory / ".tmp"
            tmp.write_text(svc(n % files, 80 + n % 2 + 1))
            os.replace(tmp, directory / f"s{n % files:05}.json")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        out["rewrite_20hz_cpu_percent"] = round(100 * (cpu() - c0) / (time.monotonic() - t0), 1)
        out["rewrite_changes_seen"] = len(changes)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return out

    with tempfile.TemporaryDirectory(prefix="pxd-idle-") as tmp:
        return asyncio.run(main(Path(tmp)))


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (and SIGINT, even when started in the background) unwind through
    # the topology's teardown: no namespace or process is left behind.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--modes", default="userspace,iptables",
                        type=lambda s: [m for m in s.split(",") if m])
    parser.add_argument("--formats", default="yaml,json", type=lambda s: [f for f in s.split(",") if f])
    parser.add_argument("--api", action="store_true", help="also through the fake API server")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--idle-files", type=int, default=0)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", action="store_true",
                        help="also write bench/results/e2e_scale-N.json with the run's metadata")
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    run = runmeta.Run(runmeta.module_command("bench.e2e_scale", raw))
    results: list[dict[str, Any]] = []
    if args.idle_files:
        point = idle(args.idle_files, args.idle_seconds)
        point["load"] = load()
        print(json.dumps(point), file=sys.stderr)
        results.append(point)
    else:
        why = netns_available()
        if why:
            print(f"e2e_scale: {why}", file=sys.stderr)
            return 2
        sources = [f"manifests-{f}" for f in args.formats] + (["api"] if args.api else [])
        for mode in args.modes:
            for source in sources:
                print(f"[e2e_scale {time.strftime('%H:%M:%S')}] {mode} {source} "
                      f"{args.services}x{args.endpoints} ({load()})", file=sys.stderr, flush=True)
                before = runmeta.load_average()
                point = run_case(mode=mode, source=source, services=args.services, endpoints=args.endpoints,
                                 samples=args.samples, changes=args.changes)
                point["load"] = load()
                point["load_before"], point["load_after"] = before, runmeta.load_average()
                results.append(point)
                shown = {k: v for k, v in point.items() if k not in ("log",)}
                print(f"  {json.dumps(shown)}", file=sys.stderr, flush=True)
                if "log" in point:
                    print(point["log"], file=sys.stderr)
    if args.save:
        name = "e2e_scale-idle" if args.idle_files else f"e2e_scale-{args.services}"
        saved = run.save(name, {"services": args.services, "endpoints": args.endpoints,
                                "points": [{k: v for k, v in p.items() if k != "log"} for p in results]})
        print(f"saved {saved}", file=sys.stderr)
    if args.json:
        print(json.dumps({"points": results}))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
