"""The spool and the delivery pool against real destinations: Orthanc, DCMTK storescp, a pynetdicom SCP.

What a user relies on: every instance the spool acknowledged reaches the
destination byte-identical (SOP Instance UID + Pixel Data hash read back), a
destination that is down only delays delivery, a refused SOP class or a
permanent status dead-letters that entry and nothing else, a full spool
refuses instead of losing, and a SIGKILL at any moment (while writing, while
delivering) loses nothing that was committed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from prometheus_client import CollectorRegistry
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from relay_demo.datasets import fingerprint, fingerprints, generate_ct_series, generate_mr_series, write_series
from relay_router.accel.delivery import DeliveryOutcome, DeliveryPool, Destination, Outcome
from relay_router.accel.metrics import DeliveryStats, register_accel_metrics, spool_status
from relay_router.accel.spool import EntryState, Spool, SpoolFull, read_entries
from tests.integration.conftest import require_dcmtk
from tests.support.dcmtk import StorescpProcess
from tests.support.orthanc import OrthancProcess
from tests.support.ports import free_port
from tests.support.spool_child import ROUTE, spool_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def orthanc(orthanc_module_factory: Callable[..., OrthancProcess]) -> OrthancProcess:
    return orthanc_module_factory("ACCEL_DEST")


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Twelve small CT slices: many small instances is what the pool is for."""
    return write_series(generate_ct_series(12, rows=64, cols=64, seed=13), tmp_path_factory.mktemp("accel-ct"))


@pytest.fixture(scope="module")
def mr_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_series(generate_mr_series(1, rows=64, cols=64, seed=13), tmp_path_factory.mktemp("accel-mr"))[0]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", max_bytes=64 << 20, retry_base_s=0.2, retry_max_s=0.5, max_attempts=4)
    yield s
    s.close()


def run_pool(pool: DeliveryPool, timeout: float = 30.0) -> None:
    """Start the pool, wait until nothing of its route is due or in flight, stop it."""
    pool.start()
    try:
        deadline = time.monotonic() + timeout
        while not pool.idle():
            assert time.monotonic() < deadline, f"still busy: {pool.spool.entries()}"
            time.sleep(0.05)
    finally:
        pool.stop()


def test_orthanc_receives_every_instance_byte_identical(
    orthanc: OrthancProcess, spool: Spool, ct_files: list[Path], sample_dicom_files: list[Path]
) -> None:
    orthanc.delete_all()
    files = ct_files + sample_dicom_files  # uncompressed CT, MR, JPEG 2000, RLE: one context per pair
    for path in files:
        spool_file(spool, path)
    data_files = [spool.path(e.id) for e in spool.entries()]
    outcomes: list[DeliveryOutcome] = []
    stats = DeliveryStats()
    pool = DeliveryPool(
        spool,
        ROUTE,
        Destination("127.0.0.1", orthanc.dicom_port, orthanc.aet, "ACCELSCU"),
        associations=4,
        on_outcome=outcomes.append,
        stats=stats,
    )
    started = time.monotonic()
    run_pool(pool)
    elapsed = time.monotonic() - started
    assert orthanc.fingerprints() == fingerprints(files), "Orthanc holds exactly the spooled images, bit for bit"
    assert sorted(o.entry.sop_instance_uid for o in outcomes) == sorted(fingerprints(files))
    assert {o.outcome for o in outcomes} == {Outcome.DELIVERED} and {o.status for o in outcomes} == {0}
    assert spool.entries() == [] and spool.usage().bytes_used == 0, "delivered entries are removed"
    assert not any(p.exists() for p in data_files), "PHI is unlinked after confirmed delivery"
    assert stats.snapshot()[0] == {(ROUTE, "delivered"): len(files)}
    assert elapsed < 20


def test_destination_down_for_a_while_then_everything_arrives(
    spool: Spool, ct_files: list[Path], tmp_path: Path
) -> None:
    require_dcmtk("storescp")
    port = free_port()
    for path in ct_files[:3]:
        spool_file(spool, path)
    stats = DeliveryStats()
    pool = DeliveryPool(
        spool,
        ROUTE,
        Destination("127.0.0.1", port, "LATE_SCP", "ACCELSCU"),
        associations=2,
        stats=stats,
        idle_release_s=0.2,  # storescp serves one association at a time: let go of it promptly
    )
    pool.start()
    try:
        time.sleep(2.0)  # nobody listens: connection refused, again and again
        assert stats.snapshot()[1].get(ROUTE, 0) >= 2, "the pool kept trying to connect"
        states = {e.state for e in spool.entries()}
        assert states == {EntryState.RECEIVED}, "a down destination dead-letters nothing and burns no attempt"
        with StorescpProcess(tmp_path / "in", "LATE_SCP", port) as scp:
            scp.wait_for_files(3, timeout=15)
            deadline = time.monotonic() + 10
            while not pool.idle():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert scp.fingerprints() == fingerprints(ct_files[:3])
    finally:
        pool.stop()
    assert spool.entries() == []


def test_a_destination_that_restarts_between_instances_is_noticed_at_once(
    spool: Spool, ct_files: list[Path], tmp_path: Path
) -> None:
    """The delivery association stays open between C-STOREs with pynetdicom's reactor paused (no polling):
    an archive that went away meanwhile must be noticed before the next send, not after a DIMSE timeout."""
    require_dcmtk("storescp")
    port = free_port()
    outcomes: list[DeliveryOutcome] = []
    pool = DeliveryPool(
        spool,
        ROUTE,
        Destination("127.0.0.1", port, "RESTARTS", "ACCELSCU"),
        associations=1,  # storescp serves one association at a time
        idle_release_s=60.0,  # kept open across the restart
        dimse_timeout=60.0,
        on_outcome=outcomes.append,
    )

    def delivered_within(seconds: float) -> float:
        started = time.monotonic()
        while not pool.idle():
            assert time.monotonic() - started < seconds, f"not delivered within {seconds} s: {spool.entries()}"
            time.sleep(0.05)
        return time.monotonic() - started

    pool.start()
    try:
        with StorescpProcess(tmp_path / "first", "RESTARTS", port) as first:
            for path in ct_files[:2]:
                spool_file(spool, path)
            pool.wake()
            delivered_within(15)
            time.sleep(0.3)  # the worker is idle now, its association open
        with StorescpProcess(tmp_path / "second", "RESTARTS", port) as second:
            for path in ct_files[2:4]:
                spool_file(spool, path)
            pool.wake()
            assert delivered_within(10) < 10, "the aborted association was used until a timeout"
    finally:
        pool.stop()
    assert spool.entries() == [], "nothing was dead-lettered or left behind"
    assert len(first.files()) == 2
    assert [(o.outcome, o.entry.attempts) for o in outcomes] == [(Outcome.DELIVERED, 1)] * 4, "no attempt was wasted"
    assert fingerprints(second.files()) == fingerprints(ct_files[2:4])  # each was answered once written


CT_ONLY_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[CTOnly]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\Uncompressed
[[Profiles]]
[CTOnly]
PresentationContexts = CTOnly
"""


class CtOnlyStorescp(StorescpProcess):
    """storescp configured (-xf) to accept CT Image Storage only, as a CT-only archive would."""

    @property
    def args(self) -> list[str]:
        config = self.out_dir.with_name("ct-only.cfg")
        config.write_text(CT_ONLY_PROFILE)
        base = super().args
        base = [a for a in base if a not in ("-pm", "+xa")]
        return [*base[:-1], "-xf", os.fspath(config), "CTOnly", base[-1]]


def test_a_refused_sop_class_is_dead_lettered_and_holds_nothing_up(
    spool: Spool, ct_files: list[Path], mr_file: Path, tmp_path: Path
) -> None:
    require_dcmtk("storescp")
    spool_file(spool, ct_files[0])
    mr_id = spool_file(spool, mr_file)
    for path in ct_files[1:3]:
        spool_file(spool, path)
    outcomes: list[DeliveryOutcome] = []
    stats = DeliveryStats()
    with CtOnlyStorescp(tmp_path / "in", "CT_ONLY") as scp:
        pool = DeliveryPool(
            spool,
            ROUTE,
            Destination("127.0.0.1", scp.port, "CT_ONLY", "ACCELSCU"),
            associations=2,
            on_outcome=outcomes.append,
            stats=stats,
            idle_release_s=0.2,
        )
        run_pool(pool)
        assert scp.fingerprints() == fingerprints(ct_files[:3]), "the CT images went through"
    (dead,) = spool.entries()
    assert dead.id == mr_id and dead.state is EntryState.DEAD and dead.sop_class_uid == MRImageStorage
    assert dead.last_error.startswith("0x0122") and MRImageStorage in dead.last_error
    assert [(o.outcome, o.status) for o in outcomes if o.entry.id == mr_id] == [(Outcome.DEAD, 0x0122)]
    shown = spool_status(spool.root)
    assert shown["entries"]["dead"] == 1  # type: ignore[index]
    assert shown["dead"][0]["sop_instance_uid"] == dead.sop_instance_uid  # type: ignore[index]
    registry = CollectorRegistry()
    register_accel_metrics(registry, lambda: spool, stats, lambda: [ROUTE])
    assert registry.get_sample_value("relay_router_spool_entries", {"state": "dead"}) == 1
    assert registry.get_sample_value("relay_router_accel_deliveries_total", {"route": ROUTE, "outcome": "dead"}) == 1
    assert (
        registry.get_sample_value("relay_router_accel_deliveries_total", {"route": ROUTE, "outcome": "delivered"}) == 3
    )


def test_statuses_from_a_pynetdicom_scp_retry_or_dead_letter(spool: Spool, ct_files: list[Path]) -> None:
    """A700 (out of resources) is retried until it succeeds; A900 (does not match SOP class) is dead at once."""
    transient_uid = str(pydicom.dcmread(ct_files[0]).SOPInstanceUID)
    permanent_uid = str(pydicom.dcmread(ct_files[1]).SOPInstanceUID)
    seen: list[str] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with lock:
            seen.append(uid)
            if uid == transient_uid and seen.count(uid) < 3:
                return 0xA700
        return 0xA900 if uid == permanent_uid else 0x0000

    ae = AE(ae_title="PICKY")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        for path in ct_files[:4]:
            spool_file(spool, path)
        run_pool(DeliveryPool(spool, ROUTE, Destination("127.0.0.1", port, "PICKY", "ACCELSCU"), associations=2))
    finally:
        server.shutdown()
    assert seen.count(transient_uid) == 3, "A700 twice, then success on the third attempt"
    (dead,) = spool.entries()
    assert dead.sop_instance_uid == permanent_uid and dead.state is EntryState.DEAD and dead.attempts == 1
    assert dead.last_error.startswith("0xa900")
    assert seen.count(permanent_uid) == 1
    assert spool.retry() == 1 and spool.get(dead.id).state is EntryState.RECEIVED  # `relay-router spool retry`


class FlakySpool(Spool):
    """A spool whose first claims fail as a full or broken disk would make them fail."""

    failures = 2

    def claim(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        return super().claim(*args, **kwargs)  # type: ignore[arg-type]


def test_an_unexpected_error_pauses_a_worker_but_never_stops_delivery(tmp_path: Path, ct_files: list[Path]) -> None:
    stored: list[str] = []
    ae = AE(ae_title="PLAIN")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    port = free_port()

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    spool = FlakySpool(tmp_path / "flaky", max_bytes=64 << 20)
    try:
        for path in ct_files[:3]:
            spool_file(spool, path)
        run_pool(DeliveryPool(spool, ROUTE, Destination("127.0.0.1", port, "PLAIN", "ACCELSCU"), associations=1))
    finally:
        server.shutdown()
        spool.close()
    assert spool.failures == 0 and sorted(stored) == sorted(fingerprints(ct_files[:3]))


def test_a_full_spool_refuses_and_loses_nothing_it_acknowledged(
    orthanc: OrthancProcess, tmp_path: Path, ct_files: list[Path]
) -> None:
    one = ct_files[0].stat().st_size
    spool = Spool(tmp_path / "small", max_bytes=int(one * 2.5))
    try:
        acknowledged = [spool_file(spool, path) for path in ct_files[:2]]
        with pytest.raises(SpoolFull):
            spool_file(spool, ct_files[2])  # the receiver answers A700 (Out of Resources) to this one
        assert [e.id for e in spool.entries()] == acknowledged
        assert os.listdir(spool.root / "tmp") == []
        orthanc.delete_all()
        run_pool(DeliveryPool(spool, ROUTE, Destination("127.0.0.1", orthanc.dicom_port, orthanc.aet, "ACCELSCU")))
        assert orthanc.fingerprints() == fingerprints(ct_files[:2])
        spool_file(spool, ct_files[2])  # room again once delivered
    finally:
        spool.close()


def child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.spool_child", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_sigkill_while_writing_leaves_only_complete_readable_entries(tmp_path: Path, ct_files: list[Path]) -> None:
    root = tmp_path / "spool"
    expected = {path.name: fingerprint(path) for path in ct_files}
    rng = random.Random(13)
    committed: dict[str, str] = {}
    for _ in range(4):
        proc = child("write", os.fspath(root), *map(os.fspath, ct_files))
        assert proc.stdout is not None
        first = proc.stdout.readline()  # it runs: now kill it at a random instant
        assert first.startswith("committed"), first
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
        for line in [first, *rest.splitlines()]:
            if line.startswith("committed ") and line.count(" ") == 2:
                _, entry_id, name = line.split()
                committed[entry_id] = name
        spool = Spool(root, max_bytes=1 << 30)
        try:
            found = {e.id: e for e in spool.entries()}
            assert set(committed) <= set(found), "every entry whose commit returned survived the kill"
            for entry_id, entry in found.items():  # complete and readable, whether or not its line got out
                assert entry.state is EntryState.RECEIVED
                assert fingerprint(spool.path(entry_id)) in expected.values()
            assert os.listdir(root / "tmp") == []
        finally:
            spool.close()
    assert len(committed) >= 4


def test_sigkill_while_delivering_then_restart_delivers_everything(
    orthanc: OrthancProcess, tmp_path: Path, ct_files: list[Path]
) -> None:
    orthanc.delete_all()
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=1 << 30)
    for _ in range(3):  # 36 entries, each instance three times: duplicates must be harmless
        for path in ct_files:
            spool_file(spool, path)
    spool.close()
    proc = child("deliver", os.fspath(root), "127.0.0.1", str(orthanc.dicom_port), orthanc.aet)
    try:
        deadline = time.monotonic() + 20
        while len(orthanc.instances()) < 3 or EntryState.SENDING not in {e.state for e in read_entries(root)}:
            assert time.monotonic() < deadline and proc.poll() is None, "the child delivered nothing"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)  # a C-STORE was under way a moment ago
        proc.wait(10)
    spool = Spool(root, max_bytes=1 << 30)
    try:
        remaining = spool.entries()
        assert remaining, "killed mid-way: some entries are still to deliver"
        assert EntryState.SENDING not in {e.state for e in remaining}, "SENDING came back as RECEIVED or RETRY"
        run_pool(DeliveryPool(spool, ROUTE, Destination("127.0.0.1", orthanc.dicom_port, orthanc.aet, "ACCELSCU")))
        assert spool.entries() == []
    finally:
        spool.close()
    assert orthanc.fingerprints() == fingerprints(ct_files)
