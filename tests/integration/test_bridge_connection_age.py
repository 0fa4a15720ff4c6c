"""`[limits] max_connection_age_s`: what gRPC's connection age does to a running association (measured).

After the age the bridge sends GOAWAY (no new streams on that connection; clients reconnect), and
running calls continue for `connection_age_grace_s`; after the grace the connection is closed,
running association or not. So the age is off by default, and with it on the grace must exceed the
longest association (docs/security.md, "What a hostile router meets at the bridge").
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_demo.network import LocalRelayNetwork
from tests.integration.test_reliability_bridge import RawRouter, RawStream, frame, new_id, open_frame, sign_on

pytestmark = pytest.mark.integration
AGE_S = 2.0
# With a 1 s grace the bridge closes each raw router's connection about CUT_AGE_S + 1 s after it was made
# (gRPC adds up to 10 % of jitter to the age): two sign-ons and a splice must fit in that, even on a
# loaded CI machine (2 s were not enough under pytest-xdist).
CUT_AGE_S = 6.0
SHORT_GRACE_S = 1.0


def aged_bridge(
    tmp_path_factory: pytest.TempPathFactory, grace_s: float, age_s: float = AGE_S
) -> tuple[LocalRelayNetwork, list[RawRouter]]:
    net = LocalRelayNetwork(tmp_path_factory.mktemp("aged")).start(bridge=False)
    with (net.workdir / "bridge.toml").open("a") as toml:
        toml.write(f"\n[limits]\nmax_connection_age_s = {age_s}\nconnection_age_grace_s = {grace_s}\n")
    net.start_bridge()
    raw1 = sign_on(net, "raw-1")
    raw2 = sign_on(net, "raw-2", [pb.SharedDevice(ae_title="RAWDEV", share_with=["raw-1"])])
    return net, [raw1, raw2]


@pytest.fixture
def long_grace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RawRouter]]:
    net, raws = aged_bridge(tmp_path_factory, grace_s=60)
    yield raws
    for raw in raws:
        raw.control.cancel()
        raw.channel.close()
    net.stop()


@pytest.fixture
def short_grace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RawRouter]]:
    net, raws = aged_bridge(tmp_path_factory, grace_s=SHORT_GRACE_S, age_s=CUT_AGE_S)
    yield raws
    for raw in raws:
        raw.control.cancel()
        raw.channel.close()
    net.stop()


def spliced(raw1: RawRouter, raw2: RawRouter) -> tuple[RawStream, RawStream]:
    """An association from raw1 to raw2, accepted by the bridge: (initiator, destination) streams."""
    aid = new_id()
    initiator = raw1.associate()
    initiator.send(open_frame(aid))
    assert raw2.incoming().association_id == aid
    destination = raw2.associate()
    destination.send(frame(join=pb.Join(association_id=aid)))
    answer = initiator.next_frame()
    assert answer is not None and answer.HasField("accepted"), answer
    return initiator, destination


def held_association(raw1: RawRouter, raw2: RawRouter, hold_s: float) -> pb.Frame | None:
    """Splice an association, hold it for `hold_s`, then send one frame across; what arrives (or None)."""
    initiator, destination = spliced(raw1, raw2)
    time.sleep(hold_s)
    initiator.send(frame(data=pb.Data(payload=b"still here", seq=1)))
    try:
        return destination.next_frame(timeout=10)
    finally:
        initiator.cancel()
        destination.cancel()


def test_an_association_outlives_the_connection_age_within_the_grace(long_grace: list[RawRouter]) -> None:
    arrived = held_association(*long_grace, hold_s=3 * AGE_S)
    assert arrived is not None and arrived.data.payload == b"still here"


def test_the_grace_cuts_a_longer_association(short_grace: list[RawRouter]) -> None:
    initiator, destination = spliced(*short_grace)
    try:
        # Wait for the cut itself (the stream ends, or the bridge closes the association), not a sleep.
        deadline = time.monotonic() + CUT_AGE_S * 1.1 + SHORT_GRACE_S + 10
        while (raw := destination.next(timeout=max(0.1, deadline - time.monotonic()))) is not None:
            if pb.Frame.FromString(raw).HasField("close"):
                break
    except queue.Empty:
        pytest.fail(f"the association outlived the connection age ({CUT_AGE_S} s) and the grace", pytrace=False)
    try:
        initiator.send(frame(data=pb.Data(payload=b"still here", seq=1)))
        arrived = destination.next_frame(timeout=3)
        assert arrived is None, f"the association went on after the cut: {arrived}"
    except queue.Empty:
        pass  # the destination's call is still open after a Close, and nothing crossed
    finally:
        initiator.cancel()
        destination.cancel()
