"""Account rules of the auth service, pure (no I/O): emails, refresh tokens, login throttling, role ceilings.

Login throttling: each failed login for an account, or from one client address, counts. From the fourth
failure on, the answer is held back (1 s, doubling to at most 8 s) so guessing slows down; at the tenth for
an account, or the twentieth from a client within the window, logins lock for 15 minutes
(RESOURCE_EXHAUSTED, ACCOUNT_LOCKED). A successful login resets the account's count.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import uuid

from services.runtime.database import TenantScope
from services.runtime.errors import Violations

ACCOUNT_LOCK_THRESHOLD = 10
CLIENT_LOCK_THRESHOLD = 20
LOCK_SECONDS = 15 * 60
SLOW_DOWN_AFTER = 3
MAX_FAILURE_DELAY_SECONDS = 8.0
REFRESH_TOKEN_LIFETIME_SECONDS = 30 * 24 * 3600
MFA_CHALLENGE_SECONDS = 5 * 60

# Pragmatic, not RFC 5322: one @, a dot in the domain, no spaces; the mailbox decides the rest.
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s.]+(\.[^@\s.]+)+")

# Who may hand out which role: a role can grant roles at or below its own rank, never above.
ROLE_RANK = {
    "super_admin": 5,
    "zone_admin": 4,
    "org_admin": 3,
    "teacher": 2,
    "student": 1,
    "parent": 1,
    "guest": 0,
}


def check_email(violations: Violations, email: str, field: str = "email") -> str:
    """The email as stored (trimmed; compared case-insensitively by the database)."""
    email = email.strip()
    violations.check(len(email) <= 254 and bool(_EMAIL.fullmatch(email)), field, "a valid email address")
    return email


def check_name(violations: Violations, name: str, field: str = "name") -> str:
    name = name.strip()
    violations.check(0 < len(name) <= 200, field, "required, at most 200 characters")
    return name


def new_id() -> str:
    return uuid.uuid4().hex


def new_refresh_token() -> str:
    """An opaque refresh token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """How refresh tokens, invite codes and MFA challenges are stored: high-entropy secrets need no slow hash."""
    return hashlib.sha256(token.encode()).hexdigest()


def failure_delay(failures: int) -> float:
    """How long to hold back the answer to a login after `failures` failed ones."""
    if failures <= SLOW_DOWN_AFTER:
        return 0.0
    return min(2.0 ** (failures - SLOW_DOWN_AFTER - 1), MAX_FAILURE_DELAY_SECONDS)


def may_grant(granter_role: str, role: str) -> bool:
    """Whether a person of `granter_role` may create a user or invite code of `role`."""
    return role in ROLE_RANK and ROLE_RANK[role] <= ROLE_RANK.get(granter_role, -1) and role != "super_admin"


def new_invite_code() -> str:
    """An invite code people can type: 80 random bits in base32 (no 0/1/8/9 look-alikes), in groups of four."""
    raw = base64.b32encode(secrets.token_bytes(10)).decode()
    return "-".join(raw[start : start + 4] for start in range(0, len(raw), 4))


def invite_code_hash(code: str) -> str:
    """Invite codes match whatever their case or dashes."""
    return token_hash(code.replace("-", "").replace(" ", "").upper())


def admin_scope(role: str, zone_id: str, org_id: str) -> TenantScope:
    """The users an administrator may see: all (super_admin), their zone's (zone_admin), else their org's."""
    if role == "super_admin":
        return TenantScope.platform()
    if role == "zone_admin":
        return TenantScope.zone(zone_id)
    return TenantScope.org(zone_id, org_id)
