"""Test media for the inference servers: English speech from espeak-ng (resampled by sox to PCM16 mono 16 kHz), a
photo of a person (matplotlib's grace_hopper.jpg), and word accuracy."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.errors import error_info, field_violations, status_from_error
from services.runtime.health import SERVING

SAMPLE_RATE = 16_000
# 100 ms of PCM16 mono 16 kHz.
CHUNK_BYTES = SAMPLE_RATE // 10 * 2


def require_tools(*tools: str) -> None:
    """Fail (not skip) when the speech tools are missing: the project's setup installs them (apt: espeak-ng sox)."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install the Debian packages espeak-ng and sox")


def speak(text: str, directory: Path, *, name: str = "speech", words_per_minute: int = 140) -> bytes:
    """`text` spoken by espeak-ng, as PCM16 little-endian mono 16 kHz bytes."""
    require_tools("espeak-ng", "sox")
    wav = directory / f"{name}.wav"
    raw = directory / f"{name}.raw"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(words_per_minute), "-w", str(wav), text], check=True)
    subprocess.run(
        ["sox", str(wav), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed-integer", "-t", "raw", str(raw)],
        check=True,
    )
    return raw.read_bytes()


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * SAMPLE_RATE) * 2)


def chunks(audio: bytes, size: int = CHUNK_BYTES) -> list[bytes]:
    return [audio[start : start + size] for start in range(0, len(audio), size)]


def person_photo() -> Path:
    """A photo of a person that ships with matplotlib."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_accuracy(reference: str, hypothesis: str) -> float:
    """1 - word error rate (Levenshtein over words), floored at 0."""
    ref, hyp = _words(reference), _words(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        current = [i]
        for j, other in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return max(0.0, 1.0 - previous[-1] / max(1, len(ref)))


def joined(texts: Sequence[str]) -> str:
    return " ".join(text.strip() for text in texts if text.strip())


def noise_image(width: int = 320, height: int = 240, seed: int = 0) -> bytes:
    """Raw RGB24 noise: nobody in it."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8).tobytes()


def error_of(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    """A refused call's code, ErrorInfo reason and field violations."""
    status = status_from_error(error)
    info = error_info(status)
    return error.code(), info.reason if info else "", field_violations(status)


async def serving(channel: grpc.aio.Channel, service: str = "") -> bool:
    """Whether gRPC health says SERVING for `service` (the whole server when empty)."""
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return bool(reply.status == SERVING)


async def until_serving(channel: grpc.aio.Channel, service: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await serving(channel, service):
        assert time.monotonic() < deadline, f"{service} never SERVING"
        await asyncio.sleep(0.05)
