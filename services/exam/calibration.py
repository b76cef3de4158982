"""Item calibration, pure (no I/O, deterministic): re-estimates 2PL or 3PL item parameters from stored responses by
marginal maximum likelihood with the EM algorithm of Bock and Aitkin (1981), so a job can write a new parameter
version.

The model is P(correct | theta) = c + (1 - c) / (1 + exp(-a (theta - b))), with c = 0 under 2PL. Abilities are
integrated out over a fixed N(0, 1) on a grid of quadrature nodes; fixing that distribution is what identifies the
scale (its origin and unit), so estimates from different runs are comparable without linking.

Responses are sparse: under adaptive testing each examinee sees a few items of the bank, and a response that was
never given is simply absent. Marginal maximum likelihood treats it as missing at random, which holds for an
adaptive test because it chooses each item from responses already observed.

Estimates are posterior modes rather than pure maximum likelihood, because few or one-sided responses (an item
everyone answers correctly) would send pure estimates to infinity: log a ~ N(0, 0.5^2), b ~ N(0, 3^2), and under 3PL
c ~ Beta(5, 17), whose mode 0.2 is the usual guessing rate of a multiple-choice item. Estimates also stay within
A_BOUNDS, B_BOUNDS and C_BOUNDS. What EM increases at every iteration is therefore the log posterior, the marginal
log-likelihood plus the log prior.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

Model = Literal["2PL", "3PL"]
MODELS: tuple[Model, ...] = ("2PL", "3PL")

A_BOUNDS = (0.2, 4.0)
B_BOUNDS = (-5.0, 5.0)
C_BOUNDS = (0.0, 0.5)
LOG_A_PRIOR = (0.0, 0.5)  # mean and standard deviation of log a
B_PRIOR_SD = 3.0
C_PRIOR = (5.0, 17.0)  # Beta(alpha, beta)
# Below about a hundred responses even a 2PL estimate says more about the prior than about the item.
DEFAULT_MIN_RESPONSES_PER_ITEM = 100

# Rectangular quadrature: the posterior of an examinee who answered 60 items has a standard deviation near 0.3,
# which nodes 0.25 apart integrate to far better than the sampling error of any estimate. Each node weighs the N(0, 1)
# density there, normalised to sum to 1.
QUADRATURE_NODES: NDArray[np.float64] = np.linspace(-5.0, 5.0, 41)
_LOG_NODE_WEIGHTS: NDArray[np.float64] = -0.5 * QUADRATURE_NODES**2 - math.log(
    float(np.exp(-0.5 * QUADRATURE_NODES**2).sum())
)

# Each M-step needs only to improve on the last parameters for EM to climb (generalised EM); a few Fisher scoring
# steps from the previous solution come close to the maximum, and halving a step that does not improve keeps every
# step an improvement.
_NEWTON_STEPS = 4
_STEP_HALVINGS = 10
# A logistic curve's marginal probability over N(0, 1) is about that of a flatter curve: the probit approximation
# logistic(x) ~ Phi(x / 1.702) gives a slope 1 / sqrt(1 + 1 / 1.702^2) at a = 1, used for starting difficulties.
_MARGINAL_SLOPE_AT_UNIT_A = 1.0 / math.sqrt(1.0 + 1.0 / 1.702**2)
# Starting difficulties from proportions correct: a proportion of 0 or 1 would give an infinite logit.
_STARTING_PROPORTION_BOUNDS = (0.01, 0.99)


@dataclass(frozen=True)
class ResponseData:
    """Scored responses, one entry per response in three parallel arrays: who answered (0..n_persons-1), which
    item (0..n_items-1) and whether correctly (0 or 1, or booleans). Each person answers an item at most once.
    Construction checks all of it (ValueError) and keeps read-only int64 copies."""

    person_index: NDArray[np.int64]
    item_index: NDArray[np.int64]
    correct: NDArray[np.int64]
    n_persons: int
    n_items: int

    def __post_init__(self) -> None:
        if self.n_persons < 1 or self.n_items < 1:
            raise ValueError(f"n_persons and n_items must be at least 1, got {self.n_persons} and {self.n_items}")
        columns = {"person_index": self.person_index, "item_index": self.item_index, "correct": self.correct}
        for name, values in columns.items():
            column = np.asarray(values)
            if column.ndim != 1:
                raise ValueError(f"{name} must be one-dimensional, got shape {column.shape}")
            booleans_allowed = name == "correct"
            if not (np.issubdtype(column.dtype, np.integer) or (booleans_allowed and column.dtype == np.bool_)):
                raise ValueError(f"{name} must hold integers, got dtype {column.dtype}")
            stored = column.astype(np.int64)
            stored.flags.writeable = False
            object.__setattr__(self, name, stored)
        lengths = [len(self.person_index), len(self.item_index), len(self.correct)]
        if len(set(lengths)) != 1:
            raise ValueError(
                "person_index, item_index and correct must have the same length, got "
                f"{lengths[0]}, {lengths[1]} and {lengths[2]}"
            )
        _check_range("person_index", self.person_index, self.n_persons)
        _check_range("item_index", self.item_index, self.n_items)
        not_binary = np.flatnonzero((self.correct != 0) & (self.correct != 1))
        if not_binary.size:
            raise ValueError(f"correct must be 0 or 1, found {self.correct[not_binary[0]]} at {not_binary[0]}")
        pairs = self.person_index * self.n_items + self.item_index
        unique_pairs, first_positions, occurrences = np.unique(pairs, return_index=True, return_counts=True)
        if unique_pairs.size < pairs.size:
            repeated = first_positions[np.argmax(occurrences > 1)]
            raise ValueError(
                f"person {self.person_index[repeated]} answered item {self.item_index[repeated]} more than once"
            )


def _check_range(name: str, indices: NDArray[np.int64], size: int) -> None:
    outside = np.flatnonzero((indices < 0) | (indices >= size))
    if outside.size:
        raise ValueError(f"{name} must lie in [0, {size}), found {indices[outside[0]]} at {outside[0]}")


@dataclass(frozen=True)
class ItemParameters:
    """Parameters of each item of a bank, one entry per item in three parallel arrays."""

    a: NDArray[np.float64]
    b: NDArray[np.float64]
    c: NDArray[np.float64]

    def __post_init__(self) -> None:
        shapes = {np.shape(self.a), np.shape(self.b), np.shape(self.c)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"a, b and c must be one-dimensional and of one length, got shapes {sorted(shapes)}")


@dataclass(frozen=True)
class CalibrationResult:
    """What calibrate estimated. Standard errors come from the expected information of each item's M-step, prior
    included, at the solution: they ignore the uncertainty of the abilities and so understate somewhat. They are
    NaN where nothing was estimated: c under 2PL and every parameter of a skipped item.

    log_likelihood_history and log_posterior_history hold one value per parameter set EM visited, the starting one
    first and the returned one last (iterations + 1 values); EM never decreases the log posterior."""

    model: Model
    parameters: ItemParameters
    standard_errors: ItemParameters
    response_counts: NDArray[np.int64]
    skipped: NDArray[np.bool_]
    log_likelihood: float
    log_likelihood_history: tuple[float, ...]
    log_posterior_history: tuple[float, ...]
    iterations: int
    converged: bool


def calibrate(
    responses: ResponseData,
    model: Model,
    *,
    max_iterations: int = 200,
    tolerance: float = 1e-4,
    initial: ItemParameters | None = None,
    min_responses_per_item: int = DEFAULT_MIN_RESPONSES_PER_ITEM,
    on_iteration: Callable[[int, float], None] | None = None,
) -> CalibrationResult:
    """Estimates every item's parameters under `model` by marginal maximum likelihood with EM, stopping when no
    parameter (on the a, b and c scales) moves by `tolerance` or more in an iteration, or after `max_iterations`.

    An item with fewer than `min_responses_per_item` responses is skipped: it keeps its `initial` parameters (with
    c = 0 under 2PL) and its responses are left out, so a few answers to a new item do not sway the others. Without
    `initial`, estimation starts from a = 1, c at the prior's mode and b from the proportion correct, and a skipped
    item gets these starting values.

    `on_iteration`, when given, is called after each iteration with the iterations run so far and the largest
    parameter change of the last one (what `tolerance` is compared with), so a caller can report progress; an
    exception it raises ends the calibration and propagates, which is how a caller stops a long run."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be at least 1, got {max_iterations}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    if min_responses_per_item < 1:
        raise ValueError(f"min_responses_per_item must be at least 1, got {min_responses_per_item}")
    response_counts = np.bincount(responses.item_index, minlength=responses.n_items).astype(np.int64)
    skipped = response_counts < min_responses_per_item
    start = _starting_parameters(responses, model, initial)
    estimated = np.flatnonzero(~skipped)

    kept = ~skipped[responses.item_index]
    position_among_estimated = np.full(responses.n_items, -1, dtype=np.int64)
    position_among_estimated[estimated] = np.arange(estimated.size)
    observations = _Observations(
        person_index=responses.person_index[kept],
        # Each response's item and score in one code, 2 * item + correct, so one bincount splits both.
        codes=2 * position_among_estimated[responses.item_index[kept]] + responses.correct[kept],
        n_persons=responses.n_persons,
    )
    current = _Estimates.clipped(start.a[estimated], start.b[estimated], start.c[estimated], model)

    expected = _expectation(current, observations)
    likelihood_history = [expected.log_likelihood]
    posterior_history = [expected.log_likelihood + current.total_log_prior(model)]
    iterations = 0
    converged = estimated.size == 0  # nothing to estimate
    while not converged and iterations < max_iterations:
        updated = _maximisation(current, expected, model)
        change = current.largest_change_to(updated)
        converged = change < tolerance
        current = updated
        iterations += 1
        expected = _expectation(current, observations)
        likelihood_history.append(expected.log_likelihood)
        posterior_history.append(expected.log_likelihood + current.total_log_prior(model))
        if on_iteration is not None:
            on_iteration(iterations, change)

    estimated_errors = current.standard_errors(expected, model)
    parameters = ItemParameters(a=start.a.copy(), b=start.b.copy(), c=start.c.copy())
    standard_errors = ItemParameters(
        a=np.full(responses.n_items, np.nan), b=np.full(responses.n_items, np.nan), c=np.full(responses.n_items, np.nan)
    )
    parameters.a[estimated], parameters.b[estimated], parameters.c[estimated] = current.a, current.b, current.c
    standard_errors.a[estimated], standard_errors.b[estimated] = estimated_errors[:, 0], estimated_errors[:, 1]
    if model == "3PL":
        standard_errors.c[estimated] = estimated_errors[:, 2]
    return CalibrationResult(
        model=model,
        parameters=parameters,
        standard_errors=standard_errors,
        response_counts=response_counts,
        skipped=skipped,
        log_likelihood=expected.log_likelihood,
        log_likelihood_history=tuple(likelihood_history),
        log_posterior_history=tuple(posterior_history),
        iterations=iterations,
        converged=converged,
    )


def simulate_responses(
    a: NDArray[np.float64],
    b: NDArray[np.float64],
    c: NDArray[np.float64],
    thetas: NDArray[np.float64],
    rng: np.random.Generator,
    items_per_person: int | None = None,
) -> ResponseData:
    """Responses of examinees of ability `thetas` to items (a, b, c) drawn from the model with `rng`: every item
    for every person, or `items_per_person` items chosen at random for each person, as an adaptive test would."""
    n_items, n_persons = len(a), len(thetas)
    if items_per_person is None:
        person_index = np.repeat(np.arange(n_persons), n_items)
        item_index = np.tile(np.arange(n_items), n_persons)
    else:
        if not 1 <= items_per_person <= n_items:
            raise ValueError(f"items_per_person must lie in [1, {n_items}], got {items_per_person}")
        person_index = np.repeat(np.arange(n_persons), items_per_person)
        item_index = np.argsort(rng.random((n_persons, n_items)), axis=1)[:, :items_per_person].ravel()
    log_probability = _log_probability_correct(a[item_index], c[item_index], thetas[person_index] - b[item_index])
    correct = (rng.random(person_index.size) < np.exp(log_probability)).astype(np.int64)
    return ResponseData(person_index, item_index, correct, n_persons=n_persons, n_items=n_items)


def _log_probability_correct(
    a: NDArray[np.float64], c: NDArray[np.float64], distance: NDArray[np.float64]
) -> NDArray[np.float64]:
    """log P(correct) for abilities at `distance` from b, computed as log sigma(z) + log(1 + c exp(-z)), which
    neither overflows nor takes the log of 0 at c = 0."""
    slope_distance = a * distance
    return -np.logaddexp(0.0, -slope_distance) + np.log1p(c * np.exp(-slope_distance))


def _starting_parameters(responses: ResponseData, model: Model, initial: ItemParameters | None) -> ItemParameters:
    n_items = responses.n_items
    starting_c = (C_PRIOR[0] - 1) / (C_PRIOR[0] + C_PRIOR[1] - 2) if model == "3PL" else 0.0
    if initial is None:
        counts = np.bincount(responses.item_index, minlength=n_items)
        right = np.bincount(responses.item_index, weights=responses.correct, minlength=n_items)
        proportion = (right + 0.5) / (counts + 1.0)
        above_guessing = np.clip((proportion - starting_c) / (1 - starting_c), *_STARTING_PROPORTION_BOUNDS)
        b = np.log((1 - above_guessing) / above_guessing) / _MARGINAL_SLOPE_AT_UNIT_A
        return ItemParameters(a=np.ones(n_items), b=np.clip(b, *B_BOUNDS), c=np.full(n_items, starting_c))
    a, b, c = (np.asarray(values, dtype=np.float64) for values in (initial.a, initial.b, initial.c))
    if a.shape != (n_items,):
        raise ValueError(f"initial parameters must cover the {n_items} items, got {a.shape[0]}")
    if not (np.isfinite(a).all() and np.isfinite(b).all() and np.isfinite(c).all()):
        raise ValueError("initial parameters must be finite")
    if not ((a > 0).all() and (c >= 0).all() and (c < 1).all()):
        raise ValueError("initial parameters must have a > 0 and c in [0, 1)")
    # An item stored under 2PL (c = 0) starts its 3PL estimation at the prior's mode, where the prior's density is
    # positive.
    return ItemParameters(
        a=a.copy(), b=b.copy(), c=np.where(c > 0, c, starting_c) if model == "3PL" else np.zeros(n_items)
    )


@dataclass(frozen=True)
class _Observations:
    person_index: NDArray[np.int64]
    codes: NDArray[np.int64]
    n_persons: int


@dataclass(frozen=True)
class _Expected:
    """The E-step: the marginal log-likelihood, and per item and node the expected number of examinees who
    answered the item (total) and answered it correctly (right)."""

    log_likelihood: float
    right: NDArray[np.float64]
    total: NDArray[np.float64]


@dataclass(frozen=True)
class _Estimates:
    """Parameters of the estimated items, with log a rather than a: its prior is normal there, and no step in log a
    can make a negative."""

    log_a: NDArray[np.float64]
    b: NDArray[np.float64]
    c: NDArray[np.float64]

    @staticmethod
    def clipped(a: NDArray[np.float64], b: NDArray[np.float64], c: NDArray[np.float64], model: Model) -> _Estimates:
        log_a = np.clip(np.log(a), math.log(A_BOUNDS[0]), math.log(A_BOUNDS[1]))
        return _Estimates(log_a, np.clip(b, *B_BOUNDS), np.clip(c, *C_BOUNDS) if model == "3PL" else np.zeros_like(c))

    @property
    def a(self) -> NDArray[np.float64]:
        return np.exp(self.log_a)

    def largest_change_to(self, other: _Estimates) -> float:
        changes = (np.abs(other.a - self.a), np.abs(other.b - self.b), np.abs(other.c - self.c))
        return float(max(change.max() for change in changes))

    def log_prior(self, model: Model) -> NDArray[np.float64]:
        mean, sd = LOG_A_PRIOR
        log_prior = -0.5 * ((self.log_a - mean) / sd) ** 2 - 0.5 * (self.b / B_PRIOR_SD) ** 2
        if model == "3PL":
            log_prior = log_prior + (C_PRIOR[0] - 1) * np.log(self.c) + (C_PRIOR[1] - 1) * np.log1p(-self.c)
        return log_prior

    def total_log_prior(self, model: Model) -> float:
        return float(self.log_prior(model).sum())

    def log_probabilities(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """log P(correct) and log P(incorrect) per item (rows) and quadrature node (columns)."""
        distance = QUADRATURE_NODES[None, :] - self.b[:, None]
        log_right = _log_probability_correct(self.a[:, None], self.c[:, None], distance)
        log_wrong = np.log1p(-self.c)[:, None] - np.logaddexp(0.0, self.a[:, None] * distance)
        return log_right, log_wrong

    def expected_log_posterior(self, expected: _Expected, model: Model) -> NDArray[np.float64]:
        """Per item, what the M-step maximises: the expected complete-data log-likelihood plus the log prior."""
        log_right, log_wrong = self.log_probabilities()
        likelihood: NDArray[np.float64] = (
            expected.right * log_right + (expected.total - expected.right) * log_wrong
        ).sum(axis=1)
        return likelihood + self.log_prior(model)

    def score_and_information(
        self, expected: _Expected, model: Model
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Gradient of expected_log_posterior in (log a, b[, c]) per item, and its expected information (the
        Fisher information of the expected counts plus the prior's curvature), which is positive definite."""
        a = self.a[:, None]
        c = self.c[:, None]
        slope_distance = a * (QUADRATURE_NODES[None, :] - self.b[:, None])
        rising = np.exp(-np.logaddexp(0.0, -slope_distance))  # the logistic part, sigma(z)
        falling = np.exp(-np.logaddexp(0.0, slope_distance))  # 1 - sigma(z), without cancellation
        log_right, log_wrong = self.log_probabilities()
        logistic_slope = (1 - c) * rising * falling
        derivatives = [logistic_slope * slope_distance, -logistic_slope * a]
        if model == "3PL":
            derivatives.append(falling)
        slopes = np.stack(derivatives, axis=1)  # item, parameter, node
        inverse_variance = np.exp(-(log_right + log_wrong))
        residual = expected.right - expected.total * np.exp(log_right)
        score: NDArray[np.float64] = np.einsum("ik,ipk->ip", residual * inverse_variance, slopes)
        information: NDArray[np.float64] = np.einsum(
            "ik,ipk,iqk->ipq", expected.total * inverse_variance, slopes, slopes
        )
        mean, sd = LOG_A_PRIOR
        score[:, 0] -= (self.log_a - mean) / sd**2
        information[:, 0, 0] += 1 / sd**2
        score[:, 1] -= self.b / B_PRIOR_SD**2
        information[:, 1, 1] += 1 / B_PRIOR_SD**2
        if model == "3PL":
            score[:, 2] += (C_PRIOR[0] - 1) / self.c - (C_PRIOR[1] - 1) / (1 - self.c)
            information[:, 2, 2] += (C_PRIOR[0] - 1) / self.c**2 + (C_PRIOR[1] - 1) / (1 - self.c) ** 2
        return score, information

    def stepped(self, step: NDArray[np.float64], fraction: float) -> _Estimates:
        """These parameters moved by `fraction` of `step`, held within bounds. c moves at most halfway to its
        lower bound, where the Beta prior's density vanishes, so it never reaches it."""
        log_a = np.clip(self.log_a + fraction * step[:, 0], math.log(A_BOUNDS[0]), math.log(A_BOUNDS[1]))
        b = np.clip(self.b + fraction * step[:, 1], *B_BOUNDS)
        c = self.c
        if step.shape[1] == 3:
            c = np.clip(self.c + fraction * step[:, 2], (self.c + C_BOUNDS[0]) / 2, C_BOUNDS[1])
        return _Estimates(log_a, b, c)

    def where(self, chosen: NDArray[np.bool_], other: _Estimates) -> _Estimates:
        """`other`'s parameters for the chosen items, these for the rest."""
        return _Estimates(
            np.where(chosen, other.log_a, self.log_a),
            np.where(chosen, other.b, self.b),
            np.where(chosen, other.c, self.c),
        )

    def standard_errors(self, expected: _Expected, model: Model) -> NDArray[np.float64]:
        """Per item, the standard errors of a, b[, c] from the inverse of the expected information."""
        _, information = self.score_and_information(expected, model)
        errors = np.sqrt(np.diagonal(np.linalg.inv(information), axis1=1, axis2=2))
        # The information is about log a; the delta method turns it into a's standard error.
        errors[:, 0] *= self.a
        return errors


def _expectation(estimates: _Estimates, observations: _Observations) -> _Expected:
    """Posterior weights of each person over the nodes given their responses, then the expected counts. Works one
    node at a time with bincount over the sparse responses: memory grows with the responses, not persons x items."""
    log_right, log_wrong = estimates.log_probabilities()
    n_items, n_nodes = log_right.shape
    # Node by code: the log-probability of each (item, correct) code at each node.
    log_response_probability = np.empty((n_nodes, 2 * n_items))
    log_response_probability[:, 0::2] = log_wrong.T
    log_response_probability[:, 1::2] = log_right.T

    log_joint = np.empty((n_nodes, observations.n_persons))
    for node in range(n_nodes):
        log_joint[node] = _LOG_NODE_WEIGHTS[node] + np.bincount(
            observations.person_index,
            weights=log_response_probability[node][observations.codes],
            minlength=observations.n_persons,
        )
    peak = log_joint.max(axis=0)
    log_marginal = peak + np.log(np.exp(log_joint - peak).sum(axis=0))
    posterior = np.exp(log_joint - log_marginal)

    counts = np.empty((n_nodes, 2 * n_items))
    for node in range(n_nodes):
        counts[node] = np.bincount(
            observations.codes, weights=posterior[node][observations.person_index], minlength=2 * n_items
        )
    right = np.ascontiguousarray(counts[:, 1::2].T)
    return _Expected(
        log_likelihood=float(log_marginal.sum()), right=right, total=np.ascontiguousarray(counts[:, 0::2].T) + right
    )


def _maximisation(estimates: _Estimates, expected: _Expected, model: Model) -> _Estimates:
    """Fisher scoring on every item at once; an item whose step does not improve its objective tries half the step,
    and keeps its parameters if no fraction improves it."""
    objective = estimates.expected_log_posterior(expected, model)
    for _ in range(_NEWTON_STEPS):
        score, information = estimates.score_and_information(expected, model)
        step = np.linalg.solve(information, score[..., None])[..., 0].astype(np.float64, copy=False)
        improved = np.zeros(objective.shape, dtype=np.bool_)
        moved = estimates
        fraction = 1.0
        for _ in range(_STEP_HALVINGS):
            candidate = estimates.stepped(step, fraction)
            candidate_objective = candidate.expected_log_posterior(expected, model)
            newly_improved = ~improved & (candidate_objective >= objective)
            moved = moved.where(newly_improved, candidate)
            objective = np.where(newly_improved, candidate_objective, objective)
            improved |= newly_improved
            if improved.all():
                break
            fraction /= 2
        estimates = moved
    return estimates
