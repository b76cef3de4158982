"""The exam service's SQL (schema `exam`, db/exam/): the item bank with its parameter versions, and exams.

Every table is tenant-owned; each method runs in the tenant scope its caller decided (services/exam/server.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from google.protobuf import json_format

from megacity.exam.v1 import resources_pb2 as res
from services.exam import items as item_rules
from services.exam.analytics import ExamFigures, ScoredAttempt
from services.runtime.database import TenantScope, tenant_transaction
from services.runtime.errors import AlreadyExists, ErrorReason, FailedPrecondition, NotFound
from services.runtime.rows import json_column, message_json, set_times

_ITEM_SELECT = """
    SELECT i.item_id, i.zone_id, i.org_id, i.external_id, i.content_area, i.item_type, i.stem, i.choices,
        i.answer_key, i.media_uri, i.explanation, i.status, i.tags, i.language, i.exposure_count,
        i.exposure_parameter, i.creator_id, i.create_time, i.update_time,
        p.model, p.a, p.b, p.c, p.version, p.a_standard_error, p.b_standard_error, p.c_standard_error,
        p.response_count
    FROM items i
    LEFT JOIN parameter_versions v ON v.org_id = i.org_id AND v.active
    LEFT JOIN item_parameters p ON p.item_id = i.item_id AND p.version = v.version
"""
_EXAM_COLUMNS = """
    exam_id, zone_id, org_id, title, description, exam_type, status, is_public, adaptive, fixed_form, score_scale,
    time_limit_seconds, show_estimates, show_item_feedback, open_time, close_time, max_attempts_per_student,
    creator_id, create_time, update_time, publish_time
"""
# A time range [start, end): either end may be open (None).
Period = tuple[datetime | None, datetime | None]
ITEM_FILTERS = frozenset({"content_area", "status", "item_type"})
EXAM_UPDATABLE = frozenset(
    {
        "title",
        "description",
        "exam_type",
        "is_public",
        "adaptive",
        "fixed_form",
        "score_scale",
        "time_limit_seconds",
        "show_estimates",
        "show_item_feedback",
        "open_time",
        "close_time",
        "max_attempts_per_student",
    }
)


@dataclass(frozen=True)
class Owner:
    zone_id: str
    org_id: str
    creator_id: str


class ExamStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # --- items ---------------------------------------------------------------------------------------------------

    async def _active_version(self, connection: PoolConnectionProxy, zone_id: str, org_id: str) -> int:
        """The organisation's active parameter version, made (version 1) with its first item."""
        version = await connection.fetchval(
            "SELECT version FROM parameter_versions WHERE org_id = $1 AND active", org_id
        )
        if version is None:
            version = await connection.fetchval(
                "INSERT INTO parameter_versions (zone_id, org_id, version, active, activate_time) "
                "VALUES ($1, $2, 1, true, now()) ON CONFLICT (org_id, version) DO UPDATE SET active = true "
                "RETURNING version",
                zone_id,
                org_id,
            )
        return int(version)

    async def _write_item(
        self, connection: PoolConnectionProxy, owner: Owner, item: res.Item, item_id: str, *, insert: bool
    ) -> None:
        parameters = item_rules.parameters_of(item)
        content = (
            item.content_area.strip(),
            item_rules.ITEM_TYPES[item.item_type],
            item.stem,
            _json_list(item.choices),
            message_json(item.answer_key),
            item.media_uri,
            item.explanation,
            item_rules.ITEM_STATUSES.get(item.status, "draft"),
            list(item.tags),
            item.language,
        )
        if insert:
            await connection.execute(
                "INSERT INTO items (item_id, zone_id, org_id, external_id, creator_id, content_area, item_type, stem, "
                "choices, answer_key, media_uri, explanation, status, tags, language) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                item_id,
                owner.zone_id,
                owner.org_id,
                item.external_id,
                owner.creator_id,
                *content,
            )
        else:
            await connection.execute(
                "UPDATE items SET content_area = $2, item_type = $3, stem = $4, choices = $5, answer_key = $6, "
                "media_uri = $7, explanation = $8, status = $9, tags = $10, language = $11, update_time = now() "
                "WHERE item_id = $1",
                item_id,
                *content,
            )
        version = await self._active_version(connection, owner.zone_id, owner.org_id)
        await connection.execute(
            "INSERT INTO item_parameters (item_id, version, zone_id, org_id, model, a, b, c) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (item_id, version) DO UPDATE SET "
            "model = EXCLUDED.model, a = EXCLUDED.a, b = EXCLUDED.b, c = EXCLUDED.c",
            item_id,
            version,
            owner.zone_id,
            owner.org_id,
            parameters.model,
            parameters.a,
            parameters.b,
            parameters.c,
        )

    async def create_item(self, owner: Owner, item: res.Item) -> res.Item:
        item_id = uuid.uuid4().hex
        try:
            async with tenant_transaction(self._pool, TenantScope.org(owner.zone_id, owner.org_id)) as connection:
                await self._write_item(connection, owner, item, item_id, insert=True)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                f"an item with external_id {item.external_id!r} exists", reason=ErrorReason.ERROR_REASON_ALREADY_EXISTS
            ) from None
        return await self.item(TenantScope.org(owner.zone_id, owner.org_id), item_id)

    async def replace_item(self, owner: Owner, item_id: str, item: res.Item) -> res.Item:
        scope = TenantScope.org(owner.zone_id, owner.org_id)
        async with tenant_transaction(self._pool, scope) as connection:
            if not await connection.fetchval("SELECT EXISTS (SELECT FROM items WHERE item_id = $1)", item_id):
                raise NotFound("no such item")
            await self._write_item(connection, owner, item, item_id, insert=False)
        return await self.item(scope, item_id)

    async def import_items(self, owner: Owner, rows: Sequence[res.Item], *, upsert: bool) -> tuple[list[str], int, int]:
        """Stores a validated import in one transaction: (item ids, created, updated). Without `upsert`, an
        external id that exists already fails the whole import (ALREADY_EXISTS naming it)."""
        ids: list[str] = []
        created = updated = 0
        async with tenant_transaction(self._pool, TenantScope.org(owner.zone_id, owner.org_id)) as connection:
            for item in rows:
                existing = None
                if item.external_id:
                    existing = await connection.fetchval(
                        "SELECT item_id FROM items WHERE org_id = $1 AND external_id = $2",
                        owner.org_id,
                        item.external_id,
                    )
                if existing is not None and not upsert:
                    raise AlreadyExists(
                        f"an item with external_id {item.external_id!r} exists (import with upsert to update it)",
                        reason=ErrorReason.ERROR_REASON_ALREADY_EXISTS,
                    )
                item_id = existing or uuid.uuid4().hex
                await self._write_item(connection, owner, item, item_id, insert=existing is None)
                ids.append(item_id)
                created += existing is None
                updated += existing is not None
        return ids, created, updated

    async def item(self, scope: TenantScope, item_id: str) -> res.Item:
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(f"{_ITEM_SELECT} WHERE i.item_id = $1", item_id)
        if row is None:
            raise NotFound("no such item")
        return item_message(row)

    async def item_parameters(self, scope: TenantScope, item_id: str) -> list[res.ItemParameters]:
        """An item's parameters in every version, newest first; NOT_FOUND for an item outside the scope."""
        async with tenant_transaction(self._pool, scope) as connection:
            if await connection.fetchval("SELECT 1 FROM items WHERE item_id = $1", item_id) is None:
                raise NotFound("no such item")
            rows = await connection.fetch(
                "SELECT model, a, b, c, version, a_standard_error, b_standard_error, c_standard_error, response_count "
                "FROM item_parameters WHERE item_id = $1 ORDER BY version DESC",
                item_id,
            )
        return [res.ItemParameters(**{**dict(row), "model": item_rules.MODEL_VALUES[row["model"]]}) for row in rows]

    async def items(
        self,
        scope: TenantScope,
        filters: Mapping[str, str],
        *,
        tag: str,
        query: str,
        min_b: float | None,
        max_b: float | None,
        after: str | None,
        limit: int,
    ) -> tuple[list[res.Item], int]:
        assert ITEM_FILTERS.issuperset(filters), f"not a filter: {set(filters) - ITEM_FILTERS}"
        arguments: list[object] = []

        def bind(value: object) -> str:
            arguments.append(value)
            return f"${len(arguments)}"

        conditions = [f"i.{column} = {bind(value)}" for column, value in filters.items()]
        if tag:
            conditions.append(f"{bind(tag)} = ANY(i.tags)")
        if query:
            conditions.append(f"lower(i.stem) LIKE {bind(f'%{query.lower()}%')}")
        if min_b is not None:
            conditions.append(f"p.b >= {bind(min_b)}")
        if max_b is not None:
            conditions.append(f"p.b <= {bind(max_b)}")
        where = " AND ".join(conditions) or "true"
        async with tenant_transaction(self._pool, scope) as connection:
            total = await connection.fetchval(f"SELECT count(*) FROM ({_ITEM_SELECT} WHERE {where}) found", *arguments)
            page_condition = f" AND i.item_id > {bind(after)}" if after else ""
            rows = await connection.fetch(
                f"{_ITEM_SELECT} WHERE {where}{page_condition} ORDER BY i.item_id LIMIT {bind(limit)}", *arguments
            )
        return [item_message(row) for row in rows], int(total)

    async def delete_item(self, scope: TenantScope, item_id: str) -> None:
        """Deletes an item no attempt has been served; an item some attempt saw stays (its responses and reports
        refer to it): retire it instead."""
        async with tenant_transaction(self._pool, scope) as connection:
            deleted = await connection.execute(
                "DELETE FROM items WHERE item_id = $1 "
                "AND NOT EXISTS (SELECT FROM attempt_responses WHERE item_id = $1) "
                "AND NOT EXISTS (SELECT FROM attempts WHERE current_item_id = $1)",
                item_id,
            )
            if deleted == "DELETE 0":
                if await connection.fetchval("SELECT 1 FROM items WHERE item_id = $1", item_id) is None:
                    raise NotFound("no such item")
                raise FailedPrecondition(
                    "attempts have been served this item: retire it instead",
                    reason=ErrorReason.ERROR_REASON_RESOURCE_IN_USE,
                )

    async def pool_size(self, scope: TenantScope, org_id: str, adaptive: res.AdaptiveConfig | None) -> int:
        """How many active items with parameters an adaptive exam of `org_id` could draw from."""
        conditions = ["i.org_id = $1", "i.status = 'active'", "p.version IS NOT NULL"]
        arguments: list[object] = [org_id]
        if adaptive is not None and adaptive.pool_item_ids:
            arguments.append(list(adaptive.pool_item_ids))
            conditions.append(f"i.item_id = ANY(${len(arguments)}::text[])")
        if adaptive is not None and adaptive.pool_content_areas:
            arguments.append(list(adaptive.pool_content_areas))
            conditions.append(f"i.content_area = ANY(${len(arguments)}::text[])")
        async with tenant_transaction(self._pool, scope) as connection:
            return int(
                await connection.fetchval(
                    f"SELECT count(*) FROM ({_ITEM_SELECT} WHERE {' AND '.join(conditions)}) pool", *arguments
                )
            )

    # --- exams ---------------------------------------------------------------------------------------------------

    async def create_exam(self, owner: Owner, exam: res.Exam) -> asyncpg.Record:
        async with tenant_transaction(self._pool, TenantScope.org(owner.zone_id, owner.org_id)) as connection:
            row = await connection.fetchrow(
                "INSERT INTO exams (exam_id, zone_id, org_id, creator_id, title, description, exam_type, is_public, "
                "adaptive, fixed_form, score_scale, time_limit_seconds, show_estimates, show_item_feedback, "
                "open_time, close_time, max_attempts_per_student) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
                f"$11, $12, $13, $14, $15, $16, $17) RETURNING {_EXAM_COLUMNS}",
                uuid.uuid4().hex,
                owner.zone_id,
                owner.org_id,
                owner.creator_id,
                *exam_columns(exam).values(),
            )
        assert row is not None
        return row

    async def exam(
        self, scope: TenantScope, exam_id: str, *, visible_to: tuple[str, str] | None = None
    ) -> asyncpg.Record:
        """An exam in `scope`; with `visible_to` (zone, org) of a student or guest, only a published one of
        their organisation or a public one of their zone."""
        condition, arguments = "exam_id = $1", [exam_id]
        if visible_to is not None:
            condition += " AND status = 'published' AND (org_id = $2 OR is_public)"
            arguments.append(visible_to[1])
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(f"SELECT {_EXAM_COLUMNS} FROM exams WHERE {condition}", *arguments)
        if row is None:
            raise NotFound("no such exam")
        return row

    async def exams(
        self,
        scope: TenantScope,
        filters: Mapping[str, object],
        *,
        query: str,
        visible_to_org: str | None,
        after: str | None,
        limit: int,
    ) -> tuple[list[asyncpg.Record], int]:
        assert {"status", "exam_type", "is_public"}.issuperset(filters)
        arguments: list[object] = []

        def bind(value: object) -> str:
            arguments.append(value)
            return f"${len(arguments)}"

        conditions = [f"{column} = {bind(value)}" for column, value in filters.items()]
        if query:
            conditions.append(f"lower(title) LIKE {bind(f'%{query.lower()}%')}")
        if visible_to_org is not None:
            conditions.append(f"status = 'published' AND (org_id = {bind(visible_to_org)} OR is_public)")
        where = " AND ".join(conditions) or "true"
        async with tenant_transaction(self._pool, scope) as connection:
            total = await connection.fetchval(f"SELECT count(*) FROM exams WHERE {where}", *arguments)
            page_condition = f" AND exam_id > {bind(after)}" if after else ""
            rows = await connection.fetch(
                f"SELECT {_EXAM_COLUMNS} FROM exams WHERE {where}{page_condition} ORDER BY exam_id LIMIT {bind(limit)}",
                *arguments,
            )
        return list(rows), int(total)

    async def update_exam(self, scope: TenantScope, exam_id: str, changes: Mapping[str, object]) -> asyncpg.Record:
        assert EXAM_UPDATABLE.union({"status", "publish_time"}).issuperset(changes)
        assignments = "".join(f", {column} = ${index}" for index, column in enumerate(changes, start=2))
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(
                f"UPDATE exams SET update_time = now(){assignments} WHERE exam_id = $1 RETURNING {_EXAM_COLUMNS}",
                exam_id,
                *changes.values(),
            )
        if row is None:
            raise NotFound("no such exam")
        return row

    async def delete_exam(self, scope: TenantScope, exam_id: str) -> None:
        async with tenant_transaction(self._pool, scope) as connection:
            deleted = await connection.execute("DELETE FROM exams WHERE exam_id = $1 AND status = 'draft'", exam_id)
            if deleted == "DELETE 0":
                exists = await connection.fetchval("SELECT status FROM exams WHERE exam_id = $1", exam_id)
                if exists is None:
                    raise NotFound("no such exam")
                raise FailedToDelete(exists)


class FailedToDelete(Exception):
    """Only draft exams are deleted; published and archived ones keep their attempts' history."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def _json_list(choices: Sequence[res.Choice]) -> str:
    return "[" + ",".join(message_json(choice) for choice in choices) + "]"


def exam_columns(exam: res.Exam) -> dict[str, object]:
    """The stored columns of an exam's authorable fields, in the order of create_exam's insert."""
    return {
        "title": exam.title.strip(),
        "description": exam.description,
        "exam_type": EXAM_TYPES.get(exam.exam_type, "practice"),
        "is_public": exam.is_public,
        "adaptive": message_json(exam.adaptive) if exam.HasField("adaptive") else None,
        "fixed_form": message_json(exam.fixed_form) if exam.HasField("fixed_form") else None,
        "score_scale": message_json(exam.score_scale),
        "time_limit_seconds": exam.time_limit.seconds,
        "show_estimates": exam.show_estimates,
        "show_item_feedback": exam.show_item_feedback,
        "open_time": exam.open_time.ToDatetime(UTC) if exam.HasField("open_time") else None,
        "close_time": exam.close_time.ToDatetime(UTC) if exam.HasField("close_time") else None,
        "max_attempts_per_student": exam.max_attempts_per_student,
    }


EXAM_TYPES = {
    res.EXAM_TYPE_PRACTICE: "practice",
    res.EXAM_TYPE_DIAGNOSTIC: "diagnostic",
    res.EXAM_TYPE_MOCK: "mock",
    res.EXAM_TYPE_PLACEMENT: "placement",
    res.EXAM_TYPE_ASSESSMENT: "assessment",
}
EXAM_TYPE_VALUES = {name: value for value, name in EXAM_TYPES.items()}
EXAM_STATUSES = {
    res.EXAM_STATUS_DRAFT: "draft",
    res.EXAM_STATUS_PUBLISHED: "published",
    res.EXAM_STATUS_ARCHIVED: "archived",
}
EXAM_STATUS_VALUES = {name: value for value, name in EXAM_STATUSES.items()}


def item_message(row: asyncpg.Record) -> res.Item:
    item = res.Item(
        id=row["item_id"],
        zone_id=row["zone_id"],
        org_id=row["org_id"],
        external_id=row["external_id"],
        content_area=row["content_area"],
        item_type=item_rules.ITEM_TYPE_VALUES[row["item_type"]],
        stem=row["stem"],
        media_uri=row["media_uri"],
        explanation=row["explanation"],
        status=item_rules.ITEM_STATUS_VALUES[row["status"]],
        tags=row["tags"],
        language=row["language"],
        exposure_count=row["exposure_count"],
        exposure_parameter=row["exposure_parameter"],
        creator_id=row["creator_id"],
    )
    for choice in json_column(row["choices"]):
        json_format.ParseDict(choice, item.choices.add())
    json_format.ParseDict(json_column(row["answer_key"]), item.answer_key)
    if row["model"] is not None:
        item.parameters.CopyFrom(
            res.ItemParameters(
                model=item_rules.MODEL_VALUES[row["model"]],
                a=row["a"],
                b=row["b"],
                c=row["c"],
                version=row["version"],
                a_standard_error=row["a_standard_error"],
                b_standard_error=row["b_standard_error"],
                c_standard_error=row["c_standard_error"],
                response_count=row["response_count"],
            )
        )
    item.create_time.FromDatetime(row["create_time"])
    item.update_time.FromDatetime(row["update_time"])
    return item


def exam_message(row: asyncpg.Record, pool_size: int = 0) -> res.Exam:
    exam = res.Exam(
        id=row["exam_id"],
        zone_id=row["zone_id"],
        org_id=row["org_id"],
        title=row["title"],
        description=row["description"],
        exam_type=EXAM_TYPE_VALUES.get(row["exam_type"], res.EXAM_TYPE_UNSPECIFIED),
        status=EXAM_STATUS_VALUES[row["status"]],
        is_public=row["is_public"],
        show_estimates=row["show_estimates"],
        show_item_feedback=row["show_item_feedback"],
        max_attempts_per_student=row["max_attempts_per_student"],
        pool_size=pool_size,
        creator_id=row["creator_id"],
    )
    if row["adaptive"] is not None:
        json_format.ParseDict(json_column(row["adaptive"]), exam.adaptive)
    if row["fixed_form"] is not None:
        json_format.ParseDict(json_column(row["fixed_form"]), exam.fixed_form)
    json_format.ParseDict(json_column(row["score_scale"]), exam.score_scale)
    exam.time_limit.seconds = row["time_limit_seconds"]
    set_times(exam, row, ("open_time", "close_time", "create_time", "update_time", "publish_time"))
    return exam


# Ended attempts that are scored: finished (by the engine or the student) or expired (time ran out).
SCORED_STATUSES = "('finished', 'expired')"


def _ended_status(stop_reason: str) -> str:
    """SQL for the status an attempt ends in, from the query parameter holding its stop reason."""
    return f"(CASE WHEN {stop_reason}::text = 'time_limit' THEN 'expired' ELSE 'finished' END)"


_ATTEMPT_COLUMNS = """
    a.attempt_id, a.zone_id, a.org_id, a.exam_id, a.student_id, a.student_org_id, a.status, a.parameter_version,
    a.current_item_id, a.current_position, a.current_serve_time, a.theta, a.standard_error, a.stop_reason, a.seed,
    a.set_aside, a.start_time, a.deadline_time, a.finish_time, e.title AS exam_title
"""


@dataclass(frozen=True)
class BankRow:
    """One item of a parameter version, with what scoring and serving it need."""

    item_id: str
    content_area: str
    item_type: str
    stem: str
    choices: list[res.Choice]
    answer_key: res.AnswerKey
    media_uri: str
    status: str
    a: float
    b: float
    c: float


@dataclass(frozen=True)
class Answer:
    """A stored response and the attempt's state after it."""

    position: int
    item_id: str
    content_area: str
    response: str
    correct: bool
    theta: float
    standard_error: float


class AttemptStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def bank(self, scope: TenantScope, org_id: str, version: int) -> list[BankRow]:
        """Every item with parameters in `version` (retired ones too: attempts that saw them still need them)."""
        async with tenant_transaction(self._pool, scope) as connection:
            rows = await connection.fetch(
                "SELECT i.item_id, i.content_area, i.item_type, i.stem, i.choices, i.answer_key, i.media_uri, "
                "i.status, p.a, p.b, p.c FROM items i JOIN item_parameters p "
                "ON p.item_id = i.item_id AND p.version = $2 WHERE i.org_id = $1 ORDER BY i.item_id",
                org_id,
                version,
            )
        return [
            BankRow(
                item_id=row["item_id"],
                content_area=row["content_area"],
                item_type=row["item_type"],
                stem=row["stem"],
                # Parsed once per bank load, not per answer: protobuf's JSON parsing is slow in Python.
                choices=[json_format.ParseDict(choice, res.Choice()) for choice in json_column(row["choices"])],
                answer_key=json_format.ParseDict(json_column(row["answer_key"]), res.AnswerKey()),
                media_uri=row["media_uri"],
                status=row["status"],
                a=row["a"],
                b=row["b"],
                c=row["c"],
            )
            for row in rows
        ]

    async def exposure_parameters(self, scope: TenantScope, exam_id: str, version: int) -> dict[str, float]:
        """An exam's Sympson-Hetter parameters for a parameter version; empty until computed."""
        async with tenant_transaction(self._pool, scope) as connection:
            rows = await connection.fetch(
                "SELECT item_id, k FROM exposure_parameters WHERE exam_id = $1 AND version = $2", exam_id, version
            )
        return {row["item_id"]: row["k"] for row in rows}

    async def exams_awaiting_exposure(self, limit: int) -> list[asyncpg.Record]:
        """Published Sympson-Hetter exams without parameters for their organisation's active version."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            return list(
                await connection.fetch(
                    "SELECT e.*, v.version "
                    "FROM exams e JOIN parameter_versions v ON v.org_id = e.org_id AND v.active "
                    "WHERE e.status = 'published' "
                    "AND e.adaptive ->> 'exposure_control' = 'EXPOSURE_CONTROL_SYMPSON_HETTER' "
                    "AND NOT EXISTS (SELECT FROM exposure_parameters x "
                    "WHERE x.exam_id = e.exam_id AND x.version = v.version) ORDER BY e.publish_time LIMIT $1",
                    limit,
                )
            )

    async def save_exposure_parameters(self, exam: asyncpg.Record, version: int, k: Mapping[str, float]) -> None:
        """Stores an exam's parameters (a concurrent computation's are kept if first), and sets each item's shown
        exposure parameter to its lowest over the organisation's exams."""
        async with tenant_transaction(self._pool, TenantScope.org(exam["zone_id"], exam["org_id"])) as connection:
            await connection.execute(
                "INSERT INTO exposure_parameters (exam_id, version, item_id, zone_id, org_id, k) "
                "SELECT $1, $2, item_id, $3, $4, k FROM unnest($5::text[], $6::float8[]) AS given(item_id, k) "
                "ON CONFLICT DO NOTHING",
                exam["exam_id"],
                version,
                exam["zone_id"],
                exam["org_id"],
                list(k),
                list(k.values()),
            )
            await connection.execute(
                "UPDATE items i SET exposure_parameter = coalesce(("
                "  SELECT min(x.k) FROM exposure_parameters x JOIN exams e USING (exam_id) "
                "  JOIN parameter_versions v ON v.org_id = e.org_id AND v.version = x.version AND v.active "
                "  WHERE x.item_id = i.item_id AND e.status = 'published'"
                "), 1) WHERE i.item_id = ANY($1::text[])",
                list(k),
            )

    async def active_version(self, scope: TenantScope, org_id: str) -> int | None:
        async with tenant_transaction(self._pool, scope) as connection:
            version = await connection.fetchval(
                "SELECT version FROM parameter_versions WHERE org_id = $1 AND active", org_id
            )
        return None if version is None else int(version)

    async def open_attempt(self, scope: TenantScope, exam_id: str, student_id: str) -> asyncpg.Record | None:
        async with tenant_transaction(self._pool, scope) as connection:
            return await connection.fetchrow(
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts a JOIN exams e USING (exam_id) "
                "WHERE a.exam_id = $1 AND a.student_id = $2 AND a.status = 'in_progress'",
                exam_id,
                student_id,
            )

    async def attempts_count(self, scope: TenantScope, exam_id: str, student_id: str) -> int:
        async with tenant_transaction(self._pool, scope) as connection:
            return int(
                await connection.fetchval(
                    "SELECT count(*) FROM attempts WHERE exam_id = $1 AND student_id = $2", exam_id, student_id
                )
            )

    async def create_attempt(
        self,
        exam: asyncpg.Record,
        student_id: str,
        student_org_id: str,
        version: int,
        seed: int,
        first_item: str | None,
        deadline: datetime | None,
    ) -> asyncpg.Record:
        # The attempt belongs to the exam's organisation and zone (a public exam's attempts are its org's data).
        scope = TenantScope.org(exam["zone_id"], exam["org_id"])
        async with tenant_transaction(self._pool, scope) as connection:
            attempt_id = uuid.uuid4().hex
            await connection.execute(
                "INSERT INTO attempts (attempt_id, zone_id, org_id, exam_id, student_id, student_org_id, "
                "parameter_version, current_item_id, current_serve_time, seed, deadline_time) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now(), $9, $10)",
                attempt_id,
                exam["zone_id"],
                exam["org_id"],
                exam["exam_id"],
                student_id,
                student_org_id,
                version,
                first_item,
                seed,
                deadline,
            )
            row = await connection.fetchrow(
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts a JOIN exams e USING (exam_id) WHERE a.attempt_id = $1",
                attempt_id,
            )
        assert row is not None
        return row

    async def attempt(self, scope: TenantScope, attempt_id: str) -> asyncpg.Record:
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts a JOIN exams e USING (exam_id) WHERE a.attempt_id = $1",
                attempt_id,
            )
        if row is None:
            raise NotFound("no such attempt")
        return row

    async def answers(self, scope: TenantScope, attempt_id: str) -> list[Answer]:
        async with tenant_transaction(self._pool, scope) as connection:
            rows = await connection.fetch(
                "SELECT position, item_id, content_area, response, correct, theta, standard_error "
                "FROM attempt_responses WHERE attempt_id = $1 ORDER BY position",
                attempt_id,
            )
        return [Answer(**dict(row)) for row in rows]

    async def record_answer(
        self,
        attempt: asyncpg.Record,
        answer: Answer,
        *,
        next_item: str | None,
        set_aside: Sequence[str],
        stop_reason: str,
    ) -> asyncpg.Record | None:
        """Stores the answer and moves the attempt on, atomically and only if the attempt still waits for this item
        at this position: the attempt as it is now (the columns `attempt` returns), or None when another submit
        got there first."""
        scope = TenantScope.org(attempt["zone_id"], attempt["org_id"])
        # One statement (one round trip): the attempt moves on, the answer is stored and the item's exposure counted,
        # all or nothing.
        async with tenant_transaction(self._pool, scope) as connection:
            moved = await connection.fetchrow(
                "WITH moved AS ("
                "  UPDATE attempts a SET current_item_id = $3, current_position = a.current_position + 1, "
                "  current_serve_time = CASE WHEN $3::text IS NULL THEN NULL ELSE now() END, theta = $4, "
                "  standard_error = $5, set_aside = $6, stop_reason = $7, "
                f"  status = CASE WHEN $3::text IS NULL THEN {_ended_status('$7')} ELSE a.status END, "
                "  finish_time = CASE WHEN $3::text IS NULL THEN now() ELSE NULL END FROM exams e "
                "  WHERE e.exam_id = a.exam_id AND a.attempt_id = $1 AND a.current_item_id = $2 "
                "  AND a.current_position = $8 AND a.status = 'in_progress' "
                f"  RETURNING {_ATTEMPT_COLUMNS}"
                "), answered AS ("
                "  INSERT INTO attempt_responses (attempt_id, position, item_id, zone_id, org_id, content_area, "
                "  response, correct, theta, standard_error, response_time_ms) "
                "  SELECT attempt_id, $8, $2, zone_id, org_id, $9, $10, $11, $4, $5, "
                "  (extract(epoch FROM now() - $12::timestamptz) * 1000)::integer FROM moved"
                "), exposed AS ("
                "  UPDATE items SET exposure_count = exposure_count + 1 "
                "  WHERE item_id = $2 AND EXISTS (SELECT FROM moved)"
                ") SELECT * FROM moved",
                attempt["attempt_id"],
                answer.item_id,
                next_item,
                answer.theta,
                answer.standard_error,
                list(set_aside),
                stop_reason,
                answer.position,
                answer.content_area,
                answer.response,
                answer.correct,
                attempt["current_serve_time"],
            )
        return moved

    async def finish_attempt(self, attempt: asyncpg.Record, stop_reason: str) -> bool:
        """Ends an attempt in progress (the student stops early, or time ran out); False when it had ended already."""
        scope = TenantScope.org(attempt["zone_id"], attempt["org_id"])
        async with tenant_transaction(self._pool, scope) as connection:
            ended = await connection.execute(
                f"UPDATE attempts SET status = {_ended_status('$2')}, current_item_id = NULL, "
                "current_serve_time = NULL, "
                "finish_time = now(), stop_reason = $2 WHERE attempt_id = $1 AND status = 'in_progress'",
                attempt["attempt_id"],
                stop_reason,
            )
        return ended == "UPDATE 1"

    async def score_inputs(self, attempt_id: str) -> tuple[asyncpg.Record, list[Answer], list[float], Any] | None:
        """A finished attempt, its answers, the sorted thetas of its exam's finished attempts, and the exam's
        score scale (JSON); None when there is no such finished attempt."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            attempt = await connection.fetchrow(
                f"SELECT {_ATTEMPT_COLUMNS}, e.score_scale FROM attempts a JOIN exams e USING (exam_id) "
                f"WHERE a.attempt_id = $1 AND a.status IN {SCORED_STATUSES}",
                attempt_id,
            )
            if attempt is None:
                return None
            rows = await connection.fetch(
                "SELECT position, item_id, content_area, response, correct, theta, standard_error "
                "FROM attempt_responses WHERE attempt_id = $1 ORDER BY position",
                attempt_id,
            )
            thetas = await connection.fetch(
                f"SELECT coalesce(theta, 0) AS theta FROM attempts WHERE exam_id = $1 AND status IN {SCORED_STATUSES} "
                "ORDER BY 1",
                attempt["exam_id"],
            )
        return attempt, [Answer(**dict(row)) for row in rows], [row["theta"] for row in thetas], attempt["score_scale"]

    async def write_report(self, attempt: asyncpg.Record, report: Mapping[str, object]) -> None:
        """Stores a report once: scoring the same attempt again (a redelivered message) changes nothing."""
        async with tenant_transaction(self._pool, TenantScope.org(attempt["zone_id"], attempt["org_id"])) as connection:
            await connection.execute(
                "INSERT INTO reports (attempt_id, zone_id, org_id, exam_id, student_id, theta, standard_error, "
                "scaled_score, percentile, items_answered, items_correct, content_areas) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (attempt_id) DO NOTHING",
                attempt["attempt_id"],
                attempt["zone_id"],
                attempt["org_id"],
                attempt["exam_id"],
                attempt["student_id"],
                *report.values(),
            )

    async def reports(
        self,
        scope: TenantScope,
        *,
        student_id: str | None,
        attempt_id: str | None,
        exam_id: str | None = None,
        student_org_id: str | None = None,
        finished: Period = (None, None),
        before: tuple[str, str] | None = None,
        limit: int,
    ) -> list[asyncpg.Record]:
        """Reports newest first; `before` is the (report time ISO, attempt id) of the previous page's last one;
        `finished` bounds the attempts' finish time."""
        async with tenant_transaction(self._pool, scope) as connection:
            return list(
                await connection.fetch(
                    "SELECT r.*, a.stop_reason, a.parameter_version, a.start_time, a.finish_time, "
                    "e.title AS exam_title FROM reports r JOIN attempts a USING (attempt_id) "
                    "JOIN exams e ON e.exam_id = r.exam_id "
                    "WHERE ($1::text IS NULL OR r.student_id = $1) AND ($2::text IS NULL OR r.attempt_id = $2) "
                    "AND ($3::text IS NULL OR r.exam_id = $3) "
                    "AND ($4::timestamptz IS NULL OR (r.report_time, r.attempt_id) < ($4::timestamptz, $5::text)) "
                    "AND ($7::timestamptz IS NULL OR a.finish_time >= $7) "
                    "AND ($8::timestamptz IS NULL OR a.finish_time < $8) "
                    "AND ($9::text IS NULL OR a.student_org_id = $9) "
                    "ORDER BY r.report_time DESC, r.attempt_id DESC LIMIT $6",
                    student_id,
                    attempt_id,
                    exam_id,
                    None if before is None else datetime.fromisoformat(before[0]),
                    None if before is None else before[1],
                    limit,
                    *finished,
                    student_org_id,
                )
            )

    async def attempts(
        self,
        scope: TenantScope,
        *,
        exam_id: str | None,
        student_id: str | None,
        status: str | None,
        before: tuple[str, str] | None,
        limit: int,
        student_org_id: str | None = None,
    ) -> tuple[list[asyncpg.Record], int]:
        """Attempts newest first (`before`: the previous page's last (start time ISO, attempt id)), and how many
        match the filters across all pages."""
        filters = (
            "($1::text IS NULL OR a.exam_id = $1) AND ($2::text IS NULL OR a.student_id = $2) "
            "AND ($3::text IS NULL OR a.status = $3) AND ($4::text IS NULL OR a.student_org_id = $4)"
        )
        async with tenant_transaction(self._pool, scope) as connection:
            rows = await connection.fetch(
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts a JOIN exams e USING (exam_id) WHERE {filters} "
                "AND ($5::timestamptz IS NULL OR (a.start_time, a.attempt_id) < ($5::timestamptz, $6::text)) "
                "ORDER BY a.start_time DESC, a.attempt_id DESC LIMIT $7",
                exam_id,
                student_id,
                status,
                student_org_id,
                None if before is None else datetime.fromisoformat(before[0]),
                None if before is None else before[1],
                limit,
            )
            total = await connection.fetchval(
                f"SELECT count(*) FROM attempts a WHERE {filters}", exam_id, student_id, status, student_org_id
            )
        return list(rows), int(total)

    async def started_and_finished(
        self, scope: TenantScope, student_id: str, exam_id: str | None, started: Period
    ) -> tuple[int, int]:
        """How many attempts a student started in the period, and how many of those ended."""
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(
                "SELECT count(*) AS started, count(*) FILTER (WHERE status <> 'in_progress') AS ended "
                "FROM attempts WHERE student_id = $1 AND ($2::text IS NULL OR exam_id = $2) "
                "AND ($3::timestamptz IS NULL OR start_time >= $3) AND ($4::timestamptz IS NULL OR start_time < $4)",
                student_id,
                exam_id,
                *started,
            )
        assert row is not None
        return int(row["started"]), int(row["ended"])

    async def exam_figures(self, scope: TenantScope, exam_id: str | None, started: Period) -> list[ExamFigures]:
        """The figures of every exam (or one) with attempts started in the period, most attempted first."""
        period = (
            "($1::text IS NULL OR a.exam_id = $1) AND ($2::timestamptz IS NULL OR a.start_time >= $2) "
            "AND ($3::timestamptz IS NULL OR a.start_time < $3)"
        )
        async with tenant_transaction(self._pool, scope) as connection:
            exams = await connection.fetch(
                "SELECT a.exam_id, e.title, e.score_scale, count(*) AS started, "
                "count(*) FILTER (WHERE a.status = 'in_progress') AS in_progress "
                f"FROM attempts a JOIN exams e USING (exam_id) WHERE {period} "
                "GROUP BY a.exam_id, e.title, e.score_scale ORDER BY count(*) DESC, a.exam_id",
                exam_id,
                *started,
            )
            scored = await connection.fetch(
                "SELECT a.exam_id, r.scaled_score, r.theta, r.standard_error, r.items_answered "
                f"FROM reports r JOIN attempts a USING (attempt_id) WHERE {period}",
                exam_id,
                *started,
            )
            # Served items: those answered, and the one each attempt in progress is waiting on.
            exposures = await connection.fetch(
                "SELECT s.exam_id, s.item_id, i.content_area, count(*) AS served, "
                "count(*) FILTER (WHERE s.correct) AS correct FROM ("
                "  SELECT a.exam_id, r.item_id, r.correct FROM attempt_responses r JOIN attempts a USING (attempt_id) "
                f"  WHERE {period} "
                "  UNION ALL SELECT a.exam_id, a.current_item_id, false FROM attempts a "
                f"  WHERE a.current_item_id IS NOT NULL AND {period}"
                ") s JOIN items i USING (item_id) GROUP BY s.exam_id, s.item_id, i.content_area",
                exam_id,
                *started,
            )
        scores: dict[str, list[ScoredAttempt]] = {}
        for row in scored:
            scores.setdefault(row["exam_id"], []).append(
                ScoredAttempt(row["scaled_score"], row["theta"], row["standard_error"], row["items_answered"])
            )
        served: dict[str, list[tuple[str, str, int, int]]] = {}
        for row in exposures:
            served.setdefault(row["exam_id"], []).append(
                (row["item_id"], row["content_area"], int(row["served"]), int(row["correct"]))
            )
        return [
            ExamFigures(
                exam_id=row["exam_id"],
                exam_title=row["title"],
                score_scale=json_format.ParseDict(json_column(row["score_scale"]), res.ScoreScale()),
                attempts_started=int(row["started"]),
                attempts_in_progress=int(row["in_progress"]),
                scored=scores.get(row["exam_id"], []),
                exposures=served.get(row["exam_id"], []),
            )
            for row in exams
        ]

    async def expire_overdue(self, limit: int) -> list[asyncpg.Record]:
        """Ends the attempts whose time ran out while nobody answered (the student left): they expire as they
        stood. Concurrent sweeps never end the same attempt twice."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            return list(
                await connection.fetch(
                    "UPDATE attempts SET status = 'expired', stop_reason = 'time_limit', current_item_id = NULL, "
                    "current_serve_time = NULL, finish_time = deadline_time WHERE attempt_id IN ("
                    "  SELECT attempt_id FROM attempts WHERE status = 'in_progress' AND deadline_time < now() "
                    "  LIMIT $1 FOR UPDATE SKIP LOCKED"
                    ") RETURNING attempt_id, org_id",
                    limit,
                )
            )

    async def abandon_idle(self, idle_seconds: float) -> int:
        """Closes untimed attempts nobody answered for `idle_seconds`: abandoned, not scored."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            closed = await connection.execute(
                "UPDATE attempts SET status = 'abandoned', current_item_id = NULL, current_serve_time = NULL, "
                "finish_time = now() WHERE status = 'in_progress' AND deadline_time IS NULL "
                "AND coalesce(current_serve_time, start_time) < now() - make_interval(secs => $1)",
                idle_seconds,
            )
        return int(closed.split()[-1])

    async def unscored_attempts(self, settle_seconds: float, limit: int) -> list[asyncpg.Record]:
        """Attempts finished more than `settle_seconds` ago (within a day) that have no report: their message to
        the scoring worker was lost (a crash between the commit and the XADD)."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            return list(
                await connection.fetch(
                    f"SELECT attempt_id, org_id FROM attempts a WHERE status IN {SCORED_STATUSES} "
                    "AND finish_time < now() - make_interval(secs => $1) AND finish_time > now() - interval '1 day' "
                    "AND NOT EXISTS (SELECT FROM reports r WHERE r.attempt_id = a.attempt_id) LIMIT $2",
                    settle_seconds,
                    limit,
                )
            )
