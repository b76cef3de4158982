"""Rhythm of a performance: note and syllable onsets, tempo, and timing against a reference's onsets.

Onsets come from spectral flux: how much the log-compressed magnitude spectrum grows from one short frame to one a
little later, averaged over frequencies, so that a new note or consonant shows as a spike whether or not the overall
level changes much. Room noise makes every bin's log magnitude wander by about a nat from frame to frame; only
growth beyond `_BIN_NOISE_RISE` counts, which keeps that wander out of the flux while a new note or consonant raises
its bins by far more. A frame is an onset when its flux is the largest within a short neighbourhood and stands out
from the flux around it: above the local median by several robust standard deviations (an adaptive threshold that
follows the level of the passage). Live, that needs the flux of the next quarter second, so onsets are reported
that much later, with the times at which they happened.

Tempo is the period at which the flux envelope best matches itself, by autocorrelation: a comb over the first few
multiples of each candidate period (a steady beat repeats at every one of them) refines it well below a frame, and
a broad preference for tempos near 120 BPM settles the choice between a tempo and its double or half, which an
envelope alone cannot tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeAlias

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import ArrayLike, NDArray

from services.kzone.framing import FrameBlock, FrameBuffer

Floats: TypeAlias = NDArray[np.float64]
Mask: TypeAlias = NDArray[np.bool_]

# Spectra are compressed as log(1 + GAIN * magnitude): full-scale audio reaches magnitudes in the hundreds, and the
# gain puts the knee of the logarithm below quiet room noise, so flux measures relative (perceived) change.
_COMPRESSION_GAIN = 100.0
# Growth in a bin counts only beyond 1.5 nats (13 dB): room noise wanders by about one.
_BIN_NOISE_RISE = 1.5
# A standard deviation is 1.4826 median absolute deviations for normal data; the median and MAD ignore the few
# onset frames inside a threshold window, which a mean and standard deviation would not.
_MAD_TO_SD = 1.4826
# The tempo prior: a log-normal weight centred on 120 BPM, one octave wide (as in librosa's beat tracker).
_PRIOR_CENTRE_BPM = 120.0
_PRIOR_OCTAVES = 1.0
_COMB_MULTIPLES = 4
_COMB_STEP_FRAMES = 0.02
# The comb's mean normalised autocorrelation at a steady beat's period: click tracks and sung notes give 0.75 or
# more, onsets at random times under 0.15.
_MIN_PULSE_STRENGTH = 0.2


@dataclass(frozen=True)
class RhythmSettings:
    """Onset detection and tempo search.

    Flux compares windows of `window_duration` seconds `flux_lag` apart, every `frame_period`. An onset must be the
    largest flux within `peak_radius` either side, exceed the median flux of the `threshold_window` around it by
    `threshold_spreads` robust standard deviations and by at least `threshold_margin`, and come at least
    `min_onset_gap` after the previous onset. Tempo is searched between `min_bpm` and `max_bpm` over the last
    `tempo_window` seconds (None: everything heard)."""

    frame_period: float = 0.005
    window_duration: float = 0.032
    flux_lag: float = 0.015
    peak_radius: float = 0.03
    threshold_window: float = 0.5
    threshold_spreads: float = 6.0
    threshold_margin: float = 0.03
    min_onset_gap: float = 0.06
    min_bpm: float = 60.0
    max_bpm: float = 200.0
    tempo_window: float | None = 12.0

    def __post_init__(self) -> None:
        if not 0 < self.frame_period < self.window_duration:
            raise ValueError("need 0 < frame_period < window_duration")
        if not 0 < self.min_bpm < self.max_bpm:
            raise ValueError(f"need 0 < min_bpm < max_bpm, got {self.min_bpm} and {self.max_bpm}")
        if self.tempo_window is not None and self.tempo_window < 2 * 60.0 / self.min_bpm:
            raise ValueError("tempo_window must hold at least two beats of the slowest tempo")


@dataclass(frozen=True)
class Rhythm:
    """Onset times (seconds, increasing) and the tempo in BPM (None when no steady beat was found)."""

    onsets: Floats
    tempo_bpm: float | None


@dataclass(frozen=True)
class TimingComparison:
    """A learner's onsets against the reference's.

    `matched` onsets were within the tolerance of a reference onset (each reference onset matching at most one);
    `on_time_ratio` is their share of the learner's onsets; `mean_offset` is the mean of learner minus reference
    time (positive = late) over the learner's onsets that have a reference onset nearer than half the reference's
    typical gap, None when none has; `score` is 100 times the F-measure of the matching (it falls both for onsets
    off the beat and for reference onsets the learner left out)."""

    matched: int
    on_time_ratio: float
    mean_offset: float | None
    score: float


class RhythmTracker:
    """Onsets and tempo of a live stream of mono float samples (full scale ±1) at `sample_rate`."""

    def __init__(self, sample_rate: int, settings: RhythmSettings | None = None) -> None:
        self.settings = settings or RhythmSettings()
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        hop = round(sample_rate * self.settings.frame_period)
        window_length = round(sample_rate * self.settings.window_duration)
        if hop < 1 or window_length <= hop:
            raise ValueError(f"sample rate {sample_rate} is too low for the rhythm settings")
        self.frame_period = hop / sample_rate
        # Frames start at the first sample rather than being centred on it, and the stream's end is not padded:
        # silence padded on would make the first sound look like an onset and the cut at the end like a click.
        self._frames = FrameBuffer(window_length, hop, centre=0)
        self._hann = np.hanning(window_length)
        self._flux_lag = max(1, round(self.settings.flux_lag / self.frame_period))
        self._peak_radius = max(1, round(self.settings.peak_radius / self.frame_period))
        self._threshold_radius = max(1, round(self.settings.threshold_window / 2 / self.frame_period))
        self._lookahead = max(self._peak_radius, self._threshold_radius)
        self._min_gap = round(self.settings.min_onset_gap / self.frame_period)
        # Flux at frame k compares it with frame k - lag, and is largest for a sharp onset when the onset lies as
        # deep inside frame k as it can while frame k - lag has not reached it yet: at the end of frame k - lag.
        self._onset_delay = (window_length - hop * self._flux_lag) / sample_rate
        tempo_window = self.settings.tempo_window
        self._tempo_frames = None if tempo_window is None else round(tempo_window / self.frame_period)
        # _envelope[0] is the flux of frame number _envelope_start; it keeps what the neighbourhoods of undecided
        # frames and the tempo window need.
        self._envelope: Floats = np.zeros(0)
        self._envelope_start = 0
        self._recent_spectra: Floats | None = None
        self._next_undecided = 0
        self._last_onset = -self._min_gap
        self._finished = False

    def push(self, samples: ArrayLike) -> Floats:
        """Adds samples; returns the times of the onsets that can now be decided (possibly none)."""
        if self._finished:
            raise ValueError("the stream has finished")
        self._add_flux(self._frames.push(samples))
        return self._decide(final=False)

    def finish(self) -> Floats:
        """Ends the stream; returns the onsets still undecided. The last window's worth of audio (32 ms) holds no
        complete frame and is not searched."""
        if self._finished:
            raise ValueError("the stream has finished")
        self._finished = True
        return self._decide(final=True)

    def tempo_bpm(self) -> float | None:
        """The tempo over the tempo window so far; None until it holds two beats of a steady pulse."""
        recent = self._envelope if self._tempo_frames is None else self._envelope[-self._tempo_frames :]
        return estimate_tempo(recent, self.frame_period, self.settings)

    def _add_flux(self, block: FrameBlock) -> None:
        if len(block) == 0:
            return
        spectra = np.log1p(_COMPRESSION_GAIN * np.abs(np.fft.rfft(block.frames * self._hann, axis=1)))
        if self._recent_spectra is None:
            # Before the stream's first frame everything is taken to have sounded like it: no onset at the start.
            self._recent_spectra = np.repeat(spectra[:1], self._flux_lag, axis=0)
        history = np.concatenate((self._recent_spectra, spectra))
        growth = history[self._flux_lag :] - history[: -self._flux_lag] - _BIN_NOISE_RISE
        self._recent_spectra = history[-self._flux_lag :]
        self._envelope = np.concatenate((self._envelope, np.maximum(growth, 0.0).mean(axis=1)))

    def _decide(self, *, final: bool) -> Floats:
        first = self._next_undecided
        end = self._envelope_start + self._envelope.size
        stop = end if final else max(first, end - self._lookahead)
        onsets: list[int] = []
        for frame in (first + np.flatnonzero(self._peaks(first, stop))).tolist():
            if frame - self._last_onset >= self._min_gap:
                onsets.append(frame)
                self._last_onset = frame
        self._next_undecided = stop
        self._forget_old_envelope()
        return np.asarray(onsets, dtype=np.float64) * self.frame_period + self._onset_delay

    def _peaks(self, first: int, stop: int) -> Mask:
        """Which frames of [first, stop) stand out as peaks. Neighbourhoods are cut short at the envelope's ends."""
        radius = self._lookahead
        count = stop - first
        if count <= 0:
            return np.zeros(0, dtype=np.bool_)
        # The frames' neighbourhoods, NaN beyond the envelope, as rows of `spans`: row i is centred on frame first+i.
        padded = np.full(count + 2 * radius, np.nan)
        available_from = max(self._envelope_start, first - radius)
        available_to = min(self._envelope_start + self._envelope.size, stop + radius)
        padded[available_from - (first - radius) : available_to - (first - radius)] = self._envelope[
            available_from - self._envelope_start : available_to - self._envelope_start
        ]
        flux = padded[radius : radius + count]
        spans = sliding_window_view(padded, 2 * radius + 1)
        local_max = np.nanmax(spans[:, radius - self._peak_radius : radius + self._peak_radius + 1], axis=1)
        around = spans[:, radius - self._threshold_radius : radius + self._threshold_radius + 1]
        median = np.nanmedian(around, axis=1)
        spread = _MAD_TO_SD * np.nanmedian(np.abs(around - median[:, None]), axis=1)
        margin = np.maximum(self.settings.threshold_margin, self.settings.threshold_spreads * spread)
        return np.asarray((flux >= local_max) & (flux >= median + margin), dtype=np.bool_)

    def _forget_old_envelope(self) -> None:
        if self._tempo_frames is None:
            return
        end = self._envelope_start + self._envelope.size
        needed_from = min(self._next_undecided - self._lookahead, end - self._tempo_frames)
        drop = max(0, needed_from - self._envelope_start)
        self._envelope = self._envelope[drop:]
        self._envelope_start += drop


def analyse_rhythm(samples: ArrayLike, sample_rate: int, settings: RhythmSettings | None = None) -> Rhythm:
    """Onsets and tempo of a whole recording (the tempo over all of it, whatever the settings' tempo window)."""
    tracker = RhythmTracker(sample_rate, replace(settings or RhythmSettings(), tempo_window=None))
    onsets = np.concatenate((tracker.push(samples), tracker.finish()))
    return Rhythm(onsets=onsets, tempo_bpm=tracker.tempo_bpm())


def estimate_tempo(envelope: Floats, frame_period: float, settings: RhythmSettings | None = None) -> float | None:
    """Tempo in BPM of an onset-strength envelope sampled every `frame_period` seconds; None when it is shorter
    than two beats of the slowest tempo or has no pulse."""
    settings = settings or RhythmSettings()
    shortest = 60.0 / settings.max_bpm / frame_period
    longest = 60.0 / settings.min_bpm / frame_period
    if envelope.size < 2 * longest:
        return None
    centred = envelope - envelope.mean()
    size = 1 << (2 * centred.size - 1).bit_length()
    autocorrelation = np.fft.irfft(np.abs(np.fft.rfft(centred, size)) ** 2, size)[: centred.size]
    if autocorrelation[0] <= 0:
        return None
    periods = np.arange(shortest, longest, _COMB_STEP_FRAMES)
    lags = periods[:, None] * np.arange(1, _COMB_MULTIPLES + 1)
    # Lags past the envelope's end have nothing to compare, and do not count for or against a period.
    usable = lags <= centred.size - 1
    comb = np.where(usable, np.interp(lags, np.arange(centred.size), autocorrelation), 0.0)
    strength = comb.sum(axis=1) / usable.sum(axis=1) / autocorrelation[0]
    bpm = 60.0 / (periods * frame_period)
    prior = np.exp(-0.5 * (np.log2(bpm / _PRIOR_CENTRE_BPM) / _PRIOR_OCTAVES) ** 2)
    best = int(np.argmax(strength * prior))
    return float(bpm[best]) if strength[best] > _MIN_PULSE_STRENGTH else None


def compare_timing(learner_onsets: ArrayLike, reference_onsets: ArrayLike, tolerance: float = 0.1) -> TimingComparison:
    """Matches a learner's onsets to a reference's over the same stretch of time (both in seconds on one
    timeline), one to one, within `tolerance` seconds."""
    learner = np.sort(np.asarray(learner_onsets, dtype=np.float64))
    reference = np.sort(np.asarray(reference_onsets, dtype=np.float64))
    if tolerance <= 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    matched = _count_matches(learner, reference, tolerance)
    total = learner.size + reference.size
    return TimingComparison(
        matched=matched,
        on_time_ratio=matched / learner.size if learner.size else 0.0,
        mean_offset=_mean_offset(learner, reference),
        score=100.0 * 2 * matched / total if total else 100.0,
    )


def _count_matches(learner: Floats, reference: Floats, tolerance: float) -> int:
    """The largest one-to-one matching within the tolerance. Taking pairs greedily from the earliest is optimal
    here: every pair is a window of the same width on one line."""
    matched = i = j = 0
    while i < reference.size and j < learner.size:
        offset = learner[j] - reference[i]
        if abs(offset) <= tolerance:
            matched += 1
            i += 1
            j += 1
        elif offset < 0:
            j += 1
        else:
            i += 1
    return matched


def _mean_offset(learner: Floats, reference: Floats) -> float | None:
    if learner.size == 0 or reference.size == 0:
        return None
    nearest = _nearest(reference, learner)
    offsets = learner - reference[nearest]
    if reference.size > 1:
        # An onset closer to the next reference onset than half the usual gap is not that onset sung late.
        offsets = offsets[np.abs(offsets) <= np.median(np.diff(reference)) / 2]
    return float(offsets.mean()) if offsets.size else None


def _nearest(sorted_values: Floats, queries: Floats) -> NDArray[np.intp]:
    right = np.clip(np.searchsorted(sorted_values, queries), 1, sorted_values.size - 1)
    left = right - 1
    if sorted_values.size == 1:
        return np.zeros(queries.size, dtype=np.intp)
    closer_left = np.abs(queries - sorted_values[left]) <= np.abs(sorted_values[right] - queries)
    return np.where(closer_left, left, right)
