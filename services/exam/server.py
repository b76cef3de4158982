"""The exam service: item bank, computerized adaptive testing, attempts, scoring, reports and calibration.

Thin: validates (services/exam/items.py, exams.py), decides scope, and reads and writes through
services/exam/store.py. Built so far: the item bank (authoring, import) and exams, and the access rule of
students' reports; attempts, scoring, reports, dashboards and calibration answer UNIMPLEMENTED (reason
NOT_IMPLEMENTED) until they land.

Scope: items and exams belong to their author's organisation. Teachers and org admins work in their
organisation, zone admins see their zone's exams, super admins everything; students and guests see published
exams of their organisation and public ones of their zone.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import grpc
from google.protobuf import field_mask_pb2, json_format

from megacity.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import exam_service_pb2_grpc
from megacity.exam.v1 import resources_pb2 as res
from services.exam import exams, items
from services.exam.access import may_read_student_results
from services.exam.store import (
    EXAM_STATUSES,
    EXAM_TYPES,
    ExamStore,
    FailedToDelete,
    Owner,
    exam_columns,
    exam_message,
    json_loads,
)
from services.runtime import paging
from services.runtime.audit import Auditor
from services.runtime.callcontext import current_principal
from services.runtime.channels import ChannelFactory
from services.runtime.context import UnaryContext
from services.runtime.database import TenantScope
from services.runtime.errors import (
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Violations,
)
from services.runtime.server import Dependencies, ServicerBinding
from services.runtime.tokens import AccessClaims

MAX_PAGE = 500
LEARNERS = frozenset({"student", "guest", "parent"})


def _person() -> AccessClaims:
    person = current_principal()
    if person is None:
        raise Unauthenticated("sign in first", reason=ErrorReason.ERROR_REASON_TOKEN_MISSING)
    return person


def _owner(person: AccessClaims) -> Owner:
    return Owner(zone_id=person.zone_id, org_id=person.org_id, creator_id=person.user_id)


def _own_org(person: AccessClaims) -> TenantScope:
    return TenantScope.org(person.zone_id, person.org_id)


def _staff_scope(person: AccessClaims) -> TenantScope:
    if person.role == "super_admin":
        return TenantScope.platform()
    if person.role == "zone_admin":
        return TenantScope.zone(person.zone_id)
    return _own_org(person)


def _required(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(f"{field} is required", [(field, "required")])


class ExamServicer(exam_service_pb2_grpc.ExamServiceServicer):
    def __init__(self, channels: ChannelFactory, store: ExamStore, auditor: Auditor) -> None:
        self._channels = channels
        self._store = store
        self._audit = auditor

    # --- items -----------------------------------------------------------------------------------------------------

    async def CreateItem(
        self, request: pb.CreateItemRequest, context: UnaryContext[pb.CreateItemRequest, pb.CreateItemResponse]
    ) -> pb.CreateItemResponse:
        person = _person()
        violations = Violations()
        items.check_item(violations, request.item)
        violations.raise_if_any()
        item = await self._store.create_item(_owner(person), request.item)
        await self._audit.record("create", "success", resource_type="item", resource_id=item.id)
        return pb.CreateItemResponse(item=item)

    async def GetItem(
        self, request: pb.GetItemRequest, context: UnaryContext[pb.GetItemRequest, pb.GetItemResponse]
    ) -> pb.GetItemResponse:
        person = _person()
        _required(request.item_id, "item_id")
        return pb.GetItemResponse(item=await self._store.item(_staff_scope(person), request.item_id))

    async def ListItems(
        self, request: pb.ListItemsRequest, context: UnaryContext[pb.ListItemsRequest, pb.ListItemsResponse]
    ) -> pb.ListItemsResponse:
        person = _person()
        filters: dict[str, str] = {}
        if request.content_area:
            filters["content_area"] = request.content_area
        if request.status:
            filters["status"] = items.ITEM_STATUSES.get(request.status, "")
        if request.item_type:
            filters["item_type"] = items.ITEM_TYPES.get(request.item_type, "")
        if "" in filters.values() or len(request.query) > 200:
            raise InvalidArgument("a filter is invalid", [("status", "a known value"), ("query", "at most 200 chars")])
        limit = paging.page_size(request.page_size, MAX_PAGE)
        min_b = request.min_b if request.HasField("min_b") else None
        max_b = request.max_b if request.HasField("max_b") else None
        query = ["items", sorted(filters.items()), request.tag, request.query, min_b, max_b]
        position = paging.decode(request.page_token, query)
        found, total = await self._store.items(
            _staff_scope(person),
            filters,
            tag=request.tag,
            query=request.query,
            min_b=min_b,
            max_b=max_b,
            after=str(position[0]) if position else None,
            limit=limit + 1,
        )
        next_token = paging.encode([found[limit - 1].id], query) if len(found) > limit else ""
        return pb.ListItemsResponse(items=found[:limit], next_page_token=next_token, total_size=total)

    async def UpdateItem(
        self, request: pb.UpdateItemRequest, context: UnaryContext[pb.UpdateItemRequest, pb.UpdateItemResponse]
    ) -> pb.UpdateItemResponse:
        person = _person()
        _required(request.item_id, "item_id")
        current = await self._store.item(_own_org(person), request.item_id)
        paths = list(request.update_mask.paths) or [field.name for field, _ in request.item.ListFields()]
        unknown = set(paths) - items.AUTHORED_FIELDS
        if unknown:
            raise InvalidArgument(
                "update_mask names fields that cannot change", [("update_mask", ", ".join(sorted(unknown)))]
            )
        updated = res.Item()
        updated.CopyFrom(current)
        field_mask_pb2.FieldMask(paths=paths).MergeMessage(
            request.item, updated, replace_message_field=True, replace_repeated_field=True
        )
        violations = Violations()
        items.check_item(violations, updated)
        violations.raise_if_any()
        item = await self._store.replace_item(_owner(person), request.item_id, updated)
        await self._audit.record(
            "update", "success", resource_type="item", resource_id=item.id, details={"fields": sorted(paths)}
        )
        return pb.UpdateItemResponse(item=item)

    async def DeleteItem(
        self, request: pb.DeleteItemRequest, context: UnaryContext[pb.DeleteItemRequest, pb.DeleteItemResponse]
    ) -> pb.DeleteItemResponse:
        person = _person()
        _required(request.item_id, "item_id")
        await self._store.delete_item(_own_org(person), request.item_id)
        await self._audit.record("delete", "success", resource_type="item", resource_id=request.item_id)
        return pb.DeleteItemResponse()

    async def ImportItems(
        self, request: pb.ImportItemsRequest, context: UnaryContext[pb.ImportItemsRequest, pb.ImportItemsResponse]
    ) -> pb.ImportItemsResponse:
        person = _person()
        formats = {pb.IMPORT_FORMAT_CSV: "csv", pb.IMPORT_FORMAT_JSON: "json"}
        if request.format not in formats:
            raise InvalidArgument("format is required", [("format", "IMPORT_FORMAT_CSV or IMPORT_FORMAT_JSON")])
        _required(request.content, "content")
        rows = list(items.read_import(formats[request.format], request.content, request.default_status))
        errors = [
            pb.ImportRowError(row=row.row, field=field, message=message)
            for row in rows
            for field, message in row.errors
        ]
        if errors or request.validate_only:
            return pb.ImportItemsResponse(errors=errors)
        valid = [row.item for row in rows if row.item is not None]
        ids, created, updated = await self._store.import_items(_owner(person), valid, upsert=request.upsert)
        await self._audit.record(
            "import", "success", resource_type="item", details={"created": created, "updated": updated}
        )
        return pb.ImportItemsResponse(created_count=created, updated_count=updated, item_ids=ids)

    # --- exams -----------------------------------------------------------------------------------------------------

    async def _exam_message(self, person: AccessClaims, row: asyncpg.Record) -> res.Exam:
        adaptive = None
        if row["adaptive"] is not None:
            adaptive = res.AdaptiveConfig()
            json_format.ParseDict(json_loads(row["adaptive"]), adaptive)
        pool = (
            0 if person.role in LEARNERS else await self._store.pool_size(_staff_scope(person), row["org_id"], adaptive)
        )
        return exam_message(row, pool)

    async def CreateExam(
        self, request: pb.CreateExamRequest, context: UnaryContext[pb.CreateExamRequest, pb.CreateExamResponse]
    ) -> pb.CreateExamResponse:
        person = _person()
        exams.check_exam(request.exam)
        row = await self._store.create_exam(_owner(person), request.exam)
        await self._audit.record("create", "success", resource_type="exam", resource_id=row["exam_id"])
        return pb.CreateExamResponse(exam=await self._exam_message(person, row))

    async def _readable_exam(self, person: AccessClaims, exam_id: str) -> asyncpg.Record:
        _required(exam_id, "exam_id")
        if person.role in LEARNERS:
            return await self._store.exam(
                TenantScope.zone(person.zone_id), exam_id, visible_to=(person.zone_id, person.org_id)
            )
        return await self._store.exam(_staff_scope(person), exam_id)

    async def GetExam(
        self, request: pb.GetExamRequest, context: UnaryContext[pb.GetExamRequest, pb.GetExamResponse]
    ) -> pb.GetExamResponse:
        person = _person()
        row = await self._readable_exam(person, request.exam_id)
        return pb.GetExamResponse(exam=await self._exam_message(person, row))

    async def ListExams(
        self, request: pb.ListExamsRequest, context: UnaryContext[pb.ListExamsRequest, pb.ListExamsResponse]
    ) -> pb.ListExamsResponse:
        person = _person()
        filters: dict[str, object] = {}
        if request.status:
            filters["status"] = EXAM_STATUSES.get(request.status, "")
        if request.exam_type:
            filters["exam_type"] = EXAM_TYPES.get(request.exam_type, "")
        if request.HasField("is_public"):
            filters["is_public"] = request.is_public
        if "" in filters.values() or len(request.query) > 200:
            raise InvalidArgument("a filter is invalid", [("status", "a known value"), ("query", "at most 200 chars")])
        learner = person.role in LEARNERS
        limit = paging.page_size(request.page_size, MAX_PAGE)
        query = ["exams", sorted(filters.items()), request.query]
        position = paging.decode(request.page_token, query)
        rows, total = await self._store.exams(
            TenantScope.zone(person.zone_id) if learner else _staff_scope(person),
            filters,
            query=request.query,
            visible_to_org=person.org_id if learner else None,
            after=str(position[0]) if position else None,
            limit=limit + 1,
        )
        next_token = paging.encode([rows[limit - 1]["exam_id"]], query) if len(rows) > limit else ""
        return pb.ListExamsResponse(
            exams=[await self._exam_message(person, row) for row in rows[:limit]],
            next_page_token=next_token,
            total_size=total,
        )

    async def UpdateExam(
        self, request: pb.UpdateExamRequest, context: UnaryContext[pb.UpdateExamRequest, pb.UpdateExamResponse]
    ) -> pb.UpdateExamResponse:
        person = _person()
        current = exam_message(await self._readable_exam(person, request.exam_id))
        if current.status != res.EXAM_STATUS_DRAFT:
            raise FailedPrecondition(
                "only draft exams change; archive this one and create a new one",
                reason=ErrorReason.ERROR_REASON_INVALID_STATE_TRANSITION,
                metadata={"state": EXAM_STATUSES[current.status]},
            )
        merged = exams.merged(current, request.exam, list(request.update_mask.paths))
        exams.check_exam(merged)
        changes = {column: value for column, value in exam_columns(merged).items()}
        row = await self._store.update_exam(_staff_scope(person), request.exam_id, changes)
        await self._audit.record("update", "success", resource_type="exam", resource_id=request.exam_id)
        return pb.UpdateExamResponse(exam=await self._exam_message(person, row))

    async def _transition(self, exam_id: str, target: str) -> asyncpg.Record:
        person = _person()
        current = await self._readable_exam(person, exam_id)
        allowed = {"published": ("draft",), "archived": ("draft", "published")}[target]
        if current["status"] == target:
            return current
        if current["status"] not in allowed:
            raise FailedPrecondition(
                f"a {current['status']} exam cannot become {target}",
                reason=ErrorReason.ERROR_REASON_INVALID_STATE_TRANSITION,
                metadata={"state": current["status"]},
            )
        changes: dict[str, object] = {"status": target}
        if target == "published":
            if current["adaptive"] is not None:
                adaptive = res.AdaptiveConfig()
                json_format.ParseDict(json_loads(current["adaptive"]), adaptive)
                if await self._store.pool_size(_staff_scope(person), current["org_id"], adaptive) == 0:
                    raise FailedPrecondition(
                        "the exam's item pool is empty: activate items first",
                        reason=ErrorReason.ERROR_REASON_ITEM_POOL_EXHAUSTED,
                    )
            changes["publish_time"] = datetime.now(UTC)
        row = await self._store.update_exam(_staff_scope(person), exam_id, changes)
        action = {"published": "publish", "archived": "archive"}[target]
        await self._audit.record(action, "success", resource_type="exam", resource_id=exam_id)
        return row

    async def PublishExam(
        self, request: pb.PublishExamRequest, context: UnaryContext[pb.PublishExamRequest, pb.PublishExamResponse]
    ) -> pb.PublishExamResponse:
        row = await self._transition(request.exam_id, "published")
        return pb.PublishExamResponse(exam=await self._exam_message(_person(), row))

    async def ArchiveExam(
        self, request: pb.ArchiveExamRequest, context: UnaryContext[pb.ArchiveExamRequest, pb.ArchiveExamResponse]
    ) -> pb.ArchiveExamResponse:
        row = await self._transition(request.exam_id, "archived")
        return pb.ArchiveExamResponse(exam=await self._exam_message(_person(), row))

    async def DeleteExam(
        self, request: pb.DeleteExamRequest, context: UnaryContext[pb.DeleteExamRequest, pb.DeleteExamResponse]
    ) -> pb.DeleteExamResponse:
        person = _person()
        _required(request.exam_id, "exam_id")
        try:
            await self._store.delete_exam(_staff_scope(person), request.exam_id)
        except FailedToDelete as refused:
            raise FailedPrecondition(
                "only draft exams are deleted; archive it instead",
                reason=ErrorReason.ERROR_REASON_INVALID_STATE_TRANSITION,
                metadata={"state": refused.status},
            ) from None
        await self._audit.record("delete", "success", resource_type="exam", resource_id=request.exam_id)
        return pb.DeleteExamResponse()

    async def _check_may_read_student(self, student_id: str) -> None:
        """Refuses a person who may not read this student's results; services (no person) are the catalog's."""
        reader = current_principal()
        if reader is None:
            return
        auth = auth_service_pb2_grpc.AuthServiceStub(self._channels.channel("auth"))
        try:
            student = (await auth.LookupUser(auth_service_pb2.LookupUserRequest(user_id=student_id))).user
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                raise NotFound("no such student") from None
            raise
        approved = False
        if reader.role == "parent":
            check = auth_service_pb2.CheckParentLinkRequest(parent_id=reader.user_id, student_id=student_id)
            approved = (await auth.CheckParentLink(check)).approved
        if not may_read_student_results(reader, student.zone_id, student.org_id, student.id, approved_parent=approved):
            raise PermissionDenied(
                "you may not read this student's results", reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE
            )

    async def ListStudentReports(
        self,
        request: pb.ListStudentReportsRequest,
        context: UnaryContext[pb.ListStudentReportsRequest, pb.ListStudentReportsResponse],
    ) -> pb.ListStudentReportsResponse:
        if not request.student_id:
            raise InvalidArgument("student_id is required", [("student_id", "required")])
        await self._check_may_read_student(request.student_id)
        raise NotImplementedError("reports arrive with scoring (the exam issue)")


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    if deps.database is None:
        raise RuntimeError("the exam service needs PostgreSQL (MEGACITY_DATABASE_URL)")
    servicer = ExamServicer(deps.channels, ExamStore(deps.database), deps.audit)
    return [ServicerBinding(exam_service_pb2_grpc.add_ExamServiceServicer_to_server, servicer)]
