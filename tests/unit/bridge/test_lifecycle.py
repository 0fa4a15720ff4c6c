"""The drain on SIGTERM, with the real services and fakes for the gRPC server and calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import directory as directory_module
from relay_bridge import lifecycle
from relay_bridge.config import BridgeConfig, ServerSection
from relay_bridge.directory import Device, Directory
from relay_bridge.server import RelayServicer
from relay_bridge.sessions import RouterSession
from relay_common.audit import AuditLog
from relay_common.config import InvalidValue
from tests.unit.bridge.test_association_service import Aborted, Call, open_frame


class FakeServer:
    def __init__(self) -> None:
        self.stopped_with: float | None = None

    async def stop(self, grace: float) -> None:
        self.stopped_with = grace


@pytest.fixture
async def servicer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RelayServicer]:
    monkeypatch.setattr(directory_module, "SCRYPT_N", 2**10)
    monkeypatch.setattr(lifecycle, "MOVE_AFTER_S", 0.05)
    monkeypatch.setattr(lifecycle, "POLL_S", 0.01)
    directory = Directory(tmp_path / "bridge.sqlite3")
    for name in ("site-a", "site-b", "site-c"):
        directory.add_router(name, "long enough password")
    directory.publish("site-b", [Device("site-b", "PACS", "", ("site-a",))])
    servicer = RelayServicer(BridgeConfig(server=ServerSection(insecure=True)), directory, AuditLog(None, app="t"))
    servicer.health = health.aio.HealthServicer()
    for name in ("site-a", "site-b", "site-c"):
        servicer.sessions[name] = RouterSession(name, f"token-{name}", "127.0.0.1")
    yield servicer
    servicer.directory.close()


async def _status(servicer: RelayServicer) -> int:
    assert servicer.health is not None
    answer = await servicer.health.Check(health_pb2.HealthCheckRequest(service=""), None)  # type: ignore[arg-type]
    return int(answer.status)


async def test_drain_refuses_opens_moves_idle_routers_and_waits_for_running_associations(
    servicer: RelayServicer,
) -> None:
    await servicer.health.set("", health_pb2.HealthCheckResponse.SERVING)  # type: ignore[union-attr]
    servicer.splices["a" * 32] = object()  # type: ignore[assignment]  # one association running a <-> b
    servicer.sessions["site-a"].associations.add("a" * 32)
    servicer.sessions["site-b"].associations.add("a" * 32)
    server = FakeServer()
    assert servicer.metrics.readiness() == ("200 OK", b"ready\n")
    draining = asyncio.create_task(lifecycle.drain(server, servicer, grace_s=5.0))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)

    assert await _status(servicer) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert servicer.metrics.readiness()[0] == "503 Service Unavailable", "/readyz fails a balancer's check at once"
    call = Call("token-site-a", open_frame())
    await servicer.Associate(iter(()), call)  # type: ignore[arg-type]
    assert [f.refused.reason for f in call.written] == [pb.Refused.DRAINING], "transient: the router retries it"
    assert "restarting" in call.written[0].refused.detail
    with pytest.raises(Aborted):
        await servicer.Control(iter(()), Call("x"))  # type: ignore[arg-type]
    assert servicer.sessions["site-c"].ended.is_set(), "an idle router is told to move"
    assert not servicer.sessions["site-a"].ended.is_set(), "a router with a running association keeps its session"
    assert server.stopped_with is None and not draining.done()

    del servicer.splices["a" * 32]  # the association ends
    await asyncio.wait_for(draining, 2)
    assert server.stopped_with == lifecycle.STOP_GRACE_S
    assert all(s.ended.is_set() for s in servicer.sessions.values())


async def test_in_a_cluster_a_router_with_running_associations_is_moved_too(
    servicer: RelayServicer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until it signs on at another replica, every Open towards it would be refused DRAINING."""
    monkeypatch.setattr(servicer.state, "cluster", object())  # drain() only asks whether there is one
    servicer.splices["a" * 32] = object()  # type: ignore[assignment]  # one association running a <-> b
    servicer.sessions["site-a"].associations.add("a" * 32)
    servicer.sessions["site-b"].associations.add("a" * 32)
    server = FakeServer()
    draining = asyncio.create_task(lifecycle.drain(server, servicer, grace_s=5.0))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    moves = {name: s.outbox.get_nowait() for name, s in servicer.sessions.items() if not s.outbox.empty()}
    assert {name for name, m in moves.items() if m is not None and m.HasField("move")} == {
        "site-a",
        "site-b",
        "site-c",
    }, "every router is told to move, busy or not"
    assert server.stopped_with is None and not draining.done(), "the running association still gets its grace"
    del servicer.splices["a" * 32]
    await asyncio.wait_for(draining, 2)
    assert server.stopped_with == lifecycle.STOP_GRACE_S


async def test_drain_gives_up_waiting_when_the_grace_ends(servicer: RelayServicer) -> None:
    servicer.splices["a" * 32] = object()  # type: ignore[assignment]  # never ends
    server = FakeServer()
    started = asyncio.get_running_loop().time()
    await lifecycle.drain(server, servicer, grace_s=0.3)  # type: ignore[arg-type]
    assert 0.3 <= asyncio.get_running_loop().time() - started < 2
    assert server.stopped_with == lifecycle.STOP_GRACE_S


async def test_with_nothing_running_the_drain_still_says_not_ready_for_the_notice_period(
    servicer: RelayServicer,
) -> None:
    """A load balancer checks /readyz every so often: a replica that stopped at once would meet its next check
    with a closed port (a reset, not a drain). Replicas of a cluster stay up, not ready, for `notice_s`."""
    server = FakeServer()
    draining = asyncio.create_task(lifecycle.drain(server, servicer, grace_s=5.0, notice_s=0.4))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert servicer.metrics.readiness()[0] == "503 Service Unavailable"
    assert server.stopped_with is None and not draining.done(), "the port stays open through the notice period"
    await asyncio.wait_for(draining, 2)
    assert server.stopped_with == lifecycle.STOP_GRACE_S
    assert all(s.ended.is_set() for s in servicer.sessions.values()), "every router was told to move"

    server = FakeServer()
    started = asyncio.get_running_loop().time()
    await lifecycle.drain(server, servicer, grace_s=5.0)  # type: ignore[arg-type]  # a single bridge: no notice
    assert asyncio.get_running_loop().time() - started < 0.2 and server.stopped_with == lifecycle.STOP_GRACE_S


def test_a_notice_period_out_of_range_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(InvalidValue, match="drain_notice_s"):
        ServerSection(insecure=True, drain_notice_s=-1)
    assert ServerSection(insecure=True).drain_notice_s == 1.0


async def test_a_sign_on_during_the_drain_is_unavailable(servicer: RelayServicer) -> None:
    servicer.state.draining = True
    call = Call("x")
    with pytest.raises(Aborted):
        await servicer.Control(iter(()), call)  # type: ignore[arg-type]
    assert call.aborted is not None and call.aborted[0] == grpc.StatusCode.UNAVAILABLE


async def test_a_stop_step_that_hangs_is_left_behind_by_name_and_one_that_fails_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop must end: a step that never returns (a database that does not answer) is cut after its bound."""
    hung = asyncio.Event()

    async def hangs() -> None:
        await hung.wait()

    async def fails() -> None:
        raise OSError("connection reset")

    async def slow() -> None:
        await asyncio.sleep(0.2)

    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level("INFO", logger="relay_bridge"):
        await lifecycle.shutdown_step("closing the directory", hangs(), timeout_s=0.3)
        await lifecycle.shutdown_step("leaving the cluster", fails())
        lifecycle.SLOW_STEP_S, saved = 0.1, lifecycle.SLOW_STEP_S
        try:
            await lifecycle.shutdown_step("the console", slow())
        finally:
            lifecycle.SLOW_STEP_S = saved
    assert loop.time() - started < 5, "the hanging step was cut at its bound"
    text = caplog.text
    assert "stopping: closing the directory did not end within 0.3 s; going on without it" in text
    assert "stopping: leaving the cluster failed (connection reset); going on" in text
    assert "stopping: the console took 0.2 s" in text
