"""The edge's Envoy configuration, compiled from the contracts: Envoy accepts it, and it exposes exactly the
public RPCs, each zone's hosts setting that zone. In Kubernetes (transport linkerd) it is plaintext HTTP/2 to the
services' cluster names, strips l5d-* headers, and the pod's compile command writes it as a read-only login."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2

from gateway import edge
from gateway.edge import OPENAPI_DOCUMENT
from gateway.envoy_config import (
    READY_PATH,
    ZONE_HEADER,
    EdgeSettings,
    EdgeZone,
    compile_bootstrap,
    public_routes,
)
from ops import migrations
from services.runtime.catalog import REPO, load_catalog
from services.runtime.config import Transport, target_of
from services.runtime.contracts import default_pool, descriptor_set_path, service_methods
from services.runtime.pki import ensure_credentials
from tests.support.ports import free_port

ZONES = (EdgeZone("univ", ("univprepai.com",)), EdgeZone("kzone", ("my-ktube.com", "my-ktube.ai")))


@pytest.fixture
def settings(tmp_path: Path) -> EdgeSettings:
    catalog = load_catalog()
    return EdgeSettings(
        listen_host="127.0.0.1",
        listen_port=8080,
        admin_port=9901,
        descriptor_set=descriptor_set_path().resolve(),
        pki_dir=tmp_path,
        targets={name: f"127.0.0.1:{entry.port}" for name, entry in catalog.services.items()},
        zones=ZONES,
        dev_zone="univ",
        ratelimit_target="127.0.0.1:8081",
        openapi_document=OPENAPI_DOCUMENT,
    )


def test_envoy_accepts_the_compiled_configuration(settings: EdgeSettings, tmp_path: Path) -> None:
    ensure_credentials(tmp_path, load_catalog(), "edge")
    config = tmp_path / "edge.json"
    config.write_text(compile_bootstrap(settings, load_catalog(), default_pool()).to_json())
    validate(config)


def test_every_public_rpc_has_a_route_and_no_internal_one_does(settings: EdgeSettings) -> None:
    catalog = load_catalog()
    pool = default_pool()
    bootstrap = compile_bootstrap(settings, catalog, pool)
    manager = bootstrap.to_dict()["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    hosts = {host["name"]: host for host in manager["routeConfig"]["virtualHosts"]}
    every = [
        method
        for entry in catalog.services.values()
        for service in entry.grpc_services
        for method in service_methods(pool, service) or ()
    ]
    public = {method.path for method in every if method.public}
    internal = {method.path for method in every if not method.public}
    assert public
    assert internal
    assert {route.method.path for route in public_routes(catalog, pool)} == public
    for name in ("zone-univ", "zone-kzone", "dev-localhost"):
        routed = {route["match"]["path"] for route in hosts[name]["routes"] if "path" in route["match"]}
        routed.discard("/openapi.json")
        assert routed == public
        assert not routed & internal
    assert set(hosts["zone-kzone"]["domains"]) == {
        "api.my-ktube.com",
        "api.my-ktube.com:*",
        "api.my-ktube.ai",
        "api.my-ktube.ai:*",
    }
    for name, zone in (("zone-univ", "univ"), ("zone-kzone", "kzone"), ("dev-localhost", "univ")):
        [header] = hosts[name]["requestHeadersToAdd"]
        # Overwritten, never appended: a client's own copy of the header cannot survive.
        assert header == {
            "header": {"key": ZONE_HEADER, "value": zone},
            "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    assert hosts["unknown-host"]["domains"] == ["*"]
    assert hosts["unknown-host"]["routes"][0]["directResponse"]["status"] == 404


# --- Kubernetes: the Linkerd transport, the l5d-* headers, the pod's compile command ----------------------------

MESH_HOSTS = "{name}.megacity.svc.cluster.local"
LINKERD_README = REPO / "mesh" / "linkerd" / "README.md"


def linkerd_settings(monkeypatch: pytest.MonkeyPatch, pki_dir: Path) -> EdgeSettings:
    """The settings the edge pod compiles with: peers named as every service names them in Linkerd mode."""
    monkeypatch.setenv("MEGACITY_TRANSPORT", "linkerd")
    monkeypatch.setenv("MEGACITY_SERVICE_HOST_TEMPLATE", MESH_HOSTS)
    monkeypatch.setenv("MEGACITY_EDGE_HOST", "0.0.0.0")  # noqa: S104
    return edge.settings(load_catalog(), pki_dir, ZONES)


def validate(config: Path) -> None:
    envoy = Path(sys.executable).with_name("envoy")
    result = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]


def service_clusters(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = set(load_catalog().services)
    return {c["name"]: c for c in bootstrap["staticResources"]["clusters"] if c["name"] in services}


def http_filters(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    manager = bootstrap["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    filters: list[dict[str, Any]] = manager["httpFilters"]
    return filters


def test_linkerd_mode_is_plaintext_http2_to_the_services_cluster_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No PKI on disk at all: under Linkerd nothing refers to a certificate, and Envoy still accepts it."""
    settings = linkerd_settings(monkeypatch, tmp_path / "no-pki")
    assert settings.transport is Transport.LINKERD
    assert settings.listen_host == "0.0.0.0"  # noqa: S104
    config = edge.write_config(settings, load_catalog(), tmp_path / "edge.json")
    validate(config)
    assert "no-pki" not in config.read_text()
    bootstrap = compile_bootstrap(settings, load_catalog(), default_pool()).to_dict()
    clusters = service_clusters(bootstrap)
    assert clusters
    for name, cluster in clusters.items():
        assert "transportSocket" not in cluster, name
        entry = load_catalog().service(name)
        [locality] = cluster["loadAssignment"]["endpoints"]
        [endpoint] = locality["lbEndpoints"]
        address = endpoint["endpoint"]["address"]["socketAddress"]
        # The runtime's one way of naming peers (target_of), as the services reach each other.
        assert f"{address['address']}:{address['portValue']}" == target_of(entry)
        assert address["address"] == MESH_HOSTS.format(name=name)
        assert cluster["type"] == "STRICT_DNS"
        [health] = cluster["healthChecks"]
        assert "grpcHealthCheck" in health
        protocol = cluster["typedExtensionProtocolOptions"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2ProtocolOptions" in protocol["explicitHttpConfig"]
    # Envoy's admin stays on loopback, whatever the listener binds.
    assert bootstrap["admin"]["address"]["socketAddress"]["address"] == "127.0.0.1"
    assert bootstrap["staticResources"]["listeners"][0]["address"]["socketAddress"]["address"] == "0.0.0.0"  # noqa: S104


def test_mtls_mode_still_does_mtls_to_every_service(settings: EdgeSettings) -> None:
    assert settings.transport is Transport.MTLS
    clusters = service_clusters(compile_bootstrap(settings, load_catalog(), default_pool()).to_dict())
    assert clusters
    for name, cluster in clusters.items():
        assert cluster["transportSocket"]["name"] == "envoy.transport_sockets.tls", name
        assert load_catalog().spiffe_id(name) in json.dumps(cluster["transportSocket"])


@pytest.mark.parametrize("transport", list(Transport))
def test_l5d_headers_are_stripped_both_ways_before_anything_else(transport: Transport, settings: EdgeSettings) -> None:
    filters = http_filters(
        compile_bootstrap(replace(settings, transport=transport), load_catalog(), default_pool()).to_dict()
    )
    strip = filters[0]
    assert strip["name"] == "envoy.filters.http.header_mutation"
    mutations = strip["typedConfig"]["mutations"]
    expected = [{"removeOnMatch": {"keyMatcher": {"prefix": "l5d-", "ignoreCase": True}}}]
    assert mutations["requestMutations"] == expected
    assert mutations["responseMutations"] == expected


@dataclass
class LinkerdEdge:
    """A real Envoy compiled for Linkerd, in front of a plaintext gRPC server standing in for the auth service
    behind the pod's proxy (GetJwks and health; each GetJwks waits `delay` seconds and records its metadata)."""

    settings: EdgeSettings
    process: subprocess.Popen[bytes]
    seen: list[dict[str, str | bytes]]
    arrived: asyncio.Event


@asynccontextmanager
async def linkerd_edge(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, delay: float = 0.0
) -> AsyncIterator[LinkerdEdge]:
    seen: list[dict[str, str | bytes]] = []
    arrived = asyncio.Event()

    async def get_jwks(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen.append(dict(context.invocation_metadata() or ()))
        arrived.set()
        await context.send_initial_metadata((("l5d-proxy-error", "mesh detail"), ("x-upstream", "kept")))
        await asyncio.sleep(delay)
        return b""

    serving: bytes = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()

    async def check(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return serving

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "megacity.auth.v1.AuthService", {"GetJwks": grpc.unary_unary_rpc_method_handler(get_jwks)}
            ),
            # Envoy health-checks its clusters (as the edge's pod does through Linkerd).
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
            ),
        ]
    )
    auth_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    catalog = load_catalog()
    settings = replace(
        linkerd_settings(monkeypatch, tmp_path),
        listen_host="127.0.0.1",
        listen_port=free_port(),
        admin_port=free_port(),
        # Every other service: a closed port (never called here).
        targets={name: f"127.0.0.1:{auth_port if name == 'auth' else free_port()}" for name in catalog.services},
        ratelimit_target=None,
    )
    config = edge.write_config(settings, catalog, tmp_path / "edge.json")
    log = tmp_path / "edge.log"
    with log.open("wb") as output:
        process = await asyncio.to_thread(
            subprocess.Popen, edge.envoy_command(config), stdout=output, stderr=subprocess.STDOUT
        )
    try:
        await asyncio.to_thread(edge.wait_until_ready, settings.admin_port, process, log)
        yield LinkerdEdge(settings, process, seen, arrived)
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)
        await server.stop(None)


JWKS_REQUEST = ("/.well-known/jwks.json", {"Host": "api.univprepai.com"})


async def test_linkerd_mode_edge_serves_through_plaintext_and_drops_l5d_headers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The request reaches the plaintext upstream without any client-sent l5d-* header (and with the zone the host
    decides); the response reaches the client without the upstream's l5d-* header."""
    async with linkerd_edge(monkeypatch, tmp_path) as running:
        path, headers = JWKS_REQUEST
        forged = {
            "l5d-client-id": "ops.megacity.serviceaccount.identity.linkerd.cluster.local",
            "L5D-Dst-Override": "tenant.megacity.svc.cluster.local:7102",
            "l5d-anything": "x",
        }
        status, reply, _ = await asyncio.to_thread(get, running.settings.listen_port, path, {**headers, **forged})
        assert status == 200, reply
        [metadata] = running.seen
        assert not [key for key in metadata if key.lower().startswith("l5d-")], metadata
        assert metadata["x-megacity-zone"] == "univ"
        assert reply.get("x-upstream") == "kept"
        assert not [key for key in reply if key.lower().startswith("l5d-")], reply
        # The readiness probe's path answers on any host (the kubelet's is the pod's address).
        ready, _, _ = await asyncio.to_thread(get, running.settings.listen_port, READY_PATH, {"Host": "10.0.0.7:8080"})
        assert ready == 200


async def test_drain_waits_for_requests_in_flight_and_turns_readiness_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The preStop hook: readiness turns 503 at once, a slow request in flight still completes, and the hook returns
    only after it (and not before its window); `wait-exit` returns once Envoy is gone."""
    async with linkerd_edge(monkeypatch, tmp_path, delay=2.0) as running:
        port, admin = running.settings.listen_port, running.settings.admin_port
        path, headers = JWKS_REQUEST
        slow = asyncio.create_task(asyncio.to_thread(get, port, path, headers))
        await asyncio.wait_for(running.arrived.wait(), 10)
        started = time.monotonic()
        draining = asyncio.create_task(asyncio.to_thread(edge.drain, admin, 0.5, 30.0, 0.1))
        await asyncio.sleep(0.3)
        ready, _, _ = await asyncio.to_thread(get, port, READY_PATH, {"Host": "localhost"})
        assert ready == 503
        assert not draining.done()
        assert await draining == 0
        assert slow.done()
        status, reply, _ = await slow
        assert status == 200
        assert reply.get("connection") == "close"  # the client is told to go elsewhere next time
        assert time.monotonic() - started >= 0.5
        assert await asyncio.to_thread(edge.wait_exit, admin, 0.5, 0.1) == 0  # still running: the deadline ends it
        running.process.terminate()
        await asyncio.to_thread(running.process.wait, 30)
        started = time.monotonic()
        assert await asyncio.to_thread(edge.wait_exit, admin, 30.0, 0.1) == 0
        assert time.monotonic() - started < 5


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def documented_edge_grants() -> str:
    """The SQL the READMEs tell an operator to run for the edge's login (the same in both; tested here, as written)."""
    found = set()
    for readme in (LINKERD_README, REPO / "README.md"):
        blocks: list[str] = re.findall(r"```sql\n(.*?)```", readme.read_text(), flags=re.DOTALL)
        [sql] = [block for block in blocks if "tenant.zone_domains" in block]
        found.add(sql)
    [sql] = found
    return sql


async def test_compile_command_writes_a_valid_config_as_the_least_privileged_login(
    fresh_database: str, tmp_path: Path
) -> None:
    """`python -m gateway.edge compile`, as the edge pod's init container runs it, logged in as the role the README's
    GRANT makes: it reads the zones, writes a configuration Envoy accepts, and that role can read nothing else."""
    await migrations.migrate(fresh_database)
    role = f"megacity_edge_{uuid.uuid4().hex[:8]}"
    password = "edge-test-password"
    database = urlsplit(fresh_database).path.lstrip("/")
    sql = documented_edge_grants()
    assert "DATABASE megacity " in sql
    sql = sql.replace("megacity_edge", role).replace("'<password>'", f"'{password}'")
    sql = sql.replace("DATABASE megacity ", f'DATABASE "{database}" ')
    owner = await asyncpg.connect(fresh_database)
    try:
        await owner.execute(sql)
        expected = await owner.fetch("SELECT zone_id, domain FROM tenant.zone_domains")
    finally:
        await owner.close()
    parts = urlsplit(fresh_database)
    edge_url = urlunsplit(parts._replace(netloc=f"{role}:{password}@{parts.hostname}:{parts.port}"))

    reader = await asyncpg.connect(edge_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.fetch("SELECT * FROM tenant.organizations")
        with pytest.raises(asyncpg.PostgresError):  # read-only by default, and no privilege to write anyway
            await reader.execute("DELETE FROM tenant.zone_domains")
    finally:
        await reader.close()

    out = tmp_path / "etc" / "edge.json"
    env = {
        **os.environ,
        "MEGACITY_DATABASE_URL": edge_url,
        "MEGACITY_TRANSPORT": "linkerd",
        "MEGACITY_SERVICE_HOST_TEMPLATE": MESH_HOSTS,
        "MEGACITY_EDGE_HOST": "0.0.0.0",  # noqa: S104
        "MEGACITY_HOME": str(tmp_path / "home"),
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway.edge", "compile", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert edge_url not in done.stdout + done.stderr
    validate(out)
    bootstrap = json.loads(out.read_text())
    hosts = bootstrap["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]["routeConfig"]
    domains = {domain for host in hosts["virtualHosts"] for domain in host["domains"]}
    assert expected
    assert {f"api.{row['domain']}" for row in expected} <= domains
    assert not [c for c in bootstrap["staticResources"]["clusters"] if "transportSocket" in c]


def test_compile_command_fails_clearly_without_a_database_url(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "MEGACITY_DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway.edge", "compile", "--out", str(tmp_path / "edge.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "MEGACITY_DATABASE_URL" in done.stderr
    assert not (tmp_path / "edge.json").exists()


async def test_compile_command_refuses_a_database_without_zones(fresh_database: str, tmp_path: Path) -> None:
    owner = await asyncpg.connect(fresh_database)
    try:
        await owner.execute("CREATE SCHEMA tenant; CREATE TABLE tenant.zone_domains (domain text, zone_id text)")
    finally:
        await owner.close()
    code = await asyncio.to_thread(edge.compile_config, tmp_path / "edge.json", fresh_database)
    assert code == 1
    assert not (tmp_path / "edge.json").exists()
