"""The far router's C-STORE sender, sans-IO: requests from templates, responses by the fast path, the
A-ASSOCIATE-RQ, and where a Part 10 file's data set starts. Each compared with pynetdicom/pydicom."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import dimse_messages, dimse_primitives
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.pdu import A_ASSOCIATE_RQ

from relay_router.dimse import DimseError, c_store_rsp, decode_command, encode_command
from relay_router.dimse.fast import StoreRequests, parse_store_rsp, store_answer
from relay_router.dimse.receiver import DimseReceiver
from relay_router.dimse.scu import associate_rq, dataset_offset, split_part10
from relay_router.dimse.sender import DimseSender
from relay_router.ul.associate import parse_associate

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"

uids = st.from_regex(r"\A[1-9][0-9]{0,8}(\.(0|[1-9][0-9]{0,8})){1,6}\Z").filter(lambda u: len(u) <= 64)
ae_titles = st.from_regex(r"\A[A-Z][A-Z0-9_]{0,15}\Z")


def pynetdicom_store_rq(
    message_id: int, sop_class: str, sop_instance: str, originator: str | None, originator_id: int | None
) -> bytes:
    """The command set pynetdicom's own Association.send_c_store puts on the wire (its DIMSE message classes)."""
    primitive = dimse_primitives.C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 0x0000
    if originator is not None:
        primitive.MoveOriginatorApplicationEntityTitle = originator
        primitive.MoveOriginatorMessageID = originator_id
    primitive.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    message = dimse_messages.C_STORE_RQ()
    message.primitive_to_message(primitive)
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return bytes(encoded)


@settings(max_examples=200, deadline=None)
@given(
    message_ids=st.lists(st.integers(1, 0xFFFF), min_size=1, max_size=4),
    sop_class=st.sampled_from([CT, MR, "1.2.840.10008.5.1.4.1.1.7"]),
    instances=st.lists(uids, min_size=4, max_size=4),
    originator=st.one_of(st.none(), ae_titles),
    originator_id=st.integers(0, 0xFFFF),
)
def test_requests_from_templates_are_byte_identical_to_pynetdicoms(
    message_ids: list[int], sop_class: str, instances: list[str], originator: str | None, originator_id: int
) -> None:
    requests = StoreRequests()  # one per association: the first builds the template, the later ones patch it
    for message_id, instance in zip(message_ids, instances, strict=False):
        ours = requests.request(
            message_id,
            sop_class,
            instance,
            move_originator_ae=originator,
            move_originator_message_id=originator_id if originator else None,
        )
        theirs = pynetdicom_store_rq(message_id, sop_class, instance, originator, originator_id if originator else None)
        assert ours == theirs


def test_a_request_with_an_originator_after_one_without_gets_its_own_template() -> None:
    requests = StoreRequests()
    requests.request(1, CT, "1.2.3.4")
    with_originator = requests.request(2, CT, "1.2.3.5", move_originator_ae="MOVER", move_originator_message_id=7)
    assert with_originator == pynetdicom_store_rq(2, CT, "1.2.3.5", "MOVER", 7)
    assert decode_command(with_originator).MoveOriginatorApplicationEntityTitle == "MOVER"


@settings(max_examples=200, deadline=None)
@given(
    message_id=st.integers(0, 0xFFFF),
    status=st.sampled_from([0x0000, 0xB000, 0xB007, 0x0111, 0xA700, 0xA900, 0xC000, 0x0122, 0x0110, 0xFE00]),
    instance=uids,
)
def test_the_fast_response_path_reads_what_pydicom_reads(message_id: int, status: int, instance: str) -> None:
    encoded = encode_command(c_store_rsp(message_id, CT, instance, status))
    fast = parse_store_rsp(encoded)
    assert fast is not None, "pynetdicom's common C-STORE-RSP takes the fast path"
    assert fast == store_answer(decode_command(encoded))
    assert (fast.command_field, fast.message_id_responded, fast.status) == (0x8001, message_id, status)


def test_a_response_with_an_error_comment_takes_the_general_path_and_keeps_the_comment() -> None:
    encoded = encode_command(c_store_rsp(5, CT, "1.2.3.4", 0xA700, error_comment="disk full"))
    assert parse_store_rsp(encoded) is None
    answer = store_answer(decode_command(encoded))
    assert (answer.message_id_responded, answer.status, answer.error_comment) == (5, 0xA700, "disk full")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:-2],  # truncated
        lambda b: b[:8] + (int.from_bytes(b[8:12], "little") + 2).to_bytes(4, "little") + b[12:],  # group length
        lambda b: b.replace(b"\x01\x80", b"\x01\x00", 1),  # not a C-STORE-RSP (Command Field 0x0001)
        lambda b: b + b"\x00\x00\x00\x09\x02\x00\x00\x00AB",  # an element out of order
        lambda b: b"\x02" + b[1:],  # not group 0000
    ],
)
def test_unusual_responses_are_left_to_the_general_path(mutate: object) -> None:
    encoded = encode_command(c_store_rsp(5, CT, "1.2.3.4", 0x0000))
    assert parse_store_rsp(mutate(encoded)) is None  # type: ignore[operator]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_crashes_the_fast_response_path(data: bytes) -> None:
    answer = parse_store_rsp(data)
    assert answer is None or answer.command_field == 0x8001


def test_a_response_lacking_its_status_is_a_clear_error() -> None:
    command = Dataset()
    command.CommandField = 0x8001
    command.MessageIDBeingRespondedTo = 3
    with pytest.raises(ValueError, match="Status"):
        store_answer(command)


def test_the_receiver_hands_a_response_over_without_pydicom_and_others_decoded() -> None:
    sender = DimseSender(16384)
    receiver = DimseReceiver({1: (CT, ExplicitVRLittleEndian)})
    common = encode_command(c_store_rsp(9, CT, "1.2.3.4", 0x0000))
    (event,) = receiver.feed(b"".join(sender.encoded_command(1, common)))
    assert event.answer is not None and event.answer.message_id_responded == 9  # type: ignore[union-attr]
    assert event.command_field == 0x8001  # type: ignore[union-attr]
    unusual = encode_command(c_store_rsp(10, CT, "1.2.3.4", 0xC000, error_comment="no"))
    (event,) = receiver.feed(b"".join(sender.encoded_command(1, unusual)))
    assert event.answer is None and store_answer(event.command).error_comment == "no"  # type: ignore[union-attr]


def test_the_associate_request_is_pynetdicoms_and_parses_back() -> None:
    contexts = [(1, CT, ExplicitVRLittleEndian), (3, MR, "1.2.840.10008.1.2")]
    encoded = associate_rq("ROUTER_B", "STORE", contexts, max_pdu_length=65536)
    info = parse_associate(encoded)
    assert (info.calling_ae, info.called_ae, info.max_pdu_length) == ("ROUTER_B", "STORE", 65536)
    assert [(pc.id, pc.abstract_syntax, pc.transfer_syntaxes) for pc in info.presentation_contexts] == [
        (1, CT, (ExplicitVRLittleEndian,)),
        (3, MR, ("1.2.840.10008.1.2",)),
    ]
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(encoded)
    assert decoded.encode() == encoded


def _part10(tmp_path: Path, *, group_length: bool = True) -> Path:
    dataset = Dataset()
    dataset.SOPClassUID = CT
    dataset.SOPInstanceUID = "1.2.3.4"
    dataset.PatientName = "Doe^John"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = CT
    dataset.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "x.dcm"
    dataset.save_as(path, enforce_file_format=True)
    if not group_length:  # an older writer's file: no File Meta Information Group Length first
        raw = path.read_bytes()
        path.write_bytes(raw[:132] + raw[144:])
    return path


@pytest.mark.parametrize("group_length", [True, False])
def test_the_data_set_offset_is_where_pynetdicom_finds_it(tmp_path: Path, group_length: bool) -> None:
    path = _part10(tmp_path, group_length=group_length)
    raw = path.read_bytes()
    _, expected = split_dataset(path)
    assert dataset_offset(raw) == expected
    assert split_part10(BytesIO(raw))[1] == expected


def test_a_file_that_is_not_part10_is_a_clear_error() -> None:
    with pytest.raises(DimseError, match="not a DICOM Part 10 file"):
        dataset_offset(b"\x00" * 200)
