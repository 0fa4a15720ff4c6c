"""Release metadata: --version, the constraints file against pyproject.toml, the changelog."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from relay_bridge.cli import main as bridge_main
from relay_common.metrics import package_version
from relay_router.cli import main as router_main
from relay_router.tunnel import SOFTWARE_VERSION

REPO = Path(__file__).resolve().parents[3]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize(("main", "program"), [(bridge_main, "relay-bridge"), (router_main, "relay-router")])
def test_version_comes_from_the_package_metadata(main, program: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"{program} (dicom-relay) {PROJECT['version']}"


def test_sign_on_reports_the_installed_version() -> None:
    assert package_version() == PROJECT["version"]
    assert SOFTWARE_VERSION == f"dicom-relay/{PROJECT['version']}"


def constraints() -> dict[str, str]:
    lines = (REPO / "requirements" / "constraints.txt").read_text().splitlines()
    return {n: v for n, _, v in (line.partition("==") for line in lines if line and not line.startswith("#"))}


def test_every_runtime_dependency_is_pinned_within_its_range() -> None:
    pinned = constraints()
    extras = PROJECT["optional-dependencies"]
    specs = PROJECT["dependencies"] + extras["s3"] + extras["gcs"] + extras["postgresql"]
    for spec in specs:
        requirement = Requirement(spec)
        name = requirement.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is not in requirements/constraints.txt: run make constraints"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} does not satisfy {spec}"


def test_constraints_are_exact_pins_without_the_project_itself() -> None:
    for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*==[0-9][0-9A-Za-z.+!-]*", line), line
    assert "dicom-relay" not in constraints()


def test_changelog_has_the_released_version_and_unreleased() -> None:
    text = (REPO / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert re.search(rf"^## \[{re.escape(PROJECT['version'])}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M)
