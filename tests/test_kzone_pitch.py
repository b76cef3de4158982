"""Pitch and loudness tracking (services/kzone/pitch.py, services/kzone/framing.py): synthetic glides, scales and
harmonic-rich tones are tracked within 2% on voiced frames, silence and noise are unvoiced, loudness is the RMS in
dBFS, a stream pushed in chunks of any size gives the same frames as the whole signal, and 10 s of audio takes well
under 100 ms."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from services.kzone.pitch import (
    SILENCE_DB,
    PitchFrames,
    PitchSettings,
    PitchTracker,
    concatenate_frames,
    pitch_statistics,
    track_pitch,
)

RATE = 16_000
Floats = NDArray[np.float64]


def _tone(frequency_hz: Floats, amplitude: float = 0.5) -> Floats:
    """A sine whose instantaneous frequency follows `frequency_hz` sample by sample (phase-continuous)."""
    return np.asarray(amplitude * np.sin(2 * np.pi * np.cumsum(frequency_hz) / RATE), dtype=np.float64)


def _sawtooth(f0: float, seconds: float) -> Floats:
    """A band-limited sawtooth: every harmonic below Nyquist at amplitude 1/k, like a bright voice or a synth."""
    times = np.arange(int(seconds * RATE)) / RATE
    harmonics = np.arange(1, int(RATE / 2 / f0) + 1)
    return np.asarray(0.3 * (np.sin(2 * np.pi * f0 * np.outer(times, harmonics)) / harmonics).sum(axis=1))


def _relative_errors(track: PitchFrames, truth: Floats) -> Floats:
    return np.asarray(np.abs(track.frequency_hz[track.voiced] / truth[track.voiced] - 1))


def test_exponential_glide_is_tracked_within_two_percent() -> None:
    seconds = 2.0
    times = np.arange(int(seconds * RATE)) / RATE
    track = track_pitch(_tone(200 * 2 ** (times / seconds)), RATE)
    truth = 200 * 2 ** (track.times / seconds)

    inner = slice(5, -5)  # the first and last frames are half silence
    assert track.voiced[inner].all()
    assert _relative_errors(track, truth).max() < 0.02


def test_notes_of_a_scale_are_tracked_within_two_percent_away_from_note_changes() -> None:
    semitones = np.array([0, 2, 4, 5, 7, 9, 11, 12])
    notes_hz = 261.63 * 2 ** (semitones / 12)
    note_seconds = 0.25
    track = track_pitch(_tone(np.repeat(notes_hz, int(note_seconds * RATE))), RATE)

    note = np.minimum((track.times / note_seconds).astype(int), len(notes_hz) - 1)
    # A frame's window reaches about 35 ms around it; frames that hear two notes are left out.
    distance_to_change = np.abs(track.times - np.round(track.times / note_seconds) * note_seconds)
    clear = (distance_to_change > 0.04) & (track.times < len(notes_hz) * note_seconds - 0.04)
    assert track.voiced[clear].all()
    assert np.abs(track.frequency_hz[clear] / notes_hz[note[clear]] - 1).max() < 0.02


@pytest.mark.parametrize("f0", [82.0, 220.0, 660.0, 1000.0])
def test_harmonic_rich_tone_is_not_octave_errored(f0: float) -> None:
    track = track_pitch(_sawtooth(f0, 0.5), RATE)
    inner = slice(5, -5)
    assert track.voiced[inner].all()
    assert np.abs(track.frequency_hz[inner] / f0 - 1).max() < 0.02


def test_tone_with_a_weak_fundamental_keeps_its_pitch() -> None:
    times = np.arange(RATE // 2) / RATE
    f0 = 150.0
    signal = sum(weight * np.sin(2 * np.pi * k * f0 * times) for k, weight in [(1, 0.2), (2, 0.6), (3, 0.3), (4, 0.2)])
    track = track_pitch(np.asarray(signal), RATE)
    assert np.abs(track.frequency_hz[5:-5] / f0 - 1).max() < 0.02


def test_silence_is_unvoiced_and_at_the_loudness_floor() -> None:
    track = track_pitch(np.zeros(RATE), RATE)
    assert not track.voiced.any()
    assert np.all(track.loudness_db == SILENCE_DB)
    assert pitch_statistics(track) is None


@pytest.mark.parametrize("level", [0.01, 0.3])
def test_white_noise_is_mostly_unvoiced(level: float) -> None:
    noise = level * np.random.default_rng(7).standard_normal(2 * RATE)
    assert track_pitch(noise, RATE).voiced.mean() < 0.05


def test_quiet_tone_below_the_loudness_gate_is_unvoiced() -> None:
    quiet = _tone(np.full(RATE // 2, 220.0), amplitude=10 ** (-70 / 20))
    assert not track_pitch(quiet, RATE).voiced.any()


@pytest.mark.parametrize(("amplitude", "expected_db"), [(1.0, -3.01), (0.5, -9.03), (0.01, -43.01)])
def test_loudness_is_rms_in_dbfs(amplitude: float, expected_db: float) -> None:
    track = track_pitch(_tone(np.full(RATE // 2, 440.0), amplitude), RATE)
    assert np.allclose(track.loudness_db[5:-5], expected_db, atol=0.05)


def test_frames_are_every_ten_milliseconds_from_zero_to_the_end() -> None:
    samples = int(1.234 * RATE)
    track = track_pitch(np.zeros(samples), RATE)
    assert track.first_frame == 0
    assert track.frame_period == 0.01
    assert len(track) == 124  # frames at 0, 10, ..., 1230 ms: every sample lies in some frame's hop
    assert track.times[-1] == pytest.approx(1.23)


def test_statistics_of_a_track() -> None:
    times = np.arange(RATE) / RATE
    signal = np.where(times < 0.5, _tone(np.full(RATE, 200.0)), _tone(np.full(RATE, 300.0)))
    signal[int(0.75 * RATE) :] = 0.0
    statistics = pitch_statistics(track_pitch(signal, RATE))
    assert statistics is not None
    assert statistics.min_hz == pytest.approx(200, rel=0.02)
    assert statistics.max_hz == pytest.approx(300, rel=0.02)
    assert 200 < statistics.mean_hz < 300
    assert statistics.voiced_ratio == pytest.approx(0.75, abs=0.05)


_STREAM = _tone(np.linspace(180, 520, RATE // 2)) + 0.01 * np.random.default_rng(3).standard_normal(RATE // 2)
_WHOLE = track_pitch(_STREAM, RATE)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=40))
def test_a_stream_in_chunks_of_any_size_gives_the_frames_of_the_whole_signal(chunk_sizes: list[int]) -> None:
    tracker = PitchTracker(RATE)
    parts, position = [], 0
    for size in chunk_sizes:
        parts.append(tracker.push(_STREAM[position : position + size]))
        position += size
    parts.append(tracker.push(_STREAM[position:]))
    parts.append(tracker.finish())

    streamed = concatenate_frames(parts)
    assert streamed.first_frame == 0
    assert np.array_equal(streamed.voiced, _WHOLE.voiced)
    assert np.allclose(streamed.frequency_hz, _WHOLE.frequency_hz)
    assert np.allclose(streamed.loudness_db, _WHOLE.loudness_db)


def test_live_frames_arrive_as_soon_as_their_samples_have() -> None:
    tracker = PitchTracker(RATE)
    first = tracker.push(_STREAM[:1600])  # 100 ms
    assert 0 < len(first) <= 10
    second = tracker.push(_STREAM[1600:3200])
    assert second.first_frame == first.first_frame + len(first)
    assert len(second) == 10  # one frame per 10 ms once the first window is full


def test_ten_seconds_take_well_under_100_ms() -> None:
    signal = _tone(np.full(10 * RATE, 220.0))
    track_pitch(signal, RATE)  # warm-up (FFT plans)
    best = min(_timed(lambda: track_pitch(signal, RATE)) for _ in range(5))
    assert best < 0.1


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def test_concatenating_frames_that_do_not_follow_each_other_is_an_error() -> None:
    frames = track_pitch(np.zeros(RATE // 10), RATE)
    with pytest.raises(ValueError, match="do not follow"):
        concatenate_frames([frames, frames])
    with pytest.raises(ValueError, match="nothing"):
        concatenate_frames([])


def test_a_finished_stream_takes_no_more_audio() -> None:
    tracker = PitchTracker(RATE)
    tracker.push(np.zeros(800))
    tracker.finish()
    with pytest.raises(ValueError, match="finished"):
        tracker.push(np.zeros(800))
    with pytest.raises(ValueError, match="finished"):
        tracker.finish()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"min_hz": 500.0, "max_hz": 400.0}, "min_hz < max_hz"),
        ({"frame_period": 0.0}, "frame_period"),
        ({"voicing_threshold": 1.5}, "voicing_threshold"),
    ],
)
def test_bad_settings_are_rejected(bad: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PitchSettings(**bad)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        PitchTracker(0)
    with pytest.raises(ValueError, match="too low"):
        PitchTracker(1000)
    with pytest.raises(ValueError, match="mono"):
        PitchTracker(RATE).push(np.zeros((2, 100)))
