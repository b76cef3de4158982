"""Reference extraction end to end with the real models: a teacher uploads a song (espeak-ng speech over a click
track) or a choreography (a video of a real person, with a click track) through UploadReferenceMedia, and the kzone
service's extraction worker, calling the asr and pose inference servers over mTLS, makes it READY: the song with its
words, pitch track and beats; the choreography with its keypoints in the media store. Media that cannot be decoded,
and a video without a person, end FAILED with a reason."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
import uuid
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from google.api import httpbody_pb2

from megacity.kzone.v1 import kzone_service_pb2 as pb
from megacity.kzone.v1 import kzone_service_pb2_grpc
from megacity.kzone.v1 import resources_pb2 as res
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2 as tenant_pb
from ops.embedded import EmbeddedRedis
from services.inference.asr import server as asr_server
from services.inference.asr.engine import AsrSettings
from services.inference.pose import server as pose_server
from services.inference.pose.engine import PoseSettings
from services.kzone.dance import decode_keypoints
from services.runtime.server import Service
from tests.support.accounts import Caller, People
from tests.support.inference import person_photo, speak, until_serving, word_accuracy
from tests.support.mesh import channel_as, make_config, mesh_catalog, running
from tests.support.ports import free_port

pytestmark = pytest.mark.slow

ZONE = "kzone"
RATE = 16_000
SENTENCE = "Please open the window and close the door before you leave the room."
READY_WITHIN = 180.0


@pytest.fixture(scope="module")
async def asr(pki_dir: Path) -> AsyncIterator[Service]:
    config = make_config(mesh_catalog(), "asr", pki_dir)
    async with running(config, lambda deps: asr_server.build(deps, AsrSettings.from_environment())) as service:
        yield service


@pytest.fixture(scope="module")
async def pose(pki_dir: Path) -> AsyncIterator[Service]:
    config = make_config(mesh_catalog(), "pose", pki_dir)
    async with running(config, lambda deps: pose_server.build(deps, PoseSettings.from_environment())) as service:
        yield service


@dataclass
class KZone:
    api: kzone_service_pb2_grpc.KZoneServiceStub
    media_dir: Path
    teacher: Caller


@pytest.fixture
async def kzone(
    people: People,
    identity_database: dict[str, str],
    redis: EmbeddedRedis,
    asr: Service,
    pose: Service,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[KZone]:
    media_dir = tmp_path / "media"
    monkeypatch.setenv("MEGACITY_MEDIA_DIR", str(media_dir))
    monkeypatch.setenv("MEGACITY_TARGET_ASR", f"127.0.0.1:{asr.port}")
    monkeypatch.setenv("MEGACITY_TARGET_POSE", f"127.0.0.1:{pose.port}")
    monkeypatch.setenv("MEGACITY_KZONE_EXTRACTION_POLL_SECONDS", "0.1")
    monkeypatch.setenv("MEGACITY_KZONE_EXTRACTION_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("MEGACITY_KZONE_EXTRACTION_STALE_SECONDS", "20")
    zone_admin = await people.as_new_user(ZONE, "kzone-public", "zone_admin")
    org = await people.tenant.CreateOrganization(
        tenant_pb.CreateOrganizationRequest(
            organization=tenant_resources.Organization(name=f"Studio {uuid.uuid4().hex[:8]}")
        ),
        metadata=zone_admin.metadata(),
    )
    teacher = await people.as_new_user(ZONE, org.organization.id, "teacher")
    config = make_config(
        mesh_catalog(), "kzone", people.pki_dir, database_url=identity_database["kzone"], redis_url=redis.url
    )
    async with running(config) as service, channel_as("edge", service, people.pki_dir) as channel:
        for server, name in ((asr, "megacity.asr.v1.AsrService"), (pose, "megacity.pose.v1.PoseService")):
            async with channel_as("ops", server, people.pki_dir) as probe:
                await until_serving(probe, name, timeout=120)
        yield KZone(kzone_service_pb2_grpc.KZoneServiceStub(channel), media_dir, teacher)


# --- media --------------------------------------------------------------------------------------------------------


def _clicks(seconds: float, rate: int, bpm: float, first: float, level: float) -> np.ndarray:
    samples = np.zeros(int(seconds * rate), dtype=np.float32)
    t = np.arange(int(0.03 * rate)) / rate
    click = (level * np.sin(2 * np.pi * 1500 * t) * np.exp(-t * 150)).astype(np.float32)
    beat = first
    while beat < seconds:
        start = int(beat * rate)
        end = min(samples.size, start + click.size)
        samples[start:end] += click[: end - start]
        beat += 60.0 / bpm
    return samples


def _wav(samples: np.ndarray, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def _song(directory: Path, seconds: float = 10.0) -> bytes:
    """The sentence spoken from 1 s on, over clicks at 120 BPM from 0.25 s: a 10 s song."""
    speech = np.frombuffer(speak(SENTENCE, directory), dtype="<i2").astype(np.float32) / 32768
    samples = _clicks(seconds, RATE, 120.0, 0.25, 0.5)
    start = RATE
    end = min(samples.size, start + speech.size)
    samples[start:end] += speech[: end - start]
    return _wav(samples)


def _video(seconds: float, fps: int, person: bool, audio: bool) -> bytes:
    """An MP4 of grace_hopper.jpg drifting across the picture (or of noise), with a click track at 120 BPM."""
    from PIL import Image

    with Image.open(person_photo()) as image:
        photo = np.asarray(image.convert("RGB").resize((256, 300)))
    width, height = 320, 320
    rng = np.random.default_rng(7)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        video = output.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.time_base = Fraction(1, fps)
        sound = output.add_stream("aac", rate=44_100, layout="mono") if audio else None
        for index in range(int(seconds * fps)):
            if person:
                frame_rgb = np.full((height, width, 3), 200, dtype=np.uint8)
                shift = 10 + int(40 * index / (seconds * fps))
                frame_rgb[10:310, shift : shift + 256] = photo
            else:
                frame_rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(frame_rgb, format="rgb24")
            frame.pts = index
            for packet in video.encode(frame):
                output.mux(packet)
        for packet in video.encode(None):
            output.mux(packet)
        if sound is not None:
            samples = _clicks(seconds, 44_100, 120.0, 0.1, 0.8)
            for start in range(0, samples.size, 1024):
                chunk = samples[start : start + 1024]
                piece = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
                piece.sample_rate = 44_100
                piece.pts = start
                for packet in sound.encode(piece):
                    output.mux(packet)
            for packet in sound.encode(None):
                output.mux(packet)
    return buffer.getvalue()


# --- calls --------------------------------------------------------------------------------------------------------


async def _upload(kzone: KZone, kind: int, content_type: str, data: bytes, **fields: object) -> res.ReferenceContent:
    created = await kzone.api.CreateReferenceContent(
        pb.CreateReferenceContentRequest(
            content=res.ReferenceContent(kind=kind, title="Reference", **fields)  # type: ignore[arg-type]
        ),
        metadata=kzone.teacher.metadata(),
    )
    uploaded = await kzone.api.UploadReferenceMedia(
        pb.UploadReferenceMediaRequest(
            content_id=created.content.id, file=httpbody_pb2.HttpBody(content_type=content_type, data=data)
        ),
        metadata=kzone.teacher.metadata(),
    )
    assert uploaded.content.status == res.REFERENCE_STATUS_PROCESSING
    return uploaded.content


async def _settled(kzone: KZone, content_id: str) -> tuple[res.ReferenceContent, float]:
    """The reference once READY or FAILED, and how long that took."""
    started = time.perf_counter()
    while True:
        reply = await kzone.api.GetReferenceContent(
            pb.GetReferenceContentRequest(content_id=content_id), metadata=kzone.teacher.metadata()
        )
        if reply.content.status in (res.REFERENCE_STATUS_READY, res.REFERENCE_STATUS_FAILED):
            return reply.content, time.perf_counter() - started
        assert time.perf_counter() - started < READY_WITHIN, f"still {reply.content.status} after {READY_WITHIN} s"
        await asyncio.sleep(0.1)


async def _features(kzone: KZone, content_id: str) -> res.ReferenceFeatures:
    reply = await kzone.api.GetReferenceFeatures(
        pb.GetReferenceFeaturesRequest(content_id=content_id), metadata=kzone.teacher.metadata()
    )
    return reply.features


def _seconds(value: object) -> float:
    nanoseconds: int = value.ToNanoseconds()  # type: ignore[attr-defined]
    return nanoseconds / 1e9


# --- tests --------------------------------------------------------------------------------------------------------


async def test_a_song_becomes_ready_with_words_pitch_and_beats(kzone: KZone, tmp_path: Path) -> None:
    song = await _upload(kzone, res.REFERENCE_KIND_SONG, "audio/wav", _song(tmp_path), language="en")
    ready, took = await _settled(kzone, song.id)
    print(f"10 s song extracted in {took:.2f} s")
    assert ready.status == res.REFERENCE_STATUS_READY, ready.processing_error
    assert _seconds(ready.duration) == pytest.approx(10.0, abs=0.05)
    assert ready.tempo_bpm == pytest.approx(120.0, rel=0.03)  # detected: none was given
    features = await _features(kzone, song.id)
    assert features.content_id == song.id

    heard = " ".join(word.word for word in features.words)
    assert word_accuracy(SENTENCE, heard) >= 0.8, heard
    starts = [_seconds(word.start_offset) for word in features.words]
    assert starts == sorted(starts)
    assert 0.5 <= starts[0] <= 2.0  # the speech starts at 1 s (Whisper's word times are good to a few tenths)
    assert all(_seconds(word.end_offset) >= start for word, start in zip(features.words, starts, strict=True))

    pitch = features.pitch
    assert _seconds(pitch.frame_period) == pytest.approx(0.01)
    assert len(pitch.frequency_hz) == pytest.approx(1000, abs=10)
    voiced = [hz for hz in pitch.frequency_hz if hz > 0]
    assert len(voiced) > 100
    assert 60 < float(np.median(voiced)) < 300  # espeak's voice

    beats = [_seconds(beat) for beat in features.beats]
    assert len(beats) == pytest.approx(20, abs=1)
    assert float(np.median(np.diff(beats))) == pytest.approx(0.5, rel=0.03)
    assert min(abs(beat - 0.25) for beat in beats) < 0.05  # on the clicks


async def test_a_songs_given_tempo_and_downbeat_make_its_beat_grid(kzone: KZone, tmp_path: Path) -> None:
    downbeat = res.ReferenceContent().first_downbeat_offset
    downbeat.FromMilliseconds(400)
    song = await _upload(
        kzone,
        res.REFERENCE_KIND_SONG,
        "audio/wav",
        _song(tmp_path),
        language="en",
        lyrics=SENTENCE,
        tempo_bpm=100.0,
        first_downbeat_offset=downbeat,
    )
    ready, _ = await _settled(kzone, song.id)
    assert ready.status == res.REFERENCE_STATUS_READY, ready.processing_error
    assert ready.tempo_bpm == 100.0  # the given one wins
    assert _seconds(ready.first_downbeat_offset) == pytest.approx(0.4)
    beats = [_seconds(beat) for beat in (await _features(kzone, song.id)).beats]
    assert beats[:3] == pytest.approx([0.4, 1.0, 1.6])
    assert beats[-1] == pytest.approx(9.4)


async def test_a_choreography_becomes_ready_with_its_keypoints(kzone: KZone) -> None:
    dance = await _upload(kzone, res.REFERENCE_KIND_CHOREOGRAPHY, "video/mp4", _video(5.0, 30, True, True))
    ready, took = await _settled(kzone, dance.id)
    print(f"5 s video extracted in {took:.2f} s")
    assert ready.status == res.REFERENCE_STATUS_READY, ready.processing_error
    duration = _seconds(ready.duration)
    assert duration == pytest.approx(5.0, abs=0.1)
    features = await _features(kzone, dance.id)
    assert features.keypoint_frame_rate == pytest.approx(15.0, rel=0.01)
    assert features.keypoint_frame_count == pytest.approx(duration * 15, abs=3)
    assert features.keypoints_uri == (
        f"kzone/{ZONE}/{ready.org_id}/contents/{dance.id}/{ready.processing_job_id}/keypoints.json"
    )
    sequence = decode_keypoints((kzone.media_dir / features.keypoints_uri).read_bytes())
    assert len(sequence) == features.keypoint_frame_count
    assert sequence.aspect_ratio == pytest.approx(1.0)
    nose_x = sequence.landmarks[:, 0, 0]
    assert nose_x[-1] > nose_x[0] + 0.05  # the person drifts right
    assert float(np.mean(sequence.visibility[:, 0])) > 0.8
    # Beats from the video's audio track: clicks at 120 BPM from 0.1 s.
    assert ready.tempo_bpm == pytest.approx(120.0, rel=0.03)
    beats = [_seconds(beat) for beat in features.beats]
    assert float(np.median(np.diff(beats))) == pytest.approx(0.5, rel=0.03)
    assert min(abs(beat - 0.1) for beat in beats) < 0.05


async def test_a_silent_choreography_takes_its_beats_from_the_given_tempo(kzone: KZone) -> None:
    dance = await _upload(
        kzone, res.REFERENCE_KIND_CHOREOGRAPHY, "video/mp4", _video(2.0, 15, True, False), tempo_bpm=90.0
    )
    ready, _ = await _settled(kzone, dance.id)
    assert ready.status == res.REFERENCE_STATUS_READY, ready.processing_error
    beats = [_seconds(beat) for beat in (await _features(kzone, dance.id)).beats]
    assert beats == pytest.approx([0.0, 2 / 3, 4 / 3])


async def test_media_without_what_extraction_needs_fails_with_a_reason(kzone: KZone) -> None:
    broken = await _upload(kzone, res.REFERENCE_KIND_SONG, "audio/wav", b"RIFF" + bytes(range(256)) * 8)
    nobody = await _upload(kzone, res.REFERENCE_KIND_CHOREOGRAPHY, "video/mp4", _video(2.0, 15, False, False))
    failed, _ = await _settled(kzone, broken.id)
    assert failed.status == res.REFERENCE_STATUS_FAILED
    assert "cannot be decoded" in failed.processing_error
    empty, _ = await _settled(kzone, nobody.id)
    assert empty.status == res.REFERENCE_STATUS_FAILED
    assert "no person was found" in empty.processing_error


async def test_a_song_without_vocals_fails(kzone: KZone) -> None:
    t = np.arange(6 * RATE) / RATE
    melody = 0.3 * np.sin(2 * np.pi * np.where(t % 1.0 < 0.5, 440.0, 330.0) * t)
    song = await _upload(kzone, res.REFERENCE_KIND_SONG, "audio/wav", _wav(melody.astype(np.float32)), language="en")
    failed, _ = await _settled(kzone, song.id)
    assert failed.status == res.REFERENCE_STATUS_FAILED
    assert "no words were recognised" in failed.processing_error


async def test_a_model_server_that_comes_up_late_is_waited_for(
    kzone: KZone, pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This kzone has not called the asr server yet, so its channel is made on the first call, to this address,
    # where nothing listens until a second asr server starts there.
    port = free_port()
    monkeypatch.setenv("MEGACITY_TARGET_ASR", f"127.0.0.1:{port}")
    song = await _upload(kzone, res.REFERENCE_KIND_SONG, "audio/wav", _song(tmp_path), language="en")
    await asyncio.sleep(2.0)  # refused a few times meanwhile: UNAVAILABLE, retried
    status = await kzone.api.GetReferenceContent(
        pb.GetReferenceContentRequest(content_id=song.id), metadata=kzone.teacher.metadata()
    )
    assert status.content.status == res.REFERENCE_STATUS_PROCESSING
    config = dataclasses.replace(make_config(mesh_catalog(), "asr", pki_dir), port=port)
    async with running(config, lambda deps: asr_server.build(deps, AsrSettings.from_environment())):
        ready, _ = await _settled(kzone, song.id)
    assert ready.status == res.REFERENCE_STATUS_READY, ready.processing_error
    assert word_accuracy(SENTENCE, " ".join(word.word for word in (await _features(kzone, song.id)).words)) >= 0.8
