"""Allocation of cluster IPs and node ports for the manifests source (issue 21).

Deterministic (a function of the set of services, not their order), inside
the ranges, never an explicitly set address or port, never one value twice.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.model import Protocol, ServiceName, ServiceType
from proxyd.sources.allocate import (
    Allocator,
    RangeError,
    Ranges,
    _probe,
    _static_band,
    allocate,
    missing,
    parse_cluster_ranges,
    parse_port_range,
)
from proxyd.sources.convert import PortSpec, ServiceSpec, service_spec

V4 = ipaddress.ip_network("10.96.0.0/24")
V6 = ipaddress.ip_network("fd00:96::/120")
RANGES = Ranges(cluster=(V4, V6), node_ports=(30000, 30099))


def spec(name: str, *, ns: str = "default", ip: str | None = None, type_: ServiceType = ServiceType.NODE_PORT,
         node_ports: tuple[int, ...] = (0,), families: tuple[int, ...] = (), external: tuple[str, ...] = (),
         local: bool = False, hc: int = 0, policy: str = "SingleStack") -> ServiceSpec:
    ports = tuple(PortSpec(f"p{i}", Protocol.TCP, 80 + i, 8080, np) for i, np in enumerate(node_ports))
    return ServiceSpec(name=ServiceName(ns, name), type=type_, cluster_ips=(ip,) if ip else (),
                       families=families, ports=ports, external_ips=external,
                       external_policy="Local" if local else "Cluster", health_check_node_port=hc,
                       ip_family_policy=policy)


# ------------------------------------------------------------------ flags


def test_parse_cluster_ranges():
    assert parse_cluster_ranges("10.96.0.0/12") == (ipaddress.ip_network("10.96.0.0/12"),)
    assert parse_cluster_ranges(" 10.96.0.0/12 , fd00::/108") == (ipaddress.ip_network("10.96.0.0/12"),
                                                                  ipaddress.ip_network("fd00::/108"))
    assert parse_cluster_ranges("") == ()


@pytest.mark.parametrize(("text", "fragment"), [
    ("10.96.0.0/33", "not a CIDR"), ("banana", "not a CIDR"), ("10.0.0.0/8,10.1.0.0/16", "one range per"),
    ("10.0.0.0/31", "too small"), ("10.0.0.1/32", "too small"),
])
def test_bad_cluster_ranges(text, fragment):
    with pytest.raises(RangeError, match=fragment):
        parse_cluster_ranges(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("30000-32767", (30000, 32767)), ("30000+2767", (30000, 32767)), ("31000", (31000, 31000)),
    (" 1-65535 ", (1, 65535)),
])
def test_parse_port_range(text, expected):
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["", "0-10", "100-50", "30000-70000", "a-b", "1+", "-5"])
def test_bad_port_range(text):
    with pytest.raises(RangeError):
        parse_port_range(text)


# ------------------------------------------------------------------ the probe order


@pytest.mark.parametrize("size", [1, 2, 15, 16, 17, 254, 4094, 65534])
def test_probe_visits_every_offset_once_upper_band_first(size):
    band = _static_band(size)
    for start in (0, 1, 7, 2**63 - 1):
        order = list(_probe(start, size))
        assert sorted(order) == list(range(size))
        assert all(o >= band for o in order[:size - band])  # the dynamic band first, as kube-apiserver


def test_static_band_is_kube_apiservers():
    # kube: min(max(16, size/16), 256), none below 16; a range no bigger than its band is all dynamic.
    assert [_static_band(n) for n in (15, 16, 17, 254, 4094, 65534, 2**20)] == [0, 0, 16, 16, 255, 256, 256]


# ------------------------------------------------------------------ allocation


def test_allocates_cluster_ip_and_node_port_in_range():
    result = allocate([spec("web")], RANGES)
    done = result.specs[ServiceName("default", "web")]
    ip = ipaddress.ip_address(done.cluster_ips[0])
    assert ip in V4 and ip not in (V4.network_address, V4.broadcast_address)
    assert 30000 <= done.ports[0].node_port <= 30099
    got = result.assigned[ServiceName("default", "web")]
    assert got.cluster_ip == done.cluster_ips[0]
    assert got.node_ports == (("p0", Protocol.TCP, done.ports[0].node_port),)


def test_ip_families_choose_the_range():
    result = allocate([spec("v6", families=(6,)), spec("dual", families=(6, 4), policy="RequireDualStack")],
                      RANGES)
    assert [ipaddress.ip_address(ip) in V6 for ip in result.specs[ServiceName("default", "v6")].cluster_ips
            ] == [True]
    v6, v4 = result.specs[ServiceName("default", "dual")].cluster_ips
    assert ipaddress.ip_address(v6) in V6 and ipaddress.ip_address(v4) in V4


def test_missing_names_the_flag():
    assert "--service-cluster-ip-range" in missing(spec("web"), Ranges())
    assert "no IPv6 range" in missing(spec("web", families=(6,)), Ranges(cluster=(V4,)))
    assert missing(spec("web", ip="10.96.0.5"), Ranges()) is None
    assert missing(spec("web"), RANGES) is None


def test_complete_services_are_left_alone_and_health_check_port_allocated():
    explicit = spec("explicit", ip="10.96.0.5", node_ports=(30005,))
    lb = spec("lb", ip="10.96.0.6", type_=ServiceType.LOAD_BALANCER, node_ports=(30006,), local=True)
    result = allocate([explicit, lb], RANGES)
    assert result.specs[explicit.name] == explicit and explicit.name not in result.assigned
    hc = result.specs[lb.name].health_check_node_port
    assert 30000 <= hc <= 30099 and hc not in (30005, 30006)
    assert result.assigned[lb.name].health_check_node_port == hc


def test_full_ranges_fail_named():
    tiny = Ranges(cluster=(ipaddress.ip_network("10.0.0.0/30"),), node_ports=(30000, 30001))
    result = allocate([spec(f"s{i}", node_ports=()) for i in range(3)], tiny)
    assert len(result.specs) == 2 and len(result.failures) == 1
    (why,) = result.failures.values()
    assert "--service-cluster-ip-range 10.0.0.0/30 is full" in why
    result = allocate([spec(f"s{i}", ip=f"10.96.0.{i + 1}", node_ports=(0, 0)) for i in range(2)], tiny)
    assert len(result.specs) == 1 and "--service-node-port-range 30000-30001 is full" in \
        next(iter(result.failures.values()))


def test_explicit_address_takes_the_slot_and_the_allocated_one_moves():
    first = allocate([spec("web")], RANGES).specs[ServiceName("default", "web")]
    taken = first.cluster_ips[0]
    again = allocate([spec("web"), spec("dns", ip=taken, node_ports=(first.ports[0].node_port,))], RANGES)
    moved = again.specs[ServiceName("default", "web")]
    assert moved.cluster_ips[0] != taken and moved.ports[0].node_port != first.ports[0].node_port


def test_kubectl_style_service_through_the_allocator_builds_a_service():
    meta = {"name": "web-nodeport", "labels": {"app": "x"}}
    raw = {"apiVersion": "v1", "kind": "Service", "metadata": meta,
           "spec": {"ports": [{"name": "80-8080", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                    "selector": {"app": "x"}, "type": "NodePort"}, "status": {"loadBalancer": {}}}
    parsed = service_spec(raw)
    assert parsed is not None and not parsed.complete
    allocator = Allocator(RANGES)
    (service,) = allocator.services([parsed])
    assert service.ports[0].cluster_ip in {str(ip) for ip in V4.hosts()}
    assert 30000 <= service.ports[0].node_port <= 30099
    # The cache hands back the very same object when nothing changed.
    assert allocator.services([parsed])[0] is service


# ------------------------------------------------------------------ properties


names = st.text(alphabet="abcdefghij-", min_size=1, max_size=6).filter(lambda s: s[0] != "-" and s[-1] != "-")


@st.composite
def directories(draw: st.DrawFn) -> list[ServiceSpec]:
    """Up to 60 services in a /26 and 120 node ports: collisions are the rule, not the exception."""
    out: dict[ServiceName, ServiceSpec] = {}
    for _ in range(draw(st.integers(0, 60))):
        name = draw(names)
        ns = draw(st.sampled_from(["default", "kube-system", "web"]))
        explicit_ip = draw(st.one_of(st.none(), st.integers(1, 62).map(lambda i: f"10.0.0.{i}")))
        ext = tuple(draw(st.lists(st.integers(1, 62).map(lambda i: f"10.0.0.{i}"), max_size=2)))
        port_values = st.one_of(st.just(0), st.integers(30000, 30119))
        nports = tuple(draw(st.lists(port_values, min_size=1, max_size=3)))
        typ = draw(st.sampled_from(list(ServiceType)))
        if typ is ServiceType.CLUSTER_IP:
            nports = tuple(0 for _ in nports)
        hc = draw(st.one_of(st.just(0), st.integers(30000, 30119)))
        local = typ is ServiceType.LOAD_BALANCER and draw(st.booleans())
        out[ServiceName(ns, name)] = spec(name, ns=ns, ip=explicit_ip, type_=typ, node_ports=nports,
                                          external=ext, local=local, hc=hc if local else 0)
    return list(out.values())


SMALL = Ranges(cluster=(ipaddress.ip_network("10.0.0.0/26"),), node_ports=(30000, 30119))


@settings(max_examples=150, deadline=None)
@given(directories(), st.randoms(use_true_random=False))
def test_allocation_never_hands_out_explicit_values_and_ignores_order(specs, rnd):
    result = allocate(specs, SMALL)
    explicit_ips = {ip for s in specs for ip in s.explicit_ips()}
    explicit_ports = {p for s in specs for p in s.explicit_ports()}
    given_ips = [a.cluster_ip for a in result.assigned.values() if a.cluster_ip]
    given_ports = [p for a in result.assigned.values() for *_, p in a.node_ports]
    given_ports += [a.health_check_node_port for a in result.assigned.values() if a.health_check_node_port]
    assert not set(given_ips) & explicit_ips
    assert not set(given_ports) & explicit_ports
    assert len(given_ips) == len(set(given_ips)) and len(given_ports) == len(set(given_ports))
    net = SMALL.cluster[0]
    assert all(ipaddress.ip_address(ip) in net and ipaddress.ip_address(ip) not in
               (net.network_address, net.broadcast_address) for ip in given_ips)
    assert all(30000 <= p <= 30119 for p in given_ports)
    # Every service is either complete or named in failures.
    for s in specs:
        assert (s.name in result.specs) != (s.name in result.failures)
        if s.name in result.specs:
            assert result.specs[s.name].complete
    # The same directory in another order (another VM, a restart) gives the same answer.
    shuffled = list(specs)
    rnd.shuffle(shuffled)
    other = allocate(shuffled, SMALL)
    assert other.specs == result.specs and other.failures == result.failures


WIDE = Ranges(cluster=(ipaddress.ip_network("10.0.0.0/16"),), node_ports=(30000, 32767))


def _values(done: ServiceSpec) -> set[object]:
    return {*done.cluster_ips, *(p.node_port for p in done.ports), done.health_check_node_port} - {0}


@settings(max_examples=60, deadline=None)
@given(directories(), names)
def test_an_addition_moves_others_only_through_collisions(specs, extra):
    """A new service that sorts last moves nobody; one that sorts first only those whose slot it took."""
    before = allocate(specs, WIDE)
    assert allocate([*specs, spec(extra, ns="zz-last")], WIDE).specs.items() >= before.specs.items()
    first = spec(extra, ns="aa-first")
    after = allocate([*specs, first], WIDE)
    moved = {n for n, s in before.specs.items() if after.specs.get(n) != s}
    # Every value a moved service lost is now held by the newcomer or another moved service.
    holders = set().union(*(_values(after.specs[n]) for n in moved | {first.name} if n in after.specs))
    for name in moved:
        assert _values(before.specs[name]) - _values(after.specs.get(name, before.specs[name])) <= holders


@settings(max_examples=40, deadline=None)
@given(st.lists(directories(), min_size=1, max_size=4))
def test_the_caching_allocator_answers_as_the_pure_function(steps):
    """A source re-merging after each change: caches by identity never change the answer."""
    from proxyd.sources.convert import build_service

    allocator = Allocator(SMALL)
    kept: dict[ServiceName, ServiceSpec] = {}
    for specs in steps:
        # Specs whose content did not change keep their object, as a file that was not re-read does.
        current = [kept[s.name] if kept.get(s.name) == s else s for s in specs]
        kept = {s.name: s for s in current}
        expected = allocate(current, SMALL)
        got = {s.name: s for s in allocator.services(current)}
        assert got == {name: build_service(done) for name, done in expected.specs.items()}
        assert allocator.services(current) == list(got.values())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(directories(), st.booleans()), min_size=1, max_size=6))
def test_incremental_update_hands_out_exactly_what_changed(steps):
    """The manifests source's merge: after each change, ``update`` returns only the Services that
    differ, and what it handed out so far equals allocating the whole directory from scratch.

    Steps whose every spec is complete (a kubectl dump) take the path that builds only the changed
    specs; the others, and the step after them, allocate across the whole set.
    """
    from proxyd.sources.convert import build_service

    allocator = Allocator(SMALL)
    held: dict[ServiceName, object] = {}
    before: dict[ServiceName, ServiceSpec] = {}
    for specs, complete in steps:
        if complete:
            specs = list(allocate(specs, SMALL).specs.values())
        # Specs whose content did not change keep their object, as a file that was not re-read does.
        now = {s.name: before[s.name] if before.get(s.name) == s else s for s in specs}
        changed = {n for n in now.keys() | before.keys() if now.get(n) is not before.get(n)}
        for name, svc in allocator.update(now, changed).items():
            assert held.get(name) != svc, name  # nothing handed out again unchanged
            if svc is None:
                del held[name]
            else:
                held[name] = svc
        expected = allocate(now.values(), SMALL)
        assert held == {name: build_service(done) for name, done in expected.specs.items()}
        for name, svc in held.items():
            assert allocator.served(name) == svc
        before = now


# ------------------------------------------------------------------ dual-stack (issue 16)


def families_of(ips: tuple[str, ...]) -> list[int]:
    return [ipaddress.ip_address(ip).version for ip in ips]


@pytest.mark.parametrize(("policy", "families", "ranges", "expected"), [
    # SingleStack or absent: one of the requested family, else of the first range's.
    ("SingleStack", (), (V4, V6), [4]),
    ("SingleStack", (), (V6, V4), [6]),
    ("SingleStack", (6,), (V4, V6), [6]),
    # Dual-stack policies: one of each family the ranges have, primary = ipFamilies[0] or the first range's.
    ("PreferDualStack", (), (V4, V6), [4, 6]),
    ("PreferDualStack", (), (V6, V4), [6, 4]),
    ("PreferDualStack", (6,), (V4, V6), [6, 4]),
    ("RequireDualStack", (6, 4), (V4, V6), [6, 4]),
    ("RequireDualStack", (), (V4, V6), [4, 6]),
    # PreferDualStack in a single-stack cluster: single-stack.
    ("PreferDualStack", (), (V4,), [4]),
    ("PreferDualStack", (), (V6,), [6]),
])
def test_dual_stack_policies_allocate_one_ip_per_family(policy, families, ranges, expected):
    name = ServiceName("default", "web")
    r = Ranges(cluster=ranges)
    s = spec("web", families=families, policy=policy)
    assert missing(s, r) is None
    result = allocate([s], r)
    done = result.specs[name]
    assert families_of(done.cluster_ips) == expected
    assert result.assigned[name].cluster_ips == done.cluster_ips
    assert all(ipaddress.ip_address(ip) in (V4 if v == 4 else V6)
               for ip, v in zip(done.cluster_ips, expected, strict=True))
    # Built: primary first, the other family's as the secondary.
    service = Allocator(r).services([s])[0]
    assert service.ports[0].cluster_ips == done.cluster_ips


def test_require_dual_stack_with_one_range_is_refused_with_a_note():
    s = spec("web", policy="RequireDualStack")
    why = missing(s, Ranges(cluster=(V4,)))
    assert why is not None and "RequireDualStack" in why and "only an IPv4 range" in why
    assert ServiceName("default", "web") not in allocate([s], Ranges(cluster=(V4,))).specs
    assert missing(s, RANGES) is None


def test_a_family_without_a_range_is_refused():
    why = missing(spec("web", families=(6,)), Ranges(cluster=(V4,)))
    assert why is not None and "no IPv6 range" in why


def test_a_manifest_s_cluster_ips_are_kept_and_never_handed_out():
    base = spec("pinned", policy="RequireDualStack")
    pinned = ServiceSpec(**{**{f: getattr(base, f) for f in ServiceSpec.__slots__},
                            "cluster_ips": ("fd00:96::77", "10.96.0.77")})
    # IPv4 .77/.78 usable, IPv6 ::75-::77 usable: the pinned ones are never handed out.
    tiny = Ranges(cluster=(ipaddress.ip_network("10.96.0.76/30"), ipaddress.ip_network("fd00:96::74/126")))
    result = allocate([pinned, spec("other", policy="PreferDualStack")], tiny)
    assert result.specs[ServiceName("default", "pinned")].cluster_ips == ("fd00:96::77", "10.96.0.77")
    assert result.assigned[ServiceName("default", "pinned")].cluster_ips == ()
    other = result.specs[ServiceName("default", "other")].cluster_ips
    assert other[0] == "10.96.0.78" and other[1] in ("fd00:96::75", "fd00:96::76")


def test_a_full_range_of_one_family_refuses_the_dual_stack_service_and_takes_nothing():
    tiny6 = ipaddress.ip_network("fd00:96::/127")  # one usable address (the first is never handed out)
    r = Ranges(cluster=(V4, tiny6))
    first = allocate([spec("a", policy="RequireDualStack")], r)
    assert families_of(first.specs[ServiceName("default", "a")].cluster_ips) == [4, 6]
    both = allocate([spec("a", policy="RequireDualStack"), spec("b", policy="RequireDualStack")], r)
    b = ServiceName("default", "b")
    assert b in both.failures and "is full" in both.failures[b]
    # b's IPv4 address was given back: a third service sorting after b gets the same IPv4 slot b would.
    single = allocate([spec("a", policy="RequireDualStack"), spec("c")], r)
    with_b = allocate([spec("a", policy="RequireDualStack"), spec("b", policy="RequireDualStack"),
                       spec("c")], r)
    c = ServiceName("default", "c")
    assert with_b.specs[c].cluster_ips == single.specs[c].cluster_ips


def test_service_spec_from_a_dual_stack_manifest_is_allocated_both_families():
    raw = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv6"], "ports": [{"port": 80}]}}
    s = service_spec(raw)
    assert s is not None and s.dual_stack and s.families == (6,)
    done = allocate([s], RANGES).specs[ServiceName("default", "web")]
    assert families_of(done.cluster_ips) == [6, 4]
