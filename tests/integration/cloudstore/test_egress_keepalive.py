"""A router's blob part requests to S3 (moto): one kept-alive connection through squid, none reused against moto's word.

The URLs are the bridge's own (cloudstore's S3 store presigns them, PUT URLs bound to the part's
length); the client is the router's (relay_router.egress.HttpClient, as BridgeBlobTransport uses it
from its worker threads). Parts go up and come back byte-identical. moto's server answers every
request with `Connection: close` (real S3, GCS and MinIO keep connections alive): directly, each
request then gets a new connection and none fails on a closed one. Through an authenticating squid,
which keeps its client connections alive, every request is in squid's access log under the proxy
user, over one connection from the router; and a connection made through the proxy is never used
for a direct request (no_proxy), nor the other way round.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloudstore import BlobStore, open_store
from relay_router.egress import Endpoint, HttpClient, ProxySettings, UrlPolicy, with_password
from tests.integration.cloudstore.conftest import AWS, S3_BUCKET, ServerProcess
from tests.integration.proxy_support import Squid, require_root

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
PART = 1024 * 1024
USER = "hospital"


@pytest.fixture
async def store(
    moto_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[BlobStore]:
    """The bridge's S3 store on moto (test credentials only)."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    opened = open_store(
        f"s3://{S3_BUCKET}/keepalive-{uuid.uuid4().hex[:12]}/", endpoint_url=moto_server.url, region="us-east-1"
    )
    yield opened
    for info in await opened.list(""):
        await opened.delete(info.key)
    await opened.close()


@pytest.fixture
def squid_password() -> str:
    return secrets.token_urlsafe(12) + "@:%/"  # characters that must be percent-encoded in the proxy URL


@pytest.fixture
def squid(squid_password: str) -> Iterator[Squid]:
    require_root()  # squid drops to its own user
    proxy = Squid({USER: squid_password}).start()
    yield proxy
    proxy.stop()


async def _round_trip(store: BlobStore, client: HttpClient, parts: int) -> None:
    """PUT `parts` random parts to presigned URLs, GET them back, from a thread as the router does."""
    policy = UrlPolicy([Endpoint.parse(store_endpoint(store), allow_insecure_http=True)])
    data = [os.urandom(PART) for _ in range(parts)]
    puts = [await store.presign_put(f"part-{i}", 300, content_length=PART) for i in range(parts)]
    gets = [await store.presign_get(f"part-{i}", 300) for i in range(parts)]
    for url in puts + gets:
        assert policy.check(url) == "http"  # what BridgeBlobTransport checks before any request

    def transfer() -> list[bytes]:
        for url, body in zip(puts, data, strict=True):
            assert client.request("PUT", url, body) == b""
        return [client.request("GET", url, None) for url in gets]

    with ThreadPoolExecutor(1) as pool:
        back = pool.submit(transfer).result(timeout=120)
    assert [hashlib.sha256(b).hexdigest() for b in back] == [hashlib.sha256(b).hexdigest() for b in data]


def store_endpoint(store: BlobStore) -> str:
    url: str = store._client.meta.endpoint_url  # type: ignore[attr-defined]
    return url.rstrip("/") + f"/{S3_BUCKET}/"


async def test_a_store_that_closes_each_connection_gets_a_new_one_per_request(store: BlobStore) -> None:
    client = HttpClient(ProxySettings())
    try:
        await _round_trip(store, client, parts=6)
        assert client.opened == 12, f"{client.opened} connections for 12 requests, each answered Connection: close"
    finally:
        client.close()


async def test_through_an_authenticating_squid_one_connection_and_never_shared_with_direct_ones(
    store: BlobStore, squid: Squid, squid_password: str, moto_server: ServerProcess
) -> None:
    proxy = with_password(squid.url(USER), squid_password)
    through = HttpClient(ProxySettings.resolve(proxy, [], {}))
    try:
        await _round_trip(store, through, parts=4)
        assert through.opened == 1, f"{through.opened} connections to squid for 8 requests"
    finally:
        through.close()
    moto = moto_server.url.rstrip("/")
    lines = [line for line in squid.access() if f" {moto}/" in line]
    puts = [line for line in lines if " PUT " in line and f" {USER} " in line and "/200 " in line]
    gets = [line for line in lines if " GET " in line and f" {USER} " in line and "/200 " in line]
    assert (len(puts), len(gets)) == (4, 4), "\n".join(squid.access())

    # One client, a proxy for everything but the store (no_proxy): the store's requests go direct, on a
    # connection of their own, and squid sees none of them.
    seen = len(squid.access())
    host = moto.split("//", 1)[1].split(":", 1)[0]
    mixed = HttpClient(ProxySettings.resolve(proxy, [host], {}))
    try:
        await _round_trip(store, mixed, parts=2)
        assert mixed.opened == 4  # direct to moto: Connection: close, one each
    finally:
        mixed.close()
    assert len(squid.access()) == seen, "a request for a no_proxy host went through squid"
