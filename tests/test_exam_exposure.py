"""Sympson-Hetter exposure parameters are computed by simulation for a published exam, shown on its items, and
used by its attempts."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import resources_pb2 as res
from ops.embedded import EmbeddedRedis
from services.exam.bank import BankCache
from services.exam.exposure import ExposureCache, ExposureWorker
from services.exam.store import AttemptStore
from services.runtime.database import TenantScope, create_pool
from tests.support.accounts import People
from tests.support.exams import exam_service, published_exam

CAP = 0.25


async def test_a_sympson_hetter_exam_gets_its_parameters_by_simulation(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis
) -> None:
    async with exam_service(people, identity_database, redis) as exam:
        org_id, _, teacher = await published_exam(people, exam)
        controlled = (
            await exam.CreateExam(
                pb.CreateExamRequest(
                    exam=res.Exam(
                        title="Controlled",
                        adaptive=res.AdaptiveConfig(
                            min_items=5,
                            max_items=8,
                            standard_error_target=0.2,
                            exposure_control=res.EXPOSURE_CONTROL_SYMPSON_HETTER,
                            max_exposure_rate=CAP,
                            pool_content_areas=["algebra", "geometry"],
                        ),
                    )
                ),
                metadata=teacher.metadata(),
            )
        ).exam
        await exam.PublishExam(pb.PublishExamRequest(exam_id=controlled.id), metadata=teacher.metadata())

        pool = await create_pool(identity_database["exam"], schema="exam", max_size=2)
        try:
            store = AttemptStore(pool)
            worker = ExposureWorker(store, BankCache(store))
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as processes:
                await worker.compute_awaiting(processes)  # (or the service's own worker got there first)
                assert await worker.compute_awaiting(processes) == 0  # done once per exam and version
            scope = TenantScope.org("univ", org_id)
            version = await store.active_version(scope, org_id)
            assert version is not None
            parameters = await store.exposure_parameters(scope, controlled.id, version)
            bank = await BankCache(store).get(scope, org_id, version)
            array = await ExposureCache(store).get(scope, controlled, version, bank)
        finally:
            await pool.close()

        # Every item of the pool (40 of the 60: two of three areas) has one; the most informative are held back.
        pool_items = [row.item_id for row in bank.rows if row.content_area in ("algebra", "geometry")]
        assert sorted(parameters) == sorted(pool_items)
        assert all(0 < k <= 1 for k in parameters.values())
        assert min(parameters.values()) < 1
        assert array is not None
        assert [array[bank.index[item_id]] for item_id in pool_items] == [parameters[i] for i in pool_items]
        assert np.all(array[[bank.index[row.item_id] for row in bank.rows if row.content_area == "reading"]] == 1)
        held_back = min(parameters, key=lambda item_id: parameters[item_id])
        shown = (await exam.GetItem(pb.GetItemRequest(item_id=held_back), metadata=teacher.metadata())).item
        assert shown.exposure_parameter == parameters[held_back]

        # Attempts of the exam run with them (the selection draws against K and sets refused items aside).
        for _ in range(3):
            student = await people.as_new_user("univ", org_id, "student")
            attempt = (
                await exam.StartAttempt(pb.StartAttemptRequest(exam_id=controlled.id), metadata=student.metadata())
            ).attempt
            item_id = attempt.current_item.item_id
            for _ in range(8):
                assert item_id in parameters
                reply = await exam.SubmitAnswer(
                    pb.SubmitAnswerRequest(attempt_id=attempt.id, item_id=item_id, response="A"),
                    metadata=student.metadata(),
                )
                if reply.finished:
                    break
                item_id = reply.next_item.item_id
            assert reply.finished
