"""The DIMSE layer against real peers: DCMTK (storescp, storescu, echoscu) and pynetdicom, on 127.0.0.1.

Two tiny asyncio drivers stand in for the accelerated routes still to come: an SCU that
negotiates with the Upper Layer code (PduFramer, parse_associate) and sends messages
built by DimseSender, and an SCP that assembles what it receives with DimseReceiver,
writes each data set to a file as it streams in, and answers through DimseSender.
Images must arrive bit for bit (SOP Instance UID and Pixel Data fingerprints).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.dsutils import create_file_meta, split_dataset

from relay_demo.datasets import fingerprints
from relay_router.dimse import (
    CommandField,
    CommandReceived,
    DatasetChunk,
    DatasetComplete,
    DimseEvent,
    DimseReceiver,
    DimseSender,
    MessageIdAllocator,
    Status,
    c_echo_rq,
    c_echo_rsp,
    c_store_rq,
    c_store_rsp,
    parse_c_store_rq,
)
from relay_router.ul import (
    ControlPdu,
    PDataBytes,
    PduFramer,
    PduType,
    a_release_rp,
    a_release_rq,
    parse_associate,
    with_abstract_syntaxes,
)
from tests.integration.conftest import require_dcmtk
from tests.support import dcmtk
from tests.unit.ul.builders import associate_ac, associate_rq

pytestmark = pytest.mark.integration

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
OUR_MAX_PDU = 32768
READ_TIMEOUT = 30.0  # a peer that never answers fails the test instead of hanging it


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Peer:
    """One established association: Upper Layer framing below, the DIMSE layer above."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        contexts: dict[int, tuple[str, str]],
        peer_max_pdu: int,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.framer = PduFramer(max_pdata_length=OUR_MAX_PDU)
        self.receiver = DimseReceiver(contexts, max_pdu_length=OUR_MAX_PDU)
        self.sender = DimseSender(peer_max_pdu)
        self.contexts = contexts
        self.pending: list[DimseEvent | ControlPdu] = []

    async def send(self, context_id: int, command: Dataset, dataset: Any = None, *, offset: int = 0) -> None:
        for pdu in self.sender.message(context_id, command, dataset, offset=offset):
            self.writer.write(pdu)
            await self.writer.drain()

    async def next_event(self) -> DimseEvent | ControlPdu | None:
        """The next DIMSE event or control PDU; None when the peer closed the connection."""
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), READ_TIMEOUT)
            if not data:
                return None
            for event in self.framer.feed(data):
                if isinstance(event, PDataBytes):
                    self.pending += self.receiver.feed(event.data)
                else:
                    self.pending.append(event)
        return self.pending.pop(0)

    async def response(self) -> Dataset:
        """Wait for a response without a data set (C-ECHO-RSP, C-STORE-RSP)."""
        event = await self.next_event()
        assert isinstance(event, CommandReceived), f"expected a response, got {event!r}"
        assert not event.has_dataset
        return event.command

    async def release(self) -> None:
        self.writer.write(a_release_rq())
        await self.writer.drain()
        event = await self.next_event()
        assert isinstance(event, ControlPdu) and event.pdu_type == PduType.RELEASE_RP, event
        self.writer.close()


async def associate(
    port: int, called: str, contexts: Sequence[tuple[str, Sequence[str]]], calling: str = "DIMSE_SCU"
) -> Peer:
    """Open an association with the Upper Layer code (A-ASSOCIATE-RQ built by pynetdicom's PDU classes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _nodelay(writer)
    rq = associate_rq(called, calling, contexts, max_length=OUR_MAX_PDU)
    writer.write(rq)
    framer = PduFramer()
    while True:
        data = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
        assert data, "the SCP closed the connection during association"
        events = framer.feed(data)
        if events:
            break
    (ac,) = events
    assert isinstance(ac, ControlPdu) and ac.pdu_type == PduType.ASSOCIATE_AC, ac
    info = with_abstract_syntaxes(parse_associate(ac.data), parse_associate(rq))
    accepted = {pc.id: (pc.abstract_syntax or "", pc.transfer_syntaxes[0]) for pc in info.accepted_contexts}
    return Peer(reader, writer, accepted, info.max_pdu_length)


def context_for(peer: Peer, abstract: str, transfer: str) -> int:
    return next(cx for cx, (a, t) in peer.contexts.items() if (a, t) == (abstract, transfer))


def file_parts(path: Path) -> tuple[str, str, str, int]:
    """(SOP Class UID, SOP Instance UID, transfer syntax, offset of the data set) of a Part 10 file."""
    meta, offset = split_dataset(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID), offset


# --------------------------------------------------------------------------- our SCU -> real SCPs


async def store_files(port: int, called: str, files: Sequence[Path]) -> tuple[list[int], int]:
    """C-ECHO, then C-STORE every file (data set read from the file in fragments).

    Returns the statuses and the Maximum Length the SCP announced (what our fragments followed).
    """
    parts = [file_parts(p) for p in files]
    proposed = sorted({(sop_class, ts) for sop_class, _, ts, _ in parts})
    peer = await associate(port, called, [(VERIFICATION, [IMPLICIT_LE]), *((c, [t]) for c, t in proposed)])
    ids = MessageIdAllocator()
    message_id = ids.allocate()
    await peer.send(context_for(peer, VERIFICATION, IMPLICIT_LE), c_echo_rq(message_id))
    echo = await peer.response()
    assert (echo.CommandField, echo.MessageIDBeingRespondedTo) == (CommandField.C_ECHO_RSP, message_id)
    ids.release(message_id)
    statuses = [int(echo.Status)]
    for path, (sop_class, sop_instance, ts, offset) in zip(files, parts, strict=True):
        message_id = ids.allocate()
        await peer.send(
            context_for(peer, sop_class, ts), c_store_rq(message_id, sop_class, sop_instance), path, offset=offset
        )
        rsp = await peer.response()
        assert (rsp.MessageIDBeingRespondedTo, rsp.AffectedSOPInstanceUID) == (message_id, sop_instance)
        ids.release(message_id)
        statuses.append(int(rsp.Status))
    await peer.release()
    return statuses, peer.sender.max_pdu_length


@pytest.mark.parametrize("max_pdu", [None, 4096], ids=["storescp-default-pdu", "storescp-pdu-4096"])
async def test_our_sender_stores_into_dcmtk_storescp(
    storescp_factory: Any, ct_series: list[Path], ct_fingerprints: dict[str, str], max_pdu: int | None
) -> None:
    scp = storescp_factory("DCMTK_SCP", extra_args=["--max-pdu", str(max_pdu)] if max_pdu else [])
    statuses, announced = await store_files(scp.port, "DCMTK_SCP", ct_series)
    assert statuses == [0] * (len(ct_series) + 1)
    assert announced == (max_pdu or 16384)  # storescp's default receive limit is 16 KiB
    received = await asyncio.to_thread(scp.wait_for_files, len(ct_series))
    assert fingerprints(received) == ct_fingerprints


async def test_our_sender_stores_into_a_pynetdicom_scp(
    ct_series: list[Path], ct_fingerprints: dict[str, str], sample_dicom_files: list[Path]
) -> None:
    files = [
        *ct_series,
        *(p for p in sample_dicom_files if pydicom.dcmread(p, stop_before_pixels=True).get("SOPClassUID")),
    ]
    received: dict[str, Dataset] = {}
    ae = AE(ae_title="PYNETDICOM")
    ae.maximum_pdu_size = 8192  # small, so our fragments must follow it
    ae.add_supported_context(VERIFICATION, [IMPLICIT_LE])
    for path in files:
        sop_class, _, ts, _ = file_parts(path)
        ae.add_supported_context(sop_class, [ts])

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = server.server_address[1]
        statuses, announced = await store_files(port, "PYNETDICOM", files)
    finally:
        server.shutdown()
    assert announced == 8192
    assert len(files) > len(ct_series)  # pydicom's samples too: MR, JPEG 2000, RLE in their own syntaxes
    assert statuses == [0] * (len(files) + 1)
    assert fingerprints(received.values()) == fingerprints(files)
    for path in files:
        original = pydicom.dcmread(path)
        assert received[str(original.SOPInstanceUID)] == original  # every element, not just the pixels


# --------------------------------------------------------------------------- real SCUs -> our SCP


@dataclass
class TinyScp:
    """An SCP built on the Upper Layer and DIMSE layers: writes each data set to a Part 10 file."""

    directory: Path
    ae_title: str = "DIMSE_SCP"
    transfer_syntaxes: tuple[str, ...] = (EXPLICIT_LE, IMPLICIT_LE)
    stored: list[Path] = field(default_factory=list)
    largest_chunk: int = 0
    errors: list[str] = field(default_factory=list)

    async def serve(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        try:
            await self._association(reader, writer)
        except Exception as exc:  # reported by the test through self.errors
            self.errors.append(f"{exc.__class__.__name__}: {exc}")
        finally:
            writer.close()

    async def _association(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = PduFramer()
        events: list[Any] = []
        while not events:
            data = await reader.read(65536)
            if not data:
                return
            events = framer.feed(data)
        (request,) = events
        assert isinstance(request, ControlPdu) and request.pdu_type == PduType.ASSOCIATE_RQ
        rq = parse_associate(request.data)
        results = []
        for pc in rq.presentation_contexts:
            chosen = next((ts for ts in pc.transfer_syntaxes if ts in self.transfer_syntaxes), None)
            results.append((pc.id, 0, chosen) if chosen else (pc.id, 4, pc.transfer_syntaxes[0]))
        ac = associate_ac(request.data, results, max_length=OUR_MAX_PDU)
        writer.write(ac)
        info = with_abstract_syntaxes(parse_associate(ac), rq)
        contexts = {pc.id: (pc.abstract_syntax or "", pc.transfer_syntaxes[0]) for pc in info.accepted_contexts}
        peer = Peer(reader, writer, contexts, rq.max_pdu_length)
        peer.framer.max_pdata_length = OUR_MAX_PDU
        out: BinaryIO | None = None
        store = None
        while True:
            event = await peer.next_event()
            if event is None:
                return
            if isinstance(event, ControlPdu):
                if event.pdu_type == PduType.RELEASE_RQ:
                    writer.write(a_release_rp())
                    await writer.drain()
                return
            if isinstance(event, CommandReceived):
                if event.command_field == CommandField.C_ECHO_RQ:
                    await peer.send(event.context_id, c_echo_rsp(int(event.command.MessageID)))
                elif event.command_field == CommandField.C_STORE_RQ:
                    store = parse_c_store_rq(event.command)
                    path = self.directory / f"{store.sop_instance_uid}.dcm"
                    out = open(path, "wb")  # noqa: ASYNC230  (a test driver; closed at DatasetComplete)
                    out.write(b"\0" * 128 + b"DICM")
                    meta = create_file_meta(
                        sop_class_uid=store.sop_class_uid,
                        sop_instance_uid=store.sop_instance_uid,
                        transfer_syntax=contexts[event.context_id][1],
                    )
                    write_file_meta_info(out, meta)  # type: ignore[arg-type]
            elif isinstance(event, DatasetChunk):
                assert out is not None
                self.largest_chunk = max(self.largest_chunk, len(event.data))
                out.write(event.data)
            elif isinstance(event, DatasetComplete):
                assert out is not None and store is not None
                out.close()
                self.stored.append(Path(out.name))
                rsp = c_store_rsp(store.message_id, store.sop_class_uid, store.sop_instance_uid, Status.SUCCESS)
                await peer.send(event.context_id, rsp)
                out, store = None, None


@pytest.fixture
async def tiny_scp(tmp_path: Path) -> AsyncIterator[tuple[TinyScp, int]]:
    scp = TinyScp(tmp_path / "received")
    scp.directory.mkdir()
    async for port in scp.serve():
        yield scp, port


async def test_dcmtk_storescu_and_echoscu_into_our_receiver(
    tiny_scp: tuple[TinyScp, int], ct_series: list[Path], ct_fingerprints: dict[str, str]
) -> None:
    require_dcmtk("storescu", "echoscu")
    scp, port = tiny_scp
    echo = await asyncio.to_thread(dcmtk.echoscu, "127.0.0.1", port, scp.ae_title)
    assert echo.ok, echo.log
    result = await asyncio.to_thread(dcmtk.storescu, "127.0.0.1", port, scp.ae_title, "STORESCU", ct_series)
    assert result.ok and result.succeeded == len(ct_series), result.log
    assert not scp.errors
    assert fingerprints(scp.stored) == ct_fingerprints
    for path in ct_series:
        original = pydicom.dcmread(path)
        assert pydicom.dcmread(scp.directory / path.name) == original
    assert 0 < scp.largest_chunk <= 65536  # streamed in socket-read pieces, never the whole data set


async def test_pynetdicom_scu_into_our_receiver(
    tiny_scp: tuple[TinyScp, int], ct_series: list[Path], ct_fingerprints: dict[str, str]
) -> None:
    scp, port = tiny_scp

    def run_scu() -> list[int]:
        ae = AE(ae_title="PYNET_SCU")
        ae.maximum_pdu_size = 4096
        ae.add_requested_context(VERIFICATION, [IMPLICIT_LE])
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [EXPLICIT_LE, IMPLICIT_LE])
        assoc = ae.associate("127.0.0.1", port, ae_title=scp.ae_title)
        assert assoc.is_established
        statuses = [int(assoc.send_c_echo().Status)]
        for path in ct_series:
            statuses.append(int(assoc.send_c_store(pydicom.dcmread(path)).Status))
        assoc.release()
        return statuses

    statuses = await asyncio.to_thread(run_scu)
    assert statuses == [0] * (len(ct_series) + 1)
    assert not scp.errors
    assert fingerprints(scp.stored) == ct_fingerprints
