"""The edge's Envoy configuration, compiled from the contracts: Envoy accepts it, and it exposes exactly the
public RPCs, each zone's hosts setting that zone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.edge import OPENAPI_DOCUMENT
from gateway.envoy_config import ZONE_HEADER, EdgeSettings, EdgeZone, compile_bootstrap, public_routes
from services.runtime.catalog import load_catalog
from services.runtime.contracts import default_pool, descriptor_set_path, service_methods
from services.runtime.pki import ensure_credentials

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
    envoy = Path(sys.executable).with_name("envoy")
    result = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]


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
