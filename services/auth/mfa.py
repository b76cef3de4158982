"""Second factors: TOTP (RFC 6238: HMAC-SHA1, 6 digits, 30-second steps) and single-use recovery codes.

`verify_totp` returns the time step a code matched so the caller can store it and refuse that step and every
earlier one afterwards: a code seen over a shoulder or in a proxy log cannot be replayed within its window.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Sequence
from urllib.parse import quote, urlencode

TOTP_DIGITS = 6
TOTP_PERIOD_SECONDS = 30
DEFAULT_ISSUER = "DreamSeedAI MegaCity"

_SECRET_BYTES = 20  # 160 bits, the secret length RFC 4226 recommends
_TOTP_CODE = re.compile(rf"[0-9]{{{TOTP_DIGITS}}}")

# Crockford's base32 leaves out i, l, o and u, and reading a code maps i and l to 1 and o to 0, so a code
# copied by hand from paper is still read right. Each character carries exactly 5 bits.
_RECOVERY_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_RECOVERY_LOOKALIKES = str.maketrans({"i": "1", "l": "1", "o": "0", "-": None, " ": None})
# 16 characters, 80 bits: the hashes are unsalted SHA-256, and one pass of guesses over a leaked table is tried
# against every user's codes at once, so the codes need a margin well above what a single target would.
_RECOVERY_GROUPS = 4
_RECOVERY_GROUP_LENGTH = 4
_RECOVERY_LENGTH = _RECOVERY_GROUPS * _RECOVERY_GROUP_LENGTH


def new_totp_secret() -> str:
    """A random 160-bit secret in unpadded base32, the form authenticator apps accept."""
    return base64.b32encode(secrets.token_bytes(_SECRET_BYTES)).decode().rstrip("=")


def _secret_key(secret: str) -> bytes:
    return base64.b32decode(secret + "=" * (-len(secret) % 8), casefold=True)


def otpauth_uri(secret: str, account_email: str, issuer: str = DEFAULT_ISSUER) -> str:
    """The `otpauth://` URI an authenticator app reads from a QR code (Google's Key URI format)."""
    label = f"{quote(issuer, safe='')}:{quote(account_email, safe='@')}"
    parameters = {
        "secret": secret,
        "issuer": issuer,
        "algorithm": "SHA1",
        "digits": TOTP_DIGITS,
        "period": TOTP_PERIOD_SECONDS,
    }
    return f"otpauth://totp/{label}?{urlencode(parameters, quote_via=quote)}"


def hotp(key: bytes, counter: int, digits: int = TOTP_DIGITS) -> str:
    """The RFC 4226 one-time password of `key` at `counter`: HMAC-SHA1 with dynamic truncation."""
    digest = hmac.digest(key, counter.to_bytes(8, "big"), "sha1")
    offset = digest[-1] & 0x0F
    truncated = int.from_bytes(digest[offset : offset + 4], "big") & 0x7FFF_FFFF
    return str(truncated % 10**digits).zfill(digits)


def totp_step(at: float) -> int:
    """The RFC 6238 time step (counter) containing the Unix time `at`."""
    return math.floor(at / TOTP_PERIOD_SECONDS)


def totp_code(secret: str, at: float) -> str:
    return hotp(_secret_key(secret), totp_step(at))


def verify_totp(secret: str, code: str, at: float, last_used_step: int | None, window: int = 1) -> int | None:
    """The time step `code` belongs to, or None when it is wrong, malformed or not newer than `last_used_step`.

    Codes of `window` steps either side of `at` are accepted, for clock drift and slow typing.
    """
    if window < 0:
        raise ValueError("the TOTP window cannot be negative")
    code = code.replace(" ", "")
    if not _TOTP_CODE.fullmatch(code):
        return None
    key = _secret_key(secret)
    current = totp_step(at)
    matched: int | None = None
    for step in range(current - window, current + window + 1):
        if last_used_step is not None and step <= last_used_step:
            continue
        # Every candidate is compared, match or not, so the time taken does not hint at which step matched.
        if hmac.compare_digest(hotp(key, step), code) and matched is None:
            matched = step
    return matched


def new_recovery_codes(count: int = 10) -> list[str]:
    """Fresh codes like `7kq2-m9xd-4hta-pc3w`, each 80 bits; show them to the user once and store their hashes."""
    codes: list[str] = []
    while len(codes) < count:
        characters = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(_RECOVERY_LENGTH))
        code = "-".join(
            characters[start : start + _RECOVERY_GROUP_LENGTH]
            for start in range(0, _RECOVERY_LENGTH, _RECOVERY_GROUP_LENGTH)
        )
        if code not in codes:
            codes.append(code)
    return codes


def _normalised_recovery_code(code: str) -> str | None:
    normalised = code.strip().lower().translate(_RECOVERY_LOOKALIKES)
    if len(normalised) != _RECOVERY_LENGTH or any(character not in _RECOVERY_ALPHABET for character in normalised):
        return None
    return normalised


def _recovery_digest(normalised: str) -> str:
    return hashlib.sha256(normalised.encode()).hexdigest()


def hash_recovery_code(code: str) -> str:
    """The SHA-256 hex digest of a recovery code, ignoring case, dashes, spaces and look-alike characters."""
    normalised = _normalised_recovery_code(code)
    if normalised is None:
        raise ValueError("not a recovery code: hash only codes made by new_recovery_codes")
    return _recovery_digest(normalised)


def match_recovery_code(code: str, unused_hashes: Sequence[str]) -> int | None:
    """The index in `unused_hashes` of the code's hash, or None; the caller then marks that code used."""
    normalised = _normalised_recovery_code(code)
    if normalised is None:
        return None
    candidate = _recovery_digest(normalised)
    matched: int | None = None
    for index, stored in enumerate(unused_hashes):
        if hmac.compare_digest(stored, candidate) and matched is None:
            matched = index
    return matched
