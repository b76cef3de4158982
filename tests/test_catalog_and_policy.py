"""The mesh catalog and its policy: consistent with the contracts, and refusing malformed catalogs clearly."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from services.runtime.catalog import DEFAULT_CATALOG, CatalogError, load_catalog, parse_catalog
from services.runtime.contracts import default_pool, service_methods
from services.runtime.policy import MethodPolicy, resolve_rules


def _policies() -> dict[str, MethodPolicy]:
    catalog = load_catalog()
    return {name: MethodPolicy(resolve_rules(entry, default_pool())) for name, entry in catalog.services.items()}


def test_every_catalog_rule_names_real_contracts_and_methods() -> None:
    catalog = load_catalog()
    for entry in catalog.services.values():
        assert resolve_rules(entry, default_pool())
        for service in entry.grpc_services:
            assert service_methods(default_pool(), service), f"{entry.name}: {service} has no methods"


# Internal methods the edge itself calls (never transcoded: they have no HTTP rule, so no route reaches them).
EDGE_OWN_CALLS = {"/megacity.tenant.v1.TenantService/ResolveZone"}


def test_the_edge_may_call_exactly_the_public_methods_and_its_own_lookups() -> None:
    catalog = load_catalog()
    policies = _policies()
    public = 0
    for name, entry in catalog.services.items():
        for service in entry.grpc_services:
            for method in service_methods(default_pool(), service) or ():
                allowed = policies[name].allows("edge", method.path)
                expected = method.public or method.path in EDGE_OWN_CALLS
                assert allowed == expected, f"edge on {method.path}: allowed={allowed}, public={method.public}"
                assert not (method.public and method.path in EDGE_OWN_CALLS)
                public += method.public
    assert public > 50  # the published REST surface, not an empty contract set


@pytest.mark.parametrize("service", ["asr", "pose", "llm"])
def test_inference_servers_are_internal(service: str) -> None:
    catalog = load_catalog()
    entry = catalog.service(service)
    policy = _policies()[service]
    for grpc_service in entry.grpc_services:
        for method in service_methods(default_pool(), grpc_service) or ():
            assert not method.public
            assert not policy.allows("edge", method.path)
            assert not policy.allows("ops", method.path)
            assert policy.allows("kzone" if service != "llm" else "tutor", method.path)


def test_internal_lookups_are_open_to_services_not_to_the_edge() -> None:
    policy = _policies()["auth"]
    assert policy.allows("exam", "/megacity.auth.v1.AuthService/LookupUser")
    assert not policy.allows("edge", "/megacity.auth.v1.AuthService/LookupUser")
    assert not policy.allows("exam", "/megacity.auth.v1.AuthService/Login")
    assert not policy.allows("exam", "/megacity.auth.v1.AuthService/NoSuchMethod")


def test_health_is_open_to_operators_and_the_edge_reflection_only_to_operators() -> None:
    policy = _policies()["exam"]
    assert policy.allows("ops", "/grpc.health.v1.Health/Check")
    assert policy.allows("edge", "/grpc.health.v1.Health/Watch")
    assert not policy.allows("auth", "/grpc.health.v1.Health/Check")
    assert policy.allows("ops", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not policy.allows("edge", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")


def _raw() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CATALOG.read_text())
    return raw


def test_a_rule_naming_a_method_the_contract_lacks_is_refused() -> None:
    raw = _raw()
    raw["services"]["exam"]["allow"].append({"callers": ["auth"], "methods": ["megacity.exam.v1.ExamService/Nope"]})
    entry = parse_catalog(raw).service("exam")
    with pytest.raises(CatalogError, match=r"ExamService/Nope names no method"):
        resolve_rules(entry, default_pool())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw["services"]["exam"].update(port=7101), "port 7101 is already used by auth"),
        (
            lambda raw: raw["services"]["exam"]["allow"].append({"callers": ["mallory"], "methods": ["a.B/*"]}),
            "unknown callers",
        ),
        (lambda raw: raw["services"]["exam"].update(depends_on=["mongodb"]), "unknown dependencies"),
        (
            lambda raw: raw["services"]["exam"]["allow"].append({"callers": ["auth"], "methods": ["Login"]}),
            "is not `package.Service/Method`",
        ),
        (lambda raw: raw["services"]["exam"].pop("module"), "`module` must be a str"),
        (lambda raw: raw["callers"].update(exam={}), "both a service and a caller"),
    ],
)
def test_malformed_catalogs_are_refused_with_a_clear_message(mutate: Any, message: str) -> None:
    raw = _raw()
    mutate(raw)
    with pytest.raises(CatalogError, match=message):
        parse_catalog(raw)


def test_spiffe_ids_map_back_to_catalog_names_only_within_the_trust_domain() -> None:
    catalog = load_catalog()
    assert catalog.name_of("spiffe://megacity.local/ns/megacity/sa/exam") == "exam"
    assert catalog.name_of("spiffe://megacity.local/ns/megacity/sa/edge") == "edge"
    assert catalog.name_of("spiffe://evil.example/ns/megacity/sa/exam") is None
    assert catalog.name_of("spiffe://megacity.local/ns/other/sa/exam") is None
    assert catalog.name_of("spiffe://megacity.local/ns/megacity/sa/nobody") is None
