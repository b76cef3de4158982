"""Media storage (uploads, recordings, extracted keypoints): objects by key, kept outside PostgreSQL.

| variable            | default               | meaning                                                 |
|---------------------|-----------------------|---------------------------------------------------------|
| MEGACITY_MEDIA_DIR  | $MEGACITY_HOME/media  | the local directory store (the embedded default)        |

Keys are relative paths of safe characters (`kzone/univ/org-1/results/<uuid>.wav`); a key that could leave the
store (`..`, absolute, odd characters) is refused. Objects appear whole or not at all: a writer fills a temporary
file and renames it into place when it closes, and removes it when the writing fails. File I/O runs in threads,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

from services.runtime.config import megacity_home

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")


class MediaNotFound(LookupError):
    """No object has this key."""


def check_key(key: str) -> str:
    if len(key) > 512 or not _KEY.fullmatch(key) or any(part.startswith("..") for part in key.split("/")):
        raise ValueError(f"not a media key: {key!r}")
    return key


class MediaWriter:
    """An object being written; see MediaStore.writer."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.size = 0

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._file.write, data)
        self.size += len(data)


class MediaStore:
    """A local directory of objects (one file per key)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_environment(cls) -> MediaStore:
        return cls(Path(os.environ.get("MEGACITY_MEDIA_DIR", str(megacity_home() / "media"))).expanduser())

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @asynccontextmanager
    async def writer(self, key: str) -> AsyncIterator[MediaWriter]:
        """Streams an object in: it exists under `key` once the block ends without an error (replacing any
        previous one), and not at all otherwise."""
        final = self._path(key)
        scratch = final.with_name(f".{final.name}.{uuid.uuid4().hex}.partial")
        await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)
        file = await asyncio.to_thread(scratch.open, "wb")
        try:
            yield MediaWriter(file)
            await asyncio.to_thread(_durably_close, file)
            await asyncio.to_thread(scratch.replace, final)
        except BaseException:
            await asyncio.to_thread(file.close)
            await asyncio.to_thread(scratch.unlink, missing_ok=True)
            raise

    async def put(self, key: str, data: bytes) -> None:
        async with self.writer(key) as sink:
            await sink.write(data)

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError:
            raise MediaNotFound(key) from None

    async def delete(self, key: str) -> None:
        """Removes the object; a key with no object is not an error (deleting is idempotent)."""
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)


def _durably_close(file: BinaryIO) -> None:
    # On disk before the rename makes it visible: a crash never leaves a whole-looking, truncated object.
    file.flush()
    os.fsync(file.fileno())
    file.close()
