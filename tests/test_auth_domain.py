"""The auth domain's building blocks: the password policy and bcrypt, TOTP and recovery codes, PII encryption."""

from __future__ import annotations

import asyncio
import base64
import re
import string
import time
import unicodedata
from collections.abc import Awaitable
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.auth import mfa, passwords, pii
from services.auth.accounts import MAX_FAILURE_DELAY_SECONDS, SLOW_DOWN_AFTER, failure_delay
from services.auth.passwords import PasswordRule
from services.runtime.errors import InvalidArgument, error_info, field_violations

# --- Password policy ------------------------------------------------------------------------------------------

GOOD_PASSWORD = "Sunny-Day7"


def _policy_error(password: str, field: str = "password") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        passwords.check_password_policy(password, field)
    return raised.value


def test_a_password_meeting_every_rule_is_accepted() -> None:
    passwords.check_password_policy(GOOD_PASSWORD)
    assert passwords.broken_password_rules(GOOD_PASSWORD) == []


@pytest.mark.parametrize(
    ("password", "rule", "requirement"),
    [
        ("Ab1!xyz", "min_length", "be at least 8 characters long"),
        ("Aa1!" + "a" * 69, "max_length", "be at most 72 bytes long in UTF-8"),
        ("Abcdef1!\0", "no_nul", "not contain a NUL character"),
        ("abcdefg1!", "uppercase", "contain an upper-case letter"),
        ("ABCDEFG1!", "lowercase", "contain a lower-case letter"),
        ("Abcdefgh!", "digit", "contain a digit"),
        ("Abcdefgh1", "special", "contain a special character"),
    ],
)
def test_each_rule_on_its_own_is_reported_by_name(password: str, rule: str, requirement: str) -> None:
    error = _policy_error(password)
    status = error.to_status()
    info = error_info(status)
    assert info is not None
    assert (info.reason, dict(info.metadata)) == ("PASSWORD_TOO_WEAK", {"rule": rule})
    [(field, description)] = field_violations(status)
    assert field == "password"
    assert description.startswith(f"must {requirement}")


def test_every_broken_rule_is_described_and_the_first_is_the_metadata_rule() -> None:
    error = _policy_error("", field="new_password")
    assert error.metadata == {"rule": "min_length"}
    assert error.violations == (
        (
            "new_password",
            "must be at least 8 characters long, contain an upper-case letter, contain a lower-case letter, "
            "contain a digit and contain a special character (punctuation, a symbol or a space)",
        ),
    )


def test_two_broken_rules_read_as_one_sentence() -> None:
    assert _policy_error("abcdefgh1").violations == (
        (
            "password",
            "must contain an upper-case letter and contain a special character (punctuation, a symbol or a space)",
        ),
    )


@pytest.mark.parametrize(
    ("password", "broken"),
    [
        ("Abcde1!x", []),  # exactly 8 characters
        ("Abcd1!x", [PasswordRule.MIN_LENGTH]),
        ("Aa1!" + "a" * 68, []),  # exactly 72 bytes
        ("Aa1!" + "a" * 69, [PasswordRule.MAX_LENGTH]),
        ("Aa1!" + "한" * 22, []),  # 26 characters, 70 bytes
        ("Aa1!" + "한" * 23, [PasswordRule.MAX_LENGTH]),  # only 27 characters, but 73 bytes
    ],
)
def test_length_boundaries_count_characters_below_and_bytes_above(password: str, broken: list[PasswordRule]) -> None:
    assert passwords.broken_password_rules(password) == broken


@pytest.mark.parametrize(
    ("password", "broken"),
    [
        ("Ünïcödé-9", []),  # accented capitals and small letters count as letters of their case
        ("Correct horse 9", []),  # a space is a special character
        ("Password!٣", []),  # so is any script's decimal digit
        ("Secret1🙂", []),  # and an emoji is a symbol
        ("비밀번호입니다1!", [PasswordRule.UPPERCASE, PasswordRule.LOWERCASE]),  # Hangul has no case
        ("ПАРОЛЬ-1ь", []),
    ],
)
def test_unicode_passwords(password: str, broken: list[PasswordRule]) -> None:
    assert passwords.broken_password_rules(password) == broken


def test_length_is_measured_after_nfc_normalisation() -> None:
    decomposed = "E\u0301t-1!ab"  # 8 code points, but the 7 characters "Ét-1!ab"
    assert len(decomposed) == 8
    assert passwords.broken_password_rules(decomposed) == [PasswordRule.MIN_LENGTH]


_UPPER = string.ascii_uppercase + "ÉÜ"
_LOWER = string.ascii_lowercase + "éü"
_DIGITS = string.digits
_SPECIAL = string.punctuation + " "
# Hangul has no case and is no digit or special character. NUL is forbidden, and being no letter or digit it also
# counts as special. None of these characters combine under NFC, so lengths need no normalising here.
_ALPHABET = _UPPER + _LOWER + _DIGITS + _SPECIAL + "한\0"


@given(st.text(alphabet=_ALPHABET, max_size=80))
def test_the_policy_accepts_exactly_the_passwords_meeting_every_rule(password: str) -> None:
    expected = [
        rule
        for rule, met in [
            (PasswordRule.MIN_LENGTH, len(password) >= 8),
            (PasswordRule.MAX_LENGTH, len(password.encode()) <= 72),
            (PasswordRule.NO_NUL, "\0" not in password),
            (PasswordRule.UPPERCASE, any(c in _UPPER for c in password)),
            (PasswordRule.LOWERCASE, any(c in _LOWER for c in password)),
            (PasswordRule.DIGIT, any(c in _DIGITS for c in password)),
            (PasswordRule.SPECIAL, any(c in _SPECIAL or c == "\0" for c in password)),
        ]
        if not met
    ]
    assert passwords.broken_password_rules(password) == expected
    if expected:
        assert _policy_error(password).metadata == {"rule": expected[0].value}
    else:
        passwords.check_password_policy(password)


# --- Password hashing -----------------------------------------------------------------------------------------

FAST_COST = 4


def test_the_default_cost_is_12() -> None:
    assert passwords.DEFAULT_BCRYPT_COST == 12


async def test_a_hash_verifies_its_password_and_no_other() -> None:
    hashed = await passwords.hash_password(GOOD_PASSWORD, FAST_COST)
    assert hashed.startswith("$2b$04$")
    assert await passwords.verify_password(GOOD_PASSWORD, hashed)
    assert not await passwords.verify_password("Sunny-Day8", hashed)
    assert not await passwords.verify_password("sunny-day7", hashed)
    assert await passwords.hash_password(GOOD_PASSWORD, FAST_COST) != hashed  # a fresh salt each time


async def test_composed_and_decomposed_forms_of_a_password_match() -> None:
    composed = "Café-Crème1"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    hashed = await passwords.hash_password(composed, FAST_COST)
    assert await passwords.verify_password(decomposed, hashed)


@pytest.mark.parametrize("impossible", ["Aa1!" + "a" * 69, "Abcdef1!\0"])
async def test_a_password_the_policy_forbids_is_never_hashed_and_never_matches(impossible: str) -> None:
    with pytest.raises(ValueError, match="policy"):
        await passwords.hash_password(impossible, FAST_COST)
    hashed = await passwords.hash_password(GOOD_PASSWORD, FAST_COST)
    assert not await passwords.verify_password(impossible, hashed)


async def test_a_cost_outside_bcrypt_range_is_refused() -> None:
    with pytest.raises(ValueError, match="rounds"):
        await passwords.hash_password(GOOD_PASSWORD, 3)


async def test_needs_rehash_when_the_stored_cost_differs() -> None:
    hashed = await passwords.hash_password(GOOD_PASSWORD, FAST_COST)
    assert not passwords.needs_rehash(hashed, FAST_COST)
    assert passwords.needs_rehash(hashed, 12)
    with pytest.raises(ValueError, match="not a bcrypt hash"):
        passwords.needs_rehash("plain-text", 12)


async def test_hashing_at_the_default_cost_does_not_block_the_event_loop() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        started = time.monotonic()
        hashed = await passwords.hash_password(GOOD_PASSWORD, passwords.DEFAULT_BCRYPT_COST)
        elapsed = time.monotonic() - started
    finally:
        ticker.cancel()
    assert hashed.startswith("$2b$12$")
    assert elapsed > 0.05  # a real cost-12 hash, long enough for the ticker to show it kept running
    assert ticks >= 3


async def test_an_unknown_email_costs_as_much_time_as_a_wrong_password() -> None:
    cost = 10
    hashed = await passwords.hash_password(GOOD_PASSWORD, cost)
    await passwords.burn_verify_time("warm-up", cost)  # makes the dummy hash, as the server does at startup

    async def timed(work: Awaitable[object]) -> float:
        started = time.perf_counter()
        await work
        return time.perf_counter() - started

    wrong: list[float] = []
    burnt: list[float] = []
    for _ in range(3):
        wrong.append(await timed(passwords.verify_password("Wrong-pass1", hashed)))
        burnt.append(await timed(passwords.burn_verify_time("Wrong-pass1", cost)))
    assert 0.5 < min(burnt) / min(wrong) < 2


# --- TOTP -----------------------------------------------------------------------------------------------------

RFC_KEY = b"12345678901234567890"
RFC_SECRET = base64.b32encode(RFC_KEY).decode()

# RFC 6238 appendix B, SHA1 rows.
RFC_6238_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]

# RFC 4226 appendix D.
RFC_4226_VECTORS = ["755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871", "520489"]


@pytest.mark.parametrize(("at", "code"), RFC_6238_VECTORS)
def test_totp_matches_the_rfc_6238_vectors(at: int, code: str) -> None:
    assert mfa.hotp(RFC_KEY, mfa.totp_step(at), digits=8) == code
    assert mfa.totp_code(RFC_SECRET, at) == code[-6:]


@pytest.mark.parametrize(("counter", "code"), list(enumerate(RFC_4226_VECTORS)))
def test_hotp_matches_the_rfc_4226_vectors(counter: int, code: str) -> None:
    assert mfa.hotp(RFC_KEY, counter) == code


def test_new_secrets_are_160_random_bits_in_base32() -> None:
    secrets = {mfa.new_totp_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert re.fullmatch(r"[A-Z2-7]{32}", secret)
        assert len(base64.b32decode(secret)) == 20


def test_the_otpauth_uri_encodes_label_and_parameters() -> None:
    uri = mfa.otpauth_uri("JBSWY3DPEHPK3PXP", "kim+kid@example.com")
    assert uri.startswith("otpauth://totp/DreamSeedAI%20MegaCity:kim%2Bkid@example.com?")
    assert "issuer=DreamSeedAI%20MegaCity" in uri
    parts = urlsplit(uri)
    assert parse_qs(parts.query) == {
        "secret": ["JBSWY3DPEHPK3PXP"],
        "issuer": ["DreamSeedAI MegaCity"],
        "algorithm": ["SHA1"],
        "digits": ["6"],
        "period": ["30"],
    }


def test_the_otpauth_uri_escapes_an_issuer_of_any_text() -> None:
    uri = mfa.otpauth_uri("JBSWY3DPEHPK3PXP", "a@b.c", issuer="Zone & Co/서울")
    label = urlsplit(uri).path
    assert label == "/Zone%20%26%20Co%2F%EC%84%9C%EC%9A%B8:a@b.c"
    assert parse_qs(urlsplit(uri).query)["issuer"] == ["Zone & Co/서울"]


NOW = 1_700_000_015.0  # in the middle of a step
NOW_STEP = mfa.totp_step(NOW)


def test_the_current_code_verifies_to_the_current_step() -> None:
    secret = mfa.new_totp_secret()
    assert mfa.verify_totp(secret, mfa.totp_code(secret, NOW), NOW, None) == NOW_STEP


@pytest.mark.parametrize(
    ("offset_steps", "window", "expected"), [(-1, 1, -1), (1, 1, 1), (-2, 1, None), (-2, 2, -2), (1, 0, None)]
)
def test_codes_within_the_window_verify_to_their_own_step(offset_steps: int, window: int, expected: int | None) -> None:
    secret = mfa.new_totp_secret()
    code = mfa.totp_code(secret, NOW + offset_steps * mfa.TOTP_PERIOD_SECONDS)
    matched = mfa.verify_totp(secret, code, NOW, None, window=window)
    assert matched == (None if expected is None else NOW_STEP + expected)


def test_a_used_step_and_every_earlier_one_are_refused() -> None:
    secret = mfa.new_totp_secret()
    code = mfa.totp_code(secret, NOW)
    used = mfa.verify_totp(secret, code, NOW, None)
    assert used == NOW_STEP
    assert mfa.verify_totp(secret, code, NOW, used) is None  # replay of the same code
    earlier = mfa.totp_code(secret, NOW - mfa.TOTP_PERIOD_SECONDS)
    assert mfa.verify_totp(secret, earlier, NOW, used) is None
    later = mfa.totp_code(secret, NOW + mfa.TOTP_PERIOD_SECONDS)
    assert mfa.verify_totp(secret, later, NOW + mfa.TOTP_PERIOD_SECONDS, used) == NOW_STEP + 1


def test_spaces_in_a_code_are_ignored() -> None:
    secret = mfa.new_totp_secret()
    code = mfa.totp_code(secret, NOW)
    assert mfa.verify_totp(secret, f" {code[:3]} {code[3:]} ", NOW, None) == NOW_STEP


def _other_digits(code: str, zero: str) -> str:
    return "".join(chr(ord(zero) + int(digit)) for digit in code)


RFC_AT = 59  # the RFC key's code at this time is 287082


@pytest.mark.parametrize(
    "code",
    [
        "",
        "28708",
        "2870820",
        "0287082",
        "287082a",
        "287-082",
        "287082\n",
        "+287082",
        _other_digits("287082", "\uff10"),  # full-width digits
        _other_digits("287082", "\u0660"),  # Arabic-Indic digits
    ],
)
def test_malformed_forms_of_the_right_code_never_verify(code: str) -> None:
    assert mfa.verify_totp(RFC_SECRET, "287082", RFC_AT, None) == mfa.totp_step(RFC_AT)
    assert mfa.verify_totp(RFC_SECRET, code, RFC_AT, None) is None


def test_a_wrong_code_does_not_verify() -> None:
    secret = mfa.new_totp_secret()
    right = mfa.totp_code(secret, NOW)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    assert mfa.verify_totp(secret, wrong, NOW, None, window=0) is None


def test_a_negative_window_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="window"):
        mfa.verify_totp(RFC_SECRET, "123456", NOW, None, window=-1)


# --- Recovery codes -------------------------------------------------------------------------------------------

RECOVERY_CODE = re.compile(r"[0-9a-hjkmnp-tv-z]{4}(-[0-9a-hjkmnp-tv-z]{4}){3}")


def test_recovery_codes_are_unique_readable_and_carry_at_least_60_bits() -> None:
    codes = mfa.new_recovery_codes()
    assert len(codes) == 10
    assert len(set(codes)) == 10
    for code in codes:
        assert RECOVERY_CODE.fullmatch(code), code
    # 16 characters of a 32-symbol alphabet: 80 bits.
    assert len(codes[0].replace("-", "")) * 5 >= 60
    assert len(mfa.new_recovery_codes(count=3)) == 3


@pytest.mark.parametrize(
    "typed",
    [
        "0a1b-2c3d-4e5f-6g7h",
        "0A1B-2C3D-4E5F-6G7H",
        "0a1b2c3d4e5f6g7h",
        " 0a1b 2c3d 4e5f 6g7h ",
        "oaIb-2c3d-4e5f-6g7h",
        "OALB2C3D4E5F6G7H",
    ],
)
def test_recovery_codes_match_after_normalisation(typed: str) -> None:
    assert mfa.hash_recovery_code(typed) == mfa.hash_recovery_code("0a1b-2c3d-4e5f-6g7h")


def test_the_recovery_hash_is_sha256_hex() -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", mfa.hash_recovery_code(mfa.new_recovery_codes(1)[0]))


def test_matching_returns_the_index_and_single_use_is_up_to_the_caller() -> None:
    codes = mfa.new_recovery_codes()
    unused = [mfa.hash_recovery_code(code) for code in codes]
    assert mfa.match_recovery_code(codes[3].upper(), unused) == 3
    del unused[3]  # the caller marks the code used
    assert mfa.match_recovery_code(codes[3], unused) is None
    assert mfa.match_recovery_code(codes[4], unused) == 3
    assert mfa.match_recovery_code(mfa.new_recovery_codes(1)[0], unused) is None


@pytest.mark.parametrize(
    "typed", ["", "abcd-efgh-jkmn", "abcd-efgh-jkmn-pqrst", "abcd-efgh-jkmn-pqru", "abcd-efgh-jkmn-pq!r"]
)
def test_malformed_recovery_codes_never_match_and_cannot_be_hashed(typed: str) -> None:
    hashes = [mfa.hash_recovery_code(code) for code in mfa.new_recovery_codes()]
    assert mfa.match_recovery_code(typed, hashes) is None
    with pytest.raises(ValueError, match="not a recovery code"):
        mfa.hash_recovery_code(typed)


# --- PII encryption -------------------------------------------------------------------------------------------

PHONE_CONTEXT = "auth.users.phone_number:0f9a4c2e"


@pytest.fixture(scope="module")
def old_spec() -> str:
    return pii.generate_key_spec("k2025")


@pytest.fixture(scope="module")
def new_spec() -> str:
    return pii.generate_key_spec("k2026")


def test_generated_key_specs_hold_a_fresh_256_bit_key() -> None:
    first, second = pii.generate_key_spec("dev"), pii.generate_key_spec("dev")
    assert first != second
    kid, _, key = first.partition(":")
    assert kid == "dev"
    assert len(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))) == 32


def test_a_value_round_trips_in_a_self_describing_token(old_spec: str) -> None:
    ring = pii.PiiKeyRing.from_environment(old_spec)
    token = ring.encrypt("+82 10-1234-5678", PHONE_CONTEXT)
    assert re.fullmatch(r"v1\.k2025\.[A-Za-z0-9_-]+", token)
    payload = token.split(".")[2]
    sealed = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    assert len(sealed) == 12 + len(b"+82 10-1234-5678") + 16  # nonce, ciphertext, tag
    assert ring.decrypt(token, PHONE_CONTEXT) == "+82 10-1234-5678"
    assert ring.encrypt("+82 10-1234-5678", PHONE_CONTEXT) != token  # a fresh nonce each time
    assert not ring.needs_reencrypt(token)


def test_a_token_moved_to_another_row_or_field_does_not_decrypt(old_spec: str) -> None:
    ring = pii.PiiKeyRing.from_environment(old_spec)
    token = ring.encrypt("+82 10-1234-5678", PHONE_CONTEXT)
    for context in ["auth.users.phone_number:other-user", "auth.users.guardian_phone:0f9a4c2e"]:
        with pytest.raises(pii.PiiDecryptionError, match="does not authenticate"):
            ring.decrypt(token, context)


def test_a_tampered_or_malformed_token_does_not_decrypt(old_spec: str) -> None:
    ring = pii.PiiKeyRing.from_environment(old_spec)
    token = ring.encrypt("secret", PHONE_CONTEXT)
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for bad in [flipped, "garbage", "v2" + token[2:], "v1.k2025.", "v1.k2025.not*base64", "v1.k2025.AAAA"]:
        with pytest.raises(pii.PiiDecryptionError):
            ring.decrypt(bad, PHONE_CONTEXT)
    with pytest.raises(pii.PiiDecryptionError, match="not a v1 PII token"):
        ring.needs_reencrypt("garbage")


def test_a_context_is_required() -> None:
    ring = pii.PiiKeyRing.from_environment(pii.generate_key_spec("k1"))
    with pytest.raises(ValueError, match="context"):
        ring.encrypt("+82 10-1234-5678", "")


def test_rotation_keeps_old_tokens_readable_and_points_them_out(old_spec: str, new_spec: str) -> None:
    token = pii.PiiKeyRing.from_environment(old_spec).encrypt("+82 10-1234-5678", PHONE_CONTEXT)
    rotated = pii.PiiKeyRing.from_environment(f"{new_spec}, {old_spec}")
    assert rotated.current_kid == "k2026"
    assert rotated.decrypt(token, PHONE_CONTEXT) == "+82 10-1234-5678"
    assert rotated.needs_reencrypt(token)
    reencrypted = rotated.encrypt(rotated.decrypt(token, PHONE_CONTEXT), PHONE_CONTEXT)
    assert reencrypted.startswith("v1.k2026.")
    assert not rotated.needs_reencrypt(reencrypted)
    with pytest.raises(pii.PiiDecryptionError, match="k2025"):
        pii.PiiKeyRing.from_environment(new_spec).decrypt(token, PHONE_CONTEXT)


def test_padded_base64url_keys_are_accepted() -> None:
    key = base64.urlsafe_b64encode(bytes(range(32))).decode()
    assert key.endswith("=")
    ring = pii.PiiKeyRing.from_environment(f"padded:{key}")
    assert ring.decrypt(ring.encrypt("x", "c"), "c") == "x"


SHORT_KEY = base64.urlsafe_b64encode(bytes(16)).decode().rstrip("=")
GOOD_KEY = base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("=")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "is empty"),
        ("  ", "is empty"),
        ("k1", "entry 1 is not of the form"),
        ("k1:", "entry 1 is not of the form"),
        (f":{GOOD_KEY}", "entry 1 is not of the form"),
        (f"k1:{GOOD_KEY},", "entry 2 is not of the form"),
        ("k1:not*base64!", "is not valid base64url"),
        (f"k1:{GOOD_KEY[:-1]}", "has 31 bytes"),
        (f"k1:{SHORT_KEY}", "has 16 bytes; AES-256 needs 32"),
        (f"k1:{GOOD_KEY},k1:{GOOD_KEY}", "appears twice"),
        (f"k.1:{GOOD_KEY}", "must be 1 to 64 letters"),
    ],
)
def test_malformed_key_configuration_is_refused_without_echoing_keys(value: str, message: str) -> None:
    with pytest.raises(pii.PiiConfigError, match=message) as raised:
        pii.PiiKeyRing.from_environment(value)
    assert GOOD_KEY[:8] not in str(raised.value)


def test_a_key_spec_needs_a_usable_key_id() -> None:
    with pytest.raises(pii.PiiConfigError, match="key id"):
        pii.generate_key_spec("has:colon")


_ROUND_TRIP_RING = pii.PiiKeyRing.from_environment(pii.generate_key_spec("prop"))


@given(plaintext=st.text(), context=st.text(min_size=1))
def test_any_text_round_trips_under_its_context(plaintext: str, context: str) -> None:
    token = _ROUND_TRIP_RING.encrypt(plaintext, context)
    assert _ROUND_TRIP_RING.decrypt(token, context) == plaintext


def test_failed_logins_slow_down_then_cap() -> None:
    delays = [failure_delay(failures) for failures in range(1, 12)]
    assert delays[:SLOW_DOWN_AFTER] == [0.0] * SLOW_DOWN_AFTER
    assert delays[SLOW_DOWN_AFTER : SLOW_DOWN_AFTER + 4] == [1.0, 2.0, 4.0, 8.0]
    assert max(delays) == MAX_FAILURE_DELAY_SECONDS
