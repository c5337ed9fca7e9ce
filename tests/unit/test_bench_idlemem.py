"""bench/idlemem.py on its own: arguments, the descriptor-limit raising, the results name, the rendering."""

from __future__ import annotations

import resource
import socket
import struct
import threading

import pytest

from bench import idlemem, scale_figures

INF = resource.RLIM_INFINITY


class Limits:
    """A fake RLIMIT_NOFILE: ``may_raise`` says whether the hard limit may go up (CAP_SYS_RESOURCE)."""

    def __init__(self, soft: int, hard: int, *, may_raise: bool) -> None:
        self.soft, self.hard, self.may_raise = soft, hard, may_raise
        self.calls: list[tuple[int, int]] = []

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.calls.append(limits)
        soft, hard = limits
        if hard != INF and (self.hard == INF or hard > self.hard) and not self.may_raise:
            raise ValueError("not allowing raise of hard limit")  # what CPython raises on EPERM
        if hard != INF and (soft == INF or soft > hard):
            raise ValueError("soft limit above hard")
        self.soft, self.hard = soft, hard


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> Limits:
    fake = Limits(1024, 20_000, may_raise=False)
    monkeypatch.setattr(idlemem.resource, "getrlimit", fake.get)
    monkeypatch.setattr(idlemem.resource, "setrlimit", fake.set)
    monkeypatch.setattr(idlemem, "_nr_open", lambda: 1 << 20)
    return fake


def test_needed_and_possible_are_inverse(limits: Limits) -> None:
    for held in (1, 2, 3, 7, 7590, 10_000, 123_457):
        limits.hard = idlemem.nofile_needed(held)
        assert idlemem.possible(held) == held
        limits.hard -= 1
        assert idlemem.possible(held) < held  # the least limit that holds them all
    limits.hard = 20_000  # this host: 7,590, as the full run holds
    assert idlemem.possible(10_000) == 7590
    limits.hard = 100  # below the spare: nothing, never negative
    assert idlemem.possible(10_000) == 0
    limits.hard = INF
    assert idlemem.possible(10_000) == 10_000


def test_raise_where_allowed(limits: Limits) -> None:
    """As root in the guest: the hard limit goes to what 10,000 connections need, the soft one with it."""
    limits.may_raise = True
    got = idlemem.raise_nofile(10_000)
    assert got == {"soft before": 1024, "hard before": 20_000, "soft": 26_024, "hard": 26_024}
    assert idlemem.possible(10_000) == 10_000
    # Already enough: the hard limit is never lowered.
    limits.soft, limits.hard, limits.calls = 1024, 500_000, []
    assert idlemem.raise_nofile(10_000)["hard"] == 500_000 and limits.calls == [(500_000, 500_000)]


def test_without_the_capability_soft_goes_to_hard_and_fewer_are_held(limits: Limits) -> None:
    got = idlemem.raise_nofile(10_000)
    assert got == {"soft before": 1024, "hard before": 20_000, "soft": 20_000, "hard": 20_000}
    assert idlemem.possible(10_000) == 7590


def test_raise_stops_at_nr_open(limits: Limits, monkeypatch: pytest.MonkeyPatch) -> None:
    limits.may_raise = True
    monkeypatch.setattr(idlemem, "_nr_open", lambda: 25_000)
    assert idlemem.raise_nofile(10_000)["hard"] == 25_000
    assert idlemem.possible(10_000) == 9590


def test_unlimited_hard_limit_is_left_alone(limits: Limits) -> None:
    limits.hard = INF
    limits.may_raise = True
    idlemem.raise_nofile(10_000)
    assert limits.calls == [(26_024, INF)]  # the soft limit up to what is needed, the hard one untouched


def test_nr_open_is_read_from_the_kernel() -> None:
    assert idlemem._nr_open() >= 1024


def test_arguments() -> None:
    args = idlemem.parse_args([])
    assert args.held == idlemem.HELD and args.proxies == ["proxyd-userspace", "haproxy"] and not args.save
    args = idlemem.parse_args(["--held", "10000", "--proxies", "haproxy, haproxy,proxyd-userspace",
                               "--greeting-timeout", "900", "--save"])
    assert args.proxies == ["haproxy", "proxyd-userspace"] and args.greeting_timeout == 900 and args.save


@pytest.mark.parametrize("argv", [
    ["--held", "0"], ["--held", "-5"], ["--held", str(idlemem.MAX_HELD + 1)], ["--held", "ten"],
    ["--held", "9" * 400], ["--proxies", "nginx"], ["--proxies", ","], ["--proxies", "haproxy,x" * 1000],
    ["--connect-timeout", "0"], ["--greeting-timeout", "-1"], ["--start-timeout", "1e9"],
    ["--start-timeout", "nan"], ["--bogus"],
])
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        idlemem.parse_args(argv)
    assert exit_.value.code == 2 and "error" in capsys.readouterr().err


def test_a_guest_run_has_its_own_results_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROXYD_IN_VM", raising=False)
    assert idlemem.results_name() == "idlemem"
    monkeypatch.setenv("PROXYD_IN_VM", "1")
    assert idlemem.results_name() == "idlemem-guest"


def _data(proxyd: dict[str, object], haproxy: dict[str, object]) -> dict[str, object]:
    return {"held requested": 10_000, "descriptor limits": {"hard before": 4096, "hard": 26_024,
                                                            "nr_open": 1 << 20},
            "memory": {"proxyd-userspace": proxyd, "haproxy": haproxy}}


def test_rendering_shows_both_proxies_and_the_verdict() -> None:
    held = {"held": 10_000, "rss_before_kib": 40_000, "rss_holding_kib": 48_000, "kib_per_connection": 0.8}
    haproxy = held | {"rss_holding_kib": 73_000, "kib_per_connection": 3.3}
    text = scale_figures.idle_memory(_data(held, haproxy))
    assert "raised from 4,096 to 26,024" in text
    assert "| proxyd userspace (engine) | 10,000 | 40,000 KiB | 48,000 KiB | 0.800 KiB |" in text
    assert "| HAProxy | 10,000 | 40,000 KiB | 73,000 KiB | 3.30 KiB |" in text
    assert text.endswith("(0.242×): met.")
    worse = scale_figures.idle_memory(_data(held | {"kib_per_connection": 4.0}, held))
    assert worse.endswith("**not met**.")


def test_rendering_shows_a_failed_or_short_run() -> None:
    short = {"held": 7590, "rss_before_kib": 1, "rss_holding_kib": 2, "kib_per_connection": 0.1}
    data = _data(short, {"error": "did not start: haproxy | boom\n" + "x" * 5000})
    data["descriptor limits"] = {"hard before": 20_000, "hard": 20_000}
    text = scale_figures.idle_memory(data)
    assert "20,000, not raised" in text and "7,590 (fewer than asked)" in text
    assert "HAProxy failed in this run:" in text and "no verdict" in text
    assert len(text) < 2000 and "haproxy | boom" not in text
    assert "no verdict" in scale_figures.idle_memory({})


def test_hold_counts_each_outcome_within_its_window() -> None:
    """A loopback server greets some connections, closes some and resets others: each is counted."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=64)
    kept: list[socket.socket] = []

    def serve() -> None:
        for n in range(10):
            conn, _ = srv.accept()
            if n % 3 == 0:
                conn.send(b"h")
                kept.append(conn)
            elif n % 3 == 1:
                conn.close()
            else:  # SO_LINGER 0: close sends a reset
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    socks: list[socket.socket] = []
    try:
        # 4 greeted held: the 6 the server closed or reset on the way are replaced as they fail
        counts = idlemem._hold(srv.getsockname(), 4, socks, window=2, connect_timeout=5.0,
                               greeting_timeout=30.0)
        assert counts == {"greeted": 4, "closed": 3, "reset": 3, "not connected": 0, "never answered": 0,
                          "opened": 10}
        assert len(socks) == 10 and sum(s.fileno() >= 0 for s in socks) == 4  # the failed ones closed
    finally:
        server.join(timeout=10)
        for sock in [*socks, *kept, srv]:
            sock.close()


def test_hold_stops_when_nothing_answers() -> None:
    """A listener that never greets: the window fills, the deadline ends the wait, all are counted."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=64)
    socks: list[socket.socket] = []
    try:
        counts = idlemem._hold(srv.getsockname(), 50, socks, window=4, connect_timeout=5.0,
                               greeting_timeout=1.0)
        assert counts == {"greeted": 0, "closed": 0, "reset": 0, "not connected": 0,
                          "never answered": 4, "opened": 4}
        assert len(socks) == 4  # no connection beyond the window while none was answered
    finally:
        for sock in [*socks, srv]:
            sock.close()


def test_hold_counts_refused_connects() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    target = srv.getsockname()
    srv.close()  # nothing listens there now: every connect is refused
    socks: list[socket.socket] = []
    try:
        counts = idlemem._hold(target, 5, socks, window=2, connect_timeout=5.0, greeting_timeout=30.0)
        # every one refused: replaced until the budget (held // 10 + 100 more) is spent, then it stops
        assert counts["not connected"] == counts["opened"] == 105 and counts["greeted"] == 0
        assert counts["never answered"] == 0
    finally:
        for sock in socks:
            sock.close()


def test_proxyd_counters_are_summed_over_labels_and_bad_lines_skipped() -> None:
    text = "\n".join([
        "# HELP proxyd_connect_retries_total x", "# TYPE proxyd_connect_retries_total counter",
        'proxyd_connect_retries_total{service="a b",port="p"} 3.0',
        'proxyd_connect_retries_total{service="c",port="q"} 4',
        "proxyd_accept_pauses_total 1", "proxyd_accept_pauses_total NaN", "proxyd_accept_pauses_total x",
        'proxyd_connections_rejected_total{service="d"', "other_total 9", "", "{}", "x" * 100_000,
    ])
    assert idlemem.metric_sums(text) == {"proxyd_connect_retries_total": 7.0,
                                         "proxyd_accept_pauses_total": 1.0}
    assert idlemem.metric_sums("") == {}


def test_rendering_says_what_was_replaced() -> None:
    held = {"held": 10_000, "rss_before_kib": 40_000, "rss_holding_kib": 48_000, "kib_per_connection": 0.8,
            "replaced": {"reset": 77}, "proxyd counters": {"proxyd_connect_retries_total": 80.0,
                                                           "proxyd_connections_rejected_total": 77.0}}
    text = scale_figures.idle_memory(_data(held, {"held": 10_000, "kib_per_connection": 3.3}))
    assert "proxyd userspace (engine): 77 reset while being established" in text
    assert "80 connect retries, 77 connections rejected" in text
