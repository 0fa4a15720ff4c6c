"""The durable spool of accelerated routes: one DICOM Part 10 file per acknowledged instance.

A C-STORE on an accelerated route is answered by the router, not by the
destination, so the router must keep its promise across crashes: a success
response is sent only after :meth:`SpoolWriter.commit` returned, and commit
returns only once the instance is on disk. The layout:

    <root>/tmp/<id>/        an entry being written (removed on open)
    <root>/entries/<id>/    a committed entry, moved here by one rename(2)
        instance.dcm        preamble, file meta (0002), the data set exactly as received
        state.json          SpoolEntry as JSON, replaced atomically on every change
    <root>/journal/         the write-ahead journal (relay_router.accel.journal)
    <root>/quarantine/<id>/ a committed entry whose state could not be read (kept, logged)
    <root>/requests/        `relay-router spool retry|purge` asks the running router here
    <root>/lock             held (flock) by the one process that has the spool open

Commit (relay_router.accel.spool_writer) makes an instance durable in one of two ways:

* journaled (up to Journal.max_record, 2 MiB): one record in the journal and its sync,
  shared with concurrent commits. The entry's own files are written without a sync, at
  once or, with ``commit(visible)`` (the acceptor), by this spool's publishing thread
  once the entry is PUBLISH_DELAY_S old and still here. Until then it is held in memory
  (``held``: the transfer sends it from there), claimed like any other, and not in the
  directory (``relay-router spool list`` shows it once written); most small instances
  are delivered and removed before, and never cost a file.
  When a journal segment is full, the maintenance thread syncs the files of the entries
  still in it and deletes it; on open, the journal's segments are replayed: entries a
  crash lost or tore are rewritten from their records and synced (recover_journal).
* its own files: the data file synced, the directory renamed into entries/, entries/
  synced (larger instances, ``journal=False``, or after a journal sync failed).

state.json is not synced at commit: the file meta of instance.dcm carries the entry's
first state (Private Information (0002,0102) under SPOOL_PRIVATE_UID), from which
recovery rebuilds a lost state.json. State changes after commit are made in memory
and written behind by the writing thread (atomic renames without fsync), and a removed
entry's files are deleted by it too: a crash may roll a change back, which at worst
repeats a delivery, and a repeated C-STORE of the same SOP Instance UID is harmless.
``flush()`` writes (and deletes) at once what is still behind; ``close()`` does too. Files are 0600 and
directories 0700 (PHI).

Entries, states, errors and the file format live in
:mod:`relay_router.accel.spool_format` (re-exported here), so that readers which
must not open the spool (``relay-router status``, ``spool list``) share them.

The spool holds no sockets; its methods are thread-safe (one lock, plus one that
serialises writing entries out), so the delivery pool's workers and the event loop
may share one spool. Its own threads (publishing, maintenance, the first segment)
end when idle. Its methods block on the disk (a commit waits for a sync,
milliseconds): call them from asyncio through ``asyncio.to_thread`` or an executor,
never on the loop that relays bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

from pynetdicom.dsutils import split_dataset

from relay_router.accel.journal import (
    JOURNAL_DIR,
    REMOVED,
    SEGMENT_BYTES,
    Journal,
    JournalBroken,
    recover_journal,
)
from relay_router.accel.spool_format import (
    DATA_NAME,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETRY_BASE_S,
    DEFAULT_RETRY_MAX_S,
    ENTRY_ID,
    MAX_ERROR_TEXT,
    MAX_META_TEXT,
    SPOOL_PRIVATE_UID,
    STATE_NAME,
    EntryState,
    SpoolBusy,
    SpoolEntry,
    SpoolError,
    SpoolFull,
    SpoolUsage,
    check_meta,
    check_uid,
    fsync_dir,
    read_entries,
    request_action,
    take_lock,
)
from relay_router.accel.spool_writer import SpoolWriter

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_RETRY_BASE_S",
    "DEFAULT_RETRY_MAX_S",
    "EntryState",
    "Spool",
    "SpoolEntry",
    "SpoolBusy",
    "SpoolError",
    "SpoolFull",
    "SpoolUsage",
    "SpoolWriter",
    "read_entries",
    "request_action",
]

log = logging.getLogger("relay_router.accel.spool")
PUBLISHER_IDLE_S = 2.0  # the publishing thread waits this long for more entries before it ends
# A journaled near-side entry is held in memory and written out as its own files only once it is this old
# (or its segment is retired, or the spool closes): most small instances are delivered and removed before,
# so their files are never written, rewritten at each state change and deleted again. The transfer reads
# them from memory (`held`). Past PUBLISH_HELD_MAX_BYTES held, the oldest are written out at once.
PUBLISH_DELAY_S = 5.0
PUBLISH_HELD_MAX_BYTES = 64 * 1024 * 1024
# Retiring a full journal segment writes and syncs the files of its entries still in the spool; it waits as
# long (for the same reason) unless more segments than this wait already (disk space: 8 MiB each).
CHECKPOINT_DELAY_S = PUBLISH_DELAY_S
MAX_SEGMENTS_WAITING = 4


class Spool:
    """A directory of committed instances with their delivery state (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        fsync: bool = True,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_base_s: float = DEFAULT_RETRY_BASE_S,
        retry_max_s: float = DEFAULT_RETRY_MAX_S,
        journal: bool = True,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        if max_bytes <= 0 or max_attempts <= 0 or retry_base_s <= 0 or retry_max_s < retry_base_s:
            raise ValueError("spool limits must be positive (and retry_max_s >= retry_base_s)")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self._lock = threading.Lock()
        self._entries: dict[str, SpoolEntry] = {}
        # The write-ahead journal (relay_router.accel.journal); None: every entry syncs its own files.
        self._journal: Journal | None = None
        self._journaled: dict[str, int] = {}  # entry id -> the segment whose record makes it durable
        self._checkpointed = -1  # segments up to this one are retired or being retired
        self._to_checkpoint: list[tuple[int, float]] = []  # full segments to retire, and when they filled
        # Committed near-side entries whose own files are not written yet (see SpoolWriter.commit).
        self._unpublished: dict[str, tuple[int, bytearray, float]] = {}  # id -> (segment, data, committed at)
        self._held_bytes = 0  # bytes of the entries in _unpublished
        self._publish_lock = threading.Lock()  # taken before self._lock, never after
        self._publish_wake = threading.Condition(self._lock)
        self._publisher: threading.Thread | None = None
        self._dirty: dict[str, None] = {}  # entries whose state.json is behind their state (_state_behind)
        self._doomed: dict[str, None] = {}  # removed entries whose files are still to delete (remove)
        self._closing = False
        self._maintenance: threading.Thread | None = None
        self._reserved = 0  # bytes of writers not yet committed
        self._used = 0  # bytes of committed entries
        # Called (in the changing thread, outside the lock) after each state change: storage commitment
        # (relay_router.accel.commitment) learns final outcomes before a delivered entry is removed.
        self.on_change: Callable[[SpoolEntry], None] | None = None
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = take_lock(self.root)
        try:
            next_segment = self._recover()
            if journal and fsync:
                self._journal = Journal(
                    self.root / JOURNAL_DIR, first_segment=next_segment, segment_bytes=segment_bytes
                )
                self._checkpointed = next_segment - 1
                self._prepare_first()
            self.apply_requests()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let a running checkpoint finish and release the spool's lock (the process exiting does the same).

        Segments are left as they are: the next open rebuilds what they hold and retires them."""
        with self._lock:
            self._closing = True  # a waiting checkpoint goes ahead (or stops: segments are rebuilt on open)
            self._publish_wake.notify()
        publisher = self._publisher
        if publisher is not None:
            publisher.join(30)
        maintenance = self._maintenance
        if maintenance is not None:
            maintenance.join(30)
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- opening -------------------------------------------------------------------------------

    def _recover(self) -> int:
        """Rebuild the in-memory state from disk; returns the number of the journal's next segment."""
        for name in ("", "tmp", "entries", "quarantine", "requests"):
            directory = self.root / name
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        for partial in (self.root / "tmp").iterdir():  # never committed, never acknowledged
            shutil.rmtree(partial, ignore_errors=True)
        next_segment = recover_journal(self.root, self._sync_entry)
        now = time.time()
        for directory in sorted((self.root / "entries").iterdir()):
            data, state = directory / DATA_NAME, directory / STATE_NAME
            if not data.exists():  # remove() unlinks the data first: a removal that a crash interrupted
                shutil.rmtree(directory, ignore_errors=True)
                continue
            try:
                entry = self._read_state(directory)
            except Exception as exc:  # pydicom raises several types on a damaged file: keep it, set it aside
                log.error("spool entry %s has an unreadable state (%s): moved to quarantine", directory.name, exc)
                os.rename(directory, self.root / "quarantine" / directory.name)
                continue
            if not state.exists():
                self._write_state(directory, entry, durable=False)
            if entry.state is EntryState.SENDING:  # the process died mid-delivery: try again
                back = EntryState.RETRY if entry.attempts > 1 else EntryState.RECEIVED
                entry = replace(entry, state=back, next_attempt=now)
                self._write_state(directory, entry, durable=False)
            self._entries[entry.id] = entry
            self._used += entry.size
        log.info("spool %s opened: %d entries, %d bytes", self.root, len(self._entries), self._used)
        return next_segment

    def _read_state(self, directory: Path) -> SpoolEntry:
        """state.json, or, when a crash lost it (it is not synced on commit), the first state in the file meta."""
        try:
            entry = SpoolEntry.from_json((directory / STATE_NAME).read_text("utf-8"))
        except (ValueError, KeyError, OSError) as exc:
            file_meta, _ = split_dataset(directory / DATA_NAME)
            if str(file_meta.get("PrivateInformationCreatorUID", "")) != SPOOL_PRIVATE_UID:
                raise ValueError(
                    f"state.json unreadable ({exc.__class__.__name__}), no state in the file meta"
                ) from exc
            first = bytes(file_meta.PrivateInformation).rstrip(b" ").decode("utf-8")
            entry = replace(SpoolEntry.from_json(first), size=(directory / DATA_NAME).stat().st_size)
            log.warning("spool entry %s: state.json lost in a crash, restored from the file meta", directory.name)
        if entry.id != directory.name:
            raise ValueError("the id does not match the directory")
        return entry

    # -- writing -------------------------------------------------------------------------------

    def writer(
        self,
        route: str,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        meta: Mapping[str, str] | None = None,
        part10: bool = False,
    ) -> SpoolWriter:
        """Start an entry for `route`; see :class:`SpoolWriter`. UIDs and meta are validated here."""
        if not route or len(route) > MAX_META_TEXT or not route.isprintable():
            raise SpoolError(f"bad route name {route[:40]!r}")
        entry = SpoolEntry(
            id=f"{time.time_ns() // 1000:016x}-{secrets.token_hex(6)}",
            route=route,
            sop_class_uid=check_uid("SOP Class UID", sop_class_uid),
            sop_instance_uid=check_uid("SOP Instance UID", sop_instance_uid),
            transfer_syntax=check_uid("Transfer Syntax UID", transfer_syntax),
            size=0,
            state=EntryState.RECEIVED,
            attempts=0,
            next_attempt=0.0,
            last_error="",
            created=time.time(),
            meta=check_meta(meta),
        )
        return SpoolWriter(self, entry, part10=part10)

    def _reserve(self, length: int) -> bool:
        with self._lock:
            if self._used + self._reserved + length > self.max_bytes:
                return False
            self._reserved += length
            return True

    def _release(self, length: int) -> None:
        with self._lock:
            self._reserved -= length

    def _committed(self, entry: SpoolEntry) -> None:
        with self._lock:
            self._reserved -= entry.size
            self._used += entry.size
            self._entries[entry.id] = entry

    # -- the journal ---------------------------------------------------------------------------

    def _journal_append(self, kind: int, state: bytes, data: bytes | bytearray, *, sync: bool = True) -> int:
        """Append (and with `sync`, make durable) one record; the segment it is in. A full segment is
        handed to the maintenance thread. A failed journal is switched off (the spool goes on without)."""
        journal = self._journal
        if journal is None:
            raise JournalBroken("the journal is off")
        try:
            segment, closed = journal.append(kind, state, data, sync=sync)
        except JournalBroken as exc:
            if self._journal is journal:
                log.error("spool %s: %s; entries are synced one by one from now on", self.root, exc)
                self._journal = None
            raise
        if closed >= 0:
            self._schedule_checkpoint(closed)
        return segment

    def _committed_unpublished(self, entry: SpoolEntry, segment: int, data: bytearray) -> None:
        """A journaled entry is durable; its own files are written later by the publishing thread (if it is still
        here after PUBLISH_DELAY_S); until then `held` gives its bytes."""
        with self._lock:
            self._reserved -= entry.size
            self._used += entry.size
            self._entries[entry.id] = entry
            self._unpublished[entry.id] = (segment, data, time.monotonic())
            self._held_bytes += len(data)
            late = segment <= self._checkpointed
            self._publish_wake.notify()
            if self._publisher is None:  # (when late too: it retries if the write below fails)
                self._publisher = threading.Thread(target=self._publish_all, name="spool-publish", daemon=True)
                self._publisher.start()
        if late:  # its segment is being retired already: the entry must stand on its own before the answer
            self._publish(entry.id)

    def _publish_all(self) -> None:
        """The writing thread: the own files of committed entries first, then states that changed in memory;
        it ends after PUBLISHER_IDLE_S without work (or at once when the spool closes and nothing is left)."""
        while True:
            with self._lock:
                waiting, doomed, dirty = self._next_work()
                if waiting is None and doomed is None and dirty is None and not self._closing:
                    self._publish_wake.wait(self._publish_wait())
                    waiting, doomed, dirty = self._next_work()
                if waiting is None and doomed is None and dirty is None:
                    if self._unpublished and not self._closing:
                        continue  # held entries not due yet: wait for the oldest
                    self._publisher = None
                    return
            try:
                self._write_out(waiting, doomed, dirty)
            except OSError as exc:  # durable all the same (journal, or the state before); tried again
                what = waiting or doomed or dirty
                log.error("spool %s: entry %s cannot be written out (%s); retrying", self.root, what, exc)
                time.sleep(1.0)

    def _publish_wait(self) -> float:
        """How long the publishing thread may sleep: until the oldest held entry is due (caller holds _lock)."""
        oldest = next(iter(self._unpublished.values()), None)
        if oldest is None:
            return PUBLISHER_IDLE_S
        return min(PUBLISHER_IDLE_S, max(0.01, oldest[2] + PUBLISH_DELAY_S - time.monotonic()))

    def _next_work(self, *, now: bool = False) -> tuple[str | None, str | None, str | None]:
        """(an entry to write out, one to delete, one whose state to write), in that order (caller holds _lock).

        A held entry is written out once PUBLISH_DELAY_S old, at once with `now`, when the spool closes, or when
        more than PUBLISH_HELD_MAX_BYTES are held (the oldest first: the dict keeps commit order)."""
        waiting = next(iter(self._unpublished), None)
        if waiting is not None and not (now or self._closing or self._held_bytes > PUBLISH_HELD_MAX_BYTES):
            if self._unpublished[waiting][2] + PUBLISH_DELAY_S > time.monotonic():
                waiting = None
        doomed = next(iter(self._doomed), None) if waiting is None else None
        dirty = next(iter(self._dirty), None) if waiting is None and doomed is None else None
        return waiting, doomed, dirty

    def _write_out(self, waiting: str | None, doomed: str | None, dirty: str | None) -> bool:
        """Carry out the one piece of work `_next_work` chose; False when there was none."""
        if waiting is not None:
            self._publish(waiting)
        elif doomed is not None:
            self._delete(doomed)
        elif dirty is not None:
            self._flush_state(dirty)
        else:
            return False
        return True

    def flush(self) -> None:
        """Write (and delete) now what is still only in memory: what readers of the directory see."""
        while True:
            with self._lock:
                work = self._next_work(now=True)
            if not self._write_out(*work):
                return

    def _delete(self, entry_id: str) -> None:
        """Delete a removed entry's files: the data first (an entry without it is discarded on open)."""
        with self._publish_lock:  # after a publishing of it that was under way
            with self._lock:
                self._doomed.pop(entry_id, None)
            directory = self.root / "entries" / entry_id
            (directory / DATA_NAME).unlink(missing_ok=True)
            shutil.rmtree(directory, ignore_errors=True)

    def _state_behind(self, entry_id: str) -> None:
        """The entry's state changed in memory; the writing thread writes its state.json (caller holds _lock).

        State changes were never synced (a crash may roll one back: at worst a delivery is repeated); writing
        them behind keeps three file creations and renames per instance off the callers' threads (the near
        router's transfer runs on the event loop that also answers the sending device). A held entry's state is
        written when the entry is (`_publish`): nothing to do, and no thread to wake, on each change."""
        if entry_id in self._unpublished:
            return
        self._dirty[entry_id] = None
        self._publish_wake.notify()
        if self._publisher is None:
            self._publisher = threading.Thread(target=self._publish_all, name="spool-publish", daemon=True)
            self._publisher.start()

    def _flush_state(self, entry_id: str) -> None:
        with self._publish_lock:
            with self._lock:
                entry = self._entries.get(entry_id)
                if entry is None or entry_id in self._unpublished:  # removed; or publishing writes the state
                    self._dirty.pop(entry_id, None)
                    return
            try:
                self._write_state(self._dir(entry_id), entry, durable=False)
            except FileNotFoundError:
                pass  # removed meanwhile
            with self._lock:
                if self._entries.get(entry_id) is entry:  # else changed again meanwhile: written once more
                    self._dirty.pop(entry_id, None)

    def _publish(self, entry_id: str) -> None:
        """Write an unpublished entry's files (data, current state) into entries/; then claim() may take it."""
        with self._publish_lock:
            with self._lock:
                item = self._unpublished.get(entry_id)
                entry = self._entries.get(entry_id)
            if item is None:
                return
            segment, data, _ = item
            if entry is not None:
                directory = self.root / "tmp" / entry_id
                shutil.rmtree(directory, ignore_errors=True)
                directory.mkdir(mode=0o700)
                fd = os.open(directory / DATA_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                self._write_state(directory, entry, durable=False)
                os.rename(directory, self.root / "entries" / entry_id)
            with self._lock:
                if self._unpublished.pop(entry_id, None) is not None:
                    self._held_bytes -= len(data)
                if entry is not None and self._entries.get(entry_id, entry) is not entry:
                    self._state_behind(entry_id)  # changed while its files were written: once more
            if entry is not None and not self._track(entry_id, segment):
                self._sync_entry(self.root / "entries" / entry_id)
                fsync_dir(self.root / "entries")

    def _track(self, entry_id: str, segment: int) -> bool:
        """Note that `segment` holds the committed entry's record; False if that segment is being retired."""
        with self._lock:
            if segment <= self._checkpointed:
                return False
            self._journaled[entry_id] = segment
            return True

    def _sync_entry(self, directory: Path) -> None:
        """Make an entry's own files durable: data, state, and the entry directory's names."""
        for name in (DATA_NAME, STATE_NAME):
            try:
                fd = os.open(directory / name, os.O_RDONLY)
            except FileNotFoundError:
                continue  # removed meanwhile (delivered), or a state never written (rebuilt from the file meta)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(directory)

    def _prepare_first(self) -> None:
        """Make the journal's first segment in the background: opening the spool stays quick."""

        def prepare(journal: Journal) -> None:
            try:
                journal.prepare_next()
            except OSError as exc:  # the first commit makes it then (and says what fails)
                log.warning("spool %s: journal segment not prepared: %s", self.root, exc)

        threading.Thread(target=prepare, args=(self._journal,), name="spool-segment", daemon=True).start()

    def _schedule_checkpoint(self, segment: int) -> None:
        with self._lock:
            self._to_checkpoint.append((segment, time.monotonic()))
            if self._maintenance is not None:
                return
            self._maintenance = threading.Thread(target=self._maintain, name="spool-checkpoint", daemon=True)
            self._maintenance.start()

    def _maintain(self) -> None:
        """Off the commit path: make the next segment ahead, then retire the full ones, oldest first."""
        while True:
            journal = self._journal
            with self._lock:
                if not self._to_checkpoint or journal is None:
                    self._maintenance = None
                    return
                segment, filled = self._to_checkpoint[0]
                waiting = len(self._to_checkpoint)
            try:
                journal.prepare_next()
                early = filled + CHECKPOINT_DELAY_S - time.monotonic()
                if early > 0 and waiting < MAX_SEGMENTS_WAITING and not self._closing:
                    time.sleep(min(early, 0.05))  # most of its entries will be delivered and removed by then
                    continue
                with self._lock:
                    self._to_checkpoint.pop(0)
                self._checkpoint(journal, segment)
            except OSError as exc:  # the segment stays; the next start rebuilds from it
                log.error("spool %s: journal segment %d not retired: %s", self.root, segment, exc)
                with self._lock:
                    if self._to_checkpoint and self._to_checkpoint[0][0] == segment:
                        self._to_checkpoint.pop(0)

    def _checkpoint(self, journal: Journal, segment: int) -> None:
        """Sync the own files of the entries whose record is in `segment` (or earlier), then delete it."""
        with self._lock:
            self._checkpointed = max(self._checkpointed, segment)
            unpublished = [entry_id for entry_id, item in self._unpublished.items() if item[0] <= segment]
        for entry_id in unpublished:  # written and synced now (their segment counts as retired already)
            self._publish(entry_id)
        with self._lock:
            waiting = [entry_id for entry_id, held in self._journaled.items() if held <= segment]
            for entry_id in waiting:
                del self._journaled[entry_id]
        for entry_id in waiting:
            self._sync_entry(self.root / "entries" / entry_id)
        fsync_dir(self.root / "entries")
        journal.retire(segment)
        log.debug("spool %s: journal segment %d retired, %d entries synced", self.root, segment, len(waiting))

    def _write_state(self, directory: Path, entry: SpoolEntry, *, durable: bool) -> None:
        temporary = directory / (STATE_NAME + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(entry.to_json())
            out.flush()
            if durable and self.fsync:
                os.fdatasync(out.fileno())
        os.replace(temporary, directory / STATE_NAME)

    # -- reading -------------------------------------------------------------------------------

    def _dir(self, entry_id: str) -> Path:
        if not ENTRY_ID.match(entry_id):  # ids come from the CLI and from the other router: no paths
            raise SpoolError(f"not a spool entry id: {entry_id[:40]!r}")
        return self.root / "entries" / entry_id

    def path(self, entry_id: str) -> Path:
        """The entry's DICOM Part 10 file (file meta + data set as received); a held entry is written out first."""
        self.get(entry_id)
        self._publish(entry_id)
        return self._dir(entry_id) / DATA_NAME

    def held(self, entry_id: str) -> bytearray | None:
        """The Part 10 bytes of a committed entry whose own files are not written yet (durable in the journal),
        or None: then read `path`. Never changed after commit; the caller must not change it either."""
        with self._lock:
            item = self._unpublished.get(entry_id)
        return None if item is None else item[1]

    def get(self, entry_id: str) -> SpoolEntry:
        self._dir(entry_id)
        with self._lock:
            entry = self._entries.get(entry_id)
        if entry is None:
            raise SpoolError(f"no spool entry {entry_id}")
        return entry

    def entries(self, *, state: EntryState | None = None, route: str | None = None) -> list[SpoolEntry]:
        """Entries in arrival order, optionally of one state and one route."""
        with self._lock:
            found = list(self._entries.values())
        return sorted(
            (e for e in found if (state is None or e.state is state) and (route is None or e.route == route)),
            key=lambda e: e.id,
        )

    def due(self, now: float, *, route: str | None = None) -> list[SpoolEntry]:
        """RECEIVED or RETRY entries whose next_attempt has come, oldest first (published ones: see claim)."""
        return [
            e
            for e in self.entries(route=route)
            if e.state in (EntryState.RECEIVED, EntryState.RETRY)
            and e.next_attempt <= now
        ]

    def next_due(self, *, route: str | None = None) -> float | None:
        """When the earliest RECEIVED or RETRY entry becomes due (None: nothing waits)."""
        times = [
            e.next_attempt for e in self.entries(route=route) if e.state in (EntryState.RECEIVED, EntryState.RETRY)
        ]
        return min(times) if times else None

    def usage(self) -> SpoolUsage:
        with self._lock:
            counts = dict.fromkeys(EntryState, 0)
            for entry in self._entries.values():
                counts[entry.state] += 1
            return SpoolUsage(self._used + self._reserved, self.max_bytes, counts)

    # -- state changes -------------------------------------------------------------------------

    def _update(self, entry_id: str, **changes: object) -> SpoolEntry:
        self._dir(entry_id)  # a valid id (they come from the CLI and from the other router)
        with self._lock:
            entry = self._entries.get(entry_id)
            if entry is None:
                raise SpoolError(f"no spool entry {entry_id}")
            entry = replace(entry, **changes)  # type: ignore[arg-type]
            self._entries[entry_id] = entry
            self._state_behind(entry_id)
        if self.on_change is not None:
            self.on_change(entry)
        return entry

    def set_state(self, entry_id: str, state: EntryState, *, error: str = "") -> SpoolEntry:
        """Move an entry to `state`; SENDING counts an attempt."""
        entry = self.get(entry_id)
        changes: dict[str, object] = {"state": state, "last_error": error[:MAX_ERROR_TEXT] or entry.last_error}
        if state is EntryState.SENDING:
            changes["attempts"] = entry.attempts + 1
        return self._update(entry_id, **changes)

    def claim(self, route: str, now: float, *, accept: frozenset[tuple[str, str]] | None = None) -> SpoolEntry | None:
        """Atomically take the oldest due entry of `route` (optionally only these (SOP class, TS) pairs): SENDING."""
        with self._lock:
            oldest = min(
                (
                    e
                    for e in self._entries.values()
                    if e.route == route
                    and e.state in (EntryState.RECEIVED, EntryState.RETRY)
                    and e.next_attempt <= now
                    and (accept is None or (e.sop_class_uid, e.transfer_syntax) in accept)
                ),
                key=lambda e: e.id,  # ids begin with the commit time: the oldest first
                default=None,
            )
            if oldest is None:
                return None
            entry = replace(oldest, state=EntryState.SENDING, attempts=oldest.attempts + 1)
            self._entries[entry.id] = entry
            self._state_behind(entry.id)
            return entry

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt `attempts + 1`: doubling from retry_base_s, capped at retry_max_s."""
        return min(self.retry_max_s, self.retry_base_s * (2 ** max(0, min(attempts - 1, 30))))

    def fail(self, entry_id: str, error: str, *, permanent: bool) -> SpoolEntry:
        """Record a failed attempt: RETRY after a capped backoff, or DEAD (permanent, or max_attempts reached)."""
        entry = self.get(entry_id)
        attempts = max(entry.attempts, 1)
        if permanent or attempts >= self.max_attempts:
            return self._update(entry_id, state=EntryState.DEAD, attempts=attempts, last_error=error[:MAX_ERROR_TEXT])
        return self._update(
            entry_id,
            state=EntryState.RETRY,
            attempts=attempts,
            next_attempt=time.time() + self.backoff(attempts),
            last_error=error[:MAX_ERROR_TEXT],
        )

    def remove(self, entry_id: str) -> None:
        """Forget an entry (after confirmed delivery, or a purge); the writing thread deletes its files within
        milliseconds (a crash before that delivers it once more, which is harmless), flush() at once."""
        self._dir(entry_id)
        with self._lock:
            entry = self._entries.pop(entry_id, None)
            if entry is None:
                raise SpoolError(f"no spool entry {entry_id}")
            self._used -= entry.size
            journaled = self._journaled.pop(entry_id, None) is not None
            held = self._unpublished.pop(entry_id, None)
            if held is not None:
                self._held_bytes -= len(held[1])
            journaled = held is not None or journaled
            self._dirty.pop(entry_id, None)
            self._doomed[entry_id] = None
            self._publish_wake.notify()
            if self._publisher is None:
                self._publisher = threading.Thread(target=self._publish_all, name="spool-publish", daemon=True)
                self._publisher.start()
        if journaled:  # its record would bring it back at the next start: say it is gone (not synced)
            with contextlib.suppress(SpoolError, OSError):
                self._journal_append(REMOVED, entry_id.encode("ascii"), b"", sync=False)

    def _dead(self, entry_id: str | None) -> Iterator[SpoolEntry]:
        if entry_id is not None:
            entry = self.get(entry_id)
            if entry.state is not EntryState.DEAD:
                raise SpoolError(f"spool entry {entry_id} is {entry.state}, not dead")
            yield entry
        else:
            yield from self.entries(state=EntryState.DEAD)

    def retry(self, entry_id: str | None = None) -> int:
        """Give DEAD entries (one, or all) a fresh start: RECEIVED, attempts reset, due now."""
        count = 0
        for entry in self._dead(entry_id):
            self._update(entry.id, state=EntryState.RECEIVED, attempts=0, next_attempt=time.time())
            count += 1
        return count

    def purge(self, entry_id: str | None = None) -> int:
        """Delete DEAD entries (one, or all) and their data."""
        count = 0
        for entry in self._dead(entry_id):
            self.remove(entry.id)
            count += 1
        self.flush()  # an operator's purge deletes the files before it returns
        return count

    def apply_requests(self) -> int:
        """Carry out the retries and purges `relay-router spool` left while this process held the spool."""
        applied = 0
        for request in sorted((self.root / "requests").iterdir()):
            action, _, rest = request.name.partition(".")
            target = rest.partition(".")[0]
            try:
                entry_id = None if target == "all" else target
                applied += (
                    self.retry(entry_id) if action == "retry" else self.purge(entry_id) if action == "purge" else 0
                )
            except SpoolError as exc:
                log.warning("spool request %s not applied: %s", request.name, exc)
            request.unlink(missing_ok=True)
        return applied
