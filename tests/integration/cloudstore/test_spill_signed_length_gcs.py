"""A router's real uploads to GCS carry the length their V4 signed URL is signed for (issue 17, item 7).

The bridge signs each part's GCS upload URL with `Content-Length` among the signed headers
(`cloudstore/gcs.py`, GOOG4-RSA-SHA256). gcp-storage-emulator does not check signatures at all
(its handlers never read `X-Goog-Signature`), so an HTTP proxy in front of it does what Google's
front end does: for every PUT it rebuilds the canonical request from the URL and the request's
own headers, and verifies the RSA signature with the service account's public key
(`cryptography`). A request whose signature does not verify is refused with 403 and never
reaches the emulator. The router's real uploads must all verify with the length signed in; a
recorded URL replayed with a body one byte longer must be refused.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork
from tests.integration.cloudstore.conftest import GCS_BUCKET, ServerProcess
from tests.integration.cloudstore.spill_support import (
    HOST,
    endpoint,
    require_dcmtk,
    service_account_file,
    store_study,
)
from tests.support.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="-_.~")


def verify_goog4(
    public_key: rsa.RSAPublicKey, method: str, path: str, query: str, headers: dict[str, str]
) -> tuple[list[str], bool]:
    """(the URL's signed headers, whether its signature verifies for this request): GOOG4-RSA-SHA256 query
    auth as Google documents it ("Signed URLs: canonical requests"), with the request's own header values."""
    params = urllib.parse.parse_qsl(query, keep_blank_values=True)
    given = dict(params)
    if given.get("X-Goog-Algorithm") != "GOOG4-RSA-SHA256":
        return [], False
    signed = given["X-Goog-SignedHeaders"].split(";")
    lowered = {name.lower(): " ".join(value.split()) for name, value in headers.items()}
    canonical_query = "&".join(sorted(f"{_quote(k)}={_quote(v)}" for k, v in params if k != "X-Goog-Signature"))
    canonical = "\n".join(
        [
            method,
            path,
            canonical_query,
            "".join(f"{name}:{lowered.get(name, '')}\n" for name in signed),
            ";".join(signed),
            lowered.get("x-goog-content-sha256", "UNSIGNED-PAYLOAD"),
        ]
    )
    scope = given["X-Goog-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        ["GOOG4-RSA-SHA256", given["X-Goog-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    try:
        public_key.verify(
            bytes.fromhex(given["X-Goog-Signature"]), to_sign.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
    except (InvalidSignature, ValueError):
        return signed, False
    return signed, True


def public_key_of(service_account: Path) -> rsa.RSAPublicKey:
    private = serialization.load_pem_private_key(json.loads(service_account.read_text())["private_key"].encode(), None)
    assert isinstance(private, rsa.RSAPrivateKey)
    return private.public_key()


class VerifyingGcsProxy:
    """Forwards to the emulator; every signed PUT must verify (else 403), and is recorded:
    (path and query, body length, content-length signed, signature ok)."""

    def __init__(self, upstream: str, public_key: rsa.RSAPublicKey) -> None:
        proxy = self
        self.puts: list[tuple[str, int, bool, bool]] = []
        self.lock = threading.Lock()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _forward(self, method: str) -> None:
                length = self.headers.get("Content-Length")
                body = self.rfile.read(int(length)) if length else None
                split = urllib.parse.urlsplit(self.path)
                if method == "PUT" and "X-Goog-Signature" in split.query:
                    signed, ok = verify_goog4(public_key, "PUT", split.path, split.query, dict(self.headers.items()))
                    with proxy.lock:
                        proxy.puts.append((self.path, len(body or b""), "content-length" in signed, ok))
                    if not ok:
                        return self._answer(403, b"SignatureDoesNotMatch")
                request = urllib.request.Request(upstream + self.path, data=body, method=method)
                for name, value in self.headers.items():
                    if name.lower() not in ("connection", "content-length", "host"):
                        request.add_header(name, value)
                try:
                    with opener.open(request, timeout=30) as response:
                        status, data = response.status, response.read()
                except urllib.error.HTTPError as exc:
                    status, data = exc.code, exc.read()
                self._answer(status, data)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_PUT(self) -> None:
                self._forward("PUT")

            def do_POST(self) -> None:
                self._forward("POST")

            def do_DELETE(self) -> None:
                self._forward("DELETE")

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def put(self, path_and_query: str, body: bytes) -> int:
        request = urllib.request.Request(self.url + path_and_query, data=body, method="PUT")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=30) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_verification_catches_a_body_of_another_length(tmp_path: Path) -> None:
    """The proxy's check is a real one: a URL the SDK signed for 10 bytes verifies for 10, not for 11,
    and not with another key."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from google.oauth2 import service_account

    key_file = service_account_file(tmp_path / "sa.json")
    credentials = service_account.Credentials.from_service_account_file(str(key_file))
    client = storage.Client(  # never contacted: it only signs, locally
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": "http://127.0.0.1:9"}
    )
    blob = client.bucket(GCS_BUCKET).blob("spill/k/000000")
    url = blob.generate_signed_url(
        version="v4", expiration=60, method="PUT", credentials=credentials,
        api_access_endpoint="http://127.0.0.1:9", headers={"Content-Length": "10"},
    )  # fmt: skip
    split = urllib.parse.urlsplit(url)
    key = public_key_of(key_file)
    signed, ok = verify_goog4(key, "PUT", split.path, split.query, {"Host": split.netloc, "Content-Length": "10"})
    assert "content-length" in signed and ok
    assert not verify_goog4(key, "PUT", split.path, split.query, {"Host": split.netloc, "Content-Length": "11"})[1]
    other = public_key_of(service_account_file(tmp_path / "other.json"))
    assert not verify_goog4(other, "PUT", split.path, split.query, {"Host": split.netloc, "Content-Length": "10"})[1]


def test_router_uploads_to_gcs_carry_the_signed_length(
    network_factory: Callable[..., LocalRelayNetwork],
    archive_factory: Callable[..., DemoArchive],
    tmp_path: Path,
    gcs_emulator: ServerProcess,
) -> None:
    require_dcmtk("storescu")
    study = write_series(generate_ct_series(1, rows=1024, cols=1024, seed=22), tmp_path / "big")  # 2 MiB: spilled
    key_file = service_account_file(tmp_path / "sa.json")
    proxy = VerifyingGcsProxy(gcs_emulator.url, public_key_of(key_file))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "STORAGE_EMULATOR"))}
        # The SDK's emulator convention: the bridge talks to the proxy, anonymously, and signs URLs for it.
        env.update(STORAGE_EMULATOR_HOST=proxy.url, GOOGLE_APPLICATION_CREDENTIALS=str(key_file))
        prefix = f"signed-{os.getpid()}-{free_port()}/"
        net = network_factory({"store": f"gs://{GCS_BUCKET}/{prefix}"}, env)
        archive = archive_factory("ARCHIVE_B")
        store_study(net, archive, study, **endpoint(proxy.url)).check()
        assert archive.fingerprints() == fingerprints(study)
        parts = [p for p in proxy.puts if prefix in urllib.parse.unquote(p[0])]
        assert len(parts) >= 2, proxy.puts  # the 2 MiB slice went through the store in 1 MiB parts
        assert all(length > 0 and signed and ok for _, length, signed, ok in parts), parts
        # A recorded URL with a body one byte longer: refused, never stored; the same length verifies.
        url, length, _, _ = parts[0]
        assert proxy.put(url, b"\0" * (length + 1)) == 403
        assert proxy.puts[-1][3] is False
        assert proxy.put(url, b"\0" * length) == 200
    finally:
        proxy.close()
