"""``proxyd check DIR``: what the daemon would serve from a manifests directory, offline.

Reads DIR with the daemon's own code path — ``ManifestSource`` scanning the
directory (same parser, same validation, same allocation from the same
flags) into a real ``Tracker`` — without root, a kernel mode, or a network.
Prints, per service port, the addresses it would be served on (allocated
ones marked), its endpoints and the traffic policies, then every refusal
and everything ignored with file, object and reason. Meant for CI pipelines
that keep manifests in git.

Exit status: 0 when everything found is servable (objects ignored by design,
such as headless services or other kinds, are listed but do not fail), 1
when anything is refused (an invalid object, a file that does not parse, an
address the API server would refuse, a Service without a cluster IP and no
``--service-cluster-ip-range``), 2 for bad flags or a DIR that is not a
directory.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import TextIO

from proxyd.model import Endpoint, ServicePort, ServiceType
from proxyd.policy import categorize
from proxyd.sources.allocate import (
    DEFAULT_NODE_PORT_RANGE,
    Allocator,
    Assigned,
    RangeError,
    Ranges,
    parse_cluster_ranges,
    parse_port_range,
)
from proxyd.sources.manifests import Finding, ManifestSource
from proxyd.tracker import Tracker

ALLOCATED = "(allocated)"


def build_parser() -> argparse.ArgumentParser:
    from proxyd.cli import add_allocation_flags

    parser = argparse.ArgumentParser(
        prog="proxyd check",
        description="Read a manifests directory exactly as `proxyd --manifests DIR` would, offline (no root, "
                    "no kernel), and print what would be served and what is refused. Exit 0 when everything "
                    "is servable, 1 otherwise, 2 for bad flags.")
    parser.add_argument("directory", metavar="DIR", help="the manifests directory")
    add_allocation_flags(parser)
    parser.add_argument("--hostname-override", metavar="NAME",
                        help="this node's name, for Local traffic policies (default: the host name)")
    return parser


def main(argv: Sequence[str], out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    args = build_parser().parse_args(argv)
    try:
        ranges = Ranges(
            cluster=parse_cluster_ranges(args.service_cluster_ip_range or ""),
            node_ports=(parse_port_range(args.service_node_port_range) if args.service_node_port_range
                        else DEFAULT_NODE_PORT_RANGE))
    except RangeError as err:
        flag = "--service-cluster-ip-range" if "port" not in str(err) else "--service-node-port-range"
        print(f"proxyd check: error: {flag}: {err}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.directory):
        print(f"proxyd check: error: {args.directory!r} is not a directory", file=sys.stderr)
        return 2
    node_name = (args.hostname_override or socket.gethostname()).strip().lower()
    return check(args.directory, ranges=ranges, node_name=node_name, out=out)


def check(directory: str, *, ranges: Ranges, node_name: str, out: TextIO) -> int:
    """Print the report for ``directory``; the exit status."""
    findings: list[Finding] = []
    tracker = Tracker(node_name)
    allocator = Allocator(ranges)
    source = ManifestSource(directory, tracker, on_change=lambda: None, use_inotify=False,
                            allocator=allocator, report=findings.append)
    # The log lines say the same as the findings printed below.
    logger = logging.getLogger("proxyd.sources.manifests")
    level, logger.level = logger.level, logging.CRITICAL + 1
    try:
        # The daemon's first read (its worker-thread scan, then the tracker update).
        source.read_all()
    finally:
        logger.level = level
    state = tracker.take().state
    files = {key: name for name in sorted(source._files) for key in source._files[name].objects}
    assigned = allocator.last.assigned

    print(f"proxyd check {directory}: {len(source._files)} files, "
          f"{len(state.service_ports)} service ports to serve", file=out)
    zone = state.node_labels.get("topology.kubernetes.io/zone")
    for name in sorted(state.service_ports):
        svc = state.service_ports[name]
        key = ("Service", name.namespace, name.name)
        got = assigned.get(name.service, Assigned())
        endpoints = state.endpoints.get(name, ())
        print(file=out)
        print(f"{name}/{svc.protocol}  {svc.type}  [{files.get(key, '?')}]", file=out)
        for line in _addresses(svc, got):
            print(f"  {line}", file=out)
        print(f"  endpoints: {_endpoints(endpoints)}", file=out)
        cat = categorize(svc, endpoints, node_name=node_name, node_zone=zone)
        if not cat.has_any:
            print("  → no usable endpoint: connections are refused", file=out)
        else:
            print(f"  → ClusterIP traffic to {len(cat.internal)}"
                  + (f", external traffic to {len(cat.external)}" if svc.type is not ServiceType.CLUSTER_IP
                     or svc.external_ips else ""), file=out)
        print(f"  policies: {_policies(svc)}", file=out)

    refused = [f for f in findings if f.refused]
    ignored = [f for f in findings if not f.refused]
    for title, group in (("refused", refused), ("ignored", ignored)):
        if group:
            print(f"\n{title} ({len(group)}):", file=out)
            for f in group:
                print(f"  {f.file}: {f.what} {f.reason}  [{f.category}]", file=out)
    verdict = "everything is servable" if not refused else f"{len(refused)} refused"
    print(f"\n{len(state.service_ports)} service ports servable, {len(refused)} refused, "
          f"{len(ignored)} ignored: {verdict}", file=out)
    return 1 if refused else 0


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


def _addresses(svc: ServicePort, got: Assigned) -> list[str]:
    lines = []
    for ip in svc.cluster_ips:  # a dual-stack service: one line per family, primary first
        marked = ALLOCATED if ip in got.cluster_ips else ""
        lines.append(f"clusterIP   {_hostport(ip, svc.port)} {marked}".rstrip()
                     + f"  → targetPort {svc.target_port}")
    if svc.node_port:
        allocated = any(p == svc.node_port for _, _, p in got.node_ports)
        marked = ALLOCATED if allocated else ""
        lines.append(f"nodePort    {svc.node_port} on node addresses {marked}".rstrip())
    for ip in svc.external_ips:
        lines.append(f"externalIP  {_hostport(ip, svc.port)}")
    for ip in svc.load_balancer_ips:
        lines.append(f"LB ingress  {_hostport(ip, svc.port)}")
    if svc.health_check_node_port:
        marked = ALLOCATED if got.health_check_node_port == svc.health_check_node_port else ""
        lines.append(f"healthCheckNodePort {svc.health_check_node_port} {marked}".rstrip())
    return lines


def _endpoints(endpoints: Sequence[Endpoint]) -> str:
    if not endpoints:
        return "none"
    parts = []
    for ep in endpoints:
        status = "ready" if ep.ready else "serving, terminating" if ep.serving and ep.terminating \
            else "terminating" if ep.terminating else "not ready"
        where = f", node {ep.node_name}" if ep.node_name else ""
        parts.append(f"{ep} ({status}{where})")
    return ", ".join(parts)


def _policies(svc: ServicePort) -> str:
    affinity = f"ClientIP {svc.affinity_timeout}s" if svc.affinity_timeout else "None"
    parts = [f"externalTrafficPolicy {'Local' if svc.external_policy_local else 'Cluster'}",
             f"internalTrafficPolicy {'Local' if svc.internal_policy_local else 'Cluster'}",
             f"sessionAffinity {affinity}"]
    if svc.load_balancer_source_ranges:
        parts.append("loadBalancerSourceRanges " + ",".join(svc.load_balancer_source_ranges))
    if svc.topology_aware:
        parts.append("topology-aware")
    return ", ".join(parts)
