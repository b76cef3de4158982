"""PostgreSQL access for services: asyncpg pools, and transactions that carry the caller's tenant.

Tenant-owned tables enforce isolation with row-level security (db/platform/0001_tenant_rls.up.sql):
a row is visible or writable only if it matches the tenant scope set for the current transaction. A
service therefore reads and writes tenant data inside `tenant_transaction`, connected as its own
login role (`megacity_<service>`, see ops/migrations.py); a query that forgets a WHERE clause still
sees only its tenant's rows, and one that runs outside `tenant_transaction` sees none.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum

import asyncpg
from asyncpg.pool import PoolConnectionProxy

_SCHEMA = re.compile(r"[a-z_][a-z0-9_]*")
# What a broken or unreachable server looks like to a client: refused or reset sockets, a server that
# is starting or shutting down, a pooled connection that died while idle.
_UNAVAILABLE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class ScopeLevel(StrEnum):
    """How much of the tenant space a transaction sees; the values are what the RLS policy reads."""

    PLATFORM = "platform"
    ZONE = "zone"
    ORG = "org"


@dataclass(frozen=True)
class TenantScope:
    """The rows a transaction may see and write: everything, one zone, or one organisation of a zone.

    Built from the verified caller (never from request fields): `TenantScope.platform()` for platform
    operators, `TenantScope.zone(zone_id)` for zone administrators, `TenantScope.org(zone_id, org_id)`
    for everyone else.
    """

    level: ScopeLevel
    zone_id: str | None = None
    org_id: str | None = None

    def __post_init__(self) -> None:
        wants_zone = self.level in (ScopeLevel.ZONE, ScopeLevel.ORG)
        wants_org = self.level is ScopeLevel.ORG
        if bool(self.zone_id) != wants_zone or bool(self.org_id) != wants_org:
            zone = "a zone_id" if wants_zone else "no zone_id"
            org = "an org_id" if wants_org else "no org_id"
            raise ValueError(
                f"a {self.level} scope needs {zone} and {org}; got zone_id={self.zone_id!r}, org_id={self.org_id!r}"
            )

    @classmethod
    def platform(cls) -> TenantScope:
        return cls(ScopeLevel.PLATFORM)

    @classmethod
    def zone(cls, zone_id: str) -> TenantScope:
        return cls(ScopeLevel.ZONE, zone_id=zone_id)

    @classmethod
    def org(cls, zone_id: str, org_id: str) -> TenantScope:
        return cls(ScopeLevel.ORG, zone_id=zone_id, org_id=org_id)


class _StatelessSessionConnection(asyncpg.Connection):
    """Our sessions keep no state past their transactions (tenant settings are SET LOCAL, advisory locks are
    transaction locks, nothing LISTENs or declares cursors WITH HOLD), so a connection going back to the pool needs
    no reset query: one round trip saved per transaction. An open transaction is still rolled back."""

    def get_reset_query(self) -> str:
        return ""


async def create_pool(dsn: str, *, schema: str, min_size: int = 0, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections resolve unqualified names in `schema`, the service's own.

    With min_size 0 no connection is opened until the first use, so a service starts (and reports
    NOT_SERVING through its health check) while PostgreSQL is still down.
    """
    if not _SCHEMA.fullmatch(schema):
        raise ValueError(f"schema {schema!r} is not a lowercase SQL identifier")
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"search_path": schema},
        connection_class=_StatelessSessionConnection,
    )


def _literal(value: str) -> str:
    """A PostgreSQL string literal (standard_conforming_strings, the default since 9.1: only quotes double)."""
    if "\x00" in value:
        raise ValueError("a tenant setting cannot contain a NUL character")
    return "'" + value.replace("'", "''") + "'"


@asynccontextmanager
async def tenant_transaction(pool: asyncpg.Pool, scope: TenantScope) -> AsyncIterator[PoolConnectionProxy]:
    """A pooled connection inside a transaction that row-level security scopes to `scope`.

    The settings are transaction-local (SET LOCAL), so they vanish at commit or rollback and a connection returned
    to the pool never carries one caller's tenant to the next. The transaction opens with its settings in one
    round trip (a simple-protocol batch: every request's transactions start this way, and round trips are most of
    their cost); a connection released while still in the transaction (an error, a cancellation) is rolled back
    by the pool.
    """
    begin = (
        f"BEGIN; SET LOCAL megacity.scope = {_literal(scope.level.value)}; "
        f"SET LOCAL megacity.zone_id = {_literal(scope.zone_id or '')}; "
        f"SET LOCAL megacity.org_id = {_literal(scope.org_id or '')}"
    )
    async with pool.acquire() as connection:
        await connection.execute(begin)
        try:
            yield connection
        except BaseException:
            # A broken connection cannot roll back; the pool discards it, and the original error is what matters.
            with contextlib.suppress(Exception):
                await asyncio.shield(connection.execute("ROLLBACK"))
            raise
        await connection.execute("COMMIT")


async def _select_one(pool: asyncpg.Pool) -> bool:
    async with pool.acquire() as connection:
        return bool(await connection.fetchval("SELECT 1") == 1)


# A health monitor gives each dependency its own time budget and wants an answer, not an exception:
# hence the timeout parameter rather than leaving it to the caller's asyncio.timeout.
async def ping(pool: asyncpg.Pool, timeout: float) -> bool:
    """Whether PostgreSQL answers a query through `pool` within `timeout` seconds; never raises.

    After PostgreSQL restarts every idle connection in the pool is dead, not only the one that failed;
    expiring them all lets the retry, and the service's next queries, use fresh connections instead of
    failing once per stale connection.
    """
    try:
        async with asyncio.timeout(timeout):
            try:
                return await _select_one(pool)
            except _UNAVAILABLE:
                await pool.expire_connections()
                return await _select_one(pool)
    except _UNAVAILABLE:
        return False
