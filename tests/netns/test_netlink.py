"""proxyd.netlink against the real kernel in a throw-away namespace: addresses, local routes, ipset entries.

A namespace of its own (``pxd-nl-<hex>``) with one port-less bridge; the
batch sockets are opened inside it (setns on the test thread, then back), so
nothing touches the host's namespace. IPVS batches need a kernel with IPVS
and are covered by the guest suite (tests/vm/).
"""

from __future__ import annotations

import errno
import logging
import secrets
import socket
from collections.abc import Iterator

import pytest

from proxyd import metrics
from proxyd.modes.iptables.conntrack import delete_request
from proxyd.modes.ipvs.applier import IpvsApplier, ipset_request
from proxyd.modes.ipvs.planner import CLUSTER_IP, Op
from proxyd.netlink import (
    NETLINK_NETFILTER,
    NETLINK_ROUTE,
    BatchSocket,
    address_request,
    dump_addresses,
    dump_local_routes,
    local_route_request,
)
from tests.netns.topology import in_netns, run

BRIDGE = "pxdnl0"


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"pxd-nl-{secrets.token_hex(3)}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "-n", name, "link", "set", BRIDGE, "up"])
        yield name
    finally:
        run(["ip", "netns", "del", name], check=False)


def batch_socket(ns: str, protocol: int, kind: str, **kwargs: int) -> BatchSocket:
    with in_netns(ns):
        return BatchSocket(protocol, kind=kind, **kwargs)


def bridge_index(ns: str) -> int:
    out = run(["ip", "-n", ns, "-o", "link", "show", BRIDGE]).stdout
    return int(out.split(":", 1)[0])


def held(ns: str) -> set[str]:
    out = run(["ip", "-n", ns, "-o", "addr", "show", "dev", BRIDGE]).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()
            if line.split()[2] in ("inet", "inet6") and not line.split()[3].startswith("fe80")}


def failures_counted(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("proxyd_netlink_failures_total", {"kind": kind}) or 0.0


def test_one_bad_address_in_the_middle_fails_alone(ns: str, caplog: pytest.LogCaptureFixture) -> None:
    index = bridge_index(ns)
    good = [f"192.0.2.{i}" for i in range(1, 41)]
    bad = address_request(True, index + 1000, "198.51.100.7")  # no such link
    requests = [address_request(True, index, ip) for ip in good[:20]] + [bad]
    requests += [address_request(True, index, ip) for ip in good[20:]]
    before = failures_counted("address")
    with batch_socket(ns, NETLINK_ROUTE, "address") as sock, caplog.at_level(logging.ERROR):
        result = sock.run(requests)
    assert result.applied == 40 and result.chunks == 1
    assert [(f.subject, f.code) for f in result.failures] == [("198.51.100.7", errno.ENODEV)]
    assert held(ns) == set(good)
    assert "198.51.100.7" in caplog.text and "No such device" in caplog.text
    assert failures_counted("address") == before + 1


def test_harmless_errors_count_as_applied(ns: str) -> None:
    index = bridge_index(ns)
    with batch_socket(ns, NETLINK_ROUTE, "address") as sock:
        sock.run([address_request(True, index, "192.0.2.1")])
        again = sock.run([address_request(True, index, "192.0.2.1"),  # EEXIST
                          address_request(False, index, "192.0.2.99")])  # EADDRNOTAVAIL
        assert again.applied == 2 and not again.failures
        v6 = sock.run([address_request(True, index, "2001:db8::5")])
        assert v6.applied == 1
        found = {(fam, plen, ip) for fam, plen, ip in dump_addresses(sock, index)}
    assert (socket.AF_INET, 32, "192.0.2.1") in found and (socket.AF_INET6, 128, "2001:db8::5") in found


def test_batch_bigger_than_the_socket_buffers(ns: str) -> None:
    """4,000 requests in chunks whose answers overflow a tiny receive buffer: all apply, none twice."""
    index = bridge_index(ns)
    ips = [f"10.{20 + i // 65536}.{(i // 256) % 256}.{i % 256}" for i in range(4000)]
    # 2,000 requests per chunk would be ~1.9 MiB of answers against a few KiB of buffer,
    # and 64 KiB of requests per send: many chunks, many lost answers.
    with batch_socket(ns, NETLINK_ROUTE, "address", rcvbuf=4096, chunk_messages=2000) as sock:
        result = sock.run([address_request(True, index, ip) for ip in ips])
        assert result.applied == 4000 and not result.failures
        assert result.resent > 0 and result.chunks > 2
        assert len(dump_addresses(sock, index)) >= 4000
        removed = sock.run([address_request(False, index, ip) for ip in ips])
        assert removed.applied == 4000 and not removed.failures
    assert held(ns) == set()


def test_ipset_batch_with_a_refused_entry(ns: str, caplog: pytest.LogCaptureFixture) -> None:
    run(["ip", "netns", "exec", ns, "ipset", "create", "PXD-T-IPPORT", "hash:ip,port"])
    run(["ip", "netns", "exec", ns, "ipset", "create", "PXD-T-PORTS", "bitmap:port", "range", "0-1000"])
    entries = [f"10.96.{i // 256}.{i % 256},tcp:80" for i in range(1, 301)]
    requests = [ipset_request(True, "PXD-T-IPPORT", "hash:ip,port", e) for e in entries[:150]]
    requests.append(ipset_request(True, "PXD-T-PORTS", "bitmap:port", "30080"))  # out of the set's range
    requests += [ipset_request(True, "PXD-T-IPPORT", "hash:ip,port", e) for e in entries[150:]]
    requests.append(ipset_request(True, "PXD-T-PORTS", "bitmap:port", "443"))
    # an IPv6 entry in an IPv4 set: the kernel refuses it
    requests.append(ipset_request(True, "PXD-T-IPPORT", "hash:ip,port", "2001:db8::1,tcp:80", family=6))
    with pytest.raises(ValueError):  # not an IP: refused before any request is packed (the applier logs it)
        ipset_request(True, "PXD-T-IPPORT", "hash:ip,port", "10.96.0.256,tcp:80")
    before = failures_counted("ipset")
    with batch_socket(ns, NETLINK_NETFILTER, "ipset") as sock, caplog.at_level(logging.ERROR):
        result = sock.run(requests)
        assert result.applied == 301
        refused = {f.subject for f in result.failures}
        assert refused == {"PXD-T-PORTS 30080", "PXD-T-IPPORT 2001:db8::1,tcp:80"}
        # deleting an absent entry is harmless; deleting present ones works in the same batch
        removal = sock.run([ipset_request(False, "PXD-T-IPPORT", "hash:ip,port", e) for e in entries[:10]]
                           + [ipset_request(False, "PXD-T-IPPORT", "hash:ip,port", "10.1.1.1,udp:53")])
        assert removal.applied == 11 and not removal.failures
    assert failures_counted("ipset") == before + 2 and "PXD-T-PORTS 30080" in caplog.text
    listed = run(["ip", "netns", "exec", ns, "ipset", "list", "PXD-T-IPPORT"]).stdout
    members = {line.strip() for line in listed.split("Members:", 1)[1].splitlines() if line.strip()}
    assert members == set(entries[10:])
    ports = run(["ip", "netns", "exec", ns, "ipset", "list", "PXD-T-PORTS"]).stdout
    assert ports.split("Members:", 1)[1].split() == ["443"]


def test_ipvs_applier_runs_set_operations_as_one_batch(ns: str, caplog: pytest.LogCaptureFixture) -> None:
    """The ipvs applier's operations on proxyd's own sets (IPVS itself needs the guest)."""
    applier = IpvsApplier()
    try:
        with in_netns(ns):
            applier.ensure_sets()
            good = [Op("set_add", (CLUSTER_IP, f"10.96.0.{i},tcp:80")) for i in range(1, 101)]
            bad = Op("set_add", (CLUSTER_IP, "10.96.0.1,icmp:80"))  # not a protocol the set takes
            too_big = Op("set_add", (CLUSTER_IP, "10.96.0.1,tcp:70000"))  # fails inside the batch
            with caplog.at_level(logging.ERROR):
                failed = applier.apply([*good[:50], bad, too_big, *good[50:]])
            assert failed == {bad, too_big} and "icmp" in caplog.text and "70000" in caplog.text
            assert applier.read_sets()[CLUSTER_IP] == {op.args[1] for op in good}
            assert applier.apply([Op("set_del", op.args) for op in good[:10]]) == set()
            assert len(applier.read_sets()[CLUSTER_IP]) == 90
    finally:
        applier._close_sockets()


def test_conntrack_deletions_in_one_batch(ns: str) -> None:
    """Many stale UDP entries go in one batch; one already gone is not an error."""
    for sport in range(1000, 1200):
        run(["ip", "netns", "exec", ns, "conntrack", "-I", "-s", "192.0.2.1", "-d", "192.0.2.2", "-p", "udp",
             "--sport", str(sport), "--dport", "53", "--timeout", "300"])
    requests = [delete_request(socket.AF_INET, "192.0.2.1", sport, "192.0.2.2", 53)
                for sport in range(1000, 1201)]
    with batch_socket(ns, NETLINK_NETFILTER, "conntrack") as sock:
        result = sock.run(requests)
    assert result.applied == 201 and not result.failures  # 1200 never existed: ENOENT is harmless
    left = run(["ip", "netns", "exec", ns, "conntrack", "-L", "-p", "udp"], check=False)
    assert "192.0.2.1" not in left.stdout


def routed(ns: str) -> set[str]:
    """Service IPs held by proxyd's ``local`` routes via the bridge, both families (``ip`` as the oracle)."""
    out = run(["ip", "-n", ns, "-o", "route", "show", "table", "all", "dev", BRIDGE, "proto", "static",
               "type", "local"]).stdout
    return {line.split()[1] for line in out.splitlines()}


def test_local_routes_of_both_families_with_one_ack_per_chunk(ns: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    index = bridge_index(ns)
    v4 = [f"10.96.{i // 256}.{i % 256}" for i in range(600)]
    v6 = [f"fd00:96::{i:x}" for i in range(1, 601)]
    bad = local_route_request(True, index + 1000, "10.97.0.1")  # no such link, in the middle
    requests = [local_route_request(True, index, ip) for ip in v4[:300]] + [bad]
    requests += [local_route_request(True, index, ip) for ip in v4[300:] + v6]
    before = failures_counted("route")
    with batch_socket(ns, NETLINK_ROUTE, "route") as sock, caplog.at_level(logging.ERROR):
        result = sock.run(requests, ack_each=False)
        assert result.applied == 1200 and [(f.subject, f.code) for f in result.failures] == [
            ("10.97.0.1", errno.ENODEV)]
        assert result.chunks < len(requests) // 100  # many requests per send
        assert set(dump_local_routes(sock, index)) == {(socket.AF_INET, ip) for ip in v4} | {
            (socket.AF_INET6, ip) for ip in v6}
        again = sock.run([local_route_request(True, index, v4[0]),  # EEXIST
                          local_route_request(False, index, "10.98.0.1"),  # ESRCH
                          local_route_request(False, index, "fd00:98::1")], ack_each=False)  # not there
        assert again.applied == 3 and not again.failures
    assert routed(ns) == set(v4) | set(v6)
    assert failures_counted("route") == before + 1 and "10.97.0.1" in caplog.text
    with batch_socket(ns, NETLINK_ROUTE, "route") as sock:
        gone = sock.run([local_route_request(False, index, ip) for ip in v4 + v6], ack_each=False)
        assert gone.applied == 1200 and not gone.failures
    assert routed(ns) == set()


def test_a_local_route_makes_the_ip_local_for_sockets_and_not_a_node_address(ns: str) -> None:
    """A listener binds the routed IPs (IPv6 with IPV6_FREEBIND, as proxyd's do) and is reached there."""
    from proxyd import nodeaddrs
    from proxyd.modes.userspace.listeners import IPV6_FREEBIND

    index = bridge_index(ns)
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    with batch_socket(ns, NETLINK_ROUTE, "route") as sock:
        assert sock.run([local_route_request(True, index, ip) for ip in ("198.51.100.7", "2001:db8::7")],
                        ack_each=False).applied == 2
    with in_netns(ns):
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            v4.bind(("198.51.100.7", 0))  # no option needed: the route alone makes it local
            v6.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            v6.bind(("2001:db8::7", 0))
            for listener in (v4, v6):
                listener.listen()
                ip, port = listener.getsockname()[:2]
                with socket.create_connection((ip, port), timeout=5) as client:
                    conn, _peer = listener.accept()
                    client.sendall(b"hi")
                    assert conn.recv(2) == b"hi"
                    conn.close()
        finally:
            v4.close()
            v6.close()
        # Service IPs are not node addresses: NodePorts never listen on them.
        assert not {"198.51.100.7", "2001:db8::7"} & set(nodeaddrs.local_addresses())


def test_route_removal_never_touches_the_route_of_an_address(ns: str) -> None:
    """Someone's address 192.0.2.9 on the bridge: its kernel route survives proxyd removing that IP."""
    index = bridge_index(ns)
    run(["ip", "-n", ns, "addr", "add", "192.0.2.9/32", "dev", BRIDGE])
    with batch_socket(ns, NETLINK_ROUTE, "route") as sock:
        result = sock.run([local_route_request(False, index, "192.0.2.9")], ack_each=False)
        assert result.applied == 1  # nothing of proxyd's was there: harmless
        assert dump_local_routes(sock, index) == []  # and the address's route is not proxyd's
    out = run(["ip", "-n", ns, "route", "show", "table", "local", "192.0.2.9"]).stdout
    assert "192.0.2.9" in out and "proto kernel" in out


def test_batch_without_acks_whose_error_answers_overflow_the_receive_buffer(ns: str) -> None:
    """2,000 refused requests between 2,000 good ones, a tiny receive buffer: all answered, none twice."""
    index = bridge_index(ns)
    good = [f"10.{20 + i // 65536}.{(i // 256) % 256}.{i % 256}" for i in range(2000)]
    bad = [f"10.30.{i // 256}.{i % 256}" for i in range(2000)]
    requests = []
    for ok, ko in zip(good, bad, strict=True):
        requests += [local_route_request(True, index, ok), local_route_request(True, index + 1000, ko)]
    with batch_socket(ns, NETLINK_ROUTE, "route", rcvbuf=4096, chunk_messages=2000) as sock:
        result = sock.run(requests, ack_each=False, log_failures=False)
        assert result.applied == 2000 and result.resent > 0
        assert sorted(f.subject for f in result.failures) == sorted(bad)
        assert {f.code for f in result.failures} == {errno.ENODEV}
    assert routed(ns) == set(good)


def test_node_addresses_are_every_address_but_the_holders(ns: str) -> None:
    """``nodeaddrs.local_addresses`` (one raw dump) against ``ip addr``, with both holder devices full."""
    from proxyd import nodeaddrs

    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "addr", "add", "203.0.113.5/24", "dev", BRIDGE])
    run(["ip", "-n", ns, "addr", "add", "2001:db8:5::5/64", "dev", BRIDGE, "nodad"])
    batch = []
    for holder in ("proxyd0", "kube-ipvs0"):
        run(["ip", "-n", ns, "link", "add", holder, "type", "bridge"])
        run(["ip", "-n", ns, "link", "set", holder, "up"])
        base = 20 if holder == "proxyd0" else 21
        batch += [f"addr add 10.{base}.{i // 256}.{i % 256}/32 dev {holder}\n" for i in range(1500)]
        batch.append(f"addr add fd00:{base}::1/128 dev {holder} nodad\n")
    run(["ip", "-n", ns, "-batch", "-"], input_text="".join(batch), timeout=60)
    expected = set()
    for line in run(["ip", "-n", ns, "-o", "addr", "show"]).stdout.splitlines():
        fields = line.split()
        if fields[1] not in ("proxyd0", "kube-ipvs0"):
            expected.add(fields[3].split("/")[0])
    with in_netns(ns):
        everything = nodeaddrs.local_addresses()
        v4 = nodeaddrs.local_addresses(family=4)
        v6 = nodeaddrs.local_addresses(family=6)
    assert set(everything) == expected and len(everything) == len(expected)
    assert {"127.0.0.1", "::1", "203.0.113.5", "2001:db8:5::5"} <= expected
    assert set(v4) == {ip for ip in expected if ":" not in ip}
    assert set(v6) == {ip for ip in expected if ":" in ip}


def test_dumps_and_waits_work_on_a_descriptor_above_1023(ns: str) -> None:
    """A userspace proxy holds thousands of descriptors: a late batch socket is numbered above 1023."""
    import os
    import resource

    from proxyd.netlink import link_state

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    high = 1500
    assert hard > high, f"the descriptor hard limit ({hard}) leaves no room above 1023"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, high + 1), hard))
    try:
        with batch_socket(ns, NETLINK_ROUTE, "route") as sock:
            os.dup2(sock.sock.fileno(), high)
            low = sock.sock
            sock.sock = socket.socket(fileno=high)
            low.close()
            index = bridge_index(ns)
            assert sock.run([local_route_request(True, index, "192.0.2.44")], ack_each=False).applied == 1
            assert dump_local_routes(sock, index) == [(socket.AF_INET, "192.0.2.44")]
            state = link_state(sock, index)
            assert state is not None and state[0] == BRIDGE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
