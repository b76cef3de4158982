"""The audit trail's SQL (table `audit_records` of schema `auth`, db/auth/0003_audit.up.sql): appending records to
their zone's chain, listing them, and verifying a chain as stored.

services/auth/store.py owns the accounts' SQL; this module owns the audit table's, and services/auth/audit.py the
rules both sides of it follow (sealing, verification), so a record's hash is computed in one place only.

Records are appended in the platform scope, since the services that decide them write them whoever the record is
about, and read in the reader's tenant scope: row-level security bounds every listing to the reader's zone or
organisation (an organisation's scope does not see its zone's zone-level records, whose org_id is empty).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime

import asyncpg
import orjson

from services.auth.audit import GENESIS_HASH, AuditDraft, AuditEntry, ChainBreak, canonical_details, seal, verify_chain
from services.runtime.database import TenantScope, tenant_transaction

# A column per AuditEntry field, named alike, so every field is stored and a row maps back to its entry by name.
_FIELDS = tuple(entry_field.name for entry_field in fields(AuditEntry))
_COLUMNS = ", ".join(_FIELDS)
_PLACEHOLDERS = ", ".join(f"${index}" for index in range(1, len(_FIELDS) + 1))
# The queries here are composed (S608) of constant fragments and AuditEntry's field names only; every value is bound.
_SELECT = f"SELECT {_COLUMNS} FROM audit_records"  # noqa: S608
_INSERT = (
    f"INSERT INTO audit_records ({_COLUMNS}) VALUES ({_PLACEHOLDERS}) "  # noqa: S608
    "ON CONFLICT (id) DO NOTHING RETURNING true"
)


EQUALITY_FILTERS = frozenset({"actor_id", "action", "resource_type", "resource_id", "org_id", "outcome"})


@dataclass(frozen=True)
class ChainVerification:
    """What verifying one zone's chain found: how many records it read, and the first broken one, if any.

    `records_checked` counts the broken record too: with a break it is the break's sequence, otherwise the length
    of the chain.
    """

    zone_id: str
    records_checked: int
    first_break: ChainBreak | None

    @property
    def intact(self) -> bool:
        return self.first_break is None


class AuditLog:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def append(self, draft: AuditDraft) -> AuditEntry:
        """`draft` sealed at the end of its zone's chain and stored; `draft` is expected to be validated
        (`audit.validate_draft` or `audit.draft_from_message`).

        Idempotent by id: if a record with `draft.id` is stored already (a retried WriteAuditRecord, even one still
        in flight), that record is returned unchanged and nothing new is stored. The first write of an id is the
        record, whatever a later one says.
        """
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            # The zone's appends queue here, so each reads the head its predecessor committed and the chain cannot
            # fork. A function in FROM runs before the select list, so the clock is read with the lock held and a
            # record's time is never earlier than its predecessor's (barring the server's clock stepping back).
            record_time = await connection.fetchval(
                "SELECT clock_timestamp() FROM pg_advisory_xact_lock(hashtext('audit:' || $1))", draft.zone_id
            )
            # A statement of its own after the lock: its snapshot includes the predecessor's record.
            head = await connection.fetchrow(
                "SELECT sequence, hash FROM audit_records WHERE zone_id = $1 ORDER BY sequence DESC LIMIT 1",
                draft.zone_id,
            )
            entry = seal(
                draft,
                sequence=head["sequence"] + 1 if head else 1,
                prev_hash=head["hash"] if head else GENESIS_HASH,
                record_time=record_time,
            )
            if await connection.fetchval(_INSERT, *_row(entry)):
                return entry
            # The id is taken, in this zone or (if a writer changed the record's zone) another: ON CONFLICT waited
            # for that record's transaction, and this statement's snapshot sees it.
            stored = await connection.fetchrow(f"{_SELECT} WHERE id = $1", draft.id)
        assert stored is not None
        return _entry(stored)

    async def page(
        self,
        scope: TenantScope,
        *,
        zone_id: str | None,
        since: datetime | None,
        until: datetime | None,
        equal: Mapping[str, str],
        before_sequence: tuple[str, int] | None,
        limit: int,
    ) -> list[AuditEntry]:
        """Up to `limit` of the records `scope` may see, newest first, after the cursor `before_sequence`.

        With `zone_id`, newest means latest in that zone's chain (descending sequence). Without it (a platform
        operator across zones), it means latest stored: descending record time, ties broken by zone and sequence.
        Either order is total, so paging neither repeats nor skips a record, including ones appended meanwhile
        (they sort before the cursor). `before_sequence` is the (zone_id, sequence) of the previous page's last
        record, None for the first page; with `zone_id` it must be of that zone. `since` (inclusive) and `until`
        (exclusive) bound the event time, when the action happened. `equal` keeps the records whose columns (of
        EQUALITY_FILTERS) have exactly those values; an empty `actor_id` selects the records of anonymous callers.
        """
        assert EQUALITY_FILTERS.issuperset(equal), f"not a filter: {set(equal) - EQUALITY_FILTERS}"
        conditions: list[str] = []
        arguments: list[object] = []

        def bind(value: object) -> str:
            arguments.append(value)
            return f"${len(arguments)}"

        # Only the filters given become conditions: each combination gets its own prepared statement and plan,
        # which can use the index for that filter (an `$n IS NULL OR ...` condition would stop a generic plan
        # from using any).
        if zone_id is not None:
            conditions.append(f"zone_id = {bind(zone_id)}")
        if since is not None:
            conditions.append(f"event_time >= {bind(since)}")
        if until is not None:
            conditions.append(f"event_time < {bind(until)}")
        for column, value in equal.items():
            conditions.append(f"{column} = {bind(value)}")
        if zone_id is None:
            order = "record_time DESC, zone_id DESC, sequence DESC"
            if before_sequence is not None:
                cursor_zone, cursor_sequence = before_sequence
                conditions.append(
                    "(record_time, zone_id, sequence) < "  # noqa: S608
                    "(SELECT record_time, zone_id, sequence FROM audit_records "
                    f"WHERE zone_id = {bind(cursor_zone)} AND sequence = {bind(cursor_sequence)})"
                )
        else:
            order = "sequence DESC"
            if before_sequence is not None:
                cursor_zone, cursor_sequence = before_sequence
                if cursor_zone != zone_id:
                    raise ValueError(f"a cursor of zone {cursor_zone!r} cannot page through zone {zone_id!r}")
                conditions.append(f"sequence < {bind(cursor_sequence)}")
        where = " AND ".join(conditions) or "true"
        query = f"{_SELECT} WHERE {where} ORDER BY {order} LIMIT {bind(limit)}"
        async with tenant_transaction(self._pool, scope) as connection:
            rows = await connection.fetch(query, *arguments)
        return [_entry(row) for row in rows]

    async def verify(self, zone_id: str, page_size: int = 1000) -> ChainVerification:
        """Recomputes `zone_id`'s chain as stored, `page_size` records at a time, each page read in a transaction of
        its own (no snapshot is held open however long the chain), and stops at the first break."""
        verified_sequence, verified_hash = 0, GENESIS_HASH
        while True:
            async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
                rows = await connection.fetch(
                    f"{_SELECT} WHERE zone_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3",
                    zone_id,
                    verified_sequence,
                    page_size,
                )
            entries = [_entry(row) for row in rows]
            chain_break = verify_chain(entries, verified_hash, verified_sequence + 1)
            if chain_break is not None:
                return ChainVerification(zone_id, chain_break.sequence, chain_break)
            if len(entries) < page_size:
                return ChainVerification(zone_id, verified_sequence + len(entries), None)
            verified_sequence, verified_hash = entries[-1].sequence, entries[-1].hash

    async def zones_with_records(self) -> list[str]:
        """Every zone with at least one record, in order."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            # One probe of the chain index per zone (a DISTINCT would read every record): each step finds the
            # smallest zone after the previous one.
            rows = await connection.fetch(
                """
                WITH RECURSIVE zones (zone_id) AS (
                    (SELECT zone_id FROM audit_records ORDER BY zone_id LIMIT 1)
                    UNION ALL
                    SELECT (
                        SELECT later.zone_id FROM audit_records AS later WHERE later.zone_id > zones.zone_id
                        ORDER BY later.zone_id LIMIT 1
                    )
                    FROM zones WHERE zones.zone_id IS NOT NULL
                )
                SELECT zone_id FROM zones WHERE zone_id IS NOT NULL
                """
            )
        return [row["zone_id"] for row in rows]


def _row(entry: AuditEntry) -> list[object]:
    """`entry`'s column values in `_FIELDS` order; details as the JSON text of their canonical form."""
    return [
        orjson.dumps(canonical_details(entry.details)).decode() if name == "details" else getattr(entry, name)
        for name in _FIELDS
    ]


def _entry(row: asyncpg.Record) -> AuditEntry:
    values = dict(row)
    details = orjson.loads(values["details"])
    # jsonb keeps a number as the decimal it was written as, so a large double can come back as an integer that
    # differs from it below the double's precision: canonical again, it is the number that was sealed.
    with contextlib.suppress(ValueError):
        # Details that are not canonical JSON were changed after sealing; verification reports them, so they are
        # returned as stored.
        details = canonical_details(details)
    values["details"] = details
    return AuditEntry(**values)
