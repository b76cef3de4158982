"""The scoring worker: reads finished attempts from the `exam_scoring` Redis stream and writes their reports.

A consumer group shares the work between exam service replicas. An entry is acknowledged once its report is
stored (writing a report is idempotent, so a redelivery is harmless). An entry a replica took and never
acknowledged (it crashed) is reclaimed by another after RECLAIM_IDLE_MS. An entry that fails MAX_DELIVERIES times
goes to the dead-letter stream `exam_scoring:dead`, with its error, and is acknowledged. Every REQUEUE_SECONDS
the worker also queues again finished attempts of the last day that have no report yet (their message was lost
between the attempt's commit and its XADD), and sweeps the attempts students left: a timed attempt past its
deadline expires and is scored as it stood; an untimed one idle for `abandon_after_seconds` is abandoned.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import structlog
from google.protobuf import json_format
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from megacity.exam.v1 import resources_pb2 as res
from services.exam import scoring
from services.exam.store import AttemptStore
from services.runtime.rows import json_column

STREAM = "exam_scoring"
GROUP = "scoring"
DEAD_LETTER = "exam_scoring:dead"
MAX_DELIVERIES = 5
RECLAIM_IDLE_MS = 30_000
REQUEUE_SECONDS = 60.0
ABANDON_AFTER_SECONDS = 72 * 3600.0
_SETTLE_SECONDS = 30.0  # an attempt finished this recently may still have its message on the way
_log = structlog.get_logger("megacity.exam.scoring")


class ScoringWorker:
    def __init__(
        self,
        redis: Redis,
        store: AttemptStore,
        consumer: str,
        *,
        reclaim_idle_ms: int = RECLAIM_IDLE_MS,
        max_deliveries: int = MAX_DELIVERIES,
        abandon_after_seconds: float = ABANDON_AFTER_SECONDS,
    ) -> None:
        self._redis = redis
        self._store = store
        self._consumer = consumer
        self._reclaim_idle_ms = reclaim_idle_ms
        self._max_deliveries = max_deliveries
        self._abandon_after_seconds = abandon_after_seconds

    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def run(self) -> None:
        """Runs for the life of the service; Redis being away only pauses it."""
        while True:
            try:
                await self.ensure_group()
                requeued_at = 0.0
                while True:
                    if time.monotonic() - requeued_at >= REQUEUE_SECONDS:
                        await self.sweep_left_attempts()
                        await self.requeue_unscored()
                        requeued_at = time.monotonic()
                    await self.process(block_ms=1000)
            except (RedisError, OSError) as error:
                _log.warning("scoring.redis_unavailable", error=str(error))
                await asyncio.sleep(1.0)

    async def sweep_left_attempts(self) -> int:
        """Expires (and queues for scoring) overdue timed attempts, abandons idle untimed ones; the number closed."""
        expired = await self._store.expire_overdue(limit=500)
        for attempt in expired:
            await self._redis.xadd(STREAM, {"attempt_id": attempt["attempt_id"], "org_id": attempt["org_id"]})
        abandoned = await self._store.abandon_idle(self._abandon_after_seconds)
        if expired or abandoned:
            _log.info("scoring.swept", expired=len(expired), abandoned=abandoned)
        return len(expired) + abandoned

    async def requeue_unscored(self, settle_seconds: float = _SETTLE_SECONDS) -> int:
        """Queues again the finished attempts whose message was lost; the number queued."""
        lost = await self._store.unscored_attempts(settle_seconds, limit=500)
        for attempt in lost:
            await self._redis.xadd(STREAM, {"attempt_id": attempt["attempt_id"], "org_id": attempt["org_id"]})
        if lost:
            _log.warning("scoring.requeued", attempts=len(lost))
        return len(lost)

    async def process(self, block_ms: int) -> int:
        """Handles the entries waiting (reclaimed ones first); the number handled."""
        claimed: Any = await self._redis.xautoclaim(
            STREAM, GROUP, self._consumer, min_idle_time=self._reclaim_idle_ms, start_id="0-0", count=20
        )
        reclaimed = claimed[1]  # [next start id, entries, deleted ids]
        fresh: Any = await self._redis.xreadgroup(GROUP, self._consumer, {STREAM: ">"}, count=20, block=block_ms)
        entries = list(reclaimed) + [entry for _, stream_entries in fresh or [] for entry in stream_entries]
        for entry_id, fields in entries:
            await self._handle(entry_id, fields)
        return len(entries)

    async def _handle(self, entry_id: Any, fields: dict[Any, Any]) -> None:
        attempt_id = _text(fields.get(b"attempt_id", fields.get("attempt_id", b"")))
        try:
            await self.score(attempt_id)
        except Exception as error:
            pending = await self._redis.xpending_range(STREAM, GROUP, min=entry_id, max=entry_id, count=1)
            deliveries = int(pending[0]["times_delivered"]) if pending else self._max_deliveries
            _log.error("scoring.failed", attempt_id=attempt_id, deliveries=deliveries, error=str(error))
            if deliveries < self._max_deliveries:
                return  # stays pending: reclaimed and tried again
            await self._redis.xadd(DEAD_LETTER, {"attempt_id": attempt_id, "error": str(error)[:500]})
        await self._redis.xack(STREAM, GROUP, entry_id)

    async def score(self, attempt_id: str) -> None:
        inputs = await self._store.score_inputs(attempt_id)
        if inputs is None:
            raise LookupError(f"no finished attempt {attempt_id!r}")
        attempt, answers, thetas, scale_json = inputs
        scale = res.ScoreScale()
        json_format.ParseDict(json_column(scale_json), scale)
        theta = attempt["theta"] if attempt["theta"] is not None else 0.0
        areas: dict[str, dict[str, int]] = {}
        for answer in answers:
            area = areas.setdefault(answer.content_area, {"answered": 0, "correct": 0})
            area["answered"] += 1
            area["correct"] += int(answer.correct)
        await self._store.write_report(
            attempt,
            {
                "theta": theta,
                "standard_error": attempt["standard_error"] if attempt["standard_error"] is not None else 1.0,
                "scaled_score": scoring.scaled_score(theta, scale),
                "percentile": scoring.percentile(theta, thetas),
                "items_answered": len(answers),
                "items_correct": sum(answer.correct for answer in answers),
                "content_areas": orjson.dumps(areas).decode(),
            },
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
