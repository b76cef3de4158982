"""Signing keys with real PostgreSQL: made on first start, stored encrypted, rotated without invalidating live
tokens; and row-level security on the accounts tables."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from ops import migrations
from ops.embedded import EmbeddedPostgres
from services.auth.keys import SigningKeys
from services.auth.pii import PiiKeyRing, generate_key_spec
from services.auth.signing import issue_access_token
from services.auth.store import AuthStore, NewUser
from services.runtime.database import TenantScope, create_pool, tenant_transaction
from services.runtime.tokens import TokenVerifier, UnknownKeyId, parse_jwks

LIFETIME = 900


@pytest.fixture
async def auth_pool(fresh_database: str, postgres: EmbeddedPostgres) -> AsyncIterator[asyncpg.Pool]:
    await migrations.migrate(fresh_database)
    url = (await migrations.provision_service_logins(fresh_database, postgres.secrets_dir))["auth"]
    pool = await create_pool(url, schema="auth", max_size=2)
    yield pool
    await pool.close()


ROTATION = 30 * 86400
ANNOUNCE = 600


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


PII = PiiKeyRing.from_environment(generate_key_spec("k1"))


def _keys(pool: asyncpg.Pool, clock: Clock) -> SigningKeys:
    return SigningKeys(AuthStore(pool), PII, ROTATION, LIFETIME, ANNOUNCE, clock)


def _token(keys: SigningKeys, now: float) -> str:
    token, _ = issue_access_token(
        keys.ring,
        user_id="u",
        email="u@example.com",
        zone_id="univ",
        org_id="o",
        role="student",
        permissions=["exam:read"],
        session_id="s",
        now=now,
        lifetime_seconds=LIFETIME,
    )
    return token


async def test_rotation_keeps_live_tokens_valid_and_announces_the_new_key(
    auth_pool: asyncpg.Pool, fresh_database: str
) -> None:
    clock = Clock()
    keys = _keys(auth_pool, clock)
    first = (await keys.load()).signing_key(clock.now)
    old_token = _token(keys, clock.now)
    # Another replica (same database) loads the same key rather than making its own.
    assert (await _keys(auth_pool, clock).load()).signing_key(clock.now).kid == first.kid

    rotated = await keys.rotate()
    announced = rotated.newest()
    assert announced.kid != first.kid
    # Published at once, signing only once the announcement is over: a verifier holding the JWKS fetched now
    # (Envoy caches it for 5 minutes) accepts the tokens before and after the switch.
    published = parse_jwks(keys.jwks())
    assert set(published) == {first.kid, announced.kid}
    assert rotated.signing_key(clock.now).kid == first.kid
    switch = clock.now + ANNOUNCE
    new_token = _token(keys, switch)
    assert TokenVerifier(published, clock=lambda: switch).verify(new_token).user_id == "u"
    assert TokenVerifier(published).verify(old_token).user_id == "u"
    # Once every token the old key signed has expired, the key leaves the JWKS and its tokens are refused.
    later = switch + LIFETIME + 60
    after_expiry = TokenVerifier(keys.ring.public_keys(later, LIFETIME), clock=lambda: later - LIFETIME)
    with pytest.raises(UnknownKeyId):
        after_expiry.verify(old_token)
    # The private keys are stored encrypted, never in the clear.
    connection = await asyncpg.connect(fresh_database)
    try:
        stored = await connection.fetch("SELECT private_key_encrypted FROM auth.signing_keys")
    finally:
        await connection.close()
    assert len(stored) == 2
    assert all(row[0].startswith("v1.k1.") and "PRIVATE KEY" not in row[0] for row in stored)


async def test_the_next_key_is_announced_before_the_current_one_is_due(auth_pool: asyncpg.Pool) -> None:
    clock = Clock()
    keys = _keys(auth_pool, clock)
    first = (await keys.load()).newest()
    clock.now += ROTATION - ANNOUNCE - 60  # not yet: the announcement would end before the key is due
    assert [key.kid for key in (await keys.load()).keys] == [first.kid]
    clock.now += 61  # due (a second over: the database keeps microseconds)
    ring = await keys.load()
    announced = ring.newest()
    assert announced.kid != first.kid
    assert announced.signs_from == pytest.approx(first.signs_from + ROTATION, abs=1)
    assert ring.signing_key(clock.now).kid == first.kid
    # Reloads during the announcement (this replica or another) add no further key.
    clock.now += ANNOUNCE / 2
    assert len((await _keys(auth_pool, clock).load()).keys) == 2
    clock.now += ANNOUNCE
    assert (await keys.load()).signing_key(clock.now).kid == announced.kid


async def test_row_level_security_holds_on_accounts_even_without_a_filter(auth_pool: asyncpg.Pool) -> None:
    store = AuthStore(auth_pool)
    for zone, org, email in (("univ", "a", "1@x.com"), ("univ", "b", "2@x.com"), ("kzone", "a", "3@x.com")):
        await store.create_user(
            NewUser(
                user_id=email,
                zone_id=zone,
                org_id=org,
                email=email,
                name="N",
                role="student",
                password_hash="x",
                phone_number_encrypted="",
                locale="",
            )
        )

    async def visible(scope: TenantScope | None) -> set[str]:
        if scope is None:
            async with auth_pool.acquire() as connection:
                return {row[0] for row in await connection.fetch("SELECT email FROM users")}
        async with tenant_transaction(auth_pool, scope) as connection:
            return {row[0] for row in await connection.fetch("SELECT email FROM users")}

    assert await visible(None) == set()
    assert await visible(TenantScope.org("univ", "a")) == {"1@x.com"}
    assert await visible(TenantScope.zone("univ")) == {"1@x.com", "2@x.com"}
    assert await visible(TenantScope.platform()) == {"1@x.com", "2@x.com", "3@x.com"}
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # writing into another tenant is refused too
        async with tenant_transaction(auth_pool, TenantScope.org("univ", "a")) as connection:
            await connection.execute("UPDATE users SET org_id = 'b' WHERE email = '1@x.com'")
