"""Least privilege: what each mode needs, measured against the real daemon.

* As root with every capability but NET_ADMIN, NET_RAW and NET_BIND_SERVICE
  dropped from the bounding set (the DaemonSet's grant), each mode works.
* As a dedicated non-root user (uid 65534) holding only ambient capabilities
  (the systemd unit's way), each mode works with exactly the minimum measured
  for it: userspace NET_ADMIN + NET_BIND_SERVICE, iptables-nft NET_ADMIN,
  iptables-legacy NET_ADMIN + NET_RAW (and its lock file writable).
* userspace mode without NET_BIND_SERVICE cannot listen on service ports
  below 1024: /healthz names each such listener and
  ``proxyd_listen_failures{reason="permission"}`` counts them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns.topology import HEALTHZ, METRICS, endpoint, endpoint_slice, port, service, wait_until

PROXYD = str(Path(sys.executable).parent / "proxyd")
GRANTED = ("cap_net_admin", "cap_net_raw", "cap_net_bind_service")
GRANTED_BITS = (1 << 12) | (1 << 13) | (1 << 10)


def capsh_drop_list() -> str:
    printed = subprocess.run(["capsh", "--print"], capture_output=True, text=True, timeout=10).stdout
    bounding = re.search(r"^Bounding set =(.*)$", printed, re.M)
    assert bounding, printed
    return ",".join(cap for cap in bounding.group(1).split(",") if cap and cap not in GRANTED)


def effective_caps(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.M).group(1), 16)


@pytest.mark.parametrize("mode", ["userspace", "iptables", "nftables"])
def test_runs_with_only_granted_capabilities(topology, mode):
    if importlib.util.find_spec(f"proxyd.modes.{mode}") is None:
        pytest.skip(f"{mode} mode not built")
    pod = topology.pod_list[0]
    topology.start_tcp_server(pod, 8080)
    topology.write_manifest("svc.yaml", [
        service("web", cluster_ip="10.96.0.10", ports=[port(80, target_port=8080)]),
        endpoint_slice("web", ports=[{"port": 8080}], endpoints=[endpoint(pod.ip)]),
    ])
    argv = ["capsh", f"--drop={capsh_drop_list()}", f"--shell={PROXYD}", "--",
            "--proxy-mode", mode, "--manifests", str(topology.manifests), "--hostname-override", "node1",
            "--healthz-bind-address", f"{HEALTHZ[0]}:{HEALTHZ[1]}",
            "--metrics-bind-address", f"{METRICS[0]}:{METRICS[1]}", "--cluster-cidr", "10.244.0.0/16"]
    proc = topology.spawn(topology.node, argv, log_name=f"proxyd-caps-{mode}")
    wait_until(lambda: topology.http_get(topology.node, *HEALTHZ, "/healthz")[0] == 200, timeout=20,
               what=f"{mode} healthy under capsh")
    assert effective_caps(proc.pid) & ~GRANTED_BITS == 0
    assert effective_caps(proc.pid) & (1 << 12)  # NET_ADMIN really held
    assert topology.hello(topology.client, "10.96.0.10", 80).pod == pod.name if mode != "userspace" else \
        topology.hello(topology.node, "10.96.0.10", 80).pod == pod.name
    assert topology.stop_proxyd(proc) == 0, topology.log_of(proc)


# --- a dedicated non-root user with ambient capabilities (systemd/proxyd.service) -----------------

NOBODY = 65534
SITE_PACKAGES = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "pyroute2").exists())
REPO = str(Path(__file__).resolve().parents[2])


def as_user_argv(caps: tuple[str, ...], args: list[str]) -> list[str]:
    """``args`` run by proxyd as uid 65534 holding exactly ``caps`` as ambient capabilities (as the unit)."""
    listed = ",".join(caps)
    # The test venv's interpreter may live where uid 65534 cannot go (under /root): Debian's python3 then
    # runs proxyd from this checkout with the venv's packages (same Python minor version).
    code = "import sys; from proxyd.cli import main; sys.exit(main())"
    return ["capsh", f"--caps={listed}+eip cap_setpcap,cap_setuid,cap_setgid+ep", "--keep=1",
            f"--gid={NOBODY}", f"--groups={NOBODY}", f"--uid={NOBODY}", f"--addamb={listed}",
            "--shell=/usr/bin/python3", "--", "-c", code, *args]


def daemon_args(topology, mode: str) -> list[str]:
    return ["--proxy-mode", mode, "--manifests", str(topology.manifests), "--hostname-override", "node1",
            "--healthz-bind-address", f"{HEALTHZ[0]}:{HEALTHZ[1]}",
            "--metrics-bind-address", f"{METRICS[0]}:{METRICS[1]}", "--cluster-cidr", "10.244.0.0/16"]


def dns_and_web(topology) -> None:
    pod = topology.pod_list[0]
    topology.start_tcp_server(pod, 8080)
    topology.start_udp_server(pod, 5353)
    topology.write_manifest("svc.yaml", [
        service("web", cluster_ip="10.96.0.10", type_="NodePort",
                ports=[port(80, name="http", target_port=8080, node_port=30080),
                       port(53, name="dns", protocol="UDP", target_port=5353)]),
        endpoint_slice("web", ports=[{"name": "http", "port": 8080},
                                     {"name": "dns", "port": 5353, "protocol": "UDP"}],
                       endpoints=[endpoint(pod.ip)]),
    ])


@pytest.mark.parametrize(("mode", "backend", "caps"), [
    ("userspace", "", ("cap_net_admin", "cap_net_bind_service")),
    ("iptables", "nft", ("cap_net_admin",)),
    ("iptables", "legacy", ("cap_net_admin", "cap_net_raw")),
])
def test_each_mode_serves_as_a_non_root_user_with_only_what_it_needs(topology, mode, backend, caps):
    """The measured minimum per mode, as the systemd unit's user gets it: uid 65534, ambient capabilities.

    iptables-legacy also needs its lock file writable (the unit grants the group); here the test's own
    lock (``XTABLES_LOCKFILE``), so the host's ``/run/xtables.lock`` stays untouched.
    """
    dns_and_web(topology)
    topology._tmp.chmod(0o755)  # the manifests directory, readable by uid 65534
    lock = topology._tmp / "xtables.lock"
    lock.touch()
    os.chown(lock, NOBODY, NOBODY)
    env = {"PYTHONPATH": f"{REPO}:{SITE_PACKAGES}", "XTABLES_LOCKFILE": str(lock),
           "PROXYD_IPTABLES_BACKEND": backend or "nft"}
    proc = topology.spawn(topology.node, as_user_argv(caps, daemon_args(topology, mode)),
                          log_name=f"proxyd-nobody-{mode}", env=env)
    try:
        wait_until(lambda: topology.http_get(topology.node, *HEALTHZ, "/healthz")[0] == 200, timeout=30,
                   what=f"{mode} healthy as uid {NOBODY}")
    except TimeoutError as err:
        raise AssertionError(topology.log_of(proc)[-2000:]) from err
    status = Path(f"/proc/{proc.pid}/status").read_text()
    assert re.search(r"^Uid:\s+65534\s", status, re.M), status
    assert re.search(r"^Groups:\s+65534\s*$", status, re.M), status
    wanted = sum(1 << CAP_BITS[c] for c in caps)
    assert effective_caps(proc.pid) == wanted
    client = topology.pod_list[1].ns
    assert topology.hello(client, "10.96.0.10", 80).pod == topology.pod_list[0].name
    assert topology.udp_hello(client, "10.96.0.10", 53)[0].pod == topology.pod_list[0].name
    assert topology.hello(topology.client, "203.0.113.1", 30080).pod == topology.pod_list[0].name
    body = json.loads(topology.http_get(topology.node, *HEALTHZ, "/healthz")[1])
    assert "listenFailures" not in body, body
    assert topology.stop_proxyd(proc) == 0, topology.log_of(proc)


CAP_BITS = {"cap_net_bind_service": 10, "cap_net_admin": 12, "cap_net_raw": 13}


def test_userspace_without_net_bind_service_names_the_failed_listen(topology):
    """The DaemonSet of before granted NET_ADMIN and NET_RAW only: DNS on 53 could not listen, /healthz said
    200 and nothing else told. Now /healthz names every listener that failed, and a metric counts them."""
    dns_and_web(topology)
    drop = ",".join(c for c in capsh_drop_list().split(",") if c != "cap_net_bind_service"
                    ) + ",cap_net_bind_service"
    argv = ["capsh", f"--drop={drop}", f"--shell={PROXYD}", "--", *daemon_args(topology, "userspace")]
    proc = topology.spawn(topology.node, argv, log_name="proxyd-no-bind")
    _, body = wait_until(
        lambda: (r := topology.http_get(topology.node, *HEALTHZ, "/healthz"))[0] == 200 and r, timeout=20,
        what="healthy without NET_BIND_SERVICE")
    assert not effective_caps(proc.pid) & (1 << 10)
    answer = json.loads(body)
    assert answer["listenFailures"] == {"10.96.0.10:53/UDP": "Permission denied",
                                        "10.96.0.10:80/TCP": "Permission denied"}, answer
    assert topology.metric("proxyd_listen_failures", {"reason": "permission"}) == 2
    # The NodePort (above 1024) still serves.
    assert topology.hello(topology.client, "203.0.113.1", 30080).pod == topology.pod_list[0].name
    assert topology.stop_proxyd(proc) == 0
