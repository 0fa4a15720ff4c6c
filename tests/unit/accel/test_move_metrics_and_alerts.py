"""Held C-MOVE metrics (relay_router.accel.move_metrics) and router B's audit alert for a refused blob.

The counters are read from the MoveRegistry at scrape time: a hold ended with every sub-operation
confirmed, ended by the ceiling (its unconfirmed sub-operations counted), or ended because the
sub-operations went transparently. Router B's far session writes an `accel_transfer` alert, shaped as
router A's, when a blob fails for a security reason.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay_common.audit import AuditLog, read_events
from relay_router.accel import records
from relay_router.accel.move_metrics import register_move_metrics
from relay_router.accel.moves import MoveKey, MoveRegistry
from relay_router.spill_store import blob_alert
from tests.unit.accel.test_spill_records import (
    ENTRY,
    EXPLICIT,
    FakeChannel,
    _finish,
    _part10,
    _sealers,
    _session,
    _upload,
)
from tests.unit.router.test_spill import MemoryTransport

KEY = MoveKey("hospital-b", "MOVER_A", 7)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "move" in s.name
    }


def test_the_families_exist_with_zeros_before_any_accelerated_route_runs() -> None:
    registry = CollectorRegistry()
    register_move_metrics(registry, lambda: None)
    got = samples(registry)
    assert got[("relay_router_accel_moves_held", ())] == 0
    for end in ("confirmed", "timed_out", "transparent"):
        assert got[("relay_router_accel_move_holds_total", (("end", end),))] == 0
    assert got[("relay_router_accel_move_subops_unconfirmed_total", ())] == 0
    register_move_metrics(registry, lambda: None)  # registered again: replaced, not duplicated


async def test_holds_are_counted_by_how_they_ended() -> None:
    moves = MoveRegistry(0.3)
    moves.start(asyncio.get_running_loop())
    registry = CollectorRegistry()
    register_move_metrics(registry, lambda: moves)

    moves.begin(KEY, "WS_A")
    assert samples(registry)[("relay_router_accel_moves_held", ())] == 1
    moves.finished(KEY, "1.1", 0)
    await moves.settle(KEY, 1)  # confirmed
    moves.end(KEY)

    other = MoveKey("hospital-b", "MOVER_A", 8)
    moves.begin(other, "WS_A")
    moves.arrived(other, "2.1")
    moves.finished(other, "2.1", 0)
    await moves.settle(other, 3)  # the ceiling: two of three never confirmed
    moves.end(other)

    third = MoveKey("hospital-b", "MOVER_A", 9)
    moves.begin(third, "WS_A")
    moves.transparent_seen("hospital-b", "WS_A")
    assert await moves.settle(third, 2) is None
    moves.end(third)

    got = samples(registry)
    assert got[("relay_router_accel_moves_held", ())] == 0
    assert got[("relay_router_accel_move_holds_total", (("end", "confirmed"),))] == 1
    assert got[("relay_router_accel_move_holds_total", (("end", "timed_out"),))] == 1
    assert got[("relay_router_accel_move_holds_total", (("end", "transparent"),))] == 1
    assert got[("relay_router_accel_move_subops_unconfirmed_total", ())] == 2
    assert moves.status()["unconfirmed_subops"] == 2


async def test_router_b_audits_a_blob_refused_for_security_as_router_a_does(tmp_path: Path) -> None:
    near, far = _sealers()
    transport = MemoryTransport()
    channel = FakeChannel(far)
    session, spool = _session(tmp_path, channel, transport)
    audit_path = tmp_path / "audit.jsonl"
    session.audit = AuditLog(audit_path, app="relay-router")
    data, ds = _part10(tmp_path)
    instance = records.InstanceHeader(ENTRY, str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT, len(data))
    upload = await _upload(transport, near, data)

    refused_url = "refused a spill URL at http://127.0.0.1:9/x: not under spill_endpoints"

    async def hostile_get(url: str) -> bytes:  # the transport's URL check, as BridgeBlobTransport raises it
        raise blob_alert(refused_url)

    transport.get = hostile_get  # type: ignore[method-assign]
    await session._apply(records.BlobHeader(instance, upload.blob_id, 0, upload.parts, upload.digest()))
    await _finish(session)
    (refused,) = channel.answers()
    assert isinstance(refused, records.Refused) and refused.status == 0x0110
    (alert,) = [e for e in read_events(audit_path) if e["event"] == "accel_transfer"]
    assert alert["outcome"] == "alert" and refused_url in alert["detail"]
    assert (alert["site"], alert["called_ae"], alert["local_ae"]) == ("hospital-a", "ORTHANC_B", "ORTHANC_B")

    # A store that is merely down is no alert: refused the same way, not audited.
    transport2 = MemoryTransport()
    channel2 = FakeChannel(far)
    session2, spool2 = _session(tmp_path / "2", channel2, transport2)
    session2.audit = session.audit
    upload2 = await _upload(transport2, near, data)
    transport2.blobs.clear()
    await session2._apply(records.BlobHeader(instance, upload2.blob_id, 0, upload2.parts, upload2.digest()))
    await _finish(session2)
    assert len([e for e in read_events(audit_path) if e["event"] == "accel_transfer"]) == 1
    spool.close()
    spool2.close()
