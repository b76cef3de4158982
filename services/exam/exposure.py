"""Sympson-Hetter exposure parameters per exam, computed by simulation.

A published exam with Sympson-Hetter exposure control needs, for the parameter version its attempts use, each
item's probability of being administered once selected. ExposureWorker computes them with
cat.sympson_hetter_parameters (simulated examinees drawn from the exam's prior, through the exam's own selection
rules over its pool) in a worker process, so that neither the event loop nor the GIL waits on the simulation, and
stores them (table exposure_parameters). It finds the exams to do by polling, so any replica may do the work and a
restart loses none. ExposureCache hands them to attempts as an array aligned with the bank; until they exist, an
exam runs without exposure control.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import asyncpg
import numpy as np
import structlog
from numpy.typing import NDArray

from megacity.exam.v1 import resources_pb2 as res
from services.exam import cat
from services.exam.bank import BANK_TTL_SECONDS, BankCache, LoadedBank, adaptive_config
from services.exam.store import AttemptStore, exam_message
from services.runtime.database import TenantScope

SIMULEES = 2000
POLL_SECONDS = 10.0
_CACHE_LIMIT = 1024
_log = structlog.get_logger("megacity.exam.exposure")


def exposure_parameters(
    ids: Sequence[str],
    a: NDArray[np.float64],
    b: NDArray[np.float64],
    c: NDArray[np.float64],
    content_area: NDArray[np.intp],
    content_areas: Sequence[str],
    config: cat.CatConfig,
    seed: Sequence[int],
) -> dict[str, float]:
    """The parameters of an exam's pool (the items given), in a worker process: plain arrays cross the boundary."""
    pool = cat.ItemBank(ids=ids, a=a, b=b, c=c, content_area=content_area, content_areas=content_areas)
    k = cat.sympson_hetter_parameters(pool, config, np.random.default_rng(seed), simulees=SIMULEES)
    return dict(zip(pool.ids, k.tolist(), strict=True))


class ExposureWorker:
    def __init__(self, store: AttemptStore, banks: BankCache) -> None:
        self._store = store
        self._banks = banks

    async def run(self) -> None:
        """Runs for the life of the service; a database away only pauses it."""
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as processes:
            while True:
                try:
                    await self.compute_awaiting(processes)
                except (asyncpg.PostgresError, OSError) as error:
                    _log.warning("exposure.unavailable", error=str(error))
                await asyncio.sleep(POLL_SECONDS)

    async def compute_awaiting(self, processes: ProcessPoolExecutor) -> int:
        """Computes the parameters of every exam waiting for them; how many exams were done."""
        done = 0
        for row in await self._store.exams_awaiting_exposure(limit=20):
            exam = exam_message(row)
            scope = TenantScope.org(exam.zone_id, exam.org_id)
            bank = await self._banks.get(scope, exam.org_id, row["version"])
            pool = np.flatnonzero(bank.eligible(exam.adaptive))
            if pool.size == 0:
                continue
            engine = bank.engine
            started = time.monotonic()
            k = await asyncio.get_running_loop().run_in_executor(
                processes,
                exposure_parameters,
                [engine.ids[int(item)] for item in pool],
                engine.a[pool],
                engine.b[pool],
                engine.c[pool],
                engine.content_area[pool],
                engine.content_areas,
                adaptive_config(exam.adaptive),
                list(exam.id.encode()),  # the same exam and bank give the same parameters
            )
            await self._store.save_exposure_parameters(row, row["version"], k)
            held_back = sum(value < 1 for value in k.values())
            _log.info(
                "exposure.computed",
                exam_id=exam.id,
                version=row["version"],
                items=len(k),
                held_back=held_back,
                seconds=round(time.monotonic() - started, 2),
            )
            done += 1
        return done


class ExposureCache:
    """Each exam's parameters for a version, as an array over the bank (1 for items without one)."""

    def __init__(self, store: AttemptStore) -> None:
        self._store = store
        self._arrays: dict[tuple[str, int], tuple[float, NDArray[np.float64]]] = {}

    async def get(
        self, scope: TenantScope, exam: res.Exam, version: int, bank: LoadedBank
    ) -> NDArray[np.float64] | None:
        if not exam.HasField("adaptive") or exam.adaptive.exposure_control != res.EXPOSURE_CONTROL_SYMPSON_HETTER:
            return None
        key = (exam.id, version)
        cached = self._arrays.get(key)
        if cached is not None and time.monotonic() - cached[0] < BANK_TTL_SECONDS:
            return cached[1]
        parameters = await self._store.exposure_parameters(scope, exam.id, version)
        array = np.ones(bank.engine.size)
        for item_id, k in parameters.items():
            if item_id in bank.index:
                array[bank.index[item_id]] = k
        if len(self._arrays) >= _CACHE_LIMIT:
            self._arrays.clear()
        self._arrays[key] = (time.monotonic(), array)
        return array
