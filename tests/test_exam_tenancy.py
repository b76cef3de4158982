"""Tenancy of the exam service, through the wire: nobody reaches another organisation's or another zone's items,
exams, attempts or reports, whatever their role, and everyone reaches exactly what the scope rules give them.

The scope rules (services/exam/server.py's docstring, services/exam/access.py, the contract's comments, the role
table) as the predicates below encode them, for a resource of organisation O in zone Z:

- items: teachers of O (no other role but super admins holds item permissions);
- exams: teachers and org admins of O, zone admins of Z (who hold `exam:*`, so they change them too); students
  see O's published exams when they belong to O, and the published public ones of Z; guests the latter;
- starting an attempt: students who see the exam; answering and finishing: the attempt's student only;
- reading an attempt: its student, teachers of O (org admins lack `attempt:read`), the student's approved parents;
- results (an attempt's report, a student's reports, the dashboard of a student): the student, approved parents,
  teachers and org admins of the student's organisation, zone admins of Z (`may_read_student_results`);
- super admins: everything but answering or finishing someone else's attempt.

Anything else is refused, NOT_FOUND or PERMISSION_DENIED (never OK, never an error of the server), and a token of
another zone than the request's (`x-megacity-zone`) is PERMISSION_DENIED with reason ZONE_MISMATCH whatever it
aims at. Lists show no row the caller may not see. The world: organisations A and B of zone `univ` and C of zone
`kzone`, each with a teacher's item bank, a published exam, a public one, a draft and an archived one, a student's
finished and scored attempt, the student's approved parent and an org admin; zone admins of both zones, a super
admin and a guest. Permissions alone (role -> permission) are tests/test_permission_matrix_wire.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import pytest
from google.protobuf import field_mask_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacity.auth.v1 import auth_service_pb2 as auth_pb
from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import exam_service_pb2_grpc
from megacity.exam.v1 import resources_pb2 as res
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2 as tenant_pb
from tests.support.accounts import Caller, People, reason

OK = grpc.StatusCode.OK
REFUSALS = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED})
KEPT = "Kept"  # what writes that may reach their target write: the value the target has already
HIJACKED = "Hijacked"  # what writes that must not reach write: finding it anywhere is a leak
Metadata = tuple[tuple[str, str], ...]
Stub = exam_service_pb2_grpc.ExamServiceStub
Outcome = tuple[grpc.StatusCode, str]
_Reply = TypeVar("_Reply")

BANK = "\n".join(
    [
        "external_id,content_area,item_type,stem,choices,answer,model,a,b,c,status,explanation",
        *(
            f"q{n},{('algebra', 'geometry', 'reading')[n % 3]},single_choice,Question {n},A=right|B=wrong,A,3PL,"
            f"{1.0 + (n % 5) / 5},{(n % 13) / 2 - 3},0.15,active,{KEPT}"
            for n in range(30)
        ),
    ]
)
ADAPTIVE = res.AdaptiveConfig(min_items=3, max_items=4, standard_error_target=0.2)


@dataclass(frozen=True)
class Person:
    label: str
    role: str
    zone: str
    org_id: str
    user_id: str
    caller: Caller
    children: frozenset[str] = frozenset()

    def metadata(self, zone: str | None = None) -> Metadata:
        """The call's metadata as the edge sends it, for a request to `zone` (the person's own by default)."""
        if zone is None:
            return self.caller.metadata()
        headers = dataclasses.replace(self.caller, zone=zone).metadata()
        return tuple(header for header in headers if header != ("x-megacity-zone", ""))


@dataclass
class Ids:
    """What a caller aims at: one organisation's resources (or made-up ids)."""

    item_id: str
    spare_item_id: str  # a draft item, for DeleteItem: remade whenever someone in scope deletes it
    exam_id: str  # published, of the organisation only; the student's attempt is of this one
    public_exam_id: str  # published and public in the zone
    draft_exam_id: str
    archived_exam_id: str
    attempt_id: str  # finished and scored
    student_id: str


@dataclass
class Tenant:
    name: str
    zone: str
    org_id: str
    teacher: Person
    org_admin: Person
    student: Person
    parent: Person
    ids: Ids
    answered: int
    stop_reason: res.StopReason.ValueType

    def people(self) -> list[Person]:
        return [self.teacher, self.org_admin, self.student, self.parent]


@dataclass
class World:
    tenants: dict[str, Tenant]
    admins: list[Person]  # zone admins of univ and kzone, a super admin (of univ), a guest of univ

    def callers(self) -> list[Person]:
        return [person for tenant in self.tenants.values() for person in tenant.people()] + self.admins


# --- the scope rules ----------------------------------------------------------------------------------------------


def _same_zone(person: Person, tenant: Tenant) -> bool:
    return person.zone == tenant.zone


def _same_org(person: Person, tenant: Tenant) -> bool:
    return person.zone == tenant.zone and person.org_id == tenant.org_id


def _staff(person: Person, tenant: Tenant) -> bool:
    return person.role in ("teacher", "org_admin") and _same_org(person, tenant)


def _items(person: Person, tenant: Tenant) -> bool:
    return person.role == "super_admin" or (person.role == "teacher" and _same_org(person, tenant))


def _exams(person: Person, tenant: Tenant) -> bool:
    return (
        person.role == "super_admin"
        or _staff(person, tenant)
        or (person.role == "zone_admin" and _same_zone(person, tenant))
    )


def _takes_exam(person: Person, tenant: Tenant) -> bool:
    return person.role == "super_admin" or (person.role == "student" and _same_org(person, tenant))


def _takes_public_exam(person: Person, tenant: Tenant) -> bool:
    return person.role == "super_admin" or (person.role == "student" and _same_zone(person, tenant))


def _their_attempt(person: Person, tenant: Tenant) -> bool:
    return person.user_id == tenant.ids.student_id


def _reads_attempt(person: Person, tenant: Tenant) -> bool:
    return (
        person.role == "super_admin"
        or _their_attempt(person, tenant)
        or (person.role == "teacher" and _same_org(person, tenant))
        or tenant.ids.student_id in person.children
    )


def _reads_results(person: Person, tenant: Tenant) -> bool:
    return (
        _reads_attempt(person, tenant)
        or _staff(person, tenant)
        or (person.role == "zone_admin" and _same_zone(person, tenant))
    )


def _sees_exam(person: Person, tenant: Tenant) -> bool:
    return _exams(person, tenant) or (person.role == "student" and _same_org(person, tenant))


def _sees_public_exam(person: Person, tenant: Tenant) -> bool:
    return _exams(person, tenant) or (person.role in ("student", "guest") and _same_zone(person, tenant))


# --- every exam RPC that takes an id ------------------------------------------------------------------------------

Call = Callable[[Stub, Metadata, Ids, str], Awaitable[object]]


@dataclass(frozen=True)
class Operation:
    rpc: str
    call: Call
    reaches: Callable[[Person, Tenant], bool]
    reached: frozenset[grpc.StatusCode] = frozenset({OK})  # the answers of a call that reached its target


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


OPERATIONS: dict[str, Operation] = {
    "GetItem": Operation(
        "GetItem", lambda s, m, i, _: s.GetItem(pb.GetItemRequest(item_id=i.item_id), metadata=m), _items
    ),
    "UpdateItem": Operation(
        "UpdateItem",
        lambda s, m, i, text: s.UpdateItem(
            pb.UpdateItemRequest(item_id=i.item_id, item=res.Item(explanation=text), update_mask=_mask("explanation")),
            metadata=m,
        ),
        _items,
    ),
    "DeleteItem": Operation(
        "DeleteItem", lambda s, m, i, _: s.DeleteItem(pb.DeleteItemRequest(item_id=i.spare_item_id), metadata=m), _items
    ),
    "ListItemParameters": Operation(
        "ListItemParameters",
        lambda s, m, i, _: s.ListItemParameters(pb.ListItemParametersRequest(item_id=i.item_id), metadata=m),
        _items,
    ),
    "GetExam": Operation(
        "GetExam", lambda s, m, i, _: s.GetExam(pb.GetExamRequest(exam_id=i.exam_id), metadata=m), _sees_exam
    ),
    "GetExam (public)": Operation(
        "GetExam",
        lambda s, m, i, _: s.GetExam(pb.GetExamRequest(exam_id=i.public_exam_id), metadata=m),
        _sees_public_exam,
    ),
    "UpdateExam (draft)": Operation(
        "UpdateExam",
        lambda s, m, i, text: s.UpdateExam(
            pb.UpdateExamRequest(exam_id=i.draft_exam_id, exam=res.Exam(title=text), update_mask=_mask("title")),
            metadata=m,
        ),
        _exams,
    ),
    # Reached, a published exam is not deleted (FAILED_PRECONDITION), nor is a published one published again or
    # an archived one archived again: the calls change nothing even when they may.
    "DeleteExam (published)": Operation(
        "DeleteExam",
        lambda s, m, i, _: s.DeleteExam(pb.DeleteExamRequest(exam_id=i.exam_id), metadata=m),
        _exams,
        frozenset({grpc.StatusCode.FAILED_PRECONDITION}),
    ),
    "PublishExam (published)": Operation(
        "PublishExam", lambda s, m, i, _: s.PublishExam(pb.PublishExamRequest(exam_id=i.exam_id), metadata=m), _exams
    ),
    "ArchiveExam (archived)": Operation(
        "ArchiveExam",
        lambda s, m, i, _: s.ArchiveExam(pb.ArchiveExamRequest(exam_id=i.archived_exam_id), metadata=m),
        _exams,
    ),
    "GetExamStatistics": Operation(
        "GetExamStatistics",
        lambda s, m, i, _: s.GetExamStatistics(pb.GetExamStatisticsRequest(exam_id=i.exam_id), metadata=m),
        _exams,
    ),
    "StartAttempt": Operation(
        "StartAttempt",
        lambda s, m, i, _: s.StartAttempt(pb.StartAttemptRequest(exam_id=i.exam_id), metadata=m),
        _takes_exam,
    ),
    "StartAttempt (public)": Operation(
        "StartAttempt",
        lambda s, m, i, _: s.StartAttempt(pb.StartAttemptRequest(exam_id=i.public_exam_id), metadata=m),
        _takes_public_exam,
    ),
    # Reached, an answer to a finished attempt's first item is a retry: the same reply, nothing stored.
    "SubmitAnswer": Operation(
        "SubmitAnswer",
        lambda s, m, i, _: s.SubmitAnswer(
            pb.SubmitAnswerRequest(attempt_id=i.attempt_id, item_id=i.item_id, response="B"), metadata=m
        ),
        _their_attempt,
    ),
    "FinishAttempt": Operation(
        "FinishAttempt",
        lambda s, m, i, _: s.FinishAttempt(pb.FinishAttemptRequest(attempt_id=i.attempt_id), metadata=m),
        _their_attempt,
    ),
    "GetAttempt": Operation(
        "GetAttempt",
        lambda s, m, i, _: s.GetAttempt(pb.GetAttemptRequest(attempt_id=i.attempt_id), metadata=m),
        _reads_attempt,
    ),
    "GetAttemptReport": Operation(
        "GetAttemptReport",
        lambda s, m, i, _: s.GetAttemptReport(pb.GetAttemptReportRequest(attempt_id=i.attempt_id), metadata=m),
        _reads_results,
    ),
    "ListStudentReports": Operation(
        "ListStudentReports",
        lambda s, m, i, _: s.ListStudentReports(pb.ListStudentReportsRequest(student_id=i.student_id), metadata=m),
        _reads_results,
    ),
    "GetDashboard": Operation(
        "GetDashboard",
        lambda s, m, i, _: s.GetDashboard(pb.GetDashboardRequest(student_id=i.student_id), metadata=m),
        _reads_results,
    ),
}


async def _outcome(call: Awaitable[object]) -> Outcome:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), reason(error)
    return OK, ""


async def _reply(call: Awaitable[_Reply]) -> tuple[grpc.StatusCode, _Reply | None]:
    try:
        return OK, await call
    except grpc.aio.AioRpcError as error:
        return error.code(), None


async def _aim(exam: Stub, name: str, person: Person, tenant: Tenant, zone: str | None = None) -> str | None:
    """Calls `name` as `person` on `tenant`'s resources, for a request to `zone` (None: the person's own; '': no
    zone header at all); what went against the rules, or None."""
    operation = OPERATIONS[name]
    reaches = operation.reaches(person, tenant)
    code, why = await _outcome(operation.call(exam, person.metadata(zone), tenant.ids, KEPT if reaches else HIJACKED))
    if code is OK and operation.rpc == "DeleteItem":
        tenant.ids.spare_item_id = await _spare_item(exam, tenant.teacher)
    where = f"{person.label} on {tenant.name}'s {name}" + ("" if zone is None else f" for zone {zone!r}")
    if zone not in (None, "", person.zone):
        if (code, why) == (grpc.StatusCode.PERMISSION_DENIED, "ZONE_MISMATCH"):
            return None
        return f"{where}: {code.name} {why}, not ZONE_MISMATCH"
    allowed = operation.reached if reaches else REFUSALS
    # Without the zone the edge resolved, a call may be refused, but it reaches no further.
    if zone == "":
        allowed |= REFUSALS
    if code in allowed:
        return None
    return f"{where}: {code.name} {why} ({'may' if reaches else 'may not'} reach)"


# --- the world ------------------------------------------------------------------------------------------------


async def _person(people: People, label: str, zone: str, org_id: str, role: str, email: str = "") -> Person:
    caller = await people.sign_in(zone, email or await people.add_user(zone, org_id, role))
    me = await people.auth.GetMe(auth_pb.GetMeRequest(), metadata=caller.metadata())
    return Person(label=label, role=role, zone=zone, org_id=org_id, user_id=me.user.id, caller=caller)


async def _organisation(people: People, zone: str, name: str) -> str:
    admin = await people.as_new_user(zone, f"{zone}-public", "zone_admin")
    created = await people.tenant.CreateOrganization(
        tenant_pb.CreateOrganizationRequest(organization=tenant_resources.Organization(name=name)),
        metadata=admin.metadata(),
    )
    return created.organization.id


async def _spare_item(exam: Stub, teacher: Person) -> str:
    row = f"spare-{uuid.uuid4().hex[:8]},algebra,single_choice,Spare,A=right|B=wrong,A,3PL,1.0,0.0,0.15,draft,{KEPT}"
    imported = await exam.ImportItems(
        pb.ImportItemsRequest(format=pb.IMPORT_FORMAT_CSV, content=f"{BANK.splitlines()[0]}\n{row}"),
        metadata=teacher.metadata(),
    )
    return imported.item_ids[0]


async def _new_exam(exam: Stub, teacher: Person, title: str, *, public: bool = False) -> str:
    created = await exam.CreateExam(
        pb.CreateExamRequest(exam=res.Exam(title=title, adaptive=ADAPTIVE, is_public=public)),
        metadata=teacher.metadata(),
    )
    return created.exam.id


async def _tenant(people: People, exam: Stub, name: str, zone: str) -> Tenant:
    org_id = await _organisation(people, zone, f"Academy {name}")
    teacher = await _person(people, f"{name}'s teacher", zone, org_id, "teacher")
    org_admin = await _person(people, f"{name}'s org_admin", zone, org_id, "org_admin")
    student_email = await people.add_user(zone, org_id, "student")
    student = await _person(people, f"{name}'s student", zone, org_id, "student", student_email)
    parent = await _person(people, f"{name}'s student's parent", zone, f"{zone}-public", "parent")
    await people.auth.RequestParentLink(
        auth_pb.RequestParentLinkRequest(student_email=student_email), metadata=parent.metadata()
    )
    await people.auth.ApproveParentLink(
        auth_pb.ApproveParentLinkRequest(parent_id=parent.user_id), metadata=student.metadata()
    )
    parent = dataclasses.replace(parent, children=frozenset({student.user_id}))

    await exam.ImportItems(
        pb.ImportItemsRequest(format=pb.IMPORT_FORMAT_CSV, content=BANK), metadata=teacher.metadata()
    )
    exam_id = await _new_exam(exam, teacher, "Closed")
    public_exam_id = await _new_exam(exam, teacher, "Open", public=True)
    for published in (exam_id, public_exam_id):
        await exam.PublishExam(pb.PublishExamRequest(exam_id=published), metadata=teacher.metadata())
    archived_exam_id = await _new_exam(exam, teacher, "Archived")
    await exam.ArchiveExam(pb.ArchiveExamRequest(exam_id=archived_exam_id), metadata=teacher.metadata())

    attempt = (await exam.StartAttempt(pb.StartAttemptRequest(exam_id=exam_id), metadata=student.metadata())).attempt
    first_item, item, answered = attempt.current_item.item_id, attempt.current_item.item_id, 0
    while item:
        reply = await exam.SubmitAnswer(
            pb.SubmitAnswerRequest(attempt_id=attempt.id, item_id=item, response="A"), metadata=student.metadata()
        )
        answered += 1
        item = reply.next_item.item_id
    return Tenant(
        name=name,
        zone=zone,
        org_id=org_id,
        teacher=teacher,
        org_admin=org_admin,
        student=student,
        parent=parent,
        ids=Ids(
            item_id=first_item,
            spare_item_id=await _spare_item(exam, teacher),
            exam_id=exam_id,
            public_exam_id=public_exam_id,
            draft_exam_id=await _new_exam(exam, teacher, KEPT),
            archived_exam_id=archived_exam_id,
            attempt_id=attempt.id,
            student_id=student.user_id,
        ),
        answered=answered,
        stop_reason=reply.stop_reason,
    )


async def _scored(exam: Stub, tenant: Tenant) -> None:
    """Waits for the scoring worker to report the tenant's attempt."""
    request = pb.GetAttemptReportRequest(attempt_id=tenant.ids.attempt_id)
    for _ in range(200):
        report = (await exam.GetAttemptReport(request, metadata=tenant.student.metadata())).report
        if report.status == res.REPORT_STATUS_READY:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{tenant.name}'s attempt was not scored")


async def _world(people: People, exam: Stub) -> World:
    tenants = {
        "A": await _tenant(people, exam, "A", "univ"),
        "B": await _tenant(people, exam, "B", "univ"),
        "C": await _tenant(people, exam, "C", "kzone"),
    }
    for tenant in tenants.values():
        await _scored(exam, tenant)
    admins = [
        await _person(people, "univ's zone_admin", "univ", "univ-public", "zone_admin"),
        await _person(people, "kzone's zone_admin", "kzone", "kzone-public", "zone_admin"),
        await _person(people, "a super_admin", "univ", "univ-public", "super_admin"),
        await _person(people, "a guest of univ", "univ", "univ-public", "guest"),
    ]
    return World(tenants=tenants, admins=admins)


async def _untouched(exam: Stub, tenant: Tenant) -> None:
    """Nothing of the tenant changed: what only callers in scope may write still holds what they wrote."""
    teacher = tenant.teacher.metadata()
    ids = tenant.ids
    item = (await exam.GetItem(pb.GetItemRequest(item_id=ids.item_id), metadata=teacher)).item
    assert item.explanation == KEPT, f"{tenant.name}'s item was changed"
    spare = (await exam.GetItem(pb.GetItemRequest(item_id=ids.spare_item_id), metadata=teacher)).item
    assert spare.explanation == KEPT
    statuses = {
        exam_id: (await exam.GetExam(pb.GetExamRequest(exam_id=exam_id), metadata=teacher)).exam
        for exam_id in (ids.exam_id, ids.public_exam_id, ids.draft_exam_id, ids.archived_exam_id)
    }
    assert [(e.status, e.title) for e in statuses.values()] == [
        (res.EXAM_STATUS_PUBLISHED, "Closed"),
        (res.EXAM_STATUS_PUBLISHED, "Open"),
        (res.EXAM_STATUS_DRAFT, KEPT),
        (res.EXAM_STATUS_ARCHIVED, "Archived"),
    ], f"{tenant.name}'s exams were changed"
    attempt = (await exam.GetAttempt(pb.GetAttemptRequest(attempt_id=ids.attempt_id), metadata=teacher)).attempt
    assert (attempt.status, attempt.items_answered, attempt.stop_reason) == (
        res.ATTEMPT_STATUS_FINISHED,
        tenant.answered,
        tenant.stop_reason,
    ), f"{tenant.name}'s attempt was changed"
    assert [r.response for r in attempt.responses] == ["A"] * tenant.answered, f"{tenant.name}'s answers changed"


# --- the tests ------------------------------------------------------------------------------------------------


async def test_every_exam_rpc_reaches_exactly_its_tenants(people: People, exam: Stub) -> None:
    """Every caller of A, the zone admins, the super admin and the guest, on every RPC that takes an id, aimed at
    A's, B's and C's resources (A's people reaching A's is the control that the ids are real, and so are B's and
    C's people on their own); and each cross-zone call again with the host of the target's zone (ZONE_MISMATCH)."""
    world = await _world(people, exam)
    a, b, c = world.tenants["A"], world.tenants["B"], world.tenants["C"]
    aims = [(person, tenant) for person in a.people() + world.admins for tenant in (a, b, c)]
    aims += [(person, tenant) for tenant in (b, c) for person in tenant.people()]
    wrong: list[str] = []
    for person, tenant in aims:
        for name in OPERATIONS:
            found = await _aim(exam, name, person, tenant)
            if found:
                wrong.append(found)
            if tenant.zone != person.zone:  # the same call with the token of one zone and the host of the other
                found = await _aim(exam, name, person, tenant, zone=tenant.zone)
                if found:
                    wrong.append(found)
    for tenant in (a, b, c):
        await _untouched(exam, tenant)
    assert not wrong, "\n".join(wrong)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_any_caller_any_id_any_host(people: People, exam: Stub, world: World, data: st.DataObject) -> None:
    """Property: whoever calls, with real ids of any tenant or made-up ones, and the host of any zone (or none),
    the answer follows the rules, and nothing of the tenants changes unless the rules let the caller change it."""
    person = data.draw(st.sampled_from(world.callers()), label="caller")
    name = data.draw(st.sampled_from(sorted(OPERATIONS)), label="operation")
    zone = data.draw(st.sampled_from([None, "", "univ", "kzone", "college"]), label="host zone")
    tenant = data.draw(st.sampled_from(sorted(world.tenants)), label="tenant")
    target = world.tenants[tenant]
    if data.draw(st.booleans(), label="made-up ids"):
        made_up = data.draw(st.text(min_size=1, max_size=40) | st.uuids().map(lambda u: u.hex), label="id")
        operation = OPERATIONS[name]
        ids = Ids(**{field.name: made_up for field in dataclasses.fields(Ids)})
        code, why = await _outcome(operation.call(exam, person.metadata(zone), ids, HIJACKED))
        if zone not in (None, "", person.zone):
            assert (code, why) == (grpc.StatusCode.PERMISSION_DENIED, "ZONE_MISMATCH")
        else:
            assert code in REFUSALS | {grpc.StatusCode.INVALID_ARGUMENT}, (code, why)
    else:
        found = await _aim(exam, name, person, target, zone=zone)
        assert found is None, found
    await _untouched(exam, target)


@pytest.fixture
async def world(people: People, exam: Stub) -> World:
    return await _world(people, exam)


# --- lists ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row a list RPC returned, with what decides who may see it."""

    kind: str  # item, exam, attempt, report, aggregate (a teacher's dashboard), parameter_version, calibration
    id: str
    zone: str
    org_id: str
    student_id: str = ""
    published: bool = False
    public: bool = False


def _may_see(person: Person, row: Row) -> bool:
    if person.role == "super_admin":
        return True
    same_zone = row.zone == person.zone
    same_org = same_zone and row.org_id == person.org_id
    their = row.student_id == person.user_id or row.student_id in person.children
    match row.kind:
        case "item" | "calibration":
            return person.role == "teacher" and same_org
        case "parameter_version":  # a version names its organisation only
            return person.role == "teacher" and row.org_id == person.org_id
        case "exam":
            return (
                (person.role in ("teacher", "org_admin") and same_org)
                or (person.role == "zone_admin" and same_zone)
                or (person.role in ("student", "guest") and same_zone and row.published and (same_org or row.public))
            )
        case "aggregate":  # a dashboard's per-exam aggregates
            return (person.role in ("teacher", "org_admin") and same_org) or (person.role == "zone_admin" and same_zone)
        case "attempt":
            return their or (person.role == "teacher" and same_org)
        case "report":
            return (
                their
                or (person.role in ("teacher", "org_admin") and same_org)
                or (person.role == "zone_admin" and same_zone)
            )
    raise AssertionError(row.kind)


def _exam_row(exam: res.Exam) -> Row:
    return Row(
        "exam",
        exam.id,
        exam.zone_id,
        exam.org_id,
        published=exam.status == res.EXAM_STATUS_PUBLISHED,
        public=exam.is_public,
    )


def _attempt_row(attempt: res.Attempt) -> Row:
    return Row("attempt", attempt.id, attempt.zone_id, attempt.org_id, student_id=attempt.student_id)


def _report_row(report: res.Report) -> Row:
    return Row("report", report.attempt_id, report.zone_id, report.org_id, student_id=report.student_id)


async def _listed(
    rpc: str, call: Awaitable[_Reply], rows: Callable[[_Reply], Iterable[Row]], person: Person, wrong: list[str]
) -> set[str]:
    """The ids of the rows a list call answered; each row the person may not see, or an answer other than a list
    or a refusal, goes to `wrong`."""
    code, reply = await _reply(call)
    if reply is None:  # a list that is refused, or a request this caller has to make otherwise, shows nothing
        if code not in REFUSALS | {grpc.StatusCode.INVALID_ARGUMENT}:
            wrong.append(f"{person.label}'s {rpc}: {code.name}")
        return set()
    found = list(rows(reply))
    wrong += [f"{person.label}'s {rpc} shows {row}" for row in found if not _may_see(person, row)]
    return {row.id for row in found}


async def _everything_listed(exam: Stub, world: World, person: Person, wrong: list[str]) -> dict[str, set[str]]:
    """Every list RPC as `person`: unfiltered, and filtered by each tenant's student and exam; the ids seen."""
    m = person.metadata()
    seen: dict[str, set[str]] = {}

    def add(rpc: str, ids: set[str]) -> None:
        seen[rpc] = seen.get(rpc, set()) | ids

    add(
        "ListItems",
        await _listed(
            "ListItems",
            exam.ListItems(pb.ListItemsRequest(page_size=500), metadata=m),
            lambda r: [Row("item", i.id, i.zone_id, i.org_id) for i in r.items],
            person,
            wrong,
        ),
    )
    add(
        "ListExams",
        await _listed(
            "ListExams",
            exam.ListExams(pb.ListExamsRequest(page_size=500), metadata=m),
            lambda r: [_exam_row(e) for e in r.exams],
            person,
            wrong,
        ),
    )
    filters = [("", "")] + [(t.ids.student_id, "") for t in world.tenants.values()]
    filters += [("", t.ids.exam_id) for t in world.tenants.values()]
    for student_id, exam_id in filters:
        add(
            "ListAttempts",
            await _listed(
                "ListAttempts",
                exam.ListAttempts(pb.ListAttemptsRequest(student_id=student_id, exam_id=exam_id), metadata=m),
                lambda r: [_attempt_row(a) for a in r.attempts],
                person,
                wrong,
            ),
        )
        add(
            "ListReports",
            await _listed(
                "ListReports",
                exam.ListReports(pb.ListReportsRequest(student_id=student_id, exam_id=exam_id), metadata=m),
                lambda r: [_report_row(report) for report in r.reports],
                person,
                wrong,
            ),
        )
    for tenant in world.tenants.values():
        student_id = tenant.ids.student_id
        add(
            "ListStudentReports",
            await _listed(
                "ListStudentReports",
                exam.ListStudentReports(pb.ListStudentReportsRequest(student_id=student_id), metadata=m),
                lambda r: [_report_row(report) for report in r.reports],
                person,
                wrong,
            ),
        )
    owners = {
        exam_id: tenant
        for tenant in world.tenants.values()
        for exam_id in (
            tenant.ids.exam_id,
            tenant.ids.public_exam_id,
            tenant.ids.draft_exam_id,
            tenant.ids.archived_exam_id,
        )
    }

    def dashboard(reply: pb.GetDashboardResponse) -> list[Row]:
        if reply.WhichOneof("view") == "teacher":
            # An organisation's aggregates, of its own exams (an exam of no tenant here is nobody's to see).
            view = reply.teacher
            aggregates = [(a.exam_id, owners.get(a.exam_id)) for a in view.exams]
            return [Row("aggregate", "", person.zone, view.org_id)] + [
                Row("aggregate", exam_id, t.zone if t else "", t.org_id if t else "") for exam_id, t in aggregates
            ]
        student = reply.student
        return [_attempt_row(a) for a in student.in_progress] + [_report_row(r) for r in student.history]

    for student_id in ["", *(t.ids.student_id for t in world.tenants.values())]:
        add(
            "GetDashboard",
            await _listed(
                "GetDashboard",
                exam.GetDashboard(pb.GetDashboardRequest(student_id=student_id), metadata=m),
                dashboard,
                person,
                wrong,
            ),
        )
    add(
        "ListParameterVersions",
        await _listed(
            "ListParameterVersions",
            exam.ListParameterVersions(pb.ListParameterVersionsRequest(page_size=100), metadata=m),
            lambda r: [Row("parameter_version", f"{v.org_id}:{v.version}", "", v.org_id) for v in r.versions],
            person,
            wrong,
        ),
    )
    add(
        "ListCalibrations",
        await _listed(
            "ListCalibrations",
            exam.ListCalibrations(pb.ListCalibrationsRequest(page_size=100), metadata=m),
            lambda r: [Row("calibration", c.id, c.zone_id, c.org_id) for c in r.calibrations],
            person,
            wrong,
        ),
    )
    return seen


async def test_lists_show_nothing_of_other_tenants(people: People, exam: Stub, world: World) -> None:
    """Every list RPC, as everyone, unfiltered and filtered by other tenants' students and exams: no row the caller
    may not see. And the controls: what the caller's own tenant has is there."""
    wrong: list[str] = []
    seen = {person.label: await _everything_listed(exam, world, person, wrong) for person in world.callers()}
    assert not wrong, "\n".join(wrong)

    a, b, c = world.tenants["A"], world.tenants["B"], world.tenants["C"]

    def exams(*tenants: Tenant) -> set[str]:
        return {
            exam_id
            for t in tenants
            for exam_id in (t.ids.exam_id, t.ids.public_exam_id, t.ids.draft_exam_id, t.ids.archived_exam_id)
        }

    teacher = seen[a.teacher.label]
    assert {a.ids.item_id, a.ids.spare_item_id} <= teacher["ListItems"]
    assert teacher["ListExams"] == exams(a)
    assert a.ids.attempt_id in teacher["ListStudentReports"]
    assert seen["univ's zone_admin"]["ListExams"] == exams(a, b)
    assert seen["kzone's zone_admin"]["ListExams"] == exams(c)
    assert exams(a, b, c) <= seen["a super_admin"]["ListExams"]
    assert seen[a.student.label]["ListExams"] == {a.ids.exam_id, a.ids.public_exam_id, b.ids.public_exam_id}
    assert seen["a guest of univ"]["ListExams"] == {a.ids.public_exam_id, b.ids.public_exam_id}
    for person in (a.teacher, a.student, a.parent):  # the attempt of their tenant's student
        assert a.ids.attempt_id in seen[person.label]["ListAttempts"], person.label
        assert a.ids.attempt_id in seen[person.label]["ListReports"], person.label
    assert a.ids.attempt_id in seen[a.org_admin.label]["ListReports"]
    assert {a.ids.attempt_id, b.ids.attempt_id} <= seen["univ's zone_admin"]["ListReports"]
    assert a.ids.exam_id in seen[a.teacher.label]["GetDashboard"]  # the aggregate of the exam with an attempt
    assert a.ids.attempt_id in seen[a.student.label]["GetDashboard"]  # the student's history
    assert f"{a.org_id}:1" in seen[a.teacher.label]["ListParameterVersions"]


async def test_a_super_admin_changes_any_organisations_items(people: People, exam: Stub) -> None:
    org_id = await _organisation(people, "univ", "Academy D")
    teacher = await _person(people, "D's teacher", "univ", org_id, "teacher")
    item_id = await _spare_item(exam, teacher)
    super_admin = await _person(people, "a super_admin", "univ", "univ-public", "super_admin")
    await exam.UpdateItem(
        pb.UpdateItemRequest(item_id=item_id, item=res.Item(explanation="Checked"), update_mask=_mask("explanation")),
        metadata=super_admin.metadata(),
    )
    await exam.DeleteItem(pb.DeleteItemRequest(item_id=item_id), metadata=super_admin.metadata())


async def test_staff_do_not_list_the_results_of_another_orgs_student(people: People, exam: Stub) -> None:
    a_org, b_org = await _organisation(people, "univ", "Academy A"), await _organisation(people, "univ", "Academy B")
    student = await _person(people, "A's student", "univ", a_org, "student")
    teacher = await _person(people, "B's teacher", "univ", b_org, "teacher")
    org_admin = await _person(people, "B's org_admin", "univ", b_org, "org_admin")
    await exam.ImportItems(
        pb.ImportItemsRequest(format=pb.IMPORT_FORMAT_CSV, content=BANK), metadata=teacher.metadata()
    )
    public_exam_id = await _new_exam(exam, teacher, "Open", public=True)
    await exam.PublishExam(pb.PublishExamRequest(exam_id=public_exam_id), metadata=teacher.metadata())
    attempt = (
        await exam.StartAttempt(pb.StartAttemptRequest(exam_id=public_exam_id), metadata=student.metadata())
    ).attempt
    await exam.FinishAttempt(pb.FinishAttemptRequest(attempt_id=attempt.id), metadata=student.metadata())
    for _ in range(200):
        report = await exam.GetAttemptReport(
            pb.GetAttemptReportRequest(attempt_id=attempt.id), metadata=student.metadata()
        )
        if report.report.status == res.REPORT_STATUS_READY:
            break
        await asyncio.sleep(0.05)
    for staff in (teacher, org_admin):
        # Every RPC about this one student refuses B's staff: A's student's results are not theirs.
        refused: list[Awaitable[object]] = [
            exam.GetAttemptReport(pb.GetAttemptReportRequest(attempt_id=attempt.id), metadata=staff.metadata()),
            exam.ListStudentReports(
                pb.ListStudentReportsRequest(student_id=student.user_id), metadata=staff.metadata()
            ),
            exam.ListReports(pb.ListReportsRequest(student_id=student.user_id), metadata=staff.metadata()),
        ]
        if staff.role == "teacher":
            refused.append(exam.GetAttempt(pb.GetAttemptRequest(attempt_id=attempt.id), metadata=staff.metadata()))
        for call in refused:
            assert (await _outcome(call))[0] in REFUSALS
    leaks = []
    for staff in (teacher, org_admin):
        reports = await exam.ListReports(pb.ListReportsRequest(), metadata=staff.metadata())
        if attempt.id in {r.attempt_id for r in reports.reports}:
            leaks.append(f"{staff.label}'s ListReports shows the report of A's student")
    attempts = await exam.ListAttempts(pb.ListAttemptsRequest(), metadata=teacher.metadata())
    if attempt.id in {a.id for a in attempts.attempts}:
        leaks.append(f"{teacher.label}'s ListAttempts shows the attempt of A's student")
    assert not leaks, "\n".join(leaks)
