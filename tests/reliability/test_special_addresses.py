"""Addresses the API server refuses are refused here too (issue 14, item 5), in every mode.

kube-apiserver's ValidateEndpointIP / ValidateNonSpecialIP refuse
unspecified, loopback, link-local and link-local multicast addresses in
endpoints and externalIPs; kube-proxy never sees them. A manifests
directory has no API server in front, so proxyd applies the same rule
itself (``proxyd.sources.convert.special_address``), per address: the
address is refused with a log line and ``proxyd_rejected_objects_total``
with a reason, and the rest of the object keeps working. Before, an
endpoint on 127.0.0.1:10249 behind a NodePort handed proxyd's loopback-only
/metrics to any remote client, and externalIPs 0.0.0.0 / 127.0.0.2 /
169.254.169.254 made userspace mode listen on the wildcard address.
"""

from __future__ import annotations

import pytest

from tests.netns.holder import holder_addresses
from tests.netns.topology import (
    NODE_IP,
    Topology,
    endpoint,
    endpoint_slice,
    port,
    service,
)
from tests.reliability.harness import metric_sum, require_mode, start_daemon

GOOD_EXTERNAL = "192.0.2.10"
SPECIAL_EXTERNAL = ["0.0.0.0", "127.0.0.2", "169.254.169.254"]
SAVE_TOOLS = ("iptables-legacy-save", "iptables-nft-save")


def manifests(topo: Topology) -> None:
    topo.start_tcp_server("pod1", 8081)
    pod1 = topo.pod("pod1").ip
    topo.write_manifest("special.yaml", [
        # Endpoints on the node's own loopback: /metrics of proxyd itself.
        service("leak-slice", cluster_ip="10.96.0.20", type_="NodePort",
                ports=[port(80, target_port=10249, node_port=30249)]),
        endpoint_slice("leak-slice", ports=[{"port": 10249}], endpoints=[endpoint("127.0.0.1")]),
        service("leak-eps", cluster_ip="10.96.0.22", type_="NodePort",
                ports=[port(80, target_port=10249, node_port=30250)]),
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "leak-eps", "namespace": "default"},
         "subsets": [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"port": 10249, "protocol": "TCP"}]}]},
        # External IPs that would capture the wildcard, loopback and the metadata service.
        service("ext", cluster_ip="10.96.0.21", external_ips=[*SPECIAL_EXTERNAL, GOOD_EXTERNAL],
                ports=[port(8081)]),
        endpoint_slice("ext", ports=[{"port": 8081}], endpoints=[endpoint(pod1)]),
    ])



@pytest.mark.parametrize("mode", ["userspace", "iptables"])
def test_addresses_the_api_server_refuses_are_refused_per_address(topology: Topology, mode: str,
                                                                    figures: dict) -> None:
    require_mode(mode)
    manifests(topology)
    proc = start_daemon(topology, mode)

    # The loopback endpoint is gone: from outside, the NodePort refuses instead of serving /metrics.
    for node_port in (30249, 30250):
        status, body = topology.http_get(topology.client, NODE_IP, node_port, "/metrics", timeout=3)
        assert status != 200 and "kubeproxy_" not in body, (node_port, status, body[:200])
    # The rest of the object is kept: the good external IP and the cluster IP are served.
    assert topology.hello(topology.client, GOOD_EXTERNAL, 8081).pod == "pod1"
    assert topology.hello(topology.pod("pod3").ns, "10.96.0.21", 8081).pod == "pod1"

    refused = {
        (kind, reason): metric_sum(topology, "proxyd_rejected_objects_total",
                                   {"source": "manifests", "kind": kind, "reason": reason})
        for kind, reason in (("EndpointSlice", "loopback_ip"), ("Endpoints", "loopback_ip"),
                             ("Service", "unspecified_ip"), ("Service", "loopback_ip"),
                             ("Service", "link_local_ip"))}
    assert all(v == 1 for v in refused.values()), refused
    log = topology.log_of(proc)
    for fragment in ("EndpointSlice default/leak-slice-slice endpoints[0].addresses[0]: 127.0.0.1 may not be "
                     "in the loopback range",
                     "Endpoints default/leak-eps subsets[0].addresses[0].ip: 127.0.0.1 may not be in the "
                     "loopback",
                     "Service default/ext spec.externalIPs[0]: 0.0.0.0 may not be unspecified",
                     "Service default/ext spec.externalIPs[1]: 127.0.0.2 may not be in the loopback range",
                     "Service default/ext spec.externalIPs[2]: 169.254.169.254 may not be in the link-local"):
        assert log.count(fragment) == 1, fragment

    if mode == "userspace":
        listening = topology.ns_run(topology.node, ["ss", "-Hltn"]).stdout
        assert not [line for line in listening.splitlines()
                    if line.split()[3] in ("0.0.0.0:8081", "*:8081", "[::]:8081")], listening
        held = holder_addresses(topology)
        assert GOOD_EXTERNAL in held and not held & {"0.0.0.0", "127.0.0.2", "169.254.169.254"}, held
    else:
        rules = "".join(topology.ns_run(topology.node, [tool], check=False).stdout for tool in SAVE_TOOLS)
        for text in ("169.254.169.254", "127.0.0.2", "0.0.0.0/32", "127.0.0.1:10249"):
            assert text not in rules, text
        assert GOOD_EXTERNAL in rules
    figures.update({"refused_addresses": sum(refused.values()), "metrics_exposed": False})
    assert topology.stop_proxyd(proc) == 0
