"""The asr server's streaming policy (services/inference/asr/streaming.py), pure: LocalAgreement-2 over word
hypotheses, energy voice activity, segments and buffer trimming. A scripted decode stands in for the model's
output: it "hears" the words of a known timeline that lie inside the audio it is given, the last one cut off while
it is still being spoken, as Whisper does."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest

from services.inference.asr.streaming import (
    DecodeJob,
    Hypothesis,
    LocalAgreement,
    Partial,
    PolicyParams,
    Samples,
    Segment,
    StreamPolicy,
    Word,
    normalise,
)

RATE = 16_000
PARAMS = PolicyParams()


def w(text: str, start: float, end: float) -> Word:
    return Word(text, start, end)


def texts(words: list[Word]) -> list[str]:
    return [word.text.strip() for word in words]


# --- LocalAgreement -------------------------------------------------------------------------------------------


def test_nothing_is_committed_from_one_hypothesis() -> None:
    agreement = LocalAgreement()
    assert agreement.insert([w(" the", 0.0, 0.2), w(" quick", 0.2, 0.5)]) == []
    assert texts(agreement.unstable) == ["the", "quick"]


def test_the_common_prefix_of_two_hypotheses_is_committed() -> None:
    agreement = LocalAgreement()
    agreement.insert([w(" the", 0.0, 0.2), w(" quick", 0.2, 0.5), w(" round", 0.5, 0.8)])
    committed = agreement.insert(
        [w(" the", 0.0, 0.2), w(" quick", 0.2, 0.5), w(" brown", 0.5, 0.8), w(" fox", 0.8, 1.0)]
    )
    assert texts(committed) == ["the", "quick"]
    assert texts(agreement.unstable) == ["brown", "fox"]
    assert agreement.committed_end == 0.5
    # The next hypothesis agrees with the unstable tail: it is committed in turn.
    committed = agreement.insert(
        [w(" the", 0.0, 0.2), w(" quick", 0.2, 0.5), w(" brown", 0.5, 0.8), w(" fox.", 0.8, 1.1)]
    )
    assert texts(committed) == ["brown", "fox."]
    assert agreement.unstable == []


def test_agreement_ignores_case_and_punctuation() -> None:
    agreement = LocalAgreement()
    agreement.insert([w(" Hello", 0.0, 0.3), w(" world,", 0.3, 0.6)])
    committed = agreement.insert([w(" hello", 0.0, 0.3), w(" world.", 0.3, 0.6)])
    assert texts(committed) == ["hello", "world."]  # the newer spelling wins
    assert normalise(" World!") == "world"


def test_words_already_committed_are_not_committed_again() -> None:
    agreement = LocalAgreement()
    agreement.commit_all([w(" one", 0.0, 0.4), w(" two", 0.4, 0.8)])
    # A later decode of a buffer cut at 0.8 re-hears "two" with a rough time just after the cut: an n-gram repeat.
    agreement.insert([w(" two", 0.75, 0.9), w(" three", 0.9, 1.2)])
    committed = agreement.insert([w(" two", 0.75, 0.9), w(" three", 0.9, 1.2), w(" four", 1.2, 1.5)])
    assert texts(committed) == ["three"]
    # Words that start well before the committed end are dropped outright.
    assert agreement.insert([w(" one", 0.0, 0.4)]) == []


def test_commit_all_takes_the_whole_hypothesis() -> None:
    agreement = LocalAgreement()
    agreement.insert([w(" a", 0.0, 0.1)])
    assert texts(agreement.commit_all([w(" a", 0.0, 0.1), w(" b", 0.1, 0.2)])) == ["a", "b"]
    assert agreement.unstable == []
    assert agreement.committed_end == 0.2


# --- StreamPolicy with a scripted decode ----------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """What is said when: words with absolute times; speech (a tone) under each word, silence elsewhere."""

    words: tuple[Word, ...]
    duration: float

    def audio(self) -> Samples:
        samples = np.zeros(round(self.duration * RATE), dtype=np.float32)
        t = np.arange(samples.size) / RATE
        tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        for word in self.words:
            span = slice(round(word.start * RATE), round(word.end * RATE))
            samples[span] = tone[span]
        return samples

    def decode(self, job: DecodeJob) -> Hypothesis:
        """The words inside the job's audio, relative to its start; a word still being spoken comes out cut."""
        end = job.offset + job.audio.size / RATE
        heard = []
        for word in self.words:
            if word.start < job.offset - 0.05 or word.start >= end - 0.05:
                continue
            if word.end <= end:
                heard.append(Word(word.text, word.start - job.offset, word.end - job.offset))
            else:
                cut = word.text[: max(2, len(word.text) // 2)] + "-"
                heard.append(Word(cut, word.start - job.offset, end - job.offset))
                break
        return Hypothesis(words=heard, avg_logprob=-0.2, no_speech_probability=0.01, language="en")


def sentence(words: str, start: float, step: float = 0.4, gap: float = 0.05) -> list[Word]:
    result = []
    for index, text in enumerate(words.split()):
        begin = start + index * step
        result.append(Word(" " + text, begin, begin + step - gap))
    return result


TWO_SENTENCES = Script(
    words=(
        *sentence("please open the window and close the door.", 0.3),
        *sentence("the children play football in the garden.", 4.3),
    ),
    duration=8.0,
)


def run(
    script: Script, params: PolicyParams = PARAMS, chunk: float = 0.1
) -> tuple[list[Partial], list[Segment], StreamPolicy, list[DecodeJob]]:
    """Stream the script's audio in chunks; decode at once whenever a decode is due (an infinitely fast model)."""
    policy = StreamPolicy(params, language="en")
    partials: list[Partial] = []
    segments: list[Segment] = []
    jobs: list[DecodeJob] = []

    def drain() -> None:
        while (job := policy.next_job()) is not None:
            jobs.append(job)
            for event in policy.apply(script.decode(job)):
                (partials if isinstance(event, Partial) else segments).append(event)  # type: ignore[arg-type]

    audio = script.audio()
    size = round(chunk * RATE)
    for start in range(0, audio.size, size):
        policy.add_audio(audio[start : start + size])
        drain()
        assert policy.buffered_seconds <= params.max_buffer + 1.0
    policy.finish()
    drain()
    assert policy.done
    return partials, segments, policy, jobs


def test_a_stream_gives_partials_then_one_segment_per_sentence() -> None:
    partials, segments, policy, _ = run(TWO_SENTENCES)
    assert [segment.text for segment in segments] == [
        "please open the window and close the door.",
        "the children play football in the garden.",
    ]
    assert [segment.index for segment in segments] == [0, 1]
    assert segments[0].end <= segments[1].start
    assert segments[0].start == pytest.approx(0.3)
    assert segments[1].words[0].start == pytest.approx(4.3)
    assert all(segment.language == "en" and segment.avg_logprob == pytest.approx(-0.2) for segment in segments)
    # Partials grow while the first sentence is spoken: stable text is a prefix of what comes next.
    first = [partial for partial in partials if partial.end < 3.5]
    assert len(first) >= 2
    stable = [partial.stable_text for partial in first]
    assert stable == sorted(stable, key=len)
    assert any(partial.unstable_text for partial in first)
    assert policy.segment_count == 2


def test_the_buffer_is_cut_in_the_pause_after_a_sentence() -> None:
    _, segments, _, jobs = run(TWO_SENTENCES)
    # After the first sentence (spoken until 3.5 s), decodes start in the pause before the second (at 4.3 s).
    later = [job for job in jobs if job.offset > 0.3]
    assert later
    assert 3.5 <= later[0].offset <= 4.3
    assert segments[0].end <= later[0].offset


def test_silence_is_never_decoded() -> None:
    _, segments, policy, jobs = run(Script(words=(), duration=5.0))
    assert jobs == []
    assert segments == []
    assert policy.buffered_seconds <= PARAMS.keep_before_speech + 0.1


def test_decodes_wait_for_the_interval() -> None:
    policy = StreamPolicy(PARAMS)
    audio = Script(words=tuple(sentence("a b c d e f", 0.0)), duration=3.0).audio()
    policy.add_audio(audio[: round(0.9 * RATE)])
    assert policy.next_job() is None
    policy.add_audio(audio[round(0.9 * RATE) : round(1.0 * RATE)])
    job = policy.next_job()
    assert job is not None
    assert not job.final
    assert job.audio.size == RATE
    assert policy.next_job() is None  # one decode in flight at a time
    policy.add_audio(audio[RATE : 3 * RATE])
    assert policy.undecoded_seconds == pytest.approx(2.0)


def test_a_pause_triggers_a_final_decode_before_the_interval() -> None:
    script = Script(words=tuple(sentence("no punctuation here", 0.2)), duration=3.0)
    policy = StreamPolicy(PARAMS)
    audio = script.audio()
    policy.add_audio(audio[: round(1.5 * RATE)])
    job = policy.next_job()
    assert job is not None
    assert not job.final
    policy.apply(script.decode(job))
    # 0.9 s later: less than an interval of new audio would not be due, but 0.9 s of silence ends the utterance.
    policy.add_audio(audio[round(1.5 * RATE) : round(2.4 * RATE)])
    job = policy.next_job()
    assert job is not None
    assert job.final
    events = policy.apply(script.decode(job))
    segments = [event for event in events if isinstance(event, Segment)]
    assert [segment.text for segment in segments] == ["no punctuation here"]


def test_the_end_of_the_stream_commits_the_rest() -> None:
    script = Script(words=tuple(sentence("cut off at the end", 0.2)), duration=2.2)
    _, segments, _, jobs = run(script)
    assert jobs[-1].final
    assert [segment.text for segment in segments] == ["cut off at the end"]


def test_long_speech_without_sentence_ends_is_cut_at_the_buffer_limit() -> None:
    words = tuple(sentence(" ".join(f"w{i}" for i in range(60)), 0.1, step=0.35, gap=0.0))
    params = PolicyParams(max_buffer=6.0)
    _, segments, _, _ = run(Script(words=words, duration=21.5), params)
    assert len(segments) >= 3
    assert " ".join(segment.text for segment in segments).split() == [f"w{i}" for i in range(60)]
    for earlier, later in itertools.pairwise(segments):
        assert earlier.end <= later.start


def test_apply_without_a_decode_in_flight_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        StreamPolicy().apply(Hypothesis(words=()))


def test_audio_after_the_end_is_a_bug() -> None:
    policy = StreamPolicy()
    policy.finish()
    with pytest.raises(RuntimeError):
        policy.add_audio(np.zeros(10, dtype=np.float32))
