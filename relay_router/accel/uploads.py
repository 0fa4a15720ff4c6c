"""Blob uploads of one accelerated transfer stream, run beside its send loop (relay_router.accel.transfer).

An instance above `[dicom] spill_threshold_bytes` goes through the blob store: uploading 20 MB at the near
router's uplink takes seconds. Awaited in the send loop, that upload held back every small instance queued
behind it. Here each upload is a task of its own; the send loop starts it and goes on with the next
instance, and collects the finished ones between instances (an instance's records go out back to back, so
only the send loop writes records: a BLOB record never lands between another instance's CHUNKs).

Ordering: instances are independent (the far router stores and answers each by its spool id), so a small
instance may overtake a big one; each instance's own records stay in order. Uploads, though, are handed back
in the order they started, whatever order they end in: each took the stream's next blob ordinal when it
started (its part nonces), and the far router refuses a BLOB record whose ordinal is below one it has seen, as
a replay (relay_router.accel.receive). A faster upload waits for the ones started before it. Bounds: at most
`limit` uploads run at once (each holds `spill_parallel` parts in memory), and at most `waiting` claimed
instances wait for a slot; while that queue is full the send loop claims nothing more. Every task belongs to
this object and is cancelled by `close()` when the stream ends: its instance is then sent again on the next
stream (its spool entry goes back to RECEIVED with the rest of what was in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relay_router.accel import records
from relay_router.accel.spool import SpoolEntry

log = logging.getLogger("relay_router.accel")
UploadFn = Callable[[records.InstanceHeader], Awaitable[records.BlobHeader | None]]


@dataclass(frozen=True)
class Finished:
    """An upload's end: `reference` to announce in a BLOB record, or None: the instance goes inline."""

    entry: SpoolEntry
    header: records.InstanceHeader
    reference: records.BlobHeader | None


class ConcurrentUploads:
    """Runs `upload(header)` for queued instances, at most `limit` at once, and hands back what finished."""

    def __init__(
        self,
        upload: UploadFn,
        *,
        limit: int,
        waiting: int,
        on_done: Callable[[], None],
        room: Callable[[], bool] = lambda: True,
    ) -> None:
        if limit < 1 or waiting < 1:
            raise ValueError("limit and waiting must be at least 1")
        self._upload = upload
        self.limit = limit
        self.max_waiting = waiting
        self._on_done = on_done  # wakes the send loop
        self._room = room  # whether the store may take another blob (the stream's quota of blobs in flight)
        self._queue: deque[tuple[SpoolEntry, records.InstanceHeader]] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._released: set[asyncio.Task[None]] = set()  # running, but their slot handed on (`release`)
        # Ended uploads by start number, handed back from _next_out on without a gap (see "Ordering").
        self._finished: dict[int, Finished] = {}
        self._started = 0
        self._next_out = 0

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def full(self) -> bool:
        """No room for another instance: the send loop stops claiming until an upload ends."""
        return len(self._queue) >= self.max_waiting

    @property
    def queued(self) -> int:
        """Instances waiting for an upload slot (no blob begun for them yet)."""
        return len(self._queue)

    @property
    def pending(self) -> int:
        """Instances queued, uploading, or finished but not yet collected."""
        return len(self._queue) + len(self._running) + len(self._finished)

    def submit(self, entry: SpoolEntry, header: records.InstanceHeader) -> None:
        self._queue.append((entry, header))
        self._start()

    def finished(self) -> list[Finished]:
        """Uploads that ended since the last call, in the order they started; one that ended before an
        upload started earlier is held back until that one has ended too."""
        done = []
        while (item := self._finished.pop(self._next_out, None)) is not None:
            done.append(item)
            self._next_out += 1
        return done

    def release(self, task: asyncio.Task[object] | None) -> None:
        """The upload `task` no longer needs its slot (its last parts are in flight): the next may start now,
        so the link does not idle between two blobs. At most `limit` more run beside released ones."""
        if task in self._running and task not in self._released:
            self._released.add(task)  # type: ignore[arg-type]
            self._start()

    def kick(self) -> None:
        """Start what waits, if there is room now (the far router released a blob)."""
        self._start()

    def _start(self) -> None:
        while (
            self._queue
            and len(self._running) - len(self._released) < self.limit
            and len(self._running) < 2 * self.limit
            and self._room()
        ):
            entry, header = self._queue.popleft()
            task = asyncio.get_running_loop().create_task(self._run(self._started, entry, header))
            self._started += 1
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            task.add_done_callback(self._released.discard)

    async def _run(self, number: int, entry: SpoolEntry, header: records.InstanceHeader) -> None:
        try:
            reference = await self._upload(header)
        except asyncio.CancelledError:
            raise
        except Exception:  # the upload function reports its own failures; a bug here: the instance goes inline
            log.exception("upload of %s failed", header.sop_instance)
            reference = None
        self._finished[number] = Finished(entry, header, reference)
        task = asyncio.current_task()
        if task is not None:
            self._running.discard(task)  # before starting the next: this one is done
            self._released.discard(task)
        self._start()
        self._on_done()

    async def close(self) -> None:
        """The stream ended: cancel every upload and forget the queue (the caller requeues the entries)."""
        self._queue.clear()
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._running.clear()
        self._released.clear()
        self._finished.clear()
        self._next_out = self._started  # the cancelled ones never end: nothing waits for them
