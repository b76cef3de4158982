"""Pending MFA logins in Redis: a password-checked login waits here for its second factor.

A challenge lives MFA_CHALLENGE_SECONDS, is single use, and dies after MAX_ATTEMPTS wrong codes (each also
counts as a failed login of the account). Losing Redis loses only pending challenges: the user logs in again.
"""

from __future__ import annotations

from redis.asyncio import Redis

from services.auth.accounts import MFA_CHALLENGE_SECONDS, token_hash

MAX_ATTEMPTS = 5


def _key(challenge_token: str) -> str:
    return f"mfa_challenge:{token_hash(challenge_token)}"


class MfaChallenges:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def open(self, challenge_token: str, zone_id: str, user_id: str) -> None:
        key = _key(challenge_token)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, items=["zone_id", zone_id, "user_id", user_id, "attempts", "0"])
            pipe.expire(key, MFA_CHALLENGE_SECONDS)
            await pipe.execute()

    async def find(self, challenge_token: str, zone_id: str) -> str | None:
        """The user a live challenge of this zone is for."""
        zone, user_id = await self._redis.hmget(_key(challenge_token), ["zone_id", "user_id"])
        if zone is None or user_id is None or _text(zone) != zone_id:
            return None
        return _text(user_id)

    async def failed(self, challenge_token: str) -> None:
        key = _key(challenge_token)
        if await self._redis.hincrby(key, "attempts", 1) >= MAX_ATTEMPTS:
            await self._redis.delete(key)

    async def close(self, challenge_token: str) -> bool:
        """Ends a challenge after its second factor; False when it was already used (a concurrent answer)."""
        return bool(await self._redis.delete(_key(challenge_token)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
