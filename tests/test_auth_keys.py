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


def _token(keys: SigningKeys) -> str:
    token, _ = issue_access_token(
        keys.ring,
        user_id="u",
        email="u@example.com",
        zone_id="univ",
        org_id="o",
        role="student",
        permissions=["exam:read"],
        session_id="s",
        now=time.time(),
        lifetime_seconds=LIFETIME,
    )
    return token


async def test_rotation_keeps_live_tokens_valid(auth_pool: asyncpg.Pool, fresh_database: str) -> None:
    pii = PiiKeyRing.from_environment(generate_key_spec("k1"))
    keys = SigningKeys(AuthStore(auth_pool), pii, rotation_seconds=30 * 86400, token_lifetime=LIFETIME)
    first = await keys.load()
    old_token = _token(keys)
    # Another replica (same database) loads the same key rather than making its own.
    replica = SigningKeys(AuthStore(auth_pool), pii, rotation_seconds=30 * 86400, token_lifetime=LIFETIME)
    assert (await replica.load()).current.kid == first.current.kid
    rotated = await keys.rotate()
    assert rotated.current.kid != first.current.kid
    new_token = _token(keys)
    published = parse_jwks(keys.jwks())
    assert set(published) == {first.current.kid, rotated.current.kid}
    verifier = TokenVerifier(published)
    assert verifier.verify(old_token).user_id == verifier.verify(new_token).user_id == "u"
    # Once every token the old key signed has expired, the key leaves the JWKS and its tokens are refused.
    later = time.time() + LIFETIME + 60
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
