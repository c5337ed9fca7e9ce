"""The manifest parser's child process: records streamed as written, and every way it can fail.

The failures are played by a stand-in for the interpreter (a shell script put
in ``sys.executable``), so each is exact: a crash with a traceback, a hang, a
garbled or cut-short answer, a caller that stops reading.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from proxyd.sources import parsechild
from proxyd.sources.parsechild import KNOWN, ChildFailed

DIGEST_A = b"a" * 16


def fake_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\ncat > /dev/null\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))
    return tmp_path / "pid"


def test_records_come_back_with_their_digests() -> None:
    data = b'{"kind": "List", "items": [{"a": 1}, {"b": [2, "x"]}]}'
    first = list(parsechild.parse(data, is_json=True, known=set()))
    assert [value for value, _ in first] == [{"a": 1}, {"b": [2, "x"]}]
    known = {first[0][1]}
    again = list(parsechild.parse(data, is_json=True, known=known))
    assert again == [(KNOWN, first[0][1]), first[1]]  # a known digest is not sent back built


def test_an_unusable_file_says_why() -> None:
    with pytest.raises(ChildFailed) as info:
        list(parsechild.parse(b'{"kind": "List", "items": [1,', is_json=True, known=set()))
    assert info.value.category == "parse" and "Expecting value" in info.value.reason


def test_a_crash_is_reported_with_the_last_line_it_wrote(tmp_path, monkeypatch) -> None:
    fake_interpreter(tmp_path, monkeypatch, 'printf K; printf aaaaaaaaaaaaaaaa; '
                     'echo "Traceback (most recent call last):" >&2; '
                     'echo "MemoryError: \x1b boom" >&2; exit 1')
    got = []
    with pytest.raises(ChildFailed) as info:
        for record in parsechild.parse(b"{}", is_json=True, known={DIGEST_A}):
            got.append(record)
    assert got == [(KNOWN, DIGEST_A)]  # what came before the crash came; the caller undoes it
    assert info.value.reason == "does not parse: the parser failed (MemoryError: \\x1b boom)"


def test_a_silent_crash_is_reported_with_its_exit_code(tmp_path, monkeypatch) -> None:
    fake_interpreter(tmp_path, monkeypatch, "exit 3")
    with pytest.raises(ChildFailed, match=r"the parser failed \(exit 3\)"):
        list(parsechild.parse(b"{}", is_json=True, known=set()))


@pytest.mark.parametrize("answer", ["printf Z",
                                    "printf Naaaaaaaaaaaaaaaa; printf 'd\\000\\000\\000'; printf abc",
                                    "printf K; printf aaa"])
def test_a_garbled_or_cut_short_answer(tmp_path, monkeypatch, answer) -> None:
    fake_interpreter(tmp_path, monkeypatch, answer)
    with pytest.raises(ChildFailed, match="the parser's answer is garbled"):
        list(parsechild.parse(b"{}", is_json=True, known=set()))


def test_a_child_that_hangs_is_ended_at_the_timeout(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(parsechild, "TIMEOUT", 0.5)
    fake_interpreter(tmp_path, monkeypatch, "exec sleep 60")
    started = time.monotonic()
    with pytest.raises(ChildFailed, match="took longer than"):
        list(parsechild.parse(b"{}", is_json=True, known=set()))
    assert time.monotonic() - started < 30


def test_a_caller_that_stops_reading_ends_the_child(tmp_path, monkeypatch) -> None:
    pid_file = fake_interpreter(tmp_path, monkeypatch, "printf K; printf aaaaaaaaaaaaaaaa; exec sleep 60")
    records = parsechild.parse(b"{}", is_json=True, known={DIGEST_A})
    assert next(records) == (KNOWN, DIGEST_A)
    records.close()
    pid = int(pid_file.read_text())
    assert not os.path.exists(f"/proc/{pid}"), "the child outlived its reader"


def test_a_child_that_cannot_start(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "missing"))
    with pytest.raises(ChildFailed) as info:
        list(parsechild.parse(b"{}", is_json=True, known=set()))
    assert info.value.category == "unreadable"
