"""The published role table and what a set of `resource:action` permissions grants.

Pure: no I/O. Each public RPC declares the permission it needs in its contract (the megacity.common.v1.access
option, read by services/runtime/contracts.py into `MethodInfo.access`); a person's access token carries their
role and that role's permissions, and `grants` decides whether those cover what the RPC needs. Scope (zone,
organisation) and ownership are the services' business on top of this.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from megacity.auth.v1.resources_pb2 import Role

# The published role table, keyed by the role names access tokens carry. Kept exactly as published: change it
# there first.
ROLE_PERMISSIONS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "super_admin": frozenset({"*"}),
        "zone_admin": frozenset({"zone:*", "org:read", "org:create", "user:*", "exam:*", "report:*", "audit:read"}),
        "org_admin": frozenset(
            {"org:read", "org:update", "user:read", "user:create", "user:update", "exam:*", "class:*", "report:read"}
        ),
        "teacher": frozenset(
            {
                "exam:create",
                "exam:read",
                "exam:update",
                "item:create",
                "item:read",
                "item:update",
                "student:read",
                "attempt:read",
                "report:read",
            }
        ),
        "student": frozenset({"exam:read", "attempt:create", "attempt:read", "profile:read", "profile:update"}),
        "parent": frozenset({"student:read", "attempt:read", "report:read"}),
        # Public exams only: the exam service narrows what a guest's `exam:read` sees.
        "guest": frozenset({"exam:read"}),
    }
)

# What an RPC can need: a concrete `resource:action`, lower-case words. Wildcards are for holders only.
_NEEDED = re.compile(r"[a-z][a-z_]*:[a-z][a-z_]*")


def grants(held: Iterable[str], needed: str) -> bool:
    """Whether the permissions `held` (a role's, or a token's claim) grant `needed`.

    A held permission grants `needed` when equal to it, when it is `resource:*` for its resource, or when it is
    `*`. An empty `needed` (any signed-in person) is granted to anyone. Malformed strings never grant: a malformed
    `needed` is granted to no one, and a malformed held permission matches none of the accepted forms.
    """
    # A lone string is an iterable of one-letter strings: `grants("*", ...)` would grant everything.
    if isinstance(held, str):
        raise TypeError("held must be a collection of permissions, not one string")
    if not needed:
        return True
    if not _NEEDED.fullmatch(needed):
        return False
    resource = needed.partition(":")[0]
    accepted = {needed, f"{resource}:*", "*"}
    return any(permission in accepted for permission in held)


def role_name(role: Role.ValueType) -> str:
    """The token's name of a role of the contracts (ROLE_ZONE_ADMIN -> `zone_admin`); ValueError for none."""
    name = Role.Name(role).removeprefix("ROLE_").lower()
    if name not in ROLE_PERMISSIONS:
        raise ValueError(f"{Role.Name(role)} is not a role a person can hold")
    return name


def role_value(name: str) -> Role.ValueType:
    """The contracts' Role of a token's role name (`zone_admin` -> ROLE_ZONE_ADMIN); ValueError for unknown names."""
    if name not in ROLE_PERMISSIONS:
        raise ValueError(f"unknown role {name!r}; roles are {', '.join(ROLE_PERMISSIONS)}")
    return Role.Value(f"ROLE_{name.upper()}")
