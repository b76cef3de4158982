"""The edge's rate-limit service: Envoy's RateLimitService gRPC API (envoy.service.ratelimit.v3) over Redis.

Envoy sends, for each request, a descriptor `(bucket, <name>), (remote_address, <client ip>)` built from the
route's rate-limit actions (gateway/envoy_config.py). Each bucket is a GCRA limit (a steady rate with a burst the
size of the limit) kept in one Redis key per client, decided atomically by a Lua script on Redis's own clock, so
any number of replicas agree. A bucket may block a client that goes over it for a while (login: 15 minutes). An
answer over the limit carries `Retry-After` for Envoy's 429.

| bucket | limit                    | on excess                  | if this service is down (Envoy's side) |
|--------|--------------------------|----------------------------|----------------------------------------|
| login  | 5 per minute per client  | blocked for 15 minutes     | refused (fails closed)                 |
| api    | 100 per minute per client| refused until under again  | allowed (fails open)                   |
| kzone  | 50 per minute per client | refused until under again  | allowed (fails open)                   |

It listens on loopback only, next to Envoy (in Kubernetes, a container of the edge's pod): no other caller can
reach it. `python -m gateway.ratelimit` runs it (MEGACITY_REDIS_URL; its port: gateway/edge.py).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
from dataclasses import dataclass

import grpc
import structlog
from envoy_data_plane.envoy.config.core.v3 import HeaderValue
from envoy_data_plane.envoy.service.ratelimit.v3 import (
    RateLimitRequest,
    RateLimitResponse,
    RateLimitResponseCode,
    RateLimitResponseDescriptorStatus,
)
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.runtime.config import env_number, port_offset

METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
DOMAIN = "megacity-edge"
BUCKET_KEY = "bucket"
CLIENT_KEY = "remote_address"
DEFAULT_PORT = 8081
_log = structlog.get_logger("megacity.edge.ratelimit")


def port() -> int:
    """Where it listens: MEGACITY_RATELIMIT_PORT (8081) plus MEGACITY_PORT_OFFSET."""
    return int(env_number("MEGACITY_RATELIMIT_PORT", DEFAULT_PORT)) + port_offset()


@dataclass(frozen=True)
class Limit:
    requests: int
    per_seconds: float
    block_seconds: float = 0.0


LIMITS = {
    "login": Limit(5, 60.0, block_seconds=15 * 60.0),
    "api": Limit(100, 60.0),
    "kzone": Limit(50, 60.0),
}

# GCRA on Redis's clock. KEYS: the client's theoretical arrival time, its block. ARGV: interval (µs), burst, block
# (µs). Returns {allowed (1/0), microseconds until a request would be allowed, requests left in the burst}.
_GCRA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local blocked = redis.call('PTTL', KEYS[2])
if blocked > 0 then
    return {0, blocked * 1000, 0}
end
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
local allow_at = tat - (burst - 1) * interval
if now < allow_at then
    local block = tonumber(ARGV[3])
    if block > 0 then
        redis.call('SET', KEYS[2], 1, 'PX', math.ceil(block / 1000))
        return {0, block, 0}
    end
    return {0, allow_at - now, 0}
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], next_tat, 'PX', math.ceil((next_tat - now) / 1000) + 1)
return {1, 0, math.floor((now - (next_tat - burst * interval)) / interval)}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_seconds: int
    remaining: int


def descriptor_limit(entries: dict[str, str]) -> tuple[str, Limit] | None:
    """The bucket and limit a descriptor's entries name; None for a descriptor this service does not limit."""
    limit = LIMITS.get(entries.get(BUCKET_KEY, ""))
    if limit is None or not entries.get(CLIENT_KEY):
        return None
    return f"{entries[BUCKET_KEY]}:{entries[CLIENT_KEY]}", limit


class RateLimiter:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = redis.register_script(_GCRA)

    async def hit(self, key: str, limit: Limit) -> Decision:
        interval = round(limit.per_seconds / limit.requests * 1_000_000)
        allowed, wait_us, remaining = await self._script(
            keys=[f"ratelimit:{key}", f"ratelimit:{key}:blocked"],
            args=[interval, limit.requests, round(limit.block_seconds * 1_000_000)],
        )
        return Decision(bool(allowed), math.ceil(int(wait_us) / 1_000_000), int(remaining))

    async def should_rate_limit(self, request: RateLimitRequest) -> RateLimitResponse:
        statuses = []
        retry_after = 0
        for descriptor in request.descriptors:
            named = descriptor_limit({entry.key: entry.value for entry in descriptor.entries})
            if named is None:
                statuses.append(RateLimitResponseDescriptorStatus(code=RateLimitResponseCode.OK))
                continue
            decision = await self.hit(*named)
            code = RateLimitResponseCode.OK if decision.allowed else RateLimitResponseCode.OVER_LIMIT
            statuses.append(RateLimitResponseDescriptorStatus(code=code, limit_remaining=decision.remaining))
            retry_after = max(retry_after, decision.retry_after_seconds)
        over = any(status.code == RateLimitResponseCode.OVER_LIMIT for status in statuses)
        return RateLimitResponse(
            overall_code=RateLimitResponseCode.OVER_LIMIT if over else RateLimitResponseCode.OK,
            statuses=statuses,
            response_headers_to_add=[HeaderValue(key="retry-after", value=str(max(retry_after, 1)))] if over else [],
        )


def _handler(limiter: RateLimiter) -> grpc.GenericRpcHandler[RateLimitRequest, RateLimitResponse]:
    async def should_rate_limit(
        request: RateLimitRequest, context: grpc.aio.ServicerContext[RateLimitRequest, RateLimitResponse]
    ) -> RateLimitResponse:
        try:
            return await limiter.should_rate_limit(request)
        except RedisError as error:
            # Envoy applies its failure mode (open for the API, closed for login) to an error answer.
            _log.warning("ratelimit.redis_unavailable", error=str(error))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "rate-limit store unavailable")
            raise

    handler = grpc.unary_unary_rpc_method_handler(
        should_rate_limit,
        request_deserializer=RateLimitRequest.parse,
        response_serializer=bytes,
    )
    return grpc.method_handlers_generic_handler(
        "envoy.service.ratelimit.v3.RateLimitService", {"ShouldRateLimit": handler}
    )


async def serve(redis_url: str, host: str, port: int, stop: asyncio.Event) -> None:
    redis = Redis.from_url(redis_url)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([_handler(RateLimiter(redis))])
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    _log.info("ratelimit.started", address=f"{host}:{port}")
    try:
        await stop.wait()
    finally:
        await server.stop(2.0)
        await redis.aclose()


async def _main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(os.environ["MEGACITY_REDIS_URL"], "127.0.0.1", port(), stop)


if __name__ == "__main__":
    asyncio.run(_main())
