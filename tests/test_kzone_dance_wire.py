"""Dance analysis through the kzone service over mTLS, with the real pose server (mediapipe PoseLandmarker) behind
it: DetectDancePose on a photo of a person (33 landmarks) and on an empty frame (none), an uploaded video scored and
stored; the live AnalyzeDance stream scored against READY choreographies whose keypoints were stored with
encode_keypoints (a time-warped copy of the learner's own dance scores high, a different one low, a mirrored learner
is detected), live segment events before the stored final result; a cancelled stream frees its session and pose
stream at once, streams over the limit are refused, bad frames are INVALID_ARGUMENT, an idle stream times out.

The learner's "dance" is matplotlib's photo of Grace Hopper swaying (rotated back and forth over time): making
videos of dancing people is not possible offline, and the rotation is what survives the position and scale
normalisation of the scoring."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
from google.api import httpbody_pb2
from google.protobuf import duration_pb2
from PIL import Image, ImageOps

from megacity.kzone.v1 import kzone_service_pb2 as pb
from megacity.kzone.v1 import kzone_service_pb2_grpc
from megacity.kzone.v1 import resources_pb2 as res
from megacity.pose.v1 import pose_service_pb2 as pose_pb
from megacity.pose.v1 import pose_service_pb2_grpc
from megacity.pose.v1 import resources_pb2 as pose_res
from ops.embedded import EmbeddedRedis
from services.inference.pose import server as pose_server
from services.inference.pose.engine import PoseSettings
from services.kzone import contents
from services.kzone.choreography import PoseSequence
from services.kzone.dance import decode_keypoints, encode_keypoints
from services.kzone.store import KZoneStore
from services.runtime.database import create_pool
from services.runtime.server import Service
from tests.support.accounts import Caller, People
from tests.support.inference import error_of, noise_image, person_photo
from tests.support.kzone import isolated_kzone
from tests.support.mesh import channel_as, make_config, mesh_catalog, running
from tests.test_kzone_contents_wire import ZONE, new_org

pytestmark = pytest.mark.slow

FPS = 10
SECONDS = 8.0
SWAY_DEGREES = 25.0
SWAY_PERIOD = 4.0
IDLE_TIMEOUT = 1.5
MAX_STREAMS = 2


# --- the learner's frames --------------------------------------------------------------------------------------


def _sway(t: float) -> float:
    return SWAY_DEGREES * math.sin(2 * math.pi * t / SWAY_PERIOD)


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


@dataclass(frozen=True)
class Dance:
    times: list[float]
    frames: list[bytes]  # JPEG
    flipped: list[bytes]  # the same, seen in a mirror
    images: list[Image.Image]


@pytest.fixture(scope="module")
def dance() -> Dance:
    with Image.open(person_photo()) as photo:
        person = photo.convert("RGB")
    times = [index / FPS for index in range(int(SECONDS * FPS))]
    images = [person.rotate(_sway(t), resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128)) for t in times]
    return Dance(times, [_jpeg(i) for i in images], [_jpeg(ImageOps.mirror(i)) for i in images], images)


def _ms(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromMilliseconds(round(seconds * 1000))
    return value


def _frame(data: bytes, t: float) -> pb.AnalyzeDanceRequest:
    return pb.AnalyzeDanceRequest(frame=res.VideoFrame(timestamp=_ms(t), encoding=res.FRAME_ENCODING_JPEG, data=data))


def _config(reference_id: str, **fields: object) -> pb.AnalyzeDanceRequest:
    return pb.AnalyzeDanceRequest(config=res.DanceStreamConfig(reference_id=reference_id, **fields))  # type: ignore[arg-type]


def _stream(*requests: pb.AnalyzeDanceRequest, linger: float = 0.0) -> AsyncIterator[pb.AnalyzeDanceRequest]:
    async def generate() -> AsyncIterator[pb.AnalyzeDanceRequest]:
        for request in requests:
            yield request
        if linger:  # keep the stream open: an error must come from the server (grpc/grpc#36066)
            await asyncio.sleep(linger)

    return generate()


# --- services --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def pose(pki_dir: Path) -> AsyncIterator[Service]:
    settings = dataclasses.replace(PoseSettings.from_environment(), max_streams=6, idle_timeout=10.0)
    async with running(
        make_config(mesh_catalog(), "pose", pki_dir), lambda deps: pose_server.build(deps, settings)
    ) as s:
        yield s


@dataclass
class KZone:
    api: kzone_service_pb2_grpc.KZoneServiceStub
    pose: pose_service_pb2_grpc.PoseServiceStub
    store: KZoneStore
    media_dir: Path
    teacher: Caller
    student: Caller
    org: str


@pytest.fixture
async def kzone(
    people: People,
    identity_database: dict[str, str],
    redis: EmbeddedRedis,
    pose: Service,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[KZone]:
    media_dir = isolated_kzone(monkeypatch, tmp_path)
    monkeypatch.setenv("MEGACITY_TARGET_POSE", f"127.0.0.1:{pose.port}")
    monkeypatch.setenv("MEGACITY_KZONE_MAX_DANCE_STREAMS", str(MAX_STREAMS))
    monkeypatch.setenv("MEGACITY_KZONE_DANCE_IDLE_TIMEOUT_SECONDS", str(IDLE_TIMEOUT))
    config = make_config(
        mesh_catalog(), "kzone", people.pki_dir, database_url=identity_database["kzone"], redis_url=redis.url
    )
    pool = await create_pool(identity_database["kzone"], schema="kzone", max_size=2)
    zone_admin = await people.as_new_user(ZONE, "kzone-public", "zone_admin")
    org = await new_org(people, zone_admin)
    try:
        async with (
            running(config) as service,
            channel_as("edge", service, people.pki_dir) as channel,
            channel_as("kzone", pose, people.pki_dir) as pose_channel,
        ):
            yield KZone(
                kzone_service_pb2_grpc.KZoneServiceStub(channel),
                pose_service_pb2_grpc.PoseServiceStub(pose_channel),
                KZoneStore(pool),
                media_dir,
                teacher=await people.as_new_user(ZONE, org, "teacher"),
                student=await people.as_new_user(ZONE, org, "student"),
                org=org,
            )
    finally:
        await pool.close()


async def _choreography(kzone: KZone, poses: PoseSequence | None, *, tempo: float = 120.0) -> str:
    """A choreography of the teacher's organisation, READY with `poses` as its keypoints (PROCESSING without)."""
    created = await kzone.api.CreateReferenceContent(
        pb.CreateReferenceContentRequest(
            content=res.ReferenceContent(
                kind=res.REFERENCE_KIND_CHOREOGRAPHY, title=f"Sway {uuid.uuid4().hex[:6]}", tempo_bpm=tempo
            )
        ),
        metadata=kzone.teacher.metadata(),
    )
    content = (
        await kzone.api.UploadReferenceMedia(
            pb.UploadReferenceMediaRequest(
                content_id=created.content.id, file=httpbody_pb2.HttpBody(content_type="video/mp4", data=b"mp4")
            ),
            metadata=kzone.teacher.metadata(),
        )
    ).content
    if poses is None:
        return content.id
    key = contents.keypoints_key(ZONE, kzone.org, content.id, content.processing_job_id)
    (kzone.media_dir / key).parent.mkdir(parents=True, exist_ok=True)
    (kzone.media_dir / key).write_bytes(encode_keypoints(poses))
    features = res.ReferenceFeatures(
        keypoints_uri=key, keypoint_frame_count=len(poses), keypoint_frame_rate=1 / poses.frame_period
    )
    assert await kzone.store.finish_processing(
        content.id, features, job_id=content.processing_job_id, duration_seconds=float(poses.timestamps[-1])
    )
    return content.id


# --- the learner's real poses, and choreographies made from them ------------------------------------------------


async def _real_poses(kzone: KZone, dance: Dance) -> PoseSequence:
    """The learner's frames through the pose server directly."""

    async def requests() -> AsyncIterator[pose_pb.DetectPoseRequest]:
        yield pose_pb.DetectPoseRequest(config=pose_res.PoseConfig())
        for index, (t, data) in enumerate(zip(dance.times, dance.frames, strict=True)):
            frame = pose_res.Frame(
                encoding=pose_res.FRAME_ENCODING_JPEG, data=data, timestamp=_ms(t), frame_index=index
            )
            yield pose_pb.DetectPoseRequest(frame=frame)

    times, points = [], []
    async for reply in kzone.pose.DetectPose(requests(), timeout=120):
        if reply.poses:
            times.append(reply.timestamp.ToNanoseconds() / 1e9)
            points.append([[p.x, p.y, p.z, p.visibility] for p in reply.poses[0].landmarks])
    array = np.array(points)
    width, height = dance.images[0].size
    assert len(times) > 0.9 * len(dance.times)
    return PoseSequence(np.array(times), array[:, :, :3], array[:, :, 3], width / height)


def _time_warped(poses: PoseSequence) -> PoseSequence:
    """The same moves on another clock: a little slower, then faster (monotone warp)."""
    times = poses.timestamps
    warped = times + 0.4 * np.sin(np.pi * times / SECONDS)
    return PoseSequence(warped, poses.landmarks, poses.visibility, poses.aspect_ratio)


def _leaning(poses: PoseSequence) -> PoseSequence:
    """A different choreography: the body leaning far to one side and swinging faster and wider there."""
    landmarks = poses.landmarks.copy()
    aspect = poses.aspect_ratio
    hips = (landmarks[:, 23, :2] + landmarks[:, 24, :2]) / 2
    for frame, t in enumerate(poses.timestamps):
        angle = math.radians(70 + 30 * math.sin(2 * math.pi * t / 1.5))
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        relative = (landmarks[frame, :, :2] - hips[frame]) * [aspect, 1.0]
        landmarks[frame, :, :2] = relative @ rotation.T / [aspect, 1.0] + hips[frame]
    return PoseSequence(poses.timestamps, landmarks, poses.visibility, aspect)


async def _perform(
    kzone: KZone, reference_id: str, frames: Sequence[bytes], times: Sequence[float], **config: object
) -> list[pb.AnalyzeDanceResponse]:
    requests = [_config(reference_id, **config), *(_frame(data, t) for data, t in zip(frames, times, strict=True))]
    call = kzone.api.AnalyzeDance(_stream(*requests), metadata=kzone.student.metadata(), timeout=120)
    return [event async for event in call]


def _final(events: list[pb.AnalyzeDanceResponse]) -> res.AnalysisResult:
    assert events[-1].WhichOneof("event") == "final_result"
    assert all(event.WhichOneof("event") != "final_result" for event in events[:-1])
    return events[-1].final_result


# --- tests -----------------------------------------------------------------------------------------------------


async def test_a_photo_of_a_person_gives_33_landmarks_and_an_empty_frame_none(kzone: KZone) -> None:
    photo = person_photo().read_bytes()
    reply = await kzone.api.DetectDancePose(
        pb.DetectDancePoseRequest(file=httpbody_pb2.HttpBody(content_type="image/jpeg", data=photo)),
        metadata=kzone.student.metadata(),
        timeout=60,
    )
    assert (reply.frame_count, reply.frames_with_pose, len(reply.frames)) == (1, 1, 1)
    assert reply.frames[0].detected
    assert len(reply.frames[0].landmarks) == 33
    nose = reply.frames[0].landmarks[0]
    assert nose.visibility > 0.9
    assert 0.3 < nose.x < 0.7

    png = io.BytesIO()
    Image.frombytes("RGB", (320, 240), noise_image(320, 240)).save(png, format="PNG")
    empty = await kzone.api.DetectDancePose(
        pb.DetectDancePoseRequest(file=httpbody_pb2.HttpBody(content_type="image/png", data=png.getvalue())),
        metadata=kzone.student.metadata(),
        timeout=60,
    )
    assert (empty.frame_count, empty.frames_with_pose) == (1, 0)
    assert not empty.frames[0].detected
    assert list(empty.frames[0].landmarks) == []


async def test_the_live_stream_scores_against_stored_choreographies(kzone: KZone, dance: Dance) -> None:
    real = await _real_poses(kzone, dance)
    # The stored keypoints read back as they were written.
    round_trip = decode_keypoints(encode_keypoints(real))
    assert np.allclose(round_trip.landmarks, real.landmarks, atol=1e-5)
    assert np.allclose(round_trip.timestamps, real.timestamps)
    same = await _choreography(kzone, _time_warped(real))
    different = await _choreography(kzone, _leaning(real))

    started = time.perf_counter()
    events = await _perform(kzone, same, dance.frames, dance.times, return_landmarks=True)
    elapsed = time.perf_counter() - started
    kinds = [event.WhichOneof("event") for event in events]
    poses = [event.pose for event in events if event.WhichOneof("event") == "pose"]
    assert len(poses) == len(dance.frames)
    assert sum(pose.detected for pose in poses) > 0.9 * len(poses)
    assert all(len(pose.landmarks) == 33 for pose in poses if pose.detected)
    segments = [event.segment for event in events if event.WhichOneof("event") == "segment"]
    # Bars of 2 s at 120 BPM: bars 1-3 complete while the learner dances, live, each followed by running scores.
    assert [segment.start_bar for segment in segments] == [1, 2, 3]
    assert all(segment.score > 70 for segment in segments), [segment.score for segment in segments]
    assert kinds.index("segment") < kinds.index("final_result")
    assert kinds.count("scores") == len(segments)
    result = _final(events)
    report = result.dance
    assert (result.source, result.reference_id, result.user_id) == (
        res.ANALYSIS_SOURCE_LIVE,
        same,
        kzone.student.user_id,
    )
    assert report.frames_analyzed == len(dance.frames)
    assert report.scores.overall > 80, report
    assert not report.mirrored
    assert len(report.segments) == 4
    assert report.keypoints_uri
    stored = decode_keypoints((kzone.media_dir / report.keypoints_uri).read_bytes())
    assert len(stored) == report.frames_with_pose
    # Stored: the learner reads it back.
    again = await kzone.api.GetAnalysisResult(
        pb.GetAnalysisResultRequest(result_id=result.id), metadata=kzone.student.metadata()
    )
    assert again.result.dance.scores.overall == pytest.approx(report.scores.overall)
    print(f"\nlive stream: {len(dance.frames)} frames in {elapsed:.2f} s ({len(dance.frames) / elapsed:.1f} frames/s)")

    low = _final(await _perform(kzone, different, dance.frames, dance.times)).dance
    assert low.scores.overall < 50, low.scores
    assert low.scores.overall < report.scores.overall - 30

    # A learner seen in a mirror: detected (AUTO), and scored as well; not mirroring them scores low.
    mirrored = _final(await _perform(kzone, same, dance.flipped, dance.times)).dance
    assert mirrored.mirrored
    assert mirrored.scores.overall > 75, mirrored.scores
    unmirrored = _final(
        await _perform(kzone, same, dance.flipped, dance.times, mirror=res.MIRROR_MODE_NOT_MIRRORED)
    ).dance
    assert not unmirrored.mirrored
    assert unmirrored.scores.overall < mirrored.scores.overall - 20, (unmirrored.scores, mirrored.scores)
    print(
        f"scores: same {report.scores.overall:.1f}, different {low.scores.overall:.1f}, mirrored (auto) "
        f"{mirrored.scores.overall:.1f}, mirrored (not mirrored) {unmirrored.scores.overall:.1f}"
    )


def _video(dance: Dance) -> bytes:
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        width, height = dance.images[0].size
        stream.width, stream.height = width - width % 2, height - height % 2
        stream.pix_fmt = "yuv420p"
        for image in dance.images:
            frame = av.VideoFrame.from_image(image.crop((0, 0, stream.width, stream.height)))  # type: ignore[no-untyped-call]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


async def test_an_uploaded_video_is_scored_and_stored(kzone: KZone, dance: Dance) -> None:
    real = await _real_poses(kzone, dance)
    reference = await _choreography(kzone, _time_warped(real))
    video = _video(dance)
    started = time.perf_counter()
    reply = await kzone.api.DetectDancePose(
        pb.DetectDancePoseRequest(
            file=httpbody_pb2.HttpBody(content_type="video/mp4", data=video),
            reference_id=reference,
            include_landmarks=True,
        ),
        metadata=kzone.student.metadata(),
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert abs(reply.frame_count - len(dance.frames)) <= 2
    assert reply.frames_with_pose > 0.9 * reply.frame_count
    assert len(reply.frames) == reply.frame_count
    assert reply.duration.ToMilliseconds() >= 7000
    assert reply.result.source == res.ANALYSIS_SOURCE_UPLOAD
    assert reply.result.dance.scores.overall > 75, reply.result.dance.scores
    assert reply.keypoints_uri == reply.result.dance.keypoints_uri != ""
    assert (kzone.media_dir / reply.result.input_media_uri).read_bytes() == video
    print(f"\nupload: {reply.frame_count} frames in {elapsed:.2f} s")

    # Without a reference only the poses come back; nothing is stored.
    plain = await kzone.api.DetectDancePose(
        pb.DetectDancePoseRequest(file=httpbody_pb2.HttpBody(content_type="video/mp4", data=video)),
        metadata=kzone.student.metadata(),
        timeout=120,
    )
    assert plain.frames_with_pose == reply.frames_with_pose
    assert list(plain.frames) == []
    assert not plain.HasField("result")

    broken = await _refused(
        kzone.api.DetectDancePose(
            pb.DetectDancePoseRequest(file=httpbody_pb2.HttpBody(content_type="video/mp4", data=b"not a video")),
            metadata=kzone.student.metadata(),
            timeout=30,
        )
    )
    assert error_of(broken)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_MEDIA_TYPE")


async def _refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    return refused.value


async def _pose_streams(kzone: KZone) -> int:
    active: int = (await kzone.pose.GetModelInfo(pose_pb.GetModelInfoRequest(), timeout=5)).model.active_streams
    return active


async def _until_no_pose_streams(kzone: KZone, timeout: float = 1.0) -> float:
    started = time.monotonic()
    while await _pose_streams(kzone):
        assert time.monotonic() - started < timeout, "the pose stream outlived its dance session"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_cancelling_frees_the_session_at_once_and_streams_past_the_limit_are_refused(
    kzone: KZone, dance: Dance
) -> None:
    reference = await _choreography(kzone, await _real_poses(kzone, dance))

    async def endless() -> AsyncIterator[pb.AnalyzeDanceRequest]:
        yield _config(reference, return_landmarks=True)
        for index in range(100_000):
            yield _frame(dance.frames[index % len(dance.frames)], index / FPS)
            await asyncio.sleep(0.02)

    call = kzone.api.AnalyzeDance(endless(), metadata=kzone.student.metadata(), timeout=60)
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            break
    assert await _pose_streams(kzone) == 1
    call.cancel()
    freed = await _until_no_pose_streams(kzone)
    print(f"\npose stream freed {freed * 1000:.0f} ms after the cancel")

    # Its slot is free again at once: MAX_STREAMS streams are taken, one more is refused.
    held = []
    for _ in range(MAX_STREAMS):
        stream = kzone.api.AnalyzeDance(
            _stream(_config(reference, return_landmarks=True), _frame(dance.frames[0], 0.0), linger=30),
            metadata=kzone.student.metadata(),
            timeout=60,
        )
        first = await stream.read()
        assert isinstance(first, pb.AnalyzeDanceResponse)
        assert first.WhichOneof("event") == "pose"
        held.append(stream)
    extra = kzone.api.AnalyzeDance(
        _stream(_config(reference), linger=10), metadata=kzone.student.metadata(), timeout=20
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in extra:
            pass
    assert error_of(refused.value)[:2] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXCEEDED")
    for stream in held:
        stream.cancel()
    await _until_no_pose_streams(kzone)


async def test_bad_streams_are_refused_clearly(kzone: KZone, dance: Dance) -> None:
    reference = await _choreography(kzone, await _real_poses(kzone, dance))
    processing = await _choreography(kzone, None)
    photo = dance.frames[0]
    config = _config(reference)
    cases: list[tuple[str, list[pb.AnalyzeDanceRequest], grpc.StatusCode, str, str]] = [
        (
            "undecodable-jpeg",
            [config, _frame(b"\xff\xd8\xff\xe0 not really a jpeg", 0.0)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNSUPPORTED_FRAME_FORMAT",
            "frame.data",
        ),
        (
            "timestamps-going-back",
            [config, _frame(photo, 0.5), _frame(photo, 0.4)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "FRAME_TIMESTAMP_INVALID",
            "frame.timestamp",
        ),
        (
            "oversized-frame",
            [config, _frame(b"\xff\xd8" + bytes(8 * 1024 * 1024), 0.0)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "PAYLOAD_TOO_LARGE",
            "frame.data",
        ),
        (
            "rgb-without-size",
            [config, pb.AnalyzeDanceRequest(frame=res.VideoFrame(timestamp=_ms(0), encoding=2, data=b"\0" * 12))],  # type: ignore[arg-type]
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNSUPPORTED_FRAME_FORMAT",
            "frame.width",
        ),
        ("frame-first", [_frame(photo, 0.0)], grpc.StatusCode.INVALID_ARGUMENT, "STREAM_PROTOCOL", "config"),
        ("second-config", [config, config], grpc.StatusCode.INVALID_ARGUMENT, "STREAM_PROTOCOL", "frame"),
        (
            "unknown-reference",
            [_config(uuid.uuid4().hex)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_REFERENCE",
            "config.reference_id",
        ),
        (
            "reference-not-ready",
            [_config(processing)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "REFERENCE_NOT_READY",
            "config.reference_id",
        ),
    ]
    for name, requests, code, reason, field in cases:
        # Learners see READY references only: the teacher tries the one still being extracted.
        caller = kzone.teacher if name == "reference-not-ready" else kzone.student
        call = kzone.api.AnalyzeDance(_stream(*requests, linger=5), metadata=caller.metadata(), timeout=20)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in call:
                pass
        got_code, got_reason, violations = error_of(failure.value)
        assert (got_code, got_reason) == (code, reason), (name, failure.value.details())
        assert field in [violated for violated, _ in violations], (name, violations)
    await _until_no_pose_streams(kzone)

    anonymous = kzone.api.AnalyzeDance(_stream(config, linger=5), timeout=20)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in anonymous:
            pass
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_idle_stream_times_out(kzone: KZone, dance: Dance) -> None:
    reference = await _choreography(kzone, await _real_poses(kzone, dance))
    call = kzone.api.AnalyzeDance(
        _stream(_config(reference, return_landmarks=True), _frame(dance.frames[0], 0.0), linger=10),
        metadata=kzone.student.metadata(),
        timeout=20,
    )
    first = await call.read()
    assert isinstance(first, pb.AnalyzeDanceResponse)
    assert first.pose.detected
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call.read()
    assert error_of(failure.value)[:2] == (grpc.StatusCode.DEADLINE_EXCEEDED, "STREAM_IDLE")
    assert time.monotonic() - started < IDLE_TIMEOUT + 1.0
    await _until_no_pose_streams(kzone)
