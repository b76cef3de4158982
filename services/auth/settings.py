"""The auth service's own settings, from environment variables (the runtime's are in services/runtime/config.py).

| variable                               | default   | meaning                                                      |
|----------------------------------------|-----------|--------------------------------------------------------------|
| MEGACITY_PII_KEYS                      | required  | `kid:base64url(32 bytes)`, comma separated, newest first:   |
|                                        |           | encrypts personal data and the token signing keys at rest   |
|                                        |           | (`megacity up` makes one under $MEGACITY_HOME/secrets)       |
| MEGACITY_ACCESS_TOKEN_SECONDS          | 900       | access token lifetime                                        |
| MEGACITY_REFRESH_TOKEN_SECONDS         | 2592000   | refresh token lifetime (30 days)                             |
| MEGACITY_BCRYPT_COST                   | 12        | bcrypt work factor for new password hashes                   |
| MEGACITY_SIGNING_KEY_ROTATION_SECONDS  | 2592000   | age at which the signing key is replaced (30 days)           |
| MEGACITY_SIGNING_KEY_ANNOUNCE_SECONDS  | 600       | a new key is published this long before it signs: more than  |
|                                        |           | verifiers cache the JWKS (Envoy 300 s) plus a reload (60 s)  |
| MEGACITY_LOGIN_SLOWDOWN                | 1         | multiplies the delay after repeated failed logins (0: none)  |
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.auth.accounts import REFRESH_TOKEN_LIFETIME_SECONDS
from services.auth.passwords import DEFAULT_BCRYPT_COST
from services.auth.pii import PiiKeyRing
from services.auth.signing import DEFAULT_ACCESS_TOKEN_LIFETIME_SECONDS
from services.runtime.config import env_number

PII_KEYS_VARIABLE = "MEGACITY_PII_KEYS"


@dataclass(frozen=True)
class AuthSettings:
    pii: PiiKeyRing
    access_token_seconds: int
    refresh_token_seconds: int
    bcrypt_cost: int
    signing_key_rotation_seconds: float
    signing_key_announce_seconds: float
    login_slowdown: float

    @classmethod
    def from_environment(cls) -> AuthSettings:
        keys = os.environ.get(PII_KEYS_VARIABLE, "")
        if not keys:
            raise ValueError(f"{PII_KEYS_VARIABLE} is not set: the auth service cannot store personal data safely")
        return cls(
            pii=PiiKeyRing.from_environment(keys),
            access_token_seconds=int(
                env_number("MEGACITY_ACCESS_TOKEN_SECONDS", DEFAULT_ACCESS_TOKEN_LIFETIME_SECONDS)
            ),
            refresh_token_seconds=int(env_number("MEGACITY_REFRESH_TOKEN_SECONDS", REFRESH_TOKEN_LIFETIME_SECONDS)),
            bcrypt_cost=int(env_number("MEGACITY_BCRYPT_COST", DEFAULT_BCRYPT_COST)),
            signing_key_rotation_seconds=env_number("MEGACITY_SIGNING_KEY_ROTATION_SECONDS", 30 * 24 * 3600),
            signing_key_announce_seconds=env_number("MEGACITY_SIGNING_KEY_ANNOUNCE_SECONDS", 600),
            login_slowdown=env_number("MEGACITY_LOGIN_SLOWDOWN", 1.0),
        )
