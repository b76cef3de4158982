"""Who may read a student's reports (GET /api/v1/students/{student_id}/reports), through the wire.

A reader the rule lets through gets the student's reports (none yet here: the flow that makes them is in
tests/test_exam_attempts.py); everyone else PERMISSION_DENIED before anything is read.
"""

from __future__ import annotations

import grpc
import pytest

from megacity.auth.v1 import auth_service_pb2 as auth_pb
from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import exam_service_pb2_grpc
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2 as tenant_pb
from services.exam.access import may_read_student_results
from services.runtime.tokens import AccessClaims
from tests.support.accounts import Caller, People


async def _outcome(exam: exam_service_pb2_grpc.ExamServiceStub, caller: Caller, student_id: str) -> grpc.StatusCode:
    try:
        await exam.ListStudentReports(pb.ListStudentReportsRequest(student_id=student_id), metadata=caller.metadata())
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_reports_are_for_the_student_approved_parents_and_their_orgs_staff(
    people: People, exam: exam_service_pb2_grpc.ExamServiceStub
) -> None:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    org = (
        await people.tenant.CreateOrganization(
            tenant_pb.CreateOrganizationRequest(organization=tenant_resources.Organization(name="Academy")),
            metadata=zone_admin.metadata(),
        )
    ).organization
    other_org = (
        await people.tenant.CreateOrganization(
            tenant_pb.CreateOrganizationRequest(organization=tenant_resources.Organization(name="Other")),
            metadata=zone_admin.metadata(),
        )
    ).organization
    student_email = await people.add_user("univ", org.id, "student")
    student = await people.sign_in("univ", student_email)
    student_id = (await people.auth.GetMe(auth_pb.GetMeRequest(), metadata=student.metadata())).user.id
    parent = await people.as_new_user("univ", "univ-public", "parent")
    await people.auth.RequestParentLink(
        auth_pb.RequestParentLinkRequest(student_email=student_email), metadata=parent.metadata()
    )
    allowed = grpc.StatusCode.OK
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert await _outcome(exam, parent, student_id) is denied  # pending, not approved yet
    parent_id = (await people.auth.GetMe(auth_pb.GetMeRequest(), metadata=parent.metadata())).user.id
    await people.auth.ApproveParentLink(
        auth_pb.ApproveParentLinkRequest(parent_id=parent_id), metadata=student.metadata()
    )
    cases = {
        "the student": (student, allowed),
        "an approved parent": (parent, allowed),
        "a teacher of the student's org": (await people.as_new_user("univ", org.id, "teacher"), allowed),
        "an org_admin of the student's org": (await people.as_new_user("univ", org.id, "org_admin"), allowed),
        "the zone's admin": (zone_admin, allowed),
        "a teacher of another org": (await people.as_new_user("univ", other_org.id, "teacher"), denied),
        "another student": (await people.as_new_user("univ", org.id, "student"), denied),
        "another parent": (await people.as_new_user("univ", "univ-public", "parent"), denied),
        "a teacher of another zone": (await people.as_new_user("kzone", "kzone-public", "teacher"), denied),
    }
    outcomes = {who: await _outcome(exam, caller, student_id) for who, (caller, _) in cases.items()}
    assert outcomes == {who: expected for who, (_, expected) in cases.items()}
    assert await _outcome(exam, zone_admin, "no-such-student") is grpc.StatusCode.NOT_FOUND


def _reader(role: str, zone: str = "univ", org: str = "org-a", user_id: str = "reader") -> AccessClaims:
    return AccessClaims(
        user_id=user_id,
        email="",
        zone_id=zone,
        org_id=org,
        role=role,
        permissions=(),
        issued_at=0,
        expires_at=0,
        jti="j",
        session_id="s",
    )


@pytest.mark.parametrize(
    ("reader", "approved", "expected"),
    [
        (_reader("student", user_id="student-1"), False, True),
        (_reader("student"), False, False),
        (_reader("parent"), True, True),
        (_reader("parent"), False, False),
        (_reader("teacher"), False, True),
        (_reader("teacher", org="org-b"), False, False),
        (_reader("org_admin"), False, True),
        (_reader("zone_admin", org="org-b"), False, True),
        (_reader("zone_admin", zone="kzone"), False, False),
        (_reader("super_admin", zone="kzone"), False, True),
        (_reader("guest"), False, False),
        (_reader("parent", zone="kzone"), True, False),
    ],
)
def test_the_rule(reader: AccessClaims, approved: bool, expected: bool) -> None:
    assert may_read_student_results(reader, "univ", "org-a", "student-1", approved_parent=approved) is expected
