"""The auth service's SQL (schema `auth`, db/auth/): users, sessions and refresh tokens, signing keys.

Tenant-owned tables (users, sessions, refresh_tokens, invite_codes) are read and written inside
`tenant_transaction`, so row-level security bounds every query to the caller's zone or organisation.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import asyncpg

from services.runtime.database import TenantScope, tenant_transaction
from services.runtime.errors import AlreadyExists, ErrorReason, InvalidArgument, NotFound

_USER_COLUMNS = """
    user_id, zone_id, org_id, email, name, role, status, password_hash, phone_number_encrypted, locale, mfa_enabled,
    failed_logins, locked_until, create_time, update_time, last_login_time
"""
_SESSION_COLUMNS = """
    session_id, user_id, zone_id, org_id, ip_address, user_agent, mfa_verified, create_time, last_refresh_time,
    expire_time, revoke_time
"""

_INVITE_COLUMNS = """
    invite_code_id, zone_id, org_id, role, max_uses, use_count, expire_time, note, creator_id, revoke_time, create_time
"""
# Outer joins: row-level security may hide one side's account (a parent of the public organisation from a
# teacher of the student's), and the link is still the reader's to see.
_LINK_SELECT = """
    SELECT l.link_id, l.zone_id, l.org_id, l.parent_id, l.student_id, l.status, l.request_time, l.decide_time,
        l.unlink_time, coalesce(p.name, '') AS parent_name, coalesce(p.email, '') AS parent_email,
        coalesce(s.name, '') AS student_name, coalesce(s.email, '') AS student_email
    FROM parent_links l LEFT JOIN users p ON p.user_id = l.parent_id LEFT JOIN users s ON s.user_id = l.student_id
"""
USER_FILTERS = frozenset({"org_id", "role", "status"})
USER_UPDATABLE = frozenset(
    {
        "name",
        "role",
        "org_id",
        "status",
        "locale",
        "phone_number_encrypted",
        "password_hash",
        "failed_logins",
        "locked_until",
    }
)


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


@dataclass(frozen=True)
class NewInvite:
    invite_code_id: str
    code_hash: str
    zone_id: str
    org_id: str
    role: str
    max_uses: int
    expire_time: datetime | None
    note: str
    creator_id: str


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
                    "SELECT kid, private_key_encrypted, create_time, activate_time, retire_time FROM signing_keys "
                    "ORDER BY create_time"
                )
            )

    async def add_signing_key(
        self, kid: str, private_key_encrypted: str, created: datetime, activates: datetime, unless_newer_than: timedelta
    ) -> bool:
        """Stores a new key signing from `activates` and retires the others then, unless the newest key is younger
        than `unless_newer_than` (another replica rotated a moment ago): then False, and its key stays."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            # One rotation at a time across replicas; the loser keeps the winner's key.
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext('auth.signing_keys'))")
            newest = await connection.fetchval("SELECT max(create_time) FROM signing_keys WHERE retire_time IS NULL")
            if newest is not None and newest > created - unless_newer_than:
                return False
            await connection.execute("UPDATE signing_keys SET retire_time = $1 WHERE retire_time IS NULL", activates)
            await connection.execute(
                "INSERT INTO signing_keys (kid, private_key_encrypted, create_time, activate_time) "
                "VALUES ($1, $2, $3, $4)",
                kid,
                private_key_encrypted,
                created,
                activates,
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

    async def revoke_organization_sessions(self, org_id: str, reason: str) -> list[asyncpg.Record]:
        """Ends every open session of an organisation's users; returns those it ended."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            return list(
                await connection.fetch(
                    "UPDATE sessions SET revoke_time = now(), revoke_reason = $2 WHERE org_id = $1 "
                    f"AND revoke_time IS NULL AND expire_time > now() RETURNING {_SESSION_COLUMNS}",
                    org_id,
                    reason,
                )
            )

    async def other_sessions(self, scope: TenantScope, user_id: str, keep_session_id: str) -> list[str]:
        """The ids of the user's open sessions other than `keep_session_id`."""
        async with tenant_transaction(self._pool, scope) as connection:
            rows = await connection.fetch(
                "SELECT session_id FROM sessions WHERE user_id = $1 AND session_id <> $2 AND revoke_time IS NULL "
                "AND expire_time > now()",
                user_id,
                keep_session_id,
            )
        return [row["session_id"] for row in rows]

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

    # --- MFA ----------------------------------------------------------------------------------------------------

    async def mfa_state(self, zone_id: str, user_id: str) -> asyncpg.Record:
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            row = await connection.fetchrow(
                "SELECT user_id, email, password_hash, mfa_enabled, mfa_secret_encrypted, "
                "mfa_pending_secret_encrypted, mfa_pending_time, mfa_last_step, "
                "cardinality(recovery_code_hashes) AS recovery_codes_left "
                "FROM users WHERE user_id = $1",
                user_id,
            )
        if row is None:
            raise NotFound("no such user")
        return row

    async def set_pending_mfa(self, zone_id: str, user_id: str, secret_encrypted: str) -> None:
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            await connection.execute(
                "UPDATE users SET mfa_pending_secret_encrypted = $2, mfa_pending_time = now() WHERE user_id = $1",
                user_id,
                secret_encrypted,
            )

    async def enable_mfa(
        self, zone_id: str, user_id: str, secret_encrypted: str, step: int, recovery_code_hashes: Sequence[str]
    ) -> None:
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            await connection.execute(
                "UPDATE users SET mfa_enabled = true, mfa_secret_encrypted = $2, mfa_last_step = $3, "
                "recovery_code_hashes = $4, mfa_pending_secret_encrypted = '', mfa_pending_time = NULL, "
                "update_time = now() WHERE user_id = $1",
                user_id,
                secret_encrypted,
                step,
                list(recovery_code_hashes),
            )

    async def disable_mfa(self, zone_id: str, user_id: str) -> None:
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            await connection.execute(
                "UPDATE users SET mfa_enabled = false, mfa_secret_encrypted = '', mfa_last_step = NULL, "
                "recovery_code_hashes = '{}', update_time = now() WHERE user_id = $1",
                user_id,
            )

    async def use_totp_step(self, zone_id: str, user_id: str, step: int) -> bool:
        """Records the TOTP time step just used; False when it (or a later one) was used already: a replay."""
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            updated = await connection.execute(
                "UPDATE users SET mfa_last_step = $2 "
                "WHERE user_id = $1 AND (mfa_last_step IS NULL OR mfa_last_step < $2)",
                user_id,
                step,
            )
        return updated == "UPDATE 1"

    async def use_recovery_code(self, zone_id: str, user_id: str, code_hash: str) -> int | None:
        """Spends a recovery code; the number left, or None when it is not (or no longer) one of the user's."""
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            left = await connection.fetchval(
                "UPDATE users SET recovery_code_hashes = array_remove(recovery_code_hashes, $2) "
                "WHERE user_id = $1 AND $2 = ANY(recovery_code_hashes) RETURNING cardinality(recovery_code_hashes)",
                user_id,
                code_hash,
            )
        return None if left is None else int(left)

    async def set_recovery_codes(self, zone_id: str, user_id: str, code_hashes: Sequence[str]) -> None:
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            await connection.execute(
                "UPDATE users SET recovery_code_hashes = $2 WHERE user_id = $1", user_id, list(code_hashes)
            )

    # --- user administration ----------------------------------------------------------------------------------

    async def users(
        self, scope: TenantScope, filters: Mapping[str, str], query: str, after: str | None, limit: int
    ) -> tuple[list[asyncpg.Record], int]:
        """A page of users ordered by id, and how many match in all."""
        assert USER_FILTERS.issuperset(filters), f"not a filter: {set(filters) - USER_FILTERS}"
        conditions = [f"{column} = ${index}" for index, column in enumerate(filters, start=1)]
        arguments: list[object] = list(filters.values())
        if query:
            arguments.append(f"%{query.lower()}%")
            conditions.append(f"(lower(name) LIKE ${len(arguments)} OR lower(email) LIKE ${len(arguments)})")
        where = " AND ".join(conditions) or "true"
        async with tenant_transaction(self._pool, scope) as connection:
            total = await connection.fetchval(f"SELECT count(*) FROM users WHERE {where}", *arguments)
            rows = await connection.fetch(
                f"SELECT {_USER_COLUMNS} FROM users WHERE {where} AND (${len(arguments) + 1}::text IS NULL "
                f"OR user_id > ${len(arguments) + 1}) ORDER BY user_id LIMIT ${len(arguments) + 2}",
                *arguments,
                after,
                limit,
            )
        return list(rows), int(total)

    async def update_user(self, scope: TenantScope, user_id: str, changes: Mapping[str, object]) -> asyncpg.Record:
        assert USER_UPDATABLE.issuperset(changes), f"not updatable: {set(changes) - USER_UPDATABLE}"
        assignments = "".join(f", {column} = ${index}" for index, column in enumerate(changes, start=2))
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(
                f"UPDATE users SET update_time = now(){assignments} WHERE user_id = $1 RETURNING {_USER_COLUMNS}",
                user_id,
                *changes.values(),
            )
        if row is None:
            raise NotFound("no such user")
        return row

    # --- invite codes -----------------------------------------------------------------------------------------

    async def create_invite(self, invite: NewInvite) -> asyncpg.Record:
        async with tenant_transaction(self._pool, TenantScope.org(invite.zone_id, invite.org_id)) as connection:
            row = await connection.fetchrow(
                "INSERT INTO invite_codes (invite_code_id, code_hash, zone_id, org_id, role, max_uses, expire_time, "
                f"note, creator_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {_INVITE_COLUMNS}",
                invite.invite_code_id,
                invite.code_hash,
                invite.zone_id,
                invite.org_id,
                invite.role,
                invite.max_uses,
                invite.expire_time,
                invite.note,
                invite.creator_id,
            )
        assert row is not None
        return row

    async def invites(
        self, scope: TenantScope, org_id: str | None, after: str | None, limit: int
    ) -> list[asyncpg.Record]:
        async with tenant_transaction(self._pool, scope) as connection:
            return list(
                await connection.fetch(
                    f"SELECT {_INVITE_COLUMNS} FROM invite_codes WHERE ($1::text IS NULL OR org_id = $1) "
                    "AND ($2::text IS NULL OR invite_code_id < $2) ORDER BY invite_code_id DESC LIMIT $3",
                    org_id,
                    after,
                    limit,
                )
            )

    async def revoke_invite(self, scope: TenantScope, invite_code_id: str) -> asyncpg.Record:
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(
                "UPDATE invite_codes SET revoke_time = coalesce(revoke_time, now()) WHERE invite_code_id = $1 "
                f"RETURNING {_INVITE_COLUMNS}",
                invite_code_id,
            )
        if row is None:
            raise NotFound("no such invite code")
        return row

    async def create_user_with_invite(self, user: NewUser, code_hash: str) -> asyncpg.Record:
        """Creates the user in the invite's organisation with its role, spending one use of the code, atomically:
        a refused registration (email taken) does not use the code up."""
        try:
            async with tenant_transaction(self._pool, TenantScope.zone(user.zone_id)) as connection:
                invite = await connection.fetchrow(
                    "UPDATE invite_codes SET use_count = use_count + 1 WHERE code_hash = $1 AND revoke_time IS NULL "
                    "AND (expire_time IS NULL OR expire_time > now()) AND use_count < max_uses "
                    "RETURNING org_id, role",
                    code_hash,
                )
                if invite is None:
                    raise InvalidArgument(
                        "the invite code is unknown, expired or used up",
                        [("invite_code", "ask your organisation for a new code")],
                        reason=ErrorReason.ERROR_REASON_INVITE_INVALID,
                    )
                row = await connection.fetchrow(
                    "INSERT INTO users (user_id, zone_id, org_id, email, name, role, password_hash, "
                    "phone_number_encrypted, locale) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                    f"RETURNING {_USER_COLUMNS}",
                    user.user_id,
                    user.zone_id,
                    invite["org_id"],
                    user.email,
                    user.name,
                    invite["role"],
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

    # --- parent links -------------------------------------------------------------------------------------------

    async def request_link(self, zone_id: str, parent_id: str, student: asyncpg.Record) -> asyncpg.Record:
        """The live link between parent and student, made pending unless one exists already."""
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            await connection.execute(
                "INSERT INTO parent_links (link_id, zone_id, org_id, parent_id, student_id) "
                "VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (parent_id, student_id) WHERE status IN ('pending', 'approved') DO NOTHING",
                uuid.uuid4().hex,
                zone_id,
                student["org_id"],
                parent_id,
                student["user_id"],
            )
            row = await connection.fetchrow(
                f"{_LINK_SELECT} WHERE l.parent_id = $1 AND l.student_id = $2 AND l.status IN ('pending', 'approved')",
                parent_id,
                student["user_id"],
            )
        assert row is not None
        return row

    async def links(
        self,
        scope: TenantScope,
        *,
        parent_id: str | None,
        student_id: str | None,
        status: str | None,
        after: str | None,
        limit: int,
    ) -> list[asyncpg.Record]:
        async with tenant_transaction(self._pool, scope) as connection:
            return list(
                await connection.fetch(
                    f"{_LINK_SELECT} WHERE ($1::text IS NULL OR l.parent_id = $1) AND ($2::text IS NULL OR "
                    "l.student_id = $2) AND ($3::text IS NULL OR l.status = $3) AND ($4::text IS NULL OR "
                    "l.link_id > $4) ORDER BY l.link_id LIMIT $5",
                    parent_id,
                    student_id,
                    status,
                    after,
                    limit,
                )
            )

    async def decide_link(self, zone_id: str, student_id: str, parent_id: str, decision: str) -> asyncpg.Record:
        """The student's answer to the parent's pending request; answering the same way again changes nothing."""
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            await connection.execute(
                "UPDATE parent_links SET status = $3, decide_time = now() WHERE student_id = $1 AND parent_id = $2 "
                "AND status = 'pending'",
                student_id,
                parent_id,
                decision,
            )
            row = await connection.fetchrow(
                f"{_LINK_SELECT} WHERE l.student_id = $1 AND l.parent_id = $2 ORDER BY l.request_time DESC LIMIT 1",
                student_id,
                parent_id,
            )
        if row is None:
            raise NotFound("this parent has not asked to link to you")
        return row

    async def unlink(self, zone_id: str, link_id: str, party_id: str) -> asyncpg.Record:
        """Ends a link (or withdraws a request) that `party_id` is the parent or the student of."""
        async with tenant_transaction(self._pool, TenantScope.zone(zone_id)) as connection:
            await connection.execute(
                "UPDATE parent_links SET status = 'unlinked', unlink_time = now() WHERE link_id = $1 "
                "AND $2 IN (parent_id, student_id) AND status IN ('pending', 'approved')",
                link_id,
                party_id,
            )
            row = await connection.fetchrow(
                f"{_LINK_SELECT} WHERE l.link_id = $1 AND $2 IN (l.parent_id, l.student_id)", link_id, party_id
            )
        if row is None:
            raise NotFound("no such link of yours")
        return row

    async def approved_link(self, parent_id: str, student_id: str) -> asyncpg.Record | None:
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            return await connection.fetchrow(
                f"{_LINK_SELECT} WHERE l.parent_id = $1 AND l.student_id = $2 AND l.status = 'approved'",
                parent_id,
                student_id,
            )
