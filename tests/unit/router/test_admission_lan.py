"""RouterService carries out the LAN allow-list and the expose_all route reports: the DICOM answer,
the audit event, the metric label and the log line (no sockets, a fake writer)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from relay_common.audit import read_events
from relay_common.config import parse_config
from relay_router.config import RouterConfig
from relay_router.service import RouterService
from relay_router.tunnel import DirectoryEntry
from relay_router.ul import parse_reject
from tests.unit.router.test_admission_service import FakeWriter
from tests.unit.ul.builders import associate_rq


def make_service(tmp_path: Path, **extra: Any) -> RouterService:
    doc = {
        "router": {"name": "hospital-a", "state_dir": str(tmp_path / "state")},
        "bridge": {"address": "bridge:443", "insecure": True, "password": "correct horse battery"},
        "dicom": {"listen": "127.0.0.1:0", **extra.pop("dicom", {})},
        "audit": {"file": str(tmp_path / "audit.jsonl")},
        "remote": [{"ae_title": "B_CT", "site": "hospital-b", "remote_ae_title": "CT"}],
        **extra,
    }
    service = RouterService(parse_config(doc, RouterConfig, base_dir=tmp_path))
    service.link.site = "hospital-a"
    return service


async def call(service: RouterService, calling: str, called: str = "B_CT") -> FakeWriter:
    reader = asyncio.StreamReader()
    reader.feed_data(associate_rq(called=called, calling=calling))
    writer = FakeWriter()  # peer 127.0.0.1
    await service._local_connection(reader, writer)  # type: ignore[arg-type]
    return writer


async def test_an_unknown_caller_is_rejected_logged_audited_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service(tmp_path, local=[{"ae_title": "WS_A", "addresses": ["127.0.0.0/8"]}])
    with caplog.at_level(logging.INFO, logger="relay_router"):
        writer = await call(service, "INTRUDER")
    assert parse_reject(bytes(writer.data)) == (1, 1, 3) and writer.closed
    (event,) = [e for e in read_events(tmp_path / "audit.jsonl") if e["event"] == "association"]
    assert (event["outcome"], event["result"], event["reason"]) == ("failure", "rejected", "unknown_calling_ae")
    assert event["address"] == "127.0.0.1" and event["calling_ae"] == "INTRUDER"
    sample = service.metrics.registry.get_sample_value
    assert sample("relay_router_refusals_total", {"reason": "unknown_calling_ae"}) == 1
    (record,) = [r for r in caplog.records if "INTRUDER" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "A-ASSOCIATE-RJ to 'INTRUDER' at '127.0.0.1' -> 'B_CT': "
        "calling AE title 'INTRUDER' from '127.0.0.1' is not a [[local]] device of this router"
    )
    # A listed caller goes on to the next check (here: the bridge link is down).
    assert parse_reject(bytes((await call(service, "WS_A")).data)) == (2, 3, 1)


async def test_shared_devices_are_allowed_from_the_address_their_host_resolves_to(tmp_path: Path) -> None:
    service = make_service(
        tmp_path,
        local=[{"ae_title": "WS_A", "addresses": ["10.1.0.31"]}],
        shared=[{"ae_title": "STORE", "host": "localhost", "port": 104}],
    )
    assert not service.callers.allows("STORE", "127.0.0.1")  # until start() has resolved the host
    await service.load_callers()  # what start() does
    assert service.callers.allows("STORE", "127.0.0.1")
    assert not service.callers.allows("STORE", "10.1.0.31")
    assert parse_reject(bytes((await call(service, "STORE")).data)) == (2, 3, 1)  # admitted, link down


async def test_route_moves_and_conflicts_are_audited(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pins = [{"site": s, "fingerprint": "0" * 64} for s in ("hospital-b", "hospital-c")]
    service = make_service(tmp_path, dicom={"expose_all": True}, pin=pins, remote=[])
    with caplog.at_level(logging.INFO, logger="relay_router"):
        service.link.directory = [DirectoryEntry("hospital-b", "PACS", "", True)]
        assert service.routes()["PACS"].site == "hospital-b"
        service.link.directory = [DirectoryEntry("hospital-c", "PACS", "", True)]
        assert service.routes()["PACS"].site == "hospital-c"
        service.link.directory = [DirectoryEntry(s, "PACS", "", True) for s in ("hospital-c", "evil")]
        assert "PACS" not in service.routes()
        service.link.directory = [DirectoryEntry("evil", "MR", "", True)]
        assert service.routes() == {}
    events = [e for e in read_events(tmp_path / "audit.jsonl") if e["event"].startswith("route_")]
    assert [(e["event"], e["outcome"]) for e in events] == [("route_changed", "alert"), ("route_conflict", "alert")]
    assert (events[0]["site"], events[0]["previous_site"], events[0]["routed"]) == ("hospital-c", "hospital-b", True)
    assert events[1]["sites"] == ["evil", "hospital-c"] and events[1]["previous_site"] == "hospital-c"
    lines = [r.getMessage() for r in caplog.records if "expose_all" in r.getMessage()]
    assert lines == [
        "expose_all: AE title 'PACS' now leads to site hospital-c instead of pinned site hospital-b",
        "expose_all: AE title 'PACS' is published by several sites (evil and hospital-c); it is not routed"
        " (it led to hospital-c)",
        "expose_all: AE title 'MR' at site evil is not routed: the site has no [[pin]] in router.toml",
    ]


@pytest.mark.parametrize(
    ("dicom", "message"),
    [
        ({"max_inbound_associations": 300}, "dicom.max_inbound_associations: must be between 1 and max_associations"),
        ({"max_inbound_associations": 4, "max_inbound_per_site": 5}, "must not exceed max_inbound_associations (4)"),
        ({"max_pending_per_address": 100}, "dicom.max_pending_per_address: must be between 1 and max_pending_requests"),
        ({"max_request_bytes": 100}, "dicom.max_request_bytes: must be between 1024 and 1048576"),
        ({"tls_listen": "0.0.0.0:2762"}, "dicom.tls_listen: needs tls_cert_file and tls_key_file"),
    ],
)
def test_limit_and_tls_keys_are_validated(tmp_path: Path, dicom: dict[str, object], message: str) -> None:
    from relay_common.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_service(tmp_path, dicom=dicom)


def test_default_limits_keep_slots_for_our_own_devices(tmp_path: Path) -> None:
    limits = make_service(tmp_path).limits
    assert (limits.total, limits.outbound, limits.inbound, limits.inbound_per_site) == (200, 200, 100, 25)
    small = make_service(tmp_path, dicom={"max_associations": 3}).limits
    assert (small.total, small.outbound, small.inbound, small.inbound_per_site) == (3, 3, 1, 1)


def test_a_local_entry_with_a_bad_address_names_the_key(tmp_path: Path) -> None:
    from relay_common.config import ConfigError

    with pytest.raises(ConfigError, match=r"local\[0\]\.addresses: '10\.1\.0\.300' is not an IP address or network"):
        make_service(tmp_path, local=[{"ae_title": "WS", "addresses": ["10.1.0.300"]}])
