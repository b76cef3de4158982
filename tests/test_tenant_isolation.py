"""Tenant isolation, property-based: people of another organisation or zone can neither read nor change anything
of an organisation through any RPC, whatever ids they try (the real ones or made-up ones)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import pytest
from google.protobuf import field_mask_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacity.auth.v1 import auth_service_pb2 as pb
from megacity.auth.v1 import resources_pb2
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2 as tenant_pb
from tests.support.accounts import Caller, People


@dataclass
class Victim:
    """Organisation A of zone univ, with what its people own."""

    org_id: str
    admin: Caller
    student: Caller
    student_id: str
    invite_code_id: str
    session_id: str
    link_id: str
    parent_id: str

    def ids(self) -> list[str]:
        return [self.org_id, self.student_id, self.invite_code_id, self.session_id, self.link_id, self.parent_id]


_Listed = TypeVar("_Listed")
Operation = Callable[[People, Caller, str], Awaitable[object]]
_MASK_NAME = field_mask_pb2.FieldMask(paths=["name"])

OPERATIONS: dict[str, Operation] = {
    "GetUser": lambda p, c, i: p.auth.GetUser(pb.GetUserRequest(user_id=i), metadata=c.metadata()),
    "UpdateUser": lambda p, c, i: p.auth.UpdateUser(
        pb.UpdateUserRequest(user_id=i, user=resources_pb2.User(name="Hijacked"), update_mask=_MASK_NAME),
        metadata=c.metadata(),
    ),
    "DeactivateUser": lambda p, c, i: p.auth.DeactivateUser(pb.DeactivateUserRequest(user_id=i), metadata=c.metadata()),
    "SetUserPassword": lambda p, c, i: p.auth.SetUserPassword(
        pb.SetUserPasswordRequest(user_id=i, new_password="Hijacked-pass-1"), metadata=c.metadata()
    ),
    "RevokeSession": lambda p, c, i: p.auth.RevokeSession(pb.RevokeSessionRequest(session_id=i), metadata=c.metadata()),
    "RevokeInviteCode": lambda p, c, i: p.auth.RevokeInviteCode(
        pb.RevokeInviteCodeRequest(invite_code_id=i), metadata=c.metadata()
    ),
    "UnlinkParent": lambda p, c, i: p.auth.UnlinkParent(pb.UnlinkParentRequest(link_id=i), metadata=c.metadata()),
    "ApproveParentLink": lambda p, c, i: p.auth.ApproveParentLink(
        pb.ApproveParentLinkRequest(parent_id=i), metadata=c.metadata()
    ),
    "GetOrganization": lambda p, c, i: p.tenant.GetOrganization(
        tenant_pb.GetOrganizationRequest(org_id=i), metadata=c.metadata()
    ),
    "UpdateOrganization": lambda p, c, i: p.tenant.UpdateOrganization(
        tenant_pb.UpdateOrganizationRequest(
            org_id=i, organization=tenant_resources.Organization(name="Hijacked"), update_mask=_MASK_NAME
        ),
        metadata=c.metadata(),
    ),
    "SuspendOrganization": lambda p, c, i: p.tenant.SuspendOrganization(
        tenant_pb.SuspendOrganizationRequest(org_id=i, reason="hijack"), metadata=c.metadata()
    ),
}
REFUSALS = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT}


async def _victim(people: People) -> Victim:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    org = (
        await people.tenant.CreateOrganization(
            tenant_pb.CreateOrganizationRequest(organization=tenant_resources.Organization(name="Academy A")),
            metadata=zone_admin.metadata(),
        )
    ).organization
    admin = await people.as_new_user("univ", org.id, "org_admin")
    student_email = await people.add_user("univ", org.id, "student")
    student = await people.sign_in("univ", student_email)
    me = await people.auth.GetMe(pb.GetMeRequest(), metadata=student.metadata())
    sessions = await people.auth.ListSessions(pb.ListSessionsRequest(), metadata=student.metadata())
    invite = await people.auth.CreateInviteCode(
        pb.CreateInviteCodeRequest(invite_code=resources_pb2.InviteCode(role=resources_pb2.ROLE_STUDENT)),
        metadata=admin.metadata(),
    )
    parent = await people.as_new_user("univ", "univ-public", "parent")
    link = await people.auth.RequestParentLink(
        pb.RequestParentLinkRequest(student_email=student_email), metadata=parent.metadata()
    )
    return Victim(
        org_id=org.id,
        admin=admin,
        student=student,
        student_id=me.user.id,
        invite_code_id=invite.invite_code.id,
        session_id=sessions.sessions[0].id,
        link_id=link.link.id,
        parent_id=link.link.parent_id,
    )


async def _attackers(people: People) -> list[Caller]:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    org_b = (
        await people.tenant.CreateOrganization(
            tenant_pb.CreateOrganizationRequest(organization=tenant_resources.Organization(name="Academy B")),
            metadata=zone_admin.metadata(),
        )
    ).organization
    return [
        await people.as_new_user("univ", org_b.id, "org_admin"),
        await people.as_new_user("univ", org_b.id, "teacher"),
        await people.as_new_user("univ", org_b.id, "student"),
        await people.as_new_user("univ", "univ-public", "parent"),
        await people.as_new_user("kzone", "kzone-public", "zone_admin"),
        await people.as_new_user("kzone", "kzone-public", "org_admin"),
    ]


async def _untouched(people: People, victim: Victim) -> None:
    user = (
        await people.auth.GetUser(pb.GetUserRequest(user_id=victim.student_id), metadata=victim.admin.metadata())
    ).user
    assert (user.name, user.status) == ("Student", resources_pb2.USER_STATUS_ACTIVE)
    organization = (
        await people.tenant.GetOrganization(
            tenant_pb.GetOrganizationRequest(org_id=victim.org_id), metadata=victim.admin.metadata()
        )
    ).organization
    assert (organization.name, organization.status) == ("Academy A", tenant_resources.ORGANIZATION_STATUS_ACTIVE)
    await people.auth.GetMe(pb.GetMeRequest(), metadata=victim.student.metadata())  # the session lives
    invites = await people.auth.ListInviteCodes(pb.ListInviteCodesRequest(), metadata=victim.admin.metadata())
    assert [i.status for i in invites.invite_codes] == [resources_pb2.INVITE_CODE_STATUS_ACTIVE]
    links = await people.auth.ListParentLinks(pb.ListParentLinksRequest(), metadata=victim.student.metadata())
    assert [li.status for li in links.links] == [resources_pb2.PARENT_LINK_STATUS_PENDING]


@pytest.fixture
async def world(people: People) -> tuple[Victim, list[Caller]]:
    return await _victim(people), await _attackers(people)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_nobody_outside_an_org_reads_or_changes_it(
    people: People, world: tuple[Victim, list[Caller]], data: st.DataObject
) -> None:
    victim, attackers = world
    attacker = data.draw(st.sampled_from(attackers), label="attacker")
    operation = data.draw(st.sampled_from(sorted(OPERATIONS)), label="operation")
    target = data.draw(st.one_of(st.sampled_from(victim.ids()), st.text(max_size=40)), label="id")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await OPERATIONS[operation](people, attacker, target)
    assert refused.value.code() in REFUSALS
    await _untouched(people, victim)


async def test_lists_show_nothing_of_another_org(people: People, world: tuple[Victim, list[Caller]]) -> None:
    victim, attackers = world
    for attacker in attackers:
        users = await _list_or_refused(
            people.auth.ListUsers(pb.ListUsersRequest(org_id=victim.org_id), metadata=attacker.metadata())
        )
        assert users is None or not users.users
        orgs = await _list_or_refused(
            people.tenant.ListOrganizations(tenant_pb.ListOrganizationsRequest(), metadata=attacker.metadata())
        )
        assert orgs is None or victim.org_id not in {o.id for o in orgs.organizations}
        invites = await _list_or_refused(
            people.auth.ListInviteCodes(pb.ListInviteCodesRequest(org_id=victim.org_id), metadata=attacker.metadata())
        )
        assert invites is None or not invites.invite_codes
        links = await _list_or_refused(
            people.auth.ListParentLinks(
                pb.ListParentLinksRequest(student_id=victim.student_id), metadata=attacker.metadata()
            )
        )
        assert links is None or not links.links


async def _list_or_refused(call: Awaitable[_Listed]) -> _Listed | None:
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        code = error.code()
    assert code in REFUSALS
    return None
