"""Userspace mode's address holder against the real kernel, in a throw-away namespace, both families.

``AddressHolder`` holds service IPs as ``local`` routes via ``proxyd0``
(``proxyd/modes/userspace/addresses.py``). Each test drives it from inside a
namespace of its own (``pxd-ah-<hex>``): the holder's worker thread starts
there and inherits it, so nothing touches the host's namespace. ``ip`` is the
oracle.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

from proxyd import metrics
from proxyd.modes.userspace.addresses import DEVICE, AddressHolder
from tests.netns.topology import in_netns, run

T = TypeVar("T")


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"pxd-ah-{secrets.token_hex(3)}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        run(["ip", "netns", "del", name], check=False)


def inside(ns: str, body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body`` on an event loop whose thread, and so the holder's worker thread, is in ``ns``."""
    with in_netns(ns):
        return asyncio.run(body())


def routed(ns: str) -> set[str]:
    out = run(["ip", "-n", ns, "-o", "route", "show", "table", "all", "dev", DEVICE, "proto", "static",
               "type", "local"], check=False)
    return {line.split()[1] for line in out.stdout.splitlines()} if out.returncode == 0 else set()


def device_addresses(ns: str) -> set[str]:
    out = run(["ip", "-n", ns, "-o", "addr", "show", "dev", DEVICE]).stdout
    found = {line.split()[3].split("/")[0] for line in out.splitlines()}
    return {ip for ip in found if not ip.startswith("fe80:")}


V4 = ["10.96.0.10", "10.96.0.11", "192.0.2.10"]
V6_TEXT = ["fd00:96:0:0:0:0:0:a", "FD00:96::B", "2001:db8::10"]  # as a manifest might spell them
V6 = ["fd00:96::a", "fd00:96::b", "2001:db8::10"]


def test_both_families_are_added_adopted_updated_and_removed(ns: str) -> None:
    async def first_run() -> tuple[set[str], tuple[int, int]]:
        holder = AddressHolder()
        try:
            adopted = await holder.ensure()
            return adopted, await holder.apply([*V4, *V6_TEXT])
        finally:
            holder.close()

    adopted, counts = inside(ns, first_run)
    assert adopted == set() and counts == (6, 0)
    assert routed(ns) == {*V4, *V6}
    assert device_addresses(ns) == set()  # routes only: no address on the device, no DAD, no NDP

    async def restart() -> tuple[set[str], tuple[int, int], tuple[int, int], bool]:
        holder = AddressHolder()  # a new process finds what the last one left
        try:
            adopted = await holder.ensure()
            updated = await holder.update(add=["10.96.0.12", "fd00:96::c"],
                                          remove=["10.96.0.10", "FD00:96::A"])
            applied = await holder.apply(["10.96.0.12", "fd00:96::c", "2001:db8::10"])
            return adopted, updated, applied, await holder.check()
        finally:
            holder.close()

    adopted, updated, applied, intact = inside(ns, restart)
    assert adopted == {*V4, *V6} and intact
    assert updated == (2, 2) and applied == (0, 3)
    assert routed(ns) == {"10.96.0.12", "fd00:96::c", "2001:db8::10"}
    assert inside(ns, _delete) is True
    assert routed(ns) == set()
    assert run(["ip", "-n", ns, "link", "show", DEVICE], check=False).returncode != 0


async def _delete() -> bool:
    return await asyncio.get_running_loop().run_in_executor(None, AddressHolder.delete_device)


def test_a_refused_address_fails_alone_and_is_retried(ns: str, caplog: pytest.LogCaptureFixture) -> None:
    """IPv6 disabled on the device: its IPv6 service IPs are refused, IPv4 ones held; logged once."""
    before = metrics.NETLINK_FAILURES.labels(kind="address")._value.get()

    async def body() -> tuple[dict[str, int], set[str], dict[str, int]]:
        holder = AddressHolder()
        try:
            await holder.ensure()
            run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{DEVICE}.disable_ipv6=1"])
            await holder.apply([*V4, *V6])
            await holder.apply([*V4, *V6])  # retried, not logged again
            failed = dict(holder.failed)
            run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{DEVICE}.disable_ipv6=0"])
            await holder.apply([*V4, *V6])
            return failed, set(holder.current), dict(holder.failed)
        finally:
            holder.close()

    with caplog.at_level(logging.ERROR):
        failed, current, failed_after = inside(ns, body)
    assert set(failed) == set(V6) and current == {*V4, *V6} and failed_after == {}
    assert sum(f"cannot add {ip}" in caplog.text for ip in V6) == 3
    assert caplog.text.count("cannot add fd00:96::a") == 1
    assert metrics.NETLINK_FAILURES.labels(kind="address")._value.get() == before + 3
    assert routed(ns) == {*V4, *V6}


def test_device_deleted_or_set_down_is_recreated_and_refilled(ns: str) -> None:
    async def body() -> list[bool]:
        holder = AddressHolder()
        seen = []
        try:
            await holder.ensure()
            await holder.apply([*V4, *V6])
            for breakage in (["ip", "link", "set", DEVICE, "down"], ["ip", "link", "del", DEVICE]):
                run(["ip", "netns", "exec", ns, *breakage])
                seen.append(await holder.check())
                await holder.apply(holder.current | {*V4, *V6})  # what the mode does after a failed check
                seen.append(set(holder.current) == {*V4, *V6} and routed(ns) == {*V4, *V6})
            return seen
        finally:
            holder.close()

    assert inside(ns, body) == [False, True, False, True]


def test_addresses_an_earlier_proxyd_put_on_the_device_become_routes(ns: str) -> None:
    run(["ip", "-n", ns, "link", "add", DEVICE, "type", "bridge"])
    run(["ip", "-n", ns, "link", "set", DEVICE, "up"])
    for ip in V4:
        run(["ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", DEVICE])
    for ip in V6:
        run(["ip", "-n", ns, "addr", "add", f"{ip}/128", "dev", DEVICE, "nodad"])
    run(["ip", "-n", ns, "addr", "add", "198.51.100.1/24", "dev", DEVICE])  # not a host address: not ours

    async def body() -> set[str]:
        holder = AddressHolder()
        try:
            return await holder.ensure()
        finally:
            holder.close()

    assert inside(ns, body) == {*V4, *V6}
    assert routed(ns) == {*V4, *V6}
    assert device_addresses(ns) == {"198.51.100.1"}


def test_adoption_is_logged_at_start_and_when_the_kernel_differs_not_at_every_full_sync(
        ns: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every full sync re-reads the device (``ensure``); only a start or a difference says so."""
    caplog.set_level(logging.INFO, logger="proxyd.modes.userspace.addresses")

    async def first() -> None:
        holder = AddressHolder()
        try:
            await holder.ensure()
            await holder.apply(V4)
        finally:
            holder.close()

    inside(ns, first)

    async def restart() -> None:
        holder = AddressHolder()
        try:
            for _ in range(3):  # the start, then two periodic full syncs
                await holder.ensure()
            run(["ip", "-n", ns, "route", "del", "local", V4[0], "dev", DEVICE, "table", "local"])
            await holder.ensure()  # someone removed a route behind proxyd's back
            await holder.ensure()
        finally:
            holder.close()

    caplog.clear()
    inside(ns, restart)
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "adopted" in line] == [f"adopted {len(V4)} service addresses routed "
                                                             f"via {DEVICE}"], lines
    differ = [line for line in lines if "not the" in line]
    assert len(differ) == 1 and "1 missing" in differ[0], lines
