"""`relay-router spool list|retry|purge`, the spool in `relay-router status`, the accel metrics, status classes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from relay_router import cli as router_cli
from relay_router.accel.cli import STATES, configured_spool, spool_check, spool_command
from relay_router.accel.delivery import DeliveryOutcome, DeliveryPool, Destination, Outcome, classify_status
from relay_router.accel.metrics import DeliveryStats, register_accel_metrics
from relay_router.accel.spool import EntryState, Spool, read_entries
from relay_router.status import status_command
from tests.unit.ops.helpers import router_config

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def config_and_spool(tmp_path: Path) -> Iterator[tuple[object, Path, list[str]]]:
    """A router config whose default spool (STATE_DIR/spool) holds one RECEIVED and two DEAD entries."""
    config = router_config(tmp_path)
    root, _ = configured_spool(config)
    spool = Spool(root, max_bytes=1 << 20)
    ids = []
    for _ in range(3):
        with spool.writer(
            "PACS_B", sop_class_uid=CT, sop_instance_uid=generate_uid(), transfer_syntax=ExplicitVRLittleEndian
        ) as w:
            w.write(b"\0" * 100)
            ids.append(w.commit().id)
    for entry_id in ids[1:]:
        spool.set_state(entry_id, EntryState.SENDING)
        spool.fail(entry_id, "0x0122 the device refused SOP class \x1b[31m", permanent=True)
    spool.close()
    yield config, root, ids


def run(config: object, *argv: str) -> int:
    args = router_cli._parser().parse_args(["spool", *argv])
    return spool_command(config, args)  # type: ignore[arg-type]


def test_states_listed_by_the_parser_are_the_spool_states() -> None:
    assert STATES == tuple(str(s) for s in EntryState)


def test_default_spool_is_under_the_state_dir(tmp_path: Path) -> None:
    root, limit = configured_spool(router_config(tmp_path))
    # [accelerate] spool_max_bytes has a default (relay_router.config.AccelerateSection): 10 GiB.
    assert root == tmp_path / "state" / "spool" and limit == 10 * 1024**3


def test_list_shows_entries_and_escapes_what_devices_wrote(
    config_and_spool: tuple[object, Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _, ids = config_and_spool
    assert run(config, "list") == 0
    out = capsys.readouterr().out
    assert "DEAD LETTERS: 2" in out and all(i in out for i in ids)
    assert "\x1b" not in out, "terminal control characters from a device's text are escaped"
    assert run(config, "list", "--state", "received", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in listed["listed"]] == ids[:1] and listed["entries"]["dead"] == 2


def test_retry_and_purge_when_no_router_runs(
    config_and_spool: tuple[object, Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, root, ids = config_and_spool
    assert run(config, "retry", ids[1]) == 0
    assert "1 dead entry will be delivered" in capsys.readouterr().out
    assert run(config, "retry", ids[0]) == 1  # not dead
    assert "not dead" in capsys.readouterr().err
    assert run(config, "purge", "--all") == 0
    assert "1 dead entry deleted" in capsys.readouterr().out
    assert sorted(e.id for e in read_entries(root)) == ids[:2]
    assert run(config, "purge", "../../etc") == 1
    with pytest.raises(SystemExit):
        run(config, "purge")  # an id or --all: never a purge by accident


def test_retry_while_the_router_holds_the_spool_is_handed_over(
    config_and_spool: tuple[object, Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, root, ids = config_and_spool
    running = Spool(root, max_bytes=1 << 20)  # the serving router
    try:
        assert run(config, "retry", "--all") == 0
        assert "handed to the running router" in capsys.readouterr().out
        assert running.apply_requests() == 2
        assert {e.state for e in running.entries()} == {EntryState.RECEIVED}
    finally:
        running.close()


def test_status_shows_the_spool_and_its_dead_letters(
    config_and_spool: tuple[object, Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _, ids = config_and_spool
    status_command(config, tmp_path / "no-status.json", as_json=False)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "spool " in out and "received 1, dead 2" in out and "DEAD LETTERS: 2" in out and ids[2] in out
    status_command(config, tmp_path / "no-status.json", as_json=True)  # type: ignore[arg-type]
    assert json.loads(capsys.readouterr().out)["spool"]["entries"]["dead"] == 2


def test_metrics_report_states_bytes_and_outcomes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=5000)
    with spool.writer("PACS_B", sop_class_uid=CT, sop_instance_uid="1.2.3", transfer_syntax="1.2.840.10008.1.2") as w:
        w.write(b"\0" * 10)
        size = w.commit().size
    stats = DeliveryStats()
    stats.outcome("PACS_B", Outcome.RETRY)
    stats.association_failed("PACS_B")
    registry = CollectorRegistry()
    register_accel_metrics(registry, lambda: spool, stats, lambda: ["PACS_B", "CT_C"])
    value = registry.get_sample_value
    assert value("relay_router_spool_entries", {"state": "received"}) == 1
    assert value("relay_router_spool_entries", {"state": "dead"}) == 0
    assert value("relay_router_spool_bytes") == size and value("relay_router_spool_max_bytes") == 5000
    assert value("relay_router_accel_deliveries_total", {"route": "PACS_B", "outcome": "retry"}) == 1
    assert value("relay_router_accel_deliveries_total", {"route": "CT_C", "outcome": "dead"}) == 0
    assert value("relay_router_accel_association_failures_total", {"route": "PACS_B"}) == 1
    spool.close()


@pytest.mark.parametrize(
    "status,outcome",
    [
        (0x0000, Outcome.DELIVERED),
        (0xB000, Outcome.DELIVERED),  # coercion of data elements: stored
        (0xB007, Outcome.DELIVERED),
        (0x0111, Outcome.DELIVERED),  # duplicate SOP instance: it is there already
        (0xA700, Outcome.RETRY),  # out of resources
        (0xA7FF, Outcome.RETRY),
        (0x0213, Outcome.RETRY),  # resource limitation
        (0x0110, Outcome.RETRY),  # processing failure
        (0xFE00, Outcome.RETRY),
        (0x1234, Outcome.RETRY),  # undefined: retried, DEAD after max_attempts
        (0xA900, Outcome.DEAD),  # data set does not match SOP class
        (0xC000, Outcome.DEAD),  # cannot understand
        (0xC123, Outcome.DEAD),
        (0x0122, Outcome.DEAD),  # SOP class not supported
        (0x0124, Outcome.DEAD),  # not authorized
        (0x0117, Outcome.DEAD),  # invalid SOP instance
    ],
)
def test_c_store_status_classes(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


def test_the_monitoring_plugin_warns_on_dead_letters_and_a_filling_spool() -> None:
    report: dict[str, object] = {"entries": {"received": 3, "dead": 0}, "bytes_used": 100, "max_bytes": 1000}
    assert spool_check(report) == (False, "", [("spool_dead", 0, None), ("spool_bytes", 100, 1000)])
    report["entries"] = {"dead": 2}
    warn, text, _ = spool_check(report)
    assert warn and "2 dead letters" in text
    report.update(entries={"dead": 0}, bytes_used=850)
    warn, text, _ = spool_check(report)
    assert warn and "85% full" in text


def test_a_delivered_entry_left_by_a_crash_is_reported_again_and_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)
    with spool.writer("PACS_B", sop_class_uid=CT, sop_instance_uid="1.2.3", transfer_syntax="1.2.840.10008.1.2") as w:
        w.write(b"\0" * 10)
        entry = w.commit()
    spool.set_state(entry.id, EntryState.DELIVERED)  # then the process died before remove()
    seen: list[DeliveryOutcome] = []
    pool = DeliveryPool(spool, "PACS_B", Destination("127.0.0.1", 9, "NOBODY", "ME"), on_outcome=seen.append)
    pool.start()
    pool.stop()
    assert [(o.entry.id, o.outcome, o.status) for o in seen] == [(entry.id, Outcome.DELIVERED, 0x0000)]
    assert spool.entries() == []
    spool.close()


def test_registering_twice_replaces_the_sources_instead_of_duplicating(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    register_accel_metrics(registry, lambda: None, DeliveryStats())  # RouterMetrics, before any spool
    assert registry.get_sample_value("relay_router_spool_max_bytes") == 0
    spool = Spool(tmp_path / "s", max_bytes=777)
    register_accel_metrics(registry, lambda: spool, DeliveryStats(), lambda: ["PACS_B"])  # the accel runtime
    assert registry.get_sample_value("relay_router_spool_max_bytes") == 777
    assert registry.get_sample_value("relay_router_accel_deliveries_total", {"route": "PACS_B", "outcome": "dead"}) == 0
    spool.close()
