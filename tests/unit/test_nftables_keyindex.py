"""KeyIndex (the nftables planner's compact mirror of one set) behaves as the dict it replaces."""

from __future__ import annotations

import random

import pytest

from proxyd.modes.nftables import keyindex
from proxyd.modes.nftables.keyindex import KeyIndex


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_match_a_dict(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyindex, "_MERGE_MIN", 8)  # merge often: the arrays and the overlay both exercised
    rng = random.Random(seed)
    # Extreme hashes as well as common ones: the array holds signed 64-bit values.
    pool = [rng.randrange(-2**63, 2**63) for _ in range(300)] + [-2**63, 2**63 - 1, 0, -1]
    start = {h: rng.randrange(5) for h in rng.sample(pool, 100)}
    index, want = KeyIndex(start), dict(start)
    for _ in range(3000):
        h = rng.choice(pool)
        op = rng.random()
        if op < 0.45:
            index[h] = want[h] = rng.randrange(5)
        elif op < 0.9:
            assert index.pop(h, None) == want.pop(h, None)
        else:
            copy = index.copy()
            assert copy == want
            copy[h] = 99  # a copy is independent
        assert len(index) == len(want)
        assert (h in index) == (h in want)
        assert index.get(h) == want.get(h)
    assert index.to_dict() == want
    assert index == KeyIndex(want)
    assert sorted(index.items()) == sorted(want.items())


def test_empty_and_foreign_keys() -> None:
    index: KeyIndex[str] = KeyIndex()
    assert len(index) == 0 and index.get(5) is None and index.pop(5, "x") == "x"
    assert "not an int" not in index and 2**70 not in index
    with pytest.raises(OverflowError):
        index[2**70] = "too big for a hash"  # never a hash() value: refused, not stored
