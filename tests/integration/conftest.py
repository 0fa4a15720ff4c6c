"""Shared fixtures for integration tests: real Orthanc, DCMTK and pynetdicom peers.

Every server gets ephemeral ports and its own directory, and is stopped at
teardown even when the test fails. When Orthanc or DCMTK is missing, tests are
skipped locally but FAIL when the ``CI`` environment variable is set: a CI
run that silently skipped the integration suite would prove nothing.

Extend freely; keep fixtures generic (the relay-specific ones belong next to
the tests that use them unless several modules share them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints, generate_ct_series, sample_files, write_series
from relay_demo.network import LocalRelayNetwork
from tests.support.dcmtk import StorescpProcess, missing_tools
from tests.support.orthanc import OrthancProcess, orthanc_binary
from tests.support.release import build_wheelhouse


def _require(missing: list[str]) -> None:
    """Skip locally, fail in CI, when third-party programs are not installed."""
    if not missing:
        return
    message = f"not installed: {', '.join(missing)} (Debian: apt-get install -y orthanc dcmtk)"
    if os.environ.get("CI"):
        pytest.fail(f"CI requires the integration peers; {message}", pytrace=False)
    pytest.skip(message)


def require_orthanc() -> None:
    _require([] if orthanc_binary() else ["Orthanc"])


def require_dcmtk(*tools: str) -> None:
    _require(missing_tools(tools) if tools else missing_tools())


class OrthancPool:
    """Starts Orthancs on demand; stops them all together (shutdown takes ~3.5 s each)."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self.started: list[OrthancProcess] = []

    def __call__(self, aet: str, **kwargs: Any) -> OrthancProcess:
        require_orthanc()
        orthanc = OrthancProcess(self._tmp.mktemp(f"orthanc-{aet}"), aet=aet, **kwargs)
        orthanc.start()
        self.started.append(orthanc)
        return orthanc

    def stop_all(self) -> None:
        for orthanc in self.started:
            orthanc.terminate()
        for orthanc in self.started:
            orthanc.wait()
        self.started.clear()


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPool]:
    """``orthanc_factory("ORTHANC_A", modalities=..., always_allow=...)`` -> started Orthanc."""
    pool = OrthancPool(tmp_path_factory)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def orthanc_module_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPool]:
    """Like ``orthanc_factory`` but shared by a module, to pay Orthanc's shutdown once."""
    pool = OrthancPool(tmp_path_factory)
    yield pool
    pool.stop_all()


@pytest.fixture
def storescp_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., StorescpProcess]]:
    """``storescp_factory("STORESCP")`` -> a running DCMTK storescp with its own directory."""
    started: list[StorescpProcess] = []

    def make(aet: str = "STORESCP", **kwargs: Any) -> StorescpProcess:
        require_dcmtk("storescp")
        scp = StorescpProcess(tmp_path_factory.mktemp(f"storescp-{aet}") / "in", aet, **kwargs)
        started.append(scp.start())
        return scp

    yield make
    for scp in started:
        scp.stop()


@pytest.fixture
def archive_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., DemoArchive]]:
    """``archive_factory("ARCHIVE", known_nodes={...})`` -> a started in-process DemoArchive."""
    started: list[DemoArchive] = []

    def make(ae_title: str = "ARCHIVE", known_nodes: dict[str, tuple[str, int]] | None = None) -> DemoArchive:
        archive = DemoArchive(ae_title, 0, tmp_path_factory.mktemp(f"archive-{ae_title}"), known_nodes)
        started.append(archive.start())
        return archive

    yield make
    for archive in started:
        archive.stop()


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five 512x512 CT slices (seed 0) written once per session; do not modify them."""
    return write_series(generate_ct_series(5), tmp_path_factory.mktemp("ct-series"))


@pytest.fixture(scope="session")
def ct_fingerprints(ct_series: list[Path]) -> dict[str, str]:
    return fingerprints(ct_series)


@pytest.fixture(scope="session")
def sample_dicom_files() -> list[Path]:
    """pydicom's bundled files: uncompressed CT and MR, JPEG 2000, RLE."""
    return sample_files()


@pytest.fixture
def relay_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRelayNetwork]:
    """A started bridge (TLS, development CA) with no routers yet; add sites with ``add_site``."""
    network = LocalRelayNetwork(tmp_path_factory.mktemp("relay")).start()
    yield network
    network.stop()


@pytest.fixture(scope="session")
def release_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release as `make wheelhouse` makes it (wheel, pinned dependencies, constraints.txt), built once.

    test_release.py and test_container.py share it: tests/conftest.py puts them on one xdist worker.
    Read-only for its users.
    """
    return build_wheelhouse(tmp_path_factory.mktemp("release"))
