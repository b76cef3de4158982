"""The pose inference server with the real PoseLandmarker bundle, over mTLS as the kzone service calls it: a photo
of a person gives 33 landmarks as a still and in a stream, noise gives none; timestamps, frames and configs are
validated; streams are bounded, and cancellation frees one at once; health follows the model's loading."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2
from PIL import Image

from megacity.pose.v1 import pose_service_pb2 as pb
from megacity.pose.v1 import pose_service_pb2_grpc
from megacity.pose.v1 import resources_pb2 as res
from services.inference.pose import server as pose_server
from services.inference.pose.engine import PoseModel, PoseSettings
from services.runtime.catalog import load_catalog
from services.runtime.server import Service
from tests.support.inference import error_of, noise_image, person_photo, serving, until_serving
from tests.support.mesh import channel_as, make_config, running

pytestmark = pytest.mark.slow

CATALOG = load_catalog()
MAX_FRAME_BYTES = 1024 * 1024
NOSE, LEFT_HIP, RIGHT_HIP = 0, 23, 24


def _settings(**changes: object) -> PoseSettings:
    return dataclasses.replace(PoseSettings.from_environment(), **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def pose(pki_dir: Path) -> AsyncIterator[Service]:
    settings = _settings(max_streams=3, idle_timeout=2.0, max_frame_bytes=MAX_FRAME_BYTES)
    config = make_config(CATALOG, "pose", pki_dir)
    async with running(config, lambda deps: pose_server.build(deps, settings)) as service:
        yield service


@pytest.fixture(scope="module")
def photo() -> bytes:
    return person_photo().read_bytes()


def _jpeg(frame: bytes, timestamp_ms: int, index: int = 0) -> res.Frame:
    return res.Frame(encoding=res.FRAME_ENCODING_JPEG, data=frame, timestamp=_ms(timestamp_ms), frame_index=index)


def _ms(value: int) -> duration_pb2.Duration:
    timestamp = duration_pb2.Duration()
    timestamp.FromMilliseconds(value)
    return timestamp


def _noise(timestamp_ms: int = 0, index: int = 0) -> res.Frame:
    return res.Frame(
        encoding=res.FRAME_ENCODING_RGB24,
        data=noise_image(320, 240),
        width=320,
        height=240,
        timestamp=_ms(timestamp_ms),
        frame_index=index,
    )


def _rgb(jpeg: bytes, timestamp_ms: int, index: int) -> res.Frame:
    with Image.open(io.BytesIO(jpeg)) as image:
        rgb = np.asarray(image.convert("RGB"))
    height, width, _ = rgb.shape
    return res.Frame(
        encoding=res.FRAME_ENCODING_RGB24,
        data=rgb.tobytes(),
        width=width,
        height=height,
        timestamp=_ms(timestamp_ms),
        frame_index=index,
    )


def _assert_person(poses: Sequence[res.Pose]) -> None:
    assert len(poses) == 1
    landmarks, world = poses[0].landmarks, poses[0].world_landmarks
    assert len(landmarks) == 33
    assert len(world) == 33
    nose = landmarks[NOSE]
    assert nose.visibility > 0.9
    assert 0.3 < nose.x < 0.7
    assert 0.2 < nose.y < 0.6
    for point in landmarks[:11]:  # the face is in the picture
        assert 0.0 <= point.x <= 1.0
        assert 0.0 <= point.y <= 1.0
    # The hips are below the nose (y grows downwards), whether or not they are in the frame.
    assert landmarks[LEFT_HIP].y > nose.y
    assert landmarks[RIGHT_HIP].y > nose.y


def _stream(*requests: pb.DetectPoseRequest, linger: float = 0.0) -> AsyncIterator[pb.DetectPoseRequest]:
    async def generate() -> AsyncIterator[pb.DetectPoseRequest]:
        for request in requests:
            yield request
        if linger:
            # Keep the stream open: an error must come from the server, and grpc's asyncio client reports a status
            # that arrives while it is writing as INTERNAL (grpc/grpc#36066).
            await asyncio.sleep(linger)

    return generate()


async def _active(stub: pose_service_pb2_grpc.PoseServiceStub) -> int:
    active: int = (await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)).model.active_streams
    return active


async def _until_idle(stub: pose_service_pb2_grpc.PoseServiceStub, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while await _active(stub):
        assert time.monotonic() < deadline, f"streams still active {timeout} s after the calls ended"
        await asyncio.sleep(0.02)


async def test_a_photo_of_a_person_gives_33_landmarks(pose: Service, pki_dir: Path, photo: bytes) -> None:
    async with channel_as("kzone", pose, pki_dir) as channel:
        stub = pose_service_pb2_grpc.PoseServiceStub(channel)
        reply = await stub.DetectImagePose(pb.DetectImagePoseRequest(image=_jpeg(photo, 0)), timeout=30)
    _assert_person(reply.poses)
    assert reply.inference_time.ToTimedelta().total_seconds() > 0


@pytest.mark.parametrize(
    "frame",
    [
        _noise(),
        res.Frame(encoding=res.FRAME_ENCODING_RGB24, data=bytes(160 * 120 * 3), width=160, height=120),
    ],
    ids=["noise", "blank"],
)
async def test_nobody_in_the_image_gives_no_landmarks(pose: Service, pki_dir: Path, frame: res.Frame) -> None:
    async with channel_as("kzone", pose, pki_dir) as channel:
        reply = await pose_service_pb2_grpc.PoseServiceStub(channel).DetectImagePose(
            pb.DetectImagePoseRequest(image=frame), timeout=30
        )
    assert list(reply.poses) == []


async def test_a_stream_gives_landmarks_per_frame_in_order(pose: Service, pki_dir: Path, photo: bytes) -> None:
    # Nobody at first (noise), then the person as JPEG and as raw RGB. (Once it tracks a person, mediapipe's
    # VIDEO mode may keep a pose for a frame or two after they vanish.)
    frames = [
        _noise(0, 10),
        _jpeg(photo, 33, 11),
        _jpeg(photo, 66, 12),
        _rgb(photo, 100, 13),
        _jpeg(photo, 133, 14),
    ]
    config = res.PoseConfig(max_poses=2, min_detection_confidence=0.5)
    requests = [pb.DetectPoseRequest(config=config)] + [pb.DetectPoseRequest(frame=frame) for frame in frames]
    async with channel_as("kzone", pose, pki_dir) as channel:
        stub = pose_service_pb2_grpc.PoseServiceStub(channel)
        replies = [reply async for reply in stub.DetectPose(_stream(*requests), timeout=60)]
        await _until_idle(stub)
    assert [reply.frame_index for reply in replies] == [10, 11, 12, 13, 14]
    assert [reply.timestamp.ToMilliseconds() for reply in replies] == [0, 33, 66, 100, 133]
    for reply in replies:
        if reply.frame_index == 10:
            assert list(reply.poses) == []
        else:
            _assert_person(reply.poses)


async def test_cancelling_a_stream_frees_it_at_once(pose: Service, pki_dir: Path, photo: bytes) -> None:
    async def frames() -> AsyncIterator[pb.DetectPoseRequest]:
        yield pb.DetectPoseRequest(config=res.PoseConfig())
        for index in range(1000):
            yield pb.DetectPoseRequest(frame=_jpeg(photo, index * 33, index))

    async with channel_as("kzone", pose, pki_dir) as channel:
        stub = pose_service_pb2_grpc.PoseServiceStub(channel)
        call = stub.DetectPose(frames(), timeout=60)
        received = 0
        async for _ in call:
            received += 1
            if received == 3:
                break
        assert await _active(stub) == 1
        call.cancel()
        await _until_idle(stub)


async def test_streams_past_the_limit_are_refused(pose: Service, pki_dir: Path) -> None:
    async with channel_as("kzone", pose, pki_dir) as channel:
        stub = pose_service_pb2_grpc.PoseServiceStub(channel)
        config = pb.DetectPoseRequest(config=res.PoseConfig())
        held = [stub.DetectPose(_stream(config, linger=10), timeout=20) for _ in range(3)]
        deadline = time.monotonic() + 5
        while await _active(stub) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.DetectPose(_stream(config, linger=10), timeout=10):
                pass
        code, reason, _ = error_of(refused.value)
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXCEEDED")
        for call in held:
            call.cancel()
        await _until_idle(stub)


def _bad_stream_cases() -> list[tuple[list[pb.DetectPoseRequest], str, str]]:
    config = pb.DetectPoseRequest(config=res.PoseConfig())
    photo = person_photo().read_bytes()
    return [
        ([pb.DetectPoseRequest(frame=_jpeg(photo, 0))], "config", "STREAM_PROTOCOL"),
        ([pb.DetectPoseRequest(config=res.PoseConfig(max_poses=99))], "config.max_poses", "INVALID_REQUEST"),
        (
            [pb.DetectPoseRequest(config=res.PoseConfig(min_detection_confidence=1.5))],
            "config.min_detection_confidence",
            "INVALID_REQUEST",
        ),
        (
            [config, pb.DetectPoseRequest(frame=_jpeg(photo, 40)), pb.DetectPoseRequest(frame=_jpeg(photo, 40))],
            "frame.timestamp",
            "FRAME_TIMESTAMP_INVALID",
        ),
        (
            [config, pb.DetectPoseRequest(frame=_jpeg(photo, 40)), pb.DetectPoseRequest(frame=_jpeg(photo, 10))],
            "frame.timestamp",
            "FRAME_TIMESTAMP_INVALID",
        ),
        (
            [config, pb.DetectPoseRequest(frame=res.Frame(encoding=res.FRAME_ENCODING_JPEG, data=photo))],
            "frame.timestamp",
            "FRAME_TIMESTAMP_INVALID",
        ),
        (
            [config, pb.DetectPoseRequest(frame=_jpeg(b"\xff\xd8\xff\xe0 not really a jpeg", 0))],
            "frame.data",
            "UNSUPPORTED_FRAME_FORMAT",
        ),
        (
            [config, pb.DetectPoseRequest(frame=_jpeg(b"\x00" * (MAX_FRAME_BYTES + 1), 0))],
            "frame.data",
            "PAYLOAD_TOO_LARGE",
        ),
        ([config, config], "frame", "STREAM_PROTOCOL"),
    ]


@pytest.mark.parametrize(
    ("requests", "field", "reason"),
    _bad_stream_cases(),
    ids=[
        "frame-before-config",
        "too-many-poses",
        "confidence-above-1",
        "repeated-timestamp",
        "timestamp-going-back",
        "no-timestamp",
        "undecodable-jpeg",
        "oversized-frame",
        "second-config",
    ],
)
async def test_bad_stream_input_is_invalid_argument(
    pose: Service, pki_dir: Path, requests: list[pb.DetectPoseRequest], field: str, reason: str
) -> None:
    async with channel_as("kzone", pose, pki_dir) as channel:
        stub = pose_service_pb2_grpc.PoseServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in stub.DetectPose(_stream(*requests, linger=5), timeout=20):
                pass
        code, got_reason, violations = error_of(failure.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert got_reason == reason
        assert field in [name for name, _ in violations], violations
        await _until_idle(stub)


@pytest.mark.parametrize(
    ("image", "field", "reason"),
    [
        (
            res.Frame(encoding=res.FRAME_ENCODING_JPEG, data=b"GIF89a not a jpeg"),
            "image.data",
            "UNSUPPORTED_FRAME_FORMAT",
        ),
        (res.Frame(data=b"\xff\xd8"), "image.encoding", "UNSUPPORTED_FRAME_FORMAT"),
        (
            res.Frame(encoding=res.FRAME_ENCODING_RGB24, data=b"\x00" * 30, width=4, height=4),
            "image.data",
            "UNSUPPORTED_FRAME_FORMAT",
        ),
        (res.Frame(encoding=res.FRAME_ENCODING_RGB24, data=b"\x00" * 30), "image.width", "UNSUPPORTED_FRAME_FORMAT"),
        (None, "image", "INVALID_REQUEST"),
    ],
    ids=["not-jpeg", "no-encoding", "rgb-size-mismatch", "rgb-without-size", "no-image"],
)
async def test_bad_images_are_invalid_argument(
    pose: Service, pki_dir: Path, image: res.Frame | None, field: str, reason: str
) -> None:
    request = pb.DetectImagePoseRequest() if image is None else pb.DetectImagePoseRequest(image=image)
    async with channel_as("jobs", pose, pki_dir) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await pose_service_pb2_grpc.PoseServiceStub(channel).DetectImagePose(request, timeout=10)
    code, got_reason, violations = error_of(failure.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert got_reason == reason
    assert field in [name for name, _ in violations], violations


async def test_an_idle_stream_times_out(pose: Service, pki_dir: Path, photo: bytes) -> None:
    requests = (pb.DetectPoseRequest(config=res.PoseConfig()), pb.DetectPoseRequest(frame=_jpeg(photo, 0)))
    async with channel_as("kzone", pose, pki_dir) as channel:
        stub = pose_service_pb2_grpc.PoseServiceStub(channel)
        call = stub.DetectPose(_stream(*requests, linger=10), timeout=20)
        first = await call.read()
        assert isinstance(first, pb.DetectPoseResponse)
        assert len(first.poses) == 1
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call.read()
        code, reason, _ = error_of(failure.value)
        assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "STREAM_IDLE")
        await _until_idle(stub)


async def test_model_info(pose: Service, pki_dir: Path) -> None:
    async with channel_as("kzone", pose, pki_dir) as channel:
        info = (await pose_service_pb2_grpc.PoseServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())).model
    assert info.name == "pose_landmarker_full"
    assert info.ready
    assert info.device == "cpu"
    assert (info.max_streams, info.active_streams, info.max_frame_bytes) == (3, 0, MAX_FRAME_BYTES)


async def test_health_is_not_serving_until_the_model_is_loaded(pki_dir: Path, photo: bytes) -> None:
    gate = threading.Event()

    def slow_load(settings: PoseSettings) -> PoseModel:
        gate.wait(30)
        return PoseModel(settings)

    config = make_config(CATALOG, "pose", pki_dir, health_interval_seconds=0.1)
    try:
        async with (
            running(config, lambda deps: pose_server.build(deps, _settings(), slow_load)) as service,
            channel_as("ops", service, pki_dir) as ops,
            channel_as("kzone", service, pki_dir) as kzone,
        ):
            assert not await serving(ops, "megacity.pose.v1.PoseService")
            stub = pose_service_pb2_grpc.PoseServiceStub(kzone)
            request = pb.DetectImagePoseRequest(image=_jpeg(photo, 0))
            with pytest.raises(grpc.aio.AioRpcError) as early:
                await stub.DetectImagePose(request, timeout=5)
            code, reason, _ = error_of(early.value)
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY")
            gate.set()
            await until_serving(ops, "megacity.pose.v1.PoseService")
            _assert_person((await stub.DetectImagePose(request, timeout=30)).poses)
    finally:
        gate.set()


async def test_a_missing_model_keeps_health_not_serving(pki_dir: Path, tmp_path: Path) -> None:
    config = make_config(CATALOG, "pose", pki_dir)
    settings = _settings(model_path=tmp_path / "missing.task")
    async with (
        running(config, lambda deps: pose_server.build(deps, settings)) as service,
        channel_as("ops", service, pki_dir) as ops,
    ):
        await asyncio.sleep(0.3)
        assert not await serving(ops)
