"""Tutoring sessions, assignments, AI feedback and the streaming AI tutor chat."""
