"""Graceful shutdown of a real service process (`megacity serve`): SIGTERM drains in-flight calls."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import grpc
import pytest

from megacity.testing.v1 import probe_pb2, probe_pb2_grpc
from tests.support.processes import probe_process


async def test_sigterm_completes_the_in_flight_call_then_exits_cleanly(pki_dir: Path, tmp_path: Path) -> None:
    async with probe_process(tmp_path, pki_dir) as probe, probe.channel() as channel:
        stub = probe_pb2_grpc.ProbeServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.Sleep(probe_pb2.SleepRequest(seconds=1.5), timeout=10))
        await asyncio.sleep(0.4)
        probe.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        async with probe.channel() as late_channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await probe_pb2_grpc.ProbeServiceStub(late_channel).Echo(probe_pb2.EchoRequest(), timeout=2)
        reply = await in_flight
        assert await asyncio.to_thread(probe.process.wait, 15) == 0
    assert reply.slept_seconds >= 1.5
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    log_path = probe.log_path
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
