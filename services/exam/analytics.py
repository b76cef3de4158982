"""Aggregates of an exam's attempts, pure: score histograms, means and spreads, item exposure rates.

The store hands over the raw figures of the period (services/exam/store.py, AttemptStore.exam_figures); this
module turns them into the contract's ExamAggregate and ItemExposure messages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from megacity.exam.v1 import resources_pb2 as res
from services.exam.scoring import scale_bounds

SCORE_BINS = 10


@dataclass(frozen=True, slots=True)
class ScoredAttempt:
    scaled_score: float
    theta: float
    standard_error: float
    items_answered: int


@dataclass(frozen=True, slots=True)
class ExamFigures:
    """What happened in one exam's attempts over a period."""

    exam_id: str
    exam_title: str
    score_scale: res.ScoreScale
    attempts_started: int
    attempts_in_progress: int
    scored: Sequence[ScoredAttempt]
    # Per item administered: (item id, content area, attempts served it, answered right).
    exposures: Sequence[tuple[str, str, int, int]]


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def _population_sd(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(math.fsum((value - mean) ** 2 for value in values) / len(values))


def score_distribution(
    scores: Sequence[float], lower: float, upper: float, bins: int = SCORE_BINS
) -> list[res.ScoreBin]:
    """Equal-width bins over the scale's range; the last bin includes its upper bound."""
    width = (upper - lower) / bins
    counts = [0] * bins
    for score in scores:
        counts[min(max(int((score - lower) // width), 0), bins - 1)] += 1
    return [
        res.ScoreBin(lower=lower + index * width, upper=lower + (index + 1) * width, count=count)
        for index, count in enumerate(counts)
    ]


def item_exposures(figures: ExamFigures) -> list[res.ItemExposure]:
    """Exposure of every item served in the period, most exposed first (ties by item id)."""
    started = max(figures.attempts_started, 1)
    rows = sorted(figures.exposures, key=lambda row: (-row[2], row[0]))
    return [
        res.ItemExposure(
            item_id=item_id,
            content_area=area,
            exposure_count=served,
            exposure_rate=served / started,
            proportion_correct=correct / served if served else 0.0,
        )
        for item_id, area, served, correct in rows
    ]


def content_area_proportions(figures: ExamFigures) -> dict[str, float]:
    """Share of administered items per content area."""
    per_area: dict[str, int] = {}
    for _, area, served, _ in figures.exposures:
        per_area[area] = per_area.get(area, 0) + served
    total = sum(per_area.values())
    return {area: count / total for area, count in sorted(per_area.items())} if total else {}


def exam_aggregate(figures: ExamFigures) -> res.ExamAggregate:
    scores = [attempt.scaled_score for attempt in figures.scored]
    lower, upper = scale_bounds(figures.score_scale)
    most_served = max((served for _, _, served, _ in figures.exposures), default=0)
    return res.ExamAggregate(
        exam_id=figures.exam_id,
        exam_title=figures.exam_title,
        attempts_started=figures.attempts_started,
        attempts_finished=len(figures.scored),
        attempts_in_progress=figures.attempts_in_progress,
        mean_scaled_score=_mean(scores),
        sd_scaled_score=_population_sd(scores),
        mean_theta=_mean([attempt.theta for attempt in figures.scored]),
        mean_standard_error=_mean([attempt.standard_error for attempt in figures.scored]),
        mean_items_answered=_mean([float(attempt.items_answered) for attempt in figures.scored]),
        score_distribution=score_distribution(scores, lower, upper),
        max_item_exposure_rate=most_served / max(figures.attempts_started, 1),
    )
