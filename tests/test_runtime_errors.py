"""Error mapping through the wire: domain errors keep their details, unexpected ones leak nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from megacity.testing.v1 import probe_pb2, probe_pb2_grpc
from services.runtime.errors import error_info, field_violations, status_from_error
from services.runtime.server import Service
from tests.support.mesh import channel_as, running_probe

Mode = probe_pb2.FailRequest.Mode


@pytest.fixture
async def probe(pki_dir: Path) -> AsyncIterator[probe_pb2_grpc.ProbeServiceStub]:
    service: Service
    async with running_probe(pki_dir) as service, channel_as("ops", service, pki_dir) as channel:
        yield probe_pb2_grpc.ProbeServiceStub(channel)


async def _fail(probe: probe_pb2_grpc.ProbeServiceStub, mode: Mode.ValueType, secret: str = "") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await probe.Fail(probe_pb2.FailRequest(mode=mode, secret=secret))
    return failure.value


async def test_field_violations_reach_the_client_intact(probe: probe_pb2_grpc.ProbeServiceStub) -> None:
    error = await _fail(probe, probe_pb2.FailRequest.MODE_INVALID_ARGUMENT)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = status_from_error(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert field_violations(status) == [
        ("email", "must be an email address"),
        ("password", "must be at least 8 characters"),
    ]
    info = error_info(status)
    assert info is not None
    assert (info.reason, info.domain) == ("INVALID_REQUEST", "megacity.local")


async def test_domain_error_keeps_its_code_and_reason(probe: probe_pb2_grpc.ProbeServiceStub) -> None:
    error = await _fail(probe, probe_pb2.FailRequest.MODE_NOT_FOUND)
    assert error.code() is grpc.StatusCode.NOT_FOUND
    info = error_info(status_from_error(error))
    assert info is not None
    assert info.reason == "NOT_FOUND"


async def test_an_internal_error_leaks_nothing_and_is_logged_with_its_id(
    probe: probe_pb2_grpc.ProbeServiceStub,
) -> None:
    secret = "s3cret-db-password"
    with capture_logs() as logs:
        error = await _fail(probe, probe_pb2.FailRequest.MODE_CRASH, secret)
    assert error.code() is grpc.StatusCode.INTERNAL
    wire = repr(error.details()) + repr(error.trailing_metadata()) + repr(error.debug_error_string())
    assert secret not in wire
    assert "RuntimeError" not in wire
    assert "Traceback" not in wire
    info = error_info(status_from_error(error))
    assert info is not None
    assert info.reason == "INTERNAL"
    error_id = info.metadata["error_id"]
    assert error_id in (error.details() or "")
    logged = [entry for entry in logs if entry.get("error_id") == error_id]
    assert len(logged) == 1
    assert logged[0]["event"] == "rpc.unexpected_error"
    assert secret in str(logged[0]["exc_info"])  # the operator gets the whole story, the caller none of it


async def test_streaming_calls_are_served_and_logged(probe: probe_pb2_grpc.ProbeServiceStub) -> None:
    with capture_logs() as logs:
        replies = [r.index async for r in probe.EchoStream(probe_pb2.EchoStreamRequest(payload="x", count=4))]

        async def chat() -> AsyncIterator[probe_pb2.EchoChatRequest]:
            for word in ("one", "two"):
                yield probe_pb2.EchoChatRequest(payload=word)

        echoed = [r.payload async for r in probe.EchoChat(chat())]
    assert replies == [0, 1, 2, 3]
    assert echoed == ["one", "two"]
    access = {entry["method"]: entry for entry in logs if entry["event"] == "rpc"}
    for method in ("EchoStream", "EchoChat"):
        entry = access[f"/megacity.testing.v1.ProbeService/{method}"]
        assert entry["code"] == "OK"
        assert entry["caller"] == "ops"
        assert len(entry["trace_id"]) == 32
        assert entry["request_id"]
        assert entry["latency_ms"] >= 0
