"""`python -m bench` plan overrides (`bench.harness.overridden`): budgets follow more or longer rounds."""

from __future__ import annotations

from bench.harness import FULL, QUICK, overridden


def test_no_override_is_the_plan() -> None:
    assert overridden(FULL, rounds=None, seconds=None) == FULL
    assert overridden(QUICK, rounds=None, seconds=None) == QUICK


def test_more_rounds_widen_the_budgets_in_proportion() -> None:
    nine = overridden(FULL, rounds=9, seconds=None)
    assert nine.rounds == 9 and nine.seconds == FULL.seconds
    assert nine.data_budget == FULL.data_budget * 9 / 5
    # the room after the data path for the sync-scale points stays what it was
    assert nine.total_budget - nine.data_budget == FULL.total_budget - FULL.data_budget

    longer = overridden(FULL, rounds=10, seconds=10)
    assert longer.data_budget == FULL.data_budget * 2 * 2


def test_fewer_or_shorter_rounds_keep_the_budgets() -> None:
    short = overridden(FULL, rounds=2, seconds=1)
    assert (short.rounds, short.seconds) == (2, 1)
    assert (short.data_budget, short.total_budget) == (FULL.data_budget, FULL.total_budget)
