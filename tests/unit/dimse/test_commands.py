"""Command helpers: what they build is what pynetdicom reads back (PS3.7 9.3, 10.3; PS3.4 J.3)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_MOVE_RSP, C_STORE_RQ, N_EVENT_REPORT_RQ
from pynetdicom.dsutils import decode

from relay_router.dimse import (
    STORAGE_COMMITMENT_PUSH,
    CommandField,
    DimseError,
    MessageIdAllocator,
    Status,
    Violation,
    c_echo_rsp,
    c_move_rsp,
    c_store_rq,
    c_store_rsp,
    commitment_event_information,
    decode_command,
    encode_command,
    encode_dataset,
    n_action_rsp,
    n_event_report_rq,
    parse_c_store_rq,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


def wire(command: Dataset) -> Dataset:
    """Encode, then decode as a receiver would."""
    return decode_command(encode_command(command))


def test_c_store_rq_round_trip_with_move_originator() -> None:
    command = wire(c_store_rq(7, CT, "1.2.3.4", priority=1, move_originator_ae="WS_A", move_originator_message_id=3))
    message = C_STORE_RQ()
    message.command_set = command
    primitive = message.message_to_primitive()
    assert (primitive.MessageID, primitive.AffectedSOPInstanceUID, primitive.Priority) == (7, "1.2.3.4", 1)
    assert (primitive.MoveOriginatorApplicationEntityTitle, primitive.MoveOriginatorMessageID) == ("WS_A", 3)
    assert command.CommandDataSetType != 0x0101
    request = parse_c_store_rq(command)
    assert (request.move_originator_ae, request.move_originator_message_id) == ("WS_A", 3)


def test_c_store_rsp_and_echo_rsp() -> None:
    rsp = wire(c_store_rsp(7, CT, "1.2.3.4", Status.OUT_OF_RESOURCES, error_comment="spool full"))
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8001, 7, 0xA700)
    assert rsp.ErrorComment == "spool full" and rsp.CommandDataSetType == 0x0101
    echo = wire(c_echo_rsp(5))
    assert (echo.CommandField, echo.MessageIDBeingRespondedTo, echo.Status) == (CommandField.C_ECHO_RSP, 5, 0)


def test_c_move_rsp_counts() -> None:
    final = wire(c_move_rsp(9, MOVE, Status.SUBOPS_FAILURES, completed=10, failed=2, warning=1))
    message = C_MOVE_RSP()
    message.command_set = final
    primitive = message.message_to_primitive()
    assert primitive.Status == 0xB000
    assert (primitive.NumberOfCompletedSuboperations, primitive.NumberOfFailedSuboperations) == (10, 2)
    assert primitive.NumberOfWarningSuboperations == 1
    assert "NumberOfRemainingSuboperations" not in final
    pending = wire(c_move_rsp(9, MOVE, Status.PENDING, completed=1, remaining=4))
    assert pending.NumberOfRemainingSuboperations == 4


def test_storage_commitment_report() -> None:
    command = wire(n_event_report_rq(11, 2))
    message = N_EVENT_REPORT_RQ()
    message.command_set = command
    primitive = message.message_to_primitive()
    assert primitive.EventTypeID == 2 and primitive.AffectedSOPClassUID == STORAGE_COMMITMENT_PUSH
    assert command.CommandDataSetType != 0x0101
    info = commitment_event_information("1.2.9", [(CT, "1.2.3")], [(CT, "1.2.4", 0x0110)])
    read = decode(__import__("io").BytesIO(encode_dataset(info, "1.2.840.10008.1.2.1")), False, True)
    assert read.TransactionUID == "1.2.9"
    assert read.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3"
    assert read.FailedSOPSequence[0].FailureReason == 0x0110
    assert wire(n_action_rsp(4)).CommandField == CommandField.N_ACTION_RSP


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: c_store_rq(70000, CT, "1.2"), "MessageID"),
        (lambda: c_store_rq(1, CT, "not a uid!"), "AffectedSOPInstanceUID"),
        (lambda: c_store_rq(1, CT, "1.2", move_originator_ae="WS"), "go together"),
        (lambda: c_store_rq(1, CT, "1.2", priority=5), "priority 5"),
        (lambda: c_move_rsp(1, MOVE, 0, completed=70000), "completed count"),
        (lambda: n_event_report_rq(1, 3), "event type 3"),
    ],
)
def test_builders_refuse_bad_values(build: object, words: str) -> None:
    with pytest.raises(DimseError, match=words) as caught:
        build()  # type: ignore[operator]
    assert caught.value.violation is Violation.BAD_ARGUMENT


def test_parse_refuses_other_commands_and_missing_fields() -> None:
    with pytest.raises(DimseError, match="not C-STORE-RQ") as caught:
        parse_c_store_rq(c_echo_rsp(1))
    assert caught.value.violation is Violation.BAD_COMMAND_FIELD
    command = c_store_rq(1, CT, "1.2")
    del command.AffectedSOPInstanceUID
    with pytest.raises(DimseError, match="lacks Affected SOP Instance UID"):
        parse_c_store_rq(command)
    command = c_store_rq(1, CT, "1.2", move_originator_ae="WS", move_originator_message_id=1)
    command.MoveOriginatorApplicationEntityTitle = "BAD\\TITLE"
    with pytest.raises(DimseError, match="not a valid AE title"):
        parse_c_store_rq(command)


def test_message_ids_wrap_and_skip_outstanding() -> None:
    ids = MessageIdAllocator(start=65534)
    assert [ids.allocate(), ids.allocate()] == [65534, 65535]
    first = ids.allocate()
    assert first == 1
    ids.release(65534)
    allocator = MessageIdAllocator(start=65535)
    assert allocator.allocate() == 65535
    for _ in range(65533):
        allocator.allocate()
    assert allocator.allocate() == 65534  # 1..65533 outstanding, 65535 too: only 65534 is left
    with pytest.raises(DimseError, match="outstanding"):
        allocator.allocate()
    allocator.release(100)
    assert allocator.allocate() == 100
