"""gRPC health follows the real dependencies: PostgreSQL and Redis stopped and restarted underneath."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ops.embedded import EmbeddedPostgres, EmbeddedRedis
from services.runtime.server import Service
from tests.support.mesh import channel_as, make_config, mesh_catalog, running, with_dependencies
from tests.support.probe import servicers as probe_servicers

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(stub: health_pb2_grpc.HealthStub, service: str = "") -> int:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    status: int = reply.status
    return status


async def _eventually(stub: health_pb2_grpc.HealthStub, expected: int, timeout: float = 20.0) -> float:
    """Seconds until the overall status becomes `expected`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await _status(stub) == expected:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"health never became {health_pb2.HealthCheckResponse.ServingStatus.Name(expected)}")


@pytest.fixture
async def dependent_service(pki_dir: Path, postgres: EmbeddedPostgres, redis: EmbeddedRedis) -> AsyncIterator[Service]:
    catalog = with_dependencies(mesh_catalog(), "probe", ("postgres", "redis"))
    config = make_config(catalog, "probe", pki_dir, database_url=postgres.admin_url, redis_url=redis.url)
    async with running(config, probe_servicers) as service:
        yield service


@pytest.mark.parametrize("dependency", ["postgres", "redis"])
async def test_health_follows_a_stopped_and_restarted_dependency(
    dependent_service: Service, dependency: str, request: pytest.FixtureRequest, pki_dir: Path
) -> None:
    server: EmbeddedPostgres | EmbeddedRedis = request.getfixturevalue(dependency)
    async with channel_as("ops", dependent_service, pki_dir) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert await _status(stub) == SERVING
        assert await _status(stub, "megacity.testing.v1.ProbeService") == SERVING
        await asyncio.to_thread(server.stop)
        try:
            await _eventually(stub, NOT_SERVING)
            assert await _status(stub, "megacity.testing.v1.ProbeService") == NOT_SERVING
        finally:
            await asyncio.to_thread(server.start)
        await _eventually(stub, SERVING)


def _probe(service: Service, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}{path}", timeout=5) as reply:
            status: int = reply.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


async def test_kubernetes_probes_on_the_metrics_port_follow_health(
    dependent_service: Service, redis: EmbeddedRedis
) -> None:
    assert await asyncio.to_thread(_probe, dependent_service, "/readyz") == 200
    await asyncio.to_thread(redis.stop)
    try:
        deadline = time.monotonic() + 20
        while await asyncio.to_thread(_probe, dependent_service, "/readyz") != 503:
            assert time.monotonic() < deadline, "/readyz never turned 503 with Redis down"
            await asyncio.sleep(0.1)
        assert await asyncio.to_thread(_probe, dependent_service, "/livez") == 200
    finally:
        await asyncio.to_thread(redis.start)
    deadline = time.monotonic() + 20
    while await asyncio.to_thread(_probe, dependent_service, "/readyz") != 200:
        assert time.monotonic() < deadline, "/readyz never recovered"
        await asyncio.sleep(0.1)


async def test_a_service_starts_not_serving_while_postgres_is_down_and_recovers(
    pki_dir: Path, postgres: EmbeddedPostgres, redis: EmbeddedRedis
) -> None:
    catalog = with_dependencies(mesh_catalog(), "probe", ("postgres",))
    await asyncio.to_thread(postgres.stop)
    try:
        config = make_config(catalog, "probe", pki_dir, database_url=postgres.admin_url)
        async with (
            running(config, probe_servicers) as service,
            channel_as("ops", service, pki_dir) as channel,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            assert await _status(stub) == NOT_SERVING
            await asyncio.to_thread(postgres.start)
            await _eventually(stub, SERVING)
    finally:
        if not postgres.is_running():
            await asyncio.to_thread(postgres.start)


async def test_watch_streams_each_change(dependent_service: Service, redis: EmbeddedRedis, pki_dir: Path) -> None:
    async with channel_as("ops", dependent_service, pki_dir) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        seen = [(await watch.read()).status]
        await asyncio.to_thread(redis.stop)
        try:
            seen.append((await watch.read()).status)
        finally:
            await asyncio.to_thread(redis.start)
        seen.append((await watch.read()).status)
        watch.cancel()
    assert seen == [SERVING, NOT_SERVING, SERVING]
