"""Zones and organisations: the pure rules (no I/O) the tenant servicer applies.

- Which zone a host belongs to: a zone's domain serves its own host and every subdomain of it
  (`api.univprepai.com` and `app.univprepai.com` are `univprepai.com`'s), the most specific domain wins.
- What a person may do with zones and organisations, on top of the permission their role grants: a
  super_admin acts on every zone, a zone_admin in their zone, organisation roles in their organisation.
- How the wire enums map to the stored values.
"""

from __future__ import annotations

import re
from collections.abc import Sequence, Set
from dataclasses import dataclass

from megacity.tenant.v1 import resources_pb2
from services.runtime.database import TenantScope
from services.runtime.errors import ErrorReason, InvalidArgument, PermissionDenied, Violations

ZONE_ID = re.compile(r"[a-z][a-z0-9-]{1,30}")
# A BCP 47 language tag as zones use them: a language, then optional script / region / variant subtags.
LOCALE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")
ZONE_EDITABLE = ("display_name", "description", "default_locale", "supported_locales")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})+")
_PORT = re.compile(r":\d{1,5}$")
MAX_NAME = 200

PLANS = {
    resources_pb2.PLAN_FREE: "free",
    resources_pb2.PLAN_BASIC: "basic",
    resources_pb2.PLAN_PRO: "pro",
    resources_pb2.PLAN_ENTERPRISE: "enterprise",
}
PLAN_VALUES = {name: value for value, name in PLANS.items()}
ORG_STATUSES = {
    resources_pb2.ORGANIZATION_STATUS_ACTIVE: "active",
    resources_pb2.ORGANIZATION_STATUS_SUSPENDED: "suspended",
}
ORG_STATUS_VALUES = {name: value for value, name in ORG_STATUSES.items()}
ZONE_STATUSES = {resources_pb2.ZONE_STATUS_ACTIVE: "active", resources_pb2.ZONE_STATUS_DISABLED: "disabled"}
ZONE_STATUS_VALUES = {name: value for value, name in ZONE_STATUSES.items()}


def host_name(host: str) -> str | None:
    """The host name of an HTTP Host / :authority value, lower case, without port or trailing dot; None when it
    is not a DNS name (an IP address, garbage)."""
    name = _PORT.sub("", host.strip().lower()).rstrip(".")
    if name == "localhost":
        return name
    return name if DOMAIN.fullmatch(name) and not name.replace(".", "").isdigit() else None


def domain_candidates(name: str) -> list[str]:
    """The domains that could serve host `name`, most specific first: itself, then each parent with two labels
    or more (`api.univprepai.com` -> `api.univprepai.com`, `univprepai.com`)."""
    labels = name.split(".")
    return [".".join(labels[start:]) for start in range(len(labels) - 1)] or [name]


@dataclass(frozen=True)
class Actor:
    """The signed-in person acting on zones and organisations (from their verified token)."""

    role: str
    zone_id: str
    org_id: str

    @property
    def is_platform(self) -> bool:
        return self.role == "super_admin"

    @property
    def is_zone_admin(self) -> bool:
        return self.role == "zone_admin"

    def scope(self) -> TenantScope:
        """The organisations this person may see: all, their zone's, or their own."""
        if self.is_platform:
            return TenantScope.platform()
        if self.is_zone_admin:
            return TenantScope.zone(self.zone_id)
        return TenantScope.org(self.zone_id, self.org_id)


def _out_of_scope(what: str) -> PermissionDenied:
    return PermissionDenied(what, reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE)


def require_platform(actor: Actor, action: str) -> None:
    if not actor.is_platform:
        raise _out_of_scope(f"only a super_admin may {action}")


def require_zone_admin_of(actor: Actor, zone_id: str, action: str) -> None:
    """A super_admin, or the zone_admin of `zone_id`."""
    if not (actor.is_platform or (actor.is_zone_admin and actor.zone_id == zone_id)):
        raise _out_of_scope(f"only a super_admin or this zone's zone_admin may {action}")


def zone_for_new_organization(actor: Actor, requested_zone: str) -> str:
    """The zone a new organisation goes to: a zone_admin's own (naming another is refused), any for a
    super_admin (who must name it)."""
    if actor.is_platform:
        if not requested_zone:
            raise InvalidArgument(
                "organization.zone_id is required", [("organization.zone_id", "a super_admin must name the zone")]
            )
        return requested_zone
    require_zone_admin_of(actor, requested_zone or actor.zone_id, "create organisations")
    return actor.zone_id


def organization_fields_allowed(actor: Actor, org_zone: str, org_id: str, fields: set[str]) -> None:
    """Zone admins change everything of their zone's organisations; an org_admin only their own's name and
    contact email (plan and status are the zone's business)."""
    if actor.is_platform or (actor.is_zone_admin and actor.zone_id == org_zone):
        return
    if actor.role == "org_admin" and (actor.zone_id, actor.org_id) == (org_zone, org_id):
        forbidden = sorted(fields - {"name", "contact_email"})
        if forbidden:
            raise _out_of_scope(f"an org_admin may not change {', '.join(forbidden)}")
        return
    raise _out_of_scope("this organisation is outside your scope")


def sees_disabled_zones(actor: Actor) -> bool:
    """Disabled zones are hidden from everyone but the platform's administrators."""
    return actor.role == "super_admin"


def zone_update_paths(mask: Sequence[str], zone: resources_pb2.Zone) -> set[str]:
    """The fields an update writes: its mask's, or without a mask the editable fields the request sets."""
    if mask:
        return set(mask)
    return {name for name in ZONE_EDITABLE if getattr(zone, name)}


def check_zone_fields(violations: Violations, zone: resources_pb2.Zone, prefix: str, fields: Set[str]) -> None:
    """The zone's `fields` (those a create or an update writes) hold valid values."""
    if "id" in fields:
        violations.check(
            bool(ZONE_ID.fullmatch(zone.id)), f"{prefix}.id", "2-31 characters: a-z first, then a-z, 0-9 or -"
        )
    if "display_name" in fields:
        violations.check(
            0 < len(zone.display_name.strip()) <= MAX_NAME, f"{prefix}.display_name", "required, 1-200 characters"
        )
    if "description" in fields:
        violations.check(len(zone.description) <= 2000, f"{prefix}.description", "at most 2000 characters")
    if "default_locale" in fields:
        violations.check(
            bool(LOCALE.fullmatch(zone.default_locale)), f"{prefix}.default_locale", "a language tag such as en or ko"
        )
    if "supported_locales" in fields:
        locales = list(zone.supported_locales)
        violations.check(
            0 < len(locales) <= 50 and all(LOCALE.fullmatch(locale) for locale in locales),
            f"{prefix}.supported_locales",
            "1-50 language tags such as en or ko",
        )
        violations.check(len(set(locales)) == len(locales), f"{prefix}.supported_locales", "each locale once")


def check_domain(violations: Violations, domain: str, field: str) -> str:
    """The normalised domain (lower case), recording a violation when it is not a DNS name of two labels+."""
    normalised = domain.strip().lower().rstrip(".")
    violations.check(bool(DOMAIN.fullmatch(normalised)), field, "a DNS name such as example.com")
    return normalised


def check_organization_name(violations: Violations, name: str, field: str) -> None:
    violations.check(0 < len(name.strip()) <= MAX_NAME, field, "required, 1-200 characters")
