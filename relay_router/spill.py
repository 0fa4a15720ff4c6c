"""Cloud spill, router side: large data sets travel through the bridge's blob store by reference.

Spill works at the frame level and leaves the Upper Layer untouched. Once the
data set arriving from the local device passes ``spill_threshold_bytes``
(PduFramer.dataset_bytes), the raw P-DATA bytes that follow, up to the end of
the frame that completes the data set, go into a blob instead of Data frames:
cut into parts of ``spill_part_bytes``, each compressed (when agreed and it
pays) and sealed with the association key under its own nonce, uploaded
through a presigned URL the bridge hands out (``parallel`` parts in flight)
while the data set is still arriving. Then ONE Data frame goes in the stream,
at the sequence number the blob's bytes would have started at: ``blob`` set,
and its payload the sealed manifest (blob id, part count, plaintext length,
SHA-256 over the stored parts).

The receiving router downloads the parts (``parallel`` in flight), checks
each one's AEAD tag (nonce and associated data bind the association,
direction, frame sequence, part number and a last-part flag, so a part that is
altered, swapped, replayed or missing fails), and feeds the plaintext to its
RelayConnection exactly as if it had arrived inline: the bytes ARE the
original P-DATA PDUs, so the negotiated maximum PDU length holds by
construction. A blob that fails to open aborts the association; no
unauthenticated byte ever reaches the local device.

Routers hold no cloud credentials: the bridge signs one URL per part, only for
blobs of the caller's own associations. For the file:// store, the URLs are
capabilities for the bridge's PutBlobPart/GetBlobPart RPCs.

If the store cannot be reached, the bytes go inline (logged and counted;
spill then pauses for ``BACKOFF_S`` in this process). If it fails after a part
was stored, the association is aborted cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc.aio

from protos.relay.v1 import relay_pb2 as pb
from relay_router.compress import FLAG_SHUFFLED, DecompressionError, FrameCompressor, FrameDecompressor, unshuffle2
from relay_router.seal import FLAG_COMPRESSED, FLAG_SEALED, FrameSealer, TamperError
from relay_router.ul.framer import PduFramer

log = logging.getLogger("relay_router.spill")

FEATURE = "spill/2"  # pipelined blobs (PARTS notices); routers that offer the older "spill" send inline to this one
FLAG_BLOB = 0x4  # a Data frame whose payload is a sealed blob notice (PARTS or END, with the manifest)
FLAG_PART = 0x8  # a sealed part of a blob
FLAG_LAST = 0x10  # ... the last one
FLAG_PART_SHUFFLED = 0x20  # with FLAG_COMPRESSED: byte planes to interleave after zstd (relay_router.compress)
PART_SEQ_BASE = 1 << 63  # part nonces never meet frame nonces (frame sequence numbers stay far below)
MAX_PART_INDEX = 1 << 20
MAX_BLOBS = 1 << 42  # blobs per direction of one association
KIND_PARTS = 1  # notice: parts 0 .. count-1 of the blob are stored
KIND_END = 2  # notice: the blob is complete (its manifest)
BACKOFF_S = 60.0
HTTP_TIMEOUT_S = 60.0
_PARTS = struct.Struct(">B32sQI")  # kind, blob id, blob ordinal, parts stored
_END = struct.Struct(">B32sQIQ32s")  # kind, blob id, blob ordinal, parts, plaintext length, SHA-256 of the parts


# Sends one blob notice: called with a function that builds the frame at the sequence number it is given.
Announce = Callable[[Callable[[int], pb.Data]], Awaitable[None]]


class SpillUnavailable(Exception):
    """The blob store (or the bridge's broker) cannot be used now: send inline."""


class BlobGone(SpillUnavailable):
    """A part that was stored is not in the store any more (deleted early, or expired by the store)."""


class SpillFailed(Exception):
    """A blob could not be completed after parts were stored, or a received blob is bad: abort."""


@dataclass
class SpillStats:
    """This router process's spill counters (exported by relay_router.metrics); they only grow."""

    blobs_sent: int = 0  # data sets spilled (blob complete, reference sent)
    bytes_spilled: int = 0  # plaintext bytes of those blobs
    parts_sent: int = 0  # parts stored
    stored_bytes_sent: int = 0  # bytes uploaded (sealed, maybe compressed)
    blobs_received: int = 0  # blobs fetched, verified and delivered
    bytes_received: int = 0  # plaintext bytes delivered from blobs
    parts_received: int = 0  # parts fetched and verified
    stored_bytes_received: int = 0  # bytes downloaded
    fallbacks: int = 0  # data sets sent inline because the store could not be used
    send_failures: int = 0  # blobs abandoned after parts were stored (association aborted)
    receive_failures: int = 0  # blobs that could not be fetched or verified (association aborted)


STATS = SpillStats()
_down_until = 0.0


def part_seq(ordinal: int, part: int) -> int:
    """The nonce sequence of part ``part`` of the ``ordinal``-th blob of a direction (never a frame's)."""
    if ordinal >= MAX_BLOBS or part >= MAX_PART_INDEX:
        raise SpillFailed("blob too large, or too many blobs in one association, for part nonces")
    return PART_SEQ_BASE | (ordinal << 20) | part


class BlobTransport:
    """Moves blob parts for one router: URLs from the bridge, bytes by HTTP or through the bridge."""

    def __init__(self, link: object) -> None:
        self.link = link  # relay_router.tunnel.BridgeLink: its gRPC stub and session token

    def _call(self, name: str) -> tuple[Callable[..., object], tuple[tuple[str, str], ...]]:
        stub = self.link._stub  # type: ignore[attr-defined]  # noqa: SLF001 - one channel per router
        if stub is None:
            raise SpillUnavailable("not connected to the bridge")
        return getattr(stub, name), self.link._metadata()  # type: ignore[attr-defined]  # noqa: SLF001

    async def slot(self, association_id: str, blob_id: str, part: int, *, download: bool) -> tuple[str, str]:
        try:
            method, metadata = self._call("BlobSlot")
            request = pb.BlobSlotRequest(association_id=association_id, blob_id=blob_id, part=part, download=download)
            answer = await method(request, metadata=metadata, timeout=HTTP_TIMEOUT_S)  # type: ignore[misc]
        except grpc.aio.AioRpcError as exc:
            raise SpillUnavailable(f"the bridge gave no blob URL: {exc.code().name} {exc.details()}") from None
        except Exception as exc:  # noqa: BLE001 - LinkDown and the like
            raise SpillUnavailable(f"the bridge gave no blob URL: {exc}") from None
        return answer.blob_id, answer.url

    async def put(self, url: str, data: bytes) -> None:
        if url.startswith(("http://", "https://")):
            await asyncio.to_thread(_http, "PUT", url, data)
            return
        method, metadata = self._call("PutBlobPart")
        try:
            await method(pb.BlobPart(url=url, data=data), metadata=metadata, timeout=HTTP_TIMEOUT_S)  # type: ignore[misc]
        except grpc.aio.AioRpcError as exc:
            raise SpillUnavailable(f"storing a part failed: {exc.code().name} {exc.details()}") from None

    async def get(self, url: str) -> bytes:
        if url.startswith(("http://", "https://")):
            return await asyncio.to_thread(_http, "GET", url, None)
        method, metadata = self._call("GetBlobPart")
        try:
            answer = await method(pb.BlobPart(url=url), metadata=metadata, timeout=HTTP_TIMEOUT_S)  # type: ignore[misc]
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.NOT_FOUND or "no such blob" in details:
                raise BlobGone(f"the bridge's store has no such part ({details})") from None
            raise SpillUnavailable(f"fetching a part failed: {exc.code().name} {details}") from None
        return answer.data  # type: ignore[attr-defined,no-any-return]

    async def release(self, association_id: str, blob_id: str) -> None:
        with contextlib.suppress(Exception):  # the bridge deletes the rest at the end, the sweep after a TTL
            method, metadata = self._call("ReleaseBlob")
            request = pb.BlobSlotRequest(association_id=association_id, blob_id=blob_id)
            await method(request, metadata=metadata, timeout=HTTP_TIMEOUT_S)  # type: ignore[misc]


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, data: bytes | None) -> bytes:
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/octet-stream")
    try:
        with _OPENER.open(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.read()  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        if method == "GET" and exc.code == 404:
            raise BlobGone(f"the store has no such part (HTTP 404 {exc.reason})") from None
        raise SpillUnavailable(f"{method} of a blob part failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SpillUnavailable(f"{method} of a blob part failed: {exc}") from None


class SpillSender:
    """One direction's outgoing spill for one association; driven by RelayedAssociation.send_data.

    Pipelined: as soon as the parts of a blob are stored (in order from part 0), a sealed
    ``PARTS`` notice goes in the stream (``announce``), so the receiving router downloads part k
    while this router still uploads part k+1. ``END`` follows the last part, with the manifest.
    """

    def __init__(
        self,
        transport: BlobTransport,
        association_id: str,
        sealer: FrameSealer,
        framer: PduFramer,
        *,
        threshold: int,
        part_bytes: int,
        parallel: int,
        compression_level: Callable[[], int | None],
        announce: Announce,
        shuffle: Callable[[], bool] = lambda: False,
    ) -> None:
        self.transport, self.association_id, self.sealer, self.framer = transport, association_id, sealer, framer
        self.threshold, self.part_bytes, self.parallel = threshold, part_bytes, max(1, parallel)
        self._level = compression_level
        self._shuffle = shuffle
        self._announce = announce
        self.active = False
        self.disabled = False
        self._head = bytearray()  # the data set so far, held back until it passes the threshold or ends
        self._head_count = 0
        self._ordinal = 0  # blobs begun in this direction: part nonces are unique per (ordinal, part)
        self._reset()

    def _reset(self) -> None:
        self.active = False
        self._blob_id = ""
        self._first_url = ""
        self._buffer = bytearray()
        self._parts = 0
        self._plain_len = 0
        self._stored_len = 0
        self._digest = hashlib.sha256()
        self._start_count = 0
        self._held: dict[int, bytes] = {}  # plaintext of parts not yet stored (inline fallback)
        self._stored: dict[int, bytes] = {}  # stored bytes of uploaded parts waiting for the digest, in order
        self._next_digest = 0  # parts 0 .. _next_digest-1 are stored
        self._announced = 0  # ... and announced to the receiving router
        self._tasks: dict[int, asyncio.Task[bytes]] = {}
        self._any_stored = False
        self._compressor: FrameCompressor | None = None

    async def offer(self, payload: bytes, established: bool) -> bytes:
        """The bytes to send inline now; blob notices go out through ``announce`` meanwhile."""
        if not self.active:
            # Hold back a data set in progress (at most `threshold` bytes), so that one that turns out
            # big travels through the store whole and one that stays small goes inline at its end.
            if not self._head:
                self._head_count = self.framer.datasets_completed
            self._head += payload
            if (
                self.disabled
                or not established
                or time.monotonic() < _down_until
                or self.framer.datasets_completed != self._head_count
                or not self.framer.dataset_bytes
            ):
                return self._flush_head()
            if self.framer.dataset_bytes <= self.threshold:
                return b""
            try:
                self._blob_id, self._first_url = await self.transport.slot(self.association_id, "", 0, download=False)
            except SpillUnavailable as exc:
                return self._fall_back(str(exc), self._flush_head())
            payload = self._flush_head()
            self.active = True
            self._start_count = self.framer.datasets_completed
            level = self._level()
            self._compressor = FrameCompressor(level, shuffle=self._shuffle()) if level else None
        self._buffer += payload
        try:
            await self._harvest()
            while len(self._buffer) >= self.part_bytes:
                chunk = bytes(self._buffer[: self.part_bytes])
                del self._buffer[: self.part_bytes]
                await self._emit(chunk, last=False)
            if self.framer.datasets_completed == self._start_count and established:
                return b""
            tail = bytes(self._buffer)
            self._buffer.clear()
            await self._emit(tail, last=True)
            await self._wait_all()
        except SpillUnavailable as exc:
            if self._any_stored:
                STATS.send_failures += 1
                await self.discard()
                raise SpillFailed(f"the blob store failed in the middle of a blob: {exc}") from None
            inline = b"".join(self._held[i] for i in sorted(self._held)) + bytes(self._buffer)
            await self._cancel()
            self._reset()
            return self._fall_back(str(exc), inline)
        await self._announce(self._end_frame)
        STATS.blobs_sent += 1
        STATS.bytes_spilled += self._plain_len
        log.info(
            "spilled %d bytes in %d parts to blob %s",
            self._plain_len,
            self._parts,
            self._blob_id,
            extra={"assoc": self.association_id},
        )
        self._ordinal += 1
        self._reset()
        return b""

    def _flush_head(self) -> bytes:
        head = bytes(self._head)
        self._head.clear()
        return head

    def _fall_back(self, why: str, inline: bytes) -> bytes:
        global _down_until
        STATS.fallbacks += 1
        self.disabled = True
        _down_until = time.monotonic() + BACKOFF_S
        log.warning(
            "blob store unavailable, sending %d bytes inline (spill paused for %g s): %s",
            len(inline),
            BACKOFF_S,
            why,
            extra={"assoc": self.association_id},
        )
        return inline

    async def _emit(self, plain: bytes, *, last: bool) -> None:
        index = self._parts
        self._parts += 1
        self._plain_len += len(plain)
        flags = FLAG_SEALED | FLAG_PART | (FLAG_LAST if last else 0)
        data = plain
        if self._compressor is not None:
            data, packed = self._compressor.pack(plain)
            flags |= (packed & FLAG_COMPRESSED) | (FLAG_PART_SHUFFLED if packed & FLAG_SHUFFLED else 0)
        stored = bytes([flags]) + self.sealer.seal(data, part_seq(self._ordinal, index), flags)
        self._stored_len += len(stored)
        self._held[index] = plain
        # Bounded memory: at most `parallel` parts in flight.
        while len(self._tasks) >= self.parallel:
            await self._collect(min(self._tasks))
        self._tasks[index] = asyncio.create_task(self._upload(index, stored))

    async def _upload(self, index: int, stored: bytes) -> bytes:
        url = (
            self._first_url
            if index == 0
            else (await self.transport.slot(self.association_id, self._blob_id, index, download=False))[1]
        )
        await self.transport.put(url, stored)
        return stored

    async def _harvest(self) -> None:
        """Collect (and announce) the uploads that finished since the last call, in order, without waiting."""
        while self._tasks and self._tasks[min(self._tasks)].done():
            await self._collect(min(self._tasks))

    async def _collect(self, index: int) -> None:
        task = self._tasks.pop(index)
        stored = await task  # raises SpillUnavailable
        self._any_stored = True
        STATS.parts_sent += 1
        STATS.stored_bytes_sent += len(stored)
        self._held.pop(index, None)
        self._stored[index] = stored
        while self._next_digest in self._stored:
            self._digest.update(self._stored.pop(self._next_digest))
            self._next_digest += 1
        if self._next_digest > self._announced:
            self._announced = self._next_digest
            await self._announce(self._parts_frame)

    async def _wait_all(self) -> None:
        while self._tasks:
            await self._collect(min(self._tasks))

    async def _cancel(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    async def discard(self) -> None:
        """Drop a blob in progress (the association is ending); the bridge deletes what was stored."""
        await self._cancel()
        self._reset()

    def _frame(self, seq: int, notice: bytes, digest: bytes = b"") -> pb.Data:
        flags = FLAG_SEALED | FLAG_BLOB
        return pb.Data(
            payload=self.sealer.seal(notice, seq, flags),
            seq=seq,
            flags=flags,
            blob=pb.BlobRef(blob_id=self._blob_id, size=self._stored_len, digest=digest),
        )

    def _parts_frame(self, seq: int) -> pb.Data:
        return self._frame(seq, _PARTS.pack(KIND_PARTS, self._blob_id.encode(), self._ordinal, self._announced))

    def _end_frame(self, seq: int) -> pb.Data:
        digest = self._digest.digest()
        notice = _END.pack(KIND_END, self._blob_id.encode(), self._ordinal, self._parts, self._plain_len, digest)
        return self._frame(seq, notice, digest)


class IncomingBlob:
    """A blob being received: parts fetched in order as they are announced, ``parallel`` in flight."""

    def __init__(self, receiver: SpillReceiver, blob_id: str, ordinal: int) -> None:
        self.receiver, self.blob_id, self.ordinal = receiver, blob_id, ordinal
        self.announced = 0
        self.end: tuple[int, int, bytes] | None = None  # (parts, plaintext length, digest) once END arrived
        self._changed = asyncio.Event()

    def announce(self, count: int) -> None:
        if count < self.announced or count >= MAX_PART_INDEX or self.end is not None:
            raise SpillFailed(f"SECURITY: blob {self.blob_id}: parts notice out of order")
        self.announced = count
        self._changed.set()

    def finish(self, parts: int, plain_len: int, digest: bytes) -> None:
        if parts < self.announced or not 1 <= parts < MAX_PART_INDEX or self.end is not None:
            raise SpillFailed(f"SECURITY: blob {self.blob_id}: its manifest contradicts its notices")
        self.end = (parts, plain_len, digest)
        self._changed.set()

    async def plaintext(self) -> AsyncIterator[bytes]:
        """The blob's plaintext part by part, each authenticated before it is yielded."""
        receiver, blob_id = self.receiver, self.blob_id
        tasks: dict[int, asyncio.Task[bytes]] = {}
        hasher = hashlib.sha256()
        total = fetched = index = early = 0
        last_seen = False

        async def download(part: int) -> bytes:
            _, url = await receiver.transport.slot(receiver.association_id, blob_id, part, download=True)
            return await receiver.transport.get(url)

        try:
            while True:
                available = self.end[0] if self.end is not None else self.announced
                while fetched < available and len(tasks) < receiver.parallel:
                    tasks[fetched] = asyncio.create_task(download(fetched))
                    fetched += 1
                if index not in tasks:
                    if self.end is not None and index >= self.end[0]:
                        break
                    await self._changed.wait()
                    self._changed.clear()
                    continue
                if last_seen:
                    raise SpillFailed(f"SECURITY: blob {blob_id} has parts after its last part")
                try:
                    stored = await tasks.pop(index)
                except BlobGone as exc:
                    raise SpillFailed(
                        f"blob {blob_id} part {index} is gone from the store (deleted before it was fetched): {exc}"
                    ) from None
                except SpillUnavailable as exc:
                    raise SpillFailed(f"blob {blob_id} part {index} could not be fetched: {exc}") from None
                plain, last_seen = receiver.open_part(blob_id, self.ordinal, index, stored)
                if last_seen and self.end is not None and index != self.end[0] - 1:
                    raise SpillFailed(f"SECURITY: blob {blob_id} part {index} is marked last too early")
                hasher.update(stored)
                total += len(plain)
                STATS.parts_received += 1
                STATS.stored_bytes_received += len(stored)
                STATS.bytes_received += len(plain)
                if self.end is None:
                    early += 1
                index += 1
                yield plain
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert self.end is not None
        parts, plain_len, digest = self.end
        if not last_seen:
            raise SpillFailed(f"SECURITY: blob {blob_id} ends without its last part (truncated)")
        if total != plain_len or hasher.digest() != digest:
            raise SpillFailed(f"SECURITY: blob {blob_id} does not match its manifest")
        STATS.blobs_received += 1
        log.info(
            "received %d bytes in %d parts from blob %s (%d parts delivered before its END notice)",
            total,
            parts,
            blob_id,
            early,
            extra={"assoc": receiver.association_id},
        )
        await receiver.transport.release(receiver.association_id, blob_id)


class SpillReceiver:
    """Checks the blob notices of one direction of an association and opens the parts they announce."""

    def __init__(self, transport: BlobTransport, association_id: str, sealer: FrameSealer, *, parallel: int) -> None:
        self.transport, self.association_id, self.sealer = transport, association_id, sealer
        self.parallel = max(1, parallel)
        self._decompressor = FrameDecompressor()
        self._ordinal = 0  # the next blob this direction may begin
        self.current: IncomingBlob | None = None

    def accept(self, data: pb.Data, notice: bytes) -> tuple[IncomingBlob, bool, bool]:
        """(the blob, whether this notice began it, whether it ended it) for an opened blob notice."""
        kind = notice[:1]
        if kind == bytes([KIND_PARTS]) and len(notice) == _PARTS.size:
            _, raw_id, ordinal, count = _PARTS.unpack(notice)
            end = None
        elif kind == bytes([KIND_END]) and len(notice) == _END.size:
            _, raw_id, ordinal, count, plain_len, digest = _END.unpack(notice)
            end = (count, plain_len, digest)
        else:
            raise SpillFailed("SECURITY: malformed blob notice")
        blob_id = raw_id.decode("ascii", "replace")
        if blob_id != data.blob.blob_id:
            raise SpillFailed("SECURITY: the blob reference does not match its sealed notice")
        began = False
        blob = self.current
        if blob is None:
            if ordinal != self._ordinal:
                raise SpillFailed(f"SECURITY: blob {blob_id} is number {ordinal}, {self._ordinal} was expected")
            blob = self.current = IncomingBlob(self, blob_id, ordinal)
            self._ordinal += 1
            began = True
        elif (blob.blob_id, blob.ordinal) != (blob_id, ordinal):
            raise SpillFailed(f"SECURITY: blob {blob_id} begins before blob {blob.blob_id} ended")
        if end is None:
            blob.announce(count)
        else:
            blob.finish(*end)
            self.current = None
        return blob, began, end is not None

    def open_part(self, blob_id: str, ordinal: int, index: int, stored: bytes) -> tuple[bytes, bool]:
        """(plaintext, is the last part) of a stored part, or SpillFailed."""
        if not stored:
            raise SpillFailed(f"SECURITY: blob {blob_id} part {index} is empty (truncated)")
        flags = stored[0]
        if flags & ~(FLAG_COMPRESSED | FLAG_LAST | FLAG_PART_SHUFFLED) != FLAG_SEALED | FLAG_PART or (
            flags & FLAG_PART_SHUFFLED and not flags & FLAG_COMPRESSED
        ):
            raise SpillFailed(f"SECURITY: blob {blob_id} part {index} has flags {flags:#x}")
        try:
            plain = self.sealer.open(stored[1:], part_seq(ordinal, index), flags)
        except TamperError:
            raise SpillFailed(
                f"SECURITY: blob {blob_id} part {index} failed authentication (corrupt, truncated or swapped)"
            ) from None
        if flags & FLAG_COMPRESSED:
            try:
                plain = self._decompressor.decompress(plain)
            except DecompressionError as exc:
                raise SpillFailed(f"blob {blob_id} part {index}: {exc}") from None
            if flags & FLAG_PART_SHUFFLED:
                plain = unshuffle2(plain)
        return plain, bool(flags & FLAG_LAST)

    async def deliver(self, blob: IncomingBlob, sink: Callable[[bytes], Awaitable[bool]]) -> None:
        """Feed the blob's plaintext to ``sink`` (which returns False to stop); SpillFailed on a bad blob."""
        try:
            async for plain in blob.plaintext():
                if not await sink(plain):
                    return
        except SpillFailed:
            STATS.receive_failures += 1
            raise
