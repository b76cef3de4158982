"""Items of the bank, pure rules: validation, scoring a response, and reading CSV/JSON imports row by row."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from megacity.exam.v1 import resources_pb2 as res
from services.exam import items
from services.runtime.errors import InvalidArgument, Violations


def _choice_item(**overrides: object) -> res.Item:
    item = res.Item(
        content_area="algebra",
        item_type=res.ITEM_TYPE_SINGLE_CHOICE,
        stem="2 + 2 = ?",
        choices=[res.Choice(id="A", text="3"), res.Choice(id="B", text="4")],
        answer_key=res.AnswerKey(correct_choice_ids=["B"]),
        parameters=res.ItemParameters(model=res.IRT_MODEL_3PL, a=1.2, b=-0.5, c=0.2),
    )
    for name, value in overrides.items():
        getattr(item, name).CopyFrom(value)
    return item


def _problems(item: res.Item) -> list[str]:
    violations = Violations()
    items.check_item(violations, item)
    return [field for field, _ in violations.items()]


def test_a_well_formed_item_passes() -> None:
    assert _problems(_choice_item()) == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda i: setattr(i, "content_area", ""), "item.content_area"),
        (lambda i: setattr(i, "stem", " "), "item.stem"),
        (lambda i: i.answer_key.correct_choice_ids.append("Z"), "item.answer_key.correct_choice_ids"),
        (lambda i: i.choices.pop(), "item.choices"),
        (lambda i: setattr(i.parameters, "a", 0), "item.parameters.a"),
        (lambda i: setattr(i.parameters, "b", float("nan")), "item.parameters.b"),
        (lambda i: setattr(i.parameters, "c", 1.0), "item.parameters.c"),
        (lambda i: setattr(i.parameters, "model", 0), "item.parameters.model"),
        (lambda i: setattr(i, "item_type", 0), "item.item_type"),
    ],
)
def test_each_problem_names_its_field(change: object, field: str) -> None:
    item = _choice_item()
    change(item)  # type: ignore[operator]
    assert field in _problems(item)


def test_models_fix_what_they_do_not_estimate() -> None:
    one = items.parameters_of(_choice_item(parameters=res.ItemParameters(model=res.IRT_MODEL_1PL, a=3, b=1, c=0.3)))
    two = items.parameters_of(_choice_item(parameters=res.ItemParameters(model=res.IRT_MODEL_2PL, a=3, b=1, c=0.3)))
    assert (one.a, one.c, two.a, two.c) == (1.0, 0.0, 3, 0.0)


def test_responses_are_scored_per_item_type() -> None:
    key = res.AnswerKey
    assert items.is_correct("single_choice", key(correct_choice_ids=["B"]), ["A", "B"], "B")
    assert not items.is_correct("single_choice", key(correct_choice_ids=["B"]), ["A", "B"], "A")
    assert items.is_correct("multiple_choice", key(correct_choice_ids=["A", "C"]), ["A", "B", "C"], "C, A")
    assert not items.is_correct("multiple_choice", key(correct_choice_ids=["A", "C"]), ["A", "B", "C"], "A")
    assert items.is_correct("true_false", key(correct_choice_ids=["true"]), [], "true")
    assert items.is_correct("short_answer", key(accepted_answers=["Seoul"]), [], " seoul ")
    assert not items.is_correct("short_answer", key(accepted_answers=["Seoul"], case_sensitive=True), [], "seoul")
    assert items.is_correct("numeric", key(numeric_value=3.5, numeric_tolerance=0.1), [], "3.55")
    assert not items.is_correct("numeric", key(numeric_value=3.5), [], "3.6")
    for item_type, response in (
        ("single_choice", "Z"),
        ("multiple_choice", ""),
        ("numeric", "three"),
        ("numeric", "nan"),
    ):
        with pytest.raises(InvalidArgument):
            items.is_correct(item_type, key(correct_choice_ids=["A"]), ["A", "B"], response)


CSV = """external_id,content_area,item_type,stem,choices,answer,model,a,b,c,status,tags
q1,algebra,single_choice,2+2?,A=3|B=4,B,3PL,1.2,-0.5,0.2,active,easy|arith
q2,geometry,numeric,Area of a 2x2 square?,,4+-0.01,2PL,1.0,0.3,,,
q3,algebra,single_choice,Broken,A=1|B=2,C,3PL,1,0,0,,
q4,algebra,essay,Why?,,x,3PL,1,0,0,,
q5,algebra,short_answer,Capital?,,Seoul,3PL,1,abc,0,,
"""


def test_a_csv_import_validates_each_row_and_names_row_and_field() -> None:
    rows = list(items.read_import("csv", CSV, res.ITEM_STATUS_DRAFT))
    assert [row.row for row in rows] == [1, 2, 3, 4, 5]
    good = [row.item for row in rows if row.item is not None]
    assert [(i.external_id, i.status) for i in good] == [("q1", res.ITEM_STATUS_ACTIVE), ("q2", res.ITEM_STATUS_DRAFT)]
    assert good[1].answer_key.numeric_value == 4
    assert list(good[0].tags) == ["easy", "arith"]
    errors = {row.row: [field for field, _ in row.errors] for row in rows if row.errors}
    assert errors == {3: ["answer_key.correct_choice_ids"], 4: ["item_type"], 5: ["b"]}


def test_a_csv_without_required_columns_is_refused_whole() -> None:
    with pytest.raises(InvalidArgument):
        list(items.read_import("csv", "stem,answer\nx,y\n", res.ITEM_STATUS_DRAFT))


def test_a_json_import_names_row_and_field() -> None:
    good = json_format.MessageToDict(_choice_item(), preserving_proto_field_name=True)
    document = [good, {**good, "parameters": {"b": "hard"}}, {**good, "colour": "red"}, "not an object"]
    rows = list(items.read_import("json", json.dumps(document), res.ITEM_STATUS_DRAFT))
    assert rows[0].item is not None
    assert rows[1].errors[0][0] == "parameters.b"
    assert rows[2].errors[0][0] == "colour"
    assert rows[3].errors[0][0] == ""
