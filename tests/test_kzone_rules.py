"""The kzone service's pure rules: who may create, read and change references and read, list and delete results;
what a valid reference, update and upload are (services/kzone/contents.py, services/kzone/results.py)."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from megacity.kzone.v1 import resources_pb2 as res
from services.kzone import contents, results
from services.kzone.contents import ContentFacts
from services.kzone.results import ResultFacts
from services.runtime.errors import ErrorReason, InvalidArgument, PermissionDenied, Violations
from services.runtime.tokens import AccessClaims

ROLES = ("super_admin", "zone_admin", "org_admin", "teacher", "student", "parent", "guest")


def person(role: str, zone: str = "kzone", org: str = "org-a", user: str = "") -> AccessClaims:
    return AccessClaims(
        user_id=user or f"{role}-1",
        email="",
        zone_id=zone,
        org_id=org,
        role=role,
        permissions=(),
        issued_at=0,
        expires_at=0,
        jti="",
        session_id="",
    )


def content(status: str = "ready", *, public: bool = False, org: str = "org-a", zone: str = "kzone") -> ContentFacts:
    return ContentFacts(zone_id=zone, org_id=org, creator_id="teacher-1", is_public=public, status=status)


# --- references: access ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_staff_create_references_and_learners_do_not(role: str) -> None:
    assert contents.may_create(person(role)) is (role in ("super_admin", "zone_admin", "org_admin", "teacher"))


@pytest.mark.parametrize("status", ["awaiting_media", "processing", "ready", "failed"])
@pytest.mark.parametrize("role", ROLES)
def test_an_organisations_own_references_are_read_by_its_staff_in_any_status_and_by_learners_once_ready(
    role: str, status: str
) -> None:
    staff = role in ("super_admin", "zone_admin", "org_admin", "teacher")
    assert contents.may_read(person(role), content(status)) is (staff or status == "ready")


@pytest.mark.parametrize("role", ROLES)
def test_another_organisations_private_references_are_read_by_zone_and_super_admins_only(role: str) -> None:
    assert contents.may_read(person(role), content(org="org-b")) is (role in ("super_admin", "zone_admin"))


@pytest.mark.parametrize("role", ROLES)
def test_public_references_are_read_zone_wide_once_ready(role: str) -> None:
    assert contents.may_read(person(role), content(public=True, org="org-b")) is True
    processing = content("processing", public=True, org="org-b")
    assert contents.may_read(person(role), processing) is (role in ("super_admin", "zone_admin"))


@pytest.mark.parametrize("role", ROLES)
def test_another_zones_references_are_read_by_super_admins_only(role: str) -> None:
    assert contents.may_read(person(role), content(public=True, zone="univ")) is (role == "super_admin")


def test_the_creator_and_admins_change_a_reference() -> None:
    reference = content()
    assert contents.may_change(person("teacher", user="teacher-1"), reference)  # the creator
    assert not contents.may_change(person("teacher", user="teacher-2"), reference)  # a colleague
    assert contents.may_change(person("org_admin"), reference)
    assert not contents.may_change(person("org_admin", org="org-b"), reference)
    assert contents.may_change(person("zone_admin", org="org-b"), reference)
    assert not contents.may_change(person("zone_admin", zone="univ"), reference)
    assert contents.may_change(person("super_admin", zone="univ", org="x"), reference)
    # The creator moved to another organisation, or is no longer staff.
    assert not contents.may_change(person("teacher", org="org-b", user="teacher-1"), reference)
    assert not contents.may_change(person("student", user="teacher-1"), reference)
    for role in ("student", "parent", "guest"):
        assert not contents.may_change(person(role), reference)


def test_listing_says_the_same_as_may_read() -> None:
    assert contents.listing(person("super_admin")) == contents.Listing(True, True, "org-a", True)
    assert contents.listing(person("zone_admin")) == contents.Listing(False, True, "org-a", True)
    assert contents.listing(person("teacher")) == contents.Listing(False, False, "org-a", True)
    assert contents.listing(person("student")) == contents.Listing(False, False, "org-a", False)


# --- references: validation ------------------------------------------------------------------------------------


def _problems(reference: res.ReferenceContent) -> dict[str, str]:
    violations = Violations()
    contents.check_content(violations, reference)
    return dict(violations.items())


def test_a_valid_song_has_no_problems() -> None:
    song = res.ReferenceContent(
        kind=res.REFERENCE_KIND_SONG, title=" Arirang ", language="ko", lyrics="아리랑", tempo_bpm=92.5
    )
    song.first_downbeat_offset.FromMilliseconds(0)
    assert _problems(song) == {}
    stored = contents.normalized(song)
    assert (stored.title, stored.beats_per_bar, stored.HasField("first_downbeat_offset")) == ("Arirang", 4, True)


def test_every_problem_of_a_reference_is_named() -> None:
    bad = res.ReferenceContent(
        title="  ",
        artist="a" * 201,
        description="d" * 5001,
        language="korean!",
        tempo_bpm=10,
        beats_per_bar=33,
        first_downbeat_offset=duration_pb2.Duration(seconds=-1),
    )
    assert set(_problems(bad)) == {
        "content.kind",
        "content.title",
        "content.artist",
        "content.description",
        "content.language",
        "content.tempo_bpm",
        "content.beats_per_bar",
        "content.first_downbeat_offset",
    }
    dance = res.ReferenceContent(
        kind=res.REFERENCE_KIND_CHOREOGRAPHY, title="Step", lyrics="la la", tempo_bpm=float("nan")
    )
    assert set(_problems(dance)) == {"content.lyrics", "content.tempo_bpm"}
    assert set(_problems(res.ReferenceContent(kind=res.ReferenceKind.ValueType(7), title="x"))) == {"content.kind"}


def test_an_update_without_a_mask_changes_the_fields_it_sets() -> None:
    current = res.ReferenceContent(id="c1", kind=res.REFERENCE_KIND_SONG, title="Old", artist="A", tempo_bpm=100)
    current.first_downbeat_offset.FromMilliseconds(500)
    # A client sends back what it read, with its change: output-only fields and the same kind are ignored.
    given = res.ReferenceContent(
        id="c1", kind=res.REFERENCE_KIND_SONG, title="New", status=res.REFERENCE_STATUS_READY, zone_id="z"
    )
    assert contents.update_paths(current, given, []) == ["title"]
    merged = contents.merged(current, given, ["title"])
    assert (merged.title, merged.artist, merged.tempo_bpm, merged.id) == ("New", "A", 100, "c1")
    assert merged.first_downbeat_offset.ToMilliseconds() == 500
    with pytest.raises(InvalidArgument) as changed_kind:
        contents.update_paths(current, res.ReferenceContent(kind=res.REFERENCE_KIND_CHOREOGRAPHY), [])
    assert changed_kind.value.violations == (("content.kind", "immutable"),)


def test_a_masked_field_left_unset_is_cleared() -> None:
    current = res.ReferenceContent(kind=res.REFERENCE_KIND_SONG, title="T", tempo_bpm=120, is_public=True)
    current.first_downbeat_offset.FromMilliseconds(250)
    paths = contents.update_paths(current, res.ReferenceContent(), ["first_downbeat_offset", "tempo_bpm"])
    merged = contents.merged(current, res.ReferenceContent(), paths)
    assert (merged.HasField("first_downbeat_offset"), merged.tempo_bpm, merged.is_public) == (False, 0, True)


def test_a_mask_naming_a_field_that_cannot_change_is_refused() -> None:
    with pytest.raises(InvalidArgument) as refused:
        contents.update_paths(res.ReferenceContent(), res.ReferenceContent(), ["title", "status", "kind"])
    [(field, description)] = refused.value.violations
    assert field == "update_mask"
    assert description.startswith("kind, status: not one of")


# --- references: media -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "content_type", "extension"),
    [
        ("song", "audio/wav", "wav"),
        ("song", "audio/x-wav", "wav"),
        ("song", "Audio/MPEG", "mp3"),
        ("song", "audio/ogg; codecs=opus", "ogg"),
        ("song", "audio/webm", "webm"),
        ("song", "audio/mp4", "m4a"),
        ("choreography", "video/mp4", "mp4"),
        ("choreography", "video/webm", "webm"),
        ("choreography", "video/quicktime", "mov"),
    ],
)
def test_accepted_media_types(kind: str, content_type: str, extension: str) -> None:
    assert contents.check_media(kind, content_type, 1) == extension


@pytest.mark.parametrize(
    ("kind", "content_type"),
    [("song", "video/mp4"), ("choreography", "audio/wav"), ("song", "image/jpeg"), ("song", ""), ("song", "audio")],
)
def test_other_media_types_are_refused(kind: str, content_type: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        contents.check_media(kind, content_type, 1)
    assert refused.value.reason == ErrorReason.ERROR_REASON_UNSUPPORTED_MEDIA_TYPE
    assert [field for field, _ in refused.value.violations] == ["file.content_type"]


def test_media_size_limits_are_per_kind() -> None:
    mib = 1024 * 1024
    assert contents.check_media("song", "audio/wav", 50 * mib) == "wav"
    assert contents.check_media("choreography", "video/mp4", 500 * mib) == "mp4"
    for kind, content_type, size in (("song", "audio/wav", 50 * mib + 1), ("choreography", "video/mp4", 500 * mib + 1)):
        with pytest.raises(InvalidArgument) as refused:
            contents.check_media(kind, content_type, size)
        assert refused.value.reason == ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE
    with pytest.raises(InvalidArgument) as empty:
        contents.check_media("song", "audio/wav", 0)
    assert empty.value.violations == (("file.data", "required"),)


def test_media_keys() -> None:
    assert contents.media_key("kzone", "org-a", "c1", "u1", "wav") == "kzone/kzone/org-a/contents/c1/u1/media.wav"
    assert contents.keypoints_key("kzone", "org-a", "c1", "u1") == "kzone/kzone/org-a/contents/c1/u1/keypoints.json"


# --- results ---------------------------------------------------------------------------------------------------

RESULT = ResultFacts(zone_id="kzone", org_id="org-a", user_id="student-1")


@pytest.mark.parametrize(
    ("reader", "readable"),
    [
        (person("student", user="student-1"), True),
        (person("student", user="student-2"), False),
        (person("guest", user="guest-9"), False),
        (person("teacher"), True),
        (person("teacher", org="org-b"), False),
        (person("org_admin"), True),
        (person("org_admin", org="org-b"), False),
        (person("zone_admin", org="org-b"), True),
        (person("zone_admin", zone="univ"), False),
        (person("super_admin", zone="univ"), True),
        (person("parent", org="org-b"), False),
        (person("teacher", zone="univ"), False),
    ],
)
def test_who_reads_a_result(reader: AccessClaims, readable: bool) -> None:
    assert results.may_read(reader, RESULT) is readable


def test_an_approved_parent_reads_their_childs_results() -> None:
    parent = person("parent", org="org-b")
    assert results.needs_parent_check(parent, RESULT)
    assert results.may_read(parent, RESULT, approved_parent=True)
    assert not results.needs_parent_check(person("teacher"), RESULT)
    assert not results.needs_parent_check(person("parent", zone="univ"), RESULT)


@pytest.mark.parametrize(
    ("deleter", "allowed"),
    [
        (person("student", user="student-1"), True),
        (person("teacher"), False),
        (person("parent"), False),
        (person("org_admin"), True),
        (person("org_admin", org="org-b"), False),
        (person("zone_admin", org="org-b"), True),
        (person("super_admin", zone="univ"), True),
    ],
)
def test_who_deletes_a_result(deleter: AccessClaims, allowed: bool) -> None:
    assert results.may_delete(deleter, RESULT) is allowed


def test_whose_results_a_person_lists() -> None:
    student = person("student", user="student-1")
    assert results.listing(student, "") == results.Listing(False, "student-1", None)
    assert results.listing(student, "student-1") == results.Listing(False, "student-1", None)
    with pytest.raises(PermissionDenied):
        results.listing(student, "student-2")
    assert results.listing(person("teacher"), "") == results.Listing(False, None, "org-a")
    assert results.listing(person("teacher"), "student-1") == results.Listing(False, "student-1", "org-a")
    assert results.listing(person("zone_admin"), "") == results.Listing(False, None, None)
    assert results.listing(person("super_admin"), "s") == results.Listing(True, "s", None)
    assert results.listing(person("parent"), "student-1") == results.Listing(False, "student-1", None, "student-1")
    with pytest.raises(InvalidArgument):
        results.listing(person("parent"), "")
