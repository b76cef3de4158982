"""Every public RPC of the built services succeeds through a real Envoy edge over REST/JSON.

Issue 5 asks for every public RPC reached through the edge at least once with a success and with an error; the
errors are tests/test_edge_wire.py's. Here each service's RPCs are walked as a story, by people holding the roles
the contracts ask for, with valid input: each call must answer HTTP 200 with a body that shows it did its work,
and at the end the operations that succeeded must be exactly the service's operations in the OpenAPI document. The
services not built yet are listed in NOT_BUILT_YET: each must still answer 501, and together with the built ones
they must be the whole document, so a newly built or newly added RPC fails here until its story covers it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from megacity.kzone.v1 import resources_pb2 as kzone_resources
from services.auth import mfa
from services.kzone.store import KZoneStore, Owner
from services.runtime.database import create_pool
from services.runtime.server import Service
from tests.support.accounts import PASSWORD, People
from tests.support.calibration import ITEMS_CSV as CALIBRATION_ITEMS
from tests.support.calibration import N_ITEMS, N_PERSONS, seed_bank
from tests.support.edge import KZONE, running_edge
from tests.support.edge_scenario import Scenario, operations, operations_of, reason_of
from tests.support.exams import ITEMS
from tests.support.inference import person_photo, speak, word_accuracy
from tests.support.kzone import isolated_kzone
from tests.support.mesh import make_config, mesh_catalog, running

BUILT = ("AuthService", "TenantService", "ExamService", "KZoneService")

# Public RPCs of services not built yet: they answer UNIMPLEMENTED (HTTP 501). Building one means moving its
# operations out of here and into a story above.
NOT_BUILT_YET = frozenset(
    {
        "JobsService_AdjustCredits",
        "JobsService_CancelJob",
        "JobsService_GetCreditBalance",
        "JobsService_GetJob",
        "JobsService_ListCreditLedger",
        "JobsService_ListJobs",
        "JobsService_ListPlans",
        "JobsService_SubmitJob",
        "JobsService_WatchJob",
        "TutorService_AskTutor",
        "TutorService_CancelTutoringSession",
        "TutorService_CompleteTutoringSession",
        "TutorService_CreateAssignment",
        "TutorService_CreateTutoringSession",
        "TutorService_DeleteAssignment",
        "TutorService_DeleteConversation",
        "TutorService_GetAssignment",
        "TutorService_GetConversation",
        "TutorService_GetSubmission",
        "TutorService_GetTutoringSession",
        "TutorService_GradeSubmission",
        "TutorService_ListAssignments",
        "TutorService_ListConversations",
        "TutorService_ListMessages",
        "TutorService_ListSubmissions",
        "TutorService_ListTutoringSessions",
        "TutorService_RequestAiFeedback",
        "TutorService_SubmitAssignment",
        "TutorService_UpdateAssignment",
        "TutorService_UpdateTutoringSession",
    }
)


@pytest.fixture(autouse=True)
def media_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The kzone service's media store, private to the test, and no extraction worker (set before any service
    starts)."""
    return isolated_kzone(monkeypatch, tmp_path)


@pytest.fixture
async def identity_edge(people: People, tmp_path: Path) -> AsyncIterator[Scenario]:
    """The edge in front of the auth and tenant services, without rate limits (the stories make many calls)."""
    ports = {"auth": people.auth_service.port, "tenant": people.tenant_service.port}
    async with running_edge(people.pki_dir, ports, None, tmp_path) as edge:
        yield Scenario(edge)


@pytest.fixture
async def mesh_edge(people: People, people_services: dict[str, Service], tmp_path: Path) -> AsyncIterator[Scenario]:
    """The edge in front of every people-facing service, without rate limits."""
    ports = {name: service.port for name, service in people_services.items()}
    async with running_edge(people.pki_dir, ports, None, tmp_path) as edge:
        yield Scenario(edge)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _email(prefix: str) -> str:
    return f"{_unique(prefix)}@example.com"


def _assert_complete(scenario: Scenario, service: str) -> None:
    """Every operation of the service in the OpenAPI document (but those not built yet) succeeded in its story."""
    missing = operations_of(service) - NOT_BUILT_YET - scenario.succeeded
    assert sorted(missing) == [], f"{service} operations without a success case"


# --- auth ------------------------------------------------------------------------------------------------------


async def test_every_auth_rpc_succeeds_through_the_edge(people: People, identity_edge: Scenario) -> None:
    api = identity_edge
    since = datetime.now(UTC) - timedelta(minutes=1)
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")

    jwks = await api.ok("AuthService_GetJwks", host="localhost")
    assert jwks["keys"][0]["kty"] == "OKP"
    assert jwks["keys"][0]["kid"]

    # A student registers, logs in, reads and changes their profile, and rotates their refresh token.
    student_email = _email("ada")
    registered = await api.ok(
        "AuthService_Register",
        body={"email": student_email, "password": PASSWORD, "name": "Ada", "phone_number": "+821012345678"},
    )
    assert (registered["user"]["role"], registered["user"]["org_id"]) == ("ROLE_STUDENT", "univ-public")
    assert registered["token_type"] == "Bearer"
    student_id = registered["user"]["id"]
    login = await api.ok("AuthService_Login", body={"email": student_email, "password": PASSWORD})
    assert (login["user"]["id"], login["mfa_required"]) == (student_id, False)
    assert login["session_id"] != registered["session_id"]
    me = await api.ok("AuthService_GetMe", token=login["access_token"])
    assert (me["user"]["email"], me["user"]["phone_number"]) == (student_email, "+821012345678")
    assert "attempt:create" in me["user"]["permissions"]
    updated = await api.ok(
        "AuthService_UpdateMe",
        token=login["access_token"],
        body={"user": {"name": "Ada Lovelace", "locale": "en-GB"}, "update_mask": "name,locale"},
    )
    assert (updated["user"]["name"], updated["user"]["locale"]) == ("Ada Lovelace", "en-GB")
    refreshed = await api.ok("AuthService_Refresh", body={"refresh_token": login["refresh_token"]})
    assert refreshed["session_id"] == login["session_id"]
    assert refreshed["access_token"] != login["access_token"]
    assert refreshed["refresh_token"] != login["refresh_token"]
    token = refreshed["access_token"]

    # MFA: enrol, confirm, new recovery codes, a login answered with one, then off again.
    enrolment = await api.ok("AuthService_EnrollMfa", token=token, body={"password": PASSWORD})
    assert enrolment["otpauth_uri"].startswith("otpauth://totp/")
    assert f"secret={enrolment['secret']}" in enrolment["otpauth_uri"]
    confirmed = await api.ok(
        "AuthService_ConfirmMfa", token=token, body={"code": mfa.totp_code(enrolment["secret"], time.time())}
    )
    assert confirmed["user"]["mfa_enabled"] is True
    assert len(confirmed["recovery_codes"]) == 10
    # The confirming code's time step is spent; the next one is within the accepted window.
    regenerated = await api.ok(
        "AuthService_RegenerateRecoveryCodes",
        token=token,
        body={"code": mfa.totp_code(enrolment["secret"], time.time() + mfa.TOTP_PERIOD_SECONDS)},
    )
    recovery = regenerated["recovery_codes"]
    assert len(recovery) == 10
    assert not set(recovery) & set(confirmed["recovery_codes"])
    challenged = await api.ok("AuthService_Login", body={"email": student_email, "password": PASSWORD})
    assert challenged["mfa_required"] is True
    assert challenged["access_token"] == ""
    verified = await api.ok(
        "AuthService_VerifyMfaChallenge",
        body={"challenge_token": challenged["mfa_challenge"]["challenge_token"], "recovery_code": recovery[0]},
    )
    assert verified["user"]["id"] == student_id
    assert verified["recovery_codes_remaining"] == 9
    assert verified["access_token"]
    disabled = await api.ok("AuthService_DisableMfa", token=token, body={"recovery_code": recovery[1]})
    assert disabled["user"]["mfa_enabled"] is False

    # Sessions: the registration's, the login's (this one) and the MFA login's; the first is revoked.
    sessions = (await api.ok("AuthService_ListSessions", token=token))["sessions"]
    by_id = {session["id"]: session for session in sessions}
    assert set(by_id) == {registered["session_id"], login["session_id"], verified["session_id"]}
    assert by_id[login["session_id"]]["current"] is True
    assert by_id[verified["session_id"]]["mfa_verified"] is True
    revoked = await api.ok("AuthService_RevokeSession", token=token, path={"session_id": registered["session_id"]})
    assert revoked == {}
    assert (await api.call("AuthService_GetMe", token=registered["access_token"])).status == 401
    remaining = (await api.ok("AuthService_ListSessions", token=token))["sessions"]
    assert {session["id"] for session in remaining} == {login["session_id"], verified["session_id"]}

    # A new password ends the other open session (the MFA login's) and is the one that works from now on.
    new_password = "Another-horse-7"
    changed = await api.ok(
        "AuthService_ChangePassword",
        token=token,
        body={"current_password": PASSWORD, "new_password": new_password},
    )
    assert changed["sessions_revoked"] == 1
    assert (await api.call("AuthService_GetMe", token=verified["access_token"])).status == 401
    assert (await api.call("AuthService_Login", body={"email": student_email, "password": PASSWORD})).status == 401
    await api.ok("AuthService_Login", body={"email": student_email, "password": new_password})

    # A zone admin invites parents, who register with the code; the code is listed with its uses, then revoked.
    invite = (
        await api.ok(
            "AuthService_CreateInviteCode",
            token=zone_admin.token,
            body={"invite_code": {"role": "ROLE_PARENT", "org_id": "univ-public", "max_uses": 3, "note": "parents"}},
        )
    )["invite_code"]
    assert (invite["role"], invite["status"], invite["max_uses"]) == ("ROLE_PARENT", "INVITE_CODE_STATUS_ACTIVE", 3)
    assert invite["code"]
    parents = []
    for name in ("Pat", "Sam"):
        parent = await api.ok(
            "AuthService_Register",
            body={"email": _email(name.lower()), "password": PASSWORD, "name": name, "invite_code": invite["code"]},
        )
        assert parent["user"]["role"] == "ROLE_PARENT"
        parents.append(parent)
    invites = (
        await api.ok(
            "AuthService_ListInviteCodes",
            token=zone_admin.token,
            query={"org_id": "univ-public", "status": "INVITE_CODE_STATUS_ACTIVE"},
        )
    )["invite_codes"]
    assert [(listed["id"], listed["use_count"]) for listed in invites] == [(invite["id"], 2)]
    revoked_invite = await api.ok(
        "AuthService_RevokeInviteCode", token=zone_admin.token, path={"invite_code_id": invite["id"]}
    )
    assert revoked_invite["invite_code"]["status"] == "INVITE_CODE_STATUS_REVOKED"

    # Parents ask to link the student: one is approved and later unlinked, the other rejected.
    pat, sam = parents
    requested = (
        await api.ok("AuthService_RequestParentLink", token=pat["access_token"], body={"student_email": student_email})
    )["link"]
    assert (requested["status"], requested["student_id"], requested["parent_id"]) == (
        "PARENT_LINK_STATUS_PENDING",
        student_id,
        pat["user"]["id"],
    )
    links = (await api.ok("AuthService_ListParentLinks", token=token))["links"]
    assert [(link["id"], link["status"]) for link in links] == [(requested["id"], "PARENT_LINK_STATUS_PENDING")]
    approved = await api.ok("AuthService_ApproveParentLink", token=token, path={"parent_id": pat["user"]["id"]})
    assert (approved["link"]["id"], approved["link"]["status"]) == (requested["id"], "PARENT_LINK_STATUS_APPROVED")
    unlinked = await api.ok("AuthService_UnlinkParent", token=pat["access_token"], path={"link_id": requested["id"]})
    assert unlinked["link"]["status"] == "PARENT_LINK_STATUS_UNLINKED"
    await api.ok("AuthService_RequestParentLink", token=sam["access_token"], body={"student_email": student_email})
    rejected = await api.ok("AuthService_RejectParentLink", token=token, path={"parent_id": sam["user"]["id"]})
    assert (rejected["link"]["parent_id"], rejected["link"]["status"]) == (
        sam["user"]["id"],
        "PARENT_LINK_STATUS_REJECTED",
    )

    # The zone admin manages a teacher's account: create, find, rename, deactivate, reactivate, reset the password.
    teacher_email = _email("teacher")
    created = (
        await api.ok(
            "AuthService_CreateUser",
            token=zone_admin.token,
            body={
                "user": {"email": teacher_email, "name": "Tess", "role": "ROLE_TEACHER", "org_id": "univ-public"},
                "password": PASSWORD,
            },
        )
    )["user"]
    assert (created["role"], created["status"], created["org_id"]) == (
        "ROLE_TEACHER",
        "USER_STATUS_ACTIVE",
        "univ-public",
    )
    teacher_id = created["id"]
    fetched = await api.ok("AuthService_GetUser", token=zone_admin.token, path={"user_id": teacher_id})
    assert fetched["user"]["email"] == teacher_email
    found = await api.ok(
        "AuthService_ListUsers",
        token=zone_admin.token,
        query={"query": teacher_email, "role": "ROLE_TEACHER", "status": "USER_STATUS_ACTIVE", "page_size": 10},
    )
    assert ([user["id"] for user in found["users"]], found["total_size"]) == ([teacher_id], 1)
    renamed = await api.ok(
        "AuthService_UpdateUser",
        token=zone_admin.token,
        path={"user_id": teacher_id},
        body={"user": {"name": "Tess Teacher"}, "update_mask": "name"},
    )
    assert renamed["user"]["name"] == "Tess Teacher"
    deactivated = await api.ok(
        "AuthService_DeactivateUser", token=zone_admin.token, path={"user_id": teacher_id}, body={"reason": "on leave"}
    )
    assert deactivated["user"]["status"] == "USER_STATUS_DEACTIVATED"
    refused = await api.call("AuthService_Login", body={"email": teacher_email, "password": PASSWORD})
    assert (refused.status, reason_of(refused)) == (403, "ACCOUNT_DISABLED"), refused.body
    reactivated = await api.ok("AuthService_ReactivateUser", token=zone_admin.token, path={"user_id": teacher_id})
    assert reactivated["user"]["status"] == "USER_STATUS_ACTIVE"
    teacher = await api.ok("AuthService_Login", body={"email": teacher_email, "password": PASSWORD})
    reset = await api.ok(
        "AuthService_SetUserPassword",
        token=zone_admin.token,
        path={"user_id": teacher_id},
        body={"new_password": new_password},
    )
    assert reset["sessions_revoked"] == 1
    assert (await api.call("AuthService_GetMe", token=teacher["access_token"])).status == 401
    await api.ok("AuthService_Login", body={"email": teacher_email, "password": new_password})

    # The audit trail has what happened, and its hash chain is intact.
    audit = await api.ok(
        "AuthService_ListAuditLogs",
        token=zone_admin.token,
        query={
            "start_time": since,
            "action": "deactivate",
            "resource_id": teacher_id,
            "outcome": "AUDIT_OUTCOME_SUCCESS",
        },
    )
    assert [(r["action"], r["resource_type"], r["actor_id"]) for r in audit["records"]] == [
        ("deactivate", "user", zone_admin.user_id)
    ]
    chain = await api.ok("AuthService_VerifyAuditChain", token=zone_admin.token)
    assert (chain["intact"], chain["zone_id"]) == (True, "univ")
    assert int(chain["records_checked"]) > 10

    # Last: the student logs out, which ends this session.
    logged_out = await api.ok("AuthService_Logout", token=token, body={"all_sessions": False})
    assert logged_out["sessions_revoked"] == 1
    assert (await api.call("AuthService_GetMe", token=token)).status == 401

    _assert_complete(api, "AuthService")


# --- tenant ----------------------------------------------------------------------------------------------------


async def test_every_tenant_rpc_succeeds_through_the_edge(people: People, identity_edge: Scenario) -> None:
    api = identity_edge
    # The platform's admins belong to dreamseed; the test edge serves only univ's and kzone's hosts, and a token is
    # good only at its own zone's hosts, so this one is made in univ (its `*` is what matters here).
    root = await people.as_new_user("univ", "univ-public", "super_admin")
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")

    # Anyone learns the zone of the host; signed-in people read the zones.
    current = await api.ok("TenantService_GetCurrentZone")
    assert current["zone"]["id"] == "univ"
    assert "univprepai.com" in current["zone"]["domains"]
    zones = await api.ok("TenantService_ListZones", token=zone_admin.token, query={"page_size": 100})
    assert {"univ", "kzone", "dreamseed"} <= {zone["id"] for zone in zones["zones"]}
    kzone = await api.ok("TenantService_GetZone", token=zone_admin.token, path={"zone_id": "kzone"})
    assert kzone["zone"]["id"] == "kzone"
    assert "my-ktube.com" in kzone["zone"]["domains"]

    # The platform's super admin opens a zone, renames it and routes a second domain to it, then takes it back.
    zone_id = f"lab{uuid.uuid4().hex[:8]}"
    domain = f"{zone_id}.example.org"
    created = (
        await api.ok(
            "TenantService_CreateZone",
            token=root.token,
            body={
                "zone": {"id": zone_id, "display_name": "Lab", "default_locale": "en", "supported_locales": ["en"]},
                "domains": [domain],
                "public_org_name": "Lab Public",
            },
        )
    )["zone"]
    assert (created["id"], created["domains"], created["status"]) == (zone_id, [domain], "ZONE_STATUS_ACTIVE")
    assert created["public_org_id"]
    renamed = await api.ok(
        "TenantService_UpdateZone",
        token=root.token,
        path={"zone_id": zone_id},
        body={
            "zone": {"display_name": "Lab Zone", "description": "Experiments"},
            "update_mask": "display_name,description",
        },
    )
    assert (renamed["zone"]["display_name"], renamed["zone"]["description"]) == ("Lab Zone", "Experiments")
    second = f"www.{zone_id}.example.net"
    added = await api.ok(
        "TenantService_AddZoneDomain", token=root.token, path={"zone_id": zone_id}, body={"domain": second}
    )
    assert set(added["zone"]["domains"]) == {domain, second}
    removed = await api.ok(
        "TenantService_RemoveZoneDomain", token=root.token, path={"zone_id": zone_id, "domain": second}
    )
    assert removed["zone"]["domains"] == [domain]

    # The zone admin runs an organisation's life: create, read, find, change, suspend (its people are signed out),
    # reactivate.
    name = _unique("Academy")
    organization = (
        await api.ok(
            "TenantService_CreateOrganization",
            token=zone_admin.token,
            body={"organization": {"name": name, "plan": "PLAN_BASIC", "contact_email": "office@example.com"}},
        )
    )["organization"]
    assert (organization["zone_id"], organization["plan"], organization["status"]) == (
        "univ",
        "PLAN_BASIC",
        "ORGANIZATION_STATUS_ACTIVE",
    )
    org_id = organization["id"]
    fetched = await api.ok("TenantService_GetOrganization", token=zone_admin.token, path={"org_id": org_id})
    assert (fetched["organization"]["name"], fetched["organization"]["contact_email"]) == (name, "office@example.com")
    listed = await api.ok(
        "TenantService_ListOrganizations",
        token=zone_admin.token,
        query={"zone_id": "univ", "status": "ORGANIZATION_STATUS_ACTIVE", "plan": "PLAN_BASIC", "query": name},
    )
    assert ([org["id"] for org in listed["organizations"]], listed["total_size"]) == ([org_id], 1)
    changed = await api.ok(
        "TenantService_UpdateOrganization",
        token=zone_admin.token,
        path={"org_id": org_id},
        body={"organization": {"name": f"{name} Prep", "plan": "PLAN_PRO"}, "update_mask": "name,plan"},
    )
    assert (changed["organization"]["name"], changed["organization"]["plan"]) == (f"{name} Prep", "PLAN_PRO")
    member = await people.as_new_user("univ", org_id, "teacher")
    assert (await api.call("AuthService_GetMe", token=member.token)).status == 200
    suspended = await api.ok(
        "TenantService_SuspendOrganization", token=zone_admin.token, path={"org_id": org_id}, body={"reason": "unpaid"}
    )
    assert (suspended["organization"]["status"], suspended["organization"]["suspend_reason"]) == (
        "ORGANIZATION_STATUS_SUSPENDED",
        "unpaid",
    )
    assert suspended["organization"]["suspend_time"]
    assert (await api.call("AuthService_GetMe", token=member.token)).status == 401
    reactivated = await api.ok("TenantService_ReactivateOrganization", token=zone_admin.token, path={"org_id": org_id})
    assert (reactivated["organization"]["status"], reactivated["organization"]["suspend_reason"]) == (
        "ORGANIZATION_STATUS_ACTIVE",
        "",
    )

    _assert_complete(api, "TenantService")


# --- exam ------------------------------------------------------------------------------------------------------


async def _poll(
    what: str, check: Callable[[], Awaitable[dict[str, Any] | None]], attempts: int = 200, pause: float = 0.1
) -> dict[str, Any]:
    """The first reply of `check()` that is not None (the exam service's workers run beside the RPCs)."""
    for _ in range(attempts):
        reply = await check()
        if reply is not None:
            return reply
        await asyncio.sleep(pause)
    raise AssertionError(f"{what} did not happen in time")


async def test_every_exam_rpc_succeeds_through_the_edge(
    people: People, mesh_edge: Scenario, fresh_database: str
) -> None:
    api = mesh_edge
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    org_id = (
        await api.ok(
            "TenantService_CreateOrganization", token=zone_admin.token, body={"organization": {"name": _unique("Prep")}}
        )
    )["organization"]["id"]
    teacher = await people.as_new_user("univ", org_id, "teacher")
    ada = await people.as_new_user("univ", org_id, "student")
    bo = await people.as_new_user("univ", org_id, "student")

    # A teacher builds a bank: a CSV import and one item of their own, read, found, changed and deleted again.
    imported = await api.ok(
        "ExamService_ImportItems", token=teacher.token, body={"format": "IMPORT_FORMAT_CSV", "content": ITEMS}
    )
    assert (imported["created_count"], len(imported["item_ids"]), imported["errors"]) == (60, 60, [])
    draft_item = {
        "external_id": "fresh-1",
        "content_area": "algebra",
        "item_type": "ITEM_TYPE_SINGLE_CHOICE",
        "stem": "What is 2 + 2?",
        "choices": [{"id": "A", "text": "4"}, {"id": "B", "text": "5"}],
        "answer_key": {"correct_choice_ids": ["A"]},
        "parameters": {"model": "IRT_MODEL_3PL", "a": 1.2, "b": 0.5, "c": 0.2},
        "status": "ITEM_STATUS_DRAFT",
        "tags": ["fresh"],
    }
    item = (await api.ok("ExamService_CreateItem", token=teacher.token, body={"item": draft_item}))["item"]
    assert (item["org_id"], item["creator_id"], item["status"]) == (org_id, teacher.user_id, "ITEM_STATUS_DRAFT")
    item_id = item["id"]
    fetched_item = await api.ok("ExamService_GetItem", token=teacher.token, path={"item_id": item_id})
    assert fetched_item["item"]["stem"] == "What is 2 + 2?"
    tagged = await api.ok(
        "ExamService_ListItems",
        token=teacher.token,
        query={"tag": "fresh", "status": "ITEM_STATUS_DRAFT", "item_type": "ITEM_TYPE_SINGLE_CHOICE", "min_b": 0},
    )
    assert ([listed["id"] for listed in tagged["items"]], tagged["total_size"]) == ([item_id], 1)
    reworded = await api.ok(
        "ExamService_UpdateItem",
        token=teacher.token,
        path={"item_id": item_id},
        body={"item": {"stem": "What is 3 + 1?"}, "update_mask": "stem"},
    )
    assert (reworded["item"]["stem"], reworded["item"]["choices"][0]["text"]) == ("What is 3 + 1?", "4")
    history = await api.ok("ExamService_ListItemParameters", token=teacher.token, path={"item_id": item_id})
    assert [(p["model"], p["b"]) for p in history["parameters"]] == [("IRT_MODEL_3PL", 0.5)]
    assert await api.ok("ExamService_DeleteItem", token=teacher.token, path={"item_id": item_id}) == {}
    assert (await api.call("ExamService_GetItem", token=teacher.token, path={"item_id": item_id})).status == 404

    # An adaptive exam of four items over the 60 imported ones: drafted, read, changed, listed and published; a
    # second draft is deleted.
    exam_body = {
        "title": "Mock",
        "exam_type": "EXAM_TYPE_MOCK",
        "adaptive": {"min_items": 3, "max_items": 4, "standard_error_target": 0},
        "time_limit": "1800s",
        "show_estimates": True,
        "show_item_feedback": True,
    }
    exam = (await api.ok("ExamService_CreateExam", token=teacher.token, body={"exam": exam_body}))["exam"]
    assert (exam["status"], exam["pool_size"], exam["time_limit"]) == ("EXAM_STATUS_DRAFT", 60, "1800s")
    exam_id = exam["id"]
    read = await api.ok("ExamService_GetExam", token=teacher.token, path={"exam_id": exam_id})
    assert read["exam"]["adaptive"]["max_items"] == 4
    described = await api.ok(
        "ExamService_UpdateExam",
        token=teacher.token,
        path={"exam_id": exam_id},
        body={"exam": {"description": "Four items, no more"}, "update_mask": "description"},
    )
    assert (described["exam"]["description"], described["exam"]["title"]) == ("Four items, no more", "Mock")
    drafts = await api.ok(
        "ExamService_ListExams",
        token=teacher.token,
        query={"status": "EXAM_STATUS_DRAFT", "exam_type": "EXAM_TYPE_MOCK", "is_public": False, "query": "Mock"},
    )
    assert ([listed["id"] for listed in drafts["exams"]], drafts["total_size"]) == ([exam_id], 1)
    published = await api.ok("ExamService_PublishExam", token=teacher.token, path={"exam_id": exam_id})
    assert published["exam"]["status"] == "EXAM_STATUS_PUBLISHED"
    assert published["exam"]["publish_time"]
    scrap = await api.ok("ExamService_CreateExam", token=teacher.token, body={"exam": {**exam_body, "title": "Scrap"}})
    scrap_id = scrap["exam"]["id"]
    assert await api.ok("ExamService_DeleteExam", token=teacher.token, path={"exam_id": scrap_id}) == {}
    assert (await api.call("ExamService_GetExam", token=teacher.token, path={"exam_id": scrap_id})).status == 404

    # Ada takes it to the end, answering right; Bo answers once and finishes early.
    open_exams = await api.ok("ExamService_ListExams", token=ada.token, query={"status": "EXAM_STATUS_PUBLISHED"})
    assert [listed["id"] for listed in open_exams["exams"]] == [exam_id]
    started = (await api.ok("ExamService_StartAttempt", token=ada.token, path={"exam_id": exam_id}))["attempt"]
    assert (started["status"], started["student_id"], started["exam_id"]) == (
        "ATTEMPT_STATUS_IN_PROGRESS",
        ada.user_id,
        exam_id,
    )
    attempt_id, served, answered = started["id"], started["current_item"]["item_id"], 0
    reply: dict[str, Any] = {}
    while served:
        reply = await api.ok(
            "ExamService_SubmitAnswer",
            token=ada.token,
            path={"attempt_id": attempt_id},
            body={"item_id": served, "response": "A"},
        )
        answered += 1
        assert (reply["correct"], reply["items_answered"]) == (True, answered)
        served = reply["next_item"]["item_id"] if "next_item" in reply else ""
    assert (reply["finished"], reply["stop_reason"], answered) == (True, "STOP_REASON_MAX_ITEMS", 4)
    attempt = (await api.ok("ExamService_GetAttempt", token=ada.token, path={"attempt_id": attempt_id}))["attempt"]
    assert (attempt["status"], len(attempt["responses"])) == ("ATTEMPT_STATUS_FINISHED", 4)
    assert all(response["correct"] for response in attempt["responses"])
    early = (await api.ok("ExamService_StartAttempt", token=bo.token, path={"exam_id": exam_id}))["attempt"]
    await api.ok(
        "ExamService_SubmitAnswer",
        token=bo.token,
        path={"attempt_id": early["id"]},
        body={"item_id": early["current_item"]["item_id"], "response": "B"},
    )
    finished = (await api.ok("ExamService_FinishAttempt", token=bo.token, path={"attempt_id": early["id"]}))["attempt"]
    assert (finished["status"], finished["stop_reason"], finished["items_answered"]) == (
        "ATTEMPT_STATUS_FINISHED",
        "STOP_REASON_STUDENT_FINISHED",
        1,
    )

    # Both attempts are scored by the worker; the results are read by the student, the teacher and a parent.
    async def ada_report() -> dict[str, Any] | None:
        body = await api.ok("ExamService_GetAttemptReport", token=ada.token, path={"attempt_id": attempt_id})
        return body if body["report"]["status"] == "REPORT_STATUS_READY" else None

    report = (await _poll("scoring Ada's attempt", ada_report))["report"]
    assert (report["items_answered"], report["items_correct"], report["attempt_id"]) == (4, 4, attempt_id)
    assert 200 <= report["scaled_score"] <= 800

    async def both_reports() -> dict[str, Any] | None:
        body = await api.ok("ExamService_ListReports", token=teacher.token, query={"exam_id": exam_id})
        return body if len(body["reports"]) == 2 else None

    reports = (await _poll("scoring both attempts", both_reports))["reports"]
    assert {(r["student_id"], r["items_answered"]) for r in reports} == {(ada.user_id, 4), (bo.user_id, 1)}
    attempts = await api.ok(
        "ExamService_ListAttempts",
        token=teacher.token,
        query={"exam_id": exam_id, "status": "ATTEMPT_STATUS_FINISHED", "page_size": 10},
    )
    assert {a["id"] for a in attempts["attempts"]} == {attempt_id, early["id"]}
    assert attempts["total_size"] == 2

    parent = await people.as_new_user("univ", "univ-public", "parent")
    ada_email = (await api.ok("AuthService_GetMe", token=ada.token))["user"]["email"]
    await api.ok("AuthService_RequestParentLink", token=parent.token, body={"student_email": ada_email})
    await api.ok("AuthService_ApproveParentLink", token=ada.token, path={"parent_id": parent.user_id})
    child_reports = await api.ok(
        "ExamService_ListStudentReports",
        token=parent.token,
        path={"student_id": ada.user_id},
        query={"exam_id": exam_id},
    )
    assert [(r["attempt_id"], r["items_correct"]) for r in child_reports["reports"]] == [(attempt_id, 4)]

    mine = await api.ok("ExamService_GetDashboard", token=ada.token)
    assert (mine["student"]["student_id"], mine["student"]["attempts_finished"]) == (ada.user_id, 1)
    assert [r["attempt_id"] for r in mine["student"]["history"]] == [attempt_id]
    class_view = await api.ok("ExamService_GetDashboard", token=teacher.token, query={"exam_id": exam_id})
    assert class_view["teacher"]["org_id"] == org_id
    assert [(e["exam_id"], e["attempts_finished"]) for e in class_view["teacher"]["exams"]] == [(exam_id, 2)]
    statistics = await api.ok("ExamService_GetExamStatistics", token=teacher.token, path={"exam_id": exam_id})
    assert (statistics["aggregate"]["attempts_started"], statistics["aggregate"]["attempts_finished"]) == (2, 2)
    assert sum(exposure["exposure_count"] for exposure in statistics["item_exposures"]) == 5
    archived = await api.ok("ExamService_ArchiveExam", token=teacher.token, path={"exam_id": exam_id})
    assert archived["exam"]["status"] == "EXAM_STATUS_ARCHIVED"

    # Calibration, in an organisation whose bank has enough answers: a run, its new version, activated.
    calibrated_org = (
        await api.ok(
            "TenantService_CreateOrganization", token=zone_admin.token, body={"organization": {"name": _unique("Cal")}}
        )
    )["organization"]["id"]
    psychometrician = await people.as_new_user("univ", calibrated_org, "teacher")
    bank = await api.ok(
        "ExamService_ImportItems",
        token=psychometrician.token,
        body={"format": "IMPORT_FORMAT_CSV", "content": CALIBRATION_ITEMS},
    )
    await seed_bank(fresh_database, calibrated_org, bank["item_ids"])
    run = (
        await api.ok(
            "ExamService_StartCalibration",
            token=psychometrician.token,
            body={"calibration": {"model": "IRT_MODEL_2PL", "min_responses_per_item": 100}},
        )
    )["calibration"]
    assert (run["state"], run["org_id"], run["model"]) == ("CALIBRATION_STATE_QUEUED", calibrated_org, "IRT_MODEL_2PL")
    assert (run["min_responses_per_item"], run["max_iterations"]) == (100, 500)  # as asked; the default

    async def run_over() -> dict[str, Any] | None:
        body = await api.ok(
            "ExamService_GetCalibration", token=psychometrician.token, path={"calibration_id": run["id"]}
        )
        done = body["calibration"]["state"] in ("CALIBRATION_STATE_SUCCEEDED", "CALIBRATION_STATE_FAILED")
        return body if done else None

    ran = (await _poll("the calibration run", run_over, attempts=300))["calibration"]
    assert ran["state"] == "CALIBRATION_STATE_SUCCEEDED", ran["error_message"]
    assert (ran["result_version"], ran["item_count"], ran["response_count"]) == (2, N_ITEMS, N_ITEMS * N_PERSONS)
    runs = await api.ok(
        "ExamService_ListCalibrations", token=psychometrician.token, query={"state": "CALIBRATION_STATE_SUCCEEDED"}
    )
    assert [listed["id"] for listed in runs["calibrations"]] == [run["id"]]
    versions = await api.ok("ExamService_ListParameterVersions", token=psychometrician.token, query={"page_size": 10})
    assert [(v["version"], v["active"]) for v in versions["versions"]] == [(2, False), (1, True)]
    activated = await api.ok("ExamService_ActivateParameterVersion", token=psychometrician.token, path={"version": "2"})
    assert (activated["version"]["version"], activated["version"]["active"]) == (2, True)
    assert activated["version"]["activate_time"]

    _assert_complete(api, "ExamService")


# --- kzone -----------------------------------------------------------------------------------------------------


async def _send_file(
    api: Scenario,
    operation_id: str,
    token: str,
    content_type: str,
    data: bytes,
    path: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An upload as clients send it: the raw file as the body with its Content-Type (an HttpBody), the other
    fields in the path and the query string."""
    headers = {"Content-Type": content_type}
    return await api.ok(operation_id, token=token, host=KZONE, path=path, query=query, body=data, headers=headers)


@pytest.fixture
async def inference_servers(pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """The asr and pose servers with their real models, where kzone (started after this) reaches them."""
    catalog = mesh_catalog()
    async with (
        running(make_config(catalog, "asr", pki_dir)) as asr,
        running(make_config(catalog, "pose", pki_dir)) as pose,
    ):
        monkeypatch.setenv("MEGACITY_TARGET_ASR", f"127.0.0.1:{asr.port}")
        monkeypatch.setenv("MEGACITY_TARGET_POSE", f"127.0.0.1:{pose.port}")
        yield


@pytest.mark.slow
async def test_every_built_kzone_rpc_succeeds_through_the_edge(
    people: People, inference_servers: None, mesh_edge: Scenario, identity_database: dict[str, str], media_dir: Path
) -> None:
    api = mesh_edge
    zone_admin = await people.as_new_user("kzone", "kzone-public", "zone_admin")
    org_id = (
        await api.ok(
            "TenantService_CreateOrganization",
            token=zone_admin.token,
            host=KZONE,
            body={"organization": {"name": _unique("Studio")}},
        )
    )["organization"]["id"]
    teacher = await people.as_new_user("kzone", org_id, "teacher")
    learner = await people.as_new_user("kzone", org_id, "student")

    # A teacher creates a song, uploads its audio as the raw body, reads, finds and changes it.
    created = (
        await api.ok(
            "KZoneService_CreateReferenceContent",
            token=teacher.token,
            host=KZONE,
            body={
                "content": {
                    "kind": "REFERENCE_KIND_SONG",
                    "title": "Arirang",
                    "artist": "Folk",
                    "language": "ko",
                    "lyrics": "아리랑 아리랑",
                    "tempo_bpm": 92,
                    "first_downbeat_offset": "0.500s",
                }
            },
        )
    )["content"]
    assert (created["status"], created["org_id"], created["creator_id"]) == (
        "REFERENCE_STATUS_AWAITING_MEDIA",
        org_id,
        teacher.user_id,
    )
    assert created["first_downbeat_offset"] == "0.500s"
    content_id = created["id"]
    audio = b"RIFF" + bytes(range(256)) * 8
    uploaded = (
        await _send_file(
            api, "KZoneService_UploadReferenceMedia", teacher.token, "audio/wav", audio, path={"content_id": content_id}
        )
    )["content"]
    assert (uploaded["status"], uploaded["media_content_type"]) == ("REFERENCE_STATUS_PROCESSING", "audio/wav")
    assert uploaded["processing_job_id"]
    assert (media_dir / uploaded["media_uri"]).read_bytes() == audio
    fetched = await api.ok(
        "KZoneService_GetReferenceContent", token=teacher.token, host=KZONE, path={"content_id": content_id}
    )
    assert fetched["content"]["media_uri"] == uploaded["media_uri"]
    listed = await api.ok(
        "KZoneService_ListReferenceContents",
        token=teacher.token,
        host=KZONE,
        query={
            "kind": "REFERENCE_KIND_SONG",
            "status": "REFERENCE_STATUS_PROCESSING",
            "query": "ari",
            "language": "ko",
            "page_size": 10,
        },
    )
    assert [content["id"] for content in listed["contents"]] == [content_id]
    changed = await api.ok(
        "KZoneService_UpdateReferenceContent",
        token=teacher.token,
        host=KZONE,
        path={"content_id": content_id},
        body={"content": {"title": "Arirang (slow)", "is_public": True}, "update_mask": "title,is_public"},
    )
    assert (changed["content"]["title"], changed["content"]["is_public"]) == ("Arirang (slow)", True)
    not_ready = await api.call(
        "KZoneService_GetReferenceFeatures", token=teacher.token, host=KZONE, path={"content_id": content_id}
    )
    assert (not_ready.status, reason_of(not_ready)) == (400, "REFERENCE_NOT_READY"), not_ready.body

    # The extraction worker's part (the next step), done here through the store as the worker will do it.
    pool = await create_pool(identity_database["kzone"], schema="kzone", max_size=1)
    try:
        store = KZoneStore(pool)
        features = kzone_resources.ReferenceFeatures(pitch=kzone_resources.PitchTrack(frequency_hz=[220.0, 246.9]))
        assert await store.finish_processing(
            content_id, features, job_id=uploaded["processing_job_id"], duration_seconds=4.5, tempo_bpm=91.0
        )
        result = await store.add_result(
            Owner(zone_id="kzone", org_id=org_id, user_id=learner.user_id),
            kzone_resources.VoiceReport(
                target_text="아리랑 아리랑", scores=kzone_resources.VoiceScores(overall=77.0, pronunciation=80.0)
            ),
            source="live",
            reference_id=content_id,
        )
    finally:
        await pool.close()
    drawn = await api.ok(
        "KZoneService_GetReferenceFeatures", token=learner.token, host=KZONE, path={"content_id": content_id}
    )
    assert (drawn["features"]["content_id"], drawn["features"]["pitch"]["frequency_hz"]) == (content_id, [220.0, 246.9])

    # The learner's stored result: listed, read and deleted.
    mine = await api.ok(
        "KZoneService_ListAnalysisResults",
        token=learner.token,
        host=KZONE,
        query={"kind": "ANALYSIS_KIND_VOICE", "reference_id": content_id, "page_size": 5},
    )
    assert [listed_result["id"] for listed_result in mine["results"]] == [result.id]
    read = await api.ok(
        "KZoneService_GetAnalysisResult", token=teacher.token, host=KZONE, path={"result_id": result.id}
    )
    assert (read["result"]["user_id"], read["result"]["voice"]["scores"]["overall"]) == (learner.user_id, 77.0)
    assert (
        await api.ok(
            "KZoneService_DeleteAnalysisResult", token=learner.token, host=KZONE, path={"result_id": result.id}
        )
        == {}
    )
    gone = await api.call(
        "KZoneService_GetAnalysisResult", token=learner.token, host=KZONE, path={"result_id": result.id}
    )
    assert gone.status == 404

    # The reference goes, with its media.
    deleted = await api.ok(
        "KZoneService_DeleteReferenceContent", token=teacher.token, host=KZONE, path={"content_id": content_id}
    )
    assert deleted == {}
    assert not (media_dir / uploaded["media_uri"]).exists()
    assert (
        await api.call(
            "KZoneService_GetReferenceContent", token=teacher.token, host=KZONE, path={"content_id": content_id}
        )
    ).status == 404

    # A learner's uploads, analysed by the real models behind kzone: a spoken sentence, a photo of a person.
    sentence = "Please open the window and close the door before you leave the room."
    speak(sentence, media_dir.parent, name="upload")
    voice = await _send_file(
        api,
        "KZoneService_AnalyzeVoiceFile",
        learner.token,
        "audio/wav",
        (media_dir.parent / "upload.wav").read_bytes(),
        query={"target_text": sentence, "language": "en"},
    )
    assert voice["result"]["user_id"] == learner.user_id
    assert word_accuracy(sentence, voice["result"]["voice"]["transcript"]) >= 0.8
    assert voice["result"]["voice"]["scores"]["pronunciation"] > 70
    pose = await _send_file(
        api, "KZoneService_DetectDancePose", learner.token, "image/jpeg", person_photo().read_bytes()
    )
    assert (pose["frames_with_pose"], len(pose["frames"][0]["landmarks"])) == (1, 33)

    _assert_complete(api, "KZoneService")


# --- the rest --------------------------------------------------------------------------------------------------


async def test_the_rpcs_not_built_yet_answer_501_and_every_other_has_a_story(
    people: People, mesh_edge: Scenario
) -> None:
    """The built services' stories and NOT_BUILT_YET are the whole OpenAPI document; each one not built yet is
    reached through the edge and answers UNIMPLEMENTED, even for a super admin (no permission stops it first)."""
    built = {operation_id for service in BUILT for operation_id in operations_of(service)}
    assert NOT_BUILT_YET | built == set(operations()), "an operation of a service without a story above"
    assert not NOT_BUILT_YET & built
    root = await people.as_new_user("univ", "univ-public", "super_admin")
    answers = {}
    for operation_id in sorted(NOT_BUILT_YET):
        made_up = {name: "0" * 32 for name in operations()[operation_id].path_parameters}
        reply = await mesh_edge.call(operation_id, token=root.token, path=made_up)
        answers[operation_id] = (reply.status, reason_of(reply))
    assert answers == {operation_id: (501, "NOT_IMPLEMENTED") for operation_id in NOT_BUILT_YET}
