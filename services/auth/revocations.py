"""Revoked access tokens in Redis, where every service's verifier looks (services/runtime/authn.py).

An access token lives at most its lifetime, so a revocation needs to stay in Redis only that long after it
was made: `blacklist:{jti}` for one token (logout), `revoked_session:{sid}` for every token of a session. The
durable record is the session's revoke_time in PostgreSQL. `Revocations.restore_if_lost`, run by the auth
service's readiness probe every health interval, notices Redis back empty (no `revocations:ready`): it copies
the revocations still in force from PostgreSQL, then sets the marker; until then verifiers fail closed.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

import structlog
from redis.asyncio import Redis

from services.auth.store import AuthStore, utcnow
from services.runtime.authn import REVOCATIONS_READY_KEY, blacklist_key, revoked_session_key
from services.runtime.tokens import DEFAULT_LEEWAY_SECONDS

_log = structlog.get_logger("megacity.auth.revocations")


def session_key(user_id: str, session_id: str) -> str:
    """The session cache entry (DESIGN.md section 5); PostgreSQL holds the session itself."""
    return f"session:{user_id}:{session_id}"


class Revocations:
    def __init__(self, redis: Redis, store: AuthStore, token_lifetime: float) -> None:
        self._redis = redis
        self._store = store
        # How long a revocation must outlive its making: the longest an access token made before it lives.
        self._window = token_lifetime + DEFAULT_LEEWAY_SECONDS

    def _ttl(self, revoked_at: datetime) -> int:
        return max(int((revoked_at - utcnow()).total_seconds() + self._window) + 1, 1)

    async def revoke_token(self, jti: str, expires_at: float) -> None:
        ttl = max(int(expires_at - utcnow().timestamp() + DEFAULT_LEEWAY_SECONDS) + 1, 1)
        await self._redis.set(blacklist_key(jti), b"1", ex=ttl)

    async def revoke_sessions(self, sessions: Iterable[tuple[str, str, datetime]]) -> None:
        """Marks every token of these (user id, session id, revoke time) sessions revoked; drops their cache."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for user_id, session_id, revoked_at in sessions:
                pipe.set(revoked_session_key(session_id), b"1", ex=self._ttl(revoked_at))
                pipe.delete(session_key(user_id, session_id))
            await pipe.execute()

    async def cache_session(self, user_id: str, session_id: str, fields: dict[str, str], expires_at: datetime) -> None:
        ttl = max(int((expires_at - utcnow()).total_seconds()), 1)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(session_key(user_id, session_id), items=[part for item in fields.items() for part in item])
            pipe.expire(session_key(user_id, session_id), ttl)
            await pipe.execute()

    async def restore_if_lost(self) -> bool:
        """Copies the revocations in force back into Redis when Redis has lost them; True if it did."""
        if await self._redis.exists(REVOCATIONS_READY_KEY):
            return False
        since = utcnow() - timedelta(seconds=self._window)
        revoked = await self._store.revoked_since(since)
        await self.revoke_sessions((row["user_id"], row["session_id"], row["revoke_time"]) for row in revoked)
        await self._redis.set(REVOCATIONS_READY_KEY, b"1")
        _log.info("revocations.restored", sessions=len(revoked))
        return True
