"""Uploaded media decoded for analysis (PyAV, which ships FFmpeg's decoders): any audio container and codec FFmpeg
reads becomes mono float samples at the analysis rate; a video becomes RGB frames at a chosen rate with their
timestamps. Pure of the event loop's concerns: callers run these in a thread (decoding is CPU work that releases
the GIL in FFmpeg).

Malformed or unsupported media raise UndecodableMedia with a message fit for the caller.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import av
import av.error
import numpy as np
import numpy.typing as npt

ANALYSIS_SAMPLE_RATE = 16_000


class UndecodableMedia(ValueError):
    """The bytes are not media this decoder can read (or hold no stream of the wanted kind)."""


@dataclass(frozen=True)
class DecodedAudio:
    samples: npt.NDArray[np.float32]  # mono, full scale +-1
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class DecodedFrame:
    timestamp: float  # seconds from the start of the video
    rgb: npt.NDArray[np.uint8]  # height x width x 3


def decode_audio(data: bytes, sample_rate: int = ANALYSIS_SAMPLE_RATE, max_seconds: float = 900.0) -> DecodedAudio:
    """The first audio stream of `data`, mixed down to mono and resampled; at most `max_seconds` of it."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    parts: list[npt.NDArray[np.float32]] = []
    kept = 0
    limit = int(max_seconds * sample_rate)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise UndecodableMedia("the file holds no audio stream")
            for frame in container.decode(container.streams.audio[0]):
                for converted in resampler.resample(frame):
                    parts.append(converted.to_ndarray().reshape(-1).astype(np.float32, copy=False))
                    kept += parts[-1].size
                if kept >= limit:
                    break
            else:
                for converted in resampler.resample(None):
                    parts.append(converted.to_ndarray().reshape(-1).astype(np.float32, copy=False))
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise UndecodableMedia(f"the audio cannot be decoded: {error}") from None
    samples = np.concatenate(parts)[:limit] if parts else np.zeros(0, dtype=np.float32)
    if samples.size == 0:
        raise UndecodableMedia("the audio stream holds no samples")
    return DecodedAudio(samples, sample_rate)


def decode_video_frames(
    data: bytes, frames_per_second: float = 15.0, max_seconds: float = 600.0
) -> Iterator[DecodedFrame]:
    """RGB frames of the first video stream, thinned to at most `frames_per_second`, in time order."""
    if frames_per_second <= 0:
        raise ValueError("frames_per_second must be positive")
    period = 1.0 / frames_per_second
    next_due = 0.0
    yielded = False
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise UndecodableMedia("the file holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                timestamp = float(frame.time)
                if timestamp > max_seconds:
                    break
                # A small tolerance keeps a steady source's frames from drifting just past each due time.
                if timestamp + period * 0.01 < next_due:
                    continue
                next_due = max(next_due + period, timestamp)
                yielded = True
                yield DecodedFrame(timestamp, np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8))
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise UndecodableMedia(f"the video cannot be decoded: {error}") from None
    if not yielded:
        raise UndecodableMedia("the video stream holds no frames")
