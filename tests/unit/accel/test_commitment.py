"""Storage commitment bookkeeping (relay_router.accel.commitment) on a real spool, without a network."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from relay_router.accel.commitment import (
    ActionStatus,
    CommitmentRefused,
    CommitmentService,
    Failure,
    decode_request,
    parse_request,
)
from relay_router.accel.spool import EntryState, Spool
from relay_router.config import AccelerateSection
from relay_router.dimse import encode_dataset
from tests.unit.accel.test_spool import CT, ROUTE, dataset_bytes

MR = "1.2.840.10008.5.1.4.1.1.4"
REQUESTER = "MODALITY"


def request(*pairs: tuple[str, str], transaction: str | None = None) -> Dataset:
    info = Dataset()
    info.TransactionUID = transaction or generate_uid()
    info.ReferencedSOPSequence = []
    for sop_class, sop_instance in pairs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        info.ReferencedSOPSequence.append(item)
    return info


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", max_bytes=16 << 20, fsync=False)
    yield s
    s.close()


def make_service(tmp_path: Path, spool: Spool, **section: object) -> CommitmentService:
    service = CommitmentService(tmp_path / "state", spool, AccelerateSection(**section), [ROUTE])  # type: ignore[arg-type]
    spool.on_change = service.spool_changed
    return service


def spooled(spool: Spool, uid: str) -> str:
    with spool.writer(ROUTE, sop_class_uid=CT, sop_instance_uid=uid, transfer_syntax="1.2.840.10008.1.2.1") as w:
        w.write(dataset_bytes(uid))
        return w.commit().id


def delivered(spool: Spool, entry_id: str) -> None:
    spool.set_state(entry_id, EntryState.DELIVERED)  # as the near transfer does on the far router's outcome
    spool.remove(entry_id)


def test_waits_until_every_instance_is_delivered(tmp_path: Path, spool: Spool) -> None:
    service = make_service(tmp_path, spool)
    a, b = generate_uid(), generate_uid()
    first, second = spooled(spool, a), spooled(spool, b)
    pending = service.accept(ROUTE, REQUESTER, request((CT, a), (CT, b)))
    delivered(spool, first)
    assert service.evaluate(pending, 0) is None  # b is acknowledged, not yet at the destination
    delivered(spool, second)
    answer = service.evaluate(pending, 0)
    assert answer is not None and answer.event_type == 1
    assert answer.committed == [(CT, a), (CT, b)] and not answer.failed


def test_dead_unknown_and_conflicting_instances_fail_with_their_reasons(tmp_path: Path, spool: Spool) -> None:
    service = make_service(tmp_path, spool)
    refused, busy, unknown, other_class = (generate_uid() for _ in range(4))
    spool.fail(spooled(spool, refused), "PACS answered 0x0122: SOP class not supported", permanent=True)
    spool.fail(spooled(spool, busy), "PACS answered 0xA700: out of resources", permanent=True)
    delivered(spool, spooled(spool, other_class))
    pending = service.accept(ROUTE, REQUESTER, request((CT, refused), (CT, busy), (CT, unknown), (MR, other_class)))
    answer = service.evaluate(pending, 0)
    assert answer is not None and answer.event_type == 2 and not answer.committed
    assert answer.failed == [
        (CT, refused, Failure.SOP_CLASS_NOT_SUPPORTED),
        (CT, busy, Failure.RESOURCE_LIMITATION),
        (CT, unknown, Failure.NO_SUCH_OBJECT_INSTANCE),
        (MR, other_class, Failure.CLASS_INSTANCE_CONFLICT),
    ]
    info = answer.event_information(pending.transaction_uid)
    assert [int(i.FailureReason) for i in info.FailedSOPSequence] == [0x0122, 0x0213, 0x0112, 0x0119]


def test_an_instance_never_confirmed_fails_after_the_timeout(tmp_path: Path, spool: Spool) -> None:
    service = make_service(tmp_path, spool, commitment_timeout_s=60)
    uid = generate_uid()
    spooled(spool, uid)
    pending = service.accept(ROUTE, REQUESTER, request((CT, uid)))
    assert service.evaluate(pending, pending.created + 30) is None
    answer = service.evaluate(pending, pending.created + 61)
    assert answer is not None and answer.failed == [(CT, uid, Failure.PROCESSING_FAILURE)]


def test_pending_requests_and_outcomes_survive_a_restart(tmp_path: Path, spool: Spool) -> None:
    service = make_service(tmp_path, spool)
    a, b = generate_uid(), generate_uid()
    delivered(spool, spooled(spool, a))  # delivered before the request came
    second = spooled(spool, b)
    pending = service.accept(ROUTE, REQUESTER, request((CT, a), (CT, b)))
    service.close()
    again = make_service(tmp_path, spool)
    assert list(again.pending) == [pending.key]
    restored = again.pending[pending.key]
    assert restored.instances == [(CT, a), (CT, b)] and restored.requester == REQUESTER
    delivered(spool, second)
    answer = again.evaluate(restored, 0)
    assert answer is not None and answer.committed == [(CT, a), (CT, b)]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the bad UID is the point
def test_requests_are_bounded_and_validated(tmp_path: Path, spool: Spool) -> None:
    service = make_service(tmp_path, spool, commitment_max_pending=1, commitment_max_instances=2)
    uid = generate_uid()
    service.accept(ROUTE, REQUESTER, request((CT, uid)))
    with pytest.raises(CommitmentRefused) as full:
        service.accept(ROUTE, REQUESTER, request((CT, uid)))
    assert full.value.status == ActionStatus.RESOURCE_LIMITATION
    with pytest.raises(CommitmentRefused) as many:
        parse_request(request(*((CT, generate_uid()) for _ in range(3))), 2)
    assert many.value.status == ActionStatus.RESOURCE_LIMITATION and "commitment_max_instances" in str(many.value)
    with pytest.raises(CommitmentRefused) as bad:
        parse_request(request((CT, "1.2.x")), 2)
    assert bad.value.status == ActionStatus.INVALID_ATTRIBUTE_VALUE and "item 1" in str(bad.value)
    no_transaction = request((CT, uid))
    del no_transaction.TransactionUID
    with pytest.raises(CommitmentRefused) as missing:
        parse_request(no_transaction, 2)
    assert missing.value.status == ActionStatus.MISSING_ATTRIBUTE
    for garbage in (b"\x08\x00\x95\x11\xff\xff\xff\x7f", b"\x08\x00\x99\x11\x10\x00\x00\x00garbage", b"\x08"):
        with pytest.raises(CommitmentRefused) as refused:  # pydicom reads leniently; the checks still refuse
            parse_request(decode_request(garbage, "1.2.840.10008.1.2"), 2)
        assert refused.value.status in (ActionStatus.INVALID_ATTRIBUTE_VALUE, ActionStatus.MISSING_ATTRIBUTE)


def test_decodes_what_a_requester_encodes(tmp_path: Path) -> None:
    uid = generate_uid()
    info = request((CT, uid), transaction="1.2.3.4")
    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        assert parse_request(decode_request(encode_dataset(info, syntax), syntax), 10) == ("1.2.3.4", [(CT, uid)])


async def test_the_report_goes_to_an_open_association_of_the_requester(tmp_path: Path, spool: Spool) -> None:
    service = make_service(tmp_path, spool)
    uid = generate_uid()
    entry = spooled(spool, uid)
    pending = service.accept(ROUTE, REQUESTER, request((CT, uid)))

    class Channel:
        requester, route = REQUESTER, ROUTE
        reports: list[tuple[Dataset, int]] = []

        async def event_report(self, info: Dataset, event_type: int) -> None:
            self.reports.append((info, event_type))

    channel = Channel()
    service.attach(channel)
    runner = asyncio.create_task(service.run())
    try:
        await asyncio.sleep(0.2)
        assert not channel.reports  # not delivered yet
        await asyncio.to_thread(delivered, spool, entry)
        for _ in range(50):
            if channel.reports:
                break
            await asyncio.sleep(0.05)
    finally:
        runner.cancel()
    [(info, event_type)] = channel.reports
    assert event_type == 1 and str(info.TransactionUID) == pending.transaction_uid
    assert not service.pending and not list((tmp_path / "state" / "commitment").glob("*.json"))


def test_the_commitment_context_is_accepted_only_where_commitment_is_served() -> None:
    from relay_router.accel.capabilities import DeviceCapabilities
    from relay_router.accel.negotiation import STORAGE_COMMITMENT_PUSH, answer
    from relay_router.ul import parse_associate
    from tests.unit.ul.builders import EXPLICIT_LE, IMPLICIT_LE, JPEG_BASELINE, associate_rq

    rq = associate_rq(
        "ARCHIVE_B",
        REQUESTER,
        [
            (CT, [EXPLICIT_LE]),
            (STORAGE_COMMITMENT_PUSH, [EXPLICIT_LE, IMPLICIT_LE]),
            (STORAGE_COMMITMENT_PUSH, [JPEG_BASELINE]),
        ],
    )
    caps = DeviceCapabilities({CT: (EXPLICIT_LE,)}, 0.0)
    served = answer(rq, parse_associate(rq), caps, granted=None, max_pdu_length=65536, commitment=True)
    assert served.contexts == {1: (CT, EXPLICIT_LE), 3: (STORAGE_COMMITMENT_PUSH, IMPLICIT_LE)}
    plain = answer(rq, parse_associate(rq), caps, granted=None, max_pdu_length=65536)
    assert plain.contexts == {1: (CT, EXPLICIT_LE)} and STORAGE_COMMITMENT_PUSH in plain.rejected


def test_an_instance_of_a_class_the_destination_does_not_take_fails_with_0122(tmp_path: Path, spool: Spool) -> None:
    service = CommitmentService(
        tmp_path / "state", spool, AccelerateSection(), [ROUTE], accepts=lambda route, sop_class: sop_class == CT
    )
    ct, mr = generate_uid(), generate_uid()
    pending = service.accept(ROUTE, REQUESTER, request((CT, ct), (MR, mr)))
    answer = service.evaluate(pending, 0)
    assert answer is not None
    assert answer.failed == [(CT, ct, Failure.NO_SUCH_OBJECT_INSTANCE), (MR, mr, Failure.SOP_CLASS_NOT_SUPPORTED)]


async def test_metrics_show_pending_requests_and_reports(tmp_path: Path, spool: Spool) -> None:
    from prometheus_client import CollectorRegistry

    service = make_service(tmp_path, spool)
    registry = CollectorRegistry()
    service.register_metrics(registry)
    uid = generate_uid()
    pending = service.accept(ROUTE, REQUESTER, request((CT, uid)))  # never received: fails 0x0112
    assert registry.get_sample_value("relay_router_accel_commitments_pending") == 1
    answer = service.evaluate(pending, 0)
    assert answer is not None
    service._answered(pending, answer, "in a test")
    assert registry.get_sample_value("relay_router_accel_commitments_pending") == 0
    assert registry.get_sample_value("relay_router_accel_commitment_reports_total", {"event": "failures"}) == 1


def test_relay_router_status_shows_pending_commitments() -> None:
    from relay_router.status import accelerated_route_lines

    route = {"connected": True, "capabilities_known": True, "in_flight": 0, "last_error": ""}
    report = {"accelerate": {"routes": {"PACS_B": route}, "commitment": {"pending": 2, "answered": 5}}}
    assert accelerated_route_lines(report)[-1] == "  storage commitment: 2 pending, 5 answered since start"


def test_the_outcome_ledger_is_bounded_private_and_compacted(tmp_path: Path) -> None:
    import stat

    from relay_router.accel.commitment import OutcomeLedger

    path = tmp_path / "outcomes.jsonl"
    ledger = OutcomeLedger(path, size=3)
    for n in range(8):
        ledger.record(ROUTE, f"1.2.{n}", CT, 0)
    assert ledger.get(ROUTE, "1.2.0") is None and ledger.get(ROUTE, "1.2.7") == (CT, 0)  # the newest 3 kept
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().splitlines()) <= 6  # rewritten past twice the size
    ledger.close()
    again = OutcomeLedger(path, size=3)
    assert [again.get(ROUTE, f"1.2.{n}") for n in (4, 5, 6, 7)] == [None, (CT, 0), (CT, 0), (CT, 0)]
    again.close()


async def test_a_channel_that_fails_is_dropped_and_role_reversal_delivers(tmp_path: Path, spool: Spool) -> None:
    """The open association does not answer: the report goes by role reversal to the configured address
    (a pynetdicom SCU listening); an address where nobody listens is retried later, the request kept."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

    from relay_router.config import CommitmentRequester
    from tests.support.ports import free_port

    received: list[tuple[str, int]] = []

    def on_report(event: object) -> tuple[int, None]:
        received.append((str(event.event_information.TransactionUID), int(event.event_type)))  # type: ignore[attr-defined]
        return 0x0000, None

    listener = AE(ae_title=REQUESTER)
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    requesters = [
        CommitmentRequester(REQUESTER, "127.0.0.1", server.server_address[1]),
        CommitmentRequester("NOBODY", "127.0.0.1", free_port()),
    ]
    service = make_service(tmp_path, spool, commitment_requester=requesters)

    class Broken:
        requester, route = REQUESTER, ROUTE

        async def event_report(self, info: Dataset, event_type: int) -> None:
            raise ConnectionError("no N-EVENT-REPORT-RSP within 10 s")

    broken = Broken()
    service.attach(broken)
    uid = generate_uid()
    delivered(spool, spooled(spool, uid))
    answered = service.accept(ROUTE, REQUESTER, request((CT, uid)))
    unreachable = service.accept(ROUTE, "NOBODY", request((CT, uid)))
    runner = asyncio.create_task(service.run())
    try:
        for _ in range(100):
            if received and unreachable.attempts:
                break
            await asyncio.sleep(0.05)
    finally:
        runner.cancel()
        server.shutdown()
    assert received == [(answered.transaction_uid, 1)]
    assert broken not in service.channels
    assert list(service.pending) == [unreachable.key]
    assert unreachable.attempts >= 1 and unreachable.next_attempt > unreachable.created
    assert "not established" in unreachable.last_error
    assert "NOBODY" in (tmp_path / "state" / "commitment" / f"{unreachable.key}.json").read_text()
