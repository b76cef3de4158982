"""Reference content, pure rules (no I/O): who may create, read and change references, what a valid reference and
a valid upload of its media are, and applying an update mask.

Who may do what (the RPCs need no permission of the role table: any signed-in person, and this decides):
- create, and upload media: teachers, org admins, zone admins and super admins; learners (students, guests,
  parents) may not.
- read: super admins everything; zone admins their zone's; teachers and org admins their organisation's in any
  status; learners their organisation's once READY. Everyone also reads the zone's public references once READY.
- change (update, upload media, delete): the creator (still staff, still of its organisation), admins of its
  organisation, its zone's admins, super admins.
A reference a person may not read does not exist for them (NOT_FOUND); one they read but may not change is
PERMISSION_DENIED.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from google.protobuf import duration_pb2, field_mask_pb2

from megacity.kzone.v1 import resources_pb2 as res
from services.runtime.errors import ErrorReason, InvalidArgument, Violations
from services.runtime.tokens import AccessClaims

STAFF = frozenset({"teacher", "org_admin", "zone_admin", "super_admin"})

KINDS = {res.REFERENCE_KIND_SONG: "song", res.REFERENCE_KIND_CHOREOGRAPHY: "choreography"}
KIND_VALUES = {name: value for value, name in KINDS.items()}
STATUSES = {
    res.REFERENCE_STATUS_AWAITING_MEDIA: "awaiting_media",
    res.REFERENCE_STATUS_PROCESSING: "processing",
    res.REFERENCE_STATUS_READY: "ready",
    res.REFERENCE_STATUS_FAILED: "failed",
}
STATUS_VALUES = {name: value for value, name in STATUSES.items()}
READY = "ready"

# What creators write; the rest is the server's (ids, tenancy, status, media, times) or fixed at creation (kind).
UPDATABLE_FIELDS = frozenset(
    {
        "title",
        "artist",
        "description",
        "language",
        "lyrics",
        "is_public",
        "tempo_bpm",
        "beats_per_bar",
        "first_downbeat_offset",
    }
)
OUTPUT_ONLY_FIELDS = frozenset(
    {
        "id",
        "zone_id",
        "org_id",
        "status",
        "processing_error",
        "media_uri",
        "media_content_type",
        "duration",
        "processing_job_id",
        "creator_id",
        "create_time",
        "update_time",
    }
)

MAX_TITLE = 200
MAX_ARTIST = 200
MAX_DESCRIPTION = 5000
MAX_LYRICS = 20_000
MIN_TEMPO, MAX_TEMPO = 20.0, 400.0
MAX_BEATS_PER_BAR = 32
MAX_DOWNBEAT_SECONDS = 3600.0
MAX_QUERY = 200
# BCP-47 as the platform uses it: a language subtag, then optional script/region/variant subtags.
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*")
_MAX_LANGUAGE = 35

_MIB = 1024 * 1024
# Media a reference takes, by kind: media type -> file extension of its stored object. The size limits are the
# edge's for these routes (gateway/envoy_config.py): 50 MiB of audio, 500 MiB of video.
AUDIO_TYPES = {
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/mpeg": "mp3",
    "audio/ogg": "ogg",
    "audio/webm": "webm",
    "audio/mp4": "m4a",
}
VIDEO_TYPES = {"video/mp4": "mp4", "video/webm": "webm", "video/quicktime": "mov"}
MEDIA_TYPES = {"song": AUDIO_TYPES, "choreography": VIDEO_TYPES}
MAX_MEDIA_BYTES = {"song": 50 * _MIB, "choreography": 500 * _MIB}


@dataclass(frozen=True)
class ContentFacts:
    """What the access rules look at of a stored reference."""

    zone_id: str
    org_id: str
    creator_id: str
    is_public: bool
    status: str


def may_create(person: AccessClaims) -> bool:
    return person.role in STAFF


def may_read(person: AccessClaims, content: ContentFacts) -> bool:
    if person.role == "super_admin":
        return True
    if person.zone_id != content.zone_id:
        return False
    if person.role == "zone_admin":
        return True
    if content.org_id == person.org_id and (person.role in STAFF or content.status == READY):
        return True
    return content.is_public and content.status == READY


def may_change(person: AccessClaims, content: ContentFacts) -> bool:
    """Update, upload media, delete."""
    if person.role == "super_admin":
        return True
    if person.zone_id != content.zone_id or person.role not in STAFF:
        return False
    if person.role == "zone_admin":
        return True
    if person.org_id != content.org_id:
        return False
    return person.role == "org_admin" or person.user_id == content.creator_id


@dataclass(frozen=True)
class Listing:
    """Which references a person lists, in the form the store's query takes (the same rule as `may_read`):
    everything of the tenant scope (`everything`), else their organisation's (any status when `own_any_status`,
    else READY ones) and the zone's public READY ones."""

    platform: bool
    everything: bool
    org_id: str
    own_any_status: bool


def listing(person: AccessClaims) -> Listing:
    return Listing(
        platform=person.role == "super_admin",
        everything=person.role in ("super_admin", "zone_admin"),
        org_id=person.org_id,
        own_any_status=person.role in STAFF,
    )


# --- validation ------------------------------------------------------------------------------------------------


def duration_seconds(duration: duration_pb2.Duration) -> float:
    return duration.ToNanoseconds() / 1e9


def seconds_duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _valid_duration(duration: duration_pb2.Duration) -> bool:
    """A well-formed Duration (nanos within range and of the seconds' sign)."""
    if not -999_999_999 <= duration.nanos <= 999_999_999:
        return False
    return not ((duration.seconds > 0 and duration.nanos < 0) or (duration.seconds < 0 and duration.nanos > 0))


def check_content(violations: Violations, content: res.ReferenceContent, prefix: str = "content") -> None:
    """Adds a violation for each problem of a reference's written fields (the stored kind included)."""
    kind = KINDS.get(content.kind)
    violations.check(kind is not None, f"{prefix}.kind", "REFERENCE_KIND_SONG or REFERENCE_KIND_CHOREOGRAPHY")
    title = content.title.strip()
    violations.check(0 < len(title) <= MAX_TITLE, f"{prefix}.title", f"required, at most {MAX_TITLE} characters")
    violations.check(len(content.artist.strip()) <= MAX_ARTIST, f"{prefix}.artist", f"at most {MAX_ARTIST} characters")
    violations.check(
        len(content.description) <= MAX_DESCRIPTION, f"{prefix}.description", f"at most {MAX_DESCRIPTION} characters"
    )
    language = content.language.strip()
    violations.check(
        not language or (len(language) <= _MAX_LANGUAGE and _LANGUAGE.fullmatch(language) is not None),
        f"{prefix}.language",
        "a BCP-47 language tag (ko, en, ja, en-US)",
    )
    violations.check(len(content.lyrics) <= MAX_LYRICS, f"{prefix}.lyrics", f"at most {MAX_LYRICS} characters")
    violations.check(
        not content.lyrics or kind != "choreography", f"{prefix}.lyrics", "only songs have lyrics; leave it empty"
    )
    tempo = content.tempo_bpm
    violations.check(
        tempo == 0 or (math.isfinite(tempo) and MIN_TEMPO <= tempo <= MAX_TEMPO),
        f"{prefix}.tempo_bpm",
        f"0 (detect it) or {MIN_TEMPO:g} to {MAX_TEMPO:g}",
    )
    violations.check(
        0 <= content.beats_per_bar <= MAX_BEATS_PER_BAR,
        f"{prefix}.beats_per_bar",
        f"1 to {MAX_BEATS_PER_BAR} (0: the default 4)",
    )
    if content.HasField("first_downbeat_offset"):
        offset = content.first_downbeat_offset
        violations.check(
            _valid_duration(offset) and 0 <= duration_seconds(offset) <= MAX_DOWNBEAT_SECONDS,
            f"{prefix}.first_downbeat_offset",
            f"0 to {MAX_DOWNBEAT_SECONDS:g}s from the start of the media (unset: detect it)",
        )


def normalized(content: res.ReferenceContent) -> res.ReferenceContent:
    """The written fields as stored: trimmed text, the default beats per bar."""
    result = res.ReferenceContent()
    result.CopyFrom(content)
    result.title = content.title.strip()
    result.artist = content.artist.strip()
    result.language = content.language.strip()
    result.beats_per_bar = content.beats_per_bar or 4
    return result


def update_paths(current: res.ReferenceContent, given: res.ReferenceContent, mask: list[str]) -> list[str]:
    """The fields an update changes: the mask's (each must be updatable), or without a mask the fields `given`
    sets, ignoring output-only ones (a client may send back what it read) and an unchanged kind."""
    if mask:
        unknown = sorted(set(mask) - UPDATABLE_FIELDS)
        if unknown:
            raise InvalidArgument(
                "update_mask names fields that cannot change",
                [("update_mask", f"{', '.join(unknown)}: not one of {', '.join(sorted(UPDATABLE_FIELDS))}")],
            )
        return sorted(set(mask))
    paths = {field.name for field, _ in given.ListFields()} - OUTPUT_ONLY_FIELDS
    if "kind" in paths:
        if given.kind != current.kind:
            raise InvalidArgument("a reference's kind cannot change", [("content.kind", "immutable")])
        paths.discard("kind")
    return sorted(paths)


def merged(current: res.ReferenceContent, given: res.ReferenceContent, paths: list[str]) -> res.ReferenceContent:
    """`current` with the fields of `given` named by `paths` (a masked field `given` leaves unset is cleared:
    first_downbeat_offset unset means "detect it")."""
    result = res.ReferenceContent()
    result.CopyFrom(current)
    field_mask_pb2.FieldMask(paths=paths).MergeMessage(given, result, replace_message_field=True)
    return result


# --- media -----------------------------------------------------------------------------------------------------


def media_type(content_type: str) -> str:
    """The media type of a Content-Type header, without parameters, lower case (`audio/ogg; codecs=opus` ->
    `audio/ogg`)."""
    return content_type.split(";", 1)[0].strip().lower()


def check_media(kind: str, content_type: str, size: int) -> str:
    """The extension the media is stored under; INVALID_ARGUMENT for a type the kind does not take
    (UNSUPPORTED_MEDIA_TYPE), an empty file, or one over the kind's limit (PAYLOAD_TOO_LARGE)."""
    accepted = MEDIA_TYPES[kind]
    essence = media_type(content_type)
    if essence not in accepted:
        what = "audio" if kind == "song" else "video"
        raise InvalidArgument(
            f"a {kind} takes {what} media, not {essence or 'an unnamed type'}",
            [("file.content_type", f"one of {', '.join(accepted)}")],
            reason=ErrorReason.ERROR_REASON_UNSUPPORTED_MEDIA_TYPE,
            metadata={"content_type": content_type[:100]},
        )
    if size == 0:
        raise InvalidArgument("the file is empty", [("file.data", "required")])
    limit = MAX_MEDIA_BYTES[kind]
    if size > limit:
        raise InvalidArgument(
            f"the file is larger than {limit // _MIB} MiB",
            [("file.data", f"at most {limit} bytes for a {kind}")],
            reason=ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
            metadata={"max_bytes": str(limit)},
        )
    return accepted[essence]


def upload_prefix(zone_id: str, org_id: str, content_id: str, upload_id: str) -> str:
    """Where one upload of a reference's media and what is extracted from it live. Each upload has its own (the
    upload id is the extraction's, `processing_job_id`), so replacing media never overwrites the object a stored
    row or a running extraction still reads."""
    return f"kzone/{zone_id}/{org_id}/contents/{content_id}/{upload_id}"


def media_key(zone_id: str, org_id: str, content_id: str, upload_id: str, extension: str) -> str:
    return f"{upload_prefix(zone_id, org_id, content_id, upload_id)}/media.{extension}"


def keypoints_key(zone_id: str, org_id: str, content_id: str, upload_id: str) -> str:
    """Where the extraction worker keeps a choreography's keypoints (ReferenceFeatures.keypoints_uri)."""
    return f"{upload_prefix(zone_id, org_id, content_id, upload_id)}/keypoints.json"
