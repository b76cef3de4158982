"""The keys that sign access tokens: persisted (private keys encrypted with the PII key ring), rotated on a
schedule, and published as the JWKS with every key whose tokens may still be alive.

Every auth replica loads the same keys from PostgreSQL; rotation happens in one replica at a time (an
advisory lock in the store) and the others pick the new key up at their next reload. A new key is announced
(published) `announce_seconds` before it signs: longer than any verifier caches the JWKS (Envoy: 5 minutes)
plus a replica's reload interval, so no verifier meets a token whose key it has not fetched yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from services.auth.pii import PiiKeyRing
from services.auth.signing import KeyRing, SigningKey, generate_signing_key, load_signing_key, private_key_pem
from services.auth.store import AuthStore


def _context(kid: str) -> str:
    return f"auth.signing_keys:{kid}"


class SigningKeys:
    def __init__(
        self,
        store: AuthStore,
        pii: PiiKeyRing,
        rotation_seconds: float,
        token_lifetime: float,
        announce_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._pii = pii
        self._rotation_seconds = rotation_seconds
        self._token_lifetime = token_lifetime
        self._announce_seconds = announce_seconds
        self._clock = clock
        self._ring: KeyRing | None = None

    @property
    def ring(self) -> KeyRing:
        if self._ring is None:
            raise RuntimeError("signing keys are not loaded yet")
        return self._ring

    async def load(self) -> KeyRing:
        """Reads the keys; makes the first one (signing at once: nobody can hold tokens yet), or announces the next
        one when the newest key will have signed for `rotation_seconds` once the announcement is over."""
        ring = await self._read()
        now = self._clock()
        if ring is None:
            await self._add(generate_signing_key(now), unless_newer_than=timedelta(seconds=60))
        elif now + self._announce_seconds - ring.newest().signs_from >= self._rotation_seconds:
            # Replicas reloading together would each rotate: the first wins, the others keep its key.
            await self._add(self._announced_key(now), unless_newer_than=timedelta(seconds=60))
        else:
            self._ring = ring
            return ring
        ring = await self._read()
        assert ring is not None
        self._ring = ring
        return ring

    async def rotate(self) -> KeyRing:
        """Announces a new key now (it signs once the announcement is over); the previous ones stay published until
        their tokens have expired."""
        await self._add(self._announced_key(self._clock()), unless_newer_than=timedelta(0))
        return await self.load()

    def _announced_key(self, now: float) -> SigningKey:
        return generate_signing_key(now, activates_at=now + self._announce_seconds)

    async def _add(self, key: SigningKey, unless_newer_than: timedelta) -> None:
        encrypted = self._pii.encrypt(private_key_pem(key).decode(), _context(key.kid))
        await self._store.add_signing_key(
            key.kid, encrypted, _datetime(key.created_at), _datetime(key.signs_from), unless_newer_than
        )

    async def _read(self) -> KeyRing | None:
        keys = [
            load_signing_key(
                self._pii.decrypt(row["private_key_encrypted"], _context(row["kid"])).encode(),
                created_at=row["create_time"].timestamp(),
                activates_at=row["activate_time"].timestamp(),
                retired_at=None if row["retire_time"] is None else row["retire_time"].timestamp(),
            )
            for row in await self._store.signing_keys()
        ]
        if not any(key.retired_at is None for key in keys):
            return None
        return KeyRing(keys)

    def jwks(self) -> Mapping[str, object]:
        return {"keys": self.ring.jwks(self._clock(), self._token_lifetime)}


def _datetime(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)
