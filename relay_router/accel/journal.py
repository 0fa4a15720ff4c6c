"""The spool's write-ahead journal: one disk sync per acknowledged instance, shared by concurrent commits.

Making a new file durable costs a sync of the file and one of its directory (the rename must survive),
each a journal commit of the file system: 3-13 ms per C-STORE on the shared VM disk, more under load.
Instead, a small instance is appended, as one record, to a segment file that was zero-filled and synced
when it was created, and that one file is synced (``fdatasync``): no block is allocated and no size or
directory changes, so the sync writes the data and flushes the disk cache, nothing else. Commits that
arrive while a sync runs wait for the next one, which covers them all (group commit).

    <spool>/journal/<seq>.seg   segments (16 hex digits, in order), SEGMENT_BYTES each, mode 0600

A record is a header (magic, kind, lengths, CRC-32 of lengths and body) followed by its body. A segment
is read up to the first record that is not whole (zeros: never written; a bad magic or CRC: a write torn
by a crash, never acknowledged, because the sync that acknowledges a record covers everything before it).

Kinds: INSTANCE (the entry's first state as JSON, then the entry's whole file: Part 10 header and data
set) and REMOVED (an entry id, appended without a sync when an entry leaves the spool, so that a restart
does not bring a delivered entry back; losing it in a crash costs one repeated delivery, which is
harmless). The spool (relay_router.accel.spool) keeps each entry's own files as before, written
without syncs; it retires a segment by syncing the files of the entries that are still in it
("checkpoint") and then deleting the segment, and at start it rebuilds from the segments whatever a
crash left missing or torn, syncs it, and deletes them.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from relay_router.accel.spool_format import (
    DATA_NAME,
    ENTRY_ID,
    STATE_NAME,
    SpoolEntry,
    SpoolError,
    fsync_dir,
)

__all__ = [
    "INSTANCE",
    "JOURNAL_DIR",
    "REMOVED",
    "SEGMENT_BYTES",
    "Journal",
    "JournalBroken",
    "Record",
    "read_segment",
    "recover_journal",
]

log = logging.getLogger("relay_router.accel.spool")
JOURNAL_DIR = "journal"

MAGIC = b"RJ1\n"
HEADER = struct.Struct("<4sBxxxIQI")  # magic, kind, state length, data length, CRC-32
INSTANCE = 1
REMOVED = 2
SEGMENT_BYTES = 8 * 1024 * 1024
ZEROS = bytes(1024 * 1024)


class JournalBroken(SpoolError):
    """A journal sync failed: what it covered may not be on disk, so the journal takes no more records."""


@dataclass(frozen=True)
class Record:
    segment: int
    kind: int
    state: bytes  # INSTANCE: the entry's first state (JSON); REMOVED: the entry id
    data: memoryview  # INSTANCE: the entry's file, as it must be on disk


def _crc(kind: int, state: bytes | memoryview, data: bytes | bytearray | memoryview) -> int:
    crc = zlib.crc32(struct.pack("<BIQ", kind, len(state), len(data)))
    return zlib.crc32(data, zlib.crc32(state, crc))


def read_segment(path: Path, segment: int) -> Iterator[Record]:
    """The whole records of one segment, in order; stops at the first one that is not."""
    buffer = memoryview(path.read_bytes())
    offset = 0
    while offset + HEADER.size <= len(buffer):
        magic, kind, state_length, data_length, crc = HEADER.unpack_from(buffer, offset)
        body = offset + HEADER.size
        end = body + state_length + data_length
        if magic != MAGIC or kind not in (INSTANCE, REMOVED) or end > len(buffer):
            return
        state, data = buffer[body : body + state_length], buffer[body + state_length : end]
        if _crc(kind, state, data) != crc:
            return
        yield Record(segment, kind, bytes(state), data)
        offset = end


def segment_paths(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.glob("*.seg"):
        try:
            found.append((int(path.stem, 16), path))
        except ValueError:
            continue
    return sorted(found)


class Journal:
    """Appends records to the current segment and syncs them, many commits per sync (thread-safe)."""

    def __init__(self, directory: Path, *, first_segment: int, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.max_record = segment_bytes // 4  # larger entries are synced as their own files (2 MiB by default)
        self._cond = threading.Condition()
        self._segment = first_segment - 1
        self._fd = -1
        self._offset = 0
        self._written = 0  # records appended (a ticket per record)
        self._synced = 0  # records known durable
        self._syncing = False
        self._preparing = False
        self._broken: BaseException | None = None
        self._spare: tuple[int, int] | None = None  # (segment, fd) made ahead by prepare_next()
        self._closed = False
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        # The first segment is made by prepare_next() (the spool runs it in the background) or the first append.

    @property
    def segment(self) -> int:
        """The segment records are appended to now."""
        return self._segment

    def close(self) -> None:
        with self._cond:
            self._closed = True
            while self._syncing or self._preparing:
                self._cond.wait()
            for fd in (self._fd, self._spare[1] if self._spare else -1):
                if fd >= 0:
                    os.close(fd)
            self._fd, self._spare = -1, None

    # -- segments --------------------------------------------------------------------------------

    def _create(self, segment: int) -> int:
        """A zero-filled, synced segment whose name is durable: later syncs only carry record data."""
        path = self.directory / f"{segment:016x}.seg"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for offset in range(0, self.segment_bytes, len(ZEROS)):
                os.pwrite(fd, ZEROS[: min(len(ZEROS), self.segment_bytes - offset)], offset)
            os.fsync(fd)
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return fd

    def prepare_next(self) -> None:
        """Create the next segment ahead (called off the commit path, after a rotation)."""
        with self._cond:
            if self._spare is not None or self._preparing or self._closed:
                return
            segment, self._preparing = self._segment + 1, True
        fd = -1
        try:
            fd = self._create(segment)
        finally:
            with self._cond:
                self._preparing = False
                if fd >= 0 and self._segment + 1 == segment and not self._closed:
                    self._spare, fd = (segment, fd), -1
                self._cond.notify_all()
            if fd >= 0:
                os.close(fd)  # closed meanwhile: the segment stays empty and is deleted at the next start

    def _open_next(self) -> None:
        segment = self._segment + 1
        if self._spare is not None and self._spare[0] == segment:
            fd = self._spare[1]
            self._spare = None
        else:
            fd = self._create(segment)
        if self._fd >= 0:
            os.close(self._fd)
        self._segment, self._fd, self._offset = segment, fd, 0

    # -- records ---------------------------------------------------------------------------------

    def append(self, kind: int, state: bytes, data: bytes | bytearray | memoryview, *, sync: bool) -> tuple[int, int]:
        """Write one record; with `sync`, return once it is durable. Returns (segment, previous segment or -1):
        the second is the segment this append closed, which the caller may now checkpoint."""
        size = HEADER.size + len(state) + len(data)
        if size > self.segment_bytes:
            raise SpoolError(f"a journal record of {size} bytes does not fit a segment")
        closed = -1
        with self._cond:
            self._check()
            while self._fd < 0 or self._offset + size > self.segment_bytes:  # (first) segment; the lock is let go
                if self._syncing or self._preparing:
                    self._cond.wait()
                elif self._fd >= 0 and self._synced < self._written:
                    self._sync_locked()  # the segment's last records are durable before it is left
                else:
                    closed = self._segment if self._fd >= 0 else -1
                    self._open_next()
                self._check()
            header = HEADER.pack(MAGIC, kind, len(state), len(data), _crc(kind, state, data))
            written = os.pwritev(self._fd, [header, state, data], self._offset)
            if written != size:
                self._broken = JournalBroken(f"short journal write ({written} of {size} bytes)")
                raise self._broken
            self._offset += size
            self._written += 1
            ticket, segment = self._written, self._segment
            if sync:
                self._wait_durable(ticket)
        return segment, closed

    def _check(self) -> None:
        if self._broken is not None:
            raise JournalBroken(f"the spool journal failed earlier: {self._broken}")
        if self._closed:
            raise SpoolError("the spool journal is closed")

    def _wait_durable(self, ticket: int) -> None:
        """Group commit: one thread syncs for everything written so far; the others wait for it."""
        while self._synced < ticket:
            self._check()
            if self._syncing:
                self._cond.wait()
            else:
                self._sync_locked()

    def _sync_locked(self) -> None:
        target, fd = self._written, self._fd
        self._syncing = True
        self._cond.release()
        try:
            os.fdatasync(fd)
        except OSError as exc:
            # After a failed sync, a later one may succeed without the lost pages: never trust this file again.
            self._broken = exc
            raise JournalBroken(f"the spool journal could not be synced: {exc}") from exc
        finally:
            self._cond.acquire()
            self._syncing = False
            self._cond.notify_all()
        self._synced = max(self._synced, target)

    def retire(self, segment: int) -> None:
        """Delete a checkpointed segment (its entries' own files are durable now)."""
        (self.directory / f"{segment:016x}.seg").unlink(missing_ok=True)
        fsync_dir(self.directory)


def recover_journal(root: Path, sync_entry: Callable[[Path], None]) -> int:
    """At spool open: make every entry the segments hold whole and durable in entries/, then delete them.

    An acknowledged entry whose own files a crash lost or tore (they are written without syncs) is
    rewritten from its record; one the journal says was removed is removed. Returns the number for
    the next segment. Called with the spool's lock held, before its entries are read.
    """
    directory = root / JOURNAL_DIR
    segments = segment_paths(directory) if directory.is_dir() else []
    if not segments:
        return 0
    instances: dict[str, tuple[SpoolEntry, Record]] = {}
    removed: set[str] = set()
    for number, path in segments:
        for record in read_segment(path, number):
            if record.kind == REMOVED:
                removed.add(record.state.decode("ascii", "replace"))
                continue
            try:
                entry = SpoolEntry.from_json(record.state.decode("utf-8"))
            except (ValueError, KeyError) as exc:  # cannot happen with a good CRC unless the format changed
                log.error("spool journal segment %d: an entry record cannot be read (%s)", number, exc)
                continue
            if ENTRY_ID.match(entry.id):
                instances[entry.id] = (entry, record)
    entries, rebuilt = root / "entries", 0
    for entry_id, (entry, record) in instances.items():
        target = entries / entry_id
        if entry_id in removed:
            shutil.rmtree(target, ignore_errors=True)  # removed before the crash; the removal was not synced
            continue
        if not _holds(target / DATA_NAME, record.data):
            _rebuild(root, target, entry, record.data)
            rebuilt += 1
        sync_entry(target)
    fsync_dir(entries)
    for _, path in segments:
        path.unlink(missing_ok=True)
    fsync_dir(directory)
    log.info(
        "spool %s: journal of %d segments replayed: %d entries, %d rebuilt from their records",
        root,
        len(segments),
        len(instances) - len(removed & instances.keys()),
        rebuilt,
    )
    return segments[-1][0] + 1


def _holds(path: Path, data: memoryview) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _rebuild(root: Path, target: Path, entry: SpoolEntry, data: memoryview) -> None:
    """Write the entry's files from its record: in place if its directory exists, else through tmp/."""
    if target.is_dir():
        temporary = target / (DATA_NAME + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temporary, target / DATA_NAME)
        return
    building = root / "tmp" / entry.id
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(mode=0o700)
    for name, content in ((DATA_NAME, bytes(data)), (STATE_NAME, entry.to_json().encode("utf-8"))):
        fd = os.open(building / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(content)
    os.rename(building, target)
