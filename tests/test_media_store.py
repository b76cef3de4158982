"""The media stores: objects whole or not at all, keys that cannot leave the store, configuration by URL.

Every behavioural test runs against both stores: the local directory, and the S3 store talking to an
S3-compatible server. S3 is a third-party cloud service that cannot be run here (no S3-compatible server such as
MinIO ships on PyPI or Debian), so moto's server mode stands in for it: a real HTTP server on the loopback that
answers the S3 REST protocol. The store reaches it over real HTTP with real SigV4 signatures, and the server is
set to authenticate every request against its IAM users (a wrong secret is refused), as S3 does.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio import Minio
from minio.error import S3Error
from moto import settings as moto_settings
from moto.core.authorization import ActionAuthenticatorMixin
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.iam.models import iam_backends
from moto.server import ThreadedMotoServer

from services.runtime.config import ConfigError
from services.runtime.media import LocalMediaStore, MediaNotFound, MediaStore, S3MediaStore, check_key

MIB = 1024 * 1024


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str

    def client(self) -> Minio:
        return Minio(
            self.endpoint_url.removeprefix("http://"),
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
        )

    def new_bucket(self) -> str:
        bucket = f"media-{uuid.uuid4().hex[:12]}"
        self.client().make_bucket(bucket)
        return bucket

    def store(self, bucket: str, *, spool_size: int = 8 * MIB, part_size: int = 16 * MIB) -> S3MediaStore:
        return S3MediaStore(
            bucket,
            access_key=self.access_key,
            secret_key=self.secret_key,
            prefix="megacity/media",
            endpoint_url=self.endpoint_url,
            region="us-east-1",
            spool_size=spool_size,
            part_size=part_size,
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint_url = f"http://{host}:{port}"
    # An IAM user allowed everything on S3: from here on the server checks each request's signature against
    # this user's secret (moto's server is in this process, so its IAM backend is reachable directly).
    iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    iam.create_user("us-east-1", "megacity-media")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy("megacity-media", "media", json.dumps(policy))
    key = iam.create_access_key("megacity-media")
    _set_moto_auth(0)
    try:
        yield S3Server(endpoint_url, key.access_key_id, key.secret_access_key)
    finally:
        _set_moto_auth(float("inf"))
        server.stop()


def _set_moto_auth(unauthenticated_requests: float) -> None:
    """After this many more requests, moto authenticates every request (inf: never)."""
    moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = unauthenticated_requests
    ActionAuthenticatorMixin.request_count = 0


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MediaStore:
    if request.param == "local":
        return LocalMediaStore(tmp_path / "media")
    server: S3Server = request.getfixturevalue("s3_server")
    # A small spool and the smallest part size S3 allows: the tests cross both (disk spooling, multipart).
    return server.store(server.new_bucket(), spool_size=64 * 1024, part_size=5 * MIB)


def _leftovers(store: MediaStore) -> list[str]:
    """Everything the store holds, scratch files included."""
    if isinstance(store, LocalMediaStore):
        return sorted(str(path.relative_to(store.root)) for path in store.root.rglob("*") if path.is_file())
    assert isinstance(store, S3MediaStore)
    client = store._client
    return sorted(str(item.object_name) for item in client.list_objects(store.bucket, recursive=True))


async def test_an_object_round_trips_and_is_replaced_whole(store: MediaStore) -> None:
    await store.put("kzone/univ/org-1/a.wav", b"first")
    async with store.writer("kzone/univ/org-1/a.wav") as sink:
        await sink.write(b"sec")
        await sink.write(b"ond")
        assert await store.get("kzone/univ/org-1/a.wav") == b"first"  # not visible until closed
    assert sink.size == 6
    assert await store.get("kzone/univ/org-1/a.wav") == b"second"
    await store.delete("kzone/univ/org-1/a.wav")
    await store.delete("kzone/univ/org-1/a.wav")  # idempotent
    with pytest.raises(MediaNotFound):
        await store.get("kzone/univ/org-1/a.wav")
    await store.delete("never/written.bin")


async def test_empty_and_large_objects_round_trip(store: MediaStore) -> None:
    await store.put("empty.bin", b"")
    assert await store.get("empty.bin") == b""
    # Past the S3 store's spool (memory, then disk) and its part size (a multipart upload of three parts).
    large = os.urandom(11 * MIB)
    async with store.writer("videos/large.mp4") as sink:
        for start in range(0, len(large), MIB):
            await sink.write(large[start : start + MIB])
    assert sink.size == len(large)
    assert await store.get("videos/large.mp4") == large
    await store.put("videos/large.mp4", b"small again")
    assert await store.get("videos/large.mp4") == b"small again"


async def test_a_failed_write_leaves_nothing(store: MediaStore) -> None:
    async def interrupted(size: int) -> None:
        async with store.writer("x/y.bin") as sink:
            await sink.write(b"p" * size)
            raise RuntimeError("the client went away")

    for size in (7, 6 * MIB):  # in memory, and spooled to disk past a part
        with pytest.raises(RuntimeError):
            await interrupted(size)
        with pytest.raises(MediaNotFound):
            await store.get("x/y.bin")
    assert _leftovers(store) == []


async def test_objects_are_kept_under_their_keys(store: MediaStore) -> None:
    await store.put("a/b.txt", b"1")
    await store.put("a/c.txt", b"2")
    prefix = "megacity/media/" if isinstance(store, S3MediaStore) else ""
    assert _leftovers(store) == [f"{prefix}a/b.txt", f"{prefix}a/c.txt"]


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../../b", "a//b", "", "a/.hidden", "a b", "a\\b", "é"])
def test_keys_that_could_leave_the_store_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="not a media key"):
        check_key(key)


async def test_every_operation_checks_the_key(store: MediaStore) -> None:
    with pytest.raises(ValueError, match="not a media key"):
        await store.put("../escape", b"x")
    with pytest.raises(ValueError, match="not a media key"):
        await store.get("a/../../b")
    with pytest.raises(ValueError, match="not a media key"):
        await store.delete("/abs")
    with pytest.raises(ValueError, match="not a media key"):
        async with store.writer("a//b"):
            pass


async def test_the_s3_server_checks_signatures(s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    forged = S3MediaStore(
        bucket,
        access_key=s3_server.access_key,
        secret_key="not-the-secret",
        endpoint_url=s3_server.endpoint_url,
        region="us-east-1",
    )
    with pytest.raises(S3Error) as refused:
        await forged.put("a.bin", b"x")
    assert refused.value.code == "SignatureDoesNotMatch"
    assert s3_server.secret_key not in str(refused.value)
    assert _leftovers(s3_server.store(bucket)) == []


def test_the_store_shows_no_secrets(s3_server: S3Server) -> None:
    store = s3_server.store("media")
    for shown in (repr(store), str(store)):
        assert "media" in shown
        assert s3_server.endpoint_url in shown
        assert s3_server.secret_key not in shown
        assert s3_server.access_key not in shown


# Configuration.

_CONFIG = (
    "MEGACITY_MEDIA_URL",
    "MEGACITY_MEDIA_DIR",
    "MEGACITY_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in _CONFIG:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEGACITY_HOME", str(tmp_path / "home"))
    return monkeypatch


def test_the_local_directory_is_the_default(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    store = MediaStore.from_environment()
    assert isinstance(store, LocalMediaStore)
    assert store.root == tmp_path / "home" / "media"
    environment.setenv("MEGACITY_MEDIA_DIR", str(tmp_path / "elsewhere"))
    store = MediaStore.from_environment()
    assert isinstance(store, LocalMediaStore)
    assert store.root == tmp_path / "elsewhere"


def test_a_file_url_names_a_local_directory(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    environment.setenv("MEGACITY_MEDIA_DIR", str(tmp_path / "ignored"))
    environment.setenv("MEGACITY_MEDIA_URL", (tmp_path / "by url").as_uri())
    store = MediaStore.from_environment()
    assert isinstance(store, LocalMediaStore)
    assert store.root == tmp_path / "by url"


async def test_an_s3_url_names_a_bucket_and_prefix(environment: pytest.MonkeyPatch, s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    environment.setenv("MEGACITY_MEDIA_URL", f"s3://{bucket}/tenants/media/")
    environment.setenv("MEGACITY_S3_ENDPOINT_URL", s3_server.endpoint_url)
    environment.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    environment.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    environment.setenv("AWS_REGION", "us-east-1")
    store = MediaStore.from_environment()
    assert isinstance(store, S3MediaStore)
    assert (store.bucket, store.prefix, store.endpoint_url, store.region) == (
        bucket,
        "tenants/media",
        s3_server.endpoint_url,
        "us-east-1",
    )
    await store.put("k/a.bin", b"configured")
    assert await store.get("k/a.bin") == b"configured"
    assert [o.object_name for o in s3_server.client().list_objects(bucket, recursive=True)] == ["tenants/media/k/a.bin"]
    assert s3_server.secret_key not in repr(store)


def test_an_s3_url_without_an_endpoint_is_aws(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("MEGACITY_MEDIA_URL", "s3://my-bucket")
    environment.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    environment.setenv("AWS_SECRET_ACCESS_KEY", "example-secret")
    environment.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    store = MediaStore.from_environment()
    assert isinstance(store, S3MediaStore)
    assert (store.bucket, store.prefix, store.endpoint_url, store.region) == ("my-bucket", "", None, "eu-west-1")
    assert "AWS" in repr(store)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("ftp://host/media", "expected file:///dir or s3://bucket"),
        ("/var/media", "expected file:///dir or s3://bucket"),
        ("file:relative/dir", "absolute path"),
        ("file://otherhost/media", "absolute path"),
        ("s3://", "not an S3 bucket name"),
        ("s3:///prefix", "not an S3 bucket name"),
        ("s3://Upper_Case", "not an S3 bucket name"),
        ("s3://bucket:9000/media", "not an S3 bucket name"),
        ("s3://192.168.1.1/media", "not an S3 bucket name"),
        ("s3://bucket/../media", "not a media key prefix"),
        ("s3://bucket/a b", "not a media key prefix"),
        ("s3://bucket/media?region=x", "query"),
        ("s3://AKIAEXAMPLE:example-secret@bucket/media", "must not hold credentials"),
    ],
)
def test_bad_media_urls_are_refused_clearly(environment: pytest.MonkeyPatch, url: str, complaint: str) -> None:
    environment.setenv("MEGACITY_MEDIA_URL", url)
    environment.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    environment.setenv("AWS_SECRET_ACCESS_KEY", "example-secret")
    with pytest.raises(ConfigError, match="MEGACITY_MEDIA_URL") as refused:
        MediaStore.from_environment()
    assert complaint in str(refused.value)
    assert "example-secret" not in str(refused.value)


@pytest.mark.parametrize(
    ("endpoint", "complaint"),
    [
        ("minio:9000", "expected http(s)://host[:port]"),
        ("http://minio:9000/path", "expected http(s)://host[:port]"),
        ("http://minio:port", "bad port"),
        ("http://AKIAEXAMPLE:example-secret@minio:9000", "must not hold credentials"),
    ],
)
def test_bad_endpoints_are_refused_clearly(environment: pytest.MonkeyPatch, endpoint: str, complaint: str) -> None:
    environment.setenv("MEGACITY_MEDIA_URL", "s3://bucket/media")
    environment.setenv("MEGACITY_S3_ENDPOINT_URL", endpoint)
    environment.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    environment.setenv("AWS_SECRET_ACCESS_KEY", "example-secret")
    with pytest.raises(ConfigError, match="MEGACITY_S3_ENDPOINT_URL") as refused:
        MediaStore.from_environment()
    assert complaint in str(refused.value)
    assert "example-secret" not in str(refused.value)


@pytest.mark.parametrize("missing", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_an_s3_store_needs_credentials(environment: pytest.MonkeyPatch, missing: str) -> None:
    environment.setenv("MEGACITY_MEDIA_URL", "s3://bucket/media")
    environment.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    environment.setenv("AWS_SECRET_ACCESS_KEY", "example-secret")
    environment.delenv(missing)
    with pytest.raises(ConfigError, match=f"needs {missing}") as refused:
        MediaStore.from_environment()
    assert "example-secret" not in str(refused.value)
