"""The identity filter on PDUs (relay_router.identity.filter): what a device on each side receives."""

from __future__ import annotations

import asyncio
import hashlib
import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from relay_router.dimse import (
    CommandReceived,
    DatasetChunk,
    DatasetComplete,
    DimseReceiver,
    DimseSender,
    c_echo_rq,
    c_store_rq,
)
from relay_router.identity.coerce import Domain, RouteIdentity
from relay_router.identity.filter import Flow, IdentityFilter, IdentityFilterError
from relay_router.identity.model import Lookup, LookupOutcome, PatientRef
from relay_router.identity.resolver import MemorySource, Resolver

FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Q/R FIND
CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
CONTEXTS = {1: ("1.2.840.10008.1.1", IMPLICIT), 3: (FIND, IMPLICIT), 5: (CT, EXPLICIT), 7: (CT, DEFLATED)}
ROUTE = RouteIdentity(Domain("HOSP-A"), "HOSP-B")
A_ID, B_ID = PatientRef("A-123", "HOSP-A"), PatientRef("B-777", "HOSP-B")


class Audit:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, object]]] = []

    def __call__(self, event: str, outcome: str, **fields: object) -> None:
        self.records.append((event, outcome, fields))


class DownResolver:
    async def lookup(self, ref: PatientRef, target: str, **_: object) -> Lookup:
        return Lookup(LookupOutcome.UNAVAILABLE, None, "")


def make_filter(resolver: object | None = None, max_pdu: int = 16384) -> tuple[IdentityFilter, Audit]:
    audit = Audit()
    resolver = resolver or Resolver([MemorySource([(A_ID, B_ID)])], cache_ttl_s=0)
    filt = IdentityFilter(
        ROUTE, resolver, contexts=lambda: CONTEXTS, max_pdu=lambda flow: max_pdu, audit=audit, association_id="t1"
    )
    return filt, audit


def encoded(ds: Dataset, syntax: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = syntax == IMPLICIT, True
    write_dataset(fp, ds)
    if syntax != DEFLATED:
        return fp.getvalue()
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = deflater.compress(fp.getvalue()) + deflater.flush()
    return data + b"\0" * (len(data) % 2)  # PS3.5 A.5: even length


def c_find_rq(message_id: int) -> Dataset:
    command = Dataset()
    command.AffectedSOPClassUID = FIND
    command.CommandField = 0x0020
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0001
    return command


def identifier(patient_id: str) -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = ""
    ds.StudyInstanceUID = ""
    return encoded(ds, IMPLICIT)


def instance(patient_id: str, pixels: bytes) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.PatientName = "B^PATIENT"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = "1.2.3.4"
    ds.PixelData = pixels
    ds["PixelData"].VR = "OB"
    return encoded(ds, EXPLICIT)


def messages(pdus: list[bytes], max_pdu: int = 16384) -> list[tuple[Dataset, bytes | None]]:
    """What the receiving device sees: (command, data set) per message; every PDU within `max_pdu`."""
    receiver = DimseReceiver(CONTEXTS, max_pdu_length=max_pdu)
    out: list[tuple[Dataset, bytes | None]] = []
    body = bytearray()
    for pdu in pdus:
        for event in receiver.feed(pdu):
            if isinstance(event, CommandReceived):
                out.append((event.command, None))
                body.clear()
            elif isinstance(event, DatasetChunk):
                body += event.data
            elif isinstance(event, DatasetComplete):
                out[-1] = (out[-1][0], bytes(body))
    return out


def run(filt: IdentityFilter, flow: Flow, stream: bytes, step: int = 1000) -> dict[Flow, list[bytes]]:
    async def go() -> dict[Flow, list[bytes]]:
        sent: dict[Flow, list[bytes]] = {Flow.LEAVING: [], Flow.ARRIVING: []}
        for start in range(0, len(stream), step):  # split anywhere: the filter reassembles PDUs
            for to, data in await filt.process(flow, stream[start : start + step]):
                sent[to].append(data)
        return sent

    return asyncio.run(go())


def test_a_query_leaves_with_the_partners_id_and_untouched_messages_pass_as_they_are() -> None:
    sender = DimseSender(16384)
    echo = b"".join(sender.message(1, c_echo_rq(1)))
    find = b"".join(sender.message(3, c_find_rq(2), identifier("A-123")))
    filt, audit = make_filter()
    sent = run(filt, Flow.LEAVING, echo + find, step=7)
    assert sent[Flow.ARRIVING] == []
    assert sent[Flow.LEAVING][0] == echo  # the echo's PDU, byte for byte
    (echo_command, _), (command, data) = messages(sent[Flow.LEAVING])
    assert int(command.MessageID) == 2 and data is not None
    fp = DicomBytesIO(data)
    fp.is_implicit_VR, fp.is_little_endian = True, True
    query = read_dataset(fp, True, True)
    assert query.PatientID == "B-777" and query.IssuerOfPatientID == ""
    assert query.QueryRetrieveLevel == "STUDY"
    event, outcome, fields = audit.records[-1]
    assert (event, outcome, fields["identity_outcome"]) == ("patient_identity", "success", "mapped")
    assert (fields["original_patient_id"], fields["patient_id"]) == ("A-123", "B-777")


@pytest.mark.parametrize("resolver", [None, DownResolver()], ids=["unmapped", "sources-down"])
def test_an_unmapped_query_never_reaches_the_partner_and_gets_no_match(resolver: object | None) -> None:
    find = b"".join(DimseSender(16384).message(3, c_find_rq(9), identifier("A-404")))
    filt, audit = make_filter(resolver)
    sent = run(filt, Flow.LEAVING, find)
    assert sent[Flow.LEAVING] == []
    ((answer, data),) = messages(sent[Flow.ARRIVING])
    assert int(answer.CommandField) == 0x8020 and int(answer.Status) == 0 and data is None
    assert int(answer.MessageIDBeingRespondedTo) == 9
    assert audit.records[-1][1] == "failure" and audit.records[-1][2]["identity_outcome"] == "refused"


def test_a_store_coming_back_is_relabelled_refragmented_and_keeps_its_pixels() -> None:
    pixels = bytes(range(256)) * 400  # 100 KiB: several PDUs
    store = b"".join(DimseSender(16384).message(5, c_store_rq(3, CT, "1.2.3.4.5"), instance("B-777", pixels)))
    filt, audit = make_filter(max_pdu=4096)
    sent = run(filt, Flow.ARRIVING, store, step=5000)
    assert all(len(pdu) <= 4096 + 6 for pdu in sent[Flow.ARRIVING])  # within the device's Maximum Length
    ((command, data),) = messages(sent[Flow.ARRIVING])
    assert data is not None and str(command.AffectedSOPInstanceUID) == "1.2.3.4.5"
    fp = DicomBytesIO(data)
    ds = read_dataset(fp, False, True)
    assert ds.SOPInstanceUID == "1.2.3.4.5"
    assert (ds.PatientID, ds.IssuerOfPatientID) == ("A-123", "HOSP-A")
    assert (ds.OtherPatientIDsSequence[0].PatientID, ds.OtherPatientIDsSequence[0].IssuerOfPatientID) == (
        "B-777",
        "HOSP-B",
    )
    assert hashlib.sha256(ds.PixelData).digest() == hashlib.sha256(pixels).digest()
    assert audit.records[-1][2]["sop_instance_uid"] == "1.2.3.4.5"


def test_an_unmapped_store_keeps_the_partners_id_under_its_issuer() -> None:
    store = b"".join(DimseSender(16384).message(5, c_store_rq(3, CT, "1.2.3.4.5"), instance("B-1", b"\1\2")))
    filt, audit = make_filter()
    ((_, data),) = messages(run(filt, Flow.ARRIVING, store)[Flow.ARRIVING])
    assert data is not None
    ds = read_dataset(DicomBytesIO(data), False, True)
    assert (ds.PatientID, ds.IssuerOfPatientID) == ("B-1", "HOSP-B")
    assert audit.records[-1][2]["identity_outcome"] == "unmapped"


def test_a_malformed_pdv_is_refused_with_a_reason() -> None:
    bad = bytes((4, 0)) + (8).to_bytes(4, "big") + (99).to_bytes(4, "big") + bytes((3, 3)) + b"xx"
    filt, _ = make_filter()
    with pytest.raises(IdentityFilterError, match="does not fit"):
        run(filt, Flow.LEAVING, bad)


def test_endless_empty_command_fragments_are_bounded() -> None:
    empty_command_fragment = bytes((4, 0)) + (6).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes((3, 1))
    filt, _ = make_filter()
    filt.max_held = 64 * 1024
    with pytest.raises(IdentityFilterError, match="before a command set completed"):
        run(filt, Flow.LEAVING, empty_command_fragment * 6000, step=1 << 16)


def test_an_abort_in_the_middle_of_a_command_goes_out_alone() -> None:
    command = b"".join(DimseSender(16384).command(1, c_echo_rq(1)))
    fragment = command[12:20]  # the first bytes of the command set
    half = bytes((4, 0)) + (len(fragment) + 6).to_bytes(4, "big") + (len(fragment) + 2).to_bytes(4, "big")
    half += bytes((1, 1)) + fragment  # a command fragment, not the last
    abort = bytes((7, 0, 0, 0, 0, 4, 0, 0, 2, 0))
    filt, _ = make_filter()
    sent = run(filt, Flow.LEAVING, half + abort)
    assert sent[Flow.LEAVING] == [abort]
