"""The edge's OpenAPI 3 document, generated from the same `google.api.http` annotations the transcoder serves.

Paths and methods from each public RPC's HTTP rule; path parameters from its template, query parameters from the
request's other scalar fields (for rules without a `*` body), the request body and the response as the proto3
JSON mapping of their messages (field names as in the proto, 64-bit integers as strings, enums by name,
well-known types as their JSON forms); server-streaming responses as newline-delimited JSON; every error as
`google.rpc.Status`; bearer tokens on every RPC that is not anonymous. `megacity gen` writes it to
gen/openapi/megacity.json and the edge serves it at /openapi.json.
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool

from gateway.envoy_config import public_routes
from services.runtime.catalog import Catalog

STATUS_SCHEMA = "google.rpc.Status"
_TEMPLATE_VARIABLE = re.compile(r"\{([^}=]+)(=[^}]*)?\}")
_SCALARS: dict[int, dict[str, Any]] = {
    descriptor.FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    descriptor.FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    descriptor.FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    descriptor.FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    descriptor.FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    descriptor.FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    descriptor.FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    descriptor.FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    descriptor.FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    descriptor.FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    descriptor.FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    descriptor.FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    descriptor.FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    descriptor.FieldDescriptor.TYPE_STRING: {"type": "string"},
    descriptor.FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    "google.protobuf.StringValue": {"type": "string", "nullable": True},
    "google.protobuf.BoolValue": {"type": "boolean", "nullable": True},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32", "nullable": True},
    "google.protobuf.UInt32Value": {"type": "integer", "format": "int64", "nullable": True},
    "google.protobuf.Int64Value": {"type": "string", "format": "int64", "nullable": True},
    "google.protobuf.UInt64Value": {"type": "string", "format": "uint64", "nullable": True},
    "google.protobuf.DoubleValue": {"type": "number", "format": "double", "nullable": True},
    "google.protobuf.FloatValue": {"type": "number", "format": "float", "nullable": True},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte", "nullable": True},
}


class _Schemas:
    """Component schemas, collected as operations refer to messages."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Any]] = {}

    def message(self, message: descriptor.Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        if message.full_name not in self.components:
            self.components[message.full_name] = {}  # placeholder: recursive messages refer back to it
            self.components[message.full_name] = {
                "type": "object",
                "properties": {field.name: self.field(field) for field in message.fields},
            }
        return {"$ref": f"#/components/schemas/{message.full_name}"}

    def single(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None:
            return self.message(field.message_type)
        if field.enum_type is not None:
            return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
        return dict(_SCALARS[field.type])

    def field(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        if field.is_repeated:
            return {"type": "array", "items": self.single(field)}
        return self.single(field)


def _http_rule(method: descriptor.MethodDescriptor) -> http_pb2.HttpRule:
    options = descriptor_pb2.MethodOptions.FromString(method.GetOptions().SerializeToString())
    rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]  # type: ignore[index]  # stubs lack it
    return rule


def _verb_and_template(rule: http_pb2.HttpRule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind == "custom":
        return rule.custom.kind.lower(), rule.custom.path
    if kind is None:
        raise ValueError("an HTTP rule without a pattern")
    return kind, str(getattr(rule, kind))


def _query_parameters(
    schemas: _Schemas, request: descriptor.Descriptor, bound: set[str], body: str
) -> list[dict[str, Any]]:
    if body == "*":
        return []
    parameters = []
    for field in request.fields:
        if field.name in bound or field.name == body:
            continue
        is_timestamp = field.message_type is not None and field.message_type.full_name == "google.protobuf.Timestamp"
        if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE and not is_timestamp:
            continue
        parameters.append({"name": field.name, "in": "query", "required": False, "schema": schemas.field(field)})
    return parameters


def _operation(
    schemas: _Schemas, method: descriptor.MethodDescriptor, anonymous: bool
) -> tuple[str, str, dict[str, Any]]:
    rule = _http_rule(method)
    verb, template = _verb_and_template(rule)
    variables = [match.group(1) for match in _TEMPLATE_VARIABLE.finditer(template)]
    path = _TEMPLATE_VARIABLE.sub(lambda match: "{" + match.group(1) + "}", template)
    request = method.input_type
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in variables
    ] + _query_parameters(schemas, request, {name.split(".")[0] for name in variables}, rule.body)
    response_type = method.output_type
    if rule.response_body:
        response_schema = schemas.field(response_type.fields_by_name[rule.response_body])
    else:
        response_schema = schemas.message(response_type)
    media = "application/x-ndjson" if method.server_streaming else "application/json"
    operation: dict[str, Any] = {
        "operationId": f"{method.containing_service.name}_{method.name}",
        "tags": [method.containing_service.full_name],
        "parameters": parameters,
        "responses": {
            "200": {"description": "OK", "content": {media: {"schema": response_schema}}},
            "default": {
                "description": "An error: google.rpc.Status with its details",
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{STATUS_SCHEMA}"}}},
            },
        },
        "security": [] if anonymous else [{"bearerAuth": []}],
    }
    if rule.body:
        body_schema = schemas.message(request) if rule.body == "*" else schemas.field(request.fields_by_name[rule.body])
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema}}}
    return path, verb, operation


def document(catalog: Catalog, pool: descriptor_pool.DescriptorPool) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in public_routes(catalog, pool):
        if not route.method.rest:
            continue  # gRPC only (live streams): not part of the REST surface
        method = pool.FindMethodByName(f"{route.method.service}.{route.method.name}")
        anonymous = route.method.access is not None and route.method.access.anonymous
        path, verb, operation = _operation(schemas, method, anonymous)
        paths.setdefault(path, {})[verb] = operation
    schemas.message(pool.FindMessageTypeByName(STATUS_SCHEMA))
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "DreamSeedAI MegaCity API",
            "version": "v1",
            "description": "Every public RPC of the platform, as the edge serves it. The zone is the host's "
            "(api.<zone domain>).",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


def render(catalog: Catalog, pool: descriptor_pool.DescriptorPool) -> str:
    return json.dumps(document(catalog, pool), indent=1, sort_keys=False) + "\n"
