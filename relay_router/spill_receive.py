"""Cloud spill, receiving side: blob notices checked, parts fetched, authenticated and delivered in order.

See relay_router.spill for the design; a blob that fails to open aborts the association, and no
unauthenticated byte ever reaches the local device.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from protos.relay.v1 import relay_pb2 as pb
from relay_router.compress import DecompressionError, FrameDecompressor, unshuffle2
from relay_router.seal import FrameSealer, TamperError
from relay_router.spill_store import (
    END_NOTICE,
    FETCH_FAILED,
    KIND_END,
    KIND_PARTS,
    MAX_PART_INDEX,
    PART_GONE,
    PARTS_NOTICE,
    BlobGone,
    BlobTransport,
    SpillFailed,
    SpillStats,
    SpillUnavailable,
    blob_alert,
    part_seq,
)
from relay_router.wire.flags import PartFlag

log = logging.getLogger("relay_router.spill")
# A download URL asked for ahead is used only this soon after (the bridge's URLs live 15 min by default).
URL_FRESH_S = 60.0


class IncomingBlob:
    """A blob being received: parts fetched in order as they are announced, ``parallel`` in flight."""

    def __init__(self, receiver: SpillReceiver, blob_id: str, ordinal: int) -> None:
        self.receiver, self.blob_id, self.ordinal = receiver, blob_id, ordinal
        self.announced = 0
        self.end: tuple[int, int, bytes] | None = None  # (parts, plaintext length, digest) once END arrived
        self._changed = asyncio.Event()

    def announce(self, count: int) -> None:
        if count < self.announced or count >= MAX_PART_INDEX or self.end is not None:
            raise blob_alert(f"blob {self.blob_id}: parts notice out of order")
        self.announced = count
        self._changed.set()

    def finish(self, parts: int, plain_len: int, digest: bytes) -> None:
        if parts < self.announced or not 1 <= parts < MAX_PART_INDEX or self.end is not None:
            raise blob_alert(f"blob {self.blob_id}: its manifest contradicts its notices")
        self.end = (parts, plain_len, digest)
        self._changed.set()

    async def plaintext(self) -> AsyncIterator[bytes]:
        """The blob's plaintext part by part, each authenticated before it is yielded."""
        receiver, blob_id = self.receiver, self.blob_id
        tasks: dict[int, asyncio.Task[bytes]] = {}
        hasher = hashlib.sha256()
        total = fetched = index = early = 0
        last_seen = False

        slots = receiver.slots
        held = 0  # download slots this blob holds: one per part fetched and not yet delivered
        # Download URLs asked for ahead (the bridge signs a part's URL whether or not it is stored yet):
        # a part announced later is fetched at once, without a round trip to the bridge for its URL first.
        urls: dict[int, tuple[float, asyncio.Task[tuple[str, str]]]] = {}

        def ask(part: int) -> asyncio.Task[tuple[str, str]]:
            task = asyncio.ensure_future(receiver.transport.slot(receiver.association_id, blob_id, part, download=True))
            urls[part] = (time.monotonic(), task)
            return task

        def ask_ahead(available: int) -> None:
            until = available + receiver.parallel
            if self.end is not None:
                until = min(until, self.end[0])
            for part in range(fetched, until):
                if part not in urls:
                    ask(part)

        async def download(part: int) -> bytes:
            asked = urls.pop(part, None)
            if asked is None or time.monotonic() - asked[0] > URL_FRESH_S:
                if asked is not None:
                    asked[1].cancel()
                asked = (0.0, ask(part))
                urls.pop(part, None)
            _, url = await asked[1]
            return await receiver.transport.get(url)

        try:
            while True:
                available = self.end[0] if self.end is not None else self.announced
                ask_ahead(available)
                while fetched < available and len(tasks) < receiver.parallel:
                    # Slots are taken in part order, so the part to deliver next always has one: a blob
                    # waits for a slot only when it holds none (no deadlock between associations).
                    if tasks and slots.locked():
                        break
                    await slots.acquire()
                    held += 1
                    tasks[fetched] = asyncio.create_task(download(fetched))
                    fetched += 1
                if index not in tasks:
                    if self.end is not None and index >= self.end[0]:
                        break
                    await self._changed.wait()
                    self._changed.clear()
                    continue
                if last_seen:
                    raise blob_alert(f"blob {blob_id} has parts after its last part")
                try:
                    stored = await tasks.pop(index)
                except BlobGone as exc:
                    raise SpillFailed(
                        f"blob {blob_id} part {index} is gone from the store (deleted before it was fetched): {exc}",
                        remote_detail=PART_GONE,
                    ) from None
                except SpillUnavailable as exc:
                    # The text may hold an errno or a store's answer: it stays local (remote_detail
                    # goes in Close.detail, across the bridge that chose the URL).
                    raise SpillFailed(
                        f"blob {blob_id} part {index} could not be fetched: {exc}", remote_detail=FETCH_FAILED
                    ) from None
                plain, last_seen = receiver.open_part(blob_id, self.ordinal, index, stored)
                if last_seen and self.end is not None and index != self.end[0] - 1:
                    raise blob_alert(f"blob {blob_id} part {index} is marked last too early")
                hasher.update(stored)
                total += len(plain)
                receiver.stats.parts_received += 1
                receiver.stats.stored_bytes_received += len(stored)
                receiver.stats.bytes_received += len(plain)
                if self.end is None:
                    early += 1
                index += 1
                yield plain
                held -= 1  # delivered: its bytes are no longer held
                slots.release()
        finally:
            asked = [task for _, task in urls.values()]
            for task in [*tasks.values(), *asked]:
                task.cancel()
            await asyncio.gather(*tasks.values(), *asked, return_exceptions=True)
            for _ in range(held):
                slots.release()
        assert self.end is not None
        parts, plain_len, digest = self.end
        if not last_seen:
            raise blob_alert(f"blob {blob_id} ends without its last part (truncated)")
        if total != plain_len or hasher.digest() != digest:
            raise blob_alert(f"blob {blob_id} does not match its manifest")
        receiver.stats.blobs_received += 1
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

    def __init__(
        self,
        transport: BlobTransport,
        association_id: str,
        sealer: FrameSealer,
        *,
        parallel: int,
        stats: SpillStats | None = None,
    ) -> None:
        self.transport, self.association_id, self.sealer = transport, association_id, sealer
        self.stats = stats or SpillStats()
        self.parallel = max(1, parallel)
        self._decompressor = FrameDecompressor()
        # Parts held in memory: the router-wide bound of a BridgeBlobTransport, else this association's.
        self.slots: asyncio.Semaphore = getattr(transport, "download_slots", None) or asyncio.Semaphore(self.parallel)
        self._ordinal = 0  # the next blob this direction may begin
        self.current: IncomingBlob | None = None

    def accept(self, data: pb.Data, notice: bytes) -> tuple[IncomingBlob, bool, bool]:
        """(the blob, whether this notice began it, whether it ended it) for an opened blob notice."""
        kind = notice[:1]
        if kind == bytes([KIND_PARTS]) and len(notice) == PARTS_NOTICE.size:
            _, raw_id, ordinal, count = PARTS_NOTICE.unpack(notice)
            end = None
        elif kind == bytes([KIND_END]) and len(notice) == END_NOTICE.size:
            _, raw_id, ordinal, count, plain_len, digest = END_NOTICE.unpack(notice)
            end = (count, plain_len, digest)
        else:
            raise blob_alert("malformed blob notice")
        blob_id = raw_id.decode("ascii", "replace")
        if blob_id != data.blob.blob_id:
            raise blob_alert("the blob reference does not match its sealed notice")
        began = False
        blob = self.current
        if blob is None:
            if ordinal != self._ordinal:
                raise blob_alert(f"blob {blob_id} is number {ordinal}, {self._ordinal} was expected")
            blob = self.current = IncomingBlob(self, blob_id, ordinal)
            self._ordinal += 1
            began = True
        elif (blob.blob_id, blob.ordinal) != (blob_id, ordinal):
            raise blob_alert(f"blob {blob_id} begins before blob {blob.blob_id} ended")
        if end is None:
            blob.announce(count)
        else:
            blob.finish(*end)
            self.current = None
        return blob, began, end is not None

    def open_part(self, blob_id: str, ordinal: int, index: int, stored: bytes) -> tuple[bytes, bool]:
        """(plaintext, is the last part) of a stored part, or SpillFailed."""
        if not stored:
            raise blob_alert(f"blob {blob_id} part {index} is empty (truncated)")
        flags = stored[0]
        optional = int(PartFlag.COMPRESSED | PartFlag.LAST | PartFlag.SHUFFLED)  # int: IntFlag's ~ drops unknown bits
        if flags & ~optional != PartFlag.SEALED | PartFlag.PART or (
            flags & PartFlag.SHUFFLED and not flags & PartFlag.COMPRESSED
        ):
            raise blob_alert(f"blob {blob_id} part {index} has flags {flags:#x}")
        try:
            plain = self.sealer.open(stored[1:], part_seq(ordinal, index), flags)
        except TamperError:
            raise blob_alert(
                f"blob {blob_id} part {index} failed authentication (corrupt, truncated or swapped)"
            ) from None
        if flags & PartFlag.COMPRESSED:
            try:
                plain = self._decompressor.decompress(plain)
            except DecompressionError as exc:
                raise SpillFailed(f"blob {blob_id} part {index}: {exc}") from None
            if flags & PartFlag.SHUFFLED:
                plain = unshuffle2(plain)
        return plain, bool(flags & PartFlag.LAST)

    async def deliver_until(
        self, blob: IncomingBlob, sink: Callable[[bytes], Awaitable[bool]], closed: asyncio.Event
    ) -> SpillFailed | None:
        """`deliver`, stopped once `closed` is set (the association ended); the blob's failure, if any."""
        # Both helpers live only inside this call: cancelled and awaited before it returns.
        delivery = asyncio.ensure_future(self.deliver(blob, sink))
        ended = asyncio.ensure_future(closed.wait())
        try:
            await asyncio.wait({delivery, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (delivery, ended):
                task.cancel()
            results = await asyncio.gather(delivery, ended, return_exceptions=True)
        return results[0] if isinstance(results[0], SpillFailed) else None

    async def deliver(self, blob: IncomingBlob, sink: Callable[[bytes], Awaitable[bool]]) -> None:
        """Feed the blob's plaintext to ``sink`` (which returns False to stop); SpillFailed on a bad blob."""
        try:
            async for plain in blob.plaintext():
                if not await sink(plain):
                    return
        except SpillFailed:
            self.stats.receive_failures += 1
            raise
