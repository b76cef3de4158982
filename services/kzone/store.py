"""The kzone service's SQL (schema `kzone`, db/kzone/): reference content and stored analysis results.

Both tables are tenant-owned; each method runs in the tenant scope its caller decided (services/kzone/server.py),
except the extraction worker's (`claim_extraction`, `renew_claim`, `release_claim`, `extraction_current`,
`finish_processing`, `fail_processing`), which act for no person in the platform scope and name the extraction they
work on (services/kzone/extraction.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from google.protobuf import json_format

from megacity.kzone.v1 import resources_pb2 as res
from services.kzone import contents as rules
from services.kzone import results as result_rules
from services.runtime.database import TenantScope, tenant_transaction
from services.runtime.errors import NotFound
from services.runtime.rows import json_column, message_json, set_times

_CONTENT_COLUMNS = """
    content_id, zone_id, org_id, kind, title, artist, description, language, lyrics, is_public, status,
    processing_error, processing_job_id, media_uri, media_content_type, tempo_bpm, beats_per_bar,
    first_downbeat_seconds, duration_seconds, detected_tempo_bpm, detected_first_downbeat_seconds, creator_id,
    create_time, update_time, features ->> 'keypoints_uri' AS keypoints_uri
"""
_RESULT_COLUMNS = """
    result_id, zone_id, org_id, user_id, kind, source, reference_id, input_media_uri, job_id, report, create_time
"""
# Columns an update writes, by the ReferenceContent field that holds them.
CONTENT_UPDATE_COLUMNS = {
    "title": "title",
    "artist": "artist",
    "description": "description",
    "language": "language",
    "lyrics": "lyrics",
    "is_public": "is_public",
    "tempo_bpm": "tempo_bpm",
    "beats_per_bar": "beats_per_bar",
    "first_downbeat_offset": "first_downbeat_seconds",
}
# A page resumes after (create_time, id) of the last row served.
Position = tuple[datetime, str]
# A reference whose extraction killed this many workers (claimed, then its heartbeat stopped) fails rather than
# being claimed again: it is likely what kills them.
MAX_CLAIMS = 3


@dataclass(frozen=True)
class Owner:
    zone_id: str
    org_id: str
    user_id: str


@dataclass(frozen=True)
class StoredContent:
    """A reference as stored: its message, what the access rules need, and the key of its extracted keypoints."""

    message: res.ReferenceContent
    facts: rules.ContentFacts
    kind: str
    keypoints_uri: str

    def media_keys(self) -> list[str]:
        """The objects the reference keeps: its media and its extracted keypoints."""
        return [key for key in (self.message.media_uri, self.keypoints_uri) if key]


@dataclass(frozen=True)
class StoredResult:
    message: res.AnalysisResult
    facts: result_rules.ResultFacts

    def media_keys(self) -> list[str]:
        """The objects the result keeps: the learner's recording or video, and a dance's keypoints."""
        keys = [self.message.input_media_uri, self.message.dance.keypoints_uri]
        return [key for key in keys if key]


@dataclass(frozen=True)
class MediaChange:
    """What an upload did: the reference after it, and the objects of the previous media that no row names now."""

    content: StoredContent
    stale_keys: list[str]


@dataclass(frozen=True)
class ClaimedExtraction:
    """A PROCESSING reference an extraction worker holds: only the holder of `claim_id` renews, finishes or fails it.
    `job_id` is the extraction (the upload) it works on; tempo and downbeat are the creator's (0 and None: not
    given), never detected ones."""

    content_id: str
    claim_id: str
    job_id: str
    zone_id: str
    org_id: str
    kind: str
    media_uri: str
    media_content_type: str
    language: str
    lyrics: str
    tempo_bpm: float
    beats_per_bar: int
    first_downbeat_seconds: float | None
    claims: int


def content_columns(content: res.ReferenceContent) -> dict[str, object]:
    """The stored columns of a reference's written fields."""
    return {
        "title": content.title,
        "artist": content.artist,
        "description": content.description,
        "language": content.language,
        "lyrics": content.lyrics,
        "is_public": content.is_public,
        "tempo_bpm": content.tempo_bpm,
        "beats_per_bar": content.beats_per_bar or 4,
        "first_downbeat_seconds": (
            rules.duration_seconds(content.first_downbeat_offset) if content.HasField("first_downbeat_offset") else None
        ),
    }


def _content(row: asyncpg.Record) -> StoredContent:
    message = res.ReferenceContent(
        id=row["content_id"],
        zone_id=row["zone_id"],
        org_id=row["org_id"],
        kind=rules.KIND_VALUES[row["kind"]],
        title=row["title"],
        artist=row["artist"],
        description=row["description"],
        language=row["language"],
        lyrics=row["lyrics"],
        is_public=row["is_public"],
        status=rules.STATUS_VALUES[row["status"]],
        processing_error=row["processing_error"],
        media_uri=row["media_uri"],
        media_content_type=row["media_content_type"],
        tempo_bpm=row["tempo_bpm"] or row["detected_tempo_bpm"],
        beats_per_bar=row["beats_per_bar"],
        processing_job_id=row["processing_job_id"],
        creator_id=row["creator_id"],
    )
    if row["duration_seconds"] > 0:
        message.duration.CopyFrom(rules.seconds_duration(row["duration_seconds"]))
    downbeat = row["first_downbeat_seconds"]
    if downbeat is None:
        downbeat = row["detected_first_downbeat_seconds"]
    if downbeat is not None:
        message.first_downbeat_offset.CopyFrom(rules.seconds_duration(downbeat))
    set_times(message, row, ("create_time", "update_time"))
    facts = rules.ContentFacts(
        zone_id=row["zone_id"],
        org_id=row["org_id"],
        creator_id=row["creator_id"],
        is_public=row["is_public"],
        status=row["status"],
    )
    return StoredContent(message=message, facts=facts, kind=row["kind"], keypoints_uri=row["keypoints_uri"] or "")


def _result(row: asyncpg.Record) -> StoredResult:
    message = res.AnalysisResult(
        id=row["result_id"],
        zone_id=row["zone_id"],
        org_id=row["org_id"],
        user_id=row["user_id"],
        source=result_rules.SOURCE_VALUES[row["source"]],
        reference_id=row["reference_id"],
        input_media_uri=row["input_media_uri"],
        job_id=row["job_id"],
    )
    report = message.voice if row["kind"] == "voice" else message.dance
    json_format.ParseDict(json_column(row["report"]), report, ignore_unknown_fields=True)
    report.SetInParent()  # an empty report still says which kind it is
    set_times(message, row, ("create_time",))
    return StoredResult(
        message=message,
        facts=result_rules.ResultFacts(zone_id=row["zone_id"], org_id=row["org_id"], user_id=row["user_id"]),
    )


class _Query:
    """Conditions with their numbered parameters."""

    def __init__(self) -> None:
        self.arguments: list[object] = []
        self.conditions: list[str] = []

    def bind(self, value: object) -> str:
        self.arguments.append(value)
        return f"${len(self.arguments)}"

    def where(self) -> str:
        return " AND ".join(self.conditions) or "true"


class KZoneStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # --- reference content -------------------------------------------------------------------------------------

    async def create_content(self, owner: Owner, kind: str, content: res.ReferenceContent) -> StoredContent:
        """A new reference (AWAITING_MEDIA) of the owner's organisation; `content` is validated and normalized."""
        columns = content_columns(content)
        async with tenant_transaction(self._pool, TenantScope.org(owner.zone_id, owner.org_id)) as connection:
            row = await connection.fetchrow(
                "INSERT INTO kzone_contents (content_id, zone_id, org_id, creator_id, kind, "
                f"{', '.join(columns)}) VALUES ($1, $2, $3, $4, $5, "
                f"{', '.join(f'${index}' for index in range(6, 6 + len(columns)))}) RETURNING {_CONTENT_COLUMNS}",
                uuid.uuid4().hex,
                owner.zone_id,
                owner.org_id,
                owner.user_id,
                kind,
                *columns.values(),
            )
        assert row is not None
        return _content(row)

    async def content(self, scope: TenantScope, content_id: str) -> StoredContent:
        """A reference in `scope` (NOT_FOUND outside it); the access rules decide the rest."""
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(
                f"SELECT {_CONTENT_COLUMNS} FROM kzone_contents WHERE content_id = $1", content_id
            )
        if row is None:
            raise NotFound("no such reference", metadata={"content_id": content_id[:64]})
        return _content(row)

    async def features(self, scope: TenantScope, content_id: str) -> res.ReferenceFeatures | None:
        """A READY reference's features (None when it has none)."""
        async with tenant_transaction(self._pool, scope) as connection:
            raw = await connection.fetchval("SELECT features FROM kzone_contents WHERE content_id = $1", content_id)
        if raw is None:
            return None
        features = res.ReferenceFeatures()
        json_format.ParseDict(json_column(raw), features, ignore_unknown_fields=True)
        features.content_id = content_id
        return features

    async def contents(
        self,
        scope: TenantScope,
        visible: rules.Listing,
        *,
        kind: str | None,
        status: str | None,
        query: str,
        language: str,
        before: Position | None,
        limit: int,
    ) -> list[StoredContent]:
        """References in `scope` that `visible` allows, newest first."""
        sql = _Query()
        if not visible.everything:
            own = f"org_id = {sql.bind(visible.org_id)}"
            if not visible.own_any_status:
                own += " AND status = 'ready'"
            sql.conditions.append(f"(({own}) OR (is_public AND status = 'ready'))")
        if kind is not None:
            sql.conditions.append(f"kind = {sql.bind(kind)}")
        if status is not None:
            sql.conditions.append(f"status = {sql.bind(status)}")
        if query:
            needle = sql.bind(query.lower())
            sql.conditions.append(f"(strpos(lower(title), {needle}) > 0 OR strpos(lower(artist), {needle}) > 0)")
        if language:
            sql.conditions.append(f"lower(language) = {sql.bind(language.lower())}")
        if before is not None:
            sql.conditions.append(f"(create_time, content_id) < ({sql.bind(before[0])}, {sql.bind(before[1])})")
        async with tenant_transaction(self._pool, scope) as connection:
            rows = await connection.fetch(
                f"SELECT {_CONTENT_COLUMNS} FROM kzone_contents WHERE {sql.where()} "
                f"ORDER BY create_time DESC, content_id DESC LIMIT {sql.bind(limit)}",
                *sql.arguments,
            )
        return [_content(row) for row in rows]

    async def update_content(self, scope: TenantScope, content_id: str, changes: Mapping[str, object]) -> StoredContent:
        """Writes the changed columns only, so concurrent updates of other fields are kept."""
        assert set(CONTENT_UPDATE_COLUMNS.values()).issuperset(changes), "not an updatable column"
        assignments = "".join(f", {column} = ${index}" for index, column in enumerate(changes, start=2))
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(
                f"UPDATE kzone_contents SET update_time = now(){assignments} WHERE content_id = $1 "
                f"RETURNING {_CONTENT_COLUMNS}",
                content_id,
                *changes.values(),
            )
        if row is None:
            raise NotFound("no such reference", metadata={"content_id": content_id[:64]})
        return _content(row)

    async def set_media(
        self, scope: TenantScope, content_id: str, *, upload_id: str, media_uri: str, content_type: str
    ) -> MediaChange | None:
        """Points the reference at newly stored media and queues its extraction: PROCESSING with the upload's id as
        its extraction id, features, detected values and claims forgotten. None when the reference is gone."""
        async with tenant_transaction(self._pool, scope) as connection:
            previous = await connection.fetchrow(
                "SELECT media_uri, features ->> 'keypoints_uri' AS keypoints_uri FROM kzone_contents "
                "WHERE content_id = $1 FOR UPDATE",
                content_id,
            )
            if previous is None:
                return None
            row = await connection.fetchrow(
                "UPDATE kzone_contents SET status = 'processing', processing_error = '', processing_job_id = $2, "
                "media_uri = $3, media_content_type = $4, features = NULL, duration_seconds = 0, "
                "detected_tempo_bpm = 0, detected_first_downbeat_seconds = NULL, claim_id = NULL, claims = 0, "
                "heartbeat_time = NULL, update_time = now() "
                f"WHERE content_id = $1 RETURNING {_CONTENT_COLUMNS}",
                content_id,
                upload_id,
                media_uri,
                content_type,
            )
        assert row is not None  # locked above
        stale = [key for key in (previous["media_uri"], previous["keypoints_uri"]) if key and key != media_uri]
        return MediaChange(_content(row), stale)

    async def delete_content(self, scope: TenantScope, content_id: str) -> StoredContent:
        """Deletes the row; the caller deletes its media (StoredContent.media_keys) after it."""
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(
                f"DELETE FROM kzone_contents WHERE content_id = $1 RETURNING {_CONTENT_COLUMNS}", content_id
            )
        if row is None:
            raise NotFound("no such reference", metadata={"content_id": content_id[:64]})
        return _content(row)

    async def finish_processing(
        self,
        content_id: str,
        features: res.ReferenceFeatures,
        *,
        job_id: str,
        duration_seconds: float,
        tempo_bpm: float = 0.0,
        first_downbeat_seconds: float | None = None,
        claim_id: str | None = None,
    ) -> bool:
        """The extraction worker's success: the reference becomes READY with its features and what was detected.
        False (nothing written) when the reference is gone or its media was replaced since `job_id` started, or,
        given a `claim_id`, when that claim no longer holds it (another worker took it over)."""
        stored = res.ReferenceFeatures()
        stored.CopyFrom(features)
        stored.content_id = ""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            done = await connection.execute(
                "UPDATE kzone_contents SET status = 'ready', features = $3, duration_seconds = $4, "
                "detected_tempo_bpm = $5, detected_first_downbeat_seconds = $6, claim_id = NULL, "
                "heartbeat_time = NULL, update_time = now() "
                "WHERE content_id = $1 AND processing_job_id = $2 AND status = 'processing' "
                "AND ($7::text IS NULL OR claim_id = $7)",
                content_id,
                job_id,
                message_json(stored),
                duration_seconds,
                tempo_bpm,
                first_downbeat_seconds,
                claim_id,
            )
        return bool(done == "UPDATE 1")

    async def fail_processing(self, content_id: str, *, job_id: str, error: str, claim_id: str | None = None) -> bool:
        """The extraction worker's failure: FAILED with a reason for people (upload the media again). False as for
        finish_processing."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            done = await connection.execute(
                "UPDATE kzone_contents SET status = 'failed', processing_error = $3, claim_id = NULL, "
                "heartbeat_time = NULL, update_time = now() "
                "WHERE content_id = $1 AND processing_job_id = $2 AND status = 'processing' "
                "AND ($4::text IS NULL OR claim_id = $4)",
                content_id,
                job_id,
                error[:1000] or "extraction failed",
                claim_id,
            )
        return bool(done == "UPDATE 1")

    # --- the extraction workers' claims ----------------------------------------------------------------------------

    async def claim_extraction(
        self, stale_after_seconds: float, max_claims: int = MAX_CLAIMS
    ) -> ClaimedExtraction | None:
        """Takes the PROCESSING reference of any tenant that waited longest and that no worker holds, or whose worker
        has not renewed its heartbeat for `stale_after_seconds` (it died); None when there is none. Row locks skipped
        by concurrent claims keep two workers from ever taking the same one. First, references whose extraction was
        claimed `max_claims` times and went stale again fail: they are likely what kills their workers."""
        claim_id = uuid.uuid4().hex
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            await connection.execute(
                "UPDATE kzone_contents SET status = 'failed', claim_id = NULL, heartbeat_time = NULL, "
                "update_time = now(), processing_error = 'extraction given up: the worker running it stopped ' "
                "|| claims || ' times without finishing; upload the media again' "
                "WHERE status = 'processing' AND claim_id IS NOT NULL "
                "AND heartbeat_time < now() - make_interval(secs => $1) AND claims >= $2",
                stale_after_seconds,
                max_claims,
            )
            row = await connection.fetchrow(
                "UPDATE kzone_contents c SET claim_id = $3, claims = c.claims + 1, heartbeat_time = now() "
                "FROM (SELECT content_id FROM kzone_contents WHERE status = 'processing' AND (claim_id IS NULL "
                "OR (heartbeat_time < now() - make_interval(secs => $1) AND claims < $2)) "
                "ORDER BY update_time, content_id LIMIT 1 FOR UPDATE SKIP LOCKED) next "
                "WHERE c.content_id = next.content_id RETURNING c.content_id, c.processing_job_id, c.zone_id, "
                "c.org_id, c.kind, c.media_uri, c.media_content_type, c.language, c.lyrics, c.tempo_bpm, "
                "c.beats_per_bar, c.first_downbeat_seconds, c.claims",
                stale_after_seconds,
                max_claims,
                claim_id,
            )
        if row is None:
            return None
        return ClaimedExtraction(
            content_id=row["content_id"],
            claim_id=claim_id,
            job_id=row["processing_job_id"],
            zone_id=row["zone_id"],
            org_id=row["org_id"],
            kind=row["kind"],
            media_uri=row["media_uri"],
            media_content_type=row["media_content_type"],
            language=row["language"],
            lyrics=row["lyrics"],
            tempo_bpm=row["tempo_bpm"],
            beats_per_bar=row["beats_per_bar"],
            first_downbeat_seconds=row["first_downbeat_seconds"],
            claims=row["claims"],
        )

    async def renew_claim(self, claim: ClaimedExtraction) -> bool:
        """The worker is alive: renews the heartbeat. False when the claim no longer holds the reference (taken
        over, its media replaced, deleted, or finished)."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            done = await connection.execute(
                "UPDATE kzone_contents SET heartbeat_time = now() "
                "WHERE content_id = $1 AND claim_id = $2 AND processing_job_id = $3 AND status = 'processing'",
                claim.content_id,
                claim.claim_id,
                claim.job_id,
            )
        return bool(done == "UPDATE 1")

    async def release_claim(self, claim: ClaimedExtraction) -> None:
        """Hands the reference back to the queue (its worker is stopping), without counting the claim against it."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            await connection.execute(
                "UPDATE kzone_contents SET claim_id = NULL, claims = greatest(claims - 1, 0), heartbeat_time = NULL "
                "WHERE content_id = $1 AND claim_id = $2 AND status = 'processing'",
                claim.content_id,
                claim.claim_id,
            )

    async def extraction_current(self, content_id: str, job_id: str) -> bool:
        """Whether the reference still exists with `job_id` as its extraction (whatever its status): when it does
        not, nothing will ever use what that extraction wrote."""
        async with tenant_transaction(self._pool, TenantScope.platform()) as connection:
            found = await connection.fetchval(
                "SELECT true FROM kzone_contents WHERE content_id = $1 AND processing_job_id = $2", content_id, job_id
            )
        return bool(found)

    # --- stored results ----------------------------------------------------------------------------------------

    async def add_result(
        self,
        owner: Owner,
        report: res.VoiceReport | res.DanceReport,
        *,
        source: str,
        reference_id: str = "",
        input_media_uri: str = "",
        job_id: str = "",
    ) -> res.AnalysisResult:
        """Stores the final report of an analysis of `owner`'s (the learner's) input: a live stream, an upload or a
        job (`source`: live, upload, job). The input is kept in media storage under `input_media_uri`."""
        assert source in result_rules.SOURCE_VALUES, f"not a source: {source}"
        kind = "voice" if isinstance(report, res.VoiceReport) else "dance"
        overall = report.scores.overall if report.scores.HasField("overall") else None
        async with tenant_transaction(self._pool, TenantScope.org(owner.zone_id, owner.org_id)) as connection:
            row = await connection.fetchrow(
                "INSERT INTO kzone_ai_results (result_id, zone_id, org_id, user_id, kind, source, reference_id, "
                "input_media_uri, job_id, overall_score, report) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
                f"$11) RETURNING {_RESULT_COLUMNS}",
                uuid.uuid4().hex,
                owner.zone_id,
                owner.org_id,
                owner.user_id,
                kind,
                source,
                reference_id,
                input_media_uri,
                job_id,
                overall,
                message_json(report),
            )
        assert row is not None
        return _result(row).message

    async def result(self, scope: TenantScope, result_id: str) -> StoredResult:
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(
                f"SELECT {_RESULT_COLUMNS} FROM kzone_ai_results WHERE result_id = $1", result_id
            )
        if row is None:
            raise NotFound("no such result", metadata={"result_id": result_id[:64]})
        return _result(row)

    async def results(
        self,
        scope: TenantScope,
        *,
        user_id: str | None,
        org_id: str | None,
        kind: str | None,
        reference_id: str,
        before: Position | None,
        limit: int,
    ) -> list[res.AnalysisResult]:
        """Results in `scope`, narrowed to one learner and/or one organisation, newest first."""
        sql = _Query()
        for column, value in (("user_id", user_id), ("org_id", org_id), ("kind", kind)):
            if value is not None:
                sql.conditions.append(f"{column} = {sql.bind(value)}")
        if reference_id:
            sql.conditions.append(f"reference_id = {sql.bind(reference_id)}")
        if before is not None:
            sql.conditions.append(f"(create_time, result_id) < ({sql.bind(before[0])}, {sql.bind(before[1])})")
        async with tenant_transaction(self._pool, scope) as connection:
            rows = await connection.fetch(
                f"SELECT {_RESULT_COLUMNS} FROM kzone_ai_results WHERE {sql.where()} "
                f"ORDER BY create_time DESC, result_id DESC LIMIT {sql.bind(limit)}",
                *sql.arguments,
            )
        return [_result(row).message for row in rows]

    async def delete_result(self, scope: TenantScope, result_id: str) -> StoredResult:
        """Deletes the row; the caller deletes its media (StoredResult.media_keys) after it."""
        async with tenant_transaction(self._pool, scope) as connection:
            row = await connection.fetchrow(
                f"DELETE FROM kzone_ai_results WHERE result_id = $1 RETURNING {_RESULT_COLUMNS}", result_id
            )
        if row is None:
            raise NotFound("no such result", metadata={"result_id": result_id[:64]})
        return _result(row)
