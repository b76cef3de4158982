"""Scoring a finished attempt, pure (no I/O): the scaled score and the percentile among the exam's attempts."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from megacity.exam.v1 import resources_pb2 as res

DEFAULT_SCALE = res.ScoreScale(mean=500, sd=100, min=200, max=800)


def _effective(scale: res.ScoreScale) -> res.ScoreScale:
    return scale if scale.sd > 0 else DEFAULT_SCALE


def scaled_score(theta: float, scale: res.ScoreScale) -> float:
    """mean + sd * theta, rounded, clamped to [min, max]; the exam's scale, or 500 ± 100 in [200, 800]."""
    scale = _effective(scale)
    return float(min(max(round(scale.mean + scale.sd * theta), scale.min), scale.max))


def scale_bounds(scale: res.ScoreScale) -> tuple[float, float]:
    """The lowest and highest scaled score the exam reports."""
    scale = _effective(scale)
    return scale.min, scale.max


def percentile(theta: float, others: Sequence[float]) -> float:
    """The share of the exam's finished attempts (`others`, sorted, this one included) scoring below this theta,
    counting ties as half: 50 for the only attempt."""
    if not others:
        return 50.0
    below = bisect.bisect_left(others, theta)
    ties = bisect.bisect_right(others, theta) - below
    value = 100.0 * (below + 0.5 * ties) / len(others)
    return min(max(value, 0.0), 100.0) if math.isfinite(value) else 50.0
