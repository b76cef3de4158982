"""Who may read a student's results (reports, dashboards), the published rule: the student themselves, their
approved parents, teachers and org admins of the student's organisation, and the zone's administrators."""

from __future__ import annotations

from services.runtime.tokens import AccessClaims


def may_read_student_results(
    reader: AccessClaims, student_zone: str, student_org: str, student_id: str, *, approved_parent: bool
) -> bool:
    if reader.role == "super_admin":
        return True
    if reader.zone_id != student_zone:
        return False
    if reader.user_id == student_id or reader.role == "zone_admin":
        return True
    if reader.role == "parent":
        return approved_parent
    return reader.role in ("teacher", "org_admin") and reader.org_id == student_org
