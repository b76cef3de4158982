"""Access tokens: EdDSA JWTs signed by the auth key ring and checked by every service's TokenVerifier."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from services.auth.signing import (
    KeyRing,
    SigningKey,
    generate_signing_key,
    issue_access_token,
    load_signing_key,
    private_key_pem,
)
from services.runtime.errors import ErrorReason, Unauthenticated
from services.runtime.tokens import (
    AccessClaims,
    MalformedJwks,
    TokenVerifier,
    UnknownKeyId,
    base64url_decode,
    parse_jwks,
)

NOW = 1_700_000_000.0
LIFETIME = 900
LEEWAY = 30
INVALID = ErrorReason.ERROR_REASON_TOKEN_INVALID
EXPIRED = ErrorReason.ERROR_REASON_TOKEN_EXPIRED
NOT_YET_VALID = ErrorReason.ERROR_REASON_TOKEN_NOT_YET_VALID
BASE64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# RFC 8037 Appendix A: an Ed25519 key, its JWK thumbprint, and a JWS it signed over a non-JSON payload.
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
RFC8037_JWS = (
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: object, payload: object, sign: Callable[[bytes], bytes]) -> str:
    """A JWS built by hand, so each test controls exactly what the verifier sees."""
    signing_input = f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(payload))}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _claims(**overrides: object) -> dict[str, object]:
    claims: dict[str, object] = {
        "iss": "megacity-auth",
        "aud": "megacity",
        "sub": "user-1",
        "email": "mina@example.com",
        "zone_id": "zone-seoul",
        "org_id": "org-7",
        "role": "student",
        "permissions": ["exam.take", "course.read"],
        "sid": "session-1",
        "iat": int(NOW),
        "exp": int(NOW) + LIFETIME,
        "jti": "jti-1",
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def _issue(ring: KeyRing, now: float = NOW, lifetime_seconds: int = LIFETIME) -> tuple[str, str]:
    return issue_access_token(
        ring,
        user_id="user-1",
        email="mina@example.com",
        zone_id="zone-seoul",
        org_id="org-7",
        role="student",
        permissions=["exam.take", "course.read"],
        session_id="session-1",
        now=now,
        lifetime_seconds=lifetime_seconds,
    )


def _verifier(ring: KeyRing, at: float = NOW, keys_at: float | None = None) -> TokenVerifier:
    """A verifier whose clock reads `at`, holding the keys the ring published at `keys_at` (default `at`)."""
    return TokenVerifier(ring.public_keys(at if keys_at is None else keys_at, LIFETIME), LEEWAY, clock=lambda: at)


def _rejects(verifier: TokenVerifier, token: str, reason: Any, match: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated, match=match) as caught:
        verifier.verify(token)
    assert caught.value.reason == reason
    assert not [part for part in token.split(".") if len(part) >= 8 and part in caught.value.message]
    return caught.value


# Hypothesis runs a test many times over, so its tests share one ring, token and verifier.
_PROPERTY_RING = KeyRing([generate_signing_key(NOW - 3600)])
_PROPERTY_TOKEN, _ = _issue(_PROPERTY_RING)
_PROPERTY_VERIFIER = _verifier(_PROPERTY_RING)


@pytest.fixture(scope="module")
def ring() -> KeyRing:
    return KeyRing([generate_signing_key(NOW - 3600)])


# --- the happy path ---------------------------------------------------------------------------------------


def test_an_issued_token_verifies_to_its_claims(ring: KeyRing) -> None:
    token, jti = _issue(ring)
    assert _verifier(ring).verify(token) == AccessClaims(
        user_id="user-1",
        email="mina@example.com",
        zone_id="zone-seoul",
        org_id="org-7",
        role="student",
        permissions=("exam.take", "course.read"),
        issued_at=NOW,
        expires_at=NOW + LIFETIME,
        jti=jti,
        session_id="session-1",
    )


def test_the_header_and_claims_are_the_published_ones(ring: KeyRing) -> None:
    token, jti = _issue(ring, lifetime_seconds=60)
    header, payload, _ = token.split(".")
    assert orjson.loads(base64url_decode(header)) == {"alg": "EdDSA", "typ": "JWT", "kid": ring.signing_key(NOW).kid}
    claims = orjson.loads(base64url_decode(payload))
    assert claims == _claims(jti=jti, exp=int(NOW) + 60)
    assert "=" not in token


def test_each_token_gets_its_own_jti(ring: KeyRing) -> None:
    assert len({_issue(ring)[1] for _ in range(50)}) == 50


def test_a_lifetime_must_be_positive(ring: KeyRing) -> None:
    with pytest.raises(ValueError, match="positive"):
        _issue(ring, lifetime_seconds=0)


def test_a_repeated_token_is_rechecked_against_the_clock(ring: KeyRing) -> None:
    token, _ = _issue(ring)
    now = [NOW]
    verifier = TokenVerifier(ring.public_keys(NOW, LIFETIME), LEEWAY, clock=lambda: now[0])
    assert verifier.verify(token) == verifier.verify(token)
    now[0] = NOW + LIFETIME + LEEWAY
    _rejects(verifier, token, EXPIRED, "expired")


# --- forgeries --------------------------------------------------------------------------------------------


def test_alg_none_is_refused(ring: KeyRing) -> None:
    token = _forge({"alg": "none", "typ": "JWT", "kid": ring.signing_key(NOW).kid}, _claims(), lambda _: b"")
    _rejects(_verifier(ring), token, INVALID, "algorithm")
    header, payload, _ = token.split(".")
    _rejects(_verifier(ring), f"{header}.{payload}", INVALID, "three segments")


@pytest.mark.parametrize("encoding", ["raw", "pem"])
def test_hmac_keyed_with_the_public_key_is_refused(ring: KeyRing, encoding: str) -> None:
    """The classic confusion: a verifier that lets the header pick HS256 would check the HMAC with the public key."""
    public = ring.signing_key(NOW).public_key
    if encoding == "raw":
        secret = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        secret = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for alg in ("HS256", "hs256", "EdDSA "):
        token = _forge(
            {"alg": alg, "typ": "JWT", "kid": ring.signing_key(NOW).kid},
            _claims(role="admin"),
            lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
        )
        _rejects(_verifier(ring), token, INVALID, "algorithm")


def test_a_key_outside_the_jwks_is_refused_with_its_kid(ring: KeyRing) -> None:
    stranger = KeyRing([generate_signing_key(NOW)])
    token, _ = _issue(stranger)
    error = _rejects(_verifier(ring), token, INVALID, "unknown signing key")
    assert isinstance(error, UnknownKeyId)
    assert error.kid == stranger.signing_key(NOW).kid


def test_a_known_kid_on_another_keys_signature_is_refused(ring: KeyRing) -> None:
    impostor = Ed25519PrivateKey.generate()
    token = _forge({"alg": "EdDSA", "typ": "JWT", "kid": ring.signing_key(NOW).kid}, _claims(), impostor.sign)
    _rejects(_verifier(ring), token, INVALID, "signature does not verify")


def test_a_tampered_payload_is_refused_even_after_its_original_verified(ring: KeyRing) -> None:
    token, _ = _issue(ring)
    verifier = _verifier(ring)
    assert verifier.verify(token).role == "student"
    header, _, signature = token.split(".")
    forged_payload = _b64(orjson.dumps(_claims(role="admin")))
    _rejects(verifier, f"{header}.{forged_payload}.{signature}", INVALID, "signature does not verify")


def test_a_signature_has_exactly_one_spelling(ring: KeyRing) -> None:
    token, _ = _issue(ring)
    signing_input, signature = token.rsplit(".", 1)
    # 64 bytes leave 4 unused bits in the last character: flipping one decodes to the same signature.
    respelled = signature[:-1] + BASE64URL_ALPHABET[BASE64URL_ALPHABET.index(signature[-1]) ^ 1]
    assert base64.urlsafe_b64decode(respelled + "==") == base64.urlsafe_b64decode(signature + "==")
    _rejects(_verifier(ring), f"{signing_input}.{respelled}", INVALID, "canonical")
    _rejects(_verifier(ring), f"{signing_input}.{signature}==", INVALID, "signature is not base64url")
    _rejects(_verifier(ring), f"{signing_input}.{signature[:-4]}", INVALID, "canonical")


@given(
    position=st.integers(min_value=0),
    replacement=st.sampled_from(f"{BASE64URL_ALPHABET}.="),
)
def test_changing_any_character_of_a_token_is_refused(position: int, replacement: str) -> None:
    position %= len(_PROPERTY_TOKEN)
    if _PROPERTY_TOKEN[position] == replacement:
        return
    altered = _PROPERTY_TOKEN[:position] + replacement + _PROPERTY_TOKEN[position + 1 :]
    with pytest.raises(Unauthenticated) as caught:
        _PROPERTY_VERIFIER.verify(altered)
    assert caught.value.reason == INVALID


# --- malformed tokens -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "match"),
    [
        ("", "three segments"),
        ("garbage", "three segments"),
        ("a.b", "three segments"),
        ("a.b.c.d", "three segments"),
        ("..", "header is not base64url JSON"),
        ("é.é.é", "not ASCII"),
        ("!!!.e30.AAAA", "header is not base64url JSON"),
        ("eyJhbGciOiJFZERTQSJ9=.e30.AAAA", "header is not base64url JSON"),
        ("e+J9.e30.AAAA", "header is not base64url JSON"),
        (f"{_b64(b'{not json')}.e30.AAAA", "header is not base64url JSON"),
        ("a" * 9000 + ".b.c", "too long"),
    ],
)
def test_garbage_is_invalid(ring: KeyRing, token: str, match: str) -> None:
    _rejects(_verifier(ring), token, INVALID, match)


@pytest.mark.parametrize("header", [[1, 2], "EdDSA", 7, None])
def test_a_header_that_is_not_an_object_is_invalid(ring: KeyRing, header: object) -> None:
    token = _forge(header, _claims(), ring.signing_key(NOW).private_key.sign)
    _rejects(_verifier(ring), token, INVALID, "header is not a JSON object")


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"alg": "EdDSA", "typ": "JWT"}, "names no signing key"),
        ({"alg": "EdDSA", "typ": "JWT", "kid": 5}, "names no signing key"),
        ({"typ": "JWT", "kid": "KID"}, "algorithm"),
        ({"alg": "ES256", "typ": "JWT", "kid": "KID"}, "algorithm"),
        ({"alg": "EdDSA", "kid": "KID"}, "type"),
        ({"alg": "EdDSA", "typ": "at+jwt", "kid": "KID"}, "type"),
        ({"alg": "EdDSA", "typ": "JWT", "kid": "KID", "crit": ["exp"]}, "extensions"),
    ],
)
def test_a_header_must_be_ours(ring: KeyRing, header: dict[str, object], match: str) -> None:
    header = {name: ring.signing_key(NOW).kid if value == "KID" else value for name, value in header.items()}
    token = _forge(header, _claims(), ring.signing_key(NOW).private_key.sign)
    _rejects(_verifier(ring), token, INVALID, match)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"sub": None}, "sub claim"),
        ({"sub": ""}, "sub claim"),
        ({"sub": 42}, "sub claim"),
        ({"email": ["mina@example.com"]}, "email claim"),
        ({"zone_id": None}, "zone_id claim"),
        ({"org_id": 7}, "org_id claim"),
        ({"role": {"name": "student"}}, "role claim"),
        ({"jti": None}, "jti claim"),
        ({"sid": None}, "sid claim"),
        ({"permissions": "exam.take"}, "permissions claim"),
        ({"permissions": ["exam.take", 3]}, "permissions claim"),
        ({"permissions": None}, "permissions claim"),
        ({"iat": None}, "iat claim"),
        ({"iat": "1700000000"}, "iat claim"),
        ({"iat": True}, "iat claim"),
        ({"exp": None}, "exp claim"),
        ({"exp": [1]}, "exp claim"),
        ({"nbf": "soon"}, "nbf claim"),
        ({"iss": None}, "not issued by the auth service"),
        ({"iss": "someone-else"}, "not issued by the auth service"),
        ({"aud": None}, "another audience"),
        ({"aud": "megacity-admin"}, "another audience"),
        ({"aud": ["other", "elsewhere"]}, "another audience"),
    ],
)
def test_claims_must_be_present_and_well_typed(ring: KeyRing, overrides: dict[str, object], match: str) -> None:
    _rejects(_verifier(ring), ring.sign(_claims(**overrides), NOW), INVALID, match)


def test_a_payload_that_is_not_an_object_is_invalid(ring: KeyRing) -> None:
    key = ring.signing_key(NOW)
    token = _forge({"alg": "EdDSA", "typ": "JWT", "kid": key.kid}, ["sub"], key.private_key.sign)
    _rejects(_verifier(ring), token, INVALID, "payload is not a JSON object")


def test_an_audience_list_naming_us_is_accepted(ring: KeyRing) -> None:
    assert _verifier(ring).verify(ring.sign(_claims(aud=["other", "megacity"]), NOW)).user_id == "user-1"


@given(garbage=st.binary(max_size=300) | st.text(max_size=300))
def test_arbitrary_garbage_is_only_ever_invalid(garbage: bytes | str) -> None:
    text = garbage.decode("latin-1") if isinstance(garbage, bytes) else garbage
    header, payload, _ = _PROPERTY_TOKEN.split(".")
    for token in (text, f"{text}.{text}.{text}", f"{header}.{text}.{text}", f"{header}.{payload}.{text}"):
        with pytest.raises(Unauthenticated) as caught:
            _PROPERTY_VERIFIER.verify(token)
        assert caught.value.reason == INVALID


@given(header=st.binary(max_size=64), payload=st.binary(max_size=64), signature=st.binary(min_size=64, max_size=64))
def test_well_encoded_random_segments_are_invalid(header: bytes, payload: bytes, signature: bytes) -> None:
    with pytest.raises(Unauthenticated) as caught:
        _PROPERTY_VERIFIER.verify(f"{_b64(header)}.{_b64(payload)}.{_b64(signature)}")
    assert caught.value.reason == INVALID


# --- the time window --------------------------------------------------------------------------------------


def test_expiry_is_enforced_after_the_leeway(ring: KeyRing) -> None:
    token, _ = _issue(ring)
    expires_at = NOW + LIFETIME
    assert _verifier(ring, at=expires_at + LEEWAY - 1).verify(token).jti
    _rejects(_verifier(ring, at=expires_at + LEEWAY), token, EXPIRED, "expired")
    _rejects(_verifier(ring, at=expires_at + 86_400), token, EXPIRED, "expired")


def test_a_token_from_the_future_is_not_yet_valid(ring: KeyRing) -> None:
    token, _ = _issue(ring, now=NOW + LEEWAY + 1)
    _rejects(_verifier(ring), token, NOT_YET_VALID, "not valid yet")
    assert _verifier(ring, at=NOW + 1).verify(token).jti


def test_not_before_is_honoured(ring: KeyRing) -> None:
    token = ring.sign(_claims(nbf=int(NOW) + 300), NOW)
    _rejects(_verifier(ring), token, NOT_YET_VALID, "not valid yet")
    assert _verifier(ring, at=NOW + 300 - LEEWAY).verify(token).user_id == "user-1"


def test_expired_is_reported_before_not_yet_valid(ring: KeyRing) -> None:
    _rejects(_verifier(ring), ring.sign(_claims(iat=int(NOW) + 600, exp=int(NOW) - 600), NOW), EXPIRED, "expired")


# --- keys, rotation and the JWKS --------------------------------------------------------------------------


def test_a_token_outlives_the_rotation_of_its_key_but_not_its_publication() -> None:
    before = KeyRing([generate_signing_key(NOW - 86_400)])
    token, _ = _issue(before)
    rotated_at = NOW + 60
    after = before.rotate(rotated_at)
    old_key, new_key = after.keys
    assert old_key.kid == before.signing_key(NOW).kid != new_key.kid
    assert [key.retired_at for key in after.keys] == [rotated_at, None]
    new_token, _ = _issue(after, now=rotated_at)
    assert orjson.loads(base64url_decode(new_token.split(".")[0]))["kid"] == new_key.kid

    still_published = rotated_at + LIFETIME + LEEWAY - 1
    assert {key.kid for key in after.published(still_published, LIFETIME)} == {old_key.kid, new_key.kid}
    assert _verifier(after, at=NOW + 120).verify(token).user_id == "user-1"
    assert _verifier(after, at=rotated_at).verify(new_token).user_id == "user-1"

    gone = rotated_at + LIFETIME + LEEWAY
    assert [key.kid for key in after.published(gone, LIFETIME)] == [new_key.kid]
    # A clock still inside the token's window isolates the key's withdrawal from the token's expiry.
    error = _rejects(_verifier(after, at=NOW + 120, keys_at=gone), token, INVALID, "unknown signing key")
    assert isinstance(error, UnknownKeyId)
    assert _verifier(after, at=NOW + 120, keys_at=gone).verify(new_token).user_id == "user-1"


def test_an_announced_key_is_published_before_it_signs() -> None:
    """A verifier that fetched the JWKS while the key was only announced accepts its first tokens."""
    announce = 600.0
    before = KeyRing([generate_signing_key(NOW - 86_400)])
    after = before.rotate(NOW, announce_seconds=announce)
    old_key, new_key = after.keys
    assert (new_key.created_at, new_key.signs_from, old_key.retired_at) == (NOW, NOW + announce, NOW + announce)
    cached = after.public_keys(NOW, LIFETIME)  # what a verifier fetched at the announcement
    assert set(cached) == {old_key.kid, new_key.kid}
    for moment, signer in ((NOW, old_key), (NOW + announce - 1, old_key), (NOW + announce, new_key)):
        assert after.signing_key(moment) == signer
        token, _ = _issue(after, now=moment)
        assert TokenVerifier(cached, clock=partial(float, moment)).verify(token).user_id == "user-1"
    # The old key's last tokens stay verifiable until they expire; then it leaves the JWKS.
    assert old_key.kid in after.public_keys(NOW + announce + LIFETIME + LEEWAY - 1, LIFETIME)
    assert set(after.public_keys(NOW + announce + LIFETIME + LEEWAY, LIFETIME)) == {new_key.kid}


def test_rotating_twice_keeps_one_signing_key() -> None:
    ring = KeyRing([generate_signing_key(NOW)]).rotate(NOW + 10).rotate(NOW + 20)
    assert [key.retired_at for key in ring.keys] == [NOW + 10, NOW + 20, None]
    assert ring.signing_key(NOW + 20) is ring.keys[-1]
    assert ring.signing_key(NOW + 15) is ring.keys[1]
    assert len(ring.published(NOW + 20, LIFETIME)) == 3


def test_the_unretired_key_activated_last_signs() -> None:
    old, new = generate_signing_key(NOW), generate_signing_key(NOW + 5)
    retired_newest = SigningKey(Ed25519PrivateKey.generate(), created_at=NOW + 9, retired_at=NOW + 9)
    announced = generate_signing_key(NOW + 10, activates_at=NOW + 100)
    ring = KeyRing([new, retired_newest, old, announced])
    assert ring.signing_key(NOW + 10) == new
    assert ring.signing_key(NOW + 100) == announced
    assert ring.newest() == announced
    assert ring.signing_key(NOW - 1) == old  # a clock lagging the replica that made the first key


def test_a_ring_needs_one_unretired_key_and_no_duplicates() -> None:
    key = generate_signing_key(NOW)
    with pytest.raises(ValueError, match="no unretired key"):
        KeyRing([])
    with pytest.raises(ValueError, match="no unretired key"):
        KeyRing([SigningKey(key.private_key, created_at=NOW, retired_at=NOW)])
    with pytest.raises(ValueError, match="twice"):
        KeyRing([key, SigningKey(key.private_key, created_at=NOW + 1)])


def test_the_jwks_round_trips_through_json(ring: KeyRing) -> None:
    rotated = ring.rotate(NOW)
    document = orjson.dumps({"keys": rotated.jwks(NOW, LIFETIME)})
    keys = parse_jwks(document)
    assert set(keys) == {key.kid for key in rotated.keys}
    for jwk in rotated.jwks(NOW, LIFETIME):
        assert set(jwk) == {"kty", "crv", "x", "kid", "use", "alg"}
        assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("OKP", "Ed25519", "sig", "EdDSA")
    verifier = TokenVerifier(keys, LEEWAY, clock=lambda: NOW)
    assert verifier.verify(_issue(ring)[0]).user_id == "user-1"
    assert verifier.verify(_issue(rotated)[0]).user_id == "user-1"
    assert parse_jwks(orjson.loads(document)).keys() == keys.keys()


def test_the_kid_is_the_rfc7638_thumbprint() -> None:
    key = SigningKey(Ed25519PrivateKey.from_private_bytes(base64url_decode(RFC8037_D)), created_at=NOW)
    assert key.jwk()["x"] == RFC8037_X
    # Computed here from x alone, the way RFC 7638 §3 spells it out.
    canonical = ('{"crv":"Ed25519","kty":"OKP","x":"' + RFC8037_X + '"}').encode()
    assert _b64(hashlib.sha256(canonical).digest()) == RFC8037_THUMBPRINT
    assert key.kid == RFC8037_THUMBPRINT
    generated = generate_signing_key(NOW)
    canonical = ('{"crv":"Ed25519","kty":"OKP","x":"' + generated.jwk()["x"] + '"}').encode()
    assert generated.kid == _b64(hashlib.sha256(canonical).digest())


def test_parse_jwks_reads_the_rfc8037_key() -> None:
    keys = parse_jwks({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X, "kid": "rfc"}]})
    header, payload, signature = RFC8037_JWS.split(".")
    keys["rfc"].verify(base64url_decode(signature), f"{header}.{payload}".encode())


def test_parse_jwks_skips_keys_it_does_not_use() -> None:
    ours = generate_signing_key(NOW).jwk()
    others: list[dict[str, object]] = [
        {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rsa"},
        {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "kid": "ec"},
        {"kty": "OKP", "crv": "X25519", "x": RFC8037_X, "kid": "ecdh"},
        {"kty": "OKP", "crv": "Ed448", "x": "AAAA", "kid": "ed448"},
        {**ours, "kid": "for-encryption", "use": "enc"},
        {**ours, "kid": "other-alg", "alg": "ES256"},
    ]
    assert list(parse_jwks({"keys": [*others, ours]})) == [ours["kid"]]


@pytest.mark.parametrize(
    "document",
    [
        b"not json",
        b"[]",
        b'{"keys": {}}',
        b"{}",
        b'{"keys": ["OKP"]}',
        b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}',
        b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": 1}]}',
        b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "short"}]}',
        b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "a"}]}',
        b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": 7, "kid": "a"}]}',
        b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "a"}]}',
    ],
)
def test_parse_jwks_rejects_malformed_documents(document: bytes) -> None:
    with pytest.raises(MalformedJwks):
        parse_jwks(document)


def test_parse_jwks_rejects_duplicates_and_private_keys() -> None:
    jwk = generate_signing_key(NOW).jwk()
    with pytest.raises(MalformedJwks, match="twice"):
        parse_jwks({"keys": [jwk, jwk]})
    with pytest.raises(MalformedJwks, match="private"):
        parse_jwks({"keys": [{**jwk, "d": RFC8037_D}]})


def test_a_key_survives_its_pem(ring: KeyRing) -> None:
    key = SigningKey(ring.signing_key(NOW).private_key, created_at=NOW - 5, retired_at=NOW)
    pem = private_key_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_signing_key(pem, created_at=NOW - 5, retired_at=NOW)
    assert loaded == key
    assert _verifier(ring).verify(loaded.sign(_claims())).user_id == "user-1"


def test_a_pem_of_another_key_type_is_refused() -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="Ed25519"):
        load_signing_key(pem, created_at=NOW)


def test_a_signing_key_does_not_print_its_secret(ring: KeyRing) -> None:
    secret = ring.signing_key(NOW).private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    assert _b64(secret) not in repr(ring.signing_key(NOW))
    assert "private_key" not in repr(ring.signing_key(NOW))
