"""`megacity audit verify`: recompute the audit trail's hash chains as stored and report each zone's first broken
link (services/auth/audit.py says what a hash chain shows and what it cannot).

It connects like `megacity db`, with the owner's URL (ops/migrations.py, resolve_admin_url), so it reads every zone.
Exit status: 0 when every chain verified, 1 when one is broken, 2 when they could not be read.
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from ops.migrations import MigrationError, redact, resolve_admin_url
from services.auth.audit_log import AuditLog, ChainVerification
from services.runtime.database import create_pool

INTACT = 0
BROKEN = 1
UNREADABLE = 2


def describe(verification: ChainVerification) -> str:
    """One line for a zone: `ok (N records)`, or where its chain breaks, which record and how."""
    chain_break = verification.first_break
    if chain_break is None:
        return f"{verification.zone_id}: ok ({verification.records_checked} records)"
    return (
        f"{verification.zone_id}: broken at sequence {chain_break.sequence} "
        f"(record {chain_break.entry_id}): {chain_break.failure}"
    )


async def verify_chains(database_url: str, zone_id: str | None) -> bool:
    """Verifies `zone_id`'s chain, or every zone's, printing a line per zone as it is done; whether all are intact."""
    pool = await create_pool(database_url, schema="auth", max_size=1)
    try:
        audit_log = AuditLog(pool)
        zones = [zone_id] if zone_id else await audit_log.zones_with_records()
        if not zones:
            print("no audit records")
        intact = True
        for zone in zones:
            verification = await audit_log.verify(zone)
            print(describe(verification), flush=True)
            intact = intact and verification.intact
        return intact
    finally:
        await pool.close()


def command(zone_id: str | None, database_url: str | None) -> int:
    """`megacity audit verify [--zone Z]`; the exit status."""
    try:
        url = resolve_admin_url(database_url)
    except MigrationError as error:
        print(f"megacity audit verify: {error}", file=sys.stderr)
        return UNREADABLE
    try:
        intact = asyncio.run(verify_chains(url, zone_id))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        print(f"megacity audit verify: cannot read the audit trail in {redact(url)}: {error}", file=sys.stderr)
        return UNREADABLE
    return INTACT if intact else BROKEN
