"""Benchmark: what people authentication costs: logins, access-token verification, an authenticated RPC.

    .venv/bin/python -m tests.bench.bench_auth [--cost 12] [--login-seconds 10] [--seconds 2] [--rounds 15]

Stands the platform up as `megacity up` does, in a temporary directory: embedded PostgreSQL (migrated, each
service logging in as its own role) and Redis, a dev PKI, and the tenant and auth services as
`megacity serve` processes calling each other over mTLS. Then, in one run:

    Login                  AuthService.Login as the edge, `--logins-in-flight` at a time for `--login-seconds`;
                           accounts made through Register, each logging in with its right password from its own
                           client address: a bcrypt verify at `--cost` (off the event loop), a session opened, a
                           token signed. Logins/s, latency, and the auth process's CPU time per login
    bcrypt verify alone    passwords.verify_password at that cost, one at a time: a login's floor; the machine's
                           ceiling is its CPUs / this
    Authenticator.verify   what a service does per authenticated call, here in this process: the JWKS fetched
                           from auth over the mesh and warm, the token checked, its revocation read from Redis
                           (one MGET round trip, across CPUs). "new token": one this verifier has not seen (the
                           Ed25519 check runs); "same token": a session's token again (remembered: time window only)
    TokenVerifier.verify   the token check alone, on the same new and repeated tokens
    GetZone / LookupZone   requests/s of TenantService.GetZone, called as the edge with a person's bearer token
                           (its contract: any signed-in person), against LookupZone, called as the exam service
                           without one (mesh identity only); both read the same zone row from PostgreSQL

New tokens are real ones: AuthService.Refresh chains over the login sessions issue `--tokens`, each verified
once per pass by verifiers made for that pass (`--passes`), so no verified-token cache answers for them; the
four verifications take turns token by token, so the host's speed drifting weighs on all alike.

CPUs: the tenant service, PostgreSQL and Redis (everything that serves the RPCs) share one; this process, the
client and load generator, has the other; the auth service may use both (logins/s is the machine's). The load
generator is bench_runtime's: gRPC over `h2` on one connection per caller identity, 32 calls in flight. h2
sends the authorization header never-indexed (as nghttp2 and browsers do), so the tenant decodes the token of
every call. Each round loads both RPCs for `--seconds`, in a new random order, with a token refreshed for the
round; the ratio is taken within a round and its median reported, with the tenant's CPU time per call and the
server CPU's (tenant, PostgreSQL and Redis together) beside it.

Target: token verification p50 <= 100 us with a warm JWKS cache. Logins/s is reported with its cost factor.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
from redis.asyncio import Redis

from megacity.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from megacity.tenant.v1 import tenant_service_pb2
from ops import migrations
from ops.embedded import EmbeddedPostgres, EmbeddedRedis
from services.auth import passwords
from services.auth.pii import generate_key_spec
from services.runtime.authn import Authenticator, JwksSource, remote_jwks
from services.runtime.catalog import Catalog, load_catalog
from services.runtime.channels import ChannelFactory
from services.runtime.config import Transport
from services.runtime.contracts import default_pool
from services.runtime.pki import ensure_credentials
from services.runtime.tokens import TokenVerifier, parse_jwks
from tests.bench.h2load import IN_FLIGHT, GrpcLoad
from tests.support.accounts import PASSWORD, Caller
from tests.support.mesh import mtls_channel
from tests.support.ports import free_port
from tests.support.processes import wait_serving

ZONE = "univ"
GET_ZONE = "/megacity.tenant.v1.TenantService/GetZone"
LOOKUP_ZONE = "/megacity.tenant.v1.TenantService/LookupZone"
AUTHENTICATED, MESH_ONLY = "GetZone", "LookupZone"
VERIFY_TARGET_US = 100.0
AUTHENTICATOR_NEW = "Authenticator.verify, new token"
AUTHENTICATOR_SAME = "Authenticator.verify, same token"
VERIFIER_NEW = "TokenVerifier.verify, new token"
VERIFIER_SAME = "TokenVerifier.verify, same token"
VERIFICATIONS = (AUTHENTICATOR_NEW, AUTHENTICATOR_SAME, VERIFIER_NEW, VERIFIER_SAME)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads (bcrypt runs in the auth service's workers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_jiffies(cpus: frozenset[int]) -> tuple[int, int]:
    """(busy, total) clock ticks of these CPUs since boot, whoever ran on them."""
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(value) for value in values[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(ticks) - ticks[3] - ticks[4]
            total += sum(ticks)
    return busy, total


@dataclass(frozen=True)
class _Cpus:
    """Where things run: the tenant service, PostgreSQL and Redis on `server`; this process (the client) on
    `client`; the auth service anywhere."""

    everything: frozenset[int]
    server: frozenset[int]
    client: frozenset[int]

    @classmethod
    def split(cls) -> _Cpus:
        available = sorted(os.sched_getaffinity(0))
        if len(available) < 2:  # nothing to separate: everyone shares the one CPU
            one = frozenset(available)
            return cls(one, one, one)
        return cls(frozenset(available), frozenset(available[:1]), frozenset(available[1:2]))


# --- the platform ---------------------------------------------------------------------------------------


@dataclass
class _Platform:
    directory: Path
    catalog: Catalog
    pki: Path
    redis_url: str
    processes: dict[str, subprocess.Popen[bytes]]
    ports: dict[str, int]

    def channel(self, identity: str, service: str) -> grpc.aio.Channel:
        credentials = ensure_credentials(self.pki, self.catalog, identity)
        return mtls_channel(credentials, self.ports[service], service, self.catalog)


def _spawn(name: str, env: dict[str, str], log: Path, cpus: frozenset[int]) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "serve", name], env=env, stdout=output, stderr=subprocess.STDOUT
        )
    # Popen returns once the child has exec'd Python, long before it starts a thread, so every thread it makes
    # inherits this (and it undoes the client CPU it would inherit from this process).
    os.sched_setaffinity(process.pid, cpus)
    return process


async def _until_serving(platform: _Platform, name: str, log: Path) -> None:
    async with platform.channel("ops", name) as channel:
        try:
            await wait_serving(channel, timeout=60.0)
        except TimeoutError:
            text = await asyncio.to_thread(log.read_text, errors="replace")
            tail = "\n".join(text.splitlines()[-20:])
            code = platform.processes[name].poll()
            raise RuntimeError(f"{name} never became SERVING (exit code {code}); its log ends:\n{tail}") from None


@contextmanager
def _databases(directory: Path, cpus: _Cpus) -> Iterator[tuple[EmbeddedPostgres, EmbeddedRedis]]:
    """PostgreSQL and Redis on the server CPU, beside the tenant service: the whole of what serves its RPCs."""
    postgres = EmbeddedPostgres(directory / "postgres" / "data", port=free_port())
    redis = EmbeddedRedis(directory / "redis" / "data", port=free_port())
    # Their processes inherit this thread's CPUs, and PostgreSQL's backends the postmaster's: set for the start.
    os.sched_setaffinity(0, cpus.server)
    try:
        postgres.start()
        redis.start()
        os.sched_setaffinity(0, cpus.client)
        yield postgres, redis
    finally:
        redis.stop()
        postgres.stop()


@asynccontextmanager
async def _platform(
    directory: Path, cost: int, cpus: _Cpus, postgres: EmbeddedPostgres, redis: EmbeddedRedis
) -> AsyncIterator[_Platform]:
    """The database migrated and the tenant and auth services SERVING on it; the services stopped on exit."""
    catalog = load_catalog()
    platform = _Platform(
        directory, catalog, directory / "pki", redis.url, {}, {"tenant": free_port(), "auth": free_port()}
    )
    try:
        await migrations.migrate(postgres.admin_url)
        logins = await migrations.provision_service_logins(postgres.admin_url, postgres.secrets_dir)
        for identity in ("tenant", "auth", "edge", "exam", "ops"):  # made once here, not raced for by the services
            ensure_credentials(platform.pki, catalog, identity)
        common = {name: value for name, value in os.environ.items() if name != "MEGACITY_PORT_OFFSET"} | {
            "MEGACITY_HOME": str(directory),
            "MEGACITY_TRANSPORT": Transport.MTLS.value,
            "MEGACITY_PKI_DIR": str(platform.pki),
            "MEGACITY_REDIS_URL": redis.url,
            "MEGACITY_METRICS_PORT": "0",
            "MEGACITY_TARGET_TENANT": f"127.0.0.1:{platform.ports['tenant']}",
            "MEGACITY_TARGET_AUTH": f"127.0.0.1:{platform.ports['auth']}",
        }
        own = {
            "tenant": ({}, cpus.server),
            "auth": (
                {"MEGACITY_PII_KEYS": generate_key_spec("bench"), "MEGACITY_BCRYPT_COST": str(cost)},
                cpus.everything,
            ),
        }
        for name, (extra, where) in own.items():
            env = common | extra | {"MEGACITY_PORT": str(platform.ports[name]), "MEGACITY_DATABASE_URL": logins[name]}
            log = directory / f"{name}.log"
            platform.processes[name] = await asyncio.to_thread(_spawn, name, env, log, where)
            await _until_serving(platform, name, log)
        yield platform
    finally:
        for process in platform.processes.values():
            process.kill()
            await asyncio.to_thread(process.wait)


# --- logins ---------------------------------------------------------------------------------------------


@dataclass
class _Account:
    email: str
    caller: Caller  # its own client address: login throttling counts per address
    refresh_token: str = ""
    access_token: str = ""


async def _register(auth: auth_service_pb2_grpc.AuthServiceStub, count: int) -> list[_Account]:
    async def one(index: int) -> _Account:
        account = _Account(f"bench-{index}-{uuid.uuid4().hex[:8]}@example.com", Caller(ZONE))
        reply = await auth.Register(
            auth_service_pb2.RegisterRequest(email=account.email, password=PASSWORD, name="Bench"),
            metadata=account.caller.metadata(),
        )
        account.refresh_token, account.access_token = reply.refresh_token, reply.access_token
        return account

    return list(await asyncio.gather(*(one(index) for index in range(count))))


@dataclass
class _Logins:
    completed: int
    elapsed: float
    cpu_seconds: float  # the auth process's
    latencies: list[float]


async def _logins(
    auth: auth_service_pb2_grpc.AuthServiceStub, accounts: list[_Account], seconds: float, auth_pid: int
) -> _Logins:
    """Every account logs in again and again until `seconds` are up; the calls in flight then finish."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def keep_logging_in(account: _Account) -> None:
        request = auth_service_pb2.LoginRequest(email=account.email, password=PASSWORD)
        while True:  # at least once: `seconds=0` is one login per account
            started = time.perf_counter()
            reply = await auth.Login(request, metadata=account.caller.metadata())
            latencies.append(time.perf_counter() - started)
            account.refresh_token, account.access_token = reply.refresh_token, reply.access_token
            if time.perf_counter() >= stop_at:
                return

    cpu_before = _cpu_seconds(auth_pid)
    started = time.perf_counter()
    await asyncio.gather(*(keep_logging_in(account) for account in accounts))
    elapsed = time.perf_counter() - started
    return _Logins(len(latencies), elapsed, _cpu_seconds(auth_pid) - cpu_before, latencies)


async def _bcrypt_alone(cost: int, samples: int) -> list[float]:
    """passwords.verify_password, the call Login makes, one at a time: one core, before the services start."""
    hashed = await passwords.hash_password(PASSWORD, cost)
    durations: list[float] = []
    for _ in range(samples):
        started = time.perf_counter()
        if not await passwords.verify_password(PASSWORD, hashed):
            raise RuntimeError("bcrypt did not verify its own hash")
        durations.append(time.perf_counter() - started)
    return durations


# --- token verification ---------------------------------------------------------------------------------


async def _fresh_tokens(auth: auth_service_pb2_grpc.AuthServiceStub, accounts: list[_Account], count: int) -> list[str]:
    """`count` distinct access tokens, issued by the auth service as clients get them: refreshing sessions."""
    tokens: list[str] = []

    async def refresh_chain(account: _Account, length: int) -> None:
        for _ in range(length):
            reply = await auth.Refresh(
                auth_service_pb2.RefreshRequest(refresh_token=account.refresh_token),
                metadata=account.caller.metadata(),
            )
            account.refresh_token = reply.refresh_token
            tokens.append(reply.access_token)

    length = -(-count // len(accounts))
    await asyncio.gather(*(refresh_chain(account, length) for account in accounts))
    return tokens[:count]


def _timed(durations: list[float], call: Callable[[], object]) -> None:
    started = time.perf_counter_ns()
    call()
    durations.append((time.perf_counter_ns() - started) / 1e9)


async def _timed_async(durations: list[float], call: Callable[[], Awaitable[object]]) -> None:
    started = time.perf_counter_ns()
    await call()
    durations.append((time.perf_counter_ns() - started) / 1e9)


async def _verifications(
    jwks: JwksSource, redis: Redis, tokens: list[str], repeated: str, passes: int
) -> dict[str, list[float]]:
    """Seconds per verification, four ways, each new token once per pass on verifiers that have not seen it."""
    results: dict[str, list[float]] = {name: [] for name in VERIFICATIONS}
    for _ in range(passes):
        authenticator = Authenticator(jwks, redis)
        await authenticator.verify(repeated)  # fetches the JWKS: warm from here on, as in a running service
        verifier = TokenVerifier(parse_jwks(await jwks()))
        verifier.verify(repeated)  # warm: its key map, header cache, and the repeated token
        gc.collect()
        for index, token in enumerate(tokens):
            # Whichever checks the signature second finds the CPU's caches warm from the first: take turns.
            if index % 2:
                await _timed_async(results[AUTHENTICATOR_NEW], partial(authenticator.verify, token))
                _timed(results[VERIFIER_NEW], partial(verifier.verify, token))
            else:
                _timed(results[VERIFIER_NEW], partial(verifier.verify, token))
                await _timed_async(results[AUTHENTICATOR_NEW], partial(authenticator.verify, token))
            await _timed_async(results[AUTHENTICATOR_SAME], partial(authenticator.verify, repeated))
            _timed(results[VERIFIER_SAME], partial(verifier.verify, repeated))
    return results


# --- the authenticated RPC against the unauthenticated one ---------------------------------------------


def _client_tls(platform: _Platform, identity: str) -> ssl.SSLContext:
    """`identity`'s client certificate, verifying the server against the dev CA, ALPN h2 as gRPC needs."""
    credentials = ensure_credentials(platform.pki, platform.catalog, identity)
    chain, key = platform.directory / f"{identity}-chain.pem", platform.directory / f"{identity}-key.pem"
    chain.write_bytes(credentials.certificate_chain)
    key.touch(mode=0o600)  # ssl loads keys from files only; this one is for this process alone
    key.write_bytes(credentials.private_key)
    context = ssl.create_default_context(cadata=credentials.root_certificates.decode())
    context.load_cert_chain(chain, key)
    context.check_hostname = False  # the server's identity is its SPIFFE URI, which ssl cannot match
    context.set_alpn_protocols(["h2"])
    return context


@dataclass
class _Sample:
    rps: float
    p50: float
    p99: float
    cpu_per_request: float  # the tenant process's
    server_cpu_per_request: float  # the server CPU's: the tenant's, PostgreSQL's and Redis's
    server_busy: float  # of the server CPU: ~1 when it is the bottleneck, as it should be


async def _load(platform: _Platform, identity: str, path: str) -> GrpcLoad:
    port = platform.ports["tenant"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_tls(platform, identity))
    message = tenant_service_pb2.GetZoneRequest(zone_id=ZONE).SerializeToString()  # LookupZoneRequest's bytes too
    return GrpcLoad(reader, writer, port, path, message)


async def _measure(load: GrpcLoad, seconds: float, server_pid: int, server_cpus: frozenset[int]) -> _Sample:
    load.latencies.clear()
    cpu_before = _cpu_seconds(server_pid)
    busy_before, total_before = _cpu_jiffies(server_cpus)
    started = time.perf_counter()
    completed = await load.run(seconds)
    elapsed = time.perf_counter() - started
    cpu_used = _cpu_seconds(server_pid) - cpu_before
    busy_after, total_after = _cpu_jiffies(server_cpus)
    busy = (busy_after - busy_before) / os.sysconf("SC_CLK_TCK")
    if load.failures:
        raise RuntimeError(f"{load.failures} calls did not end with status OK, the first: {load.first_failure}")
    return _Sample(
        rps=completed / elapsed,
        p50=_percentile(load.latencies, 0.5),
        p99=_percentile(load.latencies, 0.99),
        cpu_per_request=cpu_used / completed,
        server_cpu_per_request=busy / completed,
        server_busy=(busy_after - busy_before) / max(total_after - total_before, 1),
    )


async def _rpc_rounds(
    platform: _Platform,
    auth: auth_service_pb2_grpc.AuthServiceStub,
    person: _Account,
    cpus: _Cpus,
    seconds: float,
    rounds: int,
) -> dict[str, list[_Sample]]:
    loads = {
        AUTHENTICATED: await _load(platform, "edge", GET_ZONE),
        MESH_ONLY: await _load(platform, "exam", LOOKUP_ZONE),
    }
    # The same headers as GetZone's but the token, so that the difference is authentication alone.
    loads[MESH_ONLY].set_metadata(person.caller.metadata())
    server_pid = platform.processes["tenant"].pid
    samples: dict[str, list[_Sample]] = {name: [] for name in loads}
    try:
        for round_number in range(rounds + 1):
            # A fresh token each round, so that no run is long enough for one to expire (15 minutes).
            reply = await auth.Refresh(
                auth_service_pb2.RefreshRequest(refresh_token=person.refresh_token), metadata=person.caller.metadata()
            )
            person.refresh_token = reply.refresh_token
            loads[AUTHENTICATED].set_metadata(Caller(ZONE, person.caller.address, reply.access_token).metadata())
            for name in random.sample(list(loads), len(loads)):
                # Round 0 warms up: connections, the tenant's JWKS cache and database pool, its code paths.
                sample = await _measure(loads[name], 0.5 if round_number == 0 else seconds, server_pid, cpus.server)
                if round_number:
                    samples[name].append(sample)
    finally:
        for load in loads.values():
            load.close()
    return samples


# --- the run ----------------------------------------------------------------------------------------------


@dataclass
class _Results:
    bcrypt_alone: list[float]
    logins: _Logins
    verifications: dict[str, list[float]]
    rpc: dict[str, list[_Sample]]


async def _run(
    args: argparse.Namespace, cpus: _Cpus, directory: Path, postgres: EmbeddedPostgres, redis_server: EmbeddedRedis
) -> _Results:
    # First, on a quiet machine: the floor under a login.
    bcrypt_alone = await _bcrypt_alone(args.cost, args.bcrypt_samples)
    async with (
        _platform(directory, args.cost, cpus, postgres, redis_server) as platform,
        platform.channel("edge", "auth") as channel,
    ):
        auth = auth_service_pb2_grpc.AuthServiceStub(channel)
        accounts = await _register(auth, args.logins_in_flight)
        auth_pid = platform.processes["auth"].pid
        await _logins(auth, accounts, 0.0, auth_pid)  # warm-up: one login per account
        logins = await _logins(auth, accounts, args.login_seconds, auth_pid)

        tokens = await _fresh_tokens(auth, accounts, args.tokens)
        # This process verifies as a service does: the JWKS from auth over the mesh (as the tenant), Redis.
        os.environ["MEGACITY_TARGET_AUTH"] = f"127.0.0.1:{platform.ports['auth']}"
        credentials = ensure_credentials(platform.pki, platform.catalog, "tenant")
        channels = ChannelFactory(platform.catalog, Transport.MTLS, credentials, default_pool())
        redis = Redis.from_url(platform.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
        try:
            verifications = await _verifications(
                remote_jwks(channels), redis, tokens, accounts[0].access_token, args.passes
            )
        finally:
            await redis.aclose()
            await channels.close()

        rpc = await _rpc_rounds(platform, auth, accounts[-1], cpus, args.seconds, args.rounds)
    return _Results(bcrypt_alone, logins, verifications, rpc)


@dataclass
class _Row:
    name: str
    rate: float | None = None  # per second
    p50: float | None = None  # seconds
    p99: float | None = None
    cpu: float | None = None  # a server's CPU seconds per operation
    versus: str = "-"
    ratio: str = "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"


def _rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"


def report(args: argparse.Namespace, cpus: _Cpus, results: _Results) -> str:
    cpu_count = len(cpus.everything)
    logins = results.logins
    login_rate = logins.completed / logins.elapsed
    bcrypt_p50 = statistics.median(results.bcrypt_alone)
    ceiling = cpu_count / bcrypt_p50  # every CPU doing nothing but bcrypt
    p50 = {name: _percentile(durations, 0.5) for name, durations in results.verifications.items()}
    rpc = {
        name: _Sample(
            statistics.median(s.rps for s in found),
            statistics.median(s.p50 for s in found),
            statistics.median(s.p99 for s in found),
            statistics.median(s.cpu_per_request for s in found),
            statistics.median(s.server_cpu_per_request for s in found),
            statistics.median(s.server_busy for s in found),
        )
        for name, found in results.rpc.items()
    }
    authenticated, mesh_only = rpc[AUTHENTICATED], rpc[MESH_ONLY]
    ratio = statistics.median(
        ours.rps / theirs.rps for ours, theirs in zip(results.rpc[AUTHENTICATED], results.rpc[MESH_ONLY], strict=True)
    )
    rows = [
        _Row(
            f"Login, {args.logins_in_flight} in flight, bcrypt cost {args.cost}",
            login_rate,
            _percentile(logins.latencies, 0.5),
            _percentile(logins.latencies, 0.99),
            logins.cpu_seconds / logins.completed,
            f"{cpu_count} CPUs of bcrypt",
            f"{login_rate / ceiling:.0%}",
        ),
        _Row(f"bcrypt verify alone, cost {args.cost}, 1 CPU", 1 / bcrypt_p50, bcrypt_p50, max(results.bcrypt_alone)),
        *(
            _Row(
                name,
                p50=p50[name],
                p99=_percentile(results.verifications[name], 0.99),
                versus="100 us target",
                ratio=f"{p50[name] * 1e6 / VERIFY_TARGET_US:.0%}",
            )
            for name in VERIFICATIONS
        ),
        *(
            _Row(label, sample.rps, sample.p50, sample.p99, sample.cpu_per_request, versus, share)
            for label, sample, versus, share in (
                ("GetZone, edge with bearer token", authenticated, MESH_ONLY, f"{ratio:.1%}"),
                ("LookupZone, exam, mesh identity only", mesh_only, "-", "-"),
            )
        ),
    ]
    lines = [
        f"people authentication, {cpu_count} CPUs: {logins.completed} logins in {logins.elapsed:.1f}s; "
        f"{len(results.verifications[VERIFIER_NEW])} verifications each ({args.tokens} tokens x {args.passes} "
        f"passes); RPCs {IN_FLIGHT} in flight, {args.seconds:g}s x {args.rounds} rounds (medians); "
        "CPU/op: the auth or tenant process's",
        "",
        f"{'measurement':<38} {'per s':>7} {'p50':>10} {'p99':>10} {'CPU/op':>10}  {'vs':<16} {'ratio':>6}",
        *(
            f"{row.name:<38} {_rate(row.rate):>7} {_duration(row.p50):>10} {_duration(row.p99):>10} "
            f"{_duration(row.cpu):>10}  {row.versus:<16} {row.ratio:>6}"
            for row in rows
        ),
        "",
        f"logins: {login_rate:.1f}/s at bcrypt cost {args.cost} on {cpu_count} CPUs, "
        f"{logins.cpu_seconds / logins.completed * 1e3:.0f} ms of auth CPU each: bcrypt-bound, "
        f"{login_rate / ceiling:.0%} of the {ceiling:.1f}/s of {cpu_count} CPUs doing only bcrypt "
        f"({bcrypt_p50 * 1e3:.0f} ms a verify); auth kept {logins.cpu_seconds / logins.elapsed / cpu_count:.0%} of "
        "the CPUs busy (the rest: other processes, and the wait between a login and the next)",
        f"token verification, warm JWKS cache (target p50 <= {VERIFY_TARGET_US:.0f} us): Authenticator.verify "
        f"{p50[AUTHENTICATOR_SAME] * 1e6:.0f} us for a session's token, {p50[AUTHENTICATOR_NEW] * 1e6:.0f} us for a "
        f"new one ({_verdict(p50[AUTHENTICATOR_SAME])}, {_verdict(p50[AUTHENTICATOR_NEW])}); of that the token check "
        f"is {p50[VERIFIER_SAME] * 1e6:.1f} us / {p50[VERIFIER_NEW] * 1e6:.0f} us (TokenVerifier), the rest the "
        "Redis revocation read",
        f"authentication costs GetZone {1 - ratio:.1%} of LookupZone's throughput: "
        f"{(authenticated.cpu_per_request - mesh_only.cpu_per_request) * 1e6:.0f} us more tenant CPU a call, "
        f"{(authenticated.server_cpu_per_request - mesh_only.server_cpu_per_request) * 1e6:.0f} us more server CPU "
        f"(tenant, PostgreSQL, Redis: {authenticated.server_cpu_per_request * 1e6:.0f} us against "
        f"{mesh_only.server_cpu_per_request * 1e6:.0f} us; server CPU busy {authenticated.server_busy:.0%} / "
        f"{mesh_only.server_busy:.0%}, ~100% when it is the bottleneck, as it should be)",
    ]
    return "\n".join(lines)


def _verdict(seconds: float) -> str:
    return "met" if seconds * 1e6 <= VERIFY_TARGET_US else "missed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost", type=int, default=passwords.DEFAULT_BCRYPT_COST, help="bcrypt cost factor")
    parser.add_argument("--logins-in-flight", type=int, default=8)
    parser.add_argument("--login-seconds", type=float, default=10.0)
    parser.add_argument("--bcrypt-samples", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2000, help="distinct access tokens to verify")
    parser.add_argument("--passes", type=int, default=5, help="times each token is verified, by a new verifier")
    parser.add_argument("--seconds", type=float, default=2.0, help="load per RPC per round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    cpus = _Cpus.split()
    # Before any thread or child exists, so that all of them inherit it (see _databases).
    os.sched_setaffinity(0, cpus.client)
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as scratch, _databases(Path(scratch), cpus) as servers:
        results = asyncio.run(_run(args, cpus, Path(scratch), *servers))
    print(report(args, cpus, results))


if __name__ == "__main__":
    main()
