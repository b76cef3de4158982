"""An exam bank whose finished attempts were simulated from known 2PL parameters, written straight into the
database as its owner: what calibration tests calibrate."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import numpy as np
from numpy.typing import NDArray

from services.exam.calibration import simulate_responses

ZONE = "univ"
AREAS = ("algebra", "geometry")
N_ITEMS = 20
N_PERSONS = 1500
# What the authors gave the items: deliberately not the generating values, so agreement with those is calibration's.
AUTHORED = {"model": "3PL", "a": 1.0, "b": 0.0, "c": 0.2}


@dataclass(frozen=True)
class Bank:
    item_ids: list[str]
    a: NDArray[np.float64]
    b: NDArray[np.float64]
    unanswered: list[str]
    in_progress_attempt: str


async def seed_bank(owner_url: str, org: str, item_ids: list[str] | None = None, *, seed: int = 7) -> Bank:
    """As the database's owner: an organisation's bank (version 1 active) of N_ITEMS items (the given ones, or new
    ones) with authored parameters, two more items nobody answered, N_PERSONS finished attempts whose responses come
    from generating 2PL parameters, and one attempt in progress."""
    rng = np.random.default_rng(seed)
    a = np.exp(rng.normal(0.0, 0.3, N_ITEMS))
    b = rng.normal(0.0, 1.0, N_ITEMS)
    connection = await asyncpg.connect(owner_url)
    try:
        async with connection.transaction():
            if item_ids is None:
                item_ids = [f"{org}-item-{k:02d}" for k in range(N_ITEMS)]
                unanswered = [f"{org}-unanswered-{k}" for k in range(2)]
                await connection.execute(
                    "INSERT INTO exam.parameter_versions (zone_id, org_id, version, active, activate_time) "
                    "VALUES ($1, $2, 1, true, now())",
                    ZONE,
                    org,
                )
                await connection.copy_records_to_table(
                    "items",
                    schema_name="exam",
                    columns=[
                        "item_id",
                        "zone_id",
                        "org_id",
                        "content_area",
                        "item_type",
                        "stem",
                        "answer_key",
                        "status",
                        "creator_id",
                    ],
                    records=[
                        (item, ZONE, org, AREAS[k % 2], "single_choice", f"Question {k}", "{}", "active", "author")
                        for k, item in enumerate(item_ids + unanswered)
                    ],
                )
                await connection.copy_records_to_table(
                    "item_parameters",
                    schema_name="exam",
                    columns=["item_id", "version", "zone_id", "org_id", "model", "a", "b", "c"],
                    records=[
                        (item, 1, ZONE, org, AUTHORED["model"], AUTHORED["a"], AUTHORED["b"], AUTHORED["c"])
                        for item in item_ids + unanswered
                    ],
                )
            else:
                unanswered = []
            exam_id = f"{org}-exam"
            await connection.execute(
                "INSERT INTO exam.exams (exam_id, zone_id, org_id, title, status, adaptive, creator_id) "
                "VALUES ($1, $2, $3, 'Mock', 'published', '{}', 'author')",
                exam_id,
                ZONE,
                org,
            )
            responses = simulate_responses(a, b, np.zeros(N_ITEMS), rng.normal(0.0, 1.0, N_PERSONS), rng)
            await connection.copy_records_to_table(
                "attempts",
                schema_name="exam",
                columns=[
                    "attempt_id",
                    "zone_id",
                    "org_id",
                    "exam_id",
                    "student_id",
                    "status",
                    "parameter_version",
                    "seed",
                ],
                records=[
                    (f"{org}-attempt-{n}", ZONE, org, exam_id, f"student-{n}", "finished", 1, n)
                    for n in range(N_PERSONS)
                ],
            )
            await connection.copy_records_to_table(
                "attempt_responses",
                schema_name="exam",
                columns=[
                    "attempt_id",
                    "position",
                    "item_id",
                    "zone_id",
                    "org_id",
                    "content_area",
                    "response",
                    "correct",
                    "theta",
                    "standard_error",
                ],
                records=[
                    (
                        f"{org}-attempt-{person}",
                        item + 1,
                        item_ids[item],
                        ZONE,
                        org,
                        "area",
                        "A",
                        bool(correct),
                        0.0,
                        1.0,
                    )
                    for person, item, correct in zip(
                        responses.person_index.tolist(),
                        responses.item_index.tolist(),
                        responses.correct.tolist(),
                        strict=True,
                    )
                ],
            )
            # Its answers are not evidence yet: calibration leaves them out, and it keeps the version it started with.
            in_progress = f"{org}-attempt-open"
            await connection.execute(
                "INSERT INTO exam.attempts (attempt_id, zone_id, org_id, exam_id, student_id, parameter_version, seed, "
                "current_item_id) VALUES ($1, $2, $3, $4, 'student-open', 1, 0, $5)",
                in_progress,
                ZONE,
                org,
                exam_id,
                item_ids[1],
            )
            await connection.execute(
                "INSERT INTO exam.attempt_responses (attempt_id, position, item_id, zone_id, org_id, content_area, "
                "response, correct, theta, standard_error) VALUES ($1, 1, $2, $3, $4, 'area', 'A', true, 0, 1)",
                in_progress,
                item_ids[0],
                ZONE,
                org,
            )
    finally:
        await connection.close()
    return Bank(item_ids=item_ids, a=a, b=b, unanswered=unanswered, in_progress_attempt=in_progress)


# The same bank's items as an import file (ExamService.ImportItems), for tests that build it through the API.
ITEMS_CSV = "\n".join(
    [
        "external_id,content_area,item_type,stem,choices,answer,model,a,b,c,status",
        *(f"q{n},{AREAS[n % 2]},single_choice,Question {n},A=right|B=wrong,A,2PL,1,0,0,active" for n in range(N_ITEMS)),
    ]
)
