"""Benchmark: an adaptive exam under load: the SubmitAnswer round trip, and StartAttempt.

    .venv/bin/python -m tests.bench.bench_exam [--seconds 20] [--students 50] [--warmup 3]

Stands the platform up as bench_auth does (and with its helpers), in a temporary directory: embedded
PostgreSQL (migrated, each service logging in as its own role) and Redis, a dev PKI, and the tenant, auth and
exam services as `megacity serve` processes calling each other over mTLS. Nothing is pinned to a CPU: the
services, the databases and this process share the machine, as a small deployment would.

Set-up (not measured): a zone_admin of `univ` creates an organisation through TenantService; a teacher of it
imports a 300-item bank (3PL, varied a, b and c over 3 content areas) through ExamService.ImportItems, creates
an adaptive exam (10 to 30 items, standard error target 0.3) and publishes it; `--students` students of the
organisation sign in through AuthService.Login. Users of roles no RPC creates are written to the auth database
directly, as tests/support/accounts.py does.

Load: every student runs attempts back to back for `--seconds` (after `--warmup` seconds not recorded):
StartAttempt, then SubmitAnswer item after item until the attempt finishes, then StartAttempt again. Each
answers right ("A") with a probability of its own between 0.5 and 0.8, so attempts run their realistic length.
Calls go as the edge does: the `edge` identity over mTLS, `x-megacity-zone: univ`, the student's bearer token.

Pacing: one window per `--think` value, in one run: before each answer a student thinks for a time drawn from an
exponential distribution with that mean (seconds); 0 is back to back, a closed loop that saturates the machine
and measures throughput (its latency is then the queue: concurrency / throughput). Real students think tens of
seconds per item; 50 attempts at a 1 s mean already offer ~50 answers/s.

Reported per window: submits, answers/s, SubmitAnswer p50/p99/mean, StartAttempt p99, the exam process's CPU per
submit (its CPU over the window / the submits, the StartAttempts' share included) and its share of a CPU, and the
machine's busy share.

Target: SubmitAnswer p99 <= 15 ms at 50 concurrent attempts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from megacity.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import exam_service_pb2_grpc
from megacity.exam.v1 import resources_pb2 as res
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2 as tenant_pb
from megacity.tenant.v1 import tenant_service_pb2_grpc
from ops import migrations
from ops.embedded import EmbeddedPostgres, EmbeddedRedis
from services.auth import passwords
from services.auth.store import AuthStore, NewUser
from services.runtime.config import Transport
from services.runtime.database import create_pool
from tests.bench import bench_auth
from tests.bench.bench_auth import (
    _cpu_jiffies,
    _cpu_seconds,
    _Cpus,
    _databases,
    _duration,
    _percentile,
    _Platform,
    _rate,
    _spawn,
    _until_serving,
)
from tests.support.accounts import PASSWORD, TEST_BCRYPT_COST, Caller
from tests.support.ports import free_port

ZONE = "univ"
ZONE_ORG = "univ-public"
P99_TARGET = 0.015
CORRECT = "A"
AREAS = ("algebra", "geometry", "reading")


def _bank(size: int, seed: int = 7) -> str:
    """`size` active 3PL items as CSV (the columns of tests/test_exam_attempts.py), "A" the right choice of each;
    a, b and c spread so the CAT has real choices to make at every ability."""
    rng = random.Random(seed)
    rows = [
        f"q{n},{AREAS[n % 3]},single_choice,Question {n},A=right|B=wrong|C=wrong|D=wrong,{CORRECT},3PL,"
        f"{rng.uniform(0.6, 2.2):.3f},{rng.uniform(-3.0, 3.0):.3f},{rng.uniform(0.05, 0.25):.3f},active"
        for n in range(size)
    ]
    return "\n".join(["external_id,content_area,item_type,stem,choices,answer,model,a,b,c,status", *rows])


# --- the platform ---------------------------------------------------------------------------------------


@dataclass
class _Exam:
    platform: _Platform
    auth_url: str  # the auth service's login: users of any role are written there directly


@asynccontextmanager
async def _platform(
    directory: Path, cpus: _Cpus, postgres: EmbeddedPostgres, redis: EmbeddedRedis
) -> AsyncIterator[_Exam]:
    """bench_auth's platform (tenant and auth; logins are set-up here, so at the test bcrypt cost) plus the exam
    service, all SERVING; stopped on exit."""
    async with bench_auth._platform(directory, TEST_BCRYPT_COST, cpus, postgres, redis) as platform:
        # The same URLs bench_auth gave its services: the passwords are kept in the secrets directory.
        logins = await migrations.provision_service_logins(postgres.admin_url, postgres.secrets_dir)
        platform.ports["exam"] = free_port()
        env = {name: value for name, value in os.environ.items() if name != "MEGACITY_PORT_OFFSET"} | {
            "MEGACITY_HOME": str(directory),
            "MEGACITY_TRANSPORT": Transport.MTLS.value,
            "MEGACITY_PKI_DIR": str(platform.pki),
            "MEGACITY_REDIS_URL": redis.url,
            "MEGACITY_METRICS_PORT": "0",
            "MEGACITY_PORT": str(platform.ports["exam"]),
            "MEGACITY_DATABASE_URL": logins["exam"],
            **{f"MEGACITY_TARGET_{name.upper()}": f"127.0.0.1:{port}" for name, port in platform.ports.items()},
        }
        log = directory / "exam.log"
        # In bench_auth's process table, so that its exit stops the exam service with the others.
        platform.processes["exam"] = await asyncio.to_thread(_spawn, "exam", env, log, cpus.everything)
        await _until_serving(platform, "exam", log)
        yield _Exam(platform, logins["auth"])


async def _add_users(auth_url: str, org: str, role: str, count: int) -> list[str]:
    """`count` users of `role` written to the auth database (as People.add_user does); returns their emails."""
    password_hash = await passwords.hash_password(PASSWORD, TEST_BCRYPT_COST)  # one hash serves them all
    emails = [f"{role}-{index}-{uuid.uuid4().hex[:8]}@example.com" for index in range(count)]
    pool = await create_pool(auth_url, schema="auth", max_size=1)
    try:
        store = AuthStore(pool)
        for email in emails:
            await store.create_user(
                NewUser(uuid.uuid4().hex, ZONE, org, email, role.title(), role, password_hash, "", "en")
            )
    finally:
        await pool.close()
    return emails


async def _sign_in(auth: auth_service_pb2_grpc.AuthServiceStub, emails: list[str]) -> list[Caller]:
    async def one(email: str) -> Caller:
        caller = Caller(ZONE)  # its own client address: login throttling counts per address
        reply = await auth.Login(
            auth_service_pb2.LoginRequest(email=email, password=PASSWORD), metadata=caller.metadata()
        )
        caller.token = reply.access_token
        return caller

    return list(await asyncio.gather(*(one(email) for email in emails)))


async def _published_exam(
    platform: _Exam,
    auth: auth_service_pb2_grpc.AuthServiceStub,
    exam: exam_service_pb2_grpc.ExamServiceStub,
    items: int,
) -> tuple[str, str]:
    """(organisation id, exam id): a new organisation's published adaptive exam over a fresh bank."""
    (admin,) = await _sign_in(auth, await _add_users(platform.auth_url, ZONE_ORG, "zone_admin", 1))
    async with platform.platform.channel("edge", "tenant") as channel:
        org = (
            await tenant_service_pb2_grpc.TenantServiceStub(channel).CreateOrganization(
                tenant_pb.CreateOrganizationRequest(organization=tenant_resources.Organization(name="Bench Academy")),
                metadata=admin.metadata(),
            )
        ).organization
    (teacher,) = await _sign_in(auth, await _add_users(platform.auth_url, org.id, "teacher", 1))
    imported = await exam.ImportItems(
        pb.ImportItemsRequest(format=pb.IMPORT_FORMAT_CSV, content=_bank(items)), metadata=teacher.metadata()
    )
    if imported.errors or imported.created_count != items:
        raise RuntimeError(f"the bank did not import: {imported.created_count} created, {list(imported.errors)[:3]}")
    created = await exam.CreateExam(
        pb.CreateExamRequest(
            exam=res.Exam(
                title="Bench adaptive",
                adaptive=res.AdaptiveConfig(min_items=10, max_items=30, standard_error_target=0.3),
            )
        ),
        metadata=teacher.metadata(),
    )
    await exam.PublishExam(pb.PublishExamRequest(exam_id=created.exam.id), metadata=teacher.metadata())
    return org.id, created.exam.id


# --- the load -------------------------------------------------------------------------------------------


@dataclass
class _Latencies:
    submit: list[float] = field(default_factory=list)
    start: list[float] = field(default_factory=list)
    finished: int = 0  # attempts that reached their end in the window


async def _student(
    exam: exam_service_pb2_grpc.ExamServiceStub,
    exam_id: str,
    caller: Caller,
    p_correct: float,
    stop_at: float,
    into: _Latencies,
    think: float,
) -> None:
    """Attempts back to back until `stop_at`, thinking `think` seconds on average before each answer; the call in
    flight then completes. An attempt cut off by the previous window is resumed by StartAttempt, as a student
    coming back would."""
    rng = random.Random()
    metadata = caller.metadata()
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        attempt = (await exam.StartAttempt(pb.StartAttemptRequest(exam_id=exam_id), metadata=metadata)).attempt
        into.start.append(time.perf_counter() - started)
        item_id = attempt.current_item.item_id
        while time.perf_counter() < stop_at:
            if think > 0:
                await asyncio.sleep(rng.expovariate(1 / think))
            response = CORRECT if rng.random() < p_correct else "B"
            started = time.perf_counter()
            reply = await exam.SubmitAnswer(
                pb.SubmitAnswerRequest(attempt_id=attempt.id, item_id=item_id, response=response), metadata=metadata
            )
            into.submit.append(time.perf_counter() - started)
            if reply.finished:
                into.finished += 1
                break
            item_id = reply.next_item.item_id


@dataclass
class _Window:
    think: float
    latencies: _Latencies
    elapsed: float
    exam_cpu: float  # the exam process's CPU seconds over the window
    client_cpu: float  # this process's
    machine_busy: float  # of all CPUs, everyone's
    machine_cpu: float  # CPU seconds of all processes: the exam service, this one, PostgreSQL, Redis, the rest


async def _window(
    exam_pid: int,
    exam: exam_service_pb2_grpc.ExamServiceStub,
    exam_id: str,
    students: list[tuple[Caller, float]],
    seconds: float,
    cpus: _Cpus,
    think: float,
) -> _Window:
    latencies = _Latencies()
    exam_before, client_before = _cpu_seconds(exam_pid), time.process_time()
    busy_before, total_before = _cpu_jiffies(cpus.everything)
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(_student(exam, exam_id, caller, p, stop_at, latencies, think) for caller, p in students))
    elapsed = time.perf_counter() - started
    busy_after, total_after = _cpu_jiffies(cpus.everything)
    return _Window(
        think,
        latencies,
        elapsed,
        _cpu_seconds(exam_pid) - exam_before,
        time.process_time() - client_before,
        (busy_after - busy_before) / max(total_after - total_before, 1),
        (busy_after - busy_before) / os.sysconf("SC_CLK_TCK"),
    )


async def _run(
    args: argparse.Namespace, cpus: _Cpus, directory: Path, postgres: EmbeddedPostgres, redis: EmbeddedRedis
) -> list[_Window]:
    async with (
        _platform(directory, cpus, postgres, redis) as bench,
        bench.platform.channel("edge", "auth") as auth_channel,
        bench.platform.channel("edge", "exam") as exam_channel,
    ):
        auth = auth_service_pb2_grpc.AuthServiceStub(auth_channel)
        exam = exam_service_pb2_grpc.ExamServiceStub(exam_channel)
        org_id, exam_id = await _published_exam(bench, auth, exam, args.items)
        callers = await _sign_in(auth, await _add_users(bench.auth_url, org_id, "student", args.students))
        rng = random.Random(11)
        students = [(caller, rng.uniform(0.5, 0.8)) for caller in callers]
        # Warm-up: connections, the exam service's pools, caches and code paths.
        exam_pid = bench.platform.processes["exam"].pid
        await _window(exam_pid, exam, exam_id, students, args.warmup, cpus, think=0.0)
        return [await _window(exam_pid, exam, exam_id, students, args.seconds, cpus, think) for think in args.think]


# --- the report -----------------------------------------------------------------------------------------


def report(args: argparse.Namespace, cpus: _Cpus, windows: list[_Window]) -> str:
    cpu_count = len(cpus.everything)
    header = (
        f"{'think (mean)':<13} {'submits':>8} {'answers/s':>10} {'p50':>10} {'p99':>10} {'mean':>10} "
        f"{'start p99':>10} {'exam CPU/submit':>16} {'exam CPU':>9} {'machine':>8} {'p99 target':>11}"
    )
    lines = [
        f"exam round trip, {cpu_count} CPUs, nothing pinned: {args.students} concurrent attempts, "
        f"{args.seconds:g}s per window after {args.warmup:g}s warm-up; gRPC over mTLS as the edge; PostgreSQL and "
        "Redis; SubmitAnswer latencies",
        "",
        header,
    ]
    for window in windows:
        submit = window.latencies.submit
        submits = max(len(submit), 1)
        p99 = _percentile(submit, 0.99)
        verdict = "met" if p99 is not None and p99 <= P99_TARGET else "missed"
        think = "back to back" if window.think == 0 else f"{window.think:g} s"
        lines.append(
            f"{think:<13} {len(submit):>8} {_rate(len(submit) / window.elapsed):>10} "
            f"{_duration(_percentile(submit, 0.5)):>10} {_duration(p99):>10} "
            f"{_duration(statistics.fmean(submit) if submit else None):>10} "
            f"{_duration(_percentile(window.latencies.start, 0.99)):>10} "
            f"{window.exam_cpu / submits * 1e3:>13.2f} ms {window.exam_cpu / window.elapsed:>9.0%} "
            f"{window.machine_busy:>8.0%} {verdict:>11}"
        )
    lines += [
        "",
        f"target: SubmitAnswer p99 <= {P99_TARGET * 1e3:.0f} ms at {args.students} concurrent attempts. Back to back "
        "is a closed loop at saturation: its latency is concurrency / throughput, whatever the code does.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured load")
    parser.add_argument("--warmup", type=float, default=3.0, help="load before, not recorded")
    parser.add_argument("--students", type=int, default=50, help="concurrent attempts")
    parser.add_argument("--items", type=int, default=300, help="the bank's size")
    parser.add_argument(
        "--think",
        type=lambda text: [float(value) for value in text.split(",")],
        default=[2.0, 0.5, 0.2, 0.0],
        help="mean think times before each answer, one window each (seconds, comma separated; 0 = back to back)",
    )
    args = parser.parse_args()
    everything = frozenset(os.sched_getaffinity(0))
    # One set for all: the service, its databases and the client compete for the machine as they would in a
    # small deployment, rather than the split bench_auth uses to isolate one service's cost.
    cpus = _Cpus(everything, everything, everything)
    with tempfile.TemporaryDirectory(prefix="bench-exam-") as scratch, _databases(Path(scratch), cpus) as servers:
        windows = asyncio.run(_run(args, cpus, Path(scratch), *servers))
    print(report(args, cpus, windows))


if __name__ == "__main__":
    main()
