"""Benchmark: what the adaptive testing engine costs per answer, and how fast it simulates examinees.

    .venv/bin/python -m tests.bench.bench_cat [--attempts 200] [--simulees 2000]

    next item     `next_step` on a 10,000-item 3PL bank with a three-area blueprint: estimate theta from the answers
                  so far, check the stopping rules, choose the next item; what the exam service pays after every
                  answer. Timed at several points of a 30-item attempt (the column is the number of answers
                  before the call) and over all 30, median and 99th percentile in microseconds; target p99 <= 2000 us
                  (a per-point p99 rests on --attempts calls only, so it shows the host's hiccups). One row per
                  estimator, and one with randomesque selection under Sympson-Hetter (every K = 0.5, so a
                  selection is refused half the time and the refusal loop runs about twice).
    simulation    `simulate` with the exam defaults (SE target 0.3, 5 to 30 items, the blueprint) on banks of 300
                  and 10,000 items (--simulees examinees, a quarter as many on the larger bank): simulated
                  examinees per second and mean test length.
    calibration   `sympson_hetter_parameters` on the 300-item bank with its defaults (2000 simulees, 10 rounds).

Attempts of the different configurations take turns, so the host's speed drifting (shared 2-core hosts) weighs on
all of them alike. Banks: a ~ U(0.8, 2.0), b ~ N(0, 1), c ~ U(0, 0.25), areas 40/35/25%.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from dataclasses import dataclass, replace

import numpy as np

from services.exam.cat import (
    AbilityEstimator,
    CatConfig,
    CatState,
    ExposureControl,
    ItemBank,
    SelectionMethod,
    next_step,
    response_probability,
    simulate,
    sympson_hetter_parameters,
)

AREAS = ("algebra", "geometry", "statistics")
BLUEPRINT = {"algebra": 0.40, "geometry": 0.35, "statistics": 0.25}
POINTS = (0, 1, 5, 10, 20, 29)
TARGET_P99_US = 2000.0


@dataclass(frozen=True)
class _Setup:
    name: str
    config: CatConfig
    exposure_k: float | None = None


def _bank(size: int, seed: int) -> ItemBank:
    rng = np.random.default_rng(seed)
    return ItemBank(
        ids=[f"item-{index}" for index in range(size)],
        a=rng.uniform(0.8, 2.0, size),
        b=rng.normal(0.0, 1.0, size),
        c=rng.uniform(0.0, 0.25, size),
        content_area=rng.choice(len(AREAS), size, p=[BLUEPRINT[area] for area in AREAS]),
        content_areas=AREAS,
    )


def _setups(standard_error_target: float) -> list[_Setup]:
    base = CatConfig(content_blueprint=BLUEPRINT, standard_error_target=standard_error_target)
    return [
        _Setup("EAP", replace(base, estimator=AbilityEstimator.EAP)),
        _Setup("MAP", replace(base, estimator=AbilityEstimator.MAP)),
        _Setup("MLE", replace(base, estimator=AbilityEstimator.MLE)),
        _Setup(
            "EAP, randomesque + S-H",
            replace(base, selection=SelectionMethod.RANDOMESQUE, exposure_control=ExposureControl.SYMPSON_HETTER),
            exposure_k=0.5,
        ),
    ]


def _percentile(durations: list[float], fraction: float) -> float:
    ordered = sorted(durations)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def _time_attempt(bank: ItemBank, setup: _Setup, rng: np.random.Generator, durations: dict[int, list[float]]) -> None:
    """One 30-item attempt of a simulee drawn from the prior, each `next_step` call timed on its own."""
    exposure_k = None if setup.exposure_k is None else np.full(bank.size, setup.exposure_k)
    true_theta = rng.normal()
    state = CatState.start(setup.config)
    while True:
        answered = len(state.administered)
        started = time.perf_counter_ns()
        step = next_step(bank, setup.config, state, rng, exposure_k=exposure_k)
        durations[answered].append((time.perf_counter_ns() - started) / 1000)
        if step.item is None:
            return
        correct = rng.random() < response_probability(
            true_theta, bank.a[step.item], bank.b[step.item], bank.c[step.item]
        )
        state = step.state.answered(step.item, bool(correct))


def _next_item_table(attempts: int) -> list[str]:
    bank = _bank(10_000, seed=1)
    setups = _setups(standard_error_target=0.0)  # no early stop: every attempt reaches 30 items
    results: dict[str, dict[int, list[float]]] = {
        setup.name: {answered: [] for answered in range(31)} for setup in setups
    }
    rng = np.random.default_rng(2)
    for setup in setups:  # one untimed attempt each: the first calls pay for imports and allocations
        _time_attempt(bank, setup, rng, {answered: [] for answered in range(31)})
    gc.collect()
    for attempt in range(attempts):
        for setup in setups[:: 1 if attempt % 2 else -1]:
            _time_attempt(bank, setup, rng, results[setup.name])
    header = "".join(f"{f'after {point}':>15}" for point in POINTS)
    lines = [
        f"next item (estimate + stop check + selection), 10,000-item bank, {attempts} attempts of 30 items each,",
        "p50 / p99 in us by answers given before the call",
        "",
        f"{'configuration':<24}{header}{'all 30 calls':>15}",
    ]
    for setup in setups:
        durations = results[setup.name]
        cells = "".join(
            f"{f'{_percentile(durations[point], 0.5):.0f} / {_percentile(durations[point], 0.99):.0f}':>15}"
            for point in POINTS
        )
        every_call = [duration for answered in range(30) for duration in durations[answered]]
        overall = f"{_percentile(every_call, 0.5):.0f} / {_percentile(every_call, 0.99):.0f}"
        lines.append(f"{setup.name:<24}{cells}{overall:>15}")
    worst = max(
        _percentile([duration for answered in range(30) for duration in results[setup.name][answered]], 0.99)
        for setup in setups
    )
    lines.append(f"p99 over all 30 calls, worst configuration: {worst:.0f} us (target {TARGET_P99_US:.0f} us)")
    return lines


def _simulation_table(simulees: int) -> list[str]:
    lines = [
        "simulation (SE target 0.3, 5-30 items, blueprint), simulees drawn from N(0, 1)",
        "",
        f"{'bank':>7}  {'configuration':<24}{'simulees':>9}{'seconds':>9}{'per second':>12}{'mean items':>12}",
    ]
    for size, count in ((300, simulees), (10_000, max(simulees // 4, 1))):
        bank = _bank(size, seed=3)
        for setup in _setups(standard_error_target=0.3):
            rng = np.random.default_rng(4)
            thetas = rng.normal(size=count)
            exposure_k = None if setup.exposure_k is None else np.full(size, setup.exposure_k)
            gc.collect()
            started = time.perf_counter()
            result = simulate(bank, setup.config, thetas, rng, exposure_k=exposure_k)
            seconds = time.perf_counter() - started
            lines.append(
                f"{size:>7}  {setup.name:<24}{count:>9}{seconds:>9.2f}{count / seconds:>12.0f}"
                f"{result.items_used.mean():>12.1f}"
            )
    bank = _bank(300, seed=3)
    config = CatConfig(content_blueprint=BLUEPRINT, exposure_control=ExposureControl.SYMPSON_HETTER)
    started = time.perf_counter()
    sympson_hetter_parameters(bank, config, np.random.default_rng(5))
    lines += [
        "",
        f"Sympson-Hetter calibration, 300 items (2000 simulees x 10 rounds): {time.perf_counter() - started:.1f} s",
    ]
    return lines


def run(attempts: int, simulees: int) -> str:
    lines = [f"adaptive testing engine, {os.cpu_count()} CPUs", ""]
    lines += _next_item_table(attempts)
    lines += [""]
    lines += _simulation_table(simulees)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attempts", type=int, default=200)
    parser.add_argument("--simulees", type=int, default=2000)
    args = parser.parse_args()
    print(run(args.attempts, args.simulees))


if __name__ == "__main__":
    main()
