"""deploy/monitoring: the Grafana dashboard and the Prometheus alert rules use only metrics proxyd exports.

Both files are parsed (JSON, YAML), every PromQL expression in them is
collected (panel targets, template variables, alert rules), and every
``proxyd_*``/``kubeproxy_*`` name in those expressions must appear in
``/metrics`` of a running daemon — scraped from the real daemon in userspace
mode (after traffic, so the per-service data-path metrics have samples) and
in iptables mode. A name appears when a sample has it or its family is
declared (``# TYPE``; histogram families give ``_bucket``/``_sum``/``_count``).
Every expression must use at least one such metric, so a panel or alert
cannot silently depend on something proxyd does not export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.netns.behaviour import CLUSTER_IP, POD1, POD2, local_eps, web
from tests.netns.topology import METRICS, Topology

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/monitoring/grafana-dashboard.json"
RULES = ROOT / "deploy/monitoring/prometheus-rules.yaml"
METRIC = re.compile(r"\b((?:proxyd|kubeproxy)_[a-zA-Z0-9_]+)")


def dashboard_exprs(doc: dict[str, Any]) -> list[str]:
    exprs: list[str] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            for target in panel.get("targets", []):
                exprs.append(target["expr"])
            panels(panel.get("panels", []))

    panels(doc["panels"])
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def rule_exprs(doc: dict[str, Any]) -> list[str]:
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def exported(text: str) -> tuple[set[str], set[str]]:
    """(names declared or sampled, names with at least one sample) in a /metrics body."""
    names: set[str] = set()
    samples: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(None, 3)
            names.add(family)
            if kind.strip() == "histogram":
                names.update(f"{family}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names | samples, samples


def scrape(topo: Topology, mode: str, traffic: bool) -> str:
    proc = topo.start_proxyd(mode)
    try:
        if traffic:
            ns = topo.pod("pod3").ns
            for _ in range(4):
                topo.hello(ns, CLUSTER_IP, 80)
        status, body = topo.http_get(topo.node, *METRICS, "/metrics")
        assert status == 200
        return body
    finally:
        topo.stop_proxyd(proc)


def test_dashboard_and_alerts_use_exported_metrics(topology: Topology) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load(RULES.read_text())
    exprs = dashboard_exprs(dashboard) + rule_exprs(rules)
    assert len(dashboard_exprs(dashboard)) >= 15 and len(rule_exprs(rules)) >= 6
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        assert rule["alert"] and rule["labels"]["severity"] and rule["annotations"]["summary"], rule
    used: set[str] = set()
    for expr in exprs:
        found = set(METRIC.findall(expr))
        assert found, f"expression uses no proxyd metric: {expr}"
        used |= found

    for pod in ("pod1", "pod2"):
        topology.start_tcp_server(pod, 8080)
    topology.write_manifest("services.yaml", web(endpoints=local_eps(POD1, POD2)))
    userspace, userspace_samples = exported(scrape(topology, "userspace", traffic=True))
    iptables, _ = exported(scrape(topology, "iptables", traffic=False))
    missing = sorted(used - userspace - iptables)
    assert not missing, f"dashboard/alerts use metrics /metrics does not have: {missing}"
    # The data-path panels have real samples after traffic, not only declarations.
    data_path = {"proxyd_active_connections", "proxyd_bytes_total", "proxyd_connections_total"}
    assert data_path <= used and data_path <= userspace_samples
