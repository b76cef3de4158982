"""The extraction worker: turns uploaded reference media into the features learners practise against.

Every kzone replica runs it beside its RPCs (services/kzone/server.py). Every POLL seconds it claims one PROCESSING
reference of any tenant (KZoneStore.claim_extraction: row locks skipped by concurrent claims keep two workers from
ever holding the same one), extracts its features, and ends it with finish_processing (READY) or fail_processing
(FAILED with a reason for people), naming the extraction (the upload's id) and its claim. While it works it renews
the claim's heartbeat every HEARTBEAT seconds; a claim whose heartbeat stops for STALE seconds (its replica died) is
taken over by another worker, and a reference that was claimed MAX_CLAIMS times and went stale again fails.

- Song (audio): decoded to mono 16 kHz (services/kzone/decoding.py); the words with timestamps from the asr server
  (TranscribeAudio in the reference's language, its lyrics as the prompt); the pitch contour over the whole song
  (services/kzone/pitch.py) as a PitchTrack; onsets and tempo (services/kzone/rhythm.py) for the beat grid: the
  creator's tempo and first downbeat when given, else the detected ones.
- Choreography (video): frames at FRAME_RATE (default 15 fps) to the pose server's DetectPose stream, one pose per
  frame with a person; the poses (services/kzone/choreography.py PoseSequence) encoded by
  services/kzone/dance.encode_keypoints into the media store at contents.keypoints_key; beats from the video's
  audio track when it has one, else from the creator's tempo.

CPU work (decoding, pitch, rhythm, frame scaling, encoding) runs in threads, never on the event loop: FFmpeg and
numpy's FFTs release the GIL (measured: analysing a 3 min song in a thread, 0.8 s, kept the event loop's lag under
6 ms, so no process pool). Songs longer than CLIP_SECONDS go to the asr server in pieces; a word cut at a piece's
boundary may be split or lost. A model server that answers UNAVAILABLE (down, model loading) or RESOURCE_EXHAUSTED
(all its streams busy) is retried with backoff for up to MODEL_WAIT seconds before the reference fails. Media that
cannot be decoded, audio without words, a video without a person, and a model server's refusal fail at once.

When a reference's media is replaced (or it is deleted) while its extraction runs, finishing or failing writes
nothing: the work is dropped quietly, and the keypoints it stored are deleted when no extraction can use them.

| variable                                     | default | meaning                                            |
|----------------------------------------------|---------|----------------------------------------------------|
| MEGACITY_KZONE_EXTRACTION_WORKERS            | 1       | extractions at once per replica (0: no worker)     |
| MEGACITY_KZONE_EXTRACTION_POLL_SECONDS       | 2       | wait between looks when nothing is waiting         |
| MEGACITY_KZONE_EXTRACTION_HEARTBEAT_SECONDS  | 5       | how often a claim is renewed                       |
| MEGACITY_KZONE_EXTRACTION_STALE_SECONDS      | 60      | a claim not renewed for this long is taken over    |
| MEGACITY_KZONE_EXTRACTION_MAX_CLAIMS         | 3       | claims that went stale before the reference fails  |
| MEGACITY_KZONE_EXTRACTION_FRAME_RATE         | 15      | video frames per second sent to the pose server    |
| MEGACITY_KZONE_EXTRACTION_MODEL_WAIT_SECONDS | 300     | how long a model server may be unavailable         |
| MEGACITY_KZONE_EXTRACTION_CALL_SECONDS       | 1800    | deadline of one model call (a clip, a pose stream) |
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import grpc
import numpy as np
import structlog
from google.protobuf import duration_pb2
from numpy.typing import NDArray
from PIL import Image

from megacity.asr.v1 import asr_service_pb2 as asr_pb
from megacity.asr.v1 import asr_service_pb2_grpc
from megacity.asr.v1 import resources_pb2 as asr_res
from megacity.kzone.v1 import resources_pb2 as res
from megacity.pose.v1 import pose_service_pb2 as pose_pb
from megacity.pose.v1 import pose_service_pb2_grpc
from megacity.pose.v1 import resources_pb2 as pose_res
from services.kzone import contents
from services.kzone.choreography import LANDMARK_COUNT, PoseSequence
from services.kzone.dance import encode_keypoints
from services.kzone.decoding import (
    ANALYSIS_SAMPLE_RATE,
    DecodedAudio,
    DecodedFrame,
    UndecodableMedia,
    decode_audio,
    decode_video_frames,
)
from services.kzone.pitch import PitchFrames, PitchTracker, concatenate_frames
from services.kzone.rhythm import RhythmSettings, RhythmTracker
from services.kzone.store import MAX_CLAIMS, ClaimedExtraction, KZoneStore
from services.runtime.channels import ChannelFactory
from services.runtime.claims import keep_claim, poll_forever
from services.runtime.config import ConfigError, env_int, env_number
from services.runtime.media import MediaNotFound, MediaStore

_log = structlog.get_logger("megacity.kzone.extraction")
_T = TypeVar("_T")

# Analysis runs over blocks of this many seconds: the trackers compute a block's frames as one matrix, which for a
# whole song would take gigabytes.
_BLOCK_SECONDS = 10.0
# The asr server's clips are at most 600 s by default; longer songs go in pieces of this length.
CLIP_SECONDS = 300.0
# The asr server takes a prompt of at most 1000 characters.
_MAX_PROMPT_CHARS = 1000
# Frames larger than this (longest side, pixels) are scaled down before they go to the pose server: the model sees
# 256 x 256 anyway, and a 1080p frame is 6 MB on the wire.
MAX_FRAME_SIDE = 640
_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 30.0
# Codes a model server gives while it cannot serve now but may soon: down or loading (UNAVAILABLE), every stream
# slot taken (RESOURCE_EXHAUSTED).
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class ExtractionSettings:
    workers: int = 1
    poll_seconds: float = 2.0
    heartbeat_seconds: float = 5.0
    # Several missed heartbeats, so a database hiccup does not hand a live extraction to a second worker.
    stale_after_seconds: float = 60.0
    max_claims: int = MAX_CLAIMS
    frame_rate: float = 15.0
    model_wait_seconds: float = 300.0
    call_timeout_seconds: float = 1800.0

    def __post_init__(self) -> None:
        if self.heartbeat_seconds >= self.stale_after_seconds:
            raise ConfigError(
                f"the extraction heartbeat ({self.heartbeat_seconds:g} s) must be shorter than the time after which "
                f"a claim is taken over ({self.stale_after_seconds:g} s)"
            )
        if self.frame_rate <= 0 or self.poll_seconds <= 0 or self.heartbeat_seconds <= 0 or self.max_claims < 1:
            raise ConfigError("extraction frame rate, poll and heartbeat must be positive, max claims at least 1")

    @classmethod
    def from_environment(cls) -> ExtractionSettings:
        prefix = "MEGACITY_KZONE_EXTRACTION_"
        return cls(
            workers=env_int(f"{prefix}WORKERS", 1),
            poll_seconds=env_number(f"{prefix}POLL_SECONDS", 2.0, minimum=0.01),
            heartbeat_seconds=env_number(f"{prefix}HEARTBEAT_SECONDS", 5.0, minimum=0.01),
            stale_after_seconds=env_number(f"{prefix}STALE_SECONDS", 60.0, minimum=0.02),
            max_claims=env_int(f"{prefix}MAX_CLAIMS", MAX_CLAIMS, minimum=1),
            frame_rate=env_number(f"{prefix}FRAME_RATE", 15.0, minimum=0.1),
            model_wait_seconds=env_number(f"{prefix}MODEL_WAIT_SECONDS", 300.0),
            call_timeout_seconds=env_number(f"{prefix}CALL_SECONDS", 1800.0, minimum=1.0),
        )


class ExtractionFailed(Exception):
    """The reference cannot be extracted: it fails with this message, meant for its creator."""


@dataclass(frozen=True)
class Extracted:
    """What finish_processing writes; `keypoints_key` is the object the extraction stored ("" for songs)."""

    features: res.ReferenceFeatures
    duration_seconds: float
    tempo_bpm: float
    first_downbeat_seconds: float | None
    keypoints_key: str = ""


@dataclass(frozen=True)
class Beats:
    """A beat grid: the tempo and first downbeat it uses, the detected ones (0 / None: none found), and its times."""

    times: list[float]
    detected_tempo_bpm: float
    detected_first_downbeat: float | None


# --- pure helpers -------------------------------------------------------------------------------------------------


def beat_phase(onsets: NDArray[np.float64], period: float) -> float:
    """The offset in [0, period) of the beat grid that onsets fall on best: the circular mean of their phases
    (0 when there are none)."""
    if onsets.size == 0 or period <= 0:
        return 0.0
    angles = 2 * math.pi * (onsets % period) / period
    mean = math.atan2(float(np.sin(angles).sum()), float(np.cos(angles).sum()))
    return float(mean % (2 * math.pi) / (2 * math.pi) * period) % period


def beat_times(duration: float, tempo_bpm: float, first_downbeat: float) -> list[float]:
    """Beats at `tempo_bpm` through `first_downbeat`, from the start of the media to its end (pickup beats before
    the first downbeat included)."""
    if tempo_bpm <= 0 or duration <= 0:
        return []
    period = 60.0 / tempo_bpm
    first = first_downbeat - math.floor(first_downbeat / period + 1e-9) * period
    count = max(0, math.ceil((duration - first) / period - 1e-9))
    return [round(first + index * period, 6) for index in range(count)]


def beat_grid(
    onsets: NDArray[np.float64] | None,
    detected_tempo: float | None,
    duration: float,
    *,
    given_tempo: float,
    given_downbeat: float | None,
) -> Beats:
    """The beats of a media: the creator's tempo wins over the detected one, their first downbeat over the one the
    onsets suggest (the first beat of the grid the onsets fall on best). Without any tempo there are no beats.
    `onsets` is None when the media has no audio."""
    tempo = given_tempo or detected_tempo or 0.0
    detected_downbeat: float | None = None
    if tempo > 0 and onsets is not None and onsets.size:
        detected_downbeat = beat_phase(onsets, 60.0 / tempo)
    downbeat = given_downbeat if given_downbeat is not None else (detected_downbeat or 0.0)
    return Beats(beat_times(duration, tempo, downbeat), detected_tempo or 0.0, detected_downbeat)


def fit_within(rgb: NDArray[np.uint8], max_side: int) -> NDArray[np.uint8]:
    """The frame scaled down (aspect kept) so that its longer side is at most `max_side`; as it is when it fits."""
    height, width = rgb.shape[:2]
    longest = max(height, width)
    if longest <= max_side:
        return rgb
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


def frame_rate_of(timestamps: Sequence[float], fallback: float) -> float:
    """Frames per second of timestamps (the median spacing, robust to a dropped frame); `fallback` for one frame."""
    if len(timestamps) < 2:
        return fallback
    return float(1.0 / np.median(np.diff(np.asarray(timestamps, dtype=np.float64))))


def pose_sequence(responses: Sequence[pose_pb.DetectPoseResponse], aspect_ratio: float) -> PoseSequence | None:
    """The first (most confident) person of each frame that has one; None when no frame has."""
    kept = [reply for reply in responses if reply.poses and len(reply.poses[0].landmarks) == LANDMARK_COUNT]
    if not kept:
        return None
    timestamps = np.array([reply.timestamp.ToNanoseconds() / 1e9 for reply in kept], dtype=np.float64)
    landmarks = np.array(
        [[(point.x, point.y, point.z) for point in reply.poses[0].landmarks] for reply in kept], dtype=np.float64
    )
    visibility = np.array([[point.visibility for point in reply.poses[0].landmarks] for reply in kept])
    return PoseSequence(timestamps, landmarks, visibility.astype(np.float64), aspect_ratio=aspect_ratio)


def transcript_words(segments: Sequence[asr_res.TranscriptSegment], offset: float) -> list[res.TranscriptWord]:
    """The recognised words, shifted by `offset` seconds (the clip's place in the song)."""
    words: list[res.TranscriptWord] = []
    for segment in segments:
        for word in segment.words:
            text = word.word.strip()
            if not text:
                continue
            words.append(
                res.TranscriptWord(
                    word=text,
                    start_offset=contents.seconds_duration(offset + _seconds(word.start_offset)),
                    end_offset=contents.seconds_duration(offset + _seconds(word.end_offset)),
                    confidence=word.probability,
                )
            )
    return words


def pcm16(samples: NDArray[np.float32]) -> bytes:
    """Float samples (full scale ±1) as PCM16 little-endian."""
    return bytes((np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())


def prompt_of(lyrics: str) -> str:
    """The lyrics' start, cut at a word, as the asr prompt (it biases recognition towards the expected words)."""
    text = " ".join(lyrics.split())
    if len(text) <= _MAX_PROMPT_CHARS:
        return text
    cut = text[:_MAX_PROMPT_CHARS]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.ToNanoseconds() / 1e9


# --- analysis in threads ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SongAnalysis:
    pitch: PitchFrames
    onsets: NDArray[np.float64]
    tempo_bpm: float | None


def analyse_song(samples: NDArray[np.float32], sample_rate: int) -> _SongAnalysis:
    """Pitch, onsets and tempo of a whole recording, block by block (bounded memory). Runs in a thread."""
    pitch = PitchTracker(sample_rate)
    rhythm = RhythmTracker(sample_rate, replace(RhythmSettings(), tempo_window=None))
    block = int(_BLOCK_SECONDS * sample_rate)
    frames: list[PitchFrames] = []
    onsets: list[NDArray[np.float64]] = []
    for start in range(0, samples.size, block):
        part = samples[start : start + block]
        frames.append(pitch.push(part))
        onsets.append(rhythm.push(part))
    frames.append(pitch.finish())
    onsets.append(rhythm.finish())
    return _SongAnalysis(concatenate_frames(frames), np.concatenate(onsets), rhythm.tempo_bpm())


def analyse_rhythm_only(samples: NDArray[np.float32], sample_rate: int) -> tuple[NDArray[np.float64], float | None]:
    """Onsets and tempo of a whole recording, block by block. Runs in a thread."""
    rhythm = RhythmTracker(sample_rate, replace(RhythmSettings(), tempo_window=None))
    block = int(_BLOCK_SECONDS * sample_rate)
    onsets = [rhythm.push(samples[start : start + block]) for start in range(0, samples.size, block)]
    onsets.append(rhythm.finish())
    return np.concatenate(onsets), rhythm.tempo_bpm()


def pitch_track(frames: PitchFrames) -> res.PitchTrack:
    return res.PitchTrack(
        start_offset=contents.seconds_duration(frames.start_time),
        frame_period=contents.seconds_duration(frames.frame_period),
        frequency_hz=np.round(frames.frequency_hz, 2).tolist(),
    )


def _decode_song(data: bytes) -> tuple[DecodedAudio, bytes]:
    audio = decode_audio(data)
    return audio, pcm16(audio.samples)


def _audio_track(data: bytes) -> DecodedAudio | None:
    """A video's audio, None when it has none (or none that decodes: the beats then come from the given tempo)."""
    try:
        return decode_audio(data)
    except UndecodableMedia:
        return None


@dataclass(frozen=True)
class _Frame:
    timestamp: float
    rgb: bytes
    width: int
    height: int
    source_width: int
    source_height: int


def _next_frame(frames: Iterator[DecodedFrame], max_side: int) -> _Frame | None:
    """The next frame, scaled to fit, as bytes; None at the end. Runs in a thread."""
    decoded = next(frames, None)
    if decoded is None:
        return None
    fitted = fit_within(decoded.rgb, max_side)
    source_height, source_width = decoded.rgb.shape[:2]
    height, width = fitted.shape[:2]
    return _Frame(decoded.timestamp, np.ascontiguousarray(fitted).tobytes(), width, height, source_width, source_height)


# --- the worker ---------------------------------------------------------------------------------------------------


class _ModelUnavailable(Exception):
    pass


class ExtractionWorker:
    def __init__(
        self,
        store: KZoneStore,
        media: MediaStore,
        channels: ChannelFactory,
        settings: ExtractionSettings | None = None,
    ) -> None:
        self._store = store
        self._media = media
        self._channels = channels
        self.settings = settings or ExtractionSettings()

    async def run(self) -> None:
        """Runs for the life of the service; neither a failing extraction nor PostgreSQL being away ends it."""
        await poll_forever(self.process_one, self.settings.poll_seconds, "kzone.extraction.unavailable")

    async def process_one(self) -> bool:
        """Claims one reference and carries its extraction to its end; False when none was waiting."""
        claim = await self._store.claim_extraction(self.settings.stale_after_seconds, self.settings.max_claims)
        if claim is None:
            return False
        log = _log.bind(content_id=claim.content_id, job_id=claim.job_id, kind=claim.kind, claims=claim.claims)
        log.info("kzone.extraction.started")
        started = time.perf_counter()
        work = asyncio.create_task(self._extract(claim), name=f"extract-{claim.content_id}")
        lost = asyncio.Event()

        def withdraw() -> None:
            lost.set()
            work.cancel()

        heartbeat = asyncio.create_task(
            keep_claim(
                lambda: self._store.renew_claim(claim),
                self.settings.heartbeat_seconds,
                withdraw,
                "kzone.extraction.heartbeat_failed",
                content_id=claim.content_id,
            )
        )
        try:
            try:
                extracted = await work
            finally:
                heartbeat.cancel()
        except ExtractionFailed as failure:
            if await self._store.fail_processing(
                claim.content_id, job_id=claim.job_id, error=str(failure), claim_id=claim.claim_id
            ):
                log.info("kzone.extraction.failed", reason=str(failure))
            else:
                log.info("kzone.extraction.dropped", reason="the reference changed while it was extracted")
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if lost.is_set() and (current is None or not current.cancelling()):
                log.info("kzone.extraction.dropped", reason="the claim was lost: media replaced, deleted or taken over")
                await self._forget_keypoints(claim)
                return True
            # The service stops: hand the reference back rather than leave it to go stale.
            work.cancel()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._store.release_claim(claim))
            raise
        except Exception:
            error_id = uuid.uuid4().hex
            log.exception("kzone.extraction.crashed", error_id=error_id)
            await self._store.fail_processing(
                claim.content_id,
                job_id=claim.job_id,
                error=f"the extraction failed unexpectedly (error id {error_id}); upload the media again",
                claim_id=claim.claim_id,
            )
        else:
            written = await self._store.finish_processing(
                claim.content_id,
                extracted.features,
                job_id=claim.job_id,
                duration_seconds=extracted.duration_seconds,
                tempo_bpm=extracted.tempo_bpm,
                first_downbeat_seconds=extracted.first_downbeat_seconds,
                claim_id=claim.claim_id,
            )
            if written:
                log.info("kzone.extraction.ready", seconds=round(time.perf_counter() - started, 3))
            else:
                log.info("kzone.extraction.dropped", reason="the reference changed while it was extracted")
                await self._forget_keypoints(claim)
        return True

    async def _forget_keypoints(self, claim: ClaimedExtraction) -> None:
        """Deletes the keypoints an abandoned choreography extraction may have stored, unless the same upload's
        extraction is still wanted (another worker took it over and writes the same object)."""
        if claim.kind != "choreography":
            return
        try:
            if not await self._store.extraction_current(claim.content_id, claim.job_id):
                await self._media.delete(self._keypoints_key(claim))
        except Exception as error:
            _log.warning("kzone.extraction.keypoints_left", content_id=claim.content_id, error=repr(error))

    @staticmethod
    def _keypoints_key(claim: ClaimedExtraction) -> str:
        return contents.keypoints_key(claim.zone_id, claim.org_id, claim.content_id, claim.job_id)

    async def _extract(self, claim: ClaimedExtraction) -> Extracted:
        try:
            data = await self._media.get(claim.media_uri)
        except MediaNotFound:
            raise ExtractionFailed("the uploaded media is missing from storage; upload it again") from None
        if claim.kind == "song":
            return await self._song(claim, data)
        return await self._choreography(claim, data)

    # --- songs ---------------------------------------------------------------------------------------------------

    async def _song(self, claim: ClaimedExtraction, data: bytes) -> Extracted:
        try:
            audio, pcm = await asyncio.to_thread(_decode_song, data)
        except UndecodableMedia as error:
            raise ExtractionFailed(f"{error}; upload a song in a common audio format (WAV, MP3, AAC, FLAC)") from None
        # The model server works while the analysis runs in a thread here.
        analysis = asyncio.ensure_future(asyncio.to_thread(analyse_song, audio.samples, audio.sample_rate))
        try:
            words = await self._transcribe(pcm, claim.language, claim.lyrics)
            analysed = await analysis
        finally:
            analysis.cancel()
        if not words:
            raise ExtractionFailed("no words were recognised in the audio: a reference song needs its vocals")
        beats = beat_grid(
            analysed.onsets,
            analysed.tempo_bpm,
            audio.duration,
            given_tempo=claim.tempo_bpm,
            given_downbeat=claim.first_downbeat_seconds,
        )
        features = res.ReferenceFeatures(
            pitch=pitch_track(analysed.pitch),
            words=words,
            beats=[contents.seconds_duration(beat) for beat in beats.times],
        )
        return Extracted(features, audio.duration, beats.detected_tempo_bpm, beats.detected_first_downbeat)

    async def _transcribe(self, pcm: bytes, language: str, lyrics: str) -> list[res.TranscriptWord]:
        stub = asr_service_pb2_grpc.AsrServiceStub(self._channels.channel("asr"))
        config = asr_res.RecognitionConfig(
            encoding=asr_res.AUDIO_ENCODING_PCM16,
            sample_rate_hertz=ANALYSIS_SAMPLE_RATE,
            language=language,
            word_timestamps=True,
            initial_prompt=prompt_of(lyrics),
        )
        clip_bytes = int(CLIP_SECONDS * ANALYSIS_SAMPLE_RATE) * 2
        words: list[res.TranscriptWord] = []
        for start in range(0, len(pcm), clip_bytes):
            request = asr_pb.TranscribeAudioRequest(config=config, audio=pcm[start : start + clip_bytes])

            async def transcribe(request: asr_pb.TranscribeAudioRequest = request) -> asr_pb.TranscribeAudioResponse:
                reply: asr_pb.TranscribeAudioResponse = await stub.TranscribeAudio(
                    request, timeout=self.settings.call_timeout_seconds
                )
                return reply

            reply = await self._call_model("speech recognition", transcribe)
            words.extend(transcript_words(reply.segments, start / 2 / ANALYSIS_SAMPLE_RATE))
        return words

    # --- choreographies -------------------------------------------------------------------------------------------

    async def _choreography(self, claim: ClaimedExtraction, data: bytes) -> Extracted:
        audio = asyncio.ensure_future(asyncio.to_thread(_audio_track, data))
        try:
            responses, timestamps, aspect_ratio = await self._call_model("pose", lambda: self._detect_poses(data))
            track = await audio
        finally:
            audio.cancel()
        sequence = pose_sequence(responses, aspect_ratio)
        if sequence is None:
            raise ExtractionFailed(
                f"no person was found in any of the video's {len(timestamps)} frames: a choreography needs its dancer "
                "in the picture"
            )
        rate = frame_rate_of(timestamps, self.settings.frame_rate)
        duration = timestamps[-1] + 1.0 / rate
        onsets: NDArray[np.float64] | None = None
        detected_tempo: float | None = None
        if track is not None:
            duration = max(duration, track.duration)
            onsets, detected_tempo = await asyncio.to_thread(analyse_rhythm_only, track.samples, track.sample_rate)
        beats = beat_grid(
            onsets,
            detected_tempo,
            duration,
            given_tempo=claim.tempo_bpm,
            given_downbeat=claim.first_downbeat_seconds,
        )
        key = self._keypoints_key(claim)
        await self._media.put(key, await asyncio.to_thread(encode_keypoints, sequence))
        features = res.ReferenceFeatures(
            beats=[contents.seconds_duration(beat) for beat in beats.times],
            keypoints_uri=key,
            keypoint_frame_count=len(sequence),
            keypoint_frame_rate=round(rate, 3),
        )
        return Extracted(features, duration, beats.detected_tempo_bpm, beats.detected_first_downbeat, key)

    async def _detect_poses(self, data: bytes) -> tuple[list[pose_pb.DetectPoseResponse], list[float], float]:
        """Streams the video's frames through DetectPose: the responses, the timestamps of every frame sent, and the
        frames' aspect ratio. Decoding happens frame by frame in a thread as the stream asks for more; the first
        frame is decoded before the stream opens, so media that is not a video fails without the pose server."""
        frames = decode_video_frames(data, self.settings.frame_rate)
        problem: list[UndecodableMedia] = []
        try:
            try:
                first = await asyncio.to_thread(_next_frame, frames, MAX_FRAME_SIDE)
            except UndecodableMedia as error:
                problem.append(error)
                first = None
            if first is None:
                raise ExtractionFailed(
                    f"{problem[0] if problem else 'the video holds no frames'}; upload the video in a common format "
                    "(MP4, WebM, MOV)"
                )
            responses, sent = await self._pose_stream(first, frames, problem)
        finally:
            if isinstance(frames, Generator):
                with contextlib.suppress(ValueError):  # a frame still being decoded in its thread
                    frames.close()
        if problem:
            raise ExtractionFailed(f"{problem[0]}; upload the video in a common format (MP4, WebM, MOV)")
        return responses, sent, first.source_width / first.source_height

    async def _pose_stream(
        self, first: _Frame, frames: Iterator[DecodedFrame], problem: list[UndecodableMedia]
    ) -> tuple[list[pose_pb.DetectPoseResponse], list[float]]:
        stub = pose_service_pb2_grpc.PoseServiceStub(self._channels.channel("pose"))
        sent: list[float] = []

        async def requests() -> AsyncIterator[pose_pb.DetectPoseRequest]:
            yield pose_pb.DetectPoseRequest(config=pose_res.PoseConfig(max_poses=1))
            previous_ms = -1
            frame: _Frame | None = first
            while frame is not None:
                timestamp_ms = round(frame.timestamp * 1000)
                if timestamp_ms > previous_ms:  # the server wants at least 1 ms between frames
                    previous_ms = timestamp_ms
                    sent.append(frame.timestamp)
                    yield pose_pb.DetectPoseRequest(
                        frame=pose_res.Frame(
                            timestamp=contents.seconds_duration(timestamp_ms / 1000),
                            encoding=pose_res.FRAME_ENCODING_RGB24,
                            data=frame.rgb,
                            width=frame.width,
                            height=frame.height,
                            frame_index=len(sent) - 1,
                        )
                    )
                try:
                    frame = await asyncio.to_thread(_next_frame, frames, MAX_FRAME_SIDE)
                except UndecodableMedia as error:
                    problem.append(error)
                    return

        responses: list[pose_pb.DetectPoseResponse] = []
        call = stub.DetectPose(requests(), timeout=self.settings.call_timeout_seconds)
        try:
            async for reply in call:
                # Only what is needed later: the first pose's image landmarks and the timestamp.
                kept = pose_pb.DetectPoseResponse(frame_index=reply.frame_index, timestamp=reply.timestamp)
                if reply.poses:
                    kept.poses.add().landmarks.extend(reply.poses[0].landmarks)
                responses.append(kept)
        finally:
            call.cancel()
        return responses, sent

    # --- model calls ----------------------------------------------------------------------------------------------

    async def _call_model(self, server: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """`call`, retried with backoff while the model server is transiently unable to serve, for up to the model
        wait; any other refusal fails the extraction with the server's message."""
        deadline = time.monotonic() + self.settings.model_wait_seconds
        backoff = _FIRST_BACKOFF
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code in _TRANSIENT:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ExtractionFailed(
                            f"the {server} server was unavailable for {self.settings.model_wait_seconds:g} s "
                            f"({code.name}: {error.details()}); upload the media again later"
                        ) from None
                    # The last try comes at the end of the wait, so a server is given all of it.
                    wait = min(backoff * random.uniform(0.8, 1.2), _MAX_BACKOFF, remaining)  # noqa: S311 - jitter
                    _log.info("kzone.extraction.model_retry", server=server, code=code.name, wait=round(wait, 2))
                    await asyncio.sleep(wait)
                    backoff *= 2
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise ExtractionFailed(
                        f"the {server} server took longer than {self.settings.call_timeout_seconds:g} s; "
                        "upload shorter media"
                    ) from None
                raise ExtractionFailed(
                    f"the {server} server refused the media ({code.name}): {error.details()}"
                ) from None
