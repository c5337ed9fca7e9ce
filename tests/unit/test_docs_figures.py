"""Figures in README.md and docs/ come from stored results files, and only from passed tests."""

from __future__ import annotations

import pytest

from bench import docs_figures, reliability_figures


def test_every_region_matches_its_stored_run() -> None:
    """A hand-edited figure, or a results file changed without rerunning the command, fails here."""
    assert docs_figures.main(["--check"]) == 0, "run: python -m bench.docs_figures"


@pytest.mark.parametrize("name", sorted(docs_figures.REGIONS))
def test_each_region_exists_once_and_names_its_source(name: str) -> None:
    file, source, _ = docs_figures.REGIONS[name]
    text = (docs_figures.REPO / file).read_text()
    assert text.count(f"<!-- figures:{name} ") == 1 and text.count(f"<!-- /figures:{name} -->") == 1
    assert source in docs_figures.rendered(name)


def test_a_stale_region_is_rewritten_and_prose_around_it_kept() -> None:
    text = ("before\n<!-- figures:programming (generated) -->\nold 999 ms\n"
            "<!-- /figures:programming -->\nafter\n")
    out, found = docs_figures.update(text, "programming")
    assert found and out.startswith("before\n") and out.endswith("after\n")
    assert "999" not in out and "p50 of" in out
    assert docs_figures.update("no markers here", "programming") == ("no markers here", False)


def test_failed_tests_figures_are_not_counted() -> None:
    data = {"format": 2, "meta": {"date": "d", "pytest": "1 passed, 1 failed"}, "tests": {
        "a::ok": {"outcome": "passed", "figures": {"connections_held": 10, "connections_lost": 0}},
        "a::bad": {"outcome": "failed", "figures": {"connections_held": 5000, "connections_lost": 0}},
        "a::err": {"outcome": "error", "figures": {"connections_lost": 7}},
    }}
    totals = reliability_figures.totals(reliability_figures.tests_of(data))
    assert totals == {"held": 10, "faults": 1, "inputs": 0, "lost": 0}
    text = reliability_figures.render(data)
    assert "5000" not in text and "`a::bad`: failed" in text and "`a::err`: error" in text
    assert "1 passed, 1 failed" in text


def test_old_figures_without_outcomes_count_nothing() -> None:
    old = {"a::t": {"connections_held": 10}}
    assert reliability_figures.totals(reliability_figures.tests_of(old))["held"] == 0
