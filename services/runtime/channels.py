"""Client channels for service-to-service calls.

`ChannelFactory.channel("exam")` returns a cached grpc.aio channel to that service:
- mTLS with this workload's certificate, checking that the peer holds the target service's certificate
  (locally); plaintext to the Linkerd proxy, which does mTLS (behind Linkerd);
- a retry policy for the target's idempotent methods (idempotency_level in the contracts), on UNAVAILABLE;
- keepalive, so dead connections are noticed between calls;
- every call carries the served call's request id and trace context, and a deadline: the caller's own
  timeout, capped by what is left of the served call's deadline, or the default deadline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from services.runtime import callcontext
from services.runtime.catalog import Catalog
from services.runtime.config import Transport, target_of
from services.runtime.contracts import service_methods
from services.runtime.interceptors import REQUEST_ID_HEADER, ZONE_HEADER
from services.runtime.pki import Credentials, service_dns_name
from services.runtime.telemetry import spans_exported

KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def retry_service_config(pool: descriptor_pool.DescriptorPool, services: Sequence[str]) -> str:
    """gRPC service config retrying exactly the idempotent methods of `services`."""
    names = [
        {"service": method.service, "method": method.name}
        for service in services
        for method in service_methods(pool, service) or ()
        if method.idempotent
    ]
    configs = [{"name": names, "retryPolicy": RETRY_POLICY}] if names else []
    return json.dumps({"methodConfig": configs}, sort_keys=True)


# grpc's classes are generic only in their type stubs, so the base classes cannot carry type arguments.
def mtls_channel(
    address: str,
    credentials: Credentials,
    catalog: Catalog,
    service: str,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[Any] = (),
) -> grpc.aio.Channel:
    """A channel to `address` presenting `credentials`, that accepts only `service`'s certificate."""
    return grpc.aio.secure_channel(
        address,
        grpc.ssl_channel_credentials(
            credentials.root_certificates, credentials.private_key, credentials.certificate_chain
        ),
        options=[*options, ("grpc.ssl_target_name_override", service_dns_name(catalog, service))],
        interceptors=interceptors,
    )


class _ContextPropagation(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds the served call's request id, request zone and (unless OpenTelemetry's interceptors do it, when spans
    are exported) its trace context; bounds the outgoing deadline by the served call's."""

    def __init__(self, default_deadline: float, propagate_trace: bool) -> None:
        self._default_deadline = default_deadline
        self._propagate_trace = propagate_trace

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        limits = [details.timeout] if details.timeout is not None else [self._default_deadline]
        call = callcontext.current.get()
        if call is not None:
            if REQUEST_ID_HEADER not in metadata:
                metadata.add(REQUEST_ID_HEADER, call.request_id)
            if call.zone and ZONE_HEADER not in metadata:
                metadata.add(ZONE_HEADER, call.zone)
            if self._propagate_trace and "traceparent" not in metadata:
                metadata.add("traceparent", call.traceparent())
                if call.trace_state:
                    metadata.add("tracestate", call.trace_state)
            if call.deadline is not None:
                limits.append(call.deadline - time.monotonic())
        # A spent deadline still goes out (as ~0) so the call fails with DEADLINE_EXCEEDED, not silently.
        timeout = max(min(limits), 0.001)
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class ChannelFactory:
    def __init__(
        self,
        catalog: Catalog,
        transport: Transport,
        credentials: Credentials | None,
        pool: descriptor_pool.DescriptorPool,
        default_deadline: float = 10.0,
    ) -> None:
        if transport is Transport.MTLS and credentials is None:
            raise ValueError("mTLS channels need this workload's credentials")
        self._catalog = catalog
        self._transport = transport
        self._credentials = credentials
        self._pool = pool
        self._default_deadline = default_deadline
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, service: str, target: str | None = None) -> grpc.aio.Channel:
        """A channel to a catalog service (at its configured address unless `target` is given)."""
        key = f"{service}@{target or ''}"
        existing = self._channels.get(key)
        if existing is not None:
            return existing
        entry = self._catalog.service(service)
        address = target or target_of(entry)
        options: list[tuple[str, Any]] = [
            *KEEPALIVE_OPTIONS,
            ("grpc.enable_retries", 1),
            ("grpc.service_config", retry_service_config(self._pool, entry.grpc_services)),
        ]
        exported = spans_exported()
        tracing: list[Any] = aio_client_interceptors() if exported else []  # type: ignore[no-untyped-call]
        interceptors = [_ContextPropagation(self._default_deadline, propagate_trace=not exported), *tracing]
        if self._transport is Transport.LINKERD:
            created = grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        else:
            assert self._credentials is not None
            created = mtls_channel(address, self._credentials, self._catalog, service, options, interceptors)
        self._channels[key] = created
        return created

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)
