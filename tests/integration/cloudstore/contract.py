"""The behaviour every BlobStore backend must show, as one abstract test class.

Subclass :class:`BlobStoreContract` once per backend (``class TestS3Store(BlobStoreContract)``)
and give it a ``store`` fixture that yields a fresh, empty store (a unique prefix is
enough). Override the ``http_*`` hooks when the backend's presigned URLs are not HTTP,
and :meth:`assert_no_incomplete_uploads` to check backend-specific leftovers.

This module imports no cloud SDK, so the file backend runs it without them.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import tracemalloc
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from cloudstore import BlobInfo, BlobNotFound, BlobStore, BlobStoreError, sweep
from cloudstore.base import MiB

HTTP_TIMEOUT_S = 15
#: urllib without proxies from the environment: every request here goes to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Source:
    """A deterministic stream of ``total`` bytes in ``chunk`` pieces, hashed as it is produced."""

    def __init__(self, total: int, chunk: int = MiB, seed: int = 0) -> None:
        self.total = total
        self.chunk = chunk
        self.seed = seed
        self.sha256 = hashlib.sha256()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        rng = random.Random(self.seed)
        sent = 0
        while sent < self.total:
            piece = rng.randbytes(min(self.chunk, self.total - sent))
            self.sha256.update(piece)
            sent += len(piece)
            yield piece
            await asyncio.sleep(0)

    def data(self) -> bytes:
        rng = random.Random(self.seed)
        pieces = []
        sent = 0
        while sent < self.total:
            pieces.append(rng.randbytes(min(self.chunk, self.total - sent)))
            sent += len(pieces[-1])
        return b"".join(pieces)


async def sha256_of(store: BlobStore, key: str, **kwargs: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    async for chunk in store.get_stream(key, **kwargs):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


async def empty_and_close(store: BlobStore) -> None:
    """Fixture teardown: delete what a test left (best effort), then close the store."""
    try:
        for info in await store.list():
            await store.delete(info.key)
    except BlobStoreError:
        pass
    await store.close()


class BlobStoreContract:
    """Abstract: subclasses provide a ``store`` fixture."""

    # -- hooks ------------------------------------------------------------------------

    async def http_put(self, store: BlobStore, url: str, data: bytes) -> None:
        """Upload through a presigned URL as a router would: plain HTTP, no credentials."""

        def put() -> int:
            # An explicit Content-Type: urllib's default for a body (form-urlencoded) makes
            # moto's server parse the body as a form, and hang on large binary ones.
            request = urllib.request.Request(
                url, data=data, method="PUT", headers={"Content-Type": "application/octet-stream"}
            )
            with _OPENER.open(request, timeout=HTTP_TIMEOUT_S) as response:
                return response.status

        assert await asyncio.to_thread(put) in (200, 201, 204)

    async def http_get(self, store: BlobStore, url: str) -> bytes:
        def get() -> bytes:
            with _OPENER.open(url, timeout=HTTP_TIMEOUT_S) as response:
                return response.read()

        return await asyncio.to_thread(get)

    async def assert_no_incomplete_uploads(self, store: BlobStore) -> None:
        """Backends with upload state (multipart uploads, temporary files) check it is gone."""

    # -- streaming put and get ----------------------------------------------------------

    async def test_streamed_multipart_put_round_trips(self, store: BlobStore) -> None:
        source = Source(12 * MiB, chunk=MiB, seed=1)
        info = await store.put_stream("spill/a/blob-12m", source, part_size=5 * MiB)
        assert info.key == "spill/a/blob-12m"
        assert info.size == 12 * MiB
        assert abs(info.created - datetime.now(UTC)) < timedelta(minutes=5)
        digest, size = await sha256_of(store, "spill/a/blob-12m", chunk_size=MiB)
        assert (digest, size) == (source.sha256.hexdigest(), 12 * MiB)
        assert await store.stat("spill/a/blob-12m") == info

    async def test_put_ending_on_a_part_boundary(self, store: BlobStore) -> None:
        source = Source(10 * MiB, chunk=MiB, seed=2)
        info = await store.put_stream("boundary", source, part_size=5 * MiB)
        assert info.size == 10 * MiB
        assert await sha256_of(store, "boundary") == (source.sha256.hexdigest(), 10 * MiB)

    async def test_small_and_empty_blobs(self, store: BlobStore) -> None:
        assert (await store.put_bytes("small", b"hello")).size == 5
        assert await store.get_bytes("small") == b"hello"

        async def nothing() -> AsyncIterator[bytes]:
            for _ in ():
                yield b""

        info = await store.put_stream("empty", nothing())
        assert info.size == 0
        assert await store.get_bytes("empty") == b""
        assert await store.exists("empty")

    async def test_mutable_chunks_are_copied(self, store: BlobStore) -> None:
        """A producer may reuse its buffer as soon as it has yielded it."""
        buffer = bytearray(MiB)

        async def reusing() -> AsyncIterator[bytearray]:
            for value in range(7):
                buffer[:] = bytes([value]) * MiB
                yield buffer

        await store.put_stream("reused", reusing(), part_size=5 * MiB)
        expected = b"".join(bytes([value]) * MiB for value in range(7))
        assert await sha256_of(store, "reused") == (hashlib.sha256(expected).hexdigest(), 7 * MiB)

    async def test_overwrite_replaces_the_blob(self, store: BlobStore) -> None:
        await store.put_bytes("k", b"first version")
        await store.put_bytes("k", b"second")
        assert await store.get_bytes("k") == b"second"
        assert [info.key for info in await store.list()] == ["k"]

    async def test_blob_is_invisible_until_the_stream_ends(self, store: BlobStore) -> None:
        seen_during: list[bool] = []

        async def watched() -> AsyncIterator[bytes]:
            for index in range(8):
                if index == 7:  # after the first part went out
                    seen_during.append(await store.exists("atomic"))
                yield bytes(MiB)

        await store.put_stream("atomic", watched(), part_size=5 * MiB)
        assert seen_during == [False]
        assert await store.exists("atomic")

    async def test_failing_source_stores_nothing(self, store: BlobStore) -> None:
        class SourceBroke(Exception):
            pass

        async def broken() -> AsyncIterator[bytes]:
            for _ in range(6):
                yield bytes(MiB)
            raise SourceBroke("association aborted")

        with pytest.raises(SourceBroke):
            await store.put_stream("broken", broken(), part_size=5 * MiB)
        assert not await store.exists("broken")
        assert await store.list() == []
        await self.assert_no_incomplete_uploads(store)

    async def test_cancelled_put_stores_nothing(self, store: BlobStore) -> None:
        started = asyncio.Event()

        async def stalls() -> AsyncIterator[bytes]:
            for _ in range(6):
                yield bytes(MiB)
            started.set()
            await asyncio.sleep(3600)
            yield b"never"

        task = asyncio.create_task(store.put_stream("cancelled", stalls(), part_size=5 * MiB))
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not await store.exists("cancelled")
        await self.assert_no_incomplete_uploads(store)

    async def test_cancel_during_a_store_call(self, store: BlobStore) -> None:
        """Cancelled while the SDK works in a thread: the call finishes, then the upload is undone."""
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[object]] = []

        async def source(cancel_at: int) -> AsyncIterator[bytes]:
            for index in range(16):
                if index == cancel_at:
                    # The source does not await, so the store goes on until it awaits the SDK call
                    # that the next full batch starts; the cancellation lands there.
                    loop.call_soon(tasks[0].cancel)
                yield bytes(MiB)

        for cancel_at in (4, 7):  # the first part (S3: creating the upload), then the second
            put = store.put_stream(f"mid-call-{cancel_at}", source(cancel_at), part_size=5 * MiB)
            tasks[:] = [asyncio.create_task(put)]
            with pytest.raises(asyncio.CancelledError):
                await tasks[0]
        assert await store.list() == []
        await self.assert_no_incomplete_uploads(store)

    async def test_bad_chunks_and_part_sizes_are_refused(self, store: BlobStore) -> None:
        async def text() -> AsyncIterator[str]:
            yield "not bytes"

        with pytest.raises(TypeError):
            await store.put_stream("typed", text())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="part_size"):
            await store.put_bytes("tiny-parts", b"x", part_size=MiB)
        assert not await store.exists("typed")

    # -- ranged get ---------------------------------------------------------------------

    async def test_ranged_get(self, store: BlobStore) -> None:
        data = Source(3 * MiB + 12345, chunk=100_000, seed=3).data()
        await store.put_bytes("ranged", data)
        size = len(data)
        for start, end in [
            (0, 10),
            (1000, 2_500_000),
            (size - 1, None),
            (5, size + 1000),
            (MiB, 2 * MiB),
            (size, None),
            (size + 10, None),
            (7, 7),
            (9, 3),
        ]:
            got = await store.get_bytes("ranged", start=start, end=end)
            assert got == data[start:end], (start, end)

    async def test_get_respects_chunk_size(self, store: BlobStore) -> None:
        data = Source(300_000, chunk=300_000, seed=4).data()
        await store.put_bytes("chunked", data)
        chunks = [chunk async for chunk in store.get_stream("chunked", start=10, chunk_size=64 * 1024)]
        assert all(0 < len(chunk) <= 64 * 1024 for chunk in chunks)
        assert b"".join(chunks) == data[10:]

    async def test_bad_ranges_are_refused(self, store: BlobStore) -> None:
        with pytest.raises(ValueError):
            store.get_stream("x", start=-1)
        with pytest.raises(ValueError):
            store.get_stream("x", chunk_size=0)
        with pytest.raises(TypeError):
            store.get_stream("x", end=1.5)  # type: ignore[arg-type]

    # -- missing blobs ------------------------------------------------------------------

    async def test_missing_blob(self, store: BlobStore) -> None:
        with pytest.raises(BlobNotFound) as caught:
            async for _ in store.get_stream("nope/missing"):
                pass
        message = str(caught.value)
        assert "nope/missing" in message and store.url in message
        assert caught.value.key == "nope/missing" and caught.value.store == store.url
        with pytest.raises(BlobNotFound):
            await store.get_bytes("nope/missing", start=5, end=5)
        with pytest.raises(BlobNotFound):
            await store.get_bytes("nope/missing", start=100)
        with pytest.raises(BlobNotFound):
            await store.stat("nope/missing")
        assert not await store.exists("nope/missing")
        await store.delete("nope/missing")  # deleting twice (sweep vs receiver) is fine

    # -- exists, delete, list -----------------------------------------------------------

    async def test_exists_delete_and_list_by_prefix(self, store: BlobStore) -> None:
        before = datetime.now(UTC) - timedelta(minutes=5)
        sizes = {"a/1": 1, "a/2": 22, "ab/3": 333, "b/deep/4": 4444}
        for key, size in sizes.items():
            await store.put_bytes(key, b"x" * size)

        everything = await store.list()
        assert [info.key for info in everything] == ["a/1", "a/2", "ab/3", "b/deep/4"]
        for info in everything:
            assert isinstance(info, BlobInfo)
            assert info.size == sizes[info.key]
            assert info.created.tzinfo is not None and before < info.created < datetime.now(UTC) + timedelta(minutes=5)

        assert [info.key for info in await store.list("a/")] == ["a/1", "a/2"]
        assert [info.key for info in await store.list("a")] == ["a/1", "a/2", "ab/3"]
        assert [info.key for info in await store.list("b/de")] == ["b/deep/4"]
        assert await store.list("c/") == []

        assert await store.exists("a/1")
        await store.delete("a/1")
        assert not await store.exists("a/1")
        await store.delete("a/1")
        assert [info.key for info in await store.list("a/")] == ["a/2"]
        await store.delete("b/deep/4")
        assert [info.key for info in await store.list()] == ["a/2", "ab/3"]

    async def test_keys_with_odd_characters(self, store: BlobStore) -> None:
        keys = ["sp ace/x+y=z", "percent%41/q?x#y", "unicode/é€😀", "dots/a.b..c"]
        for index, key in enumerate(keys):
            await store.put_bytes(key, bytes([index]) * 10)
        for index, key in enumerate(keys):
            assert await store.get_bytes(key) == bytes([index]) * 10
        assert sorted(info.key for info in await store.list()) == sorted(keys)

    async def test_invalid_keys_are_refused(self, store: BlobStore) -> None:
        for key in ["", "/abs", "a/../b", "a/./b", "a//b", "trailing/", "back\\slash", "nul\x00", "new\nline"]:
            with pytest.raises(ValueError):
                await store.put_bytes(key, b"x")
            with pytest.raises(ValueError):
                await store.exists(key)
            with pytest.raises(ValueError):
                store.get_stream(key)
            with pytest.raises(ValueError):
                await store.presign_get(key, 60)
        with pytest.raises(ValueError):
            await store.list("../up")
        assert await store.list() == []

    async def test_concurrent_puts(self, store: BlobStore) -> None:
        await asyncio.gather(*(store.put_bytes(f"many/{index}", bytes([index]) * 1000) for index in range(8)))
        assert [info.key for info in await store.list("many/")] == [f"many/{index}" for index in range(8)]

    # -- presigned URLs -----------------------------------------------------------------

    async def test_presigned_put_then_get(self, store: BlobStore) -> None:
        data = Source(MiB + 7, chunk=MiB, seed=5).data()
        put_url = await store.presign_put("presigned/blob one", 300)
        await self.http_put(store, put_url, data)
        assert (await store.stat("presigned/blob one")).size == len(data)
        get_url = await store.presign_get("presigned/blob one", 300)
        assert await self.http_get(store, get_url) == data

    async def test_presign_expiry_bounds(self, store: BlobStore) -> None:
        for bad in (0, -5, 7 * 24 * 3600 + 1):
            with pytest.raises(ValueError):
                await store.presign_put("k", bad)

    # -- memory -------------------------------------------------------------------------

    async def test_large_streamed_put_keeps_memory_bounded(self, store: BlobStore) -> None:
        part_size = 8 * MiB
        source = Source(64 * MiB, chunk=MiB, seed=6)
        was_tracing = tracemalloc.is_tracing()
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            info = await store.put_stream("big/64m", source, part_size=part_size)
            _, peak = tracemalloc.get_traced_memory()
            peak -= before
        finally:
            if not was_tracing:
                tracemalloc.stop()
        assert info.size == 64 * MiB
        # A few parts in flight at most (our buffer, the SDK's copy), never the blob.
        assert peak < 3 * part_size + 4 * MiB, f"peak {peak / MiB:.1f} MiB while streaming a 64 MiB blob"
        assert await sha256_of(store, "big/64m", chunk_size=4 * MiB) == (source.sha256.hexdigest(), 64 * MiB)

    # -- lifecycle ----------------------------------------------------------------------

    async def test_sweep_deletes_old_blobs_under_the_prefix(self, store: BlobStore) -> None:
        for key in ["spill/x", "spill/y/z", "kept/w"]:
            await store.put_bytes(key, b"orphan")

        fresh = await sweep(store, "spill/", older_than_s=3600)
        assert fresh.deleted == [] and fresh.errors == []
        assert len(await store.list()) == 3

        later = await sweep(store, "spill/", older_than_s=3600, now=time.time() + 2 * 3600)
        assert later.deleted == ["spill/x", "spill/y/z"]
        assert later.errors == []
        assert [info.key for info in await store.list()] == ["kept/w"]

    # -- lifetime -----------------------------------------------------------------------

    async def test_closed_store_refuses_work(self, store: BlobStore) -> None:
        await store.put_bytes("before-close", b"x")
        await store.close()
        await store.close()  # idempotent
        with pytest.raises(BlobStoreError, match="closed"):
            await store.exists("before-close")
        with pytest.raises(BlobStoreError, match="closed"):
            await store.put_bytes("after-close", b"x")
