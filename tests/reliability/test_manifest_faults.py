"""Manifest-directory faults with the daemon running: what is in force stays, the log and metrics say why.

``tests/unit/test_manifests.py`` checks the source alone; here the real
daemon serves a service while its directory is abused, and a prober opens a
new connection every 20 ms the whole time, so "the rules in force stay" is
measured as zero failed connections. Each fault is then repaired and the
repair must apply by itself, without a restart. Faults: a file written in
two steps with a pause, atomic replaces in a burst, a 100 MB file, a FIFO, a
directory and a socket named like manifests, symlink loops, symlinks (and a
subdirectory) leading outside the directory the user named, hostile file
names in the log.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import yaml

from tests.netns.holder import holder_addresses
from tests.netns.topology import Topology, endpoint, endpoint_slice, port, service, wait_until
from tests.reliability.harness import healthz, metric_sum, rss_kib, start_daemon

CLUSTER_IP = "10.96.0.10"
POD_IPS = {"pod1": "10.244.1.11", "pod2": "10.244.1.12"}


def web(pod: str, *, name: str = "web", cluster_ip: str = CLUSTER_IP) -> list[dict]:
    return [service(name, cluster_ip=cluster_ip, ports=[port(80, target_port=8080)]),
            endpoint_slice(name, ports=[{"port": 8080}], endpoints=[endpoint(POD_IPS[pod])])]


def text(docs: list[dict]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)



def rejected(topo: Topology, reason: str | None = None) -> float:
    return metric_sum(topo, "proxyd_rejected_objects_total", {"reason": reason} if reason else None)


class Prober(threading.Thread):
    """A new connection to ``web`` every 20 ms from pod3; which pod answered, and every failure."""

    def __init__(self, topo: Topology) -> None:
        super().__init__(daemon=True)
        self.topo = topo
        self.seen: list[str] = []
        self.failed: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        ns = self.topo.pod("pod3").ns
        # Ends by itself once the topology is gone, should the test fail before stop().
        while not self._halt.is_set() and os.path.exists(f"/run/netns/{ns}"):
            try:
                # 10 s: a lost connection hangs or is refused; a slow one on a busy machine is not lost.
                self.seen.append(self.topo.hello(ns, CLUSTER_IP, 80, timeout=10).pod)
            except OSError as err:
                self.failed.append(repr(err))
            self._halt.wait(0.02)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def serving(topo: Topology, figures: dict) -> tuple[object, Prober]:
    topo.start_servers(tcp=POD_IPS)
    topo.write_manifest("web.yaml", web("pod1"))
    proc = start_daemon(topo, "userspace")
    prober = Prober(topo)
    prober.start()
    wait_until(lambda: prober.seen, timeout=CHANGE_WAIT, what="first probe")
    return proc, prober


def finish(topo: Topology, proc: object, prober: Prober, figures: dict) -> None:
    prober.stop()
    figures.update(probes_ok=len(prober.seen), probes_failed=len(prober.failed))
    assert proc.poll() is None, topo.log_of(proc)[-2000:]  # type: ignore[attr-defined]
    assert healthz(topo) == 200
    assert not prober.failed, f"{len(prober.failed)} connections failed: {prober.failed[:3]}"


# Waits for a change to take effect: far beyond the product's own delays (1 s minimum sync
# period, the periodic rescan), because a busy machine stretches every one of them.
CHANGE_WAIT = 30.0


def becomes(topo: Topology, ip: str, pod: str, *, timeout: float = CHANGE_WAIT) -> None:
    ns = topo.pod("pod3").ns
    wait_until(lambda: topo.hello(ns, ip, 80, timeout=1).pod == pod, timeout=timeout,
               what=f"{ip} served by {pod}")


def half_of(docs: list[dict], ip: str) -> tuple[bytes, bytes]:
    """The document cut inside the endpoint address, so that the first half does not parse."""
    full = text(docs)
    cut = full.index(ip) + 5
    # A bare "- 10.24" would parse (as the wrong address); an open quote does not.
    first = full[:cut].replace(f"- {ip[:5]}", f"- '{ip[:5]}")
    rest = full[cut:].replace(ip[5:], ip[5:] + "'", 1)
    return first.encode(), rest.encode()


def test_partial_write_keeps_last_good_content(topology: Topology, figures: dict) -> None:
    proc, prober = serving(topology, figures)
    path = topology.manifests / "web.yaml"

    # Two steps with a pause, closing in between (`cat a > f; sleep; cat b >> f`).
    before = rejected(topology, "parse")
    first, rest = half_of(web("pod2"), POD_IPS["pod2"])
    path.write_bytes(first)
    wait_until(lambda: rejected(topology, "parse") > before, timeout=CHANGE_WAIT,
               what="parse rejection counted")
    time.sleep(1)
    assert set(prober.seen[-20:]) == {"pod1"}, "the last good content did not stay in force"
    with open(path, "ab") as out:
        out.write(rest)
    becomes(topology, CLUSTER_IP, "pod2")

    # A writer that stalls with the file open: seen by the periodic rescan, not applied.
    before = rejected(topology, "parse")
    first, rest = half_of(web("pod1"), POD_IPS["pod1"])
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, first)
        wait_until(lambda: rejected(topology, "parse") > before, timeout=CHANGE_WAIT,
                   what="rescan saw the half file")
        assert set(prober.seen[-20:]) == {"pod2"}, "the last good content did not stay in force"
        os.write(fd, rest)
    finally:
        os.close(fd)
    becomes(topology, CLUSTER_IP, "pod1")
    assert "web.yaml: does not parse" in topology.log_of(proc)  # type: ignore[arg-type]
    figures["partial_writes"] = 2
    finish(topology, proc, prober, figures)


def test_atomic_replace_burst_never_drops_a_connection(topology: Topology, figures: dict) -> None:
    proc, prober = serving(topology, figures)
    replaces = 60
    for i in range(replaces):
        topology.write_manifest("web.yaml", web("pod2" if i % 2 == 0 else "pod1"))
        time.sleep(0.05)
    # The burst ends on pod1: wait until the daemon has applied it (a busy daemon may coalesce the
    # burst and read the file only after the broken version replaced it, which would leave the
    # version before in force: the race is in the test, not the product).
    becomes(topology, CLUSTER_IP, "pod1")
    # A broken file renamed over the good one: the last good content stays.
    before = rejected(topology, "parse")
    topology.write_manifest("web.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web\n")
    wait_until(lambda: rejected(topology, "parse") > before, timeout=CHANGE_WAIT, what="broken file refused")
    seen = len(prober.seen)
    wait_until(lambda: len(prober.seen) >= seen + 10, timeout=CHANGE_WAIT, what="probes after the refusal")
    assert set(prober.seen[seen:]) == {"pod1"}, "the last good content did not stay in force"
    topology.write_manifest("web.yaml", web("pod2"))
    becomes(topology, CLUSTER_IP, "pod2")
    figures["replaces"] = replaces + 2
    finish(topology, proc, prober, figures)


def test_huge_file_is_refused_without_reading_it(topology: Topology, figures: dict) -> None:
    proc, prober = serving(topology, figures)
    pid = proc.pid  # type: ignore[attr-defined]
    rss_before = rss_kib(pid)
    before = rejected(topology, "too_large")
    huge = topology.manifests / "huge.yaml"
    line = b"# padding padding padding padding padding padding padding padding padding padding\n"
    with open(huge, "wb") as out:
        for _ in range(100 * 1024 * 1024 // len(line) + 1):
            out.write(line)
    size = huge.stat().st_size
    wait_until(lambda: rejected(topology, "too_large") > before, timeout=CHANGE_WAIT,
               what="too_large counted")
    # The source is not stuck: another file still applies.
    topology.write_manifest("other.yaml", web("pod2", name="other", cluster_ip="10.96.0.11"))
    becomes(topology, "10.96.0.11", "pod2")
    rss_after = rss_kib(pid)
    assert rss_after - rss_before < 32 * 1024, f"VmRSS {rss_before} -> {rss_after} KiB"
    assert "huge.yaml: too large" in topology.log_of(proc)  # type: ignore[arg-type]
    # Repaired: the same name with sane content applies.
    topology.write_manifest("huge.yaml", web("pod1", name="fixed", cluster_ip="10.96.0.12"))
    becomes(topology, "10.96.0.12", "pod1")
    figures.update(huge_bytes=size, rss_kib_before=rss_before, rss_kib_after=rss_after)
    finish(topology, proc, prober, figures)


def test_fifo_directory_and_socket_named_yaml_are_skipped(topology: Topology, figures: dict) -> None:
    proc, prober = serving(topology, figures)
    before = rejected(topology, "not_regular")
    os.mkfifo(topology.manifests / "fifo.yaml")  # nobody writes: opening it must not hang
    (topology.manifests / "dir.yaml").mkdir()
    (topology.manifests / "dir.yaml" / "inner.yaml").write_text(text(web("pod2", name="inner",
                                                                         cluster_ip="10.96.0.13")))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(topology.manifests / "sock.yaml"))
    try:
        wait_until(lambda: rejected(topology, "not_regular") >= before + 3, timeout=CHANGE_WAIT,
                   what="three entries rejected as not regular")
        topology.write_manifest("other.yaml", web("pod2", name="other", cluster_ip="10.96.0.11"))
        becomes(topology, "10.96.0.11", "pod2")
        # Nothing from inside the directory named dir.yaml (no recursion).
        assert "10.96.0.13" not in holder_addresses(topology)
        log = topology.log_of(proc)  # type: ignore[arg-type]
        for name in ("fifo.yaml", "dir.yaml", "sock.yaml"):
            assert f"manifests {name}: not a regular file" in log, name
        # Repaired: the FIFO becomes a file.
        (topology.manifests / "fifo.yaml").unlink()
        topology.write_manifest("fifo.yaml", web("pod1", name="fixed", cluster_ip="10.96.0.12"))
        becomes(topology, "10.96.0.12", "pod1")
    finally:
        sock.close()
    finish(topology, proc, prober, figures)


def test_symlink_loops_and_escapes_are_refused(topology: Topology, figures: dict) -> None:
    outside = topology.manifests.parent / "outside"
    outside.mkdir()
    (outside / "secret.yaml").write_text(text(web("pod2", name="secret", cluster_ip="10.96.0.99")))
    proc, prober = serving(topology, figures)
    loops_before, out_before = rejected(topology, "unreadable"), rejected(topology, "outside_dir")
    d = topology.manifests
    os.symlink("b.yaml", d / "a.yaml")
    os.symlink("a.yaml", d / "b.yaml")
    os.symlink("self.yaml", d / "self.yaml")
    os.symlink(outside / "secret.yaml", d / "absolute.yaml")
    os.symlink("../outside/secret.yaml", d / "relative.yaml")
    os.symlink("/etc/shadow", d / "shadow.yaml")
    wait_until(lambda: rejected(topology, "unreadable") >= loops_before + 3, timeout=CHANGE_WAIT,
               what="loops rejected")
    wait_until(lambda: rejected(topology, "outside_dir") >= out_before + 3, timeout=CHANGE_WAIT,
               what="escapes rejected")
    time.sleep(0.5)
    assert "10.96.0.99" not in holder_addresses(topology), "a manifest outside the directory was served"
    log = topology.log_of(proc)  # type: ignore[arg-type]
    assert "a.yaml: symlink loop" in log and "self.yaml: symlink loop" in log
    assert "shadow.yaml: symlink points outside the directory" in log
    assert "root:" not in log, "content of a file outside the directory reached the log"
    # Repaired: the loop is replaced by a file.
    (d / "a.yaml").unlink()
    topology.write_manifest("a.yaml", web("pod1", name="fixed", cluster_ip="10.96.0.12"))
    becomes(topology, "10.96.0.12", "pod1")
    # Measured, not written down: what the daemon itself counted.
    figures["escapes_refused"] = int(rejected(topology, "outside_dir") - out_before)
    figures["loops_refused"] = int(rejected(topology, "unreadable") - loops_before)
    finish(topology, proc, prober, figures)


def test_manifests_dir_given_as_symlink_and_hostile_names(topology: Topology, figures: dict) -> None:
    """The directory the user named may itself be a symlink; names in the log stay one escaped line."""
    topology.start_servers(tcp=POD_IPS)
    link = topology.manifests.parent / "link-to-manifests"
    os.symlink(topology.manifests, link)
    topology.write_manifest("web.yaml", web("pod1"))
    proc = start_daemon(topology, "userspace", manifests=Path(link))
    becomes(topology, CLUSTER_IP, "pod1")
    hostile = "evil\n2099-01-01 00:00:00 E proxyd.daemon: FORGED\x1b[31m.yaml"
    (topology.manifests / hostile).write_text("kind: [unclosed\n")
    wait_until(lambda: "FORGED" in topology.log_of(proc), timeout=CHANGE_WAIT, what="hostile name logged")
    log = topology.log_of(proc)
    assert "\x1b" not in log, "a raw escape sequence reached the log"
    assert not any(line.startswith("2099-01-01") for line in log.splitlines()), "a forged log line"
    topology.write_manifest("web.yaml", web("pod2"))
    becomes(topology, CLUSTER_IP, "pod2")
    assert proc.poll() is None and healthz(topology) == 200
    figures["hostile_names"] = 1
