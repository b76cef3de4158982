"""The pose server's model: mediapipe's PoseLandmarker (Tasks API) from a `.task` bundle, frames decoded to RGB.

Settings (environment):

| variable | default | meaning |
|---|---|---|
| MEGACITY_POSE_MODEL_PATH | <repo>/../shared/models/pose_landmarker_full.task | the PoseLandmarker `.task` bundle |
| MEGACITY_POSE_DELEGATE | cpu | `cpu` or `gpu` (mediapipe's GPU delegate) |
| MEGACITY_POSE_WORKERS | cores | threads that decode frames and run the model |
| MEGACITY_POSE_MAX_STREAMS | 8 | concurrent streams; more get RESOURCE_EXHAUSTED |
| MEGACITY_POSE_MAX_FRAME_BYTES | 8 MiB | largest frame (encoded) accepted |
| MEGACITY_POSE_MAX_PIXELS | 16777216 | largest frame (decoded: width x height) accepted |
| MEGACITY_POSE_IDLE_TIMEOUT_SECONDS | 30 | a stream silent this long ends: DEADLINE_EXCEEDED (STREAM_IDLE) |

Streams run in VIDEO mode, one landmarker per stream (it tracks the person from frame to frame, so frames must come
in order with increasing timestamps); still images in IMAGE mode, from a small pool of landmarkers per option set.
A landmarker is used by one thread at a time and closed when its stream ends (mediapipe 1.2 raises if one is
garbage-collected open). mediapipe runs the model in native code without the GIL, so threads run it in parallel.
No batching across streams: the Tasks API detects one image per call, and VIDEO mode keeps per-stream state.
"""

from __future__ import annotations

import importlib
import io
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from megacity.pose.v1 import resources_pb2 as res
from services.runtime.config import ConfigError, env_int, env_number
from services.runtime.errors import ErrorReason, InvalidArgument

RgbImage = npt.NDArray[np.uint8]

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MODEL_PATH = REPO_ROOT.parent / "shared" / "models" / "pose_landmarker_full.task"
# Image landmarkers kept per option set, and option sets kept.
_POOL_PER_OPTIONS = 2
_POOL_OPTION_SETS = 4


# Imported with the service's module, before it serves (mediapipe takes ~1 s to import): the load thread then only
# builds a landmarker (~0.2 s), so the service is SERVING from its first health check on.
_mediapipe: Any = importlib.import_module("mediapipe")
_tasks: Any = importlib.import_module("mediapipe.tasks.python")
_vision: Any = importlib.import_module("mediapipe.tasks.python.vision")


@dataclass(frozen=True)
class PoseSettings:
    model_path: Path
    delegate: str
    workers: int
    max_streams: int
    max_frame_bytes: int
    max_pixels: int
    idle_timeout: float

    @property
    def model_name(self) -> str:
        return self.model_path.stem

    @classmethod
    def from_environment(cls) -> PoseSettings:
        raw_path = os.environ.get("MEGACITY_POSE_MODEL_PATH", "")
        delegate = (os.environ.get("MEGACITY_POSE_DELEGATE", "") or "cpu").lower()
        if delegate not in ("cpu", "gpu"):
            raise ConfigError(f"MEGACITY_POSE_DELEGATE={delegate!r}; expected cpu or gpu")
        return cls(
            model_path=Path(raw_path).expanduser() if raw_path else DEFAULT_MODEL_PATH,
            delegate=delegate,
            workers=env_int("MEGACITY_POSE_WORKERS", len(os.sched_getaffinity(0)), minimum=1),
            max_streams=env_int("MEGACITY_POSE_MAX_STREAMS", 8, minimum=1),
            max_frame_bytes=env_int("MEGACITY_POSE_MAX_FRAME_BYTES", 8 * 1024 * 1024, minimum=1024),
            max_pixels=env_int("MEGACITY_POSE_MAX_PIXELS", 4096 * 4096, minimum=64 * 64),
            idle_timeout=env_number("MEGACITY_POSE_IDLE_TIMEOUT_SECONDS", 30.0, minimum=0.1),
        )


@dataclass(frozen=True)
class PoseOptions:
    max_poses: int = 1
    min_detection_confidence: float = 0.5
    min_presence_confidence: float = 0.5
    min_tracking_confidence: float = 0.5


@dataclass(frozen=True)
class Detection:
    poses: tuple[res.Pose, ...]
    seconds: float


def decode_frame(frame: res.Frame, field: str, max_pixels: int) -> RgbImage:
    """The frame as an RGB array (height x width x 3), or INVALID_ARGUMENT (UNSUPPORTED_FRAME_FORMAT)."""

    def bad(description: str, where: str = f"{field}.data") -> InvalidArgument:
        return InvalidArgument(
            f"{field} cannot be decoded: {description}",
            [(where, description)],
            reason=ErrorReason.ERROR_REASON_UNSUPPORTED_FRAME_FORMAT,
        )

    if frame.encoding == res.FRAME_ENCODING_RGB24:
        if frame.width * frame.height > max_pixels:
            raise bad(f"{frame.width}x{frame.height} is more than {max_pixels} pixels", f"{field}.width")
        if len(frame.data) != frame.width * frame.height * 3:
            raise bad(f"RGB24 {frame.width}x{frame.height} needs {frame.width * frame.height * 3} bytes")
        return np.frombuffer(frame.data, dtype=np.uint8).reshape(frame.height, frame.width, 3)
    try:
        with Image.open(io.BytesIO(frame.data)) as image:
            if image.format != "JPEG":
                raise bad(f"not a JPEG image ({image.format or 'unknown format'})")
            width, height = image.size
            if width * height > max_pixels:
                raise bad(f"{width}x{height} is more than {max_pixels} pixels")
            rgb = image.convert("RGB")
            rgb.load()
    except InvalidArgument:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise bad("not a decodable JPEG image") from error
    return np.asarray(rgb, dtype=np.uint8)


def _landmarks(points: Sequence[Any]) -> list[res.Landmark]:
    return [
        res.Landmark(
            x=float(point.x),
            y=float(point.y),
            z=float(point.z),
            visibility=float(point.visibility or 0.0),
            presence=float(point.presence or 0.0),
        )
        for point in points
    ]


class PoseModel:
    """The model bundle, read once, and the landmarkers made from it. Methods block: call them in worker threads."""

    def __init__(self, settings: PoseSettings) -> None:
        self._mp: Any = _mediapipe
        self._vision: Any = _vision
        self._base_options: Any = _tasks.BaseOptions
        self.settings = settings
        self.name = settings.model_name
        self._bundle = settings.model_path.read_bytes()
        self._lock = threading.Lock()
        self._pool: OrderedDict[PoseOptions, list[Any]] = OrderedDict()
        self._closed = False
        # Make one now: a bundle that is no landmarker fails here, at load, not on the first call.
        self._give_back(PoseOptions(), self._create(PoseOptions(), video=False))

    def _create(self, options: PoseOptions, *, video: bool) -> Any:
        vision = self._vision
        delegate = (
            self._base_options.Delegate.GPU if self.settings.delegate == "gpu" else self._base_options.Delegate.CPU
        )
        return vision.PoseLandmarker.create_from_options(
            vision.PoseLandmarkerOptions(
                base_options=self._base_options(model_asset_buffer=self._bundle, delegate=delegate),
                running_mode=vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE,
                num_poses=options.max_poses,
                min_pose_detection_confidence=options.min_detection_confidence,
                min_pose_presence_confidence=options.min_presence_confidence,
                min_tracking_confidence=options.min_tracking_confidence,
            )
        )

    def image(self, rgb: RgbImage) -> Any:
        return self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))

    @staticmethod
    def poses(result: Any) -> tuple[res.Pose, ...]:
        return tuple(
            res.Pose(landmarks=_landmarks(points), world_landmarks=_landmarks(world))
            for points, world in zip(result.pose_landmarks, result.pose_world_landmarks, strict=False)
        )

    def _take(self, options: PoseOptions) -> Any:
        with self._lock:
            landmarkers = self._pool.get(options)
            if landmarkers:
                return landmarkers.pop()
        return self._create(options, video=False)

    def _give_back(self, options: PoseOptions, landmarker: Any) -> None:
        with self._lock:
            if not self._closed:
                kept = self._pool.setdefault(options, [])
                self._pool.move_to_end(options)
                if len(kept) < _POOL_PER_OPTIONS:
                    kept.append(landmarker)
                    landmarker = None
                while len(self._pool) > _POOL_OPTION_SETS:
                    _, evicted = self._pool.popitem(last=False)
                    for old in evicted:
                        old.close()
        if landmarker is not None:
            landmarker.close()

    def detect_image(self, frame: res.Frame, options: PoseOptions) -> Detection:
        rgb = decode_frame(frame, "image", self.settings.max_pixels)
        landmarker = self._take(options)
        try:
            started = time.perf_counter()
            result = landmarker.detect(self.image(rgb))
            seconds = time.perf_counter() - started
        finally:
            self._give_back(options, landmarker)
        return Detection(self.poses(result), seconds)

    def video(self, options: PoseOptions) -> VideoSession:
        return VideoSession(self, options)

    def create_video(self, options: PoseOptions) -> Any:
        return self._create(options, video=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools, self._pool = list(self._pool.values()), OrderedDict()
        for landmarkers in pools:
            for landmarker in landmarkers:
                landmarker.close()


class VideoSession:
    """One stream's VIDEO-mode landmarker, made on its first frame; one thread at a time uses it."""

    def __init__(self, model: PoseModel, options: PoseOptions) -> None:
        self._model = model
        self._options = options
        self._lock = threading.Lock()
        self._landmarker: Any = None
        self._closed = False

    def detect(self, frame: res.Frame, timestamp_ms: int) -> Detection:
        rgb = decode_frame(frame, "frame", self._model.settings.max_pixels)
        with self._lock:
            if self._closed:
                raise RuntimeError("the stream's landmarker is closed")
            if self._landmarker is None:
                self._landmarker = self._model.create_video(self._options)
            started = time.perf_counter()
            result = self._landmarker.detect_for_video(self._model.image(rgb), timestamp_ms)
            seconds = time.perf_counter() - started
        return Detection(self._model.poses(result), seconds)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            landmarker, self._landmarker = self._landmarker, None
        if landmarker is not None:
            landmarker.close()
