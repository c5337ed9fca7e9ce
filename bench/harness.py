"""``python -m bench``: one run that compares every proxy mode with HAProxy and the direct path.

Steps, all inside network namespaces made for the run (nothing leaves the
machine; ``netnstopo.topology`` builds and removes them):

1. topology: client, node (the proxy's home), three backend pods on routed
   veths; nginx (1 KiB file) in every pod, an iperf3 server in the first,
   greeting servers in the first two; HAProxy in the node namespace;
   manifests for proxyd (``paths.py`` names the service addresses);
2. data path: ``rounds`` rounds; each round runs every path (in a rotated
   order, so drift does not favour one path) through bulk, keep-alive and
   new-connection load (``dataplane.py``); proxyd modes are started for
   their turn and stopped after it;
   with userspace, two more paths: HAProxy with two threads and proxyd's
   engine with two workers, both unpinned (issue 15's multi-core case);
   each path with an IPv6 twin (``paths.HAS_IPV6``) is then measured over
   IPv6 too, bulk and new connections, as ``<path>-ipv6`` (issue 16);
   then the memory per idle established connection, ``idle_held``
   connections held through proxyd and through HAProxy (``idlemem.py``);
3. network-programming latency per available mode (``programming.py``);
4. sync time vs service count per mode (``sync_scale.py``, one subprocess
   per point);
5. JSON with every raw sample, Markdown (``report.py``) and PNG plots
   (``plots.py``) under ``bench/results/``; each target printed met / not met.

Pinning: load generator and backends on CPU 0, proxies on CPU 1. Every
wait has a timeout, every loop a bound, and the run has a time budget after
which no new round starts. Ctrl-C and SIGTERM unwind through the topology's
teardown, which kills every process and deletes every namespace.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from bench import dataplane, idlemem, paths, plots, programming, report, sync_scale
from bench.servers import (
    HTTP_PORT,
    IPERF_PORT,
    start_haproxy,
    start_hold_server,
    start_iperf3,
    start_nginx,
)
from netnstopo.topology import (
    NODE_IP,
    NODE_IP6,
    Topology,
    endpoint,
    endpoint_slice,
    netns_available,
    port,
    service,
)

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("userspace", "iptables", "ipvs", "nftables")
PROG_PORT = programming.PROG_PORT
NEEDED_TOOLS = ("iperf3", "wrk", "haproxy", "nginx", "taskset", "ss", "ip")


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int
    seconds: int  # per load-generator run (wrk takes whole seconds only)
    connections: int  # wrk connections
    sync_services: tuple[int, ...]
    programming_samples: int
    data_budget: float  # seconds into the run after which no new data-path round starts
    total_budget: float  # seconds into the run after which no sync-scale point starts or runs on
    idle_held: int = idlemem.HELD  # idle connections held for the memory measurement


# data_budget: the full run's five rounds (about 160 s each with the IPv6 and two-core paths) fit, so
# every median is over five samples; total_budget: room after them for the 1k-service sync points.
QUICK = Plan(rounds=2, seconds=1, connections=16, sync_services=(1000,), programming_samples=3,
             data_budget=60.0, total_budget=135.0, idle_held=2000)
FULL = Plan(rounds=5, seconds=5, connections=16, sync_services=(1000, 10000, 30000), programming_samples=10,
            data_budget=900.0, total_budget=1260.0)


def overridden(plan: Plan, *, rounds: int | None, seconds: int | None) -> Plan:
    """``plan`` with ``--rounds`` / ``--seconds`` applied. More or longer rounds than the plan's widen its
    time budgets in proportion, so that asking for nine rounds gets nine, not the six the budget of five
    would allow; fewer or shorter ones keep them."""
    new_rounds, new_seconds = rounds or plan.rounds, seconds or plan.seconds
    factor = max(1.0, new_rounds / plan.rounds) * max(1.0, new_seconds / plan.seconds)
    data_budget = plan.data_budget * factor
    return replace(plan, rounds=new_rounds, seconds=new_seconds, data_budget=data_budget,
                   total_budget=plan.total_budget + data_budget - plan.data_budget)


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def manifests(topo: Topology) -> None:
    """Services for proxyd: HTTP over every pod's nginx, bulk to the iperf3 pod."""
    pods = topo.pod_list
    http_port = [port(HTTP_PORT, name="http", target_port=HTTP_PORT)]
    bulk_port = [port(IPERF_PORT, name="iperf", target_port=IPERF_PORT)]
    topo.write_manifest("bench-http.yaml", [
        service("bench-http", cluster_ip=paths.HTTP_VIP, ports=http_port),
        endpoint_slice("bench-http", ports=[{"name": "http", "port": HTTP_PORT}],
                       endpoints=[endpoint(p.ip) for p in pods])])
    topo.write_manifest("bench-bulk.yaml", [
        service("bench-bulk", cluster_ip=paths.BULK_VIP, ports=bulk_port),
        endpoint_slice("bench-bulk", ports=[{"name": "iperf", "port": IPERF_PORT}],
                       endpoints=[endpoint(pods[0].ip)])])
    # Single-stack IPv6 twins of both (issue 16): what the ``-ipv6`` paths measure.
    topo.write_manifest("bench-http6.yaml", [
        service("bench-http6", cluster_ip=paths.HTTP_VIP6, cluster_ips=[paths.HTTP_VIP6], ports=http_port),
        endpoint_slice("bench-http6", ports=[{"name": "http", "port": HTTP_PORT}], address_type="IPv6",
                       endpoints=[endpoint(p.ip6) for p in pods])])
    topo.write_manifest("bench-bulk6.yaml", [
        service("bench-bulk6", cluster_ip=paths.BULK_VIP6, cluster_ips=[paths.BULK_VIP6], ports=bulk_port),
        endpoint_slice("bench-bulk6", ports=[{"name": "iperf", "port": IPERF_PORT}], address_type="IPv6",
                       endpoints=[endpoint(pods[0].ip6)])])
    topo.write_manifest(programming.FILENAME, programming.manifest(pods[0]))
    idlemem.write_hold_manifest(topo)


def setup(topo: Topology) -> tuple[Any, Any]:
    """Backends, both HAProxies (one thread pinned; two threads unpinned), sysctls and manifests."""
    for ns in (topo.client, topo.node, *(p.ns for p in topo.pod_list)):
        # Tens of thousands of short connections per run: allow TIME_WAIT reuse and a wide port range.
        topo.sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65000")
        topo.sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")
        topo.sysctl(ns, "net.core.somaxconn", "4096")
    for pod in topo.pod_list:
        # nginx closes first, so TIME_WAIT sits in the pods. Behind a masquerading kernel mode, one client's
        # connections all come from the node IP with ports the NAT picks at random; a SYN that lands on a
        # TIME_WAIT entry with an unrelated sequence number is answered with an ACK, reset, and retried
        # after the 1 s SYN timeout, so the measurement would be of that artefact of a single load
        # generator, not of the proxy. Without TIME_WAIT in the backends every path is treated alike.
        topo.sysctl(pod.ns, "net.ipv4.tcp_max_tw_buckets", "0")
    work = topo.manifests.parent / "bench"
    for pod in topo.pod_list:
        start_nginx(topo, pod, workdir=work / f"nginx-{pod.name}")
    start_iperf3(topo, topo.pod_list[0])
    for pod in topo.pod_list[:2]:
        topo.start_tcp_server(pod, PROG_PORT)
    start_hold_server(topo, topo.pod_list[0])
    manifests(topo)
    one = start_haproxy(topo, workdir=work / "haproxy", listeners=[
        (NODE_IP, paths.HAPROXY_HTTP_PORT, [(p.ip, HTTP_PORT) for p in topo.pod_list]),
        (NODE_IP, paths.HAPROXY_BULK_PORT, [(topo.pod_list[0].ip, IPERF_PORT)]),
        # the IPv6 anchor: the same process and ports on the node's IPv6 address, to the pods' IPv6 addresses
        (NODE_IP6, paths.HAPROXY_HTTP_PORT, [(p.ip6, HTTP_PORT) for p in topo.pod_list]),
        (NODE_IP6, paths.HAPROXY_BULK_PORT, [(topo.pod_list[0].ip6, IPERF_PORT)]),
    ])
    two = start_haproxy(topo, workdir=work / "haproxy-2t", nbthread=2, pin=False, listeners=[
        (NODE_IP, paths.HAPROXY2_HTTP_PORT, [(p.ip, HTTP_PORT) for p in topo.pod_list]),
        (NODE_IP, paths.HAPROXY2_BULK_PORT, [(topo.pod_list[0].ip, IPERF_PORT)]),
    ])
    return one, two


def measure_path(topo: Topology, *, name: str, running: paths.Running, plan: Plan, round_: int,
                 script: Path, metrics: Sequence[str] = ("bulk", "keepalive", "newconn"),
                 ) -> list[dict[str, Any]]:
    ends = running.endpoints
    runs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("bulk", lambda: dataplane.bulk(topo, target=ends.bulk, seconds=plan.seconds, meter=running.meter)),
        ("keepalive", lambda: dataplane.http(topo, target=ends.http, seconds=plan.seconds,
                                             connections=plan.connections, close=False, meter=running.meter,
                                             script=script)),
        ("newconn", lambda: dataplane.http(topo, target=ends.http, seconds=plan.seconds,
                                           connections=plan.connections, close=True, meter=running.meter,
                                           script=script)),
    ]
    samples = []
    for metric, fn in runs:
        if metric not in metrics:
            continue
        try:
            measured = fn()
        except OSError as err:  # e.g. the metered proxy died: /proc/<pid>/stat is gone
            measured = {"metric": metric, "error": f"{type(err).__name__}: {err}"}
        sample = {"round": round_, "path": name, **measured, "meter": running.meter.describe()}
        if sample.get("error"):
            _log(f"  {name} {metric}: FAILED {sample['error'][:200]}")
        samples.append(sample)
    return samples


def data_path(topo: Topology, haproxy_proc: Any, *, plan: Plan, modes: Sequence[str],
              results: dict[str, Any], started: float, haproxy2_proc: Any = None) -> None:
    script = dataplane.write_wrk_script(topo.manifests.parent)
    proxyd = {f"proxyd-{m}": paths.ProxydPath(topo, m) for m in modes}
    order = ["direct", "haproxy", *proxyd]
    if "userspace" in modes and haproxy2_proc is not None:
        proxyd[paths.USERSPACE_2W] = paths.ProxydPath(topo, "userspace", workers=2)
        order += [paths.HAPROXY2, paths.USERSPACE_2W]
        if "proxyd-userspace" in results["skipped"]:
            results["skipped"][paths.USERSPACE_2W] = results["skipped"]["proxyd-userspace"]
    results["paths"] = [*order, *(f"{p}{paths.IPV6}" for p in order if p in paths.HAS_IPV6)]
    for name in order:
        if name in paths.HAS_IPV6 and name in results["skipped"]:
            results["skipped"][f"{name}{paths.IPV6}"] = results["skipped"][name]
    for round_ in range(plan.rounds):
        if time.monotonic() - started > plan.data_budget:
            results["notes"].append(f"time budget {plan.data_budget:.0f}s reached: "
                                    f"stopped after {round_} rounds")
            break
        shift = round_ % len(order)
        for name in order[shift:] + order[:shift]:
            if name in results["skipped"]:
                continue
            _log(f"round {round_ + 1}/{plan.rounds}: {name}")
            if name == "direct":
                running = paths.direct(topo)
            elif name == "haproxy":
                running = paths.haproxy(haproxy_proc)
            elif name == paths.HAPROXY2:
                running = paths.haproxy2(haproxy2_proc)
            else:
                try:
                    running = proxyd[name].start()
                except RuntimeError as err:
                    results["skipped"][name] = f"proxyd did not come up: {str(err)[-800:]}"
                    _log(f"  {name}: skipped: {str(err)[-300:]}")
                    proxyd[name].stop()
                    continue
            try:
                results["samples"] += measure_path(topo, name=name, running=running, plan=plan,
                                                   round_=round_, script=script)
                if name in paths.HAS_IPV6:
                    results["samples"] += measure_ipv6(topo, name=name, plan=plan, round_=round_,
                                                       script=script, haproxy_proc=haproxy_proc,
                                                       proxyd=proxyd.get(name), results=results)
            finally:
                if name in proxyd:
                    note = proxyd[name].stop()
                    if note:
                        results["notes"].append(f"round {round_} {name}: {note}")


def measure_ipv6(topo: Topology, *, name: str, plan: Plan, round_: int, script: Path, haproxy_proc: Any,
                 proxyd: paths.ProxydPath | None, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The IPv6 twin of path ``name`` in the same turn: bulk and new connections (issue 16)."""
    name6 = f"{name}{paths.IPV6}"
    if name6 in results["skipped"]:
        return []
    if name == "direct":
        running = paths.direct(topo, 6)
    elif name == "haproxy":
        running = paths.haproxy(haproxy_proc, 6)
    else:
        assert proxyd is not None
        try:
            running = proxyd.running6()
        except RuntimeError as err:
            # A mode without IPv6 yet: its IPv6 services never accept. Said once, not retried each round.
            results["skipped"][name6] = f"IPv6 services not served: {str(err)[-300:]}"
            _log(f"  {name6}: skipped: {str(err)[-200:]}")
            return []
    _log(f"round {round_ + 1}/{plan.rounds}: {name6}")
    return measure_path(topo, name=name6, running=running, plan=plan, round_=round_, script=script,
                        metrics=("bulk", "newconn"))


def idle_memory(topo: Topology, *, plan: Plan, modes: Sequence[str], results: dict[str, Any]) -> None:
    """Memory per idle established connection through proxyd (userspace) and through HAProxy."""
    if "userspace" not in modes or "proxyd-userspace" in results["skipped"]:
        return
    out = results.setdefault("memory", {})
    _log(f"memory per idle connection: {plan.idle_held} held through proxyd-userspace")
    out["proxyd-userspace"] = idlemem.through_proxyd(topo, held=plan.idle_held, log=_log)
    _log(f"memory per idle connection: {idlemem.possible(plan.idle_held)} held through haproxy")
    out["haproxy"] = idlemem.through_haproxy(topo, held=plan.idle_held, log=_log)


def programming_latency(topo: Topology, *, plan: Plan, modes: Sequence[str],
                        results: dict[str, Any]) -> None:
    out = results["control"].setdefault("programming", {})
    for mode in modes:
        name = f"proxyd-{mode}"
        if name in results["skipped"]:
            out[mode] = {"seconds": [], "skipped": results["skipped"][name]}
            continue
        _log(f"network programming latency: {mode}")
        path = paths.ProxydPath(topo, mode)
        try:
            path.start()
            out[mode] = programming.measure(topo, pods=topo.pod_list[:2], samples=plan.programming_samples)
        except RuntimeError as err:
            out[mode] = {"seconds": [], "error": str(err)[-500:]}
        finally:
            path.stop()


def meta(plan: Plan, quick: bool) -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "run": "quick" if quick else "full",
            "kernel": platform.release(), "cpu": f"{cpu_model} × {os.cpu_count()}",
            "rounds": plan.rounds, "seconds per run": plan.seconds, "wrk connections": plan.connections,
            "pinning": "load+backends CPU 0, proxy CPU 1",
            # The machines are shared: a high load average means noisy numbers.
            "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def write_outputs(results: dict[str, Any], *, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    written.append(json_path)
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(report.markdown(results))
    written.append(md_path)
    try:
        for maker, suffix in ((plots.dataplane, "dataplane"), (plots.control, "control")):
            made = maker(results, out_dir / f"{stem}-{suffix}.png")
            if made:
                written.append(made)
    except ImportError as err:
        _log(f"plots skipped: matplotlib missing ({err}); pip install -e '.[bench]'")
    return written


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke: 2 short rounds, 1k services (about 2 min)")
    parser.add_argument("--modes", default=",".join(MODES), help="proxyd modes to include (comma separated)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--seconds", type=int, help="override whole seconds per load-generator run")
    parser.add_argument("--no-sync-scale", action="store_true", help="skip the control-plane scale runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"output directory (default {RESULTS})")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.rounds is not None and not 1 <= args.rounds <= 50:
        parser.error("--rounds must be 1..50")
    if args.seconds is not None and not 1 <= args.seconds <= 120:
        parser.error("--seconds must be 1..120")
    args.modes = modes
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C so every ``finally`` and the topology's teardown run.
    raise KeyboardInterrupt(f"signal {signum}")


def unwind_on_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so the topology's teardown removes every process and
    namespace; SIGINT too when started from a script with it ignored (``cmd &``)."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def cannot_run() -> str | None:
    """Why this machine cannot run the data-path benchmarks (`python -m bench`, `bench.paired`), or None."""
    problem = netns_available()
    missing = [t for t in NEEDED_TOOLS if shutil.which(t) is None]
    if problem or missing:
        return f"cannot run: {problem or 'missing tools: ' + ', '.join(missing)}"
    if (os.cpu_count() or 1) < 2:
        return "needs at least 2 CPUs (load on CPU 0, proxy on CPU 1)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problem = cannot_run()
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    plan = overridden(plan, rounds=args.rounds, seconds=args.seconds)
    unwind_on_signals()
    # Before any process starts (the hold server, proxyd, HAProxy inherit it): where this process may raise
    # its descriptor hard limit (the QEMU guest), the idle-memory case then holds all it was asked for.
    idlemem.raise_nofile(plan.idle_held)
    started = time.monotonic()
    results: dict[str, Any] = {"meta": meta(plan, args.quick), "plan": asdict(plan), "paths": [],
                               "skipped": {}, "cpu_notes": {}, "samples": [], "notes": [], "control": {}}
    for mode in args.modes:
        reason = paths.mode_missing(mode)
        if reason:
            results["skipped"][f"proxyd-{mode}"] = reason
            _log(f"proxyd-{mode}: skipped: {reason}")
    interrupted = False
    failure = ""
    try:
        with Topology(pods=3, pods2=0) as topo:
            _log(f"topology {topo.prefix} up; starting backends and HAProxy")
            haproxy_proc, haproxy2_proc = setup(topo)
            data_path(topo, haproxy_proc, plan=plan, modes=args.modes, results=results, started=started,
                      haproxy2_proc=haproxy2_proc)
            idle_memory(topo, plan=plan, modes=args.modes, results=results)
            programming_latency(topo, plan=plan, modes=args.modes, results=results)
        if not args.no_sync_scale:
            results["control"]["sync_scale"] = sync_scale.run_all(
                modes=args.modes, services=plan.sync_services, skipped=results["skipped"],
                deadline=started + plan.total_budget, log=_log)
    except KeyboardInterrupt:
        interrupted = True
        results["notes"].append("interrupted: partial results")
        _log("interrupted: namespaces and processes removed; writing partial results")
    except Exception as err:  # still write what was measured, then fail
        failure = f"{type(err).__name__}: {err}"
        results["notes"].append(f"run failed: {failure}")
        _log(f"run failed: {failure}; namespaces and processes removed; writing partial results")
    results["cpu_notes"] = {p: paths.CPU_NOTES[p] for p in results["paths"] if p in paths.CPU_NOTES}
    results["meta"]["elapsed"] = f"{time.monotonic() - started:.0f}s"
    results["meta"]["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    stem = "quick" if args.quick else "full"
    written = write_outputs(results, out_dir=args.out, stem=stem)
    print(report.markdown(results))
    print("Targets:")
    for line in report.verdict_lines(results):
        print(f"  {line}")
    print("Wrote: " + ", ".join(str(p) for p in written))
    if interrupted:
        return 130
    return 1 if failure else 0
