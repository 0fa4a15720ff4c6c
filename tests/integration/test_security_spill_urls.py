"""A malicious bridge cannot make a router send requests into its hospital's LAN (issue 17, item 1).

The bridge hands out the presigned URLs of the cloud spill. Before, routers opened any http(s)
URL it gave, followed redirects and sent the failure's text back in `Close.detail`: a bridge
could make router A PUT to a service on A's LAN and router B GET from B's LAN, and read back an
errno or the first bytes of the answer. Here the real bridge runs in this process with a
servicer subclass that swaps the URLs for one of a "LAN service" (an HTTP server on 127.0.0.1
that records every request); the routers are real processes. Every attack must now fail: the
LAN service sees no request, the router logs the refusal (SECURITY), audits an alert, and the
other router learns only a fixed text.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc.aio
import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.server import RelayServicer
from relay_bridge.splice import Splice
from relay_common.audit import read_events
from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.spill_store import URL_REFUSED
from tests.support import dcmtk
from tests.support.inprocess_bridge import InProcessBridge
from tests.support.wire import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
HOST = "127.0.0.1"
ROUTER = {
    "spill_threshold_bytes": 256 << 10,
    "spill_part_bytes": 1 << 20,
    "frame_bytes": 64 << 10,
    "compression": False,
}
# An endpoint that is configured but never reached: URLs outside it are an attack.
ENDPOINT = {"spill_endpoints": ["https://blobs.invalid/bucket/"]}


class LanService(http.server.ThreadingHTTPServer):
    """A service inside the hospital: it answers everything (200, a secret body) and records each request."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                service.requests.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                body = b"INTERNAL-SECRET"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        super().__init__((HOST, 0), Handler)
        self.port = int(self.server_address[1])
        self.url = f"http://{HOST}:{self.port}/admin/reboot?x=1"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class ClosesSeen(Splice):
    """The real splice, recording what the bridge can read in each router's Close (the attacker's view)."""

    details: list[str] = []

    async def pump(self, read, outbound, *, from_initiator: bool) -> None:
        async def reading():
            frame = await read()
            if frame is not grpc.aio.EOF:
                parsed = pb.Frame.FromString(frame)
                if parsed.HasField("close"):
                    ClosesSeen.details.append(parsed.close.detail)
            return frame

        await super().pump(reading, outbound, from_initiator=from_initiator)


class SpillUrlAttack(RelayServicer):
    """The real bridge, but the URL of every upload (or download) slot points into the LAN."""

    splice_class = ClosesSeen
    target = ""
    downloads = False  # swap download URLs (router B's GETs) instead of upload URLs (router A's PUTs)

    async def BlobSlot(self, request: pb.BlobSlotRequest, context: grpc.aio.ServicerContext) -> pb.BlobSlotResponse:
        answer = await super().BlobSlot(request, context)
        if self.target and request.download == self.downloads:
            answer.url = self.target
        return answer


@pytest.fixture(scope="module")
def big_slice(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One slice of 2 MiB of pixels: spilled (threshold 256 KiB)."""
    return write_series(generate_ct_series(1, rows=1024, cols=1024, seed=17), tmp_path_factory.mktemp("big"))


@pytest.fixture
def lan() -> Iterator[LanService]:
    service = LanService()
    yield service
    service.shutdown()
    service.server_close()


@pytest.fixture
def attacked(
    tmp_path: Path, archive_factory: Callable[..., DemoArchive], lan: LanService
) -> Iterator[Callable[..., tuple[LocalRelayNetwork, DemoArchive, SpillUrlAttack]]]:
    """``attacked(downloads=..., **router_options)`` -> routers site-a -> site-b behind the attacking bridge."""
    if dcmtk.missing_tools(("storescu",)):
        pytest.fail("this test needs DCMTK's storescu (Debian: apt-get install dcmtk)", pytrace=False)
    made: list[tuple[LocalRelayNetwork, InProcessBridge]] = []

    def make(*, downloads: bool, **options: object) -> tuple[LocalRelayNetwork, DemoArchive, SpillUrlAttack]:
        ClosesSeen.details = []
        net = LocalRelayNetwork(tmp_path / "relay").start(bridge=False)
        bridge = InProcessBridge(net, SpillUrlAttack)
        made.append((net, bridge))
        bridge.servicer.target, bridge.servicer.downloads = lan.url, downloads
        archive = archive_factory("ARCHIVE_B")
        net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])], **ROUTER, **options)
        net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], **ROUTER, **options)
        net.wait_connected()
        return net, archive, bridge.servicer

    yield make
    for net, bridge in made:
        for name in list(net.sites):
            net.stop_router(name)
        bridge.stop()


def _store(net: LocalRelayNetwork, files: list[Path]) -> dcmtk.StoreResult:
    port = net.sites["site-a"].port
    assert port
    return dcmtk.storescu(HOST, port, "ARCHIVE_B", "WS", files)


def _association_events(net: LocalRelayNetwork, site: str) -> list[dict[str, object]]:
    net.stop_router(site)  # the audit record is complete once the router stopped
    return [e for e in read_events(net.workdir / f"audit-{site}.jsonl") if e["event"] == "association"]


def test_a_bridge_cannot_make_the_sending_router_put_into_its_lan(
    attacked: Callable[..., tuple[LocalRelayNetwork, DemoArchive, SpillUrlAttack]],
    lan: LanService,
    big_slice: list[Path],
) -> None:
    net, archive, _ = attacked(downloads=False, **ENDPOINT)
    result = _store(net, big_slice)
    assert not result.ok, "the association must be aborted: the bridge is hostile"
    assert lan.requests == [], "the router sent a request into its LAN"
    log_a = net.log("site-a")
    assert (
        f"aborting association: SECURITY: refused a spill URL at http://{HOST}:{lan.port}, "
        "outside [dicom] spill_endpoints"
    ) in log_a, log_a[-3000:]
    assert '"security_alert": "frame"' in log_a or "security_alert" in log_a
    # The router aborts the device's association and closes the stream at the same time: the Close may
    # cross the bridge after storescu has returned (late under load), so wait for it.
    wait_until(lambda: URL_REFUSED in ClosesSeen.details, timeout=30, what="the router's Close at the bridge")
    assert not any(str(lan.port) in d for d in ClosesSeen.details), "the refusal's details crossed the bridge"
    events = _association_events(net, "site-a")
    assert [e["outcome"] for e in events] == ["alert"], events
    assert archive.fingerprints() == {}


def test_a_bridge_cannot_make_the_receiving_router_get_from_its_lan(
    attacked: Callable[..., tuple[LocalRelayNetwork, DemoArchive, SpillUrlAttack]],
    lan: LanService,
    big_slice: list[Path],
) -> None:
    net, archive, _ = attacked(downloads=True, **ENDPOINT)
    result = _store(net, big_slice)
    assert not result.ok
    assert lan.requests == [], "the router sent a request into its LAN"
    log_b = net.log("site-b")
    assert (
        f"aborting association: SECURITY: refused a spill URL at http://{HOST}:{lan.port}, "
        "outside [dicom] spill_endpoints"
    ) in log_b, log_b[-3000:]
    # The router aborts the device's association and closes the stream at the same time: the Close may
    # cross the bridge after storescu has returned (late under load), so wait for it.
    wait_until(lambda: URL_REFUSED in ClosesSeen.details, timeout=30, what="the router's Close at the bridge")
    assert not any(str(lan.port) in d for d in ClosesSeen.details), "the refusal's details crossed the bridge"
    events = _association_events(net, "site-b")
    assert [e["outcome"] for e in events] == ["alert"], events
    assert archive.fingerprints() == {}, "no unauthenticated byte reached the archive"


def test_without_endpoints_an_http_spill_url_is_refused_and_the_data_set_goes_inline(
    attacked: Callable[..., tuple[LocalRelayNetwork, DemoArchive, SpillUrlAttack]],
    lan: LanService,
    big_slice: list[Path],
) -> None:
    """The default (and a configuration from before spill_endpoints): only the bridge's own store is used."""
    net, archive, _ = attacked(downloads=False)
    _store(net, big_slice).check()
    assert archive.fingerprints() == fingerprints(big_slice), "the slice arrived byte-identical, inline"
    assert lan.requests == []
    log_a = net.log("site-a")
    assert f"refused a spill URL at http://{HOST}:{lan.port}, and [dicom] spill_endpoints is empty" in log_a
    assert "sending" in log_a and "inline" in log_a
