"""What the runtime knows about the call being served, for any code running inside it.

Set by the server interceptor at the start of each call (each call runs in its own asyncio task, so it
never leaks between calls); read by client channels (to propagate the request id and the deadline), by the
log processor (so every log line inside a call carries its request id, caller and trace id), and by
servicers that need the caller's identity.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import grpc

from services.runtime.errors import ErrorReason, Unauthenticated
from services.runtime.tokens import AccessClaims


class CallInfo:
    """The served call's identity, limits and W3C trace context (ids and flags as lower-case hex)."""

    __slots__ = (
        "caller",
        "context",
        "deadline",
        "principal",
        "request_id",
        "span_id",
        "trace_flags",
        "trace_id",
        "trace_state",
        "zone",
    )

    def __init__(
        self,
        request_id: str,
        caller: str | None,
        deadline: float | None,
        trace_id: str,
        span_id: str,
        trace_flags: str,
        trace_state: str | None,
    ) -> None:
        self.request_id = request_id
        self.caller = caller
        self.deadline = deadline
        self.trace_id = trace_id
        self.span_id = span_id
        self.trace_flags = trace_flags
        self.trace_state = trace_state
        self.principal: AccessClaims | None = None  # the signed-in person, once their access token is verified
        self.zone = ""  # the zone the edge resolved from the request's host (x-megacity-zone), '' without one
        # The served call's gRPC context, for what is read rarely (client address, user agent): not parsed per call.
        self.context: grpc.aio.ServicerContext[Any, Any] | None = None

    def traceparent(self) -> str:
        """The W3C traceparent header of calls made on behalf of this one (this call's span as their parent)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.trace_flags}"


current: ContextVar[CallInfo | None] = ContextVar("megacity_call", default=None)


def current_request_id() -> str:
    call = current.get()
    return call.request_id if call else ""


def current_caller() -> str:
    """The catalog name of the workload that made the call being served ('' outside a call or unidentified)."""
    call = current.get()
    return (call.caller or "") if call else ""


def current_trace_id() -> str:
    """The served call's W3C trace id as 32 hex digits ('' outside a call)."""
    call = current.get()
    return call.trace_id if call else ""


def current_deadline() -> float | None:
    """The served call's deadline on the time.monotonic() clock, or None when it has none."""
    call = current.get()
    return call.deadline if call else None


def current_principal() -> AccessClaims | None:
    """The person the served call acts for (verified access token), or None for anonymous and mesh-only calls."""
    call = current.get()
    return call.principal if call else None


def current_zone() -> str:
    """The zone of the request's host, as the edge resolved it ('' when the call carries none)."""
    call = current.get()
    return call.zone if call else ""


def require_principal() -> AccessClaims:
    """The signed-in person of the call. The runtime authenticates every RPC whose contract wants a person before
    its handler runs, so this raises only for a handler that is not declared so."""
    principal = current_principal()
    if principal is None:
        raise Unauthenticated("sign in first", reason=ErrorReason.ERROR_REASON_TOKEN_MISSING)
    return principal
