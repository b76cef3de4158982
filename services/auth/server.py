"""The auth service: accounts, login, JWT access and rotating refresh tokens, the JWKS, sessions.

Thin: validates, applies the rules of services/auth/accounts.py and passwords.py, stores through
services/auth/store.py, signs with services/auth/keys.py, and publishes revocations through
services/auth/revocations.py. The permission each RPC needs is declared in the contract and checked by
the runtime (services/runtime/authn.py); ownership and scope are checked here. RPCs not built yet (MFA,
user administration, invite codes, parent links, the audit trail) answer UNIMPLEMENTED.

Readiness doubles as start-up: the service reports SERVING once its signing keys are loaded (made on the
first start) and the revocations are in Redis (restored after Redis lost them); see `servicers`.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from google.protobuf import timestamp_pb2

from megacity.auth.v1 import auth_service_pb2 as pb
from megacity.auth.v1 import auth_service_pb2_grpc, resources_pb2
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2, tenant_service_pb2_grpc
from services.auth import accounts, passwords
from services.auth.keys import SigningKeys
from services.auth.revocations import Revocations
from services.auth.settings import AuthSettings
from services.auth.signing import issue_access_token
from services.auth.store import AuthStore, NewSession, NewUser, Rotation, RotationResult, utcnow
from services.auth.throttle import ClientFailures
from services.runtime import paging
from services.runtime.callcontext import current_principal, current_zone
from services.runtime.context import UnaryContext
from services.runtime.database import TenantScope
from services.runtime.errors import (
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Violations,
)
from services.runtime.permissions import ROLE_PERMISSIONS, role_value
from services.runtime.server import Dependencies, ServicerBinding
from services.runtime.tokens import AccessClaims

MAX_PAGE = 100
TOKEN_TYPE = "Bearer"  # noqa: S105  # the RFC 6750 token type, not a secret
KEY_RELOAD_SECONDS = 60.0
_PHONE_CHARS = frozenset("+0123456789")


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _request_zone() -> str:
    zone = current_zone()
    if not zone:
        raise FailedPrecondition(
            "the request carries no zone: call through the edge, which resolves it from the host (x-megacity-zone)",
            reason=ErrorReason.ERROR_REASON_UNKNOWN_ZONE,
        )
    return zone


def _person() -> AccessClaims:
    principal = current_principal()
    if principal is None:  # the runtime authenticates every non-anonymous RPC before it gets here
        raise Unauthenticated("sign in first", reason=ErrorReason.ERROR_REASON_TOKEN_MISSING)
    return principal


def _client(context: UnaryContext[Any, Any]) -> tuple[str, str]:
    """The caller's address (the edge's X-Forwarded-For, else the peer) and user agent."""
    address = agent = ""
    for key, value in context.invocation_metadata() or ():
        if key == "x-forwarded-for" and isinstance(value, str):
            address = value.split(",")[0].strip()
        elif key == "user-agent" and isinstance(value, str):
            agent = value
    if not address:
        peer = context.peer() or ""  # ipv4:127.0.0.1:5000, ipv6:[::1]:5000
        address = peer.partition(":")[2].rsplit(":", 1)[0].strip("[]")
    return address[:64], agent[:512]


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(
        self,
        store: AuthStore,
        keys: SigningKeys,
        revocations: Revocations,
        settings: AuthSettings,
        tenant: tenant_service_pb2_grpc.TenantServiceStub,
        throttle: ClientFailures,
    ) -> None:
        self._store = store
        self._keys = keys
        self._revocations = revocations
        self._settings = settings
        self._tenant = tenant
        self._throttle = throttle

    # --- helpers --------------------------------------------------------------------------------------------

    def _user_message(self, row: asyncpg.Record, *, with_personal_data: bool) -> resources_pb2.User:
        user = resources_pb2.User(
            id=row["user_id"],
            zone_id=row["zone_id"],
            org_id=row["org_id"],
            email=row["email"],
            name=row["name"],
            role=role_value(row["role"]),
            status=resources_pb2.USER_STATUS_ACTIVE
            if row["status"] == "active"
            else resources_pb2.USER_STATUS_DEACTIVATED,
            locale=row["locale"],
            mfa_enabled=row["mfa_enabled"],
            permissions=sorted(ROLE_PERMISSIONS[row["role"]]),
            locked_until=_timestamp(row["locked_until"]),
            create_time=_timestamp(row["create_time"]),
            update_time=_timestamp(row["update_time"]),
            last_login_time=_timestamp(row["last_login_time"]),
        )
        if with_personal_data and row["phone_number_encrypted"]:
            user.phone_number = self._settings.pii.decrypt(
                row["phone_number_encrypted"], _phone_context(row["user_id"])
            )
        return user

    async def _organization(self, org_id: str) -> tenant_resources.Organization:
        reply = await self._tenant.LookupOrganization(tenant_service_pb2.LookupOrganizationRequest(org_id=org_id))
        return reply.organization

    async def _sign_in(
        self, user: asyncpg.Record, context: UnaryContext[Any, Any], *, mfa_verified: bool
    ) -> tuple[str, str, str, asyncpg.Record]:
        """Opens a session: (access token, refresh token, session id, session row)."""
        address, agent = _client(context)
        refresh_token = accounts.new_refresh_token()
        now = utcnow()
        refresh_expire = now + timedelta(seconds=self._settings.refresh_token_seconds)
        session = await self._store.open_session(
            NewSession(
                session_id=accounts.new_id(),
                user_id=user["user_id"],
                zone_id=user["zone_id"],
                org_id=user["org_id"],
                ip_address=address,
                user_agent=agent,
                mfa_verified=mfa_verified,
                expire_time=refresh_expire,
                refresh_token_hash=accounts.token_hash(refresh_token),
            ),
            refresh_expire,
        )
        await self._revocations.cache_session(
            user["user_id"],
            session["session_id"],
            {"ip_address": address, "user_agent": agent, "create_time": now.isoformat()},
            refresh_expire,
        )
        access_token = self._access_token(user, session["session_id"])
        return access_token, refresh_token, session["session_id"], session

    def _access_token(self, user: asyncpg.Record, session_id: str) -> str:
        token, _ = issue_access_token(
            self._keys.ring,
            user_id=user["user_id"],
            email=user["email"],
            zone_id=user["zone_id"],
            org_id=user["org_id"],
            role=user["role"],
            permissions=sorted(ROLE_PERMISSIONS[user["role"]]),
            session_id=session_id,
            now=time.time(),
            lifetime_seconds=self._settings.access_token_seconds,
        )
        return token

    async def _check_may_sign_in(self, user: asyncpg.Record) -> None:
        if user["status"] != "active":
            raise PermissionDenied("this account is deactivated", reason=ErrorReason.ERROR_REASON_ACCOUNT_DISABLED)
        organization = await self._organization(user["org_id"])
        if organization.status == tenant_resources.ORGANIZATION_STATUS_SUSPENDED:
            raise PermissionDenied(
                "this account's organisation is suspended", reason=ErrorReason.ERROR_REASON_ORG_SUSPENDED
            )

    async def _slow_down(self, failures: int) -> None:
        await asyncio.sleep(accounts.failure_delay(failures) * self._settings.login_slowdown)

    # --- registration, login and tokens --------------------------------------------------------------------

    async def Register(
        self, request: pb.RegisterRequest, context: UnaryContext[pb.RegisterRequest, pb.RegisterResponse]
    ) -> pb.RegisterResponse:
        zone_id = _request_zone()
        violations = Violations()
        email = accounts.check_email(violations, request.email)
        name = accounts.check_name(violations, request.name)
        phone = request.phone_number.strip()
        violations.check(
            not phone or (phone.startswith("+") and set(phone) <= _PHONE_CHARS and 8 <= len(phone) <= 16),
            "phone_number",
            "E.164, e.g. +821012345678",
        )
        violations.check(len(request.locale) <= 35, "locale", "a BCP-47 tag")
        violations.raise_if_any()
        passwords.check_password_policy(request.password)
        if request.invite_code:
            raise NotImplementedError("invite codes")
        zone = (await self._tenant.LookupZone(tenant_service_pb2.LookupZoneRequest(zone_id=zone_id))).zone
        user_id = accounts.new_id()
        user = await self._store.create_user(
            NewUser(
                user_id=user_id,
                zone_id=zone_id,
                org_id=zone.public_org_id,
                email=email,
                name=name,
                role="student",
                password_hash=await passwords.hash_password(request.password, self._settings.bcrypt_cost),
                phone_number_encrypted=self._settings.pii.encrypt(phone, _phone_context(user_id)) if phone else "",
                locale=request.locale,
            )
        )
        access, refresh, session_id, _ = await self._sign_in(user, context, mfa_verified=False)
        return pb.RegisterResponse(
            access_token=access,
            refresh_token=refresh,
            token_type=TOKEN_TYPE,
            expires_in=self._settings.access_token_seconds,
            refresh_expires_in=self._settings.refresh_token_seconds,
            session_id=session_id,
            user=self._user_message(user, with_personal_data=True),
        )

    async def Login(
        self, request: pb.LoginRequest, context: UnaryContext[pb.LoginRequest, pb.LoginResponse]
    ) -> pb.LoginResponse:
        zone_id = _request_zone()
        violations = Violations()
        violations.check(bool(request.email.strip()), "email", "required")
        violations.check(bool(request.password), "password", "required")
        violations.raise_if_any()
        address, _ = _client(context)
        if await self._throttle.count(zone_id, address) >= accounts.CLIENT_LOCK_THRESHOLD:
            raise _locked(accounts.LOCK_SECONDS)
        user = await self._store.user_by_email(zone_id, request.email)
        now = utcnow()
        if user is not None and user["locked_until"] is not None and user["locked_until"] > now:
            raise _locked((user["locked_until"] - now).total_seconds())
        if user is None:
            await passwords.burn_verify_time(request.password, self._settings.bcrypt_cost)
            valid = False
        else:
            valid = await passwords.verify_password(request.password, user["password_hash"])
        if not valid:
            client_failures = await self._throttle.record(zone_id, address)
            failures, locked_until = client_failures, None
            if user is not None:
                account_failures, locked_until = await self._store.record_login_failure(
                    zone_id, user["user_id"], accounts.ACCOUNT_LOCK_THRESHOLD, accounts.LOCK_SECONDS
                )
                failures = max(failures, account_failures)
            await self._slow_down(failures)
            if locked_until is not None and locked_until > utcnow():
                raise _locked((locked_until - utcnow()).total_seconds())
            if client_failures >= accounts.CLIENT_LOCK_THRESHOLD:
                raise _locked(accounts.LOCK_SECONDS)
            raise Unauthenticated("wrong email or password", reason=ErrorReason.ERROR_REASON_INVALID_CREDENTIALS)
        assert user is not None
        await self._check_may_sign_in(user)
        if user["mfa_enabled"]:
            raise NotImplementedError("MFA challenges")
        await self._store.record_login_success(zone_id, user["user_id"])
        access, refresh, session_id, _ = await self._sign_in(user, context, mfa_verified=False)
        return pb.LoginResponse(
            access_token=access,
            refresh_token=refresh,
            token_type=TOKEN_TYPE,
            expires_in=self._settings.access_token_seconds,
            refresh_expires_in=self._settings.refresh_token_seconds,
            session_id=session_id,
            user=self._user_message(user, with_personal_data=True),
        )

    async def Refresh(
        self, request: pb.RefreshRequest, context: UnaryContext[pb.RefreshRequest, pb.RefreshResponse]
    ) -> pb.RefreshResponse:
        zone_id = _request_zone()
        if not request.refresh_token:
            raise InvalidArgument("refresh_token is required", [("refresh_token", "required")])
        successor = accounts.new_refresh_token()
        expire = utcnow() + timedelta(seconds=self._settings.refresh_token_seconds)
        result = await self._store.rotate_refresh_token(
            zone_id, accounts.token_hash(request.refresh_token), accounts.token_hash(successor), expire
        )
        user, session = await self._rotated(result)
        await self._check_may_sign_in(user)
        return pb.RefreshResponse(
            access_token=self._access_token(user, session["session_id"]),
            refresh_token=successor,
            token_type=TOKEN_TYPE,
            expires_in=self._settings.access_token_seconds,
            refresh_expires_in=self._settings.refresh_token_seconds,
            session_id=session["session_id"],
        )

    async def _rotated(self, result: RotationResult) -> tuple[asyncpg.Record, asyncpg.Record]:
        if result.outcome is Rotation.ROTATED:
            assert result.user is not None
            assert result.session is not None
            return result.user, result.session
        if result.outcome is Rotation.REUSED:
            assert result.session is not None
            session = result.session
            # Published before answering: every access token of the family stops working now.
            await self._revocations.revoke_sessions([(session["user_id"], session["session_id"], utcnow())])
            raise Unauthenticated(
                "this refresh token was already used; its session is now revoked",
                reason=ErrorReason.ERROR_REASON_REFRESH_TOKEN_REUSED,
            )
        if result.outcome is Rotation.ENDED:
            raise Unauthenticated("this session has ended", reason=ErrorReason.ERROR_REASON_TOKEN_REVOKED)
        raise Unauthenticated("unknown refresh token", reason=ErrorReason.ERROR_REASON_TOKEN_INVALID)

    async def Logout(
        self, request: pb.LogoutRequest, context: UnaryContext[pb.LogoutRequest, pb.LogoutResponse]
    ) -> pb.LogoutResponse:
        person = _person()
        scope = TenantScope.org(person.zone_id, person.org_id)
        ended = await self._store.revoke_sessions(
            scope, person.user_id, None if request.all_sessions else [person.session_id], "logout"
        )
        # The caller's own session is revoked in Redis even when PostgreSQL had it revoked already (a retried
        # logout whose first attempt could not reach Redis).
        revoked = {(row["user_id"], row["session_id"], row["revoke_time"]) for row in ended}
        revoked.add((person.user_id, person.session_id, utcnow()))
        await self._revocations.revoke_token(person.jti, person.expires_at)
        await self._revocations.revoke_sessions(revoked)
        return pb.LogoutResponse(sessions_revoked=len(ended))

    async def GetJwks(
        self, request: pb.GetJwksRequest, context: UnaryContext[pb.GetJwksRequest, pb.GetJwksResponse]
    ) -> pb.GetJwksResponse:
        document = self._keys.jwks()
        keys = document["keys"]
        assert isinstance(keys, list)
        return pb.GetJwksResponse(keys=[resources_pb2.Jwk(**key) for key in keys])

    # --- the caller's own account and sessions ----------------------------------------------------------------

    async def GetMe(
        self, request: pb.GetMeRequest, context: UnaryContext[pb.GetMeRequest, pb.GetMeResponse]
    ) -> pb.GetMeResponse:
        person = _person()
        row = await self._store.user(TenantScope.org(person.zone_id, person.org_id), person.user_id)
        return pb.GetMeResponse(user=self._user_message(row, with_personal_data=True))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: UnaryContext[pb.ListSessionsRequest, pb.ListSessionsResponse]
    ) -> pb.ListSessionsResponse:
        person = _person()
        if request.user_id and request.user_id != person.user_id:
            raise NotImplementedError("listing another user's sessions")
        limit = paging.page_size(request.page_size, MAX_PAGE)
        query = ["sessions", person.user_id]
        position = paging.decode(request.page_token, query)
        after = str(position[0]) if position else None
        scope = TenantScope.org(person.zone_id, person.org_id)
        rows = await self._store.sessions(scope, person.user_id, after, limit + 1)
        next_token = paging.encode([rows[limit - 1]["session_id"]], query) if len(rows) > limit else ""
        return pb.ListSessionsResponse(
            sessions=[_session_message(row, current=row["session_id"] == person.session_id) for row in rows[:limit]],
            next_page_token=next_token,
        )

    async def RevokeSession(
        self, request: pb.RevokeSessionRequest, context: UnaryContext[pb.RevokeSessionRequest, pb.RevokeSessionResponse]
    ) -> pb.RevokeSessionResponse:
        person = _person()
        if not request.session_id:
            raise InvalidArgument("session_id is required", [("session_id", "required")])
        scope = TenantScope.org(person.zone_id, person.org_id)
        ended = await self._store.revoke_sessions(scope, person.user_id, [request.session_id], "revoked")
        if not ended:
            raise NotFound("no open session with this id")
        await self._revocations.revoke_sessions(
            (row["user_id"], row["session_id"], row["revoke_time"]) for row in ended
        )
        return pb.RevokeSessionResponse()

    # --- internal -------------------------------------------------------------------------------------------------

    async def LookupUser(
        self, request: pb.LookupUserRequest, context: UnaryContext[pb.LookupUserRequest, pb.LookupUserResponse]
    ) -> pb.LookupUserResponse:
        if not request.user_id:
            raise InvalidArgument("user_id is required", [("user_id", "required")])
        row = await self._store.user(TenantScope.platform(), request.user_id)
        return pb.LookupUserResponse(user=self._user_message(row, with_personal_data=False))


def _phone_context(user_id: str) -> str:
    return f"auth.users.phone_number:{user_id}"


def _locked(seconds: float) -> ServiceError:
    return ResourceExhausted(
        "too many failed logins: try again later",
        retry_after_seconds=max(round(seconds), 1),
        reason=ErrorReason.ERROR_REASON_ACCOUNT_LOCKED,
    )


def _session_message(row: asyncpg.Record, *, current: bool) -> resources_pb2.Session:
    return resources_pb2.Session(
        id=row["session_id"],
        user_id=row["user_id"],
        current=current,
        mfa_verified=row["mfa_verified"],
        ip_address=row["ip_address"],
        user_agent=row["user_agent"],
        create_time=_timestamp(row["create_time"]),
        last_refresh_time=_timestamp(row["last_refresh_time"]),
        expire_time=_timestamp(row["expire_time"]),
    )


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    if deps.database is None or deps.redis is None:
        raise RuntimeError("the auth service needs PostgreSQL and Redis (MEGACITY_DATABASE_URL, MEGACITY_REDIS_URL)")
    settings = AuthSettings.from_environment()
    store = AuthStore(deps.database)
    keys = SigningKeys(store, settings.pii, settings.signing_key_rotation_seconds, settings.access_token_seconds)
    revocations = Revocations(deps.redis, store, settings.access_token_seconds)
    loaded_at = -KEY_RELOAD_SECONDS

    async def keys_loaded() -> bool:
        # Reloaded every minute, so a key another replica rotated in is used and published here too.
        nonlocal loaded_at
        if time.monotonic() - loaded_at >= KEY_RELOAD_SECONDS:
            await keys.load()
            loaded_at = time.monotonic()
        return True

    async def revocations_in_redis() -> bool:
        await revocations.restore_if_lost()
        return True

    async def own_jwks() -> dict[str, object]:
        await keys_loaded()
        return dict(keys.jwks())

    deps.probes["signing_keys"] = keys_loaded
    deps.probes["revocations"] = revocations_in_redis
    deps.jwks_source = own_jwks
    tenant = tenant_service_pb2_grpc.TenantServiceStub(deps.channels.channel("tenant"))
    servicer = AuthServicer(store, keys, revocations, settings, tenant, ClientFailures(deps.redis))
    return [ServicerBinding(auth_service_pb2_grpc.add_AuthServiceServicer_to_server, servicer)]
