"""Honest storage commitment on accelerated routes, with real parts.

A pynetdicom SCU (the modality, MODALITY) stores images through router A, which answers each C-STORE
from its spool, and asks for storage commitment (N-ACTION). Router A must answer (N-EVENT-REPORT)
only once the destination behind router B has every image: checked against Orthanc over REST at the
moment the report arrives. An instance the destination refused (a pynetdicom archive that answers MR
C-STOREs with 0x0122), one never sent, and an MR for a DCMTK storescp that takes CT only (so router A
refuses the MR context) are in the Failed SOP Sequence with their reasons; the others in the
Referenced SOP Sequence. A request survives a SIGKILL of router A; when the sender's
association is gone, the report comes on an association router A opens to the address configured for
MODALITY (role reversal), never to one a peer supplied.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    StorageCommitmentPushModel,
)

from relay_common.audit import read_events
from relay_demo.datasets import fingerprint, fingerprints, generate_ct_series, generate_mr_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.conftest import OrthancPool, require_dcmtk
from tests.integration.test_accel_delivery import CtOnlyStorescp
from tests.integration.test_accel_route import wait_for
from tests.support.dcmtk import StorescpProcess
from tests.support.orthanc import OrthancProcess
from tests.support.ports import free_port

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
REQUESTER = "MODALITY"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


@dataclass
class Report:
    """One N-EVENT-REPORT as the modality received it, with what Orthanc held at that moment."""

    event_type: int
    info: Dataset
    at_orthanc: dict[str, bool]
    how: str  # "same association" or "role reversal"


@dataclass
class Modality:
    """The sending device: its N-EVENT-REPORT handler and the listener router A may call back."""

    orthanc: OrthancProcess
    port: int = 0
    reports: queue.Queue[Report] = field(default_factory=queue.Queue)
    watched: list[str] = field(default_factory=list)  # SOP Instance UIDs to look up at report time
    server: Any = None

    def handler(self, how: str) -> Callable[[Any], tuple[int, None]]:
        def on_report(event: Any) -> tuple[int, None]:
            # Orthanc is asked while the report is being answered: what was there when it was sent.
            at_orthanc = {uid: self.orthanc.find_sop(uid) is not None for uid in self.watched}
            self.reports.put(Report(int(event.event_type), event.event_information, at_orthanc, how))
            return 0x0000, None

        return on_report

    def listen(self) -> None:
        ae = AE(ae_title=REQUESTER)
        # Router A proposes the SCP role for the report (PS3.4 J.3.3): we accept it.
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.server = ae.start_server(
            (HOST, self.port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.handler("role reversal"))]
        )

    def report(self, transaction_uid: str, timeout: float) -> Report:
        """The report of this transaction; a second one for it (a repeat) fails the test."""
        deadline = time.monotonic() + timeout
        found: list[Report] = []
        while not found and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                report = self.reports.get(timeout=max(0.01, deadline - time.monotonic()))
                if str(report.info.TransactionUID) == transaction_uid:
                    found.append(report)
        assert found, f"no N-EVENT-REPORT for {transaction_uid} within {timeout:.0f} s"
        return found[0]


@dataclass
class Sites:
    net: LocalRelayNetwork
    orthanc: OrthancProcess
    modality: Modality
    picky_received: set[str]
    ct_only: StorescpProcess
    work: Path

    @property
    def port_a(self) -> int:
        port = self.net.sites["hospital-a"].port
        assert port
        return port


def start_picky_archive(received: set[str]) -> Any:
    """Accepts CT and MR contexts but refuses every MR C-STORE with 0x0122 (SOP class not supported)."""

    def on_store(event: Any) -> int:
        if event.request.AffectedSOPClassUID == MRImageStorage:
            return 0x0122
        received.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="PICKY")
    ae.add_supported_context(CTImageStorage, "1.2.840.10008.1.2.1")
    ae.add_supported_context(MRImageStorage, "1.2.840.10008.1.2.1")
    return ae.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


@pytest.fixture(scope="module")
def sites(orthanc_module_factory: OrthancPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    work = tmp_path_factory.mktemp("commitment")
    orthanc = orthanc_module_factory("ORTHANC_B")
    modality = Modality(orthanc, port=free_port())
    modality.listen()
    picky_received: set[str] = set()
    picky = start_picky_archive(picky_received)
    require_dcmtk("storescp")
    ct_only = CtOnlyStorescp(work / "ct-only", "CT_ONLY").start()
    net = LocalRelayNetwork(work / "relay").start()
    accel = {"bucket_bytes": 256 * 1024, "retry_max_s": 2.0, "associations": 2}
    try:
        net.add_site(
            "hospital-b",
            shared=[
                Shared("ORTHANC_B", HOST, orthanc.dicom_port, ["hospital-a"], accelerate=True),
                Shared("PICKY", HOST, picky.server_address[1], ["hospital-a"], accelerate=True),
                Shared("CT_ONLY", HOST, ct_only.port, ["hospital-a"], accelerate=True),
            ],
            accelerate=accel,
        )
        requester = {"ae_title": REQUESTER, "host": HOST, "port": modality.port}
        net.add_site(
            "hospital-a",
            remote=[
                Remote("PACS_B", "hospital-b", "ORTHANC_B", accelerate=True),
                Remote("PICKY", "hospital-b", accelerate=True),
                Remote("CT_ONLY", "hospital-b", accelerate=True),
            ],
            accelerate={**accel, "commitment_requester": [requester]},
        )
        net.wait_connected()

        def learned(title: str) -> bool:
            accel_status = net.status("hospital-a").get("accelerate")
            return isinstance(accel_status, dict) and bool(accel_status["routes"][title]["capabilities_known"])

        for title in ("PACS_B", "PICKY", "CT_ONLY"):
            wait_for(lambda t=title: learned(t), f"{title}'s capabilities learned")  # type: ignore[misc]
        yield Sites(net, orthanc, modality, picky_received, ct_only, work)
    finally:
        net.stop()
        picky.shutdown()
        ct_only.stop()
        modality.server.shutdown()


def series(sites: Sites, name: str, datasets: list[Dataset]) -> list[Path]:
    return write_series(datasets, sites.work / name)


def commitment_request(files: list[Path], extra: tuple[tuple[str, str], ...] = ()) -> Dataset:
    info = Dataset()
    info.TransactionUID = generate_uid()
    info.ReferencedSOPSequence = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        extra += ((str(ds.SOPClassUID), str(ds.SOPInstanceUID)),)
    for sop_class, sop_instance in extra:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        info.ReferencedSOPSequence.append(item)
    return info


def store_and_request(sites: Sites, called: str, files: list[Path], info: Dataset, *, keep_open: float) -> None:
    """Store `files` on one association, send the N-ACTION, keep the association open `keep_open` s."""
    ae = AE(ae_title=REQUESTER)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    ae.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
    ae.add_requested_context(StorageCommitmentPushModel)
    handlers = [(evt.EVT_N_EVENT_REPORT, sites.modality.handler("same association"))]
    assoc = ae.associate(HOST, sites.port_a, ae_title=called, evt_handlers=handlers)
    assert assoc.is_established, f"router A refused the association for {called}"
    try:
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            assert status and status.Status == 0x0000, f"C-STORE of {path.name}: {status}"
        status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        assert status and status.Status == 0x0000, f"N-ACTION refused: {status}"
        deadline = time.monotonic() + keep_open
        while time.monotonic() < deadline and not any(  # until this transaction's report came
            r.info.TransactionUID == info.TransactionUID for r in list(sites.modality.reports.queue)
        ):
            time.sleep(0.1)
    finally:
        assoc.release()


def referenced(info: Dataset) -> set[str]:
    return {str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])}


def failed(info: Dataset) -> dict[str, int]:
    return {str(item.ReferencedSOPInstanceUID): int(item.FailureReason) for item in info.get("FailedSOPSequence", [])}


def uids(files: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def assert_identical_at_orthanc(orthanc: OrthancProcess, files: list[Path]) -> None:
    for path in files:
        uid, pixels = fingerprint(path)
        orthanc_id = orthanc.find_sop(uid)
        assert orthanc_id, f"{uid} is not at Orthanc"
        stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
        assert fingerprint(stored) == (uid, pixels), f"{uid} differs at Orthanc"


def test_report_on_the_same_association_only_once_orthanc_has_every_image(sites: Sites) -> None:
    """Router B is down while the modality stores and asks: no report may come (Orthanc has nothing);
    once router B is back the report arrives on the still-open association, and Orthanc has them all."""
    files = series(sites, "ct-same", generate_ct_series(6, rows=64, cols=64, seed=71))
    sites.modality.watched = uids(files)
    info = commitment_request(files)
    sites.net.stop_router("hospital-b")
    opener = threading.Timer(4.0, sites.net.start_router, args=("hospital-b",))
    try:
        opener.start()  # router B comes back while the association waits for the report
        store_and_request(sites, "PACS_B", files, info, keep_open=60)
    finally:
        opener.join()
    report = sites.modality.report(str(info.TransactionUID), timeout=1)
    assert report.how == "same association"
    assert all(report.at_orthanc.values()), f"reported before Orthanc had: {report.at_orthanc}"
    assert report.event_type == 1
    assert str(report.info.TransactionUID) == str(info.TransactionUID)
    assert referenced(report.info) == set(sites.modality.watched)
    assert not failed(report.info)
    assert_identical_at_orthanc(sites.orthanc, files)


def test_refused_and_unknown_instances_are_failed_and_the_report_comes_by_role_reversal(sites: Sites) -> None:
    """PICKY refuses MR with 0x0122; one instance named was never sent (0x0112). The modality releases at
    once, so router A opens an association to MODALITY's configured address to report."""
    ct = series(sites, "ct-picky", generate_ct_series(3, rows=64, cols=64, seed=72))
    mr = series(sites, "mr-picky", generate_mr_series(2, rows=64, cols=64, seed=72))
    never_sent = (CTImageStorage, generate_uid())
    info = commitment_request(ct + mr, (never_sent,))
    sites.modality.watched = []
    sites.net.wait_connected()
    store_and_request(sites, "PICKY", ct + mr, info, keep_open=0)
    report = sites.modality.report(str(info.TransactionUID), timeout=45)
    assert report.how == "role reversal"
    assert report.event_type == 2
    assert referenced(report.info) == set(uids(ct))
    assert set(uids(ct)) <= sites.picky_received
    expected = {uid: 0x0122 for uid in uids(mr)} | {never_sent[1]: 0x0112}
    assert failed(report.info) == expected

    def audited() -> list[dict[str, Any]]:
        events = read_events(sites.net.workdir / "audit-hospital-a.jsonl")
        return [e for e in events if e.get("transaction_uid") == str(info.TransactionUID)]

    wait_for(lambda: bool(audited()), "the accel_commitment audit event")
    [event] = audited()
    assert (event["event"], event["outcome"], event["committed"], event["failed"]) == (
        "accel_commitment",
        "failure",
        3,
        3,
    )


def test_a_pending_request_survives_a_sigkill_of_router_a(sites: Sites) -> None:
    """Stored and asked while router B is down; router A is SIGKILLed and restarted; once router B is back
    the report comes (role reversal: the association is gone) and Orthanc has every image."""
    files = series(sites, "mr-kill", generate_mr_series(4, rows=64, cols=64, seed=73))
    sites.modality.watched = uids(files)
    info = commitment_request(files)
    sites.net.wait_connected()
    sites.net.stop_router("hospital-b")
    try:
        store_and_request(sites, "PACS_B", files, info, keep_open=0)
        sites.net.stop_router("hospital-a", kill=True)
        early = [r for r in list(sites.modality.reports.queue) if r.info.TransactionUID == info.TransactionUID]
        assert not early, "a report came while router B was down"
        sites.net.start_router("hospital-a")
    finally:
        sites.net.start_router("hospital-b")
    report = sites.modality.report(str(info.TransactionUID), timeout=60)
    assert report.how == "role reversal"
    assert all(report.at_orthanc.values()), f"reported before Orthanc had: {report.at_orthanc}"
    assert report.event_type == 1 and referenced(report.info) == set(sites.modality.watched)
    assert str(report.info.TransactionUID) == str(info.TransactionUID)
    assert_identical_at_orthanc(sites.orthanc, files)


def test_a_malformed_request_is_refused_with_a_specific_status_and_the_association_goes_on(sites: Sites) -> None:
    ae = AE(ae_title=REQUESTER)
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(HOST, sites.port_a, ae_title="PACS_B")
    assert assoc.is_established
    try:
        no_transaction = commitment_request([], ((CTImageStorage, generate_uid()),))
        del no_transaction.TransactionUID
        status, _ = assoc.send_n_action(no_transaction, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        assert status and status.Status == 0x0120  # missing attribute: the Transaction UID
        wrong_action = commitment_request([], ((CTImageStorage, generate_uid()),))
        status, _ = assoc.send_n_action(wrong_action, 7, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        assert status and status.Status == 0x0123  # no such action
        status, _ = assoc.send_n_action(None, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        assert status and status.Status == 0x0120  # no Action Information at all
        echo = assoc.send_c_echo()
        assert echo and echo.Status == 0x0000
    finally:
        assoc.release()
    log = sites.net.log("hospital-a")
    assert "Transaction UID (0008,1195) is missing" in log and "Action Type ID is not 1" in log


def test_a_sop_class_the_destination_refuses_in_negotiation_is_failed_0122(sites: Sites) -> None:
    """storescp takes CT only: router A rejects the MR context, so the MR never leaves the modality; the
    commitment request naming it gets it back failed with 0x0122, the CT committed once storescp has it."""
    ct = series(sites, "ct-only", generate_ct_series(2, rows=64, cols=64, seed=74))
    mr = series(sites, "mr-only", generate_mr_series(1, rows=64, cols=64, seed=74))
    mr_pair = (MRImageStorage, uids(mr)[0])
    info = commitment_request(ct, (mr_pair,))
    sites.net.wait_connected()
    store_and_request(sites, "CT_ONLY", ct, info, keep_open=30)
    report = sites.modality.report(str(info.TransactionUID), timeout=1)
    assert report.how == "same association" and report.event_type == 2
    assert referenced(report.info) == set(uids(ct))
    assert failed(report.info) == {mr_pair[1]: 0x0122}
    # Every file storescp wrote (it writes before its C-STORE-RSP; its own "completed" test needs a later log line).
    at_storescp = fingerprints(sites.ct_only.files())
    assert {uid: at_storescp.get(uid) for uid in uids(ct)} == fingerprints(ct)  # committed = there, identical
