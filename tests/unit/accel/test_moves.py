"""Accelerated retrieval (relay_router.accel.moves): the held final C-MOVE-RSP and its true counts."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from relay_router.accel import records
from relay_router.accel.moves import (
    MoveKey,
    MoveRegistry,
    PartnerSenders,
    Tally,
    final_counts,
    move_fields,
    partner_originator,
    rewrite_final,
)
from relay_router.accel.records import RecordError, RecordReader
from relay_router.config import RemoteDevice
from relay_router.dimse import CommandReceived, DatasetChunk, DatasetComplete, DimseReceiver, DimseSender, c_move_rsp

MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # Study Root Query/Retrieve Information Model - MOVE
EXPLICIT = "1.2.840.10008.1.2.1"
CONTEXTS = {1: (MOVE, EXPLICIT)}
KEY = MoveKey("hospital-b", "MOVER_A", 7)
CT = "1.2.840.10008.5.1.4.1.1.2"


def registry(hold_max_s: float = 30.0, **kwargs: object) -> MoveRegistry:
    return MoveRegistry(hold_max_s, **kwargs)  # type: ignore[arg-type]


def c_move_rq(message_id: int, destination: str) -> Dataset:
    command = Dataset()
    command.AffectedSOPClassUID = MOVE
    command.CommandField = 0x0021
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0001
    command.MoveDestination = destination
    return command


def encoded(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()


def request_pdus(message_id: int, destination: str) -> bytes:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.3"
    return b"".join(DimseSender(16384).message(1, c_move_rq(message_id, destination), encoded(identifier)))


def response_pdus(message_id: int, status: int, **counts: int) -> bytes:
    return b"".join(DimseSender(16384).message(1, c_move_rsp(message_id, MOVE, status, **counts)))


def decoded(data: bytes) -> list[tuple[Dataset, Dataset | None]]:
    from io import BytesIO

    from pydicom.filereader import read_dataset

    receiver = DimseReceiver(CONTEXTS)
    out: list[tuple[Dataset, Dataset | None]] = []
    body = bytearray()
    for event in receiver.feed(data):
        if isinstance(event, CommandReceived):
            out.append((event.command, None))
            body.clear()
        elif isinstance(event, DatasetChunk):
            body += event.data
        elif isinstance(event, DatasetComplete):
            out[-1] = (out[-1][0], read_dataset(BytesIO(bytes(body)), False, True))
    return out


def uid_list(identifier: Dataset | None) -> list[str]:
    assert identifier is not None, "no identifier with a Failed SOP Instance UID List"
    value = identifier.FailedSOPInstanceUIDList
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


# -- the counts (pure) -------------------------------------------------------------------------


def test_final_counts_sort_statuses_and_report_the_unconfirmed_as_failed() -> None:
    results = {"1.1": 0x0000, "1.2": 0x0111, "1.3": 0xB007, "1.4": 0x0122}
    tally = final_counts(6, results, ["1.1", "1.2", "1.3", "1.4", "1.5"])
    assert (tally.completed, tally.warning, tally.failed, tally.unconfirmed) == (2, 1, 3, 2)
    assert tally.failed_uids == ("1.4", "1.5")  # 1.5 arrived but has no outcome; the sixth never arrived


def test_final_counts_never_count_more_than_the_archive_sent() -> None:
    tally = final_counts(2, {"1.1": 0, "1.2": 0, "1.3": 0}, [])
    assert (tally.completed, tally.failed) == (2, 0)


@pytest.mark.parametrize(
    ("archive_status", "archive_failed", "tally", "status", "failed"),
    [
        (0x0000, 0, Tally(3, 0, 0, (), 0), 0x0000, 0),
        (0x0000, 0, Tally(2, 0, 1, ("1.9",), 0), 0xB000, 1),  # PS3.4 C.4.2.3.1: some failed
        (0x0000, 0, Tally(0, 0, 3, ("1.7", "1.8", "1.9"), 3), 0xA702, 3),  # every one failed
        (0xB000, 1, Tally(2, 0, 0, (), 0), 0xB000, 1),  # the archive's own failure stays counted
        (0x0000, 0, Tally(2, 1, 0, (), 0), 0xB000, 0),  # a warning from the destination
        (0xFE00, 0, Tally(1, 0, 1, ("1.9",), 1), 0xFE00, 1),  # cancelled: status kept, counts true
    ],
)
def test_the_final_status_follows_ps3_4(
    archive_status: int, archive_failed: int, tally: Tally, status: int, failed: int
) -> None:
    command = c_move_rsp(7, MOVE, archive_status, completed=3, failed=archive_failed)
    answer = rewrite_final(command, archive_status, archive_failed, tally, None)
    assert answer.status == status and int(answer.command.Status) == status
    assert int(answer.command.NumberOfFailedSuboperations) == failed
    assert int(answer.command.NumberOfCompletedSuboperations) == tally.completed
    assert int(answer.command.MessageIDBeingRespondedTo) == 7
    if tally.failed_uids and status != 0x0000:
        assert answer.identifier is not None
        assert uid_list(answer.identifier) == list(tally.failed_uids)
        assert int(answer.command.CommandDataSetType) != 0x0101
    else:
        assert answer.identifier is None


def test_the_archives_failed_list_is_kept_and_extended() -> None:
    original = Dataset()
    original.FailedSOPInstanceUIDList = ["1.1"]
    answer = rewrite_final(
        c_move_rsp(7, MOVE, 0xB000, completed=2, failed=1), 0xB000, 1, Tally(1, 0, 1, ("1.2",), 0), original
    )
    assert uid_list(answer.identifier) == ["1.1", "1.2"]


# -- the registry ------------------------------------------------------------------------------


def test_a_second_move_with_the_same_key_or_beyond_the_limit_is_not_held() -> None:
    moves = registry(max_moves=2)
    assert moves.begin(KEY, "WS_A")
    assert not moves.begin(KEY, "WS_A")
    assert moves.begin(MoveKey("hospital-b", "MOVER_A", 8), "WS_A")
    assert not moves.begin(MoveKey("hospital-b", "MOVER_A", 9), "WS_A")
    moves.end(KEY)
    assert moves.begin(MoveKey("hospital-b", "MOVER_A", 9), "WS_A")


async def test_settle_waits_for_outcomes_from_the_delivery_threads() -> None:
    moves = registry()
    moves.start(asyncio.get_running_loop())
    assert moves.begin(KEY, "WS_A")
    for uid in ("1.1", "1.2"):
        moves.arrived(KEY, uid)
    moves.finished(MoveKey("hospital-c", "MOVER_A", 7), "1.1", 0)  # another site's move: not this one
    settling = asyncio.create_task(moves.settle(KEY, 2))
    await asyncio.sleep(0.05)
    assert not settling.done()
    worker = threading.Thread(target=lambda: (moves.finished(KEY, "1.1", 0), moves.finished(KEY, "1.2", 0x0122)))
    worker.start()
    tally = await asyncio.wait_for(settling, 5)
    worker.join()
    assert (tally.completed, tally.failed, tally.failed_uids, tally.unconfirmed) == (1, 1, ("1.2",), 0)


async def test_settle_gives_up_at_the_ceiling_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    moves = registry(hold_max_s=0.3)
    moves.start(asyncio.get_running_loop())
    moves.begin(KEY, "WS_A")
    moves.arrived(KEY, "1.1")
    tally = await asyncio.wait_for(moves.settle(KEY, 3), 5)
    assert (tally.completed, tally.failed, tally.unconfirmed, tally.failed_uids) == (0, 3, 3, ("1.1",))
    assert "not confirmed by WS_A within move_hold_max_s" in caplog.text
    assert moves.status()["timed_out"] == 1


# -- the watch on the association ----------------------------------------------------------------


def watch(moves: MoveRegistry):  # type: ignore[no-untyped-def]
    w = moves.watch("hospital-b", "MOVER_A", lambda title: "WS_A" if title == "WS_A" else None)
    w.contexts = lambda: CONTEXTS
    w.max_pdu = lambda: 16384
    return w


async def test_pending_responses_pass_as_they_are_and_the_final_one_waits_for_delivery() -> None:
    moves = registry()
    moves.start(asyncio.get_running_loop())
    w = watch(moves)
    w.leaving(request_pdus(7, "WS_A"))
    assert moves.in_flight() == 1
    pending = response_pdus(7, 0xFF00, completed=1, remaining=1)
    assert await w.arriving(pending) == pending  # byte for byte
    final = asyncio.create_task(w.arriving(response_pdus(7, 0x0000, completed=2)))
    moves.arrived(KEY, "1.1")
    moves.finished(KEY, "1.1", 0x0000)
    await asyncio.sleep(0.05)
    assert not final.done(), "the final response went before the second image had its outcome"
    moves.finished(KEY, "1.2", 0xA900)
    ((command, identifier),) = decoded(await asyncio.wait_for(final, 5))
    assert int(command.Status) == 0xB000
    assert (int(command.NumberOfCompletedSuboperations), int(command.NumberOfFailedSuboperations)) == (1, 1)
    assert uid_list(identifier) == ["1.2"]
    assert moves.in_flight() == 0


async def test_other_destinations_and_other_messages_are_not_touched() -> None:
    moves = registry()
    moves.start(asyncio.get_running_loop())
    w = watch(moves)
    w.leaving(request_pdus(3, "ELSEWHERE"))
    assert moves.in_flight() == 0
    final = response_pdus(3, 0x0000, completed=4)
    assert await w.arriving(final) == final


async def test_a_final_response_split_anywhere_is_still_held_and_rewritten() -> None:
    moves = registry()
    moves.start(asyncio.get_running_loop())
    w = watch(moves)
    w.leaving(request_pdus(7, "WS_A"))
    moves.finished(KEY, "1.1", 0x0000)
    data = response_pdus(7, 0x0000, completed=1)
    out = b""
    for start in range(0, len(data), 5):
        out += await w.arriving(data[start : start + 5])
    ((command, _),) = decoded(out)
    assert (int(command.Status), int(command.NumberOfCompletedSuboperations)) == (0, 1)


async def test_the_association_ending_forgets_its_moves() -> None:
    moves = registry()
    w = watch(moves)
    w.leaving(request_pdus(7, "WS_A"))
    w.close()
    assert moves.in_flight() == 0


# -- titles and records --------------------------------------------------------------------------


def test_the_near_router_names_the_originator_in_the_far_sites_titles() -> None:
    from types import SimpleNamespace

    config = SimpleNamespace(
        remote=[RemoteDevice("A_MOVER", "hospital-a", "MOVER_A"), RemoteDevice("WS_A", "hospital-a")]
    )
    assert partner_originator(config, "hospital-a", "A_MOVER") == "MOVER_A"  # type: ignore[arg-type]
    assert partner_originator(config, "hospital-a", "WS_A") == "WS_A"  # type: ignore[arg-type]
    assert partner_originator(config, "hospital-c", "A_MOVER") == "A_MOVER"  # type: ignore[arg-type]
    assert partner_originator(config, "hospital-a", "LOCAL_WS") == "LOCAL_WS"  # type: ignore[arg-type]


def test_move_fields_come_in_pairs() -> None:
    assert move_fields({"move_originator_ae": "MOVER_A", "move_originator_id": "7"}) == ("MOVER_A", 7)
    assert move_fields({"move_originator_ae": "MOVER_A"}) == (None, None)
    assert move_fields({"move_originator_ae": "MOVER_A", "move_originator_id": "70000"}) == (None, None)
    assert move_fields({}) == (None, None)


def test_an_instance_record_carries_its_move() -> None:
    header = records.InstanceHeader("0005f1a2b3c4d5e6-0123456789ab", CT, "1.2.3", EXPLICIT, 10, "MOVER_A", 7)
    (got,) = RecordReader(records.NEAR_TO_FAR).feed(records.instance(header))
    assert got == header


@pytest.mark.parametrize(
    "fields",
    [
        {"move_originator_ae": "MOVER_A"},
        {"move_originator_ae": "X" * 17, "move_originator_id": 1},
        {"move_originator_ae": "BAD\\AE", "move_originator_id": 1},
        {"move_originator_ae": "MOVER\n", "move_originator_id": 1},
        {"move_originator_ae": "MOVER_A", "move_originator_id": 0},
        {"move_originator_ae": "MOVER_A", "move_originator_id": True},
    ],
)
def test_a_hostile_move_originator_is_refused(fields: dict[str, object]) -> None:
    import json

    body = {"id": "0005f1a2b3c4d5e6-0123456789ab", "sop_class": CT, "sop_instance": "1.2.3"}
    body |= {"transfer_syntax": EXPLICIT, "length": 10, **fields}
    data = json.dumps(body).encode()
    with pytest.raises(RecordError, match="move_originator"):
        RecordReader(records.NEAR_TO_FAR).feed(
            bytes([records.RecordType.INSTANCE]) + len(data).to_bytes(4, "big") + data
        )


def test_partner_senders_are_remembered_across_restarts_with_their_titles(tmp_path: Path) -> None:
    path = tmp_path / "accel" / "move-partners.json"
    seen = PartnerSenders(path)
    assert seen.device_for("hospital-b", "WS_A") is None
    seen.add("hospital-b", "WS_A")
    seen.add("hospital-b", "PICKY_A", "PICKY_X")  # site B exposes PICKY_A as PICKY_X: the Move Destination there
    again = PartnerSenders(path)
    assert again.device_for("hospital-b", "WS_A") == "WS_A"
    assert again.device_for("hospital-b", "PICKY_X") == "PICKY_A"
    assert again.device_for("hospital-b", "PICKY_A") is None
    assert again.device_for("hospital-c", "WS_A") is None
    assert path.stat().st_mode & 0o077 == 0
    path.write_text("{not json")
    assert PartnerSenders(path).device_for("hospital-b", "WS_A") is None  # unreadable: held again once seen


async def test_while_the_final_response_is_held_the_requester_gets_pending_ones_in_order() -> None:
    moves = registry()
    moves.start(asyncio.get_running_loop())
    w = watch(moves)
    sent: list[bytes] = []

    async def send_local(data: bytes) -> None:
        sent.append(data)

    w.send_local = send_local
    w.pending_every_s = 0.05
    w.leaving(request_pdus(7, "WS_A"))
    last_pending = response_pdus(7, 0xFF00, completed=3, remaining=0)
    final = asyncio.create_task(w.arriving(last_pending + response_pdus(7, 0x0000, completed=3)))
    await asyncio.sleep(0.02)
    assert sent == [last_pending], "what came before the held response did not go first"
    moves.finished(KEY, "1.1", 0x0000)
    await asyncio.sleep(0.2)
    progress = [command for data in sent[1:] for command, _ in decoded(data)]
    assert progress and all(int(c.Status) == 0xFF00 for c in progress)
    assert (int(progress[-1].NumberOfCompletedSuboperations), int(progress[-1].NumberOfRemainingSuboperations)) == (
        1,
        2,
    )
    moves.finished(KEY, "1.2", 0x0000)
    moves.finished(KEY, "1.3", 0x0000)
    ((command, _),) = decoded(await asyncio.wait_for(final, 5))
    assert (int(command.Status), int(command.NumberOfCompletedSuboperations)) == (0x0000, 3)


async def test_an_association_without_a_move_context_is_not_followed() -> None:
    moves = registry()
    w = moves.watch("hospital-b", "MOVER_A", lambda title: title)
    w.contexts = lambda: {1: (CT, EXPLICIT)}
    w.leaving(b"\x04\x00\x00\x00\x00\x08garbage!")  # not even parsed
    assert moves.in_flight() == 0
    assert await w.arriving(b"anything") == b"anything"


async def test_a_final_response_that_cannot_be_rewritten_still_reaches_the_requester(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from relay_router.accel import moves as moves_module

    def broken(*_: object) -> None:
        raise ValueError("odd archive")

    monkeypatch.setattr(moves_module, "rewrite_final", broken)
    moves = registry()
    moves.start(asyncio.get_running_loop())
    w = watch(moves)
    w.leaving(request_pdus(7, "WS_A"))
    moves.finished(KEY, "1.1", 0x0000)
    final = response_pdus(7, 0x0000, completed=1)
    assert await asyncio.wait_for(w.arriving(final), 5) == final
    assert moves.in_flight() == 0


async def test_sub_operations_relayed_transparently_end_the_hold_with_the_archives_answer() -> None:
    moves = registry()
    moves.start(asyncio.get_running_loop())
    w = watch(moves)
    w.leaving(request_pdus(7, "WS_A"))
    final = response_pdus(7, 0x0000, completed=2)
    releasing = asyncio.create_task(w.arriving(final))
    await asyncio.sleep(0.05)
    assert not releasing.done()
    moves.transparent_seen("hospital-c", "WS_A")  # another site: no effect
    moves.transparent_seen("hospital-b", "OTHER")  # another device: no effect
    await asyncio.sleep(0.05)
    assert not releasing.done()
    moves.transparent_seen("hospital-b", "WS_A")
    assert await asyncio.wait_for(releasing, 5) == final  # the destination answered the archive itself


def test_a_partner_relaying_transparently_is_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "move-partners.json"
    seen = PartnerSenders(path)
    seen.add("hospital-b", "WS_A", "WS_X")
    seen.add("hospital-b", "PICKY_A")
    seen.discard("hospital-b", "WS_A")
    assert PartnerSenders(path).device_for("hospital-b", "WS_X") is None
    assert PartnerSenders(path).device_for("hospital-b", "PICKY_A") == "PICKY_A"


def test_hello_says_whether_sub_operations_name_their_move() -> None:
    import json

    (new,) = RecordReader(records.NEAR_TO_FAR).feed(records.hello(capabilities=False, title="WS_X"))
    assert new == records.Hello(False, moves=True, title="WS_X")
    body = json.dumps({"version": 1, "capabilities": True}).encode()  # a router from before accelerated retrieval
    (old,) = RecordReader(records.NEAR_TO_FAR).feed(
        bytes([records.RecordType.HELLO]) + len(body).to_bytes(4, "big") + body
    )
    assert old == records.Hello(True, moves=False)


@pytest.mark.parametrize("title", ["", "X" * 17, "BAD\\AE", 7])
def test_a_hostile_hello_title_is_refused(title: object) -> None:
    import json

    body = json.dumps({"version": 1, "capabilities": True, "moves": True, "title": title}).encode()
    with pytest.raises(RecordError, match="title"):
        RecordReader(records.NEAR_TO_FAR).feed(bytes([records.RecordType.HELLO]) + len(body).to_bytes(4, "big") + body)


def _router_config(tmp_path: Path, *, accelerated_shared: bool, idle_timeout_s: float) -> object:
    from relay_common.config import parse_config
    from relay_router.config import RouterConfig

    doc = {
        "router": {"name": "hospital-a", "state_dir": str(tmp_path / "state")},
        "bridge": {"address": "bridge:443", "insecure": True, "password": "correct horse battery"},
        "dicom": {"listen": "127.0.0.1:0", "idle_timeout_s": idle_timeout_s},
        "shared": [
            {
                "ae_title": "WS_A",
                "host": "127.0.0.1",
                "port": 11112,
                "share_with": ["hospital-b"],
                "accelerate": accelerated_shared,
            }
        ],
    }
    return parse_config(doc, RouterConfig, base_dir=tmp_path)


def test_the_hold_ceiling_is_checked_against_the_idle_timeout_only_where_a_move_can_be_held(tmp_path: Path) -> None:
    """A router without accelerated shared devices keeps a short idle timeout (it did before moves were held);
    one that can hold a move must not let the idle timeout end the held association first."""
    from relay_common.config import ConfigError

    _router_config(tmp_path, accelerated_shared=False, idle_timeout_s=2.0)
    with pytest.raises(
        ConfigError, match=r"accelerate\.move_hold_max_s: must be below \[dicom\] idle_timeout_s \(120\)"
    ):
        _router_config(tmp_path, accelerated_shared=True, idle_timeout_s=120.0)


def test_a_late_sub_operation_of_an_earlier_move_with_the_same_key_does_not_count_for_the_next() -> None:
    """movescu sends Message ID 1 every time: the first move's hold ended with two images unconfirmed, and
    they reach WS_A while the next move (same originator and Message ID) waits for PICKY_A."""
    moves = registry()
    assert moves.begin(KEY, "PICKY_A")
    moves.arrived(KEY, "1.1", "WS_A")
    moves.finished(KEY, "1.1", 0x0000, "WS_A")
    moves.finished(KEY, "1.2", 0x0000, "WS_A")
    assert moves._moves[KEY].results == {} and moves._moves[KEY].arrived == set()
    moves.arrived(KEY, "2.1", "PICKY_A")
    moves.finished(KEY, "2.1", 0x0000, "PICKY_A")
    assert moves._moves[KEY].results == {"2.1": 0x0000}
