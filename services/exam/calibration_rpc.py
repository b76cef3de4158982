"""The calibration and parameter-version RPCs of the exam service, as functions its servicer delegates to.

The runtime has checked the permission each RPC declares (item:update to start a run or activate a version, item:read
to look) before these run. Everything happens in the caller's organisation: its bank is what a run calibrates, and
row-level security makes another organisation's run or version NOT_FOUND.
"""

from __future__ import annotations

from datetime import UTC, datetime

from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import resources_pb2 as res
from services.exam.calibration import Model
from services.exam.calibration_store import STATES, CalibrationSettings, CalibrationStore
from services.exam.store import Owner
from services.runtime import paging
from services.runtime.database import TenantScope
from services.runtime.errors import ErrorReason, InvalidArgument, Violations
from services.runtime.tokens import AccessClaims

CALIBRATED_MODELS: dict[int, Model] = {res.IRT_MODEL_2PL: "2PL", res.IRT_MODEL_3PL: "3PL"}
DEFAULT_MIN_RESPONSES_PER_ITEM = 200
MAX_MIN_RESPONSES_PER_ITEM = 1_000_000
DEFAULT_MAX_ITERATIONS = 500
MAX_ITERATIONS = 10_000
MAX_ITEM_IDS = 1000
MAX_CONTENT_AREAS = 100
MAX_CONTENT_AREA_LENGTH = 100  # as items store them (db/exam/0002)
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


def _invalid_page_token() -> InvalidArgument:
    """For a token with the right fingerprint but a position this module never wrote: tokens are not secret, so
    anyone may craft one, and that is the caller's error like any other bad token, not an INTERNAL one."""
    return InvalidArgument(
        "page_token is not one this query issued",
        [("page_token", "use the next_page_token of the previous page, with the same filters")],
        reason=ErrorReason.ERROR_REASON_INVALID_PAGE_TOKEN,
    )


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise _invalid_page_token() from None


def _own_org(person: AccessClaims) -> TenantScope:
    return TenantScope.org(person.zone_id, person.org_id)


def _required(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(f"{field} is required", [(field, "required")])


def _settings(given: res.Calibration) -> CalibrationSettings:
    """The run's settings, defaults filled in; INVALID_ARGUMENT naming every field that is wrong."""
    violations = Violations()
    violations.check(given.model in CALIBRATED_MODELS, "calibration.model", "IRT_MODEL_2PL or IRT_MODEL_3PL")
    violations.check(len(given.item_ids) <= MAX_ITEM_IDS, "calibration.item_ids", f"at most {MAX_ITEM_IDS} items")
    violations.check(all(given.item_ids), "calibration.item_ids", "no empty item id")
    violations.check(
        len(given.content_areas) <= MAX_CONTENT_AREAS,
        "calibration.content_areas",
        f"at most {MAX_CONTENT_AREAS} content areas",
    )
    violations.check(
        all(1 <= len(area.strip()) <= MAX_CONTENT_AREA_LENGTH for area in given.content_areas),
        "calibration.content_areas",
        f"each 1 to {MAX_CONTENT_AREA_LENGTH} characters",
    )
    # 0 is the field's unset value: the default, not a request for none.
    violations.check(
        0 <= given.min_responses_per_item <= MAX_MIN_RESPONSES_PER_ITEM,
        "calibration.min_responses_per_item",
        f"1 to {MAX_MIN_RESPONSES_PER_ITEM} (0 for the default, {DEFAULT_MIN_RESPONSES_PER_ITEM})",
    )
    violations.check(
        0 <= given.max_iterations <= MAX_ITERATIONS,
        "calibration.max_iterations",
        f"1 to {MAX_ITERATIONS} (0 for the default, {DEFAULT_MAX_ITERATIONS})",
    )
    violations.raise_if_any()
    return CalibrationSettings(
        model=CALIBRATED_MODELS[given.model],
        # Repeats would only count an item twice in the request; order is kept for whoever reads the run back.
        item_ids=tuple(dict.fromkeys(given.item_ids)),
        content_areas=tuple(dict.fromkeys(area.strip() for area in given.content_areas)),
        min_responses_per_item=given.min_responses_per_item or DEFAULT_MIN_RESPONSES_PER_ITEM,
        max_iterations=given.max_iterations or DEFAULT_MAX_ITERATIONS,
        activate_on_success=given.activate_on_success,
    )


async def start_calibration(
    store: CalibrationStore, person: AccessClaims, request: pb.StartCalibrationRequest
) -> pb.StartCalibrationResponse:
    if not request.HasField("calibration"):
        raise InvalidArgument("calibration is required", [("calibration", "required")])
    settings = _settings(request.calibration)
    owner = Owner(zone_id=person.zone_id, org_id=person.org_id, creator_id=person.user_id)
    return pb.StartCalibrationResponse(calibration=await store.create(owner, settings))


async def get_calibration(
    store: CalibrationStore, person: AccessClaims, request: pb.GetCalibrationRequest
) -> pb.GetCalibrationResponse:
    _required(request.calibration_id, "calibration_id")
    return pb.GetCalibrationResponse(calibration=await store.calibration(_own_org(person), request.calibration_id))


async def list_calibrations(
    store: CalibrationStore, person: AccessClaims, request: pb.ListCalibrationsRequest
) -> pb.ListCalibrationsResponse:
    state = None
    if request.state != res.CALIBRATION_STATE_UNSPECIFIED:
        state = STATES.get(request.state)
        if state is None:
            raise InvalidArgument("state is unknown", [("state", "a CalibrationState, or unset for every state")])
    limit = paging.page_size(request.page_size, MAX_PAGE_SIZE, DEFAULT_PAGE_SIZE)
    query = ["calibrations", state]
    position = paging.decode(request.page_token, query)
    before = None
    if position is not None:
        match position:
            case [str(create_time), str(calibration_id)]:
                before = (_timestamp(create_time), calibration_id)
            case _:
                raise _invalid_page_token()
    runs = await store.calibrations(_own_org(person), state=state, before=before, limit=limit + 1)
    next_token = ""
    if len(runs) > limit:
        last = runs[limit - 1]
        next_token = paging.encode([last.create_time.ToDatetime(UTC).isoformat(), last.id], query)
    return pb.ListCalibrationsResponse(calibrations=runs[:limit], next_page_token=next_token)


async def list_parameter_versions(
    store: CalibrationStore, person: AccessClaims, request: pb.ListParameterVersionsRequest
) -> pb.ListParameterVersionsResponse:
    limit = paging.page_size(request.page_size, MAX_PAGE_SIZE, DEFAULT_PAGE_SIZE)
    query = ["parameter_versions"]
    position = paging.decode(request.page_token, query)
    before = None
    if position is not None:
        match position:
            case [int(version)]:
                before = version
            case _:
                raise _invalid_page_token()
    versions = await store.versions(_own_org(person), before=before, limit=limit + 1)
    next_token = paging.encode([versions[limit - 1].version], query) if len(versions) > limit else ""
    return pb.ListParameterVersionsResponse(versions=versions[:limit], next_page_token=next_token)


async def activate_parameter_version(
    store: CalibrationStore, person: AccessClaims, request: pb.ActivateParameterVersionRequest
) -> pb.ActivateParameterVersionResponse:
    if request.version < 1:
        raise InvalidArgument("version is required", [("version", "a version number, 1 or more")])
    return pb.ActivateParameterVersionResponse(version=await store.activate(_own_org(person), request.version))
