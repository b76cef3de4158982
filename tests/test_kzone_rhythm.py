"""Rhythm (services/kzone/rhythm.py): click tracks at known tempos give their tempo within 2% and every click as an
onset within 20 ms and nothing else; sung notes give their starts; noise and silence give no onsets and no tempo;
a stream in chunks gives the onsets of the whole signal; timing against a reference matches onsets one to one
within the tolerance and reports the mean offset, positive when late."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from services.kzone.rhythm import (
    RhythmSettings,
    RhythmTracker,
    analyse_rhythm,
    compare_timing,
    estimate_tempo,
)

RATE = 16_000
Floats = NDArray[np.float64]


def _click_track(bpm: float, seconds: float, click: str, seed: int = 0) -> tuple[Floats, Floats]:
    """Clicks (20 ms decaying noise bursts or 1 kHz pings) at `bpm` from 0.3 s, over faint room noise, and their
    times."""
    rng = np.random.default_rng(seed)
    signal = 0.003 * rng.standard_normal(int(seconds * RATE))
    times = np.arange(0.3, seconds - 0.1, 60.0 / bpm)
    decay = np.arange(int(0.02 * RATE)) / RATE
    for start in times:
        burst = rng.standard_normal(decay.size) if click == "noise" else np.sin(2 * np.pi * 1000 * decay)
        first = round(start * RATE)
        signal[first : first + decay.size] += 0.5 * burst * np.exp(-decay / 0.005)
    return signal, times


def _sung_notes(noise_level: float, legato: bool) -> tuple[Floats, Floats]:
    """Sixteen 0.4 s notes of a scale with nine harmonics; detached notes fade in over 30 ms and out over 50 ms."""
    semitones = np.array([0, 2, 4, 5, 7, 9, 11, 12] * 2)
    note_samples = int(0.4 * RATE)
    times = np.arange(note_samples) / RATE
    harmonics = np.arange(1, 10)
    envelope = np.ones(note_samples)
    if not legato:
        envelope = np.minimum(1, times / 0.03) * np.minimum(1, times[::-1] / 0.05)
    notes = [
        0.2 * envelope * (np.sin(2 * np.pi * f0 * np.outer(times, harmonics)) * 0.7**harmonics).sum(axis=1)
        for f0 in 261.63 * 2 ** (semitones / 12)
    ]
    signal = np.concatenate([np.zeros(int(0.2 * RATE)), *notes])
    signal += noise_level * np.random.default_rng(1).standard_normal(signal.size)
    return signal, 0.2 + 0.4 * np.arange(len(notes), dtype=np.float64)


@pytest.mark.parametrize("bpm", [90.0, 120.0, 150.0])
@pytest.mark.parametrize("click", ["noise", "ping"])
def test_click_track_gives_its_tempo_and_every_click(bpm: float, click: str) -> None:
    signal, clicks = _click_track(bpm, 10.0, click)
    rhythm = analyse_rhythm(signal, RATE)

    assert rhythm.tempo_bpm is not None
    assert rhythm.tempo_bpm == pytest.approx(bpm, rel=0.02)
    assert len(rhythm.onsets) == len(clicks)
    assert np.abs(rhythm.onsets - clicks).max() < 0.02


@pytest.mark.parametrize(("legato", "noise_level"), [(True, 0.002), (False, 0.002), (True, 0.01)])
def test_starts_of_sung_notes_are_onsets(legato: bool, noise_level: float) -> None:
    signal, starts = _sung_notes(noise_level, legato)
    onsets = analyse_rhythm(signal, RATE).onsets
    nearest = np.abs(onsets[:, None] - starts[None, :]).min(axis=0)
    assert (nearest < 0.03).all()
    assert len(onsets) <= len(starts) + 1


@pytest.mark.parametrize("level", [0.0, 0.001, 0.01, 0.1])
def test_silence_and_steady_noise_have_no_onsets_and_no_tempo(level: float) -> None:
    noise = level * np.random.default_rng(5).standard_normal(10 * RATE)
    rhythm = analyse_rhythm(noise, RATE)
    assert len(rhythm.onsets) <= 1
    assert rhythm.tempo_bpm is None


def test_onsets_at_random_times_have_no_tempo() -> None:
    rng = np.random.default_rng(11)
    signal = 0.003 * rng.standard_normal(10 * RATE)
    decay = np.arange(int(0.02 * RATE)) / RATE
    starts = 0.2 + np.cumsum(rng.uniform(0.15, 0.8, 12))  # irregular gaps
    for start in starts:
        first = round(start * RATE)
        signal[first : first + decay.size] += 0.5 * rng.standard_normal(decay.size) * np.exp(-decay / 0.005)
    rhythm = analyse_rhythm(signal, RATE)
    assert len(rhythm.onsets) == len(starts)
    assert rhythm.tempo_bpm is None


def test_live_tempo_is_known_after_a_few_beats_and_follows_the_recent_window() -> None:
    slow, _ = _click_track(90.0, 14.0, "noise", seed=1)
    fast, _ = _click_track(140.0, 14.0, "noise", seed=2)
    tracker = RhythmTracker(RATE, RhythmSettings(tempo_window=6.0))
    assert tracker.tempo_bpm() is None
    tracker.push(slow[: 3 * RATE])
    tempo = tracker.tempo_bpm()
    assert tempo is not None
    assert tempo == pytest.approx(90.0, rel=0.02)
    tracker.push(slow[3 * RATE :])
    tracker.push(fast)
    tempo = tracker.tempo_bpm()
    assert tempo is not None
    assert tempo == pytest.approx(140.0, rel=0.02)


_STREAM, _ = _click_track(128.0, 4.0, "ping", seed=3)
_WHOLE = analyse_rhythm(_STREAM, RATE).onsets


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=6000), min_size=1, max_size=30))
def test_a_stream_in_chunks_of_any_size_gives_the_onsets_of_the_whole_signal(chunk_sizes: list[int]) -> None:
    tracker = RhythmTracker(RATE)
    found, position = [], 0
    for size in chunk_sizes:
        found.append(tracker.push(_STREAM[position : position + size]))
        position += size
    found.append(tracker.push(_STREAM[position:]))
    found.append(tracker.finish())
    assert np.allclose(np.concatenate(found), _WHOLE)


def test_onsets_are_reported_within_the_lookahead() -> None:
    signal, clicks = _click_track(120.0, 3.0, "noise")
    tracker = RhythmTracker(RATE)
    # Live, an onset needs a quarter second of flux after it (half the threshold window) to be decided.
    reported = tracker.push(signal[: int((clicks[0] + 0.3) * RATE)])
    assert len(reported) == 1
    assert reported[0] == pytest.approx(clicks[0], abs=0.02)


def test_a_finished_stream_takes_no_more_audio() -> None:
    tracker = RhythmTracker(RATE)
    tracker.finish()
    with pytest.raises(ValueError, match="finished"):
        tracker.push(np.zeros(100))
    with pytest.raises(ValueError, match="finished"):
        tracker.finish()


def test_tempo_needs_two_beats_of_the_slowest_tempo() -> None:
    frame_period = 0.005
    envelope = np.zeros(int(1.9 / frame_period))
    envelope[::100] = 1.0
    assert estimate_tempo(envelope, frame_period) is None
    assert estimate_tempo(np.zeros(2000), frame_period) is None


REFERENCE = np.arange(0.5, 10.0, 0.5)


def test_onsets_on_the_reference_score_100() -> None:
    timing = compare_timing(REFERENCE, REFERENCE)
    assert timing.matched == len(REFERENCE)
    assert timing.on_time_ratio == 1.0
    assert timing.mean_offset == 0.0
    assert timing.score == 100.0


def test_slightly_late_onsets_are_on_time_with_a_positive_offset() -> None:
    timing = compare_timing(REFERENCE + 0.05, REFERENCE, tolerance=0.1)
    assert timing.score == 100.0
    assert timing.mean_offset == pytest.approx(0.05)


def test_onsets_beyond_the_tolerance_are_off_time_but_still_give_the_offset() -> None:
    timing = compare_timing(REFERENCE - 0.2, REFERENCE, tolerance=0.1)
    assert timing.matched == 0
    assert timing.score == 0.0
    assert timing.mean_offset == pytest.approx(-0.2)


def test_missed_and_extra_onsets_lower_the_score() -> None:
    half = compare_timing(REFERENCE[::2], REFERENCE)
    assert half.on_time_ratio == 1.0
    assert half.score == pytest.approx(100 * 2 * 10 / (10 + 19))
    doubled = compare_timing(np.sort(np.concatenate((REFERENCE, REFERENCE + 0.25))), REFERENCE)
    assert doubled.matched == len(REFERENCE)
    assert doubled.on_time_ratio == pytest.approx(0.5)


def test_each_reference_onset_matches_one_learner_onset() -> None:
    timing = compare_timing([0.98, 1.0, 1.02], [1.0], tolerance=0.1)
    assert timing.matched == 1


def test_timing_without_onsets() -> None:
    assert compare_timing([], REFERENCE).score == 0.0
    assert compare_timing([], REFERENCE).mean_offset is None
    assert compare_timing([], []).score == 100.0
    with pytest.raises(ValueError, match="tolerance"):
        compare_timing(REFERENCE, REFERENCE, tolerance=0.0)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"frame_period": 0.05, "window_duration": 0.032}, "frame_period < window_duration"),
        ({"min_bpm": 200.0, "max_bpm": 100.0}, "min_bpm < max_bpm"),
        ({"tempo_window": 1.0}, "tempo_window"),
    ],
)
def test_bad_settings_are_rejected(bad: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RhythmSettings(**bad)
