"""The kzone service: K-Zone voice and dance analysis, reference content (songs and choreographies) and stored
analysis results.

Thin: validates and decides who may do what with the pure rules of services/kzone/contents.py (references) and
services/kzone/results.py (results), reads and writes through services/kzone/store.py, and keeps media in the
media store (services/runtime/media.py) under `kzone/<zone>/<org>/contents/<content_id>/<upload_id>/media.<ext>`
(one folder per upload, so new media never overwrites what a row or a running extraction still reads).

Reference lifecycle: CreateReferenceContent makes one AWAITING_MEDIA; UploadReferenceMedia stores its media and
sets it PROCESSING with a new extraction id (`processing_job_id`), clearing its features, detected values and
processing error (replacing the media of a READY or FAILED reference sends it back to PROCESSING).

Features: the extraction workers (services/kzone/extraction.py, a background task of every replica) claim
PROCESSING references, extract a song's words, pitch contour and beats or a choreography's keypoints with the
analysis modules and the inference servers, and end each READY or FAILED.

Analysis: live voice (AnalyzeVoice) and uploads of it (AnalyzeVoiceFile) in services/kzone/voice.py with
voice_report.py; live dance (AnalyzeDance) and uploaded photos or videos (DetectDancePose) in
services/kzone/dance.py. Each stores its report with KZoneStore.add_result. The live streams are gRPC only:
apps reach them through the edge as gRPC, which checks the bearer token as the runtime does again here.

Upload sizes: a song's audio at most 50 MiB, a choreography's video at most 500 MiB (the edge's limits for the
route; the catalog lets kzone take gRPC messages that large). A file over its kind's limit is INVALID_ARGUMENT
with reason PAYLOAD_TOO_LARGE (a retry cannot succeed, so not RESOURCE_EXHAUSTED, which the platform keeps for
rate and credit limits); a media type the kind does not take is INVALID_ARGUMENT with reason
UNSUPPORTED_MEDIA_TYPE.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import structlog

from megacity.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from megacity.kzone.v1 import kzone_service_pb2 as pb
from megacity.kzone.v1 import kzone_service_pb2_grpc
from megacity.kzone.v1 import resources_pb2 as res
from services.kzone import contents, results
from services.kzone.dance import DanceService
from services.kzone.extraction import ExtractionSettings, ExtractionWorker
from services.kzone.store import (
    CONTENT_UPDATE_COLUMNS,
    KZoneStore,
    Owner,
    Position,
    StoredContent,
    StoredResult,
    content_columns,
)
from services.kzone.voice import VoiceAnalysis
from services.runtime import paging
from services.runtime.audit import Auditor
from services.runtime.callcontext import require_principal
from services.runtime.channels import ChannelFactory
from services.runtime.context import StreamingContext, UnaryContext
from services.runtime.database import TenantScope
from services.runtime.errors import (
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violations,
)
from services.runtime.media import MediaStore
from services.runtime.server import Dependencies, ServicerBinding
from services.runtime.tokens import AccessClaims

MAX_PAGE = 200
_log = structlog.get_logger("megacity.kzone")


def _required(violations: Violations, value: str, field: str) -> None:
    violations.check(bool(value), field, "required")


def _reading_scope(person: AccessClaims) -> TenantScope:
    """Where a person's reads look: every tenant for super admins, else their zone (the pure rules narrow it)."""
    return TenantScope.platform() if person.role == "super_admin" else TenantScope.zone(person.zone_id)


def _row_scope(zone_id: str, org_id: str) -> TenantScope:
    """Writes to one row run in the row's own organisation."""
    return TenantScope.org(zone_id, org_id)


def _position(token: str, query: list[object]) -> Position | None:
    position = paging.decode(token, query)
    if position is None:
        return None
    try:
        when, identifier = position
        return datetime.fromisoformat(str(when)), str(identifier)
    except ValueError:
        raise InvalidArgument(
            "page_token is not one this query issued",
            [("page_token", "use the next_page_token of the previous page, with the same filters")],
            reason=ErrorReason.ERROR_REASON_INVALID_PAGE_TOKEN,
        ) from None


class KZoneServicer(kzone_service_pb2_grpc.KZoneServiceServicer):
    def __init__(
        self,
        store: KZoneStore,
        media: MediaStore,
        auditor: Auditor,
        channels: ChannelFactory,
        voice: VoiceAnalysis,
        dance: DanceService,
    ) -> None:
        self._store = store
        self._media = media
        self._audit = auditor
        self._channels = channels
        self.voice = voice
        self.dance = dance

    # --- reference content -----------------------------------------------------------------------------------

    async def _readable_content(self, person: AccessClaims, content_id: str) -> StoredContent:
        violations = Violations()
        _required(violations, content_id, "content_id")
        violations.raise_if_any()
        stored = await self._store.content(_reading_scope(person), content_id)
        if not contents.may_read(person, stored.facts):
            raise NotFound("no such reference", metadata={"content_id": content_id[:64]})
        return stored

    async def _changeable_content(self, person: AccessClaims, content_id: str) -> StoredContent:
        stored = await self._readable_content(person, content_id)
        if not contents.may_change(person, stored.facts):
            raise PermissionDenied(
                "only the reference's creator and its organisation's or zone's admins change it",
                reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE,
            )
        return stored

    async def CreateReferenceContent(
        self,
        request: pb.CreateReferenceContentRequest,
        context: UnaryContext[pb.CreateReferenceContentRequest, pb.CreateReferenceContentResponse],
    ) -> pb.CreateReferenceContentResponse:
        person = require_principal()
        if not contents.may_create(person):
            raise PermissionDenied(
                "teachers and admins create references",
                reason=ErrorReason.ERROR_REASON_ROLE_NOT_ALLOWED,
                metadata={"role": person.role},
            )
        violations = Violations()
        if not request.HasField("content"):
            violations.add("content", "required")
        else:
            contents.check_content(violations, request.content)
        violations.raise_if_any("the reference is invalid")
        content = contents.normalized(request.content)
        owner = Owner(zone_id=person.zone_id, org_id=person.org_id, user_id=person.user_id)
        stored = await self._store.create_content(owner, contents.KINDS[content.kind], content)
        await self._audit.record(
            "create",
            "success",
            resource_type="reference_content",
            resource_id=stored.message.id,
            details={"kind": stored.kind, "is_public": content.is_public},
        )
        return pb.CreateReferenceContentResponse(content=stored.message)

    async def UploadReferenceMedia(
        self,
        request: pb.UploadReferenceMediaRequest,
        context: UnaryContext[pb.UploadReferenceMediaRequest, pb.UploadReferenceMediaResponse],
    ) -> pb.UploadReferenceMediaResponse:
        person = require_principal()
        violations = Violations()
        _required(violations, request.content_id, "content_id")
        if not request.HasField("file"):
            violations.add("file", "required: the media as the request body, with its Content-Type")
        violations.raise_if_any()
        if not contents.may_create(person):
            raise PermissionDenied(
                "teachers and admins upload reference media",
                reason=ErrorReason.ERROR_REASON_ROLE_NOT_ALLOWED,
                metadata={"role": person.role},
            )
        current = await self._changeable_content(person, request.content_id)
        extension = contents.check_media(current.kind, request.file.content_type, len(request.file.data))
        facts = current.facts
        upload_id = uuid.uuid4().hex
        key = contents.media_key(facts.zone_id, facts.org_id, current.message.id, upload_id, extension)
        content_type = contents.media_type(request.file.content_type)
        await self._media.put(key, request.file.data)
        try:
            change = await self._store.set_media(
                _row_scope(facts.zone_id, facts.org_id),
                current.message.id,
                upload_id=upload_id,
                media_uri=key,
                content_type=content_type,
            )
        except BaseException:
            await self._delete_media([key])
            raise
        if change is None:  # deleted while uploading
            await self._delete_media([key])
            raise NotFound("no such reference", metadata={"content_id": request.content_id[:64]})
        await self._delete_media(change.stale_keys)
        await self._audit.record(
            "upload",
            "success",
            resource_type="reference_content",
            resource_id=current.message.id,
            details={"content_type": content_type, "bytes": len(request.file.data)},
        )
        return pb.UploadReferenceMediaResponse(content=change.content.message)

    async def GetReferenceContent(
        self,
        request: pb.GetReferenceContentRequest,
        context: UnaryContext[pb.GetReferenceContentRequest, pb.GetReferenceContentResponse],
    ) -> pb.GetReferenceContentResponse:
        stored = await self._readable_content(require_principal(), request.content_id)
        return pb.GetReferenceContentResponse(content=stored.message)

    async def ListReferenceContents(
        self,
        request: pb.ListReferenceContentsRequest,
        context: UnaryContext[pb.ListReferenceContentsRequest, pb.ListReferenceContentsResponse],
    ) -> pb.ListReferenceContentsResponse:
        person = require_principal()
        violations = Violations()
        kind = contents.KINDS.get(request.kind)
        violations.check(request.kind == 0 or kind is not None, "kind", "a known kind (or unset)")
        status = contents.STATUSES.get(request.status)
        violations.check(request.status == 0 or status is not None, "status", "a known status (or unset)")
        violations.check(len(request.query) <= contents.MAX_QUERY, "query", f"at most {contents.MAX_QUERY} characters")
        violations.check(len(request.language) <= 35, "language", "a BCP-47 language tag")
        violations.raise_if_any("a filter is invalid")
        limit = paging.page_size(request.page_size, MAX_PAGE)
        query: list[object] = ["contents", kind or "", status or "", request.query, request.language.lower()]
        found = await self._store.contents(
            _reading_scope(person),
            contents.listing(person),
            kind=kind,
            status=status,
            query=request.query,
            language=request.language.strip(),
            before=_position(request.page_token, query),
            limit=limit + 1,
        )
        next_token = ""
        if len(found) > limit:
            last = found[limit - 1].message
            next_token = paging.encode([last.create_time.ToDatetime(UTC).isoformat(), last.id], query)
        return pb.ListReferenceContentsResponse(
            contents=[stored.message for stored in found[:limit]], next_page_token=next_token
        )

    async def UpdateReferenceContent(
        self,
        request: pb.UpdateReferenceContentRequest,
        context: UnaryContext[pb.UpdateReferenceContentRequest, pb.UpdateReferenceContentResponse],
    ) -> pb.UpdateReferenceContentResponse:
        person = require_principal()
        violations = Violations()
        _required(violations, request.content_id, "content_id")
        violations.check(request.HasField("content"), "content", "required: the new values")
        violations.raise_if_any()
        current = await self._changeable_content(person, request.content_id)
        paths = contents.update_paths(current.message, request.content, list(request.update_mask.paths))
        if not paths:
            return pb.UpdateReferenceContentResponse(content=current.message)
        updated = contents.merged(current.message, request.content, paths)
        violations = Violations()
        contents.check_content(violations, updated)
        violations.raise_if_any("the reference is invalid")
        columns = content_columns(contents.normalized(updated))
        changes = {CONTENT_UPDATE_COLUMNS[path]: columns[CONTENT_UPDATE_COLUMNS[path]] for path in paths}
        facts = current.facts
        stored = await self._store.update_content(_row_scope(facts.zone_id, facts.org_id), current.message.id, changes)
        await self._audit.record(
            "update",
            "success",
            resource_type="reference_content",
            resource_id=current.message.id,
            details={"fields": paths},
        )
        return pb.UpdateReferenceContentResponse(content=stored.message)

    async def DeleteReferenceContent(
        self,
        request: pb.DeleteReferenceContentRequest,
        context: UnaryContext[pb.DeleteReferenceContentRequest, pb.DeleteReferenceContentResponse],
    ) -> pb.DeleteReferenceContentResponse:
        """NOT_FOUND once deleted (a retry changes nothing more); stored results keep their reports."""
        person = require_principal()
        current = await self._changeable_content(person, request.content_id)
        facts = current.facts
        deleted = await self._store.delete_content(_row_scope(facts.zone_id, facts.org_id), current.message.id)
        await self._delete_media(deleted.media_keys())
        await self._audit.record("delete", "success", resource_type="reference_content", resource_id=current.message.id)
        return pb.DeleteReferenceContentResponse()

    async def GetReferenceFeatures(
        self,
        request: pb.GetReferenceFeaturesRequest,
        context: UnaryContext[pb.GetReferenceFeaturesRequest, pb.GetReferenceFeaturesResponse],
    ) -> pb.GetReferenceFeaturesResponse:
        person = require_principal()
        stored = await self._readable_content(person, request.content_id)
        features = None
        if stored.facts.status == contents.READY:
            facts = stored.facts
            features = await self._store.features(_row_scope(facts.zone_id, facts.org_id), stored.message.id)
        if features is None:
            raise FailedPrecondition(
                "the reference's features are not extracted: it is not READY",
                reason=ErrorReason.ERROR_REASON_REFERENCE_NOT_READY,
                metadata={"status": res.ReferenceStatus.Name(stored.message.status)},
            )
        return pb.GetReferenceFeaturesResponse(features=features)

    async def _delete_media(self, keys: list[str]) -> None:
        """Media of rows already gone: a failure leaves an orphaned object (logged), never a changed answer."""
        for key in keys:
            try:
                await self._media.delete(key)
            except (OSError, ValueError) as error:
                _log.error("kzone.media_delete_failed", key=key, error=str(error))

    # --- voice analysis (services/kzone/voice.py) ------------------------------------------------------------

    async def AnalyzeVoice(
        self,
        request_iterator: AsyncIterator[pb.AnalyzeVoiceRequest],
        context: StreamingContext[AsyncIterator[pb.AnalyzeVoiceRequest], pb.AnalyzeVoiceResponse],
    ) -> AsyncIterator[pb.AnalyzeVoiceResponse]:
        person = require_principal()
        async for response in self.voice.stream(person, request_iterator):
            yield response

    async def AnalyzeVoiceFile(
        self,
        request: pb.AnalyzeVoiceFileRequest,
        context: UnaryContext[pb.AnalyzeVoiceFileRequest, pb.AnalyzeVoiceFileResponse],
    ) -> pb.AnalyzeVoiceFileResponse:
        person = require_principal()
        return pb.AnalyzeVoiceFileResponse(result=await self.voice.upload(person, request))

    # --- dance analysis (services/kzone/dance.py) ------------------------------------------------------------

    async def AnalyzeDance(
        self,
        request_iterator: AsyncIterator[pb.AnalyzeDanceRequest],
        context: StreamingContext[AsyncIterator[pb.AnalyzeDanceRequest], pb.AnalyzeDanceResponse],
    ) -> AsyncIterator[pb.AnalyzeDanceResponse]:
        async for response in self.dance.analyze(request_iterator, context):
            yield response

    async def DetectDancePose(
        self,
        request: pb.DetectDancePoseRequest,
        context: UnaryContext[pb.DetectDancePoseRequest, pb.DetectDancePoseResponse],
    ) -> pb.DetectDancePoseResponse:
        return await self.dance.detect(request)

    # --- stored results --------------------------------------------------------------------------------------

    async def _approved_parent(self, parent: AccessClaims, student_id: str) -> bool:
        auth = auth_service_pb2_grpc.AuthServiceStub(self._channels.channel("auth"))
        check = auth_service_pb2.CheckParentLinkRequest(parent_id=parent.user_id, student_id=student_id)
        return bool((await auth.CheckParentLink(check)).approved)

    async def _readable_result(self, person: AccessClaims, result_id: str) -> StoredResult:
        violations = Violations()
        _required(violations, result_id, "result_id")
        violations.raise_if_any()
        stored = await self._store.result(_reading_scope(person), result_id)
        approved = results.needs_parent_check(person, stored.facts) and await self._approved_parent(
            person, stored.facts.user_id
        )
        if not results.may_read(person, stored.facts, approved_parent=approved):
            raise NotFound("no such result", metadata={"result_id": result_id[:64]})
        return stored

    async def GetAnalysisResult(
        self,
        request: pb.GetAnalysisResultRequest,
        context: UnaryContext[pb.GetAnalysisResultRequest, pb.GetAnalysisResultResponse],
    ) -> pb.GetAnalysisResultResponse:
        stored = await self._readable_result(require_principal(), request.result_id)
        return pb.GetAnalysisResultResponse(result=stored.message)

    async def ListAnalysisResults(
        self,
        request: pb.ListAnalysisResultsRequest,
        context: UnaryContext[pb.ListAnalysisResultsRequest, pb.ListAnalysisResultsResponse],
    ) -> pb.ListAnalysisResultsResponse:
        person = require_principal()
        kind = results.KINDS.get(request.kind)
        if request.kind and kind is None:
            raise InvalidArgument("a filter is invalid", [("kind", "a known kind (or unset)")])
        visible = results.listing(person, request.user_id)
        if visible.parent_of is not None and not await self._approved_parent(person, visible.parent_of):
            raise PermissionDenied(
                "parents read the results of an approved child only",
                reason=ErrorReason.ERROR_REASON_PARENT_LINK_NOT_APPROVED,
            )
        if visible.platform:
            scope = TenantScope.platform()
        elif visible.org_id is not None:
            scope = TenantScope.org(person.zone_id, visible.org_id)
        else:
            scope = TenantScope.zone(person.zone_id)
        limit = paging.page_size(request.page_size, MAX_PAGE)
        query: list[object] = ["results", kind or "", request.reference_id, visible.user_id or "", visible.org_id or ""]
        found = await self._store.results(
            scope,
            user_id=visible.user_id,
            org_id=visible.org_id,
            kind=kind,
            reference_id=request.reference_id,
            before=_position(request.page_token, query),
            limit=limit + 1,
        )
        next_token = ""
        if len(found) > limit:
            last = found[limit - 1]
            next_token = paging.encode([last.create_time.ToDatetime(UTC).isoformat(), last.id], query)
        return pb.ListAnalysisResultsResponse(results=found[:limit], next_page_token=next_token)

    async def DeleteAnalysisResult(
        self,
        request: pb.DeleteAnalysisResultRequest,
        context: UnaryContext[pb.DeleteAnalysisResultRequest, pb.DeleteAnalysisResultResponse],
    ) -> pb.DeleteAnalysisResultResponse:
        person = require_principal()
        current = await self._readable_result(person, request.result_id)
        if not results.may_delete(person, current.facts):
            raise PermissionDenied(
                "results are deleted by their learner and the organisation's or zone's admins",
                reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE,
            )
        facts = current.facts
        deleted = await self._store.delete_result(_row_scope(facts.zone_id, facts.org_id), current.message.id)
        await self._delete_media(deleted.media_keys())
        await self._audit.record("delete", "success", resource_type="analysis_result", resource_id=current.message.id)
        return pb.DeleteAnalysisResultResponse()


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    if deps.database is None:
        raise RuntimeError("the kzone service needs PostgreSQL (MEGACITY_DATABASE_URL)")
    store, media = KZoneStore(deps.database), MediaStore.from_environment()
    servicer = KZoneServicer(
        store,
        media,
        deps.audit,
        deps.channels,
        VoiceAnalysis(store, media, deps.channels),
        DanceService(store, media, deps.channels),
    )
    # The extraction workers make uploaded references READY (services/kzone/extraction.py).
    extraction = ExtractionSettings.from_environment()
    for _ in range(extraction.workers):
        deps.background.append(ExtractionWorker(store, media, deps.channels, extraction).run)
    return [ServicerBinding(kzone_service_pb2_grpc.add_KZoneServiceServicer_to_server, servicer)]
