"""Logs, traces, metrics and probes every service shares.

- Logs: structlog, one JSON object per line on stdout; third-party stdlib logging is rendered the same way.
- Traces: OpenTelemetry SDK; spans are exported over OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT is set
  (the sampler follows the standard OTEL_TRACES_SAMPLER variables). Trace ids appear in the logs either way.
- Metrics: Prometheus, per-method call counts by status code and a latency histogram, on the metrics port,
  which also answers Kubernetes probes: /livez (the process runs) and /readyz (gRPC health is SERVING).
  Plain HTTP probes, because Linkerd authorizes kubelet probes only for HTTP (see mesh/linkerd/README.md).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

import grpc
import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    120.0,
)

_SHARED_PROCESSORS: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str, service: str) -> None:
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            *_SHARED_PROCESSORS,
            # Tracebacks as data, without frame locals: locals would copy passwords and tokens into logs.
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED_PROCESSORS,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))


def configure_tracing(service: str) -> TracerProvider:
    """The process's tracer provider. Without an OTLP endpoint nobody collects spans, so none is recorded
    (ALWAYS_OFF): trace and span ids are still created, logged and propagated, for the cost of a few ids."""
    resource = Resource.create({"service.name": f"megacity-{service}"})
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER, default always on
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    trace.set_tracer_provider(provider)
    return provider


def current_trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


@dataclass
class RpcMetrics:
    """Server-side RPC metrics, named as go-grpc-prometheus names them so dashboards carry over."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by method and status code.",
            ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
            registry=self.registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to completing it on the server.",
            ["grpc_service", "grpc_method", "grpc_type"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._children: dict[tuple[str, grpc.StatusCode], tuple[Counter, Histogram]] = {}

    def observe(self, path: str, rpc_type: str, code: grpc.StatusCode, seconds: float) -> None:
        children = self._children.get((path, code))
        if children is None:
            service, _, method = path.lstrip("/").partition("/")
            children = (
                self.handled.labels(service, method, rpc_type, code.name),
                self.handling_seconds.labels(service, method, rpc_type),
            )
            self._children[(path, code)] = children
        children[0].inc()
        children[1].observe(seconds)


def start_metrics_server(host: str, port: int, registry: CollectorRegistry, ready: Callable[[], bool]) -> WSGIServer:
    """Serves /metrics, /livez and /readyz on a daemon thread; `shutdown()` and `server_close()` stop it."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/livez", "/readyz"):
            healthy = path == "/livez" or ready()
            start_response("200 OK" if healthy else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if healthy else b"not ready\n"]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
