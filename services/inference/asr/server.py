"""The asr service: speech recognition inference server (faster-whisper), internal only (kzone and jobs call it).

Thin: validates requests (services/inference/asr/requests.py), runs each stream's policy
(services/inference/asr/streaming.py: voice activity + LocalAgreement-2, pure) and hands its decodes to the
batcher of services/inference/asr/engine.py, which runs the model in worker threads, never on the event loop.

- The model loads in a worker thread when the service starts; health is NOT_SERVING until it is loaded, and
  calls before then get UNAVAILABLE (MODEL_NOT_READY).
- Sessions (streams and clips) are bounded (MEGACITY_ASR_MAX_STREAMS): one more gets RESOURCE_EXHAUSTED
  (CAPACITY_EXCEEDED). A stream holds at most MEGACITY_ASR_MAX_QUEUED_SECONDS of audio it has not decoded; past
  that the server stops reading it, so gRPC flow control makes the client wait. A stream's buffer is trimmed at
  every final segment (and capped at 15 s), so memory per stream is bounded.
- A stream that sends nothing for MEGACITY_ASR_IDLE_TIMEOUT_SECONDS ends with DEADLINE_EXCEEDED (STREAM_IDLE). A
  cancelled call or a passed deadline releases the stream's slot and buffers at once (a decode already running
  in a worker finishes and its result is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import structlog

from megacity.asr.v1 import asr_service_pb2 as pb
from megacity.asr.v1 import asr_service_pb2_grpc
from megacity.asr.v1 import resources_pb2 as res
from services.inference.asr import requests
from services.inference.asr.engine import AsrSettings, DecodeBatcher, DecodeOptions, WhisperEngine
from services.inference.asr.streaming import Event, Hypothesis, Partial, PolicyParams, Samples, StreamPolicy, Word
from services.inference.streams import ModelHost, RequestReader, StreamSlots, duration, first_config, lifetime
from services.runtime.context import StreamingContext, UnaryContext
from services.runtime.server import Dependencies, ServicerBinding

_log = structlog.get_logger("megacity.asr")

# Requests read ahead of the policy, at most (besides the audio-seconds bound).
READ_AHEAD_ITEMS = 8


def _words(words: Sequence[Word]) -> list[res.Word]:
    return [
        res.Word(
            word=word.text.strip(),
            start_offset=duration(word.start),
            end_offset=duration(word.end),
            probability=word.probability,
        )
        for word in words
    ]


def _event(event: Event, word_timestamps: bool) -> pb.TranscribeResponse:
    if isinstance(event, Partial):
        return pb.TranscribeResponse(
            partial=res.PartialTranscript(
                stable_text=event.stable_text,
                unstable_text=event.unstable_text,
                start_offset=duration(event.start),
                end_offset=duration(event.end),
            )
        )
    return pb.TranscribeResponse(
        segment=res.TranscriptSegment(
            index=event.index,
            text=event.text,
            start_offset=duration(event.start),
            end_offset=duration(event.end),
            words=_words(event.words) if word_timestamps else [],
            language=event.language,
            avg_logprob=event.avg_logprob,
            no_speech_probability=event.no_speech_probability,
        )
    )


class AsrServicer(asr_service_pb2_grpc.AsrServiceServicer):
    def __init__(self, settings: AsrSettings, host: ModelHost[WhisperEngine], executor: ThreadPoolExecutor) -> None:
        self._settings = settings
        self._host = host
        self.slots = StreamSlots(settings.max_streams, "streams")
        self._stream_executor = executor
        self._clip_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr-clip")
        self._batcher: DecodeBatcher | None = None

    @property
    def active_streams(self) -> int:
        return self.slots.active

    def _engine(self) -> tuple[WhisperEngine, DecodeBatcher]:
        engine = self._host.get()
        if self._batcher is None:
            self._batcher = DecodeBatcher(
                engine, self._stream_executor, self._settings.workers, self._settings.max_batch
            )
        return engine, self._batcher

    async def Transcribe(
        self,
        request_iterator: AsyncIterator[pb.TranscribeRequest],
        context: StreamingContext[AsyncIterator[pb.TranscribeRequest], pb.TranscribeResponse],
    ) -> AsyncIterator[pb.TranscribeResponse]:
        engine, batcher = self._engine()
        settings = self._settings
        started = time.perf_counter()
        busy = 0.0
        with contextlib.ExitStack() as held:
            reader = RequestReader(
                request_iterator,
                size=lambda request: len(request.audio),
                max_items=READ_AHEAD_ITEMS,
                max_bytes=requests.MAX_CHUNK_BYTES,
                idle_timeout=settings.idle_timeout,
            )
            async with reader:
                first = await first_config(reader, "required in the first message, before any audio")
                config = requests.stream_config(first)
                language = requests.language_for(config, engine)
                # The slot is taken once the config is in: a refusal reaches a client that waits after its config
                # (grpc's asyncio client reports a status that arrives while it writes as INTERNAL, grpc/grpc#36066).
                held.enter_context(self.slots.hold())
                options = DecodeOptions(
                    language=language,
                    beam_size=config.beam_size or requests.STREAM_BEAM,
                    initial_prompt=config.initial_prompt,
                )
                policy = StreamPolicy(PolicyParams(decode_interval=settings.decode_interval), language=language or "")
                decode: asyncio.Task[Hypothesis | None] | None = None
                read: asyncio.Task[pb.TranscribeRequest | None] | None = None
                index = 0

                decode_started = [0.0]

                def prepare() -> Samples | None:
                    job = policy.next_job()
                    decode_started[0] = time.perf_counter()
                    return None if job is None else job.audio

                try:
                    while True:
                        if decode is None:
                            if policy.done:
                                break
                            if policy.due:
                                language = options.language or policy.language or None
                                job_options = DecodeOptions(language, options.beam_size, options.initial_prompt)
                                decode = asyncio.create_task(batcher.decode(job_options, prepare))
                        # Read more only while the undecoded audio stays under the bound.
                        if read is None and not policy.ended and policy.undecoded_seconds < settings.max_queued_seconds:
                            read = asyncio.create_task(reader.next())
                        waiting = [task for task in (decode, read) if task is not None]
                        if not waiting:
                            raise RuntimeError("stream stalled with nothing to wait for")  # a bug, not a caller error
                        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                        if decode is not None and decode.done():
                            hypothesis = decode.result()
                            decode = None
                            if hypothesis is not None:
                                busy += time.perf_counter() - decode_started[0]
                                for event in policy.apply(hypothesis, partial_results=config.partial_results):
                                    yield _event(event, config.word_timestamps)
                        if read is not None and read.done():
                            request = read.result()
                            read = None
                            index += 1
                            if request is None:
                                policy.finish()
                            else:
                                policy.add_audio(requests.stream_audio(request, index))
                finally:
                    for task in (decode, read):
                        if task is not None and not task.done():
                            task.cancel()
                yield pb.TranscribeResponse(
                    end_of_stream=res.EndOfStream(
                        audio_duration=duration(policy.received_seconds),
                        segment_count=policy.segment_count,
                        processing_time=duration(busy),
                        language=policy.language,
                    )
                )
        _log.info(
            "asr.stream_done",
            audio_seconds=round(policy.received_seconds, 2),
            segments=policy.segment_count,
            wall_seconds=round(time.perf_counter() - started, 2),
            decode_seconds=round(busy, 2),
        )

    async def TranscribeAudio(
        self,
        request: pb.TranscribeAudioRequest,
        context: UnaryContext[pb.TranscribeAudioRequest, pb.TranscribeAudioResponse],
    ) -> pb.TranscribeAudioResponse:
        requests.check_clip(request, self._settings.max_clip_seconds)
        engine, _ = self._engine()
        language = requests.language_for(request.config, engine)
        options = DecodeOptions(language, request.config.beam_size or requests.CLIP_BEAM, request.config.initial_prompt)
        audio = requests.pcm16(request.audio)
        with self.slots.hold():
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(
                self._clip_executor, engine.transcribe_clip, audio, options, request.config.word_timestamps
            )
            elapsed = time.perf_counter() - started
        segments = [
            res.TranscriptSegment(
                index=index,
                text=segment.text,
                start_offset=duration(segment.start),
                end_offset=duration(segment.end),
                words=_words(segment.words),
                language=result.language,
                avg_logprob=segment.avg_logprob,
                no_speech_probability=segment.no_speech_probability,
            )
            for index, segment in enumerate(result.segments)
        ]
        return pb.TranscribeAudioResponse(
            segments=segments,
            summary=res.EndOfStream(
                audio_duration=duration(audio.size / requests.SAMPLE_RATE),
                segment_count=len(segments),
                processing_time=duration(elapsed),
                language=result.language,
            ),
        )

    async def GetModelInfo(
        self,
        request: pb.GetModelInfoRequest,
        context: UnaryContext[pb.GetModelInfoRequest, pb.GetModelInfoResponse],
    ) -> pb.GetModelInfoResponse:
        info = res.ModelInfo(
            name=self._settings.model_name,
            ready=self._host.ready,
            compute_type=self._settings.compute_type,
            max_streams=self.slots.limit,
            active_streams=self.slots.active,
        )
        if self._host.ready:
            engine = self._host.get()
            info.languages.extend(engine.languages)
            info.device = engine.device
            info.compute_type = engine.compute_type
        return pb.GetModelInfoResponse(model=info)

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        self._clip_executor.shutdown(wait=False, cancel_futures=True)
        self._stream_executor.shutdown(wait=False, cancel_futures=True)
        self._host.close()


def build(
    deps: Dependencies,
    settings: AsrSettings | None = None,
    load: Callable[[AsrSettings], WhisperEngine] = WhisperEngine,
) -> list[ServicerBinding]:
    """The servicer, its model loading (begun now, off the loop), health probe and shutdown."""
    settings = settings or AsrSettings.from_environment()
    executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="asr-decode")
    host: ModelHost[WhisperEngine] = ModelHost(settings.model_name, lambda: load(settings), executor)
    servicer = AsrServicer(settings, host, executor)
    host.start()
    deps.probes["model"] = host.probe

    # A little less than the runtime's grace, which bounds how long it waits for this job.
    deps.background.append(lifetime(servicer.slots, max(0.0, deps.config.shutdown_grace_seconds - 0.5), servicer.close))
    return [ServicerBinding(asr_service_pb2_grpc.add_AsrServiceServicer_to_server, servicer)]


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    return build(deps)
