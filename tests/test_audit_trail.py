"""The audit trail through the wire: services record what they decide; admins read and verify it."""

from __future__ import annotations

import asyncpg
import grpc
import pytest

from megacity.auth.v1 import auth_service_pb2 as pb
from megacity.auth.v1 import auth_service_pb2_grpc, resources_pb2
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2
from services.runtime.errors import field_violations, status_from_error
from tests.support.accounts import Caller, People, reason
from tests.support.mesh import channel_as


async def _records(people: People, admin: Caller, **filters: str) -> list[resources_pb2.AuditRecord]:
    reply = await people.auth.ListAuditLogs(pb.ListAuditLogsRequest(**filters), metadata=admin.metadata())  # type: ignore[arg-type]
    return list(reply.records)


async def test_logins_failures_denials_and_org_changes_are_recorded(people: People) -> None:
    admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    email = await people.add_user("univ", "univ-public", "student")
    with pytest.raises(grpc.aio.AioRpcError):
        await people.sign_in("univ", email, "Wrong-pass-1")
    student = await people.sign_in("univ", email)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await people.auth.ListUsers(pb.ListUsersRequest(), metadata=student.metadata())
    assert reason(denied.value) == "PERMISSION_MISSING"
    await people.tenant.CreateOrganization(
        tenant_service_pb2.CreateOrganizationRequest(organization=tenant_resources.Organization(name="Academy")),
        metadata=admin.metadata(),
    )
    await people.auth.Logout(pb.LogoutRequest(), metadata=student.metadata())

    records = await _records(people, admin)
    actions = [(r.action, r.outcome) for r in records]
    for expected in (
        ("login_failed", resources_pb2.AUDIT_OUTCOME_FAILURE),
        ("login", resources_pb2.AUDIT_OUTCOME_SUCCESS),
        ("permission_denied", resources_pb2.AUDIT_OUTCOME_DENIED),
        ("org_change", resources_pb2.AUDIT_OUTCOME_SUCCESS),
        ("logout", resources_pb2.AUDIT_OUTCOME_SUCCESS),
    ):
        assert expected in actions
    # Newest first, one zone's chain, each record written by the service that decided it.
    assert [r.sequence for r in records] == sorted((r.sequence for r in records), reverse=True)
    writers = {r.action: r.actor_service for r in records}
    assert (writers["permission_denied"], writers["org_change"], writers["login"]) == ("auth", "tenant", "auth")
    denial = next(r for r in records if r.action == "permission_denied")
    assert denial.resource_id == "/megacity.auth.v1.AuthService/ListUsers"
    assert denial.ip_address == student.address
    assert denial.details.fields["permission"].string_value == "user:read"
    logins = await _records(people, admin, action="login")
    assert {r.action for r in logins} == {"login"}


async def test_students_cannot_read_the_audit_log_and_zones_are_separate(people: People) -> None:
    student = await people.as_new_user("univ", "univ-public", "student")
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await people.auth.ListAuditLogs(pb.ListAuditLogsRequest(), metadata=student.metadata())
    assert reason(denied.value) == "PERMISSION_MISSING"
    kzone_admin = await people.as_new_user("kzone", "kzone-public", "zone_admin")
    assert {r.zone_id for r in await _records(people, kzone_admin)} == {"kzone"}


async def test_the_chain_verifies_and_an_edited_row_is_found(people: People, fresh_database: str) -> None:
    admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    for _ in range(3):
        await people.sign_in("univ", (await people.auth.GetMe(pb.GetMeRequest(), metadata=admin.metadata())).user.email)
    intact = await people.auth.VerifyAuditChain(pb.VerifyAuditChainRequest(), metadata=admin.metadata())
    assert intact.intact
    assert intact.records_checked >= 4
    victim = (await _records(people, admin, action="login"))[-1]
    # Someone with database superuser rights rewrites history (the service's own role cannot: append-only).
    connection = await asyncpg.connect(fresh_database)
    try:
        await connection.execute("SET session_replication_role = replica")
        await connection.execute("UPDATE auth.audit_records SET action = 'logout' WHERE id = $1", victim.id)
    finally:
        await connection.close()
    broken = await people.auth.VerifyAuditChain(pb.VerifyAuditChainRequest(), metadata=admin.metadata())
    assert not broken.intact
    assert (broken.first_broken_record.id, broken.failure) == (victim.id, "hash mismatch")
    other_zone = await people.as_new_user("kzone", "kzone-public", "zone_admin")
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await people.auth.VerifyAuditChain(pb.VerifyAuditChainRequest(zone_id="univ"), metadata=other_zone.metadata())
    assert reason(denied.value) == "OUT_OF_SCOPE"


async def test_services_write_records_idempotently(people: People) -> None:
    record = resources_pb2.AuditRecord(
        id="7d0b2c1e-3f4a-4b5c-8d6e-9f0a1b2c3d4e",
        zone_id="univ",
        action="create",
        outcome=resources_pb2.AUDIT_OUTCOME_SUCCESS,
        resource_type="exam",
        resource_id="exam-1",
    )
    record.event_time.GetCurrentTime()
    async with channel_as("exam", people.auth_service, people.pki_dir) as channel:
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        first = (await stub.WriteAuditRecord(pb.WriteAuditRecordRequest(record=record))).record
        again = (await stub.WriteAuditRecord(pb.WriteAuditRecordRequest(record=record))).record
        assert (first.sequence, first.hash) == (again.sequence, again.hash)
        assert first.actor_service == "exam"
        bad = resources_pb2.AuditRecord(id="not-a-uuid", zone_id="univ", action="Bad Action!")
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.WriteAuditRecord(pb.WriteAuditRecordRequest(record=bad))
    assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    fields = {field for field, _ in field_violations(status_from_error(invalid.value))}
    assert {"record.id", "record.action", "record.event_time"} <= fields
