"""Row selection: farthest points, leverage scores, random; one implementation of each."""

from __future__ import annotations

import numpy as np
import pytest

from deltaml.errors import ParameterError
from deltaml.sampling import distinct_rows, farthest_points, leverage_points, select_rows


def _farthest_by_hand(rows: np.ndarray, count: int, first: int) -> list[int]:
    chosen = [first]
    distance = np.linalg.norm(rows - rows[first], axis=1)
    while len(chosen) < count:
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(rows - rows[chosen[-1]], axis=1))
    return chosen


def test_farthest_points_follow_the_definition():
    rows = np.random.default_rng(0).normal(size=(60, 5))
    assert farthest_points(rows, 12, first=7).tolist() == _farthest_by_hand(rows, 12, 7)


def test_farthest_points_stop_before_choosing_a_duplicate():
    rows = np.array([[1.0, 0], [1, 0], [0, 1], [0, 1], [0.6, 0.8]])
    picked = farthest_points(rows, 5, first=0)
    assert len(picked) == 3 and len({tuple(rows[i]) for i in picked}) == 3


def test_leverage_points_find_the_rows_that_span_the_data():
    rows = np.zeros((20, 3))
    rows[:, 0] = 1.0  # 18 copies of one direction, two rows off it
    rows[5] = [0.0, 1.0, 0.0]
    rows[11] = [0.0, 0.0, 1.0]
    # Each off-direction row carries its singular direction alone (leverage 1, the
    # copies 1/18 each).
    assert {5, 11} <= set(leverage_points(rows, 3).tolist())


def test_selection_is_seeded_and_refuses_unknown_rules():
    rows = np.random.default_rng(1).normal(size=(30, 4))
    for rule in ("fps", "random", "leverage"):
        one = select_rows(rows, 6, rule, np.random.default_rng(3))
        two = select_rows(rows, 6, rule, np.random.default_rng(3))
        assert one.tolist() == two.tolist() and len(set(one.tolist())) == 6
    assert select_rows(rows, 40, "fps", np.random.default_rng(0)).tolist() == list(range(30))
    with pytest.raises(ParameterError, match="selection must be one of"):
        select_rows(rows, 6, "cur", np.random.default_rng(0))


def test_distinct_rows_group_noisy_copies_that_rounding_splits():
    """Copies of a row 1e-14 apart (one environment computed in two batches) are one;
    rounding to a grid splits such copies whenever a value straddles a grid line."""
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(30, 200))
    copies = rows[:10] + rng.normal(scale=1e-14, size=(10, 200))
    apart = rows[:5] + 1e-6  # other environments, however close
    stacked = np.vstack([copies, rows, apart])
    kept = distinct_rows(stacked)
    assert len(kept) == 35
    np.testing.assert_array_equal(kept[:10], np.arange(10))  # the first of each group
    assert len(np.unique(np.round(stacked, 12), axis=0)) > 35  # what rounding did
    assert len(distinct_rows(np.zeros((0, 4)))) == 0
