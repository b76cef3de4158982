"""The local mesh: `megacity up`, `down` and `status`.

`up` runs a supervisor (in the foreground, or detached with `--detach`) that starts, in order: embedded
PostgreSQL and Redis (unless MEGACITY_DATABASE_URL / MEGACITY_REDIS_URL point at external ones), the
migrations and per-service database logins, the dev PKI, then every catalog service as its own process
(`megacity serve <name>`), and the Envoy edge compiled from the contracts and the zones (gateway/). It waits
until every service reports SERVING over mTLS and the edge is ready, records what runs where
in $MEGACITY_HOME/run/mesh.json, restarts a service process that dies, and on SIGTERM/SIGINT stops the
services (gracefully) before Redis and PostgreSQL. `down` asks the supervisor to do that and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import edge
from gateway.envoy_config import EdgeSettings
from ops.embedded import EmbeddedPostgres, EmbeddedRedis, ensure_secret, local_postgres, local_redis
from services.auth.settings import PII_KEYS_VARIABLE
from services.runtime.catalog import Catalog, load_catalog
from services.runtime.channels import mtls_channel
from services.runtime.config import megacity_home, pki_dir, port_offset, target_of
from services.runtime.pki import Credentials, ensure_all, ensure_credentials

RESTART_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class Component:
    name: str
    kind: str  # "postgres", "redis", "service", "ratelimit" or "edge"
    address: str
    pid: int | None = None
    identity: str = ""
    metrics: str = ""
    log: str = ""
    restarts: int = 0


@dataclass
class MeshState:
    supervisor_pid: int
    phase: str  # starting, ready, failed, stopping
    home: str
    components: list[Component] = field(default_factory=list)
    error: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> MeshState:
        raw = json.loads(text)
        raw["components"] = [Component(**component) for component in raw["components"]]
        return cls(**raw)


def _home() -> Path:
    return megacity_home()


def _state_path() -> Path:
    return _home() / "run" / "mesh.json"


def _write_state(state: MeshState) -> None:
    path = _state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(state.to_json())
    scratch.replace(path)


def read_state() -> MeshState | None:
    try:
        return MeshState.from_json(_state_path().read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None


def process_running(pid: int | None) -> bool:
    """Whether `pid` is a live process (a zombie, which still answers kill(0), is not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


# --- health ---------------------------------------------------------------------------------------------


async def _service_health(catalog: Catalog, ops: Credentials, name: str, address: str, timeout: float = 2.0) -> str:
    """SERVING / NOT_SERVING / UNREACHABLE, asked over mTLS as the `ops` identity."""
    channel = mtls_channel(address, ops, catalog, name)
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.aio.AioRpcError:
        return "UNREACHABLE"
    finally:
        await channel.close(None)


async def _tcp_reachable(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout)
    except (OSError, ValueError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _edge_health(admin: str, timeout: float = 2.0) -> str:
    """Envoy's own readiness (its admin /ready: LIVE once its listeners are up)."""
    host, _, port = admin.rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
        writer.write(f"GET /ready HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), timeout)
        writer.close()
    except (OSError, TimeoutError):
        return "UNREACHABLE"
    return "SERVING" if answer.startswith(b"HTTP/1.1 200") else "NOT_SERVING"


async def _component_health(catalog: Catalog, ops: Credentials, component: Component) -> str:
    if component.kind == "service":
        return await _service_health(catalog, ops, component.name, component.address)
    if component.kind == "edge":
        return await _edge_health(component.metrics)
    return "SERVING" if await _tcp_reachable(component.address) else "UNREACHABLE"


async def _all_health(catalog: Catalog, components: list[Component]) -> dict[str, str]:
    ops = ensure_credentials(pki_dir(), catalog, "ops")
    results = await asyncio.gather(*(_component_health(catalog, ops, c) for c in components))
    return {c.name: health for c, health in zip(components, results, strict=True)}


# --- the supervisor -------------------------------------------------------------------------------------


def _address_of(url: str, default_port: int) -> str:
    """host:port of a server URL (never its credentials)."""
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or default_port}"


class _ServiceProcess:
    def __init__(self, name: str, env: Mapping[str, str], log_path: Path, command: list[str] | None = None) -> None:
        self.name = name
        self.env = dict(env)
        self.log_path = log_path
        self.command = command or [sys.executable, "-m", "ops.cli", "serve", name]
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.next_start = 0.0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None


class Supervisor:
    def __init__(self, catalog: Catalog, home: Path) -> None:
        self.catalog = catalog
        self.home = home
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        self.services: dict[str, _ServiceProcess] = {}
        self.edge: _ServiceProcess | None = None
        self.ratelimit: _ServiceProcess | None = None
        self.edge_settings: EdgeSettings | None = None
        self.state = MeshState(supervisor_pid=os.getpid(), phase="starting", home=str(home))

    def _infra_components(self, database_url: str, redis_url: str) -> list[Component]:
        components = []
        if self.postgres is not None:
            components.append(
                Component(
                    "postgres",
                    "postgres",
                    self.postgres.address,
                    self.postgres.pid,
                    log=str(self.postgres.log_path),
                )
            )
        else:
            components.append(Component("postgres", "postgres", _address_of(database_url, 5432)))
        if self.redis is not None:
            components.append(
                Component("redis", "redis", self.redis.address, self.redis.pid, log=str(self.redis.log_path))
            )
        else:
            components.append(Component("redis", "redis", _address_of(redis_url, 6379)))
        return components

    def _publish(self, phase: str, infra: list[Component], error: str = "") -> None:
        services = [
            Component(
                name=name,
                kind="service",
                address=target_of(self.catalog.service(name)),
                pid=process.pid,
                identity=self.catalog.spiffe_id(name),
                metrics=f"127.0.0.1:{self.catalog.service(name).metrics_port + port_offset()}",
                log=str(process.log_path),
                restarts=process.restarts,
            )
            for name, process in self.services.items()
        ]
        if self.ratelimit is not None and self.edge_settings is not None:
            services.append(
                Component(
                    name="ratelimit",
                    kind="ratelimit",
                    address=self.edge_settings.ratelimit_target or "",
                    pid=self.ratelimit.pid,
                    log=str(self.ratelimit.log_path),
                    restarts=self.ratelimit.restarts,
                )
            )
        if self.edge is not None and self.edge_settings is not None:
            services.append(
                Component(
                    name="edge",
                    kind="edge",
                    address=f"{self.edge_settings.listen_host}:{self.edge_settings.listen_port}",
                    pid=self.edge.pid,
                    identity=self.catalog.spiffe_id("edge"),
                    metrics=f"127.0.0.1:{self.edge_settings.admin_port}",
                    log=str(self.edge.log_path),
                    restarts=self.edge.restarts,
                )
            )
        self.state.phase = phase
        self.state.components = infra + services
        self.state.error = error
        _write_state(self.state)

    async def start(self) -> list[Component]:
        from ops import migrations

        database_admin_url = os.environ.get("MEGACITY_DATABASE_ADMIN_URL") or os.environ.get("MEGACITY_DATABASE_URL")
        if not database_admin_url:
            self.postgres = local_postgres(self.home)
            await asyncio.to_thread(self.postgres.start)
            database_admin_url = self.postgres.admin_url
        redis_url = os.environ.get("MEGACITY_REDIS_URL")
        if not redis_url:
            self.redis = local_redis(self.home)
            await asyncio.to_thread(self.redis.start)
            redis_url = self.redis.url
        infra = self._infra_components(database_admin_url, redis_url)
        self._publish("starting", infra)

        await migrations.migrate(database_admin_url)
        service_urls = await migrations.provision_service_logins(database_admin_url, self.home / "secrets")
        await asyncio.to_thread(ensure_all, pki_dir(), self.catalog)

        base_env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"MEGACITY_DATABASE_URL", "MEGACITY_DATABASE_ADMIN_URL", "MEGACITY_REDIS_URL"}
        }
        base_env |= {
            "MEGACITY_HOME": str(self.home),
            "MEGACITY_PKI_DIR": str(pki_dir()),
            "MEGACITY_TRANSPORT": "mtls",
        }
        # The auth service encrypts personal data and its signing keys with this; made once, kept with the data.
        pii_keys = os.environ.get(PII_KEYS_VARIABLE) or f"local:{ensure_secret(self.home / 'secrets' / 'pii_key')}"
        for name, entry in self.catalog.services.items():
            env = dict(base_env)
            if name == "auth":
                env[PII_KEYS_VARIABLE] = pii_keys
            if "postgres" in entry.depends_on:
                env["MEGACITY_DATABASE_URL"] = service_urls[name]
            if "redis" in entry.depends_on:
                env["MEGACITY_REDIS_URL"] = redis_url
            process = _ServiceProcess(name, env, self.home / "logs" / f"{name}.log")
            process.start()
            self.services[name] = process
        self.ratelimit = _ServiceProcess(
            "ratelimit",
            base_env | {"MEGACITY_REDIS_URL": redis_url},
            self.home / "logs" / "ratelimit.log",
            edge.ratelimit_command(),
        )
        self.ratelimit.start()
        self.edge_settings = edge.settings(self.catalog, pki_dir(), await edge.load_zones(database_admin_url))
        config = edge.write_config(self.edge_settings, self.catalog, self.home / "run" / "edge.json")
        self.edge = _ServiceProcess("edge", base_env, self.home / "logs" / "edge.log", edge.envoy_command(config))
        self.edge.start()
        self._publish("starting", infra)
        return infra

    def _processes(self) -> list[_ServiceProcess]:
        return [*self.services.values(), *(p for p in (self.ratelimit, self.edge) if p is not None)]

    async def wait_until_serving(self, infra: list[Component], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = await _all_health(self.catalog, self.state.components)
            if all(value == "SERVING" for value in health.values()):
                self._publish("ready", infra)
                return True
            dead = [process.name for process in self._processes() if process.exited()]
            if dead:
                self._publish("failed", infra, f"exited during start-up: {', '.join(dead)} (see their logs)")
                return False
            await asyncio.sleep(0.5)
        waiting = [
            name
            for name, value in (await _all_health(self.catalog, self.state.components)).items()
            if value != "SERVING"
        ]
        self._publish("failed", infra, f"not SERVING after {timeout:.0f}s: {', '.join(waiting)}")
        return False

    async def watch(self, infra: list[Component], stop: asyncio.Event) -> None:
        """Restart service processes that die, with backoff, until asked to stop."""
        while not stop.is_set():
            for process in self._processes():
                if process.exited() and time.monotonic() >= process.next_start:
                    delay = RESTART_BACKOFF_SECONDS[min(process.restarts, len(RESTART_BACKOFF_SECONDS) - 1)]
                    process.restarts += 1
                    process.next_start = time.monotonic() + delay
                    process.start()
                    self._publish(self.state.phase, infra)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)

    async def stop(self, grace: float = 15.0) -> None:
        self.state.phase = "stopping"
        _write_state(self.state)
        running = [p.process for p in self._processes() if p.process and p.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in running:
            try:
                await asyncio.to_thread(process.wait, max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.stop)
        with contextlib.suppress(FileNotFoundError):
            _state_path().unlink()


async def _supervise(ready_message: bool) -> int:
    catalog = load_catalog()
    supervisor = Supervisor(catalog, _home())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        infra = await supervisor.start()
        ready = await supervisor.wait_until_serving(infra, float(os.environ.get("MEGACITY_UP_TIMEOUT", "120")))
        if ready_message:
            health = await _all_health(catalog, supervisor.state.components)
            print(_render_status(supervisor.state, health, as_json=False), flush=True)
        if not ready:
            print(f"megacity: {supervisor.state.error}", file=sys.stderr, flush=True)
            await supervisor.stop()
            return 1
        await supervisor.watch(infra, stop)
    except Exception as error:
        supervisor.state.error = f"{type(error).__name__}: {error}"
        supervisor.state.phase = "failed"
        _write_state(supervisor.state)
        print(f"megacity: start-up failed: {supervisor.state.error}", file=sys.stderr, flush=True)
        await supervisor.stop()
        return 1
    await supervisor.stop()
    return 0


def supervise() -> int:
    """The detached supervisor's entry point (`megacity supervise`)."""
    return asyncio.run(_supervise(ready_message=False))


# --- the commands ---------------------------------------------------------------------------------------


def up(detach: bool, timeout: float) -> int:
    existing = read_state()
    if existing is not None and process_running(existing.supervisor_pid):
        print(f"megacity is already running (supervisor pid {existing.supervisor_pid}); `megacity down` stops it")
        return status(as_json=False)
    os.environ["MEGACITY_UP_TIMEOUT"] = str(timeout)
    if not detach:
        return asyncio.run(_supervise(ready_message=True))

    log_path = _home() / "logs" / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "supervise"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout + 30
    while time.monotonic() < deadline:
        state = read_state()
        if supervisor.poll() is not None:
            print(
                f"megacity: the supervisor exited with {supervisor.returncode}; see {log_path}",
                file=sys.stderr,
            )
            return 1
        if state is not None and state.supervisor_pid == supervisor.pid and state.phase in {"ready", "failed"}:
            break
        time.sleep(0.3)
    code = status(as_json=False)
    if code != 0:
        print(f"megacity: not healthy; logs in {_home() / 'logs'}", file=sys.stderr)
    return code


def down(timeout: float) -> int:
    state = read_state()
    if state is None:
        print("megacity is not running")
        return 0
    if process_running(state.supervisor_pid):
        os.kill(state.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process_running(state.supervisor_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    if process_running(state.supervisor_pid):
        os.kill(state.supervisor_pid, signal.SIGKILL)
    _reap_leftovers(state)
    with contextlib.suppress(FileNotFoundError):
        _state_path().unlink()
    print("megacity stopped")
    return 0


def _reap_leftovers(state: MeshState) -> None:
    """After a supervisor that could not stop cleanly: end what it left behind."""
    home = Path(state.home)
    for component in state.components:
        if component.kind == "service" and process_running(component.pid):
            assert component.pid is not None
            os.kill(component.pid, signal.SIGKILL)
    for component in state.components:
        if component.kind == "redis" and process_running(component.pid):
            local_redis(home).stop()
        if component.kind == "postgres" and process_running(component.pid):
            local_postgres(home).stop()


def _render_status(state: MeshState, health: Mapping[str, str], as_json: bool) -> str:
    if as_json:
        return json.dumps(
            {
                "phase": state.phase,
                "supervisor_pid": state.supervisor_pid,
                "home": state.home,
                "error": state.error,
                "components": [asdict(c) | {"health": health[c.name]} for c in state.components],
            },
            indent=2,
        )
    rows = [("COMPONENT", "ADDRESS", "HEALTH", "IDENTITY", "METRICS", "PID")]
    rows += [
        (c.name, c.address, health[c.name], c.identity or "-", c.metrics or "-", str(c.pid or "-"))
        for c in state.components
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"\nmesh {state.phase}; state in {state.home}; logs in {Path(state.home) / 'logs'}")
    return "\n".join(lines)


def status(as_json: bool) -> int:
    state = read_state()
    if state is None or not process_running(state.supervisor_pid):
        print(json.dumps({"phase": "down", "components": []}) if as_json else "megacity is not running")
        return 3
    health = asyncio.run(_all_health(load_catalog(), state.components))
    print(_render_status(state, health, as_json))
    return 0 if state.phase == "ready" and all(value == "SERVING" for value in health.values()) else 1
