"""The embedded servers: data survives stop and start, a crashed server starts again, clients recover.

These tests run private servers (not the session's), since they stop, kill and restart them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from ops.embedded import EmbeddedError, EmbeddedPostgres, EmbeddedRedis
from services.runtime.catalog import REPO
from services.runtime.database import create_pool, ping
from tests.support.ports import free_port


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "postgres", port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    server.start()
    yield server
    server.stop()


async def _execute(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _notes(url: str) -> list[str]:
    connection = await asyncpg.connect(url)
    try:
        return [row["note"] for row in await connection.fetch("SELECT note FROM notes ORDER BY note")]
    finally:
        await connection.close()


async def test_postgres_restart_keeps_data_and_the_pool_recovers(private_postgres: EmbeddedPostgres) -> None:
    server = private_postgres
    assert stat.S_IMODE(server.password_file.stat().st_mode) == 0o600
    await _execute(server.admin_url, "CREATE TABLE notes (note text); INSERT INTO notes VALUES ('kept')")
    pool = await create_pool(server.admin_url, schema="public", max_size=2)
    try:
        assert await ping(pool, timeout=5)
        before = server.pid

        await asyncio.to_thread(server.stop)
        assert not server.is_running()
        assert server.pid is None
        assert not await ping(pool, timeout=2)

        await asyncio.to_thread(server.start)
        assert server.is_running()
        assert server.pid not in (None, before)
        # The pool's connections died with the old server; the first ping afterwards already succeeds.
        assert await ping(pool, timeout=5)
        assert await _notes(server.admin_url) == ["kept"]
    finally:
        await pool.close()


async def test_a_pool_can_be_created_while_postgres_is_down() -> None:
    # Services start before their database is reachable and report NOT_SERVING until it is.
    pool = await create_pool(f"postgresql://nobody:secret@127.0.0.1:{free_port()}/megacity", schema="public")
    try:
        assert not await ping(pool, timeout=2)
    finally:
        await pool.close()


def test_postgres_stops_from_another_process(private_postgres: EmbeddedPostgres) -> None:
    # What `megacity down` does: a new process that knows only where the server lives.
    script = "import sys, pathlib, ops.embedded as e; e.EmbeddedPostgres(pathlib.Path(sys.argv[1]), 0).stop()"
    subprocess.run([sys.executable, "-c", script, str(private_postgres.data_dir)], check=True, cwd=REPO, timeout=60)
    assert not private_postgres.is_running()


def _wait_until_gone(server: EmbeddedPostgres) -> None:
    # A signal is delivered asynchronously: the killed server may still be there for a moment.
    while server.is_running():
        time.sleep(0.05)


async def test_postgres_starts_again_after_a_crash(private_postgres: EmbeddedPostgres) -> None:
    server = private_postgres
    await _execute(server.admin_url, "CREATE TABLE notes (note text); INSERT INTO notes VALUES ('committed')")
    crashed = server.pid
    assert crashed is not None
    os.kill(crashed, signal.SIGKILL)
    await asyncio.to_thread(_wait_until_gone, server)
    assert (server.data_dir / "postmaster.pid").exists()

    await asyncio.to_thread(server.start)
    assert await _notes(server.admin_url) == ["committed"]


def test_postgres_starts_over_a_lock_file_whose_pid_was_reused(private_postgres: EmbeddedPostgres) -> None:
    # After a reboot or in a container the crashed server's pid often belongs to some other live process,
    # which PostgreSQL alone would take for a server still running.
    server = private_postgres
    lock_file = server.data_dir / "postmaster.pid"
    stale = lock_file.read_text()
    server.stop()
    with subprocess.Popen(["sleep", "60"]) as stranger:
        try:
            lines = stale.splitlines()
            lock_file.write_text("\n".join([str(stranger.pid), *lines[1:]]) + "\n")
            server.start()
            assert server.is_running()
            assert server.pid != stranger.pid
        finally:
            stranger.kill()


def test_postgres_reports_a_port_in_use(private_postgres: EmbeddedPostgres, tmp_path: Path) -> None:
    rival = EmbeddedPostgres(tmp_path / "rival", port=private_postgres.port)
    started = time.monotonic()
    with pytest.raises(EmbeddedError, match=r"(?s)exited with status 1 while starting.*already in use"):
        rival.start()
    assert time.monotonic() - started < 30
    assert not rival.is_running()


async def _redis_roundtrip(url: str, key: str, value: bytes | None = None) -> bytes | str | None:
    client = Redis.from_url(url)
    try:
        if value is not None:
            await client.set(key, value)
        return await client.get(key)
    finally:
        await client.aclose()


async def test_redis_restart_keeps_data(private_redis: EmbeddedRedis) -> None:
    server = private_redis
    assert await _redis_roundtrip(server.url, "cat:attempt-1:state", b"kept") == b"kept"
    await asyncio.to_thread(server.stop)
    assert not server.is_running()
    await asyncio.to_thread(server.start)
    assert server.is_running()
    assert await _redis_roundtrip(server.url, "cat:attempt-1:state") == b"kept"


def test_redis_stops_from_another_process(private_redis: EmbeddedRedis) -> None:
    script = "import sys, pathlib, ops.embedded as e; e.EmbeddedRedis(pathlib.Path(sys.argv[1]), 0).stop()"
    subprocess.run([sys.executable, "-c", script, str(private_redis.data_dir)], check=True, cwd=REPO, timeout=60)
    assert not private_redis.is_running()


async def test_session_servers_answer(postgres: EmbeddedPostgres, redis: EmbeddedRedis) -> None:
    await _execute(postgres.admin_url, "SELECT 1")
    assert await _redis_roundtrip(redis.url, "probe", b"pong") == b"pong"
