"""Benchmark: what the REST edge adds, through Envoy against direct gRPC, on the same auth service in one run.

    .venv/bin/python -m tests.bench.bench_edge [--seconds 3] [--rounds 5]

Stands up what bench_auth does (embedded PostgreSQL and Redis, the tenant and auth services over mTLS, with its
helpers), plus a real Envoy compiled by gateway/envoy_config.py (transcoder, JWT check against the JWKS, CORS,
security headers; without rate limits, which would stop the load at 100 a minute). Two calls:

    no-op       AuthService.GetJwks       direct: gRPC as the edge identity   edge: GET /.well-known/jwks.json
    users/me    AuthService.GetMe         direct: gRPC with a bearer token    edge: GET /api/v1/users/me

The load generator (tests/bench/h2load.py) speaks HTTP/2 on one connection: gRPC over mTLS to the service, or
cleartext HTTP/2 to Envoy. Each round measures every call one at a time (latency: what the edge adds to a call)
and then with 32 in flight (requests/s: who limits throughput); rounds alternate direct and edge so drift hits
both alike. With 32 in flight, direct gRPC also pays the load generator's own TLS, on the same 2 cores.
Target: the edge adds at most 1 ms at p50, and the service, not the edge, limits throughput (the edge's
requests/s at least close to the direct ones).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.edge import OPENAPI_DOCUMENT, envoy_command, wait_until_ready, write_config
from gateway.envoy_config import EdgeSettings, EdgeZone
from megacity.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from services.runtime.contracts import descriptor_set_path
from tests.bench.bench_auth import (
    _client_tls,
    _Cpus,
    _databases,
    _duration,
    _percentile,
    _Platform,
    _platform,
    _register,
)
from tests.bench.h2load import IN_FLIGHT, GrpcLoad
from tests.support.ports import free_port

HOST = "api.univprepai.com"
TARGET_P50_ADDED = 0.001


@dataclass
class _Result:
    rps: list[float]
    latencies: list[float]


async def _grpc(platform: _Platform, path: str, message: bytes, token: str) -> GrpcLoad:
    port = platform.ports["auth"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_tls(platform, "edge"))
    load = GrpcLoad(reader, writer, port, path, message)
    metadata = [("x-megacity-zone", "univ"), ("x-forwarded-for", "10.1.2.3")]
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    load.set_metadata(tuple(metadata))
    return load


async def _rest(port: int, path: str, token: str) -> GrpcLoad:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    load = GrpcLoad.rest(reader, writer, HOST, path)
    if token:
        load.set_metadata((("authorization", f"Bearer {token}"),))
    return load


def _edge_settings(platform: _Platform) -> EdgeSettings:
    """The edge in front of the platform's services (others unreachable), without rate limits."""
    return EdgeSettings(
        listen_host="127.0.0.1",
        listen_port=free_port(),
        admin_port=free_port(),
        descriptor_set=descriptor_set_path().resolve(),
        pki_dir=platform.pki.resolve(),
        targets={name: f"127.0.0.1:{platform.ports.get(name, free_port())}" for name in platform.catalog.services},
        zones=(EdgeZone("univ", ("univprepai.com",)),),
        dev_zone="univ",
        ratelimit_target=None,
        openapi_document=OPENAPI_DOCUMENT,
    )


async def _run(args: argparse.Namespace, directory: Path) -> dict[str, _Result]:
    cpus = _Cpus(*(frozenset(os.sched_getaffinity(0)),) * 3)
    with _databases(directory, cpus) as (postgres, redis):
        async with _platform(directory, 4, cpus, postgres, redis) as platform:
            auth = auth_service_pb2_grpc.AuthServiceStub(platform.channel("edge", "auth"))
            [person] = await _register(auth, 1)
            settings = _edge_settings(platform)
            config = write_config(settings, platform.catalog, directory / "edge.json")
            log_path = directory / "edge.log"
            with log_path.open("wb") as log:
                envoy = await asyncio.to_thread(
                    subprocess.Popen, envoy_command(config), stdout=log, stderr=subprocess.STDOUT
                )
            try:
                await asyncio.to_thread(wait_until_ready, settings.admin_port, envoy, log_path)
                jwks = auth_service_pb2.GetJwksRequest().SerializeToString()
                me = auth_service_pb2.GetMeRequest().SerializeToString()
                token = person.access_token
                loads = {
                    "no-op, direct gRPC": await _grpc(platform, "/megacity.auth.v1.AuthService/GetJwks", jwks, ""),
                    "no-op, through the edge": await _rest(settings.listen_port, "/.well-known/jwks.json", ""),
                    "users/me, direct gRPC": await _grpc(platform, "/megacity.auth.v1.AuthService/GetMe", me, token),
                    "users/me, through the edge": await _rest(settings.listen_port, "/api/v1/users/me", token),
                }
                results = {name: _Result([], []) for name in loads}
                for load in loads.values():  # warm-up: connections, caches, the JWKS fetch
                    await load.run(1.0)
                for _ in range(args.rounds):
                    for name, load in loads.items():
                        # Latency one call at a time (what the edge adds to a call); throughput saturated.
                        for in_flight in (1, IN_FLIGHT):
                            load.in_flight = in_flight
                            load.latencies.clear()
                            started = time.perf_counter()
                            completed = await load.run(args.seconds)
                            if load.failures:
                                raise RuntimeError(f"{name}: {load.failures} failed, the first: {load.first_failure}")
                            if in_flight == 1:
                                results[name].latencies += load.latencies
                            else:
                                results[name].rps.append(completed / (time.perf_counter() - started))
                for load in loads.values():
                    load.close()
                return results
            finally:
                envoy.terminate()
                await asyncio.to_thread(envoy.wait, 30)


def report(args: argparse.Namespace, results: dict[str, _Result]) -> str:
    lines = [
        f"the edge against direct gRPC, same auth service, {args.rounds} rounds of {args.seconds:g}s per mode: latency "
        f"with one call at a time, requests/s with {IN_FLIGHT} in flight (one HTTP/2 connection each); nothing pinned",
        "",
        f"{'call':<28} {'req/s (median)':>15} {'p50 (1 call)':>13} {'p99 (1 call)':>13}",
    ]
    for name, result in results.items():
        lines.append(
            f"{name:<28} {statistics.median(result.rps):>15.0f} {_duration(_percentile(result.latencies, 0.5)):>13} "
            f"{_duration(_percentile(result.latencies, 0.99)):>13}"
        )
    lines.append("")
    for call in ("no-op", "users/me"):
        direct, edge = results[f"{call}, direct gRPC"], results[f"{call}, through the edge"]
        added = _percentile(edge.latencies, 0.5) - _percentile(direct.latencies, 0.5)
        ratio = statistics.median(edge.rps) / statistics.median(direct.rps)
        verdict = "met" if added <= TARGET_P50_ADDED else "missed"
        lines.append(
            f"{call}: the edge adds {added * 1e3:.2f} ms at p50 (target <= 1 ms: {verdict}); "
            f"its throughput is {ratio:.0%} of direct"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as scratch:
        results = asyncio.run(_run(args, Path(scratch)))
    print(report(args, results))


if __name__ == "__main__":
    main()
