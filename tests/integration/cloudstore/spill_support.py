"""Helpers shared by the end-to-end spill tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pydicom
import pytest

from relay_common.audit import read_events
from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.cloudstore.conftest import GCS_BUCKET, S3_BUCKET, ServerProcess
from tests.support import dcmtk

HOST = "127.0.0.1"
# Small numbers so a test study needs little memory and time; the defaults are 8 MiB / 4 MiB.
ROUTER = {
    "spill_threshold_bytes": 256 << 10,
    "spill_part_bytes": 1 << 20,
    "frame_bytes": 64 << 10,
    "compression": False,
}


def endpoint(url: str) -> dict[str, object]:
    """Router options that let it open the presigned URLs of the store at ``url`` (moto or the GCS
    emulator, on 127.0.0.1 over plain http: docs/security.md, "Spill URLs")."""
    return {"spill_endpoints": [url.rstrip("/") + "/"], "spill_allow_insecure_http": True}


def require_dcmtk(*tools: str) -> None:
    """DCMTK is part of what the spill tests prove: missing, they fail (never skip)."""
    missing = dcmtk.missing_tools(tools or ("storescu",))
    if missing:
        pytest.fail(f"the spill tests need DCMTK's {', '.join(missing)} (Debian: apt-get install dcmtk)", pytrace=False)


def pixel_bytes(files: list[Path]) -> int:
    return sum(len(pydicom.dcmread(f).PixelData) for f in files)


def store_study(
    net: LocalRelayNetwork, archive: DemoArchive, files: list[Path], **site_options: object
) -> dcmtk.Result:
    """site-a (storescu's router) -> site-b (ARCHIVE_B's router), then storescu sends ``files``."""
    net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])], **{**ROUTER, **site_options})
    a = net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], **{**ROUTER, **site_options})
    net.wait_connected()
    assert a.port
    return dcmtk.storescu(HOST, a.port, "ARCHIVE_B", "WS", files)


def bridge_bytes(net: LocalRelayNetwork) -> int:
    """Bytes the bridge's splice carried from the initiators (audit events; stops both routers)."""
    net.stop_router("site-a")
    net.stop_router("site-b")
    events = [e for e in read_events(net.workdir / "audit.jsonl") if e["event"] == "association"]
    return sum(int(e["bytes_from_initiator"]) for e in events)


def bucket_keys(server: ServerProcess, prefix: str) -> list[str]:
    client = boto3.client(
        "s3",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    return [o["Key"] for o in client.list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix).get("Contents", [])]


def service_account_file(path: Path) -> Path:
    """A made-up service account key (fresh RSA key): the bridge signs GCS URLs with it, locally."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    info = {
        "type": "service_account",
        "project_id": "relay-test-project",
        "private_key_id": "test-key-1",
        "private_key": pem.decode(),
        "client_email": "relay-bridge@relay-test-project.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": "http://127.0.0.1:9/token",  # never contacted: the key only signs
    }
    path.write_text(json.dumps(info))
    return path


def gcs_names(server: ServerProcess, prefix: str) -> list[str]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": server.url}
    )
    try:
        return [blob.name for blob in client.list_blobs(GCS_BUCKET, prefix=prefix)]
    finally:
        client.close()
