"""The auth service's SQL (schema `auth`, db/auth/): users, sessions and refresh tokens, signing keys.

Tenant-owned tables (users, sessions, refresh_tokens, invite_codes) are read and written inside
`tenant_transaction`, so row-level security bounds every query to the caller's zone or organisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import asyncpg

from services.runtime.database import TenantScope, tenant_transaction
from services.runtime.errors import AlreadyExists, ErrorReason, NotFound

_USER_COLUMNS = """
    user_id, zone_id, org_id, email, name, role, status, password_hash, phone_number_encrypted, locale, mfa_enabled,
    failed_logins, locked_until, create_time, update_time, last_login_time
"""
_SESSION_COLUMNS = """
    session_id, user_id, zone_id, org_id, ip_address, user_agent, mfa_verified, create_time, last_refresh_time,
    expire_time, revoke_time
"""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class NewUser:
    user_id: str
    zone_id: str
    org_id: str
    email: str
    name: str
    role: str
    password_hash: str
    phone_number_encrypted: str
    locale: str


@dataclass(frozen=True)
class NewSession:
    session_id: str
    user_id: str
    zone_id: str
    org_id: str
    ip_address: str
    user_agent: str
    mfa_verified: bool
    expire_time: datetime
    refresh_token_hash: str


class Rotation(StrEnum):
    """What presenting a refresh token found."""

    ROTATED = "rotated"  # valid: used up now, its successor issued
    UNKNOWN = "unknown"  # no such token (in this zone)
    REUSED = "reused"  # already rotated: the family is revoked now
    ENDED = "ended"  # its session was revoked or has expired


@dataclass(frozen=True)
class RotationResult:
    outcome: Rotation
    session: asyncpg.Record | None = None
    user: asyncpg.Record | None = None


class AuthStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # --- signing keys (platform-wide) ---------------------------------------------------------------------

    async def signing_keys(self) -> list[asyncpg.Record]:
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            return list(
                await connection.fetch(
                    "SELECT kid, private_key_encrypted, create_time, retire_time FROM signing_keys ORDER BY create_time"
                )
            )

    async def add_signing_key(
        self, kid: str, private_key_encrypted: str, created: datetime, unless_newer_than: timedelta
    ) -> bool:
        """Stores a new current key and retires the others, unless the current key is younger than
        `unless_newer_than` (another replica rotated a moment ago): then False, and its key stays."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            # One rotation at a time across replicas; the loser keeps the winner's key.
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext('auth.signing_keys'))")
            newest = await connection.fetchval("SELECT max(create_time) FROM signing_keys WHERE retire_time IS NULL")
            if newest is not None and newest > created - unless_newer_than:
                return False
            await connection.execute("UPDATE signing_keys SET retire_time = $1 WHERE retire_time IS NULL", created)
            await connection.execute(
                "INSERT INTO signing_keys (kid, private_key_encrypted, create_time) VALUES ($1, $2, $3)",
                kid,
                private_key_encrypted,
                created,
            )
            return True

    # --- users ---------------------------------------------------------------------------------------------

    async def create_user(self, user: NewUser) -> asyncpg.Record:
        try:
            async with tenant_transaction(self._pool, TenantScope.org(user.zone_id, user.org_id)) as connection:
                row = await connection.fetchrow(
                    "INSERT INTO users (user_id, zone_id, org_id, email, name, role, password_hash, "
                    "phone_number_encrypted, locale) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                    f"RETURNING {_USER_COLUMNS}",
                    user.user_id,
                    user.zone_id,
                    user.org_id,
                    user.email,
                    user.name,
                    user.role,
                    user.password_hash,
                    user.phone_number_encrypted,
                    user.locale,
                )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                "an account with this email already exists in this zone", reason=ErrorReason.ERROR_REASON_EMAIL_TAKEN
            ) from None
        assert row is not None
        return row

    async def user_by_email(self, zone_id: str, email: str) -> asyncpg.Record | None:
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            return await connection.fetchrow(
                f"SELECT {_USER_COLUMNS} FROM users WHERE lower(email) = lower($1)", email.strip()
            )

    async def user(self, scope: TenantScope, user_id: str) -> asyncpg.Record:
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = $1", user_id)
        if row is None:
            raise NotFound("no such user")
        return row

    async def record_login_failure(
        self, zone_id: str, user_id: str, lock_threshold: int, lock_seconds: int
    ) -> tuple[int, datetime | None]:
        """Counts a failed login; locks the account at the threshold. Returns the count and the lock's end."""
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            row = await connection.fetchrow(
                "UPDATE users SET failed_logins = failed_logins + 1, "
                "locked_until = CASE WHEN failed_logins + 1 >= $2 THEN now() + make_interval(secs => $3) "
                "ELSE locked_until END WHERE user_id = $1 RETURNING failed_logins, locked_until",
                user_id,
                lock_threshold,
                float(lock_seconds),
            )
        assert row is not None
        return int(row["failed_logins"]), row["locked_until"]

    async def record_login_success(self, zone_id: str, user_id: str) -> None:
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            await connection.execute(
                "UPDATE users SET failed_logins = 0, locked_until = NULL, last_login_time = now() WHERE user_id = $1",
                user_id,
            )

    # --- sessions and refresh tokens ------------------------------------------------------------------------

    async def open_session(self, session: NewSession, refresh_expire: datetime) -> asyncpg.Record:
        scope = TenantScope.org(session.zone_id, session.org_id)
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(
                "INSERT INTO sessions (session_id, user_id, zone_id, org_id, ip_address, user_agent, mfa_verified, "
                f"expire_time) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {_SESSION_COLUMNS}",
                session.session_id,
                session.user_id,
                session.zone_id,
                session.org_id,
                session.ip_address,
                session.user_agent,
                session.mfa_verified,
                session.expire_time,
            )
            await connection.execute(
                "INSERT INTO refresh_tokens (token_hash, session_id, zone_id, org_id, expire_time) "
                "VALUES ($1, $2, $3, $4, $5)",
                session.refresh_token_hash,
                session.session_id,
                session.zone_id,
                session.org_id,
                refresh_expire,
            )
        assert row is not None
        return row

    async def rotate_refresh_token(
        self, zone_id: str, presented_hash: str, successor_hash: str, successor_expire: datetime
    ) -> RotationResult:
        """Uses up a refresh token and stores its successor, in one transaction. A token presented again after
        its rotation (a stolen copy, or the thief's use before the owner's) revokes its whole session."""
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            token = await connection.fetchrow(
                "SELECT session_id, org_id, expire_time, used_time FROM refresh_tokens WHERE token_hash = $1 "
                "FOR UPDATE",
                presented_hash,
            )
            if token is None:
                return RotationResult(Rotation.UNKNOWN)
            session = await connection.fetchrow(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = $1 FOR UPDATE", token["session_id"]
            )
            assert session is not None
            now = utcnow()
            if token["used_time"] is not None:
                if session["revoke_time"] is None:
                    await connection.execute(
                        "UPDATE sessions SET revoke_time = now(), revoke_reason = 'refresh_token_reused' "
                        "WHERE session_id = $1",
                        session["session_id"],
                    )
                return RotationResult(Rotation.REUSED, session)
            if session["revoke_time"] is not None or token["expire_time"] <= now or session["expire_time"] <= now:
                return RotationResult(Rotation.ENDED, session)
            await connection.execute(
                "UPDATE refresh_tokens SET used_time = now() WHERE token_hash = $1", presented_hash
            )
            await connection.execute(
                "INSERT INTO refresh_tokens (token_hash, session_id, zone_id, org_id, expire_time) "
                "VALUES ($1, $2, $3, $4, $5)",
                successor_hash,
                session["session_id"],
                zone_id,
                token["org_id"],
                successor_expire,
            )
            session = await connection.fetchrow(
                f"UPDATE sessions SET last_refresh_time = now(), expire_time = greatest(expire_time, $2) "
                f"WHERE session_id = $1 RETURNING {_SESSION_COLUMNS}",
                token["session_id"],
                successor_expire,
            )
            user = await connection.fetchrow(
                f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = $1", session["user_id"] if session else ""
            )
        return RotationResult(Rotation.ROTATED, session, user)

    async def revoke_sessions(
        self, scope: TenantScope, user_id: str, session_ids: Sequence[str] | None, reason: str
    ) -> list[asyncpg.Record]:
        """Ends the user's open sessions (all of them when `session_ids` is None); returns those it ended."""
        async with tenant_transaction(self._pool, scope) as connection:
            return list(
                await connection.fetch(
                    "UPDATE sessions SET revoke_time = now(), revoke_reason = $3 WHERE user_id = $1 "
                    "AND revoke_time IS NULL AND expire_time > now() "
                    f"AND ($2::text[] IS NULL OR session_id = ANY($2::text[])) RETURNING {_SESSION_COLUMNS}",
                    user_id,
                    None if session_ids is None else list(session_ids),
                    reason,
                )
            )

    async def sessions(self, scope: TenantScope, user_id: str, after: str | None, limit: int) -> list[asyncpg.Record]:
        """Open sessions of a user, newest first (paged by session id within equal times)."""
        async with tenant_transaction(self._pool, scope) as connection:
            return list(
                await connection.fetch(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user_id = $1 AND revoke_time IS NULL "
                    "AND expire_time > now() AND ($2::text IS NULL OR (create_time, session_id) < "
                    "(SELECT create_time, session_id FROM sessions WHERE session_id = $2)) "
                    "ORDER BY create_time DESC, session_id DESC LIMIT $3",
                    user_id,
                    after,
                    limit,
                )
            )

    async def revoked_since(self, since: datetime) -> list[asyncpg.Record]:
        """Sessions revoked after `since`, in every zone: their access tokens may still be unexpired."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            return list(
                await connection.fetch(
                    "SELECT session_id, user_id, revoke_time FROM sessions WHERE revoke_time > $1", since
                )
            )
