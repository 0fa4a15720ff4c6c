"""The release as a site installs it: a wheel built from the source tree, a wheelhouse of pinned
dependencies, `deploy/install.sh --wheelhouse` into a fresh environment (offline, not editable), and the
installed programs run: --version, `relay-bridge init`, `check-config`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.release import CONSTRAINTS, REPO, VERSION, run

pytestmark = pytest.mark.integration
PREFIX = "/opt/dicom-relay"


def pins() -> dict[str, str]:
    lines = CONSTRAINTS.read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def test_wheel_installs_offline_from_a_wheelhouse_and_runs(tmp_path: Path, release_wheelhouse: Path) -> None:
    # A wheel built from a copy of the source tree (as a release job would from a clean checkout),
    # and the wheelhouse `make wheelhouse` makes: the wheel, its pinned dependencies, constraints.txt.
    house = release_wheelhouse

    root = tmp_path / "root"
    result = run(
        ["sh", str(REPO / "deploy" / "install.sh"), "--root", str(root), "--wheelhouse", str(house), "bridge", "router"]
    )
    assert f"installed relay-bridge (dicom-relay) {VERSION} into {root}{PREFIX}" in result.stdout, result.stdout
    venv = root / PREFIX.lstrip("/")
    unit = (root / "etc/systemd/system/relay-bridge.service").read_text()
    assert f"ExecStart={PREFIX}/bin/relay-bridge" in unit

    # Not editable: the code runs from the environment's site-packages, not from this checkout.
    where = run(
        [str(venv / "bin/python"), "-c", "import relay_bridge, relay_router; print(relay_bridge.__file__)"],
        cwd=tmp_path,
    )
    assert where.stdout.startswith(str(venv)) and "site-packages" in where.stdout, where.stdout
    # Every installed distribution is exactly the pinned version.
    frozen = run([str(venv / "bin/python"), "-m", "pip", "freeze", "--all"]).stdout.splitlines()
    installed = dict(line.split("==", 1) for line in frozen if "==" in line)
    assert installed.pop("dicom-relay") == VERSION
    pinned = pins()
    unpinned = {
        name: version
        for name, version in installed.items()
        if name.lower() not in ("pip", "setuptools") and pinned.get(name.lower().replace("_", "-")) != version
    }
    assert unpinned == {}, f"installed versions that differ from requirements/constraints.txt: {unpinned}"

    assert run([str(venv / "bin/relay-bridge"), "--version"]).stdout.strip() == f"relay-bridge (dicom-relay) {VERSION}"
    assert run([str(venv / "bin/relay-router"), "--version"]).stdout.strip() == f"relay-router (dicom-relay) {VERSION}"
    site = tmp_path / "bridge"
    run(
        [str(venv / "bin/relay-bridge"), "init", "--dir", str(site), "--listen", "127.0.0.1:0", "--metrics-listen", ""],
        cwd=tmp_path,
    )
    check = run([str(venv / "bin/relay-bridge"), "-c", str(site / "bridge.toml"), "check-config"], cwd=tmp_path)
    assert check.stdout.strip() == f"{site / 'bridge.toml'}: OK"
