"""The asr inference server with the real Whisper tiny.en model, over mTLS as the kzone service calls it: streamed
speech comes back as partials then final segments with word timestamps; clips; bounds (streams, queued audio),
cancellation and deadlines free a stream at once; bad input gets INVALID_ARGUMENT with field violations; health
follows the model's loading."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from megacity.asr.v1 import asr_service_pb2 as pb
from megacity.asr.v1 import asr_service_pb2_grpc
from megacity.asr.v1 import resources_pb2 as res
from services.inference.asr import server as asr_server
from services.inference.asr.engine import AsrSettings, WhisperEngine
from services.runtime.catalog import load_catalog
from services.runtime.server import Service
from tests.support.inference import (
    CHUNK_BYTES,
    chunks,
    error_of,
    joined,
    serving,
    silence,
    speak,
    until_serving,
    word_accuracy,
)
from tests.support.mesh import channel_as, make_config, running

pytestmark = pytest.mark.slow

CATALOG = load_catalog()
SENTENCES = (
    "Please open the window and close the door before you leave the room. "
    "The children are playing football in the garden."
)
SHORT = "My favorite color is blue."
CONFIG = res.RecognitionConfig(
    encoding=res.AUDIO_ENCODING_PCM16,
    sample_rate_hertz=16_000,
    language="en",
    partial_results=True,
    word_timestamps=True,
)


def _settings(**changes: object) -> AsrSettings:
    return dataclasses.replace(AsrSettings.from_environment(), **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return speak(SENTENCES, tmp_path_factory.mktemp("speech")) + silence(0.5)


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return speak(SHORT, tmp_path_factory.mktemp("speech"), name="short")


@pytest.fixture(scope="module")
async def asr(pki_dir: Path) -> AsyncIterator[Service]:
    settings = _settings(max_streams=20, idle_timeout=3.0)
    config = make_config(CATALOG, "asr", pki_dir)
    async with running(config, lambda deps: asr_server.build(deps, settings)) as service:
        yield service


async def _active(stub: asr_service_pb2_grpc.AsrServiceStub) -> int:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    active: int = info.model.active_streams
    return active


async def _until_idle(stub: asr_service_pb2_grpc.AsrServiceStub, timeout: float = 2.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await _active(stub) == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"streams still active {timeout} s after the calls ended")


def _requests(
    audio: bytes, *, pace: float = 0.0, config: res.RecognitionConfig = CONFIG, sent: list[float] | None = None
) -> Callable[[], AsyncIterator[pb.TranscribeRequest]]:
    async def requests() -> AsyncIterator[pb.TranscribeRequest]:
        yield pb.TranscribeRequest(config=config)
        for chunk in chunks(audio):
            yield pb.TranscribeRequest(audio=chunk)
            if sent is not None:
                sent.append(time.monotonic())
            if pace:
                await asyncio.sleep(pace)

    return requests


async def _config_then_wait(config: res.RecognitionConfig = CONFIG) -> AsyncIterator[pb.TranscribeRequest]:
    """A stream that sends its config and then waits. A stream the server refuses at once is sent this way: while
    grpc's asyncio client is writing, it reports a server's early status as INTERNAL (grpc/grpc#36066)."""
    yield pb.TranscribeRequest(config=config)
    await asyncio.sleep(10)


async def test_streamed_speech_gives_partials_then_accurate_final_segments(
    asr: Service, pki_dir: Path, speech: bytes
) -> None:
    sent: list[float] = []
    partials: list[tuple[float, res.PartialTranscript]] = []
    segments: list[res.TranscriptSegment] = []
    ends: list[res.EndOfStream] = []
    async with channel_as("kzone", asr, pki_dir) as channel:
        stub = asr_service_pb2_grpc.AsrServiceStub(channel)
        # Twice real time: 100 ms of audio every 50 ms.
        call = stub.Transcribe(_requests(speech, pace=0.05, sent=sent)(), timeout=60)
        async for response in call:
            kind = response.WhichOneof("event")
            if kind == "partial":
                partials.append((time.monotonic(), response.partial))
            elif kind == "segment":
                segments.append(response.segment)
            else:
                ends.append(response.end_of_stream)
    assert partials, "no partial transcript"
    assert partials[0][0] < sent[-1], "the first partial came only after the last chunk was sent"
    text = joined([segment.text for segment in segments])
    assert word_accuracy(SENTENCES, text) >= 0.8, text
    assert [segment.index for segment in segments] == list(range(len(segments)))
    duration = len(speech) / 32_000
    previous_end = 0.0
    for segment in segments:
        assert segment.words, segment
        assert segment.language == "en"
        start = segment.start_offset.ToTimedelta().total_seconds()
        end = segment.end_offset.ToTimedelta().total_seconds()
        assert previous_end - 0.05 <= start <= end <= duration + 0.1
        previous_end = end
        for word in segment.words:
            assert start - 0.05 <= word.start_offset.ToTimedelta().total_seconds() <= end + 0.05
    assert len(ends) == 1
    assert ends[0].segment_count == len(segments)
    assert abs(ends[0].audio_duration.ToTimedelta().total_seconds() - duration) < 0.01
    assert ends[0].language == "en"


async def test_a_whole_clip_is_transcribed(asr: Service, pki_dir: Path, speech: bytes) -> None:
    async with channel_as("kzone", asr, pki_dir) as channel:
        stub = asr_service_pb2_grpc.AsrServiceStub(channel)
        config = res.RecognitionConfig(
            encoding=res.AUDIO_ENCODING_PCM16, sample_rate_hertz=16_000, word_timestamps=True
        )
        reply = await stub.TranscribeAudio(pb.TranscribeAudioRequest(config=config, audio=speech), timeout=60)
    text = joined([segment.text for segment in reply.segments])
    assert word_accuracy(SENTENCES, text) >= 0.8, text
    assert all(segment.words for segment in reply.segments)
    assert reply.summary.segment_count == len(reply.segments)
    assert reply.summary.language == "en"


async def test_model_info(asr: Service, pki_dir: Path) -> None:
    async with channel_as("jobs", asr, pki_dir) as channel:
        info = (await asr_service_pb2_grpc.AsrServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())).model
    assert info.ready
    assert info.name == "tiny.en"
    assert list(info.languages) == ["en"]
    assert info.device == "cpu"
    assert info.compute_type.startswith("int8")  # CTranslate2 reports the effective type: int8_float32 on CPU
    assert info.max_streams == 20
    assert info.active_streams == 0


async def test_cancelling_a_stream_frees_it_at_once(asr: Service, pki_dir: Path, speech: bytes) -> None:
    async with channel_as("kzone", asr, pki_dir) as channel:
        stub = asr_service_pb2_grpc.AsrServiceStub(channel)
        call = stub.Transcribe(_requests(speech, pace=0.05)(), timeout=60)
        async for response in call:
            if response.WhichOneof("event") == "partial":
                break  # mid-stream: a decode has run, more audio is on its way
        assert await _active(stub) == 1
        call.cancel()
        await _until_idle(stub)


async def test_a_passed_deadline_frees_the_stream(asr: Service, pki_dir: Path, speech: bytes) -> None:
    async with channel_as("kzone", asr, pki_dir) as channel:
        stub = asr_service_pb2_grpc.AsrServiceStub(channel)
        call = stub.Transcribe(_requests(speech, pace=0.1)(), timeout=1.5)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in call:
                pass
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until_idle(stub)


async def test_twenty_concurrent_streams_complete(asr: Service, pki_dir: Path, short_speech: bytes) -> None:
    async with channel_as("kzone", asr, pki_dir) as channel:
        stub = asr_service_pb2_grpc.AsrServiceStub(channel)

        async def one() -> str:
            texts = []
            async for response in stub.Transcribe(_requests(short_speech, pace=0.02)(), timeout=120):
                if response.WhichOneof("event") == "segment":
                    texts.append(response.segment.text)
            return joined(texts)

        started = time.monotonic()
        texts = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(20))), timeout=120)
        elapsed = time.monotonic() - started
        for text in texts:
            assert word_accuracy(SHORT, text) >= 0.8, texts
        await _until_idle(stub)
    print(f"20 streams of {len(short_speech) / 32_000:.1f} s audio in {elapsed:.1f} s")


async def test_streams_past_the_limit_are_refused(pki_dir: Path, speech: bytes) -> None:
    config = make_config(CATALOG, "asr", pki_dir)
    async with (
        running(config, lambda deps: asr_server.build(deps, _settings(max_streams=2))) as service,
        channel_as("kzone", service, pki_dir) as channel,
    ):
        stub = asr_service_pb2_grpc.AsrServiceStub(channel)
        held = [stub.Transcribe(_requests(speech, pace=0.1)(), timeout=30) for _ in range(2)]
        deadline = time.monotonic() + 5
        while await _active(stub) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Transcribe(_config_then_wait(), timeout=10):
                pass
        code, reason, _ = error_of(refused.value)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason == "CAPACITY_EXCEEDED"
        assert "2" in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as clip:
            await stub.TranscribeAudio(pb.TranscribeAudioRequest(config=CONFIG, audio=speech), timeout=10)
        assert clip.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in held:
            call.cancel()
        await _until_idle(stub)


@pytest.mark.parametrize(
    ("first", "later", "field", "reason"),
    [
        (
            pb.TranscribeRequest(
                config=res.RecognitionConfig(encoding=res.AUDIO_ENCODING_PCM16, sample_rate_hertz=8000)
            ),
            [],
            "config.sample_rate_hertz",
            "UNSUPPORTED_AUDIO_FORMAT",
        ),
        (
            pb.TranscribeRequest(config=res.RecognitionConfig(sample_rate_hertz=16_000)),
            [],
            "config.encoding",
            "UNSUPPORTED_AUDIO_FORMAT",
        ),
        (
            pb.TranscribeRequest(config=CONFIG),
            [pb.TranscribeRequest(audio=b"\x00" * 3201)],
            "audio",
            "UNSUPPORTED_AUDIO_FORMAT",
        ),
        (
            pb.TranscribeRequest(config=CONFIG),
            [pb.TranscribeRequest(audio=b"\x00" * (1024 * 1024 + 2))],
            "audio",
            "PAYLOAD_TOO_LARGE",
        ),
        (pb.TranscribeRequest(audio=b"\x00" * CHUNK_BYTES), [], "config", "STREAM_PROTOCOL"),
        (pb.TranscribeRequest(config=CONFIG), [pb.TranscribeRequest(config=CONFIG)], "audio", "STREAM_PROTOCOL"),
    ],
    ids=["sample-rate", "encoding", "odd-length-chunk", "oversized-chunk", "audio-before-config", "second-config"],
)
async def test_bad_stream_input_is_invalid_argument(
    asr: Service,
    pki_dir: Path,
    first: pb.TranscribeRequest,
    later: list[pb.TranscribeRequest],
    field: str,
    reason: str,
) -> None:
    async def requests() -> AsyncIterator[pb.TranscribeRequest]:
        yield first
        for request in later:
            yield request
        await asyncio.sleep(5)  # keep the stream open: the error must come from the server, not the end

    async with channel_as("kzone", asr, pki_dir) as channel:
        stub = asr_service_pb2_grpc.AsrServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in stub.Transcribe(requests(), timeout=10):
                pass
        code, got_reason, violations = error_of(failure.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert got_reason == reason
        assert field in [name for name, _ in violations], violations
        await _until_idle(stub)


async def test_bad_clip_input_is_invalid_argument(asr: Service, pki_dir: Path) -> None:
    async with channel_as("kzone", asr, pki_dir) as channel:
        stub = asr_service_pb2_grpc.AsrServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.TranscribeAudio(pb.TranscribeAudioRequest(audio=b"\x00" * 3), timeout=10)
        code, _, violations = error_of(failure.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert {name for name, _ in violations} == {"config", "audio"}


async def test_a_language_the_english_model_lacks_is_refused(asr: Service, pki_dir: Path, short_speech: bytes) -> None:
    korean = res.RecognitionConfig(encoding=res.AUDIO_ENCODING_PCM16, sample_rate_hertz=16_000, language="ko")
    async with channel_as("kzone", asr, pki_dir) as channel:
        stub = asr_service_pb2_grpc.AsrServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as clip:
            await stub.TranscribeAudio(pb.TranscribeAudioRequest(config=korean, audio=short_speech), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            async for _ in stub.Transcribe(_config_then_wait(korean), timeout=10):
                pass
    for failure in (clip.value, stream.value):
        code, reason, _ = error_of(failure)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert reason == "LANGUAGE_NOT_SUPPORTED"
        assert "English-only" in (failure.details() or "")


async def test_an_idle_stream_times_out(asr: Service, pki_dir: Path) -> None:
    async def requests() -> AsyncIterator[pb.TranscribeRequest]:
        yield pb.TranscribeRequest(config=CONFIG)
        yield pb.TranscribeRequest(audio=silence(0.1))
        await asyncio.sleep(10)

    async with channel_as("kzone", asr, pki_dir) as channel:
        stub = asr_service_pb2_grpc.AsrServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in stub.Transcribe(requests(), timeout=20):
                pass
        code, reason, _ = error_of(failure.value)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert reason == "STREAM_IDLE"
        assert time.monotonic() - started < 8
        await _until_idle(stub)


async def test_callers_the_catalog_does_not_allow_are_refused(asr: Service, pki_dir: Path) -> None:
    async with channel_as("tutor", asr, pki_dir) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await asr_service_pb2_grpc.AsrServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_health_is_not_serving_until_the_model_is_loaded(pki_dir: Path, short_speech: bytes) -> None:
    gate = threading.Event()

    def slow_load(settings: AsrSettings) -> WhisperEngine:
        gate.wait(30)
        return WhisperEngine(settings)

    config = make_config(CATALOG, "asr", pki_dir, health_interval_seconds=0.1)
    try:
        async with (
            running(config, lambda deps: asr_server.build(deps, _settings(), slow_load)) as service,
            channel_as("ops", service, pki_dir) as ops,
            channel_as("kzone", service, pki_dir) as kzone,
        ):
            assert not await serving(ops, "megacity.asr.v1.AsrService")
            stub = asr_service_pb2_grpc.AsrServiceStub(kzone)
            with pytest.raises(grpc.aio.AioRpcError) as early:
                await stub.TranscribeAudio(pb.TranscribeAudioRequest(config=CONFIG, audio=short_speech), timeout=5)
            code, reason, _ = error_of(early.value)
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY")
            assert not (await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)).model.ready
            gate.set()
            await until_serving(ops, "megacity.asr.v1.AsrService")
            clip = pb.TranscribeAudioRequest(config=CONFIG, audio=short_speech)
            reply = await stub.TranscribeAudio(clip, timeout=30)
            assert word_accuracy(SHORT, joined([s.text for s in reply.segments])) >= 0.8
    finally:
        gate.set()


async def test_a_model_that_fails_to_load_keeps_health_not_serving(pki_dir: Path, tmp_path: Path) -> None:
    config = make_config(CATALOG, "asr", pki_dir)
    settings = _settings(model_path=tmp_path / "no-model", model_name="missing")
    async with (
        running(config, lambda deps: asr_server.build(deps, settings)) as service,
        channel_as("ops", service, pki_dir) as ops,
    ):
        await asyncio.sleep(0.5)
        assert not await serving(ops)
