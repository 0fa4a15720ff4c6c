"""A bridge that never sees patient data and cannot forge, alter or replay associations.

The bridge here is the real one, run in this process with a subclass that
plays the attacker (it sees exactly what an operator of the bridge would).
Routers are real processes; the archive is a pynetdicom archive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc.aio
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.control import ControlService
from relay_bridge.server import RelayServicer
from relay_bridge.sessions import RouterSession
from relay_bridge.splice import AssociationService, Splice
from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.seal import FLAG_COMPRESSED, FLAG_SEALED, AssociationContext, Identity, initiate
from relay_router.ul import PduType, parse_reject
from relay_router.wire.codec import handshake_message
from tests.support.inprocess_bridge import InProcessBridge
from tests.support.wire import exchange, wait_until
from tests.unit.ul.builders import associate_rq

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"


@dataclasses.dataclass
class Attack:
    """What the malicious bridge does to frames from the initiating router."""

    mode: str | None = None  # "tamper", "replay", "cross"
    captured: list[bytes] = dataclasses.field(default_factory=list)
    first_association: dict[int, bytes] = dataclasses.field(default_factory=dict)
    associations: int = 0


ATTACK = Attack()


class EvilSplice(Splice):
    async def pump(self, read, outbound, *, from_initiator: bool) -> None:
        if from_initiator:
            ATTACK.associations += 1
        number = ATTACK.associations
        pending: list[bytes] = []

        async def evil_read():
            if pending:
                return pending.pop()
            frame = await read()
            if frame is grpc.aio.EOF:
                return frame
            ATTACK.captured.append(frame)
            if not from_initiator:
                return frame
            parsed = pb.Frame.FromString(frame)
            if not parsed.HasField("data") or parsed.data.seq != 1:
                return frame
            if number == 1:
                ATTACK.first_association[1] = frame
            if ATTACK.mode == "tamper":
                payload = bytearray(parsed.data.payload)
                payload[len(payload) // 2] ^= 0x01
                parsed.data.payload = bytes(payload)
                return parsed.SerializeToString()
            if ATTACK.mode == "reflag":  # claim the frame is compressed (flags are authenticated)
                parsed.data.flags ^= FLAG_COMPRESSED
                return parsed.SerializeToString()
            if ATTACK.mode == "replay":
                pending.append(frame)
            if ATTACK.mode == "cross" and number > 1:
                return ATTACK.first_association[1]
            return frame

        await super().pump(evil_read, outbound, from_initiator=from_initiator)


class EvilAssociations(AssociationService):
    async def initiate(self, session: RouterSession, op: pb.Open, context) -> None:
        ATTACK.captured.append(op.SerializeToString())
        await super().initiate(session, op, context)


class EvilControl(ControlService):
    attacker: EvilServicer

    async def directory_for(self, site: str) -> pb.Directory:
        directory = await super().directory_for(site)
        for name, identity in self.attacker.invented.items():  # a site that does not exist, with the bridge's key
            directory.identities.add(
                site=name, identity=pb.Identity(sign_key=identity.public.sign_key, kem_key=identity.public.kem_key)
            )
        for entry in directory.identities:
            if entry.site == self.attacker.swap_identity_of:
                impostor = Identity.generate().public
                entry.identity.sign_key, entry.identity.kem_key = impostor.sign_key, impostor.kem_key
        return directory


class EvilServicer(RelayServicer):
    splice_class = EvilSplice
    association_class = EvilAssociations
    control_class = EvilControl
    swap_identity_of: str | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.control.attacker = self  # type: ignore[attr-defined]

    invented: dict[str, Identity] = {}

    async def forge_association(
        self, from_site: str, to_site: str, called: str, impostor: Identity | None = None
    ) -> pb.Frame | None:
        """Originate an association in `from_site`'s name, as a bridge operator could try to."""
        aid = uuid.uuid4().hex
        impostor = impostor or Identity.generate()  # the bridge does not have from_site's private key
        victim = (await self.directory.identities())[to_site]
        from relay_router.seal import PublicIdentity

        handshake, sealer = initiate(
            impostor, PublicIdentity(*victim), AssociationContext(aid, from_site, to_site, called)
        )
        rq = associate_rq(called=called, calling="FORGED")
        splice = self.splice_class(aid, from_site, to_site, called, "FORGED")
        self.splices[aid] = splice
        notice = pb.IncomingAssociation(
            association_id=aid,
            from_site=from_site,
            called_ae_title=called,
            first_frame=pb.Frame(data=pb.Data(payload=sealer.seal(rq, 0), seq=0, flags=FLAG_SEALED)),
            handshake=handshake_message(handshake),
        )
        self.sessions[to_site].send(pb.BridgeMessage(incoming=notice))
        await asyncio.wait_for(asyncio.shield(splice.joined), 10)
        raw = await asyncio.wait_for(splice.to_initiator.get(), 10)
        return pb.Frame.FromString(raw) if raw else None


@pytest.fixture
def evil(tmp_path_factory: pytest.TempPathFactory, archive_factory: Callable[..., DemoArchive]):
    global ATTACK
    ATTACK = Attack()
    net = LocalRelayNetwork(tmp_path_factory.mktemp("evil")).start(bridge=False)
    bridge = InProcessBridge(net, EvilServicer)
    archive = archive_factory("ARCHIVE_B")
    workstation = archive_factory("WS_A")
    site_b = net.add_site(
        "site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])], remote=[Remote("WS_A", "site-a")]
    )
    net.add_site(
        "site-a", shared=[Shared("WS_A", HOST, workstation.port, ["site-b"])], remote=[Remote("ARCHIVE_B", "site-b")]
    )
    assert site_b.port
    archive.set_known_node("WS_A", HOST, site_b.port)
    net.wait_connected()
    yield net, bridge, archive, workstation
    for name in net.sites:
        net.stop_router(name)
    bridge.stop()


def _port(net: LocalRelayNetwork) -> int:
    port = net.sites["site-a"].port
    assert port
    return port


def _echo_association(net: LocalRelayNetwork):
    ae = AE(ae_title="WS_A")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, _port(net), ae_title="ARCHIVE_B")
    assert assoc.is_established
    return assoc


def test_tampered_frame_aborts_the_association(evil) -> None:
    net, *_ = evil
    ATTACK.mode = "tamper"
    assoc = _echo_association(net)
    assoc.send_c_echo()
    wait_until(lambda: assoc.is_aborted, timeout=10, what="A-ABORT after a tampered frame")
    wait_until(lambda: "SECURITY: frame 1 failed authentication" in net.log("site-b"), what="the tamper alert")


def test_reflagged_frame_aborts_the_association(evil) -> None:
    net, *_ = evil
    ATTACK.mode = "reflag"
    assoc = _echo_association(net)
    assoc.send_c_echo()
    wait_until(lambda: assoc.is_aborted, timeout=10, what="A-ABORT after a re-flagged frame")
    assert "SECURITY: frame 1 failed authentication" in net.log("site-b")


def test_replayed_frame_aborts_the_association(evil) -> None:
    net, *_ = evil
    ATTACK.mode = "replay"
    assoc = _echo_association(net)
    assoc.send_c_echo()
    wait_until(lambda: assoc.is_aborted, timeout=10, what="A-ABORT after a replayed frame")
    assert "SECURITY: frame 1 where 2 was expected" in net.log("site-b")


def test_frame_from_another_association_aborts(evil) -> None:
    net, *_ = evil
    ATTACK.mode = "cross"
    first = _echo_association(net)
    assert first.send_c_echo().Status == 0
    first.release()
    second = _echo_association(net)
    second.send_c_echo()
    wait_until(lambda: second.is_aborted, timeout=10, what="A-ABORT after a frame of another association")
    assert "SECURITY: frame 1 failed authentication" in net.log("site-b")


def test_bridge_cannot_originate_an_association_in_a_routers_name(evil) -> None:
    net, bridge, archive, _ = evil
    with socket.socket() as listener:  # a device that must never be contacted
        listener.bind((HOST, 0))
        listener.listen()
        listener.settimeout(0.5)
        answer = bridge.run(bridge.servicer.forge_association("site-a", "site-b", "ARCHIVE_B"))
        with pytest.raises(TimeoutError):
            listener.accept()
    assert answer is not None and answer.HasField("refused")
    assert answer.refused.reason == pb.Refused.NOT_PERMITTED
    assert "end-to-end authentication failed" == answer.refused.detail
    assert "SECURITY: refused an association claiming to come from site-a" in net.log("site-b")
    assert "not signed by site-a's pinned key" in net.log("site-b")


def test_invented_site_cannot_reach_a_device_shared_with_others(evil) -> None:
    """The bridge invents site-x and hands out its own key for it: site-b still enforces its share list."""
    net, bridge, *_ = evil
    impostor = Identity.generate()
    bridge.servicer.invented["site-x"] = impostor
    bridge.run(bridge.servicer.control.broadcast_directory())
    wait_until(lambda: "site-x" in net.log("site-b"), what="site-b to see the invented site")
    answer = bridge.run(bridge.servicer.forge_association("site-x", "site-b", "ARCHIVE_B", impostor))
    assert answer is not None and answer.refused.reason == pb.Refused.NOT_PERMITTED
    assert "SECURITY: ARCHIVE_B is not shared with 'site-x'" in net.log("site-b")


def test_swapped_key_for_a_pinned_peer_is_refused_loudly(evil) -> None:
    net, bridge, *_ = evil
    bridge.servicer.swap_identity_of = "site-b"
    bridge.run(bridge.servicer.control.broadcast_directory())
    wait_until(lambda: "SECURITY: the bridge offers identity" in net.log("site-a"), what="the key-swap alert")
    answer = exchange(_port(net), associate_rq(called="ARCHIVE_B", calling="WS_A"))
    assert answer[0] == PduType.ASSOCIATE_RJ
    assert parse_reject(answer) == (1, 1, 7)
    assert "identity key changed" in net.log("site-a")


def _canary_series(directory: Path, marker: str) -> list[Path]:
    series = generate_ct_series(3, rows=64, cols=64, patient_id=f"ID-{marker}", patient_name=f"CANARY^{marker}")
    for ds in series:  # the marker in the pixel bytes too
        pixels = bytearray(ds.PixelData)
        pixels[100 : 100 + len(marker)] = marker.encode()
        ds.PixelData = bytes(pixels)
    return write_series(series, directory)


def test_canary_never_reaches_the_bridge(evil, tmp_path: Path) -> None:
    """Find, move, get and store of marked datasets: the marker appears nowhere the bridge can see."""
    net, bridge, archive, workstation = evil
    marker = uuid.uuid4().hex.upper()[:16]
    stored = _canary_series(tmp_path / "at-b", marker)
    archive.load(stored)
    new = _canary_series(tmp_path / "from-a", marker[::-1])
    originals = fingerprints(stored)

    ae = AE(ae_title="WS_A")
    for context in (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelGet,
        CTImageStorage,
    ):
        ae.add_requested_context(context)
    got: dict[str, str] = {}

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        got.update(fingerprints([ds]))
        return 0

    assoc = ae.associate(
        HOST,
        _port(net),
        ae_title="ARCHIVE_B",
        ext_neg=[build_role(CTImageStorage, scu_role=True, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = f"ID-{marker}"
    query.PatientName = ""
    query.StudyInstanceUID = ""
    found = [
        ds
        for st, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        if st and st.Status == 0xFF00
    ]
    assert [str(ds.PatientName) for ds in found] == [f"CANARY^{marker}"]
    study = Dataset()
    study.QueryRetrieveLevel = "STUDY"
    study.StudyInstanceUID = found[0].StudyInstanceUID
    assert [s for s, _ in assoc.send_c_move(study, "WS_A", StudyRootQueryRetrieveInformationModelMove)][-1].Status == 0
    assert [s for s, _ in assoc.send_c_get(study, StudyRootQueryRetrieveInformationModelGet)][-1].Status == 0
    assert all(assoc.send_c_store(pydicom.dcmread(p)).Status == 0 for p in new)
    assoc.release()
    wait_until(lambda: workstation.fingerprints() == originals, what="the moved images at WS_A")
    assert got == originals

    # Positive control: the marker is really in what the archives hold and what crossed the bridge is sizeable.
    raw_marker = marker.encode()
    assert any(raw_marker in p.read_bytes() for p in stored)
    crossed = b"".join(ATTACK.captured)
    assert len(crossed) > sum(p.stat().st_size for p in stored)
    for text in (raw_marker, marker[::-1].encode(), f"CANARY^{marker}".encode()):
        assert text not in crossed, "patient data crossed the bridge in clear"
        for path in net.workdir.iterdir():
            if path.is_file() and (path.name.startswith("bridge") or path.name == "audit.jsonl"):
                assert text not in path.read_bytes(), f"patient data in the bridge's {path.name}"
