"""Exams, pure rules (no I/O): what a valid exam configuration is, and applying an update mask to one."""

from __future__ import annotations

import math

from google.protobuf import field_mask_pb2

from megacity.exam.v1 import resources_pb2 as res
from services.runtime.errors import InvalidArgument, Violations

MAX_ITEMS = 200
# What authors write (the rest is the server's: ids, tenancy, status, pool size, times).
AUTHORED_FIELDS = frozenset(
    {
        "title",
        "description",
        "exam_type",
        "is_public",
        "adaptive",
        "fixed_form",
        "time_limit",
        "show_estimates",
        "show_item_feedback",
        "score_scale",
        "open_time",
        "close_time",
        "max_attempts_per_student",
    }
)


def check_exam(exam: res.Exam) -> None:
    """Raises InvalidArgument naming every problem of an exam's authored fields."""
    violations = Violations()
    violations.check(0 < len(exam.title.strip()) <= 300, "exam.title", "required, at most 300 characters")
    violations.check(len(exam.description) <= 10_000, "exam.description", "at most 10000 characters")
    form = exam.WhichOneof("form")
    violations.check(form is not None, "exam.adaptive", "an adaptive configuration or a fixed_form")
    if form == "adaptive":
        _check_adaptive(violations, exam.adaptive)
    elif form == "fixed_form":
        ids = list(exam.fixed_form.item_ids)
        violations.check(0 < len(ids) <= MAX_ITEMS, "exam.fixed_form.item_ids", f"1 to {MAX_ITEMS} items")
        violations.check(len(set(ids)) == len(ids), "exam.fixed_form.item_ids", "each item once")
    violations.check(exam.time_limit.seconds >= 0, "exam.time_limit", "not negative")
    violations.check(exam.max_attempts_per_student >= 0, "exam.max_attempts_per_student", "0 (unlimited) or more")
    if exam.HasField("open_time") and exam.HasField("close_time"):
        violations.check(
            exam.open_time.ToNanoseconds() < exam.close_time.ToNanoseconds(), "exam.close_time", "after open_time"
        )
    scale = exam.score_scale
    if exam.HasField("score_scale"):
        violations.check(math.isfinite(scale.sd) and scale.sd > 0, "exam.score_scale.sd", "positive")
        violations.check(scale.min < scale.max, "exam.score_scale.max", "above min")
    violations.raise_if_any("the exam is invalid")


def _check_adaptive(violations: Violations, config: res.AdaptiveConfig) -> None:
    field = "exam.adaptive"
    minimum, maximum = config.min_items or 5, config.max_items or 30
    violations.check(0 < minimum <= maximum, f"{field}.min_items", "at least 1 and at most max_items")
    violations.check(maximum <= MAX_ITEMS, f"{field}.max_items", f"at most {MAX_ITEMS}")
    violations.check(
        math.isfinite(config.standard_error_target) and 0 <= config.standard_error_target <= 2,
        f"{field}.standard_error_target",
        "0 (run to max_items) to 2",
    )
    violations.check(0 <= config.randomesque_k <= 50, f"{field}.randomesque_k", "1 to 50 (0: the default 5)")
    violations.check(
        0 <= config.max_exposure_rate <= 1, f"{field}.max_exposure_rate", "in (0, 1] (0: the default 0.25)"
    )
    violations.check(
        math.isfinite(config.prior_sd) and config.prior_sd >= 0, f"{field}.prior_sd", "positive (0: the default 1)"
    )
    violations.check(math.isfinite(config.prior_mean), f"{field}.prior_mean", "a finite number")
    blueprint = dict(config.content_blueprint)
    if blueprint:
        violations.check(
            all(math.isfinite(share) and share >= 0 for share in blueprint.values()),
            f"{field}.content_blueprint",
            "proportions of 0 or more",
        )
        violations.check(
            abs(sum(blueprint.values()) - 1) <= 0.01, f"{field}.content_blueprint", "proportions that sum to 1"
        )


def merged(current: res.Exam, given: res.Exam, paths: list[str]) -> res.Exam:
    """`current` with the fields of `given` named by `paths` (all of given's set fields when empty)."""
    paths = paths or [field.name for field, _ in given.ListFields()]
    unknown = set(paths) - AUTHORED_FIELDS
    if unknown:
        raise InvalidArgument(
            "update_mask names fields that cannot change", [("update_mask", ", ".join(sorted(unknown)))]
        )
    result = res.Exam()
    result.CopyFrom(current)
    field_mask_pb2.FieldMask(paths=paths).MergeMessage(
        given, result, replace_message_field=True, replace_repeated_field=True
    )
    return result  # setting one member of the `form` oneof cleared the other
