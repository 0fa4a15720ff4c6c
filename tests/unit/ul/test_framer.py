"""PduFramer: control PDU buffering, P-DATA streaming, PDV validation (PS3.8 9.3.1, 9.3.5, Annex E)."""

from __future__ import annotations

import pytest

from relay_router.ul import ControlPdu, PDataBytes, PduError, PduFramer, PduType, a_abort
from relay_router.ul.framer import FramerEvent
from tests.unit.ul import builders as B
from tests.unit.ul import fixtures as F

CMD_LAST, CMD_MORE, DATA_LAST, DATA_MORE = 0x03, 0x01, 0x02, 0x00


def merged(events: list[FramerEvent]) -> list[FramerEvent]:
    """Events with adjacent P-DATA runs joined (what is independent of feed boundaries)."""
    out: list[FramerEvent] = []
    for ev in events:
        if isinstance(ev, PDataBytes) and out and isinstance(out[-1], PDataBytes):
            out[-1] = PDataBytes(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def feed_bytewise(framer: PduFramer, data: bytes) -> list[FramerEvent]:
    events: list[FramerEvent] = []
    for i in range(len(data)):
        events += framer.feed(data[i : i + 1])
    return merged(events)


def test_control_pdus_are_buffered_whole() -> None:
    f = PduFramer()
    assert f.feed(F.ASSOCIATE_RQ[:50]) == []
    assert not f.at_pdu_boundary and f.buffered == 50
    events = f.feed(F.ASSOCIATE_RQ[50:] + F.RELEASE_RQ)
    assert events == [ControlPdu(PduType.ASSOCIATE_RQ, F.ASSOCIATE_RQ), ControlPdu(PduType.RELEASE_RQ, F.RELEASE_RQ)]
    assert f.at_pdu_boundary and f.buffered == 0 and f.pdus == 2
    assert f.bytes_in == len(F.ASSOCIATE_RQ) + len(F.RELEASE_RQ)


def test_pdata_is_coalesced_into_one_event_per_feed() -> None:
    pdus = B.store_rq(50_000)
    stream = b"".join(pdus)
    f = PduFramer()
    events = f.feed(stream)
    assert events == [PDataBytes(stream)]
    assert events[0].data is stream  # a whole bytes feed of P-DATA is passed on without a copy
    assert f.pdus == len(pdus) and f.at_pdu_boundary
    assert f.messages_completed == (1, 1)
    assert f.dataset_bytes == 0


def test_pdata_streams_without_buffering() -> None:
    stream = b"".join(B.store_rq(50_000))
    f = PduFramer()
    out = b""
    for i in range(0, len(stream), 1000):
        for ev in f.feed(stream[i : i + 1000]):
            assert isinstance(ev, PDataBytes)
            out += ev.data
        assert f.buffered < 6  # only a partial header is ever held
    assert out == stream


def test_control_between_pdata_keeps_order() -> None:
    echo = b"".join(B.echo_rq())
    f = PduFramer()
    events = f.feed(echo + echo + F.RELEASE_RQ + echo)
    assert events == [PDataBytes(echo + echo), ControlPdu(PduType.RELEASE_RQ, F.RELEASE_RQ), PDataBytes(echo)]


def test_bytewise_feed_equals_whole_feed() -> None:
    stream = F.ASSOCIATE_RQ + F.P_DATA_ECHO_RQ + b"".join(B.store_rq(3000, max_pdu=1024)) + F.RELEASE_RQ
    whole = PduFramer().feed(stream)
    bytewise = feed_bytewise(PduFramer(), stream)
    assert merged(whole) == bytewise


def test_split_headers_are_held_then_emitted() -> None:
    f = PduFramer()
    assert f.feed(F.P_DATA_ECHO_RQ[:3]) == []  # partial PDU header: held, not yet validated
    assert f.buffered == 3 and not f.at_pdu_boundary
    assert f.feed(F.P_DATA_ECHO_RQ[3:8]) == [PDataBytes(F.P_DATA_ECHO_RQ[:6])]  # PDV header partial: held
    assert f.feed(F.P_DATA_ECHO_RQ[8:20]) == [PDataBytes(F.P_DATA_ECHO_RQ[6:20])]
    assert f.feed(F.P_DATA_ECHO_RQ[20:]) == [PDataBytes(F.P_DATA_ECHO_RQ[20:])]
    assert f.at_pdu_boundary and f.commands_completed == 1


def test_message_counters_and_dataset_progress() -> None:
    f = PduFramer()
    f.feed(B.p_data(B.pdv(1, CMD_MORE, b"ab"), B.pdv(1, CMD_LAST, b"cd")))
    assert f.messages_completed == (1, 0)
    f.feed(B.p_data(B.pdv(1, DATA_MORE, b"x" * 100)))
    assert f.dataset_bytes == 100 and f.datasets_completed == 0
    f.feed(B.p_data(B.pdv(1, DATA_MORE, b"x" * 50), B.pdv(1, DATA_LAST, b"")))  # empty last fragment is fine
    assert f.messages_completed == (1, 1) and f.dataset_bytes == 0 and f.pdvs == 5


def test_control_header_bits_2_to_7_are_not_tested() -> None:
    f = PduFramer()
    f.feed(B.p_data(B.pdv(1, 0xFC | CMD_LAST, b"cmd")))  # PS3.8 E.2: never checked by the receiver
    assert f.commands_completed == 1


@pytest.mark.parametrize(
    ("data", "message", "reason"),
    [
        (b"\x08\x00\x00\x00\x00\x04", "PDU type 0x08 is not defined (PS3.8 9.3)", 1),
        (b"\x00", "PDU type 0x00 is not defined", 1),
        (F.HTTP_REQUEST, "PDU type 0x47 is not defined", 1),
        (B.pdu(0x05, bytes(5)), "A-RELEASE-RQ PDU-length is 5, PS3.8 9.3.6 fixes it at 4", 6),
        (B.pdu(0x07, bytes(0)), "A-ABORT PDU-length is 0", 6),
        (B.pdu(0x03, bytes(3)), "A-ASSOCIATE-RJ PDU-length is 3", 6),
        (B.pdu(0x01, bytes(10)), "A-ASSOCIATE-RQ PDU-length 10 is shorter than its 68 bytes", 6),
        (B.pdu(0x02, b"", length=0xFFFFFFFF), "A-ASSOCIATE-AC PDU-length 4294967295 exceeds the limit of 1048576", 6),
        (B.pdu(0x04, bytes(4)), "P-DATA-TF PDU-length 4 cannot hold a PDV item", 6),
        (B.p_data(B.pdv(1, 3, b"", length=1)), "PDV item length 1 is less than 2", 6),
        (B.p_data(B.pdv(1, 3, b"abc", length=6)), "PDV item length 6 exceeds the P-DATA-TF PDU (5 bytes left", 6),
        (B.p_data(B.pdv(1, 3, b"abc") + b"\x00" * 5), "leaves 5 bytes in the P-DATA-TF PDU", 6),
        (B.p_data(B.pdv(2, 3, b"abc")), "PDV presentation context ID 2 is not an odd integer 1-255", 6),
        (B.p_data(B.pdv(0, 3, b"abc")), "PDV presentation context ID 0 is not an odd integer", 6),
        (
            B.p_data(B.pdv(1, CMD_MORE, b"a"), B.pdv(1, DATA_LAST, b"b")),
            "PDV data set fragment while the command on presentation context 1 lacks its last fragment",
            6,
        ),
        (B.p_data(B.pdv(1, DATA_MORE, b"a"), B.pdv(1, CMD_LAST, b"b")), "PDV command fragment while the data set", 6),
        (
            B.p_data(B.pdv(1, DATA_MORE, b"a"), B.pdv(3, DATA_LAST, b"b")),
            "PDV fragment on presentation context 3 while the fragments on context 1",
            6,
        ),
    ],
)
def test_violations(data: bytes, message: str, reason: int) -> None:
    for feed in (lambda f: f.feed(data), lambda f: feed_bytewise(f, data)):
        f = PduFramer()
        with pytest.raises(PduError) as info:
            feed(f)
        assert message in info.value.detail
        assert info.value.abort_reason == reason
        with pytest.raises(PduError, match="stream already failed"):  # poisoned
            f.feed(F.RELEASE_RQ)
        assert f.failed == info.value.detail


def test_error_carries_events_decoded_before_it() -> None:
    echo = b"".join(B.echo_rq())
    f = PduFramer()
    with pytest.raises(PduError) as info:
        f.feed(F.RELEASE_RQ + echo + B.p_data(B.pdv(1, 3, b"ok"), B.pdv(2, 3, b"bad")))
    good_part = echo + B.p_data(B.pdv(1, 3, b"ok"), B.pdv(2, 3, b"bad"))[:14]
    assert info.value.events == [ControlPdu(PduType.RELEASE_RQ, F.RELEASE_RQ), PDataBytes(good_part)]


def test_max_pdata_length_is_enforced_once_set() -> None:
    f = PduFramer()
    big = B.p_data(B.pdv(1, DATA_LAST, bytes(20_000)))
    f.feed(big)
    f.max_pdata_length = 20_006
    f.feed(big)
    f.max_pdata_length = 16_384
    with pytest.raises(PduError, match="P-DATA-TF PDU-length 20006 exceeds the negotiated maximum of 16384"):
        f.feed(big)
    with pytest.raises(ValueError):
        PduFramer().max_pdata_length = -1
    with pytest.raises(ValueError):
        PduFramer(max_control_length=1 << 40)


def test_64k_control_pdu_within_and_beyond_limit() -> None:
    rq = B.big_rq(64 * 1024)
    f = PduFramer(max_control_length=64 * 1024 - 6)
    assert f.feed(rq) == [ControlPdu(PduType.ASSOCIATE_RQ, rq)]
    bigger = B.big_rq(64 * 1024 + 1)
    f = PduFramer(max_control_length=64 * 1024 - 6)
    with pytest.raises(PduError, match="PDU-length 65531 exceeds the limit of 65530 bytes"):
        f.feed(bigger[:6])  # refused from its header alone: nothing is buffered


def test_zero_length_feed_and_memoryview_input() -> None:
    f = PduFramer()
    assert f.feed(b"") == []
    events = f.feed(memoryview(bytearray(a_abort())))
    assert events == [ControlPdu(PduType.ABORT, a_abort())]
    assert isinstance(events[0].data, bytes)


def test_large_pdata_throughput_is_linear() -> None:
    """A 64 MiB stream of 16 KiB PDUs in 256 KiB feeds: one event per feed, no per-byte work."""
    import time

    one = B.p_data(B.pdv(1, DATA_MORE, bytes(16_378)))
    chunk = one * 16
    f = PduFramer(max_pdata_length=16_384)
    start = time.perf_counter()
    total = 0
    for _ in range(256):
        (ev,) = f.feed(chunk)
        total += len(ev.data)
    elapsed = time.perf_counter() - start
    assert total == 256 * len(chunk) and f.pdus == 256 * 16
    assert elapsed < 2.0, f"{total / elapsed / 1e6:.0f} MB/s"
