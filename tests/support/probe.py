"""A servicer of the runtime's probe contract (megacity.testing.v1.ProbeService), for runtime tests and benchmarks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from megacity.testing.v1 import probe_pb2, probe_pb2_grpc
from services.runtime.callcontext import current_caller, current_deadline, current_request_id, current_trace_id
from services.runtime.catalog import AllowRule, Catalog, ServiceEntry
from services.runtime.context import StreamingContext, UnaryContext
from services.runtime.errors import NotFound, Unavailable, Violations
from services.runtime.server import Dependencies, ServicerBinding

PROBE = "megacity.testing.v1.ProbeService"


def probe_entry(catalog: Catalog, allow: Sequence[AllowRule] = ()) -> ServiceEntry:
    """A catalog entry serving the probe contract. By default ops may call everything, edge only Echo."""
    rules = tuple(allow) or (
        AllowRule(("ops", "probe"), (f"{PROBE}/*",)),
        AllowRule(("edge",), (f"{PROBE}/Echo",)),
    )
    common = catalog.services["auth"].allow[:2]  # health and reflection, as every service has
    return ServiceEntry(
        name="probe",
        description="runtime probe (tests only)",
        module="tests.support.probe",
        grpc_services=(PROBE,),
        port=0,
        metrics_port=0,
        depends_on=(),
        allow=common + rules,
    )


def _inspect() -> probe_pb2.InspectResponse:
    deadline = current_deadline()
    return probe_pb2.InspectResponse(
        caller_identity=current_caller(),
        request_id=current_request_id(),
        trace_id=current_trace_id(),
        deadline_remaining_seconds=0.0 if deadline is None else max(deadline - time.monotonic(), 0.0),
    )


class ProbeServicer(probe_pb2_grpc.ProbeServiceServicer):
    def __init__(self, deps: Dependencies | None, downstream: str | None = None) -> None:
        self._deps = deps
        self._downstream = downstream
        self.calls: dict[str, int] = {}  # per key, for Flaky and MODE_UNAVAILABLE

    async def Echo(
        self, request: probe_pb2.EchoRequest, context: UnaryContext[probe_pb2.EchoRequest, probe_pb2.EchoResponse]
    ) -> probe_pb2.EchoResponse:
        return probe_pb2.EchoResponse(payload=request.payload)

    async def Fail(
        self, request: probe_pb2.FailRequest, context: UnaryContext[probe_pb2.FailRequest, probe_pb2.FailResponse]
    ) -> probe_pb2.FailResponse:
        if request.mode == probe_pb2.FailRequest.MODE_INVALID_ARGUMENT:
            violations = Violations()
            violations.add("email", "must be an email address")
            violations.add("password", "must be at least 8 characters")
            violations.raise_if_any()
        if request.mode == probe_pb2.FailRequest.MODE_NOT_FOUND:
            raise NotFound("no such probe")
        if request.mode == probe_pb2.FailRequest.MODE_CRASH:
            raise RuntimeError(f"database password is {request.secret}")
        if request.mode == probe_pb2.FailRequest.MODE_UNAVAILABLE:
            self.calls[request.secret] = self.calls.get(request.secret, 0) + 1
            raise Unavailable("probe is unavailable", retry_after_seconds=0.1)
        return probe_pb2.FailResponse()

    async def Flaky(
        self, request: probe_pb2.FlakyRequest, context: UnaryContext[probe_pb2.FlakyRequest, probe_pb2.FlakyResponse]
    ) -> probe_pb2.FlakyResponse:
        attempts = self.calls[request.key] = self.calls.get(request.key, 0) + 1
        if attempts <= request.failures:
            raise Unavailable(f"failing attempt {attempts} of {request.failures}", retry_after_seconds=0.01)
        return probe_pb2.FlakyResponse(attempts=attempts)

    async def Sleep(
        self, request: probe_pb2.SleepRequest, context: UnaryContext[probe_pb2.SleepRequest, probe_pb2.SleepResponse]
    ) -> probe_pb2.SleepResponse:
        started = time.monotonic()
        await asyncio.sleep(request.seconds)
        return probe_pb2.SleepResponse(slept_seconds=time.monotonic() - started)

    async def Inspect(
        self,
        request: probe_pb2.InspectRequest,
        context: UnaryContext[probe_pb2.InspectRequest, probe_pb2.InspectResponse],
    ) -> probe_pb2.InspectResponse:
        return _inspect()

    async def Relay(
        self, request: probe_pb2.RelayRequest, context: UnaryContext[probe_pb2.RelayRequest, probe_pb2.RelayResponse]
    ) -> probe_pb2.RelayResponse:
        await asyncio.sleep(request.delay_seconds)
        upstream = _inspect()
        assert self._deps is not None
        stub = probe_pb2_grpc.ProbeServiceStub(self._deps.channels.channel("probe", target=self._downstream))
        downstream = await stub.Inspect(probe_pb2.InspectRequest())
        return probe_pb2.RelayResponse(upstream=upstream, downstream=downstream)

    async def EchoStream(
        self,
        request: probe_pb2.EchoStreamRequest,
        context: StreamingContext[probe_pb2.EchoStreamRequest, probe_pb2.EchoStreamResponse],
    ) -> AsyncIterator[probe_pb2.EchoStreamResponse]:
        for index in range(request.count):
            yield probe_pb2.EchoStreamResponse(payload=request.payload, index=index)

    async def EchoChat(
        self,
        request_iterator: AsyncIterator[probe_pb2.EchoChatRequest],
        context: StreamingContext[AsyncIterator[probe_pb2.EchoChatRequest], probe_pb2.EchoChatResponse],
    ) -> AsyncIterator[probe_pb2.EchoChatResponse]:
        async for message in request_iterator:
            yield probe_pb2.EchoChatResponse(payload=message.payload)


def servicers(deps: Dependencies, downstream: str | None = None) -> list[ServicerBinding]:
    return [ServicerBinding(probe_pb2_grpc.add_ProbeServiceServicer_to_server, ProbeServicer(deps, downstream))]
