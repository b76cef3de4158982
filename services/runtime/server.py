"""Bootstrapping a service: one grpc.aio server with the runtime around the service's servicers.

`megacity serve <name>` runs `serve_from_environment(name)`: configuration from the environment, the
catalog entry, dependencies (PostgreSQL pool, Redis), the servicers built by the service's own module
(`<module>.servicers(deps)`, module named in the catalog), mTLS or Linkerd transport, health, reflection,
metrics, and graceful shutdown on SIGTERM/SIGINT (health goes NOT_SERVING, new calls are refused,
in-flight calls get up to MEGACITY_SHUTDOWN_GRACE_SECONDS to finish).
"""

from __future__ import annotations

import asyncio
import importlib
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

import asyncpg
import grpc
import structlog
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from redis.asyncio import Redis

from services.runtime.audit import Auditor, remote_audit
from services.runtime.authn import Authenticator, JwksSource, remote_jwks
from services.runtime.catalog import load_catalog
from services.runtime.channels import ChannelFactory
from services.runtime.config import ServiceConfig, Transport
from services.runtime.contracts import default_pool, service_methods
from services.runtime.health import HealthMonitor, HealthServicer, Probe
from services.runtime.identity import identifier
from services.runtime.interceptors import Registrar, RuntimeInterceptor
from services.runtime.pki import ensure_credentials
from services.runtime.policy import MethodPolicy, resolve_rules
from services.runtime.telemetry import (
    RpcMetrics,
    configure_logging,
    configure_tracing,
    flush_logs_periodically,
    spans_exported,
    start_metrics_server,
)

_log = structlog.get_logger("megacity.server")


def server_options(max_message_mib: int) -> tuple[tuple[str, int], ...]:
    return (
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_receive_message_length", max_message_mib * 1024 * 1024),
        ("grpc.max_send_message_length", max_message_mib * 1024 * 1024),
    )


@dataclass(frozen=True)
class ServicerBinding:
    """A servicer and the generated `add_<Service>Servicer_to_server` that registers it."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: object


@dataclass
class Dependencies:
    """What a service's servicers may use; built by the runtime from the catalog's `depends_on`."""

    config: ServiceConfig
    channels: ChannelFactory
    # Where this service's audit records go: the auth service over the mesh, unless a servicer sets another
    # writer (the auth service appends to its own log).
    audit: Auditor
    database: asyncpg.Pool | None = None
    redis: Redis | None = None
    # Extra readiness probes a service adds (e.g. "model" once its model is loaded).
    probes: dict[str, Probe] = field(default_factory=dict)
    # Where this service gets the JWKS that verifies access tokens: the auth service over the mesh, unless a
    # servicer sets another source (the auth service reads its own key ring).
    jwks_source: JwksSource | None = None
    # Work a service runs beside its RPCs for as long as it serves (stream consumers): started once the server
    # is up, cancelled first when it stops.
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)


BuildServicers = Callable[[Dependencies], Sequence[ServicerBinding]]


async def _ping_redis(client: Redis) -> bool:
    return bool(await client.ping())


class Service:
    """One running service: server, dependencies, health monitor and metrics endpoint."""

    def __init__(
        self,
        config: ServiceConfig,
        build: BuildServicers | None = None,
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        self.config = config
        self._build = build or _module_builder(config.entry.module)
        self._pool = pool or default_pool()
        self._server: grpc.aio.Server | None = None
        self._metrics_server: WSGIServer | None = None
        self._log_flusher: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self.deps: Dependencies | None = None
        self.health: HealthMonitor | None = None
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        config = self.config
        credentials = (
            ensure_credentials(config.pki_dir, config.catalog, config.name)
            if config.transport is Transport.MTLS
            else None
        )
        channels = ChannelFactory(
            config.catalog, config.transport, credentials, self._pool, config.default_deadline_seconds
        )
        deps = Dependencies(config=config, channels=channels, audit=Auditor(remote_audit(channels)))
        probes: dict[str, Probe] = {}
        if config.database_url and "postgres" in config.entry.depends_on:
            from services.runtime import database

            db = await database.create_pool(config.database_url, schema=config.name)
            deps.database = db
            probes["postgres"] = lambda: database.ping(db, timeout=2.0)
        if config.redis_url and "redis" in config.entry.depends_on:
            client = Redis.from_url(config.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
            deps.redis = client
            probes["redis"] = lambda: _ping_redis(client)
        self.deps = deps
        bindings = self._build(deps)
        probes.update(deps.probes)

        metrics = RpcMetrics()
        policy = MethodPolicy(resolve_rules(config.entry, self._pool))
        access = {
            method.path: method.access
            for service in config.entry.grpc_services
            for method in service_methods(self._pool, service) or ()
            if method.access is not None
        }
        authenticator = Authenticator(deps.jwks_source or remote_jwks(channels), deps.redis) if access else None
        # With exported spans, OpenTelemetry's own server interceptor makes each call's span (see ServerSpans).
        tracing: list[Any] = [aio_server_interceptor()] if spans_exported() else []  # type: ignore[no-untyped-call]
        server = grpc.aio.server(interceptors=tracing, options=server_options(config.entry.max_message_mib))
        interceptor = RuntimeInterceptor(
            policy, identifier(config.catalog, config.transport), metrics, access, authenticator, deps.audit
        )
        registrar: Any = Registrar(server, interceptor)  # what the generated add_*_to_server functions need of a server
        for binding in bindings:
            binding.add_to_server(binding.servicer, registrar)
        health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
        reflected = (*config.entry.grpc_services, "grpc.health.v1.Health", reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionServicer(reflected), registrar)
        registrar.check_complete()
        address = f"{config.bind_host}:{config.port}"
        if credentials is not None:
            server_credentials = grpc.ssl_server_credentials(
                [(credentials.private_key, credentials.certificate_chain)],
                root_certificates=credentials.root_certificates,
                require_client_auth=True,
            )
            self.port = server.add_secure_port(address, server_credentials)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self.health = HealthMonitor(health_servicer, config.entry.grpc_services, probes, config.health_interval_seconds)
        monitor = self.health
        self._metrics_server = start_metrics_server(
            config.bind_host, config.metrics_port, metrics.registry, ready=lambda: monitor.serving
        )
        self.metrics_port = self._metrics_server.server_port
        await server.start()
        self._server = server
        await self.health.start()
        self._log_flusher = asyncio.create_task(flush_logs_periodically(), name="log-flusher")
        self._background = [
            asyncio.create_task(work(), name=f"background-{index}") for index, work in enumerate(deps.background)
        ]
        _log.info(
            "service.started",
            address=f"{config.bind_host}:{self.port}",
            metrics=f"{config.bind_host}:{self.metrics_port}",
            identity=config.identity,
            transport=config.transport.value,
            serving=self.health.serving,
        )

    async def stop(self, grace: float | None = None) -> None:
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        _log.info("service.stopping", grace_seconds=grace)
        for task in self._background:
            task.cancel()
        if self._background:
            # A job stuck in its cleanup must not hold the shutdown (and the pool closing after it) forever.
            _, stuck = await asyncio.wait(self._background, timeout=max(grace, 1.0))
            if stuck:
                _log.error("service.background_stuck", tasks=sorted(task.get_name() for task in stuck))
        self._background = []
        if self.health is not None:
            await self.health.shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self.deps is not None:
            await self.deps.channels.close()
            if self.deps.database is not None:
                try:
                    await asyncio.wait_for(self.deps.database.close(), timeout=5.0)
                except TimeoutError:
                    self.deps.database.terminate()
            if self.deps.redis is not None:
                await self.deps.redis.aclose()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        _log.info("service.stopped")
        if self._log_flusher is not None:
            self._log_flusher.cancel()
            await asyncio.gather(self._log_flusher, return_exceptions=True)


def _module_builder(module_name: str) -> BuildServicers:
    module = importlib.import_module(module_name)
    build: BuildServicers = module.servicers
    return build


async def serve_from_environment(name: str) -> int:
    """Run one service until SIGTERM or SIGINT; exit code 0 after a clean drain."""
    catalog = load_catalog()
    config = ServiceConfig.from_environment(catalog, name)
    configure_logging(config.log_level, name)
    tracer_provider = configure_tracing(name)
    service = Service(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await service.start()
    await stop.wait()
    await service.stop()
    tracer_provider.shutdown()
    return 0
