"""Pose landmark inference server (mediapipe PoseLandmarker), internal only."""
