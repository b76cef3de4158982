"""Placeholder until the Linkerd generator lands: writes nothing."""

from pathlib import Path


def write_manifests(out: Path, descriptor_set: Path) -> None:
    del out, descriptor_set
