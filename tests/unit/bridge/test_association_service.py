"""relay_bridge.splice.AssociationService: an association's life from Open to cleanup, with fake calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import directory as directory_module
from relay_bridge.config import BridgeConfig, LimitsSection, ServerSection
from relay_bridge.directory import Device, Directory
from relay_bridge.server import RelayServicer
from relay_bridge.sessions import RouterSession
from relay_common.audit import AuditLog, read_events

AID = "d" * 32


class Aborted(Exception):
    pass


class Call:
    """A fake Associate call: frames to read (serialized), frames written, abort raising as grpc's does."""

    def __init__(self, token: str, *frames: pb.Frame) -> None:
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        for f in frames:
            self.inbox.put_nowait(f.SerializeToString())
        self.written: list[pb.Frame] = []
        self.token = token
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("relay-session", self.token),)

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    async def read(self) -> object:
        return await self.inbox.get()

    async def write(self, frame: bytes) -> None:
        self.written.append(pb.Frame.FromString(frame))

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)


@pytest.fixture
async def servicer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RelayServicer]:
    monkeypatch.setattr(directory_module, "SCRYPT_N", 2**10)
    directory = Directory(tmp_path / "bridge.sqlite3")
    for name in ("site-a", "site-b", "site-c"):
        directory.add_router(name, "long enough password")
    directory.publish("site-b", [Device("site-b", "PACS", "", ("site-a",))])
    config = BridgeConfig(server=ServerSection(insecure=True), limits=LimitsSection(join_timeout_s=0.2))
    servicer = RelayServicer(config, directory, AuditLog(tmp_path / "audit.jsonl", app="relay-bridge"))
    for name in ("site-a", "site-b", "site-c"):
        servicer.sessions[name] = RouterSession(name, f"token-{name}", "127.0.0.1")
    yield servicer
    servicer.directory.close()


def open_frame(called: str = "PACS", to_site: str = "site-b", aid: str = AID) -> pb.Frame:
    return pb.Frame(open=pb.Open(association_id=aid, to_site=to_site, called_ae_title=called, calling_ae_title="WS"))


def refusals(servicer: RelayServicer, reason: str) -> float | None:
    return servicer.metrics.registry.get_sample_value("relay_bridge_refusals_total", {"reason": reason})


async def test_unknown_device_is_refused_and_counted(servicer: RelayServicer) -> None:
    call = Call("token-site-a", open_frame("NOPE"))
    await servicer.Associate(iter(()), call)  # type: ignore[arg-type]
    assert [f.refused.reason for f in call.written] == [pb.Refused.UNKNOWN_DEVICE]
    assert call.written[0].refused.detail == "no device 'NOPE' at site 'site-b'"
    assert refusals(servicer, "unknown_device") == 1
    assert not servicer.splices and not servicer.sessions["site-a"].associations


async def test_a_device_not_shared_is_audited_and_its_owner_told(servicer: RelayServicer, tmp_path: Path) -> None:
    call = Call("token-site-c", open_frame())
    await servicer.Associate(iter(()), call)  # type: ignore[arg-type]
    assert call.written[0].refused.reason == pb.Refused.NOT_PERMITTED
    events = [e for e in read_events(tmp_path / "audit.jsonl") if e["event"] == "access_refused"]
    assert [(e["outcome"], e["router"], e["called_ae"]) for e in events] == [("alert", "site-c", "PACS")]
    notice = servicer.sessions["site-b"].outbox.get_nowait()
    assert notice is not None and notice.audit.peer_site == "site-c" and notice.audit.ae_title == "PACS"


async def test_no_join_in_time_is_a_timeout_and_everything_is_released(servicer: RelayServicer, tmp_path: Path) -> None:
    call = Call("token-site-a", open_frame())
    await servicer.Associate(iter(()), call)  # type: ignore[arg-type]
    notice = servicer.sessions["site-b"].outbox.get_nowait()
    assert notice is not None and notice.incoming.association_id == AID
    assert [f.refused.reason for f in call.written] == [pb.Refused.TIMEOUT]
    assert call.written[0].refused.detail == "site 'site-b' did not answer in time"
    assert not servicer.splices
    assert not servicer.sessions["site-a"].associations and not servicer.sessions["site-b"].associations
    closed = [e for e in read_events(tmp_path / "audit.jsonl") if e["event"] == "association"]
    assert [(e["outcome"], e["association"]) for e in closed] == [("failure", AID)]


async def until(predicate: Callable[[], bool]) -> None:
    """Let the servicer's tasks run until `predicate` holds (a loaded machine may take a while)."""
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110  # the servicer has no event to wait on
            await asyncio.sleep(0.01)


async def test_open_join_relay_and_close(servicer: RelayServicer, tmp_path: Path) -> None:
    data = pb.Frame(data=pb.Data(payload=b"sealed bytes", seq=1))
    initiator = Call("token-site-a", open_frame(), data)
    opened = asyncio.create_task(servicer.Associate(iter(()), initiator))  # type: ignore[arg-type]
    await until(lambda: AID in servicer.splices)  # not a fixed sleep: a loaded machine (xdist) lags
    # Only the destination may join, and only once.
    stranger = Call("token-site-c", pb.Frame(join=pb.Join(association_id=AID)))
    with pytest.raises(Aborted):
        await servicer.Associate(iter(()), stranger)  # type: ignore[arg-type]
    assert stranger.aborted is not None and stranger.aborted[0] == grpc.StatusCode.NOT_FOUND
    destination = Call("token-site-b", pb.Frame(join=pb.Join(association_id=AID)))
    joined = asyncio.create_task(servicer.Associate(iter(()), destination))  # type: ignore[arg-type]
    await until(lambda: bool(destination.written))
    assert [f.data.payload for f in destination.written] == [b"sealed bytes"]
    assert initiator.written[0].HasField("accepted")
    initiator.inbox.put_nowait(grpc.aio.EOF)
    destination.inbox.put_nowait(grpc.aio.EOF)
    await asyncio.wait_for(asyncio.gather(opened, joined), 5)
    assert not servicer.splices
    closed = [e for e in read_events(tmp_path / "audit.jsonl") if e["event"] == "association"]
    assert [(e["outcome"], e["from_site"], e["to_site"]) for e in closed] == [("success", "site-a", "site-b")]
    assert closed[0]["bytes_from_initiator"] == len(data.SerializeToString())


@pytest.mark.parametrize("aid", ["short", "D" * 32])
async def test_a_bad_association_id_is_a_protocol_error(servicer: RelayServicer, aid: str) -> None:
    call = Call("token-site-a", open_frame(aid=aid))
    with pytest.raises(Aborted):
        await servicer.Associate(iter(()), call)  # type: ignore[arg-type]
    assert call.aborted == (grpc.StatusCode.INVALID_ARGUMENT, "association_id must be 32 new hex digits")


async def test_without_a_session_nothing_is_read(servicer: RelayServicer) -> None:
    call = Call("token-nobody", open_frame())
    with pytest.raises(Aborted):
        await servicer.Associate(iter(()), call)  # type: ignore[arg-type]
    assert call.aborted == (grpc.StatusCode.UNAUTHENTICATED, "no valid session: sign on first")
    assert call.inbox.qsize() == 1
