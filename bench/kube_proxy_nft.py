"""kube-proxy's nftables ruleset shape for a ProxyState: the anchor that nftables mode is measured against.

kube-proxy's nftables proxier (pkg/proxy/nftables/proxier.go) writes, per
service port, a ``service-<hash>-<ns>/<name>/<proto>/<port>`` chain (the
masquerade check, then ``numgen random mod N vmap { … }`` to one chain per
endpoint) and per endpoint an ``endpoint-<hash>-…__<ip>/<port>`` chain
(hairpin masquerade, then ``dnat``), plus one ``service-ips`` verdict map
element per ClusterIP. This module renders that shape for the bench's
ClusterIP-only states (no NodePorts, LBs or affinity) so ``nft -f`` can
load it and its time can be compared with proxyd's compact layout, in the
same namespace and run. Written from kube-proxy's documented layout, not
copied from its code; only the parts that drive the cost (chains,
anonymous maps, rules) are reproduced.
"""

from __future__ import annotations

import base64
import hashlib

from proxyd.model import ProxyState

TABLE = "ip kube-proxy"


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest())[:8].decode()


def ruleset(state: ProxyState, *, cluster_cidr: str = "10.0.0.0/8") -> str:
    out = [
        f"add table {TABLE}",
        f"add chain {TABLE} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f"add chain {TABLE} nat-output {{ type nat hook output priority -100 ; }}",
        f"add chain {TABLE} nat-postrouting {{ type nat hook postrouting priority 100 ; }}",
        f"add chain {TABLE} services",
        f"add chain {TABLE} mark-for-masquerade",
        f"add chain {TABLE} masquerading",
        f"add set {TABLE} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}",
        f"add map {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
        f"add rule {TABLE} nat-prerouting jump services",
        f"add rule {TABLE} nat-output jump services",
        f"add rule {TABLE} nat-postrouting jump masquerading",
        f"add rule {TABLE} mark-for-masquerade mark set mark or 0x4000",
        f"add rule {TABLE} masquerading mark and 0x4000 == 0 return",
        f"add rule {TABLE} masquerading mark set mark xor 0x4000",
        f"add rule {TABLE} masquerading masquerade fully-random",
        f"add rule {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips",
    ]
    elements = []
    ips = []
    for name in sorted(state.service_ports):
        sp = state.service_ports[name]
        proto = sp.protocol.value.lower()
        base = f"{name.namespace}/{name.name}/{proto}/{name.port}"
        chain = f"service-{_hash(base)}-{base}"
        out.append(f"add chain {TABLE} {chain}")
        out.append(f"add rule {TABLE} {chain} ip daddr {sp.cluster_ip} {proto} dport {sp.port} "
                   f"ip saddr != {cluster_cidr} jump mark-for-masquerade")
        targets = []
        for ep in state.endpoints.get(name, ()):
            ep_base = f"{base}__{ep.ip}/{ep.port}"
            ep_chain = f"endpoint-{_hash(ep_base)}-{ep_base}"
            out.append(f"add chain {TABLE} {ep_chain}")
            out.append(f"add rule {TABLE} {ep_chain} ip saddr {ep.ip} jump mark-for-masquerade")
            out.append(f"add rule {TABLE} {ep_chain} meta l4proto {proto} dnat to {ep.ip}:{ep.port}")
            targets.append(ep_chain)
        if targets:
            spread = ", ".join(f"{i} : goto {c}" for i, c in enumerate(targets))
            out.append(f"add rule {TABLE} {chain} numgen random mod {len(targets)} vmap {{ {spread} }}")
        elements.append(f"{sp.cluster_ip} . {proto} . {sp.port} : goto {chain}")
        ips.append(sp.cluster_ip)
    for i in range(0, len(elements), 4096):
        out.append(f"add element {TABLE} service-ips {{ {', '.join(elements[i:i + 4096])} }}")
        out.append(f"add element {TABLE} cluster-ips {{ {', '.join(ips[i:i + 4096])} }}")
    return "\n".join(out) + "\n"
