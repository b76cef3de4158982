"""The extraction worker's pure helpers: beat grids (given tempo and downbeat win over detected ones), frames scaled
for the pose server, pose responses into a PoseSequence, transcript words shifted to their clip, PCM16, the lyrics
prompt, block-wise song analysis (the same as whole-recording analysis), and the settings' checks."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import duration_pb2

from megacity.asr.v1 import resources_pb2 as asr_res
from megacity.pose.v1 import pose_service_pb2 as pose_pb
from megacity.pose.v1 import resources_pb2 as pose_res
from services.kzone.extraction import (
    ExtractionSettings,
    analyse_rhythm_only,
    analyse_song,
    beat_grid,
    beat_phase,
    beat_times,
    fit_within,
    frame_rate_of,
    pcm16,
    pitch_track,
    pose_sequence,
    prompt_of,
    transcript_words,
)
from services.kzone.pitch import track_pitch
from services.kzone.rhythm import analyse_rhythm
from services.runtime.config import ConfigError

RATE = 16_000


def _seconds(value: duration_pb2.Duration) -> float:
    return value.ToNanoseconds() / 1e9


def _clicks(seconds: float, bpm: float, first: float) -> np.ndarray:
    samples = np.zeros(int(seconds * RATE), dtype=np.float32)
    t = np.arange(int(0.03 * RATE)) / RATE
    click = (0.8 * np.sin(2 * np.pi * 1000 * t) * np.exp(-t * 150)).astype(np.float32)
    beat = first
    while beat < seconds:
        start = int(beat * RATE)
        end = min(samples.size, start + click.size)
        samples[start:end] += click[: end - start]
        beat += 60.0 / bpm
    return samples


def test_beat_times_run_from_the_start_through_the_downbeat_to_the_end() -> None:
    assert beat_times(2.0, 120.0, 0.25) == [0.25, 0.75, 1.25, 1.75]
    # A downbeat later than a beat: pickup beats before it.
    assert beat_times(2.0, 120.0, 1.1) == pytest.approx([0.1, 0.6, 1.1, 1.6])
    assert beat_times(1.0, 60.0, 0.0) == [0.0]
    assert beat_times(0.0, 120.0, 0.0) == []
    assert beat_times(5.0, 0.0, 0.0) == []


def test_beat_phase_is_where_the_onsets_fall() -> None:
    onsets = np.array([0.31, 0.79, 1.30, 1.81, 2.29])
    assert beat_phase(onsets, 0.5) == pytest.approx(0.30, abs=0.02)
    # Phases near the wrap-around average across it, not to the middle.
    wrapped = beat_phase(np.array([0.49, 1.01, 1.49, 2.01]), 0.5)
    assert 0.0 <= wrapped < 0.5
    assert min(wrapped, 0.5 - wrapped) < 0.02
    assert beat_phase(np.array([]), 0.5) == 0.0


def test_the_creators_tempo_and_downbeat_win_over_detected_ones() -> None:
    onsets = np.arange(0.2, 4.0, 0.5)
    detected = beat_grid(onsets, 120.0, 4.0, given_tempo=0.0, given_downbeat=None)
    assert detected.detected_tempo_bpm == 120.0
    assert detected.detected_first_downbeat == pytest.approx(0.2, abs=0.01)
    assert detected.times[:3] == pytest.approx([0.2, 0.7, 1.2], abs=0.01)

    given = beat_grid(onsets, 120.0, 4.0, given_tempo=60.0, given_downbeat=1.5)
    assert given.times == pytest.approx([0.5, 1.5, 2.5, 3.5])
    assert given.detected_tempo_bpm == 120.0  # still recorded as detected

    tempo_only = beat_grid(onsets, None, 4.0, given_tempo=120.0, given_downbeat=None)
    assert tempo_only.times[0] == pytest.approx(0.2, abs=0.01)  # the phase from the onsets
    assert tempo_only.detected_tempo_bpm == 0.0

    no_audio = beat_grid(None, None, 2.0, given_tempo=120.0, given_downbeat=None)
    assert no_audio.times == [0.0, 0.5, 1.0, 1.5]
    assert no_audio.detected_first_downbeat is None

    nothing = beat_grid(onsets, None, 4.0, given_tempo=0.0, given_downbeat=0.3)
    assert nothing.times == []


def test_large_frames_are_scaled_to_fit_and_small_ones_kept() -> None:
    big = np.zeros((1080, 1920, 3), dtype=np.uint8)
    fitted = fit_within(big, 640)
    assert fitted.shape == (360, 640, 3)
    assert fitted.dtype == np.uint8
    small = np.zeros((48, 64, 3), dtype=np.uint8)
    assert fit_within(small, 640) is small
    tall = fit_within(np.zeros((1000, 10, 3), dtype=np.uint8), 100)
    assert tall.shape == (100, 1, 3)


def test_frame_rate_is_the_median_spacing() -> None:
    assert frame_rate_of([0.0, 1 / 15, 2 / 15, 3 / 15, 5 / 15], 30.0) == pytest.approx(15.0)
    assert frame_rate_of([0.0], 15.0) == 15.0


def _reply(index: int, seconds: float, person: bool) -> pose_pb.DetectPoseResponse:
    reply = pose_pb.DetectPoseResponse(frame_index=index)
    reply.timestamp.FromNanoseconds(round(seconds * 1e9))
    if person:
        pose = reply.poses.add()
        for landmark in range(33):
            pose.landmarks.append(pose_res.Landmark(x=landmark / 33, y=0.5, z=0.1, visibility=0.9))
    return reply


def test_pose_responses_become_a_sequence_of_the_frames_with_a_person() -> None:
    replies = [_reply(0, 0.0, True), _reply(1, 1 / 15, False), _reply(2, 2 / 15, True)]
    sequence = pose_sequence(replies, aspect_ratio=4 / 3)
    assert sequence is not None
    assert len(sequence) == 2
    assert sequence.timestamps.tolist() == pytest.approx([0.0, 2 / 15])
    assert sequence.landmarks.shape == (2, 33, 3)
    assert sequence.landmarks[0, 3, 0] == pytest.approx(3 / 33, abs=1e-6)
    assert sequence.visibility[1, 5] == pytest.approx(0.9)
    assert sequence.aspect_ratio == pytest.approx(4 / 3)
    assert pose_sequence([_reply(0, 0.0, False)], 1.0) is None


def test_transcript_words_are_shifted_to_their_clip_and_blank_ones_dropped() -> None:
    segment = asr_res.TranscriptSegment()
    for text, start, end in ((" Hello", 0.5, 0.9), (" ", 0.9, 1.0), (" world.", 1.0, 1.4)):
        word = segment.words.add(word=text, probability=0.75)
        word.start_offset.FromNanoseconds(round(start * 1e9))
        word.end_offset.FromNanoseconds(round(end * 1e9))
    words = transcript_words([segment], offset=300.0)
    assert [word.word for word in words] == ["Hello", "world."]
    assert _seconds(words[0].start_offset) == pytest.approx(300.5)
    assert _seconds(words[1].end_offset) == pytest.approx(301.4)
    assert words[0].confidence == pytest.approx(0.75)


def test_pcm16_clips_and_scales() -> None:
    data = pcm16(np.array([0.0, 0.5, -1.0, 2.0], dtype=np.float32))
    assert np.frombuffer(data, dtype="<i2").tolist() == [0, 16383, -32767, 32767]


def test_the_prompt_is_the_lyrics_start_cut_at_a_word() -> None:
    assert prompt_of("  la\n la  la ") == "la la la"
    long = "word " * 400
    prompt = prompt_of(long)
    assert len(prompt) <= 1000
    assert prompt.endswith("word")


def test_block_wise_song_analysis_matches_the_whole_recording() -> None:
    t = np.arange(int(23.0 * RATE)) / RATE
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    samples = tone + _clicks(23.0, 120.0, 0.1)
    analysed = analyse_song(samples, RATE)
    whole = track_pitch(samples, RATE)
    assert len(analysed.pitch) == len(whole)
    np.testing.assert_allclose(analysed.pitch.frequency_hz, whole.frequency_hz, atol=1e-6)
    reference = analyse_rhythm(samples, RATE)
    np.testing.assert_allclose(analysed.onsets, reference.onsets, atol=1e-9)
    assert analysed.tempo_bpm == pytest.approx(120.0, rel=0.02)
    onsets, tempo = analyse_rhythm_only(samples, RATE)
    np.testing.assert_allclose(onsets, reference.onsets, atol=1e-9)
    assert tempo == analysed.tempo_bpm
    track = pitch_track(analysed.pitch)
    assert len(track.frequency_hz) == len(whole)
    assert _seconds(track.frame_period) == pytest.approx(0.01)
    voiced = [hz for hz in track.frequency_hz if hz > 0]
    assert np.median(voiced) == pytest.approx(220, rel=0.02)


def test_settings_refuse_a_heartbeat_slower_than_the_takeover() -> None:
    with pytest.raises(ConfigError):
        ExtractionSettings(heartbeat_seconds=10.0, stale_after_seconds=5.0)
    with pytest.raises(ConfigError):
        ExtractionSettings(max_claims=0)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGACITY_KZONE_EXTRACTION_WORKERS", "2")
    monkeypatch.setenv("MEGACITY_KZONE_EXTRACTION_STALE_SECONDS", "30")
    monkeypatch.setenv("MEGACITY_KZONE_EXTRACTION_FRAME_RATE", "10")
    settings = ExtractionSettings.from_environment()
    assert (settings.workers, settings.stale_after_seconds, settings.frame_rate) == (2, 30.0, 10.0)
    monkeypatch.setenv("MEGACITY_KZONE_EXTRACTION_HEARTBEAT_SECONDS", "40")
    with pytest.raises(ConfigError):
        ExtractionSettings.from_environment()
