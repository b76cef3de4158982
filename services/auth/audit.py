"""The tamper-evident audit trail's pure rules (no I/O): records, their hash chain, validation and wire form.

Every zone has its own append-only chain. A record is sealed with its position (`sequence`, 1, 2, ... per zone),
the hash of the zone's previous record (`prev_hash`; `GENESIS_HASH` for the first) and its own `hash`: SHA-256
over `prev_hash` and the record's canonical bytes, which cover every field but `hash` itself. `verify_chain`
walks a zone's records in sequence order and reports the first one that does not verify:

- `hash mismatch`: the record was changed after it was sealed;
- `sequence gap`: records before it are missing or out of order (deleted, or moved);
- `prev_hash does not match previous record`: the record before it is not the one it was chained to (a forgery
  put in its place).

What a plain hash chain cannot show: someone able to write the table can edit a record and then recompute every
later record's hash, or drop the latest records; either leaves a chain that verifies. The remedy is to anchor
the latest hash somewhere that person cannot write (published periodically, copied to another service's log,
signed by an offline key) and compare against it. Keying the hash (HMAC) would not be a better remedy: the key
would live in the auth service next to the database credentials, anyone verifying would need it, and rotating it
would leave older records verifiable only with retired keys, whereas an anchored plain chain can be verified by
anyone.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeAlias

import orjson
from google.protobuf import json_format

from megacity.auth.v1 import resources_pb2
from services.runtime.errors import Violations
from services.runtime.permissions import ROLE_PERMISSIONS, role_name, role_value

GENESIS_HASH = "0" * 64

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"

ACTION = re.compile(r"[a-z_]+")
RESOURCE_TYPE = re.compile(r"[a-z_.]*")
MAX_ACTION = 64
MAX_RESOURCE_TYPE = 64
MAX_ID = 128
MAX_USER_AGENT = 512
MAX_DETAILS_BYTES = 16 * 1024
# Far below protobuf's and orjson's own nesting limits, so accepted details always cross the wire and serialise.
MAX_DETAILS_DEPTH = 32

OUTCOMES: Mapping[resources_pb2.AuditOutcome.ValueType, str] = {
    resources_pb2.AUDIT_OUTCOME_SUCCESS: "success",
    resources_pb2.AUDIT_OUTCOME_FAILURE: "failure",
    resources_pb2.AUDIT_OUTCOME_DENIED: "denied",
}
OUTCOME_VALUES: Mapping[str, resources_pb2.AuditOutcome.ValueType] = {name: value for value, name in OUTCOMES.items()}

# Beyond 2**53 not every integer is a double, so only integral doubles below it are written as integers.
_EXACT_INTEGERS = 2**53


@dataclass(frozen=True, kw_only=True)
class AuditDraft:
    """What a writer records: the event, before the store places it in its zone's chain.

    `actor_role` is a role name (`teacher`) or empty for anonymous callers; `outcome` is `success`, `failure`,
    `denied` or empty. `details` is a JSON object: strings, finite numbers, booleans, null, lists and objects.
    Times are timezone-aware.
    """

    id: str
    zone_id: str
    action: str
    event_time: datetime
    org_id: str = ""
    actor_id: str = ""
    actor_role: str = ""
    actor_service: str = ""
    outcome: str = ""
    resource_type: str = ""
    resource_id: str = ""
    ip_address: str = ""
    user_agent: str = ""
    request_id: str = ""
    details: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AuditEntry(AuditDraft):
    """A sealed record: its draft, its place in the zone's chain, and the hash that ties it to that place."""

    sequence: int
    prev_hash: str
    record_time: datetime
    hash: str


class ChainFailure(StrEnum):
    """What is wrong with the first record that does not verify, in the words VerifyAuditChainResponse uses."""

    HASH_MISMATCH = "hash mismatch"
    SEQUENCE_GAP = "sequence gap"
    PREV_HASH_MISMATCH = "prev_hash does not match previous record"


@dataclass(frozen=True)
class ChainBreak:
    """The first record of a chain that does not verify. `sequence` is the position where it was found: the
    sequence it should carry, which `entry.sequence` may contradict."""

    sequence: int
    entry: AuditEntry
    failure: ChainFailure

    @property
    def entry_id(self) -> str:
        return self.entry.id


def canonical_bytes(entry: AuditEntry) -> bytes:
    """The bytes `hash` covers: every field of `entry` except `hash`, as compact JSON with sorted keys.

    The format must never change, as every stored hash depends on it; a golden test pins it. Each choice keeps it
    identical across Python versions, replicas and storage round trips: sorted keys at every level (a dict's order
    is how it was built, not what it holds), UTF-8 without escapes, times in UTC with exactly six fractional digits
    (Python, PostgreSQL and protobuf all hold microseconds), and numbers in details taken as the doubles
    google.protobuf.Struct carries (1 and 1.0 are the same number on the wire, so they serialise alike).
    ValueError for naive times, non-finite numbers and details that are not JSON.
    """
    document = {
        "id": entry.id,
        "zone_id": entry.zone_id,
        "org_id": entry.org_id,
        "actor_id": entry.actor_id,
        "actor_role": entry.actor_role,
        "actor_service": entry.actor_service,
        "action": entry.action,
        "outcome": entry.outcome,
        "resource_type": entry.resource_type,
        "resource_id": entry.resource_id,
        "ip_address": entry.ip_address,
        "user_agent": entry.user_agent,
        "request_id": entry.request_id,
        "details": canonical_details(entry.details),
        "event_time": _rfc3339(entry.event_time),
        "sequence": entry.sequence,
        "prev_hash": entry.prev_hash,
        "record_time": _rfc3339(entry.record_time),
    }
    try:
        return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as error:
        raise ValueError(f"the audit record does not serialise: {error}") from error


def record_hash(prev_hash: str, canonical: bytes) -> str:
    """Hex SHA-256 over `prev_hash` then the record's canonical bytes.

    `prev_hash` is always 64 hex digits, so where it ends and the record begins is unambiguous. Unkeyed on
    purpose: the module docstring says why an anchored plain chain beats an HMAC here.
    """
    return hashlib.sha256(prev_hash.encode() + canonical).hexdigest()


def seal(draft: AuditDraft, *, sequence: int, prev_hash: str, record_time: datetime) -> AuditEntry:
    """`draft` placed at `sequence` of its zone's chain after the record whose hash is `prev_hash`."""
    if sequence < 1:
        raise ValueError(f"audit sequences start at 1, not {sequence}")
    draft_fields = {draft_field.name: getattr(draft, draft_field.name) for draft_field in fields(AuditDraft)}
    unsealed = AuditEntry(**draft_fields, sequence=sequence, prev_hash=prev_hash, record_time=record_time, hash="")
    return replace(unsealed, hash=record_hash(prev_hash, canonical_bytes(unsealed)))


def verify_chain(
    entries: Iterable[AuditEntry], start_prev_hash: str = GENESIS_HASH, start_sequence: int = 1
) -> ChainBreak | None:
    """The first record of `entries` (one zone's, in sequence order) that does not verify, or None.

    Reads one record at a time and stops at the first break, so a store can stream a long chain, or verify it a
    page at a time by passing the last verified record's hash and sequence + 1 as the next page's start.
    """
    expected_prev_hash = start_prev_hash
    expected_sequence = start_sequence
    for entry in entries:
        # Most specific first: a changed record, then missing ones before it, then a forgery just before it.
        if not _intact(entry):
            return ChainBreak(expected_sequence, entry, ChainFailure.HASH_MISMATCH)
        if entry.sequence != expected_sequence:
            return ChainBreak(expected_sequence, entry, ChainFailure.SEQUENCE_GAP)
        if entry.prev_hash != expected_prev_hash:
            return ChainBreak(expected_sequence, entry, ChainFailure.PREV_HASH_MISMATCH)
        expected_prev_hash = entry.hash
        expected_sequence += 1
    return None


def canonical_details(details: Mapping[str, object]) -> dict[str, JsonValue]:
    """`details` as the JSON its hash covers: mappings as dicts, sequences as lists, each number as its double
    (integral ones below 2**53 as ints). ValueError, naming where, for anything else."""
    return _canonical_object(details, "details", 1)


def validate_draft(draft: AuditDraft, field_prefix: str = "record") -> AuditDraft:
    """`draft` as it will be stored, or InvalidArgument naming every field (under `field_prefix`) that is wrong.

    The user agent is cut to `MAX_USER_AGENT` characters rather than refused: it is whatever the end client
    sent, and losing the record over it would be worse than keeping its first part. The IP address is stored in
    its compressed form.
    """
    violations = Violations()
    accepted = _checked_draft(violations, draft, field_prefix)
    violations.raise_if_any("the audit record is invalid")
    return accepted


def to_message(entry: AuditEntry) -> resources_pb2.AuditRecord:
    record = resources_pb2.AuditRecord(
        id=entry.id,
        zone_id=entry.zone_id,
        org_id=entry.org_id,
        actor_id=entry.actor_id,
        actor_role=role_value(entry.actor_role) if entry.actor_role else resources_pb2.ROLE_UNSPECIFIED,
        actor_service=entry.actor_service,
        action=entry.action,
        outcome=OUTCOME_VALUES[entry.outcome] if entry.outcome else resources_pb2.AUDIT_OUTCOME_UNSPECIFIED,
        resource_type=entry.resource_type,
        resource_id=entry.resource_id,
        ip_address=entry.ip_address,
        user_agent=entry.user_agent,
        request_id=entry.request_id,
        sequence=entry.sequence,
        prev_hash=entry.prev_hash,
        hash=entry.hash,
    )
    record.details.update(canonical_details(entry.details))
    record.event_time.FromDatetime(entry.event_time)
    record.record_time.FromDatetime(entry.record_time)
    return record


def draft_from_message(
    record: resources_pb2.AuditRecord, *, actor_service: str, field_prefix: str = "record"
) -> AuditDraft:
    """The validated draft a writer sent (see `validate_draft`), or InvalidArgument naming every wrong field.

    `actor_service` is the writer's mesh identity: the record's own is output-only, like its chain fields, and
    ignored. The event time keeps microseconds, the precision the chain stores.
    """
    violations = Violations()
    violations.check(record.HasField("event_time"), f"{field_prefix}.event_time", "required")
    actor_role = _actor_role(violations, f"{field_prefix}.actor_role", record.actor_role)
    outcome = _outcome(violations, f"{field_prefix}.outcome", record.outcome)
    draft = AuditDraft(
        id=record.id,
        zone_id=record.zone_id,
        org_id=record.org_id,
        actor_id=record.actor_id,
        actor_role=actor_role,
        actor_service=actor_service,
        action=record.action,
        outcome=outcome,
        resource_type=record.resource_type,
        resource_id=record.resource_id,
        ip_address=record.ip_address,
        user_agent=record.user_agent,
        request_id=record.request_id,
        details=json_format.MessageToDict(record.details),
        event_time=record.event_time.ToDatetime(tzinfo=UTC),
    )
    accepted = _checked_draft(violations, draft, field_prefix)
    violations.raise_if_any("the audit record is invalid")
    return accepted


def _intact(entry: AuditEntry) -> bool:
    try:
        canonical = canonical_bytes(entry)
    except ValueError:
        # Content that cannot be serialised could never have been sealed: it was changed afterwards.
        return False
    return record_hash(entry.prev_hash, canonical) == entry.hash


def _rfc3339(moment: datetime) -> str:
    # astimezone would read a naive time as the local zone, which differs between machines.
    if moment.utcoffset() is None:
        raise ValueError(f"audit times must be timezone-aware, not {moment!r}")
    # isoformat, not strftime: strftime's %Y does not pad years below 1000 on every platform.
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _canonical_object(value: Mapping[Any, object], path: str, depth: int) -> dict[str, JsonValue]:
    _check_depth(path, depth)
    canonical: dict[str, JsonValue] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValueError(f"{path} has a key that is not a string: {key!r}")
        _check_text(key, f"{path} key {key!r}")
        canonical[key] = _canonical_value(item, f"{path}.{key}", depth + 1)
    return canonical


def _canonical_value(value: object, path: str, depth: int) -> JsonValue:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        _check_text(value, path)
        return value
    if isinstance(value, int | float):
        return _canonical_number(value, path)
    if isinstance(value, Mapping):
        return _canonical_object(value, path, depth)
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        _check_depth(path, depth)
        return [_canonical_value(item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value)]
    raise ValueError(f"{path} is a {type(value).__name__}, not a JSON value")


def _check_depth(path: str, depth: int) -> None:
    if depth > MAX_DETAILS_DEPTH:
        raise ValueError(f"{path} nests deeper than {MAX_DETAILS_DEPTH} levels")


def _canonical_number(value: int | float, path: str) -> int | float:
    # A float that is not finite has no JSON form: it would be stored as null or a string and never hash alike.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} is {value}: NaN and infinities are not JSON numbers")
    try:
        double = float(value)
    except OverflowError as error:
        raise ValueError(f"{path} is too large for a JSON number") from error
    if double.is_integer() and abs(double) < _EXACT_INTEGERS:
        return int(double)
    return double


def _check_text(text: str, path: str) -> None:
    problem = _text_problem(text)
    if problem:
        raise ValueError(f"{path} {problem}")


def _text_problem(text: str) -> str | None:
    """Why `text` cannot be stored, or None: PostgreSQL refuses NUL, and lone surrogates are not UTF-8."""
    if "\0" in text:
        return "must not contain NUL characters"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None


def _actor_role(violations: Violations, path: str, role: resources_pb2.Role.ValueType) -> str:
    if role == resources_pb2.ROLE_UNSPECIFIED:
        return ""
    try:
        return role_name(role)
    except ValueError:
        violations.add(path, f"unknown role {role}")
        return ""


def _outcome(violations: Violations, path: str, outcome: resources_pb2.AuditOutcome.ValueType) -> str:
    if outcome == resources_pb2.AUDIT_OUTCOME_UNSPECIFIED:
        return ""
    name = OUTCOMES.get(outcome)
    if name is None:
        violations.add(path, f"unknown outcome {outcome}")
        return ""
    return name


def _checked_draft(violations: Violations, draft: AuditDraft, prefix: str) -> AuditDraft:
    def check_text(name: str, value: str, limit: int, *, required: bool = False) -> None:
        path = f"{prefix}.{name}"
        problem = _text_problem(value)
        if problem:
            violations.add(path, problem)
        elif required and not value:
            violations.add(path, "required")
        elif len(value) > limit:
            violations.add(path, f"at most {limit} characters")

    # A PostgreSQL uuid column would hand back another spelling of a differently written UUID, and the record's
    # hash covers the spelling.
    try:
        canonical_id = str(uuid.UUID(draft.id)) == draft.id
    except ValueError:
        canonical_id = False
    violations.check(canonical_id, f"{prefix}.id", "a UUID in lower-case hyphenated form")
    check_text("zone_id", draft.zone_id, MAX_ID, required=True)
    for name in ("org_id", "actor_id", "actor_service", "resource_id", "request_id"):
        check_text(name, getattr(draft, name), MAX_ID)
    violations.check(
        len(draft.action) <= MAX_ACTION and bool(ACTION.fullmatch(draft.action)),
        f"{prefix}.action",
        f"required: 1-{MAX_ACTION} lower-case letters and '_'",
    )
    violations.check(
        len(draft.resource_type) <= MAX_RESOURCE_TYPE and bool(RESOURCE_TYPE.fullmatch(draft.resource_type)),
        f"{prefix}.resource_type",
        f"at most {MAX_RESOURCE_TYPE} lower-case letters, '_' and '.'",
    )
    violations.check(
        not draft.actor_role or draft.actor_role in ROLE_PERMISSIONS,
        f"{prefix}.actor_role",
        f"empty or one of {', '.join(ROLE_PERMISSIONS)}",
    )
    violations.check(
        not draft.outcome or draft.outcome in OUTCOME_VALUES,
        f"{prefix}.outcome",
        f"empty or one of {', '.join(OUTCOME_VALUES)}",
    )
    violations.check(draft.event_time.utcoffset() is not None, f"{prefix}.event_time", "must be timezone-aware")

    ip_address = draft.ip_address
    if ip_address:
        try:
            ip_address = str(ipaddress.ip_address(ip_address))
        except ValueError:
            violations.add(f"{prefix}.ip_address", "an IPv4 or IPv6 address")

    user_agent = draft.user_agent[:MAX_USER_AGENT]
    check_text("user_agent", user_agent, MAX_USER_AGENT)

    details: Mapping[str, object] = draft.details
    try:
        details = canonical_details(draft.details)
    except ValueError as error:
        violations.add(f"{prefix}.details", str(error))
    else:
        size = len(orjson.dumps(details, option=orjson.OPT_SORT_KEYS))
        violations.check(size <= MAX_DETAILS_BYTES, f"{prefix}.details", f"at most {MAX_DETAILS_BYTES} bytes as JSON")

    return replace(draft, ip_address=ip_address, user_agent=user_agent, details=details)
