"""Request ids, traces and deadlines cross service hops; metrics count every call by code."""

from __future__ import annotations

import asyncio
import functools
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from megacity.testing.v1 import probe_pb2, probe_pb2_grpc
from services.runtime.channels import ChannelFactory, retry_service_config
from services.runtime.config import Transport
from services.runtime.contracts import default_pool
from services.runtime.pki import ensure_credentials
from services.runtime.server import Dependencies, ServicerBinding
from tests.support.mesh import channel_as, make_config, mesh_catalog, running, running_probe
from tests.support.probe import ProbeServicer
from tests.support.probe import servicers as probe_servicers


@pytest.fixture
async def relay(pki_dir: Path) -> AsyncIterator[probe_pb2_grpc.ProbeServiceStub]:
    """A probe whose Relay calls a second probe over the mesh, as the `probe` identity."""
    catalog = mesh_catalog()
    async with running_probe(pki_dir, catalog) as downstream:
        relay_build = functools.partial(probe_servicers, downstream=f"127.0.0.1:{downstream.port}")
        async with (
            running(make_config(catalog, "probe", pki_dir), relay_build) as upstream,
            channel_as("ops", upstream, pki_dir) as channel,
        ):
            yield probe_pb2_grpc.ProbeServiceStub(channel)


async def test_request_id_trace_and_deadline_cross_a_hop(relay: probe_pb2_grpc.ProbeServiceStub) -> None:
    reply = await relay.Relay(
        probe_pb2.RelayRequest(delay_seconds=0.3), timeout=5.0, metadata=(("x-request-id", "req-42"),)
    )
    assert reply.upstream.request_id == reply.downstream.request_id == "req-42"
    assert reply.downstream.caller_identity == "probe"
    assert re.fullmatch("[0-9a-f]{32}", reply.upstream.trace_id)
    assert reply.downstream.trace_id == reply.upstream.trace_id
    # The hop inherits what is left of the caller's 5 s after the 0.3 s delay, not a fresh 10 s default.
    # (Deadlines travel as relative timeouts, so the two readings agree only to within a few milliseconds.)
    assert 0 < reply.upstream.deadline_remaining_seconds <= 4.7
    assert 0 < reply.downstream.deadline_remaining_seconds <= reply.upstream.deadline_remaining_seconds + 0.05


async def test_a_spent_deadline_fails_the_next_hop_with_deadline_exceeded(
    relay: probe_pb2_grpc.ProbeServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await relay.Relay(probe_pb2.RelayRequest(delay_seconds=0.5), timeout=0.4)
    assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_the_callers_trace_continues_across_hops(relay: probe_pb2_grpc.ProbeServiceStub) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    reply = await relay.Relay(probe_pb2.RelayRequest(), metadata=(("traceparent", traceparent),))
    assert reply.upstream.trace_id == reply.downstream.trace_id == trace_id
    malformed = await relay.Relay(probe_pb2.RelayRequest(), metadata=(("traceparent", traceparent.upper()),))
    assert malformed.upstream.trace_id not in ("", trace_id, trace_id.upper())
    assert malformed.downstream.trace_id == malformed.upstream.trace_id


async def test_a_request_id_is_generated_when_the_caller_sends_none(pki_dir: Path) -> None:
    async with running_probe(pki_dir) as service, channel_as("ops", service, pki_dir) as channel:
        stub = probe_pb2_grpc.ProbeServiceStub(channel)
        first = await stub.Inspect(probe_pb2.InspectRequest())
        second = await stub.Inspect(probe_pb2.InspectRequest(), metadata=(("x-request-id", "bad id; rm -rf"),))
    assert re.fullmatch("[0-9a-f]{32}", first.request_id)
    assert re.fullmatch("[0-9a-f]{32}", second.request_id)
    assert first.request_id != second.request_id


def test_retry_policy_covers_exactly_the_idempotent_methods() -> None:
    config = retry_service_config(default_pool(), ["megacity.testing.v1.ProbeService"])
    assert '"method": "Echo"' in config
    assert '"method": "Inspect"' in config
    for not_idempotent in ("Fail", "Sleep", "Relay"):
        assert f'"method": "{not_idempotent}"' not in config
    assert '"UNAVAILABLE"' in config


async def test_metrics_count_calls_by_method_and_code(pki_dir: Path) -> None:
    async with running_probe(pki_dir) as service, channel_as("ops", service, pki_dir) as channel:
        stub = probe_pb2_grpc.ProbeServiceStub(channel)
        for _ in range(3):
            await stub.Echo(probe_pb2.EchoRequest())
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Fail(probe_pb2.FailRequest(mode=probe_pb2.FailRequest.MODE_NOT_FOUND))
        url = f"http://127.0.0.1:{service.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    labels = 'grpc_method="{}",grpc_service="megacity.testing.v1.ProbeService",grpc_type="unary"'
    assert f'grpc_server_handled_total{{grpc_code="OK",{labels.format("Echo")}}} 3.0' in text
    assert f'grpc_server_handled_total{{grpc_code="NOT_FOUND",{labels.format("Fail")}}} 1.0' in text
    assert f"grpc_server_handling_seconds_count{{{labels.format('Echo')}}} 3.0" in text


async def test_channels_retry_idempotent_methods_and_only_those(pki_dir: Path) -> None:
    catalog = mesh_catalog()
    probe = ProbeServicer(None)

    def build(deps: Dependencies) -> list[ServicerBinding]:
        return [ServicerBinding(probe_pb2_grpc.add_ProbeServiceServicer_to_server, probe)]

    async with running(make_config(catalog, "probe", pki_dir), build) as service:
        channels = ChannelFactory(catalog, Transport.MTLS, ensure_credentials(pki_dir, catalog, "ops"), default_pool())
        stub = probe_pb2_grpc.ProbeServiceStub(channels.channel("probe", target=f"127.0.0.1:{service.port}"))
        try:
            recovered = await stub.Flaky(probe_pb2.FlakyRequest(key="twice", failures=2))
            with pytest.raises(grpc.aio.AioRpcError) as exhausted:
                await stub.Flaky(probe_pb2.FlakyRequest(key="always", failures=100))
            with pytest.raises(grpc.aio.AioRpcError) as not_retried:
                await stub.Fail(probe_pb2.FailRequest(mode=probe_pb2.FailRequest.MODE_UNAVAILABLE, secret="once"))
        finally:
            await channels.close()
    assert recovered.attempts == 3
    assert exhausted.value.code() is grpc.StatusCode.UNAVAILABLE
    assert probe.calls["always"] == 4  # maxAttempts of the retry policy
    assert not_retried.value.code() is grpc.StatusCode.UNAVAILABLE
    assert probe.calls["once"] == 1
