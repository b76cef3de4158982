"""A gRPC (or REST) load generator for the benchmarks: calls over one HTTP/2 connection, a fixed number in flight.

It speaks gRPC directly over `h2`, without the grpc client stack: a Python grpc client costs more CPU per call than
the server it loads, so on a 2-core host it would measure itself; this one costs a fraction of a call's server
time, so the server is the bottleneck.
"""

from __future__ import annotations

import asyncio
import time

import h2.config
import h2.connection
import h2.events

IN_FLIGHT = 32


class GrpcLoad:
    """Unary calls of one method (`path`, each with `message`) over one connection, IN_FLIGHT always in flight."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        port: int,
        path: str,
        message: bytes,
        *,
        scheme: str = "https",
        in_flight: int = IN_FLIGHT,
    ) -> None:
        self.in_flight = in_flight
        self._reader, self._writer = reader, writer
        self._connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self._body = b"\x00" + len(message).to_bytes(4, "big") + message
        self._pseudo = [
            (":method", "POST"),
            (":scheme", scheme),
            (":path", path),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        self._headers = self._pseudo
        self._connection.initiate_connection()
        self._sent_at: dict[int, float] = {}
        self.failures = 0
        self.first_failure = ""
        self.latencies: list[float] = []
        self._grpc = True

    @classmethod
    def rest(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str) -> GrpcLoad:
        """GETs of `path` as `host` (cleartext HTTP/2, as Envoy accepts it); a call succeeds with status 200."""
        load = cls(reader, writer, 0, path, b"", scheme="http")
        load._pseudo = [(":method", "GET"), (":scheme", "http"), (":path", path), (":authority", host)]
        load._headers = load._pseudo
        load._body = b""
        load._grpc = False
        return load

    def set_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._headers = [*self._pseudo, *metadata]

    def close(self) -> None:
        # Aborted, not shut down: grpc's server does not answer TLS close_notify, and nothing is left to say.
        self._writer.transport.abort()

    def _send(self) -> None:
        stream_id = self._connection.get_next_available_stream_id()
        self._sent_at[stream_id] = time.perf_counter()
        if self._body:
            self._connection.send_headers(stream_id, self._headers)
            self._connection.send_data(stream_id, self._body, end_stream=True)
        else:
            self._connection.send_headers(stream_id, self._headers, end_stream=True)

    async def run(self, seconds: float) -> int:
        """Calls completed in `seconds` with grpc-status 0 (REST: status 200); any other counts in `failures`."""
        completed = 0
        stop_at = time.perf_counter() + seconds
        for _ in range(self.in_flight):
            self._send()
        in_flight = self.in_flight
        while in_flight:
            self._writer.write(self._connection.data_to_send())
            data = await self._reader.read(1 << 16)
            if not data:
                raise ConnectionError("the server closed the connection")
            for event in self._connection.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self._connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.ResponseReceived) and not self._grpc:
                    if (b":status", b"200") in event.headers:
                        completed += 1
                    else:
                        self.failures += 1
                        self.first_failure = self.first_failure or repr(event.headers)
                elif isinstance(event, h2.events.TrailersReceived):
                    if (b"grpc-status", b"0") in event.headers:
                        completed += 1
                    else:
                        self.failures += 1
                        self.first_failure = self.first_failure or repr(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    self.latencies.append(time.perf_counter() - self._sent_at.pop(event.stream_id))
                    in_flight -= 1
                    if time.perf_counter() < stop_at:
                        self._send()
                        in_flight += 1
                elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    raise ConnectionError(f"the server ended the call: {event}")
        return completed
