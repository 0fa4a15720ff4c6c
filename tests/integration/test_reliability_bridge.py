"""Malformed frames at the bridge, from a raw gRPC client that signs on like a router and then misbehaves.

The bridge's Associate method takes raw bytes (identity serializers) and parses only the first frame
of each stream, so every kind of garbage a compromised or buggy router could send is tried here:
missing or wrong session tokens, a first frame that is not Open/Join, bytes that are not protobuf,
unknown or reused association ids, frames beyond the maximum message size, garbage and cancellation
in the middle of a spliced association. After each, two real routers must still relay a C-ECHO.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.seal import KEM_NAME, Identity
from tests.integration.test_reliability import HOST, echo, quiet_site, wait_until

pytestmark = pytest.mark.integration
ASSOCIATE = "/relay.v1.Relay/Associate"
MAX_FRAME = 16 * 1024 * 1024  # the bridge's default [limits] max_frame_bytes; it accepts that + 64 KiB
_END = object()


class RawStream:
    """One bidirectional call with raw bytes both ways; responses are collected by a thread."""

    def __init__(self, channel: grpc.Channel, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        self.call = channel.stream_stream(method)(iter(self._requests.get, _END), metadata=metadata)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.responses.put(message)
        except grpc.RpcError:
            pass
        self.responses.put(_END)

    def send(self, data: bytes) -> None:
        self._requests.put(data)

    def done_writing(self) -> None:
        self._requests.put(_END)

    def next(self, timeout: float = 10.0) -> Any:
        """The next message (bytes), or None once the call has ended."""
        item = self.responses.get(timeout=timeout)
        return None if item is _END else item

    def next_frame(self, timeout: float = 10.0) -> pb.Frame | None:
        raw = self.next(timeout)
        return None if raw is None else pb.Frame.FromString(raw)

    def status(self, timeout: float = 10.0) -> grpc.StatusCode:
        """Wait for the call to end; its status code."""
        deadline = time.monotonic() + timeout
        while self.call.code() is None:  # code() blocks until the call terminates
            assert time.monotonic() < deadline
        return self.call.code()

    def cancel(self) -> None:
        self.call.cancel()
        self._requests.put(_END)


@dataclass
class RawRouter:
    """A gRPC client signed on as a router account: its control stream stays open for the whole test."""

    name: str
    channel: grpc.Channel
    session: str
    control: RawStream

    def associate(self, token: str | None = None) -> RawStream:
        session = self.session if token is None else token
        return RawStream(self.channel, ASSOCIATE, (("relay-session", session),) if session else ())

    def incoming(self, timeout: float = 10.0) -> pb.IncomingAssociation:
        """The next IncomingAssociation notice on the control stream (directories etc. are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            raw = self.control.next(max(0.1, deadline - time.monotonic()))
            assert raw is not None, "the control stream ended"
            message = pb.BridgeMessage.FromString(raw)
            if message.HasField("incoming"):
                return message.incoming


def raw_channel(net: LocalRelayNetwork) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=(net.workdir / "ca.pem").read_bytes())
    return grpc.secure_channel(
        f"{HOST}:{net.bridge_port}",
        credentials,
        options=[
            ("grpc.ssl_target_name_override", "localhost"),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
        ],
    )


def sign_on(net: LocalRelayNetwork, name: str, devices: list[pb.SharedDevice] = ()) -> RawRouter:  # type: ignore[assignment]
    site = quiet_site(net, name, start=False)  # an account and password, but no router process
    identity = Identity.generate()
    channel = raw_channel(net)
    control = RawStream(channel, "/relay.v1.Relay/Control")
    control.send(
        pb.RouterMessage(
            sign_on=pb.SignOn(
                account=name,
                password=site.password,
                software_version="raw-test-client",
                protocols=["relay.v1"],
                devices=list(devices),
                identity=pb.Identity(sign_key=identity.public.sign_key, kem_key=identity.public.kem_key, kem=KEM_NAME),
            )
        ).SerializeToString()
    )
    first = pb.BridgeMessage.FromString(control.next())
    assert first.sign_on_result.ok, first.sign_on_result.error
    return RawRouter(name, channel, first.sign_on_result.session, control)


def frame(**kind: Any) -> bytes:
    return pb.Frame(**kind).SerializeToString()


def open_frame(aid: str, to_site: str = "raw-2", called: str = "RAWDEV") -> bytes:
    return frame(
        open=pb.Open(
            association_id=aid,
            to_site=to_site,
            called_ae_title=called,
            calling_ae_title="RAW",
            first_data=pb.Data(payload=b"not really an A-ASSOCIATE-RQ", seq=0),
        )
    )


_ids = iter(range(1, 1 << 30))


def new_id() -> str:
    return f"{next(_ids):032x}"


@dataclass
class BridgeUnderTest:
    net: LocalRelayNetwork
    raw1: RawRouter
    raw2: RawRouter
    port_a: int

    def assert_serving(self) -> None:
        assert self.net.bridge is not None and self.net.bridge.poll() is None, "the bridge died"
        assert echo(self.port_a, "ARCHIVE_B"), "real routers can no longer relay through the bridge"


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeUnderTest]:
    archive = DemoArchive("ARCHIVE_B", 0, tmp_path_factory.mktemp("bridge-archive")).start()
    net = LocalRelayNetwork(tmp_path_factory.mktemp("bridge-frames")).start()
    raws: list[RawRouter] = []
    try:
        quiet_site(net, "site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
        port_a = quiet_site(net, "site-a", remote=[Remote("ARCHIVE_B", "site-b")]).port
        assert port_a
        raws.append(sign_on(net, "raw-1"))
        raws.append(sign_on(net, "raw-2", [pb.SharedDevice(ae_title="RAWDEV", share_with=["raw-1"])]))
        net.wait_connected()
        under_test = BridgeUnderTest(net, raws[0], raws[1], port_a)
        under_test.assert_serving()
        yield under_test
    finally:
        for raw in raws:
            raw.control.cancel()
            raw.channel.close()
        net.stop()
        archive.stop()


# -- refused before any splice: (name, how to call, the status the bridge must end the call with) ---------

FIRST_FRAMES: dict[str, tuple[Callable[[BridgeUnderTest], RawStream], list[bytes], grpc.StatusCode]] = {
    "no session token": (lambda b: b.raw1.associate(token=""), [open_frame(new_id())], grpc.StatusCode.UNAUTHENTICATED),
    "a made-up session token": (
        lambda b: b.raw1.associate(token="x" * 43),
        [open_frame(new_id())],
        grpc.StatusCode.UNAUTHENTICATED,
    ),
    "first frame is Data": (
        lambda b: b.raw1.associate(),
        [frame(data=pb.Data(payload=b"hi", seq=0))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "first frame is Close": (
        lambda b: b.raw1.associate(),
        [frame(close=pb.Close(reason=pb.Close.ABORTED))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "first frame is empty bytes": (lambda b: b.raw1.associate(), [b""], grpc.StatusCode.INVALID_ARGUMENT),
    "first frame is not protobuf": (
        lambda b: b.raw1.associate(),
        [b"\xff\xff\xff\xff\x0f garbage"],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "first frame is a truncated Open": (
        lambda b: b.raw1.associate(),
        [open_frame(new_id())[:-7]],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "Join for an unknown association": (
        lambda b: b.raw2.associate(),
        [frame(join=pb.Join(association_id=new_id()))],
        grpc.StatusCode.NOT_FOUND,
    ),
    "Open with a non-hex association id": (
        lambda b: b.raw1.associate(),
        [open_frame("Z" * 32)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "Open with a 31-digit association id": (
        lambda b: b.raw1.associate(),
        [open_frame("a" * 31)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "Open with an empty association id": (
        lambda b: b.raw1.associate(),
        [open_frame("")],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "first frame beyond the maximum message size": (
        lambda b: b.raw1.associate(),
        [b"\0" * (MAX_FRAME + 128 * 1024)],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
}


@pytest.mark.parametrize("name", list(FIRST_FRAMES))
def test_bad_first_frame_is_refused_with_a_status(bridge: BridgeUnderTest, name: str) -> None:
    make, frames, expected = FIRST_FRAMES[name]
    stream = make(bridge)
    for data in frames:
        stream.send(data)
    assert stream.status(timeout=15) == expected, f"{name}: {stream.call.code()} {stream.call.details()}"
    stream.cancel()
    bridge.assert_serving()


def test_control_stream_garbage_is_refused(bridge: BridgeUnderTest) -> None:
    not_sign_on = RawStream(bridge.raw1.channel, "/relay.v1.Relay/Control")
    not_sign_on.send(pb.RouterMessage(heartbeat=pb.Heartbeat(sent_unix_ms=1)).SerializeToString())
    assert not_sign_on.status() == grpc.StatusCode.INVALID_ARGUMENT
    garbage = RawStream(bridge.raw1.channel, "/relay.v1.Relay/Control")
    garbage.send(b"\xff\xff\xff\xff\x0f")
    assert garbage.status() not in (None, grpc.StatusCode.OK)  # the deserializer refuses it (INTERNAL)
    bridge.assert_serving()


# -- inside a splice -------------------------------------------------------------------------------------


def splice(bridge: BridgeUnderTest) -> tuple[str, RawStream, RawStream]:
    """raw-1 opens an association to raw-2's RAWDEV; raw-2 joins. Returns (id, initiator, destination)."""
    aid = new_id()
    initiator = bridge.raw1.associate()
    initiator.send(open_frame(aid))
    notice = bridge.raw2.incoming()
    assert notice.association_id == aid and notice.from_site == "raw-1"
    destination = bridge.raw2.associate()
    destination.send(frame(join=pb.Join(association_id=aid)))
    answer = initiator.next_frame()
    assert answer is not None and answer.HasField("accepted"), answer
    return aid, initiator, destination


def test_garbage_inside_a_splice_is_forwarded_untouched(bridge: BridgeUnderTest) -> None:
    """The bridge does not parse frames after the first: garbage reaches the partner byte for byte (the
    routers check sequence numbers and seals), and ends of streams propagate both ways."""
    _, initiator, destination = splice(bridge)
    garbage = [b"\xff\xfe\xfd not protobuf", b"", frame(open=pb.Open(association_id=new_id())), bytes(range(256)) * 64]
    for data in garbage:
        initiator.send(data)
    assert [destination.next() for _ in garbage] == garbage
    destination.send(b"\x00\x01 backwards too")
    assert initiator.next() == b"\x00\x01 backwards too"
    # A clean end, as routers do it: Close then half-close, answered in kind (a side that does not
    # half-close within 1 s of its partner is called lost: the bridge then sends Close(ABORTED)).
    bye = frame(close=pb.Close(reason=pb.Close.PEER_CLOSED))
    initiator.send(bye)
    initiator.done_writing()
    assert destination.next() == bye
    destination.send(bye)
    destination.done_writing()
    assert initiator.next() == bye
    assert initiator.next() is None and destination.next() is None
    assert initiator.status() == destination.status() == grpc.StatusCode.OK
    bridge.assert_serving()


def ended_or_aborted(stream: RawStream, timeout: float = 10.0) -> str:
    """What the partner of a failed stream sees: "Close(ABORTED)" then the end, or just "end"."""
    first = stream.next_frame(timeout=timeout)
    if first is None:
        return "end"
    assert first.HasField("close") and first.close.reason == pb.Close.ABORTED, first
    assert stream.next(timeout=timeout) is None
    return f"Close(ABORTED, {first.close.detail!r})"


def test_oversized_frame_inside_a_splice_aborts_only_that_association(bridge: BridgeUnderTest) -> None:
    _, initiator, destination = splice(bridge)
    initiator.send(b"\0" * (MAX_FRAME + 128 * 1024))
    assert initiator.status(timeout=15) == grpc.StatusCode.RESOURCE_EXHAUSTED
    started = time.monotonic()
    seen = ended_or_aborted(destination)
    print(f"\noversized frame: the destination saw {seen} after {time.monotonic() - started:.2f} s")
    bridge.assert_serving()


def test_destination_cancelling_mid_splice_aborts_the_initiator(bridge: BridgeUnderTest) -> None:
    _, initiator, destination = splice(bridge)
    destination.cancel()
    started = time.monotonic()
    seen = ended_or_aborted(initiator)
    print(f"\ndestination cancelled: the initiator saw {seen} after {time.monotonic() - started:.2f} s")
    bridge.assert_serving()


def test_reused_and_abandoned_association_ids(bridge: BridgeUnderTest) -> None:
    aid, initiator, destination = splice(bridge)
    # The same id again, while it is in use: refused; a second Join for it: refused.
    again = bridge.raw1.associate()
    again.send(open_frame(aid))
    assert again.status() == grpc.StatusCode.INVALID_ARGUMENT
    second_join = bridge.raw2.associate()
    second_join.send(frame(join=pb.Join(association_id=aid)))
    assert second_join.status() == grpc.StatusCode.NOT_FOUND
    # raw-1 may not join an association addressed to raw-2.
    initiator.cancel()
    destination.cancel()
    abandoned = new_id()
    opener = bridge.raw1.associate()
    opener.send(open_frame(abandoned))
    assert bridge.raw2.incoming().association_id == abandoned
    wrong_site = bridge.raw1.associate()
    wrong_site.send(frame(join=pb.Join(association_id=abandoned)))
    assert wrong_site.status() == grpc.StatusCode.NOT_FOUND
    # The caller gives up before the destination joins: the id is forgotten, a late Join finds nothing.
    opener.cancel()
    wait_until(
        lambda: any(
            "association closed" in line and abandoned in line for line in bridge.net.log("bridge").splitlines()
        ),
        timeout=10,
        what="the bridge to drop the abandoned association",
    )
    late = bridge.raw2.associate()
    late.send(frame(join=pb.Join(association_id=abandoned)))
    assert late.status() == grpc.StatusCode.NOT_FOUND
    bridge.assert_serving()
