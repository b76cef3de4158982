"""Plain SQL migrations under db/: applied in order, recorded, undone one step at a time.

Layout: `db/platform/NNNN_<name>.up.sql` with its `.down.sql` (helpers every service uses, applied
first), then `db/<service>/...` for each catalog service that depends on PostgreSQL, in catalog order,
versions ascending within a service. `rollback` undoes the most recently applied migration, whatever
its service.

Each migration runs in one transaction together with its record in `platform_migrations.applied`, so
one that fails leaves nothing behind; a file must therefore not contain BEGIN or COMMIT of its own. It
runs with `search_path` set to its own schema (`platform` or the service's), so unqualified names land
there. A session advisory lock serialises migrators, so two `megacity up`s at once cannot apply
anything twice. An applied migration is immutable: a file whose checksum no longer matches its record
is an error, and the fix is a new migration.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from ops.embedded import EmbeddedError, ensure_secret, local_postgres
from services.runtime.catalog import REPO, CatalogError, load_catalog

DB_ROOT = REPO / "db"
PLATFORM = "platform"
# Advisory lock keys are scoped to the database; this one is "megacity" in ASCII.
LOCK_KEY = int.from_bytes(b"megacity", "big")
CONNECT_TIMEOUT = 10.0
_FILE = re.compile(r"(?P<version>\d{4})_(?P<name>[a-z0-9][a-z0-9_]*)\.(?P<direction>up|down)\.sql")

# The record lives outside schema `platform`, which rolling back the platform migration drops.
_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS platform_migrations;
CREATE TABLE IF NOT EXISTS platform_migrations.applied (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    service text NOT NULL,
    version integer NOT NULL,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (service, version)
);
"""


class MigrationError(RuntimeError):
    """Migrations cannot be found, verified or applied; the message names the file or database."""


@dataclass(frozen=True)
class Migration:
    """One migration on disk: `<service>/<version>_<name>.up.sql` and its `.down.sql`."""

    service: str
    version: int
    name: str
    up: Path
    down: Path

    @property
    def label(self) -> str:
        return f"{self.service}/{self.version:04d}_{self.name}"

    def checksum(self) -> str:
        return hashlib.sha256(self.up.read_bytes()).hexdigest()


@dataclass(frozen=True)
class AppliedMigration:
    """One row of platform_migrations.applied."""

    service: str
    version: int
    name: str
    checksum: str
    applied_at: datetime

    @property
    def label(self) -> str:
        return f"{self.service}/{self.version:04d}_{self.name}"


def postgres_services() -> tuple[str, ...]:
    """The catalog's services that depend on PostgreSQL, in catalog order; each owns the schema so named."""
    return tuple(entry.name for entry in load_catalog().services.values() if "postgres" in entry.depends_on)


def discover(root: Path = DB_ROOT) -> list[Migration]:
    """Every migration under `root`, in the order they apply; malformed trees are errors, not skipped."""
    if not root.is_dir():
        raise MigrationError(f"{root} is not a directory of migrations")
    order = (PLATFORM, *postgres_services())
    strangers = sorted(path.name for path in root.iterdir() if path.is_dir() and path.name not in order)
    if strangers:
        raise MigrationError(
            f"{root}: {', '.join(strangers)} is neither `platform` nor a catalog service that depends on "
            f"postgres ({', '.join(order[1:])})"
        )
    return [migration for service in order for migration in _service_migrations(root / service, service)]


def _service_migrations(directory: Path, service: str) -> list[Migration]:
    if not directory.is_dir():
        return []
    files: dict[int, dict[str, Path]] = {}
    names: dict[int, set[str]] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.fullmatch(path.name)
        if match is None:
            raise MigrationError(f"{path}: migrations are named NNNN_<lowercase_name>.up.sql / .down.sql")
        version = int(match["version"])
        files.setdefault(version, {})[match["direction"]] = path
        names.setdefault(version, set()).add(match["name"])
    migrations = []
    for version, pair in sorted(files.items()):
        if len(names[version]) > 1:
            raise MigrationError(
                f"{directory}: version {version:04d} has differently named files: {sorted(names[version])}"
            )
        (name,) = names[version]
        for direction in ("up", "down"):
            if direction not in pair:
                missing = directory / f"{version:04d}_{name}.{direction}.sql"
                raise MigrationError(f"{missing} is missing: every migration has an up and a down file")
        migrations.append(Migration(service, version, name, pair["up"], pair["down"]))
    return migrations


def _problem(record: AppliedMigration, on_disk: Mapping[tuple[str, int], Migration]) -> str | None:
    """Why an applied migration no longer matches its files, or None if it does."""
    migration = on_disk.get((record.service, record.version))
    if migration is None:
        return f"{record.label} was applied but its files are gone"
    if migration.name != record.name:
        return f"{record.label} was applied under that name, but its file is now {migration.up}"
    if migration.checksum() != record.checksum:
        return (
            f"{migration.up} changed after it was applied (sha256 {record.checksum[:12]}... then, "
            f"{migration.checksum()[:12]}... now); restore it and put the change in a new migration"
        )
    return None


async def _connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise MigrationError(f"cannot connect to {redact(url)}: {error}") from error


@asynccontextmanager
async def _migrator(admin_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection that holds the migration lock, with the record table in place."""
    connection = await _connect(admin_url)
    try:
        await connection.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        await connection.execute(_BOOTSTRAP)
        yield connection
    finally:
        # Ending the session releases the advisory lock as well.
        await connection.close()


async def _read_applied(connection: asyncpg.Connection) -> list[AppliedMigration]:
    rows = await connection.fetch(
        "SELECT service, version, name, checksum, applied_at FROM platform_migrations.applied ORDER BY id"
    )
    return [AppliedMigration(**dict(row)) for row in rows]


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _failure(migration: Migration, path: Path, sql: str, error: asyncpg.PostgresError) -> MigrationError:
    where = str(path)
    # A syntax error's position counts characters from the start of the file, as sent.
    if error.position and error.position.isdigit():
        where += f":{sql.count(chr(10), 0, int(error.position) - 1) + 1}"
    details = "".join(
        f"\n  {label}: {text}" for label, text in (("detail", error.detail), ("hint", error.hint)) if text
    )
    return MigrationError(f"{migration.label} failed, nothing of it was kept: {where}: {error}{details}")


async def _run(connection: asyncpg.Connection, migration: Migration, *, up: bool) -> None:
    path = migration.up if up else migration.down
    sql = path.read_text()
    try:
        async with connection.transaction():
            await connection.execute("SELECT set_config('search_path', $1, true)", _quote_ident(migration.service))
            await connection.execute(sql)
            if not connection.is_in_transaction():
                raise MigrationError(
                    f"{path} ended the transaction itself (COMMIT or ROLLBACK in the file); what ran before "
                    f"that is committed and not recorded. Remove them: every migration already runs in one"
                )
            if up:
                await connection.execute(
                    "INSERT INTO platform_migrations.applied (service, version, name, checksum) "
                    "VALUES ($1, $2, $3, $4)",
                    migration.service,
                    migration.version,
                    migration.name,
                    migration.checksum(),
                )
            else:
                await connection.execute(
                    "DELETE FROM platform_migrations.applied WHERE service = $1 AND version = $2",
                    migration.service,
                    migration.version,
                )
    except asyncpg.PostgresError as error:
        raise _failure(migration, path, sql, error) from error


async def migrate(admin_url: str, root: Path = DB_ROOT) -> list[str]:
    """Apply every pending migration; the labels (`service/NNNN_name`) of those applied now, in order."""
    migrations = discover(root)
    on_disk = {(migration.service, migration.version): migration for migration in migrations}
    async with _migrator(admin_url) as connection:
        records = await _read_applied(connection)
        problems = [problem for record in records if (problem := _problem(record, on_disk))]
        done = {(record.service, record.version) for record in records}
        newest: dict[str, int] = {}
        for record in records:
            newest[record.service] = max(newest.get(record.service, 0), record.version)
        pending = [migration for migration in migrations if (migration.service, migration.version) not in done]
        problems += [
            f"{migration.up} is older than the applied {migration.service} version "
            f"{newest[migration.service]:04d}; give it the next free number"
            for migration in pending
            if newest.get(migration.service, 0) > migration.version
        ]
        if problems:
            raise MigrationError("cannot migrate:\n  " + "\n  ".join(problems))
        for migration in pending:
            await _run(connection, migration, up=True)
    return [migration.label for migration in pending]


async def rollback(admin_url: str, root: Path = DB_ROOT) -> str | None:
    """Undo the most recently applied migration with its .down.sql; its label, or None if none is applied."""
    on_disk = {(migration.service, migration.version): migration for migration in discover(root)}
    async with _migrator(admin_url) as connection:
        records = await _read_applied(connection)
        if not records:
            return None
        last = records[-1]
        problem = _problem(last, on_disk)
        if problem:
            raise MigrationError(f"cannot roll back: {problem}")
        migration = on_disk[(last.service, last.version)]
        await _run(connection, migration, up=False)
        return migration.label


async def applied(admin_url: str) -> list[AppliedMigration]:
    """The applied migrations, oldest first; empty for a database that was never migrated."""
    connection = await _connect(admin_url)
    try:
        if await connection.fetchval("SELECT to_regclass('platform_migrations.applied')") is None:
            return []
        return await _read_applied(connection)
    finally:
        await connection.close()


async def status(admin_url: str, root: Path = DB_ROOT) -> list[tuple[str, str]]:
    """(state, description) per migration: `applied`, `pending`, or `changed` for an applied one that no
    longer matches its files (which blocks `migrate`)."""
    migrations = discover(root)
    on_disk = {(migration.service, migration.version): migration for migration in migrations}
    records = await applied(admin_url)
    rows = [
        ("changed", problem)
        if (problem := _problem(record, on_disk))
        else ("applied", f"{record.label}  {record.applied_at:%Y-%m-%d %H:%M:%S%z}")
        for record in records
    ]
    done = {(record.service, record.version) for record in records}
    rows += [
        ("pending", migration.label) for migration in migrations if (migration.service, migration.version) not in done
    ]
    return rows


def _scram_verifier(password: str) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5803 / 7677, as libpq's
    PQencryptPasswordConn computes it), so that the password itself never reaches the server or its logs.
    SASLprep is the identity for the ASCII passwords we generate."""
    salt = secrets.token_bytes(16)
    iterations = 4096
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    salt_text, stored_text, server_text = (base64.b64encode(value).decode() for value in (salt, stored_key, server_key))
    return f"SCRAM-SHA-256${iterations}:{salt_text}${stored_text}:{server_text}"


def _with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise MigrationError(f"{redact(url)} is not a postgresql:// URL")
    address = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{address}"))


async def provision_service_logins(admin_url: str, secrets_dir: Path) -> dict[str, str]:
    """Let each PostgreSQL-dependent service log in as its own role; its connection URL by service name.

    The role `megacity_<service>` comes from the service's first migration, so this runs after
    `migrate`. Its password is generated once and kept (0600) in `secrets_dir/megacity_<service>.password`;
    calling this again sets the same password. The URLs keep admin_url's host, port, database and options.
    """
    urls: dict[str, str] = {}
    connection = await _connect(admin_url)
    try:
        for service in postgres_services():
            role = f"megacity_{service}"
            if not await connection.fetchval("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", role):
                raise MigrationError(
                    f"role {role} does not exist in {redact(admin_url)}; run `megacity db migrate` first"
                )
            password = ensure_secret(secrets_dir / f"{role}.password")
            # Utility statements take no parameters: format() quotes the name and the verifier server-side.
            statement = await connection.fetchval(
                "SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', $1::text, $2::text)",
                role,
                _scram_verifier(password),
            )
            await connection.execute(statement)
            urls[service] = _with_credentials(admin_url, role, password)
    except asyncpg.PostgresError as error:
        raise MigrationError(f"cannot provision service logins in {redact(admin_url)}: {error}") from error
    finally:
        await connection.close()
    return urls


def redact(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, address = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{address}"))


def resolve_admin_url(explicit: str | None) -> str:
    """The URL `megacity db` works on: explicit, MEGACITY_DATABASE_ADMIN_URL, MEGACITY_DATABASE_URL, or
    the local embedded PostgreSQL if it runs."""
    for candidate in (
        explicit,
        os.environ.get("MEGACITY_DATABASE_ADMIN_URL"),
        os.environ.get("MEGACITY_DATABASE_URL"),
    ):
        if candidate:
            return candidate
    advice = (
        "no database: pass --database-url, set MEGACITY_DATABASE_ADMIN_URL or MEGACITY_DATABASE_URL, "
        "or start the local PostgreSQL with `megacity up`"
    )
    try:
        server = local_postgres()
    except EmbeddedError as error:
        raise MigrationError(f"{advice} ({error})") from error
    if not server.is_running():
        raise MigrationError(f"{advice} (it is not running in {server.data_dir})")
    return server.admin_url


def command(action: str, database_url: str | None) -> int:
    """`megacity db migrate|rollback|status`; the exit status."""
    try:
        url = resolve_admin_url(database_url)
        if action == "migrate":
            labels = asyncio.run(migrate(url))
            print("\n".join(f"applied {label}" for label in labels) if labels else "already up to date")
        elif action == "rollback":
            label = asyncio.run(rollback(url))
            print(f"rolled back {label}" if label else "nothing to roll back")
        elif action == "status":
            rows = asyncio.run(status(url))
            for state, description in rows:
                print(f"{state:8} {description}")
            if not rows:
                print(f"no migrations under {DB_ROOT}")
            return 1 if any(state == "changed" for state, _ in rows) else 0
        else:
            raise ValueError(f"unknown action {action!r}: migrate, rollback or status")
    except (MigrationError, EmbeddedError, CatalogError) as error:
        print(f"megacity db {action}: {error}", file=sys.stderr)
        return 1
    return 0
