"""A real Envoy edge in front of test services: a small REST client for it, the compiled edge started and stopped,
and our rate-limit service on the test Redis."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway import ratelimit
from gateway.edge import OPENAPI_DOCUMENT, envoy_command, wait_until_ready, write_config
from gateway.envoy_config import EdgeSettings, EdgeZone
from ops.embedded import EmbeddedRedis
from services.runtime.catalog import load_catalog
from services.runtime.contracts import descriptor_set_path
from services.runtime.pki import ensure_credentials
from tests.support.ports import free_port

UNIV = "api.univprepai.com"
KZONE = "api.my-ktube.com"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


@dataclass
class Edge:
    port: int

    def _call(self, method: str, path: str, host: str, body: object, headers: dict[str, str]) -> Reply:
        # Uploads are analysed by real models before the answer: a minute is enough for every call.
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            # Bytes go as they are (a file upload, with its own Content-Type); anything else as JSON.
            payload = body if isinstance(body, bytes) or body is None else json.dumps(body)
            connection.request(method, path, body=payload, headers={"Host": host, **headers})
            response = connection.getresponse()
            raw = response.read()
            parsed = json.loads(raw) if raw and "json" in response.getheader("content-type", "") else raw.decode()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, parsed)
        finally:
            connection.close()

    async def call(
        self, method: str, path: str, *, host: str = UNIV, body: object = None, headers: dict[str, str] | None = None
    ) -> Reply:
        return await asyncio.to_thread(self._call, method, path, host, body, headers or {})


@dataclass
class RateLimitService:
    target: str
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event | None = None

    async def start(self, redis_url: str) -> None:
        self.stop = asyncio.Event()
        host, _, port = self.target.rpartition(":")
        self.task = asyncio.create_task(ratelimit.serve(redis_url, host, int(port), self.stop))
        await asyncio.sleep(0.2)

    async def halt(self) -> None:
        if self.stop is not None and self.task is not None:
            self.stop.set()
            await self.task
            self.task = None


async def forget_limits(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match="ratelimit:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def limiter(redis: EmbeddedRedis) -> AsyncIterator[RateLimitService]:
    await forget_limits(redis.url)
    service = RateLimitService(f"127.0.0.1:{free_port()}")
    await service.start(redis.url)
    try:
        yield service
    finally:
        await service.halt()
        await forget_limits(redis.url)


def edge_settings(pki_dir: Path, ports: dict[str, int], ratelimit_target: str | None) -> EdgeSettings:
    ensure_credentials(pki_dir, load_catalog(), "edge")
    return EdgeSettings(
        listen_host="127.0.0.1",
        listen_port=free_port(),
        admin_port=free_port(),
        descriptor_set=descriptor_set_path().resolve(),
        pki_dir=pki_dir.resolve(),
        targets={name: f"127.0.0.1:{ports.get(name) or free_port()}" for name in load_catalog().services},
        zones=(EdgeZone("univ", ("univprepai.com",)), EdgeZone("kzone", ("my-ktube.com", "my-ktube.ai"))),
        dev_zone="univ",
        ratelimit_target=ratelimit_target,
        openapi_document=OPENAPI_DOCUMENT,
    )


@asynccontextmanager
async def running_edge(
    pki_dir: Path, ports: dict[str, int], ratelimit_target: str | None, scratch: Path
) -> AsyncIterator[Edge]:
    """Envoy compiled for the services listening on `ports` (the others unreachable: 503 if reached)."""
    catalog = load_catalog()
    settings = edge_settings(pki_dir, ports, ratelimit_target)
    config = write_config(settings, catalog, scratch / "edge.json")
    with (scratch / "edge.log").open("wb") as log:
        process = await asyncio.to_thread(subprocess.Popen, envoy_command(config), stdout=log, stderr=subprocess.STDOUT)
        try:
            await asyncio.to_thread(wait_until_ready, settings.admin_port, process, scratch / "edge.log")
            yield Edge(settings.listen_port)
        finally:
            process.terminate()
            await asyncio.to_thread(process.wait, 30)
