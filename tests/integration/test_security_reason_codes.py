"""What the routers tell each other through the bridge is a code, not text (issue 17, items 5 and 6).

The bridge is the real one in this process, with a subclass that records every Close and
Refused frame the routers send through it; the routers are real processes over gRPC and TLS,
the devices pynetdicom. A device that rejects (A-ASSOCIATE-RJ), one that cannot be reached,
a workstation that aborts and a normal release: the bridge sees codes and at most a fixed
text, while each router's own log keeps the human detail. Then the bridge sends hostile audit
notices, which the router drops or escapes before its audit trail.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import grpc.aio
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.server import RelayServicer
from relay_bridge.splice import Splice
from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.close_codes import FIXED_DETAILS
from tests.support.inprocess_bridge import InProcessBridge
from tests.support.ports import free_port
from tests.support.wire import wait_until

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
SEEN: list[pb.Frame] = []  # Close and Refused frames, as the bridge relayed them


class RecordingSplice(Splice):
    async def pump(self, read, outbound, *, from_initiator: bool) -> None:
        async def recording_read():
            frame = await read()
            if frame is not grpc.aio.EOF:
                parsed = pb.Frame.FromString(frame)
                if parsed.WhichOneof("kind") in ("close", "refused"):
                    SEEN.append(parsed)
            return frame

        await super().pump(recording_read, outbound, from_initiator=from_initiator)


class RecordingServicer(RelayServicer):
    splice_class = RecordingSplice


@pytest.fixture
def network(
    tmp_path_factory: pytest.TempPathFactory, archive_factory: Callable[..., DemoArchive]
) -> Iterator[tuple[LocalRelayNetwork, InProcessBridge]]:
    SEEN.clear()
    rejector = AE(ae_title="REJECTOR")
    rejector.add_supported_context(Verification)
    rejector.require_calling_aet = ["SOMEONE_ELSE"]  # A-ASSOCIATE-RJ: calling AE title not recognised
    server = rejector.start_server((HOST, 0), block=False)
    closed_port = free_port()  # a port nobody listens on
    archive = archive_factory("ARCHIVE_B")
    net = LocalRelayNetwork(tmp_path_factory.mktemp("codes")).start(bridge=False)
    bridge = InProcessBridge(net, RecordingServicer)
    shared = [
        Shared("ARCHIVE_B", HOST, archive.port, ["site-a"]),
        Shared("REJECTOR", HOST, server.server_address[1], ["site-a"]),
        Shared("GONE", HOST, closed_port, ["site-a"]),
    ]
    net.add_site("site-b", shared=shared)
    net.add_site("site-a", remote=[Remote(s.ae_title, "site-b") for s in shared])
    net.wait_connected()
    yield net, bridge
    for name in net.sites:
        net.stop_router(name)
    bridge.stop()
    server.shutdown()


def _associate(net: LocalRelayNetwork, called: str):
    ae = AE(ae_title="WS_A")
    ae.add_requested_context(Verification)
    port = net.sites["site-a"].port
    assert port
    return ae.associate(HOST, port, ae_title=called)


def _audit(net: LocalRelayNetwork, site: str) -> list[dict[str, object]]:
    path = net.workdir / f"audit-{site}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_close_and_refused_carry_codes_only_and_the_detail_stays_in_each_log(network) -> None:
    net, _bridge = network

    def rejected_by_the_device() -> bool:  # until A's directory lists it, A itself rejects the title
        assert _associate(net, "REJECTOR").is_rejected
        return "association rejected by the called device: result" in net.log("site-b")

    wait_until(rejected_by_the_device, what="B's device rejecting", step=0.5)
    unreachable = _associate(net, "GONE")
    assert unreachable.is_rejected
    released = _associate(net, "ARCHIVE_B")
    assert released.is_established and released.send_c_echo().Status == 0
    released.release()
    aborted = _associate(net, "ARCHIVE_B")
    assert aborted.is_established
    aborted.abort()
    wait_until(lambda: sum(1 for f in SEEN if f.HasField("close")) >= 3, what="the routers' Close frames")
    wait_until(lambda: any(f.HasField("refused") for f in SEEN), what="site-b's Refused")

    closes = [f.close for f in SEEN if f.HasField("close")]
    refusals = [f.refused for f in SEEN if f.HasField("refused")]
    assert all(c.detail in FIXED_DETAILS or c.detail == "" for c in closes), closes
    assert all(r.detail in FIXED_DETAILS or r.detail == "" for r in refusals), refusals
    assert pb.Close.CODE_DEVICE_REJECTED in {c.code for c in closes}
    assert [r.reason for r in refusals] == [pb.Refused.DEVICE_UNREACHABLE]
    for text in ("SOMEONE_ELSE", "WS_A", "result", "source", str(HOST)):
        assert not any(text in c.detail for c in closes + refusals), text  # type: ignore[operator]

    # Each router keeps its own detail: B knows why its device rejected and where it could not connect ...
    assert "cannot connect to 127.0.0.1:" in net.log("site-b")
    # ... and A reads the device's RJ itself, end to end through the sealed frames, and turns the
    # unreachable device's code into a message of its own.
    assert "association rejected by the called device: result 1, source 1, reason 3" in net.log("site-a")
    assert "association refused: the remote router could not reach its device" in net.log("site-a")


def test_hostile_audit_notices_are_dropped_or_escaped(network) -> None:
    net, bridge = network
    session = bridge.servicer.sessions["site-b"]
    hostile = [
        pb.AuditNotice(event="sign_on\x1b[2J" + "X" * 100_000, peer_site="site-a", ae_title="ARCHIVE_B"),
        pb.AuditNotice(event="identity_mismatch", peer_site="site-a"),
        pb.AuditNotice(event="access_refused", peer_site="evil site\nforged", ae_title="ARCHIVE_B"),
        pb.AuditNotice(event="access_refused", peer_site="site-a", ae_title="ARCHIVE_B", detail="ok\x1b[31m\n" * 500),
    ]
    for notice in hostile:
        bridge.call(lambda n=notice: session.send(pb.BridgeMessage(audit=n)))
    wait_until(
        lambda: any(e.get("reported_by") == "bridge" for e in _audit(net, "site-b")), what="the valid notice's audit"
    )
    recorded = [e for e in _audit(net, "site-b") if e.get("reported_by") == "bridge"]
    assert len(recorded) == 1  # only the known event with valid fields
    (event,) = recorded
    assert (event["event"], event["peer_site"], event["ae_title"]) == ("access_refused", "site-a", "ARCHIVE_B")
    assert "\x1b" not in str(event["detail"]) and "\n" not in str(event["detail"])
    assert str(event["detail"]).endswith("...(+3744 chars)")  # cut at 256 characters before escaping
    messages = "\n".join(json.loads(line)["msg"] for line in net.log("site-b").splitlines() if line.startswith("{"))
    assert "dropped an audit notice from the bridge: unknown event 'sign_on\\x1b[2JXXX" in messages
    assert "dropped an audit notice from the bridge: unknown event 'identity_mismatch'" in messages
    assert "dropped an audit notice from the bridge: invalid peer site 'evil site\\x0aforged'" in messages
    assert "X" * 200 not in messages and "\x1b" not in messages
