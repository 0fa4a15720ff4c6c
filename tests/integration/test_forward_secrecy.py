"""Forward secrecy and responder freshness against a bridge that records everything (issue 17, item 11).

The bridge is the real one, in this process, with a subclass that keeps a copy of every Open and
every frame in both directions; the routers are real processes over gRPC and TLS, the archive a
pynetdicom archive. After the association has ended, the attacker takes both routers'
identity key files and tries to open what it recorded; then it replays a recorded Open to the
destination router after that router restarted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import uuid
from collections.abc import Callable

import grpc.aio
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.server import RelayServicer, RouterSession
from relay_bridge.splice import AssociationService, Splice
from relay_demo.archive import DemoArchive
from relay_demo.datasets import generate_ct_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.seal import PROTOCOL, AssociationContext, Identity, _lp
from relay_router.wire.codec import handshake_from
from tests.support.inprocess_bridge import InProcessBridge
from tests.support.wire import wait_until

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"


@dataclasses.dataclass
class Recording:
    opens: list[pb.Open] = dataclasses.field(default_factory=list)
    frames: list[tuple[bool, pb.Frame]] = dataclasses.field(default_factory=list)  # (from the initiator, frame)


RECORDING = Recording()


class RecordingSplice(Splice):
    async def pump(self, read, outbound, *, from_initiator: bool) -> None:
        async def recording_read():
            frame = await read()
            if frame is not grpc.aio.EOF:
                RECORDING.frames.append((from_initiator, pb.Frame.FromString(frame)))
            return frame

        await super().pump(recording_read, outbound, from_initiator=from_initiator)


class RecordingAssociations(AssociationService):
    async def initiate(self, session: RouterSession, op: pb.Open, context) -> None:
        RECORDING.opens.append(pb.Open.FromString(op.SerializeToString()))
        await super().initiate(session, op, context)


class RecordingServicer(RelayServicer):
    splice_class = RecordingSplice
    association_class = RecordingAssociations

    async def replay(self, op: pb.Open, from_site: str) -> pb.Frame | None:
        """Hand a recorded Open to its destination again, as a new notice, and return its first answer."""
        splice = self.splice_class(op.association_id, from_site, op.to_site, op.called_ae_title, op.calling_ae_title)
        self.splices[op.association_id] = splice
        notice = pb.IncomingAssociation(
            association_id=op.association_id,
            from_site=from_site,
            called_ae_title=op.called_ae_title,
            first_frame=pb.Frame(data=op.first_data),
            handshake=op.handshake,
            features=op.features,
        )
        self.sessions[op.to_site].send(pb.BridgeMessage(incoming=notice))
        await asyncio.wait_for(asyncio.shield(splice.joined), 10)
        raw = await asyncio.wait_for(splice.to_initiator.get(), 10)
        return pb.Frame.FromString(raw) if raw else None


@pytest.fixture
def recorded(tmp_path_factory: pytest.TempPathFactory, archive_factory: Callable[..., DemoArchive]):
    global RECORDING
    RECORDING = Recording()
    net = LocalRelayNetwork(tmp_path_factory.mktemp("fs")).start(bridge=False)
    bridge = InProcessBridge(net, RecordingServicer)
    archive = archive_factory("ARCHIVE_B")
    net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
    net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")])
    net.wait_connected()
    yield net, bridge, archive
    for name in net.sites:
        net.stop_router(name)
    bridge.stop()


def _identity(net: LocalRelayNetwork, site: str) -> Identity:
    (path,) = net.workdir.rglob(f"state-{site}/identity.key")
    return Identity.load_or_create(path)


def _store_marked_image(net: LocalRelayNetwork, marker: str) -> None:
    ds = generate_ct_series(1)[0]
    ds.PatientName = marker
    ds.PatientID = marker
    ae = AE(ae_title="WS_A")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    port = net.sites["site-a"].port
    assert port
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE_B")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()


def _candidate_keys(op: pb.Open, a: Identity, b: Identity) -> list[tuple[str, AESGCM]]:
    """Every key derivable from the recorded Open with both routers' long-term private keys."""
    ctx = AssociationContext(op.association_id, "site-a", op.to_site, op.called_ae_title)
    handshake = handshake_from(op.handshake)
    secrets = []
    for holder in (b, a):  # the secret is sealed to B's key; A's key is tried too
        try:
            secrets.append(holder.open_secret(handshake.kem_ciphertext, ctx.hpke_info))
        except Exception:  # not this key
            continue
    assert secrets, "the static secret must open with the destination's long-term key (the attack's first step)"
    transcript = ctx.transcript(a.public, b.public, handshake, list(op.features))
    keys = []
    for secret in secrets:
        for label in (b"early frame key", b"frame key"):
            for direction in (0, 1):
                hkdf = HKDF(hashes.SHA256(), 32, salt=transcript, info=_lp(PROTOCOL, label, bytes([direction])))
                keys.append((f"{label.decode()} {direction}", AESGCM(hkdf.derive(secret))))
    return keys


def _open(key: AESGCM, data: pb.Data, aid: str, direction: int) -> bytes | None:
    aad = bytes.fromhex(aid) + struct.pack(">BQI", direction, data.seq, data.flags)
    try:
        return key.decrypt(struct.pack(">IQ", 0, data.seq), data.payload, aad)
    except InvalidTag:
        return None


def test_recorded_frames_cannot_be_opened_with_both_routers_long_term_keys(recorded) -> None:
    net, _bridge, archive = recorded
    marker = "FS" + uuid.uuid4().hex.upper()[:14]
    _store_marked_image(net, marker)
    stored = [i for i in archive.instances.values() if i.value("PatientID") == marker]
    assert len(stored) == 1  # the association worked end to end
    (op,) = RECORDING.opens
    data = [(initiator, f.data) for initiator, f in RECORDING.frames if f.HasField("data")]
    assert sum(1 for initiator, _ in data if initiator) >= 2 and sum(1 for i, _ in data if not i) >= 2
    a, b = _identity(net, "site-a"), _identity(net, "site-b")
    keys = _candidate_keys(op, a, b)

    # The attack works as far as it can: frame 0 (the A-ASSOCIATE-RQ, sealed before B answered) opens.
    request = [p for _, k in keys if (p := _open(k, op.first_data, op.association_id, 0)) is not None]
    assert len(request) == 1 and b"ARCHIVE_B" in request[0] and marker.encode() not in request[0]
    # Nothing else does: not the AC, not the echo, not the store, in either direction.
    for from_initiator, frame in data:
        direction = 0 if from_initiator else 1
        for name, key in keys:
            assert _open(key, frame, op.association_id, direction) is None, f"frame {frame.seq} opened with {name}"
    confirms = [f.confirm for _, f in RECORDING.frames if f.HasField("confirm")]
    assert len(confirms) == 1 and len(confirms[0].ephemeral_reply) == 1088 + 32


def test_a_replayed_open_is_refused_after_the_destination_restarts(recorded) -> None:
    net, bridge, archive = recorded
    _store_marked_image(net, "REPLAY" + uuid.uuid4().hex.upper()[:10])
    (op,) = RECORDING.opens
    net.stop_router("site-b")
    net.start_router("site-b")
    net.wait_connected()
    before = len(archive.instances)
    answer = bridge.run(bridge.servicer.replay(op, "site-a"))
    assert answer is not None and answer.HasField("refused")
    assert answer.refused.reason == pb.Refused.NOT_PERMITTED
    assert answer.refused.detail == "end-to-end authentication failed"
    wait_until(
        lambda: f"association {op.association_id} was already seen (replayed by the bridge?)" in net.log("site-b"),
        what="the replay alert",
    )
    assert len(archive.instances) == before
    (record,) = net.workdir.rglob("state-site-b/seen_associations")
    assert op.association_id in record.read_text()  # what the restarted router read back
