"""Real PostgreSQL and Redis-protocol servers for the test session (a pytest plugin).

One server of each kind per session, each in its own temporary directory on a free port, stopped when
the session ends. Tests that need a clean database take `fresh_database`, a new database on the
session's server that is dropped afterwards, so they neither see nor disturb each other's data.
Service roles (`megacity_<service>`) are cluster-wide: provision their logins with the server's own
`postgres.secrets_dir`, so every test of the session agrees on their passwords.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from ops.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.support.ports import free_port


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres") / "data", port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis") / "data", port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def fresh_database(postgres: EmbeddedPostgres) -> AsyncIterator[str]:
    """The superuser's URL of a new, empty database, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    connection = await asyncpg.connect(postgres.admin_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
        yield postgres.url_for(name)
        # FORCE: pools a test left open must not keep its database alive.
        await connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await connection.close()
