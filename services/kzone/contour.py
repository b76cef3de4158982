"""How closely a learner's melody follows a reference's, whatever key they sing it in.

Both pitch tracks become cents, are thinned to one value per 50 ms block (the median of the voiced frames of the
block: notes last far longer, and it smooths tracker jitter), and lose their unvoiced blocks: rests and breaths
say nothing about the melody, and leaving them out lets the comparison ignore where the learner breathed.

The key shift is searched, not assumed. Candidates are the difference of the two medians (right when the learner
sings the whole melody in another key: a uniform time stretch leaves the distribution of pitches the same) and the
best alignments of the two pitch-class histograms (right for a fragment, whose median may sit on another note).
Each candidate is tried by dynamic time warping, the cheapest wins, and the median difference along its path
refines it. Distances are folded into one octave, so a learner who jumps an octave to reach a note, or a tracker
that reports one octave off, loses nothing for it.

The score comes from the mean distance between aligned pitches, 100 * 2^-(d / 75 cents)^2: singing three quarters
of a semitone off on average scores half. The mean rather than a score per pair: warping lets an unrelated melody
of the same scale match the reference exactly on many of its notes, which per-pair credit would reward, while its
misses on the others keep the mean distance high.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.kzone.dtw import Warping, warp
from services.kzone.scores import score_from_distance

Floats: TypeAlias = NDArray[np.float64]

CENTS_PER_OCTAVE = 1200.0
_BLOCK_DURATION = 0.05
_HALF_SCORE_CENTS = 75.0
# The learner may run ahead of or behind the reference by this share of the melody, and by a second in any case,
# beyond a uniform stretch.
_BAND_FRACTION = 0.1
_MIN_BAND_BLOCKS = round(1.0 / _BLOCK_DURATION)
# A step off the diagonal costs as much as a pair a semitone apart: warping must buy more than that, or an
# unrelated melody could be bent into matching the reference note by note.
_WARP_STEP_CENTS = 100.0
_HISTOGRAM_BIN_CENTS = 10.0
_HISTOGRAM_BINS = round(CENTS_PER_OCTAVE / _HISTOGRAM_BIN_CENTS)
# Histogram peaks are smoothed over about a quarter tone, the spread of a note sung in tune.
_HISTOGRAM_SMOOTHING_CENTS = 25.0
_HISTOGRAM_CANDIDATES = 3
# Fewer voiced blocks than this (a quarter second) are too little to call a melody.
_MIN_VOICED_BLOCKS = 5


@dataclass(frozen=True)
class ContourComparison:
    """`score` is 0-100; `key_shift_semitones` is how much higher the learner sang (negative = lower), including
    whole octaves, and is not held against them; `mean_deviation_cents` is the mean folded distance between
    aligned pitches after the shift."""

    score: float
    key_shift_semitones: float
    mean_deviation_cents: float

    @property
    def similarity(self) -> float:
        """The score as a share, 0 to 1 (PitchSummary.contour_similarity)."""
        return self.score / 100.0


def compare_contours(reference_hz: ArrayLike, learner_hz: ArrayLike, frame_period: float) -> ContourComparison | None:
    """Compares two pitch tracks with the same frame period (frequencies in Hz, 0 where unvoiced) covering the same
    part of the song. None when either has too little voiced to compare."""
    if frame_period <= 0:
        raise ValueError(f"frame_period must be positive, got {frame_period}")
    reference = _voiced_blocks(np.asarray(reference_hz, dtype=np.float64), frame_period)
    learner = _voiced_blocks(np.asarray(learner_hz, dtype=np.float64), frame_period)
    if reference.size < _MIN_VOICED_BLOCKS or learner.size < _MIN_VOICED_BLOCKS:
        return None

    band = max(_MIN_BAND_BLOCKS, _BAND_FRACTION * max(reference.size, learner.size))
    trials = [
        (shift, _warp(reference, learner, shift, band)) for shift in _candidate_shifts(reference, learner).tolist()
    ]
    shift, warping = min(trials, key=lambda trial: trial[1].mean_cost)
    pairs_reference, pairs_learner = reference[warping.path[:, 0]], learner[warping.path[:, 1]]
    shift += float(np.median(_folded(pairs_learner - pairs_reference - shift)))
    deviations = np.abs(_folded(pairs_learner - pairs_reference - shift))
    # The folded shift says nothing of octaves; the medians do.
    octaves = np.round((np.median(learner) - np.median(reference) - shift) / CENTS_PER_OCTAVE)
    return ContourComparison(
        score=score_from_distance(float(deviations.mean()), _HALF_SCORE_CENTS),
        key_shift_semitones=float(shift + octaves * CENTS_PER_OCTAVE) / 100.0,
        mean_deviation_cents=float(deviations.mean()),
    )


def _voiced_blocks(hz: Floats, frame_period: float) -> Floats:
    """The median pitch in cents of each block whose frames are mostly voiced, in order."""
    if hz.ndim != 1:
        raise ValueError(f"a pitch track must be one-dimensional, got shape {hz.shape}")
    size = max(1, round(_BLOCK_DURATION / frame_period))
    count = hz.size // size
    blocks = hz[: count * size].reshape(count, size)
    voiced = blocks > 0
    mostly_voiced = voiced.sum(axis=1) * 2 > size
    # Cents above A4 (440 Hz); unvoiced frames are NaN, which the median skips.
    cents = np.where(voiced, CENTS_PER_OCTAVE * np.log2(np.where(voiced, blocks, 440.0) / 440.0), np.nan)
    return np.asarray(np.nanmedian(cents[mostly_voiced], axis=1), dtype=np.float64)


def _candidate_shifts(reference: Floats, learner: Floats) -> Floats:
    """Key shifts in cents, folded into [-600, 600), worth trying."""
    learner_spectrum = np.fft.rfft(_pitch_class_histogram(learner))
    reference_spectrum = np.fft.rfft(_pitch_class_histogram(reference))
    # Circular cross-correlation: entry s is how well the learner's histogram matches the reference's raised by s.
    overlap = np.fft.irfft(learner_spectrum * np.conj(reference_spectrum), _HISTOGRAM_BINS)
    peaks = np.flatnonzero((overlap >= np.roll(overlap, 1)) & (overlap > np.roll(overlap, -1)))
    best_peaks = peaks[np.argsort(overlap[peaks])[::-1][:_HISTOGRAM_CANDIDATES]]
    return _folded(np.append(np.median(learner) - np.median(reference), best_peaks * _HISTOGRAM_BIN_CENTS))


def _pitch_class_histogram(cents: Floats) -> Floats:
    counts = np.bincount(
        (np.mod(cents, CENTS_PER_OCTAVE) / _HISTOGRAM_BIN_CENTS).astype(np.intp) % _HISTOGRAM_BINS,
        minlength=_HISTOGRAM_BINS,
    ).astype(np.float64)
    offsets = (np.arange(_HISTOGRAM_BINS) + _HISTOGRAM_BINS // 2) % _HISTOGRAM_BINS - _HISTOGRAM_BINS // 2
    kernel = np.exp(-0.5 * (offsets * _HISTOGRAM_BIN_CENTS / _HISTOGRAM_SMOOTHING_CENTS) ** 2)
    return np.fft.irfft(np.fft.rfft(counts) * np.fft.rfft(kernel), _HISTOGRAM_BINS)


def _warp(reference: Floats, learner: Floats, shift: float, band: float) -> Warping:
    def local_cost(row: int, columns: slice) -> Floats:
        return np.abs(_folded(learner[columns] - reference[row] - shift))

    return warp(reference.size, learner.size, local_cost, band, _WARP_STEP_CENTS)


def _folded(cents: Floats) -> Floats:
    """Intervals folded into [-600, 600): the distance to the nearest octave of the target."""
    half = CENTS_PER_OCTAVE / 2
    return np.asarray(np.mod(cents + half, CENTS_PER_OCTAVE) - half, dtype=np.float64)
