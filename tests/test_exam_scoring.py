"""Scoring rules, pure: the scaled score and the percentile among an exam's attempts."""

from __future__ import annotations

from megacity.exam.v1 import resources_pb2 as res
from services.exam.scoring import percentile, scaled_score


def test_scaled_scores_follow_the_exams_scale_and_are_clamped() -> None:
    scale = res.ScoreScale(mean=100, sd=15, min=40, max=160)
    assert scaled_score(1.0, scale) == 115
    assert scaled_score(-10.0, scale) == 40
    assert scaled_score(10.0, scale) == 160
    assert scaled_score(0.0, res.ScoreScale()) == 500  # no scale: 500 +- 100 in [200, 800]
    assert scaled_score(3.5, res.ScoreScale()) == 800


def test_percentiles_count_ties_as_half() -> None:
    assert percentile(0.0, [0.0]) == 50.0
    assert percentile(0.0, [-1.0, 0.0, 1.0, 2.0]) == 37.5
    assert percentile(5.0, [-1.0, 0.0, 5.0]) == 100 * 2.5 / 3
    assert percentile(-3.0, [-3.0, -3.0]) == 50.0
    assert percentile(0.0, []) == 50.0
