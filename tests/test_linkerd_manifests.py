"""The Linkerd manifests (ops/linkerd.py): valid Kubernetes objects that encode exactly the catalog's policy.

Every generated object is validated: core kinds with kubernetes-validate (strict), Linkerd and Gateway API
kinds against the OpenAPI v3 schemas of their CRDs (../shared/schemas/k8s-crds/, unknown fields refused, the
GRPCRoute CEL rules checked by hand). The policy is read back from the GRPCRoutes, AuthorizationPolicies and
MeshTLSAuthentications the way Linkerd evaluates them (the most specific route match wins; a request matching
no route of a Server that has routes is refused) and compared, for every method of every contract, health and
reflection, and every identity, with `MethodPolicy(resolve_rules(...)).callers_for(path)`: allowed and denied.

Most tests use tests/fixtures/linkerd/ (a small catalog on the ProbeService contract plus a fixture contract
with HTTP rules); the real catalog is checked once its contracts are in gen/descriptor/megacity.binpb.

The REST edge's pod (Envoy, its rate-limit service, the init container compiling the configuration) is checked
for what it runs and how it is hardened, and every Server of the namespace is asked whether an unauthenticated
client from an arbitrary address gets in: only the edge's public port may answer yes.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import ratelimit
from gateway.edge import DEFAULT_ADMIN_PORT
from gateway.envoy_config import DEFAULT_LIMITS, READY_PATH, ROUTE_LIMITS
from ops import linkerd
from services.runtime.catalog import Catalog, CatalogError, load_catalog, parse_catalog
from services.runtime.contracts import DEFAULT_DESCRIPTOR_SET, load_pool, service_methods
from services.runtime.policy import MethodPolicy, resolve_rules

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "linkerd"
FIXTURE_CATALOG = FIXTURES / "catalog.yaml"
CRD_DIR = REPO.parent / "shared" / "schemas" / "k8s-crds"
KUBERNETES_VERSION = "1.33"
CORE_KINDS = frozenset({"Namespace", "ServiceAccount", "Service", "Deployment"})
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LINKERD_IDENTITY = re.compile(r"^(?P<sa>[^.]+)\.(?P<ns>[^.]+)\.serviceaccount\.identity\.linkerd\.")
# Paths every server gets asked about beyond its contracts: the mesh's own tooling, and one nobody serves.
EXTRA_PATHS = (
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.health.v1.Health/List",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/megacity.nowhere.v1.NowhereService/Nothing",
)
STRANGER = "stranger"
# Addresses of clients nobody knows, as the load balancer passes them on.
INTERNET_CLIENTS = ("203.0.113.7", "2001:db8::7")
# NetworkAuthentication is not among ../shared/schemas/k8s-crds/ (yet): its schema as Linkerd's CRD declares it
# (linkerd/linkerd2, charts/linkerd-crds/templates/policy/network-authentication.yaml), used only when missing there.
NETWORK_AUTHENTICATION_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: networkauthentications.policy.linkerd.io
spec:
  group: policy.linkerd.io
  scope: Namespaced
  names: {kind: NetworkAuthentication, plural: networkauthentications, singular: networkauthentication}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          required: [spec]
          properties:
            spec:
              type: object
              required: [networks]
              properties:
                networks:
                  type: array
                  items:
                    type: object
                    required: [cidr]
                    properties:
                      cidr: {type: string}
                      except: {type: array, items: {type: string}}
"""

Doc = dict[str, Any]


# --- building inputs -------------------------------------------------------------------------------------


def compile_fixture_descriptor_set(target: Path) -> Path:
    """The current descriptor set plus the fixture contract (its public RPCs), as one FileDescriptorSet."""
    import grpc_tools  # type: ignore[import-untyped]

    fixture = target.with_suffix(".fixture.binpb")
    includes = [
        FIXTURES / "proto",
        REPO / "proto",
        REPO / "third_party" / "googleapis",
        Path(grpc_tools.__file__).parent / "_proto",
    ]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            *(f"-I{include}" for include in includes),
            "--include_imports",
            f"--descriptor_set_out={fixture}",
            "megacity/fixture/v1/catalogue.proto",
        ],
        check=True,
        capture_output=True,
    )
    merged = descriptor_pb2.FileDescriptorSet.FromString(DEFAULT_DESCRIPTOR_SET.read_bytes())
    known = {file.name for file in merged.file}
    for file in descriptor_pb2.FileDescriptorSet.FromString(fixture.read_bytes()).file:
        if file.name not in known:
            merged.file.append(file)
    target.write_bytes(merged.SerializeToString())
    return target


@pytest.fixture(scope="session")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_fixture_descriptor_set(tmp_path_factory.mktemp("contracts") / "megacity.binpb")


@pytest.fixture(scope="session")
def pool(descriptor_set: Path) -> descriptor_pool.DescriptorPool:
    return load_pool(descriptor_set)


@pytest.fixture(scope="session")
def fixture_catalog() -> Catalog:
    return load_catalog(FIXTURE_CATALOG)


def write_with_catalog(catalog_path: Path, out: Path, descriptor_set: Path) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEGACITY_CATALOG", str(catalog_path))
        linkerd.write_manifests(out, descriptor_set=descriptor_set)
    return out / linkerd.GENERATED_DIR


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory, descriptor_set: Path) -> Path:
    return write_with_catalog(FIXTURE_CATALOG, tmp_path_factory.mktemp("out"), descriptor_set)


def read_tree(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): path.read_text() for path in sorted(root.rglob("*")) if path.is_file()}


def documents(files: Mapping[str, str]) -> list[Doc]:
    docs: list[Doc] = []
    for path, text in sorted(files.items()):
        if path == "kustomization.yaml":
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def contract_paths(pool_: descriptor_pool.DescriptorPool, descriptor_set: Path) -> list[str]:
    """Every method of every megacity contract in the descriptor set, as gRPC paths."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    names = sorted(
        f"{file.package}.{service.name}"
        for file in files
        for service in file.service
        if file.package.startswith("megacity.")
    )
    return [method.path for name in names for method in service_methods(pool_, name) or ()]


# --- schemas ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrdVersion:
    schema: Doc
    storage: bool


def _strict(schema: Any) -> Any:
    """An OpenAPI schema that refuses unknown fields (the API server would silently prune them)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_versions() -> dict[tuple[str, str], CrdVersion]:
    """(apiVersion, kind) -> schema of every served version of the CRDs we were given."""
    found: dict[tuple[str, str], CrdVersion] = {}
    assert CRD_DIR.is_dir(), f"the shared CRD schemas are missing: expected {CRD_DIR} beside the repository"
    crds = [crd for path in sorted(CRD_DIR.glob("*.yaml")) for crd in yaml.safe_load_all(path.read_text())]
    crds = [crd for crd in crds if crd and crd.get("kind") == "CustomResourceDefinition"]
    if not any(crd["spec"]["names"]["kind"] == "NetworkAuthentication" for crd in crds):
        crds.append(yaml.safe_load(NETWORK_AUTHENTICATION_CRD))
    for crd in crds:
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = dict(version["schema"]["openAPIV3Schema"])
            schema["properties"] = {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                **schema.get("properties", {}),
            }
            found[(f"{group}/{version['name']}", kind)] = CrdVersion(_strict(schema), bool(version.get("storage")))
    return found


GRPC_SERVICE = re.compile(r"^\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$", re.IGNORECASE)
GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


def check_grpcroute_cel(doc: Doc) -> None:
    """The GRPCRoute CRD's x-kubernetes-validations (CEL) that jsonschema cannot evaluate."""
    for rule in doc["spec"]["rules"]:
        for match in rule.get("matches", []):
            method = match.get("method", {})
            if "type" in method:
                assert "service" in method or "method" in method, doc["metadata"]["name"]
            if method.get("type", "Exact") == "Exact":
                assert "service" not in method or GRPC_SERVICE.match(method["service"]), method
                assert "method" not in method or GRPC_METHOD.match(method["method"]), method
    refs = [
        (ref.get("group"), ref.get("kind"), ref["name"], ref.get("sectionName"), ref.get("port"))
        for ref in doc["spec"]["parentRefs"]
    ]
    assert len(refs) == len(set(refs)), refs


def validate_documents(docs: Iterable[Doc]) -> None:
    seen: set[tuple[str, str]] = set()
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        assert DNS1123_LABEL.match(name), f"{kind} {name!r} is not a DNS-1123 label"
        assert len(name) <= linkerd.MAX_NAME, f"{kind} {name!r} is longer than {linkerd.MAX_NAME}"
        assert (kind, name) not in seen, f"two {kind} objects named {name}"
        seen.add((kind, name))
        if kind in CORE_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            continue
        version = crd_versions().get((doc["apiVersion"], kind))
        assert version is not None, f"{kind} {name}: no served CRD version {doc['apiVersion']}"
        assert version.storage, f"{kind} {name}: {doc['apiVersion']} is served but not the storage version"
        jsonschema.Draft7Validator(version.schema).validate(doc)
        if kind == "GRPCRoute":
            check_grpcroute_cel(doc)


# --- reading the policy back the way Linkerd evaluates it --------------------------------------------------


@dataclass
class Route:
    name: str
    matches: list[tuple[str, str | None]]


@dataclass
class MeshModel:
    """Servers, routes and authorizations of one namespace, evaluated as Linkerd's inbound policy does."""

    namespace: str
    servers: dict[str, Doc] = field(default_factory=dict)
    routes: dict[str, list[Route]] = field(default_factory=dict)
    policies: list[Doc] = field(default_factory=list)
    authentications: dict[str, Doc] = field(default_factory=dict)

    @classmethod
    def from_documents(cls, docs: Iterable[Doc], namespace: str) -> MeshModel:
        model = cls(namespace)
        for doc in docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            assert doc["metadata"].get("namespace", namespace) == namespace, f"{kind} {name} outside {namespace}"
            if kind == "Server":
                model.servers[name] = doc
            elif kind == "AuthorizationPolicy":
                model.policies.append(doc)
            elif kind == "MeshTLSAuthentication":
                model.authentications[name] = doc
        for doc in docs:
            if doc["kind"] != "GRPCRoute":
                continue
            matches = [
                (match["method"]["service"], match["method"].get("method"))
                for rule in doc["spec"]["rules"]
                for match in rule["matches"]
            ]
            for ref in doc["spec"]["parentRefs"]:
                if ref.get("group") == "policy.linkerd.io" and ref.get("kind") == "Server":
                    assert ref["name"] in model.servers, f"GRPCRoute {doc['metadata']['name']}: no Server {ref['name']}"
                    model.routes.setdefault(ref["name"], []).append(Route(doc["metadata"]["name"], matches))
        return model

    def server_for(self, pod_labels: Mapping[str, str], port_name: str) -> str:
        found = [
            name
            for name, server in self.servers.items()
            if server["spec"]["port"] == port_name
            and server["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
        ]
        assert len(found) == 1, f"port {port_name} of pods {pod_labels}: Servers {found}"
        return found[0]

    def _identities(self, ref: Doc) -> frozenset[str]:
        """Identities an authentication reference admits: catalog names, or ns/name for other namespaces."""
        if ref.get("kind") == "ServiceAccount" and not ref.get("group"):
            return frozenset({self._name(ref["name"], ref.get("namespace"))})
        assert (ref.get("group"), ref.get("kind")) == ("policy.linkerd.io", "MeshTLSAuthentication"), ref
        authentication = self.authentications.get(ref["name"])
        assert authentication is not None, f"MeshTLSAuthentication {ref['name']} is referenced but not generated"
        spec = authentication["spec"]
        names = {
            self._name(item["name"], item.get("namespace"))
            for item in spec.get("identityRefs", [])
            if item["kind"] == "ServiceAccount"
        }
        for identity in spec.get("identities", []):
            parsed = LINKERD_IDENTITY.match(identity)
            assert parsed, f"identity {identity!r} is not a Linkerd service-account identity"
            names.add(self._name(parsed["sa"], parsed["ns"]))
        return frozenset(names)

    def _name(self, name: str, namespace: str | None) -> str:
        return name if namespace in (None, self.namespace) else f"{namespace}/{name}"

    def _authorized(self, kind: str, group: str, name: str) -> frozenset[str]:
        allowed: set[str] = set()
        for policy in self.policies:
            target = policy["spec"]["targetRef"]
            if (target.get("group", ""), target["kind"], target["name"]) != (group, kind, name):
                continue
            refs = policy["spec"]["requiredAuthenticationRefs"]
            # Every required authentication must hold: the intersection of what each admits.
            admitted = frozenset.intersection(*(self._identities(ref) for ref in refs)) if refs else frozenset()
            allowed |= admitted
        return frozenset(allowed)

    def allowed(self, server: str, path: str) -> frozenset[str]:
        """Who Linkerd lets call `path` on `server`."""
        service, _, method = path.lstrip("/").partition("/")
        namespace_wide = self._authorized("Namespace", "", self.namespace)
        server_wide = self._authorized("Server", "policy.linkerd.io", server)
        routes = self.routes.get(server, [])
        if not routes:
            return server_wide | namespace_wide
        best: tuple[int, int] | None = None
        winners: set[str] = set()
        for route in routes:
            for match_service, match_method in route.matches:
                if match_service != service or match_method not in (None, method):
                    continue
                score = (len(match_service), len(match_method or ""))
                if best is None or score > best:
                    best, winners = score, {route.name}
                elif score == best:
                    winners.add(route.name)
        if not winners:
            return frozenset()  # A Server with routes refuses a request that matches none.
        assert len(winners) == 1, f"{path} on {server}: routes {sorted(winners)} conflict (creation time decides)"
        route_name = winners.pop()
        return self._authorized("GRPCRoute", "gateway.networking.k8s.io", route_name) | server_wide | namespace_wide


def check_policy(docs: list[Doc], catalog: Catalog, pool_: descriptor_pool.DescriptorPool, paths: Iterable[str]) -> int:
    """Linkerd's decisions equal the runtime's for each (identity, path) of each service; how many checked."""
    model = MeshModel.from_documents(docs, catalog.namespace)
    deployments = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Deployment"}
    identities = (*catalog.identities, STRANGER)
    all_paths = sorted({*paths, *EXTRA_PATHS})
    checked = 0
    for name, entry in catalog.services.items():
        expected_policy = MethodPolicy(resolve_rules(entry, pool_))
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        server = model.server_for(pod_labels, "grpc")
        for path in all_paths:
            allowed = model.allowed(server, path)
            expected = expected_policy.callers_for(path)
            assert allowed <= set(catalog.identities), f"{name} {path}: unknown identities {allowed}"
            for identity in identities:
                assert (identity in allowed) == (identity in expected), (
                    f"{name} {path}: Linkerd {'allows' if identity in allowed else 'denies'} {identity}, "
                    f"the catalog {'allows' if identity in expected else 'denies'} it"
                )
                checked += 1
        metrics = model.server_for(pod_labels, "metrics")
        assert not model.routes.get(metrics), "routes on the metrics Server would disable Linkerd's probe authorization"
        assert model.allowed(metrics, "/metrics") == {"linkerd-viz/prometheus"}
    return checked


def check_workloads(docs: list[Doc], catalog: Catalog) -> None:
    by_kind: dict[str, dict[str, Doc]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    namespace = by_kind["Namespace"][catalog.namespace]["metadata"]["annotations"]
    assert namespace["linkerd.io/inject"] == "enabled"
    assert namespace["config.linkerd.io/default-inbound-policy"] == "deny"
    assert set(by_kind["ServiceAccount"]) == set(catalog.identities)
    workloads = {*catalog.services, *([linkerd.EDGE] if linkerd.EDGE in catalog.callers else [])}
    assert set(by_kind["Deployment"]) == workloads == set(by_kind["Service"])
    if linkerd.EDGE in catalog.callers:
        check_edge(by_kind, catalog)
    for name, entry in catalog.services.items():
        pod = by_kind["Deployment"][name]["spec"]["template"]
        spec = pod["spec"]
        assert spec["serviceAccountName"] == name
        assert pod["metadata"]["annotations"]["config.linkerd.io/default-inbound-policy"] == "deny"
        (container,) = spec["containers"]
        assert container["command"] == ["megacity", "serve", name]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["MEGACITY_TRANSPORT"] == "linkerd"
        assert env["MEGACITY_BIND_HOST"] == "0.0.0.0"  # noqa: S104
        assert env["MEGACITY_SERVICE_HOST_TEMPLATE"] == f"{{name}}.{catalog.namespace}.svc.cluster.local"
        (secret,) = container["envFrom"]
        assert secret["secretRef"]["name"] == f"megacity-{name}-env"
        assert secret["secretRef"]["optional"] == (
            "postgres" not in entry.depends_on and "redis" not in entry.depends_on
        )
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"grpc": entry.port, "metrics": entry.metrics_port}
        assert container["resources"]["requests"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["port"] == "metrics", probe
        service_ports = {port["name"]: port for port in by_kind["Service"][name]["spec"]["ports"]}
        assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
        assert service_ports["grpc"]["port"] == entry.port
        grpc_server = linkerd.dns_name(name, "grpc")
        assert by_kind["Server"][grpc_server]["spec"]["proxyProtocol"] == "gRPC"
        assert by_kind["Server"][grpc_server]["spec"]["accessPolicy"] == "deny"


def _env(container: Doc) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """A container's plain variables, and its variables from Secrets (name -> (secret, key))."""
    plain = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
    secret = {
        item["name"]: (item["valueFrom"]["secretKeyRef"]["name"], item["valueFrom"]["secretKeyRef"]["key"])
        for item in container.get("env", [])
        if "valueFrom" in item
    }
    return plain, secret


def check_edge(by_kind: Mapping[str, Mapping[str, Doc]], catalog: Catalog) -> None:
    """The edge's pod: what runs, with which identity, secrets, ports, probes and hardening."""
    pod = by_kind["Deployment"][linkerd.EDGE]["spec"]["template"]
    spec, annotations = pod["spec"], pod["metadata"]["annotations"]
    assert spec["serviceAccountName"] == linkerd.EDGE
    assert spec["automountServiceAccountToken"] is False
    assert annotations["linkerd.io/inject"] == "enabled"
    assert annotations["config.linkerd.io/default-inbound-policy"] == "deny"
    assert all(annotations[name] == "true" for name in linkerd.NATIVE_SIDECAR_ANNOTATIONS)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == linkerd.RUN_AS
    (init,) = spec["initContainers"]
    containers = {container["name"]: container for container in spec["containers"]}
    assert set(containers) == {"envoy", "ratelimit"}
    envoy, limiter = containers["envoy"], containers["ratelimit"]
    for container in (init, envoy, limiter):
        assert container["image"] == f"{linkerd.IMAGE}:{linkerd.IMAGE_TAG}"
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }, container["name"]
        assert container["resources"]["requests"], container["name"]
        assert "envFrom" not in container, "each container gets only the secrets it uses"

    # The init container compiles, for Linkerd, into the emptyDir Envoy reads (read-only) its configuration from.
    command = init["command"]
    assert command[:4] == ["python", "-m", "gateway.edge", "compile"]
    config = Path(command[command.index("--out") + 1])
    assert envoy["command"][0] == "envoy"
    assert Path(envoy["command"][envoy["command"].index("-c") + 1]) == config
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    [init_mount] = [m for m in init["volumeMounts"] if m["mountPath"] == str(config.parent)]
    [envoy_mount] = [m for m in envoy["volumeMounts"] if m["mountPath"] == str(config.parent)]
    assert init_mount["name"] == envoy_mount["name"]
    assert "emptyDir" in volumes[init_mount["name"]]
    assert envoy_mount.get("readOnly") is True
    assert limiter["command"] == ["python", "-m", "gateway.ratelimit"]

    plain, secrets = _env(init)
    (http,) = envoy["ports"]
    assert http["name"] == "http"
    assert plain["MEGACITY_TRANSPORT"] == "linkerd"
    assert plain["MEGACITY_SERVICE_HOST_TEMPLATE"] == f"{{name}}.{catalog.namespace}.svc.cluster.local"
    assert plain["MEGACITY_EDGE_HOST"] == "0.0.0.0"  # noqa: S104
    assert plain["MEGACITY_EDGE_PORT"] == str(http["containerPort"])
    assert secrets == {"MEGACITY_DATABASE_URL": (linkerd.EDGE_SECRET, "MEGACITY_DATABASE_URL")}
    assert _env(limiter)[1] == {"MEGACITY_REDIS_URL": (linkerd.EDGE_SECRET, "MEGACITY_REDIS_URL")}
    assert _env(envoy)[1] == {}

    # Only Envoy's public port is declared; the rate-limit service and Envoy's admin are loopback-only.
    assert "ports" not in init
    assert "ports" not in limiter
    declared = {port["containerPort"] for container in (init, envoy, limiter) for port in container.get("ports", [])}
    assert declared == {http["containerPort"]}
    assert not declared & {ratelimit.DEFAULT_PORT, DEFAULT_ADMIN_PORT}
    # The public port bypasses the proxy, so Envoy sees the clients' addresses.
    assert str(http["containerPort"]) in annotations["config.linkerd.io/skip-inbound-ports"].split(",")

    # Readiness from Envoy itself, never from /health (503 while any one service is down).
    assert envoy["readinessProbe"]["httpGet"] == {"path": READY_PATH, "port": "http", "scheme": "HTTP"}
    assert "/health" not in yaml.safe_dump(spec)
    # Draining: the slowest route fits in the grace period, and both hooks return before it ends.
    grace = spec["terminationGracePeriodSeconds"]
    slowest = max(limits.timeout for limits in (DEFAULT_LIMITS, *ROUTE_LIMITS.values())).total_seconds()
    assert grace > slowest + linkerd.EDGE_DRAIN_WINDOW
    for container, verb in ((envoy, "drain"), (limiter, "wait-exit")):
        hook = container["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:4] == ["python", "-m", "gateway.edge", verb]
        assert float(hook[hook.index("--deadline") + 1]) < grace

    service = by_kind["Service"][linkerd.EDGE]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert [port["targetPort"] for port in service["ports"]] == ["http"]
    assert service["type"] == "LoadBalancer"
    assert service["externalTrafficPolicy"] == "Local"


def _network_admits(authentication: Doc, address: str) -> bool:
    ip = ipaddress.ip_address(address)
    for network in authentication["spec"]["networks"]:
        cidr = ipaddress.ip_network(network["cidr"])
        excluded = [ipaddress.ip_network(item, strict=False) for item in network.get("except", [])]
        if ip.version == cidr.version and ip in cidr and not any(ip in item for item in excluded):
            return True
    return False


def open_ports(docs: list[Doc]) -> dict[str, frozenset[str]]:
    """Servers an unauthenticated client gets through (as Linkerd evaluates Server, route and namespace policy),
    each with the INTERNET_CLIENTS addresses it admits."""
    networks = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "NetworkAuthentication"}
    route_parents = {
        doc["metadata"]["name"]: {ref["name"] for ref in doc["spec"]["parentRefs"] if ref.get("kind") == "Server"}
        for doc in docs
        if doc["kind"] in ("GRPCRoute", "HTTPRoute")
    }
    found: dict[str, frozenset[str]] = {}
    for server in (doc for doc in docs if doc["kind"] == "Server"):
        name = server["metadata"]["name"]
        if server["spec"].get("accessPolicy") == "all-unauthenticated":
            found[name] = frozenset(INTERNET_CLIENTS)
            continue
        admitted: set[str] = set()
        for policy in (doc for doc in docs if doc["kind"] == "AuthorizationPolicy"):
            target = policy["spec"]["targetRef"]
            applies = (
                (target["kind"] == "Server" and target["name"] == name)
                or target["kind"] == "Namespace"
                or name in route_parents.get(target["name"], set())
            )
            refs = policy["spec"]["requiredAuthenticationRefs"]
            if not applies:
                continue
            for address in INTERNET_CLIENTS:
                # Every required authentication must hold: a mesh identity never does for such a client.
                if all(
                    ref["kind"] == "NetworkAuthentication" and _network_admits(networks[ref["name"]], address)
                    for ref in refs
                ):
                    admitted.add(address)
        if admitted:
            found[name] = frozenset(admitted)
    return found


def check_public_ports(docs: list[Doc], catalog: Catalog) -> None:
    """Unauthenticated clients, from any IPv4 or IPv6 address, reach the edge's public port and nothing else."""
    opened = open_ports(docs)
    if linkerd.EDGE not in catalog.callers:
        assert opened == {}
        return
    assert len(opened) == 1, f"Servers open to unauthenticated clients: {sorted(opened)}"
    [(server, addresses)] = opened.items()
    assert addresses == frozenset(INTERNET_CLIENTS), f"{server} admits only {sorted(addresses)}"
    spec = next(doc for doc in docs if doc["kind"] == "Server" and doc["metadata"]["name"] == server)["spec"]
    edge = next(doc for doc in docs if doc["kind"] == "Deployment" and doc["metadata"]["name"] == linkerd.EDGE)
    template = edge["spec"]["template"]
    assert spec["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    envoy = next(container for container in template["spec"]["containers"] if container["name"] == "envoy")
    assert spec["port"] == "http" == envoy["ports"][0]["name"]
    # No other Server selects the edge's pods: its other ports keep the namespace's deny.
    edge_servers = [
        doc
        for doc in docs
        if doc["kind"] == "Server"
        and doc["spec"]["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    ]
    assert [doc["metadata"]["name"] for doc in edge_servers] == [server]


def check_kustomization(files: Mapping[str, str]) -> None:
    kustomization = yaml.safe_load(files["kustomization.yaml"])
    assert sorted(kustomization["resources"]) == sorted(path for path in files if path != "kustomization.yaml")


def check_everything(
    files: Mapping[str, str], catalog: Catalog, pool_: descriptor_pool.DescriptorPool, paths: Iterable[str]
) -> None:
    docs = documents(files)
    validate_documents(docs)
    check_kustomization(files)
    check_workloads(docs, catalog)
    check_public_ports(docs, catalog)
    assert check_policy(docs, catalog, pool_, paths) > 0


# --- the fixture catalog -----------------------------------------------------------------------------------


def test_every_document_validates(generated: Path) -> None:
    files = read_tree(generated)
    docs = documents(files)
    assert {doc["kind"] for doc in docs} == {
        *CORE_KINDS,
        "Server",
        "GRPCRoute",
        "AuthorizationPolicy",
        "MeshTLSAuthentication",
        "NetworkAuthentication",
    }
    validate_documents(docs)
    check_kustomization(files)


def test_schema_validation_catches_mistakes(generated: Path) -> None:
    """The validators used above do refuse what the API server would refuse or silently drop."""
    docs = documents(read_tree(generated))
    route = next(doc for doc in docs if doc["kind"] == "GRPCRoute")
    typo = {**route, "spec": {**route["spec"], "parentRef": route["spec"]["parentRefs"]}}
    with pytest.raises(jsonschema.ValidationError):
        validate_documents([typo])
    authn = next(doc for doc in docs if doc["kind"] == "MeshTLSAuthentication")
    both = {**authn, "spec": {**authn["spec"], "identities": ["*"]}}
    with pytest.raises(jsonschema.ValidationError):
        validate_documents([both])
    bad_method = {
        **route,
        "spec": {**route["spec"], "rules": [{"matches": [{"method": {"service": "a b"}}]}]},
    }
    with pytest.raises(AssertionError):
        validate_documents([bad_method])
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    unknown = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_documents([unknown])


def test_workloads_follow_the_catalog(generated: Path, fixture_catalog: Catalog) -> None:
    check_workloads(documents(read_tree(generated)), fixture_catalog)


def test_only_the_edges_public_port_admits_unauthenticated_clients(generated: Path, fixture_catalog: Catalog) -> None:
    docs = documents(read_tree(generated))
    check_public_ports(docs, fixture_catalog)
    assert set(open_ports(docs)) == {linkerd.dns_name(linkerd.EDGE, "http")}
    # The check would notice a second open door, and a door open to IPv4 only.
    probe = next(doc for doc in docs if doc["kind"] == "Server" and doc["metadata"]["name"] == "probe-grpc")
    opened = {**probe, "spec": {**probe["spec"], "accessPolicy": "all-unauthenticated"}}
    with pytest.raises(AssertionError, match="probe-grpc"):
        check_public_ports([*docs, opened], fixture_catalog)
    ipv4_only = [
        {**doc, "spec": {"networks": [{"cidr": "0.0.0.0/0"}]}} if doc["kind"] == "NetworkAuthentication" else doc
        for doc in docs
    ]
    assert open_ports(ipv4_only) == {linkerd.dns_name(linkerd.EDGE, "http"): frozenset({"203.0.113.7"})}


def test_a_catalog_without_the_edge_caller_gets_no_edge(pool: descriptor_pool.DescriptorPool) -> None:
    raw = raw_fixture_catalog()
    del raw["callers"][linkerd.EDGE]
    for rule in raw.get("common_allow", []):
        rule["callers"] = [caller for caller in rule["callers"] if caller != linkerd.EDGE]
    for service in raw["services"].values():
        for rule in service.get("allow", []):
            rule["callers"] = [caller for caller in rule["callers"] if caller != linkerd.EDGE]
        service["allow"] = [rule for rule in service.get("allow", []) if rule["callers"]]
    catalog = parse_catalog(raw)
    files = linkerd.render(catalog, pool)
    assert "edge.yaml" not in files
    assert "policy/edge.yaml" not in files
    docs = documents(files)
    validate_documents(docs)
    check_workloads(docs, catalog)
    check_public_ports(docs, catalog)


def test_manifests_encode_exactly_the_catalog_policy(
    generated: Path, fixture_catalog: Catalog, pool: descriptor_pool.DescriptorPool, descriptor_set: Path
) -> None:
    paths = contract_paths(pool, descriptor_set)
    assert "/megacity.fixture.v1.CatalogueService/PurgeThings" in paths
    checked = check_policy(documents(read_tree(generated)), fixture_catalog, pool, paths)
    assert checked >= len(fixture_catalog.services) * len(paths) * len(fixture_catalog.identities)


def test_policy_edge_cases_of_the_fixture(generated: Path, fixture_catalog: Catalog) -> None:
    """Spot checks of what the fixture is there for, stated plainly."""
    model = MeshModel.from_documents(documents(read_tree(generated)), fixture_catalog.namespace)

    def allowed(service: str, path: str) -> frozenset[str]:
        return model.allowed(f"{service}-grpc", path)

    # @public expands to the contract's HTTP-annotated methods only.
    assert allowed("catalogue", "/megacity.fixture.v1.CatalogueService/CreateThing") == {"edge"}
    assert allowed("catalogue", "/megacity.fixture.v1.CatalogueService/GetThing") == {
        "edge",
        "probe",
        "relay",
    }
    assert allowed("catalogue", "/megacity.fixture.v1.CatalogueService/LookupThing") == {"probe", "relay"}
    assert allowed("catalogue", "/megacity.fixture.v1.CatalogueService/PurgeThings") == set()
    # An exact method inside a wildcard keeps the wildcard's callers.
    assert allowed("probe", "/grpc.health.v1.Health/Watch") == {"edge", "ops", "relay"}
    assert allowed("probe", "/grpc.health.v1.Health/Check") == {"edge", "ops"}
    assert allowed("relay", "/megacity.testing.v1.ProbeService/Echo") == {"edge", "probe", "relay"}
    assert allowed("relay", "/megacity.testing.v1.ProbeService/Fail") == {"probe", "relay"}
    # A contract a service does not serve, and a method of its own contract nobody may call.
    assert allowed("probe", "/megacity.fixture.v1.CatalogueService/GetThing") == set()
    assert allowed("probe", "/megacity.testing.v1.ProbeService/Fail") == set()
    # Methods sharing a caller set share one route; long caller lists give a hashed, bounded name.
    routes = {route.name: route for route in model.routes["probe-grpc"]}
    assert sorted(routes["probe-from-ops"].matches) == [
        ("grpc.reflection.v1.ServerReflection", None),
        ("grpc.reflection.v1alpha.ServerReflection", None),
    ]
    assert any(len(name) == 63 for name in (route.name for route in model.routes["catalogue-grpc"]))


def test_generating_twice_gives_identical_bytes(generated: Path, descriptor_set: Path, tmp_path: Path) -> None:
    """Also across interpreters with different string hashing, which would expose any set-order dependence."""
    first = read_tree(generated)
    again = read_tree(write_with_catalog(FIXTURE_CATALOG, tmp_path / "again", descriptor_set))
    assert again == first
    code = "import sys; from pathlib import Path; from ops.linkerd import write_manifests; "
    code += "write_manifests(Path(sys.argv[1]), Path(sys.argv[2]))"
    for seed in ("1", "2"):
        out = tmp_path / f"seed-{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "MEGACITY_CATALOG": str(FIXTURE_CATALOG)}
        subprocess.run([sys.executable, "-c", code, str(out), str(descriptor_set)], cwd=REPO, env=env, check=True)
        assert read_tree(out / linkerd.GENERATED_DIR) == first, f"PYTHONHASHSEED={seed} changed the output"


def test_stale_files_are_removed(descriptor_set: Path, tmp_path: Path) -> None:
    stale = tmp_path / linkerd.GENERATED_DIR / "policy" / "gone.yaml"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    write_with_catalog(FIXTURE_CATALOG, tmp_path, descriptor_set)
    assert not stale.exists()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_kustomize_builds_the_base(generated: Path) -> None:
    built = subprocess.run(["kubectl", "kustomize", str(generated)], capture_output=True, text=True, check=True)
    rendered = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert len(rendered) == len(documents(read_tree(generated)))
    assert rendered[0]["kind"] == "Namespace"


# --- failures --------------------------------------------------------------------------------------------


def raw_fixture_catalog() -> dict[str, Any]:
    raw = yaml.safe_load(FIXTURE_CATALOG.read_text())
    assert isinstance(raw, dict)
    return raw


def test_a_missing_contract_is_a_clear_catalog_error(descriptor_set: Path, tmp_path: Path) -> None:
    raw = raw_fixture_catalog()
    raw["services"]["ghost"] = {
        "module": "services.ghost.server",
        "grpc_services": ["megacity.ghost.v1.GhostService"],
        "port": 7990,
        "metrics_port": 9990,
        "allow": [{"callers": ["edge"], "methods": ["megacity.ghost.v1.GhostService/*"]}],
    }
    raw["services"]["phantom"] = {**raw["services"]["ghost"], "port": 7991, "metrics_port": 9991}
    raw["services"]["phantom"]["grpc_services"] = ["megacity.phantom.v1.PhantomService"]
    raw["services"]["phantom"]["allow"] = [{"callers": ["edge"], "methods": ["@public"]}]
    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CatalogError) as raised:
        write_with_catalog(catalog_path, tmp_path / "out", descriptor_set)
    message = str(raised.value)
    assert "megacity.ghost.v1.GhostService (service ghost)" in message
    assert "megacity.phantom.v1.PhantomService (service phantom)" in message
    assert not (tmp_path / "out").exists(), "nothing is written when the catalog cannot be generated"


def test_an_unreadable_descriptor_set_is_a_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="descriptor set"):
        write_with_catalog(FIXTURE_CATALOG, tmp_path, tmp_path / "missing.binpb")
    garbage = tmp_path / "garbage.binpb"
    garbage.write_bytes(b"\xff\xff\xff")
    with pytest.raises(CatalogError, match="descriptor set"):
        write_with_catalog(FIXTURE_CATALOG, tmp_path, garbage)


def test_names_kubernetes_refuses_are_catalog_errors(pool: descriptor_pool.DescriptorPool) -> None:
    raw = raw_fixture_catalog()
    raw["callers"]["Bad_Name"] = {"description": "not a DNS-1123 label"}
    with pytest.raises(CatalogError, match="Bad_Name"):
        linkerd.render(parse_catalog(raw), pool)


# --- scale and properties ----------------------------------------------------------------------------------


def test_many_methods_split_into_routes_the_crd_accepts(
    pool: descriptor_pool.DescriptorPool, descriptor_set: Path
) -> None:
    """300 methods of one caller set exceed a GRPCRoute (16 rules x 8 matches); split, the policy holds."""
    raw = raw_fixture_catalog()
    big = [f"example.big.v1.BigService/Method{index:03d}" for index in range(300)]
    raw["services"]["big"] = {
        "module": "services.big.server",
        "grpc_services": ["megacity.testing.v1.ProbeService"],
        "port": 7999,
        "metrics_port": 9999,
        "allow": [{"callers": ["edge"], "methods": big}, {"callers": ["ops"], "methods": big[:20]}],
    }
    catalog = parse_catalog(raw)
    files = linkerd.render(catalog, pool)
    routes = [
        doc for doc in documents(files) if doc["kind"] == "GRPCRoute" and doc["metadata"]["name"].startswith("big-")
    ]
    assert {doc["metadata"]["name"] for doc in routes} >= {
        "big-from-edge-1",
        "big-from-edge-2",
        "big-from-edge-3",
    }
    check_everything(files, catalog, pool, [*contract_paths(pool, descriptor_set), *(f"/{path}" for path in big)])


PROBE_METHODS = ("Echo", "Fail", "Sleep", "Inspect", "Relay", "EchoStream", "EchoChat")
PATTERNS = (
    *(f"megacity.testing.v1.ProbeService/{method}" for method in PROBE_METHODS),
    "megacity.testing.v1.ProbeService/*",
    "grpc.health.v1.Health/*",
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
)
CALLERS = ("alpha", "beta", "edge", "ops")
rules_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "callers": st.lists(st.sampled_from((*CALLERS, "one", "two")), min_size=1, max_size=4, unique=True),
            "methods": st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=5, unique=True),
        }
    ),
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(one=rules_strategy, two=rules_strategy, common=rules_strategy)
def test_any_catalog_policy_is_encoded_exactly(
    one: list[dict[str, list[str]]],
    two: list[dict[str, list[str]]],
    common: list[dict[str, list[str]]],
    pool: descriptor_pool.DescriptorPool,
) -> None:
    def service(port: int, allow: list[dict[str, list[str]]]) -> dict[str, Any]:
        grpc_services = ["megacity.testing.v1.ProbeService"]
        return {
            "module": "m",
            "grpc_services": grpc_services,
            "port": port,
            "metrics_port": port + 1,
            "allow": allow,
        }

    raw = {
        "trust_domain": "megacity.local",
        "namespace": "prop",
        "callers": {name: {} for name in CALLERS},
        "common_allow": common,
        "services": {"one": service(7000, one), "two": service(7100, two)},
    }
    catalog = parse_catalog(raw)
    files = linkerd.render(catalog, pool)
    docs = documents(files)
    paths = [f"/megacity.testing.v1.ProbeService/{method}" for method in PROBE_METHODS]
    check_policy(docs, catalog, pool, paths)
    for doc in docs:
        assert DNS1123_LABEL.match(doc["metadata"]["name"])
        assert len(doc["metadata"]["name"]) <= linkerd.MAX_NAME


# --- the real catalog ------------------------------------------------------------------------------------


def test_real_catalog_manifests() -> None:
    catalog = load_catalog(REPO / "mesh" / "catalog.yaml")
    pool_ = load_pool(DEFAULT_DESCRIPTOR_SET)
    files = linkerd.render(catalog, pool_)
    check_everything(files, catalog, pool_, contract_paths(pool_, DEFAULT_DESCRIPTOR_SET))
    committed = REPO / linkerd.GENERATED_DIR
    assert read_tree(committed) == files, "mesh/linkerd/generated/ is stale: run `./megacity gen`"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_dev_overlay_builds() -> None:
    overlay = REPO / "mesh" / "linkerd" / "overlays" / "dev"
    built = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True)
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    deployments = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Deployment"}
    assert deployments["auth"]["spec"]["replicas"] == 2
    assert deployments[linkerd.EDGE]["spec"]["replicas"] == 2
    images = {
        c["image"]
        for d in deployments.values()
        for c in [
            *d["spec"]["template"]["spec"]["containers"],
            *d["spec"]["template"]["spec"].get("initContainers", []),
        ]
    }
    assert images == {"localhost:5001/megacity:dev"}
    scrapers = next(doc for doc in docs if doc["metadata"]["name"] == linkerd.METRICS_SCRAPERS)
    assert len(scrapers["spec"]["identityRefs"]) == 2
