"""Hostile input for the converters: random and mutated documents, crafted names.

Whatever goes in, a converter gives None, a model value or InvalidObject —
never another exception — and a model value never carries a string that
could break out of an iptables-restore line or a log line.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyd.sources.convert import (
    InvalidObject,
    node_labels_from_dict,
    service_from_dict,
    slice_from_dict,
    slices_from_endpoints,
)

CONVERTERS = [service_from_dict, slice_from_dict, slices_from_endpoints, node_labels_from_dict]

# Everything a model string may contain: names, IPs, CIDRs, mirror slice names.
SAFE = re.compile(r"[A-Za-z0-9._:/-]*")

SERVICE = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "demo", "namespace": "web", "labels": {"app": "demo"},
                 "annotations": {"service.kubernetes.io/topology-mode": "Auto"}},
    "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
             "externalIPs": ["192.0.2.1"], "loadBalancerSourceRanges": ["198.51.100.0/24"],
             "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}},
             "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Cluster",
             "healthCheckNodePort": 32000,
             "ports": [{"name": "http", "port": 80, "targetPort": "web", "nodePort": 30080,
                        "protocol": "TCP"},
                       {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]},
    "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.5", "ipMode": "VIP"}, {"hostname": "lb"}]}},
}
SLICE = {
    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
    "metadata": {"name": "demo-abc", "namespace": "web", "labels": {"kubernetes.io/service-name": "demo"}},
    "addressType": "IPv4",
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
              {"name": "dns", "port": 5353, "protocol": "UDP"}],
    "endpoints": [{"addresses": ["10.244.1.2"],
                   "conditions": {"ready": True, "serving": True, "terminating": False},
                   "nodeName": "node-a", "zone": "zone-a", "hints": {"forZones": [{"name": "zone-a"}]}},
                  {"addresses": ["10.244.1.3"], "conditions": {"ready": False}}],
}
ENDPOINTS = {
    "apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "demo", "namespace": "web"},
    "subsets": [{"addresses": [{"ip": "10.244.1.2", "nodeName": "node-a"}],
                 "notReadyAddresses": [{"ip": "10.244.1.3"}],
                 "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}],
}
NODE = {"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}}}
SEEDS = [SERVICE, SLICE, ENDPOINTS, NODE]

HOSTILE_STRINGS = [
    "demo\n", "\ndemo", "demo -j ACCEPT", "-j ACCEPT", "demo\r", "de\"mo", "demo'", "a b", "demo\t",
    "demo\x00", "démo", "DEMO", "demo;reboot", "${IFS}", "$(id)", "a" * 64, " demo", "demo ", "--set-mark",
    "demo\u2028", "demo\x1b[31m", "10.0.0.1 -j DROP", "10.0.0.1\n-A INPUT", "fe80::1%eth0", "*", "",
]

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True) | st.text(max_size=20)
           | st.sampled_from([*HOSTILE_STRINGS, "None", "TCP", "UDP", "IPv4", "IPv6", "FQDN", "ClusterIP",
                              "NodePort", "LoadBalancer", "ExternalName", "Local", "ClientIP",
                              "10.96.0.1", "fd00::1", "10.0.0.0/8", "http", "80"]))
json_values = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=12), children, max_size=4)),
    max_leaves=20,
)


def check_safe(value: object) -> None:
    """Every string inside a model value matches SAFE."""
    if isinstance(value, enum.Enum):
        return
    if isinstance(value, str):
        assert SAFE.fullmatch(value), repr(value)
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            check_safe(getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_safe(item)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_safe(k)
            check_safe(v)


def run_all(obj: object) -> None:
    for convert in CONVERTERS:
        try:
            result = convert(obj)
        except InvalidObject as err:
            assert isinstance(err.reason, str) and err.reason.isprintable(), repr(err.reason)
            continue
        if convert is node_labels_from_dict:
            name, labels = result
            check_safe(name)
            # Label keys/values are checked against Kubernetes' syntax.
            for k, v in labels.items():
                assert re.fullmatch(r"[A-Za-z0-9._/-]*", k) and re.fullmatch(r"[A-Za-z0-9._-]*", v)
        else:
            check_safe(result)


def paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(paths(v, (*prefix, k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.extend(paths(v, (*prefix, i)))
    return out


def mutate(doc: object, path: tuple, action: str, value: object) -> object:
    if not path:
        return value
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "wrap":
        parent[last] = [parent[last]]
    elif action == "stringify":
        parent[last] = str(parent[last])
    else:
        parent[last] = value
    return doc


def test_seeds_are_valid():
    assert service_from_dict(SERVICE) is not None
    assert slice_from_dict(SLICE) is not None
    assert slices_from_endpoints(ENDPOINTS)
    assert node_labels_from_dict(NODE)[0] == "node-a"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_random_values(obj):
    run_all(obj)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional={
    "apiVersion": scalars, "kind": scalars, "metadata": json_values, "spec": json_values,
    "status": json_values, "addressType": scalars, "ports": json_values, "endpoints": json_values,
    "subsets": json_values}))
def test_random_object_shapes(obj):
    run_all(obj)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_documents(data):
    doc = data.draw(st.sampled_from(SEEDS))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        all_paths = paths(doc)
        path = data.draw(st.sampled_from(all_paths))
        action = data.draw(st.sampled_from(["set", "set", "delete", "wrap", "stringify"]))
        if action == "delete" and not path:
            action = "set"
        doc = mutate(doc, path, action, data.draw(json_values))
    run_all(doc)


# ------------------------------------------------------------------ crafted names

SERVICE_STRING_PATHS = [
    ("metadata", "name"), ("metadata", "namespace"), ("spec", "ports", 0, "name"),
    ("spec", "ports", 0, "targetPort"), ("spec", "clusterIP"), ("spec", "externalIPs", 0),
    ("spec", "loadBalancerSourceRanges", 0), ("status", "loadBalancer", "ingress", 0, "ip"),
    ("spec", "ports", 0, "protocol"), ("spec", "type"),
]
SLICE_STRING_PATHS = [
    ("metadata", "name"), ("metadata", "namespace"), ("metadata", "labels", "kubernetes.io/service-name"),
    ("ports", 0, "name"), ("ports", 0, "protocol"), ("endpoints", 0, "addresses", 0),
    ("endpoints", 0, "nodeName"), ("endpoints", 0, "zone"), ("endpoints", 0, "hints", "forZones", 0, "name"),
    ("addressType",),
]
ENDPOINTS_STRING_PATHS = [
    ("metadata", "name"), ("metadata", "namespace"), ("subsets", 0, "ports", 0, "name"),
    ("subsets", 0, "addresses", 0, "ip"), ("subsets", 0, "addresses", 0, "nodeName"),
]
# The empty string means "unset" in a few of these places (and is accepted).
EMPTY_OK = {("metadata", "namespace"), ("spec", "ports", 0, "name"), ("spec", "ports", 0, "targetPort"),
            ("spec", "clusterIP"), ("ports", 0, "name"), ("endpoints", 0, "nodeName"),
            ("endpoints", 0, "zone"), ("subsets", 0, "ports", 0, "name"),
            ("subsets", 0, "addresses", 0, "nodeName"), ("status", "loadBalancer", "ingress", 0, "ip"),
            ("spec", "type"), ("spec", "ports", 0, "protocol"), ("ports", 0, "protocol")}


# DNS-1123 subdomains (slice and node names) may be 253 long.
SUBDOMAIN_PATHS = {("endpoints", 0, "nodeName"), ("subsets", 0, "addresses", 0, "nodeName")}


# Label values (zones) may hold capitals.
LABEL_VALUE_PATHS = {("endpoints", 0, "zone"), ("endpoints", 0, "hints", "forZones", 0, "name")}


def crafted_cases():
    for seed, convert, paths_ in ((SERVICE, service_from_dict, SERVICE_STRING_PATHS),
                                  (SLICE, slice_from_dict, SLICE_STRING_PATHS),
                                  (ENDPOINTS, slices_from_endpoints, ENDPOINTS_STRING_PATHS)):
        for path in paths_:
            for text in HOSTILE_STRINGS:
                if (text == "" and path in EMPTY_OK) or (text == "DEMO" and path in LABEL_VALUE_PATHS):
                    continue
                subdomain = path in SUBDOMAIN_PATHS or (seed is SLICE and path == ("metadata", "name"))
                if text == "a" * 64 and subdomain:
                    text = "a" * 254
                case_id = f"{convert.__name__}-{'.'.join(map(str, path))}-{text!r}"[:120]
                yield pytest.param(seed, convert, path, text, id=case_id)


@pytest.mark.parametrize(("seed", "convert", "path", "text"), list(crafted_cases()))
def test_crafted_strings_rejected(seed, convert, path, text):
    doc = mutate(seed, path, "set", text)
    with pytest.raises(InvalidObject) as info:
        result = convert(doc)
        # Only reached when nothing was raised: show what got through.
        pytest.fail(f"accepted {text!r} at {path}: {result!r}")
    assert info.value.reason.isprintable()


@pytest.mark.parametrize("text", HOSTILE_STRINGS)
def test_crafted_node_labels_rejected(text):
    if text in ("", "DEMO"):
        pytest.skip("a valid label value (and node names are checked in the crafted-strings test)")
    for labels in ({"topology.kubernetes.io/zone": text}, {text: "x"}):
        with pytest.raises(InvalidObject):
            node_labels_from_dict({"metadata": {"name": "node-a", "labels": labels}})
    with pytest.raises(InvalidObject):
        node_labels_from_dict({"metadata": {"name": "a" * 254 if text == "a" * 64 else text}})


def test_huge_and_deep_inputs():
    deep: object = "x"
    for _ in range(50_000):
        deep = {"metadata": deep}
    run_all(deep)
    deep_list: object = []
    for _ in range(50_000):
        deep_list = [deep_list]
    run_all({"metadata": {"name": "demo"}, "spec": {"clusterIP": "10.96.0.1", "ports": deep_list}})
    many_ports = [{"port": 1 + i % 65535, "name": f"p{i}"} for i in range(200_000)]
    with pytest.raises(InvalidObject, match="too many entries"):
        service_from_dict({"metadata": {"name": "demo"},
                           "spec": {"clusterIP": "10.96.0.1", "ports": many_ports}})
    with pytest.raises(InvalidObject, match="too many entries"):
        slice_from_dict(SLICE | {"endpoints": [{"addresses": ["10.0.0.1"]}] * 5000})
    huge_name = {"metadata": {"name": "a" * 10_000_000}}
    run_all(huge_name)
