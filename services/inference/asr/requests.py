"""Validation of the asr server's requests: configs, audio chunks and clips; bad input is INVALID_ARGUMENT with
one field violation per problem, a language the loaded model cannot recognise FAILED_PRECONDITION."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from megacity.asr.v1 import asr_service_pb2 as pb
from megacity.asr.v1 import resources_pb2 as res
from services.inference.asr.streaming import Samples
from services.inference.streams import require_payload
from services.runtime.errors import ErrorReason, FailedPrecondition, InvalidArgument, Violations

SAMPLE_RATE = 16_000
MAX_CHUNK_BYTES = 1024 * 1024
MAX_BEAM = 10
MAX_PROMPT_CHARS = 1000
STREAM_BEAM = 1
CLIP_BEAM = 5


class Languages(Protocol):
    @property
    def multilingual(self) -> bool: ...

    @property
    def languages(self) -> tuple[str, ...]: ...

    @property
    def name(self) -> str: ...


def config_violations(config: res.RecognitionConfig, prefix: str) -> Violations:
    problems = Violations()
    if config.encoding != res.AUDIO_ENCODING_PCM16:
        problems.add(f"{prefix}.encoding", "must be AUDIO_ENCODING_PCM16 (signed 16-bit little-endian PCM)")
    if config.sample_rate_hertz != SAMPLE_RATE:
        problems.add(f"{prefix}.sample_rate_hertz", f"must be {SAMPLE_RATE} (resample first)")
    if config.channel_count not in (0, 1):
        problems.add(f"{prefix}.channel_count", "must be 1 (mono)")
    if not 0 <= config.beam_size <= MAX_BEAM:
        problems.add(f"{prefix}.beam_size", f"must be between 0 (the default) and {MAX_BEAM}")
    if len(config.initial_prompt) > MAX_PROMPT_CHARS:
        problems.add(f"{prefix}.initial_prompt", f"must be at most {MAX_PROMPT_CHARS} characters")
    return problems


def _raise(problems: Violations, message: str) -> None:
    if problems:
        fields = {field for field, _ in problems.items()}
        format_problem = fields & {"config.encoding", "config.sample_rate_hertz", "config.channel_count"}
        raise InvalidArgument(
            message,
            problems.items(),
            reason=ErrorReason.ERROR_REASON_UNSUPPORTED_AUDIO_FORMAT if format_problem else None,
        )


def stream_config(request: pb.TranscribeRequest) -> res.RecognitionConfig:
    """The config that opened a stream (services.inference.streams.first_config), checked."""
    _raise(config_violations(request.config, "config"), "the stream's config is invalid")
    return request.config


def language_for(config: res.RecognitionConfig, model: Languages) -> str | None:
    """The language to decode in (None: detect), or FAILED_PRECONDITION when the loaded model cannot."""
    raw = config.language.strip()
    if not raw:
        return None if model.multilingual else "en"
    language = raw.split("-")[0].split("_")[0].lower()
    if language not in model.languages:
        only = "English-only" if not model.multilingual else f"limited to {len(model.languages)} languages"
        raise FailedPrecondition(
            f"the loaded model {model.name} is {only} and cannot recognise {raw!r}",
            reason=ErrorReason.ERROR_REASON_LANGUAGE_NOT_SUPPORTED,
            metadata={"language": raw, "model": model.name, "supported": ",".join(model.languages[:10])},
        )
    return language


def pcm16(data: bytes) -> Samples:
    """PCM16 little-endian bytes as float samples in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def stream_audio(request: pb.TranscribeRequest, index: int) -> Samples:
    """The audio of the stream's message number `index` (0 is the config)."""
    require_payload(request, "audio", index)
    size = len(request.audio)
    if size > MAX_CHUNK_BYTES:
        raise InvalidArgument(
            f"audio chunk of {size} bytes exceeds {MAX_CHUNK_BYTES}",
            [("audio", f"at most {MAX_CHUNK_BYTES} bytes per message (message {index})")],
            reason=ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
        )
    if size % 2:
        raise InvalidArgument(
            "PCM16 audio has 2 bytes per sample; a chunk of odd length is cut",
            [("audio", f"message {index} has {size} bytes, not a whole number of 16-bit samples")],
            reason=ErrorReason.ERROR_REASON_UNSUPPORTED_AUDIO_FORMAT,
        )
    return pcm16(request.audio)


def check_clip(request: pb.TranscribeAudioRequest, max_seconds: float) -> None:
    problems = Violations()
    if not request.HasField("config"):
        problems.add("config", "required")
    else:
        for field, description in config_violations(request.config, "config").items():
            problems.add(field, description)
    size = len(request.audio)
    if size == 0:
        problems.add("audio", "required")
    elif size % 2:
        problems.add("audio", f"{size} bytes is not a whole number of 16-bit samples")
    elif size / 2 / SAMPLE_RATE > max_seconds:
        raise InvalidArgument(
            f"the clip is longer than {max_seconds:g} s",
            [("audio", f"at most {max_seconds:g} s of audio ({int(max_seconds * SAMPLE_RATE * 2)} bytes)")],
            reason=ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
        )
    _raise(problems, "the request is invalid")
