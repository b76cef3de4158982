"""Every catalog service starts from its own module on a migrated database, reports SERVING, and answers its
contract: an empty, anonymous request is refused cleanly (no token, bad input, or UNIMPLEMENTED with reason
NOT_IMPLEMENTED until the RPC is built), never with UNKNOWN or INTERNAL.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ops.embedded import EmbeddedRedis
from services.auth.pii import generate_key_spec
from services.runtime.catalog import load_catalog
from services.runtime.contracts import default_pool, service_methods
from services.runtime.errors import error_info, status_from_error
from services.runtime.policy import MethodPolicy, resolve_rules
from tests.support.mesh import channel_as, make_config, running, serialize

CATALOG = load_catalog()


def _unary_method_and_caller(name: str) -> tuple[str, type[Message], str]:
    """A unary method of the service, its request class, and a caller the catalog allows."""
    entry = CATALOG.service(name)
    pool = default_pool()
    policy = MethodPolicy(resolve_rules(entry, pool))
    for service in entry.grpc_services:
        for method in service_methods(pool, service) or ():
            if method.client_streaming or method.server_streaming:
                continue
            descriptor = pool.FindMethodByName(f"{service}.{method.name}")
            request = message_factory.GetMessageClass(descriptor.input_type)
            caller = next(c for c in CATALOG.identities if policy.allows(c, method.path))
            return method.path, request, caller
    raise AssertionError(f"{name} has no unary method")


@pytest.mark.parametrize("name", list(CATALOG.services))
async def test_service_serves_its_contract(
    name: str,
    pki_dir: Path,
    identity_database: dict[str, str],
    redis: EmbeddedRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEGACITY_PII_KEYS", generate_key_spec("test"))
    config = make_config(CATALOG, name, pki_dir, database_url=identity_database.get(name), redis_url=redis.url)
    path, request_class, caller = _unary_method_and_caller(name)
    async with running(config) as service:
        async with channel_as("ops", service, pki_dir) as ops:
            health = await health_pb2_grpc.HealthStub(ops).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        async with channel_as(caller, service, pki_dir) as channel:
            call = channel.unary_unary(path, request_serializer=serialize, response_deserializer=lambda raw: raw)
            with pytest.raises(grpc.aio.AioRpcError) as answer:
                await call(request_class(), timeout=5)
    info = error_info(status_from_error(answer.value))
    assert info is not None
    assert answer.value.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
    assert info.reason not in ("", "UNSPECIFIED", "INTERNAL")
