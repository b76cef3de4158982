"""`megacity up --detach`, `status` and `down` from a clean state: the whole local mesh, for real."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ops.embedded import EmbeddedPostgres, EmbeddedRedis
from ops.supervisor import process_running
from services.runtime.catalog import REPO, load_catalog

pytestmark = pytest.mark.slow


def _ports_free(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _free_offset() -> int:
    catalog = load_catalog()
    base = [7432, 7379, 8080, 8081, 9901] + [p for e in catalog.services.values() for p in (e.port, e.metrics_port)]
    for _ in range(50):
        offset = random.randrange(10_000, 40_000, 100)
        if _ports_free([port + offset for port in base]):
            return offset
    raise RuntimeError("no free port range for a second mesh")


def _megacity(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _edge_call(address: str, path: str, account: dict[str, str]) -> dict[str, Any]:
    """POSTs the account's credentials as JSON through the edge, as the zone's API host; retried for a while, as
    a client would while the edge or a service comes back."""
    host, _, port = address.rpartition(":")
    body = json.dumps({"email": account["email"], "password": account["password"]})
    failure: object = None
    for _ in range(20):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.request("POST", path, body=body, headers={"Host": "api.univprepai.com"})
            response = connection.getresponse()
            payload = response.read()
            if response.status == 200:
                return dict(json.loads(payload))
            failure = (response.status, payload)
        except ConnectionError as error:
            failure = error
        finally:
            connection.close()
        time.sleep(0.5)
    raise AssertionError(f"the edge did not answer {path}: {failure}")


def _edge_health(address: str) -> int:
    """GET /health's status once the edge's first health checks have run."""
    host, _, port = address.rpartition(":")
    status = 0
    for _ in range(30):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.request("GET", "/health", headers={"Host": "localhost"})
            status = connection.getresponse().status
        finally:
            connection.close()
        if status == 200:
            break
        time.sleep(0.5)
    return status


def _status(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    done = _megacity(env, "status", "--json")
    return done.returncode, json.loads(done.stdout)


def _environment(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MEGACITY_")}
    return env | {"MEGACITY_HOME": str(home), "MEGACITY_PORT_OFFSET": str(_free_offset())}


def test_up_status_down_from_a_clean_state(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = _environment(home)
    catalog = load_catalog()
    try:
        started = _megacity(env, "up", "--detach", "--timeout", "150")
        assert started.returncode == 0, started.stdout + started.stderr
        for name in catalog.services:
            assert name in started.stdout

        code, status = _status(env)
        assert code == 0
        assert status["phase"] == "ready"
        components = {c["name"]: c for c in status["components"]}
        assert set(components) == {"postgres", "redis", *catalog.services, "ratelimit", "edge"}
        assert all(c["health"] == "SERVING" for c in components.values())
        assert components["exam"]["identity"] == "spiffe://megacity.local/ns/megacity/sa/exam"
        assert (home / "pki" / "ca.pem").exists()
        first_line = (home / "logs" / "auth.log").read_text().splitlines()[0]
        assert json.loads(first_line)["service"] == "auth"

        # The demo data lands on the running mesh, and seeding again changes nothing.
        seeded = [_megacity(env, "seed", "--demo", "--json") for _ in range(2)]
        assert all(run.returncode == 0 for run in seeded), seeded[0].stderr + seeded[1].stderr
        first, again = (json.loads(run.stdout) for run in seeded)
        assert first == again
        assert sorted(account["role"] for account in first["accounts"]) == [
            "parent",
            "student",
            "student",
            "teacher",
            "zone_admin",
        ]
        assert all(account["user_id"] for account in first["accounts"])

        # The edge serves REST from the contracts: the demo student signs in through it.
        student = next(account for account in first["accounts"] if account["role"] == "student")
        signed_in = _edge_call(components["edge"]["address"], "/api/v1/auth/login", student)
        assert signed_in["access_token"]
        assert _edge_health(components["edge"]["address"]) == 200  # every service behind it is healthy

        # A process that dies (a service, or Envoy while clients call it) is restarted by the supervisor and
        # becomes SERVING again; clients recover without anyone stepping in.
        restarted = {}
        for name in ("tenant", "edge"):
            os.kill(components[name]["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while True:
                code, status = _status(env)
                restarted[name] = next(c for c in status["components"] if c["name"] == name)
                if code == 0 and restarted[name]["restarts"] == 1:
                    break
                assert time.monotonic() < deadline, f"{name} was not restarted: {restarted[name]}"
                time.sleep(0.5)
        assert _edge_call(components["edge"]["address"], "/api/v1/auth/login", student)["access_token"]

        stopped = _megacity(env, "down")
        assert stopped.returncode == 0, stopped.stderr
        code, status = _status(env)
        assert code == 3
        assert status["phase"] == "down"
        pids = [c["pid"] for c in components.values() if c["pid"]] + [c["pid"] for c in restarted.values()]
        assert not [pid for pid in pids if process_running(pid)]
    finally:
        _megacity(env, "down")


def test_up_uses_external_servers_by_url_and_leaves_them_running(
    tmp_path: Path, postgres: EmbeddedPostgres, redis: EmbeddedRedis
) -> None:
    env = _environment(tmp_path / "home") | {
        "MEGACITY_DATABASE_URL": postgres.admin_url,
        "MEGACITY_REDIS_URL": redis.url,
    }
    try:
        started = _megacity(env, "up", "--detach", "--timeout", "150")
        assert started.returncode == 0, started.stdout + started.stderr
        code, status = _status(env)
        assert code == 0
        components = {c["name"]: c for c in status["components"]}
        assert components["postgres"]["address"] == postgres.address
        assert components["redis"]["address"] == redis.address
        assert components["postgres"]["pid"] is None  # not ours to stop
        assert not (tmp_path / "home" / "postgres").exists()
    finally:
        stopped = _megacity(env, "down")
    assert stopped.returncode == 0
    assert postgres.is_running()
    assert redis.is_running()
