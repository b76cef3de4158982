"""Migrations (ops/migrations.py, db/) and tenant isolation by row-level security.

Every test works on its own new database of the session's PostgreSQL. The RLS tests apply db/ plus a
fixture migration (tests/fixtures/migrations) that creates a tenant-owned table from the platform
template, then query it the way a service does: as the service's own login role, through
services.runtime.database.
"""

from __future__ import annotations

import asyncio
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from ops import migrations
from ops.embedded import EmbeddedPostgres
from ops.migrations import DB_ROOT, MigrationError, applied, discover, migrate, rollback
from services.runtime.database import ScopeLevel, TenantScope, create_pool, tenant_transaction

FIXTURES = Path(__file__).parent / "fixtures" / "migrations"


async def _fetchval(url: str, query: str, *args: object) -> object:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(query, *args)
    finally:
        await connection.close()


async def _schemas(url: str) -> set[str]:
    connection = await asyncpg.connect(url)
    try:
        return {row["nspname"] for row in await connection.fetch("SELECT nspname FROM pg_namespace")}
    finally:
        await connection.close()


def _tree(tmp_path: Path, *overlays: Path) -> Path:
    """A copy of db/ with `overlays` merged over it, for tests that add or change migration files."""
    root = tmp_path / "db"
    shutil.copytree(DB_ROOT, root)
    for overlay in overlays:
        shutil.copytree(overlay, root, dirs_exist_ok=True)
    return root


# Applying, recording, rolling back


async def test_migrations_apply_in_order_once_and_are_recorded(fresh_database: str) -> None:
    on_disk = discover()
    services = migrations.postgres_services()
    assert on_disk[0].service == "platform"
    assert [m.service for m in on_disk[1:]] == sorted((m.service for m in on_disk[1:]), key=services.index)

    labels = await migrate(fresh_database)
    assert labels == [m.label for m in on_disk]
    records = await applied(fresh_database)
    assert [r.label for r in records] == labels
    assert [r.checksum for r in records] == [m.checksum() for m in on_disk]
    assert await migrate(fresh_database) == []
    assert len(await applied(fresh_database)) == len(labels)

    assert {"platform", *services} <= await _schemas(fresh_database)
    for service in services:
        # Each service role may use its own schema and no other service's.
        for schema in services:
            usage = await _fetchval(
                fresh_database, "SELECT has_schema_privilege($1, $2, 'USAGE')", f"megacity_{service}", schema
            )
            assert usage is (schema == service), (service, schema)


async def test_rollback_undoes_one_step_and_migrate_reapplies_it(fresh_database: str) -> None:
    labels = await migrate(fresh_database)
    last = discover()[-1]

    assert await rollback(fresh_database) == labels[-1]
    assert [r.label for r in await applied(fresh_database)] == labels[:-1]
    if last.version == 1:
        assert last.service not in await _schemas(fresh_database)
    assert await migrate(fresh_database) == [labels[-1]]

    # Every down migration works, newest first, down to an empty database; then everything re-applies.
    undone = []
    while (label := await rollback(fresh_database)) is not None:
        undone.append(label)
    assert undone == labels[::-1]
    assert await applied(fresh_database) == []
    assert not {"platform", *migrations.postgres_services()} & await _schemas(fresh_database)
    assert await migrate(fresh_database) == labels


async def test_concurrent_migrators_apply_each_migration_once(fresh_database: str) -> None:
    results = await asyncio.gather(*(migrate(fresh_database) for _ in range(4)))
    everything = [m.label for m in discover()]
    assert sorted(label for result in results for label in result) == sorted(everything)
    assert [r.label for r in await applied(fresh_database)] == everything


async def test_a_changed_migration_is_refused_and_nothing_else_applies(fresh_database: str, tmp_path: Path) -> None:
    root = _tree(tmp_path)
    await migrate(fresh_database, root)
    changed = root / "auth" / "0001_schema.up.sql"
    changed.write_text(changed.read_text() + "\n-- an afterthought\n")
    (root / "jobs" / "0002_later.up.sql").write_text("CREATE TABLE later (id int);\n")
    (root / "jobs" / "0002_later.down.sql").write_text("DROP TABLE later;\n")

    with pytest.raises(MigrationError, match=r"auth/0001_schema\.up\.sql changed after it was applied"):
        await migrate(fresh_database, root)
    assert "jobs/0002_later" not in [r.label for r in await applied(fresh_database)]
    states = dict(
        (description.split()[0], state) for state, description in await migrations.status(fresh_database, root)
    )
    assert states[str(changed)] == "changed"
    assert states["jobs/0002_later"] == "pending"


async def test_a_failing_migration_leaves_no_trace(fresh_database: str, tmp_path: Path) -> None:
    root = _tree(tmp_path)
    before = await migrate(fresh_database, root)
    broken = root / "jobs" / "0002_broken.up.sql"
    broken.write_text("CREATE TABLE half_done (id int);\nSELECT no_such_column FROM half_done;\n")
    (root / "jobs" / "0002_broken.down.sql").write_text("DROP TABLE half_done;\n")

    with pytest.raises(
        MigrationError,
        match=rf"jobs/0002_broken failed, nothing of it was kept: {broken}:2: .*no_such_column",
    ):
        await migrate(fresh_database, root)
    assert [r.label for r in await applied(fresh_database)] == before
    assert await _fetchval(fresh_database, "SELECT to_regclass('jobs.half_done')") is None

    broken.write_text("CREATE TABLE half_done (id int);\n")
    assert await migrate(fresh_database, root) == ["jobs/0002_broken"]


async def test_a_migration_must_not_commit_by_itself(fresh_database: str, tmp_path: Path) -> None:
    root = _tree(tmp_path)
    await migrate(fresh_database, root)
    (root / "jobs" / "0002_commits.up.sql").write_text("CREATE TABLE early (id int);\nCOMMIT;\n")
    (root / "jobs" / "0002_commits.down.sql").write_text("DROP TABLE early;\n")
    with pytest.raises(MigrationError, match=r"0002_commits\.up\.sql ended the transaction itself"):
        await migrate(fresh_database, root)
    assert "jobs/0002_commits" not in [r.label for r in await applied(fresh_database)]


async def test_the_applied_history_must_match_the_files(fresh_database: str, tmp_path: Path) -> None:
    root = _tree(tmp_path)
    for name in ("0003_third.up.sql", "0003_third.down.sql"):
        (root / "jobs" / name).write_text("SELECT 1;\n")
    await migrate(fresh_database, root)

    # Slipped in under a number below one already applied (say, from a branch merged late).
    for name in ("0002_second.up.sql", "0002_second.down.sql"):
        (root / "jobs" / name).write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match=r"0002_second\.up\.sql is older than the applied jobs version 0003"):
        await migrate(fresh_database, root)

    for name in ("0002_second.up.sql", "0002_second.down.sql", "0003_third.up.sql", "0003_third.down.sql"):
        (root / "jobs" / name).unlink()
    with pytest.raises(MigrationError, match=r"jobs/0003_third was applied but its files are gone"):
        await migrate(fresh_database, root)
    with pytest.raises(MigrationError, match=r"cannot roll back: jobs/0003_third was applied but its files are gone"):
        await rollback(fresh_database, root)


@pytest.mark.parametrize(
    ("files", "error"),
    [
        (
            {"exams/0001_schema.up.sql": "", "exams/0001_schema.down.sql": ""},
            r"exams is neither `platform` nor",
        ),
        ({"auth/0099-users.up.sql": ""}, r"0099-users\.up\.sql: migrations are named"),
        ({"auth/0099_users.up.sql": ""}, r"auth/0099_users\.down\.sql is missing"),
        (
            {"auth/0099_users.up.sql": "", "auth/0099_accounts.down.sql": ""},
            r"version 0099 has differently named",
        ),
    ],
)
def test_malformed_trees_are_errors(tmp_path: Path, files: dict[str, str], error: str) -> None:
    root = _tree(tmp_path)
    for name, content in files.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(content)
    with pytest.raises(MigrationError, match=error):
        discover(root)


def test_command_line(
    fresh_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first, last = discover()[0].label, discover()[-1].label
    assert migrations.command("migrate", fresh_database) == 0
    assert f"applied {first}" in capsys.readouterr().out
    assert migrations.command("rollback", fresh_database) == 0
    assert capsys.readouterr().out.strip() == f"rolled back {last}"

    monkeypatch.setenv("MEGACITY_DATABASE_ADMIN_URL", fresh_database)
    assert migrations.command("status", None) == 0
    out = capsys.readouterr().out
    assert f"applied  {first}" in out
    assert f"pending  {last}" in out

    monkeypatch.delenv("MEGACITY_DATABASE_ADMIN_URL")
    monkeypatch.delenv("MEGACITY_DATABASE_URL", raising=False)
    monkeypatch.setenv("MEGACITY_HOME", str(tmp_path))
    assert migrations.command("migrate", None) == 1
    assert "no database: pass --database-url" in capsys.readouterr().err

    password = fresh_database.split(":")[2].split("@")[0]
    assert migrations.command("status", fresh_database.replace(password, "wrong")) == 1
    err = capsys.readouterr().err
    assert "password authentication failed" in err
    assert "wrong" not in err


async def test_service_logins(fresh_database: str, postgres: EmbeddedPostgres) -> None:
    await migrate(fresh_database)
    urls = await migrations.provision_service_logins(fresh_database, postgres.secrets_dir)
    assert list(urls) == list(migrations.postgres_services())
    for service, url in urls.items():
        secret = postgres.secrets_dir / f"megacity_{service}.password"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert secret.read_text().strip() in url
        assert await _fetchval(url, "SELECT current_user") == f"megacity_{service}"
        assert not await _fetchval(url, "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
    # Generated once: provisioning again keeps every password.
    assert await migrations.provision_service_logins(fresh_database, postgres.secrets_dir) == urls


# Row-level security

ROWS = [
    ("univ", "org-a", "univ a 1"),
    ("univ", "org-a", "univ a 2"),
    ("univ", "org-b", "univ b"),
    # The same org id in another zone: an org scope is (zone, org), never org alone.
    ("kzone", "org-a", "kzone a"),
]


@pytest.fixture
async def exam_pool(fresh_database: str, postgres: EmbeddedPostgres, tmp_path: Path) -> AsyncIterator[asyncpg.Pool]:
    """db/ plus the fixture's tenant-owned exam.rls_probe holding ROWS; a pool as the exam service's login."""
    await migrate(fresh_database, _tree(tmp_path, FIXTURES))
    admin = await asyncpg.connect(fresh_database)
    try:
        # The superuser bypasses row-level security, so it can seed every tenant's rows.
        await admin.executemany("INSERT INTO exam.rls_probe (zone_id, org_id, note) VALUES ($1, $2, $3)", ROWS)
    finally:
        await admin.close()
    urls = await migrations.provision_service_logins(fresh_database, postgres.secrets_dir)
    pool = await create_pool(urls["exam"], schema="exam", max_size=1)
    yield pool
    await pool.close()


async def _visible_notes(pool: asyncpg.Pool, scope: TenantScope) -> list[str]:
    async with tenant_transaction(pool, scope) as connection:
        # Deliberately no WHERE clause: the policy alone decides.
        return sorted(row["note"] for row in await connection.fetch("SELECT note FROM rls_probe"))


@pytest.mark.parametrize(
    ("scope", "notes"),
    [
        (TenantScope.org("univ", "org-a"), ["univ a 1", "univ a 2"]),
        (TenantScope.org("kzone", "org-a"), ["kzone a"]),
        (TenantScope.org("univ", "org-z"), []),
        (TenantScope.zone("univ"), ["univ a 1", "univ a 2", "univ b"]),
        (TenantScope.platform(), ["kzone a", "univ a 1", "univ a 2", "univ b"]),
    ],
)
async def test_a_query_without_where_sees_only_its_tenant(
    exam_pool: asyncpg.Pool, scope: TenantScope, notes: list[str]
) -> None:
    assert await _visible_notes(exam_pool, scope) == notes


async def test_no_tenant_context_sees_nothing(exam_pool: asyncpg.Pool) -> None:
    assert await _visible_notes(exam_pool, TenantScope.platform()) != []
    # The same pooled connection (max_size=1) right after a platform-wide transaction: nothing leaked.
    async with exam_pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM rls_probe") == 0
        async with connection.transaction():
            await connection.execute("SELECT set_config('megacity.scope', 'everything', true)")
            assert await connection.fetchval("SELECT count(*) FROM rls_probe") == 0


async def test_a_transaction_abandoned_midway_leaves_no_tenant_behind(exam_pool: asyncpg.Pool) -> None:
    async def abandoned(ending: BaseException) -> None:
        async with tenant_transaction(exam_pool, TenantScope.platform()) as connection:
            assert await connection.fetchval("SELECT count(*) FROM rls_probe") == len(ROWS)
            raise ending

    for ending in (RuntimeError("the handler failed"), asyncio.CancelledError()):
        with pytest.raises(type(ending)):
            await abandoned(ending)
        async with exam_pool.acquire() as connection:  # the same connection (max_size=1), no reset query
            assert await connection.fetchval("SELECT count(*) FROM rls_probe") == 0
            assert await connection.fetchval("SELECT current_setting('megacity.scope', true)") in (None, "")


async def test_writes_outside_the_tenant_are_refused(exam_pool: asyncpg.Pool, fresh_database: str) -> None:
    scope = TenantScope.org("univ", "org-a")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with tenant_transaction(exam_pool, scope) as connection:
            await connection.execute("INSERT INTO rls_probe (zone_id, org_id, note) VALUES ('kzone', 'org-a', 'x')")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with tenant_transaction(exam_pool, scope) as connection:
            await connection.execute("UPDATE rls_probe SET org_id = 'org-b'")
    async with tenant_transaction(exam_pool, scope) as connection:
        await connection.execute("INSERT INTO rls_probe (zone_id, org_id, note) VALUES ('univ', 'org-a', 'univ a 3')")
        # Unqualified, as a buggy query might be: it still touches only this tenant's rows.
        assert await connection.execute("DELETE FROM rls_probe") == "DELETE 3"
    assert await _fetchval(fresh_database, "SELECT array_agg(note ORDER BY note) FROM exam.rls_probe") == [
        "kzone a",
        "univ b",
    ]


async def test_rls_binds_the_table_owner_too_but_not_a_superuser(exam_pool: asyncpg.Pool, fresh_database: str) -> None:
    admin = await asyncpg.connect(fresh_database)
    try:
        # A superuser bypasses row-level security whatever the table says: why services never use one.
        assert await admin.fetchval("SELECT count(*) FROM exam.rls_probe") == len(ROWS)

        await admin.execute("ALTER TABLE exam.rls_probe OWNER TO megacity_exam")
        assert await _visible_notes(exam_pool, TenantScope.org("univ", "org-b")) == ["univ b"]
        async with exam_pool.acquire() as connection:
            assert await connection.fetchval("SELECT count(*) FROM rls_probe") == 0

        # Without FORCE the owner would see every tenant's rows.
        await admin.execute("ALTER TABLE exam.rls_probe NO FORCE ROW LEVEL SECURITY")
        async with exam_pool.acquire() as connection:
            assert await connection.fetchval("SELECT count(*) FROM rls_probe") == len(ROWS)
    finally:
        await admin.close()


async def test_the_template_needs_tenant_columns(fresh_database: str) -> None:
    await migrate(fresh_database)
    admin = await asyncpg.connect(fresh_database)
    try:
        await admin.execute("CREATE TABLE exam.untenanted (id int, zone_id text)")
        with pytest.raises(asyncpg.UndefinedColumnError, match="needs org_id column"):
            await admin.execute("SELECT platform.enable_tenant_rls('exam.untenanted')")
    finally:
        await admin.close()


@pytest.mark.parametrize(
    ("level", "zone_id", "org_id"),
    [
        (ScopeLevel.PLATFORM, "univ", None),
        (ScopeLevel.ZONE, None, None),
        (ScopeLevel.ZONE, "univ", "org-a"),
        (ScopeLevel.ORG, "univ", None),
        (ScopeLevel.ORG, "", "org-a"),
    ],
)
def test_inconsistent_scopes_are_rejected(level: ScopeLevel, zone_id: str | None, org_id: str | None) -> None:
    with pytest.raises(ValueError, match=f"a {level} scope needs"):
        TenantScope(level, zone_id, org_id)
