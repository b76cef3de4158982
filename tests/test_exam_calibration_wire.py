"""Calibration through gRPC, as a teacher calls it through the edge: start a run over the organisation's bank, poll it
until the exam service's calibration worker has written a new parameter version, list runs and versions, activate
the version; bad requests get every field violation at once, and another organisation's run is NOT_FOUND."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest

from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import resources_pb2 as res
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2 as tenant_pb
from ops.embedded import EmbeddedRedis
from services.runtime.errors import field_violations, status_from_error
from tests.support.accounts import Caller, People
from tests.support.calibration import ITEMS_CSV, N_ITEMS, N_PERSONS, seed_bank
from tests.support.exams import exam_service


async def _teacher_of_new_org(people: People) -> tuple[str, Caller]:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    org = (
        await people.tenant.CreateOrganization(
            tenant_pb.CreateOrganizationRequest(
                organization=tenant_resources.Organization(name=f"Academy {uuid.uuid4().hex[:8]}")
            ),
            metadata=zone_admin.metadata(),
        )
    ).organization
    return org.id, await people.as_new_user("univ", org.id, "teacher")


def _violated_fields(error: grpc.aio.AioRpcError) -> set[str]:
    return {field for field, _ in field_violations(status_from_error(error))}


async def test_a_teacher_calibrates_the_bank_and_activates_the_new_version(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis, fresh_database: str
) -> None:
    async with exam_service(people, identity_database, redis) as exam:
        org_id, teacher = await _teacher_of_new_org(people)
        imported = await exam.ImportItems(
            pb.ImportItemsRequest(format=pb.IMPORT_FORMAT_CSV, content=ITEMS_CSV), metadata=teacher.metadata()
        )
        assert imported.created_count == N_ITEMS
        await seed_bank(fresh_database, org_id, list(imported.item_ids))

        started = (
            await exam.StartCalibration(
                pb.StartCalibrationRequest(calibration=res.Calibration(model=res.IRT_MODEL_2PL)),
                metadata=teacher.metadata(),
            )
        ).calibration
        assert (started.state, started.org_id, started.zone_id) == (res.CALIBRATION_STATE_QUEUED, org_id, "univ")
        assert (started.min_responses_per_item, started.max_iterations) == (200, 500)  # the defaults
        run = started
        for _ in range(150):  # the worker polls every 2 s
            run = (
                await exam.GetCalibration(
                    pb.GetCalibrationRequest(calibration_id=started.id), metadata=teacher.metadata()
                )
            ).calibration
            if run.state in (res.CALIBRATION_STATE_SUCCEEDED, res.CALIBRATION_STATE_FAILED):
                break
            await asyncio.sleep(0.1)
        assert run.state == res.CALIBRATION_STATE_SUCCEEDED, run.error_message
        assert (run.result_version, run.item_count, run.response_count) == (2, N_ITEMS, N_ITEMS * N_PERSONS)
        assert run.progress == 1.0

        listed = await exam.ListCalibrations(pb.ListCalibrationsRequest(), metadata=teacher.metadata())
        assert ([r.id for r in listed.calibrations], listed.next_page_token) == ([started.id], "")
        failed = await exam.ListCalibrations(
            pb.ListCalibrationsRequest(state=res.CALIBRATION_STATE_FAILED), metadata=teacher.metadata()
        )
        assert list(failed.calibrations) == []

        versions = await exam.ListParameterVersions(pb.ListParameterVersionsRequest(), metadata=teacher.metadata())
        assert [(v.version, v.active, v.item_count) for v in versions.versions] == [
            (2, False, N_ITEMS),
            (1, True, N_ITEMS),
        ]
        assert versions.versions[0].calibration_id == started.id
        first_page = await exam.ListParameterVersions(
            pb.ListParameterVersionsRequest(page_size=1), metadata=teacher.metadata()
        )
        assert [v.version for v in first_page.versions] == [2]
        second_page = await exam.ListParameterVersions(
            pb.ListParameterVersionsRequest(page_size=1, page_token=first_page.next_page_token),
            metadata=teacher.metadata(),
        )
        assert ([v.version for v in second_page.versions], second_page.next_page_token) == ([1], "")

        activated = (
            await exam.ActivateParameterVersion(
                pb.ActivateParameterVersionRequest(version=2), metadata=teacher.metadata()
            )
        ).version
        assert (activated.version, activated.active) == (2, True)
        assert activated.HasField("activate_time")
        # The bank now serves the calibrated parameters.
        item = (await exam.GetItem(pb.GetItemRequest(item_id=imported.item_ids[0]), metadata=teacher.metadata())).item
        assert (item.parameters.version, item.parameters.response_count) == (2, N_PERSONS)
        assert item.parameters.b_standard_error > 0
        history = await exam.ListItemParameters(
            pb.ListItemParametersRequest(item_id=imported.item_ids[0]), metadata=teacher.metadata()
        )
        assert [(p.version, p.model, p.response_count) for p in history.parameters] == [
            (2, res.IRT_MODEL_2PL, N_PERSONS),
            (1, res.IRT_MODEL_2PL, 0),
        ]

        # Another organisation's teacher sees none of it.
        _, stranger = await _teacher_of_new_org(people)
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await exam.GetCalibration(pb.GetCalibrationRequest(calibration_id=started.id), metadata=stranger.metadata())
        assert hidden.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as absent:
            await exam.ActivateParameterVersion(
                pb.ActivateParameterVersionRequest(version=2), metadata=stranger.metadata()
            )
        assert absent.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as foreign_item:
            await exam.ListItemParameters(
                pb.ListItemParametersRequest(item_id=imported.item_ids[0]), metadata=stranger.metadata()
            )
        assert foreign_item.value.code() is grpc.StatusCode.NOT_FOUND
        others = await exam.ListCalibrations(pb.ListCalibrationsRequest(), metadata=stranger.metadata())
        assert list(others.calibrations) == []


async def test_bad_calibration_requests_name_every_wrong_field(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis
) -> None:
    async with exam_service(people, identity_database, redis) as exam:
        org_id, teacher = await _teacher_of_new_org(people)
        bad = res.Calibration(
            model=res.IRT_MODEL_1PL,
            item_ids=[f"item-{n}" for n in range(1001)],
            content_areas=[""],
            min_responses_per_item=-1,
            max_iterations=10_001,
        )
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await exam.StartCalibration(pb.StartCalibrationRequest(calibration=bad), metadata=teacher.metadata())
        assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert _violated_fields(invalid.value) == {
            "calibration.model",
            "calibration.item_ids",
            "calibration.content_areas",
            "calibration.min_responses_per_item",
            "calibration.max_iterations",
        }
        with pytest.raises(grpc.aio.AioRpcError) as unknown_item:
            await exam.StartCalibration(
                pb.StartCalibrationRequest(
                    calibration=res.Calibration(model=res.IRT_MODEL_3PL, item_ids=["no-such-item"])
                ),
                metadata=teacher.metadata(),
            )
        assert _violated_fields(unknown_item.value) == {"calibration.item_ids"}
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await exam.StartCalibration(pb.StartCalibrationRequest(), metadata=teacher.metadata())
        assert _violated_fields(missing.value) == {"calibration"}

        metadata = teacher.metadata()
        refusals: list[tuple[Callable[[], Awaitable[object]], str]] = [
            (lambda: exam.GetCalibration(pb.GetCalibrationRequest(), metadata=metadata), "calibration_id"),
            (
                lambda: exam.ActivateParameterVersion(pb.ActivateParameterVersionRequest(), metadata=metadata),
                "version",
            ),
            (lambda: exam.ListCalibrations(pb.ListCalibrationsRequest(page_size=-1), metadata=metadata), "page_size"),
            (
                lambda: exam.ListCalibrations(
                    pb.ListCalibrationsRequest(state=res.CalibrationState.ValueType(99)), metadata=metadata
                ),
                "state",
            ),
            (
                lambda: exam.ListParameterVersions(
                    pb.ListParameterVersionsRequest(page_token="not-a-token"), metadata=metadata
                ),
                "page_token",
            ),
        ]
        for call, field in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call()
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert _violated_fields(refused.value) == {field}

        with pytest.raises(grpc.aio.AioRpcError) as no_version:
            await exam.ActivateParameterVersion(
                pb.ActivateParameterVersionRequest(version=7), metadata=teacher.metadata()
            )
        assert no_version.value.code() is grpc.StatusCode.NOT_FOUND
        # Students may not calibrate (the contract's item:update).
        student = await people.as_new_user("univ", org_id, "student")
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await exam.StartCalibration(
                pb.StartCalibrationRequest(calibration=res.Calibration(model=res.IRT_MODEL_2PL)),
                metadata=student.metadata(),
            )
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
