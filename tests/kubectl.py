"""Manifests as users really write them: the real ``kubectl`` client's ``--dry-run=client`` output.

``kubectl create service TYPE NAME --tcp=PORT:TARGET --dry-run=client -o
yaml`` runs offline (no cluster, no kubeconfig needed) and prints a Service
with no ``spec.clusterIP`` and, for NodePort and LoadBalancer, no
``nodePort``: exactly what a VM user puts in the manifests directory. The
client comes from Debian (``scripts/setup.sh --test`` installs it); a
missing one fails the tests that need it.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import yaml

SERVICE_TYPES = ("clusterip", "nodeport", "loadbalancer")


def kubectl_service(type_: str, name: str, *, tcp: str = "80:8080", extra: tuple[str, ...] = ()) -> str:
    """The YAML text ``kubectl create service`` prints for one Service."""
    binary = shutil.which("kubectl")
    assert binary, "kubectl is not installed: run scripts/setup.sh --test (Debian package kubernetes-client)"
    argv = [binary, "create", "service", type_, name, *([f"--tcp={tcp}"] if tcp else []), *extra,
            "--dry-run=client", "-o", "yaml"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "KUBECONFIG": "/dev/null"})
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"
    doc = yaml.safe_load(proc.stdout)
    assert isinstance(doc, dict) and doc.get("kind") == "Service", proc.stdout
    return proc.stdout


def endpoints(name: str, ips: list[str], *, port: int = 8080, port_name: str = "80-8080",
              node: str | None = None) -> dict[str, Any]:
    """A v1 Endpoints object as a user writes it by hand next to kubectl's Service."""
    address: list[dict[str, Any]] = [{"ip": ip, **({"nodeName": node} if node else {})} for ip in ips]
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name},
            "subsets": [{"addresses": address,
                         "ports": [{"name": port_name, "port": port, "protocol": "TCP"}]}]}
