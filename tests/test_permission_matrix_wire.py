"""The whole permission matrix through the wire: every role against every public RPC of every service.

Generated from the one place RPCs declare their permission (the `(megacity.common.v1.access)` option, read by
services/runtime/contracts.py): a role whose permissions do not grant it gets PERMISSION_DENIED with reason
PERMISSION_MISSING from the service's runtime before the handler runs; a role that holds it gets past that
check (the empty request may then fail validation, or the RPC may not be built yet, but never for lack of the
permission). Streaming RPCs are left to their services' tests.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import grpc
from google.protobuf import message_factory

from services.runtime.catalog import load_catalog
from services.runtime.contracts import MethodInfo, default_pool, service_methods
from services.runtime.permissions import ROLE_PERMISSIONS, grants
from services.runtime.server import Service
from tests.support.accounts import PEOPLE_SERVICES, Caller, People, reason
from tests.support.mesh import channel_as, serialize

# Calls that would end the role's own session (and so every later call of the matrix).
SESSION_ENDING = {"/megacity.auth.v1.AuthService/Logout"}


def _matrix_methods() -> list[tuple[str, MethodInfo]]:
    catalog = load_catalog()
    found = []
    for name in PEOPLE_SERVICES:
        for service in catalog.service(name).grpc_services:
            for method in service_methods(default_pool(), service) or ():
                if method.access is None or method.access.anonymous:
                    continue
                if method.client_streaming or method.server_streaming or method.path in SESSION_ENDING:
                    continue
                found.append((name, method))
    return found


async def test_every_role_against_every_public_rpc(people: People, people_services: dict[str, Service]) -> None:
    callers: dict[str, Caller] = {
        role: await people.as_new_user("univ", "univ-public", role) for role in ROLE_PERMISSIONS
    }
    methods = _matrix_methods()
    assert len(methods) > 80
    mismatches: list[str] = []
    async with AsyncExitStack() as stack:
        channels = {
            name: await stack.enter_async_context(channel_as("edge", service, people.pki_dir))
            for name, service in people_services.items()
        }
        for name, method in methods:
            descriptor = default_pool().FindMethodByName(f"{method.service}.{method.name}")
            request = message_factory.GetMessageClass(descriptor.input_type)()
            call = channels[name].unary_unary(
                method.path, request_serializer=serialize, response_deserializer=lambda raw: raw
            )
            assert method.access is not None
            for role, caller in callers.items():
                granted = grants(ROLE_PERMISSIONS[role], method.access.permission)
                try:
                    await call(request, metadata=caller.metadata(), timeout=10)
                    outcome = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as error:
                    outcome = (error.code(), reason(error))
                denied = outcome == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING")
                if denied == granted or outcome[0] in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL):
                    mismatches.append(f"{role} on {method.path} ({method.access.permission!r}): {outcome}")
    assert not mismatches, "\n".join(mismatches)
