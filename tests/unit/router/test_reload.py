"""Configuration reload (SIGHUP): what a re-read router.toml changes, what it leaves for a restart, and
what RouterService applies (routes, callers, pins, audit) or refuses (an invalid file). No sockets."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from relay_common.audit import read_events
from relay_router.config import config_changes, load
from relay_router.service import RouterService
from relay_router.ul import parse_reject
from tests.unit.router.test_admission_service import FakeWriter
from tests.unit.ul.builders import associate_rq

PIN_B = "ab" * 32
PIN_B2 = "cd" * 32


def write_config(path: Path, body: str, *, listen: str = "127.0.0.1:0") -> Path:
    state, audit = path.parent / "state", path.parent / "audit.jsonl"
    path.write_text(
        f"""
[router]
name = "hospital-a"
state_dir = "{state}"
[bridge]
address = "bridge:443"
insecure = true
password = "correct horse battery"
[dicom]
listen = "{listen}"
[audit]
file = "{audit}"
{body}
"""
    )
    return path


REMOTES = """
[[remote]]
ae_title = "B_CT"
site = "hospital-b"
remote_ae_title = "CT"
[[remote]]
ae_title = "B_MR"
site = "hospital-b"
remote_ae_title = "MR"
"""


async def call(service: RouterService, calling: str, called: str) -> tuple[int, int, int] | None:
    reader = asyncio.StreamReader()
    reader.feed_data(associate_rq(called=called, calling=calling))
    writer = FakeWriter()  # peer 127.0.0.1
    await service._local_connection(reader, writer)  # type: ignore[arg-type]
    return parse_reject(bytes(writer.data))


def test_changes_name_the_reloaded_sections_and_the_keys_that_need_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    before = load(write_config(path, REMOTES))
    after = load(
        write_config(
            path,
            REMOTES.replace('"MR"', '"MR2"') + f'[[pin]]\nsite = "hospital-b"\nfingerprint = "{PIN_B}"\n',
            listen="127.0.0.1:11112",
        )
    )
    changes = config_changes(before, after)
    assert changes.applied == ("remote", "pin")
    assert changes.needs_restart == ("dicom.listen",)
    assert config_changes(after, after).any is False


async def test_reload_applies_remote_local_and_pin_and_audits_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path / "router.toml", REMOTES)
    service = RouterService(load(path), config_path=path)
    service.link.site = "hospital-a"
    assert set(service.routes()) == {"B_CT", "B_MR"}
    assert await call(service, "ANYONE", "B_MR") == (2, 3, 1)  # routed; the link is down (transient)
    loaded = service.config_loaded_at

    write_config(
        path,
        REMOTES.split('[[remote]]\nae_title = "B_MR"')[0]
        + '[[local]]\nae_title = "WS_A"\naddresses = ["127.0.0.0/8"]\n'
        + f'[[pin]]\nsite = "hospital-b"\nfingerprint = "{PIN_B}"\n',
        listen="127.0.0.1:11112",
    )
    with caplog.at_level(logging.INFO, logger="relay_router"):
        assert await service.reload_config() is True
    assert set(service.routes()) == {"B_CT"}
    assert await call(service, "WS_A", "B_MR") == (1, 1, 7)  # removed: called AE not recognised
    assert await call(service, "INTRUDER", "B_CT") == (1, 1, 3)  # the new allow-list applies
    assert await call(service, "WS_A", "B_CT") == (2, 3, 1)
    assert service.link.peers.expected("hospital-b") == PIN_B
    assert service.config.dicom.listen == "127.0.0.1:0"  # needs a restart: not applied
    assert service.config_loaded_at >= loaded and service.status()["config_loaded_at"] == service.config_loaded_at
    messages = [r.getMessage() for r in caplog.records]
    assert "configuration reload: needs a restart: dicom.listen (not applied)" in messages
    (event,) = [e for e in read_events(tmp_path / "audit.jsonl") if e["event"] == "config_reload"]
    assert event["outcome"] == "success"
    assert event["changed"] == ["remote", "local", "pin"] and event["needs_restart"] == ["dicom.listen"]

    # Removing every [[local]] entry opens the door again, as at start without them.
    write_config(path, REMOTES, listen="127.0.0.1:11112")
    assert await service.reload_config() is True
    assert await call(service, "INTRUDER", "B_MR") == (2, 3, 1)


async def test_an_invalid_file_keeps_the_running_configuration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path / "router.toml", REMOTES)
    service = RouterService(load(path), config_path=path)
    running = service.config
    write_config(path, REMOTES.replace('"B_MR"', '"B MR\\\\X"'))  # a backslash: not an AE title
    with caplog.at_level(logging.INFO, logger="relay_router"):
        assert await service.reload_config() is False
    assert service.config is running and set(service.routes()) == {"B_CT", "B_MR"}
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage().startswith("configuration reload failed, keeping the running configuration: ")
    assert "remote[1].ae_title" in error.getMessage() and str(path) in error.getMessage()
    (event,) = [e for e in read_events(tmp_path / "audit.jsonl") if e["event"] == "config_reload"]
    assert event["outcome"] == "failure" and "remote[1].ae_title" in event["detail"]


async def test_a_changed_pin_is_checked_against_the_identity_already_offered(tmp_path: Path) -> None:
    from relay_router.approvals import ApprovalStore
    from relay_router.seal import Identity

    path = write_config(tmp_path / "router.toml", REMOTES)
    service = RouterService(load(path), config_path=path)
    peer = Identity.load_or_create(tmp_path / "peer.key").public
    ApprovalStore(service.config.router.state_dir).approve("hospital-b", peer.fingerprint)
    service.link.peers.update({"hospital-b": peer})
    assert service.link.peers.identity("hospital-b") == peer  # approved
    write_config(path, REMOTES + f'[[pin]]\nsite = "hospital-b"\nfingerprint = "{PIN_B2}"\n')
    assert await service.reload_config() is True
    with pytest.raises(Exception, match="identity key changed"):
        service.link.peers.identity("hospital-b")
    alerts = [e for e in read_events(tmp_path / "audit.jsonl") if e["event"] == "identity_mismatch"]
    assert alerts and alerts[0]["pinned"] == PIN_B2


async def test_new_shared_devices_wait_for_the_next_sign_on_when_the_link_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path / "router.toml", REMOTES)
    service = RouterService(load(path), config_path=path)
    write_config(path, REMOTES + '[[shared]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\nshare_with = ["*"]\n')
    with caplog.at_level(logging.INFO, logger="relay_router"):
        assert await service.reload_config() is True
    assert [d.ae_title for d in service.link.shared_devices()] == ["PACS"]  # what the next sign-on sends
    assert "PACS" in service.shared
    assert any("published at the next sign-on" in r.getMessage() for r in caplog.records)
    (event,) = [e for e in read_events(tmp_path / "audit.jsonl") if e["event"] == "config_reload"]
    assert event["changed"] == ["shared"] and event["published"] is False
