"""Page tokens for List RPCs (`page_size` / `page_token`, DESIGN.md section 3).

A token is the position after the last item served, bound to the query that produced it: a token used
with other filters, or one this server never issued, is INVALID_ARGUMENT (INVALID_PAGE_TOKEN) rather than
a silently wrong page. Tokens are opaque to clients but not secret: row-level security, not the token,
decides what a caller may see.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence

import orjson

from services.runtime.errors import ErrorReason, InvalidArgument

DEFAULT_PAGE_SIZE = 50


def page_size(requested: int, maximum: int, default: int = DEFAULT_PAGE_SIZE) -> int:
    """The page size to serve: the default for 0, at most `maximum`; a negative size is the caller's error."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", [("page_size", "must be 0 (default) or positive")])
    return min(requested or default, maximum)


def _fingerprint(query: Sequence[object]) -> str:
    return hashlib.sha256(orjson.dumps(list(query))).hexdigest()[:16]


def encode(position: Sequence[str | int], query: Sequence[object]) -> str:
    """The token for the page after `position`, valid only for the same `query` (its filters, in order)."""
    payload = orjson.dumps({"p": list(position), "q": _fingerprint(query)})
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode(token: str, query: Sequence[object]) -> list[str | int] | None:
    """The position a token resumes after (None for the first page)."""
    if not token:
        return None
    invalid = InvalidArgument(
        "page_token is not one this query issued",
        [("page_token", "use the next_page_token of the previous page, with the same filters")],
        reason=ErrorReason.ERROR_REASON_INVALID_PAGE_TOKEN,
    )
    try:
        payload = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        raise invalid from None
    if not isinstance(payload, dict) or payload.get("q") != _fingerprint(query):
        raise invalid
    position = payload.get("p")
    if not isinstance(position, list) or not all(isinstance(item, str | int) for item in position):
        raise invalid
    return position
