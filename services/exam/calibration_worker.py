"""The calibration worker: runs the calibration runs StartCalibration queues, one at a time per exam replica.

Every POLL_SECONDS it claims the oldest queued run of any organisation (services/exam/calibration_store.py: row
locks keep two replicas from taking the same run), reads the organisation's responses, estimates the parameters in a
thread (calibration is CPU-bound numpy, which releases the GIL, so the event loop keeps serving RPCs) and writes them
as a new parameter version. While it works it renews the run's heartbeat with its progress every HEARTBEAT_SECONDS;
a run whose heartbeat stops for STALE_AFTER_SECONDS (its replica died) is claimed again by another worker. A run
that cannot succeed (too few responses) or that raises ends as failed with a message; the loop goes on either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import uuid

import numpy as np
import structlog
from numpy.typing import NDArray

from services.exam.calibration import CalibrationResult, ItemParameters, ResponseData, calibrate
from services.exam.calibration_store import (
    CalibrationStore,
    ClaimedRun,
    EstimatedItem,
    NotCalibratable,
    ResponseMatrix,
    RunSummary,
)
from services.runtime.claims import keep_claim, poll_forever

POLL_SECONDS = 2.0
HEARTBEAT_SECONDS = 5.0
# Several missed heartbeats, so a database hiccup does not hand a live run to a second worker.
STALE_AFTER_SECONDS = 60.0
TOLERANCE = 1e-4  # calibrate's convergence criterion: the largest parameter change of an iteration
# Until the version is written the run is not done, however far EM has come.
_MAX_PROGRESS_WHILE_ESTIMATING = 0.95
_log = structlog.get_logger("megacity.exam.calibration")


class _Stopped(Exception):
    """Raised in the estimating thread to end calibrate early: the worker stops or lost the run."""


class _Progress:
    """Called by calibrate after each EM iteration, in the estimating thread; the heartbeat reads `value` on the
    event loop (a float assignment is atomic). Setting `stop` ends the calibration at its next iteration."""

    def __init__(self, max_iterations: int) -> None:
        self.value = 0.0
        self.stop = threading.Event()
        self._max_iterations = max_iterations
        self._first_change: float | None = None

    def __call__(self, iterations: int, change: float) -> None:
        if self.stop.is_set():
            raise _Stopped
        if self._first_change is None:
            self._first_change = change
        # EM converges linearly: the largest change shrinks by about the same factor each iteration, so the share
        # of the way its logarithm has come from the first change to the tolerance tracks the share of work done.
        # The iteration limit may end the run sooner, hence the larger of the two.
        toward_tolerance = 1.0
        if self._first_change > TOLERANCE and change > TOLERANCE:
            toward_tolerance = math.log(self._first_change / change) / math.log(self._first_change / TOLERANCE)
        self.value = min(
            _MAX_PROGRESS_WHILE_ESTIMATING, max(self.value, toward_tolerance, iterations / self._max_iterations)
        )


class CalibrationWorker:
    def __init__(
        self,
        store: CalibrationStore,
        *,
        poll_seconds: float = POLL_SECONDS,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        stale_after_seconds: float = STALE_AFTER_SECONDS,
    ) -> None:
        self._store = store
        self._poll_seconds = poll_seconds
        self._heartbeat_seconds = heartbeat_seconds
        self._stale_after_seconds = stale_after_seconds

    async def run(self) -> None:
        """Runs for the life of the service; neither a failing run nor PostgreSQL being away ends it."""
        await poll_forever(self.process_one, self._poll_seconds, "calibration.unavailable")

    async def process_one(self) -> bool:
        """Claims one run and carries it to its end; False when no run was waiting."""
        run = await self._store.claim(self._stale_after_seconds)
        if run is None:
            return False
        log = _log.bind(calibration_id=run.calibration_id, org_id=run.org_id)
        log.info("calibration.started", model=run.settings.model)
        progress = _Progress(run.settings.max_iterations)
        heartbeat = asyncio.create_task(
            keep_claim(
                lambda: self._store.heartbeat(run, progress.value),
                self._heartbeat_seconds,
                progress.stop.set,
                "calibration.heartbeat_failed",
                calibration_id=run.calibration_id,
            )
        )
        try:
            matrix = await self._store.responses(run)
            result = await asyncio.to_thread(_estimate, run, matrix, progress)
            items, summary = _outcome(matrix, result)
            version = await self._store.succeed(run, items, summary)
        except NotCalibratable as failure:
            log.info("calibration.not_calibratable", reason=str(failure))
            await self._store.fail(run, str(failure))
        except _Stopped:
            log.warning("calibration.taken_over")  # the heartbeat found another worker holding the run
        except asyncio.CancelledError:
            # The service stops: hand the run back rather than leave it to go stale (the thread ends at its next
            # iteration, seeing `stop`).
            progress.stop.set()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._store.release(run))
            raise
        except Exception:
            error_id = uuid.uuid4().hex
            log.exception("calibration.failed", error_id=error_id)
            await self._store.fail(run, f"the calibration failed unexpectedly (error id {error_id})")
        else:
            if version is None:
                log.warning("calibration.taken_over")
            else:
                log.info("calibration.succeeded", version=version, items=len(items), iterations=summary.iterations)
        finally:
            progress.stop.set()
            heartbeat.cancel()
        return True


def _estimate(run: ClaimedRun, matrix: ResponseMatrix, progress: _Progress) -> CalibrationResult:
    """Runs in a worker thread: the arrays are built here too, as a large bank's take a while."""
    responses = ResponseData(
        np.array(matrix.person_index, dtype=np.int64),
        np.array(matrix.item_index, dtype=np.int64),
        np.array(matrix.correct, dtype=np.bool_),
        n_persons=matrix.n_persons,
        n_items=len(matrix.item_ids),
    )
    initial = ItemParameters(
        a=np.array(matrix.a, dtype=np.float64),
        b=np.array(matrix.b, dtype=np.float64),
        c=np.array(matrix.c, dtype=np.float64),
    )
    return calibrate(
        responses,
        run.settings.model,
        max_iterations=run.settings.max_iterations,
        tolerance=TOLERANCE,
        initial=initial,
        min_responses_per_item=run.settings.min_responses_per_item,
        on_iteration=progress,
    )


def _outcome(matrix: ResponseMatrix, result: CalibrationResult) -> tuple[list[EstimatedItem], RunSummary]:
    """The estimated items as the store writes them (a standard error calibrate did not estimate is NaN there and 0
    in the contract), and the run's totals."""
    estimated = np.flatnonzero(~result.skipped)
    parameters, errors = result.parameters, result.standard_errors
    items = [
        EstimatedItem(
            item_id=matrix.item_ids[index],
            a=float(parameters.a[index]),
            b=float(parameters.b[index]),
            c=float(parameters.c[index]),
            a_standard_error=_error(errors.a, index),
            b_standard_error=_error(errors.b, index),
            c_standard_error=_error(errors.c, index),
            response_count=int(result.response_counts[index]),
        )
        for index in estimated.tolist()
    ]
    summary = RunSummary(
        response_count=int(result.response_counts[estimated].sum()),
        iterations=result.iterations,
        converged=result.converged,
        log_likelihood=result.log_likelihood,
    )
    return items, summary


def _error(values: NDArray[np.float64], index: int) -> float:
    value = float(values[index])
    return 0.0 if math.isnan(value) else value
