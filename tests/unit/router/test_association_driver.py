"""RelayedAssociation with the codec, without processes: a fake association stream, a socket pair for the device.

The driver's own duties: carry out the codec's decisions (abort on a rejected frame, with a typed
outcome), answer pace reports, and leave no task behind when the association ends.
"""

from __future__ import annotations

import asyncio
import os
import socket

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason
from relay_router.association import RelayedAssociation
from relay_router.config import DicomSection
from relay_router.outcome import Outcome, Result
from relay_router.seal import FrameSealer, initiate, respond
from relay_router.ul import AssociateRequested, RelayConnection, Side
from relay_router.wire.codec import DataReceived, FrameCodec, confirm_frame
from relay_router.wire.features import Features
from tests.unit.ul import builders as B
from tests.unit.ul import fixtures as F

AGREED = Features(compress=True, shuffle=True, spill=False, pace=True)
ANSWER_FEATURES = Features.answer(Features.offer(compression=True).names(), compression=True)


class FakeStream:
    """The association stream: frames to the driver through a queue, frames from it into a list."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
        self.sent: list[pb.Frame] = []
        self.finished = self.cancelled = False
        self.sent_any = asyncio.Event()

    async def send(self, frame: pb.Frame) -> None:
        self.sent.append(frame)
        self.sent_any.set()

    async def receive(self) -> pb.Frame | None:
        return await self.incoming.get()

    async def finish(self) -> None:
        self.finished = True
        self.incoming.put_nowait(None)  # the bridge then ends our partner's stream, and ours

    def cancel(self) -> None:
        self.cancelled = True


async def responder() -> tuple[RelayedAssociation, FrameCodec, FakeStream, socket.socket, asyncio.Task[Outcome]]:
    """A running responder-side driver, its device socket, and the initiator's codec (the test)."""
    aid = os.urandom(16).hex()
    secret, transcript = os.urandom(32), os.urandom(32)
    initiator = FrameCodec(
        FrameSealer(secret, transcript, aid, initiator=True),
        initiator=True, features=AGREED, compression_level=3, accept_blobs=False,
    )  # fmt: skip
    device, ours = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    stream = FakeStream()
    conn = RelayConnection(Side.REMOTE)
    relay = RelayedAssociation(
        conn, reader, writer, stream, Outcome(aid, "inbound", "site-a"),  # type: ignore[arg-type]
        dicom=DicomSection(), sealer=FrameSealer(secret, transcript, aid, initiator=False), initiator=False,
        features=AGREED,
    )  # fmt: skip
    actions = conn.receive(Side.REMOTE, F.ASSOCIATE_RQ)
    assert any(isinstance(a, AssociateRequested) for a in actions)
    task = asyncio.create_task(relay.run(conn.accept_request()))
    await asyncio.to_thread(device.recv, 65536)  # the RQ reached the device
    device.sendall(F.ASSOCIATE_AC)
    await asyncio.wait_for(stream.sent_any.wait(), 10)
    return relay, initiator, stream, device, task


def data_frames(stream: FakeStream) -> list[pb.Data]:
    return [f.data for f in stream.sent if f.HasField("data")]


async def test_a_tampered_frame_aborts_with_a_security_outcome_and_no_task_survives() -> None:
    before = asyncio.all_tasks()
    relay, initiator, stream, device, task = await responder()
    (ac,) = data_frames(stream)
    assert initiator.decode(ac) == DataReceived(F.ASSOCIATE_AC)  # the AC, sealed (and maybe compressed)
    echo = b"".join(B.echo_rq())
    stream.incoming.put_nowait(pb.Frame(data=initiator.encode_data(echo)))
    got = b""
    while len(got) < len(echo):
        got += await asyncio.to_thread(device.recv, 65536)
    assert got == echo
    tampered = initiator.encode_data(b"x" * 2000)
    tampered.payload = tampered.payload[:-1] + bytes([tampered.payload[-1] ^ 1])
    stream.incoming.put_nowait(pb.Frame(data=tampered))
    outcome = await asyncio.wait_for(task, 10)
    assert outcome.result is Result.ABORTED and outcome.security and outcome.reason is Reason.SECURITY
    assert (
        outcome.detail
        == "SECURITY: frame 2 failed authentication (altered, replayed, reordered or from another association)"
    )
    # Only the code crosses the bridge; the text stays in this router's log.
    assert stream.sent[-1].close == pb.Close(reason=pb.Close.ABORTED, code=pb.Close.CODE_SECURITY)
    assert device.recv(65536)[:1] == b"\x07"  # A-ABORT to the device
    assert relay._tasks == set() and asyncio.all_tasks() <= before | {asyncio.current_task()}
    device.close()


async def test_pace_reports_are_answered_and_owned_by_the_association() -> None:
    relay, initiator, stream, device, task = await responder()
    initiator.decode(data_frames(stream)[0])
    stream.incoming.put_nowait(pb.Frame(data=initiator.encode_pace_report(2_000_000)))
    for _ in range(100):
        if relay._pace.rate:
            break
        await asyncio.sleep(0.01)
    assert relay._pace.rate == 2_000_000  # the rate the initiator measured now sizes this router's frames
    device.close()  # the device goes away: A-ABORT to the other side
    outcome = await asyncio.wait_for(task, 10)
    assert outcome.result is Result.ABORTED and not outcome.security and outcome.reason is Reason.PEER_ABORTED
    assert relay._tasks == set()


async def initiator_before_confirm():  # relay, stream, device socket, task, (confirmation, rx)
    """An initiator-side driver whose device has sent its RQ (frame 0 went in the Open); no Confirm yet."""
    from tests.unit.router.test_handshake import ANSWER, OFFER, context, identities

    a, b, _ = identities()
    aid = os.urandom(16).hex()
    handshake, tx = initiate(a, b.public, context(aid), OFFER.names())
    confirmation, rx = respond(b, a.public, handshake, context(aid), OFFER.names(), ANSWER.names())
    device, ours = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    stream = FakeStream()
    conn = RelayConnection(Side.LOCAL)
    conn.receive(Side.LOCAL, F.ASSOCIATE_RQ)
    conn.accept_request()  # forwarded as frame 0 of the Open
    relay = RelayedAssociation(
        conn, reader, writer, stream, Outcome(aid, "outbound", "site-b"),  # type: ignore[arg-type]
        dicom=DicomSection(), sealer=tx, initiator=True, features=OFFER, confirm_from=(b.public, "site-b"),
    )  # fmt: skip
    task = asyncio.create_task(relay.run())
    return relay, stream, device, task, (confirmation, rx)


async def test_an_abort_from_the_device_before_the_confirm_waits_for_the_keys_then_goes_sealed() -> None:
    relay, stream, device, task, (confirmation, rx) = await initiator_before_confirm()
    device.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT before the destination confirmed
    await asyncio.sleep(0.2)
    assert data_frames(stream) == [], "a frame left before the keys existed"
    stream.incoming.put_nowait(confirm_frame(confirmation, ANSWER_FEATURES))
    outcome = await asyncio.wait_for(task, 10)
    (abort,) = data_frames(stream)
    responder_codec = FrameCodec(rx, initiator=False, features=ANSWER_FEATURES, compression_level=3, accept_blobs=True)
    responder_codec.receive_seq = 1  # frame 0 was the RQ inside the Open
    assert responder_codec.decode(abort) == DataReceived(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert outcome.result is Result.ABORTED and not outcome.security and relay._tasks == set()
    device.close()


async def test_a_confirm_that_fails_verification_aborts_without_waiting_forever() -> None:
    relay, stream, device, task, (confirmation, _rx) = await initiator_before_confirm()
    forged = confirm_frame(confirmation, ANSWER_FEATURES)
    forged.confirm.signature = bytes(len(forged.confirm.signature))
    stream.incoming.put_nowait(forged)
    outcome = await asyncio.wait_for(task, 10)
    assert outcome.result is Result.ABORTED and outcome.security and outcome.reason is Reason.SECURITY
    assert data_frames(stream) == []  # nothing could be sealed, so nothing was sent
    assert device.recv(65536)[:1] == b"\x03"  # the device still waiting for its AC gets a transient A-ASSOCIATE-RJ
    device.close()
