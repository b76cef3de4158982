"""`megacity seed --demo`: a ready-to-try organisation in the `univ` zone, on a running mesh (`megacity up`).

Creates, idempotently (running it again changes nothing and prints the same accounts):
- a zone administrator and the organisation "Demo Academy", with a teacher, two students and a parent whose
  link to the first student is approved;
- a calibrated 300-item bank in three content areas: generating parameters are drawn, responses of 3000
  simulated examinees are simulated, and the parameters estimated from them by marginal maximum likelihood
  (services/exam/calibration.py) are what the bank holds;
- an adaptive exam over the bank, published.

Accounts with roles nobody could otherwise grant on a fresh platform (the zone administrator) are written
straight into the auth database as the platform's bootstrap; everything else goes through the services' RPCs,
as the edge would call them. Passwords are generated once and kept in $MEGACITY_HOME/secrets/demo.json.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import field_mask_pb2

from megacity.auth.v1 import auth_service_pb2 as auth_pb
from megacity.auth.v1 import auth_service_pb2_grpc
from megacity.auth.v1 import resources_pb2 as auth_res
from megacity.exam.v1 import exam_service_pb2 as exam_pb
from megacity.exam.v1 import exam_service_pb2_grpc
from megacity.exam.v1 import resources_pb2 as exam_res
from megacity.tenant.v1 import resources_pb2 as tenant_res
from megacity.tenant.v1 import tenant_service_pb2 as tenant_pb
from megacity.tenant.v1 import tenant_service_pb2_grpc
from ops import migrations
from services.auth import passwords
from services.auth.store import AuthStore, NewUser
from services.exam import calibration
from services.runtime.catalog import load_catalog
from services.runtime.channels import mtls_channel
from services.runtime.config import megacity_home, pki_dir, target_of
from services.runtime.database import create_pool
from services.runtime.errors import error_info, status_from_error
from services.runtime.pki import ensure_credentials

ZONE = "univ"
ORGANIZATION = "Demo Academy"
EXAM_TITLE = "Demo adaptive exam"
AREAS = ("algebra", "geometry", "reading")
BANK_SIZE = 300
SIMULEES = 3000
ROLES = ("zone_admin", "teacher", "student", "student", "parent")


@dataclass
class Account:
    role: str
    email: str
    password: str
    user_id: str = ""
    token: str = ""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        headers = [("x-megacity-zone", ZONE)]
        if self.token:
            headers.append(("authorization", f"Bearer {self.token}"))
        return tuple(headers)


def _accounts(home: Path) -> list[Account]:
    """The demo accounts, with passwords made on the first run and kept for the next ones."""
    path = home / "secrets" / "demo.json"
    if path.exists():
        return [Account(**entry) for entry in json.loads(path.read_text())]
    numbered: dict[str, int] = {}
    accounts = []
    for role in ROLES:
        numbered[role] = numbered.get(role, 0) + 1
        suffix = "" if ROLES.count(role) == 1 else str(numbered[role])
        password = f"Demo-{secrets.token_urlsafe(9)}-1a"
        accounts.append(
            Account(role=role, email=f"{role.replace('_', '-')}{suffix}@demo.univprepai.com", password=password)
        )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(json.dumps([{"role": a.role, "email": a.email, "password": a.password} for a in accounts]))
    path.chmod(0o600)
    return accounts


def calibrated_bank(rng: np.random.Generator) -> str:
    """A CSV item bank whose parameters were estimated from simulated responses, as a real calibration would."""
    a = rng.uniform(0.8, 2.0, BANK_SIZE)
    b = rng.normal(0.0, 1.0, BANK_SIZE)
    c = rng.uniform(0.05, 0.25, BANK_SIZE)
    thetas = rng.normal(0.0, 1.0, SIMULEES)
    responses = calibration.simulate_responses(a, b, c, thetas, rng, items_per_person=60)
    estimated = calibration.calibrate(responses, "3PL").parameters
    lines = ["external_id,content_area,item_type,stem,choices,answer,model,a,b,c,status"]
    for index in range(BANK_SIZE):
        area = AREAS[index % len(AREAS)]
        lines.append(
            f"demo-{index:03d},{area},single_choice,Demo {area} question {index + 1},A=first|B=second|C=third|D=fourth,"
            f"{'ABCD'[index % 4]},3PL,{estimated.a[index]:.4f},{estimated.b[index]:.4f},{estimated.c[index]:.4f},active"
        )
    return "\n".join(lines)


async def _bootstrap(database_url: str, secrets_dir: Path, accounts: list[Account], org_id: str) -> None:
    """Writes the accounts no RPC could create on a fresh platform; existing ones are kept as they are."""
    urls = await migrations.provision_service_logins(database_url, secrets_dir)
    pool = await create_pool(urls["auth"], schema="auth", max_size=1)
    store = AuthStore(pool)
    try:
        for account in accounts:
            if account.role == "zone_admin" and await store.user_by_email(ZONE, account.email) is None:
                await store.create_user(
                    NewUser(
                        user_id=uuid.uuid4().hex,
                        zone_id=ZONE,
                        org_id=org_id,
                        email=account.email,
                        name="Demo zone admin",
                        role=account.role,
                        password_hash=await passwords.hash_password(account.password, passwords.DEFAULT_BCRYPT_COST),
                        phone_number_encrypted="",
                        locale="en",
                    )
                )
    finally:
        await pool.close()


async def _sign_in(auth: auth_service_pb2_grpc.AuthServiceStub, account: Account) -> None:
    reply = await auth.Login(
        auth_pb.LoginRequest(email=account.email, password=account.password), metadata=account.metadata()
    )
    account.token, account.user_id = reply.access_token, reply.user.id


async def seed(database_url: str) -> dict[str, Any]:
    catalog = load_catalog()
    home = megacity_home()
    accounts = _accounts(home)
    admin, teacher, student, second_student, parent = accounts
    await _bootstrap(database_url, home / "secrets", [admin], f"{ZONE}-public")
    edge = ensure_credentials(pki_dir(), catalog, "edge")

    def channel(name: str) -> grpc.aio.Channel:
        return mtls_channel(target_of(catalog.service(name)), edge, catalog, name)

    async with channel("auth") as auth_channel, channel("tenant") as tenant_channel, channel("exam") as exam_channel:
        auth = auth_service_pb2_grpc.AuthServiceStub(auth_channel)
        tenant = tenant_service_pb2_grpc.TenantServiceStub(tenant_channel)
        exam = exam_service_pb2_grpc.ExamServiceStub(exam_channel)
        await _sign_in(auth, admin)
        found = await tenant.ListOrganizations(
            tenant_pb.ListOrganizationsRequest(query=ORGANIZATION), metadata=admin.metadata()
        )
        organization = next((o for o in found.organizations if o.name == ORGANIZATION), None)
        if organization is None:
            organization = (
                await tenant.CreateOrganization(
                    tenant_pb.CreateOrganizationRequest(organization=tenant_res.Organization(name=ORGANIZATION)),
                    metadata=admin.metadata(),
                )
            ).organization
        for account, role in ((teacher, "ROLE_TEACHER"), (student, "ROLE_STUDENT"), (second_student, "ROLE_STUDENT")):
            await _ensure_user(auth, admin, account, role, organization.id)
        await _ensure_registered(auth, parent)
        for account in (teacher, student, second_student, parent):
            await _sign_in(auth, account)
        await _link_parent(auth, admin, parent, student)
        await exam.ImportItems(
            exam_pb.ImportItemsRequest(
                format=exam_pb.IMPORT_FORMAT_CSV, content=calibrated_bank(np.random.default_rng(2026)), upsert=True
            ),
            metadata=teacher.metadata(),
        )
        exams = await exam.ListExams(exam_pb.ListExamsRequest(query=EXAM_TITLE), metadata=teacher.metadata())
        demo = next((e for e in exams.exams if e.title == EXAM_TITLE), None)
        if demo is None:
            config = exam_res.AdaptiveConfig(
                min_items=5,
                max_items=30,
                standard_error_target=0.3,
                content_blueprint={"algebra": 0.34, "geometry": 0.33, "reading": 0.33},
            )
            demo = (
                await exam.CreateExam(
                    exam_pb.CreateExamRequest(
                        exam=exam_res.Exam(
                            title=EXAM_TITLE, adaptive=config, show_estimates=True, show_item_feedback=True
                        )
                    ),
                    metadata=teacher.metadata(),
                )
            ).exam
        if demo.status != exam_res.EXAM_STATUS_PUBLISHED:
            demo = (
                await exam.PublishExam(exam_pb.PublishExamRequest(exam_id=demo.id), metadata=teacher.metadata())
            ).exam
    return {
        "zone_id": ZONE,
        "org_id": organization.id,
        "exam_id": demo.id,
        "accounts": [
            {"role": a.role, "email": a.email, "password": a.password, "user_id": a.user_id} for a in accounts
        ],
    }


async def _ensure_user(
    auth: auth_service_pb2_grpc.AuthServiceStub, admin: Account, account: Account, role: str, org_id: str
) -> None:
    request = auth_pb.CreateUserRequest(
        user=auth_res.User(
            email=account.email, name=f"Demo {account.role}", role=auth_res.Role.Value(role), org_id=org_id
        ),
        password=account.password,
    )
    try:
        await auth.CreateUser(request, metadata=admin.metadata())
    except grpc.aio.AioRpcError as error:
        if error.code() is not grpc.StatusCode.ALREADY_EXISTS:
            raise


async def _ensure_registered(auth: auth_service_pb2_grpc.AuthServiceStub, account: Account) -> None:
    try:
        await auth.Register(
            auth_pb.RegisterRequest(email=account.email, password=account.password, name="Demo parent"),
            metadata=account.metadata(),
        )
    except grpc.aio.AioRpcError as error:
        if error.code() is not grpc.StatusCode.ALREADY_EXISTS:
            raise


async def _link_parent(
    auth: auth_service_pb2_grpc.AuthServiceStub, admin: Account, parent: Account, student: Account
) -> None:
    """Self-registration makes students: the zone admin makes the parent one, then the student approves the link."""
    me = (await auth.GetMe(auth_pb.GetMeRequest(), metadata=parent.metadata())).user
    if me.role != auth_res.ROLE_PARENT:
        await auth.UpdateUser(
            auth_pb.UpdateUserRequest(
                user_id=me.id,
                user=auth_res.User(role=auth_res.ROLE_PARENT),
                update_mask=field_mask_pb2.FieldMask(paths=["role"]),
            ),
            metadata=admin.metadata(),
        )
        await _sign_in(auth, parent)  # the role change ended the parent's sessions
    await auth.RequestParentLink(
        auth_pb.RequestParentLinkRequest(student_email=student.email), metadata=parent.metadata()
    )
    await auth.ApproveParentLink(
        auth_pb.ApproveParentLinkRequest(parent_id=parent.user_id), metadata=student.metadata()
    )


def command(database_url: str | None, as_json: bool) -> int:
    try:
        result = asyncio.run(seed(migrations.resolve_admin_url(database_url)))
    except migrations.MigrationError as error:
        print(f"megacity seed: {error}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as error:
        info = error_info(status_from_error(error))
        print(f"megacity seed: {error.code().name} {info.reason if info else ''}: {error.details()}", file=sys.stderr)
        print("is the mesh running? start it with `megacity up --detach`", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"Demo Academy ({result['org_id']}) in zone {ZONE}; exam {result['exam_id']}")
    for account in result["accounts"]:
        print(f"  {account['role']:<11} {account['email']:<40} {account['password']}")
    return 0
