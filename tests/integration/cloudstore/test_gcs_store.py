"""cloudstore.gcs against gcp-storage-emulator: the contract, plus GCS specifics.

Signed URLs need a service account key; the tests make one (a fresh RSA key, a made-up
project and e-mail). It only signs, locally: requests to the emulator are anonymous,
since real credentials would first fetch an OAuth token from Google.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from cloudstore import BlobStore, BlobStoreError, open_store
from tests.integration.cloudstore.conftest import GCS_BUCKET, ServerProcess, require_modules
from tests.integration.cloudstore.contract import BlobStoreContract, empty_and_close

pytestmark = pytest.mark.timeout(60)

SERVICE_ACCOUNT = "relay-bridge@relay-test-project.iam.gserviceaccount.com"


@pytest.fixture(scope="session")
def service_account_info() -> dict[str, str]:
    require_modules("google.oauth2")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return {
        "type": "service_account",
        "project_id": "relay-test-project",
        "private_key_id": "test-key-1",
        "private_key": pem.decode(),
        "client_email": SERVICE_ACCOUNT,
        "client_id": "1234567890",
        # Never contacted: the tests only sign with this key.
        "token_uri": "http://127.0.0.1:9/token",
    }


@pytest.fixture(scope="session")
def signing_credentials(service_account_info: dict[str, str]) -> Any:
    from google.oauth2 import service_account

    return service_account.Credentials.from_service_account_info(service_account_info)


def open_gcs(server: ServerProcess, **options: Any) -> BlobStore:
    options.setdefault("endpoint_url", server.url)
    options.setdefault("timeout", 20)
    if "credentials_file" not in options:
        options.setdefault("anonymous", True)
    return open_store(f"gs://{GCS_BUCKET}/test-{uuid.uuid4().hex[:12]}", **options)


class TestGCSStoreContract(BlobStoreContract):
    @pytest.fixture
    async def store(self, gcs_emulator: ServerProcess, signing_credentials: Any) -> AsyncIterator[BlobStore]:
        store = open_gcs(gcs_emulator, signing_credentials=signing_credentials)
        yield store
        await empty_and_close(store)


async def test_signed_urls_are_v4_on_the_endpoint(gcs_emulator: ServerProcess, signing_credentials: Any) -> None:
    async with open_gcs(gcs_emulator, signing_credentials=signing_credentials) as store:
        url = await store.presign_get("spill/k", 90)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == gcs_emulator.url
    assert parts.path == f"/{GCS_BUCKET}/{store.prefix}spill/k"  # type: ignore[attr-defined]
    query = parse_qs(parts.query)
    assert query["X-Goog-Algorithm"] == ["GOOG4-RSA-SHA256"]
    assert query["X-Goog-Expires"] == ["90"]
    assert query["X-Goog-Credential"][0].startswith(SERVICE_ACCOUNT + "/")


async def test_presign_without_signing_credentials(gcs_emulator: ServerProcess) -> None:
    async with open_gcs(gcs_emulator) as store:
        with pytest.raises(BlobStoreError, match="signed URLs need credentials that can sign") as caught:
            await store.presign_put("k", 60)
        assert store.url in str(caught.value) and "'k'" in str(caught.value)


async def test_credentials_file_signs_urls(
    gcs_emulator: ServerProcess, service_account_info: dict[str, str], tmp_path: Path
) -> None:
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps(service_account_info))
    async with open_gcs(gcs_emulator, credentials_file=key_file) as store:
        url = await store.presign_put("k", 60)
    assert parse_qs(urlsplit(url).query)["X-Goog-Credential"][0].startswith(SERVICE_ACCOUNT + "/")


async def test_missing_bucket(gcs_emulator: ServerProcess) -> None:
    async with open_store("gs://no-such-bucket-here/p", endpoint_url=gcs_emulator.url, anonymous=True) as store:
        with pytest.raises(BlobStoreError, match="bucket 'no-such-bucket-here' does not exist") as caught:
            await store.put_bytes("k", b"x")
        assert "gs://no-such-bucket-here/p/" in str(caught.value)
        for missing in (store.stat("k"), store.exists("k"), store.get_bytes("k"), store.list()):
            with pytest.raises(BlobStoreError, match="bucket 'no-such-bucket-here' does not exist"):
                await missing


def test_conflicting_credential_options(gcs_emulator: ServerProcess, signing_credentials: Any) -> None:
    with pytest.raises(ValueError, match="at most one"):
        open_gcs(gcs_emulator, credentials=signing_credentials, anonymous=True)
