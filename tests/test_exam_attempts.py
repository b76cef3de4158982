"""The whole attempt flow through gRPC: start, answer item by item, idempotent retries, the wrong-item refusal,
losing the CAT state in Redis, an exam service restart mid-attempt, and who may read an attempt."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import resources_pb2 as res
from ops.embedded import EmbeddedRedis
from services.exam.bank import state_key
from services.exam.store import AttemptStore
from services.exam.worker import DEAD_LETTER, GROUP, STREAM, ScoringWorker
from services.runtime.database import create_pool
from tests.support.accounts import People, reason
from tests.support.exams import exam_service, published_exam


async def _lose_cat_state(redis: EmbeddedRedis, attempt_id: str) -> None:
    """Redis forgets an attempt's live CAT state, as after a restart without persistence."""
    client = Redis.from_url(redis.url)
    try:
        assert await client.delete(state_key(attempt_id)) == 1
    finally:
        await client.aclose()


@asynccontextmanager
async def _scoring_worker(
    identity_database: dict[str, str], redis: EmbeddedRedis, **options: Any
) -> AsyncIterator[tuple[ScoringWorker, Redis]]:
    """A scoring worker of its own (and its Redis client), beside any the exam service runs."""
    pool = await create_pool(identity_database["exam"], schema="exam", max_size=1)
    client = Redis.from_url(redis.url, decode_responses=True)
    try:
        worker = ScoringWorker(client, AttemptStore(pool), f"test-{uuid.uuid4().hex[:8]}", **options)
        await worker.ensure_group()
        yield worker, client
    finally:
        await client.aclose()
        await pool.close()


async def test_an_attempt_survives_retries_state_loss_and_a_restart(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis
) -> None:
    async with exam_service(people, identity_database, redis) as exam:
        org_id, exam_id, teacher = await published_exam(people, exam)
        student = await people.as_new_user("univ", org_id, "student")
        started = (
            await exam.StartAttempt(pb.StartAttemptRequest(exam_id=exam_id), metadata=student.metadata())
        ).attempt
        assert started.status == res.ATTEMPT_STATUS_IN_PROGRESS
        assert started.current_item.position == 1
        assert [c.id for c in started.current_item.choices] == ["A", "B"]
        resumed = await exam.StartAttempt(pb.StartAttemptRequest(exam_id=exam_id), metadata=student.metadata())
        assert (resumed.resumed, resumed.attempt.id) == (True, started.id)

        item = started.current_item.item_id
        first = await exam.SubmitAnswer(
            pb.SubmitAnswerRequest(attempt_id=started.id, item_id=item, response="A"), metadata=student.metadata()
        )
        assert (first.correct, first.items_answered, first.finished) == (True, 1, False)
        assert first.HasField("theta")
        # A retry of the same answer gets the same reply and stores nothing new.
        retry = await exam.SubmitAnswer(
            pb.SubmitAnswerRequest(attempt_id=started.id, item_id=item, response="A"), metadata=student.metadata()
        )
        assert (retry.next_item.item_id, retry.items_answered) == (first.next_item.item_id, 1)
        # An answer to an item that is not the one served is refused.
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await exam.SubmitAnswer(
                pb.SubmitAnswerRequest(attempt_id=started.id, item_id="q-unknown", response="A"),
                metadata=student.metadata(),
            )
        assert (wrong.value.code(), reason(wrong.value)) == (grpc.StatusCode.FAILED_PRECONDITION, "ITEM_NOT_SERVED")
        # Only the attempt's student answers.
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await exam.SubmitAnswer(
                pb.SubmitAnswerRequest(attempt_id=started.id, item_id=first.next_item.item_id, response="A"),
                metadata=(await people.as_new_user("univ", org_id, "student")).metadata(),
            )
        assert other.value.code() is grpc.StatusCode.PERMISSION_DENIED
        # Redis loses the CAT state: the next answer rebuilds it from PostgreSQL.
        await _lose_cat_state(redis, started.id)
        second = await exam.SubmitAnswer(
            pb.SubmitAnswerRequest(attempt_id=started.id, item_id=first.next_item.item_id, response="B"),
            metadata=student.metadata(),
        )
        assert (second.correct, second.items_answered) == (False, 2)
        next_item = second.next_item.item_id

    # The exam service restarts mid-attempt, and Redis loses the state again: nothing answered is lost, the
    # attempt goes on from PostgreSQL.
    await _lose_cat_state(redis, started.id)
    async with exam_service(people, identity_database, redis) as exam:
        reply = second
        answered = 2
        while not reply.finished:
            reply = await exam.SubmitAnswer(
                pb.SubmitAnswerRequest(attempt_id=started.id, item_id=next_item, response="A"),
                metadata=student.metadata(),
            )
            answered += 1
            next_item = reply.next_item.item_id
        assert 5 <= answered <= 8
        assert reply.stop_reason in (res.STOP_REASON_STANDARD_ERROR_TARGET, res.STOP_REASON_MAX_ITEMS)
        attempt = (
            await exam.GetAttempt(pb.GetAttemptRequest(attempt_id=started.id), metadata=student.metadata())
        ).attempt
        assert attempt.status == res.ATTEMPT_STATUS_FINISHED
        assert [r.position for r in attempt.responses] == list(range(1, answered + 1))
        assert len({r.item_id for r in attempt.responses}) == answered
        assert [r.correct for r in attempt.responses][:2] == [True, False]
        # Teachers of the org read it; a student of another org does not.
        seen = await exam.GetAttempt(pb.GetAttemptRequest(attempt_id=started.id), metadata=teacher.metadata())
        assert seen.attempt.items_answered == answered
        with pytest.raises(grpc.aio.AioRpcError) as stranger:
            await exam.GetAttempt(
                pb.GetAttemptRequest(attempt_id=started.id),
                metadata=(await people.as_new_user("univ", "univ-public", "student")).metadata(),
            )
        assert stranger.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)
    # The finished attempt waits for scoring on the exam_scoring stream.
    client = Redis.from_url(redis.url, decode_responses=True)
    try:
        entries = await client.xrange("exam_scoring") or []
    finally:
        await client.aclose()
    assert any(fields and fields.get("attempt_id") == started.id for _, fields in entries)


async def test_a_student_finishes_early_once(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis
) -> None:
    async with exam_service(people, identity_database, redis) as exam:
        org_id, exam_id, _ = await published_exam(people, exam)
        student = await people.as_new_user("univ", org_id, "student")
        started = (
            await exam.StartAttempt(pb.StartAttemptRequest(exam_id=exam_id), metadata=student.metadata())
        ).attempt
        await exam.SubmitAnswer(
            pb.SubmitAnswerRequest(attempt_id=started.id, item_id=started.current_item.item_id, response="A"),
            metadata=student.metadata(),
        )
        for _ in range(2):  # finishing twice is a no-op
            finished = (
                await exam.FinishAttempt(pb.FinishAttemptRequest(attempt_id=started.id), metadata=student.metadata())
            ).attempt
            assert (finished.status, finished.stop_reason) == (
                res.ATTEMPT_STATUS_FINISHED,
                res.STOP_REASON_STUDENT_FINISHED,
            )
            assert not finished.HasField("current_item")
        with pytest.raises(grpc.aio.AioRpcError) as closed:
            await exam.SubmitAnswer(
                pb.SubmitAnswerRequest(attempt_id=started.id, item_id="q1", response="A"), metadata=student.metadata()
            )
        assert reason(closed.value) == "ATTEMPT_CLOSED"


async def test_a_finished_attempt_is_scored_and_reported(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis
) -> None:
    async with exam_service(people, identity_database, redis) as exam:
        org_id, exam_id, teacher = await published_exam(people, exam)
        student = await people.as_new_user("univ", org_id, "student")
        started = (
            await exam.StartAttempt(pb.StartAttemptRequest(exam_id=exam_id), metadata=student.metadata())
        ).attempt
        item, answered = started.current_item.item_id, 0
        while item:
            reply = await exam.SubmitAnswer(
                pb.SubmitAnswerRequest(attempt_id=started.id, item_id=item, response="A" if answered % 2 else "B"),
                metadata=student.metadata(),
            )
            answered += 1
            item = reply.next_item.item_id
        report = None
        for _ in range(100):  # the scoring worker runs beside the RPCs
            report = (
                await exam.GetAttemptReport(
                    pb.GetAttemptReportRequest(attempt_id=started.id), metadata=student.metadata()
                )
            ).report
            if report.status == res.REPORT_STATUS_READY:
                break
            await asyncio.sleep(0.1)
        assert report is not None
        assert report.status == res.REPORT_STATUS_READY
        assert (report.items_answered, report.items_correct) == (answered, answered // 2)
        assert 200 <= report.scaled_score <= 800
        assert report.percentile == 50.0  # the exam's only finished attempt
        assert sum(area.items_answered for area in report.content_areas) == answered
        listed = await exam.ListStudentReports(
            pb.ListStudentReportsRequest(student_id=started.student_id), metadata=teacher.metadata()
        )
        assert [r.attempt_id for r in listed.reports] == [started.id]


async def test_an_attempt_that_cannot_be_scored_ends_in_the_dead_letter_stream(
    identity_database: dict[str, str], redis: EmbeddedRedis
) -> None:
    async with _scoring_worker(identity_database, redis, reclaim_idle_ms=0, max_deliveries=3) as (worker, client):
        await client.xadd(STREAM, {"attempt_id": "no-such-attempt"})
        for _ in range(5):
            await worker.process(block_ms=10)
        dead = await client.xrange(DEAD_LETTER) or []
        assert any(fields and fields.get("attempt_id") == "no-such-attempt" for _, fields in dead)
        pending: Any = await client.xpending(STREAM, GROUP)
        assert pending["pending"] == 0


async def test_an_answer_after_the_time_limit_ends_the_attempt(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis
) -> None:
    async with exam_service(people, identity_database, redis) as exam:
        org_id, _, teacher = await published_exam(people, exam)
        timed = res.Exam(title="Timed", adaptive=res.AdaptiveConfig(min_items=5, max_items=8), show_estimates=True)
        timed.time_limit.seconds = 1
        exam_id = (await exam.CreateExam(pb.CreateExamRequest(exam=timed), metadata=teacher.metadata())).exam.id
        await exam.PublishExam(pb.PublishExamRequest(exam_id=exam_id), metadata=teacher.metadata())
        student = await people.as_new_user("univ", org_id, "student")
        started = (
            await exam.StartAttempt(pb.StartAttemptRequest(exam_id=exam_id), metadata=student.metadata(), timeout=30)
        ).attempt
        assert started.deadline_time.ToDatetime() > started.start_time.ToDatetime()
        await asyncio.sleep(1.2)  # the clock runs out
        late = await exam.SubmitAnswer(
            pb.SubmitAnswerRequest(attempt_id=started.id, item_id=started.current_item.item_id, response="A"),
            metadata=student.metadata(),
            timeout=30,
        )
        assert (late.finished, late.items_answered, late.stop_reason) == (True, 0, res.STOP_REASON_TIME_LIMIT)
        assert not late.HasField("correct")
        got = await exam.GetAttempt(pb.GetAttemptRequest(attempt_id=started.id), metadata=student.metadata())
        assert got.attempt.status == res.ATTEMPT_STATUS_EXPIRED


async def test_an_attempt_whose_scoring_message_was_lost_is_queued_again(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis, fresh_database: str
) -> None:
    async with exam_service(people, identity_database, redis) as exam:
        org_id, exam_id, _ = await published_exam(people, exam)
        student = await people.as_new_user("univ", org_id, "student")
        started = (
            await exam.StartAttempt(pb.StartAttemptRequest(exam_id=exam_id), metadata=student.metadata())
        ).attempt
    # The service is down; as if it had died between committing the finish and queueing it for scoring:
    connection = await asyncpg.connect(fresh_database)
    try:
        await connection.execute(
            "UPDATE exam.attempts SET status = 'finished', current_item_id = NULL, "
            "finish_time = now() - interval '1 minute', stop_reason = 'student_finished' WHERE attempt_id = $1",
            started.id,
        )
    finally:
        await connection.close()
    async with _scoring_worker(identity_database, redis, reclaim_idle_ms=0) as (worker, _):
        assert await worker.requeue_unscored() >= 1
        for _ in range(5):
            await worker.process(block_ms=10)
        assert await worker.requeue_unscored() == 0  # scored now: nothing left to queue


async def test_a_students_reports_page_newest_first(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis
) -> None:
    async with exam_service(people, identity_database, redis) as exam:
        org_id, exam_id, teacher = await published_exam(people, exam)
        student = await people.as_new_user("univ", org_id, "student")
        finished = []
        for _ in range(3):
            started = (
                await exam.StartAttempt(pb.StartAttemptRequest(exam_id=exam_id), metadata=student.metadata())
            ).attempt
            await exam.FinishAttempt(pb.FinishAttemptRequest(attempt_id=started.id), metadata=student.metadata())
            finished.append(started.id)
        seen: list[str] = []
        token = ""
        for _ in range(50):
            page = await exam.ListStudentReports(
                pb.ListStudentReportsRequest(student_id=started.student_id, page_size=2, page_token=token),
                metadata=teacher.metadata(),
            )
            seen += [report.attempt_id for report in page.reports]
            token = page.next_page_token
            if len(seen) == 3 and not token:
                break
            if not token:
                await asyncio.sleep(0.1)  # the worker is still scoring: start over
                seen = []
        assert sorted(seen) == sorted(finished)
        assert seen == list(reversed(finished))  # newest first


async def test_a_fixed_form_serves_its_items_in_order_and_ends_after_the_last(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis
) -> None:
    async with exam_service(people, identity_database, redis) as exam:
        org_id, _, teacher = await published_exam(people, exam)
        bank = await exam.ListItems(pb.ListItemsRequest(page_size=10), metadata=teacher.metadata())
        form = [item.id for item in bank.items[:4]]

        async def published(form_items: list[str], shuffle: bool) -> str:
            created = await exam.CreateExam(
                pb.CreateExamRequest(
                    exam=res.Exam(
                        title="Form",
                        fixed_form=res.FixedForm(item_ids=form_items, shuffle=shuffle),
                        show_estimates=True,
                    )
                ),
                metadata=teacher.metadata(),
            )
            await exam.PublishExam(pb.PublishExamRequest(exam_id=created.exam.id), metadata=teacher.metadata())
            return created.exam.id

        with pytest.raises(grpc.aio.AioRpcError) as unknown_item:
            await published([*form, "no-such-item"], shuffle=False)
        assert (unknown_item.value.code(), reason(unknown_item.value)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "ITEM_POOL_EXHAUSTED",
        )
        student = await people.as_new_user("univ", org_id, "student")
        attempt = (
            await exam.StartAttempt(
                pb.StartAttemptRequest(exam_id=await published(form, shuffle=False)), metadata=student.metadata()
            )
        ).attempt
        served = [attempt.current_item.item_id]
        with pytest.raises(grpc.aio.AioRpcError) as wrong_item:
            await exam.SubmitAnswer(
                pb.SubmitAnswerRequest(attempt_id=attempt.id, item_id=form[1], response="A"),
                metadata=student.metadata(),
            )
        assert reason(wrong_item.value) == "ITEM_NOT_SERVED"
        while True:
            reply = await exam.SubmitAnswer(
                pb.SubmitAnswerRequest(attempt_id=attempt.id, item_id=served[-1], response="A"),
                metadata=student.metadata(),
            )
            if reply.finished:
                break
            served.append(reply.next_item.item_id)
        assert served == form
        assert (reply.items_answered, reply.stop_reason) == (4, res.STOP_REASON_MAX_ITEMS)
        assert reply.theta > 0  # four right answers
        with pytest.raises(grpc.aio.AioRpcError) as in_use:  # its responses and report refer to it: retire it
            await exam.DeleteItem(pb.DeleteItemRequest(item_id=form[0]), metadata=teacher.metadata())
        assert (in_use.value.code(), reason(in_use.value)) == (grpc.StatusCode.FAILED_PRECONDITION, "RESOURCE_IN_USE")

        # Shuffled per attempt: a permutation of the form, the same on resume.
        shuffled_exam = await published([item.id for item in bank.items[:10]], shuffle=True)
        orders = set()
        for _ in range(6):
            learner = await people.as_new_user("univ", org_id, "student")
            first = await exam.StartAttempt(pb.StartAttemptRequest(exam_id=shuffled_exam), metadata=learner.metadata())
            again = await exam.StartAttempt(pb.StartAttemptRequest(exam_id=shuffled_exam), metadata=learner.metadata())
            assert again.resumed
            assert again.attempt.current_item.item_id == first.attempt.current_item.item_id
            orders.add(first.attempt.current_item.item_id)
        assert orders <= {item.id for item in bank.items[:10]}
        assert len(orders) > 1  # 6 attempts all starting on the same of 10 items: 1 chance in 100,000


async def test_attempts_students_left_expire_or_are_abandoned(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis, fresh_database: str
) -> None:
    async with exam_service(people, identity_database, redis) as exam:
        org_id, exam_id, teacher = await published_exam(people, exam)
        timed, untimed, active = [
            (
                await exam.StartAttempt(
                    pb.StartAttemptRequest(exam_id=exam_id),
                    metadata=(await people.as_new_user("univ", org_id, "student")).metadata(),
                )
            ).attempt
            for _ in range(3)
        ]
        connection = await asyncpg.connect(fresh_database)  # time passes (as the database's owner)
        try:
            await connection.execute(
                "UPDATE exam.attempts SET deadline_time = now() - interval '1 minute' WHERE attempt_id = $1", timed.id
            )
            await connection.execute(
                "UPDATE exam.attempts SET current_serve_time = now() - interval '4 days' WHERE attempt_id = $1",
                untimed.id,
            )
        finally:
            await connection.close()
        async with _scoring_worker(identity_database, redis, abandon_after_seconds=3 * 24 * 3600) as (worker, _):
            assert await worker.sweep_left_attempts() == 2
            assert await worker.sweep_left_attempts() == 0
        statuses = {}
        for attempt in (timed, untimed, active):
            got = (
                await exam.GetAttempt(pb.GetAttemptRequest(attempt_id=attempt.id), metadata=teacher.metadata())
            ).attempt
            statuses[attempt.id] = (got.status, got.stop_reason, got.HasField("current_item"))
        assert statuses == {
            timed.id: (res.ATTEMPT_STATUS_EXPIRED, res.STOP_REASON_TIME_LIMIT, False),
            untimed.id: (res.ATTEMPT_STATUS_ABANDONED, res.STOP_REASON_UNSPECIFIED, False),
            active.id: (res.ATTEMPT_STATUS_IN_PROGRESS, res.STOP_REASON_UNSPECIFIED, True),
        }
        for _ in range(100):  # the service's own worker scores the expired attempt, not the abandoned one
            report = await exam.GetAttemptReport(
                pb.GetAttemptReportRequest(attempt_id=timed.id), metadata=teacher.metadata()
            )
            if report.report.status == res.REPORT_STATUS_READY:
                break
            await asyncio.sleep(0.1)
        assert (report.report.status, report.report.stop_reason) == (
            res.REPORT_STATUS_READY,
            res.STOP_REASON_TIME_LIMIT,
        )
