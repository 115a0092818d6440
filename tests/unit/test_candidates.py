"""The candidate superset: every token among the k highest logits, ties included, and few else."""

from __future__ import annotations

import numpy as np
import pytest

from workers.candidates import LANES, top_superset


def kth_highest(row: np.ndarray, k: int) -> float:
    return float(np.sort(row)[-k])


@pytest.mark.parametrize("n", [262_144, 256_000 + 77, 5 * LANES, LANES])
@pytest.mark.parametrize("k", [1, 2, 40, 104])
def test_the_superset_holds_every_token_at_or_above_the_kth_highest_logit(n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    for _ in range(5):
        row = rng.normal(0, 3, n).astype(np.float32)
        ids = top_superset(row, k)
        if ids is None:  # only when there are fewer columns than k
            assert n // LANES + n % LANES < k
            continue
        kth = kth_highest(row, k)
        assert set(np.flatnonzero(row >= kth)) <= set(ids.tolist())
        assert list(ids) == sorted(ids)
        assert len(ids) < n // 4  # a superset, but a small one


def test_ties_with_the_kth_logit_are_all_kept() -> None:
    row = np.zeros(262_144, dtype=np.float32)
    row[[5, 70_000, 200_000]] = 9.0  # three tied at the top, k = 2 cuts through the tie
    ids = top_superset(row, 2)
    assert ids is not None
    assert {5, 70_000, 200_000} <= set(ids.tolist())


def test_a_peaked_row_gives_a_small_superset() -> None:
    rng = np.random.default_rng(7)
    row = rng.normal(-5, 2, 262_144).astype(np.float32)
    row[rng.choice(262_144, 60, replace=False)] += 25  # sixty plausible next tokens
    ids = top_superset(row, 40)
    assert ids is not None
    assert 40 <= len(ids) <= 200


def test_nan_logits_or_an_out_of_range_k_decline_the_shortcut() -> None:
    row = np.ones(4096, dtype=np.float32)
    assert top_superset(row, 0) is None
    assert top_superset(row, 4096 // LANES + 1) is None
    row[3] = np.nan
    assert top_superset(row, 1) is None
