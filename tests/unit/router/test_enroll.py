"""Enrollment errors say whether the bridge could not be reached or refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay_common.config import load_config
from relay_router.config import RouterConfig
from relay_router.enroll import EnrollError, enroll
from tests.support.ports import free_port


def test_an_unreachable_bridge_is_not_reported_as_a_refusal(tmp_path: Path) -> None:
    port = free_port()  # a port with nothing listening
    (tmp_path / "router.toml").write_text(
        f'[router]\nname = "hospital-a"\nstate_dir = "state"\n'
        f'[bridge]\naddress = "127.0.0.1:{port}"\ninsecure = true\npassword = "test-password-123"\n'
    )
    (tmp_path / "state").mkdir()
    config = load_config(tmp_path / "router.toml", RouterConfig)
    with pytest.raises(EnrollError, match=rf"cannot reach the bridge at 127.0.0.1:{port} to enroll"):
        enroll(config, "a" * 32, timeout_s=3)
