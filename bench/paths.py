"""The paths under comparison and how each is brought up, metered and torn down.

* ``direct`` — client → backend pod, routed by the node namespace, no proxy;
  its "proxy CPU" is the busy time of the proxy CPU (an idle reference).
* ``haproxy`` — HAProxy in the node namespace (started once for the run).
* ``proxyd-<mode>`` — the real daemon (``proxyd --proxy-mode M --manifests DIR``)
  started in the node namespace for its turn in each round and stopped after
  it, then ``proxyd --cleanup``: only one mode programs the node at a time.
* ``haproxy-2t`` and ``proxyd-userspace-2w`` — HAProxy with two threads and
  proxyd's engine with two workers, both unpinned (the same two CPUs the
  load generator and backends use): the multi-core case of issue 15.
* ``<path>-ipv6`` — the same path over IPv6 (issue 16), measured right
  after the IPv4 path in the same turn (same daemon, same HAProxy): the
  client's IPv6 address to the pods' IPv6 addresses (``direct-ipv6``), to
  HAProxy on the node's IPv6 address, or to single-stack IPv6 services
  (``HTTP_VIP6``, ``BULK_VIP6``) through proxyd; compared with
  ``direct-ipv6``. A mode that does not serve IPv6 yet has its IPv6 path
  skipped with the reason (its IPv6 service does not accept).

The daemon is pinned to the proxy CPU by pinning the calling thread while
it is spawned (affinity is inherited across fork and exec, so every thread
the daemon ever starts is on that CPU), then restoring the thread.

A mode is skipped, with the reason detected now, when its code cannot be
imported or the kernel lacks what it needs (IPVS), or when the daemon does
not come up healthy (the reason then carries the tail of its log).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.dataplane import Endpoints
from bench.measure import CpuMeter
from bench.servers import HTTP_PORT, IPERF_PORT, PROXY_CPU, wait_tcp
from netnstopo.topology import NODE_IP, NODE_IP6, Topology, run

HTTP_VIP = "10.96.0.10"
BULK_VIP = "10.96.0.11"
HAPROXY_HTTP_PORT = 8080
HAPROXY_BULK_PORT = 5202
HAPROXY2_HTTP_PORT = 8081
HAPROXY2_BULK_PORT = 5203
HAPROXY2 = "haproxy-2t"
HAPROXY_HOLD_PORT = 9101
HOLD_VIP = "10.96.0.13"
USERSPACE_2W = "proxyd-userspace-2w"
HTTP_VIP6 = "fd00:10:96::10"
BULK_VIP6 = "fd00:10:96::11"
IPV6 = "-ipv6"  # suffix of a path's IPv6 twin
# Paths with an IPv6 twin (the two-core variants have none: they are about cores, not families).
KERNEL_MODES = ("iptables", "ipvs", "nftables")
HAS_IPV6 = ("direct", "haproxy", "proxyd-userspace", *(f"proxyd-{m}" for m in KERNEL_MODES))

CPU_NOTES = {
    "direct": f"no proxy: busy time of CPU {PROXY_CPU} (the proxy CPU) from /proc/stat, an idle reference",
    "haproxy": "utime+stime of the haproxy process (/proc/<pid>/stat)",
    "proxyd-userspace": "utime+stime of the proxyd process, all threads (/proc/<pid>/stat)",
    HAPROXY2: "utime+stime of the two-thread haproxy process (/proc/<pid>/stat), unpinned",
    USERSPACE_2W: "utime+stime of proxyd with --userspace-workers 2, all threads, unpinned",
    "proxyd-iptables": f"kernel data path (softirq): busy time of CPU {PROXY_CPU} from /proc/stat, where "
                       "proxyd is pinned; forwarding softirq runs mostly on the sender's CPU, so this "
                       "undercounts",
    "proxyd-ipvs": f"kernel data path (softirq): busy time of CPU {PROXY_CPU} from /proc/stat",
    "proxyd-nftables": f"kernel data path (softirq): busy time of CPU {PROXY_CPU} from /proc/stat, as for "
                       "iptables",
}
CPU_NOTES.update({f"{p}{IPV6}": f"as {p}, over IPv6" for p in HAS_IPV6 if p in CPU_NOTES})


@dataclass(frozen=True, slots=True)
class Running:
    """A path ready for load: where to connect and what meters its proxy CPU."""

    endpoints: Endpoints
    meter: CpuMeter


def direct(topo: Topology, fam: int = 4) -> Running:
    ip = topo.pod_list[0].address(fam)
    return Running(Endpoints(http=(ip, HTTP_PORT), bulk=(ip, IPERF_PORT)), CpuMeter(cpu=PROXY_CPU))


def haproxy(proc: subprocess.Popen[str], fam: int = 4) -> Running:
    """HAProxy's listeners: on the node's IPv4 address, or (``fam`` 6) its IPv6 one, same ports."""
    ip = NODE_IP6 if fam == 6 else NODE_IP
    return Running(Endpoints(http=(ip, HAPROXY_HTTP_PORT), bulk=(ip, HAPROXY_BULK_PORT)),
                   CpuMeter(pid=proc.pid))


def haproxy2(proc: subprocess.Popen[str]) -> Running:
    return Running(Endpoints(http=(NODE_IP, HAPROXY2_HTTP_PORT), bulk=(NODE_IP, HAPROXY2_BULK_PORT)),
                   CpuMeter(pid=proc.pid))


def ipvs_missing() -> str | None:
    """Why this kernel cannot do IPVS, or None when it can (checked now, not assumed)."""
    if Path("/proc/net/ip_vs").exists():
        return None
    try:
        probe = run(["modprobe", "-n", "-v", "ip_vs"], timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"kernel lacks IP_VS: /proc/net/ip_vs absent and modprobe failed ({err})"
    if probe.returncode != 0:
        detail = (probe.stderr or probe.stdout).strip().splitlines()
        said = detail[-1] if detail else f"exit {probe.returncode}"
        return f"kernel lacks IP_VS: /proc/net/ip_vs absent; modprobe -n ip_vs: {said}"
    loaded = run(["modprobe", "ip_vs"], timeout=20, check=False)
    if loaded.returncode != 0 or not Path("/proc/net/ip_vs").exists():
        return f"kernel lacks IP_VS: modprobe ip_vs failed: {loaded.stderr.strip()[-200:]}"
    return None


def mode_missing(mode: str) -> str | None:
    """Why ``proxyd --proxy-mode mode`` cannot be benchmarked here, or None."""
    exe = Path(sys.executable).parent / "proxyd"
    if not exe.exists():
        return f"no proxyd console script at {exe}"
    try:
        from proxyd.modes.base import mode_class

        mode_class(mode)
    except Exception as err:
        return f"proxyd mode {mode} not importable: {type(err).__name__}: {err}"
    if mode == "ipvs":
        return ipvs_missing()
    return None


@contextlib.contextmanager
def _thread_pinned(cpu: int) -> Iterator[None]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class ProxydPath:
    """One proxyd mode: ``start()`` → Running, ``stop()``; failures raise RuntimeError with the reason."""

    def __init__(self, topo: Topology, mode: str, *, env: Mapping[str, str] | None = None,
                 workers: int | None = None, start_timeout: float = 20.0,
                 ready: tuple[str, int] = (HTTP_VIP, HTTP_PORT)) -> None:
        self.topo, self.mode, self.env = topo, mode, env
        # start_timeout: healthy within it (more in the emulated guest); ready: the service that must accept
        self.start_timeout, self.ready = start_timeout, ready
        self.name = f"proxyd-{mode}" if workers is None else f"proxyd-{mode}-{workers}w"
        # workers given: the engine's worker count, and the daemon is not pinned (the multi-core case)
        self.workers = workers
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Running:
        extra = () if self.workers is None else ("--userspace-workers", str(self.workers))
        with _thread_pinned(PROXY_CPU) if self.workers is None else contextlib.nullcontext():
            try:
                self.proc = self.topo.start_proxyd(self.mode, extra_args=extra, timeout=self.start_timeout,
                                                   env=self.env)
            except RuntimeError:
                # start_proxyd leaves an unhealthy daemon running: end it before anything else runs.
                self._kill_leftovers()
                raise
        try:
            wait_tcp(self.topo, self.topo.client, *self.ready, timeout=max(10.0, self.start_timeout / 2))
        except RuntimeError as err:
            log = self.topo.log_of(self.proc)[-1500:]
            self.stop()
            raise RuntimeError(f"{err}; proxyd log tail: {log}") from None
        return Running(Endpoints(http=(HTTP_VIP, HTTP_PORT), bulk=(BULK_VIP, IPERF_PORT)), self._meter())

    def _meter(self) -> CpuMeter:
        assert self.proc is not None
        return CpuMeter(cpu=PROXY_CPU) if self.mode in KERNEL_MODES else CpuMeter(pid=self.proc.pid)

    def running6(self) -> Running:
        """The started daemon's IPv6 services; RuntimeError when they do not accept (no IPv6 in the mode)."""
        assert self.proc is not None
        # The IPv4 service accepts already, so the first sync (both families' services) is done: a short wait.
        wait_tcp(self.topo, self.topo.client, HTTP_VIP6, HTTP_PORT, timeout=3.0)
        return Running(Endpoints(http=(HTTP_VIP6, HTTP_PORT), bulk=(BULK_VIP6, IPERF_PORT)), self._meter())

    def stop(self) -> str:
        """Stop the daemon and remove what it programmed; returns a note when something went wrong."""
        notes = []
        if self.proc is not None:
            code = self.topo.stop_proxyd(self.proc, timeout=max(15.0, self.start_timeout / 2))
            if code not in (0, -signal.SIGTERM):
                notes.append(f"proxyd exited {code} on SIGTERM: {self.topo.log_of(self.proc)[-500:]}")
            self.proc = None
        self._kill_leftovers()
        cleanup = self.topo.run_proxyd(["--cleanup", "--proxy-mode", self.mode],
                                       timeout=max(30.0, self.start_timeout))
        if cleanup.returncode != 0:
            notes.append(f"proxyd --cleanup -> {cleanup.returncode}: {cleanup.stderr.strip()[-300:]}")
        return "; ".join(notes)

    def _kill_leftovers(self) -> None:
        """SIGKILL daemons this run started (found by this topology's unique manifests path)."""
        marker = str(self.topo.manifests).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in argv and any(arg.endswith(b"proxyd") for arg in argv[:2]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
