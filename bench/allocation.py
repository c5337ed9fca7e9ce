"""What allocation (``proxyd.sources.allocate``) costs the manifests source per change.

``python -m bench.allocation`` prints, for directories of 1,000 and 10,000
Services, the time of ``Allocator.services`` on the first read, on a later
change that left every Service alone (an endpoints file: the source
re-merges the whole directory after each change), and on a change of one
Service's file: every Service explicit (a ``kubectl get -o
yaml`` dump), every Service without cluster IP and nodePort (``kubectl create
service nodeport``), and explicit ones with 1 % to allocate. ``--json`` prints
the figures as JSON. No root needed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import time

from proxyd.sources.allocate import Allocator, Ranges
from proxyd.sources.convert import ServiceSpec, service_spec

RANGES = Ranges(cluster=(ipaddress.ip_network("10.96.0.0/12"),), node_ports=(30000, 62767))


def _spec(i: int, *, explicit: bool) -> ServiceSpec:
    spec: dict = {"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    if explicit:
        spec["clusterIP"] = f"10.{96 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"
        spec["ports"][0]["nodePort"] = 30000 + i
    parsed = service_spec({"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": f"svc{i}", "namespace": f"ns{i % 50}"}, "spec": spec})
    assert parsed is not None
    return parsed


def measure(count: int, share_to_allocate: float) -> dict[str, float]:
    pending = int(count * share_to_allocate)
    specs = [_spec(i, explicit=i >= pending) for i in range(count)]
    allocator = Allocator(RANGES)
    started = time.perf_counter()
    allocator.services(specs)
    first = time.perf_counter() - started
    started = time.perf_counter()
    allocator.services(list(specs))
    same = time.perf_counter() - started
    # One Service's file changed: a new spec object for it, the others as they were.
    specs[count // 2] = _spec(count // 2, explicit=count // 2 >= pending)
    started = time.perf_counter()
    allocator.services(specs)
    one = time.perf_counter() - started
    return {"services": count, "to_allocate": pending, "first_ms": round(first * 1000, 1),
            "services_unchanged_ms": round(same * 1000, 1), "one_service_changed_ms": round(one * 1000, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [measure(count, share) for count in (1000, 10_000) for share in (0.0, 0.01, 1.0)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| services | to allocate | first read | change, Services unchanged | one Service changed |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['services']:,} | {row['to_allocate']:,} | {row['first_ms']} ms "
              f"| {row['services_unchanged_ms']} ms | {row['one_service_changed_ms']} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
