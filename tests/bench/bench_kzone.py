"""Benchmark: kzone live analysis with the tiny real models, in one run: concurrent real-time voice streams, pose
frames per second, and the latency the kzone hop adds per chunk against calling the inference server directly.

    .venv/bin/python -m tests.bench.bench_kzone [--streams 1,2,4,6,8] [--repeats 1] [--pose-frames 150]
        [--paced-frames 100] [--rounds 2] [--voice-rounds 3]

Process layout: stands up, in a temporary directory, embedded PostgreSQL and Redis and the tenant and auth services
as processes (bench_auth's platform), and the asr server (Whisper tiny.en, CPU), the pose server (mediapipe
PoseLandmarker full, CPU) and the kzone service IN THIS PROCESS, over mTLS. They share this process's event loop with
the clients; the models run in worker threads (CTranslate2 and mediapipe release the GIL). Calls to kzone go as the
edge does (`edge` identity, the learner's bearer token); direct calls to the inference servers go as kzone does
(`kzone` identity). Nothing is pinned: the models use every CPU, and the parts below run one after another.

1. Voice. Per N: N learners stream espeak-ng speech (two sentences, ~8 s, plus 0.5 s of silence) through
   AnalyzeVoice at real time in 100 ms chunks (each sent at its due time; starts staggered over 0.5 s), with the
   sentence as target text. Per N, over all its streams:
   - model rtf (mean, max): the asr server's decode time for the stream over its audio duration (its EndOfStream,
     read off the asr servicer in this process); under 1 means the recogniser keeps pace with that stream;
   - final p50/p95: from the last chunk sent to the last final transcript segment; result p50/p95: to the stored
     final result (report computed and stored);
   - partial p50/p95: from the chunk that completed the audio up to a partial's end_offset to the partial's arrival
     (the asr server sets end_offset to all the audio it had received when the decode finished, so this is how
     fresh a partial is, not how long its decode took);
   - accuracy: mean word accuracy of the final transcripts; kept up: every final transcript within 2 s of the end
     of its audio.
   Sustained: the largest N whose every stream has model rtf < 1 and kept up.
2. Pose frames per second: the same frames (grace_hopper.jpg on a 640x480 grey canvas, rotated a little more each
   frame, JPEG, nominal 10 fps timestamps) sent as fast as flow control lets them, by 1 and by 2 concurrent clients:
   direct (PoseService.DetectPose) and through kzone (AnalyzeDance with return_landmarks, against a READY
   choreography made from the frames' own poses, so segments are scored live too). Frames/s: all clients' frames
   over the wall time from the first frame sent to the last landmarks back.
3. Per-chunk latency the kzone hop adds:
   - pose: frames paced at 10 fps (so it measures latency, not throughput), frame sent to its landmarks back
     (DetectPoseResponse direct, the PoseFrame event through kzone); rounds alternate direct and kzone;
   - voice: one stream at real time, the chunk that completes a partial's audio (its end_offset) to that partial
     (PartialTranscript direct from AsrService.Transcribe with kzone's recognition config, the partial
     TranscriptUpdate through AnalyzeVoice); rounds alternate. Only pose is truly per chunk: a partial comes once
     per second of audio (the asr policy's decode interval), and as its end_offset is all the audio the asr server
     had when the decode finished, its lag is the time since the newest chunk (0-100 ms, a random phase) plus
     transport; the hop's cost is the difference of the two distributions, from few samples.
   The first frame of each pose stream is left out (it also creates the stream's VIDEO-mode landmarker, ~0.1-0.2 s);
   both paths pay that alike.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import math
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.api import httpbody_pb2
from google.protobuf import duration_pb2
from PIL import Image

from megacity.asr.v1 import asr_service_pb2 as asr_pb
from megacity.asr.v1 import asr_service_pb2_grpc
from megacity.asr.v1 import resources_pb2 as asr_res
from megacity.auth.v1 import auth_service_pb2_grpc
from megacity.kzone.v1 import kzone_service_pb2 as pb
from megacity.kzone.v1 import kzone_service_pb2_grpc
from megacity.kzone.v1 import resources_pb2 as res
from megacity.pose.v1 import pose_service_pb2 as pose_pb
from megacity.pose.v1 import pose_service_pb2_grpc
from megacity.pose.v1 import resources_pb2 as pose_res
from ops import migrations
from ops.embedded import EmbeddedPostgres, EmbeddedRedis
from services.inference.asr import server as asr_server
from services.inference.asr.engine import AsrSettings
from services.inference.pose import server as pose_server
from services.inference.pose.engine import PoseSettings
from services.kzone import contents
from services.kzone.choreography import PoseSequence
from services.kzone.dance import encode_keypoints
from services.kzone.store import KZoneStore
from services.runtime.catalog import load_catalog
from services.runtime.database import create_pool
from services.runtime.pki import ensure_credentials
from services.runtime.server import Dependencies, Service, ServicerBinding
from tests.bench import bench_auth
from tests.bench.bench_auth import _Cpus, _databases
from tests.bench.bench_exam import ZONE_ORG, _add_users, _sign_in
from tests.support.accounts import Caller
from tests.support.inference import (
    CHUNK_BYTES,
    chunks,
    joined,
    person_photo,
    silence,
    speak,
    until_serving,
    word_accuracy,
)
from tests.support.mesh import channel_as, make_config

TEXT = (
    "Please open the window and close the door before you leave the room. "
    "The children are playing football in the garden."
)
KEPT_UP_SECONDS = 2.0
CHUNK_SECONDS = 0.1
# Pose frames: 640x480 JPEG, the person swaying; timestamps on a 10 fps clock.
FRAME_SIZE = (640, 480)
FRAME_PERIOD = 0.1
SWAY_FRAMES = 40  # distinct frames (one 4 s sway), cycled
SWAY_DEGREES = 20.0
PACED_FPS = 10.0
TEMPO_BPM = 120.0


def _percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1e3:.1f} ms"


# --- voice ------------------------------------------------------------------------------------------------------


@dataclass
class _Stream:
    audio_seconds: float
    sent: list[float] = field(default_factory=list)  # each chunk's send time
    last_final: float = 0.0
    result: float = 0.0
    partial_lags: list[float] = field(default_factory=list)
    text: str = ""

    @property
    def first_sent(self) -> float:
        return self.sent[0]

    @property
    def last_sent(self) -> float:
        return self.sent[-1]

    def partial(self, end_offset: duration_pb2.Duration, now: float) -> None:
        """A partial covering the audio up to end_offset arrived at `now`: its lag behind the chunk completing it."""
        covered = end_offset.ToNanoseconds() / 1e9
        index = min(len(self.sent) - 1, max(0, math.ceil(covered / CHUNK_SECONDS - 1e-3) - 1))
        self.partial_lags.append(now - self.sent[index])


@dataclass
class _Window:
    streams: int
    results: list[_Stream]
    model_rtfs: list[float]


class _AsrTap:
    """The asr servicer's Transcribe, watched: each stream's EndOfStream (decode time and audio duration)."""

    def __init__(self) -> None:
        self.rtfs: list[float] = []

    def build(self, deps: Dependencies, settings: AsrSettings) -> list[ServicerBinding]:
        bindings = asr_server.build(deps, settings)
        for binding in bindings:
            servicer: Any = binding.servicer
            if hasattr(servicer, "Transcribe"):
                original = servicer.Transcribe

                async def transcribe(
                    requests: Any, context: Any, original: Any = original
                ) -> AsyncIterator[asr_pb.TranscribeResponse]:
                    async for response in original(requests, context):
                        if response.HasField("end_of_stream"):
                            end = response.end_of_stream
                            audio = end.audio_duration.ToNanoseconds() / 1e9
                            if audio > 0:
                                self.rtfs.append(end.processing_time.ToNanoseconds() / 1e9 / audio)
                        yield response

                servicer.Transcribe = transcribe  # an instance attribute: add_AsrServiceServicer_to_server takes it
        return bindings


def _voice_config() -> pb.AnalyzeVoiceRequest:
    return pb.AnalyzeVoiceRequest(
        config=res.VoiceStreamConfig(
            encoding=res.AUDIO_ENCODING_PCM16, sample_rate_hertz=16_000, target_text=TEXT, language="en"
        )
    )


async def _paced_audio(stream: _Stream, parts: list[bytes]) -> AsyncIterator[bytes]:
    start = time.monotonic()
    for index, chunk in enumerate(parts):
        await asyncio.sleep(max(0.0, start + index * CHUNK_SECONDS - time.monotonic()))
        stream.sent.append(time.monotonic())
        yield chunk


async def _voice_kzone(
    api: kzone_service_pb2_grpc.KZoneServiceStub, caller: Caller, audio: bytes, delay: float
) -> _Stream:
    await asyncio.sleep(delay)
    stream = _Stream(len(audio) / 32_000)

    async def requests() -> AsyncIterator[pb.AnalyzeVoiceRequest]:
        yield _voice_config()
        async for chunk in _paced_audio(stream, chunks(audio, CHUNK_BYTES)):
            yield pb.AnalyzeVoiceRequest(audio=chunk)

    finals: list[str] = []
    async for event in api.AnalyzeVoice(requests(), metadata=caller.metadata(), timeout=300):
        now = time.monotonic()
        if event.HasField("transcript"):
            update = event.transcript
            if update.is_final:
                finals.append(update.text)
                stream.last_final = now
            else:
                stream.partial(update.end_offset, now)
        elif event.HasField("final_result"):
            stream.result = now
    stream.text = joined(finals)
    return stream


async def _voice_direct(asr: asr_service_pb2_grpc.AsrServiceStub, audio: bytes) -> _Stream:
    """The same audio straight to the asr server, with the recognition config kzone sends (services/kzone/voice.py)."""
    stream = _Stream(len(audio) / 32_000)

    async def requests() -> AsyncIterator[asr_pb.TranscribeRequest]:
        yield asr_pb.TranscribeRequest(
            config=asr_res.RecognitionConfig(
                encoding=asr_res.AUDIO_ENCODING_PCM16,
                sample_rate_hertz=16_000,
                channel_count=1,
                language="en",
                partial_results=True,
                word_timestamps=True,
            )
        )
        async for chunk in _paced_audio(stream, chunks(audio, CHUNK_BYTES)):
            yield asr_pb.TranscribeRequest(audio=chunk)

    finals: list[str] = []
    async for event in asr.Transcribe(requests(), timeout=300):
        now = time.monotonic()
        if event.HasField("partial"):
            stream.partial(event.partial.end_offset, now)
        elif event.HasField("segment"):
            finals.append(event.segment.text)
            stream.last_final = now
        elif event.HasField("end_of_stream"):
            stream.result = now
    stream.text = joined(finals)
    return stream


# --- pose -------------------------------------------------------------------------------------------------------


def _sway_frames() -> list[bytes]:
    """The person on a 640x480 grey canvas, rotated back and forth over SWAY_FRAMES frames, as JPEG."""
    with Image.open(person_photo()) as photo:
        person = photo.convert("RGB")
    width, height = FRAME_SIZE
    scale = height / person.height
    person = person.resize((round(person.width * scale), height), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", FRAME_SIZE, (128, 128, 128))
    canvas.paste(person, ((width - person.width) // 2, 0))
    frames = []
    for index in range(SWAY_FRAMES):
        angle = SWAY_DEGREES * math.sin(2 * math.pi * index / SWAY_FRAMES)
        rotated = canvas.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))
        out = io.BytesIO()
        rotated.save(out, format="JPEG", quality=85)
        frames.append(out.getvalue())
    return frames


def _timestamp(index: int) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromMilliseconds(round(index * FRAME_PERIOD * 1000))
    return value


@dataclass
class _PoseRun:
    sent: dict[int, float] = field(default_factory=dict)  # timestamp (ms) -> send time
    latencies: list[float] = field(default_factory=list)
    detected: int = 0
    last_reply: float = 0.0
    inference: list[float] = field(default_factory=list)  # the model's time per frame (direct only)
    poses: list[tuple[float, list[list[float]]]] = field(default_factory=list)  # direct only

    @property
    def frames(self) -> int:
        return len(self.latencies)

    def landmarks(self, timestamp: duration_pb2.Duration, now: float) -> None:
        self.latencies.append(now - self.sent[timestamp.ToMilliseconds()])
        self.last_reply = now


async def _paced_frames(
    run: _PoseRun, frames: list[bytes], count: int, period: float
) -> AsyncIterator[tuple[int, bytes]]:
    start = time.monotonic()
    for index in range(count):
        if period:
            await asyncio.sleep(max(0.0, start + index * period - time.monotonic()))
        run.sent[_timestamp(index).ToMilliseconds()] = time.monotonic()
        yield index, frames[index % len(frames)]


async def _pose_direct(
    pose: pose_service_pb2_grpc.PoseServiceStub, frames: list[bytes], count: int, period: float
) -> _PoseRun:
    run = _PoseRun()

    async def requests() -> AsyncIterator[pose_pb.DetectPoseRequest]:
        yield pose_pb.DetectPoseRequest(config=pose_res.PoseConfig())
        async for index, data in _paced_frames(run, frames, count, period):
            frame = pose_res.Frame(
                timestamp=_timestamp(index), encoding=pose_res.FRAME_ENCODING_JPEG, data=data, frame_index=index
            )
            yield pose_pb.DetectPoseRequest(frame=frame)

    async for reply in pose.DetectPose(requests(), timeout=600):
        run.landmarks(reply.timestamp, time.monotonic())
        run.inference.append(reply.inference_time.ToNanoseconds() / 1e9)
        if reply.poses:
            run.detected += 1
            points = [[p.x, p.y, p.z, p.visibility] for p in reply.poses[0].landmarks]
            run.poses.append((reply.timestamp.ToNanoseconds() / 1e9, points))
    return run


async def _pose_kzone(
    api: kzone_service_pb2_grpc.KZoneServiceStub,
    caller: Caller,
    reference_id: str,
    frames: list[bytes],
    count: int,
    period: float,
) -> _PoseRun:
    run = _PoseRun()

    async def requests() -> AsyncIterator[pb.AnalyzeDanceRequest]:
        yield pb.AnalyzeDanceRequest(config=res.DanceStreamConfig(reference_id=reference_id, return_landmarks=True))
        async for index, data in _paced_frames(run, frames, count, period):
            frame = res.VideoFrame(timestamp=_timestamp(index), encoding=res.FRAME_ENCODING_JPEG, data=data)
            yield pb.AnalyzeDanceRequest(frame=frame)

    result = False
    async for event in api.AnalyzeDance(requests(), metadata=caller.metadata(), timeout=600):
        if event.HasField("pose"):
            run.landmarks(event.pose.timestamp, time.monotonic())
            run.detected += int(event.pose.detected)
        elif event.HasField("final_result"):
            result = True
    if not result:
        raise RuntimeError("AnalyzeDance ended without its final result")
    return run


async def _choreography(
    api: kzone_service_pb2_grpc.KZoneServiceStub,
    teacher: Caller,
    store: KZoneStore,
    media_dir: Path,
    run: _PoseRun,
) -> str:
    """A READY choreography whose keypoints are `run`'s poses, made as the extraction worker would
    (tests/test_kzone_dance_wire.py's way)."""
    times = np.array([t for t, _ in run.poses])
    points = np.array([p for _, p in run.poses], dtype=np.float64)
    poses = PoseSequence(times, points[:, :, :3], points[:, :, 3], FRAME_SIZE[0] / FRAME_SIZE[1])
    created = await api.CreateReferenceContent(
        pb.CreateReferenceContentRequest(
            content=res.ReferenceContent(
                kind=res.REFERENCE_KIND_CHOREOGRAPHY, title=f"Bench sway {uuid.uuid4().hex[:6]}", tempo_bpm=TEMPO_BPM
            )
        ),
        metadata=teacher.metadata(),
    )
    content = (
        await api.UploadReferenceMedia(
            pb.UploadReferenceMediaRequest(
                content_id=created.content.id, file=httpbody_pb2.HttpBody(content_type="video/mp4", data=b"mp4")
            ),
            metadata=teacher.metadata(),
        )
    ).content
    key = contents.keypoints_key(content.zone_id, content.org_id, content.id, content.processing_job_id)
    (media_dir / key).parent.mkdir(parents=True, exist_ok=True)
    (media_dir / key).write_bytes(encode_keypoints(poses))
    features = res.ReferenceFeatures(
        keypoints_uri=key, keypoint_frame_count=len(poses), keypoint_frame_rate=1 / poses.frame_period
    )
    finished = await store.finish_processing(
        content.id, features, job_id=content.processing_job_id, duration_seconds=float(poses.timestamps[-1])
    )
    if not finished:
        raise RuntimeError("the choreography could not be made READY")
    return content.id


# --- the run ----------------------------------------------------------------------------------------------------


@dataclass
class _Results:
    windows: list[_Window]
    fps: dict[tuple[str, int], float]  # (direct | kzone, clients) -> frames/s
    detected: dict[str, float]  # share of frames with a person, per path
    model_ms: float  # median pose inference per frame (direct, unpaced single client)
    pose_latency: dict[str, list[float]]
    voice_latency: dict[str, list[float]]
    voice_accuracy: dict[str, float]
    whisper: str
    pose_model: str


def _throughput(runs: list[_PoseRun]) -> float:
    first = min(min(run.sent.values()) for run in runs)
    last = max(run.last_reply for run in runs)
    return sum(run.frames for run in runs) / (last - first)


async def _run(args: argparse.Namespace, directory: Path, postgres: EmbeddedPostgres, redis: EmbeddedRedis) -> _Results:
    everything = frozenset(os.sched_getaffinity(0))
    cpus = _Cpus(everything, everything, everything)
    audio = speak(TEXT, directory) + silence(0.5)
    frames = _sway_frames()
    async with bench_auth._platform(directory, 4, cpus, postgres, redis) as platform:
        logins = await migrations.provision_service_logins(postgres.admin_url, postgres.secrets_dir)
        for identity in ("kzone", "asr", "pose"):
            ensure_credentials(platform.pki, platform.catalog, identity)
        media_dir = directory / "media"
        os.environ.update(
            {
                "MEGACITY_MEDIA_DIR": str(media_dir),
                "MEGACITY_KZONE_EXTRACTION_WORKERS": "0",  # the bench makes its choreography READY itself
                "MEGACITY_KZONE_MAX_VOICE_STREAMS": str(max(args.streams) + 1),
                "MEGACITY_TARGET_AUTH": f"127.0.0.1:{platform.ports['auth']}",
                "MEGACITY_TARGET_TENANT": f"127.0.0.1:{platform.ports['tenant']}",
            }
        )
        catalog = load_catalog()
        asr_settings = dataclasses.replace(AsrSettings.from_environment(), max_streams=max(args.streams) + 2)
        tap = _AsrTap()
        asr = Service(make_config(catalog, "asr", platform.pki), build=lambda deps: tap.build(deps, asr_settings))
        pose_settings = dataclasses.replace(PoseSettings.from_environment(), max_streams=8)
        pose = Service(
            make_config(catalog, "pose", platform.pki), build=lambda deps: pose_server.build(deps, pose_settings)
        )
        await asr.start()
        await pose.start()
        os.environ["MEGACITY_TARGET_ASR"] = f"127.0.0.1:{asr.port}"
        os.environ["MEGACITY_TARGET_POSE"] = f"127.0.0.1:{pose.port}"
        kzone = Service(make_config(catalog, "kzone", platform.pki, database_url=logins["kzone"], redis_url=redis.url))
        await kzone.start()
        pool = await create_pool(logins["kzone"], schema="kzone", max_size=2)
        try:
            async with (
                channel_as("edge", kzone, platform.pki) as channel,
                channel_as("kzone", asr, platform.pki) as asr_channel,
                channel_as("kzone", pose, platform.pki) as pose_channel,
                channel_as("ops", asr, platform.pki) as asr_ops,
                channel_as("ops", pose, platform.pki) as pose_ops,
                platform.channel("edge", "auth") as auth,
            ):
                await until_serving(asr_ops, "megacity.asr.v1.AsrService", timeout=120)
                await until_serving(pose_ops, "megacity.pose.v1.PoseService", timeout=120)
                auth_api = auth_service_pb2_grpc.AuthServiceStub(auth)
                callers = await _sign_in(
                    auth_api, await _add_users(logins["auth"], ZONE_ORG, "student", max(*args.streams, 2))
                )
                (teacher,) = await _sign_in(auth_api, await _add_users(logins["auth"], ZONE_ORG, "teacher", 1))
                api = kzone_service_pb2_grpc.KZoneServiceStub(channel)
                asr_api = asr_service_pb2_grpc.AsrServiceStub(asr_channel)
                pose_api = pose_service_pb2_grpc.PoseServiceStub(pose_channel)

                # 1. Voice: N concurrent real-time streams through kzone.
                print("voice: warm-up", flush=True)
                await _voice_kzone(api, callers[0], audio, 0.0)  # connections, the model's first decodes
                await _voice_direct(asr_api, audio)
                windows = []
                for count in args.streams:
                    print(f"voice: {count} streams", flush=True)
                    tap.rtfs.clear()
                    results: list[_Stream] = []
                    for _ in range(args.repeats):
                        results += await asyncio.gather(
                            *(_voice_kzone(api, callers[i], audio, 0.5 * i / count) for i in range(count))
                        )
                    windows.append(_Window(count, results, list(tap.rtfs)))

                # 2. Pose frames per second, unpaced.
                print("pose: warm-up and the choreography", flush=True)
                longest = max(args.pose_frames, args.paced_frames)
                warm = await _pose_direct(pose_api, frames, longest, 0.0)
                reference = await _choreography(api, teacher, KZoneStore(pool), media_dir, warm)
                await _pose_kzone(api, callers[0], reference, frames, 20, 0.0)
                fps: dict[tuple[str, int], float] = {}
                detected: dict[str, list[float]] = {"direct": [], "kzone": []}
                model: list[float] = []
                for clients in (1, 2):
                    print(f"pose: {clients} unpaced client(s)", flush=True)
                    direct = await asyncio.gather(
                        *(_pose_direct(pose_api, frames, args.pose_frames, 0.0) for _ in range(clients))
                    )
                    through = await asyncio.gather(
                        *(
                            _pose_kzone(api, callers[i], reference, frames, args.pose_frames, 0.0)
                            for i in range(clients)
                        )
                    )
                    fps["direct", clients] = _throughput(direct)
                    fps["kzone", clients] = _throughput(through)
                    detected["direct"] += [run.detected / run.frames for run in direct]
                    detected["kzone"] += [run.detected / run.frames for run in through]
                    if clients == 1:
                        model = direct[0].inference

                # 3. Per-chunk latency: pose paced at 10 fps, voice at real time; rounds alternate direct and kzone.
                pose_latency: dict[str, list[float]] = {"direct": [], "kzone": []}
                for round_index in range(args.rounds):
                    print(f"latency: pose round {round_index + 1}", flush=True)
                    period = 1 / PACED_FPS
                    # The first frame also creates the stream's landmarker: steady state only.
                    pose_latency["direct"] += (
                        await _pose_direct(pose_api, frames, args.paced_frames, period)
                    ).latencies[1:]
                    pose_latency["kzone"] += (
                        await _pose_kzone(api, callers[0], reference, frames, args.paced_frames, period)
                    ).latencies[1:]
                voice_latency: dict[str, list[float]] = {"direct": [], "kzone": []}
                accuracy: dict[str, list[float]] = {"direct": [], "kzone": []}
                for round_index in range(args.voice_rounds):
                    print(f"latency: voice round {round_index + 1}", flush=True)
                    for path, stream in (
                        ("direct", await _voice_direct(asr_api, audio)),
                        ("kzone", await _voice_kzone(api, callers[0], audio, 0.0)),
                    ):
                        voice_latency[path] += stream.partial_lags
                        accuracy[path].append(word_accuracy(TEXT, stream.text))
                return _Results(
                    windows=windows,
                    fps=fps,
                    detected={path: statistics.mean(shares) for path, shares in detected.items()},
                    model_ms=statistics.median(model) * 1e3,
                    pose_latency=pose_latency,
                    voice_latency=voice_latency,
                    voice_accuracy={path: statistics.mean(values) for path, values in accuracy.items()},
                    whisper=asr_settings.model_name,
                    pose_model=pose_settings.model_name,
                )
        finally:
            await pool.close()
            await kzone.stop(grace=1.0)
            await pose.stop(grace=1.0)
            await asr.stop(grace=1.0)


# --- the report -------------------------------------------------------------------------------------------------


def _voice_table(windows: list[_Window]) -> list[str]:
    header = (
        f"{'streams':>7} {'model rtf':>9} {'rtf max':>7} {'final p50':>9} {'final p95':>9} {'result p50':>10} "
        f"{'result p95':>10} {'partial p50':>11} {'partial p95':>11} {'accuracy':>8} {'kept up':>7}"
    )
    lines = [header, "-" * len(header)]
    sustained = 0
    for window in windows:
        finals = [s.last_final - s.last_sent for s in window.results]
        results = [s.result - s.last_sent for s in window.results]
        partials = [lag for s in window.results for lag in s.partial_lags]
        rtfs = window.model_rtfs or [float("nan")]
        accuracy = statistics.mean(word_accuracy(TEXT, s.text) for s in window.results)
        kept = all(value <= KEPT_UP_SECONDS for value in finals)
        if kept and len(window.model_rtfs) >= len(window.results) and max(rtfs) < 1:
            sustained = max(sustained, window.streams)
        lines.append(
            f"{window.streams:>7} {statistics.mean(rtfs):>9.2f} {max(rtfs):>7.2f} "
            f"{_percentile(finals, 0.5):>8.2f}s {_percentile(finals, 0.95):>8.2f}s "
            f"{_percentile(results, 0.5):>9.2f}s {_percentile(results, 0.95):>9.2f}s "
            f"{_percentile(partials, 0.5):>10.2f}s {_percentile(partials, 0.95):>10.2f}s "
            f"{accuracy:>8.2f} {'yes' if kept else 'no':>7}"
        )
    lines.append(f"sustained: {sustained} concurrent real-time streams (every stream model rtf < 1 and kept up)")
    return lines


def report(args: argparse.Namespace, results: _Results) -> str:
    audio = results.windows[0].results[0].audio_seconds
    lines = [
        f"kzone live analysis, tiny real models on CPU ({results.whisper}, {results.pose_model}); "
        f"{len(os.sched_getaffinity(0))} CPUs, nothing pinned",
        "layout: PostgreSQL, Redis, tenant and auth as processes; asr, pose, kzone and the clients in one process "
        "(one event loop, models in worker threads), all over mTLS",
        "",
        f"1. voice: N concurrent streams through kzone AnalyzeVoice, {audio:.1f} s of speech each at real time "
        f"(100 ms chunks), {args.repeats} round(s) per N",
        *_voice_table(results.windows),
        "",
        f"2. pose frames/s: 640x480 JPEG, {args.pose_frames} frames per client, unpaced (flow control)",
    ]
    header = f"{'clients':>7} {'direct':>9} {'through kzone':>14} {'kzone/direct':>13}"
    lines += [header, "-" * len(header)]
    for clients in (1, 2):
        direct, through = results.fps["direct", clients], results.fps["kzone", clients]
        lines.append(f"{clients:>7} {direct:>9.1f} {through:>14.1f} {through / direct:>13.0%}")
    lines.append(
        f"model time per frame (direct, 1 client) median {results.model_ms:.1f} ms; frames with a person: "
        f"direct {results.detected['direct']:.0%}, kzone {results.detected['kzone']:.0%}"
    )
    lines += [
        "",
        "3. per-chunk latency, direct to the inference server against through kzone (one stream, nothing else running)",
    ]
    header = (
        f"{'measure':<44} {'n':>5} {'direct p50':>11} {'direct p99':>11} {'kzone p50':>11} {'kzone p99':>11} "
        f"{'added p50':>10} {'added p99':>10}"
    )
    lines += [header, "-" * len(header)]
    rows = (
        (f"pose: frame sent -> landmarks ({PACED_FPS:g} fps, {args.rounds}x{args.paced_frames})", results.pose_latency),
        (f"voice: chunk -> partial covering it ({args.voice_rounds} streams)", results.voice_latency),
    )
    for name, latency in rows:
        straight, hop = latency["direct"], latency["kzone"]
        d50, d99 = _percentile(straight, 0.5), _percentile(straight, 0.99)
        k50, k99 = _percentile(hop, 0.5), _percentile(hop, 0.99)
        lines.append(
            f"{name:<44} {min(len(straight), len(hop)):>5} {_ms(d50):>11} {_ms(d99):>11} {_ms(k50):>11} "
            f"{_ms(k99):>11} {_ms(k50 - d50):>10} {_ms(k99 - d99):>10}"
        )
    lines += [
        f"voice word accuracy: direct {results.voice_accuracy['direct']:.2f}, "
        f"kzone {results.voice_accuracy['kzone']:.2f}",
        "pose: steady state (each stream's first frame, which also creates its landmarker, left out)",
        "voice: a partial comes per second of audio (asr decode interval), not per chunk; its end_offset is all audio "
        "the asr server had when the decode finished,",
        "       so its lag is the time since the newest chunk (0-100 ms phase) plus transport, not the decode: few "
        "samples, p99 is about the largest",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--streams",
        type=lambda text: [int(value) for value in text.split(",")],
        default=[1, 2, 4, 6, 8],
        help="concurrent voice streams, one window each (comma separated)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds of N voice streams per window")
    parser.add_argument("--pose-frames", type=int, default=150, help="frames per client for pose frames/s")
    parser.add_argument("--paced-frames", type=int, default=100, help="frames per paced pose latency run")
    parser.add_argument("--rounds", type=int, default=2, help="paced pose rounds (direct, then kzone)")
    parser.add_argument("--voice-rounds", type=int, default=3, help="voice latency rounds (direct, then kzone)")
    args = parser.parse_args()
    everything = frozenset(os.sched_getaffinity(0))
    cpus = _Cpus(everything, everything, everything)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="bench-kzone-") as scratch,
        _databases(Path(scratch), cpus) as servers,
    ):
        results = asyncio.run(_run(args, Path(scratch), *servers))
    print()
    print(report(args, results))
    print(f"(run took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
