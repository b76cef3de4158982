"""Per-method call authorization from the mesh catalog: which caller identities may call which methods.

Pure logic. `resolve_rules` turns a service's catalog rules into concrete matches (expanding @public from
the contracts); `MethodPolicy` answers "may this caller call this method" for the runtime's interceptor.
The Linkerd manifest generator uses the same resolution, so local enforcement and the mesh agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import descriptor_pool

from services.runtime.catalog import PUBLIC_SELECTOR, CatalogError, ServiceEntry
from services.runtime.contracts import service_methods


@dataclass(frozen=True)
class MethodMatch:
    """One method (`method` set) or every method of a gRPC service (`method` None)."""

    service: str
    method: str | None

    def covers(self, service: str, method: str) -> bool:
        return self.service == service and (self.method is None or self.method == method)


@dataclass(frozen=True)
class ResolvedRule:
    callers: frozenset[str]
    match: MethodMatch


def resolve_rules(entry: ServiceEntry, pool: descriptor_pool.DescriptorPool) -> tuple[ResolvedRule, ...]:
    """The service's allow rules as concrete matches; unknown services or methods of our contracts fail loudly."""
    resolved: list[ResolvedRule] = []
    for rule in entry.allow:
        callers = frozenset(rule.callers)
        for pattern in rule.methods:
            if pattern == PUBLIC_SELECTOR:
                for service in entry.grpc_services:
                    methods = service_methods(pool, service)
                    if methods is None:
                        raise CatalogError(f"{entry.name}: contract {service} is not in the descriptor set")
                    resolved += [
                        ResolvedRule(callers, MethodMatch(service, method.name)) for method in methods if method.public
                    ]
                continue
            service, method_name = pattern.split("/")
            methods = service_methods(pool, service)
            if methods is not None and method_name != "*" and method_name not in {m.name for m in methods}:
                raise CatalogError(f"{entry.name}: {pattern} names no method of the contract {service}")
            if service.startswith("megacity.") and methods is None:
                raise CatalogError(f"{entry.name}: {pattern} names a contract that is not in the descriptor set")
            resolved.append(ResolvedRule(callers, MethodMatch(service, None if method_name == "*" else method_name)))
    return tuple(resolved)


class MethodPolicy:
    """Answers whether a caller may call a method; decisions per method are computed once and cached."""

    def __init__(self, rules: tuple[ResolvedRule, ...]) -> None:
        self.rules = rules
        self._callers: dict[str, frozenset[str]] = {}

    def callers_for(self, path: str) -> frozenset[str]:
        """Caller names allowed to call `path` (/package.Service/Method); empty when none is."""
        callers = self._callers.get(path)
        if callers is None:
            service, _, method = path.lstrip("/").partition("/")
            callers = frozenset().union(*(r.callers for r in self.rules if r.match.covers(service, method)))
            self._callers[path] = callers
        return callers

    def allows(self, caller: str, path: str) -> bool:
        return caller in self.callers_for(path)
