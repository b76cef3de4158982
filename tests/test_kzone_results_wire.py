"""Stored analysis results through gRPC over mTLS, as the edge calls the kzone service. Results are stored the way
the analysis RPCs will store them (KZoneStore.add_result); learners read and delete their own, teachers read
their organisation's, an approved parent a child's, the zone's admin the zone's; what a person may not read is
NOT_FOUND. Deleting a result deletes its recording; deleting a reference keeps the results against it."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from google.api import httpbody_pb2
from google.protobuf import duration_pb2

from megacity.auth.v1 import auth_service_pb2 as auth_pb
from megacity.kzone.v1 import kzone_service_pb2 as pb
from megacity.kzone.v1 import resources_pb2 as res
from services.kzone.store import Owner
from tests.support.accounts import Caller, People, reason
from tests.test_kzone_contents_wire import ZONE, KZone, kzone, new_org, violated

__all__ = ["kzone"]  # the fixture, shared with the references' tests


@dataclass
class Family:
    org_a: str
    org_b: str
    ada: Caller  # a student of org A
    ben: Caller  # another student of org A
    cho: Caller  # a student of org B
    teacher: Caller  # of org A
    org_admin: Caller  # of org A
    outsider: Caller  # a teacher of org B
    parent: Caller  # Ada's, approved
    stranger: Caller  # a parent whose link to Ada is pending
    zone_admin: Caller


@pytest.fixture
async def family(people: People) -> Family:
    zone_admin = await people.as_new_user(ZONE, "kzone-public", "zone_admin")
    org_a, org_b = await new_org(people, zone_admin), await new_org(people, zone_admin)
    ada_email = await people.add_user(ZONE, org_a, "student")
    ada = await people.sign_in(ZONE, ada_email)
    parent = await people.as_new_user(ZONE, "kzone-public", "parent")
    stranger = await people.as_new_user(ZONE, "kzone-public", "parent")
    for someone in (parent, stranger):
        await people.auth.RequestParentLink(
            auth_pb.RequestParentLinkRequest(student_email=ada_email), metadata=someone.metadata()
        )
    await people.auth.ApproveParentLink(
        auth_pb.ApproveParentLinkRequest(parent_id=parent.user_id), metadata=ada.metadata()
    )
    return Family(
        org_a=org_a,
        org_b=org_b,
        ada=ada,
        ben=await people.as_new_user(ZONE, org_a, "student"),
        cho=await people.as_new_user(ZONE, org_b, "student"),
        teacher=await people.as_new_user(ZONE, org_a, "teacher"),
        org_admin=await people.as_new_user(ZONE, org_a, "org_admin"),
        outsider=await people.as_new_user(ZONE, org_b, "teacher"),
        parent=parent,
        stranger=stranger,
        zone_admin=zone_admin,
    )


def voice(overall: float, text: str = "안녕하세요") -> res.VoiceReport:
    return res.VoiceReport(
        target_text=text,
        language="ko",
        transcript=text,
        duration=duration_pb2.Duration(seconds=3),
        scores=res.VoiceScores(overall=overall, pronunciation=overall),
        word_scores=[res.WordScore(expected=text, heard=text, score=overall, correct=True, jamo_accuracy=0.9)],
        feedback=["hold the last syllable longer"],
    )


async def _ids(kzone: KZone, caller: Caller, **filters: object) -> list[str]:
    reply = await kzone.api.ListAnalysisResults(
        pb.ListAnalysisResultsRequest(**filters),  # type: ignore[arg-type]
        metadata=caller.metadata(),
    )
    return [result.id for result in reply.results]


async def _refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    return refused.value


async def _get(kzone: KZone, caller: Caller, result_id: str) -> res.AnalysisResult:
    reply = await kzone.api.GetAnalysisResult(
        pb.GetAnalysisResultRequest(result_id=result_id), metadata=caller.metadata()
    )
    return reply.result


def _owner(caller: Caller, org: str) -> Owner:
    return Owner(zone_id=ZONE, org_id=org, user_id=caller.user_id)


async def test_results_are_read_listed_and_deleted_by_whom_they_concern(
    kzone: KZone, family: Family, people: People
) -> None:
    f = family
    recording = f"kzone/{ZONE}/{f.org_a}/results/ada-1.wav"
    (kzone.media_dir / recording).parent.mkdir(parents=True)
    (kzone.media_dir / recording).write_bytes(b"RIFF")
    keypoints = f"kzone/{ZONE}/{f.org_a}/results/ada-2.json"
    (kzone.media_dir / keypoints).write_text("[]")
    ada_voice = await kzone.store.add_result(
        _owner(f.ada, f.org_a), voice(81.5), source="upload", reference_id="song-1", input_media_uri=recording
    )
    dance_report = res.DanceReport(
        frames_analyzed=90, frames_with_pose=88, mirrored=True, keypoints_uri=keypoints, scores=res.DanceScores()
    )
    ada_dance = await kzone.store.add_result(_owner(f.ada, f.org_a), dance_report, source="live", reference_id="c-2")
    ben_voice = await kzone.store.add_result(_owner(f.ben, f.org_a), voice(40), source="job", job_id="job-7")
    cho_voice = await kzone.store.add_result(_owner(f.cho, f.org_b), voice(70), source="live")
    assert (ada_voice.zone_id, ada_voice.org_id, ada_voice.user_id, ada_voice.source) == (
        ZONE,
        f.org_a,
        f.ada.user_id,
        res.ANALYSIS_SOURCE_UPLOAD,
    )
    assert (ben_voice.job_id, ben_voice.source) == ("job-7", res.ANALYSIS_SOURCE_JOB)

    # The learner: her own, newest first, with their reports; filters; nobody else's.
    read = await _get(kzone, f.ada, ada_voice.id)
    assert read == ada_voice
    assert read.WhichOneof("report") == "voice"
    assert read.voice.scores.overall == 81.5
    assert read.voice.word_scores[0].jamo_accuracy == pytest.approx(0.9)
    assert read.voice.feedback == ["hold the last syllable longer"]
    dance = await _get(kzone, f.ada, ada_dance.id)
    assert (dance.WhichOneof("report"), dance.dance.frames_with_pose, dance.dance.mirrored) == ("dance", 88, True)
    assert not dance.dance.scores.HasField("overall")
    assert await _ids(kzone, f.ada) == [ada_dance.id, ada_voice.id]
    assert await _ids(kzone, f.ada, kind=res.ANALYSIS_KIND_VOICE) == [ada_voice.id]
    assert await _ids(kzone, f.ada, reference_id="c-2") == [ada_dance.id]
    assert await _ids(kzone, f.ada, user_id=f.ada.user_id) == [ada_dance.id, ada_voice.id]
    others = await _refused(_ids(kzone, f.ada, user_id=f.ben.user_id))
    assert (others.code(), reason(others)) == (grpc.StatusCode.PERMISSION_DENIED, "OUT_OF_SCOPE")
    for hidden in (ben_voice.id, cho_voice.id, "0" * 32):
        missing = await _refused(_get(kzone, f.ada, hidden))
        assert missing.code() == grpc.StatusCode.NOT_FOUND

    # Pages of one.
    first = await kzone.api.ListAnalysisResults(pb.ListAnalysisResultsRequest(page_size=1), metadata=f.ada.metadata())
    second = await kzone.api.ListAnalysisResults(
        pb.ListAnalysisResultsRequest(page_size=1, page_token=first.next_page_token), metadata=f.ada.metadata()
    )
    assert [r.id for r in (*first.results, *second.results)] == [ada_dance.id, ada_voice.id]
    assert second.next_page_token == ""
    replayed = await _refused(
        kzone.api.ListAnalysisResults(
            pb.ListAnalysisResultsRequest(page_size=1, kind=res.ANALYSIS_KIND_DANCE, page_token=first.next_page_token),
            metadata=f.ada.metadata(),
        )
    )
    assert reason(replayed) == "INVALID_PAGE_TOKEN"

    # Teachers: their organisation's learners, all or one; never another organisation's.
    assert await _ids(kzone, f.teacher) == [ben_voice.id, ada_dance.id, ada_voice.id]
    assert await _ids(kzone, f.teacher, user_id=f.ben.user_id) == [ben_voice.id]
    assert await _ids(kzone, f.teacher, user_id=f.cho.user_id) == []
    assert (await _get(kzone, f.teacher, ada_voice.id)).id == ada_voice.id
    assert (await _refused(_get(kzone, f.teacher, cho_voice.id))).code() == grpc.StatusCode.NOT_FOUND
    assert await _ids(kzone, f.outsider) == [cho_voice.id]
    assert (await _refused(_get(kzone, f.outsider, ada_voice.id))).code() == grpc.StatusCode.NOT_FOUND
    # The zone's admin: the zone's.
    assert await _ids(kzone, f.zone_admin) == [cho_voice.id, ben_voice.id, ada_dance.id, ada_voice.id]

    # Parents: an approved child's, named; a pending link reads nothing.
    assert await _ids(kzone, f.parent, user_id=f.ada.user_id) == [ada_dance.id, ada_voice.id]
    assert (await _get(kzone, f.parent, ada_voice.id)).id == ada_voice.id
    unnamed = await _refused(_ids(kzone, f.parent))
    assert (unnamed.code(), violated(unnamed)) == (grpc.StatusCode.INVALID_ARGUMENT, {"user_id"})
    pending = await _refused(_ids(kzone, f.stranger, user_id=f.ada.user_id))
    assert (pending.code(), reason(pending)) == (grpc.StatusCode.PERMISSION_DENIED, "PARENT_LINK_NOT_APPROVED")
    assert (await _refused(_get(kzone, f.stranger, ada_voice.id))).code() == grpc.StatusCode.NOT_FOUND
    assert (await _refused(_get(kzone, f.parent, ben_voice.id))).code() == grpc.StatusCode.NOT_FOUND

    # Deleting: not by those who only read, not seen by others; the learner deletes hers with its recording.
    for reader in (f.teacher, f.parent):
        denied = await _refused(
            kzone.api.DeleteAnalysisResult(
                pb.DeleteAnalysisResultRequest(result_id=ada_voice.id), metadata=reader.metadata()
            )
        )
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    unseen = await _refused(
        kzone.api.DeleteAnalysisResult(
            pb.DeleteAnalysisResultRequest(result_id=ada_voice.id), metadata=f.ben.metadata()
        )
    )
    assert unseen.code() == grpc.StatusCode.NOT_FOUND
    await kzone.api.DeleteAnalysisResult(
        pb.DeleteAnalysisResultRequest(result_id=ada_voice.id), metadata=f.ada.metadata()
    )
    assert not (kzone.media_dir / recording).exists()
    assert (await _refused(_get(kzone, f.ada, ada_voice.id))).code() == grpc.StatusCode.NOT_FOUND
    # Her organisation's admin deletes one too (with its keypoints).
    await kzone.api.DeleteAnalysisResult(
        pb.DeleteAnalysisResultRequest(result_id=ada_dance.id), metadata=f.org_admin.metadata()
    )
    assert not (kzone.media_dir / keypoints).exists()
    assert await _ids(kzone, f.ada) == []
    assert await _ids(kzone, f.teacher) == [ben_voice.id]
    audit = await people.auth.ListAuditLogs(
        auth_pb.ListAuditLogsRequest(resource_type="analysis_result", action="delete"),
        metadata=f.zone_admin.metadata(),
    )
    assert {(r.resource_id, r.actor_id) for r in audit.records} == {
        (ada_voice.id, f.ada.user_id),
        (ada_dance.id, f.org_admin.user_id),
    }


async def test_results_outlive_their_reference_and_bad_requests_are_named(kzone: KZone, family: Family) -> None:
    f = family
    song = (
        await kzone.api.CreateReferenceContent(
            pb.CreateReferenceContentRequest(content=res.ReferenceContent(kind=res.REFERENCE_KIND_SONG, title="S")),
            metadata=f.teacher.metadata(),
        )
    ).content
    await kzone.api.UploadReferenceMedia(
        pb.UploadReferenceMediaRequest(
            content_id=song.id, file=httpbody_pb2.HttpBody(content_type="audio/ogg", data=b"OggS")
        ),
        metadata=f.teacher.metadata(),
    )
    sung = await kzone.store.add_result(_owner(f.ada, f.org_a), voice(90), source="live", reference_id=song.id)
    await kzone.api.DeleteReferenceContent(
        pb.DeleteReferenceContentRequest(content_id=song.id), metadata=f.teacher.metadata()
    )
    kept = await _get(kzone, f.ada, sung.id)
    assert (kept.reference_id, kept.voice.scores.overall) == (song.id, 90)
    assert await _ids(kzone, f.ada, reference_id=song.id) == [sung.id]

    for call in (
        kzone.api.GetAnalysisResult(pb.GetAnalysisResultRequest(), metadata=f.ada.metadata()),
        kzone.api.DeleteAnalysisResult(pb.DeleteAnalysisResultRequest(), metadata=f.ada.metadata()),
    ):
        refused = await _refused(call)
        assert (refused.code(), violated(refused)) == (grpc.StatusCode.INVALID_ARGUMENT, {"result_id"})
    bad_kind = await _refused(_ids(kzone, f.ada, kind=5))
    assert violated(bad_kind) == {"kind"}
    bad_size = await _refused(_ids(kzone, f.ada, page_size=-1))
    assert violated(bad_size) == {"page_size"}
