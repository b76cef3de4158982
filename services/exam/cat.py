"""Computerized adaptive testing: the engine the exam service calls after every answer.

Items follow the three-parameter logistic model, P(θ) = c + (1 - c) / (1 + exp(-a(θ - b))); a 2PL item is a 3PL
item with c = 0 and a 1PL item one with a = 1, c = 0. The service keeps a bank as parallel arrays (`ItemBank`) and
an attempt as a `CatState`, and after each answer calls `next_step`, which

- estimates theta from the responses so far: EAP (quadrature on `QUADRATURE`, normal prior), MAP or MLE (a
  safeguarded Newton search from the best quadrature point), clamped to [THETA_MIN, THETA_MAX];
- decides whether to stop: standard error target (once min_items are in), max_items, time limit, empty pool;
- otherwise picks the next item: maximum Fisher information at theta or randomesque among the top k, within the
  content area furthest below its blueprint share, under Sympson-Hetter exposure control.

Everything is pure and vectorised over examinees: `simulate` runs a whole population in lockstep through the same
selection and estimation code that serves one attempt, and randomness comes only from the generator passed in.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray

Floats: TypeAlias = NDArray[np.float64]
Indices: TypeAlias = NDArray[np.intp]
Mask: TypeAlias = NDArray[np.bool_]

THETA_MIN = -4.0
THETA_MAX = 4.0
# EAP's rectangle rule on this grid: the posterior is smooth and negligible at ±6, so the error falls geometrically
# with the spacing; at 0.1 it stays under 1e-6 down to posterior SDs of about 0.1 (a hundred highly informative
# items). The clamp bounds ±4 are grid points, so MAP and MLE start their search from a point inside them.
QUADRATURE: Floats = np.linspace(-6.0, 6.0, 121)
_GRID_STEP = float(QUADRATURE[1] - QUADRATURE[0])
_GRID_IN_BOUNDS: Mask = (QUADRATURE >= THETA_MIN - 1e-9) & (QUADRATURE <= THETA_MAX + 1e-9)
_MODE_TOLERANCE = 1e-9
_MODE_ITERATIONS = 60  # bisection alone halves a 0.2-wide bracket below the tolerance in 28 steps
_TINY = 1e-12
# Simulation evaluates information for a block of (examinees, items) at once. Blocks of this many cells (2 MB per
# float array) ran fastest: larger ones spend their time faulting in fresh memory, smaller ones in per-call overhead.
_SIMULATION_CELLS = 1 << 18
# Sympson-Hetter calibration aims each item's expected administration rate this many binomial standard errors below
# the cap: the highest of the observed rates of the several dozen items held at the target, each also off by K's
# own calibration error, then still stays under the cap (three were not enough in simulations of 300-item banks).
_EXPOSURE_MARGIN_Z = 4.0


class SelectionMethod(enum.Enum):
    MAX_INFORMATION = "max_information"
    RANDOMESQUE = "randomesque"


class ExposureControl(enum.Enum):
    NONE = "none"
    SYMPSON_HETTER = "sympson_hetter"


class AbilityEstimator(enum.Enum):
    EAP = "eap"
    MAP = "map"
    MLE = "mle"


class StopReason(enum.Enum):
    SE_TARGET = "se_target"
    MAX_ITEMS = "max_items"
    TIME_LIMIT = "time_limit"
    POOL_EXHAUSTED = "pool_exhausted"


@dataclass(frozen=True, eq=False)
class ItemBank:
    """Items as parallel arrays: item i has parameters a[i], b[i], c[i], content area content_areas[content_area[i]]
    and id ids[i]. Engine functions refer to items by their index here."""

    ids: Sequence[str]
    a: Floats
    b: Floats
    c: Floats
    content_area: Indices
    content_areas: Sequence[str]
    # content_area one-hot (items, areas), for counting a mask's items per area with one matrix product
    area_indicator: Floats = field(init=False, repr=False)

    def __post_init__(self) -> None:
        coerced = {
            "ids": tuple(self.ids),
            "a": np.asarray(self.a, dtype=np.float64),
            "b": np.asarray(self.b, dtype=np.float64),
            "c": np.asarray(self.c, dtype=np.float64),
            "content_area": np.asarray(self.content_area, dtype=np.intp),
            "content_areas": tuple(self.content_areas),
        }
        for name, value in coerced.items():
            object.__setattr__(self, name, value)
        size = len(self.ids)
        for name in ("a", "b", "c", "content_area"):
            if getattr(self, name).shape != (size,):
                raise ValueError(f"ItemBank.{name} must have one entry per id ({size})")
        if not (np.all(np.isfinite(self.a)) and np.all(self.a > 0)):
            raise ValueError("ItemBank.a must be positive and finite")
        if not np.all(np.isfinite(self.b)):
            raise ValueError("ItemBank.b must be finite")
        if not (np.all(self.c >= 0) and np.all(self.c < 1)):
            raise ValueError("ItemBank.c must lie in [0, 1)")
        if size and not (self.content_area.min() >= 0 and self.content_area.max() < len(self.content_areas)):
            raise ValueError("ItemBank.content_area must index content_areas")
        indicator = np.zeros((size, len(self.content_areas)))
        indicator[np.arange(size), self.content_area] = 1.0
        object.__setattr__(self, "area_indicator", indicator)

    @property
    def size(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class CatConfig:
    """The exam's AdaptiveConfig, with the contract's defaults."""

    min_items: int = 5
    max_items: int = 30
    # 0 = run to max_items
    standard_error_target: float = 0.3
    selection: SelectionMethod = SelectionMethod.MAX_INFORMATION
    randomesque_k: int = 5
    exposure_control: ExposureControl = ExposureControl.NONE
    max_exposure_rate: float = 0.25
    # content area -> target proportion of the test; empty = no content balancing
    content_blueprint: Mapping[str, float] = field(default_factory=dict)
    estimator: AbilityEstimator = AbilityEstimator.EAP
    prior_mean: float = 0.0
    prior_sd: float = 1.0
    # theta at which the first item is chosen; None = prior_mean
    starting_theta: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_items <= self.max_items or self.max_items < 1:
            raise ValueError("CatConfig needs 0 <= min_items <= max_items and max_items >= 1")
        if self.standard_error_target < 0:
            raise ValueError("CatConfig.standard_error_target must not be negative")
        if self.randomesque_k < 1:
            raise ValueError("CatConfig.randomesque_k must be at least 1")
        if not 0 < self.max_exposure_rate <= 1:
            raise ValueError("CatConfig.max_exposure_rate must lie in (0, 1]")
        if any(not proportion >= 0 for proportion in self.content_blueprint.values()):
            raise ValueError("CatConfig.content_blueprint proportions must not be negative")
        if not (math.isfinite(self.prior_mean) and math.isfinite(self.prior_sd) and self.prior_sd > 0):
            raise ValueError("CatConfig needs a finite prior_mean and a positive prior_sd")

    @property
    def first_theta(self) -> float:
        return self.prior_mean if self.starting_theta is None else self.starting_theta


@dataclass(frozen=True)
class CatState:
    """An attempt so far: the bank indices of the items given, in order, their scored responses (1 right, 0 wrong),
    the current estimate, and the items Sympson-Hetter set aside for the rest of the attempt."""

    administered: tuple[int, ...] = ()
    responses: tuple[int, ...] = ()
    theta: float = 0.0
    se: float = 1.0
    set_aside: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.administered) != len(self.responses):
            raise ValueError("CatState needs one response per administered item")
        if any(response not in (0, 1) for response in self.responses):
            raise ValueError("CatState responses are 0 or 1")

    @classmethod
    def start(cls, config: CatConfig) -> CatState:
        return cls(theta=config.first_theta, se=config.prior_sd)

    def answered(self, item: int, correct: bool) -> CatState:
        return replace(self, administered=(*self.administered, item), responses=(*self.responses, int(correct)))


class Estimate(NamedTuple):
    theta: float
    se: float


class Selection(NamedTuple):
    # None when no eligible item is left
    item: int | None
    # items Sympson-Hetter turned down on the way, to be kept out for the rest of the attempt
    set_aside: tuple[int, ...]


@dataclass(frozen=True)
class Step:
    """What `next_step` decided: the state with the new estimate (and any newly set-aside items), and either the
    next item to give or why the attempt ends."""

    state: CatState
    item: int | None
    stop_reason: StopReason | None


@dataclass(frozen=True, eq=False)
class SimulationResult:
    """Per simulated examinee (in the order given): final estimate, its SE, test length, content shares and why the
    attempt stopped; per item: exposure and selection counts."""

    thetas: Floats
    standard_errors: Floats
    items_used: Indices
    # per item: how many examinees were given it
    exposure_counts: Indices
    # per item: how many examinees had it selected, whether then given or set aside by Sympson-Hetter
    selection_counts: Indices
    # (examinees, content areas): each examinee's share of items per area
    content_proportions: Floats
    stop_reasons: tuple[StopReason, ...]

    @property
    def exposure_rates(self) -> Floats:
        return self.exposure_counts / max(len(self.thetas), 1)


# --- the model ----------------------------------------------------------------------------------------------------


def _logistic(z: Floats) -> tuple[Floats, Floats]:
    """1 / (1 + exp(-z)) and its complement, each accurate in its own tail, without overflow for any z."""
    small = np.exp(-np.abs(z))
    large = 1.0 / (1.0 + small)
    tail = small * large
    positive = z >= 0
    return np.where(positive, large, tail), np.where(positive, tail, large)


def _item_terms(theta: Floats, a: Floats, b: Floats, c: Floats) -> tuple[Floats, Floats, Floats]:
    """P, P*Q* (the logistic part's variance) and (P - c) / P (the share of P owed to ability rather than guessing).
    P is 0 only for c = 0 far below b, where the share's limit is 1."""
    p_star, q_star = _logistic(a * (theta - b))
    probability = c + (1.0 - c) * p_star
    ability_share = np.divide((1.0 - c) * p_star, probability, out=np.ones_like(probability), where=probability > 0)
    return probability, p_star * q_star, ability_share


def response_probability(theta: ArrayLike, a: ArrayLike, b: ArrayLike, c: ArrayLike) -> Floats:
    """P(correct); the arguments broadcast (theta of shape (n, 1) against items of shape (m,) gives (n, m))."""
    a_, b_, c_ = (np.asarray(value, dtype=np.float64) for value in (a, b, c))
    p_star, _ = _logistic(a_ * (np.asarray(theta, dtype=np.float64) - b_))
    return c_ + (1.0 - c_) * p_star


def item_information(theta: ArrayLike, a: ArrayLike, b: ArrayLike, c: ArrayLike) -> Floats:
    """Fisher information a² (Q/P) ((P - c)/(1 - c))², written as a² P*Q* (P - c)/P; broadcasts like
    `response_probability`."""
    a_, b_, c_ = (np.asarray(value, dtype=np.float64) for value in (a, b, c))
    _, variance, ability_share = _item_terms(np.asarray(theta, dtype=np.float64), a_, b_, c_)
    return a_ * a_ * variance * ability_share


def _log_response_probabilities(theta: Floats, a: Floats, b: Floats, c: Floats) -> tuple[Floats, Floats]:
    """log P and log Q through log-sum-exp, finite wherever the probabilities are representable as logs."""
    z = a * (theta - b)
    log_c = np.log(c, out=np.full(np.shape(c), -np.inf), where=c > 0)
    log_guess_free = np.log1p(-c)
    log_p = np.logaddexp(log_c, log_guess_free - np.logaddexp(0.0, -z))
    log_q = log_guess_free - np.logaddexp(0.0, z)
    return log_p, log_q


def _log_likelihood(theta: Floats, a: Floats, b: Floats, c: Floats, responses: NDArray[np.int8]) -> Floats:
    """Log-likelihood of each row's responses (examinees, items) at each of its thetas (examinees, points)."""
    log_p, log_q = _log_response_probabilities(theta[:, None, :], a[..., None], b[..., None], c[..., None])
    total: Floats = np.where(responses[..., None] == 1, log_p, log_q).sum(axis=1)
    return total


# --- ability estimation -------------------------------------------------------------------------------------------


def _log_prior(config: CatConfig) -> Floats:
    return -0.5 * ((QUADRATURE - config.prior_mean) / config.prior_sd) ** 2


def _expected_a_posteriori(log_posterior: Floats) -> tuple[Floats, Floats]:
    weights = np.exp(log_posterior - log_posterior.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    mean = weights @ QUADRATURE
    variance = (weights * (QUADRATURE - mean[:, None]) ** 2).sum(axis=1)
    return np.clip(mean, THETA_MIN, THETA_MAX), np.sqrt(variance)


def _slope_and_curvature(
    theta: Floats, a: Floats, b: Floats, c: Floats, responses: NDArray[np.int8]
) -> tuple[Floats, Floats, Floats]:
    """First and second derivative of each row's log-likelihood at its theta, and the test information there."""
    probability, variance, ability_share = _item_terms(theta[:, None], a, b, c)
    guess_share = 1.0 - ability_share
    slope = a * (responses - probability) * ability_share / (1.0 - c)
    # d²/dθ² = a² P*Q* (u c / P² - 1): positive (the log-likelihood convex) where a right answer is mostly a guess
    guessed_right = np.divide(
        responses * guess_share, probability, out=np.zeros_like(probability), where=probability > 0
    )
    curvature = a * a * variance * (guessed_right - 1.0)
    information = a * a * variance * ability_share
    return slope.sum(axis=1), curvature.sum(axis=1), information.sum(axis=1)


def _mode(
    log_density: Floats,
    a: Floats,
    b: Floats,
    c: Floats,
    responses: NDArray[np.int8],
    precision: float,
    prior_mean: float,
) -> tuple[Floats, Floats]:
    """Maximiser within the clamp bounds of log-likelihood - precision/2 (θ - prior_mean)², given that function on
    QUADRATURE (examinees, points), with the test information there.

    The best in-bounds grid point brackets a maximum between its neighbours; Newton steps that stay inside the
    bracket are taken, otherwise the bracket is halved on the slope's sign, so the search always converges
    (the 3PL log-likelihood need not be concave). Should it still end lower than the grid point, the grid point
    stands."""
    start = QUADRATURE[np.argmax(np.where(_GRID_IN_BOUNDS, log_density, -np.inf), axis=1)]
    low = np.maximum(start - _GRID_STEP, THETA_MIN)
    high = np.minimum(start + _GRID_STEP, THETA_MAX)
    theta = start
    for _ in range(_MODE_ITERATIONS):
        slope, curvature, _ = _slope_and_curvature(theta, a, b, c, responses)
        slope -= precision * (theta - prior_mean)
        curvature -= precision
        rising = slope > 0
        low = np.where(rising, theta, low)
        high = np.where(rising, high, theta)
        newton = theta - slope / np.minimum(curvature, -_TINY)
        bracketed = (curvature < 0) & (newton >= low) & (newton <= high)
        updated = np.where(bracketed, newton, 0.5 * (low + high))
        converged = bool(np.all(np.abs(updated - theta) <= _MODE_TOLERANCE))
        theta = updated
        if converged:
            break

    def objective(at: Floats) -> Floats:
        return _log_likelihood(at[:, None], a, b, c, responses)[:, 0] - 0.5 * precision * (at - prior_mean) ** 2

    theta = np.where(objective(theta) >= objective(start), theta, start)
    _, _, information = _slope_and_curvature(theta, a, b, c, responses)
    return theta, information


def _estimate(
    bank: ItemBank, config: CatConfig, items: Indices, responses: NDArray[np.int8], log_likelihood: Floats
) -> tuple[Floats, Floats]:
    """Theta and its standard error per examinee, from the items given (examinees, items; at least one each), the
    responses, and the log-likelihood of those responses on QUADRATURE (examinees, points)."""
    a, b, c = bank.a[items], bank.b[items], bank.c[items]
    if config.estimator is AbilityEstimator.MAP:
        precision = config.prior_sd**-2
        theta, information = _mode(
            log_likelihood + _log_prior(config), a, b, c, responses, precision, config.prior_mean
        )
        return theta, 1.0 / np.sqrt(information + precision)
    theta, se = _expected_a_posteriori(log_likelihood + _log_prior(config))
    if config.estimator is AbilityEstimator.MLE:
        # all right or all wrong: the likelihood rises to the edge of the scale, so EAP stands in
        mixed = responses.min(axis=1) != responses.max(axis=1)
        if mixed.any():
            mode, information = _mode(log_likelihood[mixed], a[mixed], b[mixed], c[mixed], responses[mixed], 0.0, 0.0)
            theta[mixed] = mode
            se[mixed] = 1.0 / np.sqrt(np.maximum(information, _TINY))
    return theta, se


def estimate_ability(bank: ItemBank, config: CatConfig, items: Sequence[int], responses: Sequence[int]) -> Estimate:
    """Theta and its standard error by the configured estimator; without responses, the prior's mean and SD."""
    if not items:
        return Estimate(config.prior_mean, config.prior_sd)
    given = np.asarray(items, dtype=np.intp)[None, :]
    scored = np.asarray(responses, dtype=np.int8)[None, :]
    log_likelihood = _log_likelihood(QUADRATURE[None, :], bank.a[given], bank.b[given], bank.c[given], scored)
    theta, se = _estimate(bank, config, given, scored, log_likelihood)
    return Estimate(float(theta[0]), float(se[0]))


# --- item selection -----------------------------------------------------------------------------------------------


def pool_mask(bank: ItemBank, item_ids: Sequence[str] = (), content_areas: Sequence[str] = ()) -> Mask:
    """The exam's pool within the bank (AdaptiveConfig.pool_item_ids and pool_content_areas; empty = no limit), as
    an `eligible` mask to be combined with the items' status."""
    mask = np.ones(bank.size, dtype=np.bool_)
    if item_ids:
        mask &= np.isin(np.asarray(bank.ids, dtype=object), np.asarray(list(item_ids), dtype=object))
    if content_areas:
        wanted_areas = set(content_areas)
        wanted = [index for index, area in enumerate(bank.content_areas) if area in wanted_areas]
        mask &= np.isin(bank.content_area, wanted)
    return mask


def _exposure_parameters(bank: ItemBank, config: CatConfig, exposure_k: ArrayLike | None) -> Floats | None:
    if config.exposure_control is ExposureControl.NONE:
        return None
    if exposure_k is None:
        raise ValueError("Sympson-Hetter exposure control needs the items' exposure parameters")
    parameters = np.asarray(exposure_k, dtype=np.float64)
    if parameters.shape != (bank.size,):
        raise ValueError(f"exposure_k must have one parameter per item ({bank.size})")
    return parameters


def _blueprint_targets(bank: ItemBank, config: CatConfig) -> Floats | None:
    if not config.content_blueprint:
        return None
    return np.array([config.content_blueprint.get(area, 0.0) for area in bank.content_areas], dtype=np.float64)


def _available(bank: ItemBank, eligible: Mask | None, administered: Sequence[int], set_aside: Sequence[int]) -> Mask:
    mask = np.ones(bank.size, dtype=np.bool_) if eligible is None else np.array(eligible, dtype=np.bool_)
    if mask.shape != (bank.size,):
        raise ValueError(f"eligible must have one entry per item ({bank.size})")
    mask[list(administered)] = False
    mask[list(set_aside)] = False
    return mask


def _pick(scores: Floats, config: CatConfig, rng: np.random.Generator) -> Indices:
    """Per row, the best-scoring item, or under randomesque one drawn uniformly from the k best (fewer when fewer
    than k have a finite score)."""
    best: Indices = np.argmax(scores, axis=1)
    count = min(config.randomesque_k, scores.shape[1])
    if config.selection is SelectionMethod.MAX_INFORMATION or count == 1:
        return best
    # k passes of argmax, best first: for the small k randomesque uses, far cheaper than a partition of the bank
    rows = np.arange(len(scores))
    ranked = np.empty((len(scores), count), dtype=np.intp)
    ranked[:, 0] = best
    remaining = scores.copy()
    for rank in range(1, count):
        remaining[rows, ranked[:, rank - 1]] = -np.inf
        ranked[:, rank] = np.argmax(remaining, axis=1)
    choices = np.isfinite(np.take_along_axis(scores, ranked, axis=1)).sum(axis=1)
    slot = (rng.random(len(scores)) * choices).astype(np.intp)
    drawn: Indices = ranked[rows, slot]
    return drawn


def _choose(
    bank: ItemBank,
    config: CatConfig,
    theta: Floats,
    available: Mask,
    area_counts: Indices,
    rng: np.random.Generator,
    exposure: Floats | None,
) -> tuple[Indices, Indices, Indices]:
    """The next item for each examinee (rows of `available`, (examinees, items), each with at least one item),
    and the (row, item) pairs Sympson-Hetter set aside on the way."""
    examinees = len(theta)
    # unavailable items score -inf; a refused item joins them, so refusal rounds only repeat the pick
    scores = np.where(available, item_information(theta[:, None], bank.a, bank.b, bank.c), -np.inf)
    items_left = available.sum(axis=1)
    targets = _blueprint_targets(bank, config)
    if targets is not None:
        # Kingsbury-Zara: serve the area whose count falls furthest short of its share of the test once this item
        # is in (areas outside the blueprint have share 0, so they serve only when the blueprint's run dry)
        shortfall = targets * (area_counts.sum(axis=1, keepdims=True) + 1) - area_counts
        items_left_per_area = available @ bank.area_indicator
    chosen = np.full(examinees, -1, dtype=np.intp)
    pending = np.arange(examinees)
    set_aside_rows: list[Indices] = []
    set_aside_items: list[Indices] = []
    while pending.size:
        candidates = scores[pending]
        if targets is not None:
            open_shortfall = np.where(items_left_per_area[pending] > 0, shortfall[pending], -np.inf)
            area = np.argmax(open_shortfall, axis=1)
            candidates = np.where(bank.content_area == area[:, None], candidates, -np.inf)
        picked = _pick(candidates, config, rng)
        if exposure is None:
            chosen[pending] = picked
            break
        # the last item left is given whatever its parameter, so exposure control never cuts a test short
        accepted = (rng.random(pending.size) < exposure[picked]) | (items_left[pending] == 1)
        chosen[pending[accepted]] = picked[accepted]
        pending, refused = pending[~accepted], picked[~accepted]
        scores[pending, refused] = -np.inf
        items_left[pending] -= 1
        if targets is not None:
            items_left_per_area[pending, bank.content_area[refused]] -= 1
        set_aside_rows.append(pending)
        set_aside_items.append(refused)
    empty = np.zeros(0, dtype=np.intp)
    return (
        chosen,
        np.concatenate(set_aside_rows) if set_aside_rows else empty,
        np.concatenate(set_aside_items) if set_aside_items else empty,
    )


def select_item(
    bank: ItemBank,
    config: CatConfig,
    theta: float,
    rng: np.random.Generator,
    *,
    administered: Sequence[int] = (),
    set_aside: Sequence[int] = (),
    eligible: Mask | None = None,
    exposure_k: ArrayLike | None = None,
) -> Selection:
    """The next item at `theta`, never one administered, set aside or outside `eligible` (the exam's pool and the
    items' status; None = the whole bank). `exposure_k` is required, and used, under Sympson-Hetter only."""
    available = _available(bank, eligible, administered, set_aside)
    if not available.any():
        return Selection(None, ())
    area_counts = np.bincount(bank.content_area[list(administered)], minlength=len(bank.content_areas))
    chosen, _, refused = _choose(
        bank,
        config,
        np.array([theta], dtype=np.float64),
        available[None, :],
        area_counts[None, :],
        rng,
        _exposure_parameters(bank, config, exposure_k),
    )
    return Selection(int(chosen[0]), tuple(int(item) for item in refused))


# --- stopping and the attempt's step ------------------------------------------------------------------------------


def stop_reason(
    config: CatConfig,
    items_administered: int,
    standard_error: float,
    *,
    items_available: int,
    elapsed_seconds: float = 0.0,
    time_limit_seconds: float = 0.0,
) -> StopReason | None:
    """Why the attempt ends now, or None to go on. A time limit of 0 means untimed."""
    if time_limit_seconds > 0 and elapsed_seconds >= time_limit_seconds:
        return StopReason.TIME_LIMIT
    if (
        items_administered >= config.min_items
        and config.standard_error_target > 0
        and standard_error <= config.standard_error_target
    ):
        return StopReason.SE_TARGET
    if items_administered >= config.max_items:
        return StopReason.MAX_ITEMS
    if items_available == 0:
        return StopReason.POOL_EXHAUSTED
    return None


def next_step(
    bank: ItemBank,
    config: CatConfig,
    state: CatState,
    rng: np.random.Generator,
    *,
    eligible: Mask | None = None,
    exposure_k: ArrayLike | None = None,
    elapsed_seconds: float = 0.0,
    time_limit_seconds: float = 0.0,
) -> Step:
    """Estimate theta from the state's responses (the starting theta before any), then stop or choose the next item.

    The bank must hold every administered item, since the estimate needs their parameters; items no longer
    eligible (retired, outside the pool) are excluded through `eligible`."""
    if state.administered:
        estimate = estimate_ability(bank, config, state.administered, state.responses)
    else:
        estimate = Estimate(config.first_theta, config.prior_sd)
    updated = replace(state, theta=estimate.theta, se=estimate.se)
    available = _available(bank, eligible, state.administered, state.set_aside)
    reason = stop_reason(
        config,
        len(state.administered),
        estimate.se,
        items_available=int(available.sum()),
        elapsed_seconds=elapsed_seconds,
        time_limit_seconds=time_limit_seconds,
    )
    if reason is not None:
        return Step(updated, None, reason)
    area_counts = np.bincount(bank.content_area[list(state.administered)], minlength=len(bank.content_areas))
    chosen, _, refused = _choose(
        bank,
        config,
        np.array([estimate.theta], dtype=np.float64),
        available[None, :],
        area_counts[None, :],
        rng,
        _exposure_parameters(bank, config, exposure_k),
    )
    return Step(replace(updated, set_aside=(*state.set_aside, *(int(item) for item in refused))), int(chosen[0]), None)


def next_form_step(
    bank: ItemBank,
    config: CatConfig,
    state: CatState,
    form: Sequence[int],
    *,
    elapsed_seconds: float = 0.0,
    time_limit_seconds: float = 0.0,
) -> Step:
    """A fixed form's step: the estimate as for an adaptive test, then the form's next item in order, or the end
    after its last item (MAX_ITEMS) or when time runs out."""
    if state.administered:
        estimate = estimate_ability(bank, config, state.administered, state.responses)
    else:
        estimate = Estimate(config.first_theta, config.prior_sd)
    updated = replace(state, theta=estimate.theta, se=estimate.se)
    if time_limit_seconds > 0 and elapsed_seconds >= time_limit_seconds:
        return Step(updated, None, StopReason.TIME_LIMIT)
    if len(state.administered) >= len(form):
        return Step(updated, None, StopReason.MAX_ITEMS if form else StopReason.POOL_EXHAUSTED)
    return Step(updated, form[len(state.administered)], None)


# --- simulation ---------------------------------------------------------------------------------------------------


def _simulate_block(
    bank: ItemBank,
    config: CatConfig,
    true_thetas: Floats,
    rng: np.random.Generator,
    exposure: Floats | None,
    log_response_grids: tuple[Floats, Floats],
) -> SimulationResult:
    """Examinees in lockstep: each round stops those done, then gives every other examinee one more item.
    `log_response_grids` holds every item's log P and log Q on QUADRATURE (items, points)."""
    log_p_grid, log_q_grid = log_response_grids
    examinees, length = len(true_thetas), config.max_items
    available = np.ones((examinees, bank.size), dtype=np.bool_)
    items = np.zeros((examinees, length), dtype=np.intp)
    responses = np.zeros((examinees, length), dtype=np.int8)
    theta = np.full(examinees, config.first_theta)
    se = np.full(examinees, config.prior_sd)
    area_counts = np.zeros((examinees, len(bank.content_areas)), dtype=np.intp)
    log_likelihood = np.zeros((examinees, QUADRATURE.size))
    exposure_counts = np.zeros(bank.size, dtype=np.intp)
    selection_counts = np.zeros(bank.size, dtype=np.intp)
    reasons: list[StopReason | None] = [None] * examinees
    active = np.arange(examinees)
    for step in range(length + 1):  # at step == length every examinee stops on MAX_ITEMS
        remaining = available[active].sum(axis=1)
        going_on = np.ones(active.size, dtype=np.bool_)
        for position, (row, left) in enumerate(zip(active.tolist(), remaining.tolist(), strict=True)):
            reasons[row] = stop_reason(config, step, float(se[row]), items_available=left)
            going_on[position] = reasons[row] is None
        active = active[going_on]
        if not active.size:
            break
        chosen, refused_rows, refused_items = _choose(
            bank, config, theta[active], available[active], area_counts[active], rng, exposure
        )
        available[active[refused_rows], refused_items] = False
        correct = rng.random(active.size) < response_probability(
            true_thetas[active], bank.a[chosen], bank.b[chosen], bank.c[chosen]
        )
        items[active, step] = chosen
        responses[active, step] = correct
        available[active, chosen] = False
        area_counts[active, bank.content_area[chosen]] += 1
        given = np.bincount(chosen, minlength=bank.size)
        exposure_counts += given
        selection_counts += given + np.bincount(refused_items, minlength=bank.size)
        log_likelihood[active] += np.where(correct[:, None], log_p_grid[chosen], log_q_grid[chosen])
        theta[active], se[active] = _estimate(
            bank, config, items[active, : step + 1], responses[active, : step + 1], log_likelihood[active]
        )
    items_used = area_counts.sum(axis=1)
    return SimulationResult(
        thetas=theta,
        standard_errors=se,
        items_used=items_used,
        exposure_counts=exposure_counts,
        selection_counts=selection_counts,
        content_proportions=area_counts / np.maximum(items_used, 1)[:, None],
        stop_reasons=tuple(reason for reason in reasons if reason is not None),
    )


def simulate(
    bank: ItemBank,
    config: CatConfig,
    true_thetas: ArrayLike,
    rng: np.random.Generator,
    exposure_k: ArrayLike | None = None,
) -> SimulationResult:
    """Attempts by simulated examinees of the given true abilities, answering by the model, through the same
    estimation, stopping and selection code as `next_step` (without a time limit)."""
    abilities = np.asarray(true_thetas, dtype=np.float64).ravel()
    exposure = _exposure_parameters(bank, config, exposure_k)
    block = max(1, _SIMULATION_CELLS // max(bank.size, 1))
    # each answer adds its item's row to the examinee's log-likelihood on the grid
    grids = _log_response_probabilities(QUADRATURE, bank.a[:, None], bank.b[:, None], bank.c[:, None])
    parts = [
        _simulate_block(bank, config, abilities[start : start + block], rng, exposure, grids)
        for start in range(0, max(len(abilities), 1), block)
    ]
    return SimulationResult(
        thetas=np.concatenate([part.thetas for part in parts]),
        standard_errors=np.concatenate([part.standard_errors for part in parts]),
        items_used=np.concatenate([part.items_used for part in parts]),
        exposure_counts=np.sum([part.exposure_counts for part in parts], axis=0),
        selection_counts=np.sum([part.selection_counts for part in parts], axis=0),
        content_proportions=np.concatenate([part.content_proportions for part in parts]),
        stop_reasons=tuple(reason for part in parts for reason in part.stop_reasons),
    )


def sympson_hetter_parameters(
    bank: ItemBank,
    config: CatConfig,
    rng: np.random.Generator,
    *,
    simulees: int = 2000,
    iterations: int = 10,
    observed_over: int = 1000,
) -> Floats:
    """Sympson-Hetter exposure parameters K by the classic iteration: simulate `simulees` examinees drawn from the
    prior with the current K (all 1 at first), measure each item's selection rate P(S) and administration rate
    P(A) = P(S) K, and set K = min(1, r / P(S)); stop once max P(A) <= r (at once when no item is that popular), or
    after `iterations` rounds.

    K bounds each item's expected administration rate; the rate observed over n examinees scatters around it with
    standard error sqrt(r (1 - r) / n), and K itself carries a calibration error of relative size about
    sqrt((1 - P(S)) / (P(S) simulees)). So r is not the cap itself: it sits four standard errors for groups of
    `observed_over` examinees below config.max_exposure_rate, enough for the highest rate observed over such a
    group to stay at or under the cap.
    """
    cap = config.max_exposure_rate
    target = cap - _EXPOSURE_MARGIN_Z * math.sqrt(cap * (1.0 - cap) / observed_over)
    if target <= 0:
        raise ValueError("observed_over is too small for a margin under max_exposure_rate")
    calibration = replace(config, exposure_control=ExposureControl.SYMPSON_HETTER)
    parameters = np.ones(bank.size)
    for _ in range(iterations):
        abilities = rng.normal(config.prior_mean, config.prior_sd, simulees)
        result = simulate(bank, calibration, abilities, rng, exposure_k=parameters)
        if result.exposure_rates.max() <= target:
            break
        parameters = np.minimum(1.0, target / np.maximum(result.selection_counts / simulees, _TINY))
    return parameters
