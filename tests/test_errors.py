"""Domain errors become google.rpc.Status values with the right code, reason and details."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from services.runtime import errors
from services.runtime.errors import ErrorReason, error_info, field_violations


@pytest.mark.parametrize(
    ("error_class", "code", "reason"),
    [
        (errors.NotFound, grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"),
        (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING"),
        (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID"),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, "UNSPECIFIED"),
        (errors.Aborted, grpc.StatusCode.ABORTED, "CONCURRENT_MODIFICATION"),
        (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED"),
        (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    ],
)
def test_each_error_maps_to_its_code_and_default_reason(
    error_class: type[errors.ServiceError], code: grpc.StatusCode, reason: str
) -> None:
    status = error_class("something is off", metadata={"resource": "exam/42"}).to_status()
    assert status.code == code.value[0]
    assert status.message == "something is off"
    info = error_info(status)
    assert info is not None
    assert (info.reason, info.domain, dict(info.metadata)) == (reason, "megacity.local", {"resource": "exam/42"})


def test_an_explicit_reason_overrides_the_default() -> None:
    error = errors.PermissionDenied("wrong zone", reason=ErrorReason.ERROR_REASON_ZONE_MISMATCH)
    info = error_info(error.to_status())
    assert info is not None
    assert info.reason == "ZONE_MISMATCH"


def test_violations_collect_every_problem_before_failing() -> None:
    violations = errors.Violations()
    violations.check(True, "email", "never added")
    violations.check(False, "password", "must contain a digit")
    violations.add("name", "must not be empty")
    with pytest.raises(errors.InvalidArgument) as invalid:
        violations.raise_if_any()
    assert field_violations(invalid.value.to_status()) == [
        ("password", "must contain a digit"),
        ("name", "must not be empty"),
    ]
    errors.Violations().raise_if_any()  # nothing collected, nothing raised


def test_resource_exhausted_says_when_to_retry_and_which_quota() -> None:
    status = errors.ResourceExhausted(
        "slow down", retry_after_seconds=1.5, quota_violations=[("client:10.0.0.7", "login: 5 per minute")]
    ).to_status()
    info = error_info(status)
    assert info is not None
    assert (info.reason, info.metadata["retry_after_seconds"]) == ("RATE_LIMITED", "1.5")
    retry, quota = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
    assert any(detail.Unpack(retry) for detail in status.details)
    assert retry.retry_delay.ToMilliseconds() == 1500
    assert any(detail.Unpack(quota) for detail in status.details)
    assert quota.violations[0].subject == "client:10.0.0.7"


def test_unavailable_carries_retry_advice() -> None:
    status = errors.Unavailable("model loading", retry_after_seconds=2).to_status()
    assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    info = error_info(status)
    assert info is not None
    assert (info.reason, info.metadata["retry_after_seconds"]) == ("DEPENDENCY_UNAVAILABLE", "2")
