"""The descriptor limit the daemon and userspace mode lift (``proxyd.fdlimit``), with a fake ``resource``."""

from __future__ import annotations

import logging
import resource

import pytest

from proxyd import fdlimit


class FakeLimits:
    def __init__(self, soft: int, hard: int, *, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse
        self.calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.calls.append(limits)
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


def _patch(monkeypatch: pytest.MonkeyPatch, fake: FakeLimits) -> None:
    monkeypatch.setattr(fdlimit.resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(fdlimit.resource, "setrlimit", fake.setrlimit)


def test_soft_limit_is_lifted_to_the_hard_one(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLimits(1024, 524288)
    _patch(monkeypatch, fake)
    assert fdlimit.raise_fd_limit() == 524288
    assert fake.calls == [(524288, 524288)]
    assert fdlimit.raise_fd_limit() == 524288 and len(fake.calls) == 1  # already there: no call


def test_an_unlimited_hard_limit_becomes_a_number_to_budget_with(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLimits(1024, resource.RLIM_INFINITY)
    _patch(monkeypatch, fake)
    assert fdlimit.raise_fd_limit() == 1 << 20


def test_a_refused_raise_is_logged_and_the_old_limit_returned(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeLimits(1024, 4096, refuse=True)
    _patch(monkeypatch, fake)
    with caplog.at_level(logging.WARNING, logger="proxyd.fdlimit"):
        assert fdlimit.raise_fd_limit() == 1024
    assert "cannot raise the descriptor limit from 1024 to 4096" in caplog.text
