"""Cutting a live audio stream into overlapping analysis frames, shared by the pitch and rhythm trackers.

Audio arrives in chunks of any size (100 ms is typical, but a chunk may hold a few samples or a whole file). Frame k
is the `frame_length` samples whose sample `centre` sits at k * hop of the stream, so frame times are k * hop /
sample_rate from zero whatever the chunking: the stream is padded with `centre` zeros in front, and `finish` pads
the end so that every sample of the stream lies in the centre of some frame's hop. Analysing a whole signal is the
same as pushing it in one chunk and finishing: there is one code path, and pushing it in pieces gives the same
frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import ArrayLike, NDArray

Floats: TypeAlias = NDArray[np.float64]


@dataclass(frozen=True)
class FrameBlock:
    """Consecutive frames, one per row (a read-only view), the first of which is frame number `first_frame`."""

    first_frame: int
    frames: Floats

    def __len__(self) -> int:
        return int(self.frames.shape[0])


class FrameBuffer:
    """Accepts samples in chunks and hands out every frame that is complete, each exactly once."""

    def __init__(self, frame_length: int, hop: int, centre: int) -> None:
        if hop < 1 or frame_length < hop or not 0 <= centre < frame_length:
            raise ValueError(f"bad framing: frame_length={frame_length}, hop={hop}, centre={centre}")
        self.frame_length = frame_length
        self.hop = hop
        self._pending: Floats = np.zeros(centre)
        self._next_frame = 0
        self._samples_seen = 0
        self._finished = False

    def push(self, samples: ArrayLike) -> FrameBlock:
        """Adds mono samples (floats, full scale ±1) and returns the frames they complete (possibly none)."""
        if self._finished:
            raise ValueError("the stream has finished")
        chunk = np.asarray(samples, dtype=np.float64)
        if chunk.ndim != 1:
            raise ValueError(f"samples must be one-dimensional (mono), got shape {chunk.shape}")
        self._samples_seen += chunk.size
        self._pending = np.concatenate((self._pending, chunk))
        return self._take(self._complete_frames())

    def finish(self) -> FrameBlock:
        """Ends the stream: returns the frames whose centres are in its last samples, padded with silence."""
        if self._finished:
            raise ValueError("the stream has finished")
        self._finished = True
        frames_in_stream = math.ceil(self._samples_seen / self.hop)
        missing = frames_in_stream - self._next_frame
        if missing <= 0:
            return self._take(0)
        needed = (missing - 1) * self.hop + self.frame_length
        self._pending = np.concatenate((self._pending, np.zeros(max(0, needed - self._pending.size))))
        return self._take(missing)

    def _complete_frames(self) -> int:
        if self._pending.size < self.frame_length:
            return 0
        return (self._pending.size - self.frame_length) // self.hop + 1

    def _take(self, count: int) -> FrameBlock:
        first = self._next_frame
        if count == 0:
            return FrameBlock(first, np.zeros((0, self.frame_length)))
        span = self._pending[: (count - 1) * self.hop + self.frame_length]
        frames = sliding_window_view(span, self.frame_length)[:: self.hop]
        self._pending = self._pending[count * self.hop :]
        self._next_frame += count
        return FrameBlock(first, frames)
