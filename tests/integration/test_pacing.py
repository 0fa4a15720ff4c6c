"""Frame pacing over a slow path: the receiving router reports the rate, the sender's frames shrink.

The bridge is the real one, in this process, with a splice that forwards each
frame only after the time it takes on a 1 MB/s link (the store-and-forward the
real bridge does at link speed on a WAN). Routers are real processes; storescu
is DCMTK; the archive is pynetdicom. Frame sizes are read where the bridge sees
them: the sealed payload of each Data frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc.aio
import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.server import RelayServicer
from relay_bridge.splice import Channel, Splice
from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.pace import FLAG_PACE
from tests.integration.conftest import require_dcmtk
from tests.support import dcmtk
from tests.support.inprocess_bridge import InProcessBridge

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
RATE = 1_000_000  # bytes per second through the bridge, each way
SEEN: dict[bool, list[pb.Data]] = {True: [], False: []}  # from_initiator -> data frames in order


class SlowSplice(Splice):
    async def pump(self, read, outbound: Channel, *, from_initiator: bool) -> None:
        async def slow_read():
            frame = await read()
            if frame is None or frame is grpc.aio.EOF:
                return frame
            await asyncio.sleep(len(frame) / RATE)
            parsed = pb.Frame.FromString(frame)
            if parsed.HasField("data"):
                SEEN[from_initiator].append(parsed.data)
            return frame

        await super().pump(slow_read, outbound, from_initiator=from_initiator)


class SlowServicer(RelayServicer):
    splice_class = SlowSplice


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(generate_ct_series(10, seed=11), tmp_path_factory.mktemp("paced-ct"))


@pytest.fixture
def slow_net(tmp_path: Path) -> Iterator[LocalRelayNetwork]:
    SEEN[True].clear()
    SEEN[False].clear()
    net = LocalRelayNetwork(tmp_path / "net").start(bridge=False)
    bridge = InProcessBridge(net, SlowServicer)
    yield net
    for name in list(net.sites):
        net.stop_router(name)
    bridge.stop()


def store(net: LocalRelayNetwork, archive: DemoArchive, files: list[Path], **site_a: object) -> None:
    net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
    a = net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], **site_a)
    net.wait_connected()
    assert a.port
    dcmtk.storescu(HOST, a.port, "ARCHIVE_B", "WS", files, timeout=120).check()
    assert archive.fingerprints() == fingerprints(files)


def sizes(frames: list[pb.Data]) -> list[int]:
    return [len(d.payload) for d in frames if not d.flags & FLAG_PACE]


def test_frames_shrink_to_the_reported_rate(
    slow_net: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive], ct_files: list[Path]
) -> None:
    require_dcmtk("storescu")
    store(slow_net, archive_factory("ARCHIVE_B"), ct_files)
    reports = [d for d in SEEN[False] if d.flags & FLAG_PACE]
    assert reports, "the receiving router sent no pace report"
    sent = sizes(SEEN[True])
    # Before the first report: 64 KiB of plaintext per frame, about 27 KB once compressed.
    assert max(sent[:8]) > 20_000, f"frames before the first report: {sent[:8]}"
    # 1 MB/s x 5 ms = 5 KB on the wire wanted; the sender's floor is 16 KiB of plaintext, ~7 KB compressed.
    late = sent[len(sent) // 2 :]
    assert max(late) <= 12_000, f"paced frames on the wire: {sorted(late)[-5:]}"


def test_pacing_off_keeps_full_frames(
    slow_net: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive], ct_files: list[Path]
) -> None:
    require_dcmtk("storescu")
    store(slow_net, archive_factory("ARCHIVE_B"), ct_files, frame_time_ms=0)
    late = sizes(SEEN[True])[len(SEEN[True]) // 2 :]
    assert max(late) > 64 * 1024, "with frame_time_ms = 0 the sender keeps reading frame_bytes at a time"
