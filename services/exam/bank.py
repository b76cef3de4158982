"""The item banks attempts draw from, as the CAT engine wants them (services/exam/cat.py), and the live CAT state
of each attempt in Redis.

A bank is one organisation's items with parameters of one version; attempts keep the version they started with,
so a bank is immutable apart from items' status (retired ones stop being eligible), and is cached briefly.
The CAT state (`cat:{attempt_id}:state`) only saves rebuilding it from PostgreSQL, which holds every answer: a
write never goes backwards (compare-and-set on the attempt's position), and a lost state is rebuilt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import orjson
from numpy.typing import NDArray
from redis.asyncio import Redis

from megacity.exam.v1 import resources_pb2 as res
from services.exam import cat
from services.exam.store import AttemptStore, BankRow
from services.runtime.database import TenantScope

BANK_TTL_SECONDS = 30.0
STATE_TTL_SECONDS = 24 * 3600
_BANK_LIMIT = 64


@dataclass(frozen=True, eq=False)
class LoadedBank:
    engine: cat.ItemBank
    rows: list[BankRow]
    index: dict[str, int]
    active: NDArray[np.bool_]

    def eligible(self, config: res.AdaptiveConfig) -> NDArray[np.bool_]:
        pool = cat.pool_mask(self.engine, list(config.pool_item_ids), list(config.pool_content_areas))
        return self.active & pool


def _loaded(rows: list[BankRow]) -> LoadedBank:
    areas = sorted({row.content_area for row in rows})
    area_index = {area: position for position, area in enumerate(areas)}
    engine = cat.ItemBank(
        ids=[row.item_id for row in rows],
        a=np.array([row.a for row in rows], dtype=np.float64),
        b=np.array([row.b for row in rows], dtype=np.float64),
        c=np.array([row.c for row in rows], dtype=np.float64),
        content_area=np.array([area_index[row.content_area] for row in rows], dtype=np.intp),
        content_areas=areas,
    )
    return LoadedBank(
        engine=engine,
        rows=rows,
        index={row.item_id: position for position, row in enumerate(rows)},
        active=np.array([row.status == "active" for row in rows], dtype=np.bool_),
    )


class BankCache:
    def __init__(self, store: AttemptStore) -> None:
        self._store = store
        self._banks: dict[tuple[str, int], tuple[float, LoadedBank]] = {}

    async def get(self, scope: TenantScope, org_id: str, version: int) -> LoadedBank:
        key = (org_id, version)
        cached = self._banks.get(key)
        if cached is not None and time.monotonic() - cached[0] < BANK_TTL_SECONDS:
            return cached[1]
        bank = _loaded(await self._store.bank(scope, org_id, version))
        if len(self._banks) >= _BANK_LIMIT:
            self._banks.clear()
        self._banks[key] = (time.monotonic(), bank)
        return bank


def adaptive_config(config: res.AdaptiveConfig) -> cat.CatConfig:
    """The engine's configuration: the contract's fields, 0 meaning the documented default."""
    selection = (
        cat.SelectionMethod.RANDOMESQUE
        if config.selection_method == res.SELECTION_METHOD_RANDOMESQUE
        else cat.SelectionMethod.MAX_INFORMATION
    )
    exposure = (
        cat.ExposureControl.SYMPSON_HETTER
        if config.exposure_control == res.EXPOSURE_CONTROL_SYMPSON_HETTER
        else cat.ExposureControl.NONE
    )
    estimator = {
        res.ABILITY_ESTIMATOR_MAP: cat.AbilityEstimator.MAP,
        res.ABILITY_ESTIMATOR_MLE: cat.AbilityEstimator.MLE,
    }.get(config.estimator, cat.AbilityEstimator.EAP)
    return cat.CatConfig(
        min_items=config.min_items or 5,
        max_items=config.max_items or 30,
        standard_error_target=config.standard_error_target,
        selection=selection,
        randomesque_k=config.randomesque_k or 5,
        exposure_control=exposure,
        max_exposure_rate=config.max_exposure_rate or 0.25,
        content_blueprint=dict(config.content_blueprint),
        estimator=estimator,
        prior_mean=config.prior_mean,
        prior_sd=config.prior_sd or 1.0,
        starting_theta=config.starting_theta or None,  # 0: start at the prior mean
    )


def rng_for(seed: int, position: int) -> np.random.Generator:
    """The attempt's random choices at one position: the same whether its state came from Redis or was rebuilt."""
    return np.random.default_rng([seed, position])


# A fixed form is scored like an adaptive test (EAP, standard normal prior) but never stops early.
_FORM_SCORING = cat.CatConfig(min_items=0, max_items=1, standard_error_target=0.0)


def form_order(bank: LoadedBank, form: res.FixedForm, seed: int) -> tuple[int, ...]:
    """The bank indices of a fixed form's items in the attempt's order (shuffled per attempt when asked).
    Items without parameters in the attempt's version are left out."""
    order = [bank.index[item_id] for item_id in form.item_ids if item_id in bank.index]
    if form.shuffle:
        rng_for(seed, 0).shuffle(order)
    return tuple(order)


def scoring_config(exam: res.Exam) -> cat.CatConfig:
    return adaptive_config(exam.adaptive) if exam.HasField("adaptive") else _FORM_SCORING


def attempt_step(
    bank: LoadedBank,
    exam: res.Exam,
    state: cat.CatState,
    seed: int,
    *,
    exposure_k: NDArray[np.float64] | None = None,
    elapsed_seconds: float = 0.0,
) -> cat.Step:
    """An attempt's next step after the answers in `state`: adaptive selection (with the exam's Sympson-Hetter
    parameters, when computed), or the fixed form's next item."""
    time_limit = float(exam.time_limit.seconds)
    position = len(state.administered) + 1
    if exam.HasField("fixed_form"):
        return cat.next_form_step(
            bank.engine,
            _FORM_SCORING,
            state,
            form_order(bank, exam.fixed_form, seed),
            elapsed_seconds=elapsed_seconds,
            time_limit_seconds=time_limit,
        )
    return cat.next_step(
        bank.engine,
        adaptive_config(exam.adaptive),
        state,
        rng_for(seed, position),
        eligible=bank.eligible(exam.adaptive),
        exposure_k=exposure_k,
        elapsed_seconds=elapsed_seconds,
        time_limit_seconds=time_limit,
    )


# Writes the state only if it is newer (a higher position) than the one stored.
_COMPARE_AND_SET = """
local stored = redis.call('GET', KEYS[1])
if stored and cjson.decode(stored)['position'] >= tonumber(ARGV[2]) then
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""


def state_key(attempt_id: str) -> str:
    return f"cat:{attempt_id}:state"


class CatStates:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def save(self, attempt_id: str, position: int, state: cat.CatState, bank: LoadedBank) -> None:
        document = {
            "position": position,
            "administered": [bank.engine.ids[item] for item in state.administered],
            "responses": list(state.responses),
            "set_aside": [bank.engine.ids[item] for item in state.set_aside],
            "theta": state.theta,
            "se": state.se,
        }
        await self._redis.eval(
            _COMPARE_AND_SET, 1, state_key(attempt_id), orjson.dumps(document), position, STATE_TTL_SECONDS
        )

    async def load(self, attempt_id: str, position: int, bank: LoadedBank) -> cat.CatState | None:
        """The state waiting for the answer at `position`, or None when Redis has none (or an older one)."""
        raw = await self._redis.get(state_key(attempt_id))
        if raw is None:
            return None
        document = orjson.loads(raw)
        if document.get("position") != position:
            return None
        return cat.CatState(
            administered=tuple(bank.index[item] for item in document["administered"]),
            responses=tuple(document["responses"]),
            theta=document["theta"],
            se=document["se"],
            set_aside=tuple(bank.index[item] for item in document["set_aside"] if item in bank.index),
        )
