"""relay_bridge.server helpers: sign-on throttling, published device checks, peer addresses."""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import directory as directory_module
from relay_bridge import server as server_module
from relay_bridge.config import BridgeConfig, LimitsSection, ServerSection
from relay_bridge.directory import Device, Directory
from relay_bridge.server import LoginThrottle, RelayServicer, RouterSession, _check_devices, _source_address


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(server_module, "time", types.SimpleNamespace(monotonic=c.monotonic, time=lambda: c.now))
    return c


# -- LoginThrottle ---------------------------------------------------------------------


def test_throttle_blocks_after_limit_failures(clock: Clock) -> None:
    t = LoginThrottle(3, 60.0)
    for _ in range(2):
        t.failed("account:a")
        assert not t.blocked("account:a")
    t.failed("account:a")
    assert t.blocked("account:a")


def test_throttle_counts_each_key_separately(clock: Clock) -> None:
    t = LoginThrottle(2, 60.0)
    t.failed("account:a", "source:10.0.0.1")
    t.failed("account:a", "source:10.0.0.2")
    assert t.blocked("account:a")
    assert not t.blocked("source:10.0.0.1") and not t.blocked("source:10.0.0.2")
    assert not t.blocked("account:b")
    # Any blocked key blocks the attempt: a known account from a fresh address stays blocked.
    assert t.blocked("account:a", "source:192.0.2.7")
    assert not t.blocked("account:b", "source:10.0.0.1")


def test_throttle_window_slides(clock: Clock) -> None:
    t = LoginThrottle(3, 60.0)
    for at in (0.0, 30.0, 59.0):
        clock.now = 1000.0 + at
        t.failed("source:x")
    clock.now = 1059.5
    assert t.blocked("source:x")
    clock.now = 1060.5  # the failure at 0 s has left the window
    assert not t.blocked("source:x")
    t.failed("source:x")
    assert t.blocked("source:x")
    clock.now = 1200.0
    assert not t.blocked("source:x")


def test_throttle_with_a_limit_of_one(clock: Clock) -> None:
    t = LoginThrottle(1, 5.0)
    assert not t.blocked("k")
    t.failed("k")
    assert t.blocked("k")
    clock.now += 5.1
    assert not t.blocked("k")


# -- sign-on through the servicer ---------------------------------------------------------


@pytest.fixture
def servicer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RelayServicer]:
    monkeypatch.setattr(directory_module, "SCRYPT_N", 2**10)
    directory = Directory(tmp_path / "bridge.sqlite3")
    config = BridgeConfig(server=ServerSection(insecure=True), limits=LimitsSection(login_failures=2))
    yield RelayServicer(config, directory)
    directory.close()


async def test_sign_on_errors_do_not_reveal_whether_an_account_exists(servicer: RelayServicer) -> None:
    password = servicer.directory.add_router("a")
    assert await servicer._authenticate("a", password, "10.0.0.1") is None
    assert await servicer._authenticate("a", "nope nope nope", "10.0.0.2") == "wrong account name or password"
    assert await servicer._authenticate("ghost", password, "10.0.0.3") == "wrong account name or password"
    servicer.directory.set_enabled("a", False)
    assert await servicer._authenticate("a", password, "10.0.0.4") == "account disabled"


async def test_repeated_failures_lock_the_account_out_even_with_the_right_password(servicer: RelayServicer) -> None:
    password = servicer.directory.add_router("a")
    for source in ("10.0.0.1", "10.0.0.2"):
        assert await servicer._authenticate("a", "guess guess guess", source) == "wrong account name or password"
    refused = "too many failed sign-on attempts; try again later"
    assert await servicer._authenticate("a", password, "10.0.0.3") == refused
    # ... and the guessing addresses are blocked for other accounts too.
    b = servicer.directory.add_router("b")
    assert await servicer._authenticate("b", b, "10.0.0.1") is None
    await servicer._authenticate("c", "x" * 12, "10.0.0.1")
    assert await servicer._authenticate("b", b, "10.0.0.1") == refused


def test_directory_for_lists_what_a_site_may_reach_and_who_is_online(servicer: RelayServicer) -> None:
    d = servicer.directory
    for name in ("a", "b", "c"):
        d.add_router(name, "long enough password")
    d.publish("b", [Device("b", "PACS", "archive", ("a",)), Device("b", "CT", "", ())])
    d.publish("c", [Device("c", "MR", "", ("*",))])
    servicer.sessions["b"] = RouterSession("b", "token", "10.0.0.2")
    listing = servicer.directory_for("a")
    assert [(x.site, x.ae_title, x.description, x.online) for x in listing.devices] == [
        ("b", "PACS", "archive", True),
        ("c", "MR", "", False),
    ]
    assert [(x.site, x.ae_title) for x in servicer.directory_for("c").devices] == []


# -- _check_devices ------------------------------------------------------------------------


def shared(*titles: str) -> list[pb.SharedDevice]:
    return [pb.SharedDevice(ae_title=t, share_with=["*"]) for t in titles]


def test_valid_devices_pass() -> None:
    assert _check_devices(shared("PACS", "CT_1", "A" * 16, "MR 2")) is None
    assert _check_devices([]) is None


@pytest.mark.parametrize("title", ["A" * 17, "PACS\\2", "", " PACS", "PACS ", "PA\nCS", "PA\x00CS", "PACS\n"])
def test_invalid_ae_title_is_named(title: str) -> None:
    assert _check_devices(shared("OK", title)) == (
        f"invalid AE title {title!r} (1-16 characters, no backslash or control characters)"
    )


def test_duplicate_ae_title_is_named() -> None:
    assert _check_devices(shared("PACS", "CT", "PACS")) == "AE title 'PACS' is published twice"


# -- _source_address ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.1:5555", "127.0.0.1"),
        ("ipv4:10.1.2.3:443", "10.1.2.3"),
        ("ipv6:[::1]:5555", "::1"),
        ("ipv6:[2001:db8::7]:50051", "2001:db8::7"),
        ("unix:/run/relay.sock", "unix:/run/relay.sock"),
        ("", ""),
    ],
)
def test_source_address(peer: str, address: str) -> None:
    assert _source_address(peer) == address


def test_source_address_of_a_percent_encoded_ipv6_peer() -> None:
    assert _source_address("ipv6:%5B::1%5D:5555") == "::1"
