"""The extraction workers' claims on PostgreSQL (no models needed): one worker per reference however many claim at
once; a claim whose heartbeat stopped is taken over; a reference that outlived MAX claims fails; a lost claim (its
media replaced) drops the work quietly; a stopping worker hands its reference back; undecodable media and missing
media fail with a reason for people; only the holder of a claim finishes or fails it."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from megacity.kzone.v1 import resources_pb2 as res
from services.kzone import contents
from services.kzone.extraction import ExtractionSettings, ExtractionWorker
from services.kzone.store import ClaimedExtraction, KZoneStore, Owner
from services.runtime.catalog import load_catalog
from services.runtime.channels import ChannelFactory
from services.runtime.config import Transport
from services.runtime.contracts import default_pool
from services.runtime.database import TenantScope, create_pool, tenant_transaction
from services.runtime.media import LocalMediaStore
from tests.support.ports import free_port

STALE = 0.5
RATE = 16_000


@dataclass
class Setup:
    store: KZoneStore
    media: LocalMediaStore
    channels: ChannelFactory
    owner: Owner

    def worker(self, model_wait_seconds: float = 2.0) -> ExtractionWorker:
        settings = ExtractionSettings(
            poll_seconds=0.05, heartbeat_seconds=0.1, stale_after_seconds=STALE, model_wait_seconds=model_wait_seconds
        )
        return ExtractionWorker(self.store, self.media, self.channels, settings)

    async def upload(self, kind: str = "song", data: bytes = b"RIFF not audio", title: str = "Song") -> tuple[str, str]:
        """A reference with uploaded media, PROCESSING: its id and its extraction (upload) id."""
        content = res.ReferenceContent(kind=contents.KIND_VALUES[kind], title=title, language="en")
        stored = await self.store.create_content(self.owner, kind, content)
        return await self.replace_media(stored.message.id, kind, data)

    async def replace_media(self, content_id: str, kind: str, data: bytes) -> tuple[str, str]:
        upload_id = uuid.uuid4().hex
        extension = "wav" if kind == "song" else "mp4"
        key = contents.media_key(self.owner.zone_id, self.owner.org_id, content_id, upload_id, extension)
        await self.media.put(key, data)
        change = await self.store.set_media(
            TenantScope.org(self.owner.zone_id, self.owner.org_id),
            content_id,
            upload_id=upload_id,
            media_uri=key,
            content_type="audio/wav" if kind == "song" else "video/mp4",
        )
        assert change is not None
        return content_id, upload_id

    async def content(self, content_id: str) -> res.ReferenceContent:
        return (await self.store.content(TenantScope.platform(), content_id)).message

    async def claim_row(self, content_id: str) -> tuple[str | None, int]:
        """The reference's claim and how often it was claimed."""
        async with tenant_transaction(self.store._pool, TenantScope.platform()) as connection:
            found = await connection.fetchrow(
                "SELECT claim_id, claims FROM kzone_contents WHERE content_id = $1", content_id
            )
        assert found is not None
        return found["claim_id"], found["claims"]


@pytest.fixture
async def setup(identity_database: dict[str, str], tmp_path: Path) -> AsyncIterator[Setup]:
    pool = await create_pool(identity_database["kzone"], schema="kzone", max_size=8)
    channels = ChannelFactory(load_catalog(), Transport.LINKERD, None, default_pool())
    try:
        yield Setup(
            KZoneStore(pool),
            LocalMediaStore(tmp_path / "media"),
            channels,
            Owner(zone_id="kzone", org_id=f"org-{uuid.uuid4().hex[:8]}", user_id="teacher-1"),
        )
    finally:
        await channels.close()
        await pool.close()


async def test_concurrent_claims_never_share_a_reference(setup: Setup) -> None:
    ids = {(await setup.upload(title=f"Song {index}"))[0] for index in range(24)}

    async def claimer() -> list[ClaimedExtraction]:
        held = []
        while (claim := await setup.store.claim_extraction(60.0)) is not None:
            held.append(claim)
        return held

    claims = await asyncio.gather(*(claimer() for _ in range(6)))
    claimed = [claim.content_id for held in claims for claim in held]
    assert sorted(claimed) == sorted(ids)  # each exactly once
    assert len({claim.claim_id for held in claims for claim in held}) == len(ids)
    assert await setup.store.claim_extraction(60.0) is None  # all held, none stale


async def test_workers_side_by_side_extract_each_reference_once(setup: Setup) -> None:
    ids = [(await setup.upload(data=b"junk", title=f"Song {index}"))[0] for index in range(12)]

    async def drain(worker: ExtractionWorker) -> int:
        done = 0
        while await worker.process_one():
            done += 1
        return done

    counts = await asyncio.gather(*(drain(setup.worker()) for _ in range(3)))
    assert sum(counts) == len(ids)
    for content_id in ids:
        assert (await setup.content(content_id)).status == res.REFERENCE_STATUS_FAILED
        assert await setup.claim_row(content_id) == (None, 1)  # claimed once, by one worker


async def test_a_claim_carries_the_creators_values_and_only_its_holder_ends_it(setup: Setup) -> None:
    content = res.ReferenceContent(
        kind=res.REFERENCE_KIND_SONG, title="Given", language="ko", lyrics="사랑해", tempo_bpm=96.0, beats_per_bar=3
    )
    content.first_downbeat_offset.FromMilliseconds(1500)
    stored = await setup.store.create_content(setup.owner, "song", content)
    content_id, job = await setup.replace_media(stored.message.id, "song", b"x")
    claim = await setup.store.claim_extraction(60.0)
    assert claim is not None
    assert (claim.content_id, claim.job_id, claim.kind, claim.claims) == (content_id, job, "song", 1)
    assert (claim.language, claim.lyrics, claim.tempo_bpm, claim.beats_per_bar) == ("ko", "사랑해", 96.0, 3)
    assert claim.first_downbeat_seconds == pytest.approx(1.5)
    assert await setup.store.renew_claim(claim)

    features = res.ReferenceFeatures()
    assert not await setup.store.finish_processing(
        content_id, features, job_id=job, duration_seconds=1.0, claim_id="someone else"
    )
    assert not await setup.store.fail_processing(content_id, job_id=job, error="no", claim_id="someone else")
    assert await setup.store.fail_processing(content_id, job_id=job, error="bad media", claim_id=claim.claim_id)
    assert (await setup.content(content_id)).processing_error == "bad media"
    assert not await setup.store.renew_claim(claim)  # ended
    assert await setup.store.extraction_current(content_id, job)
    assert not await setup.store.extraction_current(content_id, "another upload")


async def test_a_stale_claim_is_taken_over_and_max_claims_fail_the_reference(setup: Setup) -> None:
    content_id, job = await setup.upload()
    first = await setup.store.claim_extraction(STALE, max_claims=3)
    assert first is not None
    assert await setup.store.claim_extraction(STALE, max_claims=3) is None  # fresh: nobody takes it
    await asyncio.sleep(STALE + 0.2)
    second = await setup.store.claim_extraction(STALE, max_claims=3)
    assert second is not None
    assert (second.content_id, second.claims) == (content_id, 2)
    assert second.claim_id != first.claim_id
    assert not await setup.store.renew_claim(first)  # the dead worker, back, finds it gone
    assert not await setup.store.finish_processing(
        content_id, res.ReferenceFeatures(), job_id=job, duration_seconds=1.0, claim_id=first.claim_id
    )
    await asyncio.sleep(STALE + 0.2)
    third = await setup.store.claim_extraction(STALE, max_claims=3)
    assert third is not None
    assert third.claims == 3
    await asyncio.sleep(STALE + 0.2)
    # The third worker died too: the reference fails instead of being claimed a fourth time.
    assert await setup.store.claim_extraction(STALE, max_claims=3) is None
    failed = await setup.content(content_id)
    assert failed.status == res.REFERENCE_STATUS_FAILED
    assert "stopped 3 times" in failed.processing_error
    assert await setup.claim_row(content_id) == (None, 3)


async def test_a_worker_takes_over_a_dead_workers_reference(setup: Setup) -> None:
    content_id, _ = await setup.upload(data=b"not audio at all")
    dead = await setup.store.claim_extraction(STALE)
    assert dead is not None
    worker = setup.worker()
    assert not await worker.process_one()  # held by a live-looking claim
    await asyncio.sleep(STALE + 0.2)
    assert await worker.process_one()
    failed = await setup.content(content_id)
    assert failed.status == res.REFERENCE_STATUS_FAILED
    assert "cannot be decoded" in failed.processing_error
    assert await setup.claim_row(content_id) == (None, 2)


async def test_undecodable_and_missing_media_fail_with_a_reason(setup: Setup) -> None:
    song, _ = await setup.upload("song", b"RIFF\x00\x00\x00\x00WAVE nonsense")
    video, _ = await setup.upload("choreography", b"\x00\x00\x00\x18ftypmp42 nonsense", title="Dance")
    missing, missing_job = await setup.upload("song", b"gone", title="Missing")
    stored = await setup.store.content(TenantScope.platform(), missing)
    await setup.media.delete(stored.message.media_uri)
    worker = setup.worker()
    for _ in range(3):
        assert await worker.process_one()
    assert not await worker.process_one()
    for content_id in (song, video):
        failed = await setup.content(content_id)
        assert failed.status == res.REFERENCE_STATUS_FAILED, content_id
        assert "cannot be decoded" in failed.processing_error
        assert "upload" in failed.processing_error
    gone = await setup.content(missing)
    assert gone.status == res.REFERENCE_STATUS_FAILED
    assert gone.processing_error == "the uploaded media is missing from storage; upload it again"
    assert gone.processing_job_id == missing_job


class _SlowMedia(LocalMediaStore):
    """Media reads wait until released: an extraction that is still running."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def get(self, key: str) -> bytes:
        self.reading.set()
        await self.release.wait()
        return await super().get(key)


async def test_replaced_media_drops_the_running_extraction_quietly(setup: Setup) -> None:
    slow = _SlowMedia(setup.media.root)
    setup.media = slow
    content_id, first_job = await setup.upload(data=b"first")
    worker = setup.worker()
    running = asyncio.create_task(worker.process_one())
    await asyncio.wait_for(slow.reading.wait(), 5)
    _, second_job = await setup.replace_media(content_id, "song", b"second")
    # The heartbeat finds the claim gone and stops the work; nothing is written for the first upload.
    assert await asyncio.wait_for(running, 5)
    current = await setup.content(content_id)
    assert (current.status, current.processing_job_id) == (res.REFERENCE_STATUS_PROCESSING, second_job)
    assert current.processing_error == ""
    assert await setup.claim_row(content_id) == (None, 0)
    assert first_job != second_job


async def test_a_stopping_worker_hands_its_reference_back(setup: Setup) -> None:
    slow = _SlowMedia(setup.media.root)
    setup.media = slow
    content_id, _ = await setup.upload()
    worker = setup.worker()
    running = asyncio.create_task(worker.process_one())
    await asyncio.wait_for(slow.reading.wait(), 5)
    assert (await setup.claim_row(content_id))[1] == 1
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert await setup.claim_row(content_id) == (None, 0)  # back in the queue, the claim not counted
    again = await setup.store.claim_extraction(60.0)
    assert again is not None
    assert again.content_id == content_id


async def test_the_loop_goes_on_after_failures(setup: Setup) -> None:
    first, _ = await setup.upload(data=b"junk one")
    worker = setup.worker()
    loop = asyncio.create_task(worker.run())
    try:
        second, _ = await setup.upload(data=b"junk two")
        for _ in range(100):
            statuses = {(await setup.content(content_id)).status for content_id in (first, second)}
            if statuses == {res.REFERENCE_STATUS_FAILED}:
                break
            await asyncio.sleep(0.05)
        assert statuses == {res.REFERENCE_STATUS_FAILED}
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


async def test_a_model_server_unavailable_for_too_long_fails_the_reference(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEGACITY_TARGET_ASR", f"127.0.0.1:{free_port()}")  # nothing listens there
    t = np.arange(RATE) / RATE
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(RATE)
        writer.writeframes(pcm)
    content_id, _ = await setup.upload(data=buffer.getvalue())
    started = time.monotonic()
    assert await setup.worker(model_wait_seconds=1.5).process_one()
    assert 1.0 < time.monotonic() - started < 10.0  # retried with backoff meanwhile, then given up
    failed = await setup.content(content_id)
    assert failed.status == res.REFERENCE_STATUS_FAILED
    assert failed.processing_error.startswith("the speech recognition server was unavailable for 1.5 s (UNAVAILABLE")
