"""The address holder's canonical spelling of service IPs agrees with ``ipaddress`` on every input.

``AddressHolder`` compares the planner's addresses with what the kernel
holds as text; its fast IPv4 path (``inet_pton``/``inet_ntop``) must accept,
refuse and spell exactly as ``str(ipaddress.ip_address(...))`` does.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from proxyd.model import canonical_ip as canonical


def reference(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def ours(text: str) -> str | None:
    try:
        return canonical(text)
    except ValueError:
        return None


@pytest.mark.parametrize("text", [
    "10.96.0.1", "0.0.0.0", "255.255.255.255", "010.96.0.1", "10.96.0.01", "10.96.0", "10.96.0.1.2",
    "10.96.0.256", " 10.96.0.1", "10.96.0.1 ", "10.96.0.1\0", "10.96.0.1/32", "0x0a.0.0.1", "1e1.0.0.1",
    "١٠.96.0.1", "", ".", "...", "10..0.1", "+1.2.3.4", "-1.2.3.4", "1.2.3.4" * 1000,
    "fd00:96::a", "FD00:96:0:0:0:0:0:A", "::", "::1", "::ffff:10.96.0.1", "::10.96.0.1", "fd00:96::a%eth0",
    "fd00:::a", "1:2:3:4:5:6:7:8:9", "fe80::1", "2001:db8::1/128",
])
def test_agrees_with_ipaddress(text: str) -> None:
    assert ours(text) == reference(text)


def test_agrees_with_ipaddress_on_random_text() -> None:
    rng = random.Random(13)
    alphabet = "0123456789.:abcdefABCDEF x%/"
    for _ in range(20_000):
        if rng.random() < 0.5:
            parts = [rng.choice([rng.randrange(256), rng.randrange(1000), "0" + str(rng.randrange(99))])
                     for _ in range(rng.choice([3, 4, 4, 4, 5]))]
            text = ".".join(map(str, parts))
        else:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        assert ours(text) == reference(text), text
