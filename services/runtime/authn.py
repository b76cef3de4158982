"""Who the person behind a call is: every service verifies access tokens itself (DESIGN.md section 4).

For each method whose contract declares `(megacity.common.v1.access)` and is not anonymous, the runtime's
interceptor hands the call's `authorization: Bearer <jwt>` to `Authenticator.authenticate`, which

1. verifies the token against the auth service's JWKS, cached; a token naming a key the cache does not
   know refreshes it (at most once per REFRESH_MIN_INTERVAL, so random key ids cannot make every call a
   JWKS fetch), and the cache also refreshes when older than JWKS_MAX_AGE, so rotated-out keys leave;
2. refuses a revoked token: `blacklist:{jti}` (logout) or `revoked_session:{sid}` (a session ended by
   logout everywhere, reuse detection, an admin) in Redis, both kept until the token would have expired.
   PostgreSQL holds the revocations durably; the auth service copies the live ones into Redis and then sets
   `revocations:ready`. Redis restarted empty has no such key, and every check fails closed (UNAVAILABLE)
   until the auth service has restored them: a revoked token never becomes valid again;
3. refuses a token of another zone than the request's (the zone the edge resolved from the host, in
   `x-megacity-zone`, services/runtime/callcontext.py): PERMISSION_DENIED with reason ZONE_MISMATCH;
4. checks that the token's permissions grant what the method declares (PERMISSION_MISSING otherwise).

Revocation is checked on every call, so Redis being down fails closed (UNAVAILABLE), never open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError

from megacity.auth.v1 import auth_service_pb2, auth_service_pb2_grpc, resources_pb2
from services.runtime.contracts import MethodAccess
from services.runtime.errors import ErrorReason, PermissionDenied, Unauthenticated, Unavailable
from services.runtime.permissions import grants
from services.runtime.tokens import AccessClaims, TokenVerifier, UnknownKeyId, parse_jwks

if TYPE_CHECKING:  # channels build on the interceptors, which use this module
    from services.runtime.channels import ChannelFactory

AUTHORIZATION_HEADER = "authorization"
JWKS_MAX_AGE = 300.0
REFRESH_MIN_INTERVAL = 5.0

# Returns the auth service's current JWKS document ({"keys": [...]}).
JwksSource = Callable[[], Awaitable[Mapping[str, object]]]


def jwk_fields(key: resources_pb2.Jwk) -> dict[str, str]:
    """A Jwk message as the JSON object RFC 7517 defines (members that are set)."""
    return {field.name: value for field, value in key.ListFields()}


def remote_jwks(channels: ChannelFactory) -> JwksSource:
    """The auth service's JWKS, fetched over the mesh (AuthService.GetJwks)."""

    async def fetch() -> Mapping[str, object]:
        stub = auth_service_pb2_grpc.AuthServiceStub(channels.channel("auth"))
        reply = await stub.GetJwks(auth_service_pb2.GetJwksRequest(), timeout=5.0)
        return {"keys": [jwk_fields(key) for key in reply.keys]}

    return fetch


REVOCATIONS_READY_KEY = "revocations:ready"


def blacklist_key(jti: str) -> str:
    return f"blacklist:{jti}"


def revoked_session_key(session_id: str) -> str:
    return f"revoked_session:{session_id}"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The token of the `authorization: Bearer <token>` header ('' without one)."""
    for key, value in metadata:
        if key == AUTHORIZATION_HEADER and isinstance(value, str):
            scheme, _, credentials = value.partition(" ")
            return credentials.strip() if scheme.lower() == "bearer" else ""
    return ""


class Authenticator:
    def __init__(self, jwks: JwksSource, redis: Redis | None, clock: Callable[[], float] = time.time) -> None:
        self._jwks = jwks
        self._redis = redis
        self._clock = clock
        self._verifier: TokenVerifier | None = None
        self._fetched_at = -float("inf")
        self._lock = asyncio.Lock()

    async def _refresh(self, *, forced: bool) -> TokenVerifier:
        async with self._lock:
            now = time.monotonic()
            fresh = now - self._fetched_at < (REFRESH_MIN_INTERVAL if forced else JWKS_MAX_AGE)
            if self._verifier is None or not fresh:
                try:
                    document = await self._jwks()
                except Exception as error:
                    if self._verifier is not None:  # keep serving with the keys we have
                        return self._verifier
                    raise Unavailable(
                        "cannot verify access tokens yet: the signing keys are unavailable", retry_after_seconds=1.0
                    ) from error
                self._verifier = TokenVerifier(parse_jwks(document), clock=self._clock)
                self._fetched_at = now
            return self._verifier

    async def verify(self, token: str) -> AccessClaims:
        """The claims of a valid, unrevoked access token."""
        verifier = self._verifier
        if verifier is None or time.monotonic() - self._fetched_at >= JWKS_MAX_AGE:
            verifier = await self._refresh(forced=False)
        try:
            claims = verifier.verify(token)
        except UnknownKeyId:
            claims = (await self._refresh(forced=True)).verify(token)
        await self._check_not_revoked(claims)
        return claims

    async def _check_not_revoked(self, claims: AccessClaims) -> None:
        if self._redis is None:
            raise Unavailable("cannot check token revocation: no Redis configured", retry_after_seconds=5.0)
        try:
            ready, *revoked = await self._redis.mget(
                REVOCATIONS_READY_KEY, blacklist_key(claims.jti), revoked_session_key(claims.session_id)
            )
        except (RedisError, OSError) as error:
            raise Unavailable("cannot check token revocation right now", retry_after_seconds=1.0) from error
        if ready is None:
            raise Unavailable("token revocations are being restored", retry_after_seconds=1.0)
        if any(value is not None for value in revoked):
            raise Unauthenticated("the access token was revoked", reason=ErrorReason.ERROR_REASON_TOKEN_REVOKED)

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> AccessClaims:
        """The person a call acts for, from its bearer token."""
        token = bearer_token(metadata)
        if not token:
            raise Unauthenticated(
                "this call needs an access token (authorization: Bearer <token>)",
                reason=ErrorReason.ERROR_REASON_TOKEN_MISSING,
            )
        return await self.verify(token)


def authorize(claims: AccessClaims, access: MethodAccess, request_zone: str) -> None:
    """Refuses a person of another zone than the request's, or whose role lacks the method's permission."""
    if request_zone and request_zone != claims.zone_id:
        raise PermissionDenied(
            "the access token belongs to another zone than this request",
            reason=ErrorReason.ERROR_REASON_ZONE_MISMATCH,
            metadata={"token_zone": claims.zone_id, "request_zone": request_zone},
        )
    if not grants(claims.permissions, access.permission):
        raise PermissionDenied(
            f"your role does not grant {access.permission}",
            reason=ErrorReason.ERROR_REASON_PERMISSION_MISSING,
            metadata={"permission": access.permission},
        )
