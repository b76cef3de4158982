"""Dance analysis of the kzone service: the live AnalyzeDance stream and the DetectDancePose upload, on the pose
inference server (megacity.pose.v1, over the mesh as kzone) and the pure scoring of services/kzone/choreography.py.

Keypoints JSON (the one reader and writer: `encode_keypoints` / `decode_keypoints`; the extraction worker writes a
choreography's with it, the analyses a learner's). UTF-8 JSON, one object per detected pose, in time order:

    {"format": "megacity.kzone.keypoints", "version": 1,
     "aspect_ratio": 1.7778,          # width / height of the frames the image coordinates refer to
     "frame_rate": 15.0,              # frames per second (1 / the median frame period)
     "landmark_count": 33,            # MediaPipe's body model (megacity.pose.v1 lists the order)
     "frames": [{"t": 0.0667,         # seconds from the start of the media
                 "landmarks": [[x, y, z, visibility], ... 33 of them]}, ...]}

x and y are MediaPipe's normalised image coordinates (0 to 1 of width and height), z its relative depth; values are
rounded to 5 decimals. Frames in which nobody was detected are left out (a PoseSequence has none), so `t` is not a
fixed grid. A reader refuses another format, version or landmark count (ValueError).

Live stream (AnalyzeDance), one session per call:
1. the first message is the config (else INVALID_ARGUMENT, STREAM_PROTOCOL); the runtime has authenticated the
   caller already (the contract's access option), as for every RPC people call;
2. a session slot is taken (MEGACITY_KZONE_MAX_DANCE_STREAMS; one more is RESOURCE_EXHAUSTED, CAPACITY_EXCEEDED);
3. the reference must be a READY choreography the caller may read (INVALID_ARGUMENT, UNKNOWN_REFERENCE or
   REFERENCE_NOT_READY, on config.reference_id); its keypoints are read from the media store and decoded once
   (a small cache keyed by the keypoints' object key, which changes with every upload);
4. a DetectPose stream to the pose server is opened; frames are validated here (timestamps present and increasing
   by at least 1 ms: FRAME_TIMESTAMP_INVALID; at most 8 MiB: PAYLOAD_TOO_LARGE; encoding, RGB24 size, a readable
   JPEG header: UNSUPPORTED_FRAME_FORMAT) and forwarded; the pose server's replies build the learner's pose
   sequence (and PoseFrame events when return_landmarks);
5. each segment of the reference (a bar on its beat grid, or a 4 s window without tempo) is scored once the learner
   is LIVE_SEGMENT_LAG seconds past its end, on a trailing window (the segment +- WINDOW_MARGIN seconds), in a
   worker thread, one segment at a time per session: a DanceSegmentScore event, then the running DanceScores;
6. at half-close the whole performance is scored (score_dance against the stretch of the reference the learner
   covered, in a thread), the learner's keypoints are stored in the media store and the report with
   KZoneStore.add_result (source LIVE); the last event is the stored AnalysisResult.
Nothing is read from the client for MEGACITY_KZONE_DANCE_IDLE_TIMEOUT_SECONDS: DEADLINE_EXCEEDED (STREAM_IDLE).
Backpressure: at most READ_AHEAD_FRAMES frames are read ahead of the pose server and at most MAX_PENDING_EVENTS
events wait for the client, so a slow model or a slow reader pushes back through gRPC flow control. A cancelled
call (or a passed deadline) cancels the session's tasks and its pose stream at once and frees its slot.

Pose server errors: UNAVAILABLE (MODEL_NOT_READY while its model loads), RESOURCE_EXHAUSTED (CAPACITY_EXCEEDED),
INVALID_ARGUMENT as the pose server named it; anything else UNAVAILABLE (DEPENDENCY_UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import orjson
import structlog
from google.protobuf import duration_pb2
from PIL import Image, UnidentifiedImageError

from megacity.kzone.v1 import kzone_service_pb2 as pb
from megacity.kzone.v1 import resources_pb2 as res
from megacity.pose.v1 import pose_service_pb2 as pose_pb
from megacity.pose.v1 import pose_service_pb2_grpc
from megacity.pose.v1 import resources_pb2 as pose_res
from services.inference.streams import RequestReader, StreamSlots, first_config, frame_timestamp_ms, require_payload
from services.kzone import contents
from services.kzone.choreography import (
    LANDMARK_COUNT,
    BeatGrid,
    DanceAnalysis,
    JointDeviation,
    MirrorMode,
    PoseSequence,
    SegmentScore,
    score_dance,
)
from services.kzone.decoding import DecodedFrame, UndecodableMedia, decode_video_frames
from services.kzone.scores import score_from_distance
from services.kzone.store import KZoneStore, Owner
from services.runtime.callcontext import require_principal
from services.runtime.channels import ChannelFactory
from services.runtime.config import env_int, env_number
from services.runtime.database import TenantScope
from services.runtime.errors import (
    DeadlineExceeded,
    ErrorReason,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    Violations,
    error_info,
    field_violations,
    status_from_error,
)
from services.runtime.media import MediaStore
from services.runtime.tokens import AccessClaims

_log = structlog.get_logger("megacity.kzone.dance")

KEYPOINTS_FORMAT = "megacity.kzone.keypoints"
KEYPOINTS_VERSION = 1
_MIB = 1024 * 1024
MAX_FRAME_BYTES = 8 * _MIB  # VideoFrame.data, as the pose server takes it
MAX_PHOTO_BYTES = 8 * _MIB
MAX_VIDEO_BYTES = contents.MAX_MEDIA_BYTES["choreography"]
PHOTO_TYPES = frozenset({"image/jpeg", "image/png"})
# Uploaded video is thinned to this rate and shrunk to this size before the pose server sees it (its model looks at
# 256 px; larger frames only cost bandwidth).
UPLOAD_FRAMES_PER_SECOND = 15.0
UPLOAD_MAX_SIDE = 960
READ_AHEAD_FRAMES = 2
MAX_PENDING_EVENTS = 64
# A segment is scored live once the learner is this far past its end (a late learner's moves have arrived), on the
# segment widened by WINDOW_MARGIN on both sides.
LIVE_SEGMENT_LAG = 0.5
WINDOW_MARGIN = 1.0
# Without a tempo, segments are windows of this length (choreography.py's fallback).
SEGMENT_SECONDS_WITHOUT_GRID = 4.0
# The final score compares the reference from the start offset to the learner's last frame plus this.
REFERENCE_TAIL = 0.5
# Running scores: the weights and half-score offset of choreography.py's overall score.
_ACCURACY_WEIGHT = 0.7
_HALF_SCORE_OFFSET = 0.25
_MIN_SCORED_FRAMES = 3
_REFERENCE_CACHE = 8

MIRROR_MODES = {
    res.MIRROR_MODE_UNSPECIFIED: MirrorMode.AUTO,
    res.MIRROR_MODE_AUTO: MirrorMode.AUTO,
    res.MIRROR_MODE_MIRRORED: MirrorMode.MIRRORED,
    res.MIRROR_MODE_NOT_MIRRORED: MirrorMode.NOT_MIRRORED,
}


# --- keypoints JSON --------------------------------------------------------------------------------------------


def keypoints_frame_rate(sequence: PoseSequence) -> float:
    """Frames per second of a sequence (ReferenceFeatures.keypoint_frame_rate)."""
    return 1.0 / sequence.frame_period


def encode_keypoints(sequence: PoseSequence) -> bytes:
    """The sequence as keypoints JSON (see the module's docstring)."""
    points = np.concatenate([sequence.landmarks, sequence.visibility[:, :, None]], axis=2).round(5)
    frames = [
        {"t": round(float(timestamp), 6), "landmarks": frame.tolist()}
        for timestamp, frame in zip(sequence.timestamps, points, strict=True)
    ]
    return orjson.dumps(
        {
            "format": KEYPOINTS_FORMAT,
            "version": KEYPOINTS_VERSION,
            "aspect_ratio": round(sequence.aspect_ratio, 6),
            "frame_rate": round(keypoints_frame_rate(sequence), 6),
            "landmark_count": LANDMARK_COUNT,
            "frames": frames,
        }
    )


def decode_keypoints(data: bytes) -> PoseSequence:
    """A PoseSequence from keypoints JSON; ValueError when it is not that format or holds no pose."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"keypoints are not JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != KEYPOINTS_FORMAT:
        raise ValueError(f"not {KEYPOINTS_FORMAT} JSON")
    if document.get("version") != KEYPOINTS_VERSION or document.get("landmark_count") != LANDMARK_COUNT:
        raise ValueError(f"unsupported keypoints version {document.get('version')!r} or landmark count")
    frames = document.get("frames")
    if not isinstance(frames, list) or not frames:
        raise ValueError("the keypoints hold no frames")
    try:
        timestamps = np.array([frame["t"] for frame in frames], dtype=np.float64)
        points = np.array([frame["landmarks"] for frame in frames], dtype=np.float64)
        aspect_ratio = float(document.get("aspect_ratio", 1.0))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"malformed keypoints frames: {error}") from None
    if points.shape != (len(frames), LANDMARK_COUNT, 4):
        raise ValueError(f"each frame needs {LANDMARK_COUNT} landmarks of [x, y, z, visibility]")
    return PoseSequence(timestamps, points[:, :, :3], points[:, :, 3], aspect_ratio)


# --- conversions -----------------------------------------------------------------------------------------------


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def _deviation_message(deviation: JointDeviation) -> res.JointDeviation:
    return res.JointDeviation(
        body_part=int(deviation.body_part),  # type: ignore[arg-type]  # the enums share their values
        kind=int(deviation.kind),  # type: ignore[arg-type]
        severity=deviation.severity,
        timing_offset=seconds(deviation.timing_offset),
        angle_difference_degrees=deviation.angle_difference_degrees,
        start_bar=deviation.start_bar,
        end_bar=deviation.end_bar,
        message=deviation.message,
    )


def segment_message(segment: SegmentScore) -> res.DanceSegmentScore:
    return res.DanceSegmentScore(
        index=segment.index,
        start_bar=segment.start_bar,
        end_bar=segment.end_bar,
        start_offset=seconds(segment.start_offset),
        end_offset=seconds(segment.end_offset),
        score=segment.score,
        timing_offset=seconds(segment.timing_offset),
        deviations=[_deviation_message(deviation) for deviation in segment.deviations],
    )


def dance_report(
    analysis: DanceAnalysis | None, *, duration: float, frames: int, frames_with_pose: int
) -> res.DanceReport:
    """The stored report; without an analysis (nobody danced) only the counts."""
    report = res.DanceReport(duration=seconds(duration), frames_analyzed=frames, frames_with_pose=frames_with_pose)
    report.scores.frames_analyzed = frames
    if analysis is None:
        report.feedback.append("no dancer was seen: stand where the camera sees your whole body")
        return report
    report.mirrored = analysis.mirrored
    report.scores.overall = analysis.overall
    report.scores.accuracy = analysis.accuracy
    report.scores.timing = analysis.timing
    report.segments.extend(segment_message(segment) for segment in analysis.segments)
    report.top_deviations.extend(_deviation_message(deviation) for deviation in analysis.top_deviations)
    report.mean_timing_offset.CopyFrom(seconds(analysis.mean_timing_offset))
    report.feedback.extend(analysis.feedback)
    return report


def pose_frame(timestamp: duration_pb2.Duration, poses: Sequence[pose_res.Pose]) -> res.PoseFrame:
    frame = res.PoseFrame(timestamp=timestamp, detected=bool(poses))
    if poses:
        frame.landmarks.extend(
            res.Landmark(x=point.x, y=point.y, z=point.z, visibility=point.visibility, presence=point.presence)
            for point in poses[0].landmarks
        )
    return frame


class LearnerPoses:
    """The learner's detected poses so far, in order (frames without a person are counted, not kept)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.points: list[np.ndarray[Any, np.dtype[np.float32]]] = []  # 33 x (x, y, z, visibility) per frame
        self.frames = 0
        self.last_time = 0.0
        self.aspect_ratio = 0.0

    def add(self, timestamp: float, poses: Sequence[pose_res.Pose], aspect_ratio: float) -> None:
        self.frames += 1
        self.last_time = timestamp
        if not self.aspect_ratio and aspect_ratio > 0:
            self.aspect_ratio = aspect_ratio
        if poses and len(poses[0].landmarks) == LANDMARK_COUNT:
            points = np.array([(p.x, p.y, p.z, p.visibility) for p in poses[0].landmarks], dtype=np.float32)
            self.points.append(points)
            self.times.append(timestamp)

    @property
    def with_pose(self) -> int:
        return len(self.times)

    def window(self, start: float = -math.inf, end: float = math.inf) -> PoseSequence | None:
        """The poses between `start` and `end` seconds (None when fewer than a few)."""
        lo = int(np.searchsorted(self.times, start, side="left"))
        hi = int(np.searchsorted(self.times, end, side="right"))
        if hi - lo < _MIN_SCORED_FRAMES:
            return None
        points = np.stack(self.points[lo:hi]).astype(np.float64)
        return PoseSequence(np.array(self.times[lo:hi]), points[:, :, :3], points[:, :, 3], self.aspect_ratio or 1.0)


def reference_window(reference: PoseSequence, start: float, end: float) -> PoseSequence | None:
    keep = (reference.timestamps >= start) & (reference.timestamps <= end)
    if int(keep.sum()) < _MIN_SCORED_FRAMES:
        return None
    return PoseSequence(
        reference.timestamps[keep], reference.landmarks[keep], reference.visibility[keep], reference.aspect_ratio
    )


# --- the reference ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    content_id: str
    poses: PoseSequence
    grid: BeatGrid | None

    @property
    def segment_duration(self) -> float:
        return self.grid.segment_duration if self.grid else SEGMENT_SECONDS_WITHOUT_GRID

    @property
    def segment_origin(self) -> float:
        return self.grid.first_downbeat if self.grid else 0.0

    def segment_of(self, reference_time: float) -> int:
        return max(0, math.floor((reference_time - self.segment_origin) / self.segment_duration))

    def segment_span(self, index: int) -> tuple[float, float]:
        start = self.segment_origin + index * self.segment_duration
        return (-math.inf if index == 0 else start), start + self.segment_duration


def beat_grid(content: res.ReferenceContent) -> BeatGrid | None:
    if content.tempo_bpm <= 0:
        return None
    downbeat = (
        contents.duration_seconds(content.first_downbeat_offset) if content.HasField("first_downbeat_offset") else 0.0
    )
    return BeatGrid(content.tempo_bpm, content.beats_per_bar or 4, downbeat, 1)


def _reading_scope(person: AccessClaims) -> TenantScope:
    return TenantScope.platform() if person.role == "super_admin" else TenantScope.zone(person.zone_id)


def _unknown_reference(field_name: str, reference_id: str) -> InvalidArgument:
    return InvalidArgument(
        "no such choreography",
        [(field_name, "a choreography you may read")],
        reason=ErrorReason.ERROR_REASON_UNKNOWN_REFERENCE,
        metadata={"reference_id": reference_id[:64]},
    )


# --- errors of the pose server ---------------------------------------------------------------------------------


def pose_error(error: grpc.aio.AioRpcError, rename: tuple[str, str] | None = None) -> ServiceError:
    """What the caller hears of a failed pose call (`rename`: a field prefix of the pose server's and ours)."""
    status = status_from_error(error)
    info = error_info(status)
    reason_text = info.reason if info else ""
    code = error.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = field_violations(status) or [("frame", error.details() or "invalid")]
        if rename is not None:
            violations = [(name.replace(rename[0], rename[1], 1), text) for name, text in violations]
        reason = ErrorReason.Value(f"ERROR_REASON_{reason_text}") if reason_text else None
        return InvalidArgument(error.details() or "the frame is invalid", violations, reason=reason)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(
            "the pose server is at capacity; retry later",
            retry_after_seconds=1.0,
            reason=ErrorReason.ERROR_REASON_CAPACITY_EXCEEDED,
            quota_violations=[("pose streams", "the pose server's concurrent streams are all busy")],
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("the pose analysis ran out of time")
    model_loading = code == grpc.StatusCode.UNAVAILABLE and reason_text == "MODEL_NOT_READY"
    return Unavailable(
        "the pose model is still loading; retry shortly" if model_loading else "the pose server is unavailable",
        retry_after_seconds=2.0,
        reason=ErrorReason.ERROR_REASON_MODEL_NOT_READY
        if model_loading
        else ErrorReason.ERROR_REASON_DEPENDENCY_UNAVAILABLE,
        metadata={"pose_status": code.name},
    )


# --- frames ----------------------------------------------------------------------------------------------------


def _frame_format_error(description: str, where: str) -> InvalidArgument:
    return InvalidArgument(
        f"the frame cannot be used: {description}",
        [(where, description)],
        reason=ErrorReason.ERROR_REASON_UNSUPPORTED_FRAME_FORMAT,
    )


def check_video_frame(frame: res.VideoFrame, previous_ms: int | None, index: int) -> tuple[int, float]:
    """A live frame's timestamp in ms and its aspect ratio; INVALID_ARGUMENT when it is not usable."""
    if len(frame.data) > MAX_FRAME_BYTES:
        raise InvalidArgument(
            f"frame {index} has {len(frame.data)} bytes; at most {MAX_FRAME_BYTES}",
            [("frame.data", f"at most {MAX_FRAME_BYTES} bytes")],
            reason=ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
        )
    timestamp_ms = frame_timestamp_ms(frame.timestamp if frame.HasField("timestamp") else None, previous_ms, index)
    if not frame.data:
        raise _frame_format_error("required", "frame.data")
    if frame.encoding == res.FRAME_ENCODING_RGB24:
        if frame.width <= 0 or frame.height <= 0:
            raise _frame_format_error("width and height are required for RGB24", "frame.width")
        if len(frame.data) != frame.width * frame.height * 3:
            raise _frame_format_error(
                f"RGB24 {frame.width}x{frame.height} needs {frame.width * frame.height * 3} bytes", "frame.data"
            )
        return timestamp_ms, frame.width / frame.height
    if frame.encoding != res.FRAME_ENCODING_JPEG:
        raise _frame_format_error("FRAME_ENCODING_JPEG or FRAME_ENCODING_RGB24", "frame.encoding")
    try:  # the header only: decoding is the pose server's
        with Image.open(io.BytesIO(frame.data)) as image:
            if image.format != "JPEG":
                raise _frame_format_error(f"not a JPEG image ({image.format})", "frame.data")
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise _frame_format_error("not a decodable JPEG image", "frame.data") from None
    return timestamp_ms, width / height


def _pose_frame_of(frame: res.VideoFrame, index: int) -> pose_res.Frame:
    return pose_res.Frame(
        timestamp=frame.timestamp,
        encoding=frame.encoding,  # type: ignore[arg-type]  # the enums share their values
        data=frame.data,
        width=frame.width,
        height=frame.height,
        frame_index=index,
    )


def _rgb_frame(rgb: np.ndarray[Any, np.dtype[np.uint8]], timestamp: float, index: int) -> pose_res.Frame:
    height, width, _ = rgb.shape
    return pose_res.Frame(
        timestamp=seconds(timestamp),
        encoding=pose_res.FRAME_ENCODING_RGB24,
        data=rgb.tobytes(),
        width=width,
        height=height,
        frame_index=index,
    )


def _shrunk(frame: DecodedFrame) -> DecodedFrame:
    height, width, _ = frame.rgb.shape
    scale = UPLOAD_MAX_SIDE / max(height, width)
    if scale >= 1:
        return frame
    image = Image.fromarray(frame.rgb).resize((max(1, round(width * scale)), max(1, round(height * scale))))
    return DecodedFrame(frame.timestamp, np.asarray(image, dtype=np.uint8))


def _next_frame(frames: Iterator[DecodedFrame]) -> DecodedFrame | None:
    """The next decoded, shrunk frame (runs in a worker thread)."""
    found = next(frames, None)
    return None if found is None else _shrunk(found)


def _photo_frame(data: bytes, content_type: str) -> pose_res.Frame:
    """A JPEG goes as it is; a PNG is decoded to RGB24 (runs in a worker thread)."""
    if content_type == "image/jpeg":
        return pose_res.Frame(encoding=pose_res.FRAME_ENCODING_JPEG, data=data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise _frame_format_error(f"not a PNG image ({image.format})", "file.data")
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise _frame_format_error("not a decodable PNG image", "file.data") from None
    return _rgb_frame(rgb, 0.0, 0)


# --- the service -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DanceSettings:
    max_streams: int
    idle_timeout: float
    max_session_seconds: float

    @classmethod
    def from_environment(cls) -> DanceSettings:
        return cls(
            max_streams=env_int("MEGACITY_KZONE_MAX_DANCE_STREAMS", 16, minimum=1),
            idle_timeout=env_number("MEGACITY_KZONE_DANCE_IDLE_TIMEOUT_SECONDS", 30.0, minimum=0.1),
            max_session_seconds=env_number("MEGACITY_KZONE_MAX_DANCE_SECONDS", 1800.0, minimum=1.0),
        )


@dataclass
class Timings:
    """Where a session's time went (logged when it ends): seconds of scoring and counts."""

    segment_seconds: list[float] = field(default_factory=list)
    final_seconds: float = 0.0


class DanceService:
    """AnalyzeDance and DetectDancePose (services/kzone/server.py delegates to it)."""

    def __init__(
        self,
        store: KZoneStore,
        media: MediaStore,
        channels: ChannelFactory,
        settings: DanceSettings | None = None,
    ) -> None:
        self._store = store
        self._media = media
        self._channels = channels
        self.settings = settings or DanceSettings.from_environment()
        self.slots = StreamSlots(self.settings.max_streams, "dance streams")
        self._references: OrderedDict[str, PoseSequence] = OrderedDict()

    def _pose(self) -> pose_service_pb2_grpc.PoseServiceStub:
        return pose_service_pb2_grpc.PoseServiceStub(self._channels.channel("pose"))

    async def reference(self, person: AccessClaims, reference_id: str, field_name: str) -> Reference:
        """A READY choreography the person may read, with its keypoints and beat grid."""
        if not reference_id:
            raise InvalidArgument("the choreography is required", [(field_name, "required")])
        try:
            stored = await self._store.content(_reading_scope(person), reference_id)
        except ServiceError:
            raise _unknown_reference(field_name, reference_id) from None
        if not contents.may_read(person, stored.facts) or stored.kind != "choreography":
            raise _unknown_reference(field_name, reference_id)
        features = None
        if stored.facts.status == contents.READY:
            scope = TenantScope.org(stored.facts.zone_id, stored.facts.org_id)
            features = await self._store.features(scope, reference_id)
        if features is None or not features.keypoints_uri:
            raise InvalidArgument(
                "the choreography is not ready: its keypoints are still being extracted",
                [(field_name, "a READY choreography")],
                reason=ErrorReason.ERROR_REASON_REFERENCE_NOT_READY,
                metadata={"status": res.ReferenceStatus.Name(stored.message.status)},
            )
        key = features.keypoints_uri
        poses = self._references.get(key)
        if poses is None:
            poses = await asyncio.to_thread(decode_keypoints, await self._media.get(key))
            self._references[key] = poses
            while len(self._references) > _REFERENCE_CACHE:
                self._references.popitem(last=False)
        else:
            self._references.move_to_end(key)
        return Reference(reference_id, poses, beat_grid(stored.message))

    async def _store_result(
        self,
        person: AccessClaims,
        report: res.DanceReport,
        learner: PoseSequence | None,
        *,
        source: str,
        reference_id: str,
        media: tuple[bytes, str] | None = None,
    ) -> res.AnalysisResult:
        """Keeps the learner's keypoints (and the uploaded media) and stores the report; the objects are deleted
        again when the row cannot be written."""
        prefix = f"kzone/{person.zone_id}/{person.org_id}/results/{uuid.uuid4().hex}"
        written: list[str] = []
        try:
            if learner is not None:
                key = f"{prefix}/keypoints.json"
                await self._media.put(key, await asyncio.to_thread(encode_keypoints, learner))
                written.append(key)
                report.keypoints_uri = key
            input_key = ""
            if media is not None:
                input_key = f"{prefix}/input.{media[1]}"
                await self._media.put(input_key, media[0])
                written.append(input_key)
            owner = Owner(zone_id=person.zone_id, org_id=person.org_id, user_id=person.user_id)
            return await self._store.add_result(
                owner, report, source=source, reference_id=reference_id, input_media_uri=input_key
            )
        except BaseException:
            for key in written:
                with contextlib.suppress(OSError, ValueError):
                    await self._media.delete(key)
            raise

    # --- AnalyzeDance ------------------------------------------------------------------------------------------

    async def analyze(
        self,
        requests: AsyncIterator[pb.AnalyzeDanceRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.AnalyzeDanceResponse]:
        reader = RequestReader(
            requests,
            size=lambda request: len(request.frame.data),
            max_items=READ_AHEAD_FRAMES,
            max_bytes=MAX_FRAME_BYTES,
            idle_timeout=self.settings.idle_timeout,
        )
        async with reader:
            first = await first_config(reader, "the first message, and only the first")
            person = require_principal()
            with self.slots.hold():
                config = first.config
                problems = []
                if config.mirror not in MIRROR_MODES:
                    problems.append(("config.mirror", "a MirrorMode"))
                start = 0.0
                if config.HasField("reference_start_offset"):
                    start = contents.duration_seconds(config.reference_start_offset)
                    if not 0 <= start <= contents.MAX_DOWNBEAT_SECONDS:
                        problems.append(("config.reference_start_offset", "0 to the choreography's length"))
                if problems:
                    raise InvalidArgument("the config is invalid", problems)
                reference = await self.reference(person, config.reference_id, "config.reference_id")
                session = _LiveSession(self, person, reference, config, start, reader)
                async with contextlib.aclosing(session.run()) as events:
                    async for event in events:
                        yield event

    # --- DetectDancePose ---------------------------------------------------------------------------------------

    async def detect(self, request: pb.DetectDancePoseRequest) -> pb.DetectDancePoseResponse:
        person = require_principal()
        problems = Violations()
        problems.check(request.HasField("file") and bool(request.file.data), "file", "required: the video or photo")
        problems.check(request.mirror in MIRROR_MODES, "mirror", "a MirrorMode")
        problems.raise_if_any()
        content_type = contents.media_type(request.file.content_type)
        size = len(request.file.data)
        if content_type in PHOTO_TYPES:
            _check_size(size, MAX_PHOTO_BYTES, "photo")
            if request.reference_id:
                raise InvalidArgument(
                    "a photo cannot be scored against a choreography", [("reference_id", "only with a video")]
                )
            return await self._photo(request.file.data, content_type)
        if content_type not in contents.VIDEO_TYPES:
            raise InvalidArgument(
                f"pose detection takes a video or a photo, not {content_type or 'an unnamed type'}",
                [("file.content_type", f"one of {', '.join([*contents.VIDEO_TYPES, *sorted(PHOTO_TYPES)])}")],
                reason=ErrorReason.ERROR_REASON_UNSUPPORTED_MEDIA_TYPE,
                metadata={"content_type": request.file.content_type[:100]},
            )
        _check_size(size, MAX_VIDEO_BYTES, "video")
        reference = None
        if request.reference_id:
            reference = await self.reference(person, request.reference_id, "reference_id")
        learner, frames, counted, duration = await self._video_poses(request.file.data, request.include_landmarks)
        reply = pb.DetectDancePoseResponse(
            frames=frames, frame_count=counted, frames_with_pose=learner.with_pose, duration=seconds(duration)
        )
        if reference is None:
            return reply
        poses = await asyncio.to_thread(learner.window)
        analysis = None
        if poses is not None:
            analysis = await asyncio.to_thread(score_performance, reference, poses, MIRROR_MODES[request.mirror], 0.0)
        report = dance_report(analysis, duration=duration, frames=counted, frames_with_pose=learner.with_pose)
        extension = contents.VIDEO_TYPES[content_type]
        reply.result.CopyFrom(
            await self._store_result(
                person,
                report,
                poses,
                source="upload",
                reference_id=reference.content_id,
                media=(request.file.data, extension),
            )
        )
        reply.keypoints_uri = reply.result.dance.keypoints_uri
        return reply

    async def _photo(self, data: bytes, content_type: str) -> pb.DetectDancePoseResponse:
        image = await asyncio.to_thread(_photo_frame, data, content_type)
        try:
            found = await self._pose().DetectImagePose(pose_pb.DetectImagePoseRequest(image=image), timeout=60.0)
        except grpc.aio.AioRpcError as error:
            raise pose_error(error, ("image", "file")) from None
        frame = pose_frame(duration_pb2.Duration(), found.poses)
        return pb.DetectDancePoseResponse(frames=[frame], frame_count=1, frames_with_pose=int(frame.detected))

    async def _video_poses(
        self, data: bytes, include_landmarks: bool
    ) -> tuple[LearnerPoses, list[res.PoseFrame], int, float]:
        """The poses of an uploaded video: decoded frame by frame in a worker thread, streamed to the pose server."""
        decoded = decode_video_frames(data, UPLOAD_FRAMES_PER_SECOND)
        failures: list[BaseException] = []
        aspects: dict[int, float] = {}

        async def requests() -> AsyncIterator[pose_pb.DetectPoseRequest]:
            yield pose_pb.DetectPoseRequest(config=pose_res.PoseConfig())
            index, previous_ms = 0, -1
            while True:
                try:
                    frame = await asyncio.to_thread(_next_frame, decoded)
                except UndecodableMedia as error:
                    failures.append(error)
                    return
                if frame is None:
                    return
                if round(frame.timestamp * 1000) <= previous_ms:
                    continue
                previous_ms = round(frame.timestamp * 1000)
                index += 1
                height, width, _ = frame.rgb.shape
                aspects[index] = width / height
                yield pose_pb.DetectPoseRequest(frame=_rgb_frame(frame.rgb, previous_ms / 1000, index))

        learner = LearnerPoses()
        frames: list[res.PoseFrame] = []
        try:
            async for reply in self._pose().DetectPose(requests(), timeout=self.settings.max_session_seconds):
                learner.add(reply.timestamp.ToNanoseconds() / 1e9, reply.poses, aspects.pop(reply.frame_index, 0.0))
                if include_landmarks:
                    frames.append(pose_frame(reply.timestamp, reply.poses))
        except grpc.aio.AioRpcError as error:
            raise pose_error(error) from None
        finally:
            with contextlib.suppress(ValueError):  # still running in a thread: it is closed when collected
                close = getattr(decoded, "close", None)
                if close is not None:
                    await asyncio.to_thread(close)
        if failures:
            raise InvalidArgument(
                str(failures[0]),
                [("file.data", str(failures[0]))],
                reason=ErrorReason.ERROR_REASON_UNSUPPORTED_MEDIA_TYPE,
            )
        return learner, frames, learner.frames, learner.last_time


def _check_size(size: int, limit: int, what: str) -> None:
    if size > limit:
        raise InvalidArgument(
            f"the {what} is larger than {limit // _MIB} MiB",
            [("file.data", f"at most {limit} bytes for a {what}")],
            reason=ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
            metadata={"max_bytes": str(limit)},
        )


class _Failed:
    """Marks the end of the event queue."""


_END = _Failed()


class _LiveSession:
    """One AnalyzeDance call after its config (see the module's docstring)."""

    def __init__(
        self,
        service: DanceService,
        person: AccessClaims,
        reference: Reference,
        config: res.DanceStreamConfig,
        start: float,
        reader: RequestReader[pb.AnalyzeDanceRequest],
    ) -> None:
        self._service = service
        self._person = person
        self._reference = reference
        self._config = config
        self._start = start
        self._reader = reader
        self._mirror = MIRROR_MODES[config.mirror]
        self._learner = LearnerPoses()
        self._aspect: dict[int, float] = {}
        self._to_pose: asyncio.Queue[pose_res.Frame | None] = asyncio.Queue(READ_AHEAD_FRAMES)
        self._events: asyncio.Queue[pb.AnalyzeDanceResponse | _Failed] = asyncio.Queue(MAX_PENDING_EVENTS)
        self._failure: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._frames_seen = asyncio.Event()
        self._ended = False
        self._next_segment = reference.segment_of(start)
        self._segments: list[SegmentScore] = []
        self._timings = Timings()

    def _fail(self, error: BaseException) -> None:
        if not self._failure.done():
            self._failure.set_result(error)

    async def run(self) -> AsyncGenerator[pb.AnalyzeDanceResponse, None]:
        stub = self._service._pose()
        call = stub.DetectPose(self._pose_requests(), timeout=self._service.settings.max_session_seconds)
        tasks = [
            asyncio.create_task(self._guard(self._feed()), name="dance-feed"),
            asyncio.create_task(self._guard(self._collect(call)), name="dance-collect"),
        ]
        started = time.perf_counter()
        try:
            while True:
                getter = asyncio.ensure_future(self._events.get())
                try:
                    waiting: set[asyncio.Future[Any]] = {getter, self._failure}
                    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    getter.cancel()
                if self._failure in done:
                    raise self._failure.result()
                event = getter.result()
                if isinstance(event, _Failed):
                    break
                yield event
        finally:
            call.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            segments = self._timings.segment_seconds
            _log.info(
                "kzone.dance_session",
                frames=self._learner.frames,
                frames_with_pose=self._learner.with_pose,
                seconds=round(time.perf_counter() - started, 3),
                segments_scored=len(segments),
                segment_scoring_ms_mean=round(1000 * float(np.mean(segments)), 2) if segments else None,
                segment_scoring_ms_max=round(1000 * max(segments), 2) if segments else None,
                final_scoring_ms=round(1000 * self._timings.final_seconds, 2),
            )

    async def _guard(self, work: Any) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as error:
            self._fail(pose_error(error))
        except BaseException as error:  # handed to the handler, which raises it
            self._fail(error)

    async def _pose_requests(self) -> AsyncIterator[pose_pb.DetectPoseRequest]:
        yield pose_pb.DetectPoseRequest(config=pose_res.PoseConfig())
        while (frame := await self._to_pose.get()) is not None:
            yield pose_pb.DetectPoseRequest(frame=frame)

    async def _feed(self) -> None:
        """Client frames, checked, to the pose stream; the end of the client's stream ends it."""
        previous_ms: int | None = None
        index = 0
        while (request := await self._reader.next()) is not None:
            index += 1
            require_payload(request, "frame", index)
            previous_ms, aspect = check_video_frame(request.frame, previous_ms, index)
            self._aspect[index] = aspect
            await self._to_pose.put(_pose_frame_of(request.frame, index))
        await self._to_pose.put(None)

    async def _collect(self, call: Any) -> None:
        """Pose replies to the learner's sequence and events; segments scored as they complete; the final
        result once the pose stream ends."""
        scorer = asyncio.create_task(self._score_segments(), name="dance-segments")
        try:
            async for reply in call:
                timestamp = reply.timestamp.ToNanoseconds() / 1e9
                self._learner.add(timestamp, reply.poses, self._aspect.pop(reply.frame_index, 0.0))
                if self._config.return_landmarks:
                    await self._events.put(
                        pb.AnalyzeDanceResponse(
                            video_offset=reply.timestamp, pose=pose_frame(reply.timestamp, reply.poses)
                        )
                    )
                self._frames_seen.set()
            self._ended = True
            self._frames_seen.set()
            await scorer
        finally:
            scorer.cancel()
        await self._finish()

    def _due(self) -> bool:
        reference_end = float(self._reference.poses.timestamps[-1])
        segment_start, segment_end = self._reference.segment_span(self._next_segment)
        if max(segment_start, self._start) > reference_end:
            return False
        return self._learner.last_time >= segment_end - self._start + LIVE_SEGMENT_LAG

    async def _score_segments(self) -> None:
        while not self._ended:
            await self._frames_seen.wait()
            self._frames_seen.clear()
            while not self._ended and self._due():
                index = self._next_segment
                self._next_segment += 1
                inputs = self._segment_inputs(index)  # on the loop: the sequence grows here
                if inputs is None:
                    continue
                started = time.perf_counter()
                analysis = await asyncio.to_thread(self._score_window, *inputs)
                self._timings.segment_seconds.append(time.perf_counter() - started)
                if analysis is None:
                    continue
                if self._mirror is MirrorMode.AUTO:  # the first scored segment decides for the live ones
                    self._mirror = MirrorMode.MIRRORED if analysis.mirrored else MirrorMode.NOT_MIRRORED
                segment = next((found for found in analysis.segments if found.index == index), None)
                if segment is None:
                    continue
                self._segments.append(segment)
                offset = seconds(self._learner.last_time)
                await self._events.put(pb.AnalyzeDanceResponse(video_offset=offset, segment=segment_message(segment)))
                await self._events.put(pb.AnalyzeDanceResponse(video_offset=offset, scores=self._running_scores()))

    def _segment_inputs(self, index: int) -> tuple[PoseSequence, PoseSequence, MirrorMode] | None:
        """The trailing window of one segment: the reference's and the learner's poses around it."""
        segment_start, segment_end = self._reference.segment_span(index)
        low = max(segment_start, self._start) - WINDOW_MARGIN
        high = segment_end + WINDOW_MARGIN
        reference = reference_window(self._reference.poses, max(low, self._start), high)
        learner = self._learner.window(low - self._start, high - self._start)
        if reference is None or learner is None:
            return None
        return reference, learner, self._mirror

    def _score_window(self, reference: PoseSequence, learner: PoseSequence, mirror: MirrorMode) -> DanceAnalysis | None:
        """Runs in a worker thread; a window that cannot be scored (no torso) is skipped."""
        try:
            return score_dance(reference, learner, self._reference.grid, mirror=mirror, reference_start=self._start)
        except ValueError as error:
            _log.warning("kzone.dance_segment_unscored", error=str(error))
            return None

    def _running_scores(self) -> res.DanceScores:
        accuracy = float(np.mean([segment.score for segment in self._segments]))
        offset = float(np.mean([abs(segment.timing_offset) for segment in self._segments]))
        timing = score_from_distance(offset, _HALF_SCORE_OFFSET)
        return res.DanceScores(
            overall=_ACCURACY_WEIGHT * accuracy + (1 - _ACCURACY_WEIGHT) * timing,
            accuracy=accuracy,
            timing=timing,
            frames_analyzed=self._learner.frames,
        )

    async def _finish(self) -> None:
        learner = await asyncio.to_thread(self._learner.window)  # the stream has ended: nothing appends now
        started = time.perf_counter()
        analysis = None
        if learner is not None:
            analysis = await asyncio.to_thread(
                score_performance, self._reference, learner, MIRROR_MODES[self._config.mirror], self._start
            )
        self._timings.final_seconds = time.perf_counter() - started
        report = dance_report(
            analysis,
            duration=self._learner.last_time,
            frames=self._learner.frames,
            frames_with_pose=self._learner.with_pose,
        )
        stored = await self._service._store_result(
            self._person, report, learner, source="live", reference_id=self._reference.content_id
        )
        await self._events.put(
            pb.AnalyzeDanceResponse(video_offset=seconds(self._learner.last_time), final_result=stored)
        )
        await self._events.put(_END)


def score_performance(
    reference: Reference, learner: PoseSequence, mirror: MirrorMode, start: float
) -> DanceAnalysis | None:
    """The whole performance against the stretch of the reference it covered (None when that stretch holds too
    few poses, or they cannot be normalised). Runs in a worker thread."""
    end = start + float(learner.timestamps[-1]) + REFERENCE_TAIL
    window = reference_window(reference.poses, start, end)
    if window is None:
        return None
    try:
        return score_dance(window, learner, reference.grid, mirror=mirror, reference_start=start)
    except ValueError as error:  # poses without a torso (shoulders on the hips)
        _log.warning("kzone.dance_unscored", error=str(error))
        return None
