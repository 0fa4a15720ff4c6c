"""Writes one instance into the spool (relay_router.accel.spool): nothing is visible before commit()."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from io import BytesIO
from types import TracebackType
from typing import IO, TYPE_CHECKING, BinaryIO

from relay_router.accel.journal import INSTANCE, JournalBroken
from relay_router.accel.spool_format import (
    DATA_NAME,
    SpoolEntry,
    SpoolError,
    SpoolFull,
    fsync_dir,
    part10_header,
)
from relay_router.dimse.scu import split_part10

if TYPE_CHECKING:
    from relay_router.accel.spool import Spool

__all__ = ["SpoolWriter"]


class SpoolWriter:
    """Writes one instance into the spool; nothing is visible until :meth:`commit`.

    With ``part10=False`` (the near side, fed by the DIMSE receiver) the writer
    writes the file meta itself and :meth:`write` takes the data set bytes; with
    ``part10=True`` (the far side, fed by the other router) :meth:`write` takes a
    whole Part 10 file, whose file meta must name the declared UIDs.
    """

    def __init__(self, spool: Spool, entry: SpoolEntry, *, part10: bool) -> None:
        self._spool = spool
        self._entry = entry
        self._part10 = part10
        self._dir = spool.root / "tmp" / entry.id
        self._file: IO[bytes] | None = None
        # With the journal, a small instance is held here and written at commit (no file system work on
        # the event loop that feeds the writer); past the journal's record limit it goes to its own file.
        self._buffer: bytearray | None = bytearray() if spool._journal is not None else None
        self._size = 0
        self._done = False
        if self._buffer is None:
            self._open_file()
        if not part10:
            first_state = entry.to_json().encode("utf-8")
            self.write(part10_header(entry.sop_class_uid, entry.sop_instance_uid, entry.transfer_syntax, first_state))

    def _open_file(self) -> None:
        self._dir.mkdir(mode=0o700)
        fd = os.open(self._dir / DATA_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb")

    @property
    def entry_id(self) -> str:
        return self._entry.id

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes; raises :class:`SpoolFull` (and aborts this writer) past the spool's limit."""
        if self._done:
            raise SpoolError(f"spool entry {self._entry.id} is already committed or aborted")
        length = len(data)
        if not self._spool._reserve(length):
            self.abort()
            raise SpoolFull(
                f"spool full: {self._spool.max_bytes} bytes reached while receiving {self._entry.sop_instance_uid}"
            )
        self._size += length
        try:
            if self._buffer is not None:
                journal = self._spool._journal
                if journal is not None and len(self._buffer) + length <= journal.max_record:
                    self._buffer += data
                    return
                self._open_file()  # too large for the journal: its own file, synced on commit
                assert self._file is not None
                self._file.write(self._buffer)
                self._buffer = None
            assert self._file is not None
            self._file.write(data)
        except OSError as exc:  # the disk filled before max_bytes did: the same answer, A700
            self.abort()
            raise SpoolFull(f"spool full: cannot write to {self._spool.root}: {exc.strerror}") from exc

    def commit(self, visible: Callable[[], None] | None = None) -> SpoolEntry:
        """Make the entry durable; once this returns, a success may be answered.

        With `visible` (the near side's acceptor, the far side's session), a journaled entry's own files are
        written later by the spool's publishing thread, off the C-STORE's path, and only if it is still in the
        spool by then (relay_router.accel.spool, PUBLISH_DELAY_S); until then `Spool.held` gives its bytes (the
        near router's transfer and the far router's delivery send it from there). A whole Part 10 file
        (``part10``) is checked in memory then. `visible` is called (in this thread) once the entry can be
        claimed, which is at once."""
        if self._done:
            raise SpoolError(f"spool entry {self._entry.id} is already committed or aborted")
        try:
            entry = replace(self._entry, size=self._size, next_attempt=time.time())
            if self._buffer is not None and visible is not None:
                data, self._buffer = self._buffer, None
                if self._part10:
                    self._check_part10(BytesIO(data))
                try:
                    segment = self._spool._journal_append(INSTANCE, entry.to_json().encode("utf-8"), data)
                except JournalBroken:
                    self._buffer = data
                    self._commit_journaled(entry, data)  # falls back to the entry's own synced files
                else:
                    self._done = True
                    self._spool._committed_unpublished(entry, segment, data)
                    visible()
                    return entry
            elif self._buffer is not None:
                self._commit_journaled(entry, self._buffer)
            else:
                self._commit_file(entry)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._spool._committed(entry)
        if visible is not None:
            visible()
        return entry

    def _commit_journaled(self, entry: SpoolEntry, data: bytearray) -> None:
        """One journal record and its sync (shared with concurrent commits); the entry's files are not synced."""
        self._dir.mkdir(mode=0o700)
        fd = os.open(self._dir / DATA_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        if self._part10:
            self._check_part10_file()
        self._spool._write_state(self._dir, entry, durable=False)
        try:
            segment = self._spool._journal_append(INSTANCE, entry.to_json().encode("utf-8"), data)
        except JournalBroken:
            self._commit_file(entry)  # the journal is off from now on (logged): this entry the old way
            return
        # Renamed only once the record is durable: an entry in entries/ always has its record or its own sync.
        target = self._spool.root / "entries" / entry.id
        os.rename(self._dir, target)
        if not self._spool._track(entry.id, segment):
            self._spool._sync_entry(target)  # its segment is being retired already: sync its own files
            fsync_dir(target.parent)

    def _commit_file(self, entry: SpoolEntry) -> None:
        """The entry's own files synced: the data file, then the directory after the rename."""
        if self._file is not None:
            self._file.flush()
            if self._spool.fsync:
                os.fdatasync(self._file.fileno())  # data and size; mtime need not be durable
            self._file.close()
            self._file = None
        elif self._spool.fsync:  # written by _commit_journaled before the journal failed
            fd = os.open(self._dir / DATA_NAME, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        if self._part10:
            self._check_part10_file()
        # Our own header holds the first state, so state.json need not be synced (one fsync fewer per
        # C-STORE); a file from the other router (part10) does not, so its state is synced.
        self._spool._write_state(self._dir, entry, durable=self._part10)
        target = self._spool.root / "entries" / entry.id
        os.rename(self._dir, target)
        if self._spool.fsync:
            # The rename is durable once the directory it lands in is: then recovery finds the entry.
            # tmp/ need not be synced: a stale tmp/<id> left by a crash is removed on open.
            fsync_dir(target.parent)

    def _check_part10_file(self) -> None:
        with open(self._dir / DATA_NAME, "rb") as fp:
            self._check_part10(fp)

    def _check_part10(self, fp: BinaryIO) -> None:
        """A whole Part 10 file whose file meta names the declared UIDs (what the other router sent)."""
        try:
            file_meta, _ = split_part10(fp)
        except Exception as exc:  # pydicom raises several types on garbage
            raise SpoolError(f"not a DICOM Part 10 file: {exc.__class__.__name__}") from exc
        declared = {
            "MediaStorageSOPClassUID": self._entry.sop_class_uid,
            "MediaStorageSOPInstanceUID": self._entry.sop_instance_uid,
            "TransferSyntaxUID": self._entry.transfer_syntax,
        }
        for keyword, value in declared.items():
            if str(file_meta.get(keyword, "")) != value:
                raise SpoolError(f"the file meta {keyword} does not match the declared {value}")

    def abort(self) -> None:
        """Discard the partial entry (idempotent); its reserved bytes are released."""
        if self._done:
            return
        self._done = True
        self._buffer = None
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self._dir, ignore_errors=True)
        self._spool._release(self._size)

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None or not self._done:
            self.abort()  # leaving the block without commit: nothing was acknowledged
