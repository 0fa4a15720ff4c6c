"""Router configuration reload on SIGHUP (`systemctl reload relay-router`), with real processes.

A real bridge, two real routers and pynetdicom archives. site-a runs a storage association, then its
router.toml gains a [[shared]] device, loses a [[remote]] and gains a [[local]] allow-list, and the
router gets SIGHUP:
- the running association goes on and its images arrive byte-identical;
- site-b's directory (its status) shows the new shared device, and site-b reaches it (C-ECHO, C-STORE);
- the removed remote title is refused (A-ASSOCIATE-RJ 1/1/7); the allow-list applies to new callers;
- a changed listen address is reported as needing a restart and not applied;
- an invalid file keeps the running configuration, with one ERROR line naming the key.
Each reload is audited (config_reload).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.ul import parse_reject
from tests.support.wire import exchange, wait_until
from tests.unit.ul.builders import associate_rq

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
PERMANENT_CALLED_AE_UNKNOWN = (1, 1, 7)
PERMANENT_CALLING_AE_UNKNOWN = (1, 1, 3)


def _associate(port: int, called: str, calling: str = "WS") -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title=called)
    assert assoc.is_established, f"{calling} -> {called} through port {port}"
    return assoc


def _store(assoc: object, files: list[Path]) -> None:
    for path in files:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0  # type: ignore[attr-defined]


def _reloads(net: LocalRelayNetwork, site: str) -> list[dict[str, object]]:
    path = net.workdir / f"audit-{site}.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if e.get("event") == "config_reload"]


def _in_directory(net: LocalRelayNetwork, site: str, owner: str, title: str) -> bool:
    directory = net.status(site).get("directory", [])
    return any(d["site"] == owner and d["ae_title"] == title and d["online"] for d in directory)  # type: ignore[index, union-attr]


def test_sighup_applies_shared_remote_and_local_without_dropping_a_running_association(
    relay_network: LocalRelayNetwork, archive_factory: Callable[..., DemoArchive], ct_series: list[Path]
) -> None:
    net = relay_network
    archive_b = archive_factory("ARCHIVE_B")
    archive_a = archive_factory("ARCHIVE_A")
    net.add_site(
        "site-b",
        shared=[Shared("ARCHIVE_B", HOST, archive_b.port, ["site-a"])],
        remote=[
            Remote("ARCHIVE_A", "site-a")  # shared by site-a only after its reload
        ],
    )
    site_a = net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b"), Remote("OLD_B", "site-b", "ARCHIVE_B")])
    net.wait_connected()
    port_a, port_b = site_a.port, net.sites["site-b"].port
    assert port_a and port_b and site_a.process is not None
    assert not _in_directory(net, "site-b", "site-a", "ARCHIVE_A")
    loaded_at = net.status("site-a")["config_loaded_at"]

    running = _associate(port_a, "ARCHIVE_B")
    _store(running, ct_series[:2])

    # The new configuration: a shared device, one remote fewer, an allow-list, and a new listen
    # address (which needs a restart).
    site_a.shared = [Shared("ARCHIVE_A", HOST, archive_a.port, ["site-b"])]
    site_a.remote = [Remote("ARCHIVE_B", "site-b")]
    config = net.write_router_config(site_a)
    text = config.read_text().replace(f'listen = "127.0.0.1:{port_a}"', 'listen = "127.0.0.1:1"')
    config.write_text(text + '\n[[local]]\nae_title = "WS"\naddresses = ["127.0.0.0/8"]\n')
    site_a.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in net.log("site-a"), what="the reload")
    assert site_a.process.poll() is None, "SIGHUP does not end the router"

    _store(running, ct_series[2:])  # the running association goes on
    assert running.send_c_echo().Status == 0  # type: ignore[attr-defined]
    running.release()  # type: ignore[attr-defined]
    assert archive_b.fingerprints() == fingerprints(ct_series)

    assert parse_reject(exchange(port_a, associate_rq(called="OLD_B", calling="WS"))) == PERMANENT_CALLED_AE_UNKNOWN
    assert parse_reject(exchange(port_a, associate_rq(called="ARCHIVE_B", calling="INTRUDER"))) == (
        PERMANENT_CALLING_AE_UNKNOWN
    )
    again = _associate(port_a, "ARCHIVE_B")  # a listed caller still gets through
    assert again.send_c_echo().Status == 0  # type: ignore[attr-defined]
    again.release()  # type: ignore[attr-defined]

    # The new shared device is published: site-b's directory shows it, and site-b reaches it.
    wait_until(lambda: _in_directory(net, "site-b", "site-a", "ARCHIVE_A"), timeout=15, what="the publication")
    to_a = _associate(port_b, "ARCHIVE_A", calling="WS_B")
    _store(to_a, ct_series[:1])
    to_a.release()  # type: ignore[attr-defined]
    assert archive_a.fingerprints() == fingerprints(ct_series[:1])

    log = net.log("site-a")
    assert "configuration reload: needs a restart: dicom.listen (not applied)" in log
    assert net.status("site-a")["dicom_port"] == port_a
    assert net.status("site-a")["config_loaded_at"] > loaded_at  # type: ignore[operator]
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay_router.cli",
            "-c",
            str(config),
            "status",
            "--status-file",
            str(net.status_path("site-a")),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "configuration loaded at " in shown.stdout, shown.stdout + shown.stderr
    (event,) = _reloads(net, "site-a")
    assert event["outcome"] == "success" and event["published"] is True
    assert event["changed"] == ["shared", "remote", "local"] and event["needs_restart"] == ["dicom.listen"]

    # An invalid file: one ERROR line naming the key; the running configuration stays.
    config.write_text(config.read_text() + '\n[[remote]]\nae_title = "BAD\\\\TITLE"\nsite = "site-b"\n')
    site_a.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reload failed" in net.log("site-a"), what="the failed reload")
    (line,) = [json.loads(e) for e in net.log("site-a").splitlines() if "configuration reload failed" in e]
    assert line["level"] == "error" and "keeping the running configuration" in line["msg"]
    assert "remote[1].ae_title: 'BAD\\\\TITLE' is not a valid AE title" in line["msg"]
    assert site_a.process.poll() is None
    check = _associate(port_a, "ARCHIVE_B")
    assert check.send_c_echo().Status == 0  # type: ignore[attr-defined]
    check.release()  # type: ignore[attr-defined]
    assert parse_reject(exchange(port_a, associate_rq(called="OLD_B", calling="WS"))) == PERMANENT_CALLED_AE_UNKNOWN
    assert [e["outcome"] for e in _reloads(net, "site-a")] == ["success", "failure"]
