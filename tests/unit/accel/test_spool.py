"""The durable spool: commit, limits, state changes, recovery after a crash, modes, requests."""

from __future__ import annotations

import io
import os
import stat
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from relay_router.accel.spool import (
    EntryState,
    Spool,
    SpoolBusy,
    SpoolError,
    SpoolFull,
    read_entries,
    request_action,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
ROUTE = "PACS_B"


def dataset_bytes(uid: str, pixels: bytes = b"\x01\x02" * 64) -> bytes:
    """A small CT data set encoded Explicit VR Little Endian, without file meta (as a C-STORE carries it)."""
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = uid
    ds.PatientName = "Test^Spool"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.PixelData = pixels
    buffer = io.BytesIO()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dcmwrite(buffer, ds, enforce_file_format=False)  # no preamble, no file meta: the bare data set
    return buffer.getvalue()


def spool_one(spool: Spool, uid: str | None = None, *, route: str = ROUTE) -> tuple[str, bytes]:
    uid = uid or generate_uid()
    data = dataset_bytes(uid)
    with spool.writer(route, sop_class_uid=CT, sop_instance_uid=uid, transfer_syntax=ExplicitVRLittleEndian) as w:
        w.write(data[:10])
        w.write(data[10:])
        entry = w.commit()
    return entry.id, data


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", max_bytes=10_000_000, retry_base_s=1.0, retry_max_s=4.0, max_attempts=3)
    yield s
    s.close()


def test_commit_gives_a_part10_file_pynetdicom_and_pydicom_read(spool: Spool) -> None:
    uid = generate_uid()
    entry_id, data = spool_one(spool, uid)
    entry = spool.get(entry_id)
    assert entry.state is EntryState.RECEIVED and entry.route == ROUTE and entry.sop_instance_uid == uid
    read = dcmread(spool.path(entry_id))
    assert read.SOPInstanceUID == uid and read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert read.PixelData == b"\x01\x02" * 64
    raw = spool.path(entry_id).read_bytes()
    assert raw.endswith(data) and raw[128:132] == b"DICM"  # data set exactly as received
    assert entry.size == len(raw)
    assert spool.usage().bytes_used == len(raw)


def test_files_are_owner_only(spool: Spool) -> None:
    entry_id, _ = spool_one(spool)
    for path in (spool.root, spool.root / "entries", spool.path(entry_id).parent):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in (spool.path(entry_id), spool.path(entry_id).parent / "state.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_nothing_is_visible_before_commit_and_abort_leaves_nothing(spool: Spool) -> None:
    writer = spool.writer(
        ROUTE, sop_class_uid=CT, sop_instance_uid=generate_uid(), transfer_syntax=ExplicitVRLittleEndian
    )
    writer.write(b"x" * 1000)
    assert spool.entries() == []
    assert spool.usage().bytes_used > 1000  # reserved while receiving
    writer.abort()
    assert spool.usage().bytes_used == 0
    assert list((spool.root / "tmp").iterdir()) == []
    with pytest.raises(SpoolError):
        writer.commit()


def test_an_exception_inside_the_block_discards_the_entry(spool: Spool) -> None:
    with pytest.raises(RuntimeError):
        with spool.writer(
            ROUTE, sop_class_uid=CT, sop_instance_uid=generate_uid(), transfer_syntax=ExplicitVRLittleEndian
        ) as w:
            w.write(b"abc")
            raise RuntimeError("association aborted")
    assert spool.entries() == [] and spool.usage().bytes_used == 0


def test_full_spool_refuses_and_keeps_what_it_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=2000)
    kept, _ = spool_one(spool)
    writer = spool.writer(
        ROUTE, sop_class_uid=CT, sop_instance_uid=generate_uid(), transfer_syntax=ExplicitVRLittleEndian
    )
    with pytest.raises(SpoolFull) as raised:
        writer.write(b"y" * 2000)
    assert "spool full" in str(raised.value)
    with pytest.raises(SpoolError):  # the writer aborted itself: later writes are refused too
        writer.write(b"y")
    assert [e.id for e in spool.entries()] == [kept]
    assert dcmread(spool.path(kept)).SOPClassUID == CT
    spool.remove(kept)  # room again
    spool_one(spool)
    spool.close()


@pytest.mark.parametrize(
    "field,value",
    [("sop_instance_uid", "1.2.3/../../etc"), ("sop_class_uid", ""), ("transfer_syntax", "1." + "2" * 70)],
)
def test_bad_uids_are_refused(spool: Spool, field: str, value: str) -> None:
    args = {"sop_class_uid": CT, "sop_instance_uid": generate_uid(), "transfer_syntax": ExplicitVRLittleEndian}
    args[field] = value
    with pytest.raises(SpoolError, match="not a valid UID"):
        spool.writer(ROUTE, **args)


def test_meta_is_bounded_and_kept(spool: Spool) -> None:
    with pytest.raises(SpoolError):
        spool.writer(ROUTE, sop_class_uid=CT, sop_instance_uid="1.2", transfer_syntax="1.2", meta={"k": "v" * 1000})
    with spool.writer(
        ROUTE, sop_class_uid=CT, sop_instance_uid="1.2", transfer_syntax="1.2", meta={"calling_ae": "MODALITY"}
    ) as w:
        w.write(b"\0" * 8)
        entry = w.commit()
    assert spool.get(entry.id).meta == {"calling_ae": "MODALITY"}


def test_entry_ids_cannot_name_paths(spool: Spool) -> None:
    for bad in ("../../etc/passwd", "", "0" * 16 + "-" + "0" * 12 + "/x"):
        with pytest.raises(SpoolError, match="not a spool entry id"):
            spool.path(bad)
    with pytest.raises(SpoolError, match="no spool entry"):
        spool.get("0" * 16 + "-" + "0" * 12)


def test_claim_fail_backoff_dead_retry_purge(spool: Spool) -> None:
    first, _ = spool_one(spool)
    second, _ = spool_one(spool)
    now = time.time()
    assert [e.id for e in spool.due(now + 1)] == [first, second]
    claimed = spool.claim(ROUTE, now + 1)
    assert claimed is not None and claimed.id == first and claimed.state is EntryState.SENDING and claimed.attempts == 1
    assert spool.claim("OTHER", now + 1) is None
    failed = spool.fail(first, "association aborted", permanent=False)
    assert failed.state is EntryState.RETRY and failed.next_attempt >= time.time() + 0.5
    assert [e.id for e in spool.due(time.time())] == [second]  # the failed one waits; the other is not held up
    for _ in range(2):  # max_attempts = 3
        spool.set_state(first, EntryState.SENDING)
        failed = spool.fail(first, "association aborted", permanent=False)
    assert failed.state is EntryState.DEAD and failed.attempts == 3 and failed.last_error == "association aborted"
    assert spool.backoff(1) == 1.0 and spool.backoff(2) == 2.0 and spool.backoff(10) == 4.0  # capped
    spool.set_state(second, EntryState.SENDING)
    assert spool.fail(second, "0x0122 SOP class not supported", permanent=True).state is EntryState.DEAD
    assert spool.usage().counts[EntryState.DEAD] == 2
    assert spool.retry(first) == 1
    assert spool.get(first).state is EntryState.RECEIVED and spool.get(first).attempts == 0
    with pytest.raises(SpoolError, match="not dead"):
        spool.purge(first)
    assert spool.purge() == 1
    assert [e.id for e in spool.entries()] == [first]
    assert not (spool.root / "entries" / second).exists()


def test_claim_only_accepted_pairs(spool: Spool) -> None:
    entry_id, _ = spool_one(spool)
    assert spool.claim(ROUTE, time.time() + 1, accept=frozenset({(CT, "1.2.840.10008.1.2")})) is None
    claimed = spool.claim(ROUTE, time.time() + 1, accept=frozenset({(CT, ExplicitVRLittleEndian)}))
    assert claimed is not None and claimed.id == entry_id


def test_reopen_recovers_sending_drops_partials_and_half_removed(tmp_path: Path) -> None:
    # Without the journal (a journaled entry removed half-way comes back from its record: test_spool_journal.py)
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10_000_000, journal=False)
    sending, _ = spool_one(spool)
    kept, _ = spool_one(spool)
    half_removed, _ = spool_one(spool)
    spool.claim(ROUTE, time.time() + 1)
    spool.writer(ROUTE, sop_class_uid=CT, sop_instance_uid="1.2.3", transfer_syntax="1.2").write(b"partial")
    (root / "entries" / half_removed / "instance.dcm").unlink()  # a crash inside remove()
    spool.close()  # the process "dies": nothing else is cleaned up

    again = Spool(root, max_bytes=10_000_000, journal=False)
    assert [e.id for e in again.entries()] == [sending, kept]
    assert again.get(sending).state is EntryState.RECEIVED and again.get(sending).attempts == 1
    assert list((root / "tmp").iterdir()) == []
    assert not (root / "entries" / half_removed).exists()
    assert again.usage().bytes_used == sum(e.size for e in again.entries())
    again.close()


def test_a_state_lost_in_a_crash_is_rebuilt_from_the_file_meta(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10_000_000)
    lost, _ = spool_one(spool)
    garbled, _ = spool_one(spool)
    spool.set_state(garbled, EntryState.SENDING)
    before = spool.get(lost)
    spool.close()
    (root / "entries" / lost / "state.json").unlink()  # commit does not sync it
    (root / "entries" / garbled / "state.json").write_text("{not json")
    again = Spool(root, max_bytes=10_000_000)
    assert [e.id for e in again.entries()] == [lost, garbled]
    rebuilt = again.get(lost)
    assert (rebuilt.route, rebuilt.sop_instance_uid, rebuilt.size, rebuilt.meta) == (
        before.route,
        before.sop_instance_uid,
        before.size,
        before.meta,
    )
    assert rebuilt.state is EntryState.RECEIVED and again.get(garbled).state is EntryState.RECEIVED
    assert (root / "entries" / lost / "state.json").exists()
    assert dcmread(again.path(lost)).SOPInstanceUID == before.sop_instance_uid  # still a valid Part 10 file
    again.close()


def test_an_entry_nobody_can_read_is_quarantined_not_deleted(tmp_path: Path) -> None:
    # Without the journal: with it, a file damaged before its segment is retired is rewritten from its record.
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10_000_000, journal=False)
    broken, _ = spool_one(spool)
    spool.close()
    (root / "entries" / broken / "state.json").write_text("{not json")
    data = root / "entries" / broken / "instance.dcm"
    data.write_bytes(b"\0" * 132 + data.read_bytes()[132:])  # no 'DICM': the file meta is unreadable too
    again = Spool(root, max_bytes=10_000_000, journal=False)
    assert again.entries() == []
    assert (root / "quarantine" / broken / "instance.dcm").exists()
    again.close()


def test_one_process_at_a_time_and_requests_reach_the_owner(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10_000_000)
    entry_id, _ = spool_one(spool)
    with pytest.raises(SpoolBusy):
        Spool(root, max_bytes=10_000_000)
    spool.set_state(entry_id, EntryState.SENDING)
    spool.fail(entry_id, "rejected", permanent=True)
    spool.flush()  # states are written behind, by the spool's thread
    assert [e.state for e in read_entries(root)] == [EntryState.DEAD]  # seen from outside, without the lock
    request_action(root, "retry", entry_id)
    with pytest.raises(SpoolError):
        request_action(root, "retry", "../x")
    assert spool.apply_requests() == 1
    assert spool.get(entry_id).state is EntryState.RECEIVED
    assert list((root / "requests").iterdir()) == []
    spool.close()


def test_part10_writer_checks_the_file_meta(spool: Spool, tmp_path: Path) -> None:
    source = Spool(tmp_path / "near", max_bytes=10_000_000)
    uid = generate_uid()
    entry_id, _ = spool_one(source, uid)
    part10 = source.path(entry_id).read_bytes()
    with spool.writer(
        ROUTE, sop_class_uid=CT, sop_instance_uid=uid, transfer_syntax=ExplicitVRLittleEndian, part10=True
    ) as w:
        w.write(part10)
        copied = w.commit()
    assert spool.path(copied.id).read_bytes() == part10
    with pytest.raises(SpoolError, match="does not match"):
        with spool.writer(
            ROUTE,
            sop_class_uid=CT,
            sop_instance_uid=generate_uid(),
            transfer_syntax=ExplicitVRLittleEndian,
            part10=True,
        ) as w:
            w.write(part10)
            w.commit()
    with pytest.raises(SpoolError, match="not a DICOM Part 10 file"):
        with spool.writer(ROUTE, sop_class_uid=CT, sop_instance_uid=uid, transfer_syntax="1.2", part10=True) as w:
            w.write(b"garbage" * 10)
            w.commit()
    assert len(spool.entries()) == 1
    assert os.listdir(spool.root / "tmp") == []
    source.close()
