"""Dance scoring (services/kzone/choreography.py) on synthetic choreographies: a skeleton driven by smooth random
joint angles. A time-warped copy scores high and a different choreography low; the mirror image scores high with
the mirror detected, wherever and however large the learner stands in the picture; a left arm lagging a beat in two
bars is reported as "left arm late in bars 5-6" (a right arm ahead, as early); a frozen limb moves too little;
invisible landmarks barely count; the whole body behind the music is said once."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from numpy.typing import NDArray

from services.kzone.choreography import (
    LANDMARK_COUNT,
    MIRROR_ORDER,
    BeatGrid,
    BodyPart,
    DeviationKind,
    MirrorMode,
    PoseLandmark,
    PoseSequence,
    mirror_poses,
    normalise_poses,
    score_dance,
)

Floats = NDArray[np.float64]
L = PoseLandmark
FPS = 30.0
GRID = BeatGrid(tempo_bpm=120.0)  # 4/4: a bar is 2 s, bars 5-6 are 8-12 s
SECONDS = 16.0
TIMES = np.arange(0.0, SECONDS, 1 / FPS)

_ANGLES = ("lean", "head", "left_shoulder", "left_elbow", "right_shoulder", "right_elbow")
_LEG_ANGLES = ("left_hip", "left_knee", "right_hip", "right_knee")


class Choreography:
    """A dancer whose joint angles follow smooth random curves (white noise smoothed over about 0.15 s)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self._grid = np.arange(-3.0, SECONDS + 3.0, 0.01)
        kernel = np.exp(-0.5 * (np.arange(-60, 61) * 0.01 / 0.15) ** 2)
        kernel /= np.sqrt((kernel**2).sum())
        self._curves = {
            name: np.convolve(rng.standard_normal(self._grid.size), kernel, "same")
            for name in (*_ANGLES, *_LEG_ANGLES, "sway")
        }

    def poses(self, times: Floats, retimed: Mapping[str, Floats] | None = None) -> Floats:
        """Landmarks (frames x 33 x 3) at `times`; `retimed` moves chosen angle curves to other times."""
        retimed = retimed or {}

        def angle(name: str) -> Floats:
            return np.interp(retimed.get(name, times), self._grid, self._curves[name])

        frames = times.size
        landmarks = np.zeros((frames, LANDMARK_COUNT, 3))

        def put(landmark: PoseLandmark, xy: Floats) -> None:
            landmarks[:, landmark, :2] = xy

        def direction(radians: Floats) -> Floats:  # 0 = straight down the picture
            return np.stack([np.sin(radians), np.cos(radians)], axis=-1)

        lean = 0.1 * angle("lean")
        across = np.stack([np.cos(lean), np.sin(lean)], axis=-1)
        hips = np.stack([0.5 + 0.02 * angle("sway"), np.full(frames, 0.6)], axis=-1)
        shoulders = hips - 0.2 * direction(lean)
        put(L.LEFT_HIP, hips + 0.05 * across)
        put(L.RIGHT_HIP, hips - 0.05 * across)
        put(L.LEFT_SHOULDER, shoulders + 0.08 * across)
        put(L.RIGHT_SHOULDER, shoulders - 0.08 * across)
        nose = shoulders - 0.08 * direction(lean + 0.2 * angle("head"))
        put(L.NOSE, nose)
        for offset, landmarks_of_side in (
            (0.01, (L.LEFT_EYE_INNER, L.LEFT_EYE, L.LEFT_EYE_OUTER)),
            (-0.01, (L.RIGHT_EYE_INNER, L.RIGHT_EYE, L.RIGHT_EYE_OUTER)),
        ):
            for step, landmark in enumerate(landmarks_of_side, start=1):
                put(landmark, nose + np.array([offset * step, -0.01]))
        put(L.LEFT_EAR, nose + 0.03 * across)
        put(L.RIGHT_EAR, nose - 0.03 * across)
        put(L.MOUTH_LEFT, nose + np.array([0.01, 0.02]))
        put(L.MOUTH_RIGHT, nose + np.array([-0.01, 0.02]))
        for side, sign in (("left", 1.0), ("right", -1.0)):
            upper = sign * (0.8 + 0.9 * angle(f"{side}_shoulder"))
            lower = upper + sign * 0.8 * angle(f"{side}_elbow")
            elbow = landmarks[:, PoseLandmark[f"{side.upper()}_SHOULDER"], :2] + 0.11 * direction(upper)
            wrist = elbow + 0.10 * direction(lower)
            hand = wrist + 0.03 * direction(lower)
            put(PoseLandmark[f"{side.upper()}_ELBOW"], elbow)
            put(PoseLandmark[f"{side.upper()}_WRIST"], wrist)
            put(PoseLandmark[f"{side.upper()}_INDEX"], hand)
            put(PoseLandmark[f"{side.upper()}_PINKY"], hand + 0.005)
            put(PoseLandmark[f"{side.upper()}_THUMB"], hand - 0.005)
            thigh = sign * (0.1 + 0.3 * angle(f"{side}_hip"))
            shin = thigh - sign * 0.3 * np.abs(angle(f"{side}_knee"))
            knee = landmarks[:, PoseLandmark[f"{side.upper()}_HIP"], :2] + 0.15 * direction(thigh)
            ankle = knee + 0.15 * direction(shin)
            put(PoseLandmark[f"{side.upper()}_KNEE"], knee)
            put(PoseLandmark[f"{side.upper()}_ANKLE"], ankle)
            put(PoseLandmark[f"{side.upper()}_HEEL"], ankle + np.array([-0.01 * sign, 0.02]))
            put(PoseLandmark[f"{side.upper()}_FOOT_INDEX"], ankle + np.array([0.04 * sign, 0.02]))
        return landmarks


def _sequence(landmarks: Floats, visibility: Floats | None = None) -> PoseSequence:
    return PoseSequence(TIMES, landmarks, np.ones(landmarks.shape[:2]) if visibility is None else visibility)


DANCER = Choreography(1)
REFERENCE = _sequence(DANCER.poses(TIMES))


def _in_bars_5_and_6(shift: float) -> Floats:
    return np.where((TIMES >= 8.0) & (TIMES < 12.0), TIMES + shift, TIMES)


def test_the_reference_against_itself_is_perfect() -> None:
    analysis = score_dance(REFERENCE, REFERENCE, GRID)
    assert (analysis.accuracy, analysis.timing, analysis.overall) == (100.0, 100.0, 100.0)
    assert not analysis.mirrored
    assert analysis.feedback == ()
    assert [(segment.start_bar, segment.end_bar) for segment in analysis.segments] == [
        (bar, bar) for bar in range(1, 9)
    ]


def test_a_time_warped_copy_scores_high() -> None:
    warped = TIMES + 0.15 * np.sin(2 * np.pi * TIMES / 6)  # up to 0.15 s ahead and behind
    analysis = score_dance(REFERENCE, _sequence(DANCER.poses(warped)), GRID)
    assert analysis.accuracy > 95
    assert analysis.overall > 90
    assert all(segment.score > 90 for segment in analysis.segments)
    assert analysis.top_deviations == ()


def test_a_different_choreography_scores_low() -> None:
    analysis = score_dance(REFERENCE, _sequence(Choreography(2).poses(TIMES)), GRID)
    assert analysis.accuracy < 50
    assert analysis.overall < 50
    assert analysis.top_deviations
    assert analysis.top_deviations[0].severity == 1.0


def test_the_mirror_image_anywhere_in_the_picture_scores_high_with_the_mirror_detected() -> None:
    mirrored = mirror_poses(REFERENCE).landmarks.copy()
    mirrored[:, :, :2] = 0.7 * mirrored[:, :, :2] + 0.1  # further from the camera, to the left
    learner = _sequence(mirrored)

    analysis = score_dance(REFERENCE, learner, GRID)
    assert analysis.mirrored
    assert analysis.accuracy > 99
    assert score_dance(REFERENCE, learner, GRID, mirror=MirrorMode.NOT_MIRRORED).accuracy < 60
    assert not score_dance(REFERENCE, REFERENCE, GRID, mirror=MirrorMode.AUTO).mirrored
    assert score_dance(REFERENCE, REFERENCE, GRID, mirror=MirrorMode.MIRRORED).mirrored


def test_a_left_arm_a_beat_late_in_bars_5_and_6_is_named_in_feedback() -> None:
    lagging = _in_bars_5_and_6(-0.5)  # the arm shows at t what the reference did at t - 0.5 s
    learner = _sequence(DANCER.poses(TIMES, {"left_shoulder": lagging, "left_elbow": lagging}))

    analysis = score_dance(REFERENCE, learner, GRID)
    assert analysis.feedback == ("left arm late in bars 5-6",)
    (deviation,) = analysis.top_deviations
    assert (deviation.body_part, deviation.kind) == (BodyPart.LEFT_ARM, DeviationKind.LATE)
    assert (deviation.start_bar, deviation.end_bar) == (5, 6)
    assert (deviation.start_time, deviation.end_time) == (8.0, 12.0)
    assert deviation.timing_offset == pytest.approx(0.5, abs=0.05)
    assert deviation.severity == 1.0
    low = [segment for segment in analysis.segments if segment.deviations]
    assert [segment.start_bar for segment in low] == [5, 6]
    assert all(segment.deviations[0].message == f"left arm late in bar {segment.start_bar}" for segment in low)
    assert min(segment.score for segment in analysis.segments) == min(segment.score for segment in low)


def test_a_mirroring_learner_hears_of_their_own_arm() -> None:
    lagging = _in_bars_5_and_6(-0.5)
    left_arm_late = _sequence(DANCER.poses(TIMES, {"left_shoulder": lagging, "left_elbow": lagging}))
    # Mirroring the reference, the learner dances its left arm with their right, and that is the arm that lags.
    analysis = score_dance(REFERENCE, mirror_poses(left_arm_late), GRID)
    assert analysis.mirrored
    assert analysis.feedback == ("right arm late in bars 5-6",)
    assert analysis.top_deviations[0].body_part is BodyPart.RIGHT_ARM


def test_a_right_arm_a_beat_ahead_is_early() -> None:
    ahead = _in_bars_5_and_6(+0.5)
    learner = _sequence(DANCER.poses(TIMES, {"right_shoulder": ahead, "right_elbow": ahead}))
    analysis = score_dance(REFERENCE, learner, GRID)
    assert analysis.feedback == ("right arm early in bars 5-6",)
    assert analysis.top_deviations[0].timing_offset == pytest.approx(-0.5, abs=0.05)


def test_a_frozen_arm_moves_too_little() -> None:
    frozen = np.where((TIMES >= 6.0) & (TIMES < 8.0), 6.0, TIMES)
    learner = _sequence(DANCER.poses(TIMES, {"left_shoulder": frozen, "left_elbow": frozen}))
    analysis = score_dance(REFERENCE, learner, GRID)
    (deviation,) = analysis.top_deviations
    assert (deviation.body_part, deviation.kind, deviation.start_bar) == (
        BodyPart.LEFT_ARM,
        DeviationKind.TOO_SMALL,
        4,
    )
    assert deviation.message == "left arm moves too little in bar 4"


def test_an_arm_held_wrong_is_out_of_position_by_its_angle() -> None:
    landmarks = DANCER.poses(TIMES)
    in_bar_3 = (TIMES >= 4.0) & (TIMES < 6.0)
    # The whole right arm turned 90 degrees about the shoulder.
    shoulder = landmarks[:, L.RIGHT_SHOULDER, :2]
    for landmark in (L.RIGHT_ELBOW, L.RIGHT_WRIST, L.RIGHT_INDEX, L.RIGHT_PINKY, L.RIGHT_THUMB):
        relative = landmarks[in_bar_3, landmark, :2] - shoulder[in_bar_3]
        landmarks[in_bar_3, landmark, :2] = shoulder[in_bar_3] + relative[:, ::-1] * np.array([-1.0, 1.0])
    (deviation,) = score_dance(REFERENCE, _sequence(landmarks), GRID).top_deviations
    assert (deviation.body_part, deviation.kind, deviation.start_bar) == (BodyPart.RIGHT_ARM, DeviationKind.POSITION, 3)
    assert deviation.angle_difference_degrees == pytest.approx(90, abs=5)
    assert deviation.message == f"right arm off by {deviation.angle_difference_degrees:.0f}° in bar 3"


def test_the_whole_body_behind_the_music_is_said_once() -> None:
    analysis = score_dance(REFERENCE, _sequence(DANCER.poses(TIMES - 0.3)), GRID)
    assert analysis.mean_timing_offset == pytest.approx(0.3, abs=0.03)
    assert analysis.accuracy > 95
    assert analysis.timing < 50
    assert analysis.feedback == ("0.3 s behind the music overall",)
    assert all(segment.timing_offset == pytest.approx(0.3, abs=0.05) for segment in analysis.segments[1:])


def test_learner_time_starts_at_the_reference_start() -> None:
    later = PoseSequence(TIMES + 60.0, REFERENCE.landmarks, REFERENCE.visibility)
    analysis = score_dance(later, REFERENCE, BeatGrid(120.0, first_downbeat=60.0))
    assert analysis.mean_timing_offset == pytest.approx(0.0)
    assert analysis.segments[0].start_offset == 0.0
    assert score_dance(later, REFERENCE, reference_start=59.0).mean_timing_offset == pytest.approx(-1.0)


def test_landmarks_nobody_can_see_barely_count() -> None:
    landmarks = DANCER.poses(TIMES)
    arm = [L.LEFT_ELBOW, L.LEFT_WRIST, L.LEFT_INDEX, L.LEFT_PINKY, L.LEFT_THUMB]
    landmarks[:, arm, :2] = np.random.default_rng(0).random((TIMES.size, len(arm), 2))
    visibility = np.ones((TIMES.size, LANDMARK_COUNT))
    visibility[:, arm] = 0.01
    assert score_dance(REFERENCE, _sequence(landmarks, visibility), GRID).accuracy > 99
    assert score_dance(REFERENCE, _sequence(landmarks), GRID).accuracy < 60


def test_without_a_beat_grid_segments_are_four_second_windows() -> None:
    lagging = _in_bars_5_and_6(-0.5)
    learner = _sequence(DANCER.poses(TIMES, {"left_shoulder": lagging, "left_elbow": lagging}))
    analysis = score_dance(REFERENCE, learner)
    assert len(analysis.segments) == 4
    assert analysis.feedback == ("left arm late at 0:08-0:12",)


def test_segments_of_several_bars() -> None:
    analysis = score_dance(REFERENCE, REFERENCE, BeatGrid(120.0, beats_per_bar=3, bars_per_segment=2))
    assert [(segment.start_bar, segment.end_bar) for segment in analysis.segments] == [
        (1, 2),
        (3, 4),
        (5, 6),
        (7, 8),
        (9, 10),
        (11, 12),
    ]


def test_normalised_poses_ignore_position_and_size_but_not_aspect() -> None:
    moved = REFERENCE.landmarks.copy()
    moved[:, :, :2] = 0.5 * moved[:, :, :2] + np.array([0.3, -0.1])
    assert np.allclose(normalise_poses(_sequence(moved)), normalise_poses(REFERENCE))
    # The same poses filmed 4:3 have x squeezed into a narrower share of the width.
    wide = PoseSequence(TIMES, REFERENCE.landmarks * np.array([0.75, 1.0, 1.0]), REFERENCE.visibility, 4 / 3)
    assert np.allclose(normalise_poses(wide), normalise_poses(REFERENCE))
    assert not np.allclose(normalise_poses(_sequence(wide.landmarks)), normalise_poses(REFERENCE))


def test_mirroring_swaps_sides_and_twice_is_nothing() -> None:
    assert MIRROR_ORDER[L.LEFT_WRIST] == L.RIGHT_WRIST
    assert MIRROR_ORDER[L.MOUTH_RIGHT] == L.MOUTH_LEFT
    assert MIRROR_ORDER[L.NOSE] == L.NOSE
    assert np.array_equal(MIRROR_ORDER[MIRROR_ORDER], np.arange(LANDMARK_COUNT))
    twice = mirror_poses(mirror_poses(REFERENCE))
    assert np.allclose(twice.landmarks, REFERENCE.landmarks)


def test_landmarks_are_mediapipes_33() -> None:
    assert LANDMARK_COUNT == 33
    assert (L.NOSE, L.LEFT_SHOULDER, L.RIGHT_HIP, L.RIGHT_FOOT_INDEX) == (0, 11, 24, 32)


@pytest.mark.parametrize(
    ("timestamps", "landmarks", "visibility", "message"),
    [
        (np.array([]), np.zeros((0, 33, 3)), np.zeros((0, 33)), "timestamps"),
        (np.array([0.0, 0.0]), np.zeros((2, 33, 3)), np.zeros((2, 33)), "timestamps"),
        (np.array([0.0, 0.1]), np.zeros((2, 17, 3)), np.zeros((2, 33)), "landmarks"),
        (np.array([0.0, 0.1]), np.zeros((2, 33, 3)), np.zeros((2, 17)), "visibility"),
    ],
)
def test_bad_sequences_are_rejected(timestamps: Floats, landmarks: Floats, visibility: Floats, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PoseSequence(timestamps, landmarks, visibility)


def test_sequences_are_read_only_copies() -> None:
    landmarks = DANCER.poses(TIMES[:3])
    sequence = PoseSequence(TIMES[:3], landmarks, np.ones((3, 33)))
    landmarks[:] = 0
    assert sequence.landmarks.any()
    with pytest.raises(ValueError, match="read-only"):
        sequence.landmarks[0, 0, 0] = 1.0


def test_a_skeleton_without_a_torso_cannot_be_normalised() -> None:
    with pytest.raises(ValueError, match="torso"):
        normalise_poses(PoseSequence(TIMES[:2], np.zeros((2, 33, 3)), np.ones((2, 33))))
