"""Logs, traces, metrics and probes every service shares.

- Logs: structlog, one JSON object per line on stdout; third-party stdlib logging is rendered the same way.
  Info lines are written in batches (a LogWriter flushed every 100 ms by the service's event loop, and at
  exit); warnings and errors go out at once.
- Traces: OpenTelemetry SDK; spans are exported over OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT is set
  (the sampler follows the standard OTEL_TRACES_SAMPLER variables). Trace ids appear in the logs either way.
- Metrics: Prometheus, per-method call counts by status code and a latency histogram, on the metrics port,
  which also answers Kubernetes probes: /livez (the process runs) and /readyz (gRPC health is SERVING).
  Plain HTTP probes, because Linkerd authorizes kubelet probes only for HTTP (see mesh/linkerd/README.md).
"""

from __future__ import annotations

import asyncio
import atexit
import bisect
import logging
import math
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

import orjson
import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client import CollectorRegistry, Metric, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler
from prometheus_client.registry import Collector

from services.runtime import callcontext

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


def add_call_context(_: object, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    """Inside a served call, every log line carries its request id, caller and trace id."""
    call = callcontext.current.get()
    if call is not None:
        event.setdefault("request_id", call.request_id)
        event.setdefault("caller", call.caller)
        event.setdefault("trace_id", call.trace_id)
    return event


_TIMESTAMPER = structlog.processors.TimeStamper(fmt="iso", utc=True)
_SHARED_PROCESSORS: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    add_call_context,
    structlog.processors.add_log_level,
    _TIMESTAMPER,
]


class AccessLog:
    """One `rpc` line per served call: method, caller, code, latency, request id, trace id.

    It is the one line written on every call, so once logging is configured it is rendered directly (one
    f-string into the buffered writer) in exactly the shape structlog gives every other line (`event`,
    `level`, `timestamp`, `service`); through structlog's pipeline, or even building a dict for orjson, it was
    a large share of the runtime's per-call work (tests/bench/bench_runtime.py). Method and caller names come
    from small fixed sets (registered methods, catalog names), so their JSON form is computed once; request
    and trace ids are tokens the interceptor has validated ([A-Za-z0-9._:-]) and need no escaping. Before
    configure_logging (in tests) the line goes through structlog, so structlog.testing.capture_logs sees it.
    """

    def __init__(self) -> None:
        self._log = structlog.get_logger("megacity.rpc")
        self._writer: LogWriter | None = None
        self._enabled = True
        self._service = "null"
        self._quoted: dict[str | None, str] = {}
        self._second = -1
        self._second_text = ""

    def configure(self, writer: LogWriter, level: int, service: str) -> None:
        self._writer, self._enabled, self._service = writer, level <= logging.INFO, self._json(service)

    def _json(self, value: str | None) -> str:
        quoted = self._quoted.get(value)
        if quoted is None:
            quoted = self._quoted[value] = orjson.dumps(value).decode()
        return quoted

    def _timestamp(self) -> str:
        """ISO 8601 UTC with microseconds, as structlog's TimeStamper writes it; the date part changes once a
        second, so it is formatted once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1_000_000):06d}Z"

    def record(
        self, method: str, caller: str | None, code: str, latency_ms: float, request_id: str, trace_id: str
    ) -> None:
        if self._writer is None:
            self._log.info(
                "rpc",
                method=method,
                caller=caller,
                code=code,
                latency_ms=round(latency_ms, 3),
                request_id=request_id,
                trace_id=trace_id,
            )
        elif self._enabled:
            self._writer.write(
                f'{{"method":{self._json(method)},"caller":{self._json(caller)},"code":"{code}",'
                f'"latency_ms":{latency_ms:.3f},"request_id":"{request_id}","trace_id":"{trace_id}",'
                f'"event":"rpc","service":{self._service},"level":"info","timestamp":"{self._timestamp()}"}}\n'
            )


access_log = AccessLog()


LOG_FLUSH_INTERVAL_SECONDS = 0.1
_LOG_BUFFER_LIMIT = 64 * 1024


class LogWriter:
    """Log lines to a file descriptor: info and debug are buffered, warnings and errors flush at once."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending: list[bytes] = []
        self._size = 0
        self._lock = threading.Lock()  # stdlib logging may write from other threads

    def write(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        with self._lock:
            self._pending.append(data)
            self._size += len(data)
            if self._size < _LOG_BUFFER_LIMIT:
                return
        self.flush()

    def flush(self) -> None:
        with self._lock:
            data = b"".join(self._pending)
            self._pending.clear()
            self._size = 0
            while data:
                data = data[os.write(self._fd, data) :]

    def _buffered(self, line: bytes) -> None:
        self.write(line + b"\n")

    def _immediate(self, line: bytes) -> None:
        self.write(line + b"\n")
        self.flush()

    # structlog calls the method named after the level.
    debug = info = msg = log = _buffered
    warning = warn = error = err = critical = exception = fatal = _immediate


_log_writer: LogWriter | None = None


def flush_logs() -> None:
    if _log_writer is not None:
        _log_writer.flush()


async def flush_logs_periodically() -> None:
    """Run for the life of the service; cancelling it flushes once more."""
    try:
        while True:
            await asyncio.sleep(LOG_FLUSH_INTERVAL_SECONDS)
            flush_logs()
    finally:
        flush_logs()


def configure_logging(level: str, service: str) -> None:
    global _log_writer
    _log_writer = writer = LogWriter(sys.stdout.fileno())
    atexit.register(flush_logs)
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    access_log.configure(writer, numeric, service)
    structlog.configure(
        processors=[
            *_SHARED_PROCESSORS,
            # Tracebacks as data, without frame locals: locals would copy passwords and tokens into logs.
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    handler = logging.StreamHandler(writer)
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


_exporting_spans = False


def configure_tracing(service: str) -> TracerProvider:
    """The process's tracer provider: spans are recorded and exported over OTLP when an endpoint is set
    (OTEL_EXPORTER_OTLP_ENDPOINT and the other standard OTEL_ variables). Without one, nobody collects spans,
    so the runtime keeps only W3C trace context (see ServerTrace)."""
    global _exporting_spans
    resource = Resource.create({"service.name": f"megacity-{service}"})
    _exporting_spans = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    if _exporting_spans:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER, default always on
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        # Nothing records spans then (ServerTrace): code that makes its own gets non-recording ones.
        provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    trace.set_tracer_provider(provider)
    return provider


def spans_exported() -> bool:
    """Whether this process records and exports spans (configure_tracing found an OTLP endpoint)."""
    return _exporting_spans


# W3C traceparent: version-trace_id-parent_id-flags, lower-case hex; version ff and all-zero ids are invalid.
_TRACEPARENT = re.compile(r"(?!ff)([0-9a-f]{2})-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-([0-9a-f]{2})")
_TRACESTATE_LIMIT = 512  # W3C asks to propagate at least 512 characters; longer values are dropped


class ServerTrace:
    """The trace each served call continues (W3C trace context), and its span when spans are recorded.

    When spans are exported, the span is OpenTelemetry's own: opentelemetry-instrumentation-grpc's server
    interceptor made it, with the RPC conventions, and it is current already; its client interceptors carry
    the context to the next hop. When they are not, nobody would ever see a span, and making one per call
    (even a non-recording one, made current in OpenTelemetry's context) cost more than the rest of the
    runtime's per-call work: the call keeps just the W3C fields, the caller's trace id (or a new random one)
    and a new span id, exactly what an unsampled span carries, and client channels send them on as
    `traceparent` (services/runtime/channels.py). Either way the trace id reaches the logs and the next hop.
    """

    def __init__(self) -> None:
        self.recording = _exporting_spans

    def start(self, traceparent: str | None, tracestate: str | None) -> tuple[str, str, str, str | None]:
        """Trace id, span id, trace flags (hex) and tracestate of the call being served."""
        if self.recording:
            context = trace.get_current_span().get_span_context()
            state = context.trace_state.to_header() if context.trace_state else None
            return format(context.trace_id, "032x"), format(context.span_id, "016x"), "00", state
        # Trace and span ids are identifiers, not secrets: the OpenTelemetry SDK draws them from `random` too.
        span_id = f"{random.getrandbits(64):016x}"
        if traceparent is not None:
            match = _TRACEPARENT.match(traceparent)
            # Version 00 is exactly 55 characters; later versions may append fields after a dash.
            if match and (len(traceparent) == 55 or (match[1] != "00" and traceparent[55] == "-")):
                if tracestate is not None and len(tracestate) > _TRACESTATE_LIMIT:
                    tracestate = None
                return match[2], span_id, f"{int(match[3], 16) & 1:02x}", tracestate
        return f"{random.getrandbits(128):032x}", span_id, "00", None


class _MethodStats:
    """Counts for one method, updated on the event loop and read by the scrape thread."""

    __slots__ = ("bucket_counts", "codes", "count", "total_seconds")

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.bucket_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.total_seconds = 0.0


class RpcMetrics(Collector):
    """Server-side RPC metrics, named as go-grpc-prometheus names them so dashboards carry over.

    A custom collector rather than prometheus_client's Counter/Histogram: a call records into plain
    counters (no locks, no label lookup), and the Prometheus families are built only when scraped.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(self)
        self._stats: dict[tuple[str, str], _MethodStats] = {}

    def observe(self, path: str, rpc_type: str, code: str, seconds: float) -> None:
        """Count a finished call; `code` is the status code's name (OK, NOT_FOUND, ...)."""
        stats = self._stats.get((path, rpc_type))
        if stats is None:
            stats = self._stats[(path, rpc_type)] = _MethodStats()
        stats.codes[code] = stats.codes.get(code, 0) + 1
        stats.bucket_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        stats.count += 1
        stats.total_seconds += seconds

    def collect(self) -> Iterator[Metric]:
        handled = CounterMetricFamily(
            "grpc_server_handled",
            "RPCs completed on the server, by method and status code.",
            labels=["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
        )
        handling = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to completing it on the server.",
            labels=["grpc_service", "grpc_method", "grpc_type"],
        )
        for (path, rpc_type), stats in list(self._stats.items()):
            service, _, method = path.lstrip("/").partition("/")
            for code, count in list(stats.codes.items()):
                handled.add_metric([service, method, rpc_type, code], count)
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, math.inf), list(stats.bucket_counts), strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == math.inf else str(bound), cumulative))
            handling.add_metric([service, method, rpc_type], buckets, stats.total_seconds)
        yield handled
        yield handling


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
