"""A router's real uploads carry the length their presigned URL is signed for (issue 17, item 7).

The router asks for each part's upload slot with the part's stored size (`BlobSlotRequest.size`),
and the bridge signs S3 URLs with `Content-Length` as a signed header. moto does not check
signatures, so an HTTP proxy in front of it does: for every router PUT it recomputes the SigV4
query signature from the URL and the request's own `Content-Length`. A body of any other length
than the signed one would not verify, and a URL without `content-length` among its signed
headers would take any length: both fail the test.
"""

from __future__ import annotations

import hashlib
import hmac
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
from botocore.config import Config

from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork
from tests.integration.cloudstore.conftest import S3_BUCKET, ServerProcess
from tests.integration.cloudstore.spill_support import HOST, endpoint, require_dcmtk, store_study
from tests.support.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
SECRET = "testing"  # moto_env's secret key, which the bridge signs with


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="-_.~")


def signature_of(method: str, path: str, query: str, host: str, content_length: str) -> tuple[str, str, list[str]]:
    """(the URL's signature, the one recomputed for this request, its signed headers): SigV4 query auth."""
    params = urllib.parse.parse_qsl(query, keep_blank_values=True)
    given = dict(params)
    signed = given["X-Amz-SignedHeaders"].split(";")
    headers = {"host": host, "content-length": content_length}
    canonical_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(params) if k != "X-Amz-Signature")
    canonical = "\n".join(
        [
            method,
            path,
            canonical_query,
            "".join(f"{name}:{headers.get(name, '')}\n" for name in signed),
            ";".join(signed),
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = given["X-Amz-Credential"].split("/", 1)[1]
    date, region, service, _ = scope.split("/")
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", given["X-Amz-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{SECRET}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    mine = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return given["X-Amz-Signature"], mine, signed


class CheckingS3Proxy:
    """Forwards to moto; records, for each PUT of a blob part, its length and whether its signature holds."""

    def __init__(self, upstream: str) -> None:
        proxy = self
        self.puts: list[tuple[str, int, bool, bool]] = []  # (key, body length, length signed, signature ok)
        self.lock = threading.Lock()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _forward(self, method: str) -> None:
                length = self.headers.get("Content-Length") or "0"
                body = self.rfile.read(int(length)) if method == "PUT" else None
                split = urllib.parse.urlsplit(self.path)
                if method == "PUT" and "X-Amz-Signature" in split.query:
                    theirs, mine, signed = signature_of(
                        "PUT", split.path, split.query, self.headers.get("Host", ""), length
                    )
                    with proxy.lock:
                        proxy.puts.append((split.path, len(body or b""), "content-length" in signed, theirs == mine))
                request = urllib.request.Request(upstream + self.path, data=body, method=method)
                for name, value in self.headers.items():
                    if name.lower() not in ("connection", "content-length"):
                        request.add_header(name, value)
                try:
                    with opener.open(request, timeout=30) as response:
                        status, data = response.status, response.read()
                except urllib.error.HTTPError as exc:
                    status, data = exc.code, exc.read()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_PUT(self) -> None:
                self._forward("PUT")

            def do_DELETE(self) -> None:
                self._forward("DELETE")

            def do_HEAD(self) -> None:
                self._forward("HEAD")

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_self_check_catches_a_body_of_another_length() -> None:
    """The proxy's recomputation is a real check: a URL signed for 10 bytes does not verify for 11."""
    client = boto3.client(
        "s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key=SECRET,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )  # fmt: skip
    url = client.generate_presigned_url(
        "put_object", Params={"Bucket": "b", "Key": "k/000000", "ContentLength": 10}, ExpiresIn=60, HttpMethod="PUT"
    )
    split = urllib.parse.urlsplit(url)
    theirs, mine, signed = signature_of("PUT", split.path, split.query, split.netloc, "10")
    assert "content-length" in signed and theirs == mine
    assert signature_of("PUT", split.path, split.query, split.netloc, "11")[1] != theirs


def test_router_uploads_carry_the_signed_length(
    network_factory: Callable[..., LocalRelayNetwork],
    archive_factory: Callable[..., DemoArchive],
    tmp_path: Path,
    moto_server: ServerProcess,
    moto_env: dict[str, str],
) -> None:
    require_dcmtk("storescu")
    study = write_series(generate_ct_series(1, rows=2048, cols=2048, seed=21), tmp_path / "big")  # 8 MiB: spilled
    proxy = CheckingS3Proxy(moto_server.url)
    try:
        prefix = f"signed-{os.getpid()}-{free_port()}/"
        net = network_factory(
            {"store": f"s3://{S3_BUCKET}/{prefix}", "endpoint_url": proxy.url, "region": "us-east-1"}, moto_env
        )
        archive = archive_factory("ARCHIVE_B")
        store_study(net, archive, study, **endpoint(proxy.url)).check()
        assert archive.fingerprints() == fingerprints(study)
        parts = [p for p in proxy.puts if prefix in p[0]]
        assert len(parts) >= 2, proxy.puts  # the 8 MiB slice went through the store in parts
        assert all(length > 0 and signed and ok for _, length, signed, ok in parts), parts
    finally:
        proxy.close()
