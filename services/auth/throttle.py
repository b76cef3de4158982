"""Failed logins per client address, counted in Redis over the lock window (services/auth/accounts.py)."""

from __future__ import annotations

from redis.asyncio import Redis

from services.auth.accounts import CLIENT_LOCK_THRESHOLD, LOCK_SECONDS


def _key(zone_id: str, address: str) -> str:
    return f"login_failures:client:{zone_id}:{address}"


class ClientFailures:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def count(self, zone_id: str, address: str) -> int:
        return int(await self._redis.get(_key(zone_id, address)) or 0)

    async def record(self, zone_id: str, address: str) -> int:
        """Counts one failure; the count expires LOCK_SECONDS after the first, or after the one that locked."""
        key = _key(zone_id, address)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, LOCK_SECONDS, nx=True)
            count, _ = await pipe.execute()
        if int(count) == CLIENT_LOCK_THRESHOLD:
            await self._redis.expire(key, LOCK_SECONDS)
        return int(count)
