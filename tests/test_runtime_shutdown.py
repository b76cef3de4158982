"""Graceful shutdown of a real service process (`megacity serve`): SIGTERM drains in-flight calls."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from megacity.testing.v1 import probe_pb2, probe_pb2_grpc
from services.runtime.catalog import DEFAULT_CATALOG, load_catalog
from services.runtime.pki import ensure_credentials
from tests.support.mesh import mtls_channel
from tests.support.ports import free_port


def _catalog_with_probe(path: Path, port: int, metrics_port: int) -> None:
    raw = yaml.safe_load(DEFAULT_CATALOG.read_text())
    raw["services"]["probe"] = {
        "module": "tests.support.probe",
        "grpc_services": ["megacity.testing.v1.ProbeService"],
        "port": port,
        "metrics_port": metrics_port,
        "depends_on": [],
        "allow": [{"callers": ["ops"], "methods": ["megacity.testing.v1.ProbeService/*"]}],
    }
    path.write_text(yaml.safe_dump(raw))


def _start_server(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "serve", "probe"], env=env, stdout=log, stderr=subprocess.STDOUT
        )


async def _wait_serving(channel: grpc.aio.Channel, timeout: float = 30.0) -> None:
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


async def test_sigterm_completes_the_in_flight_call_then_exits_cleanly(pki_dir: Path, tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    catalog_file = tmp_path / "catalog.yaml"
    _catalog_with_probe(catalog_file, port, metrics_port)
    env = {
        **os.environ,
        "MEGACITY_CATALOG": str(catalog_file),
        "MEGACITY_PKI_DIR": str(pki_dir),
        "MEGACITY_SHUTDOWN_GRACE_SECONDS": "10",
    }
    env.pop("MEGACITY_PORT_OFFSET", None)
    log_path = tmp_path / "probe.log"
    server = await asyncio.to_thread(_start_server, env, log_path)
    try:
        catalog = load_catalog(catalog_file)
        credentials = ensure_credentials(pki_dir, catalog, "ops")
        async with mtls_channel(credentials, port, "probe", catalog) as channel:
            await _wait_serving(channel)
            stub = probe_pb2_grpc.ProbeServiceStub(channel)
            in_flight = asyncio.ensure_future(stub.Sleep(probe_pb2.SleepRequest(seconds=1.5), timeout=10))
            await asyncio.sleep(0.4)
            server.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with mtls_channel(credentials, port, "probe", catalog) as late_channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await probe_pb2_grpc.ProbeServiceStub(late_channel).Echo(probe_pb2.EchoRequest(), timeout=2)
            reply = await in_flight
        assert reply.slept_seconds >= 1.5
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert await asyncio.to_thread(server.wait, 15) == 0
    finally:
        if server.poll() is None:
            server.kill()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert events.index("service.stopping") < events.index("service.stopped")
    sleep = next(line for line in lines if line.get("method") == "/megacity.testing.v1.ProbeService/Sleep")
    assert sleep["event"] == "rpc"
    assert sleep["code"] == "OK"
    assert sleep["caller"] == "ops"
    assert sleep["service"] == "probe"
    assert sleep["level"] == "info"
    assert sleep["latency_ms"] >= 1500
    assert len(sleep["trace_id"]) == 32
    assert sleep["request_id"] == sleep["trace_id"]  # no x-request-id was sent
    assert sleep["timestamp"].endswith("Z")
