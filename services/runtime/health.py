"""gRPC health (grpc.health.v1) that follows the service's dependencies.

A monitor probes every dependency the catalog lists (PostgreSQL, Redis, a model) at a fixed interval and
sets the overall status ("") and each served gRPC service to SERVING only while all of them answer; it
goes back to NOT_SERVING as soon as one stops answering, and to SERVING again once it is back. The
servicer is ours (typed, asyncio-native): Check, List, and Watch streaming every change.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeAlias

import structlog
from grpc_health.v1 import health_pb2

from services.runtime.context import StreamingContext, UnaryContext
from services.runtime.errors import NotFound

Probe = Callable[[], Awaitable[bool]]

_log = structlog.get_logger("megacity.health")
ServingStatus: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus.ValueType
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer:
    """The grpc.health.v1.Health service; register with health_pb2_grpc.add_HealthServicer_to_server."""

    def __init__(self) -> None:
        self._statuses: dict[str, ServingStatus] = {}
        self._changed = asyncio.Event()
        self._draining = False

    def _publish(self) -> None:
        # Wake every Watch: each waits on the event that was current when it last read the statuses.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def set(self, service: str, status: ServingStatus) -> None:
        if not self._draining:
            self._statuses[service] = status
            self._publish()

    def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for everything from now on, whatever the monitor finds."""
        self._statuses = dict.fromkeys(self._statuses, NOT_SERVING)
        self._draining = True
        self._publish()

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: UnaryContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            raise NotFound(f"no health status for service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self,
        request: health_pb2.HealthListRequest,
        context: UnaryContext[health_pb2.HealthListRequest, health_pb2.HealthListResponse],
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in self._statuses.items()}
        )

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: StreamingContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: ServingStatus | None = None
        while True:
            changed = self._changed
            status = self._statuses.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await changed.wait()


class HealthMonitor:
    def __init__(
        self,
        servicer: HealthServicer,
        served: Sequence[str],
        probes: Mapping[str, Probe],
        interval: float,
        probe_timeout: float = 2.0,
    ) -> None:
        self.servicer = servicer
        self._names = ("", *served)
        self._probes = dict(probes)
        self._interval = interval
        self._probe_timeout = probe_timeout
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        return bool(self._serving)

    async def _probe(self, probe: Probe) -> bool:
        try:
            return await asyncio.wait_for(probe(), self._probe_timeout)
        except Exception:  # a failing probe means "down", whatever the reason
            return False

    async def check_once(self) -> None:
        names = list(self._probes)
        results = await asyncio.gather(*(self._probe(self._probes[name]) for name in names))
        states = dict(zip(names, results, strict=True))
        serving = all(results)
        if serving != self._serving:
            for name in self._names:
                self.servicer.set(name, SERVING if serving else NOT_SERVING)
            log = _log.info if serving else _log.warning
            log("health.changed", serving=serving, dependencies=states)
            self._serving = serving

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval)

    async def start(self) -> None:
        await self.check_once()
        self._task = asyncio.create_task(self._run(), name="health-monitor")

    async def shutdown(self) -> None:
        """Stop probing and answer NOT_SERVING from now on (the process is draining)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.servicer.enter_graceful_shutdown()
