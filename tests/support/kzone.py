"""What every test running the kzone service sets before it starts."""

from __future__ import annotations

from pathlib import Path

import pytest


def isolated_kzone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A media store private to the test (returned), and no extraction worker: tests that need READY references
    make them as the worker would (the store's finish_processing), and a worker would race them."""
    media_dir = tmp_path / "media"
    monkeypatch.setenv("MEGACITY_MEDIA_DIR", str(media_dir))
    monkeypatch.setenv("MEGACITY_KZONE_EXTRACTION_WORKERS", "0")
    return media_dir
