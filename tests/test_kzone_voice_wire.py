"""Voice analysis through the kzone service as the edge calls it (mTLS as `edge`, the learner's bearer token), with
the asr server running the real Whisper tiny.en model over mTLS behind it: streamed speech is transcribed with
partials before the audio ends and the stored result is readable; pitch is tracked through the service; key-shifted
singing of a READY reference scores well and another melody low; cancelling frees the session and its asr stream
at once; 20 concurrent streams complete; over the limit is refused; bad configs, idle streams and a missing
recogniser get clear errors; uploads (WAV, MP3) are analysed and stored.

AnalyzeVoice is gRPC-only in the contract and has neither an access option nor an allow rule for the edge (only
`@public`, HTTP-mapped, methods are allowed to it): until the contract gives it both, these tests run the kzone
service with a descriptor set that adds `access {permission: ""}` to AnalyzeVoice and a catalog rule letting the
edge call it (both no-ops once the contract has them)."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
import wave
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeAlias

import av
import grpc
import numpy as np
import pytest
from google.api import httpbody_pb2
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from megacity.asr.v1 import asr_service_pb2 as asr_pb
from megacity.asr.v1 import asr_service_pb2_grpc
from megacity.kzone.v1 import kzone_service_pb2 as pb
from megacity.kzone.v1 import kzone_service_pb2_grpc
from megacity.kzone.v1 import resources_pb2 as res
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2 as tenant_pb
from ops.embedded import EmbeddedRedis
from services.inference.asr import server as asr_server
from services.inference.asr.engine import AsrSettings
from services.kzone import server as kzone_server
from services.kzone.pitch import track_pitch
from services.kzone.store import KZoneStore
from services.kzone.voice_report import seconds_duration
from services.runtime.database import create_pool
from services.runtime.errors import status_from_error
from services.runtime.server import Dependencies, Service, ServicerBinding
from tests.support.accounts import Caller, People
from tests.support.inference import chunks, error_of, joined, silence, speak, word_accuracy
from tests.support.kzone import isolated_kzone
from tests.support.mesh import channel_as, make_config, mesh_catalog
from tests.support.ports import free_port

pytestmark = pytest.mark.slow

ZONE = "kzone"
RATE = 16_000
SENTENCE = "Please open the window and close the door before you leave the room."
SHORT = "My favorite color is blue."
LIVE_METHOD = "megacity.kzone.v1.KZoneService/AnalyzeVoice"


def _config(**fields: object) -> res.VoiceStreamConfig:
    fields.setdefault("encoding", res.AUDIO_ENCODING_PCM16)
    fields.setdefault("sample_rate_hertz", RATE)
    fields.setdefault("channel_count", 1)
    return res.VoiceStreamConfig(**fields)  # type: ignore[arg-type]


# --- the services ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def asr(pki_dir: Path) -> AsyncIterator[Service]:
    settings = replace(AsrSettings.from_environment(), max_streams=24, idle_timeout=30.0)
    service = Service(make_config(mesh_catalog(), "asr", pki_dir), build=lambda deps: asr_server.build(deps, settings))
    await service.start()
    try:
        yield service
    finally:
        await service.stop(grace=1.0)


@dataclass
class KZone:
    api: kzone_service_pb2_grpc.KZoneServiceStub
    store: KZoneStore
    media_dir: Path
    servicer: kzone_server.KZoneServicer
    asr: asr_service_pb2_grpc.AsrServiceStub | None

    @property
    def active_sessions(self) -> int:
        return self.servicer.voice.active_sessions


@asynccontextmanager
async def _kzone(
    people: People,
    database_url: str,
    redis: EmbeddedRedis,
    tmp_path: Path,
    asr_target: str,
    asr_service: Service | None,
) -> AsyncIterator[KZone]:
    built: list[kzone_server.KZoneServicer] = []

    def build(deps: Dependencies) -> list[ServicerBinding]:
        bindings = kzone_server.servicers(deps)
        servicer = bindings[0].servicer
        assert isinstance(servicer, kzone_server.KZoneServicer)
        built.append(servicer)
        return bindings

    config = make_config(mesh_catalog(), "kzone", people.pki_dir, database_url=database_url, redis_url=redis.url)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEGACITY_TARGET_ASR", asr_target)
        service = Service(config, build=build)
        await service.start()
        store_pool = await create_pool(database_url, schema="kzone", max_size=2)
        try:
            async with channel_as("edge", service, people.pki_dir) as channel:
                if asr_service is None:
                    yield KZone(
                        kzone_service_pb2_grpc.KZoneServiceStub(channel),
                        KZoneStore(store_pool),
                        tmp_path / "media",
                        built[0],
                        None,
                    )
                else:
                    async with channel_as("kzone", asr_service, people.pki_dir) as asr_channel:
                        yield KZone(
                            kzone_service_pb2_grpc.KZoneServiceStub(channel),
                            KZoneStore(store_pool),
                            tmp_path / "media",
                            built[0],
                            asr_service_pb2_grpc.AsrServiceStub(asr_channel),
                        )
        finally:
            await store_pool.close()
            await service.stop(grace=1.0)


@pytest.fixture
def voice_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    isolated_kzone(monkeypatch, tmp_path)
    monkeypatch.setenv("MEGACITY_KZONE_MAX_VOICE_STREAMS", "24")
    monkeypatch.setenv("MEGACITY_KZONE_VOICE_IDLE_SECONDS", "10")
    return monkeypatch


StartKZone: TypeAlias = Callable[[Service | None], AbstractAsyncContextManager[KZone]]


@pytest.fixture
def start_kzone(
    voice_env: pytest.MonkeyPatch,
    people: People,
    identity_database: dict[str, str],
    redis: EmbeddedRedis,
    tmp_path: Path,
) -> StartKZone:
    """Starts kzone (with the settings voice_env holds when called) in front of the given asr server, or of an
    address where none listens."""

    def start(asr: Service | None) -> AbstractAsyncContextManager[KZone]:
        target = f"127.0.0.1:{asr.port if asr is not None else free_port()}"
        return _kzone(people, identity_database["kzone"], redis, tmp_path, target, asr)

    return start


@pytest.fixture
async def kzone(start_kzone: StartKZone, asr: Service) -> AsyncIterator[KZone]:
    async with start_kzone(asr) as running:
        yield running


@pytest.fixture
async def learner(people: People) -> Caller:
    return await people.as_new_user(ZONE, "kzone-public", "student")


# --- streaming helpers -------------------------------------------------------------------------------------------


@dataclass
class Received:
    events: list[tuple[float, pb.AnalyzeVoiceResponse]]
    last_sent: float

    def of(self, kind: str) -> list[pb.AnalyzeVoiceResponse]:
        return [event for _, event in self.events if event.WhichOneof("event") == kind]

    @property
    def final(self) -> res.AnalysisResult:
        finals = self.of("final_result")
        assert len(finals) == 1
        assert self.events[-1][1].WhichOneof("event") == "final_result"
        return finals[0].final_result


def _requests(
    config: res.VoiceStreamConfig, audio: bytes, *, pace: float = 0.0, sent: list[float] | None = None, size: int = 3200
) -> Callable[[], AsyncIterator[pb.AnalyzeVoiceRequest]]:
    async def requests() -> AsyncIterator[pb.AnalyzeVoiceRequest]:
        yield pb.AnalyzeVoiceRequest(config=config)
        for chunk in chunks(audio, size):
            yield pb.AnalyzeVoiceRequest(audio=chunk)
            if sent is not None:
                sent.append(time.monotonic())
            if pace:
                await asyncio.sleep(pace)

    return requests


async def _config_then_wait(
    config: res.VoiceStreamConfig, seconds: float = 30.0
) -> AsyncIterator[pb.AnalyzeVoiceRequest]:
    """Sends the config and waits (a refused stream must not be written to: grpc/grpc#36066)."""
    yield pb.AnalyzeVoiceRequest(config=config)
    await asyncio.sleep(seconds)


async def _analyse(
    kzone: KZone,
    caller: Caller,
    config: res.VoiceStreamConfig,
    audio: bytes,
    *,
    pace: float = 0.0,
    timeout: float = 120,
) -> Received:
    sent: list[float] = []
    events: list[tuple[float, pb.AnalyzeVoiceResponse]] = []
    call = kzone.api.AnalyzeVoice(
        _requests(config, audio, pace=pace, sent=sent)(), metadata=caller.metadata(), timeout=timeout
    )
    async for event in call:
        events.append((time.monotonic(), event))
    return Received(events, sent[-1] if sent else 0.0)


async def _refusal(kzone: KZone, caller: Caller, config: res.VoiceStreamConfig) -> grpc.aio.AioRpcError:
    call = kzone.api.AnalyzeVoice(_config_then_wait(config), metadata=caller.metadata(), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call:
            pass
    return refused.value


def _pcm(samples: np.ndarray) -> bytes:
    return bytes((np.clip(samples, -1, 32767 / 32768) * 32768).astype("<i2").tobytes())


def _voice(frequencies: np.ndarray) -> np.ndarray:
    """A voice-like tone (a few harmonics) following a per-sample frequency."""
    phase = 2 * np.pi * np.cumsum(frequencies) / RATE
    return np.asarray(0.3 * np.sum([np.sin(k * phase) / k for k in range(1, 6)], axis=0))


def _melody(notes_hz: Sequence[float], note_seconds: float = 0.4, gap_seconds: float = 0.05) -> np.ndarray:
    parts = []
    for hz in notes_hz:
        parts.append(_voice(np.full(int(note_seconds * RATE), hz)))
        parts.append(np.zeros(int(gap_seconds * RATE)))
    return np.concatenate(parts)


def _pitch_frames(received: Received) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Times, learner Hz and reference Hz of every frame of the PitchTrack events, in order."""
    times: list[float] = []
    hz: list[float] = []
    reference: list[float] = []
    for event in received.of("pitch"):
        track = event.pitch
        start = track.start_offset.ToNanoseconds() / 1e9
        period = track.frame_period.ToNanoseconds() / 1e9
        times.extend(start + period * np.arange(len(track.frequency_hz)))
        hz.extend(track.frequency_hz)
        reference.extend(track.reference_hz or [0.0] * len(track.frequency_hz))
    return np.array(times), np.array(hz), np.array(reference)


# --- tests ----------------------------------------------------------------------------------------------------


async def test_spoken_sentence_is_transcribed_live_scored_and_stored(
    kzone: KZone, learner: Caller, tmp_path: Path
) -> None:
    audio = speak(SENTENCE, tmp_path) + silence(0.5)
    # 100 ms chunks, twice real time.
    received = await _analyse(kzone, learner, _config(target_text=SENTENCE, language="en"), audio, pace=0.05)
    transcripts = received.of("transcript")
    partial_times = [
        at for at, event in received.events if event.HasField("transcript") and not event.transcript.is_final
    ]
    assert partial_times, "no partial transcript"
    assert partial_times[0] < received.last_sent, "the first partial came only after the last chunk was sent"
    finals = [event.transcript for event in transcripts if event.transcript.is_final]
    text = joined([final.text for final in finals])
    assert word_accuracy(SENTENCE, text) >= 0.8, text
    assert all(final.words for final in finals)
    # Live tracks every ~0.5 s, running scores, offsets that never go back.
    assert len(received.of("pitch")) >= 4
    assert len(received.of("loudness")) == len(received.of("pitch"))
    assert len(received.of("rhythm")) >= 4
    assert received.of("scores")
    offsets = [event.audio_offset.ToNanoseconds() for _, event in received.events]
    assert offsets == sorted(offsets)

    result = received.final
    duration = len(audio) / 32_000
    assert (result.source, result.user_id, result.zone_id, result.reference_id) == (
        res.ANALYSIS_SOURCE_LIVE,
        learner.user_id,
        ZONE,
        "",
    )
    report = result.voice
    assert word_accuracy(SENTENCE, report.transcript) >= 0.8
    assert abs(report.duration.ToNanoseconds() / 1e9 - duration) < 0.01
    assert report.scores.HasField("pronunciation")
    assert report.scores.pronunciation >= 70
    assert report.scores.overall == pytest.approx(report.scores.pronunciation)
    assert not report.scores.HasField("pitch")
    assert len(report.word_scores) == len(SENTENCE.split())
    assert report.feedback
    # The recording is kept as raw PCM16 and named by the result.
    assert result.input_media_uri.endswith("/recording.pcm")
    assert (kzone.media_dir / result.input_media_uri).read_bytes() == audio
    stored = await kzone.api.GetAnalysisResult(
        pb.GetAnalysisResultRequest(result_id=result.id), metadata=learner.metadata()
    )
    assert stored.result == result
    assert kzone.active_sessions == 0


async def test_a_glide_and_a_tone_sequence_are_tracked_within_two_percent(kzone: KZone, learner: Caller) -> None:
    glide_hz = np.geomspace(180.0, 360.0, 2 * RATE)
    notes = [220.0, 330.0, 262.0, 392.0, 196.0]
    sequence_hz = np.repeat(notes, int(0.4 * RATE))
    signal = np.concatenate((_voice(glide_hz), _voice(sequence_hz)))
    received = await _analyse(kzone, learner, _config(target_text="la la la", language="en"), _pcm(signal))
    times, hz, _ = _pitch_frames(received)
    truth = np.concatenate((glide_hz, sequence_hz))
    sample = np.clip((times * RATE).astype(int), 0, truth.size - 1)
    expected = truth[sample]
    # Frames away from the note changes and the ends (a frame's window spans ±40 ms).
    boundaries = np.array([2.0 + 0.4 * k for k in range(len(notes) + 1)] + [0.0])
    steady = (np.min(np.abs(times[:, None] - boundaries[None, :]), axis=1) > 0.06) & (times < truth.size / RATE - 0.06)
    voiced = hz > 0
    assert voiced[steady].mean() > 0.95
    error = np.abs(hz[steady & voiced] / expected[steady & voiced] - 1)
    assert np.percentile(error, 95) < 0.02, np.percentile(error, 95)
    assert received.final.voice.pitch.voiced_ratio > 0.9


async def _ready_song(kzone: KZone, people: People, melody: np.ndarray, tempo: float) -> str:
    teacher = await people.as_new_user(ZONE, "kzone-public", "teacher")
    song = (
        await kzone.api.CreateReferenceContent(
            pb.CreateReferenceContentRequest(
                content=res.ReferenceContent(
                    kind=res.REFERENCE_KIND_SONG, title="Scale song", language="en", is_public=True, tempo_bpm=tempo
                )
            ),
            metadata=teacher.metadata(),
        )
    ).content
    wav = io.BytesIO()
    with wave.open(wav, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(RATE)
        writer.writeframes(_pcm(melody))
    uploaded = (
        await kzone.api.UploadReferenceMedia(
            pb.UploadReferenceMediaRequest(
                content_id=song.id, file=httpbody_pb2.HttpBody(content_type="audio/wav", data=wav.getvalue())
            ),
            metadata=teacher.metadata(),
        )
    ).content
    # The extraction worker's success, with features computed by the analysis modules.
    track = track_pitch(melody, RATE)
    beat = 60.0 / tempo
    features = res.ReferenceFeatures(
        pitch=res.PitchTrack(
            start_offset=duration_pb2.Duration(),
            frame_period=duration_pb2.Duration(nanos=round(track.frame_period * 1e9)),
            frequency_hz=track.frequency_hz.tolist(),
        ),
        beats=[seconds_duration(k * beat) for k in range(int(melody.size / RATE / beat) + 1)],
    )
    done = await kzone.store.finish_processing(
        song.id, features, job_id=uploaded.processing_job_id, duration_seconds=melody.size / RATE
    )
    assert done, "the reference was not PROCESSING any more (an extraction worker finished it first?)"
    return song.id


async def test_key_shifted_singing_of_a_ready_reference_scores_well_and_another_melody_low(
    kzone: KZone, people: People, learner: Caller
) -> None:
    semitone = 2 ** (1 / 12)
    notes = [262.0, 294.0, 330.0, 262.0, 330.0, 392.0, 349.0, 294.0, 262.0, 196.0, 262.0, 330.0]
    tempo = 60.0 / 0.45  # one note per beat
    song_id = await _ready_song(kzone, people, _melody(notes), tempo)

    shifted = await _analyse(
        kzone, learner, _config(reference_id=song_id, language="en"), _pcm(_melody([n * semitone**3 for n in notes]))
    )
    report = shifted.final.voice
    assert shifted.final.reference_id == song_id
    assert report.scores.HasField("pitch")
    assert report.scores.pitch >= 80, report.scores
    assert report.pitch.key_shift_semitones == pytest.approx(3.0, abs=0.3)
    assert report.scores.HasField("timing")
    assert report.rhythm.reference_tempo_bpm == pytest.approx(tempo, rel=0.01)
    assert any("semitones higher" in line for line in report.feedback), list(report.feedback)
    # The live pitch events carry the reference's pitch on the same frames.
    _, hz, reference_hz = _pitch_frames(shifted)
    both = (hz > 0) & (reference_hz > 0)
    assert both.mean() > 0.5
    assert np.median(hz[both] / reference_hz[both]) == pytest.approx(semitone**3, rel=0.02)

    other = [392.0, 196.0, 440.0, 247.0, 370.0, 208.0, 415.0, 233.0, 311.0, 185.0, 466.0, 277.0]
    different = await _analyse(kzone, learner, _config(reference_id=song_id), _pcm(_melody(other)))
    assert different.final.voice.scores.pitch < 50, different.final.voice.scores


async def test_cancelling_mid_stream_frees_the_session_and_its_asr_stream_at_once(
    kzone: KZone, learner: Caller, tmp_path: Path
) -> None:
    assert kzone.asr is not None
    audio = speak(SENTENCE, tmp_path)
    call = kzone.api.AnalyzeVoice(
        _requests(_config(target_text=SENTENCE), audio, pace=0.1)(), metadata=learner.metadata(), timeout=60
    )
    async for event in call:
        if event.HasField("transcript"):
            break  # mid-stream: the recogniser has heard some of it
    assert kzone.active_sessions == 1
    assert (await kzone.asr.GetModelInfo(asr_pb.GetModelInfoRequest())).model.active_streams == 1
    cancelled = time.monotonic()
    call.cancel()
    while kzone.active_sessions or (await kzone.asr.GetModelInfo(asr_pb.GetModelInfoRequest())).model.active_streams:
        assert time.monotonic() - cancelled < 2.0, "the session or its asr stream outlived the cancelled call"
        await asyncio.sleep(0.02)
    # Nothing of the recording is left behind.
    recordings = list((kzone.media_dir / "kzone").rglob("*")) if (kzone.media_dir / "kzone").exists() else []
    assert not [path for path in recordings if path.is_file()]


async def test_twenty_concurrent_streams_complete(kzone: KZone, learner: Caller, tmp_path: Path) -> None:
    audio = speak(SHORT, tmp_path) + silence(0.3)
    received = await asyncio.wait_for(
        asyncio.gather(
            *(_analyse(kzone, learner, _config(target_text=SHORT, language="en"), audio, pace=0.02) for _ in range(20))
        ),
        timeout=180,
    )
    accuracies = [word_accuracy(SHORT, one.final.voice.transcript) for one in received]
    assert len({one.final.id for one in received}) == 20
    assert np.mean(accuracies) >= 0.8, accuracies
    assert kzone.active_sessions == 0


async def test_over_the_limit_streams_are_refused_cleanly(
    voice_env: pytest.MonkeyPatch,
    start_kzone: StartKZone,
    asr: Service,
    learner: Caller,
) -> None:
    voice_env.setenv("MEGACITY_KZONE_MAX_VOICE_STREAMS", "2")
    async with start_kzone(asr) as kzone:
        holders = [
            kzone.api.AnalyzeVoice(_config_then_wait(_config(target_text=SHORT)), metadata=learner.metadata())
            for _ in range(2)
        ]
        deadline = time.monotonic() + 5
        while kzone.active_sessions < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        refused = await _refusal(kzone, learner, _config(target_text=SHORT))
        code, reason, _ = error_of(refused)
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXCEEDED")
        assert _retry_delay(refused) is not None
        for holder in holders:
            holder.cancel()
        deadline = time.monotonic() + 2
        while kzone.active_sessions:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # A slot is free again.
        received = await _analyse(kzone, learner, _config(target_text=SHORT), _pcm(np.zeros(RATE // 2)))
        assert received.final.id


def _retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    for detail in status_from_error(error).details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return retry.retry_delay.ToNanoseconds() / 1e9
    return None


async def test_bad_configs_are_refused_with_field_violations(kzone: KZone, people: People, learner: Caller) -> None:
    cases = [
        (
            _config(target_text=SHORT, sample_rate_hertz=44_100),
            "UNSUPPORTED_AUDIO_FORMAT",
            {"config.sample_rate_hertz"},
        ),
        (
            _config(target_text=SHORT, encoding=res.AUDIO_ENCODING_UNSPECIFIED, channel_count=2),
            "UNSUPPORTED_AUDIO_FORMAT",
            {"config.encoding", "config.channel_count"},
        ),
        (_config(reference_id=uuid.uuid4().hex), "UNKNOWN_REFERENCE", {"config.reference_id"}),
        (_config(), "INVALID_REQUEST", {"config.target_text"}),
        (
            _config(target_text="?!", language="not a language"),
            "INVALID_REQUEST",
            {"config.target_text", "config.language"},
        ),
    ]
    for config, expected_reason, fields in cases:
        code, reason, violations = error_of(await _refusal(kzone, learner, config))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, expected_reason), config
        assert {field for field, _ in violations} == fields, violations

    # A song still being processed is not ready; one of another organisation, not public, is unknown.
    teacher = await people.as_new_user(ZONE, "kzone-public", "teacher")
    song = (
        await kzone.api.CreateReferenceContent(
            pb.CreateReferenceContentRequest(
                content=res.ReferenceContent(kind=res.REFERENCE_KIND_SONG, title="Unfinished", is_public=False)
            ),
            metadata=teacher.metadata(),
        )
    ).content
    code, reason, violations = error_of(await _refusal(kzone, teacher, _config(reference_id=song.id)))
    assert (code, reason, [field for field, _ in violations]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REFERENCE_NOT_READY",
        ["config.reference_id"],
    )
    zone_admin = await people.as_new_user(ZONE, "kzone-public", "zone_admin")
    other_org = await people.tenant.CreateOrganization(
        tenant_pb.CreateOrganizationRequest(
            organization=tenant_resources.Organization(name=f"Studio {uuid.uuid4().hex[:8]}")
        ),
        metadata=zone_admin.metadata(),
    )
    outsider = await people.as_new_user(ZONE, other_org.organization.id, "student")
    code, reason, _ = error_of(await _refusal(kzone, outsider, _config(reference_id=song.id)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_REFERENCE")
    # Audio first is a protocol error; no token is unauthenticated.
    call = kzone.api.AnalyzeVoice(
        iter([pb.AnalyzeVoiceRequest(audio=b"\0\0")]),
        metadata=learner.metadata(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as protocol:
        async for _ in call:
            pass
    assert error_of(protocol.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "STREAM_PROTOCOL")
    anonymous = Caller(ZONE)
    with pytest.raises(grpc.aio.AioRpcError) as unsigned:
        async for _ in kzone.api.AnalyzeVoice(
            _config_then_wait(_config(target_text=SHORT)), metadata=anonymous.metadata()
        ):
            pass
    assert unsigned.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert kzone.active_sessions == 0


async def test_an_idle_stream_times_out(
    voice_env: pytest.MonkeyPatch,
    start_kzone: StartKZone,
    asr: Service,
    learner: Caller,
) -> None:
    voice_env.setenv("MEGACITY_KZONE_VOICE_IDLE_SECONDS", "1")
    async with start_kzone(asr) as kzone:

        async def some_audio_then_nothing() -> AsyncIterator[pb.AnalyzeVoiceRequest]:
            yield pb.AnalyzeVoiceRequest(config=_config(target_text=SHORT))
            for _ in range(3):
                yield pb.AnalyzeVoiceRequest(audio=bytes(3200))
            await asyncio.sleep(30)

        for requests in (_config_then_wait(_config(target_text=SHORT)), some_audio_then_nothing()):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as idle:
                async for _ in kzone.api.AnalyzeVoice(requests, metadata=learner.metadata(), timeout=30):
                    pass
            assert error_of(idle.value)[:2] == (grpc.StatusCode.DEADLINE_EXCEEDED, "STREAM_IDLE")
            assert time.monotonic() - started < 5
        assert kzone.active_sessions == 0


async def test_a_missing_recogniser_is_unavailable_with_retry_advice(
    start_kzone: StartKZone,
    learner: Caller,
) -> None:
    async with start_kzone(None) as kzone:
        refused = await _refusal(kzone, learner, _config(target_text=SHORT))
        assert error_of(refused)[:2] == (grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY")
        assert _retry_delay(refused) == pytest.approx(2.0)
        file = httpbody_pb2.HttpBody(content_type="audio/wav", data=_wav(np.zeros(RATE)))
        with pytest.raises(grpc.aio.AioRpcError) as upload:
            await kzone.api.AnalyzeVoiceFile(
                pb.AnalyzeVoiceFileRequest(file=file, target_text=SHORT), metadata=learner.metadata()
            )
        assert error_of(upload.value)[:2] == (grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY")
        assert kzone.active_sessions == 0


def _wav(samples: np.ndarray, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(_pcm(samples))
    return buffer.getvalue()


def _mp3(samples: np.ndarray, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp3") as output:
        stream = output.add_stream("libmp3lame", rate=rate, layout="mono")
        assert isinstance(stream, av.audio.stream.AudioStream)
        frame = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content_type", "encode", "extension"), [("audio/wav", _wav, "wav"), ("audio/mpeg", _mp3, "mp3")]
)
async def test_an_uploaded_recording_is_analysed_and_stored(
    kzone: KZone,
    learner: Caller,
    tmp_path: Path,
    content_type: str,
    encode: Callable[[np.ndarray], bytes],
    extension: str,
) -> None:
    speech = np.frombuffer(speak(SENTENCE, tmp_path) + silence(0.3), dtype="<i2").astype(np.float32) / 32768
    data = encode(speech)
    reply = await kzone.api.AnalyzeVoiceFile(
        pb.AnalyzeVoiceFileRequest(
            file=httpbody_pb2.HttpBody(content_type=content_type, data=data), target_text=SENTENCE, language="en"
        ),
        metadata=learner.metadata(),
        timeout=60,
    )
    result = reply.result
    assert (result.source, result.user_id) == (res.ANALYSIS_SOURCE_UPLOAD, learner.user_id)
    assert word_accuracy(SENTENCE, result.voice.transcript) >= 0.8, result.voice.transcript
    assert result.voice.scores.pronunciation >= 70
    assert result.voice.words
    assert result.voice.pitch.voiced_ratio > 0
    assert abs(result.voice.duration.ToNanoseconds() / 1e9 - speech.size / RATE) < 0.1
    assert result.input_media_uri.endswith(f"/upload.{extension}")
    assert (kzone.media_dir / result.input_media_uri).read_bytes() == data
    # Not audio: refused clearly.
    with pytest.raises(grpc.aio.AioRpcError) as wrong_type:
        await kzone.api.AnalyzeVoiceFile(
            pb.AnalyzeVoiceFileRequest(
                file=httpbody_pb2.HttpBody(content_type="video/mp4", data=data), target_text=SHORT
            ),
            metadata=learner.metadata(),
        )
    assert error_of(wrong_type.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_MEDIA_TYPE")
