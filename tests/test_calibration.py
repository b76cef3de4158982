"""Item calibration (services/exam/calibration.py): marginal maximum likelihood with EM recovers the parameters that
generated simulated 2PL and 3PL responses, in full designs and in sparse ones like an adaptive test's; items with
too few responses are skipped, degenerate ones stay finite and within bounds; EM never loses ground; bad input is a
ValueError."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from services.exam.calibration import (
    A_BOUNDS,
    B_BOUNDS,
    C_BOUNDS,
    MODELS,
    CalibrationResult,
    ItemParameters,
    Model,
    ResponseData,
    calibrate,
    simulate_responses,
)

# Overflow, a log of 0 or an invalid value anywhere in calibration is a bug, not noise.
pytestmark = pytest.mark.filterwarnings("error")


def _bank(model: Model, n_items: int, rng: np.random.Generator) -> ItemParameters:
    """Parameters like a real bank's: discriminations around 1, difficulties around the mean ability and, under
    3PL, guessing rates of multiple-choice items."""
    guessing = rng.uniform(0.1, 0.3, n_items) if model == "3PL" else np.zeros(n_items)
    return ItemParameters(a=np.exp(rng.normal(0.0, 0.3, n_items)), b=rng.normal(0.0, 1.0, n_items), c=guessing)


def _responses(
    person_index: list[int], item_index: list[int], correct: list[int], n_persons: int, n_items: int
) -> ResponseData:
    return ResponseData(
        np.array(person_index, dtype=np.int64),
        np.array(item_index, dtype=np.int64),
        np.array(correct, dtype=np.int64),
        n_persons=n_persons,
        n_items=n_items,
    )


def _correlation(left: NDArray[np.float64], right: NDArray[np.float64]) -> float:
    return float(np.corrcoef(left, right)[0, 1])


def _rmse(left: NDArray[np.float64], right: NDArray[np.float64]) -> float:
    return float(np.sqrt(np.mean((left - right) ** 2)))


def _assert_within_bounds(parameters: ItemParameters) -> None:
    for values, (low, high) in ((parameters.a, A_BOUNDS), (parameters.b, B_BOUNDS), (parameters.c, C_BOUNDS)):
        assert np.isfinite(values).all()
        assert ((values >= low) & (values <= high)).all()


def _assert_never_decreases(history: tuple[float, ...]) -> None:
    values = np.array(history)
    slack = 1e-9 * np.maximum(1.0, np.abs(values[:-1]))
    assert (np.diff(values) >= -slack).all(), history


# --- recovery ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    model: Model
    n_persons: int
    n_items: int
    items_per_person: int | None
    seed: int
    min_a_correlation: float
    max_b_rmse: float


SCENARIOS = [
    Scenario("2PL", 2000, 40, None, seed=11, min_a_correlation=0.9, max_b_rmse=0.15),
    Scenario("3PL", 3000, 50, None, seed=12, min_a_correlation=0.85, max_b_rmse=0.3),
    # Like an adaptive test: each examinee answers a random third of the bank.
    Scenario("2PL", 3000, 60, 20, seed=13, min_a_correlation=0.85, max_b_rmse=0.2),
    Scenario("3PL", 3000, 60, 20, seed=14, min_a_correlation=0.65, max_b_rmse=0.35),
]


@dataclass(frozen=True)
class Calibrated:
    scenario: Scenario
    truth: ItemParameters
    result: CalibrationResult


@pytest.fixture(
    scope="module",
    params=SCENARIOS,
    ids=lambda scenario: f"{scenario.model}-{scenario.items_per_person or 'all'}-of-{scenario.n_items}",
)
def calibrated(request: pytest.FixtureRequest) -> Calibrated:
    scenario: Scenario = request.param
    rng = np.random.default_rng(scenario.seed)
    truth = _bank(scenario.model, scenario.n_items, rng)
    thetas = rng.normal(0.0, 1.0, scenario.n_persons)
    responses = simulate_responses(truth.a, truth.b, truth.c, thetas, rng, scenario.items_per_person)
    return Calibrated(scenario, truth, calibrate(responses, scenario.model))


def test_calibration_recovers_the_generating_parameters(calibrated: Calibrated) -> None:
    scenario, truth, result = calibrated.scenario, calibrated.truth, calibrated.result
    estimates = result.parameters

    assert result.converged
    assert not result.skipped.any()
    assert _correlation(estimates.b, truth.b) >= 0.95
    assert _correlation(estimates.a, truth.a) >= scenario.min_a_correlation
    assert _rmse(estimates.b, truth.b) <= scenario.max_b_rmse
    if scenario.model == "3PL":
        assert _rmse(estimates.c, truth.c) <= 0.08
    else:
        assert (estimates.c == 0).all()
    _assert_within_bounds(estimates)


def test_standard_errors_are_the_size_of_the_actual_errors(calibrated: Calibrated) -> None:
    truth, result = calibrated.truth, calibrated.result
    for estimate, true_value, error in (
        (result.parameters.a, truth.a, result.standard_errors.a),
        (result.parameters.b, truth.b, result.standard_errors.b),
    ):
        standardised = (estimate - true_value) / error
        assert 0.6 <= np.sqrt(np.mean(standardised**2)) <= 1.6
    if result.model == "2PL":
        assert np.isnan(result.standard_errors.c).all()


def test_em_never_decreases_the_log_posterior_nor_on_real_sizes_the_log_likelihood(calibrated: Calibrated) -> None:
    result = calibrated.result
    assert len(result.log_likelihood_history) == len(result.log_posterior_history) == result.iterations + 1
    assert result.log_likelihood_history[-1] == result.log_likelihood
    _assert_never_decreases(result.log_posterior_history)
    # EM climbs the posterior; with thousands of responses per item the prior's pull is too small to make the
    # marginal likelihood itself go down.
    _assert_never_decreases(result.log_likelihood_history)


# --- skipped and degenerate items ----------------------------------------------------------------------------------


def test_items_with_too_few_responses_keep_their_initial_parameters_and_do_not_sway_the_others() -> None:
    rng = np.random.default_rng(21)
    truth = _bank("2PL", 10, rng)
    full = simulate_responses(truth.a, truth.b, truth.c, rng.normal(0.0, 1.0, 800), rng)
    # Item 3 answered by 20 examinees only, item 7 by none.
    kept = ~(((full.item_index == 3) & (full.person_index >= 20)) | (full.item_index == 7))
    responses = ResponseData(full.person_index[kept], full.item_index[kept], full.correct[kept], 800, 10)
    initial = ItemParameters(a=np.linspace(0.5, 2.0, 10), b=np.linspace(-2.0, 2.0, 10), c=np.full(10, 0.25))

    result = calibrate(responses, "2PL", initial=initial, min_responses_per_item=50)

    expected_skipped = np.zeros(10, dtype=np.bool_)
    expected_skipped[[3, 7]] = True
    np.testing.assert_array_equal(result.skipped, expected_skipped)
    np.testing.assert_array_equal(result.response_counts, [800, 800, 800, 20, 800, 800, 800, 0, 800, 800])
    np.testing.assert_array_equal(result.parameters.a[[3, 7]], initial.a[[3, 7]])
    np.testing.assert_array_equal(result.parameters.b[[3, 7]], initial.b[[3, 7]])
    assert (result.parameters.c == 0).all()  # 2PL has no guessing, whatever the initial parameters said
    assert np.isnan(result.standard_errors.a[[3, 7]]).all()
    assert np.isfinite(result.standard_errors.a[~expected_skipped]).all()
    assert result.converged

    without_item_3 = responses.item_index != 3
    others_alone = calibrate(
        ResponseData(
            responses.person_index[without_item_3],
            responses.item_index[without_item_3],
            responses.correct[without_item_3],
            800,
            10,
        ),
        "2PL",
        initial=initial,
        min_responses_per_item=50,
    )
    np.testing.assert_allclose(result.parameters.a, others_alone.parameters.a, rtol=1e-12)
    np.testing.assert_allclose(result.parameters.b, others_alone.parameters.b, rtol=1e-12)


@pytest.mark.parametrize("model", MODELS)
def test_an_item_everyone_gets_right_or_wrong_stays_finite_and_within_bounds(model: Model) -> None:
    rng = np.random.default_rng(31)
    truth = _bank(model, 8, rng)
    simulated = simulate_responses(truth.a, truth.b, truth.c, rng.normal(0.0, 1.0, 400), rng)
    correct = np.where(simulated.item_index == 0, 1, np.where(simulated.item_index == 1, 0, simulated.correct))
    responses = ResponseData(simulated.person_index, simulated.item_index, correct, 400, 8)

    result = calibrate(responses, model)

    _assert_within_bounds(result.parameters)
    assert result.parameters.b[0] < -3 < 3 < result.parameters.b[1]
    estimated_errors = [result.standard_errors.a, result.standard_errors.b]
    if model == "3PL":
        estimated_errors.append(result.standard_errors.c)
    for errors in estimated_errors:
        assert (np.isfinite(errors) & (errors > 0)).all()
    assert np.isfinite(result.log_likelihood)


def test_3pl_calibration_of_items_stored_under_2pl_estimates_guessing() -> None:
    rng = np.random.default_rng(41)
    truth = _bank("3PL", 12, rng)
    responses = simulate_responses(truth.a, truth.b, truth.c, rng.normal(0.0, 1.0, 500), rng)
    stored_2pl = ItemParameters(a=np.ones(12), b=np.zeros(12), c=np.zeros(12))

    result = calibrate(responses, "3PL", initial=stored_2pl)

    assert (result.parameters.c > 0).all()
    _assert_within_bounds(result.parameters)


def test_calibration_is_deterministic() -> None:
    rng = np.random.default_rng(51)
    truth = _bank("3PL", 6, rng)
    responses = simulate_responses(truth.a, truth.b, truth.c, rng.normal(0.0, 1.0, 300), rng, items_per_person=4)

    first, second = calibrate(responses, "3PL"), calibrate(responses, "3PL")

    for name in ("a", "b", "c"):
        np.testing.assert_array_equal(getattr(first.parameters, name), getattr(second.parameters, name))
    assert first.log_likelihood_history == second.log_likelihood_history


def test_simulated_sparse_designs_give_each_person_distinct_items() -> None:
    rng = np.random.default_rng(61)
    truth = _bank("2PL", 9, rng)

    responses = simulate_responses(truth.a, truth.b, truth.c, rng.normal(0.0, 1.0, 50), rng, items_per_person=4)

    np.testing.assert_array_equal(np.bincount(responses.person_index), np.full(50, 4))
    assert len({(int(p), int(i)) for p, i in zip(responses.person_index, responses.item_index, strict=True)}) == 200


def test_response_data_accepts_booleans_and_keeps_read_only_copies() -> None:
    correct = np.array([True, False])
    responses = ResponseData(np.array([0, 1]), np.array([1, 1]), correct, n_persons=2, n_items=2)

    correct[0] = False
    np.testing.assert_array_equal(responses.correct, [1, 0])
    assert responses.correct.dtype == np.int64
    assert not responses.person_index.flags.writeable


# --- invalid input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _responses([0, 1], [0, 0], [1], 2, 1), "same length, got 2, 2 and 1"),
        (lambda: _responses([0, 2], [0, 0], [1, 0], 2, 1), r"person_index must lie in \[0, 2\), found 2 at 1"),
        (lambda: _responses([0, -1], [0, 0], [1, 0], 2, 1), r"person_index must lie in \[0, 2\), found -1 at 1"),
        (lambda: _responses([0, 1], [0, 3], [1, 0], 2, 3), r"item_index must lie in \[0, 3\), found 3 at 1"),
        (lambda: _responses([0, 1], [0, 0], [1, 2], 2, 1), "correct must be 0 or 1, found 2 at 1"),
        (lambda: _responses([0, 1], [0, 0], [-1, 0], 2, 1), "correct must be 0 or 1, found -1 at 0"),
        (lambda: _responses([0, 0], [1, 1], [1, 0], 2, 2), "person 0 answered item 1 more than once"),
        (lambda: _responses([], [], [], 0, 1), "n_persons and n_items must be at least 1"),
        (
            lambda: ResponseData(np.array([0.0]), np.array([0]), np.array([1]), 1, 1),
            "person_index must hold integers, got dtype float64",
        ),
        (
            lambda: ResponseData(np.array([[0]]), np.array([0]), np.array([1]), 1, 1),
            r"person_index must be one-dimensional, got shape \(1, 1\)",
        ),
    ],
)
def test_invalid_responses_are_refused_with_a_clear_message(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


_VALID = _responses([0, 1, 1], [0, 0, 1], [1, 0, 1], 2, 2)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"model": "1PL"}, "model must be one of 2PL, 3PL, got '1PL'"),
        ({"max_iterations": 0}, "max_iterations must be at least 1"),
        ({"tolerance": 0.0}, "tolerance must be positive"),
        ({"min_responses_per_item": 0}, "min_responses_per_item must be at least 1"),
        (
            {"initial": ItemParameters(a=np.ones(3), b=np.zeros(3), c=np.zeros(3))},
            "initial parameters must cover the 2 items, got 3",
        ),
        ({"initial": ItemParameters(a=np.ones(2), b=np.array([0.0, np.nan]), c=np.zeros(2))}, "must be finite"),
        ({"initial": ItemParameters(a=np.array([1.0, 0.0]), b=np.zeros(2), c=np.zeros(2))}, "a > 0 and c in"),
    ],
)
def test_invalid_calibration_arguments_are_refused(arguments: dict[str, object], message: str) -> None:
    model = arguments.pop("model", "2PL")
    with pytest.raises(ValueError, match=message):
        calibrate(_VALID, model, **arguments)  # type: ignore[arg-type]


def test_item_parameters_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="a, b and c must be one-dimensional and of one length"):
        ItemParameters(a=np.ones(2), b=np.zeros(3), c=np.zeros(2))


@pytest.mark.parametrize("items_per_person", [0, 4])
def test_simulating_more_items_per_person_than_the_bank_holds_is_refused(items_per_person: int) -> None:
    rng = np.random.default_rng(71)
    with pytest.raises(ValueError, match=r"items_per_person must lie in \[1, 3\]"):
        simulate_responses(np.ones(3), np.zeros(3), np.zeros(3), np.zeros(5), rng, items_per_person)


# --- property ------------------------------------------------------------------------------------------------------


@st.composite
def small_response_sets(draw: st.DrawFn) -> ResponseData:
    """Any small, possibly very sparse or one-sided set of responses."""
    n_persons = draw(st.integers(1, 25))
    n_items = draw(st.integers(1, 6))
    cells = n_persons * n_items
    answered = np.array(draw(st.lists(st.booleans(), min_size=cells, max_size=cells)), dtype=np.bool_)
    correct = np.array(draw(st.lists(st.booleans(), min_size=cells, max_size=cells)), dtype=np.int64)
    person_index, item_index = np.divmod(np.flatnonzero(answered), n_items)
    return ResponseData(person_index, item_index, correct[answered], n_persons=n_persons, n_items=n_items)


@settings(max_examples=100, deadline=None)
@given(responses=small_response_sets(), model=st.sampled_from(MODELS))
def test_any_small_response_set_calibrates_to_finite_parameters_within_bounds(
    responses: ResponseData, model: Model
) -> None:
    result = calibrate(responses, model, min_responses_per_item=1)

    _assert_within_bounds(result.parameters)
    np.testing.assert_array_equal(result.skipped, result.response_counts == 0)
    assert (np.isfinite(result.standard_errors.b) == ~result.skipped).all()
    assert np.isfinite(result.log_likelihood)
    assert result.log_likelihood <= 0
    _assert_never_decreases(result.log_posterior_history)
