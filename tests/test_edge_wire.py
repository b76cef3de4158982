"""REST through a real Envoy edge to the auth service over mTLS: zones by host, a forged zone header ignored, a
token of another zone refused, internal RPCs and unknown hosts unreachable, errors as google.rpc.Status JSON, and
the security headers."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from openapi_spec_validator import validate

from gateway.edge import OPENAPI_DOCUMENT
from gateway.envoy_config import SECURITY_HEADERS
from megacity.kzone.v1 import kzone_service_pb2, kzone_service_pb2_grpc
from services.runtime.errors import error_info, status_from_error
from services.runtime.server import Service
from tests.support.accounts import PASSWORD, People
from tests.support.edge import KZONE, UNIV, Edge, RateLimitService, Reply, running_edge


@pytest.fixture
async def edge(people: People, limiter: RateLimitService, tmp_path: Path) -> AsyncIterator[Edge]:
    ports = {"auth": people.auth_service.port, "tenant": people.tenant_service.port}
    async with running_edge(people.pki_dir, ports, limiter.target, tmp_path) as running:
        yield running


def _reason(reply: Reply) -> str:
    return next(
        (detail["reason"] for detail in reply.body.get("details", []) if detail.get("@type", "").endswith("ErrorInfo")),
        "",
    )


async def test_a_person_registers_logs_in_and_reads_themselves_through_the_edge(edge: Edge) -> None:
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    registered = await edge.call(
        "POST", "/api/v1/auth/register", body={"email": email, "password": PASSWORD, "name": "Ada"}
    )
    assert registered.status == 200, registered.body
    assert registered.body["user"]["zone_id"] == "univ"  # from the host; field names as in the proto
    # A client's own zone header is overwritten with the host's zone: this login happens in univ.
    login = await edge.call(
        "POST",
        "/api/v1/auth/login",
        body={"email": email, "password": PASSWORD},
        headers={"x-megacity-zone": "kzone"},
    )
    assert login.status == 200, login.body
    bearer = {"authorization": f"Bearer {login.body['access_token']}"}
    me = await edge.call("GET", "/api/v1/users/me", headers=bearer)
    assert (me.status, me.body["user"]["email"]) == (200, email)
    assert me.headers["x-request-id"]
    for name, value in SECURITY_HEADERS.items():
        assert me.headers[name] == value
    assert "server" not in me.headers

    # A token whose signature does not match is refused at the edge; a valid one passes it (to a service that is
    # not running in this test: 503).
    forged = {"authorization": f"Bearer {login.body['access_token'][:-4]}AAAA"}
    refused = await edge.call("GET", "/api/v1/users/me", headers=forged)
    assert (refused.status, refused.body["code"], refused.headers["content-type"]) == (401, 16, "application/json")
    down = await edge.call("GET", "/api/v1/exams", headers=bearer)
    assert (down.status, down.body["code"]) == (503, 14)

    # The same token at another zone's host: refused by the service, as the zone the edge resolved says.
    elsewhere = await edge.call("GET", "/api/v1/users/me", host=KZONE, headers=bearer)
    assert (elsewhere.status, _reason(elsewhere)) == (403, "ZONE_MISMATCH")
    assert elsewhere.body["code"] == 7

    # Browsers keep the refresh token in a cookie scripts cannot read, and refresh and log out with it.
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"megacity_refresh={login.body['refresh_token']};")
    assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/api/v1/auth"} <= {p.strip() for p in cookie.split(";")}
    jar = {"cookie": f"megacity_refresh={login.body['refresh_token']}"}
    refreshed = await edge.call("POST", "/api/v1/auth/refresh", body={}, headers=jar)
    assert refreshed.status == 200, refreshed.body
    assert refreshed.headers["set-cookie"].startswith(f"megacity_refresh={refreshed.body['refresh_token']};")
    # The old one again: a reuse, which ends the whole session (its access tokens too).
    reused = await edge.call("POST", "/api/v1/auth/refresh", body={}, headers=jar)
    assert reused.status == 401
    assert (await edge.call("GET", "/api/v1/users/me", headers=bearer)).status == 401


async def test_errors_are_google_rpc_status_json(edge: Edge) -> None:
    weak = await edge.call(
        "POST", "/api/v1/auth/register", body={"email": "x@example.com", "password": "short", "name": "X"}
    )
    assert weak.status == 400
    assert weak.body["code"] == 3
    violations = next(d for d in weak.body["details"] if d["@type"].endswith("BadRequest"))["field_violations"]
    assert [violation["field"] for violation in violations] == ["password"]
    wrong = await edge.call("POST", "/api/v1/auth/login", body={"email": "nobody@example.com", "password": PASSWORD})
    assert (wrong.status, wrong.body["code"]) == (401, 16)
    anonymous = await edge.call("GET", "/api/v1/users/me")
    assert anonymous.status == 401


async def test_only_public_rpcs_of_known_hosts_are_reachable(edge: Edge) -> None:
    refusals = [
        ("POST", "/megacity.auth.v1.AuthService/RevokeOrganizationSessions", UNIV, 404, 5),  # internal: no route
        ("GET", "/api/v1/no-such-thing", UNIV, 404, 5),
        ("GET", "/api/v1/users/me?debug=1", UNIV, 400, 3),  # unknown query parameter
        ("GET", "/api/v1/users/me", "api.example.org", 404, 5),  # unknown host
        ("GET", "/api/v1/exams", UNIV, 401, 16),  # no token: refused at the edge
    ]
    for method, path, host, status, code in refusals:
        reply = await edge.call(method, path, host=host, body={} if method == "POST" else None)
        assert (reply.status, reply.headers["content-type"]) == (status, "application/json"), (path, reply.body)
        assert reply.body["code"] == code
        assert isinstance(reply.body["message"], str)
    jwks = await edge.call("GET", "/.well-known/jwks.json", host="localhost")
    assert jwks.status == 200
    assert jwks.body["keys"][0]["kty"] == "OKP"
    # /health reflects the mesh: here only auth and tenant run behind the edge.
    health = await edge.call("GET", "/health", host="localhost")
    assert (health.status, health.body["code"]) == (503, 14)


async def test_the_zones_app_may_call_its_api_from_a_browser(edge: Edge) -> None:
    app = "https://app.univprepai.com"
    preflight = await edge.call(
        "OPTIONS",
        "/api/v1/auth/login",
        headers={
            "origin": app,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )
    assert preflight.status in (200, 204)
    assert preflight.headers["access-control-allow-origin"] == app
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    # Another zone's app, or any other site, is not allowed.
    for stranger in ("https://app.my-ktube.com", "https://evil.example"):
        refused = await edge.call(
            "OPTIONS", "/api/v1/auth/login", headers={"origin": stranger, "access-control-request-method": "POST"}
        )
        assert "access-control-allow-origin" not in refused.headers
    answered = await edge.call("GET", "/.well-known/jwks.json", headers={"origin": app})
    assert (answered.status, answered.headers["access-control-allow-origin"]) == (200, app)


async def _hammer(edge: Edge, count: int, method: str, path: str, body: object = None) -> list[Reply]:
    return [await edge.call(method, path, body=body) for _ in range(count)]


async def test_clients_over_the_limits_get_429_with_retry_after(edge: Edge, limiter: RateLimitService) -> None:
    email = f"lin-{uuid.uuid4().hex[:8]}@example.com"
    await edge.call("POST", "/api/v1/auth/register", body={"email": email, "password": PASSWORD, "name": "Lin"})

    # The API: 100 a minute per client (here without a token: each is refused, and each counts).
    api = await _hammer(edge, 150, "GET", "/api/v1/users/me")
    statuses = [reply.status for reply in api]
    assert statuses[:99] == [401] * 99  # the registration above was the first
    assert set(statuses[99:]) == {429}
    assert 1 <= int(api[-1].headers["retry-after"]) <= 60
    assert api[-1].body["code"] == 8  # RESOURCE_EXHAUSTED, as JSON

    # Login (its own bucket): 5 a minute per client, then blocked for 15 minutes.
    logins = await _hammer(edge, 7, "POST", "/api/v1/auth/login", {"email": email, "password": PASSWORD})
    assert [reply.status for reply in logins] == [200] * 5 + [429, 429]
    assert 800 < int(logins[-1].headers["retry-after"]) <= 900

    # The rate-limit service down: the API fails open, login fails closed.
    await limiter.halt()
    assert (await edge.call("GET", "/.well-known/jwks.json")).status == 200
    assert (await edge.call("GET", "/api/v1/users/me")).status == 401  # not limited: the token check answers
    closed = await edge.call("POST", "/api/v1/auth/login", body={"email": email, "password": PASSWORD})
    assert (closed.status, closed.body["code"]) == (503, 14)


async def test_bodies_over_the_routes_limit_are_refused_and_request_ids_pass_through(edge: Edge) -> None:
    huge = {"email": "big@example.com", "password": PASSWORD, "name": "x" * (11 * 1024 * 1024)}  # over 10 MB
    refused = await edge.call("POST", "/api/v1/auth/register", body=huge)
    assert (refused.status, refused.body["code"]) == (413, 8)
    given = await edge.call("GET", "/.well-known/jwks.json", headers={"x-request-id": "trace-me-42"})
    assert given.headers["x-request-id"] == "trace-me-42"


async def test_the_openapi_document_is_served_and_valid(edge: Edge) -> None:
    served = await edge.call("GET", "/openapi.json", host="localhost")
    assert (served.status, served.headers["content-type"]) == (200, "application/json")
    validate(served.body)
    assert served.body == json.loads(OPENAPI_DOCUMENT.read_text())
    login = served.body["paths"]["/api/v1/auth/login"]["post"]
    assert login["security"] == []  # anonymous
    me = served.body["paths"]["/api/v1/users/me"]["get"]
    assert me["security"] == [{"bearerAuth": []}]


async def test_every_public_rpc_answers_through_the_edge_with_json_never_a_server_error(
    people: People, people_services: dict[str, Service], tmp_path: Path
) -> None:
    """Each operation of the OpenAPI document, called with made-up ids and an empty body by a signed-in teacher:
    an answer from its service as JSON, a client error or success, never 500 or 503 (501 is an RPC not built
    yet)."""
    ports = {name: service.port for name, service in people_services.items()}
    teacher = await people.as_new_user("univ", "univ-public", "teacher")
    bearer = {"authorization": f"Bearer {teacher.token}"}
    document = json.loads(OPENAPI_DOCUMENT.read_text())
    unexpected = []
    seen: list[int] = []
    async with running_edge(people.pki_dir, ports, None, tmp_path) as edge:
        for template, operations in document["paths"].items():
            path = re.sub(r"\{[^}]+\}", "0" * 32, template)
            for verb, operation in operations.items():
                if operation["operationId"] == "AuthService_Logout":
                    continue  # it would end the teacher's session for the calls after it
                body: dict[str, object] | None = {} if "requestBody" in operation else None
                reply = await edge.call(verb.upper(), path, body=body, headers=bearer)
                seen.append(reply.status)
                answered = (isinstance(reply.body, dict) and "code" in reply.body) or reply.status == 200
                if reply.status in (500, 502, 503, 504) or not answered:
                    unexpected.append(f"{verb.upper()} {template}: {reply.status} {str(reply.body)[:160]}")
    assert not unexpected, "\n".join(unexpected)
    assert len(seen) >= 90  # every operation was called
    assert {200, 400, 403, 404} <= set(seen)  # services answered, both ways


async def test_live_streams_pass_through_the_edge_as_grpc_with_the_token_checked(
    people: People, people_services: dict[str, Service], tmp_path: Path
) -> None:
    """AnalyzeVoice and AnalyzeDance have no REST form: apps reach them as gRPC through the edge, which checks the
    bearer token and hands the stream to kzone; a JSON request finds no route."""
    learner = await people.as_new_user("kzone", "kzone-public", "student")
    ports = {name: service.port for name, service in people_services.items()}
    async with running_edge(people.pki_dir, ports, None, tmp_path) as edge:
        options = [("grpc.default_authority", KZONE)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.port}", options=options) as channel:
            stub = kzone_service_pb2_grpc.KZoneServiceStub(channel)

            async def empty() -> AsyncIterator[kzone_service_pb2.AnalyzeDanceRequest]:
                return
                yield

            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                async for _ in stub.AnalyzeDance(empty(), timeout=10):
                    pass
            assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED  # the edge's JWT check
            bearer = (("authorization", f"Bearer {learner.token}"),)
            with pytest.raises(grpc.aio.AioRpcError) as protocol:
                async for _ in stub.AnalyzeDance(empty(), metadata=bearer, timeout=10):
                    pass
            # kzone itself answered: the stream reached it as the learner, and it wanted its config first.
            assert protocol.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(status_from_error(protocol.value)).reason == "STREAM_PROTOCOL"  # type: ignore[union-attr]
        as_json = await edge.call("POST", "/megacity.kzone.v1.KZoneService/AnalyzeVoice", host=KZONE, body={})
        assert (as_json.status, as_json.body["code"]) == (404, 5)
