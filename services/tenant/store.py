"""The tenant service's SQL: zones, their domains, organisations (schema `tenant`, db/tenant/)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import asyncpg

from megacity.tenant.v1 import resources_pb2
from services.runtime.database import TenantScope, tenant_transaction
from services.runtime.errors import AlreadyExists, ErrorReason, NotFound
from services.runtime.rows import set_times
from services.tenant.zones import ORG_STATUS_VALUES, PLAN_VALUES, ZONE_STATUS_VALUES

_ZONE_COLUMNS = """
    z.zone_id, z.display_name, z.description, z.status, z.public_org_id, z.default_locale, z.supported_locales,
    z.create_time, z.update_time,
    coalesce((SELECT array_agg(d.domain ORDER BY d.domain) FROM zone_domains d WHERE d.zone_id = z.zone_id), '{}')
        AS domains
"""
ZONE_UPDATABLE = frozenset({"display_name", "description", "status", "default_locale", "supported_locales"})
ORG_UPDATABLE = frozenset({"name", "plan", "contact_email", "status", "suspend_reason", "suspend_time"})
ORG_FILTERS = frozenset({"zone_id", "status", "plan"})
_ORG_COLUMNS = """
    org_id, zone_id, name, plan, status, is_public, contact_email, suspend_reason, suspend_time, create_time,
    update_time
"""


def zone_message(row: asyncpg.Record) -> resources_pb2.Zone:
    zone = resources_pb2.Zone(
        id=row["zone_id"],
        display_name=row["display_name"],
        description=row["description"],
        domains=row["domains"],
        status=ZONE_STATUS_VALUES[row["status"]],
        public_org_id=row["public_org_id"],
        default_locale=row["default_locale"],
        supported_locales=row["supported_locales"],
    )
    set_times(zone, row, ("create_time", "update_time"))
    return zone


def organization_message(row: asyncpg.Record) -> resources_pb2.Organization:
    organization = resources_pb2.Organization(
        id=row["org_id"],
        zone_id=row["zone_id"],
        name=row["name"],
        plan=PLAN_VALUES[row["plan"]],
        status=ORG_STATUS_VALUES[row["status"]],
        is_public=row["is_public"],
        contact_email=row["contact_email"],
        suspend_reason=row["suspend_reason"],
    )
    set_times(organization, row, ("suspend_time", "create_time", "update_time"))
    return organization


class TenantStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # --- zones (reference data: not tenant-owned, read in the platform scope) ---------------------------

    async def zone_for_domains(self, candidates: Sequence[str]) -> tuple[resources_pb2.Zone, str] | None:
        """The active zone of the most specific of `candidates` that is registered, and that domain."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            row = await connection.fetchrow(
                f"SELECT {_ZONE_COLUMNS}, d.domain AS matched FROM zone_domains d JOIN zones z USING (zone_id) "
                "WHERE d.domain = ANY($1::text[]) AND z.status = 'active' "
                "ORDER BY array_position($1::text[], d.domain) LIMIT 1",
                list(candidates),
            )
        return None if row is None else (zone_message(row), row["matched"])

    async def zone(self, zone_id: str, *, with_disabled: bool = True) -> resources_pb2.Zone:
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            row = await connection.fetchrow(
                f"SELECT {_ZONE_COLUMNS} FROM zones z WHERE z.zone_id = $1 AND ($2 OR z.status = 'active')",
                zone_id,
                with_disabled,
            )
        if row is None:
            raise NotFound(f"zone {zone_id!r} does not exist", reason=ErrorReason.ERROR_REASON_UNKNOWN_ZONE)
        return zone_message(row)

    async def zones(self, after: str | None, limit: int, *, with_disabled: bool) -> list[resources_pb2.Zone]:
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            rows = await connection.fetch(
                f"SELECT {_ZONE_COLUMNS} FROM zones z WHERE ($1::text IS NULL OR z.zone_id > $1) "
                "AND ($3 OR z.status = 'active') ORDER BY z.zone_id LIMIT $2",
                after,
                limit,
                with_disabled,
            )
        return [zone_message(row) for row in rows]

    async def create_zone(
        self, zone: resources_pb2.Zone, domains: Sequence[str], public_org_name: str
    ) -> resources_pb2.Zone:
        public_org_id = f"{zone.id}-public"
        try:
            async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
                await connection.execute(
                    "INSERT INTO zones (zone_id, display_name, description, public_org_id, default_locale, "
                    "supported_locales) VALUES ($1, $2, $3, $4, $5, $6)",
                    zone.id,
                    zone.display_name.strip(),
                    zone.description,
                    public_org_id,
                    zone.default_locale or "en",
                    list(zone.supported_locales) or [zone.default_locale or "en"],
                )
                await connection.executemany(
                    "INSERT INTO zone_domains (domain, zone_id) VALUES ($1, $2)", [(d, zone.id) for d in domains]
                )
                await connection.execute(
                    "INSERT INTO organizations (org_id, zone_id, name, is_public) VALUES ($1, $2, $3, true)",
                    public_org_id,
                    zone.id,
                    public_org_name or f"{zone.display_name.strip()} (public)",
                )
        except asyncpg.UniqueViolationError as error:
            what = "domain" if error.table_name == "zone_domains" else "zone"
            raise AlreadyExists(f"that {what} already exists", reason=ErrorReason.ERROR_REASON_ALREADY_EXISTS) from None
        return await self.zone(zone.id)

    async def update_zone(self, zone_id: str, changes: Mapping[str, object]) -> resources_pb2.Zone:
        assert ZONE_UPDATABLE.issuperset(changes), f"not updatable: {set(changes) - ZONE_UPDATABLE}"
        if changes:
            assignments = ", ".join(f"{column} = ${index}" for index, column in enumerate(changes, start=2))
            async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
                updated = await connection.execute(
                    f"UPDATE zones SET {assignments}, update_time = now() WHERE zone_id = $1",
                    zone_id,
                    *changes.values(),
                )
            if updated == "UPDATE 0":
                raise NotFound(f"zone {zone_id!r} does not exist", reason=ErrorReason.ERROR_REASON_UNKNOWN_ZONE)
        return await self.zone(zone_id)

    async def add_domain(self, zone_id: str, domain: str) -> resources_pb2.Zone:
        await self.zone(zone_id)
        try:
            async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
                owner = await connection.fetchval(
                    "INSERT INTO zone_domains (domain, zone_id) VALUES ($1, $2) "
                    "ON CONFLICT (domain) DO UPDATE SET domain = EXCLUDED.domain RETURNING zone_id",
                    domain,
                    zone_id,
                )
        except asyncpg.UniqueViolationError:
            owner = None
        if owner != zone_id:
            raise AlreadyExists(f"{domain} belongs to another zone", reason=ErrorReason.ERROR_REASON_ALREADY_EXISTS)
        return await self.zone(zone_id)

    async def remove_domain(self, zone_id: str, domain: str) -> resources_pb2.Zone:
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            removed = await connection.execute(
                "DELETE FROM zone_domains WHERE domain = $1 AND zone_id = $2", domain, zone_id
            )
        if removed == "DELETE 0":
            raise NotFound(f"{domain} is not a domain of zone {zone_id!r}")
        return await self.zone(zone_id)

    # --- organisations (tenant-owned: row-level security applies the caller's scope) --------------------

    async def organization(self, scope: TenantScope, org_id: str) -> resources_pb2.Organization:
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(f"SELECT {_ORG_COLUMNS} FROM organizations WHERE org_id = $1", org_id)
        if row is None:
            raise NotFound(f"organisation {org_id!r} does not exist")
        return organization_message(row)

    async def organizations(
        self, scope: TenantScope, filters: Mapping[str, str], query: str, after: str | None, limit: int
    ) -> tuple[list[resources_pb2.Organization], int]:
        """A page of organisations ordered by id, and how many match in all."""
        assert ORG_FILTERS.issuperset(filters), f"not a filter: {set(filters) - ORG_FILTERS}"
        conditions = [f"{column} = ${index}" for index, column in enumerate(filters, start=1)]
        arguments: list[object] = list(filters.values())
        if query:
            arguments.append(f"%{query.lower()}%")
            conditions.append(f"lower(name) LIKE ${len(arguments)}")
        where = " AND ".join(conditions) or "true"
        async with tenant_transaction(self._pool, scope) as connection:
            total = await connection.fetchval(f"SELECT count(*) FROM organizations WHERE {where}", *arguments)
            rows = await connection.fetch(
                f"SELECT {_ORG_COLUMNS} FROM organizations WHERE {where} AND (${len(arguments) + 1}::text IS NULL "
                f"OR org_id > ${len(arguments) + 1}) ORDER BY org_id LIMIT ${len(arguments) + 2}",
                *arguments,
                after,
                limit,
            )
        return [organization_message(row) for row in rows], int(total)

    async def create_organization(
        self, scope: TenantScope, zone_id: str, organization: resources_pb2.Organization, plan: str
    ) -> resources_pb2.Organization:
        try:
            async with tenant_transaction(self._pool, scope) as connection:
                if not await connection.fetchval("SELECT EXISTS (SELECT FROM zones WHERE zone_id = $1)", zone_id):
                    raise NotFound(f"zone {zone_id!r} does not exist", reason=ErrorReason.ERROR_REASON_UNKNOWN_ZONE)
                row = await connection.fetchrow(
                    f"INSERT INTO organizations (org_id, zone_id, name, plan, contact_email) "
                    f"VALUES ($1, $2, $3, $4, $5) RETURNING {_ORG_COLUMNS}",
                    uuid.uuid4().hex,
                    zone_id,
                    organization.name.strip(),
                    plan,
                    organization.contact_email,
                )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                f"an organisation named {organization.name!r} exists in this zone",
                reason=ErrorReason.ERROR_REASON_ALREADY_EXISTS,
            ) from None
        assert row is not None
        return organization_message(row)

    async def update_organization(
        self, scope: TenantScope, org_id: str, changes: Mapping[str, object]
    ) -> resources_pb2.Organization:
        assert ORG_UPDATABLE.issuperset(changes), f"not updatable: {set(changes) - ORG_UPDATABLE}"
        assignments = "".join(f", {column} = ${index}" for index, column in enumerate(changes, start=2))
        try:
            async with tenant_transaction(self._pool, scope) as connection:
                row = await connection.fetchrow(
                    f"UPDATE organizations SET update_time = now(){assignments} WHERE org_id = $1 "
                    f"RETURNING {_ORG_COLUMNS}",
                    org_id,
                    *changes.values(),
                )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                "an organisation with that name exists in this zone", reason=ErrorReason.ERROR_REASON_ALREADY_EXISTS
            ) from None
        if row is None:
            raise NotFound(f"organisation {org_id!r} does not exist")
        return organization_message(row)
