"""Public RPCs called through a real edge by their OpenAPI operationId, and a record of each that succeeded.

A `Scenario` builds each request from the operation's entry in the generated OpenAPI document (its method, its
path template with the path parameters filled in, only the query parameters the document declares, a JSON body
only where it declares one), so a story that walks the API exercises exactly what the edge publishes. `ok` insists
on HTTP 200 and records the operation; the story then checks the body for what the call was meant to do.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

from gateway.edge import OPENAPI_DOCUMENT
from tests.support.edge import UNIV, Edge, Reply


@dataclass(frozen=True)
class Operation:
    """One operation of the OpenAPI document: a public RPC's HTTP rule."""

    operation_id: str
    method: str
    template: str
    path_parameters: frozenset[str]
    query_parameters: frozenset[str]
    has_body: bool


@cache
def operations() -> Mapping[str, Operation]:
    """Every operation of the generated OpenAPI document, by operationId (`Service_Method`)."""
    document = json.loads(OPENAPI_DOCUMENT.read_text())
    found: dict[str, Operation] = {}
    for template, verbs in document["paths"].items():
        for verb, operation in verbs.items():
            parameters = operation.get("parameters", [])
            found[operation["operationId"]] = Operation(
                operation_id=operation["operationId"],
                method=verb.upper(),
                template=template,
                path_parameters=frozenset(p["name"] for p in parameters if p["in"] == "path"),
                query_parameters=frozenset(p["name"] for p in parameters if p["in"] == "query"),
                has_body="requestBody" in operation,
            )
    return found


def operations_of(service: str) -> set[str]:
    """The operationIds of one service (`AuthService`, ...)."""
    return {operation_id for operation_id in operations() if operation_id.partition("_")[0] == service}


def reason_of(reply: Reply) -> str:
    """The ErrorInfo reason of an error reply (google.rpc.Status JSON); '' without one."""
    details = reply.body.get("details", []) if isinstance(reply.body, dict) else []
    return next((d.get("reason", "") for d in details if d.get("@type", "").endswith("google.rpc.ErrorInfo")), "")


def _query_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


@dataclass
class Scenario:
    """Calls through `edge` by operationId; `succeeded` holds every operation `ok` saw answer 200."""

    edge: Edge
    succeeded: set[str] = field(default_factory=set)

    async def call(
        self,
        operation_id: str,
        *,
        token: str = "",
        path: Mapping[str, str] | None = None,
        query: Mapping[str, object] | None = None,
        body: object = None,
        host: str = UNIV,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        operation = operations()[operation_id]
        given = dict(path or {})
        assert set(given) == operation.path_parameters, f"{operation_id} takes {sorted(operation.path_parameters)}"
        url = operation.template
        for name, value in given.items():
            url = url.replace(f"{{{name}}}", urllib.parse.quote(value, safe=""))
        if query:
            undocumented = set(query) - operation.query_parameters
            assert not undocumented, f"{operation_id} documents no query parameter {sorted(undocumented)}"
            url += "?" + urllib.parse.urlencode({name: _query_value(value) for name, value in query.items()})
        if operation.has_body:
            body = {} if body is None else body
        else:
            assert body is None, f"{operation_id} takes no body"
        sent = dict(headers or {})
        if token:
            sent["authorization"] = f"Bearer {token}"
        return await self.edge.call(operation.method, url, host=host, body=body, headers=sent)

    async def ok(
        self,
        operation_id: str,
        *,
        token: str = "",
        path: Mapping[str, str] | None = None,
        query: Mapping[str, object] | None = None,
        body: object = None,
        host: str = UNIV,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The JSON body of a call that must succeed (HTTP 200); records the operation as succeeded."""
        reply = await self.call(
            operation_id, token=token, path=path, query=query, body=body, host=host, headers=headers
        )
        assert reply.status == 200, f"{operation_id}: HTTP {reply.status} {reply.body}"
        assert isinstance(reply.body, dict), f"{operation_id}: not a JSON object: {reply.body!r}"
        self.succeeded.add(operation_id)
        return reply.body
