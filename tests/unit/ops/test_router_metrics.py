"""relay_router.metrics: what a router exposes to Prometheus, and that it never leaks titles it did not configure."""

from __future__ import annotations

import time
import types
from pathlib import Path

import pytest

from relay_common.errors import REFUSED_REASON_NAMES, Reason
from relay_router.metrics import REFUSAL_REASONS, refusal_reason
from relay_router.outcome import Outcome, Result
from tests.unit.ops.helpers import FakeService, router_config, samples


@pytest.fixture
def service(tmp_path: Path) -> FakeService:
    return FakeService(router_config(tmp_path))


def value(service: FakeService, name: str, **labels: str) -> float | None:
    return service.metrics.registry.get_sample_value(name, labels)


def outcome(aid: str = "a" * 32, **fields: object) -> Outcome:
    base = {"direction": "outbound", "site": "hospital-b", "calling_ae": "WS_A", "called_ae": "PACS_B"}
    base.update(fields)
    return Outcome(aid, **base)  # type: ignore[arg-type]


def test_every_documented_series_exists_at_start(service: FakeService) -> None:
    names = {name for name, _ in samples(service.metrics.registry)}
    for expected in (
        "relay_router_associations_total",
        "relay_router_relayed_bytes_total",
        "relay_router_frames_total",
        "relay_router_refusals_total",
        "relay_router_association_setup_seconds_bucket",
        "relay_router_active_associations",
        "relay_router_bridge_connected",
        "relay_router_bridge_connected_since_seconds",
        "relay_router_bridge_reconnects_total",
        "relay_router_remote_device_online",
        "relay_router_info",
        "process_cpu_seconds_total",
    ):
        assert expected in names, expected
    # Zero from the start, so rate() and alerts work before the first association.
    assert value(service, "relay_router_associations_total", direction="inbound", result="aborted") == 0
    assert value(service, "relay_router_refusals_total", reason="site_offline") == 0
    assert not any(name.endswith("_created") for name in names)


def test_finished_associations_are_counted_by_direction_and_result(service: FakeService) -> None:
    o = outcome(result="released", bytes_to_remote=1000, bytes_to_local=50)
    o.established = o.started + 0.2
    service.metrics.finished(o)
    service.metrics.finished(outcome("b" * 32, direction="inbound", result="aborted", bytes_to_local=7))
    assert value(service, "relay_router_associations_total", direction="outbound", result="released") == 1
    assert value(service, "relay_router_associations_total", direction="inbound", result="aborted") == 1
    assert value(service, "relay_router_relayed_bytes_total", direction="to_remote") == 1000
    assert value(service, "relay_router_relayed_bytes_total", direction="to_local") == 57
    assert value(service, "relay_router_association_setup_seconds_count", direction="outbound") == 1
    assert value(service, "relay_router_association_setup_seconds_bucket", direction="outbound", le="0.25") == 1
    assert value(service, "relay_router_association_setup_seconds_bucket", direction="outbound", le="0.1") == 0


def test_bytes_of_a_running_association_count_while_it_runs_and_never_twice(service: FakeService) -> None:
    o = outcome(result="established")
    service.active[o.association_id] = o
    o.bytes_to_remote = 5_000_000
    service.metrics.refresh()
    assert value(service, "relay_router_relayed_bytes_total", direction="to_remote") == 5_000_000
    o.bytes_to_remote = 7_000_000
    service.metrics.refresh()
    service.metrics.refresh()
    assert value(service, "relay_router_relayed_bytes_total", direction="to_remote") == 7_000_000
    # It ends: the service removes it from `active`, then reports it.
    del service.active[o.association_id]
    o.bytes_to_remote, o.result = 7_500_000, "released"
    service.metrics.finished(o)
    service.metrics.refresh()
    assert value(service, "relay_router_relayed_bytes_total", direction="to_remote") == 7_500_000


def test_setup_latency_is_observed_once_whether_seen_live_or_at_the_end(service: FakeService) -> None:
    o = outcome(result="established")
    o.established = o.started + 0.03
    service.active[o.association_id] = o
    service.metrics.refresh()
    service.metrics.refresh()
    del service.active[o.association_id]
    service.metrics.finished(o)
    assert value(service, "relay_router_association_setup_seconds_count", direction="outbound") == 1


class FakeRelay(types.SimpleNamespace):
    __hash__ = object.__hash__


def test_frames_come_from_the_relay_sequence_numbers(service: FakeService) -> None:
    o = outcome()
    relay = FakeRelay(outcome=o, frames_sent=1, frames_received=0)
    service.relays.add(relay)  # type: ignore[arg-type]
    relay.frames_sent, relay.frames_received = 40, 12
    service.metrics.refresh()
    relay.frames_sent = 41
    service.relays.discard(relay)  # type: ignore[arg-type]
    service.metrics.relay_finished(relay)  # type: ignore[arg-type]
    assert value(service, "relay_router_frames_total", direction="to_remote") == 41
    assert value(service, "relay_router_frames_total", direction="to_local") == 12


def test_the_real_association_driver_counts_frames_where_the_metrics_read_them() -> None:
    from relay_router.association import RelayedAssociation

    source = Path(RelayedAssociation.__init__.__code__.co_filename).read_text()
    assert isinstance(RelayedAssociation.frames_sent, property)
    assert isinstance(RelayedAssociation.frames_received, property)
    assert "out.established = time.time()" in source


def test_link_state_and_configured_routes(service: FakeService) -> None:
    assert value(service, "relay_router_bridge_connected") == 1
    assert value(service, "relay_router_bridge_reconnects_total") == 2
    assert value(service, "relay_router_bridge_connected_since_seconds") == 1_700_000_000.0
    assert value(service, "relay_router_remote_device_online", ae_title="PACS_B", site="hospital-b") == 1
    assert value(service, "relay_router_remote_device_online", ae_title="CT_C", site="hospital-c") == 0
    service.link.connected, service.link.connected_since = False, None
    assert value(service, "relay_router_bridge_connected") == 0
    assert value(service, "relay_router_bridge_connected_since_seconds") is None
    service.active["x"] = object()
    assert value(service, "relay_router_active_associations") == 1


def test_labels_never_carry_titles_chosen_by_devices_or_patient_data(service: FakeService) -> None:
    """Calling titles, unknown called titles, details: none of it may become a label value."""
    hostile = ["DOE^JANE", "PATIENT_ID_123", "EVIL\u00e9AE", "1.2.840.99999.1"]
    for i, text in enumerate(hostile):
        service.metrics.finished(
            outcome(
                f"{i:032x}",
                calling_ae=text,
                called_ae=text,
                site="hospital-b",
                result=Result.REJECTED,
                reason=Reason.UNKNOWN_CALLED_AE,
                detail=f"called AE title {text!r} is not a remote device on this router",
            )
        )
        service.metrics.finished(outcome(f"{i + 100:032x}", calling_ae=text, result="aborted", detail=text))
    label_values = {v for _, labels in samples(service.metrics.registry) for _, v in labels}
    for text in hostile:
        assert not any(text in v for v in label_values), text
    # Only configured titles and sites appear as labels at all.
    titles = {v for (_, labels) in samples(service.metrics.registry) for k, v in labels if k == "ae_title"}
    assert titles == {"PACS_B", "CT_C"}
    assert value(service, "relay_router_refusals_total", reason="unknown_called_ae") == len(hostile)


@pytest.mark.parametrize(
    ("result", "typed", "detail", "label"),
    [
        ("rejected", Reason.UNKNOWN_CALLED_AE, "'NOPE' is not a remote device here", "unknown_called_ae"),
        ("rejected", Reason.ROUTER_LIMIT, "too many associations on this router", "router_limit"),
        ("refused", Reason.ROUTER_LIMIT, "site hospital-a has reached its association limit", "router_limit"),
        ("rejected", Reason.BRIDGE_UNREACHABLE, "the bridge is not reachable (connecting)", "bridge_unreachable"),
        ("refused", Reason.BRIDGE_UNREACHABLE, "the bridge did not accept the stream: timeout", "bridge_unreachable"),
        ("refused", Reason.BRIDGE_UNREACHABLE, "the bridge closed the association stream", "bridge_unreachable"),
        ("refused", Reason.UNKNOWN_DEVICE, "no device 'GHOST' at site 'hospital-b'", "unknown_device"),
        ("refused", Reason.UNKNOWN_DEVICE, "no shared device 'X'", "unknown_device"),
        ("rejected", Reason.NOT_PERMITTED, "hospital-b/PACS is not shared with hospital-a", "not_permitted"),
        ("refused", Reason.SITE_OFFLINE, "site 'hospital-b' is offline", "site_offline"),
        ("refused", Reason.TIMEOUT, "site 'hospital-b' did not answer in time", "timeout"),
        ("refused", Reason.OVERLOADED, "the bridge's association limit is reached", "overloaded"),
        ("refused", Reason.OVERLOADED, "site 'hospital-b' is overloaded", "overloaded"),
        ("refused", Reason.DEVICE_UNREACHABLE, "device PACS at site hospital-b is not reachable", "device_unreachable"),
        ("refused", Reason.DEVICE_UNREACHABLE, "PACS: cannot connect to 10.0.0.5:104", "device_unreachable"),
        ("refused", Reason.SECURITY, "SECURITY: end-to-end authentication failed", "security"),
        ("rejected", Reason.SECURITY, "SECURITY: site hospital-b's identity key changed", "security"),
        ("rejected", Reason.UNKNOWN_IDENTITY, "no identity key is known for site hospital-b", "unknown_identity"),
        ("rejected", Reason.DEVICE_REJECTED, "result 1, source 1, reason 3", "device_rejected"),
        ("refused", REFUSED_REASON_NAMES["SITE_OFFLINE"], "SITE_OFFLINE", "site_offline"),
        ("refused", Reason.OTHER, "something new", "other"),
    ],
)  # fmt: skip
def test_refusal_labels_come_from_the_typed_reason(result: str, typed: Reason, detail: str, label: str) -> None:
    o = outcome()
    o.refuse(Result(result), typed, detail)
    assert refusal_reason(o) == label
    assert label in REFUSAL_REASONS
    # The label does not depend on the wording: the same reason with another text gives the same label.
    reworded = outcome()
    reworded.refuse(Result(result), typed, "reworded")
    assert refusal_reason(reworded) == label


@pytest.mark.parametrize(
    ("result", "detail", "label"),
    [
        ("rejected", "result 1, source 1, reason 3", "device_rejected"),  # no relay reason: the device said no
        ("refused", "SITE_OFFLINE", "other"),  # no relay reason and no code: not guessed from the text
        ("released", "", None),
        ("closed", "", None),
        ("aborted", "is offline", None),
        ("aborted", "SECURITY: frame 3 failed authentication", None),
    ],
)
def test_untyped_outcomes_are_never_classified_by_their_text(result: str, detail: str, label: str | None) -> None:
    assert refusal_reason(outcome(result=result, detail=detail)) == label


def test_a_security_refusal_is_labelled_security_whatever_its_reason(service: FakeService) -> None:
    o = outcome()
    o.refuse(Result.REFUSED, Reason.NOT_PERMITTED, "WS_A is not shared with 'hospital-x'", security=True)
    assert refusal_reason(o) == "security"
    assert o.audit_outcome == "alert"
    service.metrics.finished(o)
    assert value(service, "relay_router_refusals_total", reason="security") == 1
    assert value(service, "relay_router_refusals_total", reason="not_permitted") == 0
    assert value(service, "relay_router_associations_total", direction="outbound", result="refused") == 1


def test_an_unexpected_reason_on_a_refusal_is_other() -> None:
    o = outcome()
    o.refuse(Result.REJECTED, Reason.PROTOCOL, "odd")
    assert refusal_reason(o) == "other"


def test_recent_activity_for_the_status_command(service: FakeService) -> None:
    now = time.time()
    old = outcome("0" * 32, result="released")
    old.started, old.ended = now - 7300, now - 7200  # two hours ago: outside the window
    service.metrics.finished(old)
    for i in range(25):
        service.metrics.finished(outcome(f"{i + 1:032x}", result="released" if i % 5 else "aborted"))
    summary = service.metrics.recent.summary()
    assert summary["counts"] == {"aborted": 5, "released": 20}
    assert summary["total"] == 25
    assert len(summary["last"]) == 20
    last = summary["last"][-1]
    assert set(last) == {
        "time", "association", "direction", "site", "calling_ae", "called_ae", "result", "reason",
        "bytes_to_remote", "bytes_to_local", "seconds", "detail",
    }  # fmt: skip


def test_a_failing_hook_never_reaches_the_relay(service: FakeService, caplog: pytest.LogCaptureFixture) -> None:
    """Hooks run inside the relay's own code paths (before the audit event): they must not raise."""
    broken = outcome()
    broken.bytes_to_remote = "many"  # type: ignore[assignment]
    assert service.metrics.finished(broken) is None
    assert "metrics hook RouterMetrics.finished failed" in caplog.text
    from relay_router.status import status_extra

    service.config = None  # type: ignore[assignment]
    assert status_extra(service)["running"] is True  # type: ignore[arg-type]
