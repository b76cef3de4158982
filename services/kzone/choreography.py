"""Dance: a learner's pose sequence scored against a reference choreography, with feedback per body part.

Poses are MediaPipe's 33 landmarks per frame (image coordinates, x across and y down, 0 to 1, with a visibility
each). Before comparing, every frame is moved so that the midpoint of the hips is the origin, and each sequence is
scaled so that its median torso (shoulder midpoint to hip midpoint) is 1: the learner may stand anywhere in the
picture and at any distance from the camera. The median rather than each frame's own torso keeps a bow, which
foreshortens the torso, from inflating the whole skeleton. Depth (z) is left out: a single camera's depth estimates
are too noisy to score.

A learner facing the screen often mirrors the reference (raises their right arm for the reference's left). The
mirror image (x negated, left and right landmarks swapped) is compared too and the closer of the two wins, unless
the caller fixes it. Feedback names the learner's own body parts either way.

Frames are aligned by dynamic time warping on the mean distance between corresponding landmarks, each weighted by
how visible it is in both frames. The alignment gives the learner's timing (how far each reference frame's match is
from where it should be) and, pair by pair, how far the pose was off. Both are reported per segment of the
choreography: bars on the reference's beat grid, or fixed windows when it has none.

Within a segment a single limb can be badly wrong while the body as a whole dances well, so each body part is
judged on its own. A part that lags the music does not bend the body's alignment, so its timing comes from shifting
that part alone against the reference: when some shift explains most of its error, the part was late or early by
that much. Otherwise its movement was too small or too large (its spread around its mean position), or simply out
of position, with the mean angle between its bones and the reference's.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.kzone.dtw import warp
from services.kzone.scores import score_from_distance

Floats: TypeAlias = NDArray[np.float64]
Indices: TypeAlias = NDArray[np.intp]


class PoseLandmark(enum.IntEnum):
    """MediaPipe's 33 pose landmarks, by index. "Left" is the person's left."""

    NOSE = 0
    LEFT_EYE_INNER = 1
    LEFT_EYE = 2
    LEFT_EYE_OUTER = 3
    RIGHT_EYE_INNER = 4
    RIGHT_EYE = 5
    RIGHT_EYE_OUTER = 6
    LEFT_EAR = 7
    RIGHT_EAR = 8
    MOUTH_LEFT = 9
    MOUTH_RIGHT = 10
    LEFT_SHOULDER = 11
    RIGHT_SHOULDER = 12
    LEFT_ELBOW = 13
    RIGHT_ELBOW = 14
    LEFT_WRIST = 15
    RIGHT_WRIST = 16
    LEFT_PINKY = 17
    RIGHT_PINKY = 18
    LEFT_INDEX = 19
    RIGHT_INDEX = 20
    LEFT_THUMB = 21
    RIGHT_THUMB = 22
    LEFT_HIP = 23
    RIGHT_HIP = 24
    LEFT_KNEE = 25
    RIGHT_KNEE = 26
    LEFT_ANKLE = 27
    RIGHT_ANKLE = 28
    LEFT_HEEL = 29
    RIGHT_HEEL = 30
    LEFT_FOOT_INDEX = 31
    RIGHT_FOOT_INDEX = 32


LANDMARK_COUNT = len(PoseLandmark)


def _other_side(name: str) -> str:
    """The name with left and right swapped: LEFT_WRIST is RIGHT_WRIST, MOUTH_RIGHT is MOUTH_LEFT, NOSE is NOSE."""
    return name.replace("LEFT", "\0").replace("RIGHT", "LEFT").replace("\0", "RIGHT")


def _mirror_of(landmark: PoseLandmark) -> PoseLandmark:
    return PoseLandmark[_other_side(landmark.name)]


# MIRROR_ORDER[i] is the landmark that lands on landmark i when the body is seen in a mirror.
MIRROR_ORDER: Indices = np.array([_mirror_of(landmark) for landmark in PoseLandmark], dtype=np.intp)


class BodyPart(enum.IntEnum):
    """Parts of the body that feedback names (the values of megacity.kzone.v1.BodyPart)."""

    HEAD = 1
    TORSO = 2
    LEFT_ARM = 3
    RIGHT_ARM = 4
    LEFT_LEG = 5
    RIGHT_LEG = 6
    LEFT_FOOT = 7
    RIGHT_FOOT = 8

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")

    @property
    def mirrored(self) -> BodyPart:
        """The same part on the other side of the body."""
        return BodyPart[_other_side(self.name)]


class DeviationKind(enum.IntEnum):
    """How a body part deviates (the values of megacity.kzone.v1.DeviationKind)."""

    LATE = 1
    EARLY = 2
    POSITION = 3
    TOO_SMALL = 4
    TOO_LARGE = 5


class MirrorMode(enum.Enum):
    """Whether the learner is compared as a mirror image (megacity.kzone.v1.MirrorMode; AUTO tries both)."""

    AUTO = "auto"
    MIRRORED = "mirrored"
    NOT_MIRRORED = "not_mirrored"


class _Geometry(NamedTuple):
    """A body part's landmarks whose positions are compared, and its bones (landmark pairs) whose angles are."""

    landmarks: tuple[PoseLandmark, ...]
    bones: tuple[tuple[PoseLandmark, PoseLandmark], ...]


_L = PoseLandmark
_LEFT_SIDE_PARTS = {
    BodyPart.LEFT_ARM: _Geometry(
        (_L.LEFT_ELBOW, _L.LEFT_WRIST, _L.LEFT_INDEX),
        ((_L.LEFT_SHOULDER, _L.LEFT_ELBOW), (_L.LEFT_ELBOW, _L.LEFT_WRIST), (_L.LEFT_WRIST, _L.LEFT_INDEX)),
    ),
    BodyPart.LEFT_LEG: _Geometry(
        (_L.LEFT_KNEE, _L.LEFT_ANKLE), ((_L.LEFT_HIP, _L.LEFT_KNEE), (_L.LEFT_KNEE, _L.LEFT_ANKLE))
    ),
    BodyPart.LEFT_FOOT: _Geometry(
        (_L.LEFT_HEEL, _L.LEFT_FOOT_INDEX),
        ((_L.LEFT_ANKLE, _L.LEFT_HEEL), (_L.LEFT_HEEL, _L.LEFT_FOOT_INDEX)),
    ),
}


# Each compared landmark belongs to one part; the face's many landmarks are represented by the nose and ears, so
# that the head does not outweigh the limbs.
_PARTS: Mapping[BodyPart, _Geometry] = {
    BodyPart.HEAD: _Geometry(
        (_L.NOSE, _L.LEFT_EAR, _L.RIGHT_EAR),
        ((_L.LEFT_EAR, _L.RIGHT_EAR), (_L.LEFT_SHOULDER, _L.NOSE), (_L.RIGHT_SHOULDER, _L.NOSE)),
    ),
    BodyPart.TORSO: _Geometry(
        (_L.LEFT_SHOULDER, _L.RIGHT_SHOULDER, _L.LEFT_HIP, _L.RIGHT_HIP),
        (
            (_L.LEFT_SHOULDER, _L.RIGHT_SHOULDER),
            (_L.LEFT_HIP, _L.RIGHT_HIP),
            (_L.LEFT_HIP, _L.LEFT_SHOULDER),
            (_L.RIGHT_HIP, _L.RIGHT_SHOULDER),
        ),
    ),
    **_LEFT_SIDE_PARTS,
    **{
        part.mirrored: _Geometry(
            tuple(_mirror_of(landmark) for landmark in geometry.landmarks),
            tuple((_mirror_of(start), _mirror_of(end)) for start, end in geometry.bones),
        )
        for part, geometry in _LEFT_SIDE_PARTS.items()
    },
}
_COMPARED: Indices = np.array([landmark for part in _PARTS.values() for landmark in part.landmarks], dtype=np.intp)
# Where each compared landmark sits in _COMPARED (the column of the normalised arrays), and each part's columns.
_COLUMN: Mapping[PoseLandmark, int] = {PoseLandmark(landmark): column for column, landmark in enumerate(_COMPARED)}
_PART_COLUMNS: Mapping[BodyPart, Indices] = {
    part: np.array([_COLUMN[landmark] for landmark in geometry.landmarks], dtype=np.intp)
    for part, geometry in _PARTS.items()
}

# Distances are in torso lengths: a landmark a quarter of a torso away from the reference's scores half.
_HALF_SCORE_DISTANCE = 0.25
# Being a quarter of a second off the reference (half a beat at 120 BPM) scores half for timing.
_HALF_SCORE_OFFSET = 0.25
# Overall, doing the right moves counts for more than doing them at exactly the right time.
_ACCURACY_WEIGHT = 0.7
# While the dancer holds still every alignment costs the same; a small price per warping step keeps the path on the
# diagonal there instead of wandering, which would read as timing errors.
_WARP_STEP_COST = 0.02
# Landmarks nobody can see still weigh this much, so a frame where nothing is visible has a defined cost.
_MIN_WEIGHT = 1e-3
# How far learners are let drift from the reference (seconds), beyond a uniform difference in speed.
_DEFAULT_MAX_OFFSET = 2.0
# Segments without a beat grid: two bars at 120 BPM.
_FALLBACK_SEGMENT_SECONDS = 4.0
# A part scoring below this in a segment is reported, worst first, at most _DEVIATIONS_PER_SEGMENT of them.
_LOW_PART_SCORE = 70.0
_DEVIATIONS_PER_SEGMENT = 3
_TOP_DEVIATIONS = 5
# Timing of a single part: shifts up to a second are tried; one that removes at least three quarters of the part's
# error and is at least a tenth of a second is the part being late or early. (Among a second's worth of shifts of a
# part that is simply wrong, one often happens to remove half of its error.)
_MAX_PART_LAG = 1.0
_MIN_PART_LAG = 0.1
_LAG_EXPLAINS = 0.25
# A part whose movement spreads less than 0.6 (more than 1 / 0.6) times the reference's moved too little (much);
# movements smaller than a tenth of a torso are holds, whose size says nothing.
_AMPLITUDE_RATIO = 0.6
_MIN_AMPLITUDE = 0.1


@dataclass(frozen=True)
class PoseSequence:
    """Poses over time: `timestamps` (seconds, increasing), `landmarks` (frames x 33 x 3: x, y, z in MediaPipe's
    image coordinates, x a share of the width and y of the height) and `visibility` (frames x 33, 0 to 1), from
    frames `aspect_ratio` (width / height) wide. Frames without a detected person should be left out rather than
    given zero visibility. Construction checks shapes (ValueError) and keeps read-only copies."""

    timestamps: Floats
    landmarks: Floats
    visibility: Floats
    aspect_ratio: float = 1.0

    def __post_init__(self) -> None:
        timestamps = _read_only(self.timestamps)
        landmarks = _read_only(self.landmarks)
        visibility = _read_only(self.visibility)
        frames = timestamps.shape[0] if timestamps.ndim == 1 else -1
        if frames < 1 or np.any(np.diff(timestamps) <= 0):
            raise ValueError("timestamps must be a non-empty, strictly increasing 1-D array")
        if landmarks.shape != (frames, LANDMARK_COUNT, 3):
            raise ValueError(f"landmarks must have shape ({frames}, {LANDMARK_COUNT}, 3), got {landmarks.shape}")
        if visibility.shape != (frames, LANDMARK_COUNT):
            raise ValueError(f"visibility must have shape ({frames}, {LANDMARK_COUNT}), got {visibility.shape}")
        if not self.aspect_ratio > 0:
            raise ValueError(f"aspect_ratio must be positive, got {self.aspect_ratio}")
        object.__setattr__(self, "timestamps", timestamps)
        object.__setattr__(self, "landmarks", landmarks)
        object.__setattr__(self, "visibility", visibility)

    def __len__(self) -> int:
        return int(self.timestamps.size)

    @property
    def frame_period(self) -> float:
        """The typical time between frames (the median, robust to a dropped frame); 1 s for a single frame."""
        return float(np.median(np.diff(self.timestamps))) if len(self) > 1 else 1.0


@dataclass(frozen=True)
class BeatGrid:
    """The reference's bars: tempo, beats per bar, the time of bar 1's first beat (seconds in the reference), and
    how many bars make a scored segment. Frames before the first downbeat belong to bar 1."""

    tempo_bpm: float
    beats_per_bar: int = 4
    first_downbeat: float = 0.0
    bars_per_segment: int = 1

    def __post_init__(self) -> None:
        if self.tempo_bpm <= 0 or self.beats_per_bar < 1 or self.bars_per_segment < 1:
            raise ValueError("tempo_bpm, beats_per_bar and bars_per_segment must be positive")

    @property
    def segment_duration(self) -> float:
        return 60.0 / self.tempo_bpm * self.beats_per_bar * self.bars_per_segment


@dataclass(frozen=True)
class JointDeviation:
    """One body part deviating over a run of segments. `severity` is 0 to 1 (1 = the largest deviation of the
    dance); `timing_offset` is in seconds, positive = late (meaningful for LATE and EARLY); the angle difference is
    the mean angle between the part's bones and the reference's, in degrees; `start_bar` and `end_bar` are 1-based
    bars of the beat grid (segment windows without one), `start_time` and `end_time` the stretch of the reference
    in seconds; `message` says it for people: "left arm late in bars 5-6"."""

    body_part: BodyPart
    kind: DeviationKind
    severity: float
    timing_offset: float
    angle_difference_degrees: float
    start_bar: int
    end_bar: int
    start_time: float
    end_time: float
    message: str


@dataclass(frozen=True)
class SegmentScore:
    """One segment: `index` from 0, its bars, where it fell in the learner's timeline (`start_offset`, `end_offset`,
    seconds), its 0-100 score, the learner's mean timing offset in it (positive = late), and its deviating parts,
    worst first."""

    index: int
    start_bar: int
    end_bar: int
    start_offset: float
    end_offset: float
    score: float
    timing_offset: float
    deviations: tuple[JointDeviation, ...]


@dataclass(frozen=True)
class DanceAnalysis:
    """A whole dance: whether the learner was compared as a mirror image, 0-100 scores (pose accuracy after time
    alignment, timing, and overall), the mean timing offset (seconds, positive = late), the segments in order, the
    largest deviations worst first (runs of segments merged), and the feedback sentences for them."""

    mirrored: bool
    accuracy: float
    timing: float
    overall: float
    mean_timing_offset: float
    segments: tuple[SegmentScore, ...]
    top_deviations: tuple[JointDeviation, ...]
    feedback: tuple[str, ...]


def normalise_poses(sequence: PoseSequence) -> Floats:
    """The compared landmarks' x and y (frames x compared landmarks x 2), hip midpoint at the origin and the median
    torso length 1. x is scaled by the aspect ratio first, so that both axes measure the same distance."""
    xy = sequence.landmarks[:, :, :2] * np.array([sequence.aspect_ratio, 1.0])
    hips = (xy[:, PoseLandmark.LEFT_HIP] + xy[:, PoseLandmark.RIGHT_HIP]) / 2
    shoulders = (xy[:, PoseLandmark.LEFT_SHOULDER] + xy[:, PoseLandmark.RIGHT_SHOULDER]) / 2
    torso = float(np.median(np.linalg.norm(shoulders - hips, axis=1)))
    if torso <= 0:
        raise ValueError("the poses have no torso (shoulders and hips coincide)")
    return np.asarray((xy[:, _COMPARED] - hips[:, None, :]) / torso, dtype=np.float64)


def mirror_poses(sequence: PoseSequence) -> PoseSequence:
    """The sequence as seen in a mirror: x flipped about the picture's middle, left and right swapped."""
    landmarks = sequence.landmarks[:, MIRROR_ORDER].copy()
    landmarks[:, :, 0] = 1.0 - landmarks[:, :, 0]
    return PoseSequence(sequence.timestamps, landmarks, sequence.visibility[:, MIRROR_ORDER], sequence.aspect_ratio)


def score_dance(
    reference: PoseSequence,
    learner: PoseSequence,
    grid: BeatGrid | None = None,
    *,
    mirror: MirrorMode = MirrorMode.AUTO,
    reference_start: float | None = None,
    max_offset: float = _DEFAULT_MAX_OFFSET,
) -> DanceAnalysis:
    """Scores a learner's dance against the reference over the same stretch of choreography.

    Learner time 0 is reference time `reference_start` (default: the reference's first frame). The learner may be
    up to `max_offset` seconds ahead or behind beyond a uniform difference in speed. `grid` segments the reference
    into bars; without it, segments are fixed windows."""
    candidates = {
        MirrorMode.NOT_MIRRORED: [False],
        MirrorMode.MIRRORED: [True],
        MirrorMode.AUTO: [False, True],
    }[mirror]
    comparisons = [
        _Comparison.align(reference, mirror_poses(learner) if flip else learner, flip, max_offset)
        for flip in candidates
    ]
    comparison = min(comparisons, key=lambda candidate: candidate.mean_cost)
    start = reference.timestamps[0] if reference_start is None else reference_start
    return comparison.analyse(grid, float(start))


@dataclass(frozen=True)
class _Finding:
    """A body part deviating through a run of segments (a single one until runs are merged), before its severity,
    which depends on the whole dance, is known."""

    part: BodyPart
    kind: DeviationKind
    error: float
    timing_offset: float
    angle_difference: float
    first_segment: int
    last_segment: int


@dataclass(frozen=True)
class _Segments:
    """Which segment each reference frame belongs to, and how segments are numbered and named."""

    of_frame: Indices
    bars_per_segment: int
    duration: float
    origin: float
    on_beat_grid: bool

    @staticmethod
    def of(reference_times: Floats, grid: BeatGrid | None) -> _Segments:
        if grid is None:
            origin, duration, bars = 0.0, _FALLBACK_SEGMENT_SECONDS, 1
        else:
            origin, duration, bars = grid.first_downbeat, grid.segment_duration, grid.bars_per_segment
        of_frame = np.maximum(np.floor((reference_times - origin) / duration), 0).astype(np.intp)
        return _Segments(of_frame, bars, duration, origin, grid is not None)

    def bars(self, first_segment: int, last_segment: int) -> tuple[int, int]:
        return first_segment * self.bars_per_segment + 1, (last_segment + 1) * self.bars_per_segment

    def times(self, first_segment: int, last_segment: int) -> tuple[float, float]:
        return self.origin + first_segment * self.duration, self.origin + (last_segment + 1) * self.duration

    def describe(self, first_segment: int, last_segment: int) -> str:
        if not self.on_beat_grid:
            start, end = self.times(first_segment, last_segment)
            return f"at {_clock(start)}-{_clock(end)}"
        first_bar, last_bar = self.bars(first_segment, last_segment)
        return f"in bar {first_bar}" if first_bar == last_bar else f"in bars {first_bar}-{last_bar}"


@dataclass(frozen=True)
class _Comparison:
    """The reference and the learner (mirrored or not), normalised, with the cheapest alignment between them."""

    reference: PoseSequence
    learner: PoseSequence
    reference_xy: Floats
    learner_xy: Floats
    reference_weight: Floats
    learner_weight: Floats
    mirrored: bool
    path: Indices
    mean_cost: float

    @staticmethod
    def align(reference: PoseSequence, learner: PoseSequence, mirrored: bool, max_offset: float) -> _Comparison:
        reference_xy, learner_xy = normalise_poses(reference), normalise_poses(learner)
        reference_weight = reference.visibility[:, _COMPARED]
        learner_weight = learner.visibility[:, _COMPARED]

        def local_cost(row: int, columns: slice) -> Floats:
            distance, weight = _landmark_distances(
                reference_xy[row], reference_weight[row], learner_xy[columns], learner_weight[columns]
            )
            return _weighted_mean(distance, weight, axis=1)

        band = max_offset / learner.frame_period
        warping = warp(len(reference), len(learner), local_cost, band, _WARP_STEP_COST)
        return _Comparison(
            reference,
            learner,
            reference_xy,
            learner_xy,
            reference_weight,
            learner_weight,
            mirrored,
            warping.path,
            warping.mean_cost,
        )

    def analyse(self, grid: BeatGrid | None, reference_start: float) -> DanceAnalysis:
        rows, columns = self.path[:, 0], self.path[:, 1]
        distance, weight = _landmark_distances(
            self.reference_xy[rows], self.reference_weight[rows], self.learner_xy[columns], self.learner_weight[columns]
        )
        pair_scores = score_from_distance(_weighted_mean(distance, weight, axis=1), _HALF_SCORE_DISTANCE)
        learner_times = self.learner.timestamps[columns]
        offsets = learner_times - (self.reference.timestamps[rows] - reference_start)

        segments = _Segments.of(self.reference.timestamps, grid)
        pair_segment = segments.of_frame[rows]
        indices = np.unique(pair_segment).tolist()
        masks = [pair_segment == index for index in indices]
        findings = [
            self._findings(index, mask, distance, weight, float(offsets[mask].mean()))
            for index, mask in zip(indices, masks, strict=True)
        ]
        worst = max((finding.error for found in findings for finding in found), default=1.0)
        scored_segments = []
        for index, mask, found in zip(indices, masks, findings, strict=True):
            first_bar, last_bar = segments.bars(index, index)
            scored_segments.append(
                SegmentScore(
                    index=index,
                    start_bar=first_bar,
                    end_bar=last_bar,
                    start_offset=float(learner_times[mask].min()),
                    end_offset=float(learner_times[mask].max()),
                    score=float(pair_scores[mask].mean()),
                    timing_offset=float(offsets[mask].mean()),
                    deviations=tuple(_deviation(finding, worst, segments) for finding in found),
                )
            )
        runs = sorted(_merge_runs([finding for found in findings for finding in found]), key=lambda run: -run.error)
        top = tuple(_deviation(run, worst, segments) for run in runs[:_TOP_DEVIATIONS])
        accuracy = float(pair_scores.mean())
        timing = score_from_distance(float(np.abs(offsets).mean()), _HALF_SCORE_OFFSET)
        mean_offset = float(offsets.mean())
        return DanceAnalysis(
            mirrored=self.mirrored,
            accuracy=accuracy,
            timing=timing,
            overall=_ACCURACY_WEIGHT * accuracy + (1 - _ACCURACY_WEIGHT) * timing,
            mean_timing_offset=mean_offset,
            segments=tuple(scored_segments),
            top_deviations=top,
            feedback=(*_timing_advice(mean_offset), *(deviation.message for deviation in top)),
        )

    def _findings(
        self, segment: int, in_segment: NDArray[np.bool_], distance: Floats, weight: Floats, segment_offset: float
    ) -> list[_Finding]:
        """The parts that deviate most in a segment, worst first."""
        errors = {
            part: float(_weighted_mean(distance[in_segment][:, columns], weight[in_segment][:, columns], axis=(0, 1)))
            for part, columns in _PART_COLUMNS.items()
        }
        low = sorted(
            (
                part
                for part, error in errors.items()
                if score_from_distance(error, _HALF_SCORE_DISTANCE) < _LOW_PART_SCORE
            ),
            key=lambda part: -errors[part],
        )
        pairs = self.path[in_segment]
        return [
            self._classify(part, errors[part], pairs, segment, segment_offset) for part in low[:_DEVIATIONS_PER_SEGMENT]
        ]

    def _classify(self, part: BodyPart, error: float, pairs: Indices, segment: int, segment_offset: float) -> _Finding:
        """How a part deviates in a segment, given the segment's pairs of the alignment."""
        part_columns = _PART_COLUMNS[part]
        # The learner frame matched with each reference frame of the segment (the mean where there are several).
        frames, first_pair = np.unique(pairs[:, 0], return_index=True)
        pair_counts = np.diff(np.append(first_pair, len(pairs)))
        matched = np.round(np.add.reduceat(pairs[:, 1], first_pair) / pair_counts).astype(np.intp)
        reference_part = self.reference_xy[frames][:, part_columns]
        learner_part = self.learner_xy[matched][:, part_columns]
        angle = _mean_angle_difference(self.reference_xy[frames], self.learner_xy[matched], _PARTS[part].bones)

        def finding(kind: DeviationKind, timing_offset: float) -> _Finding:
            # Parts are named as the learner's own: compared as a mirror image, their left arm danced the
            # reference's right.
            named = part.mirrored if self.mirrored else part
            return _Finding(named, kind, error, timing_offset, angle, segment, segment)

        max_lag = max(1, round(_MAX_PART_LAG / self.learner.frame_period))
        lags = np.arange(-max_lag, max_lag + 1)
        shifted = np.clip(matched[None, :] + lags[:, None], 0, len(self.learner) - 1)
        lag_distance, lag_weight = _landmark_distances(
            reference_part,
            self.reference_weight[frames][:, part_columns],
            self.learner_xy[shifted][:, :, part_columns],
            self.learner_weight[shifted][:, :, part_columns],
        )
        # The median over frames: a part that lags through most of the segment but catches up (or starts lagging)
        # within it still lags there.
        lag_error = np.median(_weighted_mean(lag_distance, lag_weight, axis=2), axis=1)
        best = int(np.argmin(lag_error))
        lag = float(lags[best]) * self.learner.frame_period
        if abs(lag) >= _MIN_PART_LAG and lag_error[best] <= _LAG_EXPLAINS * lag_error[max_lag]:
            return finding(DeviationKind.LATE if lag > 0 else DeviationKind.EARLY, segment_offset + lag)
        reference_spread = _spread(reference_part)
        if reference_spread >= _MIN_AMPLITUDE:
            ratio = _spread(learner_part) / reference_spread
            if ratio < _AMPLITUDE_RATIO:
                return finding(DeviationKind.TOO_SMALL, segment_offset)
            if ratio > 1 / _AMPLITUDE_RATIO:
                return finding(DeviationKind.TOO_LARGE, segment_offset)
        return finding(DeviationKind.POSITION, segment_offset)


def _landmark_distances(
    reference_xy: Floats, reference_visibility: Floats, learner_xy: Floats, learner_visibility: Floats
) -> tuple[Floats, Floats]:
    """Distances between corresponding landmarks (arrays broadcast over their leading axes; the last holds x and y)
    and the weight of each: how visible it is in both, never quite zero."""
    distance = np.linalg.norm(learner_xy - reference_xy, axis=-1)
    weight = np.maximum(learner_visibility * reference_visibility, _MIN_WEIGHT)
    return np.asarray(distance, dtype=np.float64), np.asarray(weight, dtype=np.float64)


def _weighted_mean(distance: Floats, weight: Floats, axis: int | tuple[int, ...]) -> Floats:
    return np.asarray((distance * weight).sum(axis=axis) / weight.sum(axis=axis), dtype=np.float64)


def _spread(positions: Floats) -> float:
    """Root mean square distance of a part's landmarks from their mean positions over time."""
    return float(np.sqrt(np.mean(np.sum((positions - positions.mean(axis=0)) ** 2, axis=-1))))


def _mean_angle_difference(
    reference_xy: Floats, learner_xy: Floats, bones: tuple[tuple[PoseLandmark, PoseLandmark], ...]
) -> float:
    """Mean absolute angle in degrees between corresponding bones, over the bones and frames given."""
    differences = []
    for start, end in bones:
        reference_bone = reference_xy[:, _COLUMN[end]] - reference_xy[:, _COLUMN[start]]
        learner_bone = learner_xy[:, _COLUMN[end]] - learner_xy[:, _COLUMN[start]]
        angle = np.arctan2(learner_bone[:, 1], learner_bone[:, 0]) - np.arctan2(
            reference_bone[:, 1], reference_bone[:, 0]
        )
        differences.append(np.abs((angle + math.pi) % (2 * math.pi) - math.pi))
    return float(np.degrees(np.mean(differences)))


def _merge_runs(findings: list[_Finding]) -> list[_Finding]:
    """One finding per run of consecutive segments in which the same part deviated the same way."""
    runs: list[list[_Finding]] = []
    for finding in sorted(findings, key=lambda finding: (finding.part, finding.kind, finding.first_segment)):
        previous = runs[-1][-1] if runs else None
        if previous and (previous.part, previous.kind, previous.last_segment + 1) == (
            finding.part,
            finding.kind,
            finding.first_segment,
        ):
            runs[-1].append(finding)
        else:
            runs.append([finding])
    return [
        _Finding(
            part=run[0].part,
            kind=run[0].kind,
            error=max(finding.error for finding in run),
            timing_offset=float(np.mean([finding.timing_offset for finding in run])),
            angle_difference=float(np.mean([finding.angle_difference for finding in run])),
            first_segment=run[0].first_segment,
            last_segment=run[-1].last_segment,
        )
        for run in runs
    ]


def _deviation(finding: _Finding, worst: float, segments: _Segments) -> JointDeviation:
    first_bar, last_bar = segments.bars(finding.first_segment, finding.last_segment)
    start, end = segments.times(finding.first_segment, finding.last_segment)
    where = segments.describe(finding.first_segment, finding.last_segment)
    return JointDeviation(
        body_part=finding.part,
        kind=finding.kind,
        severity=finding.error / worst,
        timing_offset=finding.timing_offset,
        angle_difference_degrees=finding.angle_difference,
        start_bar=first_bar,
        end_bar=last_bar,
        start_time=start,
        end_time=end,
        message=f"{finding.part.label} {_describe(finding)} {where}",
    )


def _describe(finding: _Finding) -> str:
    if finding.kind is DeviationKind.POSITION:
        return f"off by {finding.angle_difference:.0f}°"
    return {
        DeviationKind.LATE: "late",
        DeviationKind.EARLY: "early",
        DeviationKind.TOO_SMALL: "moves too little",
        DeviationKind.TOO_LARGE: "moves too much",
    }[finding.kind]


def _timing_advice(mean_offset: float) -> tuple[str, ...]:
    """A sentence about the whole body's timing when it is off by as much as a part must be to be called late."""
    if abs(mean_offset) < _MIN_PART_LAG:
        return ()
    return (f"{abs(mean_offset):.1f} s {'behind' if mean_offset > 0 else 'ahead of'} the music overall",)


def _clock(seconds: float) -> str:
    whole = max(0, int(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


def _read_only(values: ArrayLike) -> Floats:
    array = np.array(values, dtype=np.float64)
    array.flags.writeable = False
    return array
