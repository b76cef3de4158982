"""Media storage (uploads, recordings, extracted keypoints): objects by key, kept outside PostgreSQL.

| variable | default | meaning |
|---|---|---|
| MEGACITY_MEDIA_URL | (none) | where media live: `file:///abs/dir` or `s3://bucket[/prefix]`; wins when set |
| MEGACITY_MEDIA_DIR | $MEGACITY_HOME/media | the local directory store used when MEGACITY_MEDIA_URL is unset |
| MEGACITY_S3_ENDPOINT_URL | (none: AWS S3) | `http(s)://host[:port]` of an S3-compatible server (`http://minio:9000`) |
| AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY | (needed by s3) | credentials: never in the URL, never logged or shown |
| AWS_SESSION_TOKEN | (none) | the session token of temporary credentials |
| AWS_REGION | AWS_DEFAULT_REGION, else asked of the server | the bucket's region (SigV4 signs for it) |

Keys are relative paths of safe characters (`kzone/univ/org-1/results/<uuid>.wav`); a key that could leave the
store (`..`, absolute, odd characters) is refused. Objects appear whole or not at all: the local store's writer
fills a temporary file and renames it into place when it closes; the S3 store's writer fills a spooled temporary
file (memory, then disk past a few MiB) and uploads it when it closes (one PUT, or a multipart upload that is
aborted if it fails). A writer whose block fails leaves nothing behind. All I/O, file or network, runs in
threads, never on the event loop; the S3 store's requests run in a pool of their own, so a slow object store
cannot take the threads that file I/O and decoding (`asyncio.to_thread`) share.

`MediaStore` is the interface every user types against; `MediaStore.from_environment()` builds the configured
one: `LocalMediaStore` or `S3MediaStore`. The S3 store talks to the server with the `minio` client (a small
synchronous S3 client with SigV4 signing and multipart uploads; any S3-compatible server, AWS included) run in
threads, like the local store's file I/O. A request gives up after 10 s without a connection or 2 minutes
without an answer, retrying server errors a few times.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from io import BytesIO
from pathlib import Path
from typing import IO, BinaryIO, TypeVar, cast
from urllib.parse import unquote, urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error

from services.runtime.config import ConfigError, megacity_home

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
# S3's bucket naming rules (lower case, digits, dots and hyphens; 3-63 characters; not an IP address).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+")
_MIB = 1024 * 1024
_T = TypeVar("_T")


class MediaNotFound(LookupError):
    """No object has this key."""


def _is_key(key: str) -> bool:
    return len(key) <= 512 and bool(_KEY.fullmatch(key)) and not any(part.startswith("..") for part in key.split("/"))


def check_key(key: str) -> str:
    if not _is_key(key):
        raise ValueError(f"not a media key: {key!r}")
    return key


class MediaWriter:
    """An object being written; see MediaStore.writer."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.size = 0

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._file.write, data)
        self.size += len(data)


class MediaStore(ABC):
    """Objects by key: the interface of every media store (see the module docstring)."""

    @staticmethod
    def from_environment() -> MediaStore:
        """The store MEGACITY_MEDIA_URL names (the local directory when it is unset); ConfigError when it, or
        the S3 settings it needs, cannot be used."""
        url = os.environ.get("MEGACITY_MEDIA_URL", "").strip()
        if not url:
            return LocalMediaStore(
                Path(os.environ.get("MEGACITY_MEDIA_DIR", str(megacity_home() / "media"))).expanduser()
            )
        # A URL with credentials in it is refused before anything of it is echoed in an error.
        if "@" in url:
            raise ConfigError(
                "MEGACITY_MEDIA_URL must not hold credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        parts = urlsplit(url)
        if parts.query or parts.fragment:
            raise ConfigError(f"MEGACITY_MEDIA_URL={url!r} must not have a query or fragment")
        if parts.scheme == "file":
            path = unquote(parts.path)
            if parts.netloc not in ("", "localhost") or not path.startswith("/"):
                raise ConfigError(f"MEGACITY_MEDIA_URL={url!r}: a file URL names an absolute path, file:///dir")
            return LocalMediaStore(Path(path))
        if parts.scheme == "s3":
            try:
                return _s3_from_environment(parts.netloc, parts.path)
            except ConfigError as error:
                raise ConfigError(f"MEGACITY_MEDIA_URL={url!r}: {error}") from None
        raise ConfigError(f"MEGACITY_MEDIA_URL={url!r}: expected file:///dir or s3://bucket[/prefix]")

    @abstractmethod
    def writer(self, key: str) -> AbstractAsyncContextManager[MediaWriter]:
        """Streams an object in: it exists under `key` once the block ends without an error (replacing any
        previous one), and not at all otherwise."""

    async def put(self, key: str, data: bytes) -> None:
        async with self.writer(key) as sink:
            await sink.write(data)

    @abstractmethod
    async def get(self, key: str) -> bytes:
        """The object's bytes; MediaNotFound when there is none."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Removes the object; a key with no object is not an error (deleting is idempotent)."""


class LocalMediaStore(MediaStore):
    """A local directory of objects (one file per key)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"LocalMediaStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @asynccontextmanager
    async def writer(self, key: str) -> AsyncIterator[MediaWriter]:
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

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError:
            raise MediaNotFound(key) from None

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)


class S3MediaStore(MediaStore):
    """Objects in an S3-compatible bucket, under an optional prefix (`<prefix>/<key>`).

    The credentials go to the client and nowhere else: not into this object's repr, not into errors or logs.
    """

    def __init__(
        self,
        bucket: str,
        *,
        access_key: str,
        secret_key: str,
        session_token: str | None = None,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        part_size: int = 16 * _MIB,
        spool_size: int = 8 * _MIB,
        threads: int = 8,
    ) -> None:
        if not _BUCKET.fullmatch(bucket) or _IP_ADDRESS.fullmatch(bucket) or ".." in bucket:
            raise ConfigError(f"{bucket!r} is not an S3 bucket name")
        prefix = prefix.strip("/")
        if prefix and (len(prefix) > 256 or not _is_key(prefix)):
            raise ConfigError(f"{prefix!r} is not a media key prefix")
        if part_size < 5 * _MIB:
            raise ValueError("S3 multipart parts are at least 5 MiB")
        host, secure = _endpoint(endpoint_url)
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self._part_size = part_size
        self._spool_size = spool_size
        self._client = Minio(
            host,
            access_key=access_key,
            secret_key=secret_key,
            session_token=session_token,
            secure=secure,
            region=region,
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=10, read=120),
                maxsize=threads,
                cert_reqs="CERT_REQUIRED",
                ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
                retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            ),
        )
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s3-media")

    def __repr__(self) -> str:
        where = self.endpoint_url or "AWS"
        return f"S3MediaStore(s3://{self.bucket}/{self.prefix} at {where}, region {self.region or 'auto'})"

    async def _run(self, call: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(call, *args))

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @asynccontextmanager
    async def writer(self, key: str) -> AsyncIterator[MediaWriter]:
        name = self._name(key)
        # Memory up to spool_size, a temporary file past it; closing it (or the process ending) removes it.
        spool = tempfile.SpooledTemporaryFile(max_size=self._spool_size)  # noqa: SIM115 (closed below)
        try:
            sink = MediaWriter(spool)
            yield sink
            await self._run(self._upload, name, spool, sink.size)
        finally:
            await asyncio.to_thread(spool.close)

    def _upload(self, name: str, data: IO[bytes], size: int) -> None:
        data.seek(0)
        # Past part_size, minio uploads in parts and aborts the multipart upload when any part fails, so S3
        # never shows a partial object.
        self._client.put_object(self.bucket, name, cast(BinaryIO, data), size, part_size=self._part_size)

    async def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        await self._run(self._upload, name, BytesIO(data), len(data))

    async def get(self, key: str) -> bytes:
        name = self._name(key)
        return await self._run(self._download, key, name)

    def _download(self, key: str, name: str) -> bytes:
        try:
            response = self._client.get_object(self.bucket, name)
        except S3Error as error:
            if error.code == "NoSuchKey":
                raise MediaNotFound(key) from None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    async def delete(self, key: str) -> None:
        # S3's DeleteObject succeeds for a key with no object: idempotent as it is.
        await self._run(self._client.remove_object, self.bucket, self._name(key))


def _s3_from_environment(bucket: str, prefix: str) -> S3MediaStore:
    """The store of `s3://bucket/prefix` with the endpoint, credentials and region from the environment."""
    missing = [name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"an S3 media store needs {' and '.join(missing)}")
    return S3MediaStore(
        bucket,
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        prefix=prefix,
        endpoint_url=os.environ.get("MEGACITY_S3_ENDPOINT_URL") or None,
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
    )


def _endpoint(url: str | None) -> tuple[str, bool]:
    """(host[:port], uses TLS) of MEGACITY_S3_ENDPOINT_URL; AWS S3 when unset."""
    if url is None:
        return "s3.amazonaws.com", True
    if "@" in url:
        raise ConfigError("MEGACITY_S3_ENDPOINT_URL must not hold credentials; set AWS_ACCESS_KEY_ID instead")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise ConfigError(f"MEGACITY_S3_ENDPOINT_URL={url!r} has a bad port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
        raise ConfigError(f"MEGACITY_S3_ENDPOINT_URL={url!r}: expected http(s)://host[:port]")
    return parts.netloc, parts.scheme == "https"


def _durably_close(file: BinaryIO) -> None:
    # On disk before the rename makes it visible: a crash never leaves a whole-looking, truncated object.
    file.flush()
    os.fsync(file.fileno())
    file.close()
