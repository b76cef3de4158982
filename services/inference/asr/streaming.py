"""The streaming policy of the asr server: when to decode, what is stable, where segments end. Pure: no model.

A stream's audio collects in a buffer that starts at the last committed point. Every `decode_interval` seconds of
new audio (or at once when the speaker pauses or the stream ends) the caller decodes the whole buffer with
whatever model it has and hands the words back (`apply`). The policy then works as whisper_streaming's
LocalAgreement-2 does:

- a word is *committed* (stable) once two successive hypotheses agree on it: the longest common prefix of the
  last two hypotheses, past what is already committed, is committed; the rest is the unstable tail;
- committed words gather into a segment that is emitted, final, at a sentence end (`.`, `?`, `!`), when the
  speaker pauses (energy voice-activity detection: `silence_end` seconds of trailing silence after speech; that
  decode commits everything it heard), when the buffer outgrows `max_buffer`, and at the end of the stream;
- the buffer is trimmed at each emitted segment's end, so a decode never sees more than ~`max_buffer` plus the
  audio that arrived while it ran. Audio without speech is dropped without decoding (that keeps Whisper from
  hallucinating on silence and costs nothing).

Times are seconds from the start of the stream. Events are `Partial` and `Segment` values the server maps onto
the wire.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Samples = npt.NDArray[np.float32]

SENTENCE_END = (".", "?", "!", "\u3002", "\uff1f", "\uff01")  # and the CJK full stop, question and exclamation marks
_NORMALISE = re.compile(r"[^\w']+", re.UNICODE)


@dataclass(frozen=True)
class Word:
    """One recognised word; `start`/`end` in seconds (relative to the decoded audio, or absolute in events)."""

    text: str
    start: float
    end: float
    probability: float = 1.0


@dataclass(frozen=True)
class Hypothesis:
    """What one decode of the buffer heard: its words (times relative to the decoded audio) and confidence."""

    words: Sequence[Word]
    avg_logprob: float = 0.0
    no_speech_probability: float = 0.0
    language: str = ""


@dataclass(frozen=True)
class DecodeJob:
    """Audio to decode: the buffer from `offset` seconds on. `final`: commit all it hears (pause, stream end)."""

    audio: Samples
    offset: float
    final: bool


@dataclass(frozen=True)
class Partial:
    stable_text: str
    unstable_text: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    index: int
    text: str
    start: float
    end: float
    words: tuple[Word, ...]
    avg_logprob: float
    no_speech_probability: float
    language: str


Event = Partial | Segment


@dataclass(frozen=True)
class PolicyParams:
    sample_rate: int = 16_000
    # Decode again once this much new audio arrived (seconds).
    decode_interval: float = 1.0
    # Past this much buffered audio, commit what is there and cut a segment (Whisper sees 30 s at most).
    max_buffer: float = 15.0
    # Trailing silence after speech that ends an utterance (seconds).
    silence_end: float = 0.8
    # Voice activity: frames of `vad_frame` seconds whose RMS exceeds max(min_energy, noise_factor * noise floor).
    vad_frame: float = 0.03
    min_energy: float = 0.01
    noise_factor: float = 4.0
    # A pause at least this long after a sentence is where the buffer is cut (seconds).
    min_pause: float = 0.15
    # Audio kept before speech when silence is dropped, so a word's onset is not cut off (seconds).
    keep_before_speech: float = 0.3
    # Words starting this long before the committed end are taken as repeats of committed words.
    overlap_tolerance: float = 0.1


def normalise(text: str) -> str:
    """The form in which two hypotheses' words are compared: lower case, no punctuation or spaces."""
    return _NORMALISE.sub("", text.lower())


def join_words(words: Sequence[Word]) -> str:
    return "".join(word.text for word in words).strip()


class LocalAgreement:
    """LocalAgreement-2 over word hypotheses with absolute times (whisper_streaming's HypothesisBuffer)."""

    def __init__(self, overlap_tolerance: float = 0.1) -> None:
        self._tolerance = overlap_tolerance
        self.committed_end = 0.0
        self._committed_tail: list[Word] = []  # the last committed words, to recognise repeats
        self._previous: list[Word] = []  # the uncommitted part of the last hypothesis

    @property
    def unstable(self) -> list[Word]:
        return list(self._previous)

    def _fresh(self, words: Sequence[Word]) -> list[Word]:
        """The words of a hypothesis past what is committed: not before the committed end, and not repeating the
        committed words' last n-gram (Whisper often re-emits the words just before a cut)."""
        fresh = [word for word in words if word.start > self.committed_end - self._tolerance]
        if fresh and self._committed_tail and abs(fresh[0].start - self.committed_end) < 1.0:
            tail = [normalise(word.text) for word in self._committed_tail]
            for size in range(min(len(tail), len(fresh), 5), 0, -1):
                if tail[-size:] == [normalise(word.text) for word in fresh[:size]]:
                    return fresh[size:]
        return fresh

    def insert(self, words: Sequence[Word]) -> list[Word]:
        """Take a new hypothesis; return the words that became committed (the prefix both last hypotheses agree on)."""
        fresh = self._fresh(words)
        agreed: list[Word] = []
        for old, new in zip(self._previous, fresh, strict=False):
            if normalise(old.text) != normalise(new.text):
                break
            agreed.append(new)
        self._commit(agreed)
        self._previous = fresh[len(agreed) :]
        return agreed

    def commit_all(self, words: Sequence[Word]) -> list[Word]:
        """Commit a whole hypothesis at once (a final decode: the speaker paused or the stream ended)."""
        fresh = self._fresh(words)
        self._commit(fresh)
        self._previous = []
        return fresh

    def commit_unstable(self) -> list[Word]:
        """Commit the pending tail of the last hypothesis (the buffer must be cut and nothing else agreed)."""
        words, self._previous = self._previous, []
        self._commit(words)
        return words

    def rebase(self, cut: float) -> None:
        """The audio before `cut` is gone and all committed speech ended before it: whatever a decode hears from
        now on is new."""
        self.committed_end = min(self.committed_end, cut)
        self._committed_tail = []

    def _commit(self, words: Sequence[Word]) -> None:
        if words:
            self.committed_end = max(self.committed_end, words[-1].end)
            self._committed_tail = [*self._committed_tail, *words][-5:]


@dataclass
class _Committed:
    word: Word
    avg_logprob: float
    no_speech_probability: float
    language: str


@dataclass
class _Vad:
    """Energy-based voice activity over fixed frames, with an adaptive noise floor."""

    params: PolicyParams
    frame: int
    noise_floor: float
    carry: Samples = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    position: int = 0  # samples classified so far
    last_speech_end: float = -1.0  # end time of the last speech frame; -1: none yet
    speech_frames: list[tuple[float, float]] = field(default_factory=list)  # merged speech intervals

    def feed(self, samples: Samples) -> None:
        data = np.concatenate((self.carry, samples)) if self.carry.size else samples
        whole = data.size // self.frame * self.frame
        self.carry = data[whole:].copy()
        if whole == 0:
            return
        frames = data[:whole].reshape(-1, self.frame).astype(np.float64)
        energies = np.sqrt(np.mean(frames * frames, axis=1))
        rate = self.params.sample_rate
        for energy in energies:
            start = self.position / rate
            self.position += self.frame
            end = self.position / rate
            threshold = max(self.params.min_energy, self.params.noise_factor * self.noise_floor)
            if energy > threshold:
                self.last_speech_end = end
                if self.speech_frames and self.speech_frames[-1][1] >= start - 1e-9:
                    self.speech_frames[-1] = (self.speech_frames[-1][0], end)
                else:
                    self.speech_frames.append((start, end))
            else:
                self.noise_floor = 0.95 * self.noise_floor + 0.05 * float(energy)

    def first_speech_after(self, time: float) -> float | None:
        for start, end in self.speech_frames:
            if end > time:
                return max(start, time)
        return None

    def widest_silence(self, low: float, high: float) -> tuple[float, float] | None:
        """The longest stretch without speech within [low, high] (classified frames only), if any."""
        high = min(high, self.position / self.params.sample_rate)
        best: tuple[float, float] | None = None
        cursor = low
        for start, end in [*self.speech_frames, (high, high)]:
            if end <= cursor:
                continue
            gap = (cursor, min(start, high))
            if gap[1] - gap[0] > (best[1] - best[0] if best else 0.0):
                best = gap
            cursor = max(cursor, end)
            if cursor >= high:
                break
        return best

    def forget_before(self, time: float) -> None:
        self.speech_frames = [(max(s, time), e) for s, e in self.speech_frames if e > time]


class StreamPolicy:
    """One stream's state: its buffer, voice activity, agreement and segments. Drive it with `add_audio`,
    `next_job` (when no decode is in flight), `apply` (the decode's result) and `finish` (end of stream)."""

    def __init__(self, params: PolicyParams | None = None, *, language: str = "") -> None:
        self.params = params or PolicyParams()
        rate = self.params.sample_rate
        self._vad = _Vad(self.params, max(1, round(self.params.vad_frame * rate)), self.params.min_energy / 4)
        self._buffer: Samples = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # sample index of the buffer's first sample
        self._received = 0  # samples received in all
        self._decoded_until = 0  # sample index up to which the last decode saw the audio
        self._agreement = LocalAgreement(self.params.overlap_tolerance)
        self._pending: list[_Committed] = []  # committed words not yet emitted as a segment
        self._in_flight: DecodeJob | None = None
        self._ended = False
        self._next_index = 0
        self._segments_end = 0.0
        self._last_partial: Partial | None = None
        self.language = language

    # --- what the server reads ----------------------------------------------------------------------------

    @property
    def received_seconds(self) -> float:
        return self._received / self.params.sample_rate

    @property
    def undecoded_seconds(self) -> float:
        """Audio received that no decode has seen or is decoding: what the server bounds before reading more."""
        seen = max(self._decoded_until, self._buffer_start)
        if self._in_flight is not None:
            seen = max(seen, self._buffer_start + self._in_flight.audio.size)
        return (self._received - seen) / self.params.sample_rate

    @property
    def buffered_seconds(self) -> float:
        return self._buffer.size / self.params.sample_rate

    @property
    def segment_count(self) -> int:
        return self._next_index

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    # --- input --------------------------------------------------------------------------------------------

    def add_audio(self, samples: Samples) -> None:
        if self._ended:
            raise RuntimeError("audio after the end of the stream")
        if samples.size == 0:
            return
        self._vad.feed(samples)
        self._buffer = np.concatenate((self._buffer, samples.astype(np.float32, copy=False)))
        self._received += samples.size

    def finish(self) -> None:
        """The client half-closed: what is buffered gets one final decode (if it holds speech)."""
        self._ended = True

    @property
    def due(self) -> bool:
        """A decode is due now (or will be once the one in flight is applied)."""
        return self.next_job(peek=True) is not None

    @property
    def done(self) -> bool:
        """Ended, nothing in flight and nothing left to decode: the server may send end_of_stream."""
        return self._ended and self._in_flight is None and self.next_job(peek=True) is None

    # --- decoding -----------------------------------------------------------------------------------------

    def _time(self, sample: int) -> float:
        return sample / self.params.sample_rate

    def _drop_silence(self) -> None:
        """Drop leading buffered audio that holds no speech (keeping a short lead-in before any speech)."""
        if self._in_flight is not None or self._agreement.unstable or self._pending:
            return
        rate = self.params.sample_rate
        start_time = self._time(self._buffer_start)
        speech = self._vad.first_speech_after(start_time)
        # Frames not yet classified (the VAD's carry) may hold speech: keep them.
        classified_end = self._time(self._vad.position)
        cut_time = classified_end if speech is None else speech
        cut_time = max(start_time, cut_time - self.params.keep_before_speech)
        cut = min(int(cut_time * rate) - self._buffer_start, self._buffer.size)
        if cut > 0:
            self._trim(cut)

    def _trim(self, samples: int) -> None:
        self._buffer = self._buffer[samples:].copy()
        self._buffer_start += samples
        self._vad.forget_before(self._time(self._buffer_start))

    def _utterance_ended(self) -> bool:
        last = self._vad.last_speech_end
        now = self._time(self._vad.position)
        return last >= self._time(self._buffer_start) and now - last >= self.params.silence_end

    def _has_undecoded_speech(self) -> bool:
        return self._vad.last_speech_end > self._time(max(self._decoded_until, self._buffer_start))

    def next_job(self, *, peek: bool = False) -> DecodeJob | None:
        """The decode to run now, if one is due (None while one is in flight). Marks it in flight unless `peek`."""
        if self._in_flight is not None:
            return None
        if not peek:
            self._drop_silence()
        if self._buffer.size == 0:
            return None
        uncommitted = bool(self._agreement.unstable or self._pending)
        speech = self._vad.first_speech_after(self._time(self._buffer_start)) is not None
        if not speech and not uncommitted:
            return None
        new_audio = self._time(self._received - max(self._decoded_until, self._buffer_start))
        if self._ended:
            # One last decode of whatever no decode has seen or committed yet.
            if new_audio <= 0 and not uncommitted:
                return None
            final = True
        elif self._utterance_ended() and (uncommitted or self._has_undecoded_speech()):
            final = True
        elif new_audio >= self.params.decode_interval:
            final = False
        else:
            return None
        job = DecodeJob(audio=self._buffer.copy(), offset=self._time(self._buffer_start), final=final)
        if not peek:
            self._in_flight = job
        return job

    def apply(self, hypothesis: Hypothesis, *, partial_results: bool = True) -> list[Event]:
        """Take the result of the job in flight; return the events it makes."""
        job = self._in_flight
        if job is None:
            raise RuntimeError("apply without a decode in flight")
        self._in_flight = None
        if hypothesis.language:
            self.language = hypothesis.language
        end_sample = self._buffer_start + job.audio.size
        self._decoded_until = max(self._decoded_until, end_sample)
        words = [
            Word(word.text, word.start + job.offset, word.end + job.offset, word.probability)
            for word in hypothesis.words
            if word.text.strip()
        ]
        committed = self._agreement.commit_all(words) if job.final else self._agreement.insert(words)
        self._pending.extend(
            _Committed(word, hypothesis.avg_logprob, hypothesis.no_speech_probability, self.language)
            for word in committed
        )
        events: list[Event] = []
        events.extend(self._cut_sentences())
        if job.final:
            events.extend(self._cut_all())
            self._trim_to(end_sample)
        elif self.buffered_seconds > self.params.max_buffer:
            # Nothing ended a sentence for too long: make the agreed words a segment, forcing the tail if need be.
            if not self._pending:
                self._pending.extend(
                    _Committed(word, hypothesis.avg_logprob, hypothesis.no_speech_probability, self.language)
                    for word in self._agreement.commit_unstable()
                )
            events.extend(self._cut_all())
            if self._agreement.committed_end > self._time(self._buffer_start):
                self._trim_to(round(self._agreement.committed_end * self.params.sample_rate))
            else:
                self._trim_to(end_sample)
        if partial_results:
            partial = self._partial()
            if partial is not None and partial != self._last_partial:
                self._last_partial = partial
                events.append(partial)
        return events

    def _trim_to(self, sample: int) -> None:
        cut = min(sample - self._buffer_start, self._buffer.size)
        if cut > 0:
            self._trim(cut)

    def _partial(self) -> Partial | None:
        stable = [item.word for item in self._pending]
        unstable = self._agreement.unstable
        if not stable and not unstable:
            return None
        first = (stable or unstable)[0]
        return Partial(
            stable_text=join_words(stable),
            unstable_text=join_words(unstable),
            start=first.start,
            end=self.received_seconds,
        )

    def _segment(self, items: Sequence[_Committed], until: float | None = None) -> Segment:
        """A segment of committed words; its words are kept after the previous segment's end (segments never
        overlap) and, when the buffer is cut in a pause, before the cut."""
        low = self._segments_end
        high = float("inf") if until is None else until
        words: list[Word] = []
        for item in items:
            start = min(max(item.word.start, low), high)
            end = min(max(item.word.end, start), high)
            words.append(Word(item.word.text, start, end, item.word.probability))
            low = start
        segment = Segment(
            index=self._next_index,
            text=join_words(words),
            start=words[0].start,
            end=words[-1].end,
            words=tuple(words),
            avg_logprob=float(np.mean([item.avg_logprob for item in items])),
            no_speech_probability=float(np.mean([item.no_speech_probability for item in items])),
            language=items[-1].language or self.language,
        )
        self._next_index += 1
        self._segments_end = segment.end
        return segment

    def _cut_sentences(self) -> list[Segment]:
        """Emit the committed words up to each sentence end as a segment, and trim the buffer after it."""
        segments: list[Segment] = []
        while True:
            end = next(
                (i for i, item in enumerate(self._pending) if item.word.text.rstrip().endswith(SENTENCE_END)), None
            )
            if end is None:
                return segments
            items, self._pending = self._pending[: end + 1], self._pending[end + 1 :]
            pause = self._pause_after(items[-1].word)
            segment = self._segment(items, until=pause)
            segments.append(segment)
            if pause is not None:
                if not self._pending:
                    self._agreement.rebase(pause)
                self._trim_to(round(pause * self.params.sample_rate))
            else:
                self._trim_to(round(segment.end * self.params.sample_rate))

    def _pause_after(self, last: Word) -> float | None:
        """Where to cut the buffer after a sentence ending with `last`: the middle of the pause after it, when
        voice activity finds one (Whisper's word ends are rough; a cut at one can clip the next word's onset)."""
        following = [item.word for item in self._pending] + self._agreement.unstable
        high = following[0].end if following else last.end + 0.5
        pause = self._vad.widest_silence(last.start, high)
        if pause is None or pause[1] - pause[0] < self.params.min_pause:
            return None
        return (pause[0] + pause[1]) / 2

    def _cut_all(self) -> list[Segment]:
        if not self._pending:
            return []
        items, self._pending = self._pending, []
        return [self._segment(items)]
