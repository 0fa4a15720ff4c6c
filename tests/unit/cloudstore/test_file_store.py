"""cloudstore.file: the contract on a temporary directory, plus presigned tokens and file specifics."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import pytest

from cloudstore import (
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    PresignedURLError,
    PresignedURLExpired,
    PresignedURLInvalid,
    open_store,
    sweep,
)
from cloudstore.base import MiB
from cloudstore.file import INCOMING, FileBlobStore
from tests.integration.cloudstore.contract import BlobStoreContract, empty_and_close

pytestmark = pytest.mark.timeout(60)

KEY = b"0123456789abcdef0123456789abcdef"


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TestFileStoreContract(BlobStoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[FileBlobStore]:
        store = open_store((tmp_path / "spill").as_uri(), signing_key=KEY)
        assert isinstance(store, FileBlobStore)
        yield store
        await empty_and_close(store)

    # The bridge will serve file:// presigned tokens; until then, "serving" is verifying
    # the token and doing the operation it grants.
    async def http_put(self, store: BlobStore, url: str, data: bytes) -> None:
        assert isinstance(store, FileBlobStore)
        await store.put_bytes(store.verify_presigned(url, "PUT"), data)

    async def http_get(self, store: BlobStore, url: str) -> bytes:
        assert isinstance(store, FileBlobStore)
        return await store.get_bytes(store.verify_presigned(url, "GET"))

    async def assert_no_incomplete_uploads(self, store: BlobStore) -> None:
        assert isinstance(store, FileBlobStore)
        assert list((store.root / INCOMING).iterdir()) == []


# -- presigned tokens --------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> FileBlobStore:
    return FileBlobStore(tmp_path / "spill", signing_key=KEY, clock=clock)


def replace_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    fields = {name: values[0] for name, values in parse_qs(parts.query).items()}
    fields.update(changes)
    return parts._replace(query=urlencode(fields)).geturl()


async def test_token_round_trip(store: FileBlobStore) -> None:
    put = await store.presign_put("spill/assoc 7/ds?1", 60)
    get = await store.presign_get("spill/assoc 7/ds?1", 60)
    assert put.startswith("file+presigned:///spill/assoc%207/ds%3F1?")
    assert store.verify_presigned(put, "PUT") == "spill/assoc 7/ds?1"
    assert store.verify_presigned(get, "GET") == "spill/assoc 7/ds?1"


async def test_expired_token(store: FileBlobStore, clock: FakeClock) -> None:
    url = await store.presign_get("k", 60)
    clock.now += 59
    assert store.verify_presigned(url, "GET") == "k"
    clock.now += 1
    with pytest.raises(PresignedURLExpired, match="expired"):
        store.verify_presigned(url, "GET")


async def test_expired_token_real_clock(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path, signing_key=KEY)
    url = await store.presign_put("k", 1)
    assert store.verify_presigned(url, "PUT") == "k"
    await asyncio.sleep(1.05 - time.time() % 1)  # just past the next whole second
    with pytest.raises(PresignedURLExpired):
        store.verify_presigned(url, "PUT")


async def test_altered_tokens_are_refused(store: FileBlobStore) -> None:
    url = await store.presign_get("spill/a", 60)
    parts = urlsplit(url)
    sig = parse_qs(parts.query)["sig"][0]
    flipped = ("B" if sig[0] == "A" else "A") + sig[1:]
    expires = int(parse_qs(parts.query)["expires"][0])
    altered = {
        "other key": parts._replace(path="/spill/b").geturl(),
        "longer expiry": replace_query(url, expires=str(expires + 3600)),
        "method": replace_query(url, method="PUT"),
        "signature": replace_query(url, sig=flipped),
        "truncated signature": replace_query(url, sig=sig[:-4]),
    }
    for what, forged in altered.items():
        with pytest.raises(PresignedURLInvalid, match="signature does not match"):
            store.verify_presigned(forged, "GET" if what != "method" else "PUT")
        assert store.verify_presigned(url, "GET") == "spill/a", what


async def test_token_of_another_store_is_refused(store: FileBlobStore, tmp_path: Path) -> None:
    other = FileBlobStore(tmp_path / "other", signing_key=b"another key of 32 bytes........!")
    url = await other.presign_get("spill/a", 60)
    with pytest.raises(PresignedURLInvalid, match="forged or altered"):
        store.verify_presigned(url, "GET")


async def test_token_used_with_the_wrong_method(store: FileBlobStore) -> None:
    url = await store.presign_get("k", 60)
    with pytest.raises(PresignedURLInvalid, match="signed for GET, not PUT"):
        store.verify_presigned(url, "PUT")


async def test_malformed_tokens_are_refused(store: FileBlobStore) -> None:
    good = await store.presign_get("k", 60)
    query = urlsplit(good).query
    for bad in [
        "",
        "https://example.invalid/k?" + query,
        "file:///k?" + query,
        "file+presigned://host/k?" + query,
        "file+presigned:///k",
        "file+presigned:///k?" + query + "&extra=1",
        "file+presigned:///k?" + query + "&sig=again",
        "file+presigned:///?" + query,
        "file+presigned:///a/../k?" + query,
        f"file+presigned:///{quote(INCOMING)}/x?" + query,
        replace_query(good, expires="-5"),
        replace_query(good, expires="1e9"),
        replace_query(good, sig="***"),
        good + "#fragment",
    ]:
        with pytest.raises(PresignedURLInvalid):
            store.verify_presigned(bad, "GET")
    with pytest.raises(PresignedURLInvalid):
        store.verify_presigned(None, "GET")  # type: ignore[arg-type]


async def test_default_signing_key_is_random(tmp_path: Path) -> None:
    first, second = FileBlobStore(tmp_path), FileBlobStore(tmp_path)
    url = await first.presign_get("k", 60)
    assert first.verify_presigned(url, "GET") == "k"
    with pytest.raises(PresignedURLError):
        second.verify_presigned(url, "GET")


def test_short_signing_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        FileBlobStore(tmp_path, signing_key="short")


# -- URLs, layout, leftovers -------------------------------------------------------------


def test_file_urls(tmp_path: Path) -> None:
    spaced = tmp_path / "with space"
    assert open_store(spaced.as_uri()).root == spaced  # type: ignore[attr-defined]
    assert open_store(f"file://localhost{tmp_path}/x").root == tmp_path / "x"  # type: ignore[attr-defined]
    for bad in ["file://server/share", "file:relative/dir", f"file://{tmp_path}?q=1"]:
        with pytest.raises(ValueError):
            open_store(bad)
    with pytest.raises(FileNotFoundError):
        open_store((tmp_path / "absent").as_uri(), create=False)


async def test_layout_and_reserved_directory(store: FileBlobStore) -> None:
    await store.put_bytes("spill/a/b", b"data")
    assert (store.root / "spill" / "a" / "b").read_bytes() == b"data"
    with pytest.raises(ValueError, match="reserved"):
        await store.put_bytes(f"{INCOMING}/x", b"x")
    assert [info.key for info in await store.list()] == ["spill/a/b"]


async def test_delete_prunes_empty_directories(store: FileBlobStore) -> None:
    await store.put_bytes("spill/a/b/c", b"1")
    await store.put_bytes("spill/a/d", b"2")
    await store.delete("spill/a/b/c")
    assert not (store.root / "spill" / "a" / "b").exists()
    assert (store.root / "spill" / "a").is_dir()
    await store.delete("spill/a/d")
    assert list(store.root.iterdir()) in ([], [store.root / INCOMING])
    await store.put_bytes("spill/a/again", b"3")  # the directories come back
    assert await store.get_bytes("spill/a/again") == b"3"


async def test_directories_are_not_blobs(store: FileBlobStore) -> None:
    await store.put_bytes("dir/file", b"x")
    assert not await store.exists("dir")
    with pytest.raises(BlobNotFound):
        await store.get_bytes("dir")
    with pytest.raises(BlobNotFound):
        await store.stat("dir")
    with pytest.raises(BlobNotFound, match="no such blob"):
        await store.get_bytes("dir/file/below")


async def test_temporary_file_lives_in_incoming_during_the_put(store: FileBlobStore) -> None:
    during: list[list[str]] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield bytes(2 * MiB)
        await asyncio.sleep(0.05)
        during.append([p.name for p in (store.root / INCOMING).iterdir()])
        yield bytes(MiB)

    await store.put_stream("k", chunks())
    assert len(during[0]) == 1 and during[0][0].endswith(".part")
    assert list((store.root / INCOMING).iterdir()) == []


async def test_sweep_removes_stale_temporary_files(store: FileBlobStore) -> None:
    incoming = store.root / INCOMING
    incoming.mkdir(exist_ok=True)
    stale, fresh = incoming / "put-crashed.part", incoming / "put-running.part"
    stale.write_bytes(b"half a blob")
    fresh.write_bytes(b"in progress")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    report = await sweep(store, "spill/", older_than_s=3600)
    assert report.aborted_uploads == 1
    assert not stale.exists() and fresh.exists()


async def test_sweep_by_real_age(store: FileBlobStore) -> None:
    await store.put_bytes("spill/old", b"1")
    await store.put_bytes("spill/new", b"2")
    past = time.time() - 7200
    os.utime(store.root / "spill" / "old", (past, past))
    report = await sweep(store, "spill/", older_than_s=3600)
    assert report.deleted == ["spill/old"]
    assert [info.key for info in await store.list()] == ["spill/new"]


async def test_a_blob_cannot_also_be_a_directory(store: FileBlobStore) -> None:
    await store.put_bytes("a", b"blob")
    with pytest.raises(BlobStoreError, match="put 'a/b' on"):
        await store.put_bytes("a/b", b"below a blob")
    await store.put_bytes("c/d", b"x")
    with pytest.raises(BlobStoreError, match="put 'c' on"):
        await store.put_bytes("c", b"over a directory")
    await store.delete("c")  # a directory is not a blob: nothing to delete
    assert [info.key for info in await store.list()] == ["a", "c/d"]
    assert list((store.root / INCOMING).iterdir()) == []


async def test_an_upload_token_is_bound_to_its_signed_length(tmp_path: Path) -> None:
    from cloudstore.base import PresignedURLInvalid

    store = FileBlobStore(tmp_path, signing_key=KEY)
    assert store.bounds_uploads
    url = await store.presign_put("k", 60, content_length=5)
    assert "length=5" in url
    assert store.verify_presigned_upload(url, 5) == "k"
    with pytest.raises(PresignedURLInvalid, match="signed for 5 bytes, not 6"):
        store.verify_presigned_upload(url, 6)
    with pytest.raises(PresignedURLInvalid, match="forged or altered"):
        store.verify_presigned_upload(url.replace("length=5", "length=50"), 50)
    with pytest.raises(PresignedURLInvalid, match="forged or altered"):
        store.verify_presigned_upload(url.replace("length=5&", ""), 6)  # dropping the length
    unbounded = await store.presign_put("k", 60)
    assert store.verify_presigned_upload(unbounded, 123) == "k"
