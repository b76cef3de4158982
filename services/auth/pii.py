"""Encryption at rest of personal data (phone numbers and the like) with AES-256-GCM.

Keys come from `MEGACITY_PII_KEYS`: comma-separated `kid:base64url(32 bytes)` entries. The first encrypts; all
decrypt, so a key is rotated by putting a new one first, re-encrypting what `needs_reencrypt` points out, and
only then dropping the old one. A token names its key (`v1.<kid>.<base64url(nonce + ciphertext)>`).

Each value is bound to where it is stored by its `context` (for example `auth.users.phone_number:<user id>`),
sent as GCM associated data: a ciphertext copied into another row or column fails to decrypt instead of
showing one user's data as another's.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_VERSION = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12
_TAG_BYTES = 16
_KID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class PiiConfigError(ValueError):
    """`MEGACITY_PII_KEYS` is malformed; the messages never include key material."""


class PiiDecryptionError(Exception):
    """A stored token does not decrypt: its key is gone, or it was corrupted or moved to another context.

    A server fault, not the caller's: let it surface as INTERNAL.
    """


def _base64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _base64url_decode(text: str) -> bytes:
    """Strict base64url, padding optional: any character outside the alphabet is an error, not skipped."""
    unpadded = text.rstrip("=")
    if not _BASE64URL.fullmatch(unpadded):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except binascii.Error as error:
        raise ValueError("not base64url") from error


def _check_kid(kid: str) -> None:
    if not _KID.fullmatch(kid):
        raise PiiConfigError(f"the PII key id {kid!r} must be 1 to 64 letters, digits, '-' or '_'")


def generate_key_spec(kid: str) -> str:
    """A new `kid:key` entry for `MEGACITY_PII_KEYS`, with a fresh random 256-bit key."""
    _check_kid(kid)
    return f"{kid}:{_base64url_encode(secrets.token_bytes(KEY_BYTES))}"


class PiiKeyRing:
    """The PII keys: the first encrypts, every one decrypts."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise PiiConfigError("no PII key is configured")
        self._ciphers: dict[str, AESGCM] = {}
        for kid, key in keys:
            _check_kid(kid)
            if kid in self._ciphers:
                raise PiiConfigError(f"the PII key id {kid!r} appears twice")
            if len(key) != KEY_BYTES:
                raise PiiConfigError(f"the PII key {kid!r} has {len(key)} bytes; AES-256 needs {KEY_BYTES}")
            self._ciphers[kid] = AESGCM(key)
        self._current_kid = keys[0][0]

    @property
    def current_kid(self) -> str:
        return self._current_kid

    @classmethod
    def from_environment(cls, value: str) -> PiiKeyRing:
        """The key ring `MEGACITY_PII_KEYS` describes (`kid:base64url(32 bytes)`, comma-separated, current first)."""
        if not value.strip():
            raise PiiConfigError("MEGACITY_PII_KEYS is empty: set it to kid:base64url(32 bytes), newest key first")
        keys: list[tuple[str, bytes]] = []
        for position, entry in enumerate(value.split(","), start=1):
            kid, separator, encoded = entry.strip().partition(":")
            if not separator or not kid or not encoded:
                raise PiiConfigError(f"MEGACITY_PII_KEYS entry {position} is not of the form kid:base64url(key)")
            try:
                key = _base64url_decode(encoded)
            except ValueError as error:
                raise PiiConfigError(f"the PII key {kid!r} is not valid base64url") from error
            keys.append((kid, key))
        return cls(keys)

    def encrypt(self, plaintext: str, context: str) -> str:
        """A token holding `plaintext` under the current key, decryptable only with the same `context`."""
        if not context:
            raise ValueError("a PII context is required: it binds the value to where it is stored")
        nonce = secrets.token_bytes(NONCE_BYTES)
        ciphertext = self._ciphers[self.current_kid].encrypt(nonce, plaintext.encode(), context.encode())
        return f"{FORMAT_VERSION}.{self.current_kid}.{_base64url_encode(nonce + ciphertext)}"

    def decrypt(self, token: str, context: str) -> str:
        kid, payload = _parse(token)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise PiiDecryptionError(f"the PII key {kid!r} is not in MEGACITY_PII_KEYS: was it removed too early?")
        try:
            sealed = _base64url_decode(payload)
        except ValueError as error:
            raise PiiDecryptionError("the PII token's payload is not base64url") from error
        if len(sealed) < NONCE_BYTES + _TAG_BYTES:
            raise PiiDecryptionError("the PII token is too short to hold a nonce and a tag")
        try:
            plaintext = cipher.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context.encode())
        except InvalidTag as error:
            raise PiiDecryptionError(
                f"the PII token under key {kid!r} does not authenticate: corrupted, or from another context"
            ) from error
        return plaintext.decode()

    def needs_reencrypt(self, token: str) -> bool:
        """Whether the token was made with an older key and should be re-encrypted with the current one."""
        kid, _payload = _parse(token)
        return kid != self.current_kid


def _parse(token: str) -> tuple[str, str]:
    """The key id and payload of a token."""
    version, _, rest = token.partition(".")
    kid, separator, payload = rest.partition(".")
    if version != FORMAT_VERSION or not separator:
        raise PiiDecryptionError(f"not a {FORMAT_VERSION} PII token")
    return kid, payload
