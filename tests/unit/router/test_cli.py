"""relay-router's CLI, run in-process: check-config and pacs-config."""

from __future__ import annotations

import json
import logging
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_router.cli import main

# A router listening on 0.0.0.0 tells archives this machine's name (override with --host).
HOST = socket.getfqdn()

ROUTER_TOML = """\
[router]
name = "hospital-a"

[bridge]
address = "bridge.example.org:443"
ca_file = "ca.pem"
password = "correct horse battery"

[dicom]
listen = "0.0.0.0:11112"

[[shared]]
ae_title = "A_PACS"
host = "10.0.0.5"
port = 104
share_with = ["*"]

[[remote]]
ae_title = "B_PACS"
site = "hospital-b"
remote_ae_title = "PACS"

[[remote]]
ae_title = "C_CT"
site = "hospital-c"
"""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """main() installs a root log handler on the (captured) stderr: put the old ones back."""
    monkeypatch.delenv("RELAY_ROUTER_PASSWORD", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def router_toml(tmp_path: Path, text: str = ROUTER_TOML, *, ca: bool = True) -> Path:
    if ca:
        (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    path = tmp_path / "router.toml"
    path.write_text(textwrap.dedent(text))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# -- check-config --------------------------------------------------------------------


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = router_toml(tmp_path)
    rc, out, err = run(capsys, "--config", str(path), "check-config")
    assert rc == 0
    assert out == f"{path}: OK (1 shared devices, 2 remote devices)\n"
    assert "configuration error" not in err


def test_check_config_from_another_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = router_toml(tmp_path)
    monkeypatch.chdir("/")
    rc, out, _ = run(capsys, "-c", str(path), "check-config")
    assert rc == 0 and out.startswith(f"{path}: OK")


def test_check_config_names_a_misspelt_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = router_toml(tmp_path, ROUTER_TOML.replace('listen = "0.0.0.0:11112"', 'listn = "0.0.0.0:11112"'))
    rc, out, err = run(capsys, "--config", str(path), "check-config")
    assert rc == 2 and out == ""
    assert err.startswith(f"configuration error: {path}: dicom.listn: unknown key (known keys here: ")


def test_check_config_names_a_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = router_toml(tmp_path, ROUTER_TOML.replace("port = 104", 'port = "104"'))
    rc, _, err = run(capsys, "--config", str(path), "check-config")
    assert rc == 2
    assert err == f"configuration error: {path}: shared[0].port: expected an integer, got a string ('104')\n"


def test_check_config_missing_ca_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = router_toml(tmp_path, ca=False)
    rc, _, err = run(capsys, "--config", str(path), "check-config")
    assert rc == 2
    assert err == f"configuration error: {path}: bridge.ca_file: cannot read {tmp_path / 'ca.pem'}\n"


def test_check_config_without_a_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = router_toml(tmp_path, ROUTER_TOML.replace('password = "correct horse battery"\n', ""))
    rc, _, err = run(capsys, "--config", str(path), "check-config")
    assert rc == 2
    assert err.startswith(f"configuration error: {path}: bridge.password: no bridge password")
    assert "$RELAY_ROUTER_PASSWORD" in err


def test_check_config_password_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = router_toml(tmp_path, ROUTER_TOML.replace('password = "correct horse battery"\n', ""))
    monkeypatch.setenv("RELAY_ROUTER_PASSWORD", "from the environment")
    rc, out, _ = run(capsys, "--config", str(path), "check-config")
    assert rc == 0 and "OK" in out


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    rc, _, err = run(capsys, "--config", str(path), "check-config")
    assert rc == 2
    assert err == f"configuration error: {path}: cannot read the file: No such file or directory\n"


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


# -- pacs-config -------------------------------------------------------------------------


def test_pacs_config_orthanc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = router_toml(tmp_path)
    rc, out, _ = run(capsys, "--config", str(path), "pacs-config", "--format", "orthanc")
    assert rc == 0
    assert json.loads(out) == {
        "DicomModalities": {
            "B_PACS": ["B_PACS", HOST, 11112],
            "C_CT": ["C_CT", HOST, 11112],
        }
    }


def test_pacs_config_uses_the_listen_host_or_the_given_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = router_toml(tmp_path, ROUTER_TOML.replace("0.0.0.0:11112", "192.168.1.5:4242"))
    _, out, _ = run(capsys, "--config", str(path), "pacs-config", "--format", "orthanc")
    assert json.loads(out)["DicomModalities"]["C_CT"] == ["C_CT", "192.168.1.5", 4242]
    _, out, _ = run(capsys, "--config", str(path), "pacs-config", "--format", "orthanc", "--host", "relay.lan")
    assert json.loads(out)["DicomModalities"]["B_PACS"] == ["B_PACS", "relay.lan", 4242]


def test_pacs_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = router_toml(tmp_path)
    rc, out, _ = run(capsys, "--config", str(path), "pacs-config", "--format", "json")
    assert rc == 0
    assert json.loads(out) == [
        {"ae_title": "B_PACS", "host": HOST, "port": 11112, "site": "hospital-b", "remote_ae_title": "PACS"},
        {"ae_title": "C_CT", "host": HOST, "port": 11112, "site": "hospital-c", "remote_ae_title": "C_CT"},
    ]


def test_pacs_config_table_is_the_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = router_toml(tmp_path)
    rc, out, _ = run(capsys, "--config", str(path), "pacs-config")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["AE", "title", "host", "port", "reaches"]
    assert lines[2].split() == ["B_PACS", HOST, "11112", "PACS", "at", "hospital-b"]
    assert lines[3].split() == ["C_CT", HOST, "11112", "C_CT", "at", "hospital-c"]
    assert len(lines) == 4
    _, table, _ = run(capsys, "--config", str(path), "pacs-config", "--format", "table")
    assert table == out


def test_pacs_config_table_mentions_expose_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = router_toml(tmp_path, ROUTER_TOML.replace('listen = "0.0.0.0:11112"', "expose_all = true"))
    _, out, _ = run(capsys, "--config", str(path), "pacs-config", "--format", "table")
    assert out.splitlines()[-1].startswith("(expose_all = true: more titles appear")


def test_pacs_config_refuses_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = router_toml(tmp_path, ROUTER_TOML.replace('site = "hospital-c"', 'site = "hospital-a"'))
    rc, out, err = run(capsys, "--config", str(path), "pacs-config", "--format", "orthanc")
    assert rc == 2 and out == ""
    assert err == f"configuration error: {path}: (top level): remote device 'C_CT' names this router's own site\n"
