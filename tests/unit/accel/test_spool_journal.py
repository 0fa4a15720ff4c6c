"""The spool's write-ahead journal: what a commit leaves on disk, what a restart rebuilds from it, and
how segments are retired. A "crash" here is the spool left unclosed with its own files damaged or
missing as a kill or a power loss could leave them; the real SIGKILLs are in
tests/integration/test_accel_delivery.py (tests.support.spool_child commits as the acceptor does)."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from relay_router.accel import journal as journal_module
from relay_router.accel import spool as spool_module
from relay_router.accel.journal import INSTANCE, REMOVED, Journal, read_segment
from relay_router.accel.spool import EntryState, Spool
from relay_router.accel.spool_format import part10_header, part10_header_by_pydicom
from tests.unit.accel.test_spool import CT, ROUTE, dataset_bytes

SMALL_SEGMENT = 32 * 1024  # a few dozen test instances per segment: rotations and checkpoints happen


def commit_one(spool: Spool, *, deferred: bool, seen: list[str] | None = None) -> tuple[str, str, bytes]:
    """One instance as the acceptor commits it (deferred: its own files written after commit returns)."""
    uid = generate_uid()
    data = dataset_bytes(uid)
    writer = spool.writer(ROUTE, sop_class_uid=CT, sop_instance_uid=uid, transfer_syntax=ExplicitVRLittleEndian)
    writer.write(data)
    entry = writer.commit((lambda: seen.append(uid)) if seen is not None else (lambda: None) if deferred else None)
    return entry.id, uid, data


def segments(root: Path) -> list[Path]:
    return sorted((root / "journal").glob("*.seg"))


def crash(spool: Spool) -> None:
    """The process dies: no close, no publishing afterwards (the lock is let go as the kernel would)."""
    maintenance = spool._maintenance
    if maintenance is not None:  # a checkpoint under way ends first (a kill during one: the SIGKILL tests)
        maintenance.join(30)
    with spool._lock:  # the publishing thread writes nothing more
        spool._unpublished.clear()
    os.close(spool._lock_fd)
    spool._lock_fd = -1


def test_the_header_is_byte_identical_to_pydicoms() -> None:
    for args in (
        (CT, "1.2.3.4", ExplicitVRLittleEndian, b'{"id": "x"}'),
        (CT, "1.2.3.45", "1.2.840.10008.1.2", b"{}x"),  # odd lengths: padded
        ("1.2", "1.2.3", "1.2.840.10008.1.2.4.90", None),
    ):
        assert part10_header(*args) == part10_header_by_pydicom(*args), args


def test_a_deferred_commit_is_in_the_journal_before_its_files_exist_and_published_after(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    seen: list[str] = []
    entry_id, uid, data = commit_one(spool, deferred=True, seen=seen)
    records = [r for path in segments(spool.root) for r in read_segment(path, 0)]
    assert [(r.kind, bytes(r.data).endswith(data)) for r in records] == [(INSTANCE, True)]
    assert spool.get(entry_id).sop_instance_uid == uid  # listed at once (storage commitment sees it)
    path = spool.path(entry_id)  # written out now at the latest
    assert dcmread(path).SOPInstanceUID == uid and path.read_bytes().endswith(data)
    assert seen == [uid]
    assert stat.S_IMODE(segments(spool.root)[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((spool.root / "journal").stat().st_mode) == 0o700
    spool.close()


def test_an_acknowledged_entry_whose_files_were_lost_or_torn_is_rebuilt(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10_000_000)
    torn_id, _, torn_data = commit_one(spool, deferred=False)
    lost_id, _, lost_data = commit_one(spool, deferred=False)
    spool.set_state(torn_id, EntryState.RETRY, error="destination busy")
    unpublished_id, unpublished_uid, unpublished_data = commit_one(spool, deferred=True)
    crash(spool)
    # What a power loss may leave of files written without a sync: a short file, a missing directory.
    torn = root / "entries" / torn_id / "instance.dcm"
    torn.write_bytes(torn.read_bytes()[:200])
    for name in os.listdir(root / "entries" / lost_id):
        os.unlink(root / "entries" / lost_id / name)
    os.rmdir(root / "entries" / lost_id)
    if (root / "entries" / unpublished_id).exists():  # the publisher may have been quicker than the crash
        for name in os.listdir(root / "entries" / unpublished_id):
            os.unlink(root / "entries" / unpublished_id / name)
        os.rmdir(root / "entries" / unpublished_id)

    again = Spool(root, max_bytes=10_000_000)
    assert [e.id for e in again.entries()] == [torn_id, lost_id, unpublished_id]
    for entry_id, data in ((torn_id, torn_data), (lost_id, lost_data), (unpublished_id, unpublished_data)):
        assert again.path(entry_id).read_bytes().endswith(data), entry_id
        assert again.get(entry_id).size == again.path(entry_id).stat().st_size
    assert again.get(torn_id).state is EntryState.RETRY  # its state.json was intact: kept
    assert dcmread(again.path(unpublished_id)).SOPInstanceUID == unpublished_uid
    assert f"{0:016x}.seg" not in {p.name for p in segments(root)}, "replayed segments are deleted"
    assert list((root / "tmp").iterdir()) == []
    assert again.usage().bytes_used == sum(e.size for e in again.entries())
    again.close()


def test_a_removed_entry_does_not_come_back_and_a_torn_record_is_ignored(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10_000_000)
    delivered, _, _ = commit_one(spool, deferred=True)
    kept, _, _ = commit_one(spool, deferred=True)
    spool.remove(delivered)
    crash(spool)
    # A record being written when the process died (never acknowledged): a header and half a body.
    segment = segments(root)[-1]
    records = list(read_segment(segment, 0))
    assert [r.kind for r in records] == [INSTANCE, INSTANCE, REMOVED]
    end = sum(journal_module.HEADER.size + len(r.state) + len(r.data) for r in records)
    with open(segment, "r+b") as out:
        out.seek(end)
        out.write(bytes(records[0].data[:100]).replace(b"DICM", b"MCID") + b"RJ1\n")  # garbage, then a magic
    again = Spool(root, max_bytes=10_000_000)
    assert [e.id for e in again.entries()] == [kept]
    assert not (root / "entries" / delivered).exists()
    again.close()


def test_full_segments_are_retired_after_their_entries_are_synced(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10_000_000, segment_bytes=SMALL_SEGMENT)
    ids = []
    for index in range(120):  # about 80 KB of records: several segments
        entry_id, _, _ = commit_one(spool, deferred=index % 2 == 0)
        ids.append(entry_id)
        if index % 3 == 0:
            spool.remove(entry_id)
    spool.close()  # waits for the checkpoint
    left = segments(root)
    assert len(left) <= 2, f"full segments are retired: {[p.name for p in left]}"
    again = Spool(root, max_bytes=10_000_000, segment_bytes=SMALL_SEGMENT)
    assert [e.id for e in again.entries()] == [i for n, i in enumerate(ids) if n % 3 != 0]
    again.close()


def test_concurrent_commits_share_syncs_and_all_survive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=100_000_000, segment_bytes=SMALL_SEGMENT)
    syncs = []
    real = journal_module.Journal._sync_locked

    def counting(journal: journal_module.Journal) -> None:  # the journal's own syncs, not the writer thread's
        syncs.append(journal)
        real(journal)

    monkeypatch.setattr(journal_module.Journal, "_sync_locked", counting)
    committed: list[str] = []
    guard = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            entry_id, _, _ = commit_one(spool, deferred=True)
            with guard:
                committed.append(entry_id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    monkeypatch.undo()
    assert len(committed) == 100
    assert len(syncs) <= 100 + 10  # one per commit at most (plus one per rotation); fewer when they overlap
    crash(spool)
    again = Spool(root, max_bytes=100_000_000)
    assert {e.id for e in again.entries()} == set(committed)
    for entry_id in committed:
        assert dcmread(again.path(entry_id)).SOPClassUID == CT
    again.close()


def test_a_failed_journal_sync_refuses_nothing_it_cannot_keep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed sync the journal is never trusted again: that commit and later ones sync their own files."""
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10_000_000)
    commit_one(spool, deferred=True)  # the journal's first segment is open
    assert spool._journal is not None
    journal_fd = spool._journal._fd
    real = os.fdatasync

    def failing(fd: int) -> None:
        if fd == journal_fd:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(journal_module.os, "fdatasync", failing)
    first, _, first_data = commit_one(spool, deferred=True)
    second, _, second_data = commit_one(spool, deferred=True)
    assert spool._journal is None
    assert spool.path(first).read_bytes().endswith(first_data)
    assert spool.path(second).read_bytes().endswith(second_data)
    spool.close()


def test_a_spool_of_the_previous_format_opens_and_is_journaled_from_then_on(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    old = Spool(root, max_bytes=10_000_000, journal=False)  # the layout before the journal: no journal/
    before, _, data = commit_one(old, deferred=False)
    old.close()
    assert not (root / "journal").exists()
    spool = Spool(root, max_bytes=10_000_000)
    after, _, _ = commit_one(spool, deferred=True)
    assert [e.id for e in spool.entries()] == [before, after]
    assert spool.path(before).read_bytes().endswith(data)
    spool.close()


def test_journal_records_round_trip(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", first_segment=7, segment_bytes=SMALL_SEGMENT)
    assert journal.append(INSTANCE, b'{"a": 1}', b"data" * 10, sync=True) == (7, -1)
    assert journal.append(REMOVED, b"someid", b"", sync=False) == (7, -1)
    segment, closed = journal.append(INSTANCE, b"{}", b"x" * (SMALL_SEGMENT - 50), sync=True)
    assert (segment, closed) == (8, 7)
    journal.close()
    first = list(read_segment(tmp_path / "journal" / f"{7:016x}.seg", 7))
    assert [(r.kind, r.state, bytes(r.data)) for r in first] == [
        (INSTANCE, b'{"a": 1}', b"data" * 10),
        (REMOVED, b"someid", b""),
    ]


def test_a_held_entry_is_claimed_from_memory_and_never_written_if_delivered_before_the_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "PUBLISH_DELAY_S", 0.5)
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    seen: list[str] = []
    delivered_id, _, delivered_data = commit_one(spool, deferred=True, seen=seen)
    kept_id, kept_uid, kept_data = commit_one(spool, deferred=True, seen=seen)
    assert len(seen) == 2  # claimable at once: the transfer is woken by the commit
    claimed = spool.claim(ROUTE, time.time())
    assert claimed is not None and claimed.id == delivered_id
    held = spool.held(delivered_id)
    assert held is not None and bytes(held).endswith(delivered_data)
    spool.set_state(delivered_id, EntryState.FORWARDED)
    spool.set_state(delivered_id, EntryState.DELIVERED)
    spool.remove(delivered_id)
    time.sleep(1.5)  # past the delay: the entry still in the spool is written out, the removed one never was
    entries = tmp_path / "spool" / "entries"
    assert not (entries / delivered_id).exists()
    assert spool.held(kept_id) is None
    data = entries / kept_id / "instance.dcm"
    assert data.read_bytes().endswith(kept_data) and dcmread(data).SOPInstanceUID == kept_uid
    assert stat.S_IMODE(data.stat().st_mode) == 0o600
    spool.close()


def test_held_bytes_past_the_bound_are_written_out_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "PUBLISH_DELAY_S", 3600.0)
    monkeypatch.setattr(spool_module, "PUBLISH_HELD_MAX_BYTES", 1)
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    entry_id, _, data = commit_one(spool, deferred=True)
    deadline = time.monotonic() + 10
    while spool.held(entry_id) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spool.held(entry_id) is None, "memory held by unwritten entries is bounded"
    assert (tmp_path / "spool" / "entries" / entry_id / "instance.dcm").read_bytes().endswith(data)
    spool.close()
