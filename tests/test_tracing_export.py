"""With an OTLP endpoint, services export real spans, and one trace spans every hop.

Two probe services run as `megacity serve` processes; the first relays to the second over the mesh. Their
spans (OpenTelemetry's grpc instrumentation, server and client) reach an OTLP receiver run by the test.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from megacity.testing.v1 import probe_pb2, probe_pb2_grpc
from services.runtime.context import UnaryContext
from tests.support.processes import probe_process

Span = trace_pb2.Span


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: UnaryContext[
            trace_service_pb2.ExportTraceServiceRequest, trace_service_pb2.ExportTraceServiceResponse
        ],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += [span for spans in request.resource_spans for scope in spans.scope_spans for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    server = grpc.aio.server()
    collected = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collected, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield collected, port
    await server.stop(0)


def _attribute(span: Span, key: str) -> str:
    return next((a.value.string_value for a in span.attributes if a.key == key), "")


def _one(spans: list[Span], name: str, kind: Span.SpanKind.ValueType) -> Span:
    found = [span for span in spans if span.name == name and span.kind == kind]
    assert len(found) == 1, f"{len(found)} spans {name} of kind {kind}: {[(s.name, s.kind) for s in spans]}"
    return found[0]


async def test_one_trace_across_two_services_reaches_the_collector(
    receiver: tuple[Receiver, int], pki_dir: Path, tmp_path: Path
) -> None:
    collected, port = receiver
    otlp = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    async with probe_process(tmp_path, pki_dir, "downstream", otlp) as downstream:
        upstream_env = otlp | {"MEGACITY_TARGET_PROBE": f"127.0.0.1:{downstream.port}"}
        async with probe_process(tmp_path, pki_dir, "upstream", upstream_env) as upstream:
            async with upstream.channel() as channel:
                reply = await probe_pb2_grpc.ProbeServiceStub(channel).Relay(probe_pb2.RelayRequest(), timeout=10)
            # A clean exit flushes the span processor: every span has reached the receiver by then.
            for probe in (upstream, downstream):
                probe.process.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(probe.process.wait, 15) == 0

    relay = _one(collected.spans, "/megacity.testing.v1.ProbeService/Relay", Span.SPAN_KIND_SERVER)
    outgoing = _one(collected.spans, "/megacity.testing.v1.ProbeService/Inspect", Span.SPAN_KIND_CLIENT)
    inspect = _one(collected.spans, "/megacity.testing.v1.ProbeService/Inspect", Span.SPAN_KIND_SERVER)
    assert relay.trace_id == outgoing.trace_id == inspect.trace_id
    assert outgoing.parent_span_id == relay.span_id
    assert inspect.parent_span_id == outgoing.span_id
    assert (_attribute(relay, "megacity.caller"), _attribute(inspect, "megacity.caller")) == ("ops", "probe")
    # What the services logged and put in request ids is the exported trace.
    assert reply.upstream.trace_id == reply.downstream.trace_id == relay.trace_id.hex()
