"""The voice report, pure: pronunciation against the target, contour against a reference in another key, timing
against its beats, running scores, and advice most important first."""

from __future__ import annotations

import numpy as np
from google.protobuf import duration_pb2

from megacity.kzone.v1 import resources_pb2 as res
from services.kzone.pitch import track_pitch
from services.kzone.pronunciation import RecognisedWord
from services.kzone.rhythm import analyse_rhythm
from services.kzone.voice_report import Performance, build_report, reference_song, running_scores, seconds_duration

RATE = 16_000
NOTES = [262.0, 294.0, 330.0, 262.0, 330.0, 392.0, 349.0, 294.0]
NOTE, GAP = 0.4, 0.05


def _melody(notes: list[float]) -> np.ndarray:
    parts = []
    for hz in notes:
        phase = 2 * np.pi * hz * np.arange(int(NOTE * RATE)) / RATE
        parts.append(0.3 * np.sum([np.sin(k * phase) / k for k in range(1, 6)], axis=0))
        parts.append(np.zeros(int(GAP * RATE)))
    return np.concatenate(parts)


def _song(start: float = 0.0) -> tuple[res.ReferenceContent, res.ReferenceFeatures]:
    track = track_pitch(_melody(NOTES), RATE)
    content = res.ReferenceContent(id="song", language="en", lyrics="la la la", tempo_bpm=60 / (NOTE + GAP))
    features = res.ReferenceFeatures(
        pitch=res.PitchTrack(frame_period=duration_pb2.Duration(nanos=10_000_000), frequency_hz=track.frequency_hz),
        beats=[seconds_duration(k * (NOTE + GAP)) for k in range(len(NOTES))],
    )
    return content, features


def _performance(samples: np.ndarray, words: list[RecognisedWord] | None = None) -> Performance:
    rhythm = analyse_rhythm(samples, RATE)
    return Performance(
        duration=samples.size / RATE,
        transcript=" ".join(word.text for word in words or []),
        words=words or [],
        language="en",
        pitch=track_pitch(samples, RATE),
        onsets=rhythm.onsets,
        tempo_bpm=rhythm.tempo_bpm,
    )


def test_key_shifted_singing_scores_well_and_another_melody_low() -> None:
    song = reference_song(*_song())
    assert song.target_text == "la la la"
    shifted = build_report(_performance(_melody([n * 2 ** (2 / 12) for n in NOTES])), "", song)
    assert shifted.scores.pitch >= 80
    assert abs(shifted.pitch.key_shift_semitones - 2.0) < 0.3
    assert shifted.scores.HasField("timing")
    assert shifted.rhythm.onset_count > 0
    assert any("semitones higher" in line for line in shifted.feedback)
    other = build_report(_performance(_melody([392.0, 196.0, 440.0, 247.0, 370.0, 208.0, 415.0, 233.0])), "", song)
    assert other.scores.pitch < 50
    assert other.feedback[0].startswith("Follow the melody")
    assert shifted.scores.overall > other.scores.overall


def test_a_reference_part_starts_where_the_learner_starts() -> None:
    content, features = _song()
    start = 2 * (NOTE + GAP)
    song = reference_song(content, features, start)
    assert song.beats[0] == 0.0
    full = reference_song(content, features)
    assert np.array_equal(song.pitch_at(0, 50), full.pitch_at(round(start / 0.01), 50))
    assert song.pitch_at(10_000, 5).tolist() == [0.0] * 5


def test_pronunciation_against_a_target_text_and_running_scores() -> None:
    target = "open the window please"
    heard = [
        RecognisedWord("Open", 0.1, 0.4, 0.9),
        RecognisedWord("the", 0.4, 0.5, 0.9),
        RecognisedWord("widow", 0.5, 0.9, 0.6),
    ]
    running = running_scores(_performance(np.zeros(RATE), heard), target, None)
    assert running.HasField("pronunciation")
    assert not running.HasField("pitch")
    report = build_report(_performance(np.zeros(RATE), heard), target, None)
    assert [word.expected for word in report.word_scores] == ["open", "the", "window", "please"]
    assert [word.correct for word in report.word_scores] == [True, True, False, False]
    assert report.word_scores[0].start_offset.ToMilliseconds() == 100
    assert report.scores.pronunciation < running.pronunciation  # the missing word counts at the end only
    assert not report.HasField("pitch")  # silence: nothing voiced
    assert not report.HasField("rhythm")  # no reference
    assert any('"please"' in line for line in report.feedback)
    assert any('"window" sounded like "widow"' in line for line in report.feedback)
