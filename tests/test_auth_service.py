"""The auth service over mTLS with real PostgreSQL and Redis: accounts, login, tokens, sessions, revocation."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from megacity.auth.v1 import auth_service_pb2 as pb
from megacity.auth.v1 import auth_service_pb2_grpc, resources_pb2
from services.auth import mfa
from services.auth.accounts import ACCOUNT_LOCK_THRESHOLD
from services.runtime.authn import REVOCATIONS_READY_KEY
from services.runtime.errors import error_info, field_violations, status_from_error
from tests.support.accounts import PASSWORD, Caller, People, reason
from tests.support.mesh import channel_as, running


async def _register(
    people: People, zone: str = "univ", email: str = "mina@example.com"
) -> tuple[Caller, pb.RegisterResponse]:
    caller = Caller(zone)
    reply = await people.auth.Register(
        pb.RegisterRequest(email=email, password=PASSWORD, name="Mina", phone_number="+821012345678"),
        metadata=caller.metadata(),
    )
    caller.token = reply.access_token
    return caller, reply


async def _fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call  # type: ignore[misc]
    return failure.value


async def test_register_signs_in_a_student_of_the_zones_public_org(people: People) -> None:
    caller, reply = await _register(people)
    assert reply.token_type == "Bearer"
    assert reply.expires_in == 900
    assert reply.user.role == resources_pb2.ROLE_STUDENT
    assert (reply.user.zone_id, reply.user.org_id) == ("univ", "univ-public")
    me = (await people.auth.GetMe(pb.GetMeRequest(), metadata=caller.metadata())).user
    assert (me.email, me.phone_number) == ("mina@example.com", "+821012345678")
    assert "attempt:create" in me.permissions
    # The token carries the published claims.
    payload = json.loads(base64.urlsafe_b64decode(reply.access_token.split(".")[1] + "=="))
    assert {"sub", "email", "zone_id", "org_id", "role", "permissions", "iat", "exp", "jti"} <= set(payload)
    assert payload["exp"] - payload["iat"] == 900


async def test_the_phone_number_is_encrypted_at_rest(people: People) -> None:
    await _register(people)
    connection = await asyncpg.connect(people.auth_url)
    try:
        await connection.execute("SELECT set_config('megacity.scope', 'platform', false)")
        stored = await connection.fetchval("SELECT phone_number_encrypted FROM auth.users")
    finally:
        await connection.close()
    assert stored.startswith("v1.test.")
    assert "12345678" not in stored


async def test_a_weak_password_names_the_rule_it_breaks(people: People) -> None:
    error = await _fails(
        people.auth.Register(
            pb.RegisterRequest(email="a@example.com", password="alllowercase1!", name="A"),
            metadata=Caller("univ").metadata(),
        )
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(status_from_error(error))
    assert info is not None
    assert (info.reason, info.metadata["rule"]) == ("PASSWORD_TOO_WEAK", "uppercase")
    assert [field for field, _ in field_violations(status_from_error(error))] == ["password"]


async def test_email_is_unique_per_zone_case_insensitively(people: People) -> None:
    await _register(people, email="Mina@Example.com")
    error = await _fails(_register(people, email="mina@example.COM"))
    assert (error.code(), reason(error)) == (grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN")
    _, other_zone = await _register(people, zone="kzone", email="mina@example.com")
    assert other_zone.user.zone_id == "kzone"


async def test_a_request_without_a_zone_is_refused(people: People) -> None:
    error = await _fails(people.auth.Login(pb.LoginRequest(email="a@example.com", password=PASSWORD)))
    assert (error.code(), reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "UNKNOWN_ZONE")


async def test_wrong_email_and_wrong_password_answer_the_same(people: People) -> None:
    await _register(people)
    caller = Caller("univ")
    wrong_password = await _fails(
        people.auth.Login(
            pb.LoginRequest(email="mina@example.com", password="Wrong-pass-1"), metadata=caller.metadata()
        )
    )
    unknown_email = await _fails(
        people.auth.Login(pb.LoginRequest(email="nobody@example.com", password=PASSWORD), metadata=caller.metadata())
    )
    for error in (wrong_password, unknown_email):
        assert (error.code(), reason(error)) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    assert wrong_password.details() == unknown_email.details()
    # The same account in another zone does not exist: zones are separate user bases.
    other_zone = await _fails(
        people.auth.Login(
            pb.LoginRequest(email="mina@example.com", password=PASSWORD), metadata=Caller("kzone").metadata()
        )
    )
    assert reason(other_zone) == "INVALID_CREDENTIALS"


async def test_repeated_failures_lock_the_account_even_for_the_right_password(people: People) -> None:
    await _register(people)
    for _ in range(ACCOUNT_LOCK_THRESHOLD - 1):
        error = await _fails(
            people.auth.Login(
                pb.LoginRequest(email="mina@example.com", password="Wrong-pass-1"), metadata=Caller("univ").metadata()
            )
        )
        assert reason(error) == "INVALID_CREDENTIALS"
    locking = await _fails(
        people.auth.Login(
            pb.LoginRequest(email="mina@example.com", password="Wrong-pass-1"), metadata=Caller("univ").metadata()
        )
    )
    assert (locking.code(), reason(locking)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "ACCOUNT_LOCKED")
    info = error_info(status_from_error(locking))
    assert info is not None
    assert 800 <= int(info.metadata["retry_after_seconds"]) <= 900
    right = await _fails(
        people.auth.Login(
            pb.LoginRequest(email="mina@example.com", password=PASSWORD), metadata=Caller("univ").metadata()
        )
    )
    assert reason(right) == "ACCOUNT_LOCKED"


async def test_one_client_failing_on_many_accounts_is_locked_out(people: People) -> None:
    client = Caller("univ")
    for attempt in range(20):
        error = await _fails(
            people.auth.Login(
                pb.LoginRequest(email=f"guess{attempt}@example.com", password="Wrong-pass-1"),
                metadata=client.metadata(),
            )
        )
    assert reason(error) == "ACCOUNT_LOCKED"
    # Another client is not affected.
    await _register(people)
    await people.sign_in("univ", "mina@example.com")


async def test_refresh_rotates_and_reuse_revokes_the_family(people: People) -> None:
    caller, registered = await _register(people)
    rotated = await people.auth.Refresh(
        pb.RefreshRequest(refresh_token=registered.refresh_token), metadata=caller.metadata()
    )
    assert rotated.refresh_token != registered.refresh_token
    assert rotated.session_id == registered.session_id
    fresh = Caller("univ", token=rotated.access_token)
    await people.auth.GetMe(pb.GetMeRequest(), metadata=fresh.metadata())
    # The first token again: someone holds a copy. The whole session ends, including the thief's successor.
    reuse = await _fails(
        people.auth.Refresh(pb.RefreshRequest(refresh_token=registered.refresh_token), metadata=caller.metadata())
    )
    assert (reuse.code(), reason(reuse)) == (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")
    successor = await _fails(
        people.auth.Refresh(pb.RefreshRequest(refresh_token=rotated.refresh_token), metadata=caller.metadata())
    )
    assert reason(successor) == "TOKEN_REVOKED"
    for token in (registered.access_token, rotated.access_token):
        denied = await _fails(people.auth.GetMe(pb.GetMeRequest(), metadata=Caller("univ", token=token).metadata()))
        assert (denied.code(), reason(denied)) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")


async def test_an_unknown_refresh_token_is_refused(people: People) -> None:
    error = await _fails(
        people.auth.Refresh(pb.RefreshRequest(refresh_token="made-up"), metadata=Caller("univ").metadata())
    )
    assert (error.code(), reason(error)) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_logout_revokes_the_access_token_and_the_refresh_family(people: People) -> None:
    caller, registered = await _register(people)
    other = await people.sign_in("univ", "mina@example.com")
    reply = await people.auth.Logout(pb.LogoutRequest(), metadata=caller.metadata())
    assert reply.sessions_revoked == 1
    error = await _fails(people.auth.GetMe(pb.GetMeRequest(), metadata=caller.metadata()))
    assert reason(error) == "TOKEN_REVOKED"
    refresh = await _fails(
        people.auth.Refresh(pb.RefreshRequest(refresh_token=registered.refresh_token), metadata=caller.metadata())
    )
    assert reason(refresh) == "TOKEN_REVOKED"
    redis = Redis.from_url(people.redis_url)
    try:
        jti = json.loads(base64.urlsafe_b64decode(caller.token.split(".")[1] + "=="))["jti"]
        assert 800 < await redis.ttl(f"blacklist:{jti}") <= 931
    finally:
        await redis.aclose()
    # The other session lives on, until logout everywhere.
    await people.auth.GetMe(pb.GetMeRequest(), metadata=other.metadata())
    everywhere = await people.auth.Logout(pb.LogoutRequest(all_sessions=True), metadata=other.metadata())
    assert everywhere.sessions_revoked == 1
    assert reason(await _fails(people.auth.GetMe(pb.GetMeRequest(), metadata=other.metadata()))) == "TOKEN_REVOKED"


async def test_sessions_are_listed_and_revocable(people: People) -> None:
    caller, registered = await _register(people)
    second = await people.sign_in("univ", "mina@example.com")
    listed = (await people.auth.ListSessions(pb.ListSessionsRequest(), metadata=caller.metadata())).sessions
    assert [s.id for s in listed][::-1][0] == registered.session_id
    assert {s.current for s in listed} == {True, False}
    assert all(s.ip_address == caller.address for s in listed if s.current)
    await people.auth.RevokeSession(
        pb.RevokeSessionRequest(session_id=registered.session_id), metadata=second.metadata()
    )
    assert reason(await _fails(people.auth.GetMe(pb.GetMeRequest(), metadata=caller.metadata()))) == "TOKEN_REVOKED"
    missing = await _fails(
        people.auth.RevokeSession(pb.RevokeSessionRequest(session_id="nope"), metadata=second.metadata())
    )
    assert missing.code() is grpc.StatusCode.NOT_FOUND


def _forged(header: dict[str, object], payload: dict[str, object], signature: bytes = b"") -> str:
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    return ".".join([part(json.dumps(header).encode()), part(json.dumps(payload).encode()), part(signature)])


async def test_bad_tokens_are_refused_by_the_service(people: People) -> None:
    caller, registered = await _register(people)
    claims = json.loads(base64.urlsafe_b64decode(registered.access_token.split(".")[1] + "=="))
    cases = {
        "": "TOKEN_MISSING",
        "garbage": "TOKEN_INVALID",
        _forged({"alg": "none", "typ": "JWT"}, claims): "TOKEN_INVALID",
        _forged({"alg": "EdDSA", "typ": "JWT", "kid": "unknown"}, claims, b"x" * 64): "TOKEN_INVALID",
        registered.access_token[:-4] + "AAAA": "TOKEN_INVALID",
    }
    for token, expected in cases.items():
        error = await _fails(people.auth.GetMe(pb.GetMeRequest(), metadata=Caller("univ", token=token).metadata()))
        assert (error.code(), reason(error)) == (grpc.StatusCode.UNAUTHENTICATED, expected), token
    mismatch = await _fails(
        people.auth.GetMe(pb.GetMeRequest(), metadata=Caller("kzone", token=caller.token).metadata())
    )
    assert (mismatch.code(), reason(mismatch)) == (grpc.StatusCode.PERMISSION_DENIED, "ZONE_MISMATCH")


async def test_a_role_without_the_declared_permission_is_denied(people: People) -> None:
    caller, _ = await _register(people)
    error = await _fails(people.auth.ListUsers(pb.ListUsersRequest(), metadata=caller.metadata()))
    assert (error.code(), reason(error)) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING")
    info = error_info(status_from_error(error))
    assert info is not None
    assert info.metadata["permission"] == "user:read"


async def test_revocations_survive_redis_losing_its_data(people: People) -> None:
    caller, _ = await _register(people)
    await people.auth.Logout(pb.LogoutRequest(), metadata=caller.metadata())
    redis = Redis.from_url(people.redis_url)
    try:
        await redis.flushall()
        # Until the auth service has restored them, nobody's token is accepted (fails closed)...
        live = await people.sign_in("univ", "mina@example.com")
        for _ in range(100):
            if await redis.exists(REVOCATIONS_READY_KEY):
                break
            await asyncio.sleep(0.05)
        assert await redis.exists(REVOCATIONS_READY_KEY)
    finally:
        await redis.aclose()
    # ...and afterwards the logged-out token is still revoked, the live one works.
    assert reason(await _fails(people.auth.GetMe(pb.GetMeRequest(), metadata=caller.metadata()))) == "TOKEN_REVOKED"
    await people.auth.GetMe(pb.GetMeRequest(), metadata=live.metadata())


async def test_jwks_publishes_the_signing_key(people: People) -> None:
    _, registered = await _register(people)
    keys = (await people.auth.GetJwks(pb.GetJwksRequest())).keys
    header = json.loads(base64.urlsafe_b64decode(registered.access_token.split(".")[0] + "=="))
    assert [(k.kty, k.crv, k.alg, k.kid) for k in keys] == [("OKP", "Ed25519", "EdDSA", header["kid"])]


async def test_mfa_enrolment_login_challenge_recovery_codes_and_disable(people: People) -> None:
    caller, _ = await _register(people)
    wrong_password = await _fails(
        people.auth.EnrollMfa(pb.EnrollMfaRequest(password="nope"), metadata=caller.metadata())
    )
    assert reason(wrong_password) == "INVALID_CREDENTIALS"
    enrolment = await people.auth.EnrollMfa(pb.EnrollMfaRequest(password=PASSWORD), metadata=caller.metadata())
    assert enrolment.otpauth_uri.startswith("otpauth://totp/")
    assert f"secret={enrolment.secret}" in enrolment.otpauth_uri
    bad = await _fails(people.auth.ConfirmMfa(pb.ConfirmMfaRequest(code="000000"), metadata=caller.metadata()))
    assert (bad.code(), reason(bad)) == (grpc.StatusCode.INVALID_ARGUMENT, "MFA_CODE_INVALID")
    confirming_code = mfa.totp_code(enrolment.secret, time.time())
    confirmed = await people.auth.ConfirmMfa(pb.ConfirmMfaRequest(code=confirming_code), metadata=caller.metadata())
    assert len(confirmed.recovery_codes) == 10
    assert confirmed.user.mfa_enabled

    # With MFA on, the password alone gives a challenge, not tokens.
    login = await people.auth.Login(
        pb.LoginRequest(email="mina@example.com", password=PASSWORD), metadata=Caller("univ").metadata()
    )
    assert login.mfa_required
    assert not login.access_token
    challenge = login.mfa_challenge.challenge_token
    # The code just used to confirm is spent (its time step is): a replay is refused.
    replay = await _fails(
        people.auth.VerifyMfaChallenge(
            pb.VerifyMfaChallengeRequest(challenge_token=challenge, code=confirming_code),
            metadata=Caller("univ").metadata(),
        )
    )
    assert reason(replay) == "MFA_CODE_INVALID"
    signed_in = await people.auth.VerifyMfaChallenge(
        pb.VerifyMfaChallengeRequest(challenge_token=challenge, recovery_code=confirmed.recovery_codes[0]),
        metadata=Caller("univ").metadata(),
    )
    assert signed_in.access_token
    assert signed_in.recovery_codes_remaining == 9
    used = await _fails(
        people.auth.VerifyMfaChallenge(
            pb.VerifyMfaChallengeRequest(challenge_token=challenge, recovery_code=confirmed.recovery_codes[1]),
            metadata=Caller("univ").metadata(),
        )
    )
    assert reason(used) == "MFA_CHALLENGE_INVALID"  # single use
    sessions = (
        await people.auth.ListSessions(
            pb.ListSessionsRequest(), metadata=Caller("univ", token=signed_in.access_token).metadata()
        )
    ).sessions
    assert any(s.mfa_verified for s in sessions)

    # The same recovery code does not work twice; disabling needs a fresh factor.
    again = await people.auth.Login(
        pb.LoginRequest(email="mina@example.com", password=PASSWORD), metadata=Caller("univ").metadata()
    )
    spent = await _fails(
        people.auth.VerifyMfaChallenge(
            pb.VerifyMfaChallengeRequest(
                challenge_token=again.mfa_challenge.challenge_token, recovery_code=confirmed.recovery_codes[0]
            ),
            metadata=Caller("univ").metadata(),
        )
    )
    assert reason(spent) == "MFA_CODE_INVALID"
    disabled = await people.auth.DisableMfa(
        pb.DisableMfaRequest(recovery_code=confirmed.recovery_codes[2]), metadata=caller.metadata()
    )
    assert not disabled.user.mfa_enabled
    plain = await people.auth.Login(
        pb.LoginRequest(email="mina@example.com", password=PASSWORD), metadata=Caller("univ").metadata()
    )
    assert plain.access_token


async def test_a_wrong_challenge_is_refused(people: People) -> None:
    error = await _fails(
        people.auth.VerifyMfaChallenge(
            pb.VerifyMfaChallengeRequest(challenge_token="made-up", code="123456"), metadata=Caller("univ").metadata()
        )
    )
    assert (error.code(), reason(error)) == (grpc.StatusCode.UNAUTHENTICATED, "MFA_CHALLENGE_INVALID")


async def test_a_restart_of_auth_loses_no_session_and_revives_no_revoked_token(people: People) -> None:
    kept, registered = await _register(people)
    ended = await people.sign_in("univ", "mina@example.com")
    await people.auth.Logout(pb.LogoutRequest(), metadata=ended.metadata())
    config = people.auth_service.config
    await people.auth_service.stop(grace=1.0)
    async with running(config) as restarted, channel_as("edge", restarted, people.pki_dir) as channel:
        auth = auth_service_pb2_grpc.AuthServiceStub(channel)
        for _ in range(100):  # ready once its keys are loaded again
            if restarted.health is not None and restarted.health.serving:
                break
            await asyncio.sleep(0.05)
        await auth.GetMe(pb.GetMeRequest(), metadata=kept.metadata())
        rotated = await auth.Refresh(
            pb.RefreshRequest(refresh_token=registered.refresh_token), metadata=kept.metadata()
        )
        await auth.GetMe(pb.GetMeRequest(), metadata=Caller("univ", token=rotated.access_token).metadata())
        revoked = await _fails(auth.GetMe(pb.GetMeRequest(), metadata=ended.metadata()))
        assert reason(revoked) == "TOKEN_REVOKED"
