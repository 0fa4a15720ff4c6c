"""relay_bridge.control: sign-on decisions through the service, and the directory each router is sent."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc.aio
import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import directory as directory_module
from relay_bridge.admission import SignOnFailure
from relay_bridge.config import BridgeConfig, LimitsSection, ServerSection
from relay_bridge.directory import Device, Directory
from relay_bridge.server import RelayServicer
from relay_bridge.sessions import RouterSession


@pytest.fixture
async def servicer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RelayServicer]:
    monkeypatch.setattr(directory_module, "SCRYPT_N", 2**10)
    directory = Directory(tmp_path / "bridge.sqlite3")
    config = BridgeConfig(server=ServerSection(insecure=True), limits=LimitsSection(login_failures=2))
    servicer = RelayServicer(config, directory)
    yield servicer
    servicer.directory.close()


async def refusal(servicer: RelayServicer, account: str, password: str, source: str) -> str | None:
    refused = await servicer.control.authenticate(account, password, source)
    return None if refused is None else refused.detail


async def test_sign_on_errors_do_not_reveal_whether_an_account_exists(servicer: RelayServicer) -> None:
    password = servicer.directory.sync.add_router("a")
    assert await refusal(servicer, "a", password, "10.0.0.1") is None
    assert await refusal(servicer, "a", "nope nope nope", "10.0.0.2") == "wrong account name or password"
    assert await refusal(servicer, "ghost", password, "10.0.0.3") == "wrong account name or password"
    servicer.directory.sync.set_enabled("a", False)
    assert await refusal(servicer, "a", password, "10.0.0.4") == "account disabled"


async def test_repeated_failures_lock_the_account_out_even_with_the_right_password(servicer: RelayServicer) -> None:
    password = servicer.directory.sync.add_router("a")
    for source in ("10.0.0.1", "10.0.0.2"):
        assert await refusal(servicer, "a", "guess guess guess", source) == "wrong account name or password"
    refused = "too many failed sign-on attempts; try again later"
    assert await refusal(servicer, "a", password, "10.0.0.3") == refused
    # ... and the guessing addresses are blocked for other accounts too.
    b = servicer.directory.sync.add_router("b")
    assert await refusal(servicer, "b", b, "10.0.0.1") is None
    await refusal(servicer, "c", "x" * 12, "10.0.0.1")
    assert await refusal(servicer, "b", b, "10.0.0.1") == refused


async def test_directory_for_lists_what_a_site_may_reach_and_who_is_online(servicer: RelayServicer) -> None:
    d = servicer.directory.sync
    for name in ("a", "b", "c"):
        d.add_router(name, "long enough password")
    d.publish("b", [Device("b", "PACS", "archive", ("a",)), Device("b", "CT", "", ())])
    d.publish("c", [Device("c", "MR", "", ("*",))])
    servicer.sessions["b"] = RouterSession("b", "token", "10.0.0.2")
    listing = await servicer.control.directory_for("a")
    assert [(x.site, x.ae_title, x.description, x.online) for x in listing.devices] == [
        ("b", "PACS", "archive", True),
        ("c", "MR", "", False),
    ]
    assert [(x.site, x.ae_title) for x in (await servicer.control.directory_for("c")).devices] == []


# -- typed refusals: the metric label and the audit outcome come from the type -----------------


class Context:
    """Sign-on reads only the certificate names (mutual TLS is off here)."""

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def sign_on(account: str, password: str, sign_key: bytes = b"s" * 32, kem_key: bytes = b"k", *titles: str) -> pb.SignOn:
    return pb.SignOn(
        account=account,
        password=password,
        identity=pb.Identity(sign_key=sign_key, kem_key=kem_key),
        devices=[pb.SharedDevice(ae_title=t) for t in titles],
    )


async def test_sign_on_refusals_are_typed(servicer: RelayServicer) -> None:
    password = servicer.directory.sync.add_router("a")
    control, ctx = servicer.control, Context()
    assert await control.sign_on_refusal(ctx, sign_on("a", password), "10.0.0.1") is None  # type: ignore[arg-type]

    wrong = await control.sign_on_refusal(ctx, sign_on("a", "not the password"), "10.0.0.2")  # type: ignore[arg-type]
    assert wrong is not None and wrong.failure is SignOnFailure.CREDENTIALS and wrong.audit_outcome == "failure"

    bad_devices = await control.sign_on_refusal(ctx, sign_on("a", password, b"s" * 32, b"k", "OK", "BAD\\"), "10.0.0.3")  # type: ignore[arg-type]
    assert bad_devices is not None and bad_devices.failure is SignOnFailure.INVALID_DEVICES
    assert bad_devices.detail.startswith("invalid AE title 'BAD")

    no_keys = await control.sign_on_refusal(ctx, sign_on("a", password, b"", b""), "10.0.0.4")  # type: ignore[arg-type]
    assert no_keys is not None and no_keys.failure is SignOnFailure.NO_IDENTITY
    assert (
        no_keys.detail == "sign-on carries no identity keys (upgrade the router)" and no_keys.audit_outcome == "alert"
    )

    changed = await control.sign_on_refusal(ctx, sign_on("a", password, b"t" * 32), "10.0.0.5")  # type: ignore[arg-type]
    assert changed is not None and changed.failure is SignOnFailure.IDENTITY_CHANGED and changed.security
    assert changed.detail == (
        "this router's identity key differs from the one the bridge recorded; if the router was "
        "reinstalled, an operator must run: relay-bridge router reset-identity a"
    )

    # Two wrong passwords (login_failures=2) from one address block it, with the right password too.
    await control.sign_on_refusal(ctx, sign_on("a", "wrong wrong wrong"), "10.0.0.9")  # type: ignore[arg-type]
    throttled = await control.sign_on_refusal(ctx, sign_on("a", password), "10.0.0.9")  # type: ignore[arg-type]
    assert throttled is not None and throttled.failure is SignOnFailure.THROTTLED and throttled.audit_outcome == "alert"


async def test_a_reworded_message_keeps_its_label(servicer: RelayServicer) -> None:
    """The label comes from the failure, not from the text (the substring matching is gone)."""
    from relay_bridge.admission import SignOnRefused

    servicer.metrics.sign_on_failed(SignOnRefused(SignOnFailure.THROTTLED, "slow down, please").failure)
    value = servicer.metrics.registry.get_sample_value("relay_bridge_sign_on_failures_total", {"reason": "throttled"})
    assert value == 1


async def test_refusals_without_a_password_line_are_logged_at_their_types_level(
    servicer: RelayServicer, caplog: pytest.LogCaptureFixture
) -> None:
    password = servicer.directory.sync.add_router("a")
    control, ctx = servicer.control, Context()
    caplog.set_level("INFO", logger="relay_bridge")
    await control.sign_on_refusal(ctx, sign_on("a", password, b"s" * 32, b"k", "BAD\\"), "10.0.0.3")  # type: ignore[arg-type]
    await control.sign_on_refusal(ctx, sign_on("a", password, b"", b""), "10.0.0.4")  # type: ignore[arg-type]
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "refused" in r.getMessage()]
    assert lines == [
        ("WARNING", "sign-on for 'a' from 10.0.0.3 refused: invalid AE title 'BAD\\\\' "
         "(1-16 characters, no backslash or control characters)"),
        ("ERROR", "sign-on for 'a' from 10.0.0.4 refused: sign-on carries no identity keys (upgrade the router)"),
    ]  # fmt: skip
    assert [getattr(r, "security_alert", None) for r in caplog.records if "refused" in r.getMessage()] == [
        None,
        "no_identity",
    ]


# -- the control stream's end -----------------------------------------------------------------


class ControlCall:
    """A fake Control call: the sign-on, then whatever the test feeds (EOF ends the router's side)."""

    def __init__(self, first: pb.RouterMessage) -> None:
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.inbox.put_nowait(first)
        self.written: list[pb.BridgeMessage] = []

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    async def read(self) -> object:
        return await self.inbox.get()

    async def write(self, message: pb.BridgeMessage) -> None:
        self.written.append(message)


async def until(predicate: Callable[[], object]) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_the_others_learn_a_site_went_offline_even_if_grpc_cancels_its_call(servicer: RelayServicer) -> None:
    """gRPC cancels the handler when the router's connection closes, possibly while the bridge tells the others."""
    d = servicer.directory.sync
    password = d.add_router("site-b")
    d.add_router("site-a")
    watcher = RouterSession("site-a", "token-a", "127.0.0.1")
    servicer.sessions["site-a"] = watcher
    first = pb.RouterMessage(sign_on=sign_on("site-b", password))
    first.sign_on.devices.add(ae_title="PACS", share_with=["site-a"])
    call = ControlCall(first)
    handler = asyncio.create_task(servicer.Control(iter(()), call))  # type: ignore[arg-type]
    await until(lambda: "site-b" in servicer.sessions and call.written)
    assert call.written[0].sign_on_result.ok
    online = await asyncio.wait_for(watcher.outbox.get(), 5)
    assert online is not None and [(x.ae_title, x.online) for x in online.directory.devices] == [("PACS", True)]

    directory = servicer.directory
    read_devices = directory.devices

    async def slow_devices() -> list[Device]:  # a busy database: the broadcast takes a while
        await asyncio.sleep(0.2)
        return await read_devices()

    directory.devices = slow_devices  # type: ignore[method-assign]
    call.inbox.put_nowait(grpc.aio.EOF)  # the router closes its side ...
    await until(lambda: "site-b" not in servicer.sessions)
    handler.cancel()  # ... and then its connection: gRPC cancels the call
    await asyncio.gather(handler, return_exceptions=True)
    offline = await asyncio.wait_for(watcher.outbox.get(), 2)
    assert offline is not None and [(x.ae_title, x.online) for x in offline.directory.devices] == [("PACS", False)]


async def test_a_call_cancelled_during_sign_on_leaves_no_session(servicer: RelayServicer) -> None:
    password = servicer.directory.sync.add_router("site-b")
    call = ControlCall(pb.RouterMessage(sign_on=sign_on("site-b", password)))
    handler = asyncio.create_task(servicer.Control(iter(()), call))  # type: ignore[arg-type]
    await until(lambda: "site-b" in servicer.sessions)
    handler.cancel()  # before (or while) the result is written
    await asyncio.gather(handler, return_exceptions=True)
    assert "site-b" not in servicer.sessions


async def test_concurrent_guesses_are_counted_before_hashing(servicer: RelayServicer) -> None:
    """40 wrong guesses at once, then the right password: the limit (2) holds, the right one is refused too."""
    password = servicer.directory.sync.add_router("a")
    answers = await asyncio.gather(*(refusal(servicer, "a", f"guess {i:04d} guess", "10.9.0.1") for i in range(40)))
    throttled = "too many failed sign-on attempts; try again later"
    assert answers.count("wrong account name or password") == 1  # one hashed: one in flight per account
    assert answers.count(throttled) == 39  # refused unhashed, and counted as failures
    assert await refusal(servicer, "a", password, "10.9.0.2") == throttled


async def test_a_right_password_is_not_counted_as_a_failure(servicer: RelayServicer) -> None:
    password = servicer.directory.sync.add_router("a")
    for _ in range(5):
        assert await refusal(servicer, "a", password, "10.9.0.3") is None
    assert servicer.state.throttle.pending == 0


async def test_the_directory_view_hides_what_is_not_shared_and_is_read_once(servicer: RelayServicer) -> None:
    sync = servicer.directory.sync
    for name in ("a", "b", "c"):
        sync.add_router(name)
        sync.set_identity(name, name.encode() * 32, b"k")
    sync.publish("a", [Device("a", "PACS", "", ("b",)), Device("a", "ALL", "", ("*",))])
    view = await servicer.control.view()
    assert await servicer.control.view() is view  # no database read until the directory changes
    assert [(d.router, d.ae_title) for d in view.reachable_by("b")] == [("a", "ALL"), ("a", "PACS")]
    assert [(d.router, d.ae_title) for d in view.reachable_by("c")] == [("a", "ALL")]
    assert view.reachable_by("a") == []
    servicer.control.directory_changed()
    sync.set_enabled("a", False)
    assert (await servicer.control.view()).reachable_by("b") == []  # a disabled router's devices are hidden


def test_a_directory_too_large_is_cut_fairly_per_site() -> None:
    from relay_bridge.directory_view import DirectoryView

    devices = [Device("big", f"D{i:05d}", "x" * 100, ("*",)) for i in range(3000)]
    devices += [Device("small", f"S{i}", "", ("*",)) for i in range(3)]
    view = DirectoryView.build(devices, {})
    message = view.for_site("victim", set(), max_bytes=64 * 1024)
    assert message.ByteSize() <= 64 * 1024
    assert {d.ae_title for d in message.devices if d.site == "small"} == {"S0", "S1", "S2"}
    assert 0 < sum(d.site == "big" for d in message.devices) < 3000


def test_a_star_sharer_is_not_sent_every_sites_identity() -> None:
    """Issue 17, item 10: sharing with "*" names no caller; keys come with each association instead."""
    from relay_bridge.directory_view import DirectoryView

    keys = {s: (s.encode() * 4, s.encode() * 8) for s in ("open", "named", "caller", "stranger", "partner")}
    devices = [
        Device("open", "ANY", "", ("*",)),
        Device("named", "PACS", "", ("caller",)),
        Device("partner", "WS", "", ("open",)),
    ]
    view = DirectoryView.build(devices, keys)
    assert {i.site for i in view.for_site("open", set(), max_bytes=1 << 20).identities} == {"partner"}
    # "named" may call "open" (so it has its key) and is called by "caller".
    assert {i.site for i in view.for_site("named", set(), max_bytes=1 << 20).identities} == {"caller", "open"}
    # Callers still see the "*" sharer's key (they must seal to it).
    assert "open" in {i.site for i in view.for_site("stranger", set(), max_bytes=1 << 20).identities}


async def test_a_publication_flood_is_coalesced(servicer: RelayServicer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Publications within publish_interval_s: the database is written at most twice, with the latest one."""
    servicer.directory.sync.add_router("a")
    session = RouterSession("a", "token", "10.0.0.1")
    writes: list[list[str]] = []
    real = servicer.directory.publish

    async def counting(router: str, devices: list[Device]) -> None:
        writes.append([d.ae_title for d in devices])
        await real(router, devices)

    monkeypatch.setattr(servicer.directory, "publish", counting)
    config = servicer.state.config
    servicer.state.config = dataclasses.replace(
        config, limits=dataclasses.replace(config.limits, publish_interval_s=1.0)  # slack for a loaded machine
    )
    flood = [pb.SharedDevice(ae_title=f"T{i}", share_with=["*"]) for i in range(50)]
    session.published_at = time.monotonic()  # as if it had just published
    await asyncio.gather(*(servicer.control._publication(session, [d]) for d in flood))
    assert writes == [["T49"]]


async def test_a_publication_over_the_limits_is_refused_and_audited(servicer: RelayServicer) -> None:
    servicer.directory.sync.add_router("a")
    session = RouterSession("a", "token", "10.0.0.1")
    events: list[tuple[str, str, dict[str, object]]] = []
    servicer.state.audit.event = lambda event, outcome, **f: events.append((event, outcome, f))  # type: ignore[method-assign]
    too_many = [pb.SharedDevice(ae_title=f"T{i}", share_with=["*"]) for i in range(201)]
    await servicer.control._publication(session, too_many)
    assert servicer.directory.sync.devices() == []
    assert events[0][:2] == ("publish", "failure")
    assert "201 devices published; the limit is 200 per router (max_devices_per_router)" in str(events[0][2]["detail"])


async def test_the_directory_cache_never_keeps_a_view_read_across_a_change(servicer: RelayServicer) -> None:
    sync = servicer.directory.sync
    sync.add_router("a")
    cache = servicer.state.directory_cache
    read = servicer.directory.devices

    async def changing_meanwhile() -> list[Device]:
        devices = await read()
        sync.publish("a", [Device("a", "NEW", "", ("*",))])
        cache.changed()  # what a publication does while this read is under way
        return devices

    servicer.directory.devices = changing_meanwhile  # type: ignore[method-assign]
    assert (await cache.view()).device("a", "NEW") is None  # this caller got what it read ...
    servicer.directory.devices = read  # type: ignore[method-assign]
    assert (await cache.view()).device("a", "NEW") is not None  # ... but the next one reads again
    sync.set_enabled("a", False)  # by another process: seen once the view is older than max_age_s
    cache.max_age_s = 0.0
    assert (await cache.view()).device("a", "NEW") is None
