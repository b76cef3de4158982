"""The pose service: pose landmark inference server (mediapipe PoseLandmarker), internal only (kzone and jobs call it).

Thin: validates requests here, decodes frames and runs the model in worker threads (services/inference/pose/
engine.py), never on the event loop.

- The model loads in a worker thread when the service starts; health is NOT_SERVING until it is loaded, and
  calls before then get UNAVAILABLE (MODEL_NOT_READY).
- Streams are bounded (MEGACITY_POSE_MAX_STREAMS): one more gets RESOURCE_EXHAUSTED (CAPACITY_EXCEEDED). A stream
  has one frame in the model and at most one more read ahead; the server reads the next frame only then, so gRPC
  flow control makes a client that sends faster than the model wait.
- Frames must carry increasing timestamps (at least 1 ms apart: mediapipe's VIDEO mode counts milliseconds), else
  INVALID_ARGUMENT (FRAME_TIMESTAMP_INVALID). A stream silent for MEGACITY_POSE_IDLE_TIMEOUT_SECONDS ends with
  DEADLINE_EXCEEDED (STREAM_IDLE). A cancelled call or a passed deadline releases the stream at once; its
  landmarker is closed as soon as a frame already in the model is done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from megacity.pose.v1 import pose_service_pb2 as pb
from megacity.pose.v1 import pose_service_pb2_grpc
from megacity.pose.v1 import resources_pb2 as res
from services.inference.pose.engine import PoseModel, PoseOptions, PoseSettings, VideoSession
from services.inference.streams import (
    ModelHost,
    RequestReader,
    StreamSlots,
    duration,
    first_config,
    frame_timestamp_ms,
    lifetime,
    require_payload,
)
from services.runtime.context import StreamingContext, UnaryContext
from services.runtime.errors import ErrorReason, InvalidArgument, Violations
from services.runtime.server import Dependencies, ServicerBinding

_log = structlog.get_logger("megacity.pose")

MAX_POSES = 10
READ_AHEAD_FRAMES = 1


def pose_options(config: res.PoseConfig, prefix: str) -> PoseOptions:
    problems = Violations()
    problems.check(0 <= config.max_poses <= MAX_POSES, f"{prefix}.max_poses", f"between 0 (1) and {MAX_POSES}")
    for name in ("min_detection_confidence", "min_presence_confidence", "min_tracking_confidence"):
        value = getattr(config, name)
        problems.check(0.0 <= value <= 1.0, f"{prefix}.{name}", "between 0 (the default, 0.5) and 1")
    problems.raise_if_any("the pose config is invalid")
    return PoseOptions(
        max_poses=config.max_poses or 1,
        min_detection_confidence=config.min_detection_confidence or 0.5,
        min_presence_confidence=config.min_presence_confidence or 0.5,
        min_tracking_confidence=config.min_tracking_confidence or 0.5,
    )


def check_frame(frame: res.Frame, field: str, max_bytes: int) -> None:
    """What can be checked without decoding: encoding, size, dimensions."""
    if len(frame.data) > max_bytes:
        raise InvalidArgument(
            f"{field} of {len(frame.data)} bytes exceeds {max_bytes}",
            [(f"{field}.data", f"at most {max_bytes} bytes")],
            reason=ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
        )
    problems = Violations()
    if frame.encoding not in (res.FRAME_ENCODING_JPEG, res.FRAME_ENCODING_RGB24):
        problems.add(f"{field}.encoding", "must be FRAME_ENCODING_JPEG or FRAME_ENCODING_RGB24")
    if not frame.data:
        problems.add(f"{field}.data", "required")
    if frame.encoding == res.FRAME_ENCODING_RGB24:
        problems.check(frame.width > 0, f"{field}.width", "required (positive) for RGB24")
        problems.check(frame.height > 0, f"{field}.height", "required (positive) for RGB24")
    if problems:
        raise InvalidArgument(
            f"{field} is invalid", problems.items(), reason=ErrorReason.ERROR_REASON_UNSUPPORTED_FRAME_FORMAT
        )


class PoseServicer(pose_service_pb2_grpc.PoseServiceServicer):
    def __init__(self, settings: PoseSettings, host: ModelHost[PoseModel], executor: ThreadPoolExecutor) -> None:
        self._settings = settings
        self._host = host
        self._executor = executor
        self.slots = StreamSlots(settings.max_streams, "streams")

    def _close_later(self, session: VideoSession) -> None:
        """Close a stream's landmarker in a worker, after any frame it is running (never on the loop)."""
        try:
            self._executor.submit(session.close)
        except RuntimeError:  # the executor is shut down: the server is stopping
            session.close()

    async def DetectPose(
        self,
        request_iterator: AsyncIterator[pb.DetectPoseRequest],
        context: StreamingContext[AsyncIterator[pb.DetectPoseRequest], pb.DetectPoseResponse],
    ) -> AsyncIterator[pb.DetectPoseResponse]:
        model = self._host.get()
        settings = self._settings
        loop = asyncio.get_running_loop()
        with contextlib.ExitStack() as held:
            reader = RequestReader(
                request_iterator,
                size=lambda request: len(request.frame.data),
                max_items=READ_AHEAD_FRAMES,
                max_bytes=settings.max_frame_bytes,
                idle_timeout=settings.idle_timeout,
            )
            async with reader:
                first = await first_config(reader, "required in the first message, before any frame")
                session = model.video(pose_options(first.config, "config"))
                # The slot is taken once the config is in: a refusal reaches a client that waits after its config
                # (grpc's asyncio client reports a status that arrives while it writes as INTERNAL, grpc/grpc#36066).
                held.enter_context(self.slots.hold())
                try:
                    index = 0
                    previous_ms: int | None = None
                    while (request := await reader.next()) is not None:
                        index += 1
                        require_payload(request, "frame", index)
                        frame = request.frame
                        check_frame(frame, "frame", settings.max_frame_bytes)
                        stamp = frame.timestamp if frame.HasField("timestamp") else None
                        timestamp_ms = frame_timestamp_ms(stamp, previous_ms, index)
                        previous_ms = timestamp_ms
                        detection = await loop.run_in_executor(self._executor, session.detect, frame, timestamp_ms)
                        yield pb.DetectPoseResponse(
                            frame_index=frame.frame_index,
                            timestamp=frame.timestamp,
                            poses=detection.poses,
                            inference_time=duration(detection.seconds),
                        )
                finally:
                    self._close_later(session)

    async def DetectImagePose(
        self,
        request: pb.DetectImagePoseRequest,
        context: UnaryContext[pb.DetectImagePoseRequest, pb.DetectImagePoseResponse],
    ) -> pb.DetectImagePoseResponse:
        if not request.HasField("image"):
            raise InvalidArgument("image is required", [("image", "required")])
        options = pose_options(request.config, "config")
        check_frame(request.image, "image", self._settings.max_frame_bytes)
        model = self._host.get()
        with self.slots.hold():
            detection = await asyncio.get_running_loop().run_in_executor(
                self._executor, model.detect_image, request.image, options
            )
        return pb.DetectImagePoseResponse(poses=detection.poses, inference_time=duration(detection.seconds))

    async def GetModelInfo(
        self,
        request: pb.GetModelInfoRequest,
        context: UnaryContext[pb.GetModelInfoRequest, pb.GetModelInfoResponse],
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(
            model=res.ModelInfo(
                name=self._settings.model_name,
                ready=self._host.ready,
                device=self._settings.delegate,
                max_streams=self.slots.limit,
                active_streams=self.slots.active,
                max_frame_bytes=self._settings.max_frame_bytes,
            )
        )

    def close(self) -> None:
        """Stop the workers (frames in the model finish; their landmarkers close after them) and close the model."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._host.close()


def build(
    deps: Dependencies,
    settings: PoseSettings | None = None,
    load: Callable[[PoseSettings], PoseModel] = PoseModel,
) -> list[ServicerBinding]:
    """The servicer, its model loading (begun now, off the loop), health probe and shutdown."""
    settings = settings or PoseSettings.from_environment()
    executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="pose")
    host: ModelHost[PoseModel] = ModelHost(settings.model_name, lambda: load(settings), executor, PoseModel.close)
    servicer = PoseServicer(settings, host, executor)
    host.start()
    deps.probes["model"] = host.probe

    async def close() -> None:
        servicer.close()

    # A little less than the runtime's grace, which bounds how long it waits for this job.
    deps.background.append(lifetime(servicer.slots, max(0.0, deps.config.shutdown_grace_seconds - 0.5), close))
    return [ServicerBinding(pose_service_pb2_grpc.add_PoseServiceServicer_to_server, servicer)]


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    return build(deps)
