"""Pure pieces of services/runtime/telemetry.py: W3C trace context parsing and the access-log line."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

from services.runtime.telemetry import AccessLog, LogWriter, ServerTrace

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture
def server_trace() -> ServerTrace:
    tracer = ServerTrace()
    tracer.recording = False  # the W3C fields alone, as when no OTLP endpoint is set
    return tracer


@pytest.mark.parametrize(
    ("traceparent", "flags"),
    [
        (f"00-{TRACE_ID}-{PARENT}-01", "01"),
        (f"00-{TRACE_ID}-{PARENT}-00", "00"),
        (f"00-{TRACE_ID}-{PARENT}-03", "01"),  # unknown flags are not passed on, only `sampled`
        (f"01-{TRACE_ID}-{PARENT}-01-future-field", "01"),  # later versions may append fields
    ],
)
def test_a_valid_traceparent_is_continued_with_a_new_span(
    server_trace: ServerTrace, traceparent: str, flags: str
) -> None:
    trace_id, span_id, trace_flags, state = server_trace.start(traceparent, "vendor=value")
    assert (trace_id, trace_flags, state) == (TRACE_ID, flags, "vendor=value")
    assert re.fullmatch("[0-9a-f]{16}", span_id)
    assert span_id != PARENT


@pytest.mark.parametrize(
    "traceparent",
    [
        None,
        "",
        f"00-{TRACE_ID.upper()}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"ff-{TRACE_ID}-{PARENT}-01",
        f"00-{TRACE_ID}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"01-{TRACE_ID}-{PARENT}-01extra",
        f"00-{TRACE_ID[:-1]}-{PARENT}-01",
        "garbage",
    ],
)
def test_an_invalid_traceparent_starts_a_new_trace(server_trace: ServerTrace, traceparent: str | None) -> None:
    trace_id, span_id, trace_flags, state = server_trace.start(traceparent, "vendor=value")
    assert re.fullmatch("[0-9a-f]{32}", trace_id)
    assert trace_id != TRACE_ID
    assert re.fullmatch("[0-9a-f]{16}", span_id)
    assert (trace_flags, state) == ("00", None)


def test_an_oversized_tracestate_is_dropped(server_trace: ServerTrace) -> None:
    _, _, _, state = server_trace.start(f"00-{TRACE_ID}-{PARENT}-01", "k=" + "v" * 600)
    assert state is None


def test_the_access_log_line_is_json_with_every_field() -> None:
    read_end, write_end = os.pipe()
    log = AccessLog()
    writer = LogWriter(write_end)
    log.configure(writer, logging.INFO, 'svc "quoted"')
    log.record('/pkg.Svc/Do"It', None, "NOT_FOUND", 1.23456, "req-1", TRACE_ID)
    log.record("/pkg.Svc/Other", "ops", "OK", 0.5, "req-2", TRACE_ID)
    writer.flush()
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        first, second = (json.loads(line) for line in pipe)
    assert first == {
        "method": '/pkg.Svc/Do"It',
        "caller": None,
        "code": "NOT_FOUND",
        "latency_ms": 1.235,
        "request_id": "req-1",
        "trace_id": TRACE_ID,
        "event": "rpc",
        "service": 'svc "quoted"',
        "level": "info",
        "timestamp": first["timestamp"],
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["timestamp"])
    assert (second["caller"], second["code"], second["latency_ms"]) == ("ops", "OK", 0.5)


def test_the_access_log_is_silent_above_info() -> None:
    read_end, write_end = os.pipe()
    log = AccessLog()
    writer = LogWriter(write_end)
    log.configure(writer, logging.WARNING, "svc")
    log.record("/pkg.Svc/Do", "ops", "OK", 1.0, "req-1", TRACE_ID)
    writer.flush()
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        assert pipe.read() == ""
