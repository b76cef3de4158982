"""The audit trail in PostgreSQL (services/auth/audit_log.py, db/auth/0003_audit): chains per zone under concurrent
and repeated appends, history nobody can edit, tampering that verification finds, tenant isolation, listing, and
`megacity audit verify`."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from ops import audit as audit_command
from ops import cli, migrations
from ops.embedded import EmbeddedPostgres
from services.auth import audit
from services.auth.audit import GENESIS_HASH, AuditDraft, AuditEntry, ChainFailure
from services.auth.audit_log import AuditLog, ChainVerification
from services.runtime.database import TenantScope, create_pool, tenant_transaction

UNIV = "univ"
KZONE = "kzone"
ORG_A = "org-a"
ORG_B = "org-b"
START = datetime(2025, 3, 1, 9, 0, 0, 250000, tzinfo=UTC)
DEEP_DETAILS = '{"a": ' * (audit.MAX_DETAILS_DEPTH + 1) + "1" + "}" * (audit.MAX_DETAILS_DEPTH + 1)


@pytest.fixture
async def auth_pool(fresh_database: str, postgres: EmbeddedPostgres) -> AsyncIterator[asyncpg.Pool]:
    """A pool of several connections as the auth service's own login, on a migrated database."""
    await migrations.migrate(fresh_database)
    urls = await migrations.provision_service_logins(fresh_database, postgres.secrets_dir)
    pool = await create_pool(urls["auth"], schema="auth", max_size=5)
    yield pool
    await pool.close()


@pytest.fixture
def audit_log(auth_pool: asyncpg.Pool) -> AuditLog:
    return AuditLog(auth_pool)


def make_draft(zone_id: str = UNIV, *, minute: int = 0, **changes: Any) -> AuditDraft:
    """A validated draft, as WriteAuditRecord hands them to the store."""
    draft = AuditDraft(
        id=str(uuid.uuid4()),
        zone_id=zone_id,
        org_id=ORG_A,
        actor_id="alice",
        actor_role="teacher",
        actor_service="exam",
        action="update",
        outcome="success",
        resource_type="exam",
        resource_id="exam-1",
        ip_address="203.0.113.7",
        user_agent="Mozilla/5.0",
        request_id=f"req-{minute}",
        details={"changed": ["title"]},
        event_time=START + timedelta(minutes=minute),
    )
    return audit.validate_draft(replace(draft, **changes))


async def listing(
    audit_log: AuditLog,
    scope: TenantScope | None = None,
    *,
    zone_id: str | None = UNIV,
    since: datetime | None = None,
    until: datetime | None = None,
    actor_id: str | None = None,
    action: str | None = None,
    before_sequence: tuple[str, int] | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    return await audit_log.page(
        scope or TenantScope.platform(),
        zone_id=zone_id,
        since=since,
        until=until,
        equal={column: value for column, value in (("actor_id", actor_id), ("action", action)) if value is not None},
        before_sequence=before_sequence,
        limit=limit,
    )


def ids(entries: list[AuditEntry]) -> list[str]:
    return [entry.id for entry in entries]


async def tamper(database_url: str, statement: str, *arguments: object) -> None:
    """Runs `statement` as the superuser with triggers off for this transaction only (which only a superuser may
    do): what someone who took over the database server could do to the history."""
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute("SET LOCAL session_replication_role = replica")
            await connection.execute(statement, *arguments)
    finally:
        await connection.close()


# --- appending ----------------------------------------------------------------------------------------------------


async def test_each_zone_gets_its_own_unbroken_chain(audit_log: AuditLog) -> None:
    zones = [UNIV, KZONE, UNIV, UNIV, KZONE]
    appended = [await audit_log.append(make_draft(zone, minute=minute)) for minute, zone in enumerate(zones)]

    for zone, length in ((UNIV, 3), (KZONE, 2)):
        chain = [entry for entry in appended if entry.zone_id == zone]
        assert [entry.sequence for entry in chain] == list(range(1, length + 1))
        assert chain[0].prev_hash == GENESIS_HASH
        assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(chain))
        assert all(earlier.record_time < later.record_time for earlier, later in itertools.pairwise(chain))
        # Page sizes below, at and above the chain's length, and one that divides it.
        for page_size in (1, 2, length, 1000):
            assert await audit_log.verify(zone, page_size) == ChainVerification(zone, length, None)
    assert await audit_log.zones_with_records() == [KZONE, UNIV]
    assert await audit_log.verify("empty-zone") == ChainVerification("empty-zone", 0, None)


async def test_a_record_reads_back_exactly_as_it_was_sealed(audit_log: AuditLog) -> None:
    details = {
        "nested": {"b": [1, 2.5, None, True], "a": '한국어 "quoted" \\ \u2028'},
        "large": 1e300,
        "beyond_doubles_integers": 2**60,
        "small": 1.5e-300,
        "whole": 3.0,
        "empty": {},
    }
    draft = make_draft(
        details=details,
        ip_address="2001:0db8:0000::0001",
        event_time=datetime(2025, 3, 1, 18, 0, 0, 1, tzinfo=timezone(timedelta(hours=9))),
        outcome="",
        actor_role="",
        actor_id="",
    )
    entry = await audit_log.append(draft)
    (stored,) = await listing(audit_log)
    assert stored == entry
    assert stored.ip_address == "2001:db8::1"
    assert audit.canonical_bytes(stored) == audit.canonical_bytes(entry)
    assert (await audit_log.verify(UNIV)).intact


async def test_appending_an_id_again_returns_the_stored_record(audit_log: AuditLog) -> None:
    draft = make_draft()
    first = await audit_log.append(draft)
    assert await audit_log.append(draft) == first
    # The first write of an id is the record, whatever a later one says, even about its zone.
    assert await audit_log.append(replace(draft, action="delete", zone_id=KZONE)) == first

    # Retries racing each other: one is stored, every one answers with it.
    racing = make_draft(minute=1)
    answers = await asyncio.gather(*(audit_log.append(racing) for _ in range(5)))
    assert answers == [answers[0]] * 5
    assert answers[0].sequence == 2

    assert (await audit_log.append(make_draft(minute=2))).sequence == 3
    assert await audit_log.verify(UNIV) == ChainVerification(UNIV, 3, None)
    assert await audit_log.zones_with_records() == [UNIV]


async def test_concurrent_appends_form_one_chain_without_gaps_or_forks(audit_log: AuditLog) -> None:
    drafts = [make_draft(minute=minute) for minute in range(20)] + [make_draft(KZONE) for _ in range(5)]
    entries = await asyncio.gather(*(audit_log.append(draft) for draft in drafts))

    chain = sorted((entry for entry in entries if entry.zone_id == UNIV), key=lambda entry: entry.sequence)
    assert [entry.sequence for entry in chain] == list(range(1, 21))
    assert chain[0].prev_hash == GENESIS_HASH
    assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(chain))
    assert await audit_log.verify(UNIV, page_size=7) == ChainVerification(UNIV, 20, None)
    assert await audit_log.verify(KZONE) == ChainVerification(KZONE, 5, None)


# --- history nobody edits, and what verification finds when someone does ------------------------------------------


async def test_the_service_cannot_edit_history_and_the_owner_only_past_the_trigger(
    audit_log: AuditLog, auth_pool: asyncpg.Pool, fresh_database: str
) -> None:
    entry = await audit_log.append(make_draft())
    for statement in ("UPDATE audit_records SET action = 'read'", "DELETE FROM audit_records"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for table audit_records"):
            async with tenant_transaction(auth_pool, TenantScope.platform()) as connection:
                await connection.execute(statement)
    # Nor can it switch the trigger off for itself.
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="session_replication_role"):
        async with tenant_transaction(auth_pool, TenantScope.platform()) as connection:
            await connection.execute("SET LOCAL session_replication_role = replica")

    owner = await asyncpg.connect(fresh_database)
    try:
        for operation, statement in (
            ("UPDATE", "UPDATE auth.audit_records SET action = 'read'"),
            ("UPDATE", "UPDATE auth.audit_records SET action = 'read' WHERE false"),
            ("DELETE", "DELETE FROM auth.audit_records"),
            ("TRUNCATE", "TRUNCATE auth.audit_records"),
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match=f"append-only: {operation} on audit_records"):
                await owner.execute(statement)
    finally:
        await owner.close()
    assert await listing(audit_log) == [entry]


# Each statement changes univ's record 3 (the third of five) only.
@pytest.mark.parametrize("page_size", [2, 1000])
@pytest.mark.parametrize(
    ("statement", "arguments", "found_at", "failure"),
    [
        (
            "UPDATE auth.audit_records SET details = '{}' WHERE zone_id = 'univ' AND sequence = 3",
            (),
            3,
            ChainFailure.HASH_MISMATCH,
        ),
        (
            "UPDATE auth.audit_records SET action = 'read' WHERE zone_id = 'univ' AND sequence = 3",
            (),
            3,
            ChainFailure.HASH_MISMATCH,
        ),
        # Details no writer could have sent (nested too deep to be canonical) are reported, not a crash.
        (
            "UPDATE auth.audit_records SET details = $1::jsonb WHERE zone_id = 'univ' AND sequence = 3",
            (DEEP_DETAILS,),
            3,
            ChainFailure.HASH_MISMATCH,
        ),
        # A deleted record is missed at the next one: it no longer has the sequence the chain expects there.
        (
            "DELETE FROM auth.audit_records WHERE zone_id = 'univ' AND sequence = 3",
            (),
            4,
            ChainFailure.SEQUENCE_GAP,
        ),
    ],
    ids=["details edited", "action edited", "details too deep", "deleted"],
)
async def test_verification_finds_tampering_at_the_first_record_it_affects(
    audit_log: AuditLog,
    fresh_database: str,
    statement: str,
    arguments: tuple[object, ...],
    found_at: int,
    failure: ChainFailure,
    page_size: int,
) -> None:
    chain = [await audit_log.append(make_draft(minute=minute)) for minute in range(5)]
    other_zone = [await audit_log.append(make_draft(KZONE)) for _ in range(3)]
    await tamper(fresh_database, statement, *arguments)

    verification = await audit_log.verify(UNIV, page_size)
    assert verification.first_break is not None
    assert (verification.records_checked, verification.first_break.sequence) == (3, 3)
    assert verification.first_break.entry_id == chain[found_at - 1].id
    assert verification.first_break.failure is failure
    assert await audit_log.verify(KZONE, page_size) == ChainVerification(KZONE, len(other_zone), None)


# --- reading --------------------------------------------------------------------------------------------------------


async def test_each_scope_reads_only_its_tenants_records(audit_log: AuditLog) -> None:
    org_a = await audit_log.append(make_draft(org_id=ORG_A))
    org_b = await audit_log.append(make_draft(org_id=ORG_B))
    zone_level = await audit_log.append(make_draft(org_id=""))
    other_zone = await audit_log.append(make_draft(KZONE, org_id=ORG_A))

    assert ids(await listing(audit_log, TenantScope.platform(), zone_id=None)) == ids(
        [other_zone, zone_level, org_b, org_a]
    )
    assert ids(await listing(audit_log, TenantScope.zone(UNIV), zone_id=None)) == ids([zone_level, org_b, org_a])
    assert await listing(audit_log, TenantScope.zone(UNIV), zone_id=KZONE) == []
    # An organisation sees its own records only: not its zone's zone-level ones, nor its namesake's elsewhere.
    assert await listing(audit_log, TenantScope.org(UNIV, ORG_A), zone_id=UNIV) == [org_a]
    assert await listing(audit_log, TenantScope.org(UNIV, ORG_A), zone_id=None) == [org_a]


async def test_listing_is_newest_first_filtered_and_paged_without_overlap(audit_log: AuditLog) -> None:
    actors = ["alice", "bob", ""]
    actions = ["login", "update"]
    appended: list[AuditEntry] = []
    for minute in range(10):
        appended.append(
            await audit_log.append(make_draft(minute=minute, actor_id=actors[minute % 3], action=actions[minute % 2]))
        )
        if minute % 4 == 0:
            appended.append(await audit_log.append(make_draft(KZONE, minute=minute)))
    univ = [entry for entry in appended if entry.zone_id == UNIV]
    newest_first = univ[::-1]

    assert await listing(audit_log) == newest_first
    assert await listing(audit_log, limit=3) == newest_first[:3]
    assert await listing(audit_log, actor_id="alice") == [entry for entry in newest_first if entry.actor_id == "alice"]
    assert await listing(audit_log, actor_id="") == [entry for entry in newest_first if not entry.actor_id]
    assert await listing(audit_log, action="login") == [entry for entry in newest_first if entry.action == "login"]
    # `since` is inclusive, `until` exclusive: minutes 3 to 6.
    window = await listing(audit_log, since=START + timedelta(minutes=3), until=START + timedelta(minutes=7))
    assert window == newest_first[3:7]
    assert await listing(audit_log, since=START + timedelta(minutes=3), actor_id="alice", action="update") == [
        entry for entry in newest_first[:7] if entry.actor_id == "alice" and entry.action == "update"
    ]

    # Paging three at a time, with a record appended after the first page: it sorts before the cursor, so the
    # pages that follow neither show it nor repeat or skip anything.
    pages = [await listing(audit_log, limit=3)]
    late = await audit_log.append(make_draft(minute=99))
    while len(pages[-1]) == 3:
        last = pages[-1][-1]
        pages.append(await listing(audit_log, limit=3, before_sequence=(last.zone_id, last.sequence)))
    assert [len(page) for page in pages] == [3, 3, 3, 1]
    assert list(itertools.chain.from_iterable(pages)) == newest_first
    assert (await listing(audit_log, limit=1))[0] == late

    # Filters and the cursor combine.
    alice_first = await listing(audit_log, actor_id="alice", limit=2)
    cursor = (UNIV, alice_first[-1].sequence)
    alice_rest = await listing(audit_log, actor_id="alice", limit=2, before_sequence=cursor)
    alice = [entry for entry in [late, *newest_first] if entry.actor_id == "alice"]
    assert alice_first + alice_rest == alice[:4]

    with pytest.raises(ValueError, match="cannot page through zone 'univ'"):
        await listing(audit_log, before_sequence=(KZONE, 1))


async def test_across_zones_the_newest_stored_come_first(audit_log: AuditLog) -> None:
    appended = [await audit_log.append(make_draft(zone)) for zone in [UNIV, KZONE, KZONE, UNIV, UNIV, KZONE, UNIV]]
    newest_first = appended[::-1]
    assert await listing(audit_log, zone_id=None) == newest_first

    pages = [await listing(audit_log, zone_id=None, limit=3)]
    while len(pages[-1]) == 3:
        last = pages[-1][-1]
        pages.append(await listing(audit_log, zone_id=None, limit=3, before_sequence=(last.zone_id, last.sequence)))
    assert list(itertools.chain.from_iterable(pages)) == newest_first


# --- megacity audit verify ------------------------------------------------------------------------------------------


@pytest.fixture
async def chains(audit_log: AuditLog) -> dict[str, list[AuditEntry]]:
    """Three records in univ, two in kzone."""
    return {
        UNIV: [await audit_log.append(make_draft(minute=minute)) for minute in range(3)],
        KZONE: [await audit_log.append(make_draft(KZONE, minute=minute)) for minute in range(2)],
    }


def test_the_command_reports_every_zone_and_the_first_broken_link(
    chains: dict[str, list[AuditEntry]],
    fresh_database: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert audit_command.command(None, fresh_database) == audit_command.INTACT
    assert capsys.readouterr().out == "kzone: ok (2 records)\nuniv: ok (3 records)\n"

    edited = chains[UNIV][1]
    asyncio.run(tamper(fresh_database, "UPDATE auth.audit_records SET details = '{}' WHERE id = $1", edited.id))

    # As `megacity audit verify` runs it, finding the database the way `megacity db` does.
    monkeypatch.setenv("MEGACITY_DATABASE_ADMIN_URL", fresh_database)
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["audit", "verify"])
    assert exit_status.value.code == audit_command.BROKEN
    assert capsys.readouterr().out == (
        f"kzone: ok (2 records)\nuniv: broken at sequence 2 (record {edited.id}): hash mismatch\n"
    )

    with pytest.raises(SystemExit) as exit_status:
        cli.main(["audit", "verify", "--zone", KZONE])
    assert exit_status.value.code == audit_command.INTACT
    assert capsys.readouterr().out == "kzone: ok (2 records)\n"


def test_the_command_tells_an_unreadable_trail_from_a_broken_one(
    fresh_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Never migrated: there is no audit trail to read.
    assert audit_command.command(None, fresh_database) == audit_command.UNREADABLE
    assert "cannot read the audit trail" in capsys.readouterr().err

    password = fresh_database.split(":")[2].split("@")[0]
    assert audit_command.command(None, fresh_database.replace(password, "wrong")) == audit_command.UNREADABLE
    err = capsys.readouterr().err
    assert "password authentication failed" in err
    assert "wrong" not in err
