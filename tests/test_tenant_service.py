"""The tenant service over mTLS with real PostgreSQL: zones by host, lookups, and organisation scoping (RLS)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from megacity.auth.v1 import auth_service_pb2
from megacity.tenant.v1 import resources_pb2, tenant_service_pb2, tenant_service_pb2_grpc
from ops import migrations
from ops.embedded import EmbeddedPostgres
from services.runtime.database import TenantScope, create_pool
from services.runtime.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
    error_info,
    field_violations,
    status_from_error,
)
from services.tenant import zones
from services.tenant.store import TenantStore
from tests.support.accounts import Caller, People, reason
from tests.support.mesh import channel_as, make_config, mesh_catalog, running

SEEDED = {
    "univ": ["univprepai.com"],
    "college": ["collegeprepai.com"],
    "skill": ["skillprepai.com"],
    "medi": ["mediprepai.com"],
    "major": ["majorprepai.com"],
    "kzone": ["my-ktube.ai", "my-ktube.com"],
    "mpc": ["mpcstudy.com"],
    "dreamseed": ["dreamseedai.com"],
}


@pytest.fixture
async def tenant_url(fresh_database: str, postgres: EmbeddedPostgres) -> str:
    """The tenant service's own login (no superuser, no RLS bypass) on a migrated database."""
    await migrations.migrate(fresh_database)
    return (await migrations.provision_service_logins(fresh_database, postgres.secrets_dir))["tenant"]


@pytest.fixture
async def tenant(tenant_url: str, pki_dir: Path) -> AsyncIterator[tenant_service_pb2_grpc.TenantServiceStub]:
    config = make_config(mesh_catalog(), "tenant", pki_dir, database_url=tenant_url)
    async with running(config) as service, channel_as("exam", service, pki_dir) as channel:
        yield tenant_service_pb2_grpc.TenantServiceStub(channel)


@pytest.fixture
async def store(tenant_url: str) -> AsyncIterator[TenantStore]:
    pool = await create_pool(tenant_url, schema="tenant", max_size=2)
    yield TenantStore(pool)
    await pool.close()


@pytest.mark.parametrize(
    ("host", "zone_id", "domain"),
    [
        ("api.univprepai.com", "univ", "univprepai.com"),
        ("univprepai.com", "univ", "univprepai.com"),
        ("APP.My-KTube.ai:443", "kzone", "my-ktube.ai"),
        ("api.my-ktube.com.", "kzone", "my-ktube.com"),
        ("api.dreamseedai.com", "dreamseed", "dreamseedai.com"),
    ],
)
async def test_a_host_resolves_to_its_zone(
    tenant: tenant_service_pb2_grpc.TenantServiceStub, host: str, zone_id: str, domain: str
) -> None:
    reply = await tenant.ResolveZone(tenant_service_pb2.ResolveZoneRequest(host=host))
    assert (reply.zone.id, reply.matched_domain) == (zone_id, domain)
    assert reply.zone.public_org_id == f"{zone_id}-public"


@pytest.mark.parametrize("host", ["evil.com", "univprepai.com.evil.com", "notunivprepai.com", "127.0.0.1", "a b"])
async def test_a_host_of_no_zone_is_not_found(tenant: tenant_service_pb2_grpc.TenantServiceStub, host: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as answer:
        await tenant.ResolveZone(tenant_service_pb2.ResolveZoneRequest(host=host))
    assert answer.value.code() is grpc.StatusCode.NOT_FOUND
    info = error_info(status_from_error(answer.value))
    assert info is not None
    assert info.reason == "UNKNOWN_ZONE"


async def test_an_empty_host_is_a_field_violation(tenant: tenant_service_pb2_grpc.TenantServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as answer:
        await tenant.ResolveZone(tenant_service_pb2.ResolveZoneRequest())
    assert answer.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(status_from_error(answer.value)) == [("host", "required")]


async def test_the_eight_zones_are_seeded_with_their_domains_and_public_orgs(
    tenant: tenant_service_pb2_grpc.TenantServiceStub,
) -> None:
    for zone_id, domains in SEEDED.items():
        zone = (await tenant.LookupZone(tenant_service_pb2.LookupZoneRequest(zone_id=zone_id))).zone
        assert list(zone.domains) == domains
        assert zone.status == resources_pb2.ZONE_STATUS_ACTIVE
        organization = (
            await tenant.LookupOrganization(tenant_service_pb2.LookupOrganizationRequest(org_id=zone.public_org_id))
        ).organization
        assert (organization.zone_id, organization.is_public) == (zone_id, True)
    with pytest.raises(grpc.aio.AioRpcError) as answer:
        await tenant.LookupZone(tenant_service_pb2.LookupZoneRequest(zone_id="nowhere"))
    assert answer.value.code() is grpc.StatusCode.NOT_FOUND


async def test_a_disabled_zone_resolves_no_more(
    tenant: tenant_service_pb2_grpc.TenantServiceStub, store: TenantStore
) -> None:
    await store.update_zone("mpc", {"status": "disabled"})
    with pytest.raises(grpc.aio.AioRpcError) as answer:
        await tenant.ResolveZone(tenant_service_pb2.ResolveZoneRequest(host="api.mpcstudy.com"))
    assert answer.value.code() is grpc.StatusCode.NOT_FOUND


async def test_organisations_are_visible_only_in_scope(store: TenantStore, tenant_url: str) -> None:
    univ_a = await store.create_organization(
        TenantScope.zone("univ"), "univ", resources_pb2.Organization(name="Academy A"), "pro"
    )
    kzone_b = await store.create_organization(
        TenantScope.zone("kzone"), "kzone", resources_pb2.Organization(name="Studio B"), "free"
    )
    univ_ids = {o.id for o in (await store.organizations(TenantScope.zone("univ"), {}, "", None, 100))[0]}
    assert univ_ids == {"univ-public", univ_a.id}
    own = (await store.organizations(TenantScope.org("univ", univ_a.id), {}, "", None, 100))[0]
    assert [o.id for o in own] == [univ_a.id]
    with pytest.raises(NotFound):
        await store.organization(TenantScope.zone("univ"), kzone_b.id)
    with pytest.raises(NotFound):  # an update outside the scope finds nothing to change
        await store.update_organization(TenantScope.zone("univ"), kzone_b.id, {"name": "hijacked"})
    everything = (await store.organizations(TenantScope.platform(), {}, "", None, 100))[1]
    assert everything == len(SEEDED) + 2
    # Row-level security, not the store's WHERE clauses, is what hides the rows: a bare query sees nothing.
    connection = await asyncpg.connect(tenant_url)
    try:
        assert await connection.fetchval("SELECT count(*) FROM tenant.organizations") == 0
    finally:
        await connection.close()


async def test_an_org_name_is_unique_per_zone_case_insensitively(store: TenantStore) -> None:
    scope = TenantScope.zone("univ")
    await store.create_organization(scope, "univ", resources_pb2.Organization(name="Seoul Academy"), "free")
    with pytest.raises(AlreadyExists, match="exists"):
        await store.create_organization(scope, "univ", resources_pb2.Organization(name="seoul academy"), "free")
    other = await store.create_organization(
        TenantScope.zone("skill"), "skill", resources_pb2.Organization(name="Seoul Academy"), "free"
    )
    assert other.zone_id == "skill"


# --- the pure rules -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("API.UnivPrepAI.com:8443", "api.univprepai.com"),
        ("univprepai.com.", "univprepai.com"),
        ("localhost:8080", "localhost"),
        ("127.0.0.1", None),
        ("", None),
        ("exa mple.com", None),
        ("-bad.com", None),
    ],
)
def test_host_names_are_normalised(raw: str, name: str | None) -> None:
    assert zones.host_name(raw) == name


def test_domain_candidates_go_from_specific_to_general() -> None:
    assert zones.domain_candidates("a.api.univprepai.com") == [
        "a.api.univprepai.com",
        "api.univprepai.com",
        "univprepai.com",
    ]


def test_scopes_follow_the_role() -> None:
    assert zones.Actor("super_admin", "univ", "o").scope() == TenantScope.platform()
    assert zones.Actor("zone_admin", "univ", "o").scope() == TenantScope.zone("univ")
    assert zones.Actor("teacher", "univ", "o").scope() == TenantScope.org("univ", "o")


def test_who_may_change_what_of_an_organisation() -> None:
    zone_admin = zones.Actor("zone_admin", "univ", "univ-public")
    org_admin = zones.Actor("org_admin", "univ", "org-1")
    zones.organization_fields_allowed(zone_admin, "univ", "org-1", {"plan", "name"})
    zones.organization_fields_allowed(org_admin, "univ", "org-1", {"name", "contact_email"})
    for actor, zone, org, fields in [
        (org_admin, "univ", "org-1", {"plan"}),
        (org_admin, "univ", "org-2", {"name"}),
        (zone_admin, "kzone", "org-3", {"name"}),
        (zones.Actor("teacher", "univ", "org-1"), "univ", "org-1", {"name"}),
    ]:
        with pytest.raises(PermissionDenied, match=r"may not|outside"):
            zones.organization_fields_allowed(actor, zone, org, fields)
    assert zones.zone_for_new_organization(zone_admin, "") == "univ"
    with pytest.raises(PermissionDenied, match="zone_admin"):
        zones.zone_for_new_organization(zone_admin, "kzone")


# --- through the wire with people's tokens ----------------------------------------------------------------------


async def test_only_a_super_admin_adds_a_zone_and_its_host_resolves(people: People) -> None:
    root = await people.as_new_user("dreamseed", "dreamseed-public", "super_admin")
    request = tenant_service_pb2.CreateZoneRequest(
        zone=resources_pb2.Zone(id="drama", display_name="K-Drama Lab"), domains=["kdramalab.com"]
    )
    created = (await people.tenant.CreateZone(request, metadata=root.metadata())).zone
    assert (created.id, list(created.domains), created.public_org_id) == ("drama", ["kdramalab.com"], "drama-public")
    resolved = await people.tenant.ResolveZone(tenant_service_pb2.ResolveZoneRequest(host="api.kdramalab.com"))
    assert resolved.zone.id == "drama"
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    student = await people.as_new_user("univ", "univ-public", "student")
    for caller, expected in ((zone_admin, "OUT_OF_SCOPE"), (student, "PERMISSION_MISSING")):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await people.tenant.CreateZone(request, metadata=caller.metadata())
        assert (denied.value.code(), reason(denied.value)) == (grpc.StatusCode.PERMISSION_DENIED, expected)
    with pytest.raises(grpc.aio.AioRpcError) as duplicate:
        await people.tenant.CreateZone(request, metadata=root.metadata())
    assert duplicate.value.code() is grpc.StatusCode.ALREADY_EXISTS


async def test_a_zone_admin_manages_organisations_of_their_zone_only(people: People) -> None:
    univ_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    kzone_admin = await people.as_new_user("kzone", "kzone-public", "zone_admin")
    academy = (
        await people.tenant.CreateOrganization(
            tenant_service_pb2.CreateOrganizationRequest(organization=resources_pb2.Organization(name="Academy")),
            metadata=univ_admin.metadata(),
        )
    ).organization
    assert academy.zone_id == "univ"
    with pytest.raises(grpc.aio.AioRpcError) as elsewhere:
        await people.tenant.CreateOrganization(
            tenant_service_pb2.CreateOrganizationRequest(
                organization=resources_pb2.Organization(name="Sneaky", zone_id="kzone")
            ),
            metadata=univ_admin.metadata(),
        )
    assert reason(elsewhere.value) == "OUT_OF_SCOPE"
    listed = await people.tenant.ListOrganizations(
        tenant_service_pb2.ListOrganizationsRequest(), metadata=univ_admin.metadata()
    )
    assert {o.id for o in listed.organizations} == {"univ-public", academy.id}
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await people.tenant.GetOrganization(
            tenant_service_pb2.GetOrganizationRequest(org_id=academy.id), metadata=kzone_admin.metadata()
        )
    assert hidden.value.code() is grpc.StatusCode.NOT_FOUND


async def test_an_org_admin_renames_their_org_but_not_its_plan(people: People) -> None:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    academy = (
        await people.tenant.CreateOrganization(
            tenant_service_pb2.CreateOrganizationRequest(organization=resources_pb2.Organization(name="Academy")),
            metadata=zone_admin.metadata(),
        )
    ).organization
    org_admin = await people.as_new_user("univ", academy.id, "org_admin")
    renamed = await people.tenant.UpdateOrganization(
        tenant_service_pb2.UpdateOrganizationRequest(
            org_id=academy.id,
            organization=resources_pb2.Organization(name="Academy Seoul"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        metadata=org_admin.metadata(),
    )
    assert renamed.organization.name == "Academy Seoul"
    with pytest.raises(grpc.aio.AioRpcError) as plan:
        await people.tenant.UpdateOrganization(
            tenant_service_pb2.UpdateOrganizationRequest(
                org_id=academy.id,
                organization=resources_pb2.Organization(plan=resources_pb2.PLAN_PRO),
                update_mask=field_mask_pb2.FieldMask(paths=["plan"]),
            ),
            metadata=org_admin.metadata(),
        )
    assert (plan.value.code(), reason(plan.value)) == (grpc.StatusCode.PERMISSION_DENIED, "OUT_OF_SCOPE")
    upgraded = await people.tenant.UpdateOrganization(
        tenant_service_pb2.UpdateOrganizationRequest(
            org_id=academy.id,
            organization=resources_pb2.Organization(plan=resources_pb2.PLAN_PRO),
            update_mask=field_mask_pb2.FieldMask(paths=["plan"]),
        ),
        metadata=zone_admin.metadata(),
    )
    assert upgraded.organization.plan == resources_pb2.PLAN_PRO


async def test_users_of_a_suspended_org_cannot_log_in(people: People) -> None:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    academy = (
        await people.tenant.CreateOrganization(
            tenant_service_pb2.CreateOrganizationRequest(organization=resources_pb2.Organization(name="Academy")),
            metadata=zone_admin.metadata(),
        )
    ).organization
    teacher = await people.add_user("univ", academy.id, "teacher")
    live = await people.sign_in("univ", teacher)
    suspended = await people.tenant.SuspendOrganization(
        tenant_service_pb2.SuspendOrganizationRequest(org_id=academy.id, reason="unpaid"),
        metadata=zone_admin.metadata(),
    )
    assert suspended.organization.status == resources_pb2.ORGANIZATION_STATUS_SUSPENDED
    # Its live tokens stop working at once, not at their expiry.
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await people.auth.GetMe(auth_service_pb2.GetMeRequest(), metadata=live.metadata())
    assert reason(ended.value) == "TOKEN_REVOKED"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await people.sign_in("univ", teacher)
    assert (refused.value.code(), reason(refused.value)) == (grpc.StatusCode.PERMISSION_DENIED, "ORG_SUSPENDED")
    await people.tenant.ReactivateOrganization(
        tenant_service_pb2.ReactivateOrganizationRequest(org_id=academy.id), metadata=zone_admin.metadata()
    )
    await people.sign_in("univ", teacher)


async def test_a_super_admin_routes_domains_to_zones(people: People) -> None:
    root = await people.as_new_user("dreamseed", "dreamseed-public", "super_admin")
    added = await people.tenant.AddZoneDomain(
        tenant_service_pb2.AddZoneDomainRequest(zone_id="mpc", domain="MPC-Practice.kr."), metadata=root.metadata()
    )
    assert "mpc-practice.kr" in added.zone.domains
    resolved = await people.tenant.ResolveZone(tenant_service_pb2.ResolveZoneRequest(host="api.mpc-practice.kr"))
    assert resolved.zone.id == "mpc"
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await people.tenant.AddZoneDomain(
            tenant_service_pb2.AddZoneDomainRequest(zone_id="univ", domain="mpc-practice.kr"), metadata=root.metadata()
        )
    assert taken.value.code() is grpc.StatusCode.ALREADY_EXISTS
    zone_admin = await people.as_new_user("mpc", "mpc-public", "zone_admin")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await people.tenant.RemoveZoneDomain(
            tenant_service_pb2.RemoveZoneDomainRequest(zone_id="mpc", domain="mpc-practice.kr"),
            metadata=zone_admin.metadata(),
        )
    assert reason(refused.value) == "OUT_OF_SCOPE"
    removed = await people.tenant.RemoveZoneDomain(
        tenant_service_pb2.RemoveZoneDomainRequest(zone_id="mpc", domain="mpc-practice.kr"), metadata=root.metadata()
    )
    assert "mpc-practice.kr" not in removed.zone.domains
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await people.tenant.ResolveZone(tenant_service_pb2.ResolveZoneRequest(host="api.mpc-practice.kr"))
    assert gone.value.code() is grpc.StatusCode.NOT_FOUND


async def test_the_current_zone_is_the_hosts_and_needs_no_token(people: People) -> None:
    current = await people.tenant.GetCurrentZone(
        tenant_service_pb2.GetCurrentZoneRequest(), metadata=Caller("kzone").metadata()
    )
    assert (current.zone.id, list(current.zone.domains)) == ("kzone", ["my-ktube.ai", "my-ktube.com"])
    with pytest.raises(grpc.aio.AioRpcError) as zoneless:
        await people.tenant.GetCurrentZone(tenant_service_pb2.GetCurrentZoneRequest())
    assert (zoneless.value.code(), reason(zoneless.value)) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_ZONE")


async def test_a_zone_update_writes_only_what_it_names_and_checks_it(people: People) -> None:
    admin = await people.as_new_user("mpc", "mpc-public", "zone_admin")
    before = await people.tenant.GetZone(tenant_service_pb2.GetZoneRequest(zone_id="mpc"), metadata=admin.metadata())
    # No mask: the fields the request sets, and only those.
    described = await people.tenant.UpdateZone(
        tenant_service_pb2.UpdateZoneRequest(zone_id="mpc", zone=resources_pb2.Zone(description="Practice rooms")),
        metadata=admin.metadata(),
    )
    assert (described.zone.description, described.zone.display_name) == ("Practice rooms", before.zone.display_name)
    assert described.zone.default_locale == before.zone.default_locale
    nothing = await people.tenant.UpdateZone(
        tenant_service_pb2.UpdateZoneRequest(zone_id="mpc"), metadata=admin.metadata()
    )
    assert nothing.zone.display_name == before.zone.display_name
    # Named fields must hold valid values: clearing the name, a locale that is not a language tag.
    invalid = tenant_service_pb2.UpdateZoneRequest(
        zone_id="mpc",
        zone=resources_pb2.Zone(default_locale="not a locale", supported_locales=["ko", "ko"]),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "default_locale", "supported_locales"]),
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await people.tenant.UpdateZone(invalid, metadata=admin.metadata())
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    fields = {field for field, _ in field_violations(status_from_error(refused.value))}
    assert fields == {"zone.display_name", "zone.default_locale", "zone.supported_locales"}


async def test_a_disabled_zone_is_listed_for_super_admins_only(people: People) -> None:
    root = await people.as_new_user("dreamseed", "dreamseed-public", "super_admin")
    student = await people.as_new_user("univ", "univ-public", "student")
    await people.tenant.UpdateZone(
        tenant_service_pb2.UpdateZoneRequest(
            zone_id="medi",
            status=resources_pb2.ZONE_STATUS_DISABLED,
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=root.metadata(),
    )
    for caller, sees in ((root, True), (student, False)):
        listed = await people.tenant.ListZones(tenant_service_pb2.ListZonesRequest(), metadata=caller.metadata())
        assert ("medi" in {zone.id for zone in listed.zones}) is sees
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await people.tenant.GetZone(tenant_service_pb2.GetZoneRequest(zone_id="medi"), metadata=student.metadata())
    assert hidden.value.code() is grpc.StatusCode.NOT_FOUND
