"""The distance-to-score mapping shared by the kzone analyses (services/kzone/scores.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kzone.scores import score_from_distance


def test_landmarks_of_the_curve() -> None:
    assert score_from_distance(0.0, 75.0) == 100.0
    assert score_from_distance(75.0, 75.0) == pytest.approx(50.0)
    assert score_from_distance(150.0, 75.0) == pytest.approx(100 / 16)


def test_arrays_map_element_by_element() -> None:
    scores = score_from_distance(np.array([0.0, 1.0, 2.0]), 1.0)
    assert isinstance(scores, np.ndarray)
    assert np.allclose(scores, [100.0, 50.0, 6.25])


@given(st.floats(0, 1e6), st.floats(0, 1e6), st.floats(1e-3, 1e3))
def test_scores_fall_from_100_towards_0_as_distance_grows(first: float, second: float, half: float) -> None:
    near, far = sorted((first, second))
    assert 100.0 >= score_from_distance(near, half) >= score_from_distance(far, half) >= 0.0


def test_the_half_score_distance_must_be_positive() -> None:
    with pytest.raises(ValueError, match="half_score_distance"):
        score_from_distance(1.0, 0.0)
