"""Runtime configuration from environment variables, with defaults that run the mesh on one machine.

| variable | default | meaning |
|---|---|---|
| MEGACITY_HOME | ~/.local/state/megacity (./megacity sets <repo>/.megacity) | state: PKI, data, logs |
| MEGACITY_TRANSPORT | mtls | `mtls`: the service does mTLS itself; `linkerd`: plaintext behind the Linkerd proxy |
| MEGACITY_PKI_DIR | $MEGACITY_HOME/pki | the dev certificate authority and per-workload certificates |
| MEGACITY_BIND_HOST | 127.0.0.1 | interface the gRPC and metrics ports listen on |
| MEGACITY_PORT_OFFSET | 0 | added to every catalog port (run two meshes side by side) |
| MEGACITY_PORT / MEGACITY_METRICS_PORT | catalog + offset | override one service's ports |
| MEGACITY_SERVICE_HOST_TEMPLATE | 127.0.0.1 | host of a peer service; `{name}` is replaced by its catalog name |
| MEGACITY_TARGET_<NAME> | template:port | full address of one peer service |
| MEGACITY_DATABASE_URL | (none) | this service's PostgreSQL URL (its own login role) |
| MEGACITY_POSTGRES_PORT / MEGACITY_REDIS_PORT | 7432 / 7379 | ports of the embedded servers `megacity up` runs |
| MEGACITY_REDIS_URL | (none) | Redis URL |
| MEGACITY_SHUTDOWN_GRACE_SECONDS | 10 | how long SIGTERM waits for in-flight calls |
| MEGACITY_HEALTH_INTERVAL_SECONDS | 1 | how often dependencies are probed |
| MEGACITY_DEFAULT_DEADLINE_SECONDS | 10 | deadline of outgoing calls that inherit none |
| MEGACITY_LOG_LEVEL | info | debug, info, warning, error |
| OTEL_EXPORTER_OTLP_ENDPOINT | (none) | export traces over OTLP/gRPC when set |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from services.runtime.catalog import Catalog, ServiceEntry


class ConfigError(ValueError):
    """An environment variable has a value the runtime cannot use."""


class Transport(Enum):
    MTLS = "mtls"
    LINKERD = "linkerd"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_number(name: str, default: float, *, minimum: float = 0.0) -> float:
    """A number of at least `minimum` from the environment; unset or empty gives the default."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        bound = "not be negative" if minimum == 0 else f"be at least {minimum:g}"
        raise ConfigError(f"{name}={raw!r} must {bound}")
    return value


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    """An integer of at least `minimum` from the environment; unset or empty gives the default."""
    value = env_number(name, default, minimum=minimum)
    if not float(value).is_integer():
        raise ConfigError(f"{name}={os.environ[name]!r} is not an integer")
    return int(value)


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def megacity_home() -> Path:
    default = Path.home() / ".local" / "state" / "megacity"
    return Path(_env("MEGACITY_HOME", str(default))).expanduser()


def pki_dir() -> Path:
    return Path(_env("MEGACITY_PKI_DIR", str(megacity_home() / "pki"))).expanduser()


def transport() -> Transport:
    raw = _env("MEGACITY_TRANSPORT", Transport.MTLS.value)
    try:
        return Transport(raw)
    except ValueError:
        raise ConfigError(f"MEGACITY_TRANSPORT={raw!r}; expected mtls or linkerd") from None


def port_offset() -> int:
    return _int("MEGACITY_PORT_OFFSET", 0)


def target_of(entry: ServiceEntry) -> str:
    """host:port where peers reach `entry`."""
    override = os.environ.get(f"MEGACITY_TARGET_{entry.name.upper()}")
    if override:
        return override
    host = _env("MEGACITY_SERVICE_HOST_TEMPLATE", "127.0.0.1").format(name=entry.name)
    return f"{host}:{entry.port + port_offset()}"


@dataclass(frozen=True)
class ServiceConfig:
    """Everything one service process needs to know about itself and its surroundings."""

    entry: ServiceEntry
    catalog: Catalog
    transport: Transport
    pki_dir: Path
    bind_host: str
    port: int
    metrics_port: int
    database_url: str | None
    redis_url: str | None
    shutdown_grace_seconds: float
    health_interval_seconds: float
    default_deadline_seconds: float
    log_level: str

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def identity(self) -> str:
        return self.catalog.spiffe_id(self.entry.name)

    @classmethod
    def from_environment(cls, catalog: Catalog, name: str) -> ServiceConfig:
        entry = catalog.service(name)
        offset = port_offset()
        config = cls(
            entry=entry,
            catalog=catalog,
            transport=transport(),
            pki_dir=pki_dir(),
            bind_host=_env("MEGACITY_BIND_HOST", "127.0.0.1"),
            port=_int("MEGACITY_PORT", entry.port + offset),
            metrics_port=_int("MEGACITY_METRICS_PORT", entry.metrics_port + offset),
            database_url=os.environ.get("MEGACITY_DATABASE_URL") or None,
            redis_url=os.environ.get("MEGACITY_REDIS_URL") or None,
            shutdown_grace_seconds=env_number("MEGACITY_SHUTDOWN_GRACE_SECONDS", 10.0),
            health_interval_seconds=env_number("MEGACITY_HEALTH_INTERVAL_SECONDS", 1.0),
            default_deadline_seconds=env_number("MEGACITY_DEFAULT_DEADLINE_SECONDS", 10.0),
            log_level=_env("MEGACITY_LOG_LEVEL", "info").lower(),
        )
        missing = [
            variable
            for dependency, variable, value in (
                ("postgres", "MEGACITY_DATABASE_URL", config.database_url),
                ("redis", "MEGACITY_REDIS_URL", config.redis_url),
            )
            if dependency in entry.depends_on and not value
        ]
        if missing:
            raise ConfigError(f"service {name} depends on {', '.join(missing)}, which is not set")
        return config
