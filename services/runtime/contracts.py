"""Reading the compiled contracts (gen/descriptor/megacity.binpb): services, methods, HTTP rules, idempotency, access.

The descriptor set is produced by `megacity gen` from proto/; the runtime, the edge compiler and the Linkerd
generator all read the contracts through this module, so they agree on what is public, what is retryable and
what a person needs to call it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from google.api import annotations_pb2
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool

from megacity.common.v1 import access_pb2
from services.runtime.catalog import REPO

DEFAULT_DESCRIPTOR_SET = REPO / "gen" / "descriptor" / "megacity.binpb"
# The google.api.http option; importing annotations_pb2 also registers it, so parsed options carry it.
HTTP_RULE = annotations_pb2.http.full_name


@dataclass(frozen=True)
class MethodAccess:
    """What a person needs to call a public method: its megacity.common.v1.access option."""

    permission: str  # the `resource:action` the caller's role must grant; empty: any signed-in person
    anonymous: bool  # callable without an access token


@dataclass(frozen=True)
class MethodInfo:
    service: str
    name: str
    client_streaming: bool
    server_streaming: bool
    rest: bool  # has a google.api.http rule: the edge transcodes REST/JSON to it
    idempotent: bool
    access: MethodAccess | None  # declared on the methods people call through the edge, and only there

    @property
    def public(self) -> bool:
        """People call it through the edge: REST/JSON when `rest`, otherwise gRPC passed through (live streams)."""
        return self.access is not None

    @property
    def path(self) -> str:
        """The gRPC request path: /package.Service/Method."""
        return f"/{self.service}/{self.name}"


def descriptor_set_path() -> Path:
    return Path(os.environ.get("MEGACITY_DESCRIPTOR_SET", str(DEFAULT_DESCRIPTOR_SET)))


def load_pool(path: Path) -> descriptor_pool.DescriptorPool:
    files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


@cache
def default_pool() -> descriptor_pool.DescriptorPool:
    return load_pool(descriptor_set_path())


def _method_info(method: descriptor.MethodDescriptor) -> MethodInfo:
    # Parsed again: the pool's options come from the descriptor set and keep any extension that was unknown when
    # they were first parsed as an unknown field; parsing now resolves the extensions registered by the imports.
    options = descriptor_pb2.MethodOptions.FromString(method.GetOptions().SerializeToString())
    level = options.idempotency_level
    access = None
    if options.HasExtension(access_pb2.access):
        declared = options.Extensions[access_pb2.access]
        access = MethodAccess(declared.permission, declared.anonymous)
    return MethodInfo(
        service=method.containing_service.full_name,
        name=method.name,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
        rest=any(field.full_name == HTTP_RULE for field, _ in options.ListFields()),
        idempotent=level in (descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT),
        access=access,
    )


def service_methods(pool: descriptor_pool.DescriptorPool, service: str) -> tuple[MethodInfo, ...] | None:
    """The methods of a gRPC service, or None when the contracts do not define it (e.g. grpc.health.v1)."""
    try:
        found = pool.FindServiceByName(service)
    except KeyError:
        return None
    return tuple(_method_info(method) for method in found.methods)
