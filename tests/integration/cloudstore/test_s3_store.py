"""cloudstore.s3 against moto's S3 server: the contract, plus S3 specifics."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cloudstore import BlobStore, BlobStoreError, open_store, sweep
from tests.integration.cloudstore.conftest import S3_BUCKET, ServerProcess
from tests.integration.cloudstore.contract import BlobStoreContract, empty_and_close
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials through boto3's usual chain (the environment), and nothing else to find."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never reach for an instance role


def open_s3(server: ServerProcess, **options: Any) -> BlobStore:
    options.setdefault("endpoint_url", server.url)
    options.setdefault("region", "us-east-1")
    options.setdefault("read_timeout", 20)
    return open_store(f"s3://{S3_BUCKET}/test-{uuid.uuid4().hex[:12]}/", **options)


def admin_client(store: BlobStore) -> Any:
    return store._client  # type: ignore[attr-defined]


class TestS3StoreContract(BlobStoreContract):
    @pytest.fixture
    async def store(self, moto_server: ServerProcess, aws_env: None) -> AsyncIterator[BlobStore]:
        store = open_s3(moto_server)
        yield store
        await empty_and_close(store)

    async def assert_no_incomplete_uploads(self, store: BlobStore) -> None:
        uploads = admin_client(store).list_multipart_uploads(Bucket=S3_BUCKET, Prefix=store.prefix)  # type: ignore[attr-defined]
        assert uploads.get("Uploads", []) == []


async def test_presigned_urls_are_sigv4_on_the_endpoint(moto_server: ServerProcess, aws_env: None) -> None:
    async with open_s3(moto_server) as store:
        url = await store.presign_put("spill/k", 60)
    assert url.startswith(f"{moto_server.url}/{S3_BUCKET}/{store.prefix}spill/k?")  # type: ignore[attr-defined]
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "X-Amz-Expires=60" in url


async def test_missing_bucket(moto_server: ServerProcess, aws_env: None) -> None:
    async with open_store("s3://no-such-bucket-here/p", endpoint_url=moto_server.url, region="us-east-1") as store:
        with pytest.raises(BlobStoreError, match="bucket 'no-such-bucket-here' does not exist") as caught:
            await store.put_bytes("k", b"x")
        assert "s3://no-such-bucket-here/p/" in str(caught.value) and "'k'" in str(caught.value)
        with pytest.raises(BlobStoreError, match="does not exist"):
            await store.list()
        for missing in (store.stat("k"), store.exists("k"), store.get_bytes("k")):
            with pytest.raises(BlobStoreError, match="bucket 'no-such-bucket-here' does not exist"):
                await missing


async def test_no_credentials(moto_server: ServerProcess, aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with open_s3(moto_server) as store:
        with pytest.raises(BlobStoreError, match="no usable AWS credentials"):
            await store.exists("k")


async def test_explicit_credentials_options(moto_server: ServerProcess, aws_env: None, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with open_s3(moto_server, access_key_id="testing", secret_access_key="testing") as store:
        await store.put_bytes("k", b"explicit")
        assert await store.get_bytes("k") == b"explicit"
        await store.delete("k")


async def test_unreachable_endpoint(aws_env: None) -> None:
    port = free_port()  # nothing listens there
    store = open_store(
        f"s3://{S3_BUCKET}/p", endpoint_url=f"http://127.0.0.1:{port}", connect_timeout=2, max_attempts=1
    )
    async with store:
        with pytest.raises(BlobStoreError, match=f"cannot connect to http://127.0.0.1:{port}"):
            await store.exists("k")


async def test_sweep_aborts_stale_multipart_uploads(moto_server: ServerProcess, aws_env: None) -> None:
    async with open_s3(moto_server) as store:
        client = admin_client(store)
        prefix = store.prefix  # type: ignore[attr-defined]
        client.create_multipart_upload(Bucket=S3_BUCKET, Key=f"{prefix}spill/crashed")
        client.create_multipart_upload(Bucket=S3_BUCKET, Key=f"{prefix}other/crashed")
        # moto reports every upload as initiated in 2010, so any TTL finds them stale.
        report = await sweep(store, "spill/", older_than_s=3600)
        assert report.aborted_uploads == 1 and report.errors == []
        left = client.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=prefix).get("Uploads", [])
        assert [upload["Key"] for upload in left] == [f"{prefix}other/crashed"]
        await sweep(store, "", older_than_s=0)


async def test_a_presigned_put_is_bound_to_its_content_length(moto_server: ServerProcess, aws_env: None) -> None:
    """Content-Length is one of the URL's signed headers, so S3 refuses a body of another length.

    moto's server does not check signatures (a larger body is stored; with its IAM mode on, presigned
    PUTs fail with 500), so the refusal itself is shown by recomputing the SigV4 signature for the
    request a cheating router would make: it differs from the one in the URL.
    """
    from urllib.parse import parse_qs, urlsplit

    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    async with open_s3(moto_server) as store:
        assert store.bounds_uploads
        url = await store.presign_put("spill/bounded", 60, content_length=5)
        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        assert query["X-Amz-SignedHeaders"] == "content-length;host"

        def signature(length: int) -> str:
            bare = url.split("?")[0]
            request = AWSRequest(method="PUT", url=bare, headers={"Content-Length": str(length)})
            signer = S3SigV4QueryAuth(Credentials("testing", "testing"), "s3", "us-east-1", expires=60)
            signer._get_date = lambda: query["X-Amz-Date"]  # type: ignore[method-assign]
            signer._timestamp = lambda: query["X-Amz-Date"]  # type: ignore[method-assign]
            signer.add_auth(request)
            return parse_qs(urlsplit(request.url).query)["X-Amz-Signature"][0]

        assert signature(5) == query["X-Amz-Signature"]  # the agreed length: the URL's own signature
        assert signature(5 * 1024**3) != query["X-Amz-Signature"]  # 5 GB through the same URL: refused
        await store.put_bytes("spill/other", b"x")  # the store itself still works as usual
