"""The study tap follows real pynetdicom PDUs, split anywhere, in every common transfer syntax."""

from __future__ import annotations

import base64
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from relay_common import dicom_audit
from relay_router.studytap import Side, StudyTap, read_prefix
from tests.unit.ul.builders import (
    CT_STORAGE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    MR_STORAGE,
    VERIFICATION,
    _dimse_pdus,
    associate_ac,
    associate_rq,
    echo_rq,
    store_rsp,
)

SCHEMA = etree.RelaxNG(etree.parse(str(Path(__file__).parents[2] / "fixtures" / "audit" / "dicom-audit-message.rng")))
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = str(ExplicitVRBigEndian)


def data_set(study: str, patient: str, issuer: str = "", *, sop_class: str = CT_STORAGE, pixels: int = 4096) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"{study}.{pixels}"
    ds.StudyDate = "20260101"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientName = "Doe^Jane"
    ds.PatientID = patient
    if issuer:
        ds.IssuerOfPatientID = issuer
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".1"
    ds.Rows, ds.Columns, ds.BitsAllocated = 64, 32, 16
    ds.PixelData = bytes(range(256)) * (pixels // 256)
    return ds


def encode(ds: Dataset, transfer_syntax: str) -> bytes:
    buf = BytesIO()
    if transfer_syntax == DEFLATED:
        raw = BytesIO()
        ds.save_as(raw, implicit_vr=False, little_endian=True, enforce_file_format=False)
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return compressor.compress(raw.getvalue()) + compressor.flush()
    ds.save_as(
        buf,
        implicit_vr=transfer_syntax == IMPLICIT_LE,
        little_endian=transfer_syntax != BIG_ENDIAN,
        enforce_file_format=False,
    )
    return buf.getvalue()


def store(
    ds: Dataset, transfer_syntax: str, context_id: int, message_id: int, *, max_pdu: int = 4096, originator: str = ""
) -> list[bytes]:
    prim = C_STORE()
    prim.MessageID = message_id
    prim.AffectedSOPClassUID = ds.SOPClassUID
    prim.AffectedSOPInstanceUID = ds.SOPInstanceUID
    prim.Priority = 0
    if originator:
        prim.MoveOriginatorApplicationEntityTitle = originator
        prim.MoveOriginatorMessageID = 7
    prim.DataSet = BytesIO(encode(ds, transfer_syntax))
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    return _dimse_pdus(msg, context_id, max_pdu)


def negotiated(transfer_syntax: str) -> tuple[bytes, bytes]:
    rq = associate_rq(
        contexts=[(VERIFICATION, (IMPLICIT_LE,)), (CT_STORAGE, (transfer_syntax,)), (MR_STORAGE, (transfer_syntax,))]
    )
    return rq, associate_ac(rq)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def a_study_stream(transfer_syntax: str) -> bytes:
    """What a storescu sends: echo, 3 CT + 1 MR of study A (patient P1), 2 CT of study B (patient P2)."""
    pdus = echo_rq(1)
    n = 1
    for study, patient, issuer, sop_class, count in (
        ("1.2.826.0.1.1", "P1", "HOSP-A", CT_STORAGE, 3),
        ("1.2.826.0.1.1", "P1", "HOSP-A", MR_STORAGE, 1),
        ("1.2.826.0.1.2", "P2", "", CT_STORAGE, 2),
    ):
        for i in range(count):
            n += 1
            context = 3 if sop_class == CT_STORAGE else 5
            pdus += store(
                data_set(study, patient, issuer, sop_class=sop_class, pixels=4096 + 256 * i),
                transfer_syntax,
                context,
                n,
            )
    return b"".join(pdus)


EXPECTED = [
    {
        "sent_by": "calling",
        "study_uid": "1.2.826.0.1.1",
        "patient_id": "P1",
        "patient_id_issuer": "HOSP-A",
        "instances": 4,
        "sop_classes": {CT_STORAGE: 3, MR_STORAGE: 1},
    },
    {
        "sent_by": "calling",
        "study_uid": "1.2.826.0.1.2",
        "patient_id": "P2",
        "patient_id_issuer": "",
        "instances": 2,
        "sop_classes": {CT_STORAGE: 2},
    },
]


@pytest.mark.parametrize("transfer_syntax", [IMPLICIT_LE, EXPLICIT_LE, BIG_ENDIAN, DEFLATED])
def test_studies_patients_and_sop_classes_in_every_transfer_syntax(transfer_syntax: str) -> None:
    rq, ac = negotiated(transfer_syntax)
    tap = StudyTap.from_associate(rq, ac)
    tap.feed(Side.REQUESTOR, rq)  # control PDUs are skipped
    tap.feed(Side.REQUESTOR, a_study_stream(transfer_syntax))
    tap.feed(Side.ACCEPTOR, ac + b"".join(store_rsp(3, 2)))
    assert tap.summary() == EXPECTED
    assert tap.unreadable == 0 and tap.broken == []


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=40), explicit=st.booleans())
def test_any_split_gives_the_same_summary(cuts: list[int], explicit: bool) -> None:
    transfer_syntax = EXPLICIT_LE if explicit else IMPLICIT_LE
    rq, ac = negotiated(transfer_syntax)
    stream = a_study_stream(transfer_syntax)
    tap = StudyTap.from_associate(rq, ac)
    for chunk in chunks(stream, cuts):
        tap.feed(Side.REQUESTOR, chunk)
    assert tap.summary() == EXPECTED


def test_move_sub_association_records_the_originator_and_the_acceptor_side() -> None:
    """C-GET style: the acceptor sends C-STORE-RQs; a C-MOVE sub-association names the originator."""
    rq, ac = negotiated(EXPLICIT_LE)
    tap = StudyTap.from_associate(rq, ac)
    tap.feed(Side.ACCEPTOR, b"".join(store(data_set("1.2.3", "PX"), EXPLICIT_LE, 3, 1, originator="WS_A")))
    (study,) = tap.summary()
    assert study["sent_by"] == "called" and study["move_originators"] == ["WS_A"]


def test_memory_and_study_count_are_bounded() -> None:
    rq, ac = negotiated(EXPLICIT_LE)
    tap = StudyTap.from_associate(rq, ac, max_studies=2, max_prefix=4096)
    # A data set whose study UID sits behind 8 KiB of other data: past the prefix cap, not readable.
    padded = data_set("1.2.9", "P9")
    padded.add_new(0x00091010, "OB", b"\0" * 8192)
    padded.add_new(0x00090010, "LO", "PRIVATE")
    stream = b"".join(store(padded, EXPLICIT_LE, 3, 1))
    for i in range(4):
        stream += b"".join(store(data_set(f"1.2.{i}", "P"), EXPLICIT_LE, 3, i + 2))
    tap.feed(Side.REQUESTOR, stream)
    assert [s["study_uid"] for s in tap.summary()] == ["1.2.0", "1.2.1"]
    assert tap.studies_dropped == 2 and tap.unreadable == 1
    assert all(len(d.prefix) == 0 and len(d.command) == 0 for d in tap._directions.values())


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x01\x03\x03",  # PDV longer than PDU
        b"\x04\x00\x00\x00\x00\x00",  # empty PDU
        b"\x04\x00\x00\x00\x00\x08\x00\x00\x00\x02\x03\x03\x00\x00\x00\x00",
    ],
)
def test_broken_framing_stops_the_tap_without_raising(garbage: bytes) -> None:
    tap = StudyTap({3: (CT_STORAGE, EXPLICIT_LE)})
    tap.feed(Side.REQUESTOR, garbage)
    tap.feed(Side.REQUESTOR, b"".join(store(data_set("1.2", "P"), EXPLICIT_LE, 3, 1)))
    assert tap.summary() == [] or tap.broken == []


def test_hostile_command_set_is_counted_not_raised() -> None:
    tap = StudyTap({3: (CT_STORAGE, EXPLICIT_LE)})
    pdv = b"\x03\x03" + b"\xff" * 40  # a "command" that is no data set, last fragment
    pdu = b"\x04\x00" + (len(pdv) + 4).to_bytes(4, "big") + len(pdv).to_bytes(4, "big") + pdv
    tap.feed(Side.REQUESTOR, pdu)
    assert tap.unreadable == 1 and tap.summary() == []


def test_read_prefix_stops_after_the_study_uid() -> None:
    raw = encode(data_set("1.2.5", "P5", "ISS"), EXPLICIT_LE)
    study_at = raw.index(b"\x20\x00\x0d\x00")  # (0020,000D), explicit VR little endian
    for cut in (study_at + 8 + 6, study_at + 8 + 6 + 5, len(raw) // 2):  # the series and pixels never needed
        assert read_prefix(raw[:cut], EXPLICIT_LE) == ("1.2.5", "P5", "ISS"), cut
    assert read_prefix(raw[: study_at + 3], EXPLICIT_LE)[0] == ""  # cut before it: no study


def test_the_message_names_study_and_patient_and_validates() -> None:
    rq, ac = negotiated(IMPLICIT_LE)
    tap = StudyTap.from_associate(rq, ac)
    tap.feed(Side.REQUESTOR, a_study_stream(IMPLICIT_LE))
    (message,) = tap.messages(
        source_id="hospital-a",
        calling=dicom_audit.Participant("STORESCU", True, ae_titles=("STORESCU",)),
        called=dicom_audit.Participant("PACS_B", ae_titles=("PACS_B",)),
        relay=dicom_audit.Participant("relay-router@hospital-a"),
        site="hospital-a",
    )
    doc = etree.fromstring(dicom_audit.to_bytes(message))
    assert SCHEMA.validate(doc), SCHEMA.error_log
    ids = [p.get("ParticipantObjectID") for p in doc.findall("ParticipantObjectIdentification")]
    assert ids == ["1.2.826.0.1.1", "1.2.826.0.1.2", "P1^^^HOSP-A", "P2"]


def test_contexts_are_learnt_from_the_associate_pdus_in_the_stream() -> None:
    """The hook in the relay feeds every byte: RQ and AC included, so the tap needs no other input."""
    rq, ac = negotiated(BIG_ENDIAN)
    tap = StudyTap()
    tap.feed(Side.REQUESTOR, rq[:7])
    tap.feed(Side.ACCEPTOR, ac)
    tap.feed(Side.REQUESTOR, rq[7:] + a_study_stream(BIG_ENDIAN))
    assert tap.contexts[3] == (CT_STORAGE, BIG_ENDIAN)
    assert tap.summary() == EXPECTED


def test_c_find_identifiers_are_kept_for_query_messages() -> None:
    from pynetdicom.dimse_messages import C_FIND_RQ
    from pynetdicom.dimse_primitives import C_FIND

    find_model = "1.2.840.10008.5.1.4.1.2.2.1"
    rq = associate_rq(contexts=[(find_model, (EXPLICIT_LE,))])
    tap = StudyTap.from_associate(rq, associate_ac(rq), max_queries=1)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = "PAT-Q"
    identifier.StudyInstanceUID = ""
    for message_id in (1, 2):  # the second is over max_queries: counted, not kept
        prim = C_FIND()
        prim.MessageID = message_id
        prim.AffectedSOPClassUID = find_model
        prim.Priority = 0
        prim.Identifier = BytesIO(encode(identifier, EXPLICIT_LE))
        msg = C_FIND_RQ()
        msg.primitive_to_message(prim)
        tap.feed(Side.REQUESTOR, b"".join(_dimse_pdus(msg, 1, 64)))  # fragmented in small PDUs
    (query,) = tap.queries
    assert query["sop_class"] == find_model and query["transfer_syntax"] == EXPLICIT_LE
    assert base64.b64decode(query["identifier"]) == encode(identifier, EXPLICIT_LE)
    assert tap.queries_dropped == 1 and tap.summary() == []
    record = {"event": "association", "outcome": "success", "calling_ae": "WS", "called_ae": "PACS", "queries": [query]}
    (message,) = dicom_audit.from_record(record, source_id="hospital-a")
    doc = etree.fromstring(dicom_audit.to_bytes(message))
    assert SCHEMA.validate(doc), SCHEMA.error_log
    assert doc.find("EventIdentification/EventID").get("csd-code") == "110112"
    assert base64.b64decode(doc.find("ParticipantObjectIdentification/ParticipantObjectQuery").text) == encode(
        identifier, EXPLICIT_LE
    )


@settings(max_examples=200, deadline=None)
@given(
    garbage=st.binary(max_size=2048),
    at=st.integers(min_value=0, max_value=1 << 16),
    requestor=st.booleans(),
)
def test_hostile_bytes_never_raise_and_stay_bounded(garbage: bytes, at: int, requestor: bool) -> None:
    """Random bytes spliced into a real stream: the tap never raises into the relay and keeps its bounds."""
    stream = a_study_stream(EXPLICIT_LE)
    cut = at % (len(stream) + 1)
    tap = StudyTap({3: (CT_STORAGE, EXPLICIT_LE), 5: (MR_STORAGE, EXPLICIT_LE)}, max_prefix=4096, max_studies=3)
    side = Side.REQUESTOR if requestor else Side.ACCEPTOR
    tap.feed(side, stream[:cut] + garbage + stream[cut:])
    assert len(tap.studies) <= 3
    for direction in tap._directions.values():
        assert len(direction.prefix) <= max(4096, tap.max_query) and len(direction.command) <= tap.max_command
        assert direction.associate is None or len(direction.associate) <= 256 * 1024
