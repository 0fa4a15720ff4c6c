"""relay_bridge.blobs: presigned part URLs only for the caller's associations; forged or expired ones refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudstore.file import FileBlobStore
from relay_bridge.blobs import BlobBroker, BlobRefused, key_for
from relay_bridge.config import BridgeConfig, ServerSection, SpillSection, StorageSection

AID = "a" * 32
OTHER = "b" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def broker(tmp_path: Path, clock: Clock) -> BlobBroker:
    store = FileBlobStore(tmp_path / "blobs", fsync=False, clock=clock)
    return BlobBroker(store, url_ttl_s=60, ttl_s=3600, sweep_interval_s=3600)


async def test_put_get_release(broker: BlobBroker) -> None:
    blob_id, put_url, _ = await broker.slot(AID, "", 0, download=False)
    await broker.put_part(put_url, b"sealed part", {AID})
    _, get_url, _ = await broker.slot(AID, blob_id, 0, download=True)
    assert await broker.get_part(get_url, {AID}) == b"sealed part"
    assert await broker.release(AID, blob_id) == 1
    assert not await broker.store.exists(key_for(AID, blob_id, 0))


async def test_other_association_refused(broker: BlobBroker) -> None:
    blob_id, put_url, _ = await broker.slot(AID, "", 0, download=False)
    with pytest.raises(BlobRefused, match="another association"):
        await broker.put_part(put_url, b"x", {OTHER})
    await broker.put_part(put_url, b"x", {AID})
    _, get_url, _ = await broker.slot(AID, blob_id, 0, download=True)
    with pytest.raises(BlobRefused, match="another association"):
        await broker.get_part(get_url, {OTHER})


async def test_forged_altered_and_wrong_method_refused(broker: BlobBroker) -> None:
    blob_id, put_url, _ = await broker.slot(AID, "", 0, download=False)
    await broker.put_part(put_url, b"x", {AID})
    forged = put_url.replace(f"{AID}/{blob_id}/000000", f"{AID}/{blob_id}/000001")
    with pytest.raises(BlobRefused, match="forged or altered"):
        await broker.put_part(forged, b"x", {AID})
    with pytest.raises(BlobRefused, match="signed for PUT"):
        await broker.get_part(put_url, {AID})
    other_key = FileBlobStore(broker.store.root, fsync=False)  # type: ignore[attr-defined]
    foreign = await other_key.presign_get(key_for(AID, blob_id, 0), 60)
    with pytest.raises(BlobRefused, match="forged"):
        await broker.get_part(foreign, {AID})


async def test_expired_refused(broker: BlobBroker, clock: Clock) -> None:
    blob_id, put_url, _ = await broker.slot(AID, "", 0, download=False)
    await broker.put_part(put_url, b"x", {AID})
    _, get_url, _ = await broker.slot(AID, blob_id, 0, download=True)
    clock.now += 61
    with pytest.raises(BlobRefused, match="expired"):
        await broker.get_part(get_url, {AID})


async def test_bad_ids_refused(broker: BlobBroker) -> None:
    with pytest.raises(BlobRefused):
        await broker.slot(AID, "../../etc", 0, download=True)
    with pytest.raises(BlobRefused):
        await broker.slot(AID, "", 0, download=True)


def test_default_store_next_to_database(tmp_path: Path) -> None:
    server = ServerSection(insecure=True)
    config = BridgeConfig(server=server, storage=StorageSection(database=tmp_path / "db.sqlite3"))
    broker = BlobBroker.from_config(config)
    assert broker is not None and broker.store.root == tmp_path / "blobs"  # type: ignore[attr-defined]
    assert BlobBroker.from_config(BridgeConfig(server=server, spill=SpillSection(store="off"))) is None


async def quota_broker(tmp_path: Path, clock: Clock, **quota: int) -> BlobBroker:
    from relay_bridge.blobs import BlobQuota

    store = FileBlobStore(tmp_path / "quota-blobs", fsync=False, clock=clock)
    return BlobBroker(store, url_ttl_s=60, ttl_s=3600, sweep_interval_s=3600, quota=BlobQuota(**quota))


async def test_part_numbers_blobs_and_bytes_are_bounded_per_association(tmp_path: Path, clock: Clock) -> None:
    broker = await quota_broker(tmp_path, clock, max_blobs=2, max_parts_per_blob=4, max_part_bytes=1000, max_bytes=2500)
    with pytest.raises(BlobRefused, match="part 99999 is beyond the limit of 4 parts per blob"):
        await broker.slot(AID, "", 99999, download=False, size=10)
    first, _, _ = await broker.slot(AID, "", 0, download=False, size=1000)
    await broker.slot(AID, "", 0, download=False, size=1000)
    with pytest.raises(BlobRefused, match=r"already has 2 blobs \(max_blobs_per_association\)"):
        await broker.slot(AID, "", 0, download=False, size=10)
    with pytest.raises(BlobRefused, match=r"exceeds max_part_bytes \(1000\)"):
        await broker.slot(AID, first, 1, download=False, size=1001)
    with pytest.raises(BlobRefused, match=r"would exceed 2500 bytes \(max_bytes_per_association\)"):
        await broker.slot(AID, first, 1, download=False, size=600)
    await broker.slot(OTHER, "", 0, download=False, size=1000)  # another association has its own quota
    broker.association_ended(AID)
    assert AID not in broker.usage


async def test_a_put_url_is_bound_to_its_signed_length(broker: BlobBroker) -> None:
    _, url, _ = await broker.slot(AID, "", 0, download=False, size=5)
    with pytest.raises(BlobRefused, match="signed for 5 bytes, not 6"):
        await broker.put_part(url, b"123456", {AID})
    await broker.put_part(url, b"12345", {AID})


async def test_an_unsized_put_is_bounded_by_max_part_bytes(tmp_path: Path, clock: Clock) -> None:
    broker = await quota_broker(tmp_path, clock, max_part_bytes=100)
    _, url, _ = await broker.slot(AID, "", 0, download=False)
    with pytest.raises(BlobRefused, match=r"exceeds max_part_bytes \(100\)"):
        await broker.put_part(url, b"x" * 101, {AID})


async def test_a_url_used_after_its_association_ended_is_refused(broker: BlobBroker) -> None:
    _, url, _ = await broker.slot(AID, "", 0, download=False, size=1)
    broker.association_ended(AID)
    with pytest.raises(BlobRefused, match="another association"):
        await broker.put_part(url, b"x", set())  # the router's session no longer holds the association


async def test_what_a_late_url_stored_is_deleted_once_the_urls_expired(broker: BlobBroker) -> None:
    import time

    blob_id, url, _ = await broker.slot(AID, "", 0, download=False, size=1)
    broker.association_ended(AID)
    await broker.store.put_bytes(key_for(AID, blob_id, 0), b"x")  # as a still-valid S3 URL could
    assert await broker.release_late(time.monotonic()) == 0  # its URLs may still be valid
    assert await broker.release_late(time.monotonic() + 62) == 1
    assert not await broker.store.exists(key_for(AID, blob_id, 0))


async def test_a_released_blob_frees_its_share_of_the_quota(tmp_path: Path, clock: Clock) -> None:
    """A long association moves any number of blobs, as long as it releases them once delivered."""
    broker = await quota_broker(tmp_path, clock, max_blobs=2, max_part_bytes=1000, max_bytes=2000)
    for _ in range(10):
        first, _, _ = await broker.slot(AID, "", 0, download=False, size=1000)
        second, _, _ = await broker.slot(AID, "", 0, download=False, size=1000)
        with pytest.raises(BlobRefused):
            await broker.slot(AID, "", 0, download=False, size=1)
        await broker.release(AID, first)
        await broker.release(AID, second)
    assert broker.usage[AID].bytes == 0 and not broker.usage[AID].blobs
