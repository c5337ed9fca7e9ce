"""The per-suite count check of ``scripts/test.sh``: all-skipped, missing and short suites fail."""

from __future__ import annotations

from pathlib import Path

from tests import suite_counts


def junit(tmp_path: Path, cases: list[tuple[str, str]]) -> Path:
    """A JUnit file with one testcase per (classname, outcome: pass/skip/fail/error)."""
    body = []
    for classname, outcome in cases:
        inner = {"pass": "", "skip": "<skipped message='x'/>", "fail": "<failure message='x'/>",
                 "error": "<error message='x'/>"}[outcome]
        body.append(f"<testcase classname='{classname}' name='t'>{inner}</testcase>")
    path = tmp_path / "r.xml"
    path.write_text("<testsuites><testsuite name='pytest'>" + "".join(body) + "</testsuite></testsuites>")
    return path


def test_counts_ran_failed_and_skipped_per_suite(tmp_path: Path) -> None:
    path = junit(tmp_path, [("tests.unit.test_a", "pass"), ("tests.unit.test_a", "fail"),
                            ("tests.netns.test_b.TestX", "skip"), ("tests.api.test_c", "error")])
    counts = suite_counts.count([path])
    assert counts["unit"]["ran"] == 2 and counts["unit"]["failed"] == 1
    assert counts["netns"]["ran"] == 0 and counts["netns"]["skipped"] == 1
    assert counts["api"]["failed"] == 1


def test_all_skipped_suite_fails(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(suite_counts, "MINIMUMS", {"netns": 1, "unit": 1})
    path = junit(tmp_path, [("tests.unit.test_a", "pass"), ("tests.netns.test_b", "skip")])
    assert suite_counts.main([str(path), "--suites", "unit"]) == 0
    assert suite_counts.main([str(path), "--suites", "unit,netns"]) == 1


def test_fewer_than_minimum_fails_and_missing_file_counts_as_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(suite_counts, "MINIMUMS", {"unit": 3})
    path = junit(tmp_path, [("tests.unit.test_a", "pass")] * 2)
    assert suite_counts.check(suite_counts.count([path]), ["unit"]) == [
        "unit: 2 tests ran, expected at least 3 (tests/suite_counts.py)"]
    assert suite_counts.main([str(tmp_path / "absent.xml"), "--suites", "unit"]) == 1


def test_minimums_cover_every_suite_directory() -> None:
    root = Path(__file__).resolve().parents[1]
    dirs = {p.name for p in root.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert dirs == set(suite_counts.MINIMUMS)
    assert all(n > 0 for n in suite_counts.MINIMUMS.values())
