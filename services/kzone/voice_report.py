"""A voice performance scored and reported, pure (no I/O): the VoiceReport of a live stream or an upload, and the
running scores a live stream sends while the learner performs.

Inputs are what the stream or the upload gathered: the recogniser's words, the pitch track (services/kzone/pitch.py),
the onsets and tempo (services/kzone/rhythm.py); and what the learner practised: a target text, or a reference song
(`ReferenceSong`: its lyrics, or the words extracted from its audio, its pitch track and its beats, from the part
the learner starts at).

- pronunciation: the heard words aligned with the target text (services/kzone/pronunciation.py), when there is one;
- pitch: the learner's contour against the reference's over the same stretch, key-shift tolerant
  (services/kzone/contour.py), when there is a reference and both were voiced enough;
- timing: the learner's onsets against the reference's beats over the same stretch (services/kzone/rhythm.py);
- overall: the mean of the scores that apply.
Feedback strings come most important first: the weakest score's advice leads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
from google.protobuf import duration_pb2
from numpy.typing import NDArray

from megacity.kzone.v1 import resources_pb2 as res
from services.kzone.contour import ContourComparison, compare_contours
from services.kzone.pitch import PitchFrames, pitch_statistics
from services.kzone.pronunciation import PronunciationResult, RecognisedWord, normalise, score_pronunciation
from services.kzone.rhythm import TimingComparison, compare_timing

Floats: TypeAlias = NDArray[np.float64]

# The learner's frames (PitchSettings' default frame period); reference tracks are resampled to it.
FRAME_PERIOD = 0.01
TIMING_TOLERANCE = 0.1
# Advice thresholds.
_GOOD_SCORE = 80.0
_WEAK_SCORE = 60.0
_NOTABLE_KEY_SHIFT = 1.0
_NOTABLE_TIMING_OFFSET = 0.05
_MIN_VOICED_RATIO = 0.2
_MAX_WORD_ADVICE = 3


def seconds_duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(max(0.0, seconds) * 1e9))
    return value


@dataclass(frozen=True)
class ReferenceSong:
    """A READY song from the learner's starting point: times are seconds from the start of the learner's audio.

    `pitch_hz` holds one value per FRAME_PERIOD (0 unvoiced); `beats` are the reference's beats shifted to the
    learner's timeline (before the start dropped)."""

    content_id: str
    language: str
    target_text: str
    pitch_hz: Floats
    beats: Floats
    tempo_bpm: float

    def pitch_at(self, first_frame: int, count: int) -> Floats:
        """The reference pitch aligned to the learner's frames first_frame .. first_frame + count (0 past its end)."""
        aligned = np.zeros(count)
        if count <= 0 or first_frame >= self.pitch_hz.size:
            return aligned
        available = self.pitch_hz[max(first_frame, 0) : first_frame + count]
        aligned[: available.size] = available
        return aligned

    def beats_until(self, seconds: float) -> Floats:
        return self.beats[self.beats <= seconds + TIMING_TOLERANCE]


def reference_song(
    content: res.ReferenceContent, features: res.ReferenceFeatures, start_seconds: float = 0.0
) -> ReferenceSong:
    """A READY song's stored features, from `start_seconds` into it."""
    track = features.pitch
    period = track.frame_period.ToNanoseconds() / 1e9
    values = np.asarray(track.frequency_hz, dtype=np.float64)
    track_start = track.start_offset.ToNanoseconds() / 1e9
    pitch = np.zeros(0)
    if period > 0 and values.size:
        end = track_start + values.size * period
        count = max(0, math.ceil((end - start_seconds) / FRAME_PERIOD))
        # Nearest reference frame to each learner frame (a track at another frame period is resampled).
        times = start_seconds + np.arange(count) * FRAME_PERIOD
        index = np.rint((times - track_start) / period).astype(np.intp)
        inside = (index >= 0) & (index < values.size)
        pitch = np.where(inside, values[np.clip(index, 0, values.size - 1)], 0.0)
    beats = np.asarray([beat.ToNanoseconds() / 1e9 for beat in features.beats], dtype=np.float64) - start_seconds
    target = content.lyrics.strip() or " ".join(word.word for word in features.words if word.word.strip())
    return ReferenceSong(
        content_id=content.id,
        language=content.language,
        target_text=target,
        pitch_hz=pitch,
        beats=np.sort(beats[beats >= -TIMING_TOLERANCE]),
        tempo_bpm=content.tempo_bpm,
    )


def has_words(text: str) -> bool:
    return any(normalise(token) for token in text.split())


@dataclass(frozen=True)
class Performance:
    """What was heard of the learner: `duration` seconds of audio, the transcript and its words (seconds, with the
    recogniser's confidence), the pitch track (None before any frame), the onsets and tempo."""

    duration: float
    transcript: str
    words: Sequence[RecognisedWord]
    language: str
    pitch: PitchFrames | None
    onsets: Floats = field(default_factory=lambda: np.zeros(0))
    tempo_bpm: float | None = None


@dataclass(frozen=True)
class _Scores:
    pronunciation: PronunciationResult | None
    contour: ContourComparison | None
    timing: TimingComparison | None

    def message(self) -> res.VoiceScores:
        scores = res.VoiceScores()
        parts: list[float] = []
        if self.pronunciation is not None:
            scores.pronunciation = self.pronunciation.score
            parts.append(self.pronunciation.score)
        if self.contour is not None:
            scores.pitch = self.contour.score
            parts.append(self.contour.score)
        if self.timing is not None:
            scores.timing = self.timing.score
            parts.append(self.timing.score)
        if parts:
            scores.overall = float(np.mean(parts))
        return scores


def _learner_pitch(performance: Performance) -> Floats:
    """The learner's pitch from time 0 at FRAME_PERIOD (frames before the first one returned are unvoiced)."""
    pitch = performance.pitch
    if pitch is None or len(pitch) == 0:
        return np.zeros(0)
    return np.concatenate((np.zeros(max(0, pitch.first_frame)), pitch.frequency_hz))


def _score(performance: Performance, target_text: str, reference: ReferenceSong | None, *, partial: bool) -> _Scores:
    pronunciation = None
    if has_words(target_text):
        target = target_text
        if partial:  # so far: the target's words up to as many as were heard
            heard = sum(1 for word in performance.words if normalise(word.text))
            target = " ".join(target_text.split()[: max(1, heard)])
        pronunciation = score_pronunciation(target, performance.words) if performance.words or not partial else None
    contour = timing = None
    if reference is not None:
        learner = _learner_pitch(performance)
        if learner.size:
            contour = compare_contours(reference.pitch_at(0, learner.size), learner, FRAME_PERIOD)
        beats = reference.beats_until(performance.duration)
        if beats.size and (performance.onsets.size or not partial):
            timing = compare_timing(performance.onsets, beats, TIMING_TOLERANCE)
    return _Scores(pronunciation, contour, timing)


def running_scores(performance: Performance, target_text: str, reference: ReferenceSong | None) -> res.VoiceScores:
    """Scores so far: pronunciation of the words heard against as many target words, pitch and timing over the
    audio so far. Fields that cannot be scored yet are unset."""
    return _score(performance, target_text, reference, partial=True).message()


def build_report(performance: Performance, target_text: str, reference: ReferenceSong | None) -> res.VoiceReport:
    """The final report of a performance against `target_text` (may be empty) and `reference` (may be None)."""
    scored = _score(performance, target_text, reference, partial=False)
    report = res.VoiceReport(
        target_text=target_text,
        language=performance.language,
        duration=seconds_duration(performance.duration),
        transcript=performance.transcript,
        words=[
            res.TranscriptWord(
                word=word.text,
                start_offset=seconds_duration(word.start),
                end_offset=seconds_duration(word.end),
                confidence=word.confidence,
            )
            for word in performance.words
        ],
        scores=scored.message(),
    )
    if scored.pronunciation is not None:
        for word in scored.pronunciation.target_words:
            score = res.WordScore(expected=word.expected, heard=word.heard, score=word.score, correct=word.correct)
            if word.start is not None and word.end is not None:
                score.start_offset.CopyFrom(seconds_duration(word.start))
                score.end_offset.CopyFrom(seconds_duration(word.end))
            if word.jamo_accuracy is not None:
                score.jamo_accuracy = word.jamo_accuracy
            report.word_scores.append(score)
    statistics = pitch_statistics(performance.pitch) if performance.pitch is not None else None
    if statistics is not None:
        report.pitch.CopyFrom(
            res.PitchSummary(
                mean_hz=statistics.mean_hz,
                min_hz=statistics.min_hz,
                max_hz=statistics.max_hz,
                voiced_ratio=statistics.voiced_ratio,
            )
        )
        if scored.contour is not None:
            report.pitch.key_shift_semitones = scored.contour.key_shift_semitones
            report.pitch.contour_similarity = scored.contour.similarity
    if reference is not None:
        rhythm = res.RhythmSummary(
            tempo_bpm=performance.tempo_bpm or 0.0,
            reference_tempo_bpm=reference.tempo_bpm,
            onset_count=int(performance.onsets.size),
        )
        if scored.timing is not None:
            rhythm.on_time_ratio = scored.timing.on_time_ratio
            if scored.timing.mean_offset is not None:
                rhythm.mean_timing_offset.FromNanoseconds(round(scored.timing.mean_offset * 1e9))
        report.rhythm.CopyFrom(rhythm)
    report.feedback.extend(_feedback(scored, performance, reference))
    return report


def _feedback(scored: _Scores, performance: Performance, reference: ReferenceSong | None) -> list[str]:
    advice: list[tuple[float, str]] = []  # (score it concerns, text): the weakest first
    if scored.pronunciation is not None:
        result = scored.pronunciation
        missed = [word.expected for word in result.target_words if not word.heard]
        unclear = [word for word in result.target_words if word.heard and not word.correct]
        if missed:
            listed = ", ".join(f'"{word}"' for word in missed[:_MAX_WORD_ADVICE])
            advice.append(
                (result.score, f"Say every word clearly: {listed} {'was' if len(missed) == 1 else 'were'} not heard")
            )
        for word in unclear[:_MAX_WORD_ADVICE]:
            advice.append((word.score, f'"{word.expected}" sounded like "{word.heard}"'))
    statistics = pitch_statistics(performance.pitch) if performance.pitch is not None else None
    if reference is not None and (statistics is None or statistics.voiced_ratio < _MIN_VOICED_RATIO):
        advice.append((0.0, "Little of your voice was heard as singing: sing louder or closer to the microphone"))
    if scored.contour is not None:
        contour = scored.contour
        if contour.score < _WEAK_SCORE:
            advice.append(
                (
                    contour.score,
                    f"Follow the melody more closely: your notes stray by about "
                    f"{contour.mean_deviation_cents / 100:.1f} semitones from the reference's",
                )
            )
        if abs(contour.key_shift_semitones) >= _NOTABLE_KEY_SHIFT:
            direction = "higher" if contour.key_shift_semitones > 0 else "lower"
            advice.append(
                (
                    100.0,
                    f"You sang {abs(contour.key_shift_semitones):.1f} semitones {direction} than the original; "
                    "the key is not scored",
                )
            )
    if scored.timing is not None:
        timing = scored.timing
        offset = timing.mean_offset
        if offset is not None and abs(offset) >= _NOTABLE_TIMING_OFFSET:
            when = "late" if offset > 0 else "early"
            advice.append((timing.score, f"You come in {when} by about {abs(offset) * 1000:.0f} ms: follow the beat"))
        elif timing.score < _WEAK_SCORE:
            advice.append((timing.score, "Keep to the beat: many notes started off it"))
    scores = scored.message()
    if not advice or (scores.HasField("overall") and scores.overall >= _GOOD_SCORE and not _weak(advice)):
        advice.append((100.0, "Well done: keep practising to hold it steady"))
    advice.sort(key=lambda item: item[0])
    return [text for _, text in advice]


def _weak(advice: list[tuple[float, str]]) -> bool:
    return any(score < _WEAK_SCORE for score, _ in advice)
