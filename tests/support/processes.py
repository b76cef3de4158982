"""The probe service as a real `megacity serve` process, the way a container runs a service."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.catalog import DEFAULT_CATALOG, load_catalog
from services.runtime.pki import ensure_credentials
from tests.support.mesh import mtls_channel
from tests.support.ports import free_port


def write_catalog_with_probe(path: Path) -> Path:
    """The real catalog plus a probe service that operators and other probes may call."""
    raw = yaml.safe_load(DEFAULT_CATALOG.read_text())
    raw["services"]["probe"] = {
        "module": "tests.support.probe",
        "grpc_services": ["megacity.testing.v1.ProbeService"],
        "port": 7199,  # every process here gets its own MEGACITY_PORT
        "metrics_port": 9199,
        "depends_on": [],
        "allow": [{"callers": ["ops", "probe"], "methods": ["megacity.testing.v1.ProbeService/*"]}],
    }
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class ProbeProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    catalog_path: Path
    pki_dir: Path

    def channel(self, identity: str = "ops") -> grpc.aio.Channel:
        catalog = load_catalog(self.catalog_path)
        return mtls_channel(ensure_credentials(self.pki_dir, catalog, identity), self.port, "probe", catalog)


def _spawn(env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "serve", "probe"], env=dict(env), stdout=log, stderr=subprocess.STDOUT
        )


async def wait_serving(channel: grpc.aio.Channel, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("the service never became SERVING")


@asynccontextmanager
async def probe_process(
    directory: Path, pki_dir: Path, name: str = "probe", extra_env: Mapping[str, str] | None = None
) -> AsyncIterator[ProbeProcess]:
    """A SERVING probe process; killed on exit unless the test already stopped it."""
    catalog_path = directory / "catalog.yaml"
    if not catalog_path.exists():
        write_catalog_with_probe(catalog_path)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "MEGACITY_PORT_OFFSET"}
    env |= {
        "MEGACITY_CATALOG": str(catalog_path),
        "MEGACITY_PKI_DIR": str(pki_dir),
        "MEGACITY_PORT": str(port),
        "MEGACITY_METRICS_PORT": str(free_port()),
        "MEGACITY_SHUTDOWN_GRACE_SECONDS": "10",
        **(extra_env or {}),
    }
    log_path = directory / f"{name}.log"
    process = await asyncio.to_thread(_spawn, env, log_path)
    probe = ProbeProcess(process, port, log_path, catalog_path, pki_dir)
    try:
        async with probe.channel() as channel:
            await wait_serving(channel)
        yield probe
    finally:
        if process.poll() is None:
            process.kill()
            await asyncio.to_thread(process.wait)
