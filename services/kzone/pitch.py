"""Fundamental frequency and loudness of a voice, frame by frame, live or over a whole recording.

The estimator is YIN (de Cheveigné and Kawahara, 2002): for each lag tau the squared difference between a window
of the signal and the same window tau samples later, normalised by its running mean (the cumulative mean normalised
difference, CMND). A periodic signal has a dip towards 0 at its period and at every multiple of it; YIN takes the
first dip below a threshold, which is what keeps it from reporting a period twice too long (an octave too low),
and refines it by parabolic interpolation between lags. A frame is voiced when the dip is deep (the signal repeats
itself closely) and the frame is loud enough to be a voice rather than room noise. pYIN's refinement, a Viterbi
path through candidates of many frames, would hold every frame back until later ones arrive; live feedback wants
each frame decided at once, and contour scoring smooths over blocks of frames anyway.

Frames are computed all at once as a matrix: the difference function comes from one batched FFT
cross-correlation, so 10 s of 16 kHz audio takes about 30 ms. `PitchTracker` accepts a live stream in chunks
of any size and returns each frame as soon as its samples have arrived; `track_pitch` runs a whole recording
through the same tracker. Frame k is centred on time k * frame_period.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.kzone.framing import FrameBlock, FrameBuffer

Floats: TypeAlias = NDArray[np.float64]
Mask: TypeAlias = NDArray[np.bool_]

# Loudness of digital silence, where the logarithm of an RMS of 0 would be minus infinity.
SILENCE_DB = -100.0
# YIN's absolute threshold: the first dip at least this deep is the period.
_DIP_THRESHOLD = 0.1
# Without one, a dip within this much of the deepest counts as deep, and again the first wins: the deepest dip of a
# slightly noisy voice is as likely to be at twice its period as at its period.
_NEARLY_DEEPEST = 0.05


@dataclass(frozen=True)
class PitchSettings:
    """What the tracker looks for. The defaults cover singing from a low bass (60 Hz) to a high soprano (1100 Hz).

    A frame is voiced when the CMND at its period is below `voicing_threshold` (0 = perfectly periodic, 1 = no
    better than noise) and it is at least `min_loudness_db` loud."""

    min_hz: float = 60.0
    max_hz: float = 1100.0
    frame_period: float = 0.01
    voicing_threshold: float = 0.25
    min_loudness_db: float = -55.0

    def __post_init__(self) -> None:
        if not 0 < self.min_hz < self.max_hz:
            raise ValueError(f"need 0 < min_hz < max_hz, got {self.min_hz} and {self.max_hz}")
        if self.frame_period <= 0:
            raise ValueError(f"frame_period must be positive, got {self.frame_period}")
        if not 0 < self.voicing_threshold < 1:
            raise ValueError(f"voicing_threshold must be between 0 and 1, got {self.voicing_threshold}")


@dataclass(frozen=True)
class PitchFrames:
    """Consecutive frames of a track, frame k at time k * frame_period; `first_frame` is the k of the first one.

    `frequency_hz` is 0 where unvoiced (as in the PitchTrack message); `periodicity` is 1 - CMND at the chosen
    period, how closely the signal repeated itself, whether or not that was enough to call the frame voiced;
    `loudness_db` is the RMS of the frame's window in dB relative to full scale (a full-scale sine is -3 dB)."""

    first_frame: int
    frame_period: float
    frequency_hz: Floats
    periodicity: Floats
    loudness_db: Floats

    def __len__(self) -> int:
        return int(self.frequency_hz.size)

    @property
    def start_time(self) -> float:
        return self.first_frame * self.frame_period

    @property
    def times(self) -> Floats:
        return (self.first_frame + np.arange(len(self), dtype=np.float64)) * self.frame_period

    @property
    def voiced(self) -> Mask:
        return self.frequency_hz > 0


@dataclass(frozen=True)
class PitchStatistics:
    """The voiced pitch of a performance: mean, lowest and highest in Hz, and the share of frames voiced."""

    mean_hz: float
    min_hz: float
    max_hz: float
    voiced_ratio: float


class PitchTracker:
    """Pitch and loudness of a live stream of mono float samples (full scale ±1) at `sample_rate`."""

    def __init__(self, sample_rate: int, settings: PitchSettings | None = None) -> None:
        self.settings = settings or PitchSettings()
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.sample_rate = sample_rate
        hop = round(sample_rate * self.settings.frame_period)
        if hop < 1:
            raise ValueError(f"a frame period of {self.settings.frame_period} s is under one sample")
        self.frame_period = hop / sample_rate
        # The shortest period needs a lag before it for parabolic interpolation, and at least two samples.
        self._min_lag = math.floor(sample_rate / self.settings.max_hz)
        if self._min_lag < 2:
            raise ValueError(f"sample rate {sample_rate} is too low for pitches up to {self.settings.max_hz} Hz")
        self._max_lag = math.ceil(sample_rate / self.settings.min_hz)
        # Two periods of the lowest pitch: even the lowest note has two full cycles to compare with each other.
        self._window = 2 * self._max_lag
        # Lags go one past the longest period so that a dip there still has a right neighbour to interpolate with.
        frame_length = self._window + self._max_lag + 1
        self._fft_size = 1 << (frame_length - 1).bit_length()
        self._frames = FrameBuffer(frame_length, hop, centre=self._window // 2)

    def push(self, samples: ArrayLike) -> PitchFrames:
        """Adds samples; returns the frames they complete (none until about 60 ms have arrived)."""
        return self._analyse(self._frames.push(samples))

    def finish(self) -> PitchFrames:
        """Ends the stream; returns its last frames, analysed with silence after the end."""
        return self._analyse(self._frames.finish())

    def _analyse(self, block: FrameBlock) -> PitchFrames:
        frames = block.frames
        window, max_lag = self._window, self._max_lag
        lags = np.arange(max_lag + 2)
        # d(tau) = sum over the window of (x[j] - x[j + tau])^2 = e(0) + e(tau) - 2 r(tau), with e(tau) the energy
        # of the window shifted by tau and r the cross-correlation of the window with the frame.
        spectrum = np.fft.rfft(frames, self._fft_size)
        window_spectrum = np.fft.rfft(frames[:, :window], self._fft_size)
        correlation = np.fft.irfft(np.conj(window_spectrum) * spectrum, self._fft_size)[:, : max_lag + 2]
        cumulative_energy = np.concatenate((np.zeros((len(block), 1)), np.cumsum(frames**2, axis=1)), axis=1)
        shifted_energy = cumulative_energy[:, lags + window] - cumulative_energy[:, lags]
        difference = np.maximum(shifted_energy[:, :1] + shifted_energy - 2 * correlation, 0.0)
        cmnd = _cumulative_mean_normalised(difference)

        period, depth = self._choose_periods(cmnd)
        loudness = _decibels(np.sqrt(shifted_energy[:, 0] / window))
        voiced = (depth < self.settings.voicing_threshold) & (loudness >= self.settings.min_loudness_db)
        frequency = np.where(voiced, self.sample_rate / period, 0.0)
        return PitchFrames(
            first_frame=block.first_frame,
            frame_period=self.frame_period,
            frequency_hz=frequency,
            periodicity=1.0 - depth,
            loudness_db=loudness,
        )

    def _choose_periods(self, cmnd: Floats) -> tuple[Floats, Floats]:
        """YIN's choice per frame: the first local minimum that is deep enough, refined to a fraction of a sample by
        parabolic interpolation. Returns the periods in samples and the CMND there."""
        rows = np.arange(cmnd.shape[0])
        searched = cmnd[:, self._min_lag : self._max_lag + 1]
        following = cmnd[:, self._min_lag + 1 : self._max_lag + 2]
        deepest = searched.argmin(axis=1)
        threshold = np.maximum(_DIP_THRESHOLD, searched[rows, deepest] + _NEARLY_DEEPEST)
        candidates = (searched < threshold[:, None]) & (following >= searched)
        first = np.where(candidates.any(axis=1), candidates.argmax(axis=1), deepest)
        lag = first + self._min_lag
        before, at, after = cmnd[rows, lag - 1], cmnd[rows, lag], cmnd[rows, lag + 1]
        curvature = before - 2 * at + after
        safe_curvature = np.where(curvature > 0, curvature, 1.0)
        shift = np.where(curvature > 0, np.clip(0.5 * (before - after) / safe_curvature, -0.5, 0.5), 0.0)
        return lag + shift, np.clip(at - 0.25 * (before - after) * shift, 0.0, 1.0)


def track_pitch(samples: ArrayLike, sample_rate: int, settings: PitchSettings | None = None) -> PitchFrames:
    """Pitch and loudness of a whole recording: one frame per frame period, from time 0 to its end."""
    tracker = PitchTracker(sample_rate, settings)
    return concatenate_frames([tracker.push(samples), tracker.finish()])


def concatenate_frames(parts: Sequence[PitchFrames]) -> PitchFrames:
    """Joins consecutive runs of frames (as a tracker returns them) into one track."""
    if not parts:
        raise ValueError("nothing to concatenate")
    for previous, part in itertools.pairwise(parts):
        if part.first_frame != previous.first_frame + len(previous) or part.frame_period != previous.frame_period:
            raise ValueError(f"frames {part.first_frame}.. do not follow frames {previous.first_frame}..")
    return PitchFrames(
        first_frame=parts[0].first_frame,
        frame_period=parts[0].frame_period,
        frequency_hz=np.concatenate([part.frequency_hz for part in parts]),
        periodicity=np.concatenate([part.periodicity for part in parts]),
        loudness_db=np.concatenate([part.loudness_db for part in parts]),
    )


def pitch_statistics(frames: PitchFrames) -> PitchStatistics | None:
    """Mean, range and voiced share of a track; None when no frame is voiced."""
    voiced = frames.frequency_hz[frames.voiced]
    if voiced.size == 0:
        return None
    return PitchStatistics(
        mean_hz=float(voiced.mean()),
        min_hz=float(voiced.min()),
        max_hz=float(voiced.max()),
        voiced_ratio=voiced.size / len(frames),
    )


def _cumulative_mean_normalised(difference: Floats) -> Floats:
    """d'(0) = 1 and d'(tau) = d(tau) / mean(d(1..tau)); 1 (no periodicity) where the frame is silent."""
    lags = np.arange(difference.shape[1])
    running_sum = np.cumsum(difference[:, 1:], axis=1)
    cmnd = np.ones_like(difference)
    nonzero = running_sum > 0
    cmnd[:, 1:] = np.where(nonzero, difference[:, 1:] * lags[1:] / np.where(nonzero, running_sum, 1.0), 1.0)
    return cmnd


def _decibels(rms: Floats) -> Floats:
    floor = 10.0 ** (SILENCE_DB / 20.0)
    return np.asarray(20.0 * np.log10(np.maximum(rms, floor)), dtype=np.float64)
