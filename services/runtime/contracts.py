"""Reading the compiled contracts (gen/descriptor/megacity.binpb): services, methods, HTTP rules, idempotency.

The descriptor set is produced by `megacity gen` from proto/; the runtime, the edge compiler and the Linkerd
generator all read the contracts through this module, so they agree on what is public and what is retryable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from google.api import annotations_pb2
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool

from services.runtime.catalog import REPO

DEFAULT_DESCRIPTOR_SET = REPO / "gen" / "descriptor" / "megacity.binpb"
# The google.api.http option; importing annotations_pb2 also registers it, so parsed options carry it.
HTTP_RULE = annotations_pb2.http.full_name


@dataclass(frozen=True)
class MethodInfo:
    service: str
    name: str
    client_streaming: bool
    server_streaming: bool
    public: bool
    idempotent: bool

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
    options = descriptor_pb2.MethodOptions.FromString(method.GetOptions().SerializeToString())
    level = options.idempotency_level
    return MethodInfo(
        service=method.containing_service.full_name,
        name=method.name,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
        public=any(field.full_name == HTTP_RULE for field, _ in options.ListFields()),
        idempotent=level in (descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT),
    )


def service_methods(pool: descriptor_pool.DescriptorPool, service: str) -> tuple[MethodInfo, ...] | None:
    """The methods of a gRPC service, or None when the contracts do not define it (e.g. grpc.health.v1)."""
    try:
        found = pool.FindServiceByName(service)
    except KeyError:
        return None
    return tuple(_method_info(method) for method in found.methods)
