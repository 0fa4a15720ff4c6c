"""cloudstore.base and cloudstore.lifecycle: argument rules, chunk batching, URL parsing, sweep."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from cloudstore import BlobNotFound, BlobStoreError, sweep
from cloudstore.base import ChunkReader, check_key, check_prefix, split_bucket_url, utc
from cloudstore.file import FileBlobStore


@pytest.mark.parametrize("key", ["a", "spill/assoc-1/ds.bin", "with space", "é/€", "a.b/..c/d..", "x" * 1024])
def test_valid_keys(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["", "/a", "a/", "a//b", ".", "..", "a/./b", "a/../b", "a\\b", "a\x00b", "tab\t", "del\x7f", "x" * 1025, "\ud800"],
)
def test_invalid_keys(key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)


def test_key_type() -> None:
    with pytest.raises(TypeError):
        check_key(b"bytes")


@pytest.mark.parametrize("prefix", ["", "a", "a/", "a/b", "a/b/", "a/b."])
def test_valid_prefixes(prefix: str) -> None:
    assert check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "/a", "a//", "a//b", "../", "a/../", "./a"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError):
        check_prefix(prefix)


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
        ("s3://bucket/spill", "bucket", "spill/"),
        ("s3://bucket/relay/spill/", "bucket", "relay/spill/"),
        ("s3://bucket/with%20space", "bucket", "with space/"),
    ],
)
def test_bucket_urls(url: str, bucket: str, prefix: str) -> None:
    assert split_bucket_url(url, "s3") == (bucket, prefix)


@pytest.mark.parametrize(
    "url", ["s3:///prefix", "gs://bucket/x", "s3://key:secret@bucket/p", "s3://bucket/a//b", "s3://b/x?region=1"]
)
def test_bad_bucket_urls(url: str) -> None:
    with pytest.raises(ValueError):
        split_bucket_url(url, "s3")


def test_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert utc(datetime(2026, 1, 1, 12, tzinfo=plus_two)) == datetime(2026, 1, 1, 10, tzinfo=UTC)
    assert utc(datetime(2026, 1, 1, 12)).tzinfo is UTC


async def test_chunk_reader_batches() -> None:
    async def source() -> AsyncIterator[bytes | bytearray | memoryview]:
        yield b"ab"
        yield b""
        yield bytearray(b"cd")
        yield memoryview(b"efg")
        yield b"h"

    reader = ChunkReader(source())
    assert await reader.read_at_least(3) == [b"ab", b"cd"]
    assert not reader.eof
    batch = await reader.read_at_least(100)
    assert batch == [b"efg", b"h"] and all(type(chunk) is bytes for chunk in batch)
    assert reader.eof and reader.total == 8
    assert await reader.read_at_least(1) == []


async def test_error_messages_name_store_key_and_failure(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    with pytest.raises(BlobNotFound) as caught:
        await store.stat("spill/k")
    assert str(caught.value) == f"stat 'spill/k' on {tmp_path.as_uri()} failed: no such blob"


class FlakyStore(FileBlobStore):
    """Refuses to delete one key, to see the sweep carry on past a failure."""

    async def _delete(self, key: str) -> None:
        if key == "spill/stuck":
            raise self._error("delete", key, "permission denied")
        await super()._delete(key)


async def test_sweep_goes_on_past_failures(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path)
    for key in ["spill/a", "spill/stuck", "spill/z"]:
        await store.put_bytes(key, b"x")
    report = await sweep(store, "spill/", older_than_s=0, now=datetime.now(UTC).timestamp() + 10)
    assert report.deleted == ["spill/a", "spill/z"]
    assert [str(error) for error in report.errors] == [
        f"delete 'spill/stuck' on {tmp_path.as_uri()} failed: permission denied"
    ]
    assert all(isinstance(error, BlobStoreError) for error in report.errors)


async def test_sweep_arguments(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    with pytest.raises(ValueError):
        await sweep(store, "/abs", 60)
    with pytest.raises(ValueError):
        await sweep(store, "spill/", -1)


@pytest.mark.parametrize("expires", [0, 0.0, -1, 7 * 24 * 3600 + 1, float("inf"), float("nan")])
async def test_bad_expiries(tmp_path: Path, expires: float) -> None:
    with pytest.raises(ValueError):
        await FileBlobStore(tmp_path).presign_get("k", expires)


async def test_fractional_expiry_rounds_up(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    assert store.verify_presigned(await store.presign_get("k", 0.5), "GET") == "k"
    with pytest.raises(TypeError):
        await store.presign_get("k", "60")  # type: ignore[arg-type]
