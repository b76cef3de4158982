"""Running services of the runtime in tests: configs, the probe service, and channels as any identity."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from services.runtime import channels
from services.runtime.catalog import Catalog, ServiceEntry, load_catalog
from services.runtime.config import ServiceConfig, Transport
from services.runtime.pki import Credentials, ensure_credentials
from services.runtime.server import Dependencies, Service, ServicerBinding
from services.runtime.telemetry import configure_tracing
from tests.support.probe import probe_entry
from tests.support.probe import servicers as probe_servicers


def serialize(message: Message) -> bytes:
    """Request serializer for calls made by path (`Message.SerializeToString` unbound is the abstract one)."""
    return message.SerializeToString()


def mesh_catalog() -> Catalog:
    """The real catalog plus the probe service."""
    catalog = load_catalog()
    return catalog.with_service(probe_entry(catalog))


def make_config(
    catalog: Catalog,
    name: str,
    pki_dir: Path,
    *,
    transport: Transport = Transport.MTLS,
    database_url: str | None = None,
    redis_url: str | None = None,
    health_interval_seconds: float = 0.2,
    shutdown_grace_seconds: float = 5.0,
) -> ServiceConfig:
    return ServiceConfig(
        entry=catalog.service(name),
        catalog=catalog,
        transport=transport,
        pki_dir=pki_dir,
        bind_host="127.0.0.1",
        port=0,
        metrics_port=0,
        database_url=database_url,
        redis_url=redis_url,
        shutdown_grace_seconds=shutdown_grace_seconds,
        health_interval_seconds=health_interval_seconds,
        default_deadline_seconds=10.0,
        log_level="info",
    )


@asynccontextmanager
async def running(
    config: ServiceConfig, build: Callable[[Dependencies], Sequence[ServicerBinding]] | None = None
) -> AsyncIterator[Service]:
    service = Service(config, build=build)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(grace=1.0)


@asynccontextmanager
async def running_probe(
    pki_dir: Path, catalog: Catalog | None = None, transport: Transport = Transport.MTLS
) -> AsyncIterator[Service]:
    config = make_config(catalog or mesh_catalog(), "probe", pki_dir, transport=transport)
    async with running(config, probe_servicers) as service:
        yield service


def with_dependencies(catalog: Catalog, name: str, depends_on: tuple[str, ...]) -> Catalog:
    entry: ServiceEntry = dataclasses.replace(catalog.service(name), depends_on=depends_on)
    return catalog.with_service(entry)


def mtls_channel(
    credentials: Credentials, port: int, server_name: str, catalog: Catalog | None = None
) -> grpc.aio.Channel:
    """A channel presenting `credentials`, expecting the server to hold `server_name`'s certificate."""
    return channels.mtls_channel(f"127.0.0.1:{port}", credentials, catalog or load_catalog(), server_name)


def channel_as(identity: str, service: Service, pki_dir: Path) -> grpc.aio.Channel:
    """A channel to `service` presenting the dev PKI certificate of `identity`."""
    catalog = service.config.catalog
    return mtls_channel(ensure_credentials(pki_dir, catalog, identity), service.port, service.config.name, catalog)


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dev PKI for the test session (the CA is made on first use, as in `megacity up`)."""
    return tmp_path_factory.mktemp("pki")


@pytest.fixture(scope="session", autouse=True)
def _tracing() -> None:
    """Tracing as every service sets it up (an SDK provider; exported only when OTLP is configured)."""
    configure_tracing("tests")
