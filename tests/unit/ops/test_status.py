"""`relay-router status|devices` and `relay-bridge status`: reading, judging and rendering status files."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_bridge import status as bridge_status
from relay_common.errors import Reason
from relay_router import status as router_status
from relay_router.cli import main as router_main
from relay_router.outcome import Outcome, Result
from tests.unit.ops.helpers import FakeService, router_config


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("RELAY_ROUTER_PASSWORD", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def router_status_dict(tmp_path: Path, **changes: object) -> dict[str, object]:
    """What RouterService.status() returns for the fake service (the same keys the file has)."""
    service = FakeService(router_config(tmp_path))
    o = Outcome("f" * 32, "outbound", "hospital-b", "WS_A", "PACS_B", result="released", bytes_to_remote=2_000_000)
    service.metrics.finished(o)
    r = Outcome("e" * 32, "outbound", "", "WS_A", "NOPE")
    r.refuse(Result.REJECTED, Reason.UNKNOWN_CALLED_AE, "called AE title 'NOPE' is not a remote device on this router")
    service.metrics.finished(r)
    status = {
        "site": "hospital-a",
        "connected": True,
        "connected_since": time.time() - 3700,
        "last_error": None,
        "reconnects": 1,
        "dicom_port": 11112,
        "directory": [
            {"site": "hospital-b", "ae_title": "ORTHANC", "description": "", "online": True},
            {"site": "hospital-c", "ae_title": "CT_C", "description": "", "online": False},
            {"site": "hospital-c", "ae_title": "MR_C", "description": "", "online": False},
        ],
        "routes": {
            "PACS_B": {"site": "hospital-b", "ae_title": "ORTHANC"},
            "CT_C": {"site": "hospital-c", "ae_title": "CT_C"},
            "MR_C": {"site": "hospital-c", "ae_title": "MR_C"},
            "GONE": {"site": "hospital-d", "ae_title": "GONE"},
        },
        "active_associations": 1,
        **router_status.status_extra(service),  # type: ignore[arg-type]
    }
    status["configured_remote"] = ["CT_C", "GONE", "PACS_B"]
    status.update(changes)
    return status


def test_status_extra_has_what_the_commands_need(tmp_path: Path) -> None:
    extra = router_status.status_extra(FakeService(router_config(tmp_path)))  # type: ignore[arg-type]
    assert {"pid", "host", "updated", "running", "bridge", "shared", "configured_remote", "recent", "metrics"} <= set(
        extra
    )
    assert extra["shared"] == [
        {"ae_title": "WS_A", "host": "10.1.0.31", "port": 11113, "share_with": ["hospital-b"], "description": ""}
    ]
    assert isinstance(extra["updated"], int)  # whole seconds: the file is rewritten about once a second
    json.dumps(extra)


def test_connected_router(tmp_path: Path) -> None:
    report = router_status.evaluate(router_status_dict(tmp_path), None)
    assert report["running"] and report["exit_code"] == 0
    text = router_status.render_status(report)
    assert text.startswith("relay-router hospital-a: running (pid ")
    assert "signed on to the bridge at bridge.example.org:443 since" in text and "(61 min)" in text
    assert "WS_A              10.1.0.31:11113   shared with hospital-b" in text
    assert "Remote devices (1 of 4 online)" in text
    rows = {r["ae_title"]: r for r in report["remote_devices"]}
    assert rows["PACS_B"]["online"] and rows["PACS_B"]["remote_ae_title"] == "ORTHANC"
    assert rows["CT_C"]["in_directory"] and not rows["CT_C"]["online"]
    assert not rows["GONE"]["in_directory"]
    assert rows["MR_C"]["source"] == "expose_all" and rows["CT_C"]["source"] == "remote"
    assert "OFFLINE (its site is not signed on to the bridge)" in text
    assert "UNKNOWN (not in the directory: hospital-d does not share it" in text
    assert "Associations in the last hour: 2 (rejected 1, released 1); 1 active now" in text
    assert "unknown_called_ae: called AE title 'NOPE' is not a remote device" in text
    assert "2.0 MB out" in text


def test_disconnected_router_exits_1(tmp_path: Path) -> None:
    status = router_status_dict(tmp_path, connected=False, connected_since=None, last_error="UNAVAILABLE: refused")
    report = router_status.evaluate(status, None)
    assert report["exit_code"] == 1
    text = router_status.render_status(report)
    assert "NOT signed on to the bridge at bridge.example.org:443" in text
    assert "last error: UNAVAILABLE: refused" in text
    assert 'docs/operations.md, "The router does not sign on"' in text
    guide = (Path(__file__).resolve().parents[3] / "docs" / "operations.md").read_text()
    assert "### The router does not sign on" in guide


def test_stale_stopped_and_missing_files_exit_3(tmp_path: Path) -> None:
    stale = router_status_dict(tmp_path, pid=None, updated=int(time.time()) - 60)
    report = router_status.evaluate(stale, None)
    assert report["exit_code"] == 3 and not report["running"]
    text = router_status.render_status(report)
    # 60 s, or a second or two more on a loaded machine between writing and reading the clock.
    assert re.match(r"relay-router hospital-a: NOT RUNNING: the status file was last updated 6[0-3] s ago", text)
    assert "what follows is the last state it recorded" in text and "metrics:" not in text

    stopped = router_status.stopped_status(router_status_dict(tmp_path))
    assert router_status.evaluate(stopped, None)["exit_code"] == 3
    assert "NOT RUNNING: stopped at" in router_status.render_status(router_status.evaluate(stopped, None))

    missing = router_status.evaluate(*router_status.read_status(tmp_path / "nope.json"))
    assert missing["exit_code"] == 3
    assert router_status.render_status(missing).startswith("relay-router: NOT RUNNING: no status file at")


def test_devices_table(tmp_path: Path) -> None:
    text = router_status.render_devices(router_status.evaluate(router_status_dict(tmp_path), None))
    lines = text.splitlines()
    assert lines[0].split() == ["local", "AE", "title", "site", "remote", "AE", "title", "state"]
    assert "PACS_B            hospital-b           ORTHANC           online" in lines
    assert "MR_C              hospital-c           MR_C              offline (expose_all)" in lines
    assert "GONE              hospital-d           GONE              not in directory" in lines


ROUTER_TOML = """\
[router]
name = "hospital-a"
state_dir = "state"

[bridge]
address = "bridge.example.org:443"
insecure = true

[[remote]]
ae_title = "PACS_B"
site = "hospital-b"
remote_ae_title = "ORTHANC"
"""


def test_cli_reads_the_default_status_file_in_state_dir_and_needs_no_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No password anywhere: status must work anyway (admins run it without the router's secrets)."""
    config = tmp_path / "router.toml"
    config.write_text(ROUTER_TOML)
    assert router_main(["-c", str(config), "status"]) == 3
    out = capsys.readouterr().out
    assert f"no status file at {tmp_path / 'state' / 'status.json'}" in out
    assert router_main(["-c", str(config), "devices"]) == 3
    out = capsys.readouterr().out
    assert "PACS_B            hospital-b           ORTHANC           not in directory" in out
    assert "router not running" in out

    (tmp_path / "state").mkdir()
    status = router_status_dict(tmp_path)
    (tmp_path / "state" / "status.json").write_text(json.dumps(status))
    assert router_main(["-c", str(config), "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["running"] and report["exit_code"] == 0 and report["site"] == "hospital-a"
    assert report["status_file"] == str(tmp_path / "state" / "status.json")
    assert router_main(["-c", str(config), "devices", "--json"]) == 0
    assert {r["ae_title"] for r in json.loads(capsys.readouterr().out)} == {"PACS_B", "CT_C", "MR_C", "GONE"}
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps({**status, "connected": False}))
    assert router_main(["-c", str(config), "status", "--status-file", str(other)]) == 1


def test_write_stopped_marks_the_file(tmp_path: Path) -> None:
    service = FakeService(router_config(tmp_path))
    service.status_file = tmp_path / "status.json"
    service.status = lambda: router_status_dict(tmp_path)  # type: ignore[attr-defined]
    router_status.write_stopped(service)  # type: ignore[arg-type]
    written = json.loads(service.status_file.read_text())
    assert written["running"] is False and written["connected"] is False and written["active_associations"] == 0


# -- bridge ----------------------------------------------------------------------------


def bridge_status_dict(**changes: object) -> dict[str, object]:
    now = time.time()
    status: dict[str, object] = {
        "app": "relay-bridge",
        "pid": None,
        "host": "bridge-host",
        "updated": int(now),
        "running": True,
        "started": now - 7200,
        "listen": "0.0.0.0:443",
        "port": 443,
        "metrics": {"listen": "127.0.0.1:9465", "error": None},
        "signed_on": 2,
        "active_associations": 1,
        "routers": [
            {
                "name": "hospital-a",
                "enabled": True,
                "signed_on": True,
                "since": now - 600,
                "source": "203.0.113.5",
                "last_sign_on": now - 600,
                "signed_off": None,
                "active_associations": 1,
                "devices": [{"ae_title": "WS_A", "description": "", "share_with": ["hospital-b"]}],
            },
            {
                "name": "hospital-b",
                "enabled": True,
                "signed_on": True,
                "since": now - 60,
                "source": "198.51.100.7",
                "last_sign_on": now - 60,
                "signed_off": None,
                "active_associations": 1,
                "devices": [{"ae_title": "ORTHANC", "description": "main archive", "share_with": ["*"]}],
            },
            {
                "name": "hospital-c",
                "enabled": True,
                "signed_on": False,
                "since": None,
                "source": None,
                "last_sign_on": now - 86400,
                "signed_off": now - 300,
                "active_associations": 0,
                "devices": [],
            },
            {
                "name": "old-site",
                "enabled": False,
                "signed_on": False,
                "since": None,
                "source": None,
                "last_sign_on": None,
                "signed_off": None,
                "active_associations": 0,
                "devices": [],
            },
        ],
        "recent": {
            "window_s": 3600,
            "total": 2,
            "counts": {"refused": 1, "relayed": 1},
            "last": [
                {
                    "time": now - 30,
                    "association": "a" * 32,
                    "from_site": "hospital-a",
                    "to_site": "hospital-b",
                    "called_ae": "ORTHANC",
                    "calling_ae": "WS_A",
                    "outcome": "relayed",
                    "bytes_from_initiator": 1500,
                    "bytes_from_destination": 3_000_000,
                    "frames": 20,
                    "seconds": 2.5,
                },
                {
                    "time": now - 10,
                    "association": "b" * 32,
                    "from_site": None,
                    "to_site": None,
                    "outcome": "refused",
                    "reason": "site_offline",
                    "detail": "site 'hospital-c' is offline",
                },
            ],
        },
    }
    status.update(changes)
    return status


def test_bridge_links_follow_share_lists_and_sign_ons() -> None:
    links = bridge_status.links(bridge_status_dict())
    assert links == [
        {"from": "hospital-a", "to": "hospital-b", "devices": ["ORTHANC"], "up": True, "down_sites": []},
        {"from": "hospital-b", "to": "hospital-a", "devices": ["WS_A"], "up": True, "down_sites": []},
        {"from": "hospital-c", "to": "hospital-b", "devices": ["ORTHANC"], "up": False, "down_sites": ["hospital-c"]},
        {"from": "old-site", "to": "hospital-b", "devices": ["ORTHANC"], "up": False, "down_sites": ["old-site"]},
    ]


def test_bridge_map_rendering() -> None:
    report = bridge_status.evaluate(bridge_status_dict(), None)
    assert report["exit_code"] == 0
    text = bridge_status.render_status(report)
    assert "relay-bridge: running (pid None) on 0.0.0.0:443 (port 443), up 2 h 0 min" in text
    assert "metrics: http://127.0.0.1:9465/metrics" in text
    assert "2 of 4 routers signed on; 1 associations active; last hour: 2 (refused 1, relayed 1)" in text
    assert "● hospital-a  up since" in text and "from 203.0.113.5; 1 active" in text
    assert "WS_A  shared with hospital-b" in text
    assert "ORTHANC  shared with every site  (main archive)" in text
    assert "○ hospital-c  down since" in text and "(5 min)" in text
    assert "x old-site  DISABLED" in text
    assert "hospital-a -> hospital-b" in text and "down (hospital-c offline)" in text
    assert "relayed   WS_A -> ORTHANC  1.5 KB / 3.0 MB, 2.5 s" in text
    assert "refused (site_offline): site 'hospital-c' is offline" in text
    assert "\x1b[" not in text  # no colour codes unless asked for
    assert "\x1b[" in bridge_status.render_status(report, color=True)


def test_bridge_not_running() -> None:
    report = bridge_status.evaluate(bridge_status_dict(updated=int(time.time()) - 100), None)
    assert report["exit_code"] == 3
    assert bridge_status.render_status(report).startswith("relay-bridge: NOT RUNNING: the status file was last updated")
    missing = bridge_status.evaluate(None, "no status file at /x")
    assert bridge_status.render_status(missing) == "relay-bridge: NOT RUNNING: no status file at /x"


def test_bridge_status_command_reads_next_to_the_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relay_bridge.cli import main as bridge_main

    config = tmp_path / "bridge.toml"
    config.write_text('[server]\ninsecure = true\n[storage]\ndatabase = "db/bridge.sqlite3"\n')
    assert bridge_main(["-c", str(config), "status"]) == 3
    assert f"no status file at {tmp_path / 'db' / 'bridge.sqlite3.status.json'}" in capsys.readouterr().out
    assert not (tmp_path / "db").exists()  # status never creates the database
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "bridge.sqlite3.status.json").write_text(json.dumps(bridge_status_dict()))
    assert bridge_main(["-c", str(config), "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["running"] and len(report["links"]) == 4


def test_bridge_status_escapes_markup_and_control_characters_from_routers() -> None:
    """A description, title or detail with ANSI escapes or Rich markup cannot forge lines or colours."""
    status = bridge_status_dict()
    device = status["routers"][0]["devices"][0]  # type: ignore[index]
    device["description"] = "[/dim][green]● forged-site[/]  up\x1b[2J\x1b[1;1H"
    device["ae_title"] = "WS[bold]A"
    report = bridge_status.evaluate(status, None)
    for color in (False, True):
        text = bridge_status.render_status(report, color=color)
        assert "\x1b[2J" not in text and "\x1b[1;1H" not in text
        assert "\\x1b[2J\\x1b[1;1H" in text
        assert "[/dim][green]● forged-site[/]" in text  # shown literally, not interpreted
        assert "WS[bold]A" in text


def test_router_status_escapes_what_came_from_the_bridge_or_a_peer(tmp_path: Path) -> None:
    status = router_status_dict(tmp_path, last_error="refused\x1b[2K\rrelay-router: all fine")
    text = router_status.render_status(router_status.evaluate(status, None))
    assert "\x1b" not in text and "\r" not in text
    assert "refused\\x1b[2K\\x0drelay-router: all fine" in text
