"""RouterService carries out relay_router.routing's decisions: the DICOM answer, the typed outcome,
the audit outcome, the metric label and the log line (with a fake bridge link, no sockets)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_common.audit import read_events
from relay_common.config import parse_config
from relay_common.errors import Reason
from relay_router.approvals import ApprovalStore
from relay_router.config import RouterConfig
from relay_router.outcome import Result
from relay_router.seal import AssociationContext, Identity, initiate
from relay_router.service import RouterService
from relay_router.ul import parse_reject
from relay_router.wire.codec import first_frame, handshake_message
from relay_router.wire.features import Features
from tests.unit.ul.builders import associate_rq


class FakeStream:
    """The association stream a join returns: records what the router sends."""

    def __init__(self) -> None:
        self.sent: list[pb.Frame] = []
        self.finished = False

    async def send(self, frame: pb.Frame) -> None:
        self.sent.append(frame)

    async def finish(self) -> None:
        self.finished = True


class FakeWriter:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else None


def make_service(tmp_path: Path, *, max_associations: int = 10) -> RouterService:
    doc = {
        "router": {"name": "hospital-a", "state_dir": str(tmp_path / "state")},
        "bridge": {"address": "bridge:443", "insecure": True, "password": "correct horse battery"},
        "dicom": {"listen": "127.0.0.1:0", "max_associations": max_associations},
        "audit": {"file": str(tmp_path / "audit.jsonl")},
        "shared": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 9, "share_with": ["hospital-b"]}],
        "remote": [{"ae_title": "B_CT", "site": "hospital-b", "remote_ae_title": "CT"}],
    }
    service = RouterService(parse_config(doc, RouterConfig, base_dir=tmp_path))
    service.link.site = "hospital-a"
    return service


def notice(called: str = "PACS", from_site: str = "hospital-b", aid: str = "a" * 32) -> pb.IncomingAssociation:
    return pb.IncomingAssociation(association_id=aid, from_site=from_site, called_ae_title=called)


async def incoming(service: RouterService, n: pb.IncomingAssociation) -> FakeStream:
    stream = FakeStream()

    async def join(association_id: str, offer: pb.DirectJoin | None = None) -> FakeStream:
        assert association_id == n.association_id
        return stream

    service.link.join = join  # type: ignore[method-assign]
    await service._incoming(n)
    return stream


def audit(tmp_path: Path) -> list[dict[str, object]]:
    return [e for e in read_events(tmp_path / "audit.jsonl") if e["event"] == "association"]


def refusals(service: RouterService, reason: str) -> float | None:
    return service.metrics.registry.get_sample_value("relay_router_refusals_total", {"reason": reason})


async def test_not_shared_is_a_security_refusal_everywhere(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    service = make_service(tmp_path)
    with caplog.at_level(logging.INFO, logger="relay_router"):
        stream = await incoming(service, notice(from_site="hospital-c"))
    (frame,) = stream.sent
    assert frame.refused == pb.Refused(reason=pb.Refused.NOT_PERMITTED, detail="end-to-end authentication failed")
    assert stream.finished
    (outcome,) = service.history
    assert (outcome.result, outcome.reason, outcome.security) == (Result.REFUSED, Reason.NOT_PERMITTED, True)
    assert outcome.detail == "SECURITY: PACS is not shared with 'hospital-c'"
    (event,) = audit(tmp_path)
    assert (event["outcome"], event["result"], event["site"]) == ("alert", "refused", "hospital-c")
    assert refusals(service, "security") == 1 and refusals(service, "not_permitted") == 0
    (record,) = [r for r in caplog.records if r.name == "relay_router" and "not shared" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.security_alert == "access"  # type: ignore[attr-defined]
    assert record.getMessage() == (
        "SECURITY: PACS is not shared with 'hospital-c'; refused (the bridge should have refused it)"
    )
    assert not service.active


async def test_unknown_device_is_a_plain_refusal(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    stream = await incoming(service, notice("GHOST"))
    # The code crosses the bridge, the text (naming what was asked for) stays in this router's audit.
    assert stream.sent[0].refused == pb.Refused(reason=pb.Refused.UNKNOWN_DEVICE, detail="")
    (event,) = audit(tmp_path)
    assert event["outcome"] == "failure" and event["detail"] == "no shared device 'GHOST'"
    assert refusals(service, "unknown_device") == 1


async def test_a_replayed_association_is_refused_after_the_first_was_admitted(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    service._seen_associations.add("b" * 32)  # admitted earlier
    stream = await incoming(service, notice(aid="b" * 32))
    assert stream.sent[0].refused.reason == pb.Refused.NOT_PERMITTED
    assert stream.sent[0].refused.detail == "end-to-end authentication failed"
    (outcome,) = service.history
    assert (outcome.reason, outcome.security) == (Reason.SECURITY, True)
    assert audit(tmp_path)[0]["outcome"] == "alert"


async def test_a_forged_notice_does_not_enter_the_replay_record(tmp_path: Path) -> None:
    """A notice with no valid handshake is refused, and its id is not recorded: forged notices cannot fill
    the record or push a real id out of it (issue 17, item 10)."""
    service = make_service(tmp_path)
    stream = await incoming(service, notice(aid="c" * 32))
    assert stream.sent[0].refused.reason == pb.Refused.NOT_PERMITTED
    (outcome,) = service.history
    assert outcome.reason is Reason.SECURITY and outcome.detail.startswith("SECURITY: ")
    assert "c" * 32 not in service._seen_associations and len(service._seen_associations) == 0


def signed_notice(service: RouterService, caller: Identity, aid: str) -> pb.IncomingAssociation:
    """What the bridge hands on for a real Open from hospital-b (seal.initiate with hospital-b's key)."""
    offered = Features.offer(compression=True).names()
    ctx = AssociationContext(aid, "hospital-b", "hospital-a", "PACS")
    handshake, sealer = initiate(caller, service.link.identity.public, ctx, offered)
    return pb.IncomingAssociation(
        association_id=aid,
        from_site="hospital-b",
        called_ae_title="PACS",
        first_frame=pb.Frame(data=first_frame(sealer, associate_rq(called="PACS", calling="CT"))),
        handshake=handshake_message(handshake),
        features=offered,
    )


async def test_forged_notices_cannot_evict_a_real_id_and_the_record_survives_a_restart(tmp_path: Path) -> None:
    caller = Identity.generate()
    service = make_service(tmp_path)
    ApprovalStore(tmp_path / "state").approve("hospital-b", caller.public.fingerprint)  # as its operator would
    service.link.peers.update({"hospital-b": caller.public})
    real = signed_notice(service, caller, "d" * 32)
    stream = await incoming(service, real)
    # Verified, recorded, then the device (port 9, closed) could not be reached.
    assert stream.sent[0].refused.reason == pb.Refused.DEVICE_UNREACHABLE
    assert "d" * 32 in service._seen_associations
    for n in range(300):  # forged notices, as many as the bridge likes: none enters the record
        await incoming(service, notice(aid=f"{n:032x}"))
    assert len(service._seen_associations) == 1 and "d" * 32 in service._seen_associations
    replay = await incoming(service, real)
    assert replay.sent[0].refused == pb.Refused(
        reason=pb.Refused.NOT_PERMITTED, detail="end-to-end authentication failed"
    )
    assert "was already seen (replayed by the bridge?)" in service.history[-1].detail

    restarted = make_service(tmp_path)  # same state_dir: the record is read back
    restarted.link.peers.update({"hospital-b": caller.public})
    again = await incoming(restarted, real)
    assert again.sent[0].refused.reason == pb.Refused.NOT_PERMITTED
    (outcome,) = restarted.history
    assert outcome.detail == f"SECURITY: association {'d' * 32} was already seen (replayed by the bridge?)"
    assert outcome.security and audit(tmp_path)[-1]["outcome"] == "alert"


async def test_overload_is_refused_with_the_router_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    service = make_service(tmp_path, max_associations=1)
    service.active["x" * 32] = object()  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="relay_router"):
        stream = await incoming(service, notice())
    assert stream.sent[0].refused == pb.Refused(reason=pb.Refused.OVERLOADED)  # the text stays here
    assert refusals(service, "router_limit") == 1
    assert audit(tmp_path)[0]["outcome"] == "failure"
    (record,) = [r for r in caplog.records if r.name == "relay_router" and "association limit" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert (
        record.getMessage()
        == "refusing an association from hospital-b: site hospital-a has reached its association limit"
    )


async def local_call(service: RouterService, called: str) -> FakeWriter:
    reader = asyncio.StreamReader()
    reader.feed_data(associate_rq(called=called, calling="WS_A"))
    writer = FakeWriter()
    await service._local_connection(reader, writer)  # type: ignore[arg-type]
    return writer


async def test_an_unknown_called_title_gets_a_permanent_rejection(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    writer = await local_call(service, "NOPE")
    assert bytes(writer.data[:1]) == b"\x03" and writer.closed  # A-ASSOCIATE-RJ
    assert parse_reject(bytes(writer.data)) == (1, 1, 7)
    (event,) = audit(tmp_path)
    assert (event["outcome"], event["result"], event.get("site")) == ("failure", "rejected", None)
    assert event["detail"] == "called AE title 'NOPE' is not a remote device on this router"
    assert refusals(service, "unknown_called_ae") == 1


async def test_a_down_link_gets_a_transient_rejection_with_the_route(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    service.link.last_error = "connection refused"  # never signed on: no session
    assert not service.link.connected
    writer = await local_call(service, "B_CT")
    assert parse_reject(bytes(writer.data)) == (2, 3, 1)
    (event,) = audit(tmp_path)
    assert event["site"] == "hospital-b" and event["detail"] == "the bridge is not reachable (connection refused)"
    assert refusals(service, "bridge_unreachable") == 1
