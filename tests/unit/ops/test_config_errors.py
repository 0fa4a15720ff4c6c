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


def test_router_check_config_reports_every_problem_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "router.toml").write_text(
        '[router]\nname = "hospital-a"\n'
        '[bridge]\naddress = "bridge.example.org:443"\ninsecure = true\npassword = "x"\nopen_timeout_s = -1\n'
        '[dicom]\nlisten = "nowhere"\nidle_timeout_s = -5\nspeling = 1\n'
        '[audit]\nsyslog = "tcp://collector:514"\ncollector = "udp://collector:6514"\n'
    )
    assert router(["-c", str(tmp_path / "router.toml"), "check-config"]) == 2
    err = capsys.readouterr().err
    assert "6 problems" in err, err
    assert "dicom.listen: expected HOST:PORT with a port from 0 to 65535, got 'nowhere'" in err  # table's own check
    for expected in (
        "bridge.open_timeout_s: must not be negative, got -1.0",
        "dicom.idle_timeout_s: must not be negative, got -5.0",
        "dicom.speling: unknown key",
        "audit.syslog: expected \"udp://HOST:PORT\", got 'tcp://collector:514'",
        'audit.collector: expected "tls://HOST:PORT" (RFC 5425 syslog over TLS)',
    ):
        assert expected in err, (expected, err)


def test_router_certificates_and_password_reported_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "router.toml").write_text(
        '[router]\nname = "hospital-a"\n[bridge]\naddress = "b:443"\nca_file = "missing-ca.pem"\n'
        '[audit]\ncollector = "tls://127.0.0.1:6514"\nca_file = "missing-audit-ca.pem"\n'
    )
    assert router(["-c", str(tmp_path / "router.toml"), "check-config"]) == 2
    err = capsys.readouterr().err
    assert f"bridge.ca_file: cannot read {tmp_path / 'missing-ca.pem'}" in err, err
    assert f"audit.ca_file: cannot read {tmp_path / 'missing-audit-ca.pem'}" in err, err
    assert "bridge.password: no bridge password" in err, err


def test_bridge_unknown_blob_store_scheme_and_negative_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bridge(["init", "--dir", str(tmp_path), "--listen", "127.0.0.1:0"]) == 0
    config = tmp_path / "bridge.toml"
    config.write_text(config.read_text() + '[spill]\nstore = "sftp://host/blobs"\n[limits]\njoin_timeout_s = -3\n')
    capsys.readouterr()
    assert bridge(["-c", str(config), "check-config"]) == 2
    err = capsys.readouterr().err
    assert "spill.store: 'sftp://host/blobs': unknown scheme 'sftp' (known: file, gs, s3" in err, err
    assert "limits.join_timeout_s: must not be negative" in err, err


def test_share_with_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "status.json").write_text('{"directory": [{"site": "hospital-b", "ae_title": "PACS"}]}')
    (tmp_path / "router.toml").write_text(
        '[router]\nname = "hospital-a"\n[bridge]\naddress = "b:443"\ninsecure = true\npassword = "x"\n'
        '[[shared]]\nae_title = "PACS_A"\nhost = "127.0.0.1"\nport = 4242\n'
        'share_with = ["hospital-b", "hospital-bb", "hospital-a"]\n'
    )
    assert router(["-c", str(tmp_path / "router.toml"), "check-config"]) == 0  # warnings only
    err = capsys.readouterr().err
    assert "shared (PACS_A).share_with[1]: 'hospital-bb' is not among the sites in the directory" in err, err
    assert "shared (PACS_A).share_with[2]: 'hospital-a' is this router itself" in err, err
    assert "share_with[0]" not in err


def test_a_failing_serve_leaves_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "not-a-dir").write_text("")
    (tmp_path / "router.toml").write_text(
        '[router]\nname = "hospital-a"\n[bridge]\naddress = "127.0.0.1:9"\ninsecure = true\npassword = "x"\n'
        '[dicom]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = ""\n'
        '[audit]\ncollector = "tls://127.0.0.1:6514"\nspool_dir = "not-a-dir/spool"\n'
    )
    assert router(["-c", str(tmp_path / "router.toml"), "serve"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: the router stopped: NotADirectoryError" in err and "not-a-dir/spool" in err, err


def test_bridge_file_problems_reported_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bridge(["init", "--dir", str(tmp_path), "--listen", "127.0.0.1:0"]) == 0
    (tmp_path / "server.key").unlink()
    config = tmp_path / "bridge.toml"
    config.write_text(
        config.read_text()
        + '[enrollment]\nca_cert = "nope-ca.pem"\nca_key = "ca.key"\n'
        + '[audit]\ncollector = "tls://127.0.0.1:6514"\nca_file = "server.key"\n'
    )
    capsys.readouterr()
    assert bridge(["-c", str(config), "check-config"]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err, err
    assert f"server.tls_key: cannot read {tmp_path / 'server.key'}" in err
    assert f"enrollment.ca_cert: cannot read {tmp_path / 'nope-ca.pem'}" in err
    assert f"audit.ca_file: cannot read {tmp_path / 'server.key'}" in err


def test_router_unreadable_proxy_password_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config (and so serve's ExecStartPre) names the proxy password file it cannot read."""
    (tmp_path / "router.toml").write_text(
        '[router]\nname = "hospital-a"\n[bridge]\naddress = "bridge.example.org:443"\npassword = "x"\n'
        'insecure = true\nproxy = "http://hospital@proxy.example.org:3128"\n'
        'proxy_password_file = "missing-proxy-password"\n'
    )
    capsys.readouterr()
    assert router(["-c", str(tmp_path / "router.toml"), "check-config"]) == 2
    err = capsys.readouterr().err
    assert "bridge.proxy_password_file: cannot read proxy_password_file" in err, err
    assert "Traceback" not in err
