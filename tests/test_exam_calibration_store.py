"""Calibration runs against real PostgreSQL (services/exam/calibration_store.py, calibration_worker.py): a bank whose
finished attempts were simulated from known 2PL parameters is calibrated into a new, complete parameter version
close to them; attempts in progress keep their version; activation leaves exactly one version active; a run without
enough responses fails with a message and writes nothing; two workers never hold the same run, and a run whose
worker died is taken over."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC

import asyncpg
import numpy as np
import pytest

from megacity.exam.v1 import resources_pb2 as res
from services.exam.calibration import calibrate, simulate_responses
from services.exam.calibration_store import MAX_CLAIMS, CalibrationSettings, CalibrationStore, ClaimedRun, RunSummary
from services.exam.calibration_worker import CalibrationWorker
from services.exam.store import Owner
from services.runtime.database import TenantScope, create_pool
from services.runtime.errors import InvalidArgument, NotFound
from tests.support.calibration import AREAS, AUTHORED, N_ITEMS, N_PERSONS, ZONE, seed_bank

ORG = "org-calibrated"
SETTINGS = CalibrationSettings(
    model="2PL",
    item_ids=(),
    content_areas=(),
    min_responses_per_item=200,
    max_iterations=500,
    activate_on_success=False,
)


async def _parameters(owner_url: str, org: str, version: int) -> dict[str, asyncpg.Record]:
    connection = await asyncpg.connect(owner_url)
    try:
        rows = await connection.fetch(
            "SELECT * FROM exam.item_parameters WHERE org_id = $1 AND version = $2", org, version
        )
    finally:
        await connection.close()
    return {row["item_id"]: row for row in rows}


async def _owner_value(owner_url: str, query: str, *args: object) -> object:
    connection = await asyncpg.connect(owner_url)
    try:
        return await connection.fetchval(query, *args)
    finally:
        await connection.close()


@asynccontextmanager
async def _store(identity_database: dict[str, str]) -> AsyncIterator[CalibrationStore]:
    """The store as an exam replica has it: the service's own login, row-level security applying."""
    pool = await create_pool(identity_database["exam"], schema="exam")
    try:
        yield CalibrationStore(pool)
    finally:
        await pool.close()


OWNER = Owner(zone_id=ZONE, org_id=ORG, creator_id="teacher-1")
SCOPE = TenantScope.org(ZONE, ORG)


async def test_a_run_writes_a_complete_version_near_the_generating_parameters_that_activation_switches_to(
    identity_database: dict[str, str], fresh_database: str
) -> None:
    bank = await seed_bank(fresh_database, ORG)
    async with _store(identity_database) as store:
        queued = await store.create(OWNER, SETTINGS)
        assert (queued.state, queued.progress, queued.result_version) == (res.CALIBRATION_STATE_QUEUED, 0, 0)
        assert (queued.min_responses_per_item, queued.creator_id, queued.org_id) == (200, "teacher-1", ORG)

        assert await CalibrationWorker(store).process_one()
        run = await store.calibration(SCOPE, queued.id)
        assert run.state == res.CALIBRATION_STATE_SUCCEEDED, run.error_message
        assert (run.result_version, run.item_count, run.response_count) == (2, N_ITEMS, N_ITEMS * N_PERSONS)
        assert (run.progress, run.converged, run.error_message) == (1.0, True, "")
        assert 0 < run.iterations < 500
        assert run.log_likelihood < 0
        assert run.HasField("start_time")
        assert run.HasField("finish_time")

        versions = await store.versions(SCOPE, before=None, limit=10)
        assert [(v.version, v.active, v.item_count) for v in versions] == [
            (2, False, N_ITEMS + 2),
            (1, True, N_ITEMS + 2),
        ]
        assert (versions[0].calibration_id, versions[0].model) == (queued.id, res.IRT_MODEL_2PL)
        assert not versions[0].HasField("activate_time")

        written = await _parameters(fresh_database, ORG, 2)
        estimated_b = np.array([written[item]["b"] for item in bank.item_ids])
        estimated_a = np.array([written[item]["a"] for item in bank.item_ids])
        assert np.corrcoef(estimated_b, bank.b)[0, 1] >= 0.95
        assert np.corrcoef(estimated_a, bank.a)[0, 1] >= 0.8
        for item in bank.item_ids:
            row = written[item]
            assert (row["model"], row["c"], row["c_standard_error"], row["response_count"]) == ("2PL", 0, 0, N_PERSONS)
            assert 0 < row["b_standard_error"] < 0.3
            assert 0 < row["a_standard_error"] < 0.3
        # Items nobody answered keep what the active version said, so the new version is a whole bank.
        for item in bank.unanswered:
            row = written[item]
            assert (row["model"], row["a"], row["b"], row["c"], row["response_count"]) == (*AUTHORED.values(), 0)

        # An item authored after the run gets its parameters in the active version 1 only; activating version 2
        # brings it along, so the bank of new attempts does not lose it.
        connection = await asyncpg.connect(fresh_database)
        try:
            await connection.execute(
                "INSERT INTO exam.items (item_id, zone_id, org_id, content_area, item_type, stem, answer_key, "
                "creator_id) VALUES ('late-item', $1, $2, 'algebra', 'true_false', 'Late', '{}', 'author')",
                ZONE,
                ORG,
            )
            await connection.execute(
                "INSERT INTO exam.item_parameters (item_id, version, zone_id, org_id, model, a, b, c) "
                "VALUES ('late-item', 1, $1, $2, '2PL', 1.5, 0.5, 0)",
                ZONE,
                ORG,
            )
        finally:
            await connection.close()
        activated = await store.activate(SCOPE, 2)
        assert (activated.version, activated.active, activated.item_count) == (2, True, N_ITEMS + 3)
        assert (await _parameters(fresh_database, ORG, 2))["late-item"]["b"] == 0.5
        assert activated.HasField("activate_time")
        assert await store.activate(SCOPE, 2) == activated  # again: nothing changes
        assert [v.active for v in await store.versions(SCOPE, before=None, limit=10)] == [True, False]
        assert (
            await _owner_value(
                fresh_database,
                "SELECT parameter_version FROM exam.attempts WHERE attempt_id = $1",
                bank.in_progress_attempt,
            )
            == 1
        )
        with pytest.raises(NotFound):
            await store.activate(SCOPE, 9)
        # Paging: newest first, then the rest.
        assert [v.version for v in await store.versions(SCOPE, before=2, limit=10)] == [1]


async def test_activate_on_success_and_filters_choose_the_items_and_switch_the_one_active_version(
    identity_database: dict[str, str], fresh_database: str
) -> None:
    bank = await seed_bank(fresh_database, ORG)
    async with _store(identity_database) as store:
        worker = CalibrationWorker(store)
        algebra = await store.create(
            OWNER, dataclasses.replace(SETTINGS, content_areas=("algebra",), activate_on_success=True)
        )
        assert await worker.process_one()
        run = await store.calibration(SCOPE, algebra.id)
        assert (run.state, run.result_version, run.item_count) == (res.CALIBRATION_STATE_SUCCEEDED, 2, N_ITEMS // 2)
        written = await _parameters(fresh_database, ORG, 2)
        for position, item in enumerate(bank.item_ids):
            in_area = AREAS[position % 2] == "algebra"
            assert written[item]["response_count"] == (N_PERSONS if in_area else 0)
            assert (written[item]["model"] == "2PL") is in_area
        versions = await store.versions(SCOPE, before=None, limit=10)
        assert [(v.version, v.active) for v in versions] == [(2, True), (1, False)]

        chosen = bank.item_ids[:3]
        picked = await store.create(OWNER, dataclasses.replace(SETTINGS, item_ids=tuple(chosen), model="3PL"))
        assert await worker.process_one()
        run = await store.calibration(SCOPE, picked.id)
        assert (run.state, run.result_version, run.item_count) == (res.CALIBRATION_STATE_SUCCEEDED, 3, 3)
        third = await _parameters(fresh_database, ORG, 3)
        assert {item for item, row in third.items() if row["model"] == "3PL" and row["response_count"]} == set(chosen)
        # Not activated: version 2 stays the one; everything not chosen was copied from it.
        assert [v.active for v in await store.versions(SCOPE, before=None, limit=10)] == [False, True, False]
        assert third[bank.item_ids[4]]["b"] == written[bank.item_ids[4]]["b"]
        assert await _owner_value(fresh_database, "SELECT count(*) FROM exam.parameter_versions WHERE active") == 1


async def test_a_run_without_enough_responses_fails_with_a_message_and_writes_no_version(
    identity_database: dict[str, str], fresh_database: str
) -> None:
    await seed_bank(fresh_database, ORG)
    async with _store(identity_database) as store:
        worker = CalibrationWorker(store)
        starved = await store.create(OWNER, dataclasses.replace(SETTINGS, min_responses_per_item=5000))
        assert await worker.process_one()
        run = await store.calibration(SCOPE, starved.id)
        assert (run.state, run.result_version) == (res.CALIBRATION_STATE_FAILED, 0)
        assert "too few responses" in run.error_message
        assert "5000" in run.error_message
        assert f"has is {N_PERSONS}" in run.error_message
        assert run.HasField("finish_time")
        assert [v.version for v in await store.versions(SCOPE, before=None, limit=10)] == [1]

        empty_org = Owner(zone_id=ZONE, org_id="org-without-items", creator_id="teacher-2")
        bankless = await store.create(empty_org, SETTINGS)
        assert await worker.process_one()
        run = await store.calibration(TenantScope.org(ZONE, empty_org.org_id), bankless.id)
        assert run.state == res.CALIBRATION_STATE_FAILED
        assert "no item bank" in run.error_message

        failed = await store.calibrations(SCOPE, state="failed", before=None, limit=10)
        assert [r.id for r in failed] == [starved.id]
        assert await store.calibrations(SCOPE, state="succeeded", before=None, limit=10) == []
        assert not await worker.process_one()  # nothing left


async def test_runs_belong_to_their_organisation_and_name_only_its_items(
    identity_database: dict[str, str], fresh_database: str
) -> None:
    bank = await seed_bank(fresh_database, ORG)
    async with _store(identity_database) as store:
        runs = [await store.create(OWNER, SETTINGS) for _ in range(3)]
        other = TenantScope.org(ZONE, "org-other")
        with pytest.raises(NotFound):
            await store.calibration(other, runs[0].id)
        assert await store.calibrations(other, state=None, before=None, limit=10) == []
        assert await store.versions(other, before=None, limit=10) == []
        with pytest.raises(NotFound):
            await store.activate(other, 1)

        newest_first = await store.calibrations(SCOPE, state=None, before=None, limit=2)
        assert [r.id for r in newest_first] == [runs[2].id, runs[1].id]
        last = newest_first[-1]
        rest = await store.calibrations(
            SCOPE, state="queued", before=(last.create_time.ToDatetime(UTC), last.id), limit=2
        )
        assert [r.id for r in rest] == [runs[0].id]

        with pytest.raises(InvalidArgument) as unknown:
            await store.create(OWNER, dataclasses.replace(SETTINGS, item_ids=(bank.item_ids[0], "not-an-item")))
        assert unknown.value.violations == (("calibration.item_ids", "no such items: not-an-item"),)
        # Another organisation's item is as unknown as one that does not exist.
        with pytest.raises(InvalidArgument):
            await store.create(
                Owner(ZONE, "org-other", "teacher-3"), dataclasses.replace(SETTINGS, item_ids=(bank.item_ids[0],))
            )


async def test_two_workers_never_hold_the_same_run_and_a_dead_workers_run_is_taken_over(
    identity_database: dict[str, str], fresh_database: str
) -> None:
    await seed_bank(fresh_database, ORG)
    async with _store(identity_database) as first, _store(identity_database) as second:
        queued = {(await first.create(OWNER, SETTINGS)).id for _ in range(6)}
        # Ten claims at once from two replicas (two pools) for six runs: each run is claimed exactly once.
        claims = await asyncio.gather(*((first, second)[n % 2].claim(60.0) for n in range(10)))
        held = [claim for claim in claims if claim is not None]
        assert sorted(claim.calibration_id for claim in held) == sorted(queued)
        running = await first.calibrations(SCOPE, state="running", before=None, limit=10)
        assert len(running) == 6
        assert all(run.HasField("start_time") for run in running)

        # A live worker's run stays its own; once its heartbeat is stale, another worker takes it over and the
        # first one can no longer report on it nor finish it.
        assert await second.claim(60.0) is None
        abandoned, alive = held[0], held[1:]

        async def claim_once_stale(store: CalibrationStore) -> ClaimedRun | None:
            """A claim that finds `abandoned` stale and every other run's worker alive."""
            await asyncio.sleep(0.3)
            for claim in alive:
                assert await store.heartbeat(claim, 0.5)
            return await store.claim(0.2)

        taken = await claim_once_stale(second)
        assert taken is not None
        assert (taken.calibration_id, taken.claim_id != abandoned.claim_id) == (abandoned.calibration_id, True)
        assert not await first.heartbeat(abandoned, 0.9)
        assert not await first.fail(abandoned, "too late")
        summary = RunSummary(response_count=1, iterations=1, converged=True, log_likelihood=-1.0)
        assert await first.succeed(abandoned, [], summary) is None

        # A run released by a stopping worker is queued again at once, without counting against it.
        await second.release(taken)
        again = await first.claim(60.0)
        assert again is not None
        assert again.calibration_id == abandoned.calibration_id

        # A run that outlives MAX_CLAIMS workers fails rather than going round forever.
        for _ in range(MAX_CLAIMS - 2):
            again = await claim_once_stale(second)
            assert again is not None
            assert again.calibration_id == abandoned.calibration_id
        assert await claim_once_stale(first) is None
        given_up = await first.calibration(SCOPE, abandoned.calibration_id)
        assert given_up.state == res.CALIBRATION_STATE_FAILED
        assert f"the worker running it stopped {MAX_CLAIMS} times" in given_up.error_message


async def test_the_worker_loop_outlives_a_failing_run(identity_database: dict[str, str], fresh_database: str) -> None:
    await seed_bank(fresh_database, ORG)
    async with _store(identity_database) as store:
        starved = await store.create(OWNER, dataclasses.replace(SETTINGS, min_responses_per_item=999_999))
        good = await store.create(OWNER, dataclasses.replace(SETTINGS, activate_on_success=True))
        loop = asyncio.create_task(CalibrationWorker(store, poll_seconds=0.05, heartbeat_seconds=0.01).run())
        try:
            for _ in range(200):
                states = [(await store.calibration(SCOPE, run.id)).state for run in (starved, good)]
                if res.CALIBRATION_STATE_QUEUED not in states and res.CALIBRATION_STATE_RUNNING not in states:
                    break
                await asyncio.sleep(0.05)
        finally:
            loop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await loop
        assert states == [res.CALIBRATION_STATE_FAILED, res.CALIBRATION_STATE_SUCCEEDED]
        assert [(v.version, v.active) for v in await store.versions(SCOPE, before=None, limit=10)] == [
            (2, True),
            (1, False),
        ]


def test_calibrate_reports_every_iteration_and_stops_when_the_report_raises() -> None:
    """What the worker relies on (services/exam/calibration.py's on_iteration): progress after each EM iteration, and
    an exception from the callback ending the calibration."""
    rng = np.random.default_rng(3)
    a, b = np.exp(rng.normal(0.0, 0.3, 10)), rng.normal(0.0, 1.0, 10)
    responses = simulate_responses(a, b, np.zeros(10), rng.normal(0.0, 1.0, 500), rng)
    reports: list[tuple[int, float]] = []
    result = calibrate(responses, "2PL", on_iteration=lambda iterations, change: reports.append((iterations, change)))
    assert [iterations for iterations, _ in reports] == list(range(1, result.iterations + 1))
    assert reports[-1][1] < 1e-4 <= reports[0][1]

    class Stop(Exception):
        pass

    def stop_at_third(iterations: int, change: float) -> None:
        if iterations == 3:
            raise Stop

    with pytest.raises(Stop):
        calibrate(responses, "2PL", on_iteration=stop_at_third)


async def test_a_stopping_worker_hands_its_run_back_to_the_queue(
    identity_database: dict[str, str], fresh_database: str
) -> None:
    await seed_bank(fresh_database, ORG)
    async with _store(identity_database) as store:
        queued = await store.create(OWNER, SETTINGS)
        # The owner holds the responses table, so the worker is caught reading them when the service stops.
        blocker = await asyncpg.connect(fresh_database)
        try:
            async with blocker.transaction():
                await blocker.execute("LOCK TABLE exam.attempt_responses IN ACCESS EXCLUSIVE MODE")
                working = asyncio.create_task(CalibrationWorker(store).process_one())
                for _ in range(100):
                    if (await store.calibration(SCOPE, queued.id)).state == res.CALIBRATION_STATE_RUNNING:
                        break
                    await asyncio.sleep(0.02)
                working.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await working
        finally:
            await blocker.close()
        released = await store.calibration(SCOPE, queued.id)
        assert (released.state, released.progress, released.HasField("start_time")) == (
            res.CALIBRATION_STATE_QUEUED,
            0,
            False,
        )
        assert await _owner_value(fresh_database, "SELECT claims FROM exam.calibrations") == 0
        assert await CalibrationWorker(store).process_one()
        assert (await store.calibration(SCOPE, queued.id)).state == res.CALIBRATION_STATE_SUCCEEDED
