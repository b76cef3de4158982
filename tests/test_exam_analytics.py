"""Reports, attempt lists, exam statistics and dashboards: the pure aggregation rules, and through the wire who
sees what."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import exam_service_pb2_grpc
from megacity.exam.v1 import resources_pb2 as res
from ops.embedded import EmbeddedRedis
from services.exam.analytics import (
    ExamFigures,
    ScoredAttempt,
    content_area_proportions,
    exam_aggregate,
    item_exposures,
    score_distribution,
)
from tests.support.accounts import Caller, People, reason
from tests.support.exams import exam_service, published_exam


def _figures(scored: list[ScoredAttempt], exposures: list[tuple[str, str, int, int]], started: int) -> ExamFigures:
    return ExamFigures(
        exam_id="e1",
        exam_title="Mock",
        score_scale=res.ScoreScale(mean=500, sd=100, min=200, max=800),
        attempts_started=started,
        attempts_in_progress=started - len(scored),
        scored=scored,
        exposures=exposures,
    )


def test_scores_fall_in_equal_bins_and_the_top_score_in_the_last() -> None:
    bins = score_distribution([200, 259.9, 260, 500, 800, 800], 200, 800)
    assert [(b.lower, b.upper) for b in bins[:2]] == [(200, 260), (260, 320)]
    assert [b.count for b in bins] == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert sum(b.count for b in score_distribution([], 0, 1)) == 0


def test_an_exams_aggregate_and_exposures() -> None:
    scored = [ScoredAttempt(400, -1.0, 0.3, 10), ScoredAttempt(600, 1.0, 0.5, 20)]
    exposures = [("i2", "algebra", 3, 1), ("i1", "algebra", 3, 3), ("i3", "reading", 2, 0)]
    figures = _figures(scored, exposures, started=4)
    aggregate = exam_aggregate(figures)
    assert (aggregate.attempts_started, aggregate.attempts_finished, aggregate.attempts_in_progress) == (4, 2, 2)
    assert (aggregate.mean_scaled_score, aggregate.sd_scaled_score) == (500, 100)
    assert (aggregate.mean_theta, aggregate.mean_standard_error, aggregate.mean_items_answered) == (0, 0.4, 15)
    assert aggregate.max_item_exposure_rate == 0.75
    assert sum(b.count for b in aggregate.score_distribution) == 2
    ranked = item_exposures(figures)
    assert [(e.item_id, e.exposure_rate, e.proportion_correct) for e in ranked] == [
        ("i1", 0.75, 1.0),
        ("i2", 0.75, 1 / 3),
        ("i3", 0.5, 0.0),
    ]
    assert content_area_proportions(figures) == {"algebra": 0.75, "reading": 0.25}


def test_an_exam_without_attempts_aggregates_to_zeros() -> None:
    aggregate = exam_aggregate(_figures([], [], started=0))
    assert (aggregate.mean_scaled_score, aggregate.sd_scaled_score, aggregate.max_item_exposure_rate) == (0, 0, 0)
    assert content_area_proportions(_figures([], [], started=0)) == {}


async def _answer_until_finished(exam: exam_service_pb2_grpc.ExamServiceStub, student: Caller, exam_id: str) -> str:
    attempt = (await exam.StartAttempt(pb.StartAttemptRequest(exam_id=exam_id), metadata=student.metadata())).attempt
    item_id = attempt.current_item.item_id
    for _ in range(20):
        reply = await exam.SubmitAnswer(
            pb.SubmitAnswerRequest(attempt_id=attempt.id, item_id=item_id, response="A"), metadata=student.metadata()
        )
        if reply.finished:
            return attempt.id
        item_id = reply.next_item.item_id
    raise AssertionError("the attempt never finished")


async def _reports(exam: exam_service_pb2_grpc.ExamServiceStub, caller: Caller, count: int) -> list[res.Report]:
    """The caller's reports once `count` are scored."""
    for _ in range(100):
        reports = list((await exam.ListReports(pb.ListReportsRequest(), metadata=caller.metadata())).reports)
        if len(reports) >= count:
            return reports
        await asyncio.sleep(0.1)
    raise AssertionError("the attempts were never scored")


async def test_who_sees_which_reports_attempts_statistics_and_dashboards(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis
) -> None:
    async with exam_service(people, identity_database, redis) as exam:
        org_id, exam_id, teacher = await published_exam(people, exam)
        ada = await people.as_new_user("univ", org_id, "student")
        bob = await people.as_new_user("univ", org_id, "student")
        ada_finished = await _answer_until_finished(exam, ada, exam_id)
        bob_finished = await _answer_until_finished(exam, bob, exam_id)
        ada_open = (await exam.StartAttempt(pb.StartAttemptRequest(exam_id=exam_id), metadata=ada.metadata())).attempt
        teachers_reports = await _reports(exam, teacher, 2)
        assert {r.attempt_id for r in teachers_reports} == {ada_finished, bob_finished}

        # Reports: a student's own only; the organisation's for the teacher, filtered and paged.
        own = await _reports(exam, ada, 1)
        assert [r.attempt_id for r in own] == [ada_finished]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await exam.ListReports(pb.ListReportsRequest(student_id=bob.user_id), metadata=ada.metadata())
        assert (refused.value.code(), reason(refused.value)) == (grpc.StatusCode.PERMISSION_DENIED, "OUT_OF_SCOPE")
        first = await exam.ListReports(pb.ListReportsRequest(page_size=1), metadata=teacher.metadata())
        second = await exam.ListReports(
            pb.ListReportsRequest(page_size=1, page_token=first.next_page_token), metadata=teacher.metadata()
        )
        assert [r.attempt_id for r in (*first.reports, *second.reports)] == [r.attempt_id for r in teachers_reports]
        assert not second.next_page_token
        only_bob = await exam.ListReports(pb.ListReportsRequest(student_id=bob.user_id), metadata=teacher.metadata())
        assert [r.attempt_id for r in only_bob.reports] == [bob_finished]
        future = Timestamp()
        future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
        later = await exam.ListReports(pb.ListReportsRequest(start_time=future), metadata=teacher.metadata())
        assert not later.reports
        with pytest.raises(grpc.aio.AioRpcError) as bad_token:
            await exam.ListReports(
                pb.ListReportsRequest(student_id=bob.user_id, page_token=first.next_page_token),
                metadata=teacher.metadata(),
            )
        assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # Attempts: the teacher sees all three with the total; a student only theirs; the status filter holds.
        listed = await exam.ListAttempts(pb.ListAttemptsRequest(exam_id=exam_id), metadata=teacher.metadata())
        assert listed.total_size == 3
        assert listed.attempts[0].id == ada_open.id  # newest first
        in_progress = await exam.ListAttempts(
            pb.ListAttemptsRequest(status=res.ATTEMPT_STATUS_IN_PROGRESS), metadata=teacher.metadata()
        )
        assert [a.id for a in in_progress.attempts] == [ada_open.id]
        adas = await exam.ListAttempts(pb.ListAttemptsRequest(), metadata=ada.metadata())
        assert {a.id for a in adas.attempts} == {ada_finished, ada_open.id}
        assert all(not a.responses for a in adas.attempts)

        # Statistics: counts add up, every served item is counted once per attempt that saw it.
        stats = await exam.GetExamStatistics(pb.GetExamStatisticsRequest(exam_id=exam_id), metadata=teacher.metadata())
        aggregate = stats.aggregate
        assert (aggregate.attempts_started, aggregate.attempts_finished, aggregate.attempts_in_progress) == (3, 2, 1)
        assert sum(b.count for b in aggregate.score_distribution) == 2
        answered = sum(r.items_answered for r in teachers_reports)
        assert sum(e.exposure_count for e in stats.item_exposures) == answered + 1  # + the open attempt's item
        assert all(
            e.proportion_correct == 1.0 for e in stats.item_exposures if e.item_id != ada_open.current_item.item_id
        )
        assert stats.item_exposures[0].exposure_rate == aggregate.max_item_exposure_rate <= 1.0
        assert sum(stats.content_area_proportions.values()) == pytest.approx(1.0)
        with pytest.raises(grpc.aio.AioRpcError) as student_stats:
            await exam.GetExamStatistics(pb.GetExamStatisticsRequest(exam_id=exam_id), metadata=ada.metadata())
        assert student_stats.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # Dashboards: a student's history; the teacher's per-exam aggregates, or one student's history.
        mine = (await exam.GetDashboard(pb.GetDashboardRequest(), metadata=ada.metadata())).student
        assert (mine.student_id, mine.attempts_started, mine.attempts_finished) == (ada.user_id, 2, 1)
        assert [a.id for a in mine.in_progress] == [ada_open.id]
        assert [r.attempt_id for r in mine.history] == [ada_finished]
        board = await exam.GetDashboard(pb.GetDashboardRequest(), metadata=teacher.metadata())
        assert board.WhichOneof("view") == "teacher"
        assert board.teacher.org_id == org_id
        assert [(e.exam_id, e.attempts_started) for e in board.teacher.exams] == [(exam_id, 3)]
        one = await exam.GetDashboard(pb.GetDashboardRequest(student_id=bob.user_id), metadata=teacher.metadata())
        assert [r.attempt_id for r in one.student.history] == [bob_finished]
        with pytest.raises(grpc.aio.AioRpcError) as backwards:
            await exam.GetDashboard(
                pb.GetDashboardRequest(start_time=future, end_time=Timestamp()), metadata=teacher.metadata()
            )
        assert backwards.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        outsider = await people.as_new_user("univ", "univ-public", "teacher")
        with pytest.raises(grpc.aio.AioRpcError) as foreign:
            await exam.GetDashboard(pb.GetDashboardRequest(student_id=bob.user_id), metadata=outsider.metadata())
        assert foreign.value.code() == grpc.StatusCode.PERMISSION_DENIED
        parent = await people.as_new_user("univ", org_id, "parent")
        with pytest.raises(grpc.aio.AioRpcError) as no_child:
            await exam.ListReports(pb.ListReportsRequest(), metadata=parent.metadata())
        assert no_child.value.code() == grpc.StatusCode.INVALID_ARGUMENT
