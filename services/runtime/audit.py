"""The audit trail, as every service writes to it: the security-relevant actions it decides (DESIGN.md section 4).

Records go to the auth service, which keeps the tamper-evident log (AuthService.WriteAuditRecord; the auth
service itself appends locally). `Auditor.record` fills in what the call context knows: the acting person,
zone and organisation, request id, client address and user agent. A record is written before the call
answers; when the log cannot be reached the failure is logged with the record's content (as an
`audit.write_failed` error line, so log shipping keeps it) and the call's own answer is unchanged: an
unreachable audit log must not turn a denial into a grant, nor a committed change into an error.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from google.protobuf import json_format

from megacity.auth.v1 import auth_service_pb2, auth_service_pb2_grpc, resources_pb2
from services.runtime import callcontext
from services.runtime.permissions import role_value

if TYPE_CHECKING:  # channels build on the interceptors, which use this module
    from services.runtime.channels import ChannelFactory

# Writes one record durably (or raises).
AuditSink = Callable[[resources_pb2.AuditRecord], Awaitable[None]]

OUTCOMES = {
    "success": resources_pb2.AUDIT_OUTCOME_SUCCESS,
    "failure": resources_pb2.AUDIT_OUTCOME_FAILURE,
    "denied": resources_pb2.AUDIT_OUTCOME_DENIED,
}
_log = structlog.get_logger("megacity.audit")


def remote_audit(channels: ChannelFactory) -> AuditSink:
    async def write(record: resources_pb2.AuditRecord) -> None:
        stub = auth_service_pb2_grpc.AuthServiceStub(channels.channel("auth"))
        await stub.WriteAuditRecord(auth_service_pb2.WriteAuditRecordRequest(record=record), timeout=5.0)

    return write


def client_of(context: grpc.aio.ServicerContext[Any, Any] | None) -> tuple[str, str]:
    """The client's address (the edge's X-Forwarded-For, else the peer's) and user agent."""
    if context is None:
        return "", ""
    address = agent = ""
    for key, value in context.invocation_metadata() or ():
        if key == "x-forwarded-for" and isinstance(value, str):
            address = value.split(",")[0].strip()
        elif key == "user-agent" and isinstance(value, str):
            agent = value
    if not address:
        peer = context.peer() or ""  # ipv4:127.0.0.1:5000, ipv6:[::1]:5000
        address = peer.partition(":")[2].rsplit(":", 1)[0].strip("[]")
    return address[:64], agent[:512]


class Auditor:
    def __init__(self, sink: AuditSink) -> None:
        self._sink = sink

    async def record(
        self,
        action: str,
        outcome: str,
        *,
        resource_type: str = "",
        resource_id: str = "",
        details: Mapping[str, object] | None = None,
        zone_id: str = "",
        org_id: str = "",
        actor_id: str = "",
        actor_role: str = "",
    ) -> None:
        """Records `action` on behalf of the call being served; explicit arguments override what the call
        context says (a login's actor is known before any token exists)."""
        call = callcontext.current.get()
        person = call.principal if call else None
        address, agent = client_of(call.context if call else None)
        record = resources_pb2.AuditRecord(
            id=str(uuid.uuid4()),
            zone_id=zone_id or (person.zone_id if person else "") or (call.zone if call else ""),
            org_id=org_id or (person.org_id if person else ""),
            actor_id=actor_id or (person.user_id if person else ""),
            action=action,
            outcome=OUTCOMES[outcome],
            resource_type=resource_type,
            resource_id=resource_id,
            ip_address=address,
            user_agent=agent,
            request_id=call.request_id if call else "",
        )
        role = actor_role or (person.role if person else "")
        if role:
            record.actor_role = role_value(role)
        if details:
            json_format.ParseDict(dict(details), record.details)
        record.event_time.FromDatetime(datetime.now(UTC))
        if not record.zone_id:
            _log.error("audit.no_zone", action=action, resource_type=resource_type, resource_id=resource_id)
            return
        try:
            await self._sink(record)
        except Exception as error:
            _log.error("audit.write_failed", error=str(error), record=_as_dict(record))


def _as_dict(record: resources_pb2.AuditRecord) -> dict[str, object]:
    return json_format.MessageToDict(record, preserving_proto_field_name=True)
