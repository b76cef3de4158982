"""Users of an organisation, invite codes, the caller's own profile, and parent-student links, through the wire."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from megacity.auth.v1 import auth_service_pb2 as pb
from megacity.auth.v1 import auth_service_pb2_grpc, resources_pb2
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2
from tests.support.accounts import PASSWORD, Caller, People, reason
from tests.support.mesh import channel_as


async def _fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call  # type: ignore[misc]
    return failure.value


async def _academy(people: People, zone_admin: Caller, name: str = "Academy") -> tenant_resources.Organization:
    request = tenant_service_pb2.CreateOrganizationRequest(organization=tenant_resources.Organization(name=name))
    return (await people.tenant.CreateOrganization(request, metadata=zone_admin.metadata())).organization


def _new_user(email: str, role: resources_pb2.Role.ValueType, org_id: str = "") -> pb.CreateUserRequest:
    return pb.CreateUserRequest(
        user=resources_pb2.User(email=email, name="New", role=role, org_id=org_id), password=PASSWORD
    )


async def test_an_org_admin_creates_users_of_their_org_up_to_their_own_role(people: People) -> None:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    academy = await _academy(people, zone_admin)
    org_admin = await people.as_new_user("univ", academy.id, "org_admin")
    teacher = (
        await people.auth.CreateUser(
            _new_user("t@example.com", resources_pb2.ROLE_TEACHER), metadata=org_admin.metadata()
        )
    ).user
    assert (teacher.zone_id, teacher.org_id, teacher.role) == ("univ", academy.id, resources_pb2.ROLE_TEACHER)
    above = await _fails(
        people.auth.CreateUser(_new_user("z@example.com", resources_pb2.ROLE_ZONE_ADMIN), metadata=org_admin.metadata())
    )
    assert (above.code(), reason(above)) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    other_org = await _fails(
        people.auth.CreateUser(
            _new_user("o@example.com", resources_pb2.ROLE_STUDENT, "univ-public"), metadata=org_admin.metadata()
        )
    )
    assert reason(other_org) == "OUT_OF_SCOPE"
    # The new teacher signs in; the org_admin lists their org's users only.
    await people.sign_in("univ", "t@example.com")
    listed = await people.auth.ListUsers(pb.ListUsersRequest(), metadata=org_admin.metadata())
    assert {u.email for u in listed.users} == {"t@example.com", teacher.email} | {
        u.email for u in listed.users if u.role == resources_pb2.ROLE_ORG_ADMIN
    }
    assert all(u.org_id == academy.id for u in listed.users)
    assert listed.total_size == 2


async def test_role_changes_and_deactivation_end_the_users_sessions(people: People) -> None:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    academy = await _academy(people, zone_admin)
    email = await people.add_user("univ", academy.id, "student")
    student = await people.sign_in("univ", email)
    me = (await people.auth.GetMe(pb.GetMeRequest(), metadata=student.metadata())).user
    promoted = await people.auth.UpdateUser(
        pb.UpdateUserRequest(
            user_id=me.id,
            user=resources_pb2.User(role=resources_pb2.ROLE_TEACHER),
            update_mask=field_mask_pb2.FieldMask(paths=["role"]),
        ),
        metadata=zone_admin.metadata(),
    )
    assert promoted.user.role == resources_pb2.ROLE_TEACHER
    stale = await _fails(people.auth.GetMe(pb.GetMeRequest(), metadata=student.metadata()))
    assert reason(stale) == "TOKEN_REVOKED"
    teacher = await people.sign_in("univ", email)
    assert "item:create" in (await people.auth.GetMe(pb.GetMeRequest(), metadata=teacher.metadata())).user.permissions
    await people.auth.DeactivateUser(pb.DeactivateUserRequest(user_id=me.id), metadata=zone_admin.metadata())
    assert reason(await _fails(people.auth.GetMe(pb.GetMeRequest(), metadata=teacher.metadata()))) == "TOKEN_REVOKED"
    refused = await _fails(people.sign_in("univ", email))
    assert (refused.code(), reason(refused)) == (grpc.StatusCode.PERMISSION_DENIED, "ACCOUNT_DISABLED")
    await people.auth.ReactivateUser(pb.ReactivateUserRequest(user_id=me.id), metadata=zone_admin.metadata())
    await people.sign_in("univ", email)


async def test_admins_see_no_user_outside_their_scope(people: People) -> None:
    univ_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    kzone_admin = await people.as_new_user("kzone", "kzone-public", "zone_admin")
    email = await people.add_user("kzone", "kzone-public", "student")
    student = await people.sign_in("kzone", email)
    student_id = (await people.auth.GetMe(pb.GetMeRequest(), metadata=student.metadata())).user.id
    for call in (
        people.auth.GetUser(pb.GetUserRequest(user_id=student_id), metadata=univ_admin.metadata()),
        people.auth.DeactivateUser(pb.DeactivateUserRequest(user_id=student_id), metadata=univ_admin.metadata()),
        people.auth.SetUserPassword(
            pb.SetUserPasswordRequest(user_id=student_id, new_password="Another-pass-2"), metadata=univ_admin.metadata()
        ),
    ):
        assert (await _fails(call)).code() is grpc.StatusCode.NOT_FOUND
    found = await people.auth.GetUser(pb.GetUserRequest(user_id=student_id), metadata=kzone_admin.metadata())
    assert found.user.email == email


async def test_an_admin_resets_a_password_and_clears_the_lock(people: People) -> None:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    email = await people.add_user("univ", "univ-public", "student")
    student = await people.sign_in("univ", email)
    student_id = (await people.auth.GetMe(pb.GetMeRequest(), metadata=student.metadata())).user.id
    reset = await people.auth.SetUserPassword(
        pb.SetUserPasswordRequest(user_id=student_id, new_password="Another-pass-2"), metadata=zone_admin.metadata()
    )
    assert reset.sessions_revoked == 1
    assert reason(await _fails(people.sign_in("univ", email))) == "INVALID_CREDENTIALS"
    await people.sign_in("univ", email, "Another-pass-2")
    weak = await _fails(
        people.auth.SetUserPassword(
            pb.SetUserPasswordRequest(user_id=student_id, new_password="weak"), metadata=zone_admin.metadata()
        )
    )
    assert reason(weak) == "PASSWORD_TOO_WEAK"


async def test_the_caller_updates_their_profile_and_password(people: People) -> None:
    email = await people.add_user("univ", "univ-public", "student")
    caller = await people.sign_in("univ", email)
    other = await people.sign_in("univ", email)
    updated = await people.auth.UpdateMe(
        pb.UpdateMeRequest(
            user=resources_pb2.User(name="Mina Kim", phone_number="+821099998888"),
            update_mask=field_mask_pb2.FieldMask(paths=["name", "phone_number"]),
        ),
        metadata=caller.metadata(),
    )
    assert (updated.user.name, updated.user.phone_number) == ("Mina Kim", "+821099998888")
    role_change = await _fails(
        people.auth.UpdateMe(
            pb.UpdateMeRequest(
                user=resources_pb2.User(role=resources_pb2.ROLE_SUPER_ADMIN),
                update_mask=field_mask_pb2.FieldMask(paths=["role"]),
            ),
            metadata=caller.metadata(),
        )
    )
    assert role_change.code() is grpc.StatusCode.INVALID_ARGUMENT
    wrong = await _fails(
        people.auth.ChangePassword(
            pb.ChangePasswordRequest(current_password="nope", new_password="Another-pass-2"), metadata=caller.metadata()
        )
    )
    assert reason(wrong) == "INVALID_CREDENTIALS"
    changed = await people.auth.ChangePassword(
        pb.ChangePasswordRequest(current_password=PASSWORD, new_password="Another-pass-2"), metadata=caller.metadata()
    )
    assert changed.sessions_revoked == 1
    await people.auth.GetMe(pb.GetMeRequest(), metadata=caller.metadata())
    assert reason(await _fails(people.auth.GetMe(pb.GetMeRequest(), metadata=other.metadata()))) == "TOKEN_REVOKED"


async def test_an_invite_code_joins_its_org_with_its_role_until_used_up(people: People) -> None:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    academy = await _academy(people, zone_admin)
    org_admin = await people.as_new_user("univ", academy.id, "org_admin")
    invite = (
        await people.auth.CreateInviteCode(
            pb.CreateInviteCodeRequest(
                invite_code=resources_pb2.InviteCode(role=resources_pb2.ROLE_TEACHER, max_uses=1)
            ),
            metadata=org_admin.metadata(),
        )
    ).invite_code
    assert invite.code
    assert invite.status == resources_pb2.INVITE_CODE_STATUS_ACTIVE
    registered = await people.auth.Register(
        pb.RegisterRequest(email="new@example.com", password=PASSWORD, name="New", invite_code=invite.code.lower()),
        metadata=Caller("univ").metadata(),
    )
    assert (registered.user.org_id, registered.user.role) == (academy.id, resources_pb2.ROLE_TEACHER)
    used_up = await _fails(
        people.auth.Register(
            pb.RegisterRequest(email="late@example.com", password=PASSWORD, name="Late", invite_code=invite.code),
            metadata=Caller("univ").metadata(),
        )
    )
    assert (used_up.code(), reason(used_up)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVITE_INVALID")
    listed = (
        await people.auth.ListInviteCodes(pb.ListInviteCodesRequest(), metadata=org_admin.metadata())
    ).invite_codes
    assert [(i.id, i.status, i.use_count, i.code) for i in listed] == [
        (invite.id, resources_pb2.INVITE_CODE_STATUS_EXHAUSTED, 1, "")
    ]
    revocable = (
        await people.auth.CreateInviteCode(
            pb.CreateInviteCodeRequest(
                invite_code=resources_pb2.InviteCode(role=resources_pb2.ROLE_STUDENT, max_uses=5)
            ),
            metadata=org_admin.metadata(),
        )
    ).invite_code
    await people.auth.RevokeInviteCode(
        pb.RevokeInviteCodeRequest(invite_code_id=revocable.id), metadata=org_admin.metadata()
    )
    revoked = await _fails(
        people.auth.Register(
            pb.RegisterRequest(email="r@example.com", password=PASSWORD, name="R", invite_code=revocable.code),
            metadata=Caller("univ").metadata(),
        )
    )
    assert reason(revoked) == "INVITE_INVALID"
    # An invite of another zone's org does not work here.
    kzone = await _fails(
        people.auth.Register(
            pb.RegisterRequest(email="k@example.com", password=PASSWORD, name="K", invite_code=invite.code),
            metadata=Caller("kzone").metadata(),
        )
    )
    assert reason(kzone) == "INVITE_INVALID"


async def test_parent_links_need_the_students_approval(people: People) -> None:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    academy = await _academy(people, zone_admin)
    student_email = await people.add_user("univ", academy.id, "student")
    student = await people.sign_in("univ", student_email)
    parent = await people.as_new_user("univ", "univ-public", "parent")
    stranger = await people.as_new_user("univ", "univ-public", "parent")
    student_id = (await people.auth.GetMe(pb.GetMeRequest(), metadata=student.metadata())).user.id
    parent_id = (await people.auth.GetMe(pb.GetMeRequest(), metadata=parent.metadata())).user.id
    stranger_id = (await people.auth.GetMe(pb.GetMeRequest(), metadata=stranger.metadata())).user.id

    link = (
        await people.auth.RequestParentLink(
            pb.RequestParentLinkRequest(student_email=student_email.upper()), metadata=parent.metadata()
        )
    ).link
    assert link.status == resources_pb2.PARENT_LINK_STATUS_PENDING
    again = await people.auth.RequestParentLink(
        pb.RequestParentLinkRequest(student_email=student_email), metadata=parent.metadata()
    )
    assert again.link.id == link.id
    check = pb.CheckParentLinkRequest(parent_id=parent_id, student_id=student_id)
    assert not (await _internal_check(people, check)).approved

    pending = (await people.auth.ListParentLinks(pb.ListParentLinksRequest(), metadata=student.metadata())).links
    assert [(li.parent_id, li.status) for li in pending] == [(parent_id, resources_pb2.PARENT_LINK_STATUS_PENDING)]
    not_student = await _fails(
        people.auth.ApproveParentLink(pb.ApproveParentLinkRequest(parent_id=parent_id), metadata=parent.metadata())
    )
    assert reason(not_student) == "ROLE_NOT_ALLOWED"
    approved = await people.auth.ApproveParentLink(
        pb.ApproveParentLinkRequest(parent_id=parent_id), metadata=student.metadata()
    )
    assert approved.link.status == resources_pb2.PARENT_LINK_STATUS_APPROVED
    assert (await _internal_check(people, check)).approved
    nobody = await _fails(
        people.auth.ApproveParentLink(pb.ApproveParentLinkRequest(parent_id=stranger_id), metadata=student.metadata())
    )
    assert nobody.code() is grpc.StatusCode.NOT_FOUND
    # A teacher of the student's org sees the link; a parent only their own; the stranger none.
    teacher = await people.as_new_user("univ", academy.id, "teacher")
    seen = await people.auth.ListParentLinks(
        pb.ListParentLinksRequest(student_id=student_id), metadata=teacher.metadata()
    )
    assert [li.id for li in seen.links] == [link.id]
    assert not (await people.auth.ListParentLinks(pb.ListParentLinksRequest(), metadata=stranger.metadata())).links
    # A student cannot be the parent side; a parent cannot link a non-student.
    not_parent = await _fails(
        people.auth.RequestParentLink(
            pb.RequestParentLinkRequest(student_email="x@example.com"), metadata=student.metadata()
        )
    )
    assert reason(not_parent) == "ROLE_NOT_ALLOWED"
    teacher_email = (await people.auth.GetMe(pb.GetMeRequest(), metadata=teacher.metadata())).user.email
    missing = await _fails(
        people.auth.RequestParentLink(
            pb.RequestParentLinkRequest(student_email=teacher_email), metadata=parent.metadata()
        )
    )
    assert missing.code() is grpc.StatusCode.NOT_FOUND
    # Either side unlinks.
    unlinked = await people.auth.UnlinkParent(pb.UnlinkParentRequest(link_id=link.id), metadata=student.metadata())
    assert unlinked.link.status == resources_pb2.PARENT_LINK_STATUS_UNLINKED
    assert not (await _internal_check(people, check)).approved


async def _internal_check(people: People, request: pb.CheckParentLinkRequest) -> pb.CheckParentLinkResponse:
    """CheckParentLink as the exam service calls it (mesh identity, no person)."""
    async with channel_as("exam", people.auth_service, people.pki_dir) as channel:
        return await auth_service_pb2_grpc.AuthServiceStub(channel).CheckParentLink(request)


async def test_text_the_database_cannot_hold_is_the_callers_error(people: People) -> None:
    admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    error = await _fails(people.auth.GetUser(pb.GetUserRequest(user_id="a\x00b"), metadata=admin.metadata()))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "NUL" in (error.details() or "")


async def test_an_admin_lists_the_sessions_of_a_user_in_scope_only(people: People) -> None:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    academy = await _academy(people, zone_admin)
    email = await people.add_user("univ", academy.id, "student")
    student = await people.sign_in("univ", email)
    await people.sign_in("univ", email)
    student_id = (await people.auth.GetMe(pb.GetMeRequest(), metadata=student.metadata())).user.id
    listed = await people.auth.ListSessions(pb.ListSessionsRequest(user_id=student_id), metadata=zone_admin.metadata())
    assert len(listed.sessions) == 2
    assert not any(session.current for session in listed.sessions)  # neither is the admin's own
    # A classmate may not look, nor an administrator of another zone.
    classmate = await people.sign_in("univ", await people.add_user("univ", academy.id, "student"))
    kzone_admin = await people.as_new_user("kzone", "kzone-public", "zone_admin")
    for caller, code in ((classmate, grpc.StatusCode.PERMISSION_DENIED), (kzone_admin, grpc.StatusCode.NOT_FOUND)):
        refused = await _fails(
            people.auth.ListSessions(pb.ListSessionsRequest(user_id=student_id), metadata=caller.metadata())
        )
        assert refused.code() is code
