"""Access-token verification, shared by every service: EdDSA (Ed25519) JWTs checked against the auth JWKS.

Pure logic. `parse_jwks` turns the auth service's published JWKS into public keys by `kid`; `TokenVerifier`
checks a bearer token against them and returns its `AccessClaims`, or raises `Unauthenticated` with the
reason a client can branch on. The algorithm is fixed to EdDSA: the header's `alg` is only checked, never
used to choose how to verify, so `none` and HMAC-with-the-public-key forgeries cannot pass.
"""

from __future__ import annotations

import binascii
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from services.runtime.errors import ErrorReason, Unauthenticated

ALGORITHM = "EdDSA"
JWT_TYPE = "JWT"
ISSUER = "megacity-auth"
AUDIENCE = "megacity"
DEFAULT_LEEWAY_SECONDS = 30.0
ED25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
# Far above any token we issue, far below what would make decoding a cost an attacker can choose.
MAX_TOKEN_BYTES = 8192
# Bounds on what a verifier remembers: headers are few (one per signing key), verified tokens one per
# live session that calls this process.
_HEADER_CACHE_LIMIT = 256
_VERIFIED_CACHE_LIMIT = 4096

# base64url to the standard alphabet for binascii; the standard-only characters and padding become a
# character that strict decoding rejects, so only unpadded base64url is accepted.
_FROM_BASE64URL = bytes.maketrans(b"-_+/=", b"+/!!!")
_TO_BASE64URL = bytes.maketrans(b"+/", b"-_")


class UnknownKeyId(Unauthenticated):
    """The token names a signing key this verifier does not have: refresh the JWKS once, then retry."""

    def __init__(self, kid: str) -> None:
        super().__init__("the access token names an unknown signing key", reason=ErrorReason.ERROR_REASON_TOKEN_INVALID)
        self.kid = kid


class MalformedJwks(ValueError):
    """The JWKS document is not one this verifier can trust to be what the auth service meant to publish."""


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What a verified access token says about its bearer; `user_id` is the `sub` claim, `session_id` `sid`."""

    user_id: str
    email: str
    zone_id: str
    org_id: str
    role: str
    permissions: tuple[str, ...]
    issued_at: float
    expires_at: float
    jti: str
    session_id: str


def base64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2), as JWS segments and JWK members use it."""
    return binascii.b2a_base64(data, newline=False).translate(_TO_BASE64URL).rstrip(b"=").decode("ascii")


def base64url_decode(data: str | bytes) -> bytes:
    """Strict unpadded base64url: raises ValueError on padding, standard-alphabet or stray characters."""
    raw = data.encode("ascii") if isinstance(data, str) else data
    return binascii.a2b_base64(raw.translate(_FROM_BASE64URL) + b"=" * (-len(raw) % 4), strict_mode=True)


def parse_jwks(data: bytes | Mapping[str, object]) -> dict[str, Ed25519PublicKey]:
    """The Ed25519 signing keys of a JWKS document (`{"keys": [...]}`), by `kid`.

    Keys of other types, curves or uses are skipped, so the auth service can publish them alongside without
    breaking older verifiers; an Ed25519 key that is malformed, lacks a `kid`, repeats one or carries its
    private part makes the whole document untrustworthy, and raises MalformedJwks.
    """
    document: object
    if isinstance(data, bytes):
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise MalformedJwks("the JWKS is not JSON") from None
    else:
        document = data
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise MalformedJwks('the JWKS is not an object with a "keys" list')
    keys: dict[str, Ed25519PublicKey] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, Mapping):
            raise MalformedJwks("a JWKS entry is not an object")
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", ALGORITHM) != ALGORITHM:
            continue
        kid, x = jwk.get("kid"), jwk.get("x")
        if not isinstance(kid, str) or not kid:
            raise MalformedJwks("an Ed25519 key has no kid")
        if kid in keys:
            raise MalformedJwks(f"the kid {kid!r} appears twice")
        if "d" in jwk:
            raise MalformedJwks(f"the key {kid!r} carries its private part")
        try:
            public_bytes = base64url_decode(x) if isinstance(x, str) else b""
        except ValueError:
            public_bytes = b""
        if len(public_bytes) != ED25519_KEY_BYTES:
            raise MalformedJwks(f"the key {kid!r} has no 32-byte base64url x")
        keys[kid] = Ed25519PublicKey.from_public_bytes(public_bytes)
    return keys


def _invalid(message: str) -> Unauthenticated:
    return Unauthenticated(message, reason=ErrorReason.ERROR_REASON_TOKEN_INVALID)


def _json_object(segment: bytes, what: str) -> dict[str, object]:
    try:
        decoded = orjson.loads(base64url_decode(segment))
    except (ValueError, orjson.JSONDecodeError):
        # `from None`: the decoder's error carries the decoded text, which must not reach logs.
        raise _invalid(f"the access token's {what} is not base64url JSON") from None
    if not isinstance(decoded, dict):
        raise _invalid(f"the access token's {what} is not a JSON object")
    return decoded


def _string(claims: Mapping[str, object], name: str, *, required: bool = True) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or (required and not value):
        raise _invalid(f"the access token's {name} claim is missing or not a string")
    return value


def _numeric_date(claims: Mapping[str, object], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"the access token's {name} claim is missing or not a number")
    return value


@dataclass(frozen=True, slots=True)
class _Verified:
    claims: AccessClaims
    not_before: float


class TokenVerifier:
    """Checks access tokens against a fixed set of public keys; a JWKS refresh builds a new verifier.

    The Ed25519 check dominates (about 50 µs with libsodium on our hosts), and a client sends the same token with every
    call until it expires, so tokens that passed are remembered: a repeat re-checks only the time window.
    Only tokens that verified are remembered, so a caller cannot fill the cache with forgeries.
    """

    def __init__(
        self,
        keys: Mapping[str, Ed25519PublicKey],
        leeway_seconds: float = DEFAULT_LEEWAY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Raw 32-byte keys for libsodium, whose Ed25519 verify takes half the time of OpenSSL's here
        # (tests/bench/bench_tokens.py); cryptography still parses and validates the JWKS.
        self._keys = {kid: key.public_bytes(Encoding.Raw, PublicFormat.Raw) for kid, key in keys.items()}
        self._leeway = leeway_seconds
        self._clock = clock
        self._key_by_header: dict[bytes, bytes] = {}
        self._verified: dict[str, _Verified] = {}

    def verify(self, token: str) -> AccessClaims:
        verified = self._verified.get(token)
        if verified is None:
            verified = self._verify_signed(token)
            self._check_time(verified)
            if len(self._verified) >= _VERIFIED_CACHE_LIMIT:
                self._verified.clear()
            self._verified[token] = verified
        else:
            self._check_time(verified)
        return verified.claims

    def _verify_signed(self, token: str) -> _Verified:
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            raise _invalid("the access token is not ASCII") from None
        if len(raw) > MAX_TOKEN_BYTES:
            raise _invalid("the access token is too long")
        segments = raw.split(b".")
        if len(segments) != 3:
            raise _invalid("the access token does not have three segments")
        header_segment, payload_segment, signature_segment = segments
        key = self._key_by_header.get(header_segment) or self._key_for_header(header_segment)
        try:
            signature = base64url_decode(signature_segment)
        except ValueError:
            raise _invalid("the access token's signature is not base64url") from None
        # A signature has one encoding: otherwise one token could be respelled into many that all verify.
        if len(signature) != ED25519_SIGNATURE_BYTES or base64url_encode(signature).encode() != signature_segment:
            raise _invalid("the access token's signature is not a canonical Ed25519 signature")
        try:
            crypto_sign_open(signature + raw[: len(header_segment) + 1 + len(payload_segment)], key)
        except BadSignatureError:
            raise _invalid("the access token's signature does not verify") from None
        return self._claims(_json_object(payload_segment, "payload"))

    def _key_for_header(self, segment: bytes) -> bytes:
        header = _json_object(segment, "header")
        if header.get("alg") != ALGORITHM:
            raise _invalid("the access token's algorithm is not EdDSA")
        if header.get("typ") != JWT_TYPE:
            raise _invalid("the access token's type is not JWT")
        if "crit" in header:
            raise _invalid("the access token requires header extensions this verifier does not support")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise _invalid("the access token's header names no signing key")
        key = self._keys.get(kid)
        if key is None:
            raise UnknownKeyId(kid)
        if len(self._key_by_header) < _HEADER_CACHE_LIMIT:
            self._key_by_header[segment] = key
        return key

    def _claims(self, claims: dict[str, object]) -> _Verified:
        if claims.get("iss") != ISSUER:
            raise _invalid("the access token was not issued by the auth service")
        audience = claims.get("aud")
        if audience != AUDIENCE and not (isinstance(audience, list) and AUDIENCE in audience):
            raise _invalid("the access token is meant for another audience")
        permissions = claims.get("permissions")
        if not isinstance(permissions, list) or not all(isinstance(p, str) for p in permissions):
            raise _invalid("the access token's permissions claim is not a list of strings")
        issued_at = _numeric_date(claims, "iat")
        not_before = _numeric_date(claims, "nbf") if "nbf" in claims else issued_at
        return _Verified(
            AccessClaims(
                user_id=_string(claims, "sub"),
                email=_string(claims, "email", required=False),
                zone_id=_string(claims, "zone_id", required=False),
                org_id=_string(claims, "org_id", required=False),
                role=_string(claims, "role", required=False),
                permissions=tuple(permissions),
                issued_at=issued_at,
                expires_at=_numeric_date(claims, "exp"),
                jti=_string(claims, "jti"),
                session_id=_string(claims, "sid"),
            ),
            max(issued_at, not_before),
        )

    def _check_time(self, verified: _Verified) -> None:
        now = self._clock()
        if now - self._leeway >= verified.claims.expires_at:
            raise Unauthenticated("the access token has expired", reason=ErrorReason.ERROR_REASON_TOKEN_EXPIRED)
        if verified.not_before > now + self._leeway:
            raise Unauthenticated(
                "the access token is not valid yet", reason=ErrorReason.ERROR_REASON_TOKEN_NOT_YET_VALID
            )
