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
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
from google.protobuf import timestamp_pb2

from megacity.auth.v1 import auth_service_pb2 as pb
from megacity.auth.v1 import auth_service_pb2_grpc, resources_pb2
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2, tenant_service_pb2_grpc
from services.auth import accounts, audit, cookies, mfa, passwords
from services.auth.audit_log import AuditLog
from services.auth.challenges import MfaChallenges
from services.auth.keys import SigningKeys
from services.auth.revocations import Revocations
from services.auth.settings import AuthSettings
from services.auth.signing import issue_access_token
from services.auth.store import AuthStore, NewInvite, NewSession, NewUser, Rotation, RotationResult, utcnow
from services.auth.throttle import ClientFailures
from services.runtime import paging
from services.runtime.audit import Auditor, client_of
from services.runtime.callcontext import current_caller, current_zone, require_principal
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
from services.runtime.permissions import ROLE_PERMISSIONS, grants, role_name, role_value
from services.runtime.server import Dependencies, ServicerBinding
from services.runtime.tokens import AccessClaims

MAX_PAGE = 100
MAX_AUDIT_PAGE = 1000
TOKEN_TYPE = "Bearer"  # noqa: S105  # the RFC 6750 token type, not a secret
KEY_RELOAD_SECONDS = 60.0
MFA_ENROLMENT_WINDOW = timedelta(minutes=10)
_PHONE_CHARS = frozenset("+0123456789")


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _metadata_value(context: UnaryContext[Any, Any], key: str) -> str:
    return next((str(value) for name, value in context.invocation_metadata() or () if name == key), "")


def _request_zone() -> str:
    zone = current_zone()
    if not zone:
        raise FailedPrecondition(
            "the request carries no zone: call through the edge, which resolves it from the host (x-megacity-zone)",
            reason=ErrorReason.ERROR_REASON_UNKNOWN_ZONE,
        )
    return zone


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(
        self,
        store: AuthStore,
        keys: SigningKeys,
        revocations: Revocations,
        settings: AuthSettings,
        tenant: tenant_service_pb2_grpc.TenantServiceStub,
        throttle: ClientFailures,
        challenges: MfaChallenges,
        audit_log: AuditLog,
        auditor: Auditor,
    ) -> None:
        self._store = store
        self._keys = keys
        self._revocations = revocations
        self._settings = settings
        self._tenant = tenant
        self._throttle = throttle
        self._challenges = challenges
        self._audit_log = audit_log
        self._audit = auditor

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
    ) -> dict[str, Any]:
        """Opens a session; the token fields of the reply that signs the person in (see `_tokens`)."""
        address, agent = client_of(context)
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
        await self._set_refresh_cookie(context, refresh_token)
        return self._tokens(self._access_token(user, session["session_id"]), refresh_token, session["session_id"])

    async def _set_refresh_cookie(self, context: UnaryContext[Any, Any], refresh_token: str) -> None:
        max_age = self._settings.refresh_token_seconds if refresh_token else 0
        await context.send_initial_metadata((("set-cookie", cookies.refresh_cookie(refresh_token, max_age)),))

    def _tokens(self, access_token: str, refresh_token: str, session_id: str) -> dict[str, Any]:
        """The OAuth-style fields every reply that signs a person in carries at its top level."""
        return {
            "access_token": access_token,
            "refresh_token": refresh_token,
            "token_type": TOKEN_TYPE,
            "expires_in": self._settings.access_token_seconds,
            "refresh_expires_in": self._settings.refresh_token_seconds,
            "session_id": session_id,
        }

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
            await self._audit_as(user, "login_failed", "denied", details={"reason": "account_disabled"})
            raise PermissionDenied("this account is deactivated", reason=ErrorReason.ERROR_REASON_ACCOUNT_DISABLED)
        organization = await self._organization(user["org_id"])
        if organization.status == tenant_resources.ORGANIZATION_STATUS_SUSPENDED:
            await self._audit_as(user, "login_failed", "denied", details={"reason": "org_suspended"})
            raise PermissionDenied(
                "this account's organisation is suspended", reason=ErrorReason.ERROR_REASON_ORG_SUSPENDED
            )

    async def _audit_as(self, user: asyncpg.Record, action: str, outcome: str, **fields: Any) -> None:
        """Records an action of a person who has no verified token in this call (logging in, refreshing)."""
        await self._audit.record(
            action,
            outcome,
            zone_id=user["zone_id"],
            org_id=user["org_id"],
            actor_id=user["user_id"],
            actor_role=user["role"],
            **fields,
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
        phone = _check_phone(violations, request.phone_number, "phone_number")
        violations.check(len(request.locale) <= 35, "locale", "a BCP-47 tag")
        violations.raise_if_any()
        passwords.check_password_policy(request.password)
        zone = (await self._tenant.LookupZone(tenant_service_pb2.LookupZoneRequest(zone_id=zone_id))).zone
        user_id = accounts.new_id()
        new_user = NewUser(
            user_id=user_id,
            zone_id=zone_id,
            org_id=zone.public_org_id,  # the invite's organisation instead, when there is one
            email=email,
            name=name,
            role="student",
            password_hash=await passwords.hash_password(request.password, self._settings.bcrypt_cost),
            phone_number_encrypted=self._settings.pii.encrypt(phone, _phone_context(user_id)) if phone else "",
            locale=request.locale,
        )
        if request.invite_code:
            user = await self._store.create_user_with_invite(new_user, accounts.invite_code_hash(request.invite_code))
        else:
            user = await self._store.create_user(new_user)
        tokens = await self._sign_in(user, context, mfa_verified=False)
        await self._audit_as(user, "register", "success", resource_type="user", resource_id=user["user_id"])
        return pb.RegisterResponse(
            **tokens,
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
        address, _ = client_of(context)
        if await self._throttle.count(zone_id, address) >= accounts.CLIENT_LOCK_THRESHOLD:
            raise _locked(accounts.LOCK_SECONDS)
        user = await self._store.user_by_email(zone_id, request.email)
        now = utcnow()
        if user is not None and user["locked_until"] is not None and user["locked_until"] > now:
            await self._audit_as(user, "login_failed", "denied", details={"reason": "account_locked"})
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
            if user is not None:
                locked = locked_until is not None and locked_until > utcnow()
                await self._audit_as(
                    user, "login_failed", "failure", details={"reason": "wrong_password", "locked": locked}
                )
            else:
                await self._audit.record(
                    "login_failed", "failure", zone_id=zone_id, details={"reason": "unknown_email"}
                )
            await self._slow_down(failures)
            if locked_until is not None and locked_until > utcnow():
                raise _locked((locked_until - utcnow()).total_seconds())
            if client_failures >= accounts.CLIENT_LOCK_THRESHOLD:
                raise _locked(accounts.LOCK_SECONDS)
            raise Unauthenticated("wrong email or password", reason=ErrorReason.ERROR_REASON_INVALID_CREDENTIALS)
        assert user is not None
        await self._check_may_sign_in(user)
        if user["mfa_enabled"]:
            challenge_token = accounts.new_refresh_token()
            await self._challenges.open(challenge_token, zone_id, user["user_id"])
            return pb.LoginResponse(
                mfa_required=True,
                mfa_challenge=resources_pb2.MfaChallenge(
                    challenge_token=challenge_token,
                    expire_time=_timestamp(utcnow() + timedelta(seconds=accounts.MFA_CHALLENGE_SECONDS)),
                    methods=[resources_pb2.MFA_METHOD_TOTP, resources_pb2.MFA_METHOD_RECOVERY_CODE],
                ),
            )
        await self._store.record_login_success(zone_id, user["user_id"])
        tokens = await self._sign_in(user, context, mfa_verified=False)
        await self._audit_as(user, "login", "success", resource_type="session", resource_id=tokens["session_id"])
        return pb.LoginResponse(
            **tokens,
            user=self._user_message(user, with_personal_data=True),
        )

    async def Refresh(
        self, request: pb.RefreshRequest, context: UnaryContext[pb.RefreshRequest, pb.RefreshResponse]
    ) -> pb.RefreshResponse:
        zone_id = _request_zone()
        presented = request.refresh_token or cookies.refresh_token_from(_metadata_value(context, "cookie"))
        if not presented:
            raise InvalidArgument("refresh_token is required", [("refresh_token", "required")])
        successor = accounts.new_refresh_token()
        expire = utcnow() + timedelta(seconds=self._settings.refresh_token_seconds)
        result = await self._store.rotate_refresh_token(
            zone_id, accounts.token_hash(presented), accounts.token_hash(successor), expire
        )
        user, session = await self._rotated(result)
        await self._check_may_sign_in(user)
        await self._set_refresh_cookie(context, successor)
        return pb.RefreshResponse(
            **self._tokens(self._access_token(user, session["session_id"]), successor, session["session_id"])
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
            await self._audit.record(
                "token_reuse",
                "denied",
                zone_id=session["zone_id"],
                org_id=session["org_id"],
                actor_id=session["user_id"],
                resource_type="session",
                resource_id=session["session_id"],
            )
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
        person = require_principal()
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
        await self._audit.record(
            "logout",
            "success",
            resource_type="session",
            resource_id=person.session_id,
            details={"all_sessions": request.all_sessions, "sessions_revoked": len(ended)},
        )
        await self._set_refresh_cookie(context, "")
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
        person = require_principal()
        row = await self._store.user(TenantScope.org(person.zone_id, person.org_id), person.user_id)
        return pb.GetMeResponse(user=self._user_message(row, with_personal_data=True))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: UnaryContext[pb.ListSessionsRequest, pb.ListSessionsResponse]
    ) -> pb.ListSessionsResponse:
        person = require_principal()
        if request.user_id and request.user_id != person.user_id:
            # An administrator's view of someone in their scope, as UpdateUser would let them act on them.
            if not grants(person.permissions, "user:update"):
                raise PermissionDenied(
                    "your role does not grant user:update",
                    reason=ErrorReason.ERROR_REASON_PERMISSION_MISSING,
                    metadata={"permission": "user:update"},
                )
            target = await self._target_user(person, request.user_id)
            user_id, scope = target["user_id"], TenantScope.org(target["zone_id"], target["org_id"])
        else:
            user_id, scope = person.user_id, _own_scope(person)
        limit = paging.page_size(request.page_size, MAX_PAGE)
        query = ["sessions", user_id]
        position = paging.decode(request.page_token, query)
        after = str(position[0]) if position else None
        rows = await self._store.sessions(scope, user_id, after, limit + 1)
        next_token = paging.encode([rows[limit - 1]["session_id"]], query) if len(rows) > limit else ""
        return pb.ListSessionsResponse(
            sessions=[_session_message(row, current=row["session_id"] == person.session_id) for row in rows[:limit]],
            next_page_token=next_token,
        )

    async def RevokeSession(
        self, request: pb.RevokeSessionRequest, context: UnaryContext[pb.RevokeSessionRequest, pb.RevokeSessionResponse]
    ) -> pb.RevokeSessionResponse:
        person = require_principal()
        if not request.session_id:
            raise InvalidArgument("session_id is required", [("session_id", "required")])
        scope = TenantScope.org(person.zone_id, person.org_id)
        ended = await self._store.revoke_sessions(scope, person.user_id, [request.session_id], "revoked")
        if not ended:
            raise NotFound("no open session with this id")
        await self._revocations.revoke_sessions(
            (row["user_id"], row["session_id"], row["revoke_time"]) for row in ended
        )
        await self._audit.record("revoke_session", "success", resource_type="session", resource_id=request.session_id)
        return pb.RevokeSessionResponse()

    # --- MFA ------------------------------------------------------------------------------------------------------

    async def _second_factor(self, zone_id: str, state: asyncpg.Record, code: str, recovery_code: str) -> int | None:
        """Checks a TOTP code (each time step once) or spends a recovery code; returns the recovery codes left
        when one was spent. Raises MFA_CODE_INVALID otherwise."""
        invalid = InvalidArgument(
            "the code is wrong or was used already",
            [("recovery_code" if recovery_code and not code else "code", "a current code from your authenticator")],
            reason=ErrorReason.ERROR_REASON_MFA_CODE_INVALID,
        )
        if code:
            secret = self._settings.pii.decrypt(state["mfa_secret_encrypted"], _mfa_context(state["user_id"]))
            step = mfa.verify_totp(secret, code, time.time(), state["mfa_last_step"])
            if step is None or not await self._store.use_totp_step(zone_id, state["user_id"], step):
                raise invalid
            return None
        if recovery_code:
            try:
                code_hash = mfa.hash_recovery_code(recovery_code)
            except ValueError:
                raise invalid from None
            left = await self._store.use_recovery_code(zone_id, state["user_id"], code_hash)
            if left is None:
                raise invalid
            return left
        raise InvalidArgument("a second factor is required", [("code", "a TOTP code, or a recovery_code")])

    async def VerifyMfaChallenge(
        self,
        request: pb.VerifyMfaChallengeRequest,
        context: UnaryContext[pb.VerifyMfaChallengeRequest, pb.VerifyMfaChallengeResponse],
    ) -> pb.VerifyMfaChallengeResponse:
        zone_id = _request_zone()
        user_id = await self._challenges.find(request.challenge_token, zone_id) if request.challenge_token else None
        if user_id is None:
            raise Unauthenticated(
                "the login challenge is unknown or has expired: log in again",
                reason=ErrorReason.ERROR_REASON_MFA_CHALLENGE_INVALID,
            )
        state = await self._store.mfa_state(zone_id, user_id)
        try:
            left = await self._second_factor(zone_id, state, request.code, request.recovery_code)
        except InvalidArgument:
            await self._challenges.failed(request.challenge_token)
            await self._audit.record(
                "login_failed", "failure", zone_id=zone_id, actor_id=user_id, details={"reason": "mfa_code_invalid"}
            )
            await self._store.record_login_failure(
                zone_id, user_id, accounts.ACCOUNT_LOCK_THRESHOLD, accounts.LOCK_SECONDS
            )
            raise
        if not await self._challenges.close(request.challenge_token):
            raise Unauthenticated(
                "the login challenge was answered already", reason=ErrorReason.ERROR_REASON_MFA_CHALLENGE_INVALID
            )
        user = await self._store.user(TenantScope.zone(zone_id), user_id)
        await self._check_may_sign_in(user)
        await self._store.record_login_success(zone_id, user_id)
        tokens = await self._sign_in(user, context, mfa_verified=True)
        await self._audit_as(
            user,
            "login",
            "success",
            resource_type="session",
            resource_id=tokens["session_id"],
            details={"mfa": "recovery_code" if left is not None else "totp"},
        )
        return pb.VerifyMfaChallengeResponse(
            **tokens,
            user=self._user_message(user, with_personal_data=True),
            recovery_codes_remaining=left if left is not None else state["recovery_codes_left"],
        )

    async def EnrollMfa(
        self, request: pb.EnrollMfaRequest, context: UnaryContext[pb.EnrollMfaRequest, pb.EnrollMfaResponse]
    ) -> pb.EnrollMfaResponse:
        person = require_principal()
        state = await self._store.mfa_state(person.zone_id, person.user_id)
        if state["mfa_enabled"]:
            raise FailedPrecondition("MFA is on already", reason=ErrorReason.ERROR_REASON_MFA_ALREADY_ENABLED)
        if not await passwords.verify_password(request.password, state["password_hash"]):
            raise PermissionDenied("wrong password", reason=ErrorReason.ERROR_REASON_INVALID_CREDENTIALS)
        secret = mfa.new_totp_secret()
        await self._store.set_pending_mfa(
            person.zone_id, person.user_id, self._settings.pii.encrypt(secret, _mfa_context(person.user_id))
        )
        return pb.EnrollMfaResponse(
            secret=secret,
            otpauth_uri=mfa.otpauth_uri(secret, state["email"]),
            expire_time=_timestamp(utcnow() + MFA_ENROLMENT_WINDOW),
        )

    async def ConfirmMfa(
        self, request: pb.ConfirmMfaRequest, context: UnaryContext[pb.ConfirmMfaRequest, pb.ConfirmMfaResponse]
    ) -> pb.ConfirmMfaResponse:
        person = require_principal()
        state = await self._store.mfa_state(person.zone_id, person.user_id)
        if state["mfa_enabled"]:
            raise FailedPrecondition("MFA is on already", reason=ErrorReason.ERROR_REASON_MFA_ALREADY_ENABLED)
        pending = state["mfa_pending_secret_encrypted"]
        if not pending or state["mfa_pending_time"] + MFA_ENROLMENT_WINDOW < utcnow():
            raise FailedPrecondition(
                "start MFA enrolment first (it expires after 10 minutes)",
                reason=ErrorReason.ERROR_REASON_MFA_NOT_ENABLED,
            )
        step = mfa.verify_totp(
            self._settings.pii.decrypt(pending, _mfa_context(person.user_id)), request.code, time.time(), None
        )
        if step is None:
            raise InvalidArgument(
                "the code is wrong",
                [("code", "the current code of the new entry in your authenticator")],
                reason=ErrorReason.ERROR_REASON_MFA_CODE_INVALID,
            )
        codes = mfa.new_recovery_codes()
        await self._store.enable_mfa(
            person.zone_id, person.user_id, pending, step, [mfa.hash_recovery_code(code) for code in codes]
        )
        user = await self._store.user(TenantScope.zone(person.zone_id), person.user_id)
        await self._audit.record("mfa_enabled", "success", resource_type="user", resource_id=person.user_id)
        return pb.ConfirmMfaResponse(recovery_codes=codes, user=self._user_message(user, with_personal_data=True))

    async def DisableMfa(
        self, request: pb.DisableMfaRequest, context: UnaryContext[pb.DisableMfaRequest, pb.DisableMfaResponse]
    ) -> pb.DisableMfaResponse:
        person = require_principal()
        state = await self._store.mfa_state(person.zone_id, person.user_id)
        if not state["mfa_enabled"]:
            raise FailedPrecondition("MFA is off", reason=ErrorReason.ERROR_REASON_MFA_NOT_ENABLED)
        await self._second_factor(person.zone_id, state, request.code, request.recovery_code)
        await self._store.disable_mfa(person.zone_id, person.user_id)
        user = await self._store.user(TenantScope.zone(person.zone_id), person.user_id)
        await self._audit.record("mfa_disabled", "success", resource_type="user", resource_id=person.user_id)
        return pb.DisableMfaResponse(user=self._user_message(user, with_personal_data=True))

    async def RegenerateRecoveryCodes(
        self,
        request: pb.RegenerateRecoveryCodesRequest,
        context: UnaryContext[pb.RegenerateRecoveryCodesRequest, pb.RegenerateRecoveryCodesResponse],
    ) -> pb.RegenerateRecoveryCodesResponse:
        person = require_principal()
        state = await self._store.mfa_state(person.zone_id, person.user_id)
        if not state["mfa_enabled"]:
            raise FailedPrecondition("MFA is off", reason=ErrorReason.ERROR_REASON_MFA_NOT_ENABLED)
        if not request.code:
            raise InvalidArgument("code is required", [("code", "a current code from your authenticator")])
        await self._second_factor(person.zone_id, state, request.code, "")
        codes = mfa.new_recovery_codes()
        await self._store.set_recovery_codes(
            person.zone_id, person.user_id, [mfa.hash_recovery_code(code) for code in codes]
        )
        await self._audit.record(
            "recovery_codes_regenerated", "success", resource_type="user", resource_id=person.user_id
        )
        return pb.RegenerateRecoveryCodesResponse(recovery_codes=codes)

    # --- the caller's own profile and password -------------------------------------------------------------------

    async def UpdateMe(
        self, request: pb.UpdateMeRequest, context: UnaryContext[pb.UpdateMeRequest, pb.UpdateMeResponse]
    ) -> pb.UpdateMeResponse:
        person = require_principal()
        paths = set(request.update_mask.paths) or {"name", "phone_number", "locale"}
        changes = self._profile_changes(request.user, paths, person.user_id, allowed=SELF_UPDATABLE)
        row = await self._store.update_user(_own_scope(person), person.user_id, changes)
        return pb.UpdateMeResponse(user=self._user_message(row, with_personal_data=True))

    def _profile_changes(
        self, user: resources_pb2.User, paths: set[str], user_id: str, *, allowed: frozenset[str]
    ) -> dict[str, object]:
        violations = Violations()
        unknown = paths - allowed
        violations.check(not unknown, "update_mask", f"not updatable here: {', '.join(sorted(unknown))}")
        changes: dict[str, object] = {}
        if "name" in paths:
            changes["name"] = accounts.check_name(violations, user.name, "user.name")
        if "phone_number" in paths:
            phone = _check_phone(violations, user.phone_number, "user.phone_number")
            changes["phone_number_encrypted"] = (
                self._settings.pii.encrypt(phone, _phone_context(user_id)) if phone else ""
            )
        if "locale" in paths:
            violations.check(len(user.locale) <= 35, "user.locale", "a BCP-47 tag")
            changes["locale"] = user.locale
        violations.raise_if_any()
        return changes

    async def ChangePassword(
        self,
        request: pb.ChangePasswordRequest,
        context: UnaryContext[pb.ChangePasswordRequest, pb.ChangePasswordResponse],
    ) -> pb.ChangePasswordResponse:
        person = require_principal()
        row = await self._store.user(_own_scope(person), person.user_id)
        if not await passwords.verify_password(request.current_password, row["password_hash"]):
            raise PermissionDenied("the current password is wrong", reason=ErrorReason.ERROR_REASON_INVALID_CREDENTIALS)
        passwords.check_password_policy(request.new_password, "new_password")
        new_hash = await passwords.hash_password(request.new_password, self._settings.bcrypt_cost)
        await self._store.update_user(_own_scope(person), person.user_id, {"password_hash": new_hash})
        await self._audit.record("password_changed", "success", resource_type="user", resource_id=person.user_id)
        if request.keep_other_sessions:
            return pb.ChangePasswordResponse()
        others = await self._store.other_sessions(_own_scope(person), person.user_id, person.session_id)
        ended = await self._end_sessions(_own_scope(person), person.user_id, others, "password_changed")
        return pb.ChangePasswordResponse(sessions_revoked=ended)

    async def _end_sessions(self, scope: TenantScope, user_id: str, session_ids: list[str] | None, reason: str) -> int:
        """Revokes sessions in PostgreSQL and publishes it to every verifier; the number ended."""
        ended = await self._store.revoke_sessions(scope, user_id, session_ids, reason)
        await self._revocations.revoke_sessions(
            (row["user_id"], row["session_id"], row["revoke_time"]) for row in ended
        )
        return len(ended)

    # --- users of an organisation ---------------------------------------------------------------------------------

    async def _target_user(self, person: AccessClaims, user_id: str) -> asyncpg.Record:
        """A user the administrator may act on: in their scope (else NOT_FOUND) and of a role they could grant."""
        if not user_id:
            raise InvalidArgument("user_id is required", [("user_id", "required")])
        row = await self._store.user(_admin_scope(person), user_id)
        if not accounts.may_grant(person.role, row["role"]) and person.role != "super_admin":
            raise PermissionDenied(
                "this user's role is above yours",
                reason=ErrorReason.ERROR_REASON_ROLE_NOT_ALLOWED,
                metadata={"role": row["role"]},
            )
        return row

    async def _organization_for(self, person: AccessClaims, org_id: str, field: str) -> tenant_resources.Organization:
        """The organisation a new user or invite goes to: an org_admin's own; a zone_admin's pick in their zone; a
        super_admin's pick anywhere."""
        if person.role not in ("zone_admin", "super_admin"):
            if org_id and org_id != person.org_id:
                raise PermissionDenied(
                    "you manage only your organisation", reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE
                )
            org_id = person.org_id
        if not org_id:
            raise InvalidArgument(f"{field} is required", [(field, "the organisation")])
        try:
            organization = await self._organization(org_id)
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                raise NotFound("no such organisation") from None
            raise
        if person.role != "super_admin" and organization.zone_id != person.zone_id:
            raise NotFound("no such organisation")
        return organization

    def _grantable_role(self, person: AccessClaims, role: resources_pb2.Role.ValueType, field: str) -> str:
        try:
            name = role_name(role)
        except ValueError:
            raise InvalidArgument(f"{field} is required", [(field, "a role")]) from None
        if not accounts.may_grant(person.role, name):
            raise PermissionDenied(
                f"a {person.role} may not grant the role {name}",
                reason=ErrorReason.ERROR_REASON_ROLE_NOT_ALLOWED,
                metadata={"role": name},
            )
        return name

    async def ListUsers(
        self, request: pb.ListUsersRequest, context: UnaryContext[pb.ListUsersRequest, pb.ListUsersResponse]
    ) -> pb.ListUsersResponse:
        person = require_principal()
        filters: dict[str, str] = {}
        if request.org_id:
            filters["org_id"] = request.org_id
        if request.role:
            try:
                filters["role"] = role_name(request.role)
            except ValueError:
                raise InvalidArgument("role is not a known role", [("role", "a Role value")]) from None
        if request.status:
            filters["status"] = "active" if request.status == resources_pb2.USER_STATUS_ACTIVE else "deactivated"
        if len(request.query) > 200:
            raise InvalidArgument("query is too long", [("query", "at most 200 characters")])
        limit = paging.page_size(request.page_size, MAX_PAGE)
        query = ["users", sorted(filters.items()), request.query]
        position = paging.decode(request.page_token, query)
        after = str(position[0]) if position else None
        rows, total = await self._store.users(_admin_scope(person), filters, request.query, after, limit + 1)
        next_token = paging.encode([rows[limit - 1]["user_id"]], query) if len(rows) > limit else ""
        return pb.ListUsersResponse(
            users=[self._user_message(row, with_personal_data=False) for row in rows[:limit]],
            next_page_token=next_token,
            total_size=total,
        )

    async def GetUser(
        self, request: pb.GetUserRequest, context: UnaryContext[pb.GetUserRequest, pb.GetUserResponse]
    ) -> pb.GetUserResponse:
        person = require_principal()
        if not request.user_id:
            raise InvalidArgument("user_id is required", [("user_id", "required")])
        row = await self._store.user(_admin_scope(person), request.user_id)
        return pb.GetUserResponse(user=self._user_message(row, with_personal_data=True))

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: UnaryContext[pb.CreateUserRequest, pb.CreateUserResponse]
    ) -> pb.CreateUserResponse:
        person = require_principal()
        role = self._grantable_role(person, request.user.role, "user.role")
        violations = Violations()
        email = accounts.check_email(violations, request.user.email, "user.email")
        name = accounts.check_name(violations, request.user.name, "user.name")
        phone = _check_phone(violations, request.user.phone_number, "user.phone_number")
        violations.check(len(request.user.locale) <= 35, "user.locale", "a BCP-47 tag")
        violations.raise_if_any()
        passwords.check_password_policy(request.password)
        organization = await self._organization_for(person, request.user.org_id, "user.org_id")
        user_id = accounts.new_id()
        row = await self._store.create_user(
            NewUser(
                user_id=user_id,
                zone_id=organization.zone_id,
                org_id=organization.id,
                email=email,
                name=name,
                role=role,
                password_hash=await passwords.hash_password(request.password, self._settings.bcrypt_cost),
                phone_number_encrypted=self._settings.pii.encrypt(phone, _phone_context(user_id)) if phone else "",
                locale=request.user.locale,
            )
        )
        await self._audit.record(
            "create",
            "success",
            resource_type="user",
            resource_id=user_id,
            details={"role": role, "org_id": organization.id},
        )
        return pb.CreateUserResponse(user=self._user_message(row, with_personal_data=True))

    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: UnaryContext[pb.UpdateUserRequest, pb.UpdateUserResponse]
    ) -> pb.UpdateUserResponse:
        person = require_principal()
        target = await self._target_user(person, request.user_id)
        paths = set(request.update_mask.paths) or {"name", "phone_number", "locale"}
        changes = self._profile_changes(
            request.user, paths - {"role", "org_id"}, target["user_id"], allowed=SELF_UPDATABLE
        )
        unknown = paths - SELF_UPDATABLE - {"role", "org_id"}
        if unknown:
            raise InvalidArgument(
                "update_mask names fields that cannot change", [("update_mask", ", ".join(sorted(unknown)))]
            )
        if ("role" in paths or "org_id" in paths) and target["user_id"] == person.user_id:
            raise PermissionDenied(
                "you cannot change your own role or organisation", reason=ErrorReason.ERROR_REASON_ROLE_NOT_ALLOWED
            )
        if "role" in paths:
            changes["role"] = self._grantable_role(person, request.user.role, "user.role")
        if "org_id" in paths:
            if person.role not in ("zone_admin", "super_admin"):
                raise PermissionDenied(
                    "only zone administrators move users between organisations",
                    reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE,
                )
            organization = await self._organization_for(person, request.user.org_id, "user.org_id")
            if organization.zone_id != target["zone_id"]:
                raise InvalidArgument(
                    "users stay in their zone", [("user.org_id", "an organisation of the user's zone")]
                )
            changes["org_id"] = organization.id
        row = await self._store.update_user(_admin_scope(person), target["user_id"], changes)
        changed = sorted(paths & (SELF_UPDATABLE | {"role", "org_id"}))
        if "role" in paths and target["role"] != row["role"]:
            await self._audit.record(
                "role_change",
                "success",
                resource_type="user",
                resource_id=target["user_id"],
                details={"from": target["role"], "to": row["role"]},
            )
        if "org_id" in paths and target["org_id"] != row["org_id"]:
            await self._audit.record(
                "org_change",
                "success",
                resource_type="user",
                resource_id=target["user_id"],
                details={"from": target["org_id"], "to": row["org_id"]},
            )
        await self._audit.record(
            "update", "success", resource_type="user", resource_id=target["user_id"], details={"fields": changed}
        )
        if {"role", "org_id"} & paths:
            # Live tokens carry the old role or organisation: the user signs in again.
            await self._end_sessions(_admin_scope(person), target["user_id"], None, "role_or_org_changed")
        return pb.UpdateUserResponse(user=self._user_message(row, with_personal_data=True))

    async def DeactivateUser(
        self,
        request: pb.DeactivateUserRequest,
        context: UnaryContext[pb.DeactivateUserRequest, pb.DeactivateUserResponse],
    ) -> pb.DeactivateUserResponse:
        person = require_principal()
        target = await self._target_user(person, request.user_id)
        if target["user_id"] == person.user_id:
            raise PermissionDenied("you cannot deactivate yourself", reason=ErrorReason.ERROR_REASON_ROLE_NOT_ALLOWED)
        row = await self._store.update_user(_admin_scope(person), target["user_id"], {"status": "deactivated"})
        await self._end_sessions(_admin_scope(person), target["user_id"], None, "deactivated")
        await self._audit.record(
            "deactivate",
            "success",
            resource_type="user",
            resource_id=target["user_id"],
            details={"reason": request.reason[:500]},
        )
        return pb.DeactivateUserResponse(user=self._user_message(row, with_personal_data=False))

    async def ReactivateUser(
        self,
        request: pb.ReactivateUserRequest,
        context: UnaryContext[pb.ReactivateUserRequest, pb.ReactivateUserResponse],
    ) -> pb.ReactivateUserResponse:
        person = require_principal()
        target = await self._target_user(person, request.user_id)
        row = await self._store.update_user(_admin_scope(person), target["user_id"], {"status": "active"})
        await self._audit.record("reactivate", "success", resource_type="user", resource_id=target["user_id"])
        return pb.ReactivateUserResponse(user=self._user_message(row, with_personal_data=False))

    async def SetUserPassword(
        self,
        request: pb.SetUserPasswordRequest,
        context: UnaryContext[pb.SetUserPasswordRequest, pb.SetUserPasswordResponse],
    ) -> pb.SetUserPasswordResponse:
        person = require_principal()
        target = await self._target_user(person, request.user_id)
        passwords.check_password_policy(request.new_password, "new_password")
        new_hash = await passwords.hash_password(request.new_password, self._settings.bcrypt_cost)
        changes = {"password_hash": new_hash, "failed_logins": 0, "locked_until": None}
        await self._store.update_user(_admin_scope(person), target["user_id"], changes)
        ended = await self._end_sessions(_admin_scope(person), target["user_id"], None, "password_reset")
        await self._audit.record("password_reset", "success", resource_type="user", resource_id=target["user_id"])
        return pb.SetUserPasswordResponse(sessions_revoked=ended)

    # --- invite codes -----------------------------------------------------------------------------------------------

    async def CreateInviteCode(
        self,
        request: pb.CreateInviteCodeRequest,
        context: UnaryContext[pb.CreateInviteCodeRequest, pb.CreateInviteCodeResponse],
    ) -> pb.CreateInviteCodeResponse:
        person = require_principal()
        invite = request.invite_code
        role = self._grantable_role(person, invite.role, "invite_code.role")
        violations = Violations()
        violations.check(0 <= invite.max_uses <= 10_000, "invite_code.max_uses", "0 (one use) to 10000")
        violations.check(len(invite.note) <= 500, "invite_code.note", "at most 500 characters")
        expire = invite.expire_time.ToDatetime(UTC) if invite.HasField("expire_time") else None
        violations.check(expire is None or expire > utcnow(), "invite_code.expire_time", "in the future")
        violations.raise_if_any()
        organization = await self._organization_for(person, invite.org_id, "invite_code.org_id")
        code = accounts.new_invite_code()
        row = await self._store.create_invite(
            NewInvite(
                invite_code_id=accounts.new_id(),
                code_hash=accounts.invite_code_hash(code),
                zone_id=organization.zone_id,
                org_id=organization.id,
                role=role,
                max_uses=invite.max_uses or 1,
                expire_time=expire,
                note=invite.note,
                creator_id=person.user_id,
            )
        )
        created = _invite_message(row)
        created.code = code  # shown once: only its hash is stored
        await self._audit.record(
            "create",
            "success",
            resource_type="invite_code",
            resource_id=created.id,
            details={"role": role, "org_id": organization.id, "max_uses": created.max_uses},
        )
        return pb.CreateInviteCodeResponse(invite_code=created)

    async def ListInviteCodes(
        self,
        request: pb.ListInviteCodesRequest,
        context: UnaryContext[pb.ListInviteCodesRequest, pb.ListInviteCodesResponse],
    ) -> pb.ListInviteCodesResponse:
        person = require_principal()
        limit = paging.page_size(request.page_size, MAX_PAGE)
        query = ["invite_codes", request.org_id]
        position = paging.decode(request.page_token, query)
        after = str(position[0]) if position else None
        rows = await self._store.invites(_admin_scope(person), request.org_id or None, after, limit + 1)
        next_token = paging.encode([rows[limit - 1]["invite_code_id"]], query) if len(rows) > limit else ""
        invites = [_invite_message(row) for row in rows[:limit]]
        if request.status:
            invites = [invite for invite in invites if invite.status == request.status]
        return pb.ListInviteCodesResponse(invite_codes=invites, next_page_token=next_token)

    async def RevokeInviteCode(
        self,
        request: pb.RevokeInviteCodeRequest,
        context: UnaryContext[pb.RevokeInviteCodeRequest, pb.RevokeInviteCodeResponse],
    ) -> pb.RevokeInviteCodeResponse:
        person = require_principal()
        if not request.invite_code_id:
            raise InvalidArgument("invite_code_id is required", [("invite_code_id", "required")])
        row = await self._store.revoke_invite(_admin_scope(person), request.invite_code_id)
        await self._audit.record("revoke", "success", resource_type="invite_code", resource_id=request.invite_code_id)
        return pb.RevokeInviteCodeResponse(invite_code=_invite_message(row))

    # --- parents and students ---------------------------------------------------------------------------------------

    async def RequestParentLink(
        self,
        request: pb.RequestParentLinkRequest,
        context: UnaryContext[pb.RequestParentLinkRequest, pb.RequestParentLinkResponse],
    ) -> pb.RequestParentLinkResponse:
        person = require_principal()
        if person.role != "parent":
            raise PermissionDenied("only parents link to students", reason=ErrorReason.ERROR_REASON_ROLE_NOT_ALLOWED)
        if not request.student_email.strip():
            raise InvalidArgument("student_email is required", [("student_email", "required")])
        student = await self._store.user_by_email(person.zone_id, request.student_email)
        if student is None or student["role"] != "student" or student["status"] != "active":
            raise NotFound("no student with this email in this zone")
        row = await self._store.request_link(person.zone_id, person.user_id, student)
        await self._audit.record(
            "parent_link",
            "success",
            resource_type="parent_link",
            resource_id=row["link_id"],
            details={"event": "requested", "student_id": student["user_id"]},
        )
        return pb.RequestParentLinkResponse(link=_link_message(row))

    async def ListParentLinks(
        self,
        request: pb.ListParentLinksRequest,
        context: UnaryContext[pb.ListParentLinksRequest, pb.ListParentLinksResponse],
    ) -> pb.ListParentLinksResponse:
        person = require_principal()
        parent_id = student_id = None
        if person.role == "parent":
            parent_id, scope = person.user_id, TenantScope.zone(person.zone_id)
        elif person.role == "student":
            student_id, scope = person.user_id, TenantScope.zone(person.zone_id)
        elif grants(person.permissions, "student:read") or grants(person.permissions, "user:read"):
            student_id, scope = request.student_id or None, _admin_scope(person)
        else:
            raise PermissionDenied("your role sees no parent links", reason=ErrorReason.ERROR_REASON_ROLE_NOT_ALLOWED)
        if request.student_id and student_id != request.student_id:
            raise PermissionDenied("you may list only your own links", reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE)
        status = LINK_STATUSES.get(request.status) if request.status else None
        limit = paging.page_size(request.page_size, MAX_PAGE)
        query = ["parent_links", parent_id, student_id, status]
        position = paging.decode(request.page_token, query)
        after = str(position[0]) if position else None
        rows = await self._store.links(
            scope, parent_id=parent_id, student_id=student_id, status=status, after=after, limit=limit + 1
        )
        next_token = paging.encode([rows[limit - 1]["link_id"]], query) if len(rows) > limit else ""
        return pb.ListParentLinksResponse(
            links=[_link_message(row) for row in rows[:limit]], next_page_token=next_token
        )

    async def _decide(self, parent_id: str, decision: str) -> asyncpg.Record:
        person = require_principal()
        if person.role != "student":
            raise PermissionDenied("only the student decides", reason=ErrorReason.ERROR_REASON_ROLE_NOT_ALLOWED)
        if not parent_id:
            raise InvalidArgument("parent_id is required", [("parent_id", "required")])
        row = await self._store.decide_link(person.zone_id, person.user_id, parent_id, decision)
        await self._audit.record(
            "parent_link",
            "success",
            resource_type="parent_link",
            resource_id=row["link_id"],
            details={"event": decision, "parent_id": parent_id},
        )
        return row

    async def ApproveParentLink(
        self,
        request: pb.ApproveParentLinkRequest,
        context: UnaryContext[pb.ApproveParentLinkRequest, pb.ApproveParentLinkResponse],
    ) -> pb.ApproveParentLinkResponse:
        return pb.ApproveParentLinkResponse(link=_link_message(await self._decide(request.parent_id, "approved")))

    async def RejectParentLink(
        self,
        request: pb.RejectParentLinkRequest,
        context: UnaryContext[pb.RejectParentLinkRequest, pb.RejectParentLinkResponse],
    ) -> pb.RejectParentLinkResponse:
        return pb.RejectParentLinkResponse(link=_link_message(await self._decide(request.parent_id, "rejected")))

    async def UnlinkParent(
        self, request: pb.UnlinkParentRequest, context: UnaryContext[pb.UnlinkParentRequest, pb.UnlinkParentResponse]
    ) -> pb.UnlinkParentResponse:
        person = require_principal()
        if not request.link_id:
            raise InvalidArgument("link_id is required", [("link_id", "required")])
        row = await self._store.unlink(person.zone_id, request.link_id, person.user_id)
        await self._audit.record(
            "parent_link",
            "success",
            resource_type="parent_link",
            resource_id=row["link_id"],
            details={"event": "unlinked"},
        )
        return pb.UnlinkParentResponse(link=_link_message(row))

    async def CheckParentLink(
        self,
        request: pb.CheckParentLinkRequest,
        context: UnaryContext[pb.CheckParentLinkRequest, pb.CheckParentLinkResponse],
    ) -> pb.CheckParentLinkResponse:
        violations = Violations()
        violations.check(bool(request.parent_id), "parent_id", "required")
        violations.check(bool(request.student_id), "student_id", "required")
        violations.raise_if_any()
        row = await self._store.approved_link(request.parent_id, request.student_id)
        if row is None:
            return pb.CheckParentLinkResponse(approved=False)
        return pb.CheckParentLinkResponse(approved=True, link=_link_message(row))

    # --- audit trail ------------------------------------------------------------------------------------------------

    async def WriteAuditRecord(
        self,
        request: pb.WriteAuditRecordRequest,
        context: UnaryContext[pb.WriteAuditRecordRequest, pb.WriteAuditRecordResponse],
    ) -> pb.WriteAuditRecordResponse:
        draft = audit.draft_from_message(request.record, actor_service=current_caller())
        entry = await self._audit_log.append(draft)
        return pb.WriteAuditRecordResponse(record=audit.to_message(entry))

    async def ListAuditLogs(
        self, request: pb.ListAuditLogsRequest, context: UnaryContext[pb.ListAuditLogsRequest, pb.ListAuditLogsResponse]
    ) -> pb.ListAuditLogsResponse:
        person = require_principal()
        violations = Violations()
        since = request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None
        until = request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None
        violations.check(since is None or until is None or since <= until, "end_time", "not before start_time")
        violations.check(len(request.action) <= 64, "action", "at most 64 characters")
        violations.raise_if_any()
        limit = paging.page_size(request.page_size, MAX_AUDIT_PAGE)
        query = ["audit", sorted(_audit_filters(request).items()), str(since), str(until)]
        position = paging.decode(request.page_token, query)
        cursor = (str(position[0]), int(position[1])) if position and len(position) == 2 else None
        scope = TenantScope.platform() if person.role == "super_admin" else TenantScope.zone(person.zone_id)
        entries = await self._audit_log.page(
            scope,
            zone_id=None if person.role == "super_admin" else person.zone_id,
            since=since,
            until=until,
            equal=_audit_filters(request),
            before_sequence=cursor,
            limit=limit + 1,
        )
        next_token = ""
        if len(entries) > limit:
            last = entries[limit - 1]
            next_token = paging.encode([last.zone_id, last.sequence], query)
        return pb.ListAuditLogsResponse(
            records=[audit.to_message(entry) for entry in entries[:limit]], next_page_token=next_token
        )

    async def VerifyAuditChain(
        self,
        request: pb.VerifyAuditChainRequest,
        context: UnaryContext[pb.VerifyAuditChainRequest, pb.VerifyAuditChainResponse],
    ) -> pb.VerifyAuditChainResponse:
        person = require_principal()
        zone_id = request.zone_id or person.zone_id
        if zone_id != person.zone_id and person.role != "super_admin":
            raise PermissionDenied("you audit only your zone", reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE)
        result = await self._audit_log.verify(zone_id)
        reply = pb.VerifyAuditChainResponse(
            intact=result.intact, records_checked=result.records_checked, zone_id=zone_id
        )
        if result.first_break is not None:
            reply.first_broken_record.CopyFrom(audit.to_message(result.first_break.entry))
            reply.failure = result.first_break.failure.value
        return reply

    # --- internal -------------------------------------------------------------------------------------------------

    async def RevokeOrganizationSessions(
        self,
        request: pb.RevokeOrganizationSessionsRequest,
        context: UnaryContext[pb.RevokeOrganizationSessionsRequest, pb.RevokeOrganizationSessionsResponse],
    ) -> pb.RevokeOrganizationSessionsResponse:
        violations = Violations()
        violations.check(bool(request.org_id), "org_id", "required")
        violations.check(0 < len(request.reason) <= 64, "reason", "required, at most 64 characters")
        violations.raise_if_any()
        ended = await self._store.revoke_organization_sessions(request.org_id, request.reason)
        await self._revocations.revoke_sessions(
            (row["user_id"], row["session_id"], row["revoke_time"]) for row in ended
        )
        return pb.RevokeOrganizationSessionsResponse(sessions_revoked=len(ended))

    async def LookupUser(
        self, request: pb.LookupUserRequest, context: UnaryContext[pb.LookupUserRequest, pb.LookupUserResponse]
    ) -> pb.LookupUserResponse:
        if not request.user_id:
            raise InvalidArgument("user_id is required", [("user_id", "required")])
        row = await self._store.user(TenantScope.platform(), request.user_id)
        return pb.LookupUserResponse(user=self._user_message(row, with_personal_data=False))


SELF_UPDATABLE = frozenset({"name", "phone_number", "locale"})
LINK_STATUSES = {
    resources_pb2.PARENT_LINK_STATUS_PENDING: "pending",
    resources_pb2.PARENT_LINK_STATUS_APPROVED: "approved",
    resources_pb2.PARENT_LINK_STATUS_REJECTED: "rejected",
    resources_pb2.PARENT_LINK_STATUS_UNLINKED: "unlinked",
}
LINK_STATUS_VALUES = {name: value for value, name in LINK_STATUSES.items()}


def _audit_filters(request: pb.ListAuditLogsRequest) -> dict[str, str]:
    wanted = {
        "actor_id": request.user_id,
        "action": request.action,
        "resource_type": request.resource_type,
        "resource_id": request.resource_id,
        "org_id": request.org_id,
        "outcome": audit.OUTCOMES.get(request.outcome, "") if request.outcome else "",
    }
    return {column: value for column, value in wanted.items() if value}


def _own_scope(person: AccessClaims) -> TenantScope:
    return TenantScope.org(person.zone_id, person.org_id)


def _admin_scope(person: AccessClaims) -> TenantScope:
    return accounts.admin_scope(person.role, person.zone_id, person.org_id)


def _check_phone(violations: Violations, phone: str, field: str) -> str:
    phone = phone.strip()
    violations.check(
        not phone or (phone.startswith("+") and set(phone) <= _PHONE_CHARS and 8 <= len(phone) <= 16),
        field,
        "E.164, e.g. +821012345678",
    )
    return phone


def _invite_message(row: asyncpg.Record) -> resources_pb2.InviteCode:
    now = utcnow()
    if row["revoke_time"] is not None:
        status = resources_pb2.INVITE_CODE_STATUS_REVOKED
    elif row["expire_time"] is not None and row["expire_time"] <= now:
        status = resources_pb2.INVITE_CODE_STATUS_EXPIRED
    elif row["use_count"] >= row["max_uses"]:
        status = resources_pb2.INVITE_CODE_STATUS_EXHAUSTED
    else:
        status = resources_pb2.INVITE_CODE_STATUS_ACTIVE
    return resources_pb2.InviteCode(
        id=row["invite_code_id"],
        zone_id=row["zone_id"],
        org_id=row["org_id"],
        role=role_value(row["role"]),
        max_uses=row["max_uses"],
        use_count=row["use_count"],
        expire_time=_timestamp(row["expire_time"]),
        note=row["note"],
        status=status,
        creator_id=row["creator_id"],
        create_time=_timestamp(row["create_time"]),
    )


def _link_message(row: asyncpg.Record) -> resources_pb2.ParentLink:
    return resources_pb2.ParentLink(
        id=row["link_id"],
        zone_id=row["zone_id"],
        parent_id=row["parent_id"],
        parent_name=row["parent_name"],
        parent_email=row["parent_email"],
        student_id=row["student_id"],
        student_name=row["student_name"],
        student_email=row["student_email"],
        status=LINK_STATUS_VALUES[row["status"]],
        request_time=_timestamp(row["request_time"]),
        decide_time=_timestamp(row["decide_time"]),
        unlink_time=_timestamp(row["unlink_time"]),
    )


def _mfa_context(user_id: str) -> str:
    return f"auth.users.mfa_secret:{user_id}"


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
    keys = SigningKeys(
        store,
        settings.pii,
        settings.signing_key_rotation_seconds,
        settings.access_token_seconds,
        settings.signing_key_announce_seconds,
    )
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

    audit_log = AuditLog(deps.database)

    async def append_locally(record: resources_pb2.AuditRecord) -> None:
        await audit_log.append(audit.draft_from_message(record, actor_service="auth"))

    deps.audit = Auditor(append_locally)
    deps.probes["signing_keys"] = keys_loaded
    deps.probes["revocations"] = revocations_in_redis
    deps.jwks_source = own_jwks
    tenant = tenant_service_pb2_grpc.TenantServiceStub(deps.channels.channel("tenant"))
    servicer = AuthServicer(
        store,
        keys,
        revocations,
        settings,
        tenant,
        ClientFailures(deps.redis),
        MfaChallenges(deps.redis),
        audit_log,
        deps.audit,
    )
    return [ServicerBinding(auth_service_pb2_grpc.add_AuthServiceServicer_to_server, servicer)]
