"""What the runtime does around every call: identity, authorization, tracing, call context, errors, logs, metrics.

Every method handler is wrapped once, when its servicer is registered (`Registrar` stands in for the server
for the generated `add_*_to_server` functions), and the per-method work (route, allowed callers, span
attributes) is done then too, so a call goes straight to its wrapped handler without grpc's per-call
interceptor pipeline. One wrapper does everything: a chain of separate interceptors (OpenTelemetry's own
server interceptor alone) cost several times the per-call budget (tests/bench/bench_runtime.py). Per call it:

1. identifies the caller (mTLS SPIFFE ID or Linkerd client id) and checks the catalog policy, refusing
   with PERMISSION_DENIED (UNAUTHENTICATED without an identity) and logging the decision;
2. continues the caller's trace (W3C traceparent): OpenTelemetry's SERVER span when spans are exported,
   else the trace context alone (services/runtime/telemetry.py, ServerTrace);
3. sets the call context other code reads: request id (x-request-id, else the trace id), caller, and the
   absolute deadline that outgoing calls inherit (services/runtime/channels.py);
4. maps errors: a ServiceError becomes its status with google.rpc details; NotImplementedError (the
   generated servicer base, for features not built yet) becomes UNIMPLEMENTED; any other exception becomes
   INTERNAL with an error id that is logged with its traceback and is all the caller learns;
5. writes one JSON access-log line and the Prometheus count and latency.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import asyncpg
import grpc
import structlog
from opentelemetry import trace

from services.runtime import callcontext
from services.runtime.audit import Auditor
from services.runtime.authn import Authenticator, authorize
from services.runtime.contracts import MethodAccess
from services.runtime.errors import (
    STATUS_DETAILS_KEY,
    ErrorReason,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    reason_name,
)
from services.runtime.identity import Identify
from services.runtime.policy import MethodPolicy
from services.runtime.telemetry import RpcMetrics, ServerTrace, access_log

REQUEST_ID_HEADER = "x-request-id"
# The zone the edge resolved from the request's host; the edge strips any copy a client sends.
ZONE_HEADER = "x-megacity-zone"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_UNSTORABLE_TEXT = (
    asyncpg.exceptions.CharacterNotInRepertoireError,
    asyncpg.exceptions.UntranslatableCharacterError,
)
_CODE_NAMES = {code: code.name for code in grpc.StatusCode}  # enum .name (and hashing) is slow on the hot path
_log = structlog.get_logger("megacity.rpc")

Context = grpc.aio.ServicerContext[Any, Any]


def _status_trailer(error: ServiceError) -> tuple[tuple[str, bytes], ...]:
    return ((STATUS_DETAILS_KEY, error.to_status().SerializeToString()),)


class _Route:
    """What the interceptor knows about one method, computed once."""

    def __init__(self, path: str, rpc_type: str, callers: frozenset[str], access: MethodAccess | None) -> None:
        self.path = path
        self.rpc_type = rpc_type
        self.callers = callers
        # Set when a person must present an access token (the contract's access option, unless anonymous).
        self.person_access = access if access is not None and not access.anonymous else None


class _Call(callcontext.CallInfo):
    """One call in flight: what code inside the call may read, and what the interceptor needs to finish it."""

    __slots__ = ("code", "route", "span", "started")

    def __init__(self, route: _Route, started: float) -> None:
        self.route = route
        self.started = started
        self.span: trace.Span | None = None  # OpenTelemetry's, when spans are recorded
        self.principal = None
        self.zone = ""
        self.context = None
        self.code = grpc.StatusCode.OK  # until an escaping exception says otherwise


class RuntimeInterceptor:
    """Wraps a service's method handlers with the per-call work described above."""

    def __init__(
        self,
        policy: MethodPolicy,
        identify: Identify,
        metrics: RpcMetrics,
        access: Mapping[str, MethodAccess] | None = None,
        authenticator: Authenticator | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        self._policy = policy
        self._identify = identify
        self._metrics = metrics
        self._access = access or {}
        self._authenticator = authenticator
        self._auditor = auditor
        self._trace = ServerTrace()

    def wrap(self, path: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler of `path` with the runtime's per-call work around it."""
        h: Any = handler
        callers = self._policy.callers_for(path)
        access = self._access.get(path)
        if h.unary_unary is not None:
            route = _Route(path, "unary", callers, access)
            return h._replace(unary_unary=self._unary(route, h.unary_unary))  # type: ignore[no-any-return]
        if h.stream_unary is not None:
            route = _Route(path, "client_stream", callers, access)
            return h._replace(stream_unary=self._unary(route, h.stream_unary))  # type: ignore[no-any-return]
        if h.unary_stream is not None:
            route = _Route(path, "server_stream", callers, access)
            return h._replace(unary_stream=self._streaming(route, h.unary_stream))  # type: ignore[no-any-return]
        route = _Route(path, "bidi_stream", callers, access)
        return h._replace(stream_stream=self._streaming(route, h.stream_stream))  # type: ignore[no-any-return]

    def _unary(
        self, route: _Route, behavior: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def unary(request: Any, context: Context) -> Any:
            call = self._begin(route, context)
            try:
                self._authorize(call)
                if route.person_access is not None:
                    await self._authenticate(call, route.person_access, context)
                return await behavior(request, context)
            except BaseException as error:
                await self._fail(call, context, error)
                raise
            finally:
                self._finish(call, context)

        return unary

    def _streaming(
        self, route: _Route, behavior: Callable[[Any, Context], AsyncIterator[Any]]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            call = self._begin(route, context)
            try:
                self._authorize(call)
                if route.person_access is not None:
                    await self._authenticate(call, route.person_access, context)
                async for response in behavior(request, context):
                    yield response
            except BaseException as error:
                await self._fail(call, context, error)
                raise
            finally:
                self._finish(call, context)

        return streaming

    def _begin(self, route: _Route, context: Context) -> _Call:
        call = _Call(route, time.perf_counter())
        call.context = context
        request_id = traceparent = tracestate = None
        for key, value in context.invocation_metadata() or ():
            if not isinstance(value, str):  # binary (-bin) headers are none of these
                continue
            if key == REQUEST_ID_HEADER:
                request_id = value
            elif key == "traceparent":
                traceparent = value
            elif key == "tracestate":
                tracestate = value
            elif key == ZONE_HEADER:
                call.zone = value
        call.caller = self._identify(context)
        trace_id, call.span_id, call.trace_flags, call.trace_state = self._trace.start(traceparent, tracestate)
        call.trace_id = trace_id
        if self._trace.recording:
            call.span = trace.get_current_span()
        valid_id = request_id is not None and _VALID_REQUEST_ID.fullmatch(request_id)
        call.request_id = request_id if valid_id and request_id else trace_id
        remaining = context.time_remaining()
        call.deadline = None if remaining is None else time.monotonic() + remaining
        callcontext.current.set(call)
        return call

    def _authorize(self, call: _Call) -> None:
        if call.caller is None:
            self._log_denial(call, "no verifiable workload identity")
            raise Unauthenticated(
                "the call carries no workload identity this mesh knows",
                reason=ErrorReason.ERROR_REASON_CALLER_UNAUTHENTICATED,
            )
        if call.caller not in call.route.callers:
            self._log_denial(call, "the catalog does not allow this caller")
            raise PermissionDenied(
                f"{call.caller} may not call {call.route.path}",
                reason=ErrorReason.ERROR_REASON_CALLER_NOT_ALLOWED,
                metadata={"caller": call.caller, "method": call.route.path},
            )

    async def _authenticate(self, call: _Call, access: MethodAccess, context: Context) -> None:
        if self._authenticator is None:
            raise Unavailable("this service cannot verify access tokens", retry_after_seconds=5.0)
        call.principal = await self._authenticator.authenticate(context.invocation_metadata() or ())
        try:
            authorize(call.principal, access, call.zone)
        except PermissionDenied as denied:
            self._log_denial(call, denied.message)
            if self._auditor is not None:
                await self._auditor.record(
                    "permission_denied",
                    "denied",
                    resource_type="rpc",
                    resource_id=call.route.path,
                    details={"reason": reason_name(denied.reason), **denied.metadata},
                )
            raise

    async def _fail(self, call: _Call, context: Context, error: BaseException) -> None:
        """Ends the call with the status an escaping exception maps to: aborts with it (which raises) when
        there is one to send, else returns and the caller re-raises the exception as it is."""
        call.code, reply = self._outcome(call, context, error)
        if reply is not None:
            await context.abort(reply.code, reply.message, trailing_metadata=_status_trailer(reply))

    def _outcome(
        self, call: _Call, context: Context, error: BaseException
    ) -> tuple[grpc.StatusCode, ServiceError | None]:
        """The status an escaping exception ends the call with, and the error to send (None: re-raise as is)."""
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            return grpc.StatusCode.CANCELLED, None
        if isinstance(error, grpc.aio.AbortError) or not isinstance(error, Exception):
            # The handler aborted the call itself (or the process is exiting): its code is already set.
            return context.code() or grpc.StatusCode.UNKNOWN, None
        if isinstance(error, ServiceError):
            return error.code, error
        if isinstance(error, NotImplementedError):
            return grpc.StatusCode.UNIMPLEMENTED, Unimplemented(f"{call.route.path} is not implemented yet")
        if isinstance(error, _UNSTORABLE_TEXT):
            # Only a request brings text PostgreSQL cannot hold (a NUL character): the caller's mistake.
            refused = InvalidArgument(
                "the request contains text that cannot be stored (a NUL character?)",
                [("", "text fields must not contain NUL characters")],
            )
            return refused.code, refused
        error_id = uuid.uuid4().hex
        _log.error(
            "rpc.unexpected_error",
            method=call.route.path,
            caller=call.caller,
            error_id=error_id,
            request_id=call.request_id,
            trace_id=call.trace_id,
            exc_info=error,
        )
        if call.span is not None:
            call.span.record_exception(error)
        return grpc.StatusCode.INTERNAL, Internal(f"internal error (error id {error_id})", error_id=error_id)

    def _finish(self, call: _Call, context: Context) -> None:
        code = call.code
        if code is grpc.StatusCode.OK:
            code = context.code()  # None unless the handler set a status itself
        name = "OK" if code is None or code is grpc.StatusCode.OK else _CODE_NAMES[code]
        elapsed = time.perf_counter() - call.started
        route = call.route
        self._metrics.observe(route.path, route.rpc_type, name, elapsed)
        access_log.record(route.path, call.caller, name, elapsed * 1000, call.request_id, call.trace_id)
        if call.caller and call.span is not None:
            call.span.set_attribute("megacity.caller", call.caller)

    def _log_denial(self, call: _Call, why: str) -> None:
        _log.warning(
            "authz.denied",
            method=call.route.path,
            caller=call.caller,
            reason=why,
            request_id=call.request_id,
            trace_id=call.trace_id,
        )


class Registrar:
    """Stands in for the server when servicers register, so that every method handler is wrapped once.

    The generated `add_<Service>Servicer_to_server(servicer, server)` functions hand the same method handlers
    to `add_generic_rpc_handlers` and `add_registered_method_handlers`; this registers the wrapped ones both
    ways on the real server. A generic handler that arrives without its registered form cannot be wrapped, so
    `check_complete` refuses it rather than let a method bypass authorization.
    """

    def __init__(self, server: grpc.aio.Server, interceptor: RuntimeInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor
        self._generic: set[str] = set()
        self._registered: set[str] = set()

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]) -> None:
        self._generic.update(handler.service_name() for handler in handlers)  # type: ignore[attr-defined]

    def add_registered_method_handlers(
        self, service: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrapped = {name: self._interceptor.wrap(f"/{service}/{name}", h) for name, h in method_handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]
        self._registered.add(service)

    def check_complete(self) -> None:
        unwrapped = self._generic - self._registered
        if unwrapped:
            raise RuntimeError(f"handlers registered without add_registered_method_handlers: {sorted(unwrapped)}")
