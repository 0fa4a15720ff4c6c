"""Cloud spill end to end: storescu -> router -> blob store (by reference) -> router -> DemoArchive.

Big data sets travel through the bridge's blob store (the file:// default served by the
bridge, S3 on moto or GCS on gcp-storage-emulator, reached by the routers through presigned
URLs); small ones inline.
"""

from __future__ import annotations

import http.server
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.cloudstore.conftest import GCS_BUCKET, S3_BUCKET, ServerProcess
from tests.integration.cloudstore.spill_support import (
    HOST,
    ROUTER,
    bridge_bytes,
    bucket_keys,
    endpoint,
    gcs_names,
    pixel_bytes,
    require_dcmtk,
    service_account_file,
    store_study,
)
from tests.support import dcmtk
from tests.support.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two 8 MiB slices (spilled) and three 128 KiB slices (inline)."""
    directory = tmp_path_factory.mktemp("spill-study")
    big = write_series(generate_ct_series(2, rows=2048, cols=2048, seed=11), directory / "big")
    small = write_series(generate_ct_series(3, rows=256, cols=256, seed=12), directory / "small")
    return big + small


def test_spill_through_the_bridge_file_store(
    network_factory: Callable[..., LocalRelayNetwork],
    archive_factory: Callable[..., DemoArchive],
    study: list[Path],
    tmp_path: Path,
) -> None:
    require_dcmtk("storescu")
    blobs = tmp_path / "blobs"
    net = network_factory({"store": blobs.as_uri()})
    archive = archive_factory("ARCHIVE_B")
    store_study(net, archive, study).check()
    assert archive.fingerprints() == fingerprints(study)
    assert "spilled" in net.log("site-a")
    carried = bridge_bytes(net)
    big, small = pixel_bytes(study[:2]), pixel_bytes(study[2:])
    assert carried - 1.1 * small < 0.05 * big, f"the splice carried {carried} bytes; {big} bytes were to spill"
    assert not [p for p in blobs.rglob("*") if p.is_file()], "blobs remain after delivery"


def test_spill_through_s3_bypasses_the_bridge(
    network_factory: Callable[..., LocalRelayNetwork],
    archive_factory: Callable[..., DemoArchive],
    study: list[Path],
    moto_server: ServerProcess,
    moto_env: dict[str, str],
) -> None:
    require_dcmtk("storescu")
    prefix = f"relay-{os.getpid()}-{free_port()}/"
    net = network_factory(
        {"store": f"s3://{S3_BUCKET}/{prefix}", "endpoint_url": moto_server.url, "region": "us-east-1"}, moto_env
    )
    archive = archive_factory("ARCHIVE_B")
    store_study(net, archive, study, **endpoint(moto_server.url)).check()
    assert archive.fingerprints() == fingerprints(study)
    carried = bridge_bytes(net)
    big, small = pixel_bytes(study[:2]), pixel_bytes(study[2:])
    # Only the small (inline) slices, commands and reference frames cross it.
    assert carried < 0.05 * (big + small), f"the bridge carried {carried} of {big + small} bytes"
    assert bucket_keys(moto_server, prefix) == [], "blobs remain in the bucket after delivery"


def test_spill_through_gcs_bypasses_the_bridge(
    network_factory: Callable[..., LocalRelayNetwork],
    archive_factory: Callable[..., DemoArchive],
    study: list[Path],
    gcs_emulator: ServerProcess,
    tmp_path: Path,
) -> None:
    """The bridge holds the GCS store (the SDK's emulator variable, a local signing key); routers get V4 URLs."""
    require_dcmtk("storescu")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "STORAGE_EMULATOR"))}
    env.update(
        STORAGE_EMULATOR_HOST=gcs_emulator.url,
        GOOGLE_APPLICATION_CREDENTIALS=str(service_account_file(tmp_path / "sa.json")),
    )
    prefix = f"relay-{os.getpid()}-{free_port()}/"
    net = network_factory({"store": f"gs://{GCS_BUCKET}/{prefix}"}, env)
    archive = archive_factory("ARCHIVE_B")
    store_study(net, archive, study, **endpoint(gcs_emulator.url)).check()
    assert archive.fingerprints() == fingerprints(study)
    assert "spilled" in net.log("site-a")
    assert f"spill blob store: gs://{GCS_BUCKET}/{prefix}" in net.log("bridge")
    carried = bridge_bytes(net)
    big, small = pixel_bytes(study[:2]), pixel_bytes(study[2:])
    assert carried < 0.05 * (big + small), f"the bridge carried {carried} of {big + small} bytes"
    assert gcs_names(gcs_emulator, prefix) == [], "blobs remain in the bucket after delivery"


def test_store_down_falls_back_to_inline(
    network_factory: Callable[..., LocalRelayNetwork],
    archive_factory: Callable[..., DemoArchive],
    study: list[Path],
    moto_env: dict[str, str],
) -> None:
    """An S3 endpoint nobody listens on: presigning works, every PUT fails, the bytes go inline."""
    require_dcmtk("storescu")
    dead = f"http://127.0.0.1:{free_port()}"
    net = network_factory({"store": f"s3://{S3_BUCKET}/down/", "endpoint_url": dead, "region": "us-east-1"}, moto_env)
    archive = archive_factory("ARCHIVE_B")
    store_study(net, archive, study, **endpoint(dead)).check()
    assert archive.fingerprints() == fingerprints(study)
    assert "sending" in net.log("site-a") and "inline" in net.log("site-a")
    assert bridge_bytes(net) >= pixel_bytes(study)


class FaultyS3Proxy:
    """An HTTP proxy in front of moto that the bridge signs URLs for: it can corrupt GETs or fail PUTs."""

    def __init__(
        self,
        upstream: str,
        *,
        corrupt_gets: bool = False,
        fail_parts_from: int | None = None,
        delete_part: str | None = None,
    ) -> None:
        proxy = self
        # fail_parts_from=2: every PUT of part 2 or later of any blob fails. By part number, not by
        # arrival order: a blob's parts upload in parallel, and if part 0's PUT were the one to fail,
        # nothing would have been announced and the sender would rightly fall back to inline.
        self.corrupt_gets, self.fail_parts_from = corrupt_gets, fail_parts_from
        # delete_part="000001": the first such part is stored, then deleted from the store before the PUT is answered.
        self.delete_part = delete_part
        self.lock = threading.Lock()
        self.deleted: list[str] = []
        admin = boto3.client(
            "s3",
            endpoint_url=upstream,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "PUT" else None
                part = urllib.parse.urlsplit(self.path).path.rsplit("/", 1)[-1]
                if (
                    method == "PUT"
                    and proxy.fail_parts_from is not None
                    and part.isdigit()
                    and int(part) >= proxy.fail_parts_from
                ):
                    self.send_error(503, "store stopped")
                    return
                request = urllib.request.Request(upstream + self.path, data=body, method=method)
                for name, value in self.headers.items():  # the bridge's own requests are signed with their headers
                    if name.lower() not in ("connection", "content-length", "content-type"):
                        request.add_header(name, value)
                request.add_header("Content-Type", self.headers.get("Content-Type") or "application/octet-stream")
                try:
                    with opener.open(request, timeout=30) as response:
                        status, data = response.status, response.read()
                except urllib.error.HTTPError as exc:
                    status, data = exc.code, exc.read()
                bucket, _, key = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/").partition("/")
                if method == "PUT" and status == 200 and key.endswith(f"/{proxy.delete_part}"):
                    with proxy.lock:
                        first = not proxy.deleted
                        if first:
                            proxy.deleted.append(key)
                    if first:
                        admin.delete_object(Bucket=bucket, Key=key)
                if method == "GET" and proxy.corrupt_gets and len(data) > 100:
                    data = data[:50] + bytes([data[50] ^ 1]) + data[51:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_PUT(self) -> None:
                self._forward("PUT")

            def do_DELETE(self) -> None:  # the bridge deletes blobs through the same endpoint
                self._forward("DELETE")

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("fault", ["corrupt", "store_stops_mid_blob"])
def test_faults_abort_and_deliver_nothing_wrong(
    fault: str,
    network_factory: Callable[..., LocalRelayNetwork],
    archive_factory: Callable[..., DemoArchive],
    study: list[Path],
    moto_server: ServerProcess,
    moto_env: dict[str, str],
) -> None:
    require_dcmtk("storescu")

    proxy = FaultyS3Proxy(
        moto_server.url, corrupt_gets=fault == "corrupt", fail_parts_from=2 if fault != "corrupt" else None
    )
    try:
        prefix = f"fault-{fault}-{free_port()}/"
        net = network_factory(
            {"store": f"s3://{S3_BUCKET}/{prefix}", "endpoint_url": proxy.url, "region": "us-east-1"}, moto_env
        )
        archive = archive_factory("ARCHIVE_B")
        small_first = study[2:] + study[:2]
        result = store_study(net, archive, small_first, **endpoint(proxy.url))
        assert not result.ok, "storescu must see the association fail"
        received = archive.fingerprints()
        expected = fingerprints(small_first)
        assert received.items() <= expected.items(), "a wrong image was delivered"
        assert not set(received) & set(fingerprints(study[:2])), "a spilled data set arrived despite the fault"
        logs = net.log("site-a") + net.log("site-b")
        assert ("SECURITY" in logs) if fault == "corrupt" else ("middle of a blob" in logs)
    finally:
        proxy.close()


def test_blob_deleted_early_aborts_cleanly_and_the_router_goes_on(
    network_factory: Callable[..., LocalRelayNetwork],
    archive_factory: Callable[..., DemoArchive],
    study: list[Path],
    moto_server: ServerProcess,
    moto_env: dict[str, str],
) -> None:
    """Part 1 of the first blob is deleted from the store right after it was stored: A-ABORT, nothing wrong arrives."""
    require_dcmtk("storescu")
    proxy = FaultyS3Proxy(moto_server.url, delete_part="000001")
    try:
        prefix = f"deleted-{free_port()}/"
        net = network_factory(
            {"store": f"s3://{S3_BUCKET}/{prefix}", "endpoint_url": proxy.url, "region": "us-east-1"}, moto_env
        )
        archive = archive_factory("ARCHIVE_B")
        small_first = study[2:] + study[:2]
        result = store_study(net, archive, small_first, **endpoint(proxy.url))
        assert not result.ok, f"storescu must see the association fail; deleted {proxy.deleted}"
        assert len(proxy.deleted) == 1 and proxy.deleted[0].endswith("/000001"), proxy.deleted
        blob_id = proxy.deleted[0].split("/")[-2]
        received = archive.fingerprints()
        assert received == fingerprints(study[2:]), "only the small slices sent before the fault may arrive"
        log_b = net.log("site-b")
        assert (
            f"aborting association: blob {blob_id} part 1 is gone from the store (deleted before it was fetched): "
            "the store has no such part (HTTP 404 Not Found)" in log_b
        ), log_b[-3000:]
        assert "aborted" in net.log("site-a")
        # The same routers go on serving: the whole study again, spilled, byte-identical.
        archive.clear()
        spilled_before = net.log("site-a").count("spilled ")
        again = dcmtk.storescu(HOST, net.sites["site-a"].port, "ARCHIVE_B", "WS", study)
        again.check()
        assert archive.fingerprints() == fingerprints(study)
        assert net.log("site-a").count("spilled ") == spilled_before + len(study[:2])
        bridge_bytes(net)  # stops the routers: their associations end, the bridge deletes what is left
        assert bucket_keys(moto_server, prefix) == [], "blobs remain in the bucket"
    finally:
        proxy.close()


def test_a_router_with_spill_off_receives_everything_inline(
    network_factory: Callable[..., LocalRelayNetwork],
    archive_factory: Callable[..., DemoArchive],
    study: list[Path],
    tmp_path: Path,
) -> None:
    """`[dicom] spill = false` at the receiving router is announced: the sender never spills towards it."""
    require_dcmtk("storescu")
    blobs = tmp_path / "blobs"
    net = network_factory({"store": blobs.as_uri()})
    archive = archive_factory("ARCHIVE_B")
    net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])], **{**ROUTER, "spill": False})
    a = net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], **ROUTER)
    net.wait_connected()
    assert a.port
    dcmtk.storescu(HOST, a.port, "ARCHIVE_B", "WS", study).check()
    assert archive.fingerprints() == fingerprints(study)
    assert "spilled" not in net.log("site-a"), "site-a spilled towards a router that turned spill off"
    carried = bridge_bytes(net)
    assert carried > pixel_bytes(study), f"the bridge carried {carried} bytes: the big slices did not go inline"
    assert not blobs.exists() or not [p for p in blobs.rglob("*") if p.is_file()]
