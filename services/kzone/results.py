"""Stored analysis results, pure rules (no I/O): who may read, list and delete them.

- read: the learner themselves; an approved parent of theirs; teachers and org admins of the learner's
  organisation (the result's org_id, the learner's when it was stored); the zone's admins; super admins.
- list: learners their own (naming anyone else is PERMISSION_DENIED); parents one approved child's (user_id
  required); teachers and org admins their organisation's, optionally one learner's; zone admins their zone's;
  super admins everything.
- delete: the learner themselves, admins of their organisation, the zone's admins and super admins (teachers and
  parents only read).
A result a person may not read does not exist for them (NOT_FOUND).
"""

from __future__ import annotations

from dataclasses import dataclass

from megacity.kzone.v1 import resources_pb2 as res
from services.runtime.errors import ErrorReason, InvalidArgument, PermissionDenied
from services.runtime.tokens import AccessClaims

KINDS = {res.ANALYSIS_KIND_VOICE: "voice", res.ANALYSIS_KIND_DANCE: "dance"}
SOURCES = {
    res.ANALYSIS_SOURCE_LIVE: "live",
    res.ANALYSIS_SOURCE_UPLOAD: "upload",
    res.ANALYSIS_SOURCE_JOB: "job",
}
SOURCE_VALUES = {name: value for value, name in SOURCES.items()}
LEARNERS = frozenset({"student", "guest"})
ORG_READERS = frozenset({"teacher", "org_admin"})


@dataclass(frozen=True)
class ResultFacts:
    """What the access rules look at of a stored result."""

    zone_id: str
    org_id: str
    user_id: str


def may_read(person: AccessClaims, result: ResultFacts, *, approved_parent: bool = False) -> bool:
    """`approved_parent`: the person is a parent whose link to the result's learner is approved (the auth
    service's CheckParentLink)."""
    if person.role == "super_admin":
        return True
    if person.zone_id != result.zone_id:
        return False
    if person.user_id == result.user_id or person.role == "zone_admin":
        return True
    if person.role == "parent":
        return approved_parent
    return person.role in ORG_READERS and person.org_id == result.org_id


def may_delete(person: AccessClaims, result: ResultFacts) -> bool:
    if person.role == "super_admin":
        return True
    if person.zone_id != result.zone_id:
        return False
    if person.user_id == result.user_id or person.role == "zone_admin":
        return True
    return person.role == "org_admin" and person.org_id == result.org_id


def needs_parent_check(person: AccessClaims, result: ResultFacts) -> bool:
    """Whether reading this result depends on a parent link (ask the auth service only then)."""
    return person.role == "parent" and person.user_id != result.user_id and person.zone_id == result.zone_id


@dataclass(frozen=True)
class Listing:
    """Which results a person lists: all of the tenant scope (`platform` or the person's zone), narrowed to one
    learner (`user_id`) and/or one organisation (`org_id`). `parent_of` names the child whose parent link the
    servicer must confirm before listing."""

    platform: bool
    user_id: str | None
    org_id: str | None
    parent_of: str | None = None


def listing(person: AccessClaims, user_id: str) -> Listing:
    if person.role in LEARNERS:
        if user_id and user_id != person.user_id:
            raise PermissionDenied("learners list their own results", reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE)
        return Listing(platform=False, user_id=person.user_id, org_id=None)
    if person.role == "parent":
        if not user_id:
            raise InvalidArgument("parents name their child", [("user_id", "required: your approved child's id")])
        if user_id == person.user_id:
            return Listing(platform=False, user_id=user_id, org_id=None)
        return Listing(platform=False, user_id=user_id, org_id=None, parent_of=user_id)
    if person.role in ORG_READERS:
        if user_id == person.user_id:
            return Listing(platform=False, user_id=user_id, org_id=None)
        return Listing(platform=False, user_id=user_id or None, org_id=person.org_id)
    if person.role in ("zone_admin", "super_admin"):
        return Listing(platform=person.role == "super_admin", user_id=user_id or None, org_id=None)
    raise PermissionDenied("this role reads no results", reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE)
