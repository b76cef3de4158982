"""The service catalog (mesh/catalog.yaml): services, ports, identities, dependencies and call policy.

Pure data and validation: no I/O beyond reading the file. Everything that needs to know a service's
address, identity or who may call it reads it from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CATALOG = REPO / "mesh" / "catalog.yaml"
DEPENDENCY_KINDS = frozenset({"postgres", "redis", "model"})
# The largest gRPC message a service takes or sends unless its entry says `max_message_mib`.
DEFAULT_MAX_MESSAGE_MIB = 64
PUBLIC_SELECTOR = "@public"


class CatalogError(ValueError):
    """The catalog file is malformed or inconsistent."""


@dataclass(frozen=True)
class AllowRule:
    """Callers (catalog names) that may call the methods matched by `methods` (see catalog.yaml)."""

    callers: tuple[str, ...]
    methods: tuple[str, ...]


@dataclass(frozen=True)
class ServiceEntry:
    name: str
    description: str
    module: str
    grpc_services: tuple[str, ...]
    port: int
    metrics_port: int
    depends_on: tuple[str, ...]
    allow: tuple[AllowRule, ...]
    max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB


@dataclass(frozen=True)
class Catalog:
    trust_domain: str
    namespace: str
    services: Mapping[str, ServiceEntry]
    callers: Mapping[str, str]

    def spiffe_id(self, name: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{name}"

    @property
    def identities(self) -> tuple[str, ...]:
        """Every workload name that holds an identity: services first, then pure callers."""
        return (*self.services, *self.callers)

    def name_of(self, spiffe_id: str) -> str | None:
        """The catalog name behind a SPIFFE ID of this trust domain and namespace, if any."""
        prefix = f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/"
        if not spiffe_id.startswith(prefix):
            return None
        name = spiffe_id.removeprefix(prefix)
        return name if name in self.services or name in self.callers else None

    def service(self, name: str) -> ServiceEntry:
        try:
            return self.services[name]
        except KeyError:
            raise CatalogError(f"unknown service {name!r}; the catalog has {', '.join(self.services)}") from None

    def with_service(self, entry: ServiceEntry) -> Catalog:
        """A copy with one more (or a replaced) service: for tests that serve extra contracts."""
        return Catalog(self.trust_domain, self.namespace, {**self.services, entry.name: entry}, self.callers)


def catalog_path() -> Path:
    return Path(os.environ.get("MEGACITY_CATALOG", str(DEFAULT_CATALOG)))


def load_catalog(path: Path | None = None) -> Catalog:
    source = path or catalog_path()
    try:
        raw = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise CatalogError(f"cannot read the catalog {source}: {error}") from error
    return parse_catalog(raw, source=str(source))


def _require(mapping: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = mapping.get(key)
    if not isinstance(value, kind):
        raise CatalogError(f"{where}: `{key}` must be a {kind.__name__}, got {value!r}")
    return value


def _rules(raw: Any, where: str) -> tuple[AllowRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise CatalogError(f"{where}: `allow` must be a list of rules")
    rules = []
    for index, item in enumerate(raw):
        at = f"{where}.allow[{index}]"
        if not isinstance(item, dict):
            raise CatalogError(f"{at}: a rule is a mapping with `callers` and `methods`")
        callers = _require(item, "callers", list, at)
        methods = _require(item, "methods", list, at)
        if not callers or not methods or not all(isinstance(v, str) for v in callers + methods):
            raise CatalogError(f"{at}: `callers` and `methods` must be non-empty lists of names")
        for method in methods:
            if method != PUBLIC_SELECTOR and method.count("/") != 1:
                raise CatalogError(f"{at}: {method!r} is not `package.Service/Method`, `package.Service/*` or @public")
        rules.append(AllowRule(tuple(callers), tuple(methods)))
    return tuple(rules)


def parse_catalog(raw: Any, source: str = "catalog") -> Catalog:
    if not isinstance(raw, dict):
        raise CatalogError(f"{source}: the catalog must be a mapping")
    trust_domain = _require(raw, "trust_domain", str, source)
    namespace = _require(raw, "namespace", str, source)
    callers_raw = raw.get("callers") or {}
    if not isinstance(callers_raw, dict):
        raise CatalogError(f"{source}: `callers` must be a mapping")
    callers = {name: str((spec or {}).get("description", "")) for name, spec in callers_raw.items()}
    common = _rules(raw.get("common_allow"), f"{source}.common_allow")
    services_raw = _require(raw, "services", dict, source)

    services: dict[str, ServiceEntry] = {}
    used_ports: dict[int, str] = {}
    for name, spec in services_raw.items():
        where = f"{source}.services.{name}"
        if not isinstance(spec, dict):
            raise CatalogError(f"{where}: must be a mapping")
        if name in callers:
            raise CatalogError(f"{where}: {name!r} is both a service and a caller")
        depends_on = tuple(spec.get("depends_on") or ())
        unknown = set(depends_on) - DEPENDENCY_KINDS
        if unknown:
            raise CatalogError(f"{where}: unknown dependencies {sorted(unknown)}; known: {sorted(DEPENDENCY_KINDS)}")
        entry = ServiceEntry(
            name=name,
            description=str(spec.get("description", "")),
            module=_require(spec, "module", str, where),
            grpc_services=tuple(_require(spec, "grpc_services", list, where)),
            port=_require(spec, "port", int, where),
            metrics_port=_require(spec, "metrics_port", int, where),
            depends_on=depends_on,
            allow=common + _rules(spec.get("allow"), where),
            max_message_mib=spec.get("max_message_mib", DEFAULT_MAX_MESSAGE_MIB),
        )
        if not isinstance(entry.max_message_mib, int) or not 1 <= entry.max_message_mib <= 2047:
            raise CatalogError(f"{where}: `max_message_mib` must be an integer from 1 to 2047 (gRPC's int32 bound)")
        for port in (entry.port, entry.metrics_port):
            if port in used_ports:
                raise CatalogError(f"{where}: port {port} is already used by {used_ports[port]}")
            used_ports[port] = name
        services[name] = entry

    known = set(services) | set(callers)
    for entry in services.values():
        for rule in entry.allow:
            strangers = set(rule.callers) - known
            if strangers:
                raise CatalogError(f"{source}.services.{entry.name}: unknown callers {sorted(strangers)}")
    return Catalog(trust_domain, namespace, services, callers)
