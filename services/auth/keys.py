"""The keys that sign access tokens: persisted (private keys encrypted with the PII key ring), rotated on a
schedule, and published as the JWKS with every key whose tokens may still be alive.

Every auth replica loads the same keys from PostgreSQL; rotation happens in one replica at a time (an
advisory lock in the store) and the others pick the new key up at their next reload.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from services.auth.pii import PiiKeyRing
from services.auth.signing import KeyRing, SigningKey, generate_signing_key, load_signing_key, private_key_pem
from services.auth.store import AuthStore


def _context(kid: str) -> str:
    return f"auth.signing_keys:{kid}"


class SigningKeys:
    def __init__(self, store: AuthStore, pii: PiiKeyRing, rotation_seconds: float, token_lifetime: float) -> None:
        self._store = store
        self._pii = pii
        self._rotation_seconds = rotation_seconds
        self._token_lifetime = token_lifetime
        self._ring: KeyRing | None = None

    @property
    def ring(self) -> KeyRing:
        if self._ring is None:
            raise RuntimeError("signing keys are not loaded yet")
        return self._ring

    async def load(self) -> KeyRing:
        """Reads the keys; makes the first one, or a new one when the current key is due for rotation."""
        ring = await self._read()
        now = time.time()
        if ring is None or now - ring.current.created_at >= self._rotation_seconds:
            # Replicas starting together would each rotate: the first wins, the others keep its key.
            await self._add(generate_signing_key(now), unless_newer_than=timedelta(seconds=60))
            ring = await self._read()
            assert ring is not None
        self._ring = ring
        return ring

    async def rotate(self) -> KeyRing:
        """A new current key now; the previous ones stay published until their tokens have expired."""
        await self._add(generate_signing_key(time.time()), unless_newer_than=timedelta(0))
        return await self.load()

    async def _add(self, key: SigningKey, unless_newer_than: timedelta) -> None:
        encrypted = self._pii.encrypt(private_key_pem(key).decode(), _context(key.kid))
        await self._store.add_signing_key(key.kid, encrypted, _datetime(key.created_at), unless_newer_than)

    async def _read(self) -> KeyRing | None:
        keys = [
            load_signing_key(
                self._pii.decrypt(row["private_key_encrypted"], _context(row["kid"])).encode(),
                created_at=row["create_time"].timestamp(),
                retired_at=None if row["retire_time"] is None else row["retire_time"].timestamp(),
            )
            for row in await self._store.signing_keys()
        ]
        if not any(key.retired_at is None for key in keys):
            return None
        return KeyRing(keys)

    def jwks(self) -> Mapping[str, object]:
        return {"keys": self.ring.jwks(time.time(), self._token_lifetime)}


def _datetime(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)
