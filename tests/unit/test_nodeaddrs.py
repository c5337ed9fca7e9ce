"""``--nodeport-addresses`` filtering of node addresses, per family as kube-proxy's NodePortAddresses."""

from __future__ import annotations

import pytest

from proxyd.nodeaddrs import filter_addresses

ADDRESSES = ["192.0.2.1", "198.51.100.1", "2001:db8::1", "fd00::1"]


def test_per_family_keeps_every_address_of_a_family_without_cidrs() -> None:
    assert filter_addresses(ADDRESSES, ["192.0.2.0/24"], per_family=True) == [
        "192.0.2.1", "2001:db8::1", "fd00::1"]
    assert filter_addresses(ADDRESSES, ["2001:db8::/32"], per_family=True) == [
        "192.0.2.1", "198.51.100.1", "2001:db8::1"]
    assert filter_addresses(ADDRESSES, ["fd00::/8", "198.51.100.0/24"], per_family=True) == [
        "198.51.100.1", "fd00::1"]
    assert filter_addresses(ADDRESSES, [], per_family=True) == ADDRESSES


def test_without_per_family_the_cidrs_are_the_whole_answer() -> None:
    assert filter_addresses(ADDRESSES, ["192.0.2.0/24"]) == ["192.0.2.1"]
    assert filter_addresses(ADDRESSES, []) == ADDRESSES


def test_ipv6_addresses_are_canonical_and_sorted_after_ipv4() -> None:
    assert filter_addresses(["2001:DB8:0::1", "10.0.0.1", "2001:db8::1"], ["::/0", "0.0.0.0/0"]) == [
        "10.0.0.1", "2001:db8::1"]


def test_bad_cidrs_raise() -> None:
    with pytest.raises(ValueError):
        filter_addresses(ADDRESSES, ["2001:db8::/129"], per_family=True)
