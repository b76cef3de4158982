"""Turning a distance from the reference into a 0-100 score, the one mapping the kzone analyses share.

The curve is 100 * 2^-(d / h)^2: flat near zero, so the small deviations every performance has (tracker jitter,
a few cents of intonation, a landmark that wobbles) cost almost nothing; exactly 50 at the half-score distance h,
which is where each caller says "half right" in its own unit (cents, torso lengths, seconds); and close to zero by
2h. Scores of different analyses are therefore comparable once each chooses its h.
"""

from __future__ import annotations

from typing import overload

import numpy as np
from numpy.typing import NDArray


@overload
def score_from_distance(distance: float, half_score_distance: float) -> float: ...


@overload
def score_from_distance(distance: NDArray[np.float64], half_score_distance: float) -> NDArray[np.float64]: ...


def score_from_distance(
    distance: float | NDArray[np.float64], half_score_distance: float
) -> float | NDArray[np.float64]:
    """100 at distance 0, 50 at `half_score_distance`, towards 0 beyond; distances are non-negative."""
    if half_score_distance <= 0:
        raise ValueError(f"half_score_distance must be positive, got {half_score_distance}")
    scores = 100.0 * np.exp2(-np.square(np.asarray(distance, dtype=np.float64) / half_score_distance))
    if isinstance(distance, np.ndarray):
        return scores
    return float(scores)
