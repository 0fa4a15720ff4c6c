"""Administrative commands leave an audit record, in the JSON file and at the collector as DICOM XML."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from relay_bridge.cli import main as bridge
from relay_common.audit import read_events
from relay_common.syslog_tls import wait_until
from tests.unit.audit.test_dicom_audit import SCHEMA
from tests.unit.audit.test_syslog_tls import Collector, make_dev_pki


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_router_commands_are_audited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    assert bridge(["init", "--dir", str(tmp_path), "--listen", "127.0.0.1:0"]) == 0
    make_dev_pki(tmp_path / "collector", hostnames=["localhost"], ips=["127.0.0.1"])
    collector = Collector(tmp_path / "collector")
    try:
        config = tmp_path / "bridge.toml"
        config.write_text(
            config.read_text()
            + f'[audit]\ncollector = "tls://127.0.0.1:{collector.port}"\nca_file = "collector/ca.pem"\n'
        )
        cli = ["-c", str(config)]
        assert bridge([*cli, "router", "add", "hospital-a"]) == 0
        assert bridge([*cli, "router", "disable", "hospital-a"]) == 0
        assert bridge([*cli, "router", "remove", "nobody"]) == 1  # fails: audited as a failure
        assert bridge([*cli, "share", "list"]) == 0
        events = [(e["event"], e["outcome"], e.get("router"), e["user"]) for e in read_events(tmp_path / "audit.jsonl")]
        assert events == [
            ("router_add", "success", "hospital-a", "alice"),
            ("router_disable", "success", "hospital-a", "alice"),
            ("router_remove", "failure", "nobody", "alice"),
            ("share_list", "success", None, "alice"),
        ]
        assert wait_until(lambda: len(collector.frames()) == 4, 10), collector.frames()
        for frame in collector.frames():
            xml = frame.partition(b"\xef\xbb\xbf")[2]
            doc = etree.fromstring(xml)
            assert SCHEMA.validate(doc), SCHEMA.error_log
            assert doc.find("EventIdentification/EventID").get("csd-code") == "110113"  # Security Alert
        first = etree.fromstring(collector.frames()[0].partition(b"\xef\xbb\xbf")[2])
        assert first.find("EventIdentification/EventTypeCode").get("csd-code") == "110137"
        assert [p.get("UserID") for p in first.findall("ActiveParticipant")] == [
            "relay-bridge@" + first.find("AuditSourceIdentification").get("AuditSourceID"),
            "alice",
        ]
        assert first.find("ParticipantObjectIdentification").get("ParticipantObjectID") == "hospital-a"
    finally:
        collector.close()
