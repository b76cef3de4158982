"""The auth service's access-token signing: Ed25519 keys, their rotation, the JWKS and token issuance.

Pure logic; the key store persists keys as PKCS8 PEM (encrypting them itself) with their timestamps. A key
is named by its RFC 7638 JWK thumbprint, so a `kid` always means the same key.

Rotation never invalidates a live token, nor refuses a new one:
- a new key is published when it is created but signs only from `activates_at`, an announcement period later,
  so verifiers that cache the JWKS (Envoy keeps it 5 minutes and never refetches on an unknown `kid`) already
  hold it when its first token arrives;
- the key it replaces signs until then, and stays published until every token it signed has expired.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.runtime.tokens import ALGORITHM, AUDIENCE, DEFAULT_LEEWAY_SECONDS, ISSUER, JWT_TYPE, base64url_encode

DEFAULT_ACCESS_TOKEN_LIFETIME_SECONDS = 900


def _public_x(public_key: Ed25519PublicKey) -> str:
    return base64url_encode(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def jwk_thumbprint(public_key: Ed25519PublicKey) -> str:
    """RFC 7638: SHA-256 over the required members in lexicographic order, no whitespace (RFC 8037 §2)."""
    canonical = orjson.dumps({"crv": "Ed25519", "kty": "OKP", "x": _public_x(public_key)})
    return base64url_encode(hashlib.sha256(canonical).digest())


@dataclass(frozen=True)
class SigningKey:
    """One Ed25519 signing key; `kid` is derived from the key, so the two can never disagree."""

    private_key: Ed25519PrivateKey = field(repr=False, compare=False)
    created_at: float
    retired_at: float | None = None
    # When it starts signing; before that it is only published. None: as soon as it is created.
    activates_at: float | None = None
    kid: str = field(init=False)
    # The JWS header is the same for every token this key signs: encode it once.
    _header_segment: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kid = jwk_thumbprint(self.private_key.public_key())
        header = orjson.dumps({"alg": ALGORITHM, "typ": JWT_TYPE, "kid": kid})
        object.__setattr__(self, "kid", kid)
        object.__setattr__(self, "_header_segment", base64url_encode(header))

    @property
    def signs_from(self) -> float:
        return self.created_at if self.activates_at is None else self.activates_at

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def jwk(self) -> dict[str, str]:
        """The public key as RFC 8037 publishes it."""
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _public_x(self.public_key),
            "kid": self.kid,
            "use": "sig",
            "alg": ALGORITHM,
        }

    def sign(self, claims: Mapping[str, object]) -> str:
        signing_input = f"{self._header_segment}.{base64url_encode(orjson.dumps(claims))}"
        signature = self.private_key.sign(signing_input.encode("ascii"))
        return f"{signing_input}.{base64url_encode(signature)}"


def generate_signing_key(now: float, activates_at: float | None = None) -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate(), created_at=now, activates_at=activates_at)


def private_key_pem(key: SigningKey) -> bytes:
    """Unencrypted PKCS8 PEM: the key store encrypts it before it leaves the process."""
    return key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_signing_key(
    pem: bytes, *, created_at: float, retired_at: float | None = None, activates_at: float | None = None
) -> SigningKey:
    """A key persisted by `private_key_pem`; raises ValueError for anything but an Ed25519 private key."""
    private_key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ValueError("the PEM does not hold an Ed25519 private key")
    return SigningKey(private_key, created_at=created_at, retired_at=retired_at, activates_at=activates_at)


class KeyRing:
    """The signing keys: at any time the unretired key activated last signs; keys are published from their creation
    until their tokens have expired."""

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        if len({key.kid for key in keys}) != len(keys):
            raise ValueError("the key ring holds the same key twice")
        if not any(key.retired_at is None for key in keys):
            raise ValueError("the key ring has no unretired key to sign with")
        self.keys = tuple(sorted(keys, key=lambda key: key.created_at))

    def signing_key(self, now: float) -> SigningKey:
        # Never empty: the ring holds a key without a retirement.
        unretired = [key for key in self.keys if key.retired_at is None or now < key.retired_at]
        active = [key for key in unretired if key.signs_from <= now]
        if not active:
            # Only before the very first key's creation, on a clock that lags the replica that made it.
            return min(unretired, key=lambda key: key.signs_from)
        return max(active, key=lambda key: key.signs_from)

    def newest(self) -> SigningKey:
        """The key created last: the one signing, or the one announced to sign next."""
        return self.keys[-1]

    def sign(self, claims: Mapping[str, object], now: float) -> str:
        return self.signing_key(now).sign(claims)

    def rotate(self, now: float, announce_seconds: float = 0.0) -> KeyRing:
        """A ring with a new key, published from `now` and signing `announce_seconds` later; the keys that could
        sign until then are retired at that moment."""
        activates_at = now + announce_seconds
        kept = [key if key.retired_at is not None else replace(key, retired_at=activates_at) for key in self.keys]
        return KeyRing([*kept, generate_signing_key(now, activates_at)])

    def published(
        self,
        now: float,
        token_lifetime: float = DEFAULT_ACCESS_TOKEN_LIFETIME_SECONDS,
        leeway: float = DEFAULT_LEEWAY_SECONDS,
    ) -> list[SigningKey]:
        """The keys verifiers need at `now`: the signing key, an announced one, and a retired key until the last
        token it signed is past its expiry."""
        return [key for key in self.keys if key.retired_at is None or key.retired_at + token_lifetime + leeway > now]

    def jwks(self, now: float, token_lifetime: float = DEFAULT_ACCESS_TOKEN_LIFETIME_SECONDS) -> list[dict[str, str]]:
        """The JWKS `keys` list; serve it as `{"keys": [...]}`."""
        return [key.jwk() for key in self.published(now, token_lifetime)]

    def public_keys(
        self, now: float, token_lifetime: float = DEFAULT_ACCESS_TOKEN_LIFETIME_SECONDS
    ) -> dict[str, Ed25519PublicKey]:
        """The published keys by kid, as `TokenVerifier` takes them."""
        return {key.kid: key.public_key for key in self.published(now, token_lifetime)}


def issue_access_token(
    ring: KeyRing,
    *,
    user_id: str,
    email: str,
    zone_id: str,
    org_id: str,
    role: str,
    permissions: Iterable[str],
    session_id: str,
    now: float,
    lifetime_seconds: int = DEFAULT_ACCESS_TOKEN_LIFETIME_SECONDS,
) -> tuple[str, str]:
    """A signed access token and its jti (for revocation and audit)."""
    if lifetime_seconds <= 0:
        raise ValueError("an access token's lifetime must be positive")
    jti = secrets.token_urlsafe(16)
    issued_at = int(now)
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": user_id,
        "email": email,
        "zone_id": zone_id,
        "org_id": org_id,
        "role": role,
        "permissions": list(permissions),
        "sid": session_id,
        "iat": issued_at,
        "exp": issued_at + lifetime_seconds,
        "jti": jti,
    }
    return ring.sign(claims, now), jti
