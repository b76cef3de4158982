"""The audit trail's hash chain: sealing, verification, what tampering it finds and what it cannot, validation,
and the wire form."""

from __future__ import annotations

import itertools
import math
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from megacity.auth.v1 import resources_pb2
from services.auth import audit
from services.auth.audit import GENESIS_HASH, AuditDraft, AuditEntry, ChainBreak, ChainFailure, verify_chain
from services.runtime.errors import InvalidArgument

ZONE = "univprep"
OTHER_ZONE = "kculture"
START = datetime(2025, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)
IDS = uuid.UUID("8a3f4c2e-1b5d-4e6f-9a7b-0c1d2e3f4a5b")


def make_draft(index: int, zone_id: str = ZONE) -> AuditDraft:
    return AuditDraft(
        id=str(uuid.uuid5(IDS, f"{zone_id}/{index}")),
        zone_id=zone_id,
        org_id="org-1",
        actor_id="user-7",
        actor_role="teacher",
        actor_service="exam",
        action="update",
        outcome="success",
        resource_type="exam",
        resource_id=f"exam-{index}",
        ip_address="203.0.113.7",
        user_agent="Mozilla/5.0",
        request_id=f"req-{index}",
        details={"changed": ["title", "duration"], "attempt": index, "score": 0.5},
        event_time=START + timedelta(seconds=index),
    )


def make_chain(length: int = 5, zone_id: str = ZONE) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    prev_hash = GENESIS_HASH
    for index in range(length):
        entry = audit.seal(
            make_draft(index, zone_id),
            sequence=index + 1,
            prev_hash=prev_hash,
            record_time=START + timedelta(seconds=index, milliseconds=3),
        )
        entries.append(entry)
        prev_hash = entry.hash
    return entries


CHAIN = make_chain()


def with_entry(entries: list[AuditEntry], position: int, entry: AuditEntry) -> list[AuditEntry]:
    return [*entries[:position], entry, *entries[position + 1 :]]


# --- an intact chain ---------------------------------------------------------------------------------------------


def test_a_sealed_chain_verifies_and_starts_from_the_genesis_hash() -> None:
    assert CHAIN[0].prev_hash == GENESIS_HASH == "0" * 64
    assert [entry.sequence for entry in CHAIN] == [1, 2, 3, 4, 5]
    assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(CHAIN))
    assert verify_chain(CHAIN) is None


def test_an_empty_chain_verifies() -> None:
    assert verify_chain([]) is None


def test_each_hash_is_sha256_of_the_previous_hash_and_the_canonical_bytes() -> None:
    entry = CHAIN[2]
    assert entry.hash == audit.record_hash(CHAIN[1].hash, audit.canonical_bytes(entry))
    assert len(entry.hash) == 64
    assert int(entry.hash, 16) >= 0


def test_sealing_rejects_a_sequence_below_one() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        audit.seal(make_draft(0), sequence=0, prev_hash=GENESIS_HASH, record_time=START)


def test_a_one_shot_iterator_verifies() -> None:
    assert verify_chain(iter(make_chain(50))) is None


def test_verification_stops_reading_at_the_first_break() -> None:
    entries = with_entry(CHAIN, 1, replace(CHAIN[1], action="delete"))
    read: list[AuditEntry] = []

    def stream() -> Iterator[AuditEntry]:
        for entry in entries:
            read.append(entry)
            yield entry

    found = verify_chain(stream())
    assert found is not None
    assert found.sequence == 2
    assert read == entries[:2]


def test_a_chain_verifies_page_by_page_from_the_last_verified_link() -> None:
    entries = make_chain(10)
    prev_hash, sequence = GENESIS_HASH, 1
    for start in range(0, len(entries), 3):
        page = entries[start : start + 3]
        assert verify_chain(page, start_prev_hash=prev_hash, start_sequence=sequence) is None
        prev_hash, sequence = page[-1].hash, page[-1].sequence + 1


def test_a_page_started_from_the_wrong_link_breaks_at_its_first_record() -> None:
    assert verify_chain(CHAIN[2:], start_prev_hash=CHAIN[0].hash, start_sequence=3) == ChainBreak(
        3, CHAIN[2], ChainFailure.PREV_HASH_MISMATCH
    )
    assert verify_chain(CHAIN[2:], start_prev_hash=CHAIN[1].hash, start_sequence=2) == ChainBreak(
        2, CHAIN[2], ChainFailure.SEQUENCE_GAP
    )


# --- tampering the chain finds -----------------------------------------------------------------------------------

# A changed value for every field of a record, so that no field escapes the hash.
TAMPERED_VALUES: dict[str, Callable[[AuditEntry], object]] = {
    "id": lambda entry: str(uuid.uuid5(IDS, "forged")),
    "zone_id": lambda entry: OTHER_ZONE,
    "org_id": lambda entry: "org-2",
    "actor_id": lambda entry: "user-8",
    "actor_role": lambda entry: "super_admin",
    "actor_service": lambda entry: "tutor",
    "action": lambda entry: "delete",
    "outcome": lambda entry: "denied",
    "resource_type": lambda entry: "user",
    "resource_id": lambda entry: entry.resource_id + "0",
    "ip_address": lambda entry: "198.51.100.9",
    "user_agent": lambda entry: "curl/8.7.1",
    "request_id": lambda entry: entry.request_id + "0",
    "details": lambda entry: {**entry.details, "score": 1},
    "event_time": lambda entry: entry.event_time + timedelta(microseconds=1),
    "sequence": lambda entry: entry.sequence + 1,
    "prev_hash": lambda entry: "f" * 64,
    "record_time": lambda entry: entry.record_time - timedelta(microseconds=1),
    "hash": lambda entry: "0" * 63 + "1",
}


def tampered(entry: AuditEntry, name: str, value: object) -> AuditEntry:
    changes: dict[str, Any] = {name: value}
    return replace(entry, **changes)


def test_every_field_of_a_record_has_a_tampering_case() -> None:
    assert set(TAMPERED_VALUES) == {entry_field.name for entry_field in fields(AuditEntry)}


@pytest.mark.parametrize("position", [0, 2, 4])
@pytest.mark.parametrize("name", sorted(TAMPERED_VALUES))
def test_editing_any_field_of_a_record_breaks_the_chain_at_that_record(name: str, position: int) -> None:
    edited = tampered(CHAIN[position], name, TAMPERED_VALUES[name](CHAIN[position]))
    assert edited != CHAIN[position]
    assert verify_chain(with_entry(CHAIN, position, edited)) == ChainBreak(
        position + 1, edited, ChainFailure.HASH_MISMATCH
    )


@pytest.mark.parametrize("deleted", [0, 1, 3])
def test_deleting_a_record_is_a_sequence_gap_at_the_next_one(deleted: int) -> None:
    remaining = CHAIN[:deleted] + CHAIN[deleted + 1 :]
    found = verify_chain(remaining)
    assert found == ChainBreak(deleted + 1, CHAIN[deleted + 1], ChainFailure.SEQUENCE_GAP)
    assert found.entry_id == CHAIN[deleted + 1].id


def test_swapping_two_records_is_found_where_the_first_of_them_belongs() -> None:
    swapped = [CHAIN[0], CHAIN[2], CHAIN[1], *CHAIN[3:]]
    assert verify_chain(swapped) == ChainBreak(2, CHAIN[2], ChainFailure.SEQUENCE_GAP)


def test_a_forged_record_with_a_recomputed_hash_inserted_is_caught_at_the_record_after_it() -> None:
    # Sealed exactly like a genuine record two, so it verifies itself; the genuine one after it no longer fits.
    forgery = audit.seal(
        replace(make_draft(1), action="delete"), sequence=2, prev_hash=CHAIN[0].hash, record_time=START
    )
    inserted = [CHAIN[0], forgery, *CHAIN[1:]]
    assert verify_chain(inserted) == ChainBreak(3, CHAIN[1], ChainFailure.SEQUENCE_GAP)


def test_a_forged_record_with_a_recomputed_hash_in_place_of_one_is_caught_by_the_next_prev_hash() -> None:
    forgery = audit.seal(
        replace(make_draft(2), outcome="failure"), sequence=3, prev_hash=CHAIN[1].hash, record_time=START
    )
    assert verify_chain(with_entry(CHAIN, 2, forgery)) == ChainBreak(4, CHAIN[3], ChainFailure.PREV_HASH_MISMATCH)


def test_a_record_whose_content_cannot_be_serialised_is_a_hash_mismatch() -> None:
    broken = replace(CHAIN[1], details={"score": math.nan})
    assert verify_chain(with_entry(CHAIN, 1, broken)) == ChainBreak(2, broken, ChainFailure.HASH_MISMATCH)


STRING_FIELDS = [entry_field.name for entry_field in fields(AuditEntry) if entry_field.type == "str"]


def test_the_string_fields_are_the_ones_expected() -> None:
    assert len(STRING_FIELDS) == 15
    assert {"id", "zone_id", "user_agent", "prev_hash", "hash"} <= set(STRING_FIELDS)


@given(data=st.data())
def test_any_single_character_change_of_a_string_field_is_found_at_that_record(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(CHAIN) - 1), label="position")
    name = data.draw(st.sampled_from(STRING_FIELDS), label="field")
    original: str = getattr(CHAIN[position], name)
    index = data.draw(st.integers(0, len(original) - 1), label="index")
    replacement = data.draw(st.characters().filter(lambda character: character != original[index]), label="new")
    edited = tampered(CHAIN[position], name, original[:index] + replacement + original[index + 1 :])
    assert verify_chain(with_entry(CHAIN, position, edited)) == ChainBreak(
        position + 1, edited, ChainFailure.HASH_MISMATCH
    )


# --- what a plain hash chain cannot find (the module docstring's limitation) ------------------------------------


def rechained(entries: list[AuditEntry]) -> list[AuditEntry]:
    """`entries` sealed again from the genesis hash: what someone able to write the whole table can do."""
    result: list[AuditEntry] = []
    prev_hash = GENESIS_HASH
    for entry in entries:
        resealed = audit.seal(entry, sequence=entry.sequence, prev_hash=prev_hash, record_time=entry.record_time)
        result.append(resealed)
        prev_hash = resealed.hash
    return result


def test_rewriting_the_whole_tail_after_an_edit_is_not_detected_without_an_external_anchor() -> None:
    anchored_latest_hash = CHAIN[-1].hash
    rewritten = rechained(with_entry(CHAIN, 1, replace(CHAIN[1], outcome="denied")))
    assert verify_chain(rewritten) is None
    # Only a copy of the latest hash kept out of the writer's reach shows it.
    assert rewritten[-1].hash != anchored_latest_hash


def test_dropping_the_latest_records_is_not_detected_without_an_external_anchor() -> None:
    anchored_latest_hash = CHAIN[-1].hash
    truncated = CHAIN[:3]
    assert verify_chain(truncated) is None
    assert truncated[-1].hash != anchored_latest_hash


# --- zones -------------------------------------------------------------------------------------------------------


def test_each_zone_has_its_own_chain() -> None:
    ours, theirs = make_chain(3, ZONE), make_chain(3, OTHER_ZONE)
    assert verify_chain(ours) is None
    assert verify_chain(theirs) is None
    assert theirs[0].prev_hash == GENESIS_HASH
    assert theirs[0].sequence == 1
    assert {entry.hash for entry in ours}.isdisjoint(entry.hash for entry in theirs)


def test_a_record_of_another_zone_spliced_into_a_chain_breaks_it() -> None:
    ours, theirs = make_chain(3, ZONE), make_chain(3, OTHER_ZONE)
    assert verify_chain(with_entry(ours, 1, theirs[1])) == ChainBreak(2, theirs[1], ChainFailure.PREV_HASH_MISMATCH)


# --- canonical bytes ---------------------------------------------------------------------------------------------

GOLDEN_DRAFT = AuditDraft(
    id="5f0c6b1e-8d2a-4c3b-9e7f-1a2b3c4d5e6f",
    zone_id="univprep",
    org_id="org-7",
    actor_id="user-42",
    actor_role="zone_admin",
    actor_service="auth",
    action="role_change",
    outcome="success",
    resource_type="user",
    resource_id="user-99",
    ip_address="2001:db8::7",
    user_agent="Mozilla/5.0 (X11; Linux x86_64) 한국어",
    request_id="req-1",
    details={"to": "teacher", "from": "student", "weights": [1.0, 0.25, -3], "nested": {"b": None, "a": True}},
    event_time=datetime(2025, 3, 1, 18, 30, 15, 120000, tzinfo=timezone(timedelta(hours=9))),
)
GOLDEN_PREV_HASH = "ab" * 32
GOLDEN_RECORD_TIME = datetime(2025, 3, 1, 9, 30, 16, tzinfo=UTC)


def golden_entry() -> AuditEntry:
    return audit.seal(GOLDEN_DRAFT, sequence=7, prev_hash=GOLDEN_PREV_HASH, record_time=GOLDEN_RECORD_TIME)


def test_the_canonical_bytes_and_hash_of_a_fixed_record_never_change() -> None:
    # Every stored hash depends on this format: if this test fails, existing chains would no longer verify.
    entry = golden_entry()
    assert (
        audit.canonical_bytes(entry)
        == (
            '{"action":"role_change","actor_id":"user-42","actor_role":"zone_admin","actor_service":"auth",'
            '"details":{"from":"student","nested":{"a":true,"b":null},"to":"teacher","weights":[1,0.25,-3]},'
            '"event_time":"2025-03-01T09:30:15.120000Z","id":"5f0c6b1e-8d2a-4c3b-9e7f-1a2b3c4d5e6f",'
            '"ip_address":"2001:db8::7","org_id":"org-7","outcome":"success",'
            '"prev_hash":"abababababababababababababababababababababababababababababababab",'
            '"record_time":"2025-03-01T09:30:16.000000Z","request_id":"req-1","resource_id":"user-99",'
            '"resource_type":"user","sequence":7,"user_agent":"Mozilla/5.0 (X11; Linux x86_64) 한국어",'
            '"zone_id":"univprep"}'
        ).encode()
    )
    # Cross-checked with `sha256sum` over the previous hash followed by the bytes above.
    assert entry.hash == "b14effdfa7ac68b0685eda7e1361c645d7c869c007b74f81d2bdbd7ff9ec9549"


def test_canonical_bytes_ignore_how_the_same_content_was_built() -> None:
    reordered = replace(
        GOLDEN_DRAFT,
        details={"nested": {"a": True, "b": None}, "weights": (1, 0.25, -3.0), "from": "student", "to": "teacher"},
        event_time=GOLDEN_DRAFT.event_time.astimezone(UTC),
    )
    rebuilt = audit.seal(reordered, sequence=7, prev_hash=GOLDEN_PREV_HASH, record_time=GOLDEN_RECORD_TIME)
    assert audit.canonical_bytes(rebuilt) == audit.canonical_bytes(golden_entry())
    assert rebuilt.hash == golden_entry().hash


def test_canonical_bytes_cover_everything_but_the_hash() -> None:
    entry = golden_entry()
    assert audit.canonical_bytes(replace(entry, hash="")) == audit.canonical_bytes(entry)


def test_naive_times_cannot_be_sealed() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        audit.seal(GOLDEN_DRAFT, sequence=1, prev_hash=GENESIS_HASH, record_time=datetime(2025, 3, 1, 9, 30))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1), (1.0, 1), (-0.0, 0), (0.5, 0.5), (2**53, float(2**53)), (10**30, 1e30), (1e300, 1e300)],
)
def test_numbers_in_details_are_taken_as_the_doubles_the_wire_carries(value: float, expected: float) -> None:
    [canonical] = audit.canonical_details({"n": value}).values()
    assert canonical == expected
    assert type(canonical) is type(expected)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [1, {"deep": math.nan}]])
def test_nan_and_infinities_in_details_are_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="NaN and infinities"):
        audit.canonical_details({"score": value})
    with pytest.raises(ValueError, match="NaN and infinities"):
        audit.seal(
            replace(GOLDEN_DRAFT, details={"score": value}), sequence=1, prev_hash=GENESIS_HASH, record_time=START
        )
    [(field, description)] = violations(replace(GOLDEN_DRAFT, details={"score": value}))
    assert field == "record.details"
    assert "NaN and infinities" in description


@pytest.mark.parametrize(
    ("details", "problem"),
    [
        ({"raw": b"bytes"}, "details.raw is a bytes, not a JSON value"),
        ({"tags": {"a", "b"}}, "details.tags is a set, not a JSON value"),
        ({"when": START}, "details.when is a datetime, not a JSON value"),
        ({"by_id": {1: "x"}}, "details.by_id has a key that is not a string: 1"),
        ({"note": "a\0b"}, "details.note must not contain NUL characters"),
        ({"list": ["ok", "\ud800"]}, "details.list[1] must be valid Unicode (no lone surrogates)"),
        ({"n": 10**400}, "details.n is too large for a JSON number"),
    ],
)
def test_details_that_are_not_storable_json_are_rejected_naming_where(details: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(problem)}$"):
        audit.canonical_details(details)


def nested_objects(depth: int) -> dict[str, object]:
    details: dict[str, object] = {}
    for _ in range(depth - 1):
        details = {"a": details}
    return details


def nested_lists(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_details_nest_at_most_the_limit_counting_objects_and_lists() -> None:
    limit = audit.MAX_DETAILS_DEPTH
    assert audit.canonical_details(nested_objects(limit)) == nested_objects(limit)
    assert audit.canonical_details({"l": nested_lists(limit - 1)}) == {"l": nested_lists(limit - 1)}
    with pytest.raises(ValueError, match="nests deeper than 32 levels"):
        audit.canonical_details(nested_objects(limit + 1))
    with pytest.raises(ValueError, match="nests deeper than 32 levels"):
        audit.canonical_details({"l": nested_lists(limit)})


# --- validation --------------------------------------------------------------------------------------------------


def violations(draft: AuditDraft, field_prefix: str = "record") -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as raised:
        audit.validate_draft(draft, field_prefix)
    return list(raised.value.violations)


def test_a_valid_draft_is_accepted_as_it_is() -> None:
    assert audit.validate_draft(make_draft(0)) == make_draft(0)
    minimal = AuditDraft(id=str(uuid.uuid5(IDS, "minimal")), zone_id=ZONE, action="login_failed", event_time=START)
    assert audit.validate_draft(minimal) == minimal


def test_every_wrong_field_is_named_at_once() -> None:
    draft = AuditDraft(
        id="not-a-uuid",
        zone_id="",
        org_id="o" * 129,
        actor_id="user\0",
        actor_role="janitor",
        actor_service="s" * 129,
        action="Login",
        outcome="maybe",
        resource_type="User",
        resource_id="r" * 129,
        ip_address="300.1.2.3",
        request_id="q" * 129,
        details={"score": math.inf},
        event_time=datetime(2025, 3, 1, 9, 30),
    )
    assert [field for field, _ in violations(draft, "request.record")] == [
        "request.record.id",
        "request.record.zone_id",
        "request.record.org_id",
        "request.record.actor_id",
        "request.record.actor_service",
        "request.record.resource_id",
        "request.record.request_id",
        "request.record.action",
        "request.record.resource_type",
        "request.record.actor_role",
        "request.record.outcome",
        "request.record.event_time",
        "request.record.ip_address",
        "request.record.details",
    ]


@pytest.mark.parametrize(
    ("changes", "field", "description"),
    [
        ({"id": "8A3F4C2E-1B5D-4E6F-9A7B-0C1D2E3F4A5B"}, "id", "a UUID in lower-case hyphenated form"),
        ({"id": "8a3f4c2e1b5d4e6f9a7b0c1d2e3f4a5b"}, "id", "a UUID in lower-case hyphenated form"),
        ({"zone_id": ""}, "zone_id", "required"),
        ({"action": ""}, "action", "required: 1-64 lower-case letters and '_'"),
        ({"action": "a" * 65}, "action", "required: 1-64 lower-case letters and '_'"),
        ({"action": "role-change"}, "action", "required: 1-64 lower-case letters and '_'"),
        ({"resource_type": "r" * 65}, "resource_type", "at most 64 lower-case letters, '_' and '.'"),
        ({"resource_id": "r" * 129}, "resource_id", "at most 128 characters"),
        ({"request_id": "\ud800"}, "request_id", "must be valid Unicode (no lone surrogates)"),
        ({"user_agent": "curl\0"}, "user_agent", "must not contain NUL characters"),
        ({"ip_address": "localhost"}, "ip_address", "an IPv4 or IPv6 address"),
        ({"outcome": "SUCCESS"}, "outcome", "empty or one of success, failure, denied"),
    ],
)
def test_each_limit_is_described_under_its_field(changes: dict[str, Any], field: str, description: str) -> None:
    assert violations(replace(make_draft(0), **changes)) == [(f"record.{field}", description)]


def test_the_longest_values_allowed_are_accepted() -> None:
    longest = replace(
        make_draft(0),
        action="a" * audit.MAX_ACTION,
        resource_type="exam.item_" + "x" * (audit.MAX_RESOURCE_TYPE - 10),
        resource_id="r" * audit.MAX_ID,
        zone_id="z" * audit.MAX_ID,
    )
    assert audit.validate_draft(longest) == longest


def test_a_long_user_agent_is_cut_rather_than_refused() -> None:
    accepted = audit.validate_draft(replace(make_draft(0), user_agent="Mozilla/5.0 " + "x" * 1000))
    assert accepted.user_agent == ("Mozilla/5.0 " + "x" * 1000)[: audit.MAX_USER_AGENT]
    assert len(accepted.user_agent) == 512


def test_ip_addresses_are_stored_in_compressed_form() -> None:
    accepted = audit.validate_draft(replace(make_draft(0), ip_address="2001:0DB8:0000:0000:0000:0000:0000:0007"))
    assert accepted.ip_address == "2001:db8::7"


def test_details_are_stored_as_the_json_their_hash_covers() -> None:
    accepted = audit.validate_draft(replace(make_draft(0), details={"n": 2.0, "list": ("a", 1)}))
    assert accepted.details == {"n": 2, "list": ["a", 1]}
    assert type(accepted.details["n"]) is int


def test_details_are_at_most_16_kib_as_json() -> None:
    # {"d":"..."} is 8 bytes around the string.
    at_limit = replace(make_draft(0), details={"d": "x" * (audit.MAX_DETAILS_BYTES - 8)})
    assert audit.validate_draft(at_limit) == at_limit
    over = replace(make_draft(0), details={"d": "x" * (audit.MAX_DETAILS_BYTES - 7)})
    assert violations(over) == [("record.details", "at most 16384 bytes as JSON")]


# --- the wire form -----------------------------------------------------------------------------------------------


def test_an_entry_becomes_an_audit_record_message() -> None:
    record = audit.to_message(golden_entry())
    assert record.id == GOLDEN_DRAFT.id
    assert record.actor_role == resources_pb2.ROLE_ZONE_ADMIN
    assert record.outcome == resources_pb2.AUDIT_OUTCOME_SUCCESS
    assert (record.sequence, record.prev_hash, record.hash) == (7, GOLDEN_PREV_HASH, golden_entry().hash)
    assert record.event_time.ToDatetime(tzinfo=UTC) == GOLDEN_DRAFT.event_time
    assert record.record_time.ToDatetime(tzinfo=UTC) == GOLDEN_RECORD_TIME
    assert json_format.MessageToDict(record.details) == {
        "to": "teacher",
        "from": "student",
        "weights": [1.0, 0.25, -3.0],
        "nested": {"b": None, "a": True},
    }


def test_an_anonymous_record_without_outcome_has_unspecified_enums() -> None:
    entry = replace(golden_entry(), actor_role="", outcome="")
    record = audit.to_message(entry)
    assert (record.actor_role, record.outcome) == (
        resources_pb2.ROLE_UNSPECIFIED,
        resources_pb2.AUDIT_OUTCOME_UNSPECIFIED,
    )
    assert audit.draft_from_message(record, actor_service="auth") == replace(GOLDEN_DRAFT, actor_role="", outcome="")


def test_a_record_that_crossed_the_wire_seals_to_the_same_hash() -> None:
    for entry in [golden_entry(), *CHAIN]:
        draft = audit.draft_from_message(audit.to_message(entry), actor_service=entry.actor_service)
        resealed = audit.seal(draft, sequence=entry.sequence, prev_hash=entry.prev_hash, record_time=entry.record_time)
        assert resealed == entry
        assert resealed.hash == entry.hash


def test_the_writer_cannot_choose_its_service_or_chain_fields() -> None:
    record = audit.to_message(golden_entry())
    draft = audit.draft_from_message(record, actor_service="exam")
    assert type(draft) is AuditDraft
    assert draft.actor_service == "exam"


def test_a_message_with_missing_or_unknown_values_names_each_field() -> None:
    record = resources_pb2.AuditRecord(
        id=GOLDEN_DRAFT.id,
        zone_id=ZONE,
        action="login",
        actor_role=resources_pb2.Role.ValueType(99),
        outcome=resources_pb2.AuditOutcome.ValueType(42),
    )
    with pytest.raises(InvalidArgument) as raised:
        audit.draft_from_message(record, actor_service="auth", field_prefix="request.record")
    assert list(raised.value.violations) == [
        ("request.record.event_time", "required"),
        ("request.record.actor_role", "unknown role 99"),
        ("request.record.outcome", "unknown outcome 42"),
    ]


def test_a_message_event_time_keeps_microseconds() -> None:
    record = audit.to_message(golden_entry())
    record.event_time.nanos += 999
    draft = audit.draft_from_message(record, actor_service="auth")
    assert draft.event_time == GOLDEN_DRAFT.event_time


JSON_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | JSON_TEXT
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(JSON_TEXT, children, max_size=4),
    max_leaves=16,
)
DETAILS = st.dictionaries(JSON_TEXT, JSON_VALUES, max_size=5)


@given(details=DETAILS)
def test_any_json_details_hash_alike_after_the_wire_and_a_json_store(details: dict[str, object]) -> None:
    entry = replace(golden_entry(), details=details)
    original = audit.canonical_bytes(entry)
    over_the_wire = audit.draft_from_message(audit.to_message(entry), actor_service=entry.actor_service).details
    # A store keeps what validation returned, the canonical details, and reads back plain JSON.
    from_a_json_column = orjson.loads(orjson.dumps(audit.canonical_details(details)))
    assert audit.canonical_bytes(replace(entry, details=over_the_wire)) == original
    assert audit.canonical_bytes(replace(entry, details=from_a_json_column)) == original
