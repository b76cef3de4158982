"""Reference content through gRPC over mTLS, as the edge calls the kzone service: a teacher creates a song,
uploads its audio, lists, changes and deletes it; learners see READY ones of their organisation and the zone's
public ones; the extraction worker's store call (finish_processing) makes one READY and its features readable.
Who may do what, and every bad input with its field violations."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.api import httpbody_pb2
from google.protobuf import duration_pb2, field_mask_pb2

from megacity.auth.v1 import auth_service_pb2 as auth_pb
from megacity.kzone.v1 import kzone_service_pb2 as pb
from megacity.kzone.v1 import kzone_service_pb2_grpc
from megacity.kzone.v1 import resources_pb2 as res
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2 as tenant_pb
from ops.embedded import EmbeddedRedis
from services.kzone import contents
from services.kzone.store import KZoneStore
from services.runtime.database import create_pool
from services.runtime.errors import field_violations, status_from_error
from tests.support.accounts import Caller, People, reason
from tests.support.kzone import isolated_kzone
from tests.support.mesh import channel_as, make_config, mesh_catalog, running

ZONE = "kzone"


@dataclass
class KZone:
    """The kzone service as the edge calls it, its store (for what the workers will do) and its media directory."""

    api: kzone_service_pb2_grpc.KZoneServiceStub
    store: KZoneStore
    media_dir: Path


@pytest.fixture
async def kzone(
    people: People,
    identity_database: dict[str, str],
    redis: EmbeddedRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[KZone]:
    media_dir = isolated_kzone(monkeypatch, tmp_path)
    config = make_config(
        mesh_catalog(), "kzone", people.pki_dir, database_url=identity_database["kzone"], redis_url=redis.url
    )
    pool = await create_pool(identity_database["kzone"], schema="kzone", max_size=2)
    try:
        async with running(config) as service, channel_as("edge", service, people.pki_dir) as channel:
            yield KZone(kzone_service_pb2_grpc.KZoneServiceStub(channel), KZoneStore(pool), media_dir)
    finally:
        await pool.close()


async def new_org(people: People, admin: Caller) -> str:
    org = await people.tenant.CreateOrganization(
        tenant_pb.CreateOrganizationRequest(
            organization=tenant_resources.Organization(name=f"Studio {uuid.uuid4().hex[:8]}")
        ),
        metadata=admin.metadata(),
    )
    return org.organization.id


def violated(error: grpc.aio.AioRpcError) -> set[str]:
    return {field for field, _ in field_violations(status_from_error(error))}


def wav(size: int = 64) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type="audio/wav", data=b"RIFF" + bytes(size - 4))


async def _create(kzone: KZone, caller: Caller, **fields: object) -> res.ReferenceContent:
    fields.setdefault("kind", res.REFERENCE_KIND_SONG)
    reply = await kzone.api.CreateReferenceContent(
        pb.CreateReferenceContentRequest(content=res.ReferenceContent(**fields)),  # type: ignore[arg-type]
        metadata=caller.metadata(),
    )
    return reply.content


async def _get(kzone: KZone, caller: Caller, content_id: str) -> res.ReferenceContent:
    reply = await kzone.api.GetReferenceContent(
        pb.GetReferenceContentRequest(content_id=content_id), metadata=caller.metadata()
    )
    return reply.content


async def _ids(kzone: KZone, caller: Caller, **filters: object) -> list[str]:
    reply = await kzone.api.ListReferenceContents(
        pb.ListReferenceContentsRequest(**filters),  # type: ignore[arg-type]
        metadata=caller.metadata(),
    )
    return [content.id for content in reply.contents]


async def _refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    return refused.value


@dataclass
class Cast:
    org_a: str
    org_b: str
    teacher: Caller  # creates the references, of org A
    colleague: Caller  # another teacher of org A
    org_admin: Caller  # of org A
    student: Caller  # of org A
    outsider: Caller  # a teacher of org B
    outside_student: Caller  # of org B
    zone_admin: Caller


@pytest.fixture
async def cast(people: People) -> Cast:
    zone_admin = await people.as_new_user(ZONE, "kzone-public", "zone_admin")
    org_a, org_b = await new_org(people, zone_admin), await new_org(people, zone_admin)
    return Cast(
        org_a=org_a,
        org_b=org_b,
        teacher=await people.as_new_user(ZONE, org_a, "teacher"),
        colleague=await people.as_new_user(ZONE, org_a, "teacher"),
        org_admin=await people.as_new_user(ZONE, org_a, "org_admin"),
        student=await people.as_new_user(ZONE, org_a, "student"),
        outsider=await people.as_new_user(ZONE, org_b, "teacher"),
        outside_student=await people.as_new_user(ZONE, org_b, "student"),
        zone_admin=zone_admin,
    )


async def test_a_song_from_creation_through_media_features_and_deletion(
    kzone: KZone, cast: Cast, people: People
) -> None:
    teacher = cast.teacher
    downbeat = duration_pb2.Duration(seconds=0)
    song = await _create(
        kzone,
        teacher,
        title=" Arirang ",
        artist="Folk",
        language="ko",
        lyrics="아리랑 아리랑 아라리요",
        tempo_bpm=92,
        first_downbeat_offset=downbeat,
        is_public=False,
    )
    assert (song.status, song.title, song.zone_id, song.org_id, song.creator_id) == (
        res.REFERENCE_STATUS_AWAITING_MEDIA,
        "Arirang",
        ZONE,
        cast.org_a,
        teacher.user_id,
    )
    assert (song.beats_per_bar, song.tempo_bpm, song.media_uri, song.processing_job_id) == (4, 92, "", "")
    assert song.HasField("first_downbeat_offset")  # given as 0: not "detect it"
    assert song.first_downbeat_offset.ToNanoseconds() == 0
    assert not song.HasField("duration")
    assert song.create_time.seconds > 0
    # The creation is in the audit trail.
    audit = await people.auth.ListAuditLogs(
        auth_pb.ListAuditLogsRequest(resource_type="reference_content", resource_id=song.id),
        metadata=cast.zone_admin.metadata(),
    )
    assert [(r.action, r.actor_id) for r in audit.records] == [("create", teacher.user_id)]

    # Not READY: its organisation's staff see it, learners and other organisations do not.
    assert (await _get(kzone, cast.colleague, song.id)).id == song.id
    for stranger in (cast.student, cast.outsider, cast.outside_student):
        missing = await _refused(_get(kzone, stranger, song.id))
        assert (missing.code(), reason(missing)) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")

    # The audio goes up: PROCESSING, kept in the media store.
    uploaded = (
        await kzone.api.UploadReferenceMedia(
            pb.UploadReferenceMediaRequest(
                content_id=song.id, file=httpbody_pb2.HttpBody(content_type="audio/wav; rate=44100", data=b"RIFF1234")
            ),
            metadata=teacher.metadata(),
        )
    ).content
    key = f"kzone/{ZONE}/{cast.org_a}/contents/{song.id}/{uploaded.processing_job_id}/media.wav"
    assert (uploaded.status, uploaded.media_uri, uploaded.media_content_type) == (
        res.REFERENCE_STATUS_PROCESSING,
        key,
        "audio/wav",
    )
    assert uploaded.processing_job_id
    assert (kzone.media_dir / key).read_bytes() == b"RIFF1234"

    # Features only once READY.
    not_ready = await _refused(
        kzone.api.GetReferenceFeatures(pb.GetReferenceFeaturesRequest(content_id=song.id), metadata=teacher.metadata())
    )
    assert (not_ready.code(), reason(not_ready)) == (grpc.StatusCode.FAILED_PRECONDITION, "REFERENCE_NOT_READY")

    # The extraction worker finishes (called as it will call it); a stale extraction's result is not written.
    features = res.ReferenceFeatures(
        keypoints_uri="",
        pitch=res.PitchTrack(frequency_hz=[0.0, 220.0, 221.5], frame_period=duration_pb2.Duration(nanos=10_000_000)),
        words=[res.TranscriptWord(word="아리랑", confidence=0.9)],
        beats=[duration_pb2.Duration(nanos=650_000_000), duration_pb2.Duration(seconds=1, nanos=300_000_000)],
    )
    assert not await kzone.store.finish_processing(song.id, features, job_id="stale", duration_seconds=1.0)
    assert await kzone.store.finish_processing(
        song.id,
        features,
        job_id=uploaded.processing_job_id,
        duration_seconds=183.25,
        tempo_bpm=91.7,
        first_downbeat_seconds=0.65,
    )
    ready = await _get(kzone, cast.student, song.id)  # learners of its organisation see it now
    assert ready.status == res.REFERENCE_STATUS_READY
    assert ready.duration.ToMilliseconds() == 183_250
    assert (ready.tempo_bpm, ready.first_downbeat_offset.ToNanoseconds()) == (92, 0)  # given values win
    drawn = (
        await kzone.api.GetReferenceFeatures(
            pb.GetReferenceFeaturesRequest(content_id=song.id), metadata=cast.student.metadata()
        )
    ).features
    assert drawn.content_id == song.id
    assert list(drawn.pitch.frequency_hz) == [0.0, 220.0, 221.5]
    assert [word.word for word in drawn.words] == ["아리랑"]
    assert [beat.ToMilliseconds() for beat in drawn.beats] == [650, 1300]

    # Without the given tempo and downbeat, the detected ones show.
    detected = (
        await kzone.api.UpdateReferenceContent(
            pb.UpdateReferenceContentRequest(
                content_id=song.id,
                content=res.ReferenceContent(),
                update_mask=field_mask_pb2.FieldMask(paths=["tempo_bpm", "first_downbeat_offset"]),
            ),
            metadata=teacher.metadata(),
        )
    ).content
    assert (detected.tempo_bpm, detected.first_downbeat_offset.ToMilliseconds()) == (91.7, 650)

    # Private: another organisation sees nothing, until it is public.
    assert song.id not in await _ids(kzone, cast.outside_student)
    await _refused(_get(kzone, cast.outside_student, song.id))
    public = (
        await kzone.api.UpdateReferenceContent(
            pb.UpdateReferenceContentRequest(content_id=song.id, content=res.ReferenceContent(is_public=True)),
            metadata=cast.org_admin.metadata(),  # its organisation's admin may change it too
        )
    ).content
    assert (public.is_public, public.title, public.tempo_bpm) == (True, "Arirang", 91.7)
    assert (await _get(kzone, cast.outside_student, song.id)).id == song.id
    assert song.id in await _ids(kzone, cast.outsider)
    # ... but reading is not changing: NOT_FOUND became PERMISSION_DENIED for the other organisation's teacher.
    foreign = await _refused(
        kzone.api.UpdateReferenceContent(
            pb.UpdateReferenceContentRequest(content_id=song.id, content=res.ReferenceContent(title="Mine")),
            metadata=cast.outsider.metadata(),
        )
    )
    assert (foreign.code(), reason(foreign)) == (grpc.StatusCode.PERMISSION_DENIED, "OUT_OF_SCOPE")

    # New media for a READY song: back to PROCESSING, features forgotten, the old file removed.
    replaced = (
        await kzone.api.UploadReferenceMedia(
            pb.UploadReferenceMediaRequest(
                content_id=song.id, file=httpbody_pb2.HttpBody(content_type="audio/mpeg", data=b"ID3-mp3")
            ),
            metadata=teacher.metadata(),
        )
    ).content
    assert (replaced.status, replaced.media_uri) == (
        res.REFERENCE_STATUS_PROCESSING,
        f"kzone/{ZONE}/{cast.org_a}/contents/{song.id}/{replaced.processing_job_id}/media.mp3",
    )
    assert replaced.processing_job_id != uploaded.processing_job_id
    assert (replaced.tempo_bpm, replaced.HasField("duration"), replaced.HasField("first_downbeat_offset")) == (
        0,
        False,
        False,
    )
    assert not (kzone.media_dir / key).exists()
    assert (kzone.media_dir / replaced.media_uri).read_bytes() == b"ID3-mp3"
    again = await _refused(
        kzone.api.GetReferenceFeatures(pb.GetReferenceFeaturesRequest(content_id=song.id), metadata=teacher.metadata())
    )
    assert reason(again) == "REFERENCE_NOT_READY"
    await _refused(_get(kzone, cast.outside_student, song.id))  # public, but not READY now

    # Deletion: not by a colleague; by the creator, with its media; then it is gone, for a retry too.
    refused = await _refused(
        kzone.api.DeleteReferenceContent(
            pb.DeleteReferenceContentRequest(content_id=song.id), metadata=cast.colleague.metadata()
        )
    )
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    await kzone.api.DeleteReferenceContent(
        pb.DeleteReferenceContentRequest(content_id=song.id), metadata=teacher.metadata()
    )
    assert not (kzone.media_dir / replaced.media_uri).exists()
    assert (await _refused(_get(kzone, teacher, song.id))).code() == grpc.StatusCode.NOT_FOUND
    retried = await _refused(
        kzone.api.DeleteReferenceContent(
            pb.DeleteReferenceContentRequest(content_id=song.id), metadata=teacher.metadata()
        )
    )
    assert retried.code() == grpc.StatusCode.NOT_FOUND
    audit = await people.auth.ListAuditLogs(
        auth_pb.ListAuditLogsRequest(resource_type="reference_content", resource_id=song.id),
        metadata=cast.zone_admin.metadata(),
    )
    assert [r.action for r in audit.records] == ["delete", "upload", "update", "update", "upload", "create"]


async def test_listing_filters_pages_newest_first_and_shows_each_person_what_they_may_read(
    kzone: KZone, cast: Cast
) -> None:
    teacher = cast.teacher
    ready_private = await _create(kzone, teacher, title="Spring Day", artist="BTS", language="ko")
    waiting = await _create(kzone, teacher, title="Dynamite", artist="BTS", language="en")
    dance = await _create(
        kzone, teacher, kind=res.REFERENCE_KIND_CHOREOGRAPHY, title="Dynamite dance", language="en", is_public=True
    )
    foreign_public = await _create(kzone, cast.outsider, title="Hype Boy", artist="NewJeans", is_public=True)
    foreign_private = await _create(kzone, cast.outsider, title="Ditto", artist="NewJeans")
    for made in (ready_private, dance, foreign_public, foreign_private):
        media = (
            httpbody_pb2.HttpBody(content_type="video/mp4", data=b"mp4")
            if made.kind == res.REFERENCE_KIND_CHOREOGRAPHY
            else wav()
        )
        creator = teacher if made.org_id == cast.org_a else cast.outsider
        uploaded = await kzone.api.UploadReferenceMedia(
            pb.UploadReferenceMediaRequest(content_id=made.id, file=media), metadata=creator.metadata()
        )
        assert await kzone.store.finish_processing(
            made.id, res.ReferenceFeatures(), job_id=uploaded.content.processing_job_id, duration_seconds=3
        )

    newest_first = [foreign_private.id, foreign_public.id, dance.id, waiting.id, ready_private.id]
    # Staff: their organisation's in any status, and public READY ones.
    assert await _ids(kzone, teacher) == [foreign_public.id, dance.id, waiting.id, ready_private.id]
    # Learners: their organisation's READY ones and public READY ones.
    assert await _ids(kzone, cast.student) == [foreign_public.id, dance.id, ready_private.id]
    assert await _ids(kzone, cast.outside_student) == [foreign_private.id, foreign_public.id, dance.id]
    # The zone's admin: all of the zone (at least these; other tests' orgs are elsewhere).
    mine = [i for i in await _ids(kzone, cast.zone_admin, page_size=200) if i in newest_first]
    assert mine == newest_first

    # Filters.
    assert await _ids(kzone, teacher, kind=res.REFERENCE_KIND_CHOREOGRAPHY) == [dance.id]
    assert await _ids(kzone, teacher, status=res.REFERENCE_STATUS_AWAITING_MEDIA) == [waiting.id]
    assert await _ids(kzone, cast.student, status=res.REFERENCE_STATUS_AWAITING_MEDIA) == []
    assert await _ids(kzone, teacher, query="dynamite") == [dance.id, waiting.id]
    assert await _ids(kzone, teacher, query="newjeans") == [foreign_public.id]  # artist
    assert await _ids(kzone, teacher, language="EN") == [dance.id, waiting.id]
    assert await _ids(kzone, teacher, query="100%") == []

    # Pages of two, each token bound to its filters.
    seen: list[str] = []
    token = ""
    for _ in range(3):
        page = await kzone.api.ListReferenceContents(
            pb.ListReferenceContentsRequest(page_size=2, page_token=token), metadata=teacher.metadata()
        )
        seen += [content.id for content in page.contents]
        token = page.next_page_token
        if not token:
            break
    assert seen == [foreign_public.id, dance.id, waiting.id, ready_private.id]
    assert token == ""
    first = await kzone.api.ListReferenceContents(
        pb.ListReferenceContentsRequest(page_size=1), metadata=teacher.metadata()
    )
    other_filters = await _refused(
        kzone.api.ListReferenceContents(
            pb.ListReferenceContentsRequest(page_size=1, query="x", page_token=first.next_page_token),
            metadata=teacher.metadata(),
        )
    )
    assert (other_filters.code(), reason(other_filters)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    bad = await _refused(
        kzone.api.ListReferenceContents(
            pb.ListReferenceContentsRequest(
                kind=res.ReferenceKind.ValueType(9), status=res.ReferenceStatus.ValueType(9), page_size=-1
            ),
            metadata=teacher.metadata(),
        )
    )
    assert violated(bad) == {"kind", "status"}


async def test_who_may_create_and_change_references(kzone: KZone, cast: Cast) -> None:
    for learner in (cast.student, cast.outside_student):
        refused = await _refused(_create(kzone, learner, title="Mine"))
        assert (refused.code(), reason(refused)) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    for staff in (cast.teacher, cast.org_admin, cast.zone_admin):
        made = await _create(kzone, staff, title="Staff song")
        assert made.creator_id == staff.user_id

    song = await _create(kzone, cast.teacher, title="Mine")
    renamed = (
        await kzone.api.UpdateReferenceContent(
            pb.UpdateReferenceContentRequest(
                content_id=song.id,
                content=res.ReferenceContent(title="Ours", artist="ignored"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
            metadata=cast.teacher.metadata(),
        )
    ).content
    assert (renamed.title, renamed.artist) == ("Ours", "")
    assert renamed.update_time.ToNanoseconds() >= song.update_time.ToNanoseconds()
    colleague = await _refused(
        kzone.api.UpdateReferenceContent(
            pb.UpdateReferenceContentRequest(content_id=song.id, content=res.ReferenceContent(title="Theirs")),
            metadata=cast.colleague.metadata(),
        )
    )
    assert colleague.code() == grpc.StatusCode.PERMISSION_DENIED
    upload = await _refused(
        kzone.api.UploadReferenceMedia(
            pb.UploadReferenceMediaRequest(content_id=song.id, file=wav()), metadata=cast.colleague.metadata()
        )
    )
    assert upload.code() == grpc.StatusCode.PERMISSION_DENIED
    learner_upload = await _refused(
        kzone.api.UploadReferenceMedia(
            pb.UploadReferenceMediaRequest(content_id=song.id, file=wav()), metadata=cast.student.metadata()
        )
    )
    assert (learner_upload.code(), reason(learner_upload)) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    hidden = await _refused(
        kzone.api.DeleteReferenceContent(
            pb.DeleteReferenceContentRequest(content_id=song.id), metadata=cast.outsider.metadata()
        )
    )
    assert hidden.code() == grpc.StatusCode.NOT_FOUND  # private to org A: not even there for org B
    # The zone's admin changes and deletes any of the zone's.
    await kzone.api.UpdateReferenceContent(
        pb.UpdateReferenceContentRequest(content_id=song.id, content=res.ReferenceContent(description="Checked")),
        metadata=cast.zone_admin.metadata(),
    )
    await kzone.api.DeleteReferenceContent(
        pb.DeleteReferenceContentRequest(content_id=song.id), metadata=cast.zone_admin.metadata()
    )
    assert (await _refused(_get(kzone, cast.teacher, song.id))).code() == grpc.StatusCode.NOT_FOUND


async def test_bad_input_names_every_field_and_changes_nothing(kzone: KZone, cast: Cast) -> None:
    teacher = cast.teacher
    missing = await _refused(
        kzone.api.CreateReferenceContent(pb.CreateReferenceContentRequest(), metadata=teacher.metadata())
    )
    assert (missing.code(), violated(missing)) == (grpc.StatusCode.INVALID_ARGUMENT, {"content"})
    bad = await _refused(
        _create(
            kzone,
            teacher,
            kind=res.REFERENCE_KIND_UNSPECIFIED,
            title=" ",
            language="not a tag",
            tempo_bpm=1000,
            beats_per_bar=-1,
            first_downbeat_offset=duration_pb2.Duration(seconds=-2),
        )
    )
    assert (bad.code(), reason(bad)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert violated(bad) == {
        "content.kind",
        "content.title",
        "content.language",
        "content.tempo_bpm",
        "content.beats_per_bar",
        "content.first_downbeat_offset",
    }
    lyrics = await _refused(_create(kzone, teacher, kind=res.REFERENCE_KIND_CHOREOGRAPHY, title="D", lyrics="la"))
    assert violated(lyrics) == {"content.lyrics"}
    assert await _ids(kzone, teacher) == []  # nothing was stored

    song = await _create(kzone, teacher, title="Song")
    for paths, content, fields in (
        (["status"], res.ReferenceContent(), {"update_mask"}),
        (["title", "tempo_bpm"], res.ReferenceContent(title="", tempo_bpm=-3), {"content.title", "content.tempo_bpm"}),
        ([], res.ReferenceContent(kind=res.REFERENCE_KIND_CHOREOGRAPHY), {"content.kind"}),
    ):
        refused = await _refused(
            kzone.api.UpdateReferenceContent(
                pb.UpdateReferenceContentRequest(
                    content_id=song.id, content=content, update_mask=field_mask_pb2.FieldMask(paths=paths)
                ),
                metadata=teacher.metadata(),
            )
        )
        assert (refused.code(), violated(refused)) == (grpc.StatusCode.INVALID_ARGUMENT, fields)
    no_id = await _refused(
        kzone.api.UpdateReferenceContent(pb.UpdateReferenceContentRequest(), metadata=teacher.metadata())
    )
    assert violated(no_id) == {"content_id", "content"}
    assert (await _get(kzone, teacher, song.id)).title == "Song"

    # Media: the wrong kind of file, an unknown type, an empty file, no file.
    for body, field, why in (
        (httpbody_pb2.HttpBody(content_type="video/mp4", data=b"x"), "file.content_type", "UNSUPPORTED_MEDIA_TYPE"),
        (
            httpbody_pb2.HttpBody(content_type="application/json", data=b"{}"),
            "file.content_type",
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (httpbody_pb2.HttpBody(content_type="audio/wav", data=b""), "file.data", "INVALID_REQUEST"),
    ):
        refused = await _refused(
            kzone.api.UploadReferenceMedia(
                pb.UploadReferenceMediaRequest(content_id=song.id, file=body), metadata=teacher.metadata()
            )
        )
        assert (refused.code(), reason(refused), violated(refused)) == (grpc.StatusCode.INVALID_ARGUMENT, why, {field})
    no_file = await _refused(
        kzone.api.UploadReferenceMedia(pb.UploadReferenceMediaRequest(), metadata=teacher.metadata())
    )
    assert violated(no_file) == {"content_id", "file"}
    unchanged = await _get(kzone, teacher, song.id)
    assert (unchanged.status, unchanged.media_uri) == (res.REFERENCE_STATUS_AWAITING_MEDIA, "")
    assert not kzone.media_dir.exists() or not any(kzone.media_dir.rglob("*.*"))

    for call in (
        kzone.api.GetReferenceContent(pb.GetReferenceContentRequest(), metadata=teacher.metadata()),
        kzone.api.GetReferenceFeatures(pb.GetReferenceFeaturesRequest(), metadata=teacher.metadata()),
        kzone.api.DeleteReferenceContent(pb.DeleteReferenceContentRequest(), metadata=teacher.metadata()),
    ):
        assert violated(await _refused(call)) == {"content_id"}


async def test_a_video_over_the_audio_limit_is_a_fine_choreography_and_a_too_large_song(
    kzone: KZone, cast: Cast
) -> None:
    big = bytes(50 * 1024 * 1024 + 1)
    song = await _create(kzone, cast.teacher, title="Long song")
    refused = await _refused(
        kzone.api.UploadReferenceMedia(
            pb.UploadReferenceMediaRequest(
                content_id=song.id, file=httpbody_pb2.HttpBody(content_type="audio/wav", data=big)
            ),
            metadata=cast.teacher.metadata(),
        )
    )
    assert (refused.code(), reason(refused), violated(refused)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAYLOAD_TOO_LARGE",
        {"file.data"},
    )
    dance = await _create(kzone, cast.teacher, kind=res.REFERENCE_KIND_CHOREOGRAPHY, title="Long dance")
    uploaded = await kzone.api.UploadReferenceMedia(
        pb.UploadReferenceMediaRequest(
            content_id=dance.id, file=httpbody_pb2.HttpBody(content_type="video/quicktime", data=big)
        ),
        metadata=cast.teacher.metadata(),
    )
    assert uploaded.content.media_uri.endswith("/media.mov")
    assert (kzone.media_dir / uploaded.content.media_uri).stat().st_size == len(big)


async def test_a_choreographys_keypoints_go_with_its_media(kzone: KZone, cast: Cast) -> None:
    teacher = cast.teacher
    dance = await _create(kzone, teacher, kind=res.REFERENCE_KIND_CHOREOGRAPHY, title="Hype Boy", beats_per_bar=8)
    assert dance.beats_per_bar == 8

    async def upload_and_extract(data: bytes) -> tuple[str, str]:
        uploaded = (
            await kzone.api.UploadReferenceMedia(
                pb.UploadReferenceMediaRequest(
                    content_id=dance.id, file=httpbody_pb2.HttpBody(content_type="video/webm", data=data)
                ),
                metadata=teacher.metadata(),
            )
        ).content
        job = uploaded.processing_job_id
        keypoints = contents.keypoints_key(ZONE, cast.org_a, dance.id, job)
        (kzone.media_dir / keypoints).write_text("[]")  # as the worker will write them
        features = res.ReferenceFeatures(keypoints_uri=keypoints, keypoint_frame_count=90, keypoint_frame_rate=30)
        assert await kzone.store.finish_processing(dance.id, features, job_id=job, duration_seconds=3)
        return uploaded.media_uri, keypoints

    # An extraction that fails: FAILED with its reason, no features; new media starts over.
    broken = (
        await kzone.api.UploadReferenceMedia(
            pb.UploadReferenceMediaRequest(
                content_id=dance.id, file=httpbody_pb2.HttpBody(content_type="video/mp4", data=b"not a video")
            ),
            metadata=teacher.metadata(),
        )
    ).content
    assert await kzone.store.fail_processing(dance.id, job_id=broken.processing_job_id, error="no video stream")
    failed = await _get(kzone, teacher, dance.id)
    assert (failed.status, failed.processing_error) == (res.REFERENCE_STATUS_FAILED, "no video stream")
    await _refused(_get(kzone, cast.student, dance.id))  # learners see READY ones only
    not_ready = await _refused(
        kzone.api.GetReferenceFeatures(pb.GetReferenceFeaturesRequest(content_id=dance.id), metadata=teacher.metadata())
    )
    assert reason(not_ready) == "REFERENCE_NOT_READY"

    first_media, first_keypoints = await upload_and_extract(b"webm-1")
    assert not (kzone.media_dir / broken.media_uri).exists()
    assert (await _get(kzone, teacher, dance.id)).processing_error == ""
    drawn = (
        await kzone.api.GetReferenceFeatures(
            pb.GetReferenceFeaturesRequest(content_id=dance.id), metadata=cast.student.metadata()
        )
    ).features
    assert (drawn.keypoints_uri, drawn.keypoint_frame_count, drawn.keypoint_frame_rate) == (first_keypoints, 90, 30)

    second_media, second_keypoints = await upload_and_extract(b"webm-2")
    assert not (kzone.media_dir / first_media).exists()
    assert not (kzone.media_dir / first_keypoints).exists()
    assert (kzone.media_dir / second_media).read_bytes() == b"webm-2"

    await kzone.api.DeleteReferenceContent(
        pb.DeleteReferenceContentRequest(content_id=dance.id), metadata=teacher.metadata()
    )
    assert not (kzone.media_dir / second_media).exists()
    assert not (kzone.media_dir / second_keypoints).exists()
