"""Between asyncpg rows and protobuf messages, as every service's store needs: messages kept in json/jsonb
columns, and timestamp columns copied into Timestamp fields."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
from google.protobuf import json_format
from google.protobuf.message import Message


def message_json(message: Message) -> str:
    """A message as its column holds it: the contract's JSON form, field names as in the proto."""
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None)


def json_column(value: object) -> Any:
    """asyncpg returns json/jsonb columns as text unless a codec is set."""
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def set_times(message: Message, row: asyncpg.Record, fields: Sequence[str]) -> None:
    """Copies the row's timestamp columns into the message's Timestamp fields of the same names (NULL: unset)."""
    for field in fields:
        if row[field] is not None:
            getattr(message, field).FromDatetime(row[field])
