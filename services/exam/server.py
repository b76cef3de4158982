"""The exam service: item bank, computerized adaptive testing, attempts, scoring, reports and calibration.

Thin: validates (services/exam/items.py, exams.py), decides scope, and reads and writes through
services/exam/store.py. The CAT engine is services/exam/cat.py, scoring runs in services/exam/worker.py, the
aggregates of statistics and dashboards are services/exam/analytics.py, Sympson-Hetter parameters
services/exam/exposure.py, calibration runs services/exam/calibration_rpc.py and calibration_worker.py.

Scope: items and exams belong to their author's organisation. Teachers and org admins work in their
organisation, zone admins see their zone's exams, super admins everything; students and guests see published
exams of their organisation and public ones of their zone. Results (attempts, reports, dashboards): learners
read their own, parents an approved child's, teachers and org admins their organisation's
(services/exam/access.py).
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from google.protobuf import field_mask_pb2, json_format
from redis.asyncio import Redis

from megacity.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import exam_service_pb2_grpc
from megacity.exam.v1 import resources_pb2 as res
from services.exam import analytics, calibration_rpc, cat, exams, items
from services.exam import bank as bank_module
from services.exam.access import may_read_student_results
from services.exam.bank import LoadedBank
from services.exam.calibration_store import CalibrationStore
from services.exam.calibration_worker import CalibrationWorker
from services.exam.exposure import ExposureCache, ExposureWorker
from services.exam.store import (
    EXAM_STATUSES,
    EXAM_TYPES,
    Answer,
    AttemptStore,
    ExamStore,
    FailedToDelete,
    Owner,
    Period,
    exam_columns,
    exam_message,
)
from services.exam.worker import ABANDON_AFTER_SECONDS, ScoringWorker
from services.runtime import paging
from services.runtime.audit import Auditor
from services.runtime.callcontext import current_principal, require_principal
from services.runtime.channels import ChannelFactory
from services.runtime.config import env_number
from services.runtime.context import UnaryContext
from services.runtime.database import TenantScope
from services.runtime.errors import (
    Aborted,
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violations,
)
from services.runtime.permissions import grants
from services.runtime.rows import json_column, set_times
from services.runtime.server import Dependencies, ServicerBinding
from services.runtime.tokens import AccessClaims

# Untimed attempts nobody answered for this long are abandoned (seconds; default 72 hours).
ABANDON_AFTER_VARIABLE = "MEGACITY_EXAM_ABANDON_AFTER_SECONDS"
MAX_PAGE = 500
DASHBOARD_HISTORY = 100
LEARNERS = frozenset({"student", "guest", "parent"})


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


SCORING_STREAM = "exam_scoring"
_EXAM_CACHE_LIMIT = 1024
_LIVE_ATTEMPTS_LIMIT = 10_000
ATTEMPT_STATUS_VALUES = {
    "in_progress": res.ATTEMPT_STATUS_IN_PROGRESS,
    "finished": res.ATTEMPT_STATUS_FINISHED,
    "expired": res.ATTEMPT_STATUS_EXPIRED,
    "abandoned": res.ATTEMPT_STATUS_ABANDONED,
}
STOP_REASONS = {
    cat.StopReason.SE_TARGET: "standard_error_target",
    cat.StopReason.MAX_ITEMS: "max_items",
    cat.StopReason.TIME_LIMIT: "time_limit",
    cat.StopReason.POOL_EXHAUSTED: "pool_exhausted",
}
STOP_REASON_VALUES = {
    "standard_error_target": res.STOP_REASON_STANDARD_ERROR_TARGET,
    "max_items": res.STOP_REASON_MAX_ITEMS,
    "time_limit": res.STOP_REASON_TIME_LIMIT,
    "pool_exhausted": res.STOP_REASON_POOL_EXHAUSTED,
    "student_finished": res.STOP_REASON_STUDENT_FINISHED,
}


def _report_message(row: asyncpg.Record) -> res.Report:
    report = res.Report(
        attempt_id=row["attempt_id"],
        exam_id=row["exam_id"],
        exam_title=row["exam_title"],
        zone_id=row["zone_id"],
        org_id=row["org_id"],
        student_id=row["student_id"],
        status=res.REPORT_STATUS_READY,
        theta=row["theta"],
        standard_error=row["standard_error"],
        scaled_score=row["scaled_score"],
        percentile=row["percentile"],
        items_answered=row["items_answered"],
        items_correct=row["items_correct"],
        stop_reason=STOP_REASON_VALUES.get(row["stop_reason"], res.STOP_REASON_UNSPECIFIED),
        parameter_version=row["parameter_version"],
    )
    for area, counts in sorted(json_column(row["content_areas"]).items()):
        report.content_areas.add(
            content_area=area,
            items_answered=counts["answered"],
            items_correct=counts["correct"],
            proportion_of_items=counts["answered"] / max(row["items_answered"], 1),
        )
    set_times(report, row, ("start_time", "finish_time", "report_time"))
    return report


@dataclass(frozen=True)
class Readable:
    """The results a caller may list: a tenant scope, narrowed to one student or to one organisation's students."""

    scope: TenantScope
    student_id: str | None
    student_org_id: str | None = None


def _period(request: pb.ListReportsRequest | pb.GetExamStatisticsRequest | pb.GetDashboardRequest) -> Period:
    """A request's [start_time, end_time) filter; either end may be unset."""
    bounds = (
        request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None,
        request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None,
    )
    if bounds[0] is not None and bounds[1] is not None and bounds[1] <= bounds[0]:
        raise InvalidArgument("end_time must come after start_time", [("end_time", "after start_time")])
    return bounds


def _attempt_summary(row: asyncpg.Record) -> res.Attempt:
    """An attempt as lists show it: its state, without the current item and responses."""
    summary = res.Attempt(
        id=row["attempt_id"],
        exam_id=row["exam_id"],
        exam_title=row["exam_title"],
        zone_id=row["zone_id"],
        org_id=row["org_id"],
        student_id=row["student_id"],
        status=ATTEMPT_STATUS_VALUES[row["status"]],
        items_answered=row["current_position"] - 1,
        stop_reason=STOP_REASON_VALUES.get(row["stop_reason"], res.STOP_REASON_UNSPECIFIED),
        parameter_version=row["parameter_version"],
    )
    set_times(summary, row, ("start_time", "deadline_time", "finish_time"))
    return summary


def _open_now(exam: res.Exam) -> bool:
    now = datetime.now(UTC)
    opens = exam.open_time.ToDatetime(UTC) if exam.HasField("open_time") else None
    closes = exam.close_time.ToDatetime(UTC) if exam.HasField("close_time") else None
    return (opens is None or opens <= now) and (closes is None or now < closes)


def _rebuilt(attempt: asyncpg.Record, answers: list[Answer], bank: LoadedBank) -> cat.CatState:
    """The CAT state waiting for the next answer, from what PostgreSQL holds (Redis lost it, or never had it)."""
    return cat.CatState(
        administered=tuple(bank.index[answer.item_id] for answer in answers),
        responses=tuple(int(answer.correct) for answer in answers),
        theta=attempt["theta"] if attempt["theta"] is not None else 0.0,
        se=attempt["standard_error"] if attempt["standard_error"] is not None else 1.0,
        set_aside=tuple(bank.index[item] for item in attempt["set_aside"] if item in bank.index),
    )


class ExamServicer(exam_service_pb2_grpc.ExamServiceServicer):
    def __init__(
        self,
        channels: ChannelFactory,
        store: ExamStore,
        attempts: AttemptStore,
        auditor: Auditor,
        redis: Redis,
        banks: bank_module.BankCache,
        calibrations: CalibrationStore,
    ) -> None:
        self._channels = channels
        self._store = store
        self._attempts = attempts
        self._banks = banks
        self._exposures = ExposureCache(attempts)
        self._calibrations = calibrations
        self._states = bank_module.CatStates(redis)
        self._redis = redis
        self._audit = auditor
        self._started_exams: dict[str, res.Exam] = {}
        self._live: dict[str, tuple[asyncpg.Record, cat.CatState]] = {}

    # --- items -----------------------------------------------------------------------------------------------------

    async def CreateItem(
        self, request: pb.CreateItemRequest, context: UnaryContext[pb.CreateItemRequest, pb.CreateItemResponse]
    ) -> pb.CreateItemResponse:
        person = require_principal()
        violations = Violations()
        items.check_item(violations, request.item)
        violations.raise_if_any()
        item = await self._store.create_item(_owner(person), request.item)
        await self._audit.record("create", "success", resource_type="item", resource_id=item.id)
        return pb.CreateItemResponse(item=item)

    async def GetItem(
        self, request: pb.GetItemRequest, context: UnaryContext[pb.GetItemRequest, pb.GetItemResponse]
    ) -> pb.GetItemResponse:
        person = require_principal()
        _required(request.item_id, "item_id")
        return pb.GetItemResponse(item=await self._store.item(_staff_scope(person), request.item_id))

    async def ListItemParameters(
        self,
        request: pb.ListItemParametersRequest,
        context: UnaryContext[pb.ListItemParametersRequest, pb.ListItemParametersResponse],
    ) -> pb.ListItemParametersResponse:
        person = require_principal()
        _required(request.item_id, "item_id")
        parameters = await self._store.item_parameters(_staff_scope(person), request.item_id)
        return pb.ListItemParametersResponse(parameters=parameters)

    async def ListItems(
        self, request: pb.ListItemsRequest, context: UnaryContext[pb.ListItemsRequest, pb.ListItemsResponse]
    ) -> pb.ListItemsResponse:
        person = require_principal()
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
        person = require_principal()
        _required(request.item_id, "item_id")
        current = await self._store.item(_staff_scope(person), request.item_id)
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
        owner = Owner(zone_id=current.zone_id, org_id=current.org_id, creator_id=person.user_id)
        item = await self._store.replace_item(owner, request.item_id, updated)
        await self._audit.record(
            "update", "success", resource_type="item", resource_id=item.id, details={"fields": sorted(paths)}
        )
        return pb.UpdateItemResponse(item=item)

    async def DeleteItem(
        self, request: pb.DeleteItemRequest, context: UnaryContext[pb.DeleteItemRequest, pb.DeleteItemResponse]
    ) -> pb.DeleteItemResponse:
        person = require_principal()
        _required(request.item_id, "item_id")
        await self._store.delete_item(_staff_scope(person), request.item_id)
        await self._audit.record("delete", "success", resource_type="item", resource_id=request.item_id)
        return pb.DeleteItemResponse()

    async def ImportItems(
        self, request: pb.ImportItemsRequest, context: UnaryContext[pb.ImportItemsRequest, pb.ImportItemsResponse]
    ) -> pb.ImportItemsResponse:
        person = require_principal()
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
            json_format.ParseDict(json_column(row["adaptive"]), adaptive)
        pool = (
            0 if person.role in LEARNERS else await self._store.pool_size(_staff_scope(person), row["org_id"], adaptive)
        )
        return exam_message(row, pool)

    async def CreateExam(
        self, request: pb.CreateExamRequest, context: UnaryContext[pb.CreateExamRequest, pb.CreateExamResponse]
    ) -> pb.CreateExamResponse:
        person = require_principal()
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
        person = require_principal()
        row = await self._readable_exam(person, request.exam_id)
        return pb.GetExamResponse(exam=await self._exam_message(person, row))

    async def ListExams(
        self, request: pb.ListExamsRequest, context: UnaryContext[pb.ListExamsRequest, pb.ListExamsResponse]
    ) -> pb.ListExamsResponse:
        person = require_principal()
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
        person = require_principal()
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
        person = require_principal()
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
            exam = exam_message(current)
            if exam.HasField("adaptive"):
                if await self._store.pool_size(_staff_scope(person), exam.org_id, exam.adaptive) == 0:
                    raise FailedPrecondition(
                        "the exam's item pool is empty: activate items first",
                        reason=ErrorReason.ERROR_REASON_ITEM_POOL_EXHAUSTED,
                    )
            else:
                form = res.AdaptiveConfig(pool_item_ids=exam.fixed_form.item_ids)
                if await self._store.pool_size(_staff_scope(person), exam.org_id, form) < len(form.pool_item_ids):
                    raise FailedPrecondition(
                        "every item of the fixed form must be active and have parameters",
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
        return pb.PublishExamResponse(exam=await self._exam_message(require_principal(), row))

    async def ArchiveExam(
        self, request: pb.ArchiveExamRequest, context: UnaryContext[pb.ArchiveExamRequest, pb.ArchiveExamResponse]
    ) -> pb.ArchiveExamResponse:
        row = await self._transition(request.exam_id, "archived")
        return pb.ArchiveExamResponse(exam=await self._exam_message(require_principal(), row))

    async def DeleteExam(
        self, request: pb.DeleteExamRequest, context: UnaryContext[pb.DeleteExamRequest, pb.DeleteExamResponse]
    ) -> pb.DeleteExamResponse:
        person = require_principal()
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

    # --- attempts --------------------------------------------------------------------------------------------------

    def _served(
        self, bank: LoadedBank, item_id: str | None, position: int, serve_time: datetime | None
    ) -> res.ServedItem | None:
        if item_id is None:
            return None
        row = bank.rows[bank.index[item_id]]
        served = res.ServedItem(
            item_id=row.item_id,
            position=position,
            item_type=items.ITEM_TYPE_VALUES[row.item_type],
            stem=row.stem,
            media_uri=row.media_uri,
        )
        served.choices.extend(row.choices)
        if serve_time is not None:
            served.serve_time.FromDatetime(serve_time)
        return served

    def _attempt_message(
        self, attempt: asyncpg.Record, bank: LoadedBank, show: bool, answers: list[Answer] | None = None
    ) -> res.Attempt:
        message = _attempt_summary(attempt)
        served = self._served(
            bank, attempt["current_item_id"], attempt["current_position"], attempt["current_serve_time"]
        )
        if served is not None:
            message.current_item.CopyFrom(served)
        if show and attempt["theta"] is not None:
            message.theta = attempt["theta"]
            message.standard_error = attempt["standard_error"]
        for answer in answers or ():
            message.responses.add(
                item_id=answer.item_id,
                position=answer.position,
                content_area=answer.content_area,
                response=answer.response,
                correct=answer.correct,
                theta=answer.theta if show else 0.0,
                standard_error=answer.standard_error if show else 0.0,
            )
        return message

    async def StartAttempt(
        self, request: pb.StartAttemptRequest, context: UnaryContext[pb.StartAttemptRequest, pb.StartAttemptResponse]
    ) -> pb.StartAttemptResponse:
        person = require_principal()
        exam_row = await self._readable_exam(person, request.exam_id)
        exam = exam_message(exam_row)
        if exam.status != res.EXAM_STATUS_PUBLISHED or not _open_now(exam):
            raise FailedPrecondition("the exam is not open", reason=ErrorReason.ERROR_REASON_EXAM_NOT_OPEN)
        scope = TenantScope.org(exam.zone_id, exam.org_id)
        existing = await self._attempts.open_attempt(scope, exam.id, person.user_id)
        version = existing["parameter_version"] if existing else await self._attempts.active_version(scope, exam.org_id)
        if version is None:
            raise FailedPrecondition("the exam has no item bank", reason=ErrorReason.ERROR_REASON_ITEM_POOL_EXHAUSTED)
        bank = await self._banks.get(scope, exam.org_id, version)
        if existing is not None:
            return pb.StartAttemptResponse(
                attempt=self._attempt_message(existing, bank, exam.show_estimates), resumed=True
            )
        if exam.max_attempts_per_student and (
            await self._attempts.attempts_count(scope, exam.id, person.user_id) >= exam.max_attempts_per_student
        ):
            raise FailedPrecondition(
                "no attempts left for this exam",
                reason=ErrorReason.ERROR_REASON_EXAM_NOT_OPEN,
                metadata={"max_attempts_per_student": str(exam.max_attempts_per_student)},
            )
        seed = secrets.randbits(62)
        step = bank_module.attempt_step(
            bank,
            exam,
            cat.CatState.start(bank_module.scoring_config(exam)),
            seed,
            exposure_k=await self._exposures.get(scope, exam, version, bank),
        )
        if step.item is None:
            raise FailedPrecondition(
                "the exam's item pool is empty", reason=ErrorReason.ERROR_REASON_ITEM_POOL_EXHAUSTED
            )
        deadline = datetime.now(UTC) + timedelta(seconds=exam.time_limit.seconds) if exam.time_limit.seconds else None
        attempt = await self._attempts.create_attempt(
            exam_row, person.user_id, person.org_id, version, seed, bank.engine.ids[step.item], deadline
        )
        await self._states.save(attempt["attempt_id"], 1, step.state, bank)
        self._remember(attempt, step.state)
        await self._audit.record("start", "success", resource_type="attempt", resource_id=attempt["attempt_id"])
        return pb.StartAttemptResponse(attempt=self._attempt_message(attempt, bank, exam.show_estimates))

    async def _attempt_and_bank(
        self, person: AccessClaims, attempt_id: str
    ) -> tuple[asyncpg.Record, LoadedBank, res.Exam]:
        _required(attempt_id, "attempt_id")
        scope = TenantScope.platform() if person.role == "super_admin" else TenantScope.zone(person.zone_id)
        attempt = await self._attempts.attempt(scope, attempt_id)
        bank, exam = await self._bank_and_exam(attempt)
        return attempt, bank, exam

    async def _bank_and_exam(self, attempt: asyncpg.Record) -> tuple[LoadedBank, res.Exam]:
        scope = TenantScope.org(attempt["zone_id"], attempt["org_id"])
        exam = self._started_exams.get(attempt["exam_id"])
        if exam is None:
            # An exam with attempts is published or archived: its form, scale and feedback settings no longer change.
            exam = exam_message(await self._store.exam(scope, attempt["exam_id"]))
            if len(self._started_exams) >= _EXAM_CACHE_LIMIT:
                self._started_exams.clear()
            self._started_exams[exam.id] = exam
        bank = await self._banks.get(scope, attempt["org_id"], attempt["parameter_version"])
        return bank, exam

    async def SubmitAnswer(
        self, request: pb.SubmitAnswerRequest, context: UnaryContext[pb.SubmitAnswerRequest, pb.SubmitAnswerResponse]
    ) -> pb.SubmitAnswerResponse:
        person = require_principal()
        _required(request.item_id, "item_id")
        # Taken, not read: a concurrent submit to the same attempt goes to PostgreSQL.
        live = self._live.pop(request.attempt_id, None)
        state: cat.CatState | None = None
        if live is not None and live[0]["student_id"] == person.user_id:
            attempt, state = live
            bank, exam = await self._bank_and_exam(attempt)
        else:
            attempt, bank, exam = await self._attempt_and_bank(person, request.attempt_id)
        if attempt["student_id"] != person.user_id:
            raise PermissionDenied("only the attempt's student answers", reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE)
        scope = TenantScope.org(attempt["zone_id"], attempt["org_id"])
        fresh = state is None
        for _ in range(3):  # a remembered attempt another replica moved on, then a concurrent submit of this answer
            if request.item_id != attempt["current_item_id"]:
                if not fresh:
                    attempt, state, fresh = await self._attempts.attempt(scope, attempt["attempt_id"]), None, True
                    continue
                return await self._replayed(scope, attempt, bank, exam, request.item_id)
            if attempt["deadline_time"] is not None and attempt["deadline_time"] <= datetime.now(UTC):
                # Time is up: the late answer does not count, and the attempt ends as it stood (and is scored).
                if await self._attempts.finish_attempt(attempt, "time_limit"):
                    await self._finished(attempt)
                attempt = await self._attempts.attempt(scope, attempt["attempt_id"])
                return self._submit_reply(attempt, bank, exam, correct=None)
            position = attempt["current_position"]
            if state is None:
                state = await self._states.load(attempt["attempt_id"], position, bank)
            if state is None:
                state = _rebuilt(attempt, await self._attempts.answers(scope, attempt["attempt_id"]), bank)
            row = bank.rows[bank.index[request.item_id]]
            choice_ids = [choice.id for choice in row.choices]
            correct = items.is_correct(row.item_type, row.answer_key, choice_ids, request.response)
            elapsed = (datetime.now(UTC) - attempt["start_time"]).total_seconds()
            step = bank_module.attempt_step(
                bank,
                exam,
                state.answered(bank.index[request.item_id], correct),
                attempt["seed"],
                exposure_k=await self._exposures.get(scope, exam, attempt["parameter_version"], bank),
                elapsed_seconds=elapsed,
            )
            next_item = None if step.item is None else bank.engine.ids[step.item]
            answer = Answer(
                position=position,
                item_id=request.item_id,
                content_area=row.content_area,
                response=request.response[:10_000],
                correct=correct,
                theta=step.state.theta,
                standard_error=step.state.se,
            )
            stop = "" if step.stop_reason is None else STOP_REASONS[step.stop_reason]
            set_aside = [bank.engine.ids[item] for item in step.state.set_aside]
            moved = await self._attempts.record_answer(
                attempt, answer, next_item=next_item, set_aside=set_aside, stop_reason=stop
            )
            if moved is not None:
                await self._states.save(attempt["attempt_id"], position + 1, step.state, bank)
                if next_item is None:
                    await self._finished(attempt)
                else:
                    self._remember(moved, step.state)
                return self._submit_reply(moved, bank, exam, correct)
            attempt, state, fresh = await self._attempts.attempt(scope, attempt["attempt_id"]), None, True
        raise Aborted(
            "the attempt changed while answering: retry", reason=ErrorReason.ERROR_REASON_CONCURRENT_MODIFICATION
        )

    def _remember(self, attempt: asyncpg.Record, state: cat.CatState) -> None:
        """Keeps an attempt in progress and its CAT state for its next answer, saving two reads (PostgreSQL and
        Redis). Safe with replicas: recording the next answer checks the attempt still waits for that item at
        that position, and a mismatch reads PostgreSQL again."""
        if len(self._live) >= _LIVE_ATTEMPTS_LIMIT:
            self._live.clear()
        self._live[attempt["attempt_id"]] = (attempt, state)

    async def _replayed(
        self, scope: TenantScope, attempt: asyncpg.Record, bank: LoadedBank, exam: res.Exam, item_id: str
    ) -> pb.SubmitAnswerResponse:
        """A retry of an answer already stored gets the same reply; any other item was never served now."""
        answers = await self._attempts.answers(scope, attempt["attempt_id"])
        if any(answer.item_id == item_id for answer in answers):
            stored = next(answer for answer in answers if answer.item_id == item_id)
            return self._submit_reply(attempt, bank, exam, stored.correct)
        if attempt["status"] != "in_progress":
            raise FailedPrecondition("the attempt is over", reason=ErrorReason.ERROR_REASON_ATTEMPT_CLOSED)
        raise FailedPrecondition(
            "this is not the item the attempt is waiting for",
            reason=ErrorReason.ERROR_REASON_ITEM_NOT_SERVED,
            metadata={"expected_item_id": attempt["current_item_id"] or ""},
        )

    def _submit_reply(
        self, attempt: asyncpg.Record, bank: LoadedBank, exam: res.Exam, correct: bool | None
    ) -> pb.SubmitAnswerResponse:
        reply = pb.SubmitAnswerResponse(
            attempt_id=attempt["attempt_id"],
            finished=attempt["status"] != "in_progress",
            items_answered=attempt["current_position"] - 1,
            stop_reason=STOP_REASON_VALUES.get(attempt["stop_reason"], res.STOP_REASON_UNSPECIFIED),
        )
        served = self._served(
            bank, attempt["current_item_id"], attempt["current_position"], attempt["current_serve_time"]
        )
        if served is not None:
            reply.next_item.CopyFrom(served)
        if exam.show_estimates and attempt["theta"] is not None:
            reply.theta = attempt["theta"]
            reply.standard_error = attempt["standard_error"]
        if exam.show_item_feedback and correct is not None:
            reply.correct = correct
        if attempt["deadline_time"] is not None:
            reply.deadline_time.FromDatetime(attempt["deadline_time"])
        return reply

    async def _finished(self, attempt: asyncpg.Record) -> None:
        """Hands a finished attempt to scoring (the exam_scoring stream)."""
        await self._redis.xadd(SCORING_STREAM, {"attempt_id": attempt["attempt_id"], "org_id": attempt["org_id"]})
        await self._audit.record("finish", "success", resource_type="attempt", resource_id=attempt["attempt_id"])

    async def FinishAttempt(
        self, request: pb.FinishAttemptRequest, context: UnaryContext[pb.FinishAttemptRequest, pb.FinishAttemptResponse]
    ) -> pb.FinishAttemptResponse:
        person = require_principal()
        attempt, bank, exam = await self._attempt_and_bank(person, request.attempt_id)
        if attempt["student_id"] != person.user_id:
            raise PermissionDenied(
                "only the attempt's student finishes it", reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE
            )
        self._live.pop(attempt["attempt_id"], None)
        if await self._attempts.finish_attempt(attempt, "student_finished"):
            await self._finished(attempt)
        scope = TenantScope.org(attempt["zone_id"], attempt["org_id"])
        attempt = await self._attempts.attempt(scope, attempt["attempt_id"])
        return pb.FinishAttemptResponse(attempt=self._attempt_message(attempt, bank, exam.show_estimates))

    async def GetAttempt(
        self, request: pb.GetAttemptRequest, context: UnaryContext[pb.GetAttemptRequest, pb.GetAttemptResponse]
    ) -> pb.GetAttemptResponse:
        person = require_principal()
        attempt, bank, exam = await self._attempt_and_bank(person, request.attempt_id)
        if attempt["student_id"] != person.user_id:
            await self._check_may_read_student(attempt["student_id"])
        answers = await self._attempts.answers(
            TenantScope.org(attempt["zone_id"], attempt["org_id"]), attempt["attempt_id"]
        )
        staff = person.role not in LEARNERS
        return pb.GetAttemptResponse(
            attempt=self._attempt_message(attempt, bank, exam.show_estimates or staff, answers)
        )

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

    async def _readable_results(self, student_id: str) -> Readable:
        """Whose attempts, reports and dashboards a caller lists: learners their own, parents an approved child's,
        teachers and org admins those of their organisation's students (whichever organisation's exam they took),
        zone admins their zone's."""
        person = require_principal()
        if person.role in ("student", "guest"):
            if student_id and student_id != person.user_id:
                raise PermissionDenied("students read their own results", reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE)
            # A student's attempts of public exams belong to the exams' organisations: the zone is the scope.
            return Readable(TenantScope.zone(person.zone_id), person.user_id)
        if person.role == "parent":
            _required(student_id, "student_id")
        if student_id:
            await self._check_may_read_student(student_id)
        if person.role in ("parent", "teacher", "org_admin"):
            students_of = person.org_id if person.role != "parent" else None
            return Readable(TenantScope.zone(person.zone_id), student_id or None, students_of)
        return Readable(_staff_scope(person), student_id or None)

    async def _report_page(
        self,
        readable: Readable,
        query: list[str],
        page_size: int,
        page_token: str,
        *,
        exam_id: str | None,
        finished: Period = (None, None),
    ) -> tuple[list[res.Report], str]:
        limit = paging.page_size(page_size, MAX_PAGE)
        position = paging.decode(page_token, query)
        rows = await self._attempts.reports(
            readable.scope,
            student_id=readable.student_id,
            student_org_id=readable.student_org_id,
            attempt_id=None,
            exam_id=exam_id,
            finished=finished,
            before=(str(position[0]), str(position[1])) if position and len(position) == 2 else None,
            limit=limit + 1,
        )
        next_token = ""
        if len(rows) > limit:
            last = rows[limit - 1]
            next_token = paging.encode([last["report_time"].isoformat(), last["attempt_id"]], query)
        return [_report_message(row) for row in rows[:limit]], next_token

    async def ListStudentReports(
        self,
        request: pb.ListStudentReportsRequest,
        context: UnaryContext[pb.ListStudentReportsRequest, pb.ListStudentReportsResponse],
    ) -> pb.ListStudentReportsResponse:
        _required(request.student_id, "student_id")
        await self._check_may_read_student(request.student_id)
        scope = TenantScope.platform() if current_principal() is None else TenantScope.zone(require_principal().zone_id)
        reports, next_token = await self._report_page(
            Readable(scope, request.student_id),
            ["student_reports", request.student_id, request.exam_id],
            request.page_size,
            request.page_token,
            exam_id=request.exam_id or None,
        )
        return pb.ListStudentReportsResponse(reports=reports, next_page_token=next_token)

    async def ListReports(
        self, request: pb.ListReportsRequest, context: UnaryContext[pb.ListReportsRequest, pb.ListReportsResponse]
    ) -> pb.ListReportsResponse:
        person = require_principal()
        if person.role not in ("student", "guest") and not grants(person.permissions, "report:read"):
            raise PermissionDenied("reading reports needs report:read", metadata={"permission": "report:read"})
        finished = _period(request)
        readable = await self._readable_results(request.student_id)
        query = ["reports", request.exam_id, readable.student_id or "", *(str(bound) for bound in finished)]
        reports, next_token = await self._report_page(
            readable, query, request.page_size, request.page_token, exam_id=request.exam_id or None, finished=finished
        )
        return pb.ListReportsResponse(reports=reports, next_page_token=next_token)

    async def ListAttempts(
        self, request: pb.ListAttemptsRequest, context: UnaryContext[pb.ListAttemptsRequest, pb.ListAttemptsResponse]
    ) -> pb.ListAttemptsResponse:
        status = next((name for name, value in ATTEMPT_STATUS_VALUES.items() if value == request.status), None)
        if request.status and status is None:
            raise InvalidArgument("unknown attempt status", [("status", "unknown value")])
        readable = await self._readable_results(request.student_id)
        limit = paging.page_size(request.page_size, MAX_PAGE)
        query = ["attempts", request.exam_id, readable.student_id or "", status or ""]
        position = paging.decode(request.page_token, query)
        rows, total = await self._attempts.attempts(
            readable.scope,
            exam_id=request.exam_id or None,
            student_id=readable.student_id,
            student_org_id=readable.student_org_id,
            status=status,
            before=(str(position[0]), str(position[1])) if position and len(position) == 2 else None,
            limit=limit + 1,
        )
        next_token = ""
        if len(rows) > limit:
            last = rows[limit - 1]
            next_token = paging.encode([last["start_time"].isoformat(), last["attempt_id"]], query)
        return pb.ListAttemptsResponse(
            attempts=[_attempt_summary(row) for row in rows[:limit]], next_page_token=next_token, total_size=total
        )

    async def GetExamStatistics(
        self,
        request: pb.GetExamStatisticsRequest,
        context: UnaryContext[pb.GetExamStatisticsRequest, pb.GetExamStatisticsResponse],
    ) -> pb.GetExamStatisticsResponse:
        person = require_principal()
        _required(request.exam_id, "exam_id")
        started = _period(request)
        scope = _staff_scope(person)
        await self._store.exam(scope, request.exam_id)  # NOT_FOUND outside the caller's scope
        figures = await self._attempts.exam_figures(scope, request.exam_id, started)
        if not figures:
            return pb.GetExamStatisticsResponse(aggregate=res.ExamAggregate(exam_id=request.exam_id))
        return pb.GetExamStatisticsResponse(
            aggregate=analytics.exam_aggregate(figures[0]),
            item_exposures=analytics.item_exposures(figures[0]),
            content_area_proportions=analytics.content_area_proportions(figures[0]),
        )

    async def GetDashboard(
        self, request: pb.GetDashboardRequest, context: UnaryContext[pb.GetDashboardRequest, pb.GetDashboardResponse]
    ) -> pb.GetDashboardResponse:
        person = require_principal()
        started = _period(request)
        if request.student_id or person.role in LEARNERS:
            readable = await self._readable_results(request.student_id)
            assert readable.student_id is not None
            return pb.GetDashboardResponse(
                student=await self._student_dashboard(readable.scope, readable.student_id, request, started)
            )
        figures = await self._attempts.exam_figures(_staff_scope(person), request.exam_id or None, started)
        return pb.GetDashboardResponse(
            teacher=res.TeacherDashboard(
                org_id=person.org_id if person.role in ("teacher", "org_admin") else "",
                exams=[analytics.exam_aggregate(exam) for exam in figures],
            )
        )

    async def _student_dashboard(
        self, scope: TenantScope, student_id: str, request: pb.GetDashboardRequest, started: Period
    ) -> res.StudentDashboard:
        exam_id = request.exam_id or None
        attempts_started, attempts_finished = await self._attempts.started_and_finished(
            scope, student_id, exam_id, started
        )
        in_progress, _ = await self._attempts.attempts(
            scope, exam_id=exam_id, student_id=student_id, status="in_progress", before=None, limit=MAX_PAGE
        )
        history = await self._attempts.reports(
            scope, student_id=student_id, attempt_id=None, exam_id=exam_id, finished=started, limit=DASHBOARD_HISTORY
        )
        return res.StudentDashboard(
            student_id=student_id,
            attempts_started=attempts_started,
            attempts_finished=attempts_finished,
            in_progress=[_attempt_summary(row) for row in in_progress],
            history=[_report_message(row) for row in history],
        )

    async def GetAttemptReport(
        self,
        request: pb.GetAttemptReportRequest,
        context: UnaryContext[pb.GetAttemptReportRequest, pb.GetAttemptReportResponse],
    ) -> pb.GetAttemptReportResponse:
        person = require_principal()
        attempt, _, _ = await self._attempt_and_bank(person, request.attempt_id)
        if attempt["student_id"] != person.user_id:
            await self._check_may_read_student(attempt["student_id"])
        scope = TenantScope.org(attempt["zone_id"], attempt["org_id"])
        rows = await self._attempts.reports(scope, student_id=None, attempt_id=attempt["attempt_id"], limit=1)
        if not rows:
            if attempt["status"] == "in_progress":
                raise FailedPrecondition(
                    "the attempt is still in progress", reason=ErrorReason.ERROR_REASON_ATTEMPT_CLOSED
                )
            pending = res.Report(
                attempt_id=attempt["attempt_id"],
                exam_id=attempt["exam_id"],
                exam_title=attempt["exam_title"],
                student_id=attempt["student_id"],
                status=res.REPORT_STATUS_PENDING,
            )
            return pb.GetAttemptReportResponse(report=pending)
        return pb.GetAttemptReportResponse(report=_report_message(rows[0]))

    # --- calibration -------------------------------------------------------------------------------------------------

    async def StartCalibration(
        self,
        request: pb.StartCalibrationRequest,
        context: UnaryContext[pb.StartCalibrationRequest, pb.StartCalibrationResponse],
    ) -> pb.StartCalibrationResponse:
        reply = await calibration_rpc.start_calibration(self._calibrations, require_principal(), request)
        await self._audit.record("calibrate", "success", resource_type="calibration", resource_id=reply.calibration.id)
        return reply

    async def GetCalibration(
        self,
        request: pb.GetCalibrationRequest,
        context: UnaryContext[pb.GetCalibrationRequest, pb.GetCalibrationResponse],
    ) -> pb.GetCalibrationResponse:
        return await calibration_rpc.get_calibration(self._calibrations, require_principal(), request)

    async def ListCalibrations(
        self,
        request: pb.ListCalibrationsRequest,
        context: UnaryContext[pb.ListCalibrationsRequest, pb.ListCalibrationsResponse],
    ) -> pb.ListCalibrationsResponse:
        return await calibration_rpc.list_calibrations(self._calibrations, require_principal(), request)

    async def ListParameterVersions(
        self,
        request: pb.ListParameterVersionsRequest,
        context: UnaryContext[pb.ListParameterVersionsRequest, pb.ListParameterVersionsResponse],
    ) -> pb.ListParameterVersionsResponse:
        return await calibration_rpc.list_parameter_versions(self._calibrations, require_principal(), request)

    async def ActivateParameterVersion(
        self,
        request: pb.ActivateParameterVersionRequest,
        context: UnaryContext[pb.ActivateParameterVersionRequest, pb.ActivateParameterVersionResponse],
    ) -> pb.ActivateParameterVersionResponse:
        reply = await calibration_rpc.activate_parameter_version(self._calibrations, require_principal(), request)
        await self._audit.record(
            "activate", "success", resource_type="parameter_version", resource_id=str(reply.version.version)
        )
        return reply


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    if deps.database is None:
        raise RuntimeError("the exam service needs PostgreSQL (MEGACITY_DATABASE_URL)")
    if deps.redis is None:
        raise RuntimeError("the exam service needs Redis (MEGACITY_REDIS_URL)")
    attempts = AttemptStore(deps.database)
    banks = bank_module.BankCache(attempts)
    calibrations = CalibrationStore(deps.database)
    servicer = ExamServicer(
        deps.channels, ExamStore(deps.database), attempts, deps.audit, deps.redis, banks, calibrations
    )
    worker = ScoringWorker(
        deps.redis,
        attempts,
        consumer=f"exam-{socket.gethostname()}-{os.getpid()}",
        abandon_after_seconds=env_number(ABANDON_AFTER_VARIABLE, ABANDON_AFTER_SECONDS),
    )
    deps.background.append(worker.run)
    deps.background.append(ExposureWorker(attempts, banks).run)
    deps.background.append(CalibrationWorker(calibrations).run)
    return [ServicerBinding(exam_service_pb2_grpc.add_ExamServiceServicer_to_server, servicer)]
