"""check-config names the key and the reason for certificate files that cannot serve."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_bridge.cli import main as bridge
from relay_router.cli import main as router


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() installs a root log handler for check-config: put the old ones back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_bridge_certificate_that_is_not_pem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bridge(["init", "--dir", str(tmp_path), "--listen", "127.0.0.1:0"]) == 0
    (tmp_path / "server.pem").write_text("this is not a certificate\n")
    capsys.readouterr()
    assert bridge(["-c", str(tmp_path / "bridge.toml"), "check-config"]) == 2
    err = capsys.readouterr().err
    assert f"server.tls_cert: {tmp_path / 'server.pem'} is not a PEM certificate" in err, err


def test_bridge_key_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bridge(["init", "--dir", str(tmp_path), "--listen", "127.0.0.1:0"]) == 0
    (tmp_path / "server.key").unlink()
    capsys.readouterr()
    assert bridge(["-c", str(tmp_path / "bridge.toml"), "check-config"]) == 2
    assert f"server.tls_key: cannot read {tmp_path / 'server.key'}\n" in capsys.readouterr().err


def test_router_ca_file_that_is_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bridge(["init", "--dir", str(tmp_path / "bridge"), "--listen", "127.0.0.1:0"]) == 0
    (tmp_path / "router.toml").write_text(
        '[router]\nname = "hospital-a"\n[bridge]\naddress = "bridge.example.org:443"\n'
        'ca_file = "bridge/ca.key"\npassword = "x"\n'
    )
    capsys.readouterr()
    assert router(["-c", str(tmp_path / "router.toml"), "check-config"]) == 2
    err = capsys.readouterr().err
    assert f"bridge.ca_file: {tmp_path / 'bridge' / 'ca.key'} is not a PEM certificate" in err, err


def test_init_writes_the_metrics_address_only_when_asked(tmp_path: Path) -> None:
    assert bridge(["init", "--dir", str(tmp_path / "a")]) == 0
    assert "[metrics]" not in (tmp_path / "a" / "bridge.toml").read_text()
    assert bridge(["init", "--dir", str(tmp_path / "b"), "--metrics-listen", "127.0.0.1:9999"]) == 0
    assert 'listen = "127.0.0.1:9999"' in (tmp_path / "b" / "bridge.toml").read_text()
    assert bridge(["-c", str(tmp_path / "b" / "bridge.toml"), "check-config"]) == 0
