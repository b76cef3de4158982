"""mTLS and per-method authorization through the real wire (grpc.aio over TLS, the catalog's policy)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from structlog.testing import capture_logs

from megacity.testing.v1 import probe_pb2, probe_pb2_grpc
from services.runtime.config import Transport
from services.runtime.errors import error_info, status_from_error
from services.runtime.pki import ensure_credentials
from tests.support.mesh import channel_as, mesh_catalog, mtls_channel, running_probe

ECHO = probe_pb2.EchoRequest(payload="hello")


async def _echo(channel: grpc.aio.Channel, timeout: float = 3.0) -> probe_pb2.EchoResponse:
    async with channel:
        return await probe_pb2_grpc.ProbeServiceStub(channel).Echo(ECHO, timeout=timeout)


async def _refused(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _echo(channel)
    return refused.value


async def test_allowed_identity_succeeds(pki_dir: Path) -> None:
    async with running_probe(pki_dir) as service:
        reply = await _echo(channel_as("ops", service, pki_dir))
    assert reply.payload == "hello"


async def test_the_server_sees_the_callers_spiffe_identity(pki_dir: Path) -> None:
    async with running_probe(pki_dir) as service, channel_as("ops", service, pki_dir) as channel:
        reply = await probe_pb2_grpc.ProbeServiceStub(channel).Inspect(probe_pb2.InspectRequest())
    assert reply.caller_identity == "ops"


async def test_no_client_certificate_is_refused(pki_dir: Path) -> None:
    catalog = mesh_catalog()
    ca = ensure_credentials(pki_dir, catalog, "ops").root_certificates
    async with running_probe(pki_dir, catalog) as service:
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{service.port}",
            grpc.ssl_channel_credentials(ca),
            options=[("grpc.ssl_target_name_override", "probe.megacity.local")],
        )
        refused = await _refused(channel)
    assert refused.code() is grpc.StatusCode.UNAVAILABLE


async def test_certificate_from_another_ca_is_refused(pki_dir: Path, tmp_path: Path) -> None:
    catalog = mesh_catalog()
    impostor = ensure_credentials(tmp_path / "other-pki", catalog, "ops")  # same name, different CA
    genuine_ca = ensure_credentials(pki_dir, catalog, "ops").root_certificates
    async with running_probe(pki_dir, catalog) as service:
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{service.port}",
            grpc.ssl_channel_credentials(genuine_ca, impostor.private_key, impostor.certificate_chain),
            options=[("grpc.ssl_target_name_override", "probe.megacity.local")],
        )
        refused = await _refused(channel)
    assert refused.code() is grpc.StatusCode.UNAVAILABLE


async def test_plaintext_connection_is_refused(pki_dir: Path) -> None:
    async with running_probe(pki_dir) as service:
        refused = await _refused(grpc.aio.insecure_channel(f"127.0.0.1:{service.port}"))
    assert refused.code() is grpc.StatusCode.UNAVAILABLE


async def test_client_refuses_a_server_holding_another_services_certificate(pki_dir: Path) -> None:
    catalog = mesh_catalog()
    async with running_probe(pki_dir, catalog) as service:
        expecting_auth = mtls_channel(ensure_credentials(pki_dir, catalog, "ops"), service.port, "auth", catalog)
        refused = await _refused(expecting_auth)
    assert refused.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("identity", "method", "request_message"),
    [
        ("exam", "Echo", ECHO),
        ("edge", "Inspect", probe_pb2.InspectRequest()),
        ("auth", "Sleep", probe_pb2.SleepRequest(seconds=0)),
    ],
)
async def test_identity_the_catalog_does_not_allow_is_denied_and_logged(
    pki_dir: Path, identity: str, method: str, request_message: Message
) -> None:
    async with running_probe(pki_dir) as service, channel_as(identity, service, pki_dir) as channel:
        call = getattr(probe_pb2_grpc.ProbeServiceStub(channel), method)
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as denied:
            await call(request_message)
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    info = error_info(status_from_error(denied.value))
    assert info is not None
    assert info.reason == "CALLER_NOT_ALLOWED"
    assert info.metadata["caller"] == identity
    denial = [entry for entry in logs if entry["event"] == "authz.denied"]
    assert denial
    assert denial[0]["caller"] == identity
    assert denial[0]["method"] == f"/megacity.testing.v1.ProbeService/{method}"


async def test_edge_is_allowed_exactly_what_the_catalog_grants(pki_dir: Path) -> None:
    async with running_probe(pki_dir) as service:
        reply = await _echo(channel_as("edge", service, pki_dir))
    assert reply.payload == "hello"


LINKERD_ID = "{name}.megacity.serviceaccount.identity.linkerd.cluster.local"


@pytest.mark.parametrize(
    ("client_id", "expected"),
    [
        (LINKERD_ID.format(name="ops"), grpc.StatusCode.OK),
        (LINKERD_ID.format(name="exam"), grpc.StatusCode.PERMISSION_DENIED),
        ("ops.othernamespace.serviceaccount.identity.linkerd.cluster.local", grpc.StatusCode.UNAUTHENTICATED),
        ("not-a-linkerd-identity", grpc.StatusCode.UNAUTHENTICATED),
        (None, grpc.StatusCode.UNAUTHENTICATED),
    ],
)
async def test_behind_linkerd_the_identity_comes_from_the_proxy(
    pki_dir: Path, client_id: str | None, expected: grpc.StatusCode
) -> None:
    metadata = (("l5d-client-id", client_id),) if client_id else ()
    async with (
        running_probe(pki_dir, transport=Transport.LINKERD) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        stub = probe_pb2_grpc.ProbeServiceStub(channel)
        try:
            await stub.Echo(ECHO, metadata=metadata, timeout=3)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            code = error.code()
    assert code is expected
