"""The edge's Envoy configuration, compiled from the contracts, the service catalog and the zones.

Typed (envoy-data-plane), never hand-written YAML. What it builds:
- one listener; the gRPC-JSON transcoder serves every RPC with a `google.api.http` rule and nothing else (unknown
  paths and query parameters are refused by the transcoder, internal RPCs have no route);
- one virtual host per zone for `api.<domain>` of each of its domains, which sets `x-megacity-zone` (overwriting
  any copy a client sent: the zone cannot be forged), a dev virtual host for localhost with a default zone, and a
  catch-all that answers 404 for any other host;
- one route per public RPC, matched on its gRPC path after transcoding, to its service's cluster, with the route's
  timeout (streaming RPCs: no overall timeout, an idle timeout instead);
- one cluster per service, HTTP/2 with gRPC health checks. Under `Transport.MTLS` (locally) Envoy does mTLS itself
  with the edge's identity from the catalog's PKI, checking the service's SPIFFE ID; under `Transport.LINKERD`
  (Kubernetes) the cluster is plaintext HTTP/2 to the service's cluster DNS name and the pod's Linkerd proxy does
  the mTLS, as ServiceAccount `edge`;
- `l5d-*` headers stripped from every request and response, whatever the transport (see `_strip_linkerd_headers`);
- the security headers on every response, no server banner, request ids, JSON access logs on stdout;
- `GET /health` (every service behind the edge healthy) and `GET /readyz` (this Envoy accepts traffic: 503 only once
  it is draining, i.e. after the admin's /healthcheck/fail), answered on any host.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import betterproto2
from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLog,
    AccessLogFilter,
    ComparisonFilter,
    ComparisonFilterOp,
    StatusCodeFilter,
)
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation, HeaderMutationRemoveOnMatch
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    Http2ProtocolOptions,
    HttpUri,
    RuntimeUInt32,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
from envoy_data_plane.envoy.config.ratelimit.v3 import RateLimitServiceConfig
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    RateLimit,
    RateLimitAction,
    RateLimitActionGenericKey,
    RateLimitActionRemoteAddress,
    Route,
    RouteAction,
    RouteActionClusterNotFoundResponseCode,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer, BufferPerRoute
from envoy_data_plane.envoy.extensions.filters.http.cors.v3 import Cors, CorsPolicy
from envoy_data_plane.envoy.extensions.filters.http.grpc_json_transcoder.v3 import (
    GrpcJsonTranscoder,
    GrpcJsonTranscoderPrintOptions,
    GrpcJsonTranscoderRequestValidationOptions,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import HeaderMutation as HeaderMutationFilter
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import Mutations
from envoy_data_plane.envoy.extensions.filters.http.health_check.v3 import HealthCheck as HealthCheckFilter
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwtAuthentication,
    JwtProvider,
    JwtRequirement,
    PerRouteConfig,
    RemoteJwks,
)
from envoy_data_plane.envoy.extensions.filters.http.ratelimit.v3 import RateLimit as RateLimitFilter
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerServerHeaderTransformation,
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
    DownstreamConnectionsConfig,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import HttpStatus, Percent, StatusCode
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Struct
from google.protobuf import descriptor_pool

from gateway.ratelimit import DOMAIN as RATELIMIT_DOMAIN
from services.runtime.catalog import Catalog
from services.runtime.config import Transport
from services.runtime.contracts import MethodInfo, service_methods

ZONE_HEADER = "x-megacity-zone"
JWT_FILTER = "envoy.filters.http.jwt_authn"
CORS_FILTER = "envoy.filters.http.cors"
BUFFER_FILTER = "envoy.filters.http.buffer"
# Browsers of the zone's app (https://app.<domain>) call its API with credentials (the refresh-token cookie).
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE"
CORS_HEADERS = "authorization, content-type, x-request-id"
DEV_ORIGIN = r"http://(localhost|127\.0\.0\.1)(:[0-9]+)?"
JWKS_PATH = "/.well-known/jwks.json"
# How long the edge trusts a fetched JWKS before fetching it again.
JWKS_CACHE = timedelta(minutes=5)
JWKS_CLUSTER = "edge_jwks"
RATELIMIT_CLUSTER = "edge_ratelimit"
LOGIN_RPC = "/megacity.auth.v1.AuthService/Login"
JWKS_RPC = "/megacity.auth.v1.AuthService/GetJwks"
KZONE_SERVICE = "megacity.kzone.v1.KZoneService"
# Rate-limit stages: one filter each, so login fails closed and the rest open when the service is down.
_LOGIN_STAGE, _API_STAGE = 0, 1
STREAM_IDLE_TIMEOUT = timedelta(seconds=60)
_MB = 1024 * 1024


@dataclass(frozen=True)
class BodyLimits:
    """How large a request body may be (413 beyond it) and how long the call may take (504 beyond it)."""

    max_bytes: int
    timeout: timedelta


DEFAULT_LIMITS = BodyLimits(10 * _MB, timedelta(seconds=30))
VOICE_LIMITS = BodyLimits(50 * _MB, timedelta(seconds=60))
DANCE_LIMITS = BodyLimits(500 * _MB, timedelta(seconds=300))
# Uploads the K-Zone analyses or keeps: audio like voice, video like dance.
ROUTE_LIMITS = {
    "/megacity.kzone.v1.KZoneService/AnalyzeVoiceFile": VOICE_LIMITS,
    "/megacity.kzone.v1.KZoneService/DetectDancePose": DANCE_LIMITS,
    "/megacity.kzone.v1.KZoneService/UploadReferenceMedia": DANCE_LIMITS,
}
SECURITY_HEADERS = {
    "strict-transport-security": "max-age=31536000; includeSubDomains; preload",
    "x-content-type-options": "nosniff",
    "x-frame-options": "SAMEORIGIN",
    "referrer-policy": "no-referrer-when-downgrade",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}
# The gRPC code a reply Envoy makes itself stands for, by HTTP status (the inverse of the transcoder's mapping).
LOCAL_REPLY_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 408: 4, 409: 10, 413: 8, 429: 8, 431: 3, 501: 12, 503: 14, 504: 4}
_INTERNAL = 13
JSON_CONTENT_TYPE = "application/json"
HEALTH_PATH = "/health"
GRPC = "application/grpc"
READY_PATH = "/readyz"
# Headers of Linkerd's proxies (l5d-client-id, l5d-dst-override, l5d-proxy-error, ...): never from or to a client.
LINKERD_HEADER_PREFIX = "l5d-"
MAX_CLIENT_CONNECTIONS = 50_000
OPENAPI_PATH = "/openapi.json"
MAX_DOCUMENT_BYTES = 8 * _MB
_ACCESS_LOG_FIELDS = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "rpc": "%REQ(:PATH)%",
    "host": "%REQ(:AUTHORITY)%",
    "zone": "%REQ(X-MEGACITY-ZONE)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "upstream": "%UPSTREAM_CLUSTER%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
}


@dataclass(frozen=True)
class EdgeZone:
    zone_id: str
    domains: tuple[str, ...]


@dataclass(frozen=True)
class EdgeSettings:
    listen_host: str
    listen_port: int
    admin_port: int
    descriptor_set: Path
    pki_dir: Path
    # host:port per catalog service name
    targets: dict[str, str]
    zones: tuple[EdgeZone, ...]
    # the zone of requests to localhost (development)
    dev_zone: str
    # host:port of the rate-limit service (gateway/ratelimit.py); None: no rate limits (benchmarks)
    ratelimit_target: str | None
    # the OpenAPI document served at /openapi.json (gen/openapi/megacity.json)
    openapi_document: Path
    # MTLS: Envoy does mTLS to the services itself (pki_dir); LINKERD: plaintext to the pod's Linkerd proxy
    transport: Transport = Transport.MTLS
    # proxies in front of the edge whose X-Forwarded-For entries are trusted for the client's address (rate limits,
    # logs): 0 when clients connect to Envoy directly (a layer-4 load balancer that keeps their address)
    xff_trusted_hops: int = 0


@dataclass(frozen=True)
class PublicRoute:
    service: str  # the catalog name of the service serving it
    method: MethodInfo


def public_routes(catalog: Catalog, pool: descriptor_pool.DescriptorPool) -> list[PublicRoute]:
    """Every RPC people call through the edge (REST/JSON, or gRPC for the live streams), with the service that
    serves it, in catalog order."""
    found = []
    for entry in catalog.services.values():
        for grpc_service in entry.grpc_services:
            for method in service_methods(pool, grpc_service) or ():
                if method.public:
                    found.append(PublicRoute(entry.name, method))
    return found


def _typed(message: betterproto2.Message) -> AnyMessage:
    return AnyMessage.pack(message)


def _headers(values: dict[str, str], action: HeaderValueOptionHeaderAppendAction) -> list[HeaderValueOption]:
    return [
        HeaderValueOption(header=HeaderValue(key=key, value=value), append_action=action)
        for key, value in values.items()
    ]


def _status_json(code: int) -> SubstitutionFormatString:
    """A google.rpc.Status as JSON, the body of every error at the edge, whoever made it."""
    return SubstitutionFormatString(
        json_format=Struct.from_dict({"code": code, "message": "%LOCAL_REPLY_BODY%", "details": []}),
        content_type=JSON_CONTENT_TYPE,
    )


def _local_replies() -> LocalReplyConfig:
    """Envoy's own replies (no route, unknown method or query parameter, upstream down, timeouts) as JSON Status,
    never text or HTML."""
    return LocalReplyConfig(
        mappers=[
            ResponseMapper(
                filter=AccessLogFilter(
                    status_code_filter=StatusCodeFilter(
                        comparison=ComparisonFilter(
                            op=ComparisonFilterOp.EQ,
                            value=RuntimeUInt32(default_value=status, runtime_key=f"megacity.local_reply.{status}"),
                        )
                    )
                ),
                body_format_override=_status_json(code),
            )
            for status, code in LOCAL_REPLY_CODES.items()
        ]
        + [
            ResponseMapper(
                filter=AccessLogFilter(
                    status_code_filter=StatusCodeFilter(
                        comparison=ComparisonFilter(
                            op=ComparisonFilterOp.GE,
                            value=RuntimeUInt32(default_value=400, runtime_key="megacity.local_reply.error"),
                        )
                    )
                ),
                body_format_override=_status_json(_INTERNAL),
            )
        ],
    )


def _route(route: PublicRoute) -> Route:
    streaming = route.method.client_streaming or route.method.server_streaming
    limits = ROUTE_LIMITS.get(route.method.path, DEFAULT_LIMITS)
    # Streams have no overall timeout, only an idle one; unary calls have their route's.
    action = RouteAction(
        cluster=route.service,
        timeout=timedelta(0) if streaming else limits.timeout,
        idle_timeout=STREAM_IDLE_TIMEOUT if streaming else None,
    )
    anonymous = route.method.access is not None and route.method.access.anonymous
    # Anonymous RPCs (register, login, refresh, JWKS, health) pass without a token; every other one needs a valid
    # one here, and the service verifies it again (and its revocation, zone and permission).
    jwt = PerRouteConfig(disabled=True) if anonymous else PerRouteConfig(requirement_name="person")
    # The JWKS is what the edge itself fetches, through its own listener, to check tokens: never limited.
    action.rate_limits = [] if route.method.path == JWKS_RPC else [_rate_limit(route.method)]
    # An RPC without an HTTP rule is reachable as gRPC only (a JSON request there finds no route: 404).
    grpc_only = (
        [] if route.method.rest else [HeaderMatcher(name="content-type", string_match=StringMatcher(prefix=GRPC))]
    )
    return Route(
        name=route.method.path,
        match=RouteMatch(path=route.method.path, headers=grpc_only),
        route=action,
        typed_per_filter_config={JWT_FILTER: _typed(jwt), BUFFER_FILTER: _typed(_body_limit(limits, streaming))},
    )


def _rate_limit(method: MethodInfo) -> RateLimit:
    """The descriptor Envoy asks the rate-limit service about: the RPC's bucket and the client's address."""
    if method.path == LOGIN_RPC:
        bucket, stage = "login", _LOGIN_STAGE
    else:
        bucket, stage = ("kzone" if method.service == KZONE_SERVICE else "api"), _API_STAGE
    return RateLimit(
        stage=stage,
        actions=[
            RateLimitAction(generic_key=RateLimitActionGenericKey(descriptor_key="bucket", descriptor_value=bucket)),
            RateLimitAction(remote_address=RateLimitActionRemoteAddress()),
        ],
    )


def _rate_limit_filter(stage: int, fail_closed: bool) -> HttpFilter:
    config = RateLimitFilter(
        domain=RATELIMIT_DOMAIN,
        stage=stage,
        failure_mode_deny=fail_closed,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        timeout=timedelta(milliseconds=500),
        rate_limit_service=RateLimitServiceConfig(
            grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=RATELIMIT_CLUSTER)),
            transport_api_version=ApiVersion.V3,
        ),
    )
    return HttpFilter(name=f"envoy.filters.http.ratelimit.stage{stage}", typed_config=_typed(config))


def _body_limit(limits: BodyLimits, streaming: bool) -> BufferPerRoute:
    """A unary call's whole body (as the gRPC message it became) up to the route's limit, 413 beyond; streams flow
    through unbuffered."""
    return (
        BufferPerRoute(disabled=True)
        if streaming
        else BufferPerRoute(buffer=Buffer(max_request_bytes=limits.max_bytes))
    )


def _health_filter(services: list[str]) -> HttpFilter:
    """GET /health: 200 while every service behind the edge passes its health check, 503 otherwise."""
    config = HealthCheckFilter(
        pass_through_mode=False,
        headers=[HeaderMatcher(name=":path", string_match=StringMatcher(exact=HEALTH_PATH))],
        cluster_min_healthy_percentages={name: Percent(value=100.0) for name in services},
    )
    return HttpFilter(name="envoy.filters.http.health_check", typed_config=_typed(config))


def _ready_filter() -> HttpFilter:
    """GET /readyz: 200 while this Envoy takes traffic, 503 once it drains (admin /healthcheck/fail), whatever the
    services behind it do. Kubernetes' readiness probe: a service being down must not take every edge replica out
    of its load balancer at once (the edge still answers that service's routes with 503, and all the others)."""
    config = HealthCheckFilter(
        pass_through_mode=False,
        headers=[HeaderMatcher(name=":path", string_match=StringMatcher(exact=READY_PATH))],
    )
    return HttpFilter(name="envoy.filters.http.health_check.ready", typed_config=_typed(config))


def _strip_linkerd_headers() -> HttpFilter:
    """Drop every `l5d-*` header a client sends, and every one a response carries back.

    Behind Linkerd the services believe `l5d-client-id` about who calls them (services/runtime/identity.py).
    Linkerd's inbound proxy already overwrites that header with the mTLS peer's identity, or removes it when the
    connection is not mTLS (linkerd2-proxy, linkerd/app/inbound/src/http/set_identity_header.rs: `insert` when the
    TLS session has a client id, otherwise `remove`), so a forged value does not reach a meshed service. Stripping
    it here as well is defence in depth: it keeps holding if a service is ever reached around its proxy (a skipped
    port, a pod without injection), and other `l5d-*` request headers steer Linkerd's outbound proxy
    (`l5d-dst-override` picks the destination of a proxy injected in ingress mode; the edge's runs in the default
    mode, which routes by the connection's original destination, until someone changes that). On responses, the
    proxies' own headers (`l5d-proxy-error`, ...) describe the mesh to nobody outside it. Locally (mTLS) the same
    filter runs: one configuration, and nothing a client sends can mean anything to a later Linkerd deployment.
    """
    remove = HeaderMutation(
        remove_on_match=HeaderMutationRemoveOnMatch(
            key_matcher=StringMatcher(prefix=LINKERD_HEADER_PREFIX, ignore_case=True)
        )
    )
    config = HeaderMutationFilter(mutations=Mutations(request_mutations=[remove], response_mutations=[remove]))
    return HttpFilter(name="envoy.filters.http.header_mutation", typed_config=_typed(config))


def _jwt_authentication(settings: EdgeSettings) -> JwtAuthentication:
    """Access tokens checked against the auth service's JWKS, fetched through the edge itself (the dev host)."""
    return JwtAuthentication(
        providers={
            "megacity": JwtProvider(
                remote_jwks=RemoteJwks(
                    http_uri=HttpUri(
                        uri=f"http://localhost:{settings.listen_port}{JWKS_PATH}",
                        cluster=JWKS_CLUSTER,
                        timeout=timedelta(seconds=2),
                    ),
                    cache_duration=JWKS_CACHE,
                ),
                forward=True,
                require_expiration=True,
            )
        },
        requirement_map={"person": JwtRequirement(provider_name="megacity")},
    )


# Upstreams speaking HTTP/2 (gRPC).
_HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
        HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        )
    )
}


def _one_endpoint(name: str, host: str, port: int) -> ClusterLoadAssignment:
    address = Address(socket_address=SocketAddress(address=host, port_value=port))
    return ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=address))])],
    )


def _host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host, int(port)


def _loopback_cluster(name: str, host: str, port: int, *, http2: bool) -> Cluster:
    """A plaintext cluster to something of the edge's own on this host: its listener (the JWKS through the
    transcoder) or the rate-limit service beside it."""
    address = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
    options = _HTTP2 if http2 else {}
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=timedelta(seconds=2),
        load_assignment=_one_endpoint(name, address, port),
        typed_extension_protocol_options=options,
    )


def _cors(origins: list[StringMatcher]) -> CorsPolicy:
    return CorsPolicy(
        allow_origin_string_match=origins,
        allow_methods=CORS_METHODS,
        allow_headers=CORS_HEADERS,
        expose_headers="x-request-id",
        max_age="86400",
        allow_credentials=True,
    )


# Preflights have no RPC: this route gives the CORS filter a route (one with a route action: it ignores direct
# responses) to answer them on. A preflight it does not answer (an origin not allowed) gets 404: no cluster is
# named like a path.
_PREFLIGHT = Route(
    name="cors-preflight",
    match=RouteMatch(prefix="/", headers=[HeaderMatcher(name=":method", string_match=StringMatcher(exact="OPTIONS"))]),
    route=RouteAction(
        cluster_header=":path", cluster_not_found_response_code=RouteActionClusterNotFoundResponseCode.NOT_FOUND
    ),
)


def _openapi_route(document: Path) -> Route:
    return Route(
        name="openapi",
        match=RouteMatch(path=OPENAPI_PATH),
        direct_response=DirectResponseAction(status=200, body=DataSource(filename=str(document))),
        response_headers_to_add=_headers(
            {"content-type": JSON_CONTENT_TYPE}, HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
        ),
        typed_per_filter_config={JWT_FILTER: _typed(PerRouteConfig(disabled=True))},
    )


def _virtual_host(
    name: str, domains: list[str], zone: str, routes: list[Route], origins: list[StringMatcher]
) -> VirtualHost:
    overwrite = HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
    return VirtualHost(
        name=name,
        domains=domains,
        routes=[_PREFLIGHT, *routes],
        request_headers_to_add=_headers({ZONE_HEADER: zone}, overwrite),
        typed_per_filter_config={CORS_FILTER: _typed(_cors(origins))},
    )


def _upstream_tls(name: str, settings: EdgeSettings, catalog: Catalog) -> TransportSocket:
    """mTLS as the edge's own identity (the dev PKI), accepting only the service's SPIFFE ID."""
    tls = UpstreamTlsContext(
        sni=f"{name}.{catalog.trust_domain}",
        common_tls_context=CommonTlsContext(
            tls_certificates=[
                TlsCertificate(
                    certificate_chain=DataSource(filename=str(settings.pki_dir / "edge.pem")),
                    private_key=DataSource(filename=str(settings.pki_dir / "edge-key.pem")),
                )
            ],
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=str(settings.pki_dir / "ca.pem")),
                match_typed_subject_alt_names=[
                    SubjectAltNameMatcher(
                        san_type=SubjectAltNameMatcherSanType.URI,
                        matcher=StringMatcher(exact=catalog.spiffe_id(name)),
                    )
                ],
            ),
            alpn_protocols=["h2"],
        ),
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=_typed(tls))


def _cluster(name: str, target: str, settings: EdgeSettings, catalog: Catalog) -> Cluster:
    """A service's cluster: HTTP/2 to `target` (host:port), health-checked over gRPC.

    Under LINKERD, `target` is the service's cluster DNS name (target_of with MEGACITY_SERVICE_HOST_TEMPLATE, as
    services reach each other): it resolves to the Service's ClusterIP, the pod's Linkerd proxy takes the
    connection, balances its requests over the service's endpoints and does the mTLS as ServiceAccount `edge`,
    which the service's AuthorizationPolicies admit per method. So no TLS here: Envoy speaks plaintext HTTP/2 to the
    proxy on its own host.
    """
    linkerd = settings.transport is Transport.LINKERD
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=timedelta(seconds=2),
        # gRPC health as the edge (the catalog lets it call grpc.health.v1.Health/*), over the same transport as
        # its calls: what /health reports.
        health_checks=[
            HealthCheck(
                timeout=timedelta(seconds=1),
                interval=timedelta(seconds=5),
                unhealthy_threshold=2,
                healthy_threshold=1,
                grpc_health_check=HealthCheckGrpcHealthCheck(),
            )
        ],
        load_assignment=_one_endpoint(name, *_host_port(target)),
        typed_extension_protocol_options=_HTTP2,
        transport_socket=None if linkerd else _upstream_tls(name, settings, catalog),
    )


def compile_bootstrap(settings: EdgeSettings, catalog: Catalog, pool: descriptor_pool.DescriptorPool) -> Bootstrap:
    routes = public_routes(catalog, pool)
    envoy_routes = [*(_route(route) for route in routes), _openapi_route(settings.openapi_document)]
    zone_hosts = [
        _virtual_host(
            f"zone-{zone.zone_id}",
            sorted({f"api.{domain}{port}" for domain in zone.domains for port in ("", ":*")}),
            zone.zone_id,
            envoy_routes,
            [StringMatcher(exact=f"https://app.{domain}") for domain in zone.domains],
        )
        for zone in settings.zones
    ]
    dev_host = _virtual_host(
        "dev-localhost",
        ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*"],
        settings.dev_zone,
        envoy_routes,
        [StringMatcher(safe_regex=RegexMatcher(regex=DEV_ORIGIN))],
    )
    unknown_host = VirtualHost(
        name="unknown-host",
        domains=["*"],
        routes=[
            Route(
                match=RouteMatch(prefix="/"),
                direct_response=DirectResponseAction(status=404, body=DataSource(inline_string="unknown host")),
            )
        ],
    )
    transcoder = GrpcJsonTranscoder(
        proto_descriptor=str(settings.descriptor_set),
        services=sorted({route.method.service for route in routes}),
        print_options=GrpcJsonTranscoderPrintOptions(
            preserve_proto_field_names=True,
            always_print_primitive_fields=True,
            always_print_enums_as_ints=False,
            stream_newline_delimited=True,
        ),
        # Unknown paths and methods pass through untransformed and find no route (404); CORS preflights find theirs.
        request_validation_options=GrpcJsonTranscoderRequestValidationOptions(
            reject_unknown_method=False, reject_unknown_query_parameters=True
        ),
        convert_grpc_status=True,
        # `+` in a query string is a space, as browsers' forms and URLSearchParams write it.
        query_param_unescape_plus=True,
    )
    manager = HttpConnectionManager(
        stat_prefix="edge",
        route_config=RouteConfiguration(
            name="edge",
            max_direct_response_body_size_bytes=MAX_DOCUMENT_BYTES,
            virtual_hosts=[*zone_hosts, dev_host, unknown_host],
            response_headers_to_add=_headers(
                SECURITY_HEADERS, HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
            ),
        ),
        http_filters=[
            _strip_linkerd_headers(),
            _ready_filter(),
            _health_filter(sorted({route.service for route in routes})),
            HttpFilter(name="envoy.filters.http.grpc_json_transcoder", typed_config=_typed(transcoder)),
            # After the transcoder: routes match gRPC paths, so each RPC's CORS policy and token requirement are found.
            HttpFilter(name=CORS_FILTER, typed_config=_typed(Cors())),
            *(
                [_rate_limit_filter(_LOGIN_STAGE, fail_closed=True), _rate_limit_filter(_API_STAGE, fail_closed=False)]
                if settings.ratelimit_target
                else []
            ),
            HttpFilter(name=JWT_FILTER, typed_config=_typed(_jwt_authentication(settings))),
            HttpFilter(name=BUFFER_FILTER, typed_config=_typed(Buffer(max_request_bytes=DEFAULT_LIMITS.max_bytes))),
            HttpFilter(name="envoy.filters.http.router", typed_config=_typed(Router())),
        ],
        server_header_transformation=HttpConnectionManagerServerHeaderTransformation.PASS_THROUGH,
        generate_request_id=True,
        preserve_external_request_id=True,
        # The client's address (rate limits, logs) is the peer's, or, behind `xff_trusted_hops` proxies that append
        # to X-Forwarded-For, the entry the outermost trusted one added.
        use_remote_address=True,
        xff_num_trusted_hops=settings.xff_trusted_hops,
        local_reply_config=_local_replies(),
        always_set_request_id_in_response=True,
        access_log=[
            AccessLog(
                name="envoy.access_loggers.stdout",
                typed_config=_typed(
                    StdoutAccessLog(
                        log_format=SubstitutionFormatString(json_format=Struct.from_dict(_ACCESS_LOG_FIELDS))
                    )
                ),
            )
        ],
    )
    listener = Listener(
        name="edge",
        address=Address(socket_address=SocketAddress(address=settings.listen_host, port_value=settings.listen_port)),
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_typed(manager),
                    )
                ]
            )
        ],
    )
    used = sorted({route.service for route in routes})
    return Bootstrap(
        static_resources=BootstrapStaticResources(
            listeners=[listener],
            clusters=[
                *(_cluster(name, settings.targets[name], settings, catalog) for name in used),
                _loopback_cluster(JWKS_CLUSTER, settings.listen_host, settings.listen_port, http2=False),
                *(
                    [_loopback_cluster(RATELIMIT_CLUSTER, *_host_port(settings.ratelimit_target), http2=True)]
                    if settings.ratelimit_target
                    else []
                ),
            ],
        ),
        admin=Admin(address=Address(socket_address=SocketAddress(address="127.0.0.1", port_value=settings.admin_port))),
        overload_manager=OverloadManager(
            resource_monitors=[
                ResourceMonitor(
                    name="envoy.resource_monitors.global_downstream_max_connections",
                    typed_config=_typed(
                        DownstreamConnectionsConfig(max_active_downstream_connections=MAX_CLIENT_CONNECTIONS)
                    ),
                )
            ]
        ),
    )
