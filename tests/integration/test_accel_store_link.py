"""The far router's C-STORE sender (relay_router.accel.store_link) against real peers and hostile ones.

Real: a pynetdicom SCP receives the data set byte for byte (from memory and from a file) and its statuses
and error comments come back; DCMTK storescp receives far-side instances the spool holds in memory (no
spool file written for them), byte-identical. Hostile: a device that rejects, aborts mid-C-STORE, closes
the connection mid-send, answers another Message ID, or asks to release while idle: each is a clear
LinkRefused/LinkLost (the pool retries the entry), never a hang or a wrong outcome.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from relay_demo.datasets import fingerprint, fingerprints, generate_ct_series, write_series
from relay_router.accel import spool as spool_module
from relay_router.accel.delivery import DeliveryOutcome, DeliveryPool, Destination, Outcome
from relay_router.accel.spool import Spool
from relay_router.accel.store_link import LinkLost, LinkRefused, StoreLink, file_dataset
from relay_router.dimse import c_store_rsp, encode_command
from relay_router.dimse.sender import DimseSender
from relay_router.ul.associate import parse_associate
from relay_router.ul.pdu import a_abort, a_release_rq
from tests.integration.conftest import require_dcmtk
from tests.support.dcmtk import StorescpProcess
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(generate_ct_series(6, rows=64, cols=64, seed=21), tmp_path_factory.mktemp("link-ct"))


def _open(port: int, called: str = "DEST", timeout: float = 5.0) -> StoreLink:
    return StoreLink.open(
        "127.0.0.1",
        port,
        [(CT, EXPLICIT)],
        calling_ae="ROUTER_B",
        called_ae=called,
        connect_timeout=timeout,
        dimse_timeout=timeout,
    )


def _meta(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


# -- a real pynetdicom SCP ---------------------------------------------------------------------------


def test_data_sets_arrive_byte_for_byte_and_statuses_come_back(ct_files: list[Path]) -> None:
    received: dict[str, bytes] = {}
    answers = {1: 0x0000, 2: 0xB000, 3: 0xA700}

    def on_store(event: evt.Event) -> tuple[int, str] | int:
        uid = str(event.request.AffectedSOPInstanceUID)
        received[uid] = event.request.DataSet.getvalue()
        number = len(received)
        if answers[number] == 0xA700:
            status = pydicom.Dataset()
            status.Status = 0xA700
            status.ErrorComment = "disk full"
            return status  # type: ignore[return-value]
        return answers[number]

    ae = AE(ae_title="DEST")
    ae.add_supported_context(CTImageStorage, [EXPLICIT])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        link = _open(port)
        assert link.accepted == {(CT, EXPLICIT)}
        statuses = []
        for number, path in enumerate(ct_files[:3]):
            uid = str(_meta(path).SOPInstanceUID)
            source = file_dataset(path)
            if number != 1:  # from memory, as the far side sends what its spool holds
                raw = path.read_bytes()
                source = memoryview(raw)[source[1] :]  # type: ignore[assignment]
            answer = link.store(CT, EXPLICIT, uid, source)
            statuses.append((answer.status, answer.error_comment))
            assert link.usable()
        link.release()
        assert not link.usable()
    finally:
        server.shutdown()
    assert statuses == [(0x0000, ""), (0xB000, ""), (0xA700, "disk full")]
    for path in ct_files[:3]:
        _, offset = file_dataset(path)
        assert received[str(_meta(path).SOPInstanceUID)] == path.read_bytes()[offset:]


def test_a_device_that_is_not_listening_is_refused_clearly() -> None:
    with pytest.raises(LinkRefused, match="could not be reached"):
        _open(free_port(), timeout=2)


# -- hostile or broken devices -------------------------------------------------------------------------


def _accept(rq: bytes, *, max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-AC accepting every proposed context (pynetdicom's PDU classes)."""
    info = parse_associate(rq)
    primitive = A_ASSOCIATE()
    primitive.application_context_name = info.application_context
    primitive.calling_ae_title = info.calling_ae
    primitive.called_ae_title = info.called_ae
    primitive.result = 0x00
    primitive.result_source = 0x01
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    primitive.user_information = [maximum]
    results = []
    for pc in info.presentation_contexts:
        context = PresentationContext()
        context.context_id = pc.id
        context.abstract_syntax = pc.abstract_syntax
        context.transfer_syntax = list(pc.transfer_syntaxes)
        context.result = 0x00
        results.append(context)
    primitive.presentation_context_definition_results_list = results
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _associate(conn: socket.socket, *, max_pdu: int = 16384) -> None:
    """Read the A-ASSOCIATE-RQ and accept it."""
    _, body = _read_pdu(conn)
    conn.sendall(_accept(bytes((1, 0)) + len(body).to_bytes(4, "big") + body, max_pdu=max_pdu))


def _read_pdu(conn: socket.socket) -> tuple[int, bytes]:
    header = _exactly(conn, 6)
    return header[0], _exactly(conn, int.from_bytes(header[2:6], "big"))


def _exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _read_message(conn: socket.socket) -> None:
    """Read PDUs up to the last fragment of the data set (control header bits 0 and 1 clear / set)."""
    while True:
        _, body = _read_pdu(conn)
        control = body[5]
        if control == 0x02:  # the last data set fragment
            return


def _rsp(message_id: int, status: int = 0x0000) -> bytes:
    return b"".join(DimseSender(16384).encoded_command(1, encode_command(c_store_rsp(message_id, CT, "1.2.3", status))))


@pytest.fixture
def peer() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """A one-connection TCP peer on 127.0.0.1 running `behave(connection)` in a thread; yields its port."""
    threads: list[threading.Thread] = []
    servers: list[socket.socket] = []

    def start(behave: Callable[[socket.socket], None]) -> int:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def run() -> None:
            conn, _ = server.accept()
            with conn:
                try:
                    behave(conn)
                except (ConnectionError, OSError):
                    pass

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return int(server.getsockname()[1])

    yield start
    for server in servers:
        server.close()
    for thread in threads:
        thread.join(5)


def test_a_rejected_association_says_so(peer: Callable[[Callable[[socket.socket], None]], int]) -> None:
    def reject(conn: socket.socket) -> None:
        _read_pdu(conn)
        rj = A_ASSOCIATE_RJ()
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = 0x01, 0x01, 0x07
        rj.from_primitive(primitive)
        conn.sendall(rj.encode())

    with pytest.raises(LinkRefused, match="rejected the association") as caught:
        _open(peer(reject))
    assert caught.value.rejected


def test_an_abort_instead_of_the_response_is_a_lost_link(
    peer: Callable[[Callable[[socket.socket], None]], int], ct_files: list[Path]
) -> None:
    def behave(conn: socket.socket) -> None:
        _associate(conn)
        _read_message(conn)
        conn.sendall(a_abort())
        time.sleep(0.5)

    link = _open(peer(behave))
    with pytest.raises(LinkLost, match="aborted"):
        link.store(CT, EXPLICIT, str(_meta(ct_files[0]).SOPInstanceUID), file_dataset(ct_files[0]))
    assert not link.usable()


def test_a_device_closing_mid_send_is_a_lost_link_not_a_hang(
    peer: Callable[[Callable[[socket.socket], None]], int],
) -> None:
    def behave(conn: socket.socket) -> None:
        _associate(conn, max_pdu=4096)
        _read_pdu(conn)  # the command, then one fragment of the data set, then gone
        _read_pdu(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST

    link = _open(peer(behave), timeout=60)
    started = time.monotonic()
    with pytest.raises(LinkLost):
        link.store(CT, EXPLICIT, "1.2.3.4", memoryview(bytes(8 * 1024 * 1024)))  # far more than buffers hold
    assert time.monotonic() - started < 30, "noticed when the connection broke, not after the DIMSE timeout"


def test_a_response_to_another_message_id_is_a_lost_link(
    peer: Callable[[Callable[[socket.socket], None]], int], ct_files: list[Path]
) -> None:
    def behave(conn: socket.socket) -> None:
        _associate(conn)
        _read_message(conn)
        conn.sendall(_rsp(message_id=99))
        _read_pdu(conn)  # the A-ABORT

    link = _open(peer(behave))
    with pytest.raises(LinkLost, match="Message ID 99"):
        link.store(CT, EXPLICIT, str(_meta(ct_files[0]).SOPInstanceUID), file_dataset(ct_files[0]))


def test_a_release_request_while_idle_makes_the_link_unusable(
    peer: Callable[[Callable[[socket.socket], None]], int], ct_files: list[Path]
) -> None:
    released = threading.Event()

    def behave(conn: socket.socket) -> None:
        _associate(conn)
        _read_message(conn)
        conn.sendall(_rsp(message_id=1, status=0xB007))
        conn.sendall(a_release_rq())
        released.set()
        time.sleep(0.5)

    link = _open(peer(behave))
    answer = link.store(CT, EXPLICIT, str(_meta(ct_files[0]).SOPInstanceUID), file_dataset(ct_files[0]))
    assert answer.status == 0xB007
    assert released.wait(20)
    deadline = time.monotonic() + 20
    while link.usable() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not link.usable(), "the pool opens another association instead of sending into a release"
    link.abort()


# -- the far side: held in memory, delivered from there ------------------------------------------------


def test_far_side_instances_are_delivered_from_memory_byte_identical(
    tmp_path: Path, ct_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What router B commits (a whole Part 10 file from router A, journaled) goes to DCMTK storescp from the
    spool's memory: no spool file is written for it, and it arrives bit for bit."""
    require_dcmtk("storescp")
    monkeypatch.setattr(spool_module, "PUBLISH_DELAY_S", 120.0)  # a loaded CI machine: held for the whole test
    spool = Spool(tmp_path / "spool", max_bytes=64 * 1024 * 1024)
    outcomes: list[DeliveryOutcome] = []
    try:
        for path in ct_files:
            meta = _meta(path).file_meta
            writer = spool.writer(
                "STORESCP",
                sop_class_uid=str(meta.MediaStorageSOPClassUID),
                sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
                transfer_syntax=str(meta.TransferSyntaxUID),
                meta={"origin_site": "site-a", "origin_id": path.name},
                part10=True,
            )
            writer.write(path.read_bytes())
            entry = writer.commit(lambda: None)
            assert spool.held(entry.id) is not None, "held in memory, durable in the journal"
        with StorescpProcess(tmp_path / "in", "STORESCP") as scp:
            pool = DeliveryPool(
                spool,
                "STORESCP",
                Destination("127.0.0.1", scp.port, "STORESCP", "ROUTER_B"),
                associations=1,  # storescp serves one association at a time
                on_outcome=outcomes.append,
            )
            pool.start()
            try:
                deadline = time.monotonic() + 30
                while len(outcomes) < len(ct_files) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not list((tmp_path / "spool" / "entries").iterdir()), "no spool file written"
            finally:
                pool.stop()
            arrived = sorted((tmp_path / "in").glob("*.dcm"))
    finally:
        spool.close()
    assert [o.outcome for o in outcomes] == [Outcome.DELIVERED] * len(ct_files)
    assert fingerprints(arrived) == fingerprints(ct_files)
    assert all(fingerprint(p)[0] for p in arrived)


def test_held_instances_wait_out_a_destination_that_is_down_and_arrive_from_their_files(
    tmp_path: Path, ct_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination is down longer than the spool holds an entry in memory: the entries are written out
    (and survive there), retried with backoff, and arrive byte-identical once storescp is up."""
    require_dcmtk("storescp")
    monkeypatch.setattr(spool_module, "PUBLISH_DELAY_S", 0.3)
    spool = Spool(tmp_path / "spool", max_bytes=64 * 1024 * 1024, retry_base_s=0.2, retry_max_s=0.5)
    outcomes: list[DeliveryOutcome] = []
    port = free_port()
    try:
        for path in ct_files[:3]:
            meta = _meta(path).file_meta
            writer = spool.writer(
                "LATE",
                sop_class_uid=str(meta.MediaStorageSOPClassUID),
                sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
                transfer_syntax=str(meta.TransferSyntaxUID),
                part10=True,
            )
            writer.write(path.read_bytes())
            writer.commit(lambda: None)
        pool = DeliveryPool(
            spool,
            "LATE",
            Destination("127.0.0.1", port, "LATE", "ROUTER_B"),
            associations=1,
            on_outcome=outcomes.append,
            idle_release_s=0.2,
        )
        pool.start()
        try:
            deadline = time.monotonic() + 10
            while len(list((tmp_path / "spool" / "entries").iterdir())) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(list((tmp_path / "spool" / "entries").iterdir())) == 3, "written out while waiting"
            assert not outcomes, "an unreachable destination costs no entry an attempt"
            with StorescpProcess(tmp_path / "in", "LATE", port):
                deadline = time.monotonic() + 30
                while len(outcomes) < 3 and time.monotonic() < deadline:
                    time.sleep(0.05)
                arrived = sorted((tmp_path / "in").glob("*.dcm"))
        finally:
            pool.stop()
    finally:
        spool.close()
    assert [o.outcome for o in outcomes] == [Outcome.DELIVERED] * 3
    assert fingerprints(arrived) == fingerprints(ct_files[:3])
