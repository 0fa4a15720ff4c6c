"""Replicas that share `[spill] signing_key_file` and the file:// directory honour each other's URLs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay_bridge.blobs import BlobBroker, BlobRefused
from relay_bridge.config import BridgeConfig, ServerSection, SpillSection, StorageSection
from relay_common.config import InvalidValue

AID = "a" * 32


def _replica(tmp_path: Path, key_file: Path | None, blobs: Path) -> BlobBroker:
    config = BridgeConfig(
        server=ServerSection(insecure=True),
        storage=StorageSection(database=tmp_path / "bridge.sqlite3"),
        spill=SpillSection(store=blobs.as_uri(), signing_key_file=key_file),
    )
    broker = BlobBroker.from_config(config)
    assert broker is not None
    return broker


async def test_a_url_issued_by_one_replica_is_honoured_by_another_with_the_shared_key(tmp_path: Path) -> None:
    key_file = tmp_path / "spill.key"
    key_file.write_bytes(os.urandom(32).hex().encode())
    shared = tmp_path / "shared-blobs"
    one, two = _replica(tmp_path, key_file, shared), _replica(tmp_path, key_file, shared)
    blob_id, put_url, _ = await one.slot(AID, "", 0, download=False, size=11)
    await two.put_part(put_url, b"sealed part", {AID})  # uploaded through the other replica
    _, get_url, _ = await two.slot(AID, blob_id, 0, download=True)
    assert await one.get_part(get_url, {AID}) == b"sealed part"


async def test_without_the_shared_key_another_replica_refuses_the_url(tmp_path: Path) -> None:
    shared = tmp_path / "shared-blobs"
    one, two = _replica(tmp_path, None, shared), _replica(tmp_path, None, shared)
    _, put_url, _ = await one.slot(AID, "", 0, download=False, size=1)
    with pytest.raises(BlobRefused, match="forged or altered"):
        await two.put_part(put_url, b"x", {AID})


def test_a_short_or_missing_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"0123456789")
    with pytest.raises(InvalidValue, match="holds 10 bytes; at least 32"):
        SpillSection(signing_key_file=short)
    with pytest.raises(InvalidValue, match="cannot read"):
        SpillSection(signing_key_file=tmp_path / "missing.key")
