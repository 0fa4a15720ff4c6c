"""cloudstore.registry: schemes, lazy imports, entry points and install hints."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import cloudstore
from cloudstore import MissingDependency, UnknownScheme, known_schemes, open_store
from cloudstore.base import BlobStoreError
from cloudstore.file import FileBlobStore
from cloudstore.registry import BACKENDS, ENTRY_POINT_GROUP, load_backend, register_scheme

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("boto3", "botocore", "google.cloud", "google.auth", "google.api_core", "s3transfer", "requests")


def test_importing_cloudstore_imports_no_cloud_sdk() -> None:
    probe = (
        "import json, sys, tempfile\n"
        "import cloudstore, cloudstore.base, cloudstore.registry, cloudstore.lifecycle, cloudstore.file\n"
        "store = cloudstore.open_store('file://' + tempfile.mkdtemp())\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(heavy))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == []


def test_builtin_schemes() -> None:
    assert {"file", "s3", "gs"} <= set(known_schemes())
    assert load_backend("file") is FileBlobStore
    assert load_backend("FILE") is FileBlobStore
    for scheme, (target, hint) in BACKENDS.items():
        assert ":" in target and hint, scheme


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(UnknownScheme) as caught:
        open_store("ftp://host/dir")
    message = str(caught.value)
    assert "ftp://" in message
    for scheme in ("file", "gs", "s3"):
        assert scheme in message
    assert ENTRY_POINT_GROUP in message
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, BlobStoreError)
    with pytest.raises(UnknownScheme, match="no scheme"):
        open_store("/var/spill")


def test_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if boto3 were not installed: a None entry makes `import boto3` fail.
    monkeypatch.delitem(sys.modules, "cloudstore.s3", raising=False)
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(MissingDependency) as caught:
        open_store("s3://bucket/prefix")
    assert "pip install 'dicom-relay[s3]'" in str(caught.value)
    assert "boto3" in str(caught.value)
    assert isinstance(caught.value, ImportError)


def test_missing_google_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "cloudstore.gcs", raising=False)
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)
    # An earlier test (the GCS contract) may have imported it: `from google.cloud import storage`
    # would then find the package attribute and never look at sys.modules.
    if "google.cloud" in sys.modules:
        monkeypatch.delattr(sys.modules["google.cloud"], "storage", raising=False)
    with pytest.raises(MissingDependency, match=r"pip install 'dicom-relay\[gcs\]'"):
        open_store("gs://bucket/prefix")


def entry_points_with(*extra: metadata.EntryPoint):
    real = metadata.entry_points

    def entry_points(**params):
        found = real(**params)
        if params.get("group") == ENTRY_POINT_GROUP:
            return metadata.EntryPoints([*found, *extra])
        return found

    return entry_points


def test_third_party_scheme_through_an_entry_point(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    entry_point = metadata.EntryPoint(
        name="thirdparty", value="tests.unit.cloudstore.third_party:ThirdPartyStore", group=ENTRY_POINT_GROUP
    )
    with pytest.raises(UnknownScheme):
        open_store(f"thirdparty://{tmp_path}")
    monkeypatch.setattr(metadata, "entry_points", entry_points_with(entry_point))
    assert "thirdparty" in known_schemes()
    store = open_store(f"thirdparty://{tmp_path}", signing_key=b"k" * 16)
    assert type(store).__name__ == "ThirdPartyStore"
    assert store.opened_with == (f"thirdparty://{tmp_path}", {"signing_key": b"k" * 16})  # type: ignore[attr-defined]


def test_builtin_schemes_win_over_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    hijack = metadata.EntryPoint(
        name="file", value="tests.unit.cloudstore.third_party:ThirdPartyStore", group=ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(metadata, "entry_points", entry_points_with(hijack))
    assert load_backend("file") is FileBlobStore


def test_broken_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        metadata,
        "entry_points",
        entry_points_with(
            metadata.EntryPoint(name="needsdep", value="no_such_sdk_xyz.store:Store", group=ENTRY_POINT_GROUP),
            metadata.EntryPoint(
                name="notastore", value="tests.unit.cloudstore.third_party:NotAStore", group=ENTRY_POINT_GROUP
            ),
            metadata.EntryPoint(
                name="typo", value="tests.unit.cloudstore.third_party:Missing", group=ENTRY_POINT_GROUP
            ),
        ),
    )
    with pytest.raises(MissingDependency, match="no_such_sdk_xyz"):
        open_store("needsdep://x")
    with pytest.raises(BlobStoreError, match="not a cloudstore.BlobStore subclass"):
        open_store("notastore://x")
    with pytest.raises(BlobStoreError, match="could not be loaded"):
        open_store("typo://x")


def test_register_scheme_at_runtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    register_scheme("thirdparty", "tests.unit.cloudstore.third_party:ThirdPartyStore")
    try:
        assert type(open_store(f"thirdparty://{tmp_path}")).__name__ == "ThirdPartyStore"
    finally:
        del BACKENDS["thirdparty"]
    with pytest.raises(ValueError):
        register_scheme("Bad Scheme", "a:b")
    with pytest.raises(ValueError):
        register_scheme("ok", "no-colon")


def test_missing_backend_module_is_not_blamed_on_a_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BACKENDS, "ghost", ("cloudstore.ghost:GhostStore", "pip install ghost"))
    with pytest.raises(BlobStoreError, match="backend module 'cloudstore.ghost' does not exist") as caught:
        open_store("ghost://x")
    assert not isinstance(caught.value, MissingDependency)


def test_public_names() -> None:
    for name in cloudstore.__all__:
        assert hasattr(cloudstore, name), name
