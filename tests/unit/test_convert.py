"""Raw objects → model values: every conversion rule and every rejection reason."""

from __future__ import annotations

import copy
import ipaddress

import pytest

from proxyd.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    EndpointPort,
    Protocol,
    ServiceName,
    ServicePortName,
    ServiceType,
    SliceEndpoint,
)
from proxyd.sources.convert import (
    InvalidObject,
    is_mirror,
    node_labels_from_dict,
    service_from_dict,
    service_spec,
    slice_from_dict,
    slices_from_endpoints,
    special_address,
)


def svc(spec: dict | None = None, *, meta: dict | None = None, status: dict | None = None) -> dict:
    base_spec = {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
    base_spec.update(spec or {})
    obj = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "demo", "namespace": "web", **(meta or {})}, "spec": base_spec}
    if status is not None:
        obj["status"] = status
    return obj


def one_port(obj: dict):
    service = service_from_dict(obj)
    assert service is not None
    assert len(service.ports) == 1
    return service.ports[0]


def invalid(fn, obj, fragment: str) -> None:
    with pytest.raises(InvalidObject) as info:
        fn(obj)
    assert fragment in info.value.reason, info.value.reason
    assert "\n" not in info.value.reason


# ------------------------------------------------------------------ Service: what is kept


def test_minimal_cluster_ip_service():
    port = one_port(svc())
    assert port.name == ServicePortName("web", "demo", "", Protocol.TCP)
    assert port.type is ServiceType.CLUSTER_IP
    assert port.cluster_ip == "10.96.0.10"
    assert port.port == 80
    assert port.target_port == 80  # defaults to port
    assert port.node_port == 0
    assert port.affinity_timeout == 0
    assert not port.external_policy_local and not port.internal_policy_local
    assert not port.topology_aware


def test_namespace_defaults_to_default():
    obj = svc()
    del obj["metadata"]["namespace"]
    service = service_from_dict(obj)
    assert service.name == ServiceName("default", "demo")
    obj["metadata"]["namespace"] = ""
    assert service_from_dict(obj).name == ServiceName("default", "demo")


def test_multi_port_named_ports_and_protocols():
    service = service_from_dict(svc({"ports": [
        {"name": "http", "port": 80, "targetPort": "web"},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        {"name": "sctp", "port": 9, "protocol": "SCTP"},
    ]}))
    names = [(p.name.port, p.protocol, p.port, p.target_port) for p in service.ports]
    assert names == [("http", Protocol.TCP, 80, "web"), ("dns", Protocol.UDP, 53, 5353),
                     ("dns-tcp", Protocol.TCP, 53, 53), ("sctp", Protocol.SCTP, 9, 9)]
    assert str(service.ports[0].name) == "web/demo:http"


@pytest.mark.parametrize("target", [None, 0, ""])
def test_target_port_defaults_to_port(target):
    assert one_port(svc({"ports": [{"port": 8443, "targetPort": target}]})).target_port == 8443


def test_node_port_kept_for_nodeport_and_lb_only():
    assert one_port(svc({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]})).node_port == 30080
    lb = svc({"type": "LoadBalancer", "ports": [{"port": 80, "nodePort": 30081}]})
    assert one_port(lb).node_port == 30081
    # A stale nodePort on a ClusterIP service is not served.
    assert one_port(svc({"ports": [{"port": 80, "nodePort": 30080}]})).node_port == 0
    # allocateLoadBalancerNodePorts: false leaves none.
    assert one_port(svc({"type": "LoadBalancer"})).node_port == 0


def test_dual_stack_keeps_both_cluster_ips_primary_first_and_both_families_external_ips():
    port = one_port(svc({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.10"],
                         "externalIPs": ["192.0.2.1", "2001:db8::1"]}))
    assert port.cluster_ips == ("fd00::10", "10.96.0.10")
    assert port.external_ips == ("192.0.2.1", "2001:db8::1")
    v4, v6 = port.for_family(4), port.for_family(6)
    assert v4 is not None and (v4.cluster_ip, v4.external_ips) == ("10.96.0.10", ("192.0.2.1",))
    assert v6 is not None and (v6.cluster_ip, v6.external_ips) == ("fd00::10", ("2001:db8::1",))


def test_ipv6_single_stack_keeps_v6_and_its_family_view_filters_external_ips():
    port = one_port(svc({"clusterIP": "fd00:0::10", "clusterIPs": ["fd00::10"],
                         "externalIPs": ["192.0.2.1", "2001:db8::0001"]}))
    assert port.cluster_ip == "fd00::10"  # canonical form
    assert port.for_family(4) is None
    v6 = port.for_family(6)
    assert v6 is not None and v6.external_ips == ("2001:db8::1",)


def test_cluster_ips_only():
    obj = svc({"clusterIPs": ["10.96.0.11"]})
    del obj["spec"]["clusterIP"]
    assert one_port(obj).cluster_ip == "10.96.0.11"


def test_external_ips_deduplicated_in_order():
    port = one_port(svc({"externalIPs": ["192.0.2.2", "192.0.2.1", "192.0.2.2"]}))
    assert port.external_ips == ("192.0.2.2", "192.0.2.1")


def test_lb_ingress_from_status_only_for_load_balancer():
    status = {"loadBalancer": {"ingress": [
        {"ip": "203.0.113.5"},
        {"hostname": "lb.example.com"},
        {"ip": "203.0.113.6", "ipMode": "Proxy"},
        {"ip": "203.0.113.7", "ipMode": "VIP"},
        {"ip": "2001:db8::5"},
    ]}}
    port = one_port(svc({"type": "LoadBalancer", "loadBalancerIP": "203.0.113.99"}, status=status))
    assert port.load_balancer_ips == ("203.0.113.5", "203.0.113.7", "2001:db8::5")
    v4 = port.for_family(4)
    assert v4 is not None and v4.load_balancer_ips == ("203.0.113.5", "203.0.113.7")
    assert v4.external_addresses == ("203.0.113.5", "203.0.113.7")
    # The same status on a NodePort service is not served.
    assert one_port(svc({"type": "NodePort"}, status=status)).load_balancer_ips == ()


def test_source_ranges_trimmed_canonical_and_family_filtered():
    port = one_port(svc({"type": "LoadBalancer",
                         "loadBalancerSourceRanges": [" 192.0.2.0/24 ", "10.1.2.3/8", "2001:db8::/32"]}))
    assert port.load_balancer_source_ranges == ("192.0.2.0/24", "10.0.0.0/8", "2001:db8::/32")
    v4 = port.for_family(4)
    assert v4 is not None and v4.load_balancer_source_ranges == ("192.0.2.0/24", "10.0.0.0/8")
    # Only meaningful with LB IPs: dropped for other types.
    assert one_port(svc({"loadBalancerSourceRanges": ["192.0.2.0/24"]})).load_balancer_source_ranges == ()


def test_session_affinity():
    assert one_port(svc({"sessionAffinity": "ClientIP"})).affinity_timeout == DEFAULT_AFFINITY_TIMEOUT
    port = one_port(svc({"sessionAffinity": "ClientIP",
                         "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}))
    assert port.affinity_timeout == 60
    no_affinity = svc({"sessionAffinity": "None",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}})
    assert one_port(no_affinity).affinity_timeout == 0
    assert one_port(svc({"sessionAffinity": "ClientIP", "sessionAffinityConfig":
                         {"clientIP": {"timeoutSeconds": 86400}}})).affinity_timeout == 86400


def test_external_traffic_policy_only_when_externally_accessible():
    assert one_port(svc({"type": "NodePort", "externalTrafficPolicy": "Local"})).external_policy_local
    with_external_ip = svc({"externalTrafficPolicy": "Local", "externalIPs": ["192.0.2.1"]})
    assert one_port(with_external_ip).external_policy_local
    # kube-proxy: a plain ClusterIP service has no external traffic.
    assert not one_port(svc({"externalTrafficPolicy": "Local"})).external_policy_local
    assert not one_port(svc({"type": "NodePort", "externalTrafficPolicy": "Cluster"})).external_policy_local


def test_internal_traffic_policy():
    assert one_port(svc({"internalTrafficPolicy": "Local"})).internal_policy_local
    assert not one_port(svc({"internalTrafficPolicy": "Cluster"})).internal_policy_local


def test_health_check_node_port_only_for_lb_local():
    spec = {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}
    assert one_port(svc(spec)).health_check_node_port == 32000
    assert one_port(svc({**spec, "externalTrafficPolicy": "Cluster"})).health_check_node_port == 0
    assert one_port(svc({**spec, "type": "NodePort"})).health_check_node_port == 0


@pytest.mark.parametrize(("annotations", "spec", "expected"), [
    ({"service.kubernetes.io/topology-mode": "Auto"}, {}, True),
    ({"service.kubernetes.io/topology-mode": "auto"}, {}, True),
    ({"service.kubernetes.io/topology-aware-hints": "auto"}, {}, True),
    ({"service.kubernetes.io/topology-mode": "Disabled",
      "service.kubernetes.io/topology-aware-hints": "auto"}, {}, False),  # topology-mode wins
    ({}, {"trafficDistribution": "PreferClose"}, True),
    ({}, {"trafficDistribution": "SomethingNew"}, False),
    ({}, {}, False),
])
def test_topology_aware(annotations, spec, expected):
    assert one_port(svc(spec, meta={"annotations": annotations})).topology_aware is expected


def test_service_without_ports():
    service = service_from_dict(svc({"ports": None}))
    assert service is not None and service.ports == ()


# ------------------------------------------------------------------ Service: ignored


@pytest.mark.parametrize("obj", [
    svc({"clusterIP": "None"}),
    svc({"clusterIP": "None", "clusterIPs": ["None"]}),
    svc({"clusterIP": None, "clusterIPs": ["None"]}),
    svc({"type": "ExternalName", "externalName": "example.com", "clusterIP": None}),
    svc(meta={"labels": {"service.kubernetes.io/service-proxy-name": "other"}}),
    svc(meta={"labels": {"service.kubernetes.io/headless": ""}}),
    # Ignored services are not validated further.
    svc({"clusterIP": "None", "ports": [{"port": 99999}]}),
])
def test_ignored_services(obj):
    assert service_from_dict(obj) is None


# ------------------------------------------------------------------ Service: rejected


def _with(path: str, value):
    obj = svc()
    target = obj
    keys = path.split(".")
    for key in keys[:-1]:
        target = target.setdefault(key, {}) if not key.isdigit() else target[int(key)]
    last = keys[-1]
    if last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return obj


@pytest.mark.parametrize(("path", "value", "fragment"), [
    ("metadata.name", None, "metadata.name: missing"),
    ("metadata.name", "", "metadata.name: missing"),
    ("metadata.name", "Demo", "not a valid service name"),
    ("metadata.name", "9lives", "not a valid service name"),
    ("metadata.name", "a" * 64, "not a valid service name"),
    ("metadata.name", "demo\n-j ACCEPT", "not a valid service name"),
    ("metadata.name", 42, "must be a string"),
    ("metadata.namespace", "Web", "not a valid DNS-1123 label"),
    ("metadata.namespace", "web ns", "not a valid DNS-1123 label"),
    ("metadata.namespace", ["web"], "must be a string"),
    ("metadata", "x", "must be an object"),
    ("metadata.labels", ["a"], "must be an object"),
    ("metadata.labels", {"a": 1}, "must be strings"),
    ("metadata.annotations", {"a": None}, "must be strings"),
    ("spec", [], "must be an object"),
    ("spec.type", "Magic", "unknown service type"),
    ("spec.type", 3, "unknown service type"),
    ("spec.clusterIP", "10.96.0.300", "not a valid IP address"),
    ("spec.clusterIP", "10.96.0.10 ", "not a valid IP address"),
    ("spec.clusterIP", "fe80::1%eth0", "not a valid IP address"),
    ("spec.clusterIP", 1234, "must be a string"),
    ("spec.clusterIPs", ["10.96.0.11"], "must equal spec.clusterIP"),
    ("spec.clusterIPs", ["10.96.0.10", "10.96.0.11"], "same family"),
    ("spec.clusterIPs", ["10.96.0.10", "fd00::1", "fd00::2"], "too many entries"),
    ("spec.clusterIPs", ["10.96.0.10", 5], "must be a string"),
    ("spec.clusterIPs", "10.96.0.10", "must be a list"),
    ("spec.externalIPs", ["192.0.2.x"], "spec.externalIPs[0]: '192.0.2.x' is not a valid IP address"),
    ("spec.externalIPs", [None], "must be a string"),
    ("spec.ports", "80", "must be a list"),
    ("spec.ports", [80], "spec.ports[0]: must be an object"),
    ("spec.ports", [{"port": 0}], "between 1 and 65535"),
    ("spec.ports", [{"port": 65536}], "between 1 and 65535"),
    ("spec.ports", [{"port": -1}], "between 1 and 65535"),
    ("spec.ports", [{"port": "80"}], "must be an integer"),
    ("spec.ports", [{"port": 80.0}], "must be an integer"),
    ("spec.ports", [{"port": True}], "must be an integer"),
    ("spec.ports", [{}], "spec.ports[0].port: missing"),
    ("spec.ports", [{"port": 10**100}], "a huge number"),
    ("spec.ports", [{"port": 80, "protocol": "ICMP"}], "unknown protocol"),
    ("spec.ports", [{"port": 80, "protocol": "tcp"}], "unknown protocol"),
    ("spec.ports", [{"port": 80, "name": "Http"}], "not a valid DNS-1123 label"),
    ("spec.ports", [{"port": 80, "name": "a b"}], "not a valid DNS-1123 label"),
    ("spec.ports", [{"port": 80, "targetPort": 70000}], "between 1 and 65535"),
    ("spec.ports", [{"port": 80, "targetPort": "8080"}], "IANA_SVC_NAME"),
    ("spec.ports", [{"port": 80, "targetPort": "a-very-long-port-name"}], "IANA_SVC_NAME"),
    ("spec.ports", [{"port": 80, "targetPort": "a--b"}], "IANA_SVC_NAME"),
    ("spec.ports", [{"port": 80, "targetPort": "-ab"}], "IANA_SVC_NAME"),
    ("spec.ports", [{"port": 80, "targetPort": [1]}], "must be an integer"),
    ("spec.ports", [{"port": 80, "nodePort": 70000}], "between 1 and 65535"),
    ("spec.ports", [{"port": 80, "nodePort": -5}], "between 1 and 65535"),
    ("spec.ports", [{"port": 80, "name": "a"}, {"port": 81, "name": "a"}], "duplicate port name"),
    ("spec.ports", [{"port": 80}, {"port": 81}], "duplicate port name"),
    ("spec.ports", [{"port": 80, "name": "a"}, {"port": 80, "name": "b"}], "duplicate port 80/TCP"),
    ("spec.sessionAffinity", "Cookie", "unknown session affinity"),
    ("spec.externalTrafficPolicy", "Global", "unknown policy"),
    ("spec.internalTrafficPolicy", "local", "unknown policy"),
    ("spec.healthCheckNodePort", 70000, "between 1 and 65535"),
    ("spec.loadBalancerSourceRanges", ["10.0.0.0/33"], "not a valid CIDR"),
    ("spec.loadBalancerSourceRanges", ["10.0.0.1"], "not a valid CIDR"),
    ("spec.loadBalancerSourceRanges", ["bogus/8"], "not a valid CIDR"),
    ("spec.loadBalancerSourceRanges", [{}], "must be a string"),
    ("spec.trafficDistribution", 5, "must be a string"),
])
def test_invalid_services(path, value, fragment):
    invalid(service_from_dict, _with(path, value), fragment)


def test_nodeport_range_checked_even_when_dropped():
    invalid(service_from_dict, svc({"ports": [{"port": 80, "nodePort": 0x10000}]}), "between 1 and 65535")


@pytest.mark.parametrize(("timeout", "fragment"), [
    (0, "between 1 and 86400"), (86401, "between 1 and 86400"), ("60", "must be an integer"),
])
def test_invalid_affinity_timeout(timeout, fragment):
    obj = svc({"sessionAffinity": "ClientIP",
               "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}}})
    invalid(service_from_dict, obj, fragment)


@pytest.mark.parametrize(("ingress", "fragment"), [
    ([{"ip": "203.0.113.300"}], "not a valid IP address"),
    ([{"ip": "203.0.113.1", "ipMode": "Magic"}], "unknown ipMode"),
    (["203.0.113.1"], "must be an object"),
    ({"ip": "203.0.113.1"}, "must be a list"),
])
def test_invalid_lb_ingress(ingress, fragment):
    obj = svc({"type": "LoadBalancer"}, status={"loadBalancer": {"ingress": ingress}})
    invalid(service_from_dict, obj, fragment)


@pytest.mark.parametrize("obj", [None, 1, "svc", [svc()], {"metadata": None}])
def test_non_objects_rejected(obj):
    with pytest.raises(InvalidObject):
        service_from_dict(obj)


def test_conversion_does_not_mutate_input():
    obj = svc({"type": "LoadBalancer", "loadBalancerSourceRanges": [" 10.0.0.0/8 "]})
    before = copy.deepcopy(obj)
    service_from_dict(obj)
    assert obj == before


# ------------------------------------------------------------------ EndpointSlice


def eps(endpoints=None, *, ports=None, address_type="IPv4", labels=None, name="demo-abc12") -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "web",
                     "labels": {"kubernetes.io/service-name": "demo"} if labels is None else labels},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": [{"addresses": ["10.244.1.2"]}] if endpoints is None else endpoints,
    }


def test_slice_basic_and_condition_defaults():
    sl = slice_from_dict(eps([
        {"addresses": ["10.244.1.2", "10.244.9.9"], "nodeName": "node-a", "zone": "zone-1",
         "hints": {"forZones": [{"name": "zone-1"}, {"name": "zone-2"}, {"name": "zone-1"}]}},
        {"addresses": ["10.244.1.3"], "conditions": {"ready": False}},
        {"addresses": ["10.244.1.4"], "conditions": {"ready": False, "serving": True, "terminating": True}},
        {"addresses": ["10.244.1.5"], "conditions": {"ready": None, "serving": None, "terminating": None}},
    ]))
    assert sl.key == ("web", "demo-abc12")
    assert sl.service_name == ServiceName("web", "demo")
    assert sl.address_family == 4
    assert sl.ports == (EndpointPort("http", 8080, Protocol.TCP),)
    assert sl.endpoints == (
        SliceEndpoint("10.244.1.2", ready=True, serving=True, terminating=False, node_name="node-a",
                      zone="zone-1", zone_hints=("zone-1", "zone-2")),
        # kube-proxy: serving nil reads as true, terminating nil as false.
        SliceEndpoint("10.244.1.3", ready=False, serving=True, terminating=False),
        SliceEndpoint("10.244.1.4", ready=False, serving=True, terminating=True),
        SliceEndpoint("10.244.1.5", ready=True, serving=True, terminating=False),
    )


def test_slice_port_defaults_and_null_port_skipped():
    sl = slice_from_dict(eps(ports=[{"port": 53, "protocol": "UDP"}, {"name": "x", "port": None},
                                    {"name": "y", "port": 9}]))
    assert sl.ports == (EndpointPort("", 53, Protocol.UDP), EndpointPort("y", 9, Protocol.TCP))


def test_slice_ipv6_canonical_and_empty_addresses_skipped():
    sl = slice_from_dict(eps([{"addresses": ["FD00:0::2"]}, {"addresses": []}, {}], address_type="IPv6"))
    assert sl.address_family == 6
    assert [e.ip for e in sl.endpoints] == ["fd00::2"]


@pytest.mark.parametrize("obj", [
    eps(labels={}),
    eps(labels={"app": "x"}),
    eps(address_type="FQDN", endpoints=[{"addresses": ["example.com"]}]),
])
def test_ignored_slices(obj):
    assert slice_from_dict(obj) is None


@pytest.mark.parametrize(("obj", "fragment"), [
    (eps(address_type="IPv5"), "unknown address type"),
    (eps(address_type=None), "unknown address type"),
    (eps([{"addresses": ["10.244.1.300"]}]), "endpoints[0].addresses[0]"),
    (eps([{"addresses": ["10.244.1.2", "bogus"]}]), "endpoints[0].addresses[1]"),
    (eps([{"addresses": ["fd00::1"]}]), "not an IPv4 address"),
    (eps([{"addresses": ["10.0.0.1"]}], address_type="IPv6"), "not an IPv6 address"),
    (eps([{"addresses": "10.0.0.1"}]), "must be a list"),
    (eps([{"addresses": ["10.0.0.1"], "conditions": {"ready": "yes"}}]), "must be true or false"),
    (eps([{"addresses": ["10.0.0.1"], "conditions": []}]), "must be an object"),
    (eps([{"addresses": ["10.0.0.1"], "nodeName": "Node A"}]), "not a valid DNS-1123 subdomain"),
    (eps([{"addresses": ["10.0.0.1"], "zone": "zone one"}]), "not a valid label value"),
    (eps([{"addresses": ["10.0.0.1"], "hints": {"forZones": [{"name": "a;b"}]}}]), "not a valid label value"),
    (eps([{"addresses": ["10.0.0.1"], "hints": {"forZones": [{}]}}]), "must be a string"),
    (eps([{"addresses": ["10.0.0.1"]}] * 1001), "too many entries"),
    (eps(ports=[{"port": 1}] * 101), "too many entries"),
    (eps(ports=[{"port": 0}]), "between 1 and 65535"),
    (eps(ports=[{"port": 80, "protocol": "XTP"}]), "unknown protocol"),
    (eps(ports=[{"port": 80, "name": "-x"}]), "not a valid DNS-1123 label"),
    (eps(ports=[{"port": 80, "name": "a"}, {"port": 81, "name": "a"}]), "duplicate port name"),
    (eps(ports="8080"), "must be a list"),
    (eps(labels={"kubernetes.io/service-name": "Bad Name"}), "not a valid service name"),
    (eps(name="Bad_Name"), "not a valid DNS-1123 subdomain"),
    (eps(endpoints=[None]), "must be an object"),
])
def test_invalid_slices(obj, fragment):
    invalid(slice_from_dict, obj, fragment)


# ------------------------------------------------------------------ Endpoints mirroring


def endpoints(subsets, *, labels=None) -> dict:
    return {"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "demo", "namespace": "web", "labels": labels or {}},
            "subsets": subsets}


def test_endpoints_mirrored():
    slices = slices_from_endpoints(endpoints([
        {"addresses": [{"ip": "10.244.1.2", "nodeName": "node-a"}],
         "notReadyAddresses": [{"ip": "10.244.1.3"}],
         "ports": [{"name": "http", "port": 8080}]},
        {"addresses": [{"ip": "10.244.1.4"}], "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]},
        {"addresses": [{"ip": "fd00::4"}, {"ip": "10.244.1.5"}], "ports": [{"port": 53, "protocol": "UDP"}]},
    ]))
    assert all(is_mirror(s) for s in slices)
    assert [s.name for s in slices] == ["endpoints-mirror:demo:0", "endpoints-mirror:demo:1",
                                        "endpoints-mirror:demo:2"]
    assert len({s.name for s in slices}) == 3
    first, udp_v6, udp_v4 = slices
    assert first.service_name == ServiceName("web", "demo")
    assert first.ports == (EndpointPort("http", 8080, Protocol.TCP),)
    # Subsets with identical ports share a slice.
    assert [(e.ip, e.ready, e.node_name) for e in first.endpoints] == [
        ("10.244.1.2", True, "node-a"), ("10.244.1.3", False, None), ("10.244.1.4", True, None)]
    assert (udp_v6.address_family, [e.ip for e in udp_v6.endpoints]) == (6, ["fd00::4"])
    assert (udp_v4.address_family, [e.ip for e in udp_v4.endpoints]) == (4, ["10.244.1.5"])
    assert udp_v4.ports == (EndpointPort("", 53, Protocol.UDP),)


def test_endpoints_mirroring_is_deterministic():
    subsets = [{"addresses": [{"ip": f"10.244.{i}.1"}], "ports": [{"port": 80 + i}]} for i in range(5)]
    assert slices_from_endpoints(endpoints(subsets)) == slices_from_endpoints(endpoints(subsets))


def test_endpoints_cap_per_subset_ready_first():
    subset = {"addresses": [{"ip": f"10.1.{i // 250}.{i % 250}"} for i in range(990)],
              "notReadyAddresses": [{"ip": f"10.2.{i // 250}.{i % 250}"} for i in range(30)],
              "ports": [{"port": 80}]}
    (sl,) = slices_from_endpoints(endpoints([subset]))
    assert len(sl.endpoints) == 1000
    assert sum(1 for e in sl.endpoints if not e.ready) == 10


def test_endpoints_skip_mirror_and_empty():
    assert slices_from_endpoints(endpoints([{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}],
                                           labels={"endpointslice.kubernetes.io/skip-mirror": "true"})) == []
    assert slices_from_endpoints(endpoints(None)) == []
    assert slices_from_endpoints(endpoints([])) == []


@pytest.mark.parametrize(("subsets", "fragment"), [
    ([{"addresses": [{"ip": "10.0.0.300"}], "ports": [{"port": 80}]}], "not a valid IP address"),
    ([{"addresses": [{}], "ports": [{"port": 80}]}], "must be a string"),
    ([{"addresses": [{"ip": "10.0.0.1"}], "ports": [{}]}], "port: missing"),
    ([{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 0}]}], "between 1 and 65535"),
    ([{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80, "protocol": "X"}]}], "unknown protocol"),
    ([{"addresses": [{"ip": "10.0.0.1", "nodeName": "a\nb"}], "ports": [{"port": 80}]}], "DNS-1123"),
    ([{"ports": [{"port": 80, "name": "a"}, {"port": 81, "name": "a"}]}], "duplicate port name"),
    ("x", "must be a list"),
    ([5], "must be an object"),
])
def test_invalid_endpoints(subsets, fragment):
    invalid(slices_from_endpoints, endpoints(subsets), fragment)


def test_endpoints_name_must_be_a_service_name():
    obj = endpoints([])
    obj["metadata"]["name"] = "Not-A-Service"
    invalid(slices_from_endpoints, obj, "not a valid service name")


# ------------------------------------------------------------------ Node


def test_node_labels():
    name, labels = node_labels_from_dict({"kind": "Node", "metadata": {"name": "node-a.example", "labels": {
        "topology.kubernetes.io/zone": "zone-1", "kubernetes.io/hostname": "node-a", "empty": ""}}})
    assert name == "node-a.example"
    assert labels == {"topology.kubernetes.io/zone": "zone-1", "kubernetes.io/hostname": "node-a",
                      "empty": ""}
    assert node_labels_from_dict({"metadata": {"name": "n"}}) == ("n", {})


@pytest.mark.parametrize(("obj", "fragment"), [
    ({"metadata": {}}, "metadata.name: missing"),
    ({"metadata": {"name": "Node_A"}}, "DNS-1123 subdomain"),
    ({"metadata": {"name": "n", "labels": {"topology.kubernetes.io/zone": "zone 1"}}},
     "not a valid label value"),
    ({"metadata": {"name": "n", "labels": {"bad key": "v"}}}, "not a valid label key"),
    ({"metadata": {"name": "n", "labels": {"/x": "v"}}}, "not a valid label key"),
    ({"metadata": {"name": "n", "labels": {"a/b/c": "v"}}}, "not a valid label key"),
    ({"metadata": {"name": "n", "labels": {"k": 1}}}, "must be strings"),
    ("node", "must be an object"),
])
def test_invalid_nodes(obj, fragment):
    invalid(node_labels_from_dict, obj, fragment)


# ------------------------------------------------------------------ addresses the API server refuses

SPECIAL = [
    ("0.0.0.0", "unspecified_ip"), ("::", "unspecified_ip"),
    ("127.0.0.1", "loopback_ip"), ("127.0.0.2", "loopback_ip"), ("::1", "loopback_ip"),
    ("::ffff:127.0.0.1", "loopback_ip"),
    ("169.254.169.254", "link_local_ip"), ("fe80::1", "link_local_ip"),
    ("224.0.0.1", "multicast_ip"), ("239.1.2.3", "multicast_ip"), ("ff02::1", "multicast_ip"),
]


def _reference_special(ip: str) -> str | None:
    """What ``special_address`` says of ``ip``, from ``ipaddress``'s properties alone."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for category, prop in (("unspecified_ip", "is_unspecified"), ("loopback_ip", "is_loopback"),
                           ("link_local_ip", "is_link_local"), ("multicast_ip", "is_multicast")):
        if getattr(addr, prop):
            return category
    return None


def test_special_address_ipv4_fast_path_agrees_with_ipaddress():
    # The IPv4 path reads the packed bytes; every range edge and a sweep of first octets must
    # come out as ipaddress's properties say (and the message names the address as written).
    edges = ["0.0.0.0", "0.0.0.1", "0.255.255.255", "1.0.0.0", "126.255.255.255", "127.0.0.0",
             "127.255.255.255", "128.0.0.0", "169.253.255.255", "169.254.0.0", "169.254.255.255",
             "169.255.0.0", "168.254.0.1", "223.255.255.255", "224.0.0.0", "239.255.255.255",
             "240.0.0.0", "255.255.255.255", "10.244.1.2", "192.0.2.1"]
    sweep = [f"{a}.{b}.{c}.{d}" for a in range(256) for b, c, d in ((0, 0, 0), (254, 1, 2), (255, 255, 255))]
    for ip in edges + sweep:
        got = special_address(ip)
        assert (got[0] if got else None) == _reference_special(ip), ip
        if got:
            assert got[1].startswith(f"{ip} may not be ")


@pytest.mark.parametrize("text", ["10.0.0.01", "10.0.0", "10.0.0.256", " 10.0.0.1", "10.0.0.1\0", "1e1.0.0.1",
                                  "١٠.0.0.1", "0x0a.0.0.1", "10.0.0.1.2", ""])
def test_endpoint_address_not_in_canonical_dotted_quad_is_invalid(text):
    invalid(slice_from_dict, eps([{"addresses": [text]}]), "is not a valid IP address")


@pytest.mark.parametrize(("ip", "category"), SPECIAL)
def test_special_external_ip_is_refused_alone(ip, category):
    notes: list = []
    svc_obj = svc({"clusterIP": "10.96.0.10", "externalIPs": ["192.0.2.1", ip, "192.0.2.2"]})
    service = service_from_dict(svc_obj, notes)
    assert service is not None
    assert service.ports[0].external_ips == ("192.0.2.1", "192.0.2.2")
    (note,) = notes
    assert note.refused and note.category == category and note.path == "spec.externalIPs[1]"
    assert ip in note.reason or str(ipaddress.ip_address(ip)) in note.reason


@pytest.mark.parametrize(("ip", "category"), SPECIAL)
def test_special_lb_ingress_ip_is_refused_alone(ip, category):
    notes: list = []
    obj = svc({"type": "LoadBalancer"},
              status={"loadBalancer": {"ingress": [{"ip": ip}, {"ip": "198.51.100.7"}]}})
    service = service_from_dict(obj, notes)
    assert service is not None and service.ports[0].load_balancer_ips == ("198.51.100.7",)
    assert [(n.path, n.category) for n in notes] == [("status.loadBalancer.ingress[0].ip", category)]


@pytest.mark.parametrize(("ip", "category"), [s for s in SPECIAL if ":" not in s[0]])
def test_special_endpoint_address_is_refused_alone(ip, category):
    notes: list = []
    obj = eps([{"addresses": ["10.244.1.2"]}, {"addresses": [ip]}, {"addresses": ["10.244.1.3"]}])
    sl = slice_from_dict(obj, notes)
    assert sl is not None and [e.ip for e in sl.endpoints] == ["10.244.1.2", "10.244.1.3"]
    assert [(n.path, n.category, n.refused) for n in notes] == [("endpoints[1].addresses[0]", category, True)]


@pytest.mark.parametrize(("ip", "category"), [s for s in SPECIAL if ":" not in s[0]])
def test_special_endpoints_address_is_not_mirrored(ip, category):
    notes: list = []
    obj = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "demo"},
           "subsets": [{"addresses": [{"ip": "10.244.1.2"}, {"ip": ip}], "ports": [{"port": 10249}]}]}
    (sl,) = slices_from_endpoints(obj, notes)
    assert [e.ip for e in sl.endpoints] == ["10.244.1.2"]
    assert [(n.path, n.category) for n in notes] == [("subsets[0].addresses[1].ip", category)]


@pytest.mark.parametrize("ip", ["0.0.0.0", "127.0.0.1", "169.254.1.1", "224.0.0.5", "::1"])
def test_special_cluster_ip_refuses_the_service(ip):
    invalid(service_from_dict, svc({"clusterIP": ip, "clusterIPs": None}), "may not be")


def test_notes_of_an_invalid_object_are_not_reported():
    notes: list = []
    with pytest.raises(InvalidObject):
        service_from_dict(svc({"externalIPs": ["0.0.0.0"], "ports": [{"port": 70000}]}), notes)
    assert notes == []


# ------------------------------------------------------------------ nothing ignored silently (issue 21)


@pytest.mark.parametrize(("obj", "category"), [
    (svc({"clusterIP": "None"}), "headless"),
    (svc({"type": "ExternalName", "externalName": "example.com", "clusterIP": None}), "external_name"),
    (svc(meta={"labels": {"service.kubernetes.io/service-proxy-name": "other"}}), "service_proxy_name"),
    (svc(meta={"labels": {"service.kubernetes.io/headless": ""}}), "headless_label"),
])
def test_ignored_services_say_why(obj, category):
    notes: list = []
    assert service_from_dict(obj, notes) is None
    (note,) = notes
    assert note.category == category and not note.refused and note.reason


def test_ignored_slice_parts_say_why():
    notes: list = []
    assert slice_from_dict(eps(labels={}), notes) is None
    assert [n.category for n in notes] == ["no_service_label"]
    notes.clear()
    fqdn = eps()
    fqdn["addressType"] = "FQDN"
    assert slice_from_dict(fqdn, notes) is None and [n.category for n in notes] == ["fqdn"]
    notes.clear()
    sl = slice_from_dict(eps([{"addresses": []}, {"addresses": ["10.244.1.2"]}],
                             ports=[{"name": "a"}, {"name": "b", "port": 80}]), notes)
    assert sl is not None and len(sl.endpoints) == 1 and len(sl.ports) == 1
    assert sorted(n.category for n in notes) == ["no_address", "no_port_number"]


def test_service_without_cluster_ip_is_refused_for_the_api_source():
    invalid(service_from_dict, svc({"clusterIP": None}), "spec.clusterIP: missing")
    invalid(service_from_dict, svc({"clusterIP": ""}), "spec.clusterIP: missing")


def test_service_spec_keeps_what_allocation_needs():
    spec = service_spec(svc({"clusterIP": None, "type": "LoadBalancer", "externalTrafficPolicy": "Local",
                             "ipFamilies": ["IPv6"], "externalIPs": ["192.0.2.1", "2001:db8::1"],
                             "ports": [{"port": 80, "name": "a"},
                                       {"port": 81, "name": "b", "nodePort": 30001}]}))
    assert spec is not None and spec.cluster_ips == () and spec.families == (6,)
    assert spec.wanted_families((4,)) == (6,) and spec.wanted_families((4, 6)) == (6,)
    assert [spec.needs_node_port(p) for p in spec.ports] == [True, False]
    assert spec.needs_health_check_node_port and not spec.complete
    assert set(spec.explicit_ips()) == {"192.0.2.1", "2001:db8::1"}
    assert spec.explicit_ports() == (30001,)
    no_lb_ports = service_spec(svc({"type": "LoadBalancer", "allocateLoadBalancerNodePorts": False}))
    assert no_lb_ports is not None and no_lb_ports.complete


# ------------------------------------------------------------------ dual-stack Services (issue 16)


def test_ip_family_policy_defaults_as_the_api_server_does():
    assert service_spec(svc()).ip_family_policy == "SingleStack"
    two_ips = service_spec(svc({"clusterIPs": ["10.96.0.10", "fd00::10"]}))
    assert two_ips.ip_family_policy == "RequireDualStack" and two_ips.dual_stack
    two_fams = service_spec(svc({"clusterIP": None, "ipFamilies": ["IPv6", "IPv4"]}))
    assert two_fams.ip_family_policy == "RequireDualStack" and two_fams.families == (6, 4)
    prefer = service_spec(svc({"ipFamilyPolicy": "PreferDualStack"}))
    assert prefer.ip_family_policy == "PreferDualStack" and prefer.dual_stack


def test_dual_stack_service_with_matching_families_is_served_on_both_ips():
    port = one_port(svc({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:10:96::a"],
                         "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}))
    assert port.cluster_ips == ("10.96.0.10", "fd00:10:96::a")


def test_require_dual_stack_with_one_family_from_the_api_is_served_as_it_is():
    # A single-stack cluster's API server would have refused it; what came complete is served.
    port = one_port(svc({"clusterIPs": ["10.96.0.10"], "ipFamilies": ["IPv4"],
                         "ipFamilyPolicy": "RequireDualStack"}))
    assert port.cluster_ips == ("10.96.0.10",)


@pytest.mark.parametrize(("spec", "fragment"), [
    # ipFamilies order must match the cluster IPs' families.
    ({"clusterIPs": ["10.96.0.10", "fd00::10"], "ipFamilies": ["IPv6", "IPv4"]},
     "spec.clusterIPs[0]: expected an IPv6 address as spec.ipFamilies[0] says"),
    ({"clusterIPs": ["10.96.0.10"], "ipFamilies": ["IPv6"]}, "expected an IPv6 address"),
    ({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.10"], "ipFamilies": ["IPv6", "IPv6"]},
     "the same family twice"),
    ({"clusterIPs": ["10.96.0.10", "fd00::10"], "ipFamilyPolicy": "SingleStack"},
     "SingleStack with two cluster IPs"),
    ({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "SingleStack"}, "SingleStack with two IP families"),
    ({"ipFamilyPolicy": "DualStack"}, "unknown IP family policy"),
    ({"ipFamilyPolicy": ["SingleStack"]}, "unknown IP family policy"),
    ({"ipFamilies": ["ipv4"]}, "unknown IP family"),
    ({"ipFamilies": ["IPv4", "IPv6", "IPv4"]}, "too many entries"),
    ({"ipFamilies": "IPv4"}, "must be a list"),
])
def test_bad_dual_stack_services_are_refused(spec, fragment):
    obj = svc(spec)
    if "clusterIPs" in spec and "clusterIP" not in spec:
        obj["spec"]["clusterIP"] = spec["clusterIPs"][0]
    invalid(service_from_dict, obj, fragment)


def test_ipv6_external_and_lb_ips_are_kept_with_ipv4_ones():
    port = one_port(svc({"type": "LoadBalancer", "clusterIPs": ["10.96.0.10", "fd00::10"],
                         "externalIPs": ["2001:db8:2::1", "192.0.2.1"],
                         "loadBalancerSourceRanges": ["2001:db8:203::/48", "203.0.113.0/24"]},
                        status={"loadBalancer": {"ingress": [{"ip": "2001:db8:2::2"}, {"ip": "198.51.100.2"},
                                                             {"ip": "2001:db8:2::3", "ipMode": "Proxy"}]}}))
    assert port.external_ips == ("2001:db8:2::1", "192.0.2.1")
    assert port.load_balancer_ips == ("2001:db8:2::2", "198.51.100.2")
    v6 = port.for_family(6)
    assert v6 is not None and (v6.external_ips, v6.load_balancer_ips, v6.load_balancer_source_ranges) == (
        ("2001:db8:2::1",), ("2001:db8:2::2",), ("2001:db8:203::/48",))


def test_special_ipv6_external_and_lb_ips_are_refused_alone():
    notes: list = []
    service = service_from_dict(svc({"type": "LoadBalancer", "externalIPs": ["::1", "2001:db8:2::1"]},
                                    status={"loadBalancer": {"ingress": [{"ip": "fe80::1"}]}}), notes)
    assert service is not None and service.ports[0].external_ips == ("2001:db8:2::1",)
    assert service.ports[0].load_balancer_ips == ()
    assert sorted(n.category for n in notes) == ["link_local_ip", "loopback_ip"]
    assert all(n.refused for n in notes)


def test_endpoints_with_only_ipv6_addresses_make_one_ipv6_slice():
    slices = slices_from_endpoints(endpoints([
        {"addresses": [{"ip": "fd00:10:244:1::a"}, {"ip": "FD00:10:244:1::B"}], "ports": [{"port": 80}]}]))
    assert [(s.address_family, [e.ip for e in s.endpoints]) for s in slices] == [
        (6, ["fd00:10:244:1::a", "fd00:10:244:1::b"])]


def test_node_names_are_checked_and_shared_and_their_memory_is_bounded(monkeypatch):
    from proxyd.sources import convert

    monkeypatch.setattr(convert, "_NODE_NAMES", {})
    monkeypatch.setattr(convert, "_NODE_NAMES_MAX", 8)
    many = [{"addresses": [f"10.244.{i // 250}.{i % 250 + 1}"], "nodeName": f"node-{i}"} for i in range(50)]
    sl = slice_from_dict(eps(many))
    assert sl is not None and [e.node_name for e in sl.endpoints] == [f"node-{i}" for i in range(50)]
    assert len(convert._NODE_NAMES) == 8  # hostile variety does not grow it
    again = slice_from_dict(eps([{"addresses": ["10.244.9.1"], "nodeName": "node-3"},
                                 {"addresses": ["10.244.9.2"], "nodeName": "node-3"}]))
    assert again is not None and again.endpoints[0].node_name is again.endpoints[1].node_name
    # A bad name is refused whether or not the memory is full.
    invalid(slice_from_dict, eps([{"addresses": ["10.244.9.3"], "nodeName": "Bad_Node"}]),
            "endpoints[0].nodeName")


def test_the_short_way_for_usual_endpoints_gives_what_the_full_check_gives(monkeypatch):
    from proxyd.sources import convert

    addresses = [["10.244.1.2"], ["10.244.001.2"], ["127.0.0.1"], ["0.0.0.0"], ["224.0.0.1"], ["fd00::1"],
                 ["10.244.1.2", "10.244.1.3"], [], ["x"], [7], None, "10.244.1.2", ["10.244.1.2" * 3]]
    conditions = [None, {}, {"ready": True}, {"ready": False, "serving": True, "terminating": True},
                  {"ready": None, "serving": None, "terminating": None}, {"ready": 1}, {"serving": "yes"},
                  [], "ready"]
    nodes = [None, "", "node1", "node-2.example", "Bad_Node", 5, "a" * 300]
    extras = [{}, {"zone": "zone-a"}, {"zone": ""}, {"zone": None}, {"hints": {"forZones": [{"name": "a"}]}},
              {"hints": None}, {"targetRef": {"kind": "Pod"}}]
    entries: list[object] = [None, 5, "x", []]
    for address in addresses:
        for condition in conditions:
            for node in nodes:
                for extra in extras:
                    entry: dict = {"addresses": address, **extra}
                    if condition is not None:
                        entry["conditions"] = condition
                    if node is not None:
                        entry["nodeName"] = node
                    entries.append(entry)

    def outcome(entry: object, short: bool) -> object:
        if not short:
            monkeypatch.setattr(convert, "_plain_endpoint", lambda raw: None)
        monkeypatch.setattr(convert, "_NODE_NAMES", {"node1": "node1"})  # the short way knows node1
        notes: list = []
        try:
            return slice_from_dict(eps([entry]), notes), notes
        except InvalidObject as err:
            return err.reason
        finally:
            monkeypatch.undo()

    for entry in entries:
        assert outcome(entry, True) == outcome(entry, False), entry
    monkeypatch.setattr(convert, "_NODE_NAMES", {"node1": "node1"})
    short_taken = sum(convert._plain_endpoint(entry) is not None for entry in entries)
    assert short_taken >= 60  # the short way is exercised, not only the full one
