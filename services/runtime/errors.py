"""Domain errors and their wire form: a google.rpc.Status with ErrorInfo, BadRequest and friends.

Servicers and domain code raise a `ServiceError` subclass; the runtime's interceptor turns it into the
status code and `grpc-status-details-bin` trailer, so field violations reach the client intact. Anything
else that escapes a handler becomes INTERNAL with an error id, and nothing of it reaches the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import error_details_pb2, status_pb2

from megacity.common.v1 import errors_pb2

ERROR_DOMAIN = "megacity.local"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
ErrorReason = errors_pb2.ErrorReason


def reason_name(reason: errors_pb2.ErrorReason.ValueType) -> str:
    """The wire name of a reason: the enum value's name without the `ERROR_REASON_` prefix."""
    return ErrorReason.Name(reason).removeprefix("ERROR_REASON_")


class ServiceError(Exception):
    """An error meant for the caller: its message and details are safe to send."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason: errors_pb2.ErrorReason.ValueType = ErrorReason.ERROR_REASON_UNSPECIFIED

    def __init__(
        self,
        message: str,
        *,
        reason: errors_pb2.ErrorReason.ValueType | None = None,
        metadata: Mapping[str, str] | None = None,
        details: Sequence[message.Message] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = self.default_reason if reason is None else reason
        self.metadata = dict(metadata or {})
        self.details = tuple(details)

    def to_status(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(reason=reason_name(self.reason), domain=ERROR_DOMAIN, metadata=self.metadata)
        return build_status(self.code, self.message, (info, *self.details))


def build_status(code: grpc.StatusCode, message_text: str, details: Iterable[message.Message]) -> status_pb2.Status:
    packed = []
    for detail in details:
        container = any_pb2.Any()
        container.Pack(detail)
        packed.append(container)
    numeric: int = code.value[0]
    return status_pb2.Status(code=numeric, message=message_text, details=packed)


class InvalidArgument(ServiceError):
    """Bad input. Carries one BadRequest field violation per problem, named by field path."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = ErrorReason.ERROR_REASON_INVALID_REQUEST

    def __init__(
        self,
        message: str,
        violations: Sequence[tuple[str, str]],
        *,
        reason: errors_pb2.ErrorReason.ValueType | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in violations
            ]
        )
        super().__init__(message, reason=reason, metadata=metadata, details=(request,))
        self.violations = tuple(violations)


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = ErrorReason.ERROR_REASON_NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = ErrorReason.ERROR_REASON_ALREADY_EXISTS


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = ErrorReason.ERROR_REASON_PERMISSION_MISSING


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = ErrorReason.ERROR_REASON_TOKEN_INVALID


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED
    default_reason = ErrorReason.ERROR_REASON_CONCURRENT_MODIFICATION


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = ErrorReason.ERROR_REASON_NOT_IMPLEMENTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = ErrorReason.ERROR_REASON_DEADLINE_EXCEEDED


class Internal(ServiceError):
    """An unexpected fault: the caller learns only the error id under which the server logged it."""

    code = grpc.StatusCode.INTERNAL
    default_reason = ErrorReason.ERROR_REASON_INTERNAL

    def __init__(self, message: str, *, error_id: str) -> None:
        super().__init__(message, metadata={"error_id": error_id})
        self.error_id = error_id


class _RetryableError(ServiceError):
    """An error the caller should retry after `retry_after_seconds` (sent as RetryInfo)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float,
        reason: errors_pb2.ErrorReason.ValueType | None = None,
        metadata: Mapping[str, str] | None = None,
        details: Sequence[message.Message] = (),
    ) -> None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after_seconds * 1e9))
        retry = error_details_pb2.RetryInfo(retry_delay=delay)
        super().__init__(
            message,
            reason=reason,
            metadata={"retry_after_seconds": f"{retry_after_seconds:g}", **(metadata or {})},
            details=(retry, *details),
        )


class ResourceExhausted(_RetryableError):
    """A rate, credit or capacity limit; `quota_violations` are (subject, description) pairs."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = ErrorReason.ERROR_REASON_RATE_LIMITED

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float,
        quota_violations: Sequence[tuple[str, str]] = (),
        reason: errors_pb2.ErrorReason.ValueType | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
                for subject, description in quota_violations
            ]
        )
        super().__init__(
            message,
            retry_after_seconds=retry_after_seconds,
            reason=reason,
            metadata=metadata,
            details=(quota,) if quota_violations else (),
        )


class Unavailable(_RetryableError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = ErrorReason.ERROR_REASON_DEPENDENCY_UNAVAILABLE


class Violations:
    """Collects every problem of a request so the caller hears about all of them at once."""

    def __init__(self) -> None:
        self._items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self._items.append((field, description))

    def check(self, condition: bool, field: str, description: str) -> None:
        if not condition:
            self.add(field, description)

    def __bool__(self) -> bool:
        return bool(self._items)

    def items(self) -> list[tuple[str, str]]:
        """The (field, description) pairs recorded so far."""
        return list(self._items)

    def raise_if_any(self, message: str = "the request is invalid") -> None:
        if self._items:
            raise InvalidArgument(message, self._items)


def status_from_error(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The rich status a server sent (google.rpc.Status), or a bare one built from the code and message."""
    # grpc-stubs types AioRpcError's trailers like the sync API's; they are (key, value) pairs.
    trailers: Any = error.trailing_metadata()
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    numeric: int = error.code().value[0]
    return status_pb2.Status(code=numeric, message=error.details() or "")


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    for container in status.details:
        info = error_details_pb2.ErrorInfo()
        if container.Unpack(info):
            return info
    return None


def field_violations(status: status_pb2.Status) -> list[tuple[str, str]]:
    for container in status.details:
        request = error_details_pb2.BadRequest()
        if container.Unpack(request):
            return [(v.field, v.description) for v in request.field_violations]
    return []
