"""Voice analysis of the kzone service: the live stream (AnalyzeVoice) and uploads (AnalyzeVoiceFile).

A live session (`VoiceAnalysis.stream`):
1. The first message must be the config: PCM16, 16000 Hz, mono (else INVALID_ARGUMENT, UNSUPPORTED_AUDIO_FORMAT,
   with a field violation per problem), and a target text or a reference song the caller may read (else
   UNKNOWN_REFERENCE) that is READY (else REFERENCE_NOT_READY). Nothing arriving for the idle timeout is
   DEADLINE_EXCEEDED (STREAM_IDLE), before the config as after it.
2. Only then is a session slot taken: at most MEGACITY_KZONE_MAX_VOICE_STREAMS sessions at once; one more is
   RESOURCE_EXHAUSTED (CAPACITY_EXCEEDED) with RetryInfo and a QuotaFailure. The asr server is asked whether its
   model is loaded (GetModelInfo); unreachable or loading is UNAVAILABLE (MODEL_NOT_READY) with RetryInfo.
3. Audio chunks (PCM16 bytes; an odd trailing byte is carried to the next chunk) go, in order, to
   - the asr server's Transcribe stream (a bounded queue: when the recogniser lags by more than
     ASR_QUEUE_CHUNKS chunks the session stops reading the client, so gRPC flow control holds the client back);
     its partials and final segments come back as TranscriptUpdate events as soon as they arrive;
   - the pitch and rhythm trackers, run on the event loop (about 1 ms per 100 ms chunk); every EVENT_PERIOD
     seconds of audio the session sends a PitchTrack (with the reference's pitch aligned to the same frames), a
     LoudnessTrack and a RhythmUpdate; every SCORES_PERIOD seconds of audio, and after each final transcript
     segment, running VoiceScores (computed in a worker thread);
   - the media store, as raw PCM16 mono 16 kHz little-endian under
     `kzone/<zone>/<org>/results/<user>/<session>/recording.pcm` (streamed: a WAV header would need the length
     up front; the format is fixed, so the key's `.pcm` says all a reader needs). A session that fails leaves
     no object.
4. When the client half-closes: the trackers and the asr stream are finished, the final VoiceReport is computed
   (services/kzone/voice_report.py, in a worker thread), stored with KZoneStore.add_result (source live, the
   reference, the recording's key) and sent as the last event (final_result).
A cancelled call or a passed deadline ends the session at once: its tasks are cancelled, the asr call is
cancelled (the asr server frees its stream), the partial recording is removed and the slot is given back.

An upload (`VoiceAnalysis.upload`): decoded with PyAV in a worker thread, recognised whole (TranscribeAudio),
pitch and rhythm over the whole clip (in a worker thread), the same report, the upload kept in the media store
under `kzone/<zone>/<org>/results/<user>/<upload>/upload.<ext>`, stored with source upload.

Any signed-in person may analyse; results belong to the caller (their zone, organisation and user).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeAlias

import grpc
import numpy as np
import structlog
from numpy.typing import NDArray

from megacity.asr.v1 import asr_service_pb2 as asr_pb
from megacity.asr.v1 import asr_service_pb2_grpc
from megacity.asr.v1 import resources_pb2 as asr_res
from megacity.kzone.v1 import kzone_service_pb2 as pb
from megacity.kzone.v1 import resources_pb2 as res
from services.inference.streams import RequestReader, StreamSlots, first_config, require_payload
from services.kzone import contents
from services.kzone.decoding import UndecodableMedia, decode_audio
from services.kzone.pitch import PitchFrames, PitchTracker, concatenate_frames, track_pitch
from services.kzone.pronunciation import RecognisedWord
from services.kzone.rhythm import RhythmTracker, analyse_rhythm, compare_timing
from services.kzone.store import KZoneStore, Owner
from services.kzone.voice_report import (
    FRAME_PERIOD,
    TIMING_TOLERANCE,
    Performance,
    ReferenceSong,
    build_report,
    has_words,
    reference_song,
    running_scores,
    seconds_duration,
)
from services.runtime.channels import ChannelFactory
from services.runtime.database import TenantScope
from services.runtime.errors import (
    DeadlineExceeded,
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
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

_log = structlog.get_logger("megacity.kzone.voice")

Floats: TypeAlias = NDArray[np.float64]

SAMPLE_RATE = 16_000
BYTES_PER_SECOND = SAMPLE_RATE * 2
MAX_CHUNK_BYTES = 1024 * 1024
MAX_UPLOAD_BYTES = contents.MAX_MEDIA_BYTES["song"]
EVENT_PERIOD = 0.5
SCORES_PERIOD = 2.0
# Audio handed to the asr stream and not yet taken by it, in chunks; past it the session stops reading the client.
ASR_QUEUE_CHUNKS = 50
# Requests read ahead of the session.
READ_AHEAD_ITEMS = 8
# The recording is written to the media store in pieces of about this much.
RECORDING_FLUSH_BYTES = BYTES_PER_SECOND
MODEL_RETRY_SECONDS = 2.0
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


@dataclass(frozen=True)
class VoiceSettings:
    """| variable | default | meaning |
    | MEGACITY_KZONE_MAX_VOICE_STREAMS | 8 | live voice sessions at once; more get RESOURCE_EXHAUSTED |
    | MEGACITY_KZONE_VOICE_IDLE_SECONDS | 15 | no message for this long ends a stream: DEADLINE_EXCEEDED (STREAM_IDLE) |
    | MEGACITY_KZONE_MAX_VOICE_SECONDS | 900 | audio of one live stream at most (PAYLOAD_TOO_LARGE past it) |
    """

    max_streams: int = 8
    idle_timeout: float = 15.0
    max_seconds: float = 900.0

    @classmethod
    def from_environment(cls) -> VoiceSettings:
        return cls(
            max_streams=int(_env_float("MEGACITY_KZONE_MAX_VOICE_STREAMS", 8)),
            idle_timeout=_env_float("MEGACITY_KZONE_VOICE_IDLE_SECONDS", 15.0),
            max_seconds=_env_float("MEGACITY_KZONE_MAX_VOICE_SECONDS", 900.0),
        )


@dataclass(frozen=True)
class Target:
    """What the learner practises: the text scored for pronunciation ('' when none), the reference song, and the
    language to recognise ('' = let the recogniser detect it)."""

    text: str
    reference: ReferenceSong | None
    language: str


def _reading_scope(person: AccessClaims) -> TenantScope:
    return TenantScope.platform() if person.role == "super_admin" else TenantScope.zone(person.zone_id)


def _owner(person: AccessClaims) -> Owner:
    return Owner(zone_id=person.zone_id, org_id=person.org_id, user_id=person.user_id)


def _result_prefix(person: AccessClaims, session_id: str) -> str:
    return f"kzone/{person.zone_id}/{person.org_id}/results/{person.user_id}/{session_id}"


def check_format(violations: Violations, encoding: int, sample_rate: int, channels: int, prefix: str) -> None:
    violations.check(
        encoding == res.AUDIO_ENCODING_PCM16,
        f"{prefix}encoding",
        "AUDIO_ENCODING_PCM16 (signed 16-bit little-endian PCM) is the only live encoding",
    )
    violations.check(
        sample_rate == SAMPLE_RATE, f"{prefix}sample_rate_hertz", f"must be {SAMPLE_RATE} (resample first)"
    )
    violations.check(channels in (0, 1), f"{prefix}channel_count", "must be 1 (mono; 0 is read as 1)")


def check_target(violations: Violations, target_text: str, reference_id: str, language: str, prefix: str) -> None:
    if target_text and reference_id:
        violations.add(f"{prefix}reference_id", "set target_text or reference_id, not both")
    elif not target_text and not reference_id:
        violations.add(f"{prefix}target_text", "required: the text to pronounce, or a reference_id")
    elif target_text:
        violations.check(has_words(target_text), f"{prefix}target_text", "must contain words")
        violations.check(
            len(target_text) <= contents.MAX_LYRICS, f"{prefix}target_text", f"at most {contents.MAX_LYRICS} characters"
        )
    violations.check(len(reference_id) <= 64, f"{prefix}reference_id", "a reference's id")
    violations.check(
        not language or (len(language) <= 35 and _LANGUAGE.fullmatch(language) is not None),
        f"{prefix}language",
        "a BCP-47 language tag (ko, en, ja, en-US)",
    )


def _asr_language(language: str) -> str:
    return language.split("-")[0].lower()


def _asr_failure(error: grpc.aio.AioRpcError) -> ServiceError | grpc.aio.AioRpcError:
    """What the caller hears of a failed asr call."""
    code = error.code()
    status = status_from_error(error)
    info = error_info(status)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(
            "the speech recogniser is not ready; retry shortly",
            retry_after_seconds=MODEL_RETRY_SECONDS,
            reason=ErrorReason.ERROR_REASON_MODEL_NOT_READY,
            metadata={"model": "asr"},
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(
            "the speech recogniser is busy; retry shortly",
            retry_after_seconds=1.0,
            reason=ErrorReason.ERROR_REASON_CAPACITY_EXCEEDED,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("the speech recogniser timed out", reason=ErrorReason.ERROR_REASON_DEADLINE_EXCEEDED)
    if code == grpc.StatusCode.FAILED_PRECONDITION:  # a language the loaded model cannot recognise
        reason = ErrorReason.Value(f"ERROR_REASON_{info.reason}") if info and info.reason else None
        return FailedPrecondition(error.details() or "the recogniser cannot take this stream", reason=reason)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = [(f"config.{name.removeprefix('config.')}", text) for name, text in field_violations(status)]
        return InvalidArgument(error.details() or "the recogniser refused the audio", violations or [("audio", "")])
    return error


def _pcm16(data: bytes) -> NDArray[np.float32]:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


class VoiceAnalysis:
    """Voice sessions and uploads of one kzone servicer."""

    def __init__(
        self, store: KZoneStore, media: MediaStore, channels: ChannelFactory, settings: VoiceSettings | None = None
    ) -> None:
        self.settings = settings or VoiceSettings.from_environment()
        self.slots = StreamSlots(self.settings.max_streams, "voice streams")
        self._store = store
        self._media = media
        self._channels = channels

    @property
    def active_sessions(self) -> int:
        return self.slots.active

    def _asr(self) -> asr_service_pb2_grpc.AsrServiceStub:
        return asr_service_pb2_grpc.AsrServiceStub(self._channels.channel("asr"))

    async def _require_model(self) -> None:
        try:
            info = await self._asr().GetModelInfo(asr_pb.GetModelInfoRequest(), timeout=3.0)
        except grpc.aio.AioRpcError as error:
            _log.warning("kzone.asr_unreachable", code=error.code().name, details=error.details())
            ready = False
        else:
            ready = info.model.ready
        if not ready:
            raise Unavailable(
                "the speech recogniser is not ready; retry shortly",
                retry_after_seconds=MODEL_RETRY_SECONDS,
                reason=ErrorReason.ERROR_REASON_MODEL_NOT_READY,
                metadata={"model": "asr"},
            )

    async def _target(
        self, person: AccessClaims, target_text: str, reference_id: str, language: str, start: float, field: str
    ) -> Target:
        if not reference_id:
            return Target(target_text.strip(), None, language)
        try:
            stored = await self._store.content(_reading_scope(person), reference_id)
        except NotFound:
            stored = None
        if stored is None or not contents.may_read(person, stored.facts) or stored.kind != "song":
            raise InvalidArgument(
                "no such reference song",
                [(field, "a song you may practise (ListReferenceContents)")],
                reason=ErrorReason.ERROR_REASON_UNKNOWN_REFERENCE,
                metadata={"reference_id": reference_id[:64]},
            )
        features = None
        if stored.facts.status == contents.READY:
            facts = stored.facts
            features = await self._store.features(TenantScope.org(facts.zone_id, facts.org_id), reference_id)
        if features is None:
            raise InvalidArgument(
                "the reference is not ready to practise against",
                [(field, "a READY reference")],
                reason=ErrorReason.ERROR_REASON_REFERENCE_NOT_READY,
                metadata={"status": res.ReferenceStatus.Name(stored.message.status)},
            )
        song = reference_song(stored.message, features, start)
        return Target(song.target_text, song, language or song.language)

    # --- live -------------------------------------------------------------------------------------------------

    async def stream(
        self, person: AccessClaims, requests: AsyncIterator[pb.AnalyzeVoiceRequest]
    ) -> AsyncIterator[pb.AnalyzeVoiceResponse]:
        reader = RequestReader(
            requests,
            size=lambda request: len(request.audio),
            max_items=READ_AHEAD_ITEMS,
            max_bytes=2 * MAX_CHUNK_BYTES,
            idle_timeout=self.settings.idle_timeout,
        )
        async with reader:
            first = await first_config(reader, "required in the first message, before any audio")
            config = first.config
            violations = Violations()
            check_format(violations, config.encoding, config.sample_rate_hertz, config.channel_count, "config.")
            if violations:
                raise InvalidArgument(
                    "the audio format is not supported",
                    violations.items(),
                    reason=ErrorReason.ERROR_REASON_UNSUPPORTED_AUDIO_FORMAT,
                )
            check_target(violations, config.target_text, config.reference_id, config.language, "config.")
            start = config.reference_start_offset.ToNanoseconds() / 1e9
            violations.check(start >= 0, "config.reference_start_offset", "must not be negative")
            violations.raise_if_any("the stream's config is invalid")
            # The slot is taken once the config is in: a refusal reaches a client that waits after its config
            # (grpc's asyncio client reports a status that arrives while it writes as INTERNAL, grpc/grpc#36066).
            with self.slots.hold():
                target = await self._target(
                    person, config.target_text, config.reference_id, config.language, start, "config.reference_id"
                )
                await self._require_model()
                session = _LiveSession(self, person, target, config, reader)
                async for response in session.run():
                    yield response

    # --- uploads ----------------------------------------------------------------------------------------------

    async def upload(self, person: AccessClaims, request: pb.AnalyzeVoiceFileRequest) -> res.AnalysisResult:
        violations = Violations()
        if not request.HasField("file"):
            violations.add("file", "required: the recording as the request body, with its Content-Type")
        check_target(violations, request.target_text, request.reference_id, request.language, "")
        violations.raise_if_any()
        extension = contents.check_media("song", request.file.content_type, len(request.file.data))
        target = await self._target(
            person, request.target_text, request.reference_id, request.language, 0.0, "reference_id"
        )
        try:
            decoded = await asyncio.to_thread(decode_audio, request.file.data)
        except UndecodableMedia as error:
            raise InvalidArgument(
                str(error),
                [("file.data", "audio FFmpeg can decode")],
                reason=ErrorReason.ERROR_REASON_UNSUPPORTED_MEDIA_TYPE,
            ) from None
        samples = decoded.samples
        await self._require_model()
        pcm = (np.clip(samples, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()
        recognition = asr_res.RecognitionConfig(
            encoding=asr_res.AUDIO_ENCODING_PCM16,
            sample_rate_hertz=SAMPLE_RATE,
            channel_count=1,
            language=_asr_language(target.language),
            word_timestamps=True,
        )
        # Pitch and rhythm run in a worker thread while the recogniser works.
        transcription = self._asr().TranscribeAudio(
            asr_pb.TranscribeAudioRequest(config=recognition, audio=pcm), timeout=max(30.0, decoded.duration)
        )
        outcomes = await asyncio.gather(
            transcription, asyncio.to_thread(_analyse_clip, samples), return_exceptions=True
        )
        reply, clip = outcomes
        if isinstance(reply, grpc.aio.AioRpcError):
            raise _asr_failure(reply) from None
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(clip, BaseException):
            raise clip
        pitch, rhythm = clip
        words = [
            RecognisedWord(
                w.word, w.start_offset.ToNanoseconds() / 1e9, w.end_offset.ToNanoseconds() / 1e9, w.probability
            )
            for segment in reply.segments
            for w in segment.words
        ]
        performance = Performance(
            duration=decoded.duration,
            transcript=" ".join(segment.text.strip() for segment in reply.segments if segment.text.strip()),
            words=words,
            language=target.language or reply.summary.language,
            pitch=pitch,
            onsets=rhythm.onsets,
            tempo_bpm=rhythm.tempo_bpm,
        )
        report = await asyncio.to_thread(build_report, performance, target.text, target.reference)
        key = f"{_result_prefix(person, uuid.uuid4().hex)}/upload.{extension}"
        await self._media.put(key, request.file.data)
        try:
            return await self._store.add_result(
                _owner(person),
                report,
                source="upload",
                reference_id=target.reference.content_id if target.reference else "",
                input_media_uri=key,
            )
        except BaseException:
            await _delete_quietly(self._media, key)
            raise


def _analyse_clip(samples: NDArray[np.float32]) -> tuple[PitchFrames, _ClipRhythm]:
    rhythm = analyse_rhythm(samples, SAMPLE_RATE)
    return track_pitch(samples, SAMPLE_RATE), _ClipRhythm(rhythm.onsets, rhythm.tempo_bpm)


@dataclass(frozen=True)
class _ClipRhythm:
    onsets: Floats
    tempo_bpm: float | None


async def _delete_quietly(media: MediaStore, key: str) -> None:
    try:
        await media.delete(key)
    except (OSError, ValueError) as error:
        _log.error("kzone.media_delete_failed", key=key, error=str(error))


# --- one live session ----------------------------------------------------------------------------------------


class _Done:
    """A producer of the session finished (the audio pump or the asr reader)."""

    def __init__(self, name: str) -> None:
        self.name = name


@dataclass
class _Transcript:
    finals: list[str] = field(default_factory=list)
    words: list[RecognisedWord] = field(default_factory=list)
    language: str = ""


class _LiveSession:
    def __init__(
        self,
        analysis: VoiceAnalysis,
        person: AccessClaims,
        target: Target,
        config: res.VoiceStreamConfig,
        reader: RequestReader[pb.AnalyzeVoiceRequest],
    ) -> None:
        self._analysis = analysis
        self._person = person
        self._target = target
        self._reader = reader
        self._events: asyncio.Queue[pb.AnalyzeVoiceResponse | BaseException | _Done] = asyncio.Queue()
        self._to_asr: asyncio.Queue[bytes | None] = asyncio.Queue(ASR_QUEUE_CHUNKS)
        self._pitch = PitchTracker(SAMPLE_RATE)
        self._rhythm = RhythmTracker(SAMPLE_RATE)
        self._pitch_parts: list[PitchFrames] = []
        self._pending_pitch: list[PitchFrames] = []
        self._onsets: list[Floats] = []
        self._pending_onsets: list[Floats] = []
        self._samples = 0
        self._last_event_samples = 0
        self._last_scores_samples = 0
        self._transcript = _Transcript()
        self._recognition = asr_res.RecognitionConfig(
            encoding=asr_res.AUDIO_ENCODING_PCM16,
            sample_rate_hertz=SAMPLE_RATE,
            channel_count=1,
            language=_asr_language(target.language),
            partial_results=True,
            word_timestamps=True,
        )
        self.session_id = uuid.uuid4().hex

    @property
    def _seconds(self) -> float:
        return self._samples / SAMPLE_RATE

    def _response(self) -> pb.AnalyzeVoiceResponse:
        return pb.AnalyzeVoiceResponse(audio_offset=seconds_duration(self._seconds))

    async def run(self) -> AsyncIterator[pb.AnalyzeVoiceResponse]:
        analysis = self._analysis
        key = f"{_result_prefix(self._person, self.session_id)}/recording.pcm"
        # The asr call's deadline: the session's longest audio, capped by the served call's own deadline.
        call = analysis._asr().Transcribe(self._asr_requests(), timeout=analysis.settings.max_seconds * 2 + 60)
        started = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []
        try:
            async with analysis._media.writer(key) as recording:
                tasks = [
                    asyncio.create_task(self._guarded("audio", self._pump_audio(recording.write)), name="voice-audio"),
                    asyncio.create_task(self._guarded("asr", self._read_asr(call)), name="voice-asr"),
                ]
                running = {"audio", "asr"}
                while running:
                    item = await self._events.get()
                    if isinstance(item, _Done):
                        running.discard(item.name)
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield item
            report = await asyncio.to_thread(
                build_report, self._performance(), self._target.text, self._target.reference
            )
            try:
                stored = await analysis._store.add_result(
                    _owner(self._person),
                    report,
                    source="live",
                    reference_id=self._target.reference.content_id if self._target.reference else "",
                    input_media_uri=key,
                )
            except BaseException:
                await _delete_quietly(analysis._media, key)
                raise
            _log.info(
                "kzone.voice_done",
                audio_seconds=round(self._seconds, 2),
                wall_seconds=round(time.perf_counter() - started, 2),
                result_id=stored.id,
            )
            final = self._response()
            final.final_result.CopyFrom(stored)
            yield final
        finally:
            for task in tasks:
                task.cancel()
            call.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task

    async def _guarded(self, name: str, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # the session's loop raises it
            self._events.put_nowait(error)
        else:
            self._events.put_nowait(_Done(name))

    async def _asr_requests(self) -> AsyncIterator[asr_pb.TranscribeRequest]:
        yield asr_pb.TranscribeRequest(config=self._recognition)
        while True:
            chunk = await self._to_asr.get()
            if chunk is None:
                return
            yield asr_pb.TranscribeRequest(audio=chunk)

    async def _read_asr(
        self, call: grpc.aio.StreamStreamCall[asr_pb.TranscribeRequest, asr_pb.TranscribeResponse]
    ) -> None:
        transcript = self._transcript
        try:
            async for response in call:
                kind = response.WhichOneof("event")
                event = self._response()
                if kind == "partial":
                    partial = response.partial
                    event.transcript.CopyFrom(
                        res.TranscriptUpdate(
                            is_final=False,
                            text=f"{partial.stable_text} {partial.unstable_text}".strip(),
                            start_offset=partial.start_offset,
                            end_offset=partial.end_offset,
                        )
                    )
                elif kind == "segment":
                    segment = response.segment
                    words = [
                        res.TranscriptWord(
                            word=word.word,
                            start_offset=word.start_offset,
                            end_offset=word.end_offset,
                            confidence=word.probability,
                        )
                        for word in segment.words
                    ]
                    transcript.finals.append(segment.text.strip())
                    transcript.words.extend(
                        RecognisedWord(
                            word.word,
                            word.start_offset.ToNanoseconds() / 1e9,
                            word.end_offset.ToNanoseconds() / 1e9,
                            word.probability,
                        )
                        for word in segment.words
                    )
                    transcript.language = segment.language or transcript.language
                    event.transcript.CopyFrom(
                        res.TranscriptUpdate(
                            is_final=True,
                            text=segment.text.strip(),
                            start_offset=segment.start_offset,
                            end_offset=segment.end_offset,
                            words=words,
                        )
                    )
                else:
                    transcript.language = response.end_of_stream.language or transcript.language
                    continue
                self._events.put_nowait(event)
                if kind == "segment":
                    await self._emit_scores()
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED:
                raise asyncio.CancelledError from None
            raise _asr_failure(error) from None

    async def _pump_audio(self, record: Callable[[bytes], Awaitable[None]]) -> None:
        carry = b""
        unwritten: list[bytes] = []
        unwritten_bytes = 0
        index = 0
        max_samples = int(self._analysis.settings.max_seconds * SAMPLE_RATE)
        while True:
            request = await self._reader.next()
            index += 1
            if request is None:
                break
            require_payload(request, "audio", index)
            if len(request.audio) > MAX_CHUNK_BYTES:
                raise InvalidArgument(
                    f"audio chunk of {len(request.audio)} bytes exceeds {MAX_CHUNK_BYTES}",
                    [("audio", f"at most {MAX_CHUNK_BYTES} bytes per message (message {index})")],
                    reason=ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
                )
            data = carry + request.audio
            whole = len(data) - len(data) % 2
            data, carry = data[:whole], data[whole:]
            if not data:
                continue
            if self._samples + whole // 2 > max_samples:
                raise InvalidArgument(
                    f"a live stream carries at most {self._analysis.settings.max_seconds:g} s of audio",
                    [("audio", "end the stream and start another")],
                    reason=ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
                )
            await self._to_asr.put(data)
            samples = _pcm16(data)
            self._samples += samples.size
            self._track(self._pitch.push(samples), self._rhythm.push(samples))
            unwritten.append(data)
            unwritten_bytes += len(data)
            if unwritten_bytes >= RECORDING_FLUSH_BYTES:
                await record(b"".join(unwritten))
                unwritten, unwritten_bytes = [], 0
            if self._samples - self._last_event_samples >= EVENT_PERIOD * SAMPLE_RATE:
                self._emit_tracks()
            if self._samples - self._last_scores_samples >= SCORES_PERIOD * SAMPLE_RATE:
                await self._emit_scores()
        await self._to_asr.put(None)
        if unwritten:
            await record(b"".join(unwritten))
        self._track(self._pitch.finish(), self._rhythm.finish())
        self._emit_tracks()

    def _track(self, pitch: PitchFrames, onsets: Floats) -> None:
        if len(pitch):
            self._pitch_parts.append(pitch)
            self._pending_pitch.append(pitch)
        if onsets.size:
            self._onsets.append(onsets)
            self._pending_onsets.append(onsets)

    def _emit_tracks(self) -> None:
        self._last_event_samples = self._samples
        period = seconds_duration(FRAME_PERIOD)
        if self._pending_pitch:
            frames = concatenate_frames(self._pending_pitch)
            self._pending_pitch = []
            pitch = self._response()
            pitch.pitch.start_offset.CopyFrom(seconds_duration(frames.start_time))
            pitch.pitch.frame_period.CopyFrom(period)
            pitch.pitch.frequency_hz.extend(frames.frequency_hz.tolist())
            reference = self._target.reference
            if reference is not None:
                pitch.pitch.reference_hz.extend(reference.pitch_at(frames.first_frame, len(frames)).tolist())
            self._events.put_nowait(pitch)
            loudness = self._response()
            loudness.loudness.start_offset.CopyFrom(seconds_duration(frames.start_time))
            loudness.loudness.frame_period.CopyFrom(period)
            loudness.loudness.loudness_db.extend(frames.loudness_db.tolist())
            self._events.put_nowait(loudness)
        onsets = np.concatenate(self._pending_onsets) if self._pending_onsets else np.zeros(0)
        self._pending_onsets = []
        rhythm = self._response()
        rhythm.rhythm.onsets.extend(seconds_duration(onset) for onset in onsets.tolist())
        rhythm.rhythm.tempo_bpm = self._rhythm.tempo_bpm() or 0.0
        reference = self._target.reference
        if reference is not None:
            rhythm.rhythm.reference_tempo_bpm = reference.tempo_bpm
            heard = np.concatenate(self._onsets) if self._onsets else np.zeros(0)
            beats = reference.beats_until(self._seconds)
            offset = compare_timing(heard, beats, TIMING_TOLERANCE).mean_offset if heard.size and beats.size else None
            if offset is not None:
                rhythm.rhythm.mean_timing_offset.FromNanoseconds(round(offset * 1e9))
        self._events.put_nowait(rhythm)

    async def _emit_scores(self) -> None:
        self._last_scores_samples = self._samples
        scores = await asyncio.to_thread(running_scores, self._performance(), self._target.text, self._target.reference)
        if scores.ListFields():
            event = self._response()
            event.scores.CopyFrom(scores)
            self._events.put_nowait(event)

    def _performance(self) -> Performance:
        transcript = self._transcript
        return Performance(
            duration=self._seconds,
            transcript=" ".join(text for text in transcript.finals if text),
            words=list(transcript.words),
            language=self._target.language or transcript.language,
            pitch=concatenate_frames(self._pitch_parts) if self._pitch_parts else None,
            onsets=np.concatenate(self._onsets) if self._onsets else np.zeros(0),
            tempo_bpm=self._rhythm.tempo_bpm(),
        )


# --- attaching to the servicer -------------------------------------------------------------------------------
