"""Items of the bank, pure rules (no I/O): what a valid item is, whether a response is correct, and reading an
item bank from CSV or JSON with errors that name the row and the field.

IRT parameters follow the three-parameter logistic model P(correct | theta) = c + (1 - c) / (1 + exp(-a (theta -
b))); an item authored under 1PL has a = 1 and c = 0, under 2PL c = 0, whatever the request said.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf import json_format

from megacity.exam.v1 import resources_pb2 as res
from services.runtime.errors import InvalidArgument, Violations

ITEM_TYPES = {
    res.ITEM_TYPE_SINGLE_CHOICE: "single_choice",
    res.ITEM_TYPE_MULTIPLE_CHOICE: "multiple_choice",
    res.ITEM_TYPE_TRUE_FALSE: "true_false",
    res.ITEM_TYPE_SHORT_ANSWER: "short_answer",
    res.ITEM_TYPE_NUMERIC: "numeric",
}
ITEM_TYPE_VALUES = {name: value for value, name in ITEM_TYPES.items()}
ITEM_STATUSES = {res.ITEM_STATUS_DRAFT: "draft", res.ITEM_STATUS_ACTIVE: "active", res.ITEM_STATUS_RETIRED: "retired"}
ITEM_STATUS_VALUES = {name: value for value, name in ITEM_STATUSES.items()}
MODELS = {res.IRT_MODEL_1PL: "1PL", res.IRT_MODEL_2PL: "2PL", res.IRT_MODEL_3PL: "3PL"}
MODEL_VALUES = {name: value for value, name in MODELS.items()}
TRUE_FALSE = ("true", "false")
MAX_IMPORT_ROWS = 10_000
# What authors write (the rest is the server's: ids, tenancy, exposure, times).
AUTHORED_FIELDS = frozenset(
    {
        "external_id",
        "content_area",
        "item_type",
        "stem",
        "choices",
        "answer_key",
        "media_uri",
        "explanation",
        "parameters",
        "status",
        "tags",
        "language",
    }
)
MAX_CHOICES = 26


@dataclass(frozen=True)
class Parameters:
    model: str
    a: float
    b: float
    c: float


def parameters_of(item: res.Item) -> Parameters:
    """The item's parameters as stored: 1PL and 2PL fix what their model does not estimate."""
    given = item.parameters
    model = MODELS.get(given.model, "3PL")
    a = 1.0 if model == "1PL" else given.a
    c = given.c if model == "3PL" else 0.0
    return Parameters(model, a, given.b, c)


def check_item(violations: Violations, item: res.Item, prefix: str = "item") -> None:
    """Records every problem of an authored item (content, answer key, parameters) as a field violation."""
    field = f"{prefix}." if prefix else ""
    violations.check(
        0 < len(item.content_area.strip()) <= 100, f"{field}content_area", "required, at most 100 characters"
    )
    violations.check(item.item_type in ITEM_TYPES, f"{field}item_type", "one of the item types")
    violations.check(0 < len(item.stem.strip()) <= 20_000, f"{field}stem", "required, at most 20000 characters")
    violations.check(len(item.explanation) <= 20_000, f"{field}explanation", "at most 20000 characters")
    violations.check(
        len(item.tags) <= 50 and all(0 < len(tag) <= 50 for tag in item.tags),
        f"{field}tags",
        "up to 50 tags of 1-50 characters",
    )
    _check_answer(violations, item, field)
    _check_parameters(violations, item.parameters, f"{field}parameters")


def _check_answer(violations: Violations, item: res.Item, field: str) -> None:
    key = item.answer_key
    choice_ids = [choice.id for choice in item.choices]
    if item.item_type in (res.ITEM_TYPE_SINGLE_CHOICE, res.ITEM_TYPE_MULTIPLE_CHOICE):
        violations.check(2 <= len(choice_ids) <= MAX_CHOICES, f"{field}choices", f"2 to {MAX_CHOICES} choices")
        violations.check(
            len(set(choice_ids)) == len(choice_ids) and all(choice_ids),
            f"{field}choices",
            "each choice has its own non-empty id",
        )
        violations.check(all(choice.text.strip() for choice in item.choices), f"{field}choices", "each choice has text")
        correct = list(key.correct_choice_ids)
        violations.check(
            set(correct) <= set(choice_ids), f"{field}answer_key.correct_choice_ids", "ids of this item's choices"
        )
        wanted = "exactly one choice" if item.item_type == res.ITEM_TYPE_SINGLE_CHOICE else "at least one choice"
        enough = len(correct) == 1 if item.item_type == res.ITEM_TYPE_SINGLE_CHOICE else len(correct) >= 1
        violations.check(enough, f"{field}answer_key.correct_choice_ids", wanted)
    elif item.item_type == res.ITEM_TYPE_TRUE_FALSE:
        violations.check(
            list(key.correct_choice_ids) in (["true"], ["false"]),
            f"{field}answer_key.correct_choice_ids",
            "`true` or `false`",
        )
    elif item.item_type == res.ITEM_TYPE_SHORT_ANSWER:
        violations.check(
            0 < len(key.accepted_answers) <= 50 and all(answer.strip() for answer in key.accepted_answers),
            f"{field}answer_key.accepted_answers",
            "1-50 non-empty accepted answers",
        )
    elif item.item_type == res.ITEM_TYPE_NUMERIC:
        violations.check(math.isfinite(key.numeric_value), f"{field}answer_key.numeric_value", "a finite number")
        violations.check(
            math.isfinite(key.numeric_tolerance) and key.numeric_tolerance >= 0,
            f"{field}answer_key.numeric_tolerance",
            "a finite number, 0 or more",
        )


def _check_parameters(violations: Violations, given: res.ItemParameters, field: str) -> None:
    violations.check(given.model in MODELS, f"{field}.model", "IRT_MODEL_1PL, _2PL or _3PL")
    if given.model != res.IRT_MODEL_1PL:
        violations.check(math.isfinite(given.a) and 0 < given.a <= 10, f"{field}.a", "discrimination in (0, 10]")
    violations.check(math.isfinite(given.b) and -10 <= given.b <= 10, f"{field}.b", "difficulty in [-10, 10]")
    if given.model == res.IRT_MODEL_3PL:
        violations.check(math.isfinite(given.c) and 0 <= given.c < 1, f"{field}.c", "guessing in [0, 1)")


def is_correct(item_type: str, answer_key: res.AnswerKey, choice_ids: list[str], response: str) -> bool:
    """Whether `response` answers the item. A response no item of this type could accept (an unknown choice,
    not a number) is the caller's error: InvalidArgument."""
    if item_type in ("single_choice", "true_false"):
        allowed = TRUE_FALSE if item_type == "true_false" else choice_ids
        if response not in allowed:
            raise InvalidArgument("the response is not one of the item's choices", [("response", "a choice id")])
        return [response] == list(answer_key.correct_choice_ids)
    if item_type == "multiple_choice":
        chosen = {part.strip() for part in response.split(",") if part.strip()}
        if not chosen or not chosen <= set(choice_ids):
            raise InvalidArgument(
                "the response is not a set of the item's choices", [("response", "choice ids, comma separated")]
            )
        return chosen == set(answer_key.correct_choice_ids)
    if item_type == "short_answer":
        given = response.strip()
        if answer_key.case_sensitive:
            return given in {answer.strip() for answer in answer_key.accepted_answers}
        return given.casefold() in {answer.strip().casefold() for answer in answer_key.accepted_answers}
    try:
        value = float(response.strip())
    except ValueError:
        raise InvalidArgument("the response is not a number", [("response", "a number")]) from None
    if not math.isfinite(value):
        raise InvalidArgument("the response is not a finite number", [("response", "a finite number")])
    return abs(value - answer_key.numeric_value) <= answer_key.numeric_tolerance


# --- import --------------------------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "external_id",
    "content_area",
    "item_type",
    "stem",
    "choices",
    "answer",
    "model",
    "a",
    "b",
    "c",
    "status",
    "tags",
    "media_uri",
    "explanation",
)
CSV_HELP = (
    "columns: external_id, content_area, item_type (single_choice, multiple_choice, true_false, short_answer, "
    "numeric), stem, choices (`A=text|B=text`), answer (choice ids `A` or `A,C`, accepted answers `x|y`, `true`, "
    "or a number `3.5` or `3.5+-0.1`), model (1PL/2PL/3PL), a, b, c, status, tags (`x|y`), media_uri, explanation"
)


@dataclass(frozen=True)
class ImportRow:
    """One data row: its 1-based number and the item it describes, or its problems as (field, message)."""

    row: int
    item: res.Item | None
    errors: tuple[tuple[str, str], ...]


def read_import(format_name: str, content: str, default_status: res.ItemStatus.ValueType) -> Iterator[ImportRow]:
    """The rows of an item-bank file, each validated on its own (a bad row never stops the others)."""
    rows = _csv_rows(content) if format_name == "csv" else _json_rows(content)
    for number, parsed in rows:
        if isinstance(parsed, tuple):
            yield ImportRow(number, None, (parsed,))
            continue
        if not parsed.status:
            parsed.status = default_status or res.ITEM_STATUS_DRAFT
        violations = Violations()
        check_item(violations, parsed, prefix="")
        problems = tuple(violations.items())
        yield ImportRow(number, None if problems else parsed, problems)


def _csv_rows(content: str) -> Iterator[tuple[int, res.Item | tuple[str, str]]]:
    reader = csv.DictReader(io.StringIO(content))
    missing = [
        column
        for column in ("content_area", "item_type", "stem", "answer", "b")
        if column not in (reader.fieldnames or [])
    ]
    if missing:
        raise InvalidArgument(f"the CSV header lacks {', '.join(missing)}", [("content", CSV_HELP)])
    for number, record in enumerate(reader, start=1):
        if number > MAX_IMPORT_ROWS:
            raise InvalidArgument(f"at most {MAX_IMPORT_ROWS} rows per import", [("content", "split the file")])
        try:
            yield number, _item_from_csv({key: (value or "").strip() for key, value in record.items() if key})
        except _RowError as error:
            yield number, (error.field, error.message)


class _RowError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _number(record: dict[str, str], column: str, default: float | None = None) -> float:
    raw = record.get(column, "")
    if not raw:
        if default is None:
            raise _RowError(column, "required")
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _RowError(column, f"{raw!r} is not a number") from None
    if not math.isfinite(value):
        raise _RowError(column, "must be a finite number")
    return value


def _item_from_csv(record: dict[str, str]) -> res.Item:
    item_type = ITEM_TYPE_VALUES.get(record.get("item_type", "").lower())
    if item_type is None:
        raise _RowError("item_type", f"one of {', '.join(ITEM_TYPE_VALUES)}")
    model = MODEL_VALUES.get(record.get("model", "").upper() or "3PL")
    if model is None:
        raise _RowError("model", "1PL, 2PL or 3PL")
    status_name = record.get("status", "").lower()
    if status_name and status_name not in ITEM_STATUS_VALUES:
        raise _RowError("status", "draft, active or retired")
    item = res.Item(
        external_id=record.get("external_id", ""),
        content_area=record.get("content_area", ""),
        item_type=item_type,
        stem=record.get("stem", ""),
        media_uri=record.get("media_uri", ""),
        explanation=record.get("explanation", ""),
        tags=[tag.strip() for tag in record.get("tags", "").split("|") if tag.strip()],
        status=ITEM_STATUS_VALUES.get(status_name, res.ITEM_STATUS_UNSPECIFIED),
        parameters=res.ItemParameters(
            model=model,
            a=_number(record, "a", 1.0),
            b=_number(record, "b"),
            c=_number(record, "c", 0.0),
        ),
    )
    for part in filter(None, (part.strip() for part in record.get("choices", "").split("|"))):
        choice_id, separator, text = part.partition("=")
        if not separator:
            raise _RowError("choices", "write choices as `A=text|B=text`")
        item.choices.add(id=choice_id.strip(), text=text.strip())
    answer = record.get("answer", "")
    if not answer:
        raise _RowError("answer", "required")
    if item_type in (res.ITEM_TYPE_SINGLE_CHOICE, res.ITEM_TYPE_MULTIPLE_CHOICE, res.ITEM_TYPE_TRUE_FALSE):
        item.answer_key.correct_choice_ids.extend(part.strip() for part in answer.split(",") if part.strip())
    elif item_type == res.ITEM_TYPE_SHORT_ANSWER:
        item.answer_key.accepted_answers.extend(part.strip() for part in answer.split("|") if part.strip())
    else:
        value, _, tolerance = answer.partition("+-")
        item.answer_key.numeric_value = _number({"answer": value}, "answer")
        item.answer_key.numeric_tolerance = _number({"answer": tolerance}, "answer", 0.0)
    return item


def _json_rows(content: str) -> Iterator[tuple[int, res.Item | tuple[str, str]]]:
    try:
        document = json.loads(content)
    except ValueError as error:
        raise InvalidArgument(f"the content is not JSON: {error}", [("content", "a JSON array of items")]) from None
    if not isinstance(document, list):
        raise InvalidArgument("the content is not a JSON array", [("content", "a JSON array of items")])
    if len(document) > MAX_IMPORT_ROWS:
        raise InvalidArgument(f"at most {MAX_IMPORT_ROWS} rows per import", [("content", "split the file")])
    for number, entry in enumerate(document, start=1):
        if not isinstance(entry, dict):
            yield number, ("", "each entry is an Item object")
            continue
        try:
            yield number, json_format.ParseDict(entry, res.Item(), ignore_unknown_fields=False)
        except json_format.ParseError as error:
            yield number, (_field_of(str(error)), str(error))


def _field_of(message: str) -> str:
    """The field path a protobuf JSON parse error names (`Failed to parse parameters field: Failed to parse b
    field: ...` -> `parameters.b`; `... has no field named "x"` -> `x`), or '' when it names none."""
    path = re.findall(r"Failed to parse (\w+) field", message)
    unknown = re.search(r'has no field named "([^"]+)"', message)
    if unknown:
        path.append(unknown.group(1))
    return ".".join(path)
