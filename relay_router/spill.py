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
spill then pauses for ``BACKOFF_S`` for the whole router: ``SpillState``). If it
fails after a part was stored, the association is aborted cleanly.

Modules: this one sends (``SpillSender``); ``spill_receive`` receives;
``spill_store`` has the store interface, the errors, the part format and the
router's ``SpillState``. Their names are re-exported here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable

from protos.relay.v1 import relay_pb2 as pb
from relay_router.compress import FrameCompressor
from relay_router.seal import FrameSealer
from relay_router.spill_receive import IncomingBlob, SpillReceiver
from relay_router.spill_store import (
    BACKOFF_S,
    END_NOTICE,
    FLAG_LAST,
    FLAG_PART,
    FLAG_PART_SHUFFLED,
    KIND_END,
    KIND_PARTS,
    PARTS_NOTICE,
    STORE_FAILED,
    BlobGone,
    BlobTransport,
    BridgeBlobTransport,
    SpillFailed,
    SpillState,
    SpillStats,
    SpillUnavailable,
    part_seq,
)
from relay_router.ul.framer import PduFramer
from relay_router.wire.codec import blob_notice_frame
from relay_router.wire.features import SPILL as FEATURE
from relay_router.wire.flags import FrameFlag, PartFlag

log = logging.getLogger("relay_router.spill")
FLAG_BLOB = FrameFlag.BLOB  # registered in relay_router.wire.flags; the name stays for existing callers

# Sends one blob notice: called with a function that builds the frame at the sequence number it is given.
Announce = Callable[[Callable[[int], pb.Data]], Awaitable[None]]

__all__ = [
    "BACKOFF_S",
    "FEATURE",
    "FLAG_BLOB",
    "FLAG_LAST",
    "FLAG_PART",
    "FLAG_PART_SHUFFLED",
    "Announce",
    "BlobGone",
    "BlobTransport",
    "BlobUpload",
    "BridgeBlobTransport",
    "IncomingBlob",
    "SpillFailed",
    "SpillReceiver",
    "SpillSender",
    "SpillState",
    "SpillStats",
    "SpillUnavailable",
    "part_seq",
]


class BlobUpload:
    """One blob on its way into the store: plaintext in, sealed parts stored ``parallel`` at a time.

    Shared by `SpillSender` (a transparent association's data set) and the accelerated transfer's
    near side (relay_router.accel.transfer: one spooled instance). Each part is compressed when it
    pays, sealed under ``part_seq(ordinal, index)`` (so a part altered, swapped or replayed fails to
    open) and uploaded through a URL the bridge signs for exactly its size; part 0's slot creates the
    blob. ``on_stored`` is awaited each time more parts are stored in order (``announced``);
    `digest` is the SHA-256 of the stored parts in order, the manifest's check.
    """

    def __init__(
        self,
        transport: BlobTransport,
        association_id: str,
        sealer: FrameSealer,
        *,
        ordinal: int,
        parallel: int,
        stats: SpillStats,
        compressor: FrameCompressor | None = None,
        on_stored: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.transport, self.association_id, self.sealer = transport, association_id, sealer
        self.ordinal, self.parallel, self.stats = ordinal, max(1, parallel), stats
        self._compressor = compressor
        self._on_stored = on_stored
        self.blob_id = ""
        self._blob_ready: asyncio.Future[str] | None = None  # the blob id, once part 0's slot names it
        self.parts = 0
        self.plain_len = 0
        self.stored_len = 0
        self._digest = hashlib.sha256()
        self.held: dict[int, bytes] = {}  # plaintext of parts not yet stored (inline fallback)
        self._stored: dict[int, bytes] = {}  # stored bytes of uploaded parts waiting for the digest, in order
        self._next_digest = 0  # parts 0 .. _next_digest-1 are stored
        self.announced = 0  # ... and reported through on_stored
        self._tasks: dict[int, asyncio.Task[bytes]] = {}
        self.any_stored = False

    def digest(self) -> bytes:
        return self._digest.digest()

    def held_plaintext(self) -> bytes:
        """The plaintext of the parts not stored (yet), in order: what goes inline if the store fails."""
        return b"".join(self.held[i] for i in sorted(self.held))

    async def add(self, plain: bytes, *, last: bool) -> None:
        """Seal and upload the next part (waits while ``parallel`` are in flight); SpillUnavailable."""
        index = self.parts
        self.parts += 1
        self.plain_len += len(plain)
        flags = PartFlag.SEALED | PartFlag.PART | (PartFlag.LAST if last else PartFlag(0))
        data = plain
        if self._compressor is not None:
            data, packed = self._compressor.pack(plain)  # frame flags: the part header has its own bits
            if packed & FrameFlag.COMPRESSED:
                flags |= PartFlag.COMPRESSED
            if packed & FrameFlag.SHUFFLED:
                flags |= PartFlag.SHUFFLED
        stored = bytes([flags]) + self.sealer.seal(data, part_seq(self.ordinal, index), flags)
        self.stored_len += len(stored)
        self.held[index] = plain
        # Bounded memory: at most `parallel` parts in flight.
        while len(self._tasks) >= self.parallel:
            await self._collect(min(self._tasks))
        self._tasks[index] = asyncio.create_task(self._upload(index, stored))

    async def _upload(self, index: int, stored: bytes) -> bytes:
        """Ask for part `index`'s slot with its exact size, then store it. Part 0 creates the blob;
        later parts wait only for its id (their slots and uploads still run in parallel)."""
        if self._blob_ready is None:
            self._blob_ready = asyncio.get_running_loop().create_future()
        ready = self._blob_ready
        if index == 0:
            try:
                blob_id, url = await self.transport.slot(self.association_id, "", 0, download=False, size=len(stored))
            except (SpillUnavailable, SpillFailed) as exc:
                if not ready.done():  # the parts waiting for the blob fail the same way
                    ready.set_exception(type(exc)(exc.detail, security=exc.security, remote_detail=exc.remote_detail))
                    ready.exception()  # retrieved here, so an unawaited future does not warn
                raise
            except BaseException:
                ready.cancel()
                raise
            self.blob_id = blob_id
            ready.set_result(blob_id)
        else:
            blob_id = await asyncio.shield(ready)
            url = (await self.transport.slot(self.association_id, blob_id, index, download=False, size=len(stored)))[1]
        await self.transport.put(url, stored)
        return stored

    async def harvest(self) -> None:
        """Collect (and report) the uploads that finished since the last call, in order, without waiting."""
        while self._tasks and self._tasks[min(self._tasks)].done():
            await self._collect(min(self._tasks))

    async def _collect(self, index: int) -> None:
        task = self._tasks.pop(index)
        stored = await task  # raises SpillUnavailable
        self.any_stored = True
        self.stats.parts_sent += 1
        self.stats.stored_bytes_sent += len(stored)
        self.held.pop(index, None)
        self._stored[index] = stored
        while self._next_digest in self._stored:
            self._digest.update(self._stored.pop(self._next_digest))
            self._next_digest += 1
        if self._next_digest > self.announced:
            self.announced = self._next_digest
            if self._on_stored is not None:
                await self._on_stored()

    async def wait_all(self) -> None:
        while self._tasks:
            await self._collect(min(self._tasks))

    async def cancel(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    def abandon(self) -> None:
        """Cancel the uploads still running without waiting (the caller itself is being cancelled)."""
        for task in self._tasks.values():
            task.cancel()


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
        state: SpillState | None = None,
    ) -> None:
        self.state = state or SpillState()  # the router's counters and pause (one per RouterService)
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
        self._buffer = bytearray()
        self._start_count = 0
        self._blob: BlobUpload | None = None

    @property
    def _blob_id(self) -> str:
        return self._blob.blob_id if self._blob is not None else ""

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
                or self.state.paused
                or self.framer.datasets_completed != self._head_count
                or not self.framer.dataset_bytes
            ):
                return self._flush_head()
            if self.framer.dataset_bytes <= self.threshold:
                return b""
            # No slot yet: each part's upload asks for its own once its stored bytes exist, with their
            # size (the bridge binds the URL to it); part 0's request creates the blob.
            payload = self._flush_head()
            self.active = True
            self._start_count = self.framer.datasets_completed
            level = self._level()
            self._blob = BlobUpload(
                self.transport,
                self.association_id,
                self.sealer,
                ordinal=self._ordinal,
                parallel=self.parallel,
                stats=self.state.stats,
                compressor=FrameCompressor(level, shuffle=self._shuffle()) if level else None,
                on_stored=lambda: self._announce(self._parts_frame),
            )
        blob = self._blob
        assert blob is not None
        self._buffer += payload
        try:
            await blob.harvest()
            while len(self._buffer) >= self.part_bytes:
                chunk = bytes(self._buffer[: self.part_bytes])
                del self._buffer[: self.part_bytes]
                await blob.add(chunk, last=False)
            if self.framer.datasets_completed == self._start_count and established:
                return b""
            tail = bytes(self._buffer)
            self._buffer.clear()
            await blob.add(tail, last=True)
            await blob.wait_all()
        except SpillUnavailable as exc:
            if blob.any_stored:
                self.state.stats.send_failures += 1
                await self.discard()
                raise SpillFailed(
                    f"the blob store failed in the middle of a blob: {exc}", remote_detail=STORE_FAILED
                ) from None
            inline = blob.held_plaintext() + bytes(self._buffer)
            await blob.cancel()
            self._reset()
            return self._fall_back(str(exc), inline)
        await self._announce(self._end_frame)
        self.state.stats.blobs_sent += 1
        self.state.stats.bytes_spilled += blob.plain_len
        log.info(
            "spilled %d bytes in %d parts to blob %s",
            blob.plain_len,
            blob.parts,
            blob.blob_id,
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
        self.state.stats.fallbacks += 1
        self.disabled = True
        self.state.pause()
        log.warning(
            "blob store unavailable, sending %d bytes inline (spill paused for %g s): %s",
            len(inline),
            BACKOFF_S,
            why,
            extra={"assoc": self.association_id},
        )
        return inline

    async def discard(self) -> None:
        """Drop a blob in progress (the association is ending); the bridge deletes what was stored."""
        if self._blob is not None:
            await self._blob.cancel()
        self._reset()

    def _frame(self, seq: int, notice: bytes, digest: bytes = b"") -> pb.Data:
        assert self._blob is not None
        ref = pb.BlobRef(blob_id=self._blob.blob_id, size=self._blob.stored_len, digest=digest)
        return blob_notice_frame(self.sealer, seq, notice, ref)

    def _parts_frame(self, seq: int) -> pb.Data:
        assert self._blob is not None
        blob = self._blob
        return self._frame(seq, PARTS_NOTICE.pack(KIND_PARTS, blob.blob_id.encode(), self._ordinal, blob.announced))

    def _end_frame(self, seq: int) -> pb.Data:
        assert self._blob is not None
        blob = self._blob
        digest = blob.digest()
        notice = END_NOTICE.pack(KIND_END, blob.blob_id.encode(), self._ordinal, blob.parts, blob.plain_len, digest)
        return self._frame(seq, notice, digest)
