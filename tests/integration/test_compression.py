"""Compression across the relay: fewer bytes through the bridge, identical images at the archive."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from relay_common.audit import read_events
from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.conftest import require_dcmtk
from tests.support import dcmtk

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"


def store_and_count(net: LocalRelayNetwork, archive: DemoArchive, files: list[Path], **site_a: object) -> int:
    """Store `files` from site-a into `archive` at site-b; bytes the bridge carried from site-a."""
    net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
    a = net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], **site_a)
    net.wait_connected()
    assert a.port
    dcmtk.storescu(HOST, a.port, "ARCHIVE_B", "WS", files).check()
    assert archive.fingerprints() == fingerprints(files)
    net.stop_router("site-a")
    net.stop_router("site-b")
    (event,) = [e for e in read_events(net.workdir / "audit.jsonl") if e["event"] == "association"]
    return int(event["bytes_from_initiator"])


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(generate_ct_series(8, rows=256, cols=256, seed=3), tmp_path_factory.mktemp("ct"))


def pixel_bytes(files: list[Path]) -> int:
    return sum(len(pydicom.dcmread(f).PixelData) for f in files)


def test_compression_shrinks_uncompressed_ct(
    relay_network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive], ct_files: list[Path]
) -> None:
    require_dcmtk("storescu")
    size = pixel_bytes(ct_files)
    carried = store_and_count(relay_network, archive_factory("ARCHIVE_B"), ct_files)
    assert carried < 0.75 * size, f"the bridge carried {carried} bytes for {size} bytes of CT"


def test_no_compression_when_a_router_disables_it(
    relay_network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive], ct_files: list[Path]
) -> None:
    require_dcmtk("storescu")
    size = pixel_bytes(ct_files)
    carried = store_and_count(relay_network, archive_factory("ARCHIVE_B"), ct_files, compression=False)
    assert carried >= size, "without compression every byte of the datasets crosses the bridge"


def test_incompressible_pixels_pass_untouched(
    relay_network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive], tmp_path: Path
) -> None:
    """Random pixel bytes behave like JPEG payloads: nothing to gain, so frames go raw (and arrive intact)."""
    require_dcmtk("storescu")
    series = generate_ct_series(6, rows=256, cols=256, seed=5)
    rng = np.random.default_rng(5)
    for ds in series:
        ds.PixelData = rng.integers(0, 256, len(ds.PixelData), dtype=np.uint8).tobytes()
    files = write_series(series, tmp_path)
    carried = store_and_count(relay_network, archive_factory("ARCHIVE_B"), files)
    assert carried >= pixel_bytes(files)
