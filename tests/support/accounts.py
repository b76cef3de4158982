"""The identity services running for a test: tenant and auth over mTLS, on a migrated database and Redis.

`people` gives stubs that call as the edge would: through the mesh as the `edge` identity, with the zone the
edge resolved (`x-megacity-zone`), a client address of its own (X-Forwarded-For: login throttling counts per
address), and the person's bearer token when signed in.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from megacity.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from megacity.exam.v1 import exam_service_pb2_grpc
from megacity.tenant.v1 import tenant_service_pb2_grpc
from ops import migrations
from ops.embedded import EmbeddedPostgres, EmbeddedRedis
from services.auth import passwords
from services.auth.pii import generate_key_spec
from services.auth.store import AuthStore, NewUser
from services.runtime.catalog import load_catalog
from services.runtime.database import create_pool
from services.runtime.errors import error_info, status_from_error
from services.runtime.server import Service
from tests.support.mesh import channel_as, make_config, mesh_catalog, running

PASSWORD = "Correct-horse-9"
TEST_BCRYPT_COST = 4  # the production cost (12) is tested on its own; every other login here would take 0.25 s


@dataclass
class Caller:
    """Metadata of calls made as one client of the edge."""

    zone: str
    address: str = field(default_factory=lambda: f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.7")
    token: str = ""
    user_id: str = ""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        headers = [("x-megacity-zone", self.zone), ("x-forwarded-for", self.address)]
        if self.token:
            headers.append(("authorization", f"Bearer {self.token}"))
        return tuple(headers)


@dataclass
class People:
    auth: auth_service_pb2_grpc.AuthServiceStub
    tenant: tenant_service_pb2_grpc.TenantServiceStub
    auth_service: Service
    tenant_service: Service
    auth_url: str
    redis_url: str
    pki_dir: Path

    async def add_user(self, zone: str, org: str, role: str, email: str | None = None) -> str:
        """A user made directly in the database (roles no RPC can create yet); returns the email."""
        email = email or f"{role}-{uuid.uuid4().hex[:8]}@example.com"
        pool = await create_pool(self.auth_url, schema="auth", max_size=1)
        try:
            await AuthStore(pool).create_user(
                NewUser(
                    user_id=uuid.uuid4().hex,
                    zone_id=zone,
                    org_id=org,
                    email=email,
                    name=role.title(),
                    role=role,
                    password_hash=await passwords.hash_password(PASSWORD, TEST_BCRYPT_COST),
                    phone_number_encrypted="",
                    locale="en",
                )
            )
        finally:
            await pool.close()
        return email

    async def sign_in(self, zone: str, email: str, password: str = PASSWORD) -> Caller:
        caller = Caller(zone)
        reply = await self.auth.Login(
            auth_service_pb2.LoginRequest(email=email, password=password), metadata=caller.metadata()
        )
        caller.token = reply.access_token
        caller.user_id = reply.user.id
        return caller

    async def as_new_user(self, zone: str, org: str, role: str) -> Caller:
        return await self.sign_in(zone, await self.add_user(zone, org, role))


@pytest.fixture
async def identity_database(fresh_database: str, postgres: EmbeddedPostgres) -> dict[str, str]:
    """Each service's own login URL on a migrated database."""
    await migrations.migrate(fresh_database)
    return await migrations.provision_service_logins(fresh_database, postgres.secrets_dir)


@pytest.fixture
async def people(
    identity_database: dict[str, str], redis: EmbeddedRedis, pki_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[People]:
    monkeypatch.setenv("MEGACITY_PII_KEYS", generate_key_spec("test"))
    monkeypatch.setenv("MEGACITY_BCRYPT_COST", str(TEST_BCRYPT_COST))
    monkeypatch.setenv("MEGACITY_LOGIN_SLOWDOWN", "0")
    catalog = mesh_catalog()
    tenant_config = make_config(
        catalog, "tenant", pki_dir, database_url=identity_database["tenant"], redis_url=redis.url
    )
    async with running(tenant_config) as tenant_service:
        monkeypatch.setenv("MEGACITY_TARGET_TENANT", f"127.0.0.1:{tenant_service.port}")
        auth_config = make_config(catalog, "auth", pki_dir, database_url=identity_database["auth"], redis_url=redis.url)
        async with running(auth_config) as auth_service:
            monkeypatch.setenv("MEGACITY_TARGET_AUTH", f"127.0.0.1:{auth_service.port}")
            await _until_serving(auth_service)
            async with (
                channel_as("edge", auth_service, pki_dir) as auth_channel,
                channel_as("edge", tenant_service, pki_dir) as tenant_channel,
            ):
                yield People(
                    auth=auth_service_pb2_grpc.AuthServiceStub(auth_channel),
                    tenant=tenant_service_pb2_grpc.TenantServiceStub(tenant_channel),
                    auth_service=auth_service,
                    tenant_service=tenant_service,
                    auth_url=identity_database["auth"],
                    redis_url=redis.url,
                    pki_dir=pki_dir,
                )


async def _until_serving(service: Service) -> None:
    """The auth service is ready once its signing keys are loaded and revocations are in Redis."""
    assert service.health is not None
    for _ in range(100):
        if service.health.serving:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the auth service did not become ready")


def reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call ('' without one)."""
    info = error_info(status_from_error(error))
    return info.reason if info else ""


@pytest.fixture
async def exam(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis
) -> AsyncIterator[exam_service_pb2_grpc.ExamServiceStub]:
    """The exam service next to the identity services, called as the edge."""
    config = make_config(
        mesh_catalog(), "exam", people.pki_dir, database_url=identity_database["exam"], redis_url=redis.url
    )
    async with running(config) as service, channel_as("edge", service, people.pki_dir) as channel:
        yield exam_service_pb2_grpc.ExamServiceStub(channel)


PEOPLE_SERVICES = ("auth", "tenant", "exam", "tutor", "kzone", "jobs")


@pytest.fixture
async def people_services(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis
) -> AsyncIterator[dict[str, Service]]:
    """Every people-facing service over mTLS: the auth and tenant services of `people`, and the others."""
    catalog = load_catalog()
    async with AsyncExitStack() as stack:
        services = {"auth": people.auth_service, "tenant": people.tenant_service}
        for name in PEOPLE_SERVICES[2:]:
            config = make_config(
                catalog, name, people.pki_dir, database_url=identity_database[name], redis_url=redis.url
            )
            services[name] = await stack.enter_async_context(running(config))
        yield services
