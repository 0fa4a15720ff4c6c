"""The bucket lifecycle documents in docs/cloudstore.md are accepted as written.

S3: botocore checks the document against the API model, and moto stores and returns it.
GCS: the rule equals what google-cloud-storage builds for "delete after 1 day under spill/",
and the emulator stores it on the bucket.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cloudstore.conftest import ServerProcess

pytestmark = pytest.mark.timeout(60)

DOC = Path(__file__).resolve().parents[3] / "docs" / "cloudstore.md"


def documented(marker: str) -> Any:
    match = re.search(rf"<!-- {marker} -->\s*```json\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match, f"no json block after <!-- {marker} --> in {DOC}"
    return json.loads(match.group(1))


def test_s3_lifecycle_document(moto_server: ServerProcess) -> None:
    import boto3

    document = documented("s3-lifecycle")
    client = boto3.client(
        "s3",
        endpoint_url=moto_server.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    bucket = f"lifecycle-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    try:
        client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=document)
        (rule,) = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
        assert rule["Filter"] == {"Prefix": "spill/"}
        assert rule["Expiration"] == {"Days": 1}
        assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
        assert rule["Status"] == "Enabled"
    finally:
        client.delete_bucket_lifecycle(Bucket=bucket)
        client.delete_bucket(Bucket=bucket)
        client.close()


def test_gcs_lifecycle_document(gcs_emulator: ServerProcess) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from google.cloud.storage.bucket import LifecycleRuleDelete

    document = documented("gcs-lifecycle")
    assert document["rule"] == [dict(LifecycleRuleDelete(age=1, matches_prefix=["spill/"]))]

    client = storage.Client(
        project="relay-test", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs_emulator.url}
    )
    try:
        bucket = client.create_bucket(f"lifecycle-{uuid.uuid4().hex[:12]}")
        bucket.lifecycle_rules = document["rule"]
        bucket.patch()
        assert list(client.get_bucket(bucket.name).lifecycle_rules) == document["rule"]
        bucket.delete()
    finally:
        client.close()
