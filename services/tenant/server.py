"""The tenant service: zones (which zone a host belongs to) and organisations.

Thin: validates, decides scope with services/tenant/zones.py, and reads and writes through
services/tenant/store.py. The permission each people-facing RPC needs is declared in the contract and checked
by the runtime before the handler runs; what is left here is scope (whose zone, whose organisation).
"""

from __future__ import annotations

from datetime import UTC, datetime

from megacity.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2 as pb
from megacity.tenant.v1 import tenant_service_pb2_grpc
from services.runtime import callcontext, paging
from services.runtime.audit import Auditor
from services.runtime.callcontext import require_principal
from services.runtime.channels import ChannelFactory
from services.runtime.context import UnaryContext
from services.runtime.database import TenantScope
from services.runtime.errors import ErrorReason, InvalidArgument, NotFound, Violations
from services.runtime.server import Dependencies, ServicerBinding
from services.tenant import zones
from services.tenant.store import TenantStore

MAX_PAGE = 1000


def _actor() -> zones.Actor:
    principal = require_principal()
    return zones.Actor(role=principal.role, zone_id=principal.zone_id, org_id=principal.org_id)


def _required(violations: Violations, value: str, field: str) -> None:
    violations.check(bool(value.strip()), field, "required")


class TenantServicer(tenant_service_pb2_grpc.TenantServiceServicer):
    def __init__(self, store: TenantStore, auditor: Auditor, channels: ChannelFactory) -> None:
        self._store = store
        self._audit = auditor
        self._channels = channels

    # --- which zone is this host (edge and services) ------------------------------------------------------

    async def ResolveZone(
        self, request: pb.ResolveZoneRequest, context: UnaryContext[pb.ResolveZoneRequest, pb.ResolveZoneResponse]
    ) -> pb.ResolveZoneResponse:
        violations = Violations()
        _required(violations, request.host, "host")
        violations.raise_if_any()
        name = zones.host_name(request.host)
        found = None if name is None else await self._store.zone_for_domains(zones.domain_candidates(name))
        if found is None:
            raise NotFound(
                "no active zone serves this host",
                reason=ErrorReason.ERROR_REASON_UNKNOWN_ZONE,
                metadata={"host": request.host[:255]},
            )
        zone, domain = found
        return pb.ResolveZoneResponse(zone=zone, matched_domain=domain)

    async def LookupZone(
        self, request: pb.LookupZoneRequest, context: UnaryContext[pb.LookupZoneRequest, pb.LookupZoneResponse]
    ) -> pb.LookupZoneResponse:
        violations = Violations()
        _required(violations, request.zone_id, "zone_id")
        violations.raise_if_any()
        return pb.LookupZoneResponse(zone=await self._store.zone(request.zone_id))

    async def LookupOrganization(
        self,
        request: pb.LookupOrganizationRequest,
        context: UnaryContext[pb.LookupOrganizationRequest, pb.LookupOrganizationResponse],
    ) -> pb.LookupOrganizationResponse:
        violations = Violations()
        _required(violations, request.org_id, "org_id")
        violations.raise_if_any()
        # Service to service: the mesh catalog, not a person's scope, authorises these callers.
        organization = await self._store.organization(TenantScope.platform(), request.org_id)
        return pb.LookupOrganizationResponse(organization=organization)

    # --- zones ----------------------------------------------------------------------------------------------

    async def GetCurrentZone(
        self,
        request: pb.GetCurrentZoneRequest,
        context: UnaryContext[pb.GetCurrentZoneRequest, pb.GetCurrentZoneResponse],
    ) -> pb.GetCurrentZoneResponse:
        call = callcontext.current.get()
        zone_id = call.zone if call else ""
        if not zone_id:
            raise NotFound(
                "the request has no zone: call through the edge, on a zone's host",
                reason=ErrorReason.ERROR_REASON_UNKNOWN_ZONE,
            )
        return pb.GetCurrentZoneResponse(zone=await self._store.zone(zone_id, with_disabled=False))

    async def ListZones(
        self, request: pb.ListZonesRequest, context: UnaryContext[pb.ListZonesRequest, pb.ListZonesResponse]
    ) -> pb.ListZonesResponse:
        limit = paging.page_size(request.page_size, MAX_PAGE)
        position = paging.decode(request.page_token, ["zones"])
        after = str(position[0]) if position else None
        found = await self._store.zones(after, limit + 1, with_disabled=zones.sees_disabled_zones(_actor()))
        next_token = paging.encode([found[limit - 1].id], ["zones"]) if len(found) > limit else ""
        return pb.ListZonesResponse(zones=found[:limit], next_page_token=next_token)

    async def GetZone(
        self, request: pb.GetZoneRequest, context: UnaryContext[pb.GetZoneRequest, pb.GetZoneResponse]
    ) -> pb.GetZoneResponse:
        violations = Violations()
        _required(violations, request.zone_id, "zone_id")
        violations.raise_if_any()
        with_disabled = zones.sees_disabled_zones(_actor())
        return pb.GetZoneResponse(zone=await self._store.zone(request.zone_id, with_disabled=with_disabled))

    async def CreateZone(
        self, request: pb.CreateZoneRequest, context: UnaryContext[pb.CreateZoneRequest, pb.CreateZoneResponse]
    ) -> pb.CreateZoneResponse:
        zones.require_platform(_actor(), "add zones")
        violations = Violations()
        zones.check_zone_fields(
            violations, request.zone, "zone", {"id", *zones.zone_update_paths([], request.zone), "display_name"}
        )
        domains = [
            zones.check_domain(violations, domain, f"domains[{index}]") for index, domain in enumerate(request.domains)
        ]
        violations.check(bool(domains), "domains", "a zone needs at least one domain")
        violations.check(len(set(domains)) == len(domains), "domains", "each domain once")
        violations.raise_if_any()
        zone = await self._store.create_zone(request.zone, domains, request.public_org_name.strip())
        await self._audit.record(
            "create", "success", resource_type="zone", resource_id=zone.id, details={"domains": domains}
        )
        return pb.CreateZoneResponse(zone=zone)

    async def UpdateZone(
        self, request: pb.UpdateZoneRequest, context: UnaryContext[pb.UpdateZoneRequest, pb.UpdateZoneResponse]
    ) -> pb.UpdateZoneResponse:
        actor = _actor()
        zones.require_zone_admin_of(actor, request.zone_id, "change this zone")
        paths = zones.zone_update_paths(request.update_mask.paths, request.zone)
        violations = Violations()
        unknown = paths - {*zones.ZONE_EDITABLE, "status"}
        violations.check(not unknown, "update_mask", f"not updatable: {', '.join(sorted(unknown))}")
        zones.check_zone_fields(violations, request.zone, "zone", paths)
        violations.raise_if_any()
        changes: dict[str, object] = {
            path: getattr(request.zone, path).strip() if path == "display_name" else getattr(request.zone, path)
            for path in paths & {"display_name", "description", "default_locale"}
        }
        if "supported_locales" in paths:
            changes["supported_locales"] = list(request.zone.supported_locales)
        if "status" in paths or request.status:
            zones.require_platform(actor, "enable or disable zones")
            if request.status not in zones.ZONE_STATUSES:
                raise InvalidArgument("status is invalid", [("status", "ZONE_STATUS_ACTIVE or ZONE_STATUS_DISABLED")])
            changes["status"] = zones.ZONE_STATUSES[request.status]
        zone = await self._store.update_zone(request.zone_id, changes)
        await self._audit.record(
            "update", "success", resource_type="zone", resource_id=zone.id, details={"fields": sorted(changes)}
        )
        return pb.UpdateZoneResponse(zone=zone)

    async def _route_domain(self, zone_id: str, raw_domain: str, *, add: bool) -> tenant_resources.Zone:
        zones.require_platform(_actor(), "route domains to zones")
        violations = Violations()
        _required(violations, zone_id, "zone_id")
        domain = zones.check_domain(violations, raw_domain, "domain")
        violations.raise_if_any()
        change = self._store.add_domain if add else self._store.remove_domain
        zone = await change(zone_id, domain)
        detail = "domain_added" if add else "domain_removed"
        await self._audit.record(
            "update", "success", resource_type="zone", resource_id=zone.id, details={detail: domain}
        )
        return zone

    async def AddZoneDomain(
        self,
        request: pb.AddZoneDomainRequest,
        context: UnaryContext[pb.AddZoneDomainRequest, pb.AddZoneDomainResponse],
    ) -> pb.AddZoneDomainResponse:
        return pb.AddZoneDomainResponse(zone=await self._route_domain(request.zone_id, request.domain, add=True))

    async def RemoveZoneDomain(
        self,
        request: pb.RemoveZoneDomainRequest,
        context: UnaryContext[pb.RemoveZoneDomainRequest, pb.RemoveZoneDomainResponse],
    ) -> pb.RemoveZoneDomainResponse:
        return pb.RemoveZoneDomainResponse(zone=await self._route_domain(request.zone_id, request.domain, add=False))

    # --- organisations ----------------------------------------------------------------------------------------

    async def ListOrganizations(
        self,
        request: pb.ListOrganizationsRequest,
        context: UnaryContext[pb.ListOrganizationsRequest, pb.ListOrganizationsResponse],
    ) -> pb.ListOrganizationsResponse:
        actor = _actor()
        filters: dict[str, str] = {}
        if request.zone_id:
            filters["zone_id"] = request.zone_id
        if request.status:
            filters["status"] = zones.ORG_STATUSES.get(request.status, "")
        if request.plan:
            filters["plan"] = zones.PLANS.get(request.plan, "")
        violations = Violations()
        violations.check(filters.get("status") != "", "status", "not a known organisation status")
        violations.check(filters.get("plan") != "", "plan", "not a known plan")
        violations.check(len(request.query) <= 200, "query", "at most 200 characters")
        violations.raise_if_any()
        limit = paging.page_size(request.page_size, MAX_PAGE)
        query = ["organizations", sorted(filters.items()), request.query]
        position = paging.decode(request.page_token, query)
        after = str(position[0]) if position else None
        found, total = await self._store.organizations(actor.scope(), filters, request.query, after, limit + 1)
        next_token = paging.encode([found[limit - 1].id], query) if len(found) > limit else ""
        return pb.ListOrganizationsResponse(organizations=found[:limit], next_page_token=next_token, total_size=total)

    async def GetOrganization(
        self,
        request: pb.GetOrganizationRequest,
        context: UnaryContext[pb.GetOrganizationRequest, pb.GetOrganizationResponse],
    ) -> pb.GetOrganizationResponse:
        actor = _actor()
        violations = Violations()
        _required(violations, request.org_id, "org_id")
        violations.raise_if_any()
        # Outside the caller's scope the row is invisible (row-level security): NOT_FOUND, as for a missing one.
        return pb.GetOrganizationResponse(organization=await self._store.organization(actor.scope(), request.org_id))

    async def CreateOrganization(
        self,
        request: pb.CreateOrganizationRequest,
        context: UnaryContext[pb.CreateOrganizationRequest, pb.CreateOrganizationResponse],
    ) -> pb.CreateOrganizationResponse:
        actor = _actor()
        organization = request.organization
        zone_id = zones.zone_for_new_organization(actor, organization.zone_id)
        violations = Violations()
        zones.check_organization_name(violations, organization.name, "organization.name")
        violations.check(
            not organization.plan or organization.plan in zones.PLANS, "organization.plan", "not a known plan"
        )
        violations.check(len(organization.contact_email) <= 254, "organization.contact_email", "at most 254 chars")
        violations.raise_if_any()
        plan = zones.PLANS.get(organization.plan, "free")
        created = await self._store.create_organization(actor.scope(), zone_id, organization, plan)
        await self._audit.record(
            "org_change",
            "success",
            resource_type="organization",
            resource_id=created.id,
            zone_id=created.zone_id,
            org_id=created.id,
            details={"event": "created", "plan": plan},
        )
        return pb.CreateOrganizationResponse(organization=created)

    async def UpdateOrganization(
        self,
        request: pb.UpdateOrganizationRequest,
        context: UnaryContext[pb.UpdateOrganizationRequest, pb.UpdateOrganizationResponse],
    ) -> pb.UpdateOrganizationResponse:
        actor = _actor()
        paths = set(request.update_mask.paths) or {"name", "contact_email"}
        violations = Violations()
        _required(violations, request.org_id, "org_id")
        unknown = paths - {"name", "plan", "contact_email"}
        violations.check(not unknown, "update_mask", f"not updatable: {', '.join(sorted(unknown))}")
        if "name" in paths:
            zones.check_organization_name(violations, request.organization.name, "organization.name")
        if "plan" in paths:
            violations.check(request.organization.plan in zones.PLANS, "organization.plan", "not a known plan")
        violations.raise_if_any()
        current = await self._store.organization(actor.scope(), request.org_id)
        zones.organization_fields_allowed(actor, current.zone_id, current.id, paths)
        changes: dict[str, object] = {}
        if "name" in paths:
            changes["name"] = request.organization.name.strip()
        if "contact_email" in paths:
            changes["contact_email"] = request.organization.contact_email
        if "plan" in paths:
            changes["plan"] = zones.PLANS[request.organization.plan]
        updated = await self._store.update_organization(actor.scope(), request.org_id, changes)
        await self._audit.record(
            "org_change",
            "success",
            resource_type="organization",
            resource_id=updated.id,
            zone_id=updated.zone_id,
            org_id=updated.id,
            details={"event": "updated", "fields": sorted(changes)},
        )
        return pb.UpdateOrganizationResponse(organization=updated)

    async def SuspendOrganization(
        self,
        request: pb.SuspendOrganizationRequest,
        context: UnaryContext[pb.SuspendOrganizationRequest, pb.SuspendOrganizationResponse],
    ) -> pb.SuspendOrganizationResponse:
        actor = _actor()
        violations = Violations()
        _required(violations, request.org_id, "org_id")
        _required(violations, request.reason, "reason")
        violations.check(len(request.reason) <= 1000, "reason", "at most 1000 characters")
        violations.raise_if_any()
        current = await self._store.organization(actor.scope(), request.org_id)
        zones.require_zone_admin_of(actor, current.zone_id, "suspend organisations")
        if current.is_public:
            raise InvalidArgument(
                "a zone's public organisation cannot be suspended", [("org_id", "the zone's public organisation")]
            )
        changes = {"status": "suspended", "suspend_reason": request.reason.strip(), "suspend_time": _now()}
        updated = await self._store.update_organization(actor.scope(), request.org_id, changes)
        # Logins are refused from now on (auth asks for the organisation's status); live tokens end here.
        auth = auth_service_pb2_grpc.AuthServiceStub(self._channels.channel("auth"))
        await auth.RevokeOrganizationSessions(
            auth_service_pb2.RevokeOrganizationSessionsRequest(org_id=updated.id, reason="org_suspended")
        )
        await self._audit.record(
            "org_change",
            "success",
            resource_type="organization",
            resource_id=updated.id,
            zone_id=updated.zone_id,
            org_id=updated.id,
            details={"event": "suspended", "reason": updated.suspend_reason},
        )
        return pb.SuspendOrganizationResponse(organization=updated)

    async def ReactivateOrganization(
        self,
        request: pb.ReactivateOrganizationRequest,
        context: UnaryContext[pb.ReactivateOrganizationRequest, pb.ReactivateOrganizationResponse],
    ) -> pb.ReactivateOrganizationResponse:
        actor = _actor()
        violations = Violations()
        _required(violations, request.org_id, "org_id")
        violations.raise_if_any()
        current = await self._store.organization(actor.scope(), request.org_id)
        zones.require_zone_admin_of(actor, current.zone_id, "reactivate organisations")
        changes = {"status": "active", "suspend_reason": "", "suspend_time": None}
        updated = await self._store.update_organization(actor.scope(), request.org_id, changes)
        await self._audit.record(
            "org_change",
            "success",
            resource_type="organization",
            resource_id=updated.id,
            zone_id=updated.zone_id,
            org_id=updated.id,
            details={"event": "reactivated"},
        )
        return pb.ReactivateOrganizationResponse(organization=updated)


def _now() -> datetime:
    return datetime.now(UTC)


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    if deps.database is None:
        raise RuntimeError("the tenant service needs PostgreSQL (MEGACITY_DATABASE_URL)")
    servicer = TenantServicer(TenantStore(deps.database), deps.audit, deps.channels)
    return [ServicerBinding(tenant_service_pb2_grpc.add_TenantServiceServicer_to_server, servicer)]
