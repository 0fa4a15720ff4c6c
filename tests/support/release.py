"""Build the release as `make wheel` and `make wheelhouse` do, from a copy of the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
CONSTRAINTS = REPO / "requirements" / "constraints.txt"


def run(cmd: list[str], timeout: float = 600, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run with a clean Python environment; fail with the output if the command fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(kwargs.pop("env", None) or {})  # type: ignore[arg-type]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def build_wheelhouse(workdir: Path) -> Path:
    """workdir/wheelhouse with dicom-relay's wheel, its pinned dependencies and constraints.txt."""
    source = workdir / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", "dist", "build", "*.egg-info", "__pycache__", ".*cache"),
    )
    dist = workdir / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)])
    wheel = dist / f"dicom_relay-{VERSION}-py3-none-any.whl"
    assert wheel.is_file(), sorted(p.name for p in dist.iterdir())
    house = workdir / "wheelhouse"
    run([sys.executable, "-m", "pip", "wheel", "-q", "-c", str(CONSTRAINTS), "-w", str(house), str(wheel)])
    shutil.copy(CONSTRAINTS, house / "constraints.txt")
    return house
