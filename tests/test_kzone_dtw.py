"""Dynamic time warping (services/kzone/dtw.py) and key-shift-tolerant contour comparison
(services/kzone/contour.py): warping agrees with the textbook recurrence within the band, a sequence warped against
itself costs nothing along the diagonal, and a stretched copy maps back onto the original; a melody against itself
scores 100, against a transposed and time-stretched copy (even an octave away, with tracker octave errors) scores
high with the key shift found, and against an unrelated melody scores low."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

from services.kzone.contour import compare_contours
from services.kzone.dtw import band_limits, warp

Floats = NDArray[np.float64]


def _textbook_cost(costs: Floats, band: float, step_penalty: float) -> float:
    """The recurrence cell by cell, within the same band."""
    rows, columns = costs.shape
    first, stop = band_limits(rows, columns, band)
    total = np.full((rows, columns), math.inf)
    for i in range(rows):
        for j in range(int(first[i]), int(stop[i])):
            if i == 0 and j == 0:
                total[i, j] = costs[i, j]
                continue
            up = total[i - 1, j] + step_penalty if i > 0 else math.inf
            left = total[i, j - 1] + step_penalty if j > 0 else math.inf
            diagonal = total[i - 1, j - 1] if i > 0 and j > 0 else math.inf
            total[i, j] = costs[i, j] + min(up, left, diagonal)
    return float(total[-1, -1])


@settings(max_examples=150, deadline=None)
@given(
    costs=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 9), st.integers(1, 9)),
        elements=st.floats(0, 10, allow_nan=False),
    ),
    band=st.integers(0, 6),
    step_penalty=st.sampled_from([0.0, 0.5, 3.0]),
)
def test_warping_agrees_with_the_textbook_recurrence(costs: Floats, band: int, step_penalty: float) -> None:
    rows, columns = costs.shape
    warping = warp(rows, columns, lambda row, span: costs[row, span], band, step_penalty)
    assert warping.cost == pytest.approx(_textbook_cost(costs, band, step_penalty), abs=1e-9)

    path = warping.path
    assert tuple(path[0]) == (0, 0)
    assert tuple(path[-1]) == (costs.shape[0] - 1, costs.shape[1] - 1)
    steps = np.diff(path, axis=0)
    assert np.isin(steps, [0, 1]).all()
    assert (steps.sum(axis=1) >= 1).all()
    warps = int((steps.sum(axis=1) == 1).sum())
    assert costs[path[:, 0], path[:, 1]].sum() + step_penalty * warps == pytest.approx(warping.cost, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 60), elements=st.floats(-100, 100, allow_nan=False)))
def test_a_sequence_warped_against_itself_costs_nothing_along_the_diagonal(sequence: Floats) -> None:
    warping = warp(sequence.size, sequence.size, lambda row, columns: np.abs(sequence[columns] - sequence[row]), 3)
    assert warping.cost == 0.0
    assert warping.mean_cost == 0.0
    assert np.array_equal(warping.path[:, 0], warping.path[:, 1])


def test_a_stretched_copy_maps_back_onto_the_original() -> None:
    times = np.linspace(0, 1, 200)
    original = np.sin(2 * np.pi * 3 * times) + times
    stretched_times = np.linspace(0, 1, 300) ** 1.3
    stretched = np.sin(2 * np.pi * 3 * stretched_times) + stretched_times
    warping = warp(200, 300, lambda row, columns: np.abs(stretched[columns] - original[row]), band=40)
    matched_times = stretched_times[warping.path[:, 1]]
    assert np.abs(matched_times - times[warping.path[:, 0]]).max() < 0.02


def test_the_band_always_leaves_a_path() -> None:
    for rows, columns, band in [(10, 100, 0), (100, 10, 0), (1, 7, 0), (7, 1, 2), (50, 51, 1)]:
        first, stop = band_limits(rows, columns, band)
        assert (stop > first).all()
        assert first[0] == 0
        assert stop[-1] == columns
        assert (first[1:] <= stop[:-1]).all()


def test_bad_warping_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        warp(0, 5, lambda row, columns: np.zeros(5))
    with pytest.raises(ValueError, match="band"):
        warp(5, 5, lambda row, columns: np.zeros(5), band=-1)
    with pytest.raises(ValueError, match="shape"):
        warp(5, 5, lambda row, columns: np.zeros(1), band=2)


# --- Contours -------------------------------------------------------------------------------------------------

FRAME = 0.01
SCALE = np.array([0, 2, 4, 5, 7, 9, 11, 12, 14, 16])


def _melody(seed: int, notes: int = 24) -> tuple[Floats, Floats]:
    """Random notes of a major scale from middle C (MIDI numbers) and their lengths in seconds."""
    rng = np.random.default_rng(seed)
    return 60 + rng.choice(SCALE, notes).astype(np.float64), rng.uniform(0.2, 0.5, notes)


def _sing(notes: Floats, lengths: Floats, *, semitones: float = 0.0, stretch: float = 1.0, seed: int = 0) -> Floats:
    """A pitch track (Hz per 10 ms frame, 0 in the 50 ms breaths between notes) with 10 cents of jitter."""
    rng = np.random.default_rng(seed)
    frames: list[Floats] = []
    for note, length in zip(notes, lengths, strict=True):
        cents = (note + semitones - 69) * 100 + 10 * rng.standard_normal(int(length * stretch / FRAME))
        frames += [440 * 2 ** (cents / 1200), np.zeros(int(0.05 * stretch / FRAME))]
    return np.concatenate(frames)


@pytest.mark.parametrize("seed", range(3))
def test_a_melody_against_itself_scores_100(seed: int) -> None:
    reference = _sing(*_melody(seed))
    comparison = compare_contours(reference, reference, FRAME)
    assert comparison is not None
    assert comparison.score == pytest.approx(100.0)
    assert comparison.similarity == pytest.approx(1.0)
    assert comparison.key_shift_semitones == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(3))
def test_a_transposed_stretched_copy_scores_high_with_its_key_shift(seed: int) -> None:
    notes, lengths = _melody(seed)
    reference = _sing(notes, lengths)
    learner = _sing(notes, lengths, semitones=3, stretch=1.2, seed=seed + 10)
    comparison = compare_contours(reference, learner, FRAME)
    assert comparison is not None
    assert comparison.score > 85
    assert comparison.key_shift_semitones == pytest.approx(3.0, abs=0.1)


def test_a_copy_an_octave_down_with_uneven_timing_scores_high() -> None:
    notes, lengths = _melody(4)
    uneven = lengths * np.random.default_rng(4).uniform(0.8, 1.25, lengths.size)
    comparison = compare_contours(_sing(notes, lengths), _sing(notes, uneven, semitones=-12 + 2), FRAME)
    assert comparison is not None
    assert comparison.score > 85
    assert comparison.key_shift_semitones == pytest.approx(-10.0, abs=0.1)


def test_tracker_octave_errors_are_tolerated() -> None:
    notes, lengths = _melody(5)
    reference = _sing(notes, lengths)
    learner = _sing(notes, lengths, seed=1)
    flipped = np.random.default_rng(5).random(learner.size) < 0.1
    learner[flipped] *= 2
    comparison = compare_contours(reference, learner, FRAME)
    assert comparison is not None
    assert comparison.score > 95


def test_wrong_notes_cost_more_the_more_there_are() -> None:
    notes, lengths = _melody(6)
    reference = _sing(notes, lengths)
    scores = []
    for every in (4, 2):
        wrong = notes.copy()
        wrong[::every] += 1  # a quarter, then half, of the notes a semitone sharp
        comparison = compare_contours(reference, _sing(wrong, lengths), FRAME)
        assert comparison is not None
        scores.append(comparison.score)
    assert 80 < scores[0] < 97
    assert scores[1] < scores[0] - 10


@pytest.mark.parametrize("seed", range(3))
def test_an_unrelated_melody_scores_low(seed: int) -> None:
    reference = _sing(*_melody(seed))
    comparison = compare_contours(reference, _sing(*_melody(seed + 100)), FRAME)
    assert comparison is not None
    assert comparison.score < 40


def test_too_little_voiced_to_compare() -> None:
    reference = _sing(*_melody(0))
    assert compare_contours(reference, np.zeros(500), FRAME) is None
    assert compare_contours(np.zeros(500), reference, FRAME) is None
    with pytest.raises(ValueError, match="frame_period"):
        compare_contours(reference, reference, 0.0)
    with pytest.raises(ValueError, match="one-dimensional"):
        compare_contours(np.zeros((2, 50)), reference, FRAME)
