"""The local media store: objects whole or not at all, keys that cannot leave the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.runtime.media import MediaNotFound, MediaStore, check_key


async def test_an_object_round_trips_and_is_replaced_whole(tmp_path: Path) -> None:
    store = MediaStore(tmp_path / "media")
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


async def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = MediaStore(tmp_path)

    async def interrupted() -> None:
        async with store.writer("x/y.bin") as sink:
            await sink.write(b"partial")
            raise RuntimeError("the client went away")

    with pytest.raises(RuntimeError):
        await interrupted()
    with pytest.raises(MediaNotFound):
        await store.get("x/y.bin")
    assert list((tmp_path / "x").iterdir()) == []


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../../b", "a//b", "", "a/.hidden", "a b", "a\\b", "é"])
def test_keys_that_could_leave_the_store_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="not a media key"):
        check_key(key)
