"""The password policy and bcrypt hashing.

The policy is published to users: at least 8 characters with an upper-case letter, a lower-case letter, a digit
and a special character. bcrypt only reads the first 72 bytes of a password, so longer ones are refused rather
than silently truncated, and so are NUL characters, which some bcrypt implementations treat as the end.

Passwords are NFC-normalised before their length is measured and before hashing: the same password typed on
two devices may arrive composed or decomposed (Hangul and accented letters especially) and must still match.

bcrypt is deliberately slow, so hashing and verifying run in a worker thread and never block the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import secrets
import unicodedata

import bcrypt

from services.runtime.errors import ErrorReason, InvalidArgument

DEFAULT_BCRYPT_COST = 12
MIN_PASSWORD_CHARACTERS = 8
MAX_PASSWORD_BYTES = 72


class PasswordRule(enum.StrEnum):
    """A rule of the policy; the value is the stable name sent as the `rule` metadata of PASSWORD_TOO_WEAK."""

    MIN_LENGTH = "min_length"
    MAX_LENGTH = "max_length"
    NO_NUL = "no_nul"
    UPPERCASE = "uppercase"
    LOWERCASE = "lowercase"
    DIGIT = "digit"
    SPECIAL = "special"


_RULE_REQUIREMENTS: dict[PasswordRule, str] = {
    PasswordRule.MIN_LENGTH: f"be at least {MIN_PASSWORD_CHARACTERS} characters long",
    PasswordRule.MAX_LENGTH: f"be at most {MAX_PASSWORD_BYTES} bytes long in UTF-8",
    PasswordRule.NO_NUL: "not contain a NUL character",
    PasswordRule.UPPERCASE: "contain an upper-case letter",
    PasswordRule.LOWERCASE: "contain a lower-case letter",
    PasswordRule.DIGIT: "contain a digit",
    PasswordRule.SPECIAL: "contain a special character (punctuation, a symbol or a space)",
}


def _normalised(password: str) -> str:
    return unicodedata.normalize("NFC", password)


def broken_password_rules(password: str) -> list[PasswordRule]:
    """Every rule `password` breaks, in the policy's order (empty when it is acceptable)."""
    password = _normalised(password)
    satisfied = {
        PasswordRule.MIN_LENGTH: len(password) >= MIN_PASSWORD_CHARACTERS,
        PasswordRule.MAX_LENGTH: len(password.encode()) <= MAX_PASSWORD_BYTES,
        PasswordRule.NO_NUL: "\0" not in password,
        PasswordRule.UPPERCASE: any(character.isupper() for character in password),
        PasswordRule.LOWERCASE: any(character.islower() for character in password),
        PasswordRule.DIGIT: any(character.isdecimal() for character in password),
        # Anything that is neither a letter nor a digit, so users of any script and keyboard can satisfy it.
        PasswordRule.SPECIAL: any(not character.isalnum() for character in password),
    }
    return [rule for rule in PasswordRule if not satisfied[rule]]


def _requirements_sentence(rules: list[PasswordRule]) -> str:
    requirements = [_RULE_REQUIREMENTS[rule] for rule in rules]
    if len(requirements) == 1:
        return f"must {requirements[0]}"
    return f"must {', '.join(requirements[:-1])} and {requirements[-1]}"


def check_password_policy(password: str, field: str = "password") -> None:
    """Raise PASSWORD_TOO_WEAK naming the first broken rule, with one field violation describing all of them."""
    broken = broken_password_rules(password)
    if broken:
        raise InvalidArgument(
            "the password does not meet the password policy",
            [(field, _requirements_sentence(broken))],
            reason=ErrorReason.ERROR_REASON_PASSWORD_TOO_WEAK,
            metadata={"rule": broken[0].value},
        )


def _encoded(password: str) -> bytes | None:
    """The bytes bcrypt hashes, or None for a password the policy could never have accepted."""
    encoded = _normalised(password).encode()
    if len(encoded) > MAX_PASSWORD_BYTES or b"\0" in encoded:
        return None
    return encoded


def _hash_blocking(password: str, cost: int) -> str:
    encoded = _encoded(password)
    if encoded is None:
        raise ValueError("the password breaks the policy: check it with check_password_policy before hashing")
    return bcrypt.hashpw(encoded, bcrypt.gensalt(rounds=cost)).decode()


def _verify_blocking(password: str, hashed: str) -> bool:
    encoded = _encoded(password)
    # A password that could never have been stored still costs one full bcrypt check, so its answer takes as
    # long as any other wrong password's and says nothing about the account.
    matched = bcrypt.checkpw(b"" if encoded is None else encoded, hashed.encode())
    return encoded is not None and matched


@functools.cache
def _dummy_hash(cost: int) -> str:
    return bcrypt.hashpw(secrets.token_urlsafe(32).encode(), bcrypt.gensalt(rounds=cost)).decode()


def _burn_blocking(password: str, cost: int) -> None:
    _verify_blocking(password, _dummy_hash(cost))


async def hash_password(password: str, cost: int) -> str:
    """The bcrypt hash of a password that passed the policy; ValueError for a cost outside bcrypt's 4..31."""
    return await asyncio.to_thread(_hash_blocking, password, cost)


async def verify_password(password: str, hashed: str) -> bool:
    return await asyncio.to_thread(_verify_blocking, password, hashed)


async def burn_verify_time(password: str, cost: int) -> None:
    """Spend the time `verify_password` would, for a login whose email is unknown.

    Without it, answering an unknown email faster than a wrong password tells an attacker which emails have
    accounts. The dummy hash is made once per cost; call this at startup to make it before the first login.
    """
    await asyncio.to_thread(_burn_blocking, password, cost)


def needs_rehash(hashed: str, cost: int) -> bool:
    """Whether a stored hash was made with another cost than the configured one (rehash it after a login)."""
    try:
        _, _variant, stored_cost, _salt_and_digest = hashed.split("$")
        return int(stored_cost) != cost
    except ValueError as error:
        raise ValueError("the stored password hash is not a bcrypt hash") from error
