"""What the inference servers share: a model loaded off the event loop, bounded stream slots, and a bounded,
idle-timed reader of a request stream.

- `ModelHost` loads a model in a worker thread when the service builds its servicers; its `probe` is the health
  probe ("model"), so the service reports NOT_SERVING until the model is loaded (and for good if loading failed);
  calls before then get UNAVAILABLE with reason MODEL_NOT_READY.
- `StreamSlots` bounds the sessions (streams, clips) a server runs at once; one more is refused with
  RESOURCE_EXHAUSTED (CAPACITY_EXCEEDED) and a QuotaFailure, never queued.
- `RequestReader` reads a request stream ahead into a queue bounded in items and bytes and reads the next
  request only when there is room, so gRPC flow control pushes back on a client that outruns the model. A client
  that sends nothing for `idle_timeout` seconds gets DEADLINE_EXCEEDED with reason STREAM_IDLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

import structlog
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from services.runtime.errors import DeadlineExceeded, ErrorReason, InvalidArgument, ResourceExhausted, Unavailable

_log = structlog.get_logger("megacity.inference")

M = TypeVar("M")
R = TypeVar("R")

MODEL_RETRY_SECONDS = 2.0


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


class ModelHost(Generic[M]):
    """A model loaded once, off the event loop, and closed at shutdown."""

    def __init__(
        self,
        name: str,
        load: Callable[[], M],
        executor: Executor,
        close: Callable[[M], None] | None = None,
        *,
        probe_wait: float = 1.9,
    ) -> None:
        self.name = name
        self._load = load
        self._executor = executor
        self._close = close
        self._probe_wait = probe_wait
        self._future: asyncio.Future[M] | None = None
        self._model: M | None = None
        self.load_seconds: float | None = None
        self.error: BaseException | None = None
        self._closed = False

    def start(self) -> None:
        """Begin loading in the executor (call with the event loop running)."""
        if self._future is None:
            self._future = asyncio.get_running_loop().run_in_executor(self._executor, self._timed_load)
            self._future.add_done_callback(self._loaded)

    def _timed_load(self) -> M:
        started = time.perf_counter()
        model = self._load()
        self.load_seconds = time.perf_counter() - started
        return model

    def _loaded(self, future: asyncio.Future[M]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self.error = error
            _log.error("model.load_failed", model=self.name, error=repr(error))
        elif self._closed:  # the service stopped while the model loaded
            if self._close is not None:
                self._close(future.result())
        else:
            self._model = future.result()
            _log.info("model.loaded", model=self.name, seconds=round(self.load_seconds or 0.0, 3))

    @property
    def ready(self) -> bool:
        return self._model is not None

    def get(self) -> M:
        """The model, or UNAVAILABLE (MODEL_NOT_READY) while it loads or after it failed to."""
        if self._model is None:
            state = "failed to load" if self.error is not None else "is still loading"
            raise Unavailable(
                f"the model {self.name} {state}",
                retry_after_seconds=MODEL_RETRY_SECONDS,
                reason=ErrorReason.ERROR_REASON_MODEL_NOT_READY,
                metadata={"model": self.name},
            )
        return self._model

    async def probe(self) -> bool:
        """Health probe: True once loaded (waits a little for a load in progress, so a fast load is SERVING from
        the service's first health check on)."""
        future = self._future
        if future is not None and not future.done():
            await asyncio.wait({future}, timeout=self._probe_wait)
        return self.ready

    def close(self) -> None:
        """Close the model now, or as soon as a load in progress ends."""
        self._closed = True
        model, self._model = self._model, None
        if model is not None and self._close is not None:
            self._close(model)


class StreamSlots:
    """At most `limit` sessions at once; `active` is how many run now."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no session runs (at most `timeout` seconds); True if none does."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self.active == 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise ResourceExhausted(
                f"the server runs {self.limit} {self.what} at most and all are busy; retry later",
                retry_after_seconds=1.0,
                reason=ErrorReason.ERROR_REASON_CAPACITY_EXCEEDED,
                quota_violations=[(self.what, f"at most {self.limit} concurrent {self.what}")],
                metadata={"max_streams": str(self.limit)},
            )
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()


class _End:
    """Marks the end of the request stream in the queue."""


class RequestReader(Generic[R]):
    """Reads `requests` ahead into a queue of at most `max_items` requests and `max_bytes` bytes (one request is
    always let in). `next()` returns the next request, None after the client half-closed, and raises what the
    reading raised (the idle timeout, a transport error). Use it as an async context manager: leaving it stops
    the reading at once."""

    def __init__(
        self,
        requests: AsyncIterator[R],
        *,
        size: Callable[[R], int],
        max_items: int,
        max_bytes: int,
        idle_timeout: float,
    ) -> None:
        self._requests = requests
        self._size = size
        self._max_items = max(1, max_items)
        self._max_bytes = max_bytes
        self._idle_timeout = idle_timeout
        self._queue: deque[R | _End | BaseException] = deque()
        self._bytes = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RequestReader[R]:
        self._task = asyncio.create_task(self._read(), name="request-reader")
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._queue.clear()
        self._bytes = 0

    def _has_room(self) -> bool:
        return not self._queue or (len(self._queue) < self._max_items and self._bytes < self._max_bytes)

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def _read(self) -> None:
        iterator = aiter(self._requests)
        try:
            while True:
                while not self._has_room():
                    await self._wait_change()
                try:
                    request = await asyncio.wait_for(anext(iterator), self._idle_timeout)
                except StopAsyncIteration:
                    self._queue.append(_End())
                    return
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"the stream sent nothing for {self._idle_timeout:g} s",
                        reason=ErrorReason.ERROR_REASON_STREAM_IDLE,
                        metadata={"idle_timeout_seconds": f"{self._idle_timeout:g}"},
                    ) from None
                self._bytes += self._size(request)
                self._queue.append(request)
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # handed to the consumer, which raises it in the handler
            self._queue.append(error)
        finally:
            self._changed.set()

    @property
    def has_next(self) -> bool:
        """A request (or the end) is queued, so `next()` returns without waiting."""
        return bool(self._queue)

    async def next(self) -> R | None:
        while not self._queue:
            await self._wait_change()
        item = self._queue.popleft()
        if isinstance(item, _End):
            self._queue.appendleft(item)  # the end stays the end
            return None
        if isinstance(item, BaseException):
            self._queue.appendleft(item)
            raise item
        self._bytes -= self._size(item)
        self._changed.set()
        return item


def lifetime(
    slots: StreamSlots, grace: float, close: Callable[[], Awaitable[None]]
) -> Callable[[], Coroutine[Any, Any, None]]:
    """A background job for the runtime that lives as long as the service and, when the service stops, lets the
    sessions in flight finish (up to `grace` seconds) before it closes the model and its workers."""

    async def live() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await slots.wait_idle(grace)
            try:
                await close()
            except Exception as error:
                _log.error("model.close_failed", error=repr(error))

    return live


def frame_timestamp_ms(timestamp: duration_pb2.Duration | None, previous_ms: int | None, index: int) -> int:
    """A stream frame's timestamp (None: the frame has none) in ms: present, and at least 1 ms after the previous
    frame's (video mode tracks motion over time); INVALID_ARGUMENT (FRAME_TIMESTAMP_INVALID) otherwise. `index`
    counts the stream's messages."""
    if timestamp is None:
        raise InvalidArgument(
            "stream frames need timestamps",
            [("frame.timestamp", f"required (message {index})")],
            reason=ErrorReason.ERROR_REASON_FRAME_TIMESTAMP_INVALID,
        )
    timestamp_ms: int = timestamp.ToMilliseconds()
    if timestamp_ms < 0 or (previous_ms is not None and timestamp_ms <= previous_ms):
        raise InvalidArgument(
            f"frame timestamps must increase by at least 1 ms; {timestamp_ms} ms follows {previous_ms} ms",
            [("frame.timestamp", f"must be after the previous frame's {previous_ms} ms (message {index})")],
            reason=ErrorReason.ERROR_REASON_FRAME_TIMESTAMP_INVALID,
            metadata={"timestamp_ms": str(timestamp_ms), "previous_ms": str(previous_ms)},
        )
    return timestamp_ms


Q = TypeVar("Q", bound=Message)


async def first_config(reader: RequestReader[Q], placement: str) -> Q:
    """The stream's first message, which must carry its config (the `request` oneof); INVALID_ARGUMENT
    (STREAM_PROTOCOL) when the stream ends first or starts with something else."""
    first = await reader.next()
    if first is None or first.WhichOneof("request") != "config":
        raise InvalidArgument(
            "the first message of a stream must carry its config",
            [("config", placement)],
            reason=ErrorReason.ERROR_REASON_STREAM_PROTOCOL,
        )
    return first


def require_payload(request: Message, payload: str, index: int) -> None:
    """A stream's message after the first carries `payload` (the other member of its `request` oneof than the
    config); INVALID_ARGUMENT (STREAM_PROTOCOL) otherwise. `index` counts the stream's messages."""
    kind = request.WhichOneof("request")
    if kind != payload:
        detail = f"message {index} must carry {payload}, not {kind or 'nothing'}"
        raise InvalidArgument(
            f"only the first message of a stream carries a config; {detail}",
            [(payload, detail)],
            reason=ErrorReason.ERROR_REASON_STREAM_PROTOCOL,
        )
