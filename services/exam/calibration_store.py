"""The SQL of calibration runs and parameter versions (schema `exam`: db/exam/0002 and 0005).

The RPCs (services/exam/calibration_rpc.py) work in the caller's organisation. The calibration worker
(services/exam/calibration_worker.py) serves every organisation: it claims runs in the platform scope, then reads and
writes each run's data in that run's organisation scope, so a mistake in one of its queries cannot mix two banks.

A parameter version is complete: it holds parameters for every item of the bank when it is written (a calibration
copies the active version's parameters of the items it did not estimate) and when it becomes active (items authored
since it was written are filled in from the version it replaces). Writing a version and changing the active one
take a per-organisation lock, so version numbers never collide and exactly one version stays active.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from megacity.exam.v1 import resources_pb2 as res
from services.exam.calibration import Model
from services.exam.items import MODEL_VALUES
from services.exam.store import SCORED_STATUSES, Owner
from services.runtime.database import TenantScope, tenant_transaction
from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.rows import set_times

STATES = {
    res.CALIBRATION_STATE_QUEUED: "queued",
    res.CALIBRATION_STATE_RUNNING: "running",
    res.CALIBRATION_STATE_SUCCEEDED: "succeeded",
    res.CALIBRATION_STATE_FAILED: "failed",
}
STATE_VALUES = {name: value for value, name in STATES.items()}
# A run whose worker died this many times is failed rather than claimed again: it is likely what kills them.
MAX_CLAIMS = 3
_VERSION_SELECT = """
    SELECT v.version, v.org_id, v.active, v.calibration_id, v.model, v.create_time, v.activate_time,
        (SELECT count(*) FROM item_parameters p WHERE p.org_id = v.org_id AND p.version = v.version) AS item_count
    FROM parameter_versions v
"""


@dataclass(frozen=True)
class CalibrationSettings:
    """What a run estimates, as StartCalibration validated it."""

    model: Model
    item_ids: tuple[str, ...]
    content_areas: tuple[str, ...]
    min_responses_per_item: int
    max_iterations: int
    activate_on_success: bool


@dataclass(frozen=True)
class ClaimedRun:
    """A run a worker holds: only the holder of `claim_id` may report on it or finish it."""

    calibration_id: str
    claim_id: str
    zone_id: str
    org_id: str
    settings: CalibrationSettings

    @property
    def scope(self) -> TenantScope:
        return TenantScope.org(self.zone_id, self.org_id)


@dataclass(frozen=True)
class ResponseMatrix:
    """The scored responses a run calibrates from, in calibrate's terms (services/exam/calibration.py): item k is
    item_ids[k] with starting parameters (a[k], b[k], c[k]) from the active version; response j is person
    person_index[j] (one finished attempt) answering item item_index[j], correctly or not. Plain lists: the worker
    turns them into arrays off the event loop."""

    item_ids: tuple[str, ...]
    a: list[float]
    b: list[float]
    c: list[float]
    person_index: list[int]
    item_index: list[int]
    correct: list[bool]
    n_persons: int


@dataclass(frozen=True)
class EstimatedItem:
    """One calibrated item's parameters, their standard errors (0 where not estimated) and its response count."""

    item_id: str
    a: float
    b: float
    c: float
    a_standard_error: float
    b_standard_error: float
    c_standard_error: float
    response_count: int


@dataclass(frozen=True)
class RunSummary:
    response_count: int
    iterations: int
    converged: bool
    log_likelihood: float


class NotCalibratable(Exception):
    """The organisation's data cannot produce a version (too few responses, no bank): the run fails with this
    message, which is meant for the person who started it."""


class CalibrationStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # --- runs, as the RPCs see them --------------------------------------------------------------------------------

    async def create(self, owner: Owner, settings: CalibrationSettings) -> res.Calibration:
        """Queues a run; INVALID_ARGUMENT when item_ids names an item the organisation does not have."""
        async with tenant_transaction(self._pool, TenantScope.org(owner.zone_id, owner.org_id)) as connection:
            unknown = await connection.fetchval(
                "SELECT array_agg(wanted ORDER BY wanted) FROM unnest($1::text[]) wanted "
                "WHERE NOT EXISTS (SELECT FROM items WHERE item_id = wanted)",
                list(settings.item_ids),
            )
            if unknown:
                shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                raise InvalidArgument(
                    "item_ids names items the organisation does not have",
                    [("calibration.item_ids", f"no such items: {shown}")],
                )
            row = await connection.fetchrow(
                "INSERT INTO calibrations (calibration_id, zone_id, org_id, creator_id, model, item_ids, "
                "content_areas, min_responses_per_item, max_iterations, activate_on_success) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *",
                uuid.uuid4().hex,
                owner.zone_id,
                owner.org_id,
                owner.creator_id,
                settings.model,
                list(settings.item_ids),
                list(settings.content_areas),
                settings.min_responses_per_item,
                settings.max_iterations,
                settings.activate_on_success,
            )
        assert row is not None
        return calibration_message(row)

    async def calibration(self, scope: TenantScope, calibration_id: str) -> res.Calibration:
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow("SELECT * FROM calibrations WHERE calibration_id = $1", calibration_id)
        if row is None:
            raise NotFound("no such calibration")
        return calibration_message(row)

    async def calibrations(
        self, scope: TenantScope, *, state: str | None, before: tuple[datetime, str] | None, limit: int
    ) -> list[res.Calibration]:
        """Runs newest first; `before` is the (create time, id) of the previous page's last one."""
        async with tenant_transaction(self._pool, scope) as connection:
            rows = await connection.fetch(
                "SELECT * FROM calibrations WHERE ($1::text IS NULL OR state = $1) "
                "AND ($2::timestamptz IS NULL OR (create_time, calibration_id) < ($2::timestamptz, $3::text)) "
                "ORDER BY create_time DESC, calibration_id DESC LIMIT $4",
                state,
                None if before is None else before[0],
                None if before is None else before[1],
                limit,
            )
        return [calibration_message(row) for row in rows]

    # --- runs, as the worker sees them ------------------------------------------------------------------------------

    async def claim(self, stale_after_seconds: float) -> ClaimedRun | None:
        """Takes the oldest queued run of any organisation, or a running one whose worker has not renewed its
        heartbeat for `stale_after_seconds` (it died), and marks it running; None when there is none. Row locks
        skipped by concurrent claims keep two workers from ever taking the same run."""
        claim_id = uuid.uuid4().hex
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            await connection.execute(
                "UPDATE calibrations SET state = 'failed', finish_time = now(), "
                "error_message = 'given up: the worker running it stopped ' || claims || ' times without finishing' "
                "WHERE state = 'running' AND heartbeat_time < now() - make_interval(secs => $1) AND claims >= $2",
                stale_after_seconds,
                MAX_CLAIMS,
            )
            row = await connection.fetchrow(
                "UPDATE calibrations c SET state = 'running', claim_id = $3, claims = c.claims + 1, progress = 0, "
                "start_time = now(), heartbeat_time = now() "
                "FROM (SELECT calibration_id FROM calibrations WHERE state = 'queued' OR (state = 'running' "
                "AND heartbeat_time < now() - make_interval(secs => $1) AND claims < $2) "
                "ORDER BY create_time, calibration_id LIMIT 1 FOR UPDATE SKIP LOCKED) next "
                "WHERE c.calibration_id = next.calibration_id RETURNING c.*",
                stale_after_seconds,
                MAX_CLAIMS,
                claim_id,
            )
        if row is None:
            return None
        return ClaimedRun(
            calibration_id=row["calibration_id"],
            claim_id=claim_id,
            zone_id=row["zone_id"],
            org_id=row["org_id"],
            settings=CalibrationSettings(
                model=row["model"],
                item_ids=tuple(row["item_ids"]),
                content_areas=tuple(row["content_areas"]),
                min_responses_per_item=row["min_responses_per_item"],
                max_iterations=row["max_iterations"],
                activate_on_success=row["activate_on_success"],
            ),
        )

    async def heartbeat(self, run: ClaimedRun, progress: float) -> bool:
        """Records the run's progress and that its worker is alive; False when another worker has taken it over."""
        async with tenant_transaction(self._pool, run.scope) as connection:
            updated = await connection.execute(
                "UPDATE calibrations SET progress = $3, heartbeat_time = now() "
                "WHERE calibration_id = $1 AND claim_id = $2 AND state = 'running'",
                run.calibration_id,
                run.claim_id,
                progress,
            )
        return updated == "UPDATE 1"

    async def release(self, run: ClaimedRun) -> None:
        """Puts a run back in the queue (its worker is stopping), without counting the claim against it."""
        async with tenant_transaction(self._pool, run.scope) as connection:
            await connection.execute(
                "UPDATE calibrations SET state = 'queued', claim_id = NULL, claims = claims - 1, progress = 0, "
                "start_time = NULL, heartbeat_time = NULL "
                "WHERE calibration_id = $1 AND claim_id = $2 AND state = 'running'",
                run.calibration_id,
                run.claim_id,
            )

    async def fail(self, run: ClaimedRun, message: str) -> bool:
        """Ends the run as failed with `message`; False when the worker no longer holds it."""
        async with tenant_transaction(self._pool, run.scope) as connection:
            updated = await connection.execute(
                "UPDATE calibrations SET state = 'failed', error_message = $3, finish_time = now() "
                "WHERE calibration_id = $1 AND claim_id = $2 AND state = 'running'",
                run.calibration_id,
                run.claim_id,
                message,
            )
        return updated == "UPDATE 1"

    async def responses(self, run: ClaimedRun) -> ResponseMatrix:
        """The responses of the organisation's scored (finished or expired) attempts to the items the run
        calibrates: items with parameters in the active version (the starting values), within the run's item_ids
        and content_areas, with at least min_responses_per_item responses. NotCalibratable when no item qualifies."""
        settings = run.settings
        async with tenant_transaction(self._pool, run.scope) as connection:
            active = await connection.fetchval(
                "SELECT version FROM parameter_versions WHERE org_id = $1 AND active", run.org_id
            )
            if active is None:
                raise NotCalibratable("the organisation has no item bank to calibrate yet")
            candidates = await connection.fetch(
                "SELECT p.item_id, p.a, p.b, p.c, count(answered.item_id) AS responses FROM item_parameters p "
                "JOIN items i ON i.item_id = p.item_id "
                "LEFT JOIN (SELECT r.item_id FROM attempt_responses r JOIN attempts a ON a.attempt_id = r.attempt_id "
                f"WHERE a.status IN {SCORED_STATUSES}) answered ON answered.item_id = p.item_id "
                "WHERE p.org_id = $1 AND p.version = $2 AND (cardinality($3::text[]) = 0 OR p.item_id = ANY($3)) "
                "AND (cardinality($4::text[]) = 0 OR i.content_area = ANY($4)) "
                "GROUP BY p.item_id, p.version ORDER BY p.item_id",
                run.org_id,
                active,
                list(settings.item_ids),
                list(settings.content_areas),
            )
            eligible = [row for row in candidates if row["responses"] >= settings.min_responses_per_item]
            if not eligible:
                most = max((row["responses"] for row in candidates), default=0)
                raise NotCalibratable(
                    f"too few responses: no item has {settings.min_responses_per_item} responses from scored "
                    f"attempts (the most any of the {len(candidates)} selected items has is {most}); lower "
                    "min_responses_per_item or wait for more attempts"
                )
            # Persons are numbered densely by attempt and items by their position in `eligible`, in SQL, so the
            # response matrix arrives as three aligned arrays instead of a row per response.
            matrix = await connection.fetchrow(
                "SELECT coalesce(array_agg(person), '{}') AS persons, coalesce(array_agg(item), '{}') AS items, "
                "coalesce(array_agg(correct), '{}') AS correct, coalesce(max(person) + 1, 0) AS n_persons FROM ("
                "SELECT (dense_rank() OVER (ORDER BY r.attempt_id))::integer - 1 AS person, "
                "e.ordinal::integer - 1 AS item, r.correct "
                "FROM unnest($1::text[]) WITH ORDINALITY AS e(item_id, ordinal) "
                "JOIN attempt_responses r ON r.item_id = e.item_id "
                f"JOIN attempts a ON a.attempt_id = r.attempt_id WHERE a.status IN {SCORED_STATUSES}) scored",
                [row["item_id"] for row in eligible],
            )
        assert matrix is not None
        return ResponseMatrix(
            item_ids=tuple(row["item_id"] for row in eligible),
            a=[row["a"] for row in eligible],
            b=[row["b"] for row in eligible],
            c=[row["c"] for row in eligible],
            person_index=matrix["persons"],
            item_index=matrix["items"],
            correct=matrix["correct"],
            n_persons=matrix["n_persons"],
        )

    async def succeed(self, run: ClaimedRun, items: Sequence[EstimatedItem], summary: RunSummary) -> int | None:
        """Writes the estimates as the organisation's next parameter version, completed with the active version's
        parameters of every other item, ends the run as succeeded and, if it asked to, activates the version; all
        in one transaction. The version written, or None when the worker no longer holds the run."""
        settings = run.settings
        async with tenant_transaction(self._pool, run.scope) as connection:
            held = await connection.fetchval(
                "SELECT true FROM calibrations WHERE calibration_id = $1 AND claim_id = $2 AND state = 'running' "
                "FOR UPDATE",
                run.calibration_id,
                run.claim_id,
            )
            if not held:
                return None
            await _lock_versions(connection, run.org_id)
            version = int(
                await connection.fetchval(
                    "SELECT coalesce(max(version), 0) + 1 FROM parameter_versions WHERE org_id = $1", run.org_id
                )
            )
            await connection.execute(
                "INSERT INTO parameter_versions (zone_id, org_id, version, calibration_id, model) "
                "VALUES ($1, $2, $3, $4, $5)",
                run.zone_id,
                run.org_id,
                version,
                run.calibration_id,
                settings.model,
            )
            # Items deleted since the responses were read are left out (the join), not a reason to fail.
            await connection.execute(
                "INSERT INTO item_parameters (item_id, version, zone_id, org_id, model, a, b, c, a_standard_error, "
                "b_standard_error, c_standard_error, response_count) "
                "SELECT e.item_id, $1, $2, $3, $4, e.a, e.b, e.c, e.a_se, e.b_se, e.c_se, e.responses "
                "FROM unnest($5::text[], $6::float8[], $7::float8[], $8::float8[], $9::float8[], $10::float8[], "
                "$11::float8[], $12::integer[]) AS e(item_id, a, b, c, a_se, b_se, c_se, responses) "
                "JOIN items i ON i.item_id = e.item_id",
                version,
                run.zone_id,
                run.org_id,
                settings.model,
                [item.item_id for item in items],
                [item.a for item in items],
                [item.b for item in items],
                [item.c for item in items],
                [item.a_standard_error for item in items],
                [item.b_standard_error for item in items],
                [item.c_standard_error for item in items],
                [item.response_count for item in items],
            )
            # The active version as it is now, not when the responses were read: authors may have edited it since.
            await connection.execute(
                "INSERT INTO item_parameters (item_id, version, zone_id, org_id, model, a, b, c, a_standard_error, "
                "b_standard_error, c_standard_error, response_count) "
                "SELECT p.item_id, $2, p.zone_id, p.org_id, p.model, p.a, p.b, p.c, p.a_standard_error, "
                "p.b_standard_error, p.c_standard_error, p.response_count FROM item_parameters p "
                "JOIN parameter_versions v ON v.org_id = p.org_id AND v.version = p.version AND v.active "
                "WHERE p.org_id = $1 AND p.item_id <> ALL($3::text[])",
                run.org_id,
                version,
                [item.item_id for item in items],
            )
            await connection.execute(
                "UPDATE calibrations SET state = 'succeeded', progress = 1, result_version = $2, response_count = $3, "
                "item_count = $4, iterations = $5, converged = $6, log_likelihood = $7, finish_time = now() "
                "WHERE calibration_id = $1",
                run.calibration_id,
                version,
                summary.response_count,
                len(items),
                summary.iterations,
                summary.converged,
                summary.log_likelihood,
            )
            if settings.activate_on_success:
                await _activate(connection, run.org_id, version)
        return version

    # --- parameter versions ------------------------------------------------------------------------------------------

    async def versions(self, scope: TenantScope, *, before: int | None, limit: int) -> list[res.ParameterVersion]:
        """The organisation's versions newest first; `before` is the previous page's last version."""
        org_id = _org_of(scope)
        async with tenant_transaction(self._pool, scope) as connection:
            rows = await connection.fetch(
                f"{_VERSION_SELECT} WHERE v.org_id = $1 AND ($2::integer IS NULL OR v.version < $2) "
                "ORDER BY v.version DESC LIMIT $3",
                org_id,
                before,
                limit,
            )
        return [version_message(row) for row in rows]

    async def activate(self, scope: TenantScope, version: int) -> res.ParameterVersion:
        """Makes `version` the organisation's active one (no change if it is already); NOT_FOUND if absent."""
        org_id = _org_of(scope)
        async with tenant_transaction(self._pool, scope) as connection:
            await _lock_versions(connection, org_id)
            if not await _activate(connection, org_id, version):
                raise NotFound(f"no parameter version {version}")
            row = await connection.fetchrow(
                f"{_VERSION_SELECT} WHERE v.org_id = $1 AND v.version = $2", org_id, version
            )
        assert row is not None
        return version_message(row)


def _org_of(scope: TenantScope) -> str:
    # Version numbers count per organisation: in a wider scope the same number names several versions.
    if scope.org_id is None:
        raise ValueError("parameter versions belong to an organisation: an organisation scope is needed")
    return scope.org_id


async def _lock_versions(connection: PoolConnectionProxy, org_id: str) -> None:
    """Serialises writers of one organisation's versions until the transaction ends. A row lock would not do: the
    next version number comes from max(), which a concurrent insert changes without touching any locked row."""
    await connection.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('exam.parameter_versions:' || $1, 0))", org_id
    )


async def _activate(connection: PoolConnectionProxy, org_id: str, version: int) -> bool:
    """Activates `version` under the lock of _lock_versions, which the caller holds; False if there is no such
    version."""
    target = await connection.fetchrow(
        "SELECT active FROM parameter_versions WHERE org_id = $1 AND version = $2", org_id, version
    )
    if target is None:
        return False
    if target["active"]:
        return True
    # Items authored since `version` was written live only in the version it replaces; without them the bank of
    # new attempts would silently shrink.
    await connection.execute(
        "INSERT INTO item_parameters (item_id, version, zone_id, org_id, model, a, b, c, a_standard_error, "
        "b_standard_error, c_standard_error, response_count) "
        "SELECT p.item_id, $2, p.zone_id, p.org_id, p.model, p.a, p.b, p.c, p.a_standard_error, p.b_standard_error, "
        "p.c_standard_error, p.response_count FROM item_parameters p "
        "JOIN parameter_versions v ON v.org_id = p.org_id AND v.version = p.version AND v.active "
        "WHERE p.org_id = $1 ON CONFLICT (item_id, version) DO NOTHING",
        org_id,
        version,
    )
    await connection.execute("UPDATE parameter_versions SET active = false WHERE org_id = $1 AND active", org_id)
    await connection.execute(
        "UPDATE parameter_versions SET active = true, activate_time = now() WHERE org_id = $1 AND version = $2",
        org_id,
        version,
    )
    return True


def calibration_message(row: asyncpg.Record) -> res.Calibration:
    calibration = res.Calibration(
        id=row["calibration_id"],
        zone_id=row["zone_id"],
        org_id=row["org_id"],
        model=MODEL_VALUES[row["model"]],
        item_ids=row["item_ids"],
        content_areas=row["content_areas"],
        min_responses_per_item=row["min_responses_per_item"],
        max_iterations=row["max_iterations"],
        activate_on_success=row["activate_on_success"],
        state=STATE_VALUES[row["state"]],
        progress=row["progress"],
        response_count=row["response_count"],
        item_count=row["item_count"],
        iterations=row["iterations"],
        converged=row["converged"],
        log_likelihood=row["log_likelihood"],
        result_version=row["result_version"] or 0,
        error_message=row["error_message"],
        creator_id=row["creator_id"],
    )
    set_times(calibration, row, ("create_time", "start_time", "finish_time"))
    return calibration


def version_message(row: asyncpg.Record) -> res.ParameterVersion:
    version = res.ParameterVersion(
        version=row["version"],
        org_id=row["org_id"],
        active=row["active"],
        calibration_id=row["calibration_id"],
        model=MODEL_VALUES[row["model"]],
        item_count=row["item_count"],
    )
    set_times(version, row, ("create_time", "activate_time"))
    return version
