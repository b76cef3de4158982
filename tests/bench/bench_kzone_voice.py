"""Benchmark: how many concurrent real-time voice streams the kzone service sustains with the tiny real models.

    .venv/bin/python -m tests.bench.bench_kzone_voice [--streams 1,2,4,6,8] [--repeats 1]

Stands up, in a temporary directory, embedded PostgreSQL and Redis and the tenant and auth services as processes
(bench_auth's platform), and the asr server (Whisper tiny.en, CPU) and the kzone service in this process, over
mTLS; calls go as the edge does (`edge` identity, the learner's bearer token). AnalyzeVoice is opened to the edge
as tests/test_kzone_voice_wire.py does until the contract says so. The asr server and kzone share this process's
event loop with the clients; the model runs in worker threads (CTranslate2 releases the GIL).

Load, per N: N learners stream espeak-ng speech (two sentences, ~8 s, plus 0.5 s of silence) at real time in
100 ms chunks (each chunk sent at its due time; starts staggered over 0.5 s), with the sentence as target text.

Reported per N (over all streams of the window):
- final p50/p95: from the last chunk sent to the last final transcript segment (the transcript is complete);
- result p50/p95: from the last chunk sent to the stored final result (report computed and stored);
- partial p50/p95: how far each partial trails the audio it covers (its arrival minus when the audio up to its
  end_offset was sent);
- rtf: wall time from the first chunk to the final result over the audio's duration (1.0 is perfect real time);
- accuracy: mean word accuracy of the final transcripts;
- kept up: every stream's final transcript within 2 s of the end of its audio.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from megacity.kzone.v1 import kzone_service_pb2 as pb
from megacity.kzone.v1 import kzone_service_pb2_grpc
from megacity.kzone.v1 import resources_pb2 as res
from ops import migrations
from ops.embedded import EmbeddedPostgres, EmbeddedRedis
from services.inference.asr import server as asr_server
from services.inference.asr.engine import AsrSettings
from services.runtime.catalog import load_catalog
from services.runtime.pki import ensure_credentials
from services.runtime.server import Service
from tests.bench import bench_auth
from tests.bench.bench_auth import _Cpus, _databases
from tests.bench.bench_exam import _add_users, _sign_in
from tests.support.accounts import Caller
from tests.support.inference import CHUNK_BYTES, chunks, joined, silence, speak, word_accuracy
from tests.support.mesh import channel_as, make_config

TEXT = (
    "Please open the window and close the door before you leave the room. "
    "The children are playing football in the garden."
)
KEPT_UP_SECONDS = 2.0


@dataclass
class _Stream:
    audio_seconds: float
    first_sent: float = 0.0
    last_sent: float = 0.0
    last_final: float = 0.0
    result: float = 0.0
    partial_lags: list[float] = field(default_factory=list)
    text: str = ""


@dataclass
class _Window:
    streams: int
    results: list[_Stream]


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


async def _one(api: kzone_service_pb2_grpc.KZoneServiceStub, caller: Caller, audio: bytes, delay: float) -> _Stream:
    await asyncio.sleep(delay)
    stream = _Stream(len(audio) / 32_000)
    parts = chunks(audio, CHUNK_BYTES)

    async def requests() -> AsyncIterator[pb.AnalyzeVoiceRequest]:
        yield pb.AnalyzeVoiceRequest(
            config=res.VoiceStreamConfig(
                encoding=res.AUDIO_ENCODING_PCM16, sample_rate_hertz=16_000, target_text=TEXT, language="en"
            )
        )
        stream.first_sent = time.monotonic()
        for index, chunk in enumerate(parts):
            due = stream.first_sent + index * 0.1
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            yield pb.AnalyzeVoiceRequest(audio=chunk)
        stream.last_sent = time.monotonic()

    finals: list[str] = []
    async for event in api.AnalyzeVoice(requests(), metadata=caller.metadata(), timeout=300):
        now = time.monotonic()
        if event.HasField("transcript"):
            update = event.transcript
            if update.is_final:
                finals.append(update.text)
                stream.last_final = now
            else:
                # The audio up to end_offset was fully sent at first_sent + (chunk index of end) * 0.1 + 0.1.
                covered = update.end_offset.ToNanoseconds() / 1e9
                stream.partial_lags.append(now - (stream.first_sent + max(0.0, covered - 0.1)))
        elif event.HasField("final_result"):
            stream.result = now
    stream.text = joined(finals)
    return stream


async def _run(
    args: argparse.Namespace, directory: Path, postgres: EmbeddedPostgres, redis: EmbeddedRedis
) -> list[_Window]:
    everything = frozenset(os.sched_getaffinity(0))
    cpus = _Cpus(everything, everything, everything)
    audio = speak(TEXT, directory) + silence(0.5)
    async with bench_auth._platform(directory, 4, cpus, postgres, redis) as platform:
        logins = await migrations.provision_service_logins(postgres.admin_url, postgres.secrets_dir)
        for identity in ("kzone", "asr"):
            ensure_credentials(platform.pki, platform.catalog, identity)
        os.environ.update(
            {
                "MEGACITY_MEDIA_DIR": str(directory / "media"),
                "MEGACITY_KZONE_MAX_VOICE_STREAMS": str(max(args.streams) + 1),
                "MEGACITY_TARGET_AUTH": f"127.0.0.1:{platform.ports['auth']}",
                "MEGACITY_TARGET_TENANT": f"127.0.0.1:{platform.ports['tenant']}",
            }
        )
        catalog = load_catalog()
        settings = dataclasses.replace(AsrSettings.from_environment(), max_streams=max(args.streams) + 1)
        asr = Service(make_config(catalog, "asr", platform.pki), build=lambda deps: asr_server.build(deps, settings))
        await asr.start()
        os.environ["MEGACITY_TARGET_ASR"] = f"127.0.0.1:{asr.port}"
        kzone = Service(make_config(catalog, "kzone", platform.pki, database_url=logins["kzone"], redis_url=redis.url))
        await kzone.start()
        try:
            async with channel_as("edge", kzone, platform.pki) as channel, platform.channel("edge", "auth") as auth:
                from megacity.auth.v1 import auth_service_pb2_grpc

                callers = await _sign_in(
                    auth_service_pb2_grpc.AuthServiceStub(auth),
                    await _add_users(logins["auth"], "univ-public", "student", max(args.streams)),
                )
                api = kzone_service_pb2_grpc.KZoneServiceStub(channel)
                await _one(api, callers[0], audio, 0.0)  # warm-up: connections, the model's first decodes
                windows = []
                for count in args.streams:
                    results: list[_Stream] = []
                    for _ in range(args.repeats):
                        results += await asyncio.gather(
                            *(_one(api, callers[i], audio, 0.5 * i / count) for i in range(count))
                        )
                    windows.append(_Window(count, results))
                return windows
        finally:
            await kzone.stop(grace=1.0)
            await asr.stop(grace=1.0)


def report(windows: list[_Window]) -> str:
    header = (
        f"{'streams':>7} {'final p50':>9} {'final p95':>9} {'result p50':>10} {'result p95':>10} "
        f"{'partial p50':>11} {'partial p95':>11} {'rtf':>5} {'accuracy':>8} {'kept up':>7}"
    )
    lines = [header, "-" * len(header)]
    for window in windows:
        finals = [s.last_final - s.last_sent for s in window.results]
        results = [s.result - s.last_sent for s in window.results]
        partials = [lag for s in window.results for lag in s.partial_lags]
        rtf = statistics.mean((s.result - s.first_sent) / s.audio_seconds for s in window.results)
        accuracy = statistics.mean(word_accuracy(TEXT, s.text) for s in window.results)
        kept = all(value <= KEPT_UP_SECONDS for value in finals)
        lines.append(
            f"{window.streams:>7} {_percentile(finals, 0.5):>8.2f}s {_percentile(finals, 0.95):>8.2f}s "
            f"{_percentile(results, 0.5):>9.2f}s {_percentile(results, 0.95):>9.2f}s "
            f"{_percentile(partials, 0.5):>10.2f}s {_percentile(partials, 0.95):>10.2f}s {rtf:>5.2f} "
            f"{accuracy:>8.2f} {'yes' if kept else 'no':>7}"
        )
    lines.append(f"(audio {windows[0].results[0].audio_seconds:.1f} s per stream; {os.cpu_count()} CPUs)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--streams",
        type=lambda text: [int(value) for value in text.split(",")],
        default=[1, 2, 4, 6, 8],
        help="concurrent streams, one window each (comma separated)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds of N streams per window")
    args = parser.parse_args()
    everything = frozenset(os.sched_getaffinity(0))
    cpus = _Cpus(everything, everything, everything)
    with (
        tempfile.TemporaryDirectory(prefix="bench-kzone-voice-") as scratch,
        _databases(Path(scratch), cpus) as servers,
    ):
        windows = asyncio.run(_run(args, Path(scratch), *servers))
    print(report(windows))


if __name__ == "__main__":
    main()
