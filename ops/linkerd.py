"""Kubernetes + Linkerd manifests generated from the mesh catalog (`megacity gen` -> mesh/linkerd/generated/).

The catalog (mesh/catalog.yaml) says which caller identities may call which methods; the runtime enforces it
in-process (services/runtime/policy.py) and this module turns the *same* resolution (`resolve_rules`, with
@public expanded from the contracts) into Linkerd policy, so the mesh and the runtime cannot disagree.

Output: a Kustomize base, deployable with `kubectl apply -k mesh/linkerd/generated` (Linkerd with its policy
CRDs and the Gateway API GRPCRoute CRD installed), consumed by the hand-written overlays beside it:

    kustomization.yaml          lists every file below
    namespace.yaml              the catalog's namespace: linkerd.io/inject, default-inbound-policy deny
    callers.yaml                a ServiceAccount per pure caller (edge, ops): their mesh identities
    services/<name>.yaml        ServiceAccount (= the identity), Service (grpc h2c + metrics), Deployment
    policy/<name>.yaml          Servers (grpc, metrics), GRPCRoutes and their AuthorizationPolicies
    policy/authentications.yaml MeshTLSAuthentications: one per distinct set of callers, plus metrics scrapers

Per-method policy. Linkerd authorizes a request by the one route it matches, and among GRPCRoutes attached to
a Server the most specific match wins (most characters matched in the service, then in the method). So for
each service we first compute the callers allowed for every distinct match:

- `pkg.Service/*` rules become one service-wide match whose callers are the union of those rules;
- every explicitly named method gets `MethodPolicy.callers_for(path)`: its own rules *plus* the service-wide
  ones, because the exact match overrides the wildcard in Linkerd; a method whose callers equal the wildcard's
  is left to the wildcard.

Matches that share a caller set become one GRPCRoute (parentRef: the service's grpc Server; rules of at
most 8 matches, routes of at most 16 rules, as the CRD allows), with an AuthorizationPolicy that targets the
route and requires the MeshTLSAuthentication of exactly those callers (identityRefs to their ServiceAccounts,
so the identities follow Linkerd's trust domain). No two routes of a Server match a method with the same
specificity, so no conflict is resolved by creation time. A method no rule allows matches no route and the
grpc Server's `accessPolicy: deny` refuses it; so does any caller the route's policy does not list.

Probes. Linkerd authorizes kubelet probes by itself only for httpGet probes, and only on a Server that has no
routes (https://linkerd.io/2/features/server-policy/#default-authorizations); gRPC probes are not covered
(linkerd/linkerd2#9595), and authorizing the kubelet on the grpc port would need an unauthenticated network
rule the catalog does not contain. So the probes are httpGet on the *metrics* port, whose Server has no
routes: `/livez` (the process is up) and `/readyz` (the gRPC health service reports SERVING, i.e. the
dependencies answer). The runtime's metrics listener must serve both paths. The gRPC health service itself
stays reachable exactly as the catalog says (`grpc.health.v1.Health/*` for ops and edge).

Metrics. The metrics port gets its own Server (HTTP/1, deny by default) and one AuthorizationPolicy on that
Server requiring the `metrics-scrapers` MeshTLSAuthentication: by default Linkerd-viz's meshed Prometheus
(ServiceAccount linkerd-viz/prometheus). An environment with another Prometheus patches that one object in its
overlay; an unmeshed Prometheus needs a NetworkAuthentication added by the overlay.

Everything is ordered and named deterministically (DNS-1123 labels of at most 63 characters; long names end in
a hash of the full name), and YAML is dumped with sorted keys, so `megacity gen --check` is byte-stable. Route
names follow their caller sets, so a catalog change can replace objects: apply with pruning (see
mesh/linkerd/README.md), or a left-over route could keep authorizing callers the catalog dropped.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError

from services.runtime.catalog import Catalog, CatalogError, ServiceEntry, load_catalog
from services.runtime.contracts import load_pool, service_methods
from services.runtime.policy import MethodMatch, MethodPolicy, ResolvedRule, resolve_rules

GENERATED_DIR = Path("mesh/linkerd/generated")

# apiVersions: the storage versions of the CRDs in ../shared/schemas/k8s-crds/.
SERVER_API = "policy.linkerd.io/v1beta3"
POLICY_API = "policy.linkerd.io/v1alpha1"
GRPCROUTE_API = "gateway.networking.k8s.io/v1"
POLICY_GROUP = "policy.linkerd.io"
GATEWAY_GROUP = "gateway.networking.k8s.io"

# The image every service runs (`megacity serve <name>`); overlays set registry and tag with `images:`.
IMAGE = "megacity"
IMAGE_TAG = "dev"
# Prometheus that may scrape the metrics ports, unless an overlay patches `metrics-scrapers`.
METRICS_SCRAPERS = "metrics-scrapers"
DEFAULT_SCRAPER = {"kind": "ServiceAccount", "name": "prometheus", "namespace": "linkerd-viz"}
LIVENESS_PATH = "/livez"
READINESS_PATH = "/readyz"
STATE_DIR = "/var/lib/megacity"
RUN_AS = 10001
# Above the runtime's MEGACITY_SHUTDOWN_GRACE_SECONDS (10): SIGTERM drains in-flight calls before SIGKILL.
TERMINATION_GRACE_SECONDS = 30

# What the CRDs allow: GRPCRoute spec.rules maxItems and spec.rules[].matches maxItems.
MAX_RULES_PER_ROUTE = 16
MAX_MATCHES_PER_RULE = 8
MAX_NAME = 63
_HASH_CHARS = 10
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

HEADER = (
    "# Generated by `megacity gen` (ops/linkerd.py) from mesh/catalog.yaml and the contracts. Do not edit:\n"
    "# change the catalog or the generator, or patch it in an overlay (mesh/linkerd/overlays/).\n"
)

Doc = dict[str, Any]


@dataclass(frozen=True)
class RouteGroup:
    """Methods (exact or service-wide) that one set of callers may call: a GRPCRoute (more if very many)."""

    callers: tuple[str, ...]
    matches: tuple[MethodMatch, ...]


def _match_key(match: MethodMatch) -> tuple[str, str]:
    return (match.service, match.method or "")


def route_groups(rules: Sequence[ResolvedRule]) -> tuple[RouteGroup, ...]:
    """The callers of every distinct match of a service's resolved rules, grouped by caller set.

    Exact methods carry the callers of the service-wide rules too (the exact route overrides the wildcard in
    Linkerd), which is `MethodPolicy.callers_for`; an exact method with the wildcard's callers is dropped.
    """
    policy = MethodPolicy(tuple(rules))
    wildcard: dict[str, frozenset[str]] = {}
    exact: set[tuple[str, str]] = set()
    for rule in rules:
        if rule.match.method is None:
            wildcard[rule.match.service] = wildcard.get(rule.match.service, frozenset()) | rule.callers
        else:
            exact.add((rule.match.service, rule.match.method))
    allowed: dict[MethodMatch, frozenset[str]] = {MethodMatch(s, None): c for s, c in wildcard.items()}
    for service, method in exact:
        callers = policy.callers_for(f"/{service}/{method}")
        if callers != wildcard.get(service):
            allowed[MethodMatch(service, method)] = callers
    by_callers: dict[tuple[str, ...], list[MethodMatch]] = {}
    for match, callers in allowed.items():
        by_callers.setdefault(tuple(sorted(callers)), []).append(match)
    return tuple(
        RouteGroup(callers, tuple(sorted(matches, key=_match_key))) for callers, matches in sorted(by_callers.items())
    )


def dns_name(*parts: str) -> str:
    """`parts` joined by '-'; beyond 63 characters, a prefix plus a hash of the whole, so it stays unique."""
    full = "-".join(parts)
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:_HASH_CHARS]
    return f"{full[: MAX_NAME - _HASH_CHARS - 1].rstrip('-')}-{digest}"


def _chunks(items: Sequence[MethodMatch], size: int) -> list[Sequence[MethodMatch]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "megacity-gen",
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": "megacity",
    }


def _selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "megacity"}


def _meta(name: str, namespace: str, labels: Mapping[str, str], **extra: Any) -> Doc:
    return {"name": name, "namespace": namespace, "labels": dict(labels), **extra}


class _Names:
    """Object names, checked for collisions: two catalog entries must never produce one object."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], str] = {}

    def claim(self, kind: str, name: str, owner: str) -> str:
        if not _DNS1123_LABEL.match(name) or len(name) > MAX_NAME:
            raise CatalogError(f"{owner}: {kind} name {name!r} is not a DNS-1123 label of at most {MAX_NAME} chars")
        previous = self._seen.setdefault((kind, name), owner)
        if previous != owner:
            raise CatalogError(f"{kind} {name!r} would be generated for both {previous} and {owner}")
        return name


def authentication_name(callers: Iterable[str]) -> str:
    return dns_name("callers", *sorted(callers))


# --- workloads -------------------------------------------------------------------------------------------


def namespace_doc(catalog: Catalog) -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": catalog.namespace,
            "labels": _labels(catalog.namespace, "namespace"),
            "annotations": {
                "config.linkerd.io/default-inbound-policy": "deny",
                "linkerd.io/inject": "enabled",
            },
        },
    }


def service_account_doc(catalog: Catalog, name: str, component: str) -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(name, catalog.namespace, _labels(name, component)),
        # Linkerd's proxy authenticates with its own projected token; the application needs none.
        "automountServiceAccountToken": False,
    }


def service_doc(catalog: Catalog, entry: ServiceEntry) -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(entry.name, catalog.namespace, _labels(entry.name, "service")),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(entry.name),
            "ports": [
                {
                    "name": "grpc",
                    "port": entry.port,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "kubernetes.io/h2c",
                },
                {
                    "name": "metrics",
                    "port": entry.metrics_port,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
            ],
        },
    }


def _probe(path: str, period: int, failures: int) -> Doc:
    return {
        "httpGet": {"path": path, "port": "metrics", "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def deployment_doc(catalog: Catalog, entry: ServiceEntry) -> Doc:
    ns = catalog.namespace
    env = {
        "MEGACITY_BIND_HOST": "0.0.0.0",  # noqa: S104 - inside the pod; the Linkerd proxy fronts both ports
        "MEGACITY_HOME": STATE_DIR,
        "MEGACITY_SERVICE_HOST_TEMPLATE": f"{{name}}.{ns}.svc.cluster.local",
        "MEGACITY_TRANSPORT": "linkerd",
        "PYTHONUNBUFFERED": "1",
    }
    needs_secret = any(dependency in entry.depends_on for dependency in ("postgres", "redis"))
    container: Doc = {
        "name": entry.name,
        "image": f"{IMAGE}:{IMAGE_TAG}",
        "imagePullPolicy": "IfNotPresent",
        "command": ["megacity", "serve", entry.name],
        "env": [{"name": key, "value": value} for key, value in sorted(env.items())],
        # MEGACITY_DATABASE_URL / MEGACITY_REDIS_URL (and any other setting) per service; required when the
        # service depends on PostgreSQL or Redis, so a missing Secret stops the pod instead of a late failure.
        "envFrom": [{"secretRef": {"name": f"megacity-{entry.name}-env", "optional": not needs_secret}}],
        "ports": [
            {"name": "grpc", "containerPort": entry.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": entry.metrics_port, "protocol": "TCP"},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        # Probes on the metrics port: see the module docstring (Linkerd authorizes them there by default).
        "startupProbe": _probe(LIVENESS_PATH, period=2, failures=90),
        "livenessProbe": _probe(LIVENESS_PATH, period=10, failures=3),
        "readinessProbe": _probe(READINESS_PATH, period=5, failures=2),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "state", "mountPath": STATE_DIR}, {"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108
    }
    pod_annotations = {
        "config.linkerd.io/default-inbound-policy": "deny",
        "linkerd.io/inject": "enabled",
        "prometheus.io/path": "/metrics",
        "prometheus.io/port": str(entry.metrics_port),
        "prometheus.io/scrape": "true",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(
            entry.name,
            ns,
            _labels(entry.name, "service"),
            annotations={"megacity.io/description": entry.description},
        ),
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": _selector(entry.name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": _labels(entry.name, "service"), "annotations": pod_annotations},
                "spec": {
                    "serviceAccountName": entry.name,
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS,
                        "runAsGroup": RUN_AS,
                        "fsGroup": RUN_AS,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [{"name": "state", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


# --- policy ----------------------------------------------------------------------------------------------


def _policy_labels(entry: ServiceEntry) -> dict[str, str]:
    return _labels(entry.name, "policy")


def server_doc(catalog: Catalog, entry: ServiceEntry, name: str, port: str, protocol: str) -> Doc:
    return {
        "apiVersion": SERVER_API,
        "kind": "Server",
        "metadata": _meta(name, catalog.namespace, _policy_labels(entry)),
        "spec": {
            "podSelector": {"matchLabels": _selector(entry.name)},
            "port": port,
            "proxyProtocol": protocol,
            "accessPolicy": "deny",
        },
    }


def _grpc_match(match: MethodMatch) -> Doc:
    method: Doc = {"type": "Exact", "service": match.service}
    if match.method is not None:
        method["method"] = match.method
    return {"method": method}


def grpc_route_doc(
    catalog: Catalog, entry: ServiceEntry, name: str, server: str, matches: Sequence[MethodMatch]
) -> Doc:
    return {
        "apiVersion": GRPCROUTE_API,
        "kind": "GRPCRoute",
        "metadata": _meta(name, catalog.namespace, _policy_labels(entry)),
        "spec": {
            "parentRefs": [{"group": POLICY_GROUP, "kind": "Server", "name": server}],
            "rules": [
                {"matches": [_grpc_match(match) for match in chunk]} for chunk in _chunks(matches, MAX_MATCHES_PER_RULE)
            ],
        },
    }


def authorization_doc(catalog: Catalog, entry: ServiceEntry, name: str, target: Doc, authentication: str) -> Doc:
    return {
        "apiVersion": POLICY_API,
        "kind": "AuthorizationPolicy",
        "metadata": _meta(name, catalog.namespace, _policy_labels(entry)),
        "spec": {
            "targetRef": target,
            "requiredAuthenticationRefs": [
                {"group": POLICY_GROUP, "kind": "MeshTLSAuthentication", "name": authentication}
            ],
        },
    }


def mesh_tls_doc(catalog: Catalog, name: str, identity_refs: Sequence[Doc], description: str) -> Doc:
    return {
        "apiVersion": POLICY_API,
        "kind": "MeshTLSAuthentication",
        "metadata": _meta(
            name,
            catalog.namespace,
            _labels(name, "authentication"),
            annotations={"megacity.io/description": description},
        ),
        "spec": {"identityRefs": list(identity_refs)},
    }


def _format_match(match: MethodMatch) -> str:
    return f"{match.service}/{match.method or '*'}"


def policy_docs(
    catalog: Catalog, entry: ServiceEntry, groups: Sequence[RouteGroup], names: _Names
) -> tuple[list[Doc], list[str]]:
    """Servers, GRPCRoutes and AuthorizationPolicies of one service, and a readable summary of them."""
    owner = f"services.{entry.name}"
    grpc_server = names.claim("Server", dns_name(entry.name, "grpc"), owner)
    metrics_server = names.claim("Server", dns_name(entry.name, "metrics"), owner)
    docs = [
        server_doc(catalog, entry, grpc_server, "grpc", "gRPC"),
        server_doc(catalog, entry, metrics_server, "metrics", "HTTP/1"),
    ]
    summary: list[str] = []
    per_route = MAX_RULES_PER_ROUTE * MAX_MATCHES_PER_RULE
    for group in groups:
        parts = _chunks(group.matches, per_route)
        base = (entry.name, "from", *group.callers)
        for index, part in enumerate(parts, start=1):
            name = dns_name(*base, str(index)) if len(parts) > 1 else dns_name(*base)
            names.claim("GRPCRoute", name, owner)
            names.claim("AuthorizationPolicy", name, owner)
            target = {"group": GATEWAY_GROUP, "kind": "GRPCRoute", "name": name}
            docs.append(grpc_route_doc(catalog, entry, name, grpc_server, part))
            docs.append(authorization_doc(catalog, entry, name, target, authentication_name(group.callers)))
            summary.append(f"{name}: {', '.join(group.callers)}")
            summary += [f"    {_format_match(match)}" for match in part]
    metrics_policy = names.claim("AuthorizationPolicy", metrics_server, owner)
    docs.append(
        authorization_doc(
            catalog,
            entry,
            metrics_policy,
            {"group": POLICY_GROUP, "kind": "Server", "name": metrics_server},
            METRICS_SCRAPERS,
        )
    )
    summary.append(f"{metrics_policy}: {METRICS_SCRAPERS} (port metrics; probes authorized by Linkerd)")
    return docs, summary


# --- checks and rendering --------------------------------------------------------------------------------


def check_catalog(catalog: Catalog, pool: descriptor_pool.DescriptorPool) -> None:
    """Fail early, with every problem at once, on what would make manifests invalid or incomplete."""
    problems: list[str] = []
    if not _DNS1123_LABEL.match(catalog.namespace):
        problems.append(f"namespace {catalog.namespace!r} is not a DNS-1123 label")
    for name in catalog.services:
        if not _DNS1035_LABEL.match(name) or len(name) > MAX_NAME - len("-metrics"):
            problems.append(f"service name {name!r} must be a DNS-1035 label of at most {MAX_NAME - 8} characters")
    for name in catalog.callers:
        if not _DNS1123_LABEL.match(name) or len(name) > MAX_NAME:
            problems.append(f"caller name {name!r} must be a DNS-1123 label of at most {MAX_NAME} characters")
    missing = [
        f"{contract} (service {entry.name})"
        for entry in catalog.services.values()
        for contract in entry.grpc_services
        if service_methods(pool, contract) is None
    ]
    if missing:
        problems.append("contracts not in the descriptor set: " + ", ".join(missing))
    if problems:
        raise CatalogError("cannot generate the Linkerd manifests: " + "; ".join(problems))


def _dump(docs: Sequence[Doc], comment: Sequence[str] = ()) -> str:
    lines = [HEADER, *(f"# {line}\n" for line in comment)]
    body = yaml.safe_dump_all(docs, sort_keys=True, explicit_start=True, default_flow_style=False, width=1000)
    return "".join(lines) + body


def render(catalog: Catalog, pool: descriptor_pool.DescriptorPool) -> dict[str, str]:
    """Every generated file: path relative to mesh/linkerd/generated/ -> its text."""
    check_catalog(catalog, pool)
    names = _Names()
    ns = catalog.namespace
    files: dict[str, str] = {"namespace.yaml": _dump([namespace_doc(catalog)])}

    for name in catalog.identities:
        names.claim("ServiceAccount", name, f"identity {name}")
    files["callers.yaml"] = _dump(
        [service_account_doc(catalog, name, "caller") for name in sorted(catalog.callers)],
        ["Identities that call services but serve nothing here (their workloads live elsewhere: gateway/)."],
    )

    caller_sets: set[tuple[str, ...]] = set()
    for name in sorted(catalog.services):
        entry = catalog.services[name]
        groups = route_groups(resolve_rules(entry, pool))
        caller_sets |= {group.callers for group in groups}
        files[f"services/{name}.yaml"] = _dump(
            [
                service_account_doc(catalog, name, "service"),
                service_doc(catalog, entry),
                deployment_doc(catalog, entry),
            ],
            [f"{name}: {entry.description}"] if entry.description else [],
        )
        docs, summary = policy_docs(catalog, entry, groups, names)
        files[f"policy/{name}.yaml"] = _dump(
            docs, [f"Who may call {name} (route: callers, then its matches):", *summary]
        )

    authentications = [
        mesh_tls_doc(
            catalog,
            METRICS_SCRAPERS,
            [DEFAULT_SCRAPER],
            "Who may scrape the metrics ports; patch per environment.",
        )
    ]
    names.claim("MeshTLSAuthentication", METRICS_SCRAPERS, "metrics")
    for callers in sorted(caller_sets):
        name = names.claim("MeshTLSAuthentication", authentication_name(callers), f"callers {', '.join(callers)}")
        refs = [{"kind": "ServiceAccount", "name": caller} for caller in callers]
        authentications.append(mesh_tls_doc(catalog, name, refs, f"Callers: {', '.join(callers)} (namespace {ns})."))
    files["policy/authentications.yaml"] = _dump(authentications)

    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": sorted(files, key=lambda path: (path != "namespace.yaml", path)),
    }
    files["kustomization.yaml"] = _dump([kustomization])
    return files


def _read_pool(descriptor_set: Path) -> descriptor_pool.DescriptorPool:
    try:
        return load_pool(descriptor_set)
    except (OSError, DecodeError, TypeError) as error:
        raise CatalogError(f"cannot read the contracts' descriptor set {descriptor_set}: {error}") from error


def write_manifests(out: Path, descriptor_set: Path) -> None:
    """Write the Kustomize base under `out`/mesh/linkerd/generated/ from the catalog and the descriptor set.

    The catalog is `mesh/catalog.yaml` (or $MEGACITY_CATALOG). Raises CatalogError, before writing anything,
    when the catalog names a contract the descriptor set lacks or would produce invalid manifests.
    """
    files = render(load_catalog(), _read_pool(descriptor_set))
    target = out / GENERATED_DIR
    if target.exists():
        shutil.rmtree(target)
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
