"""relay_bridge.sessions: the login throttle, the caller check shared by Associate and the blob RPCs, peer addresses."""

from __future__ import annotations

import types

import grpc
import pytest

from relay_bridge import sessions as sessions_module
from relay_bridge.sessions import LoginThrottle, RouterSession, SessionRegistry, source_address


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(sessions_module, "time", types.SimpleNamespace(monotonic=c.monotonic, time=lambda: c.now))
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


def test_throttle_forgets_keys_without_recent_failures(clock: Clock) -> None:
    t = LoginThrottle(3, 60.0)
    for n in range(1000):
        assert not t.blocked(f"account:a{n}", f"source:10.0.{n // 256}.{n % 256}")
    t.failed("account:x")
    clock.now += 61
    assert not t.blocked("account:x")
    assert t._failures == {}


def test_throttle_with_a_limit_of_one(clock: Clock) -> None:
    t = LoginThrottle(1, 5.0)
    assert not t.blocked("k")
    t.failed("k")
    assert t.blocked("k")
    clock.now += 5.1
    assert not t.blocked("k")


# -- source_address ------------------------------------------------------------------------


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
def testsource_address(peer: str, address: str) -> None:
    assert source_address(peer) == address


def test_source_address_of_a_percent_encoded_ipv6_peer() -> None:
    assert source_address("ipv6:%5B::1%5D:5555") == "::1"


# -- authenticate_caller --------------------------------------------------------------------


class Aborted(Exception):
    pass


class FakeContext:
    """What authenticate_caller reads from a grpc.aio call; abort raises, as grpc's does."""

    def __init__(self, token: str | None, common_names: list[bytes] | None = None) -> None:
        self.metadata = (("relay-session", token),) if token is not None else ()
        self.common_names = common_names or []
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": self.common_names} if self.common_names else {}

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)


def registry(*, mtls: bool = False) -> SessionRegistry:
    r = SessionRegistry(require_client_cert=mtls)
    r["site-a"] = RouterSession("site-a", "token-a", "127.0.0.1", associations={"a" * 32})
    return r


async def test_the_session_of_a_valid_token() -> None:
    r = registry()
    assert (await r.authenticate_caller(FakeContext("token-a"))).name == "site-a"  # type: ignore[arg-type]
    assert (await r.authenticate_caller(FakeContext("token-a"), "a" * 32)).name == "site-a"  # type: ignore[arg-type]


@pytest.mark.parametrize("token", [None, "", "token-b", "token-a "])
async def test_no_valid_session(token: str | None) -> None:
    context = FakeContext(token)
    with pytest.raises(Aborted):
        await registry().authenticate_caller(context)  # type: ignore[arg-type]
    assert context.aborted == (grpc.StatusCode.UNAUTHENTICATED, "no valid session: sign on first")


async def test_an_ended_session_is_no_session() -> None:
    r = registry()
    r["site-a"].end()
    context = FakeContext("token-a")
    with pytest.raises(Aborted):
        await r.authenticate_caller(context)  # type: ignore[arg-type]
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.UNAUTHENTICATED


async def test_an_association_of_another_router() -> None:
    context = FakeContext("token-a")
    with pytest.raises(Aborted):
        await registry().authenticate_caller(context, "b" * 32)  # type: ignore[arg-type]
    assert context.aborted == (grpc.StatusCode.PERMISSION_DENIED, "not an association of this router")


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "a client certificate is required: enroll this router (relay-router enroll)"),
        ([b"site-b"], "the client certificate belongs to 'site-b', not 'site-a'"),
    ],
)
async def test_with_mutual_tls_the_certificate_must_be_the_sessions(names: list[bytes], message: str) -> None:
    context = FakeContext("token-a", names)
    with pytest.raises(Aborted):
        await registry(mtls=True).authenticate_caller(context)  # type: ignore[arg-type]
    assert context.aborted == (grpc.StatusCode.UNAUTHENTICATED, message)
    assert (await registry(mtls=True).authenticate_caller(FakeContext("token-a", [b"site-a"]))).name == "site-a"  # type: ignore[arg-type]


def test_an_attempt_counts_as_failed_until_it_succeeds(clock: Clock) -> None:
    t = LoginThrottle(2, 60.0)
    keys = ("account:a", "source:1")
    with t.begin(*keys) as attempt:  # type: ignore[union-attr]
        assert t.pending == 1
        assert t.begin("account:a", "source:2") is None  # one attempt per account in flight
        assert t.blocked("account:a")  # the running attempt and the concurrent one are both counted
        attempt.succeeded()
    assert t.pending == 0
    assert len(t._recent("account:a")) == 1  # the concurrent guess still counts; the successful attempt not


def test_attempts_in_flight_are_bounded(clock: Clock) -> None:
    t = LoginThrottle(5, 60.0, max_pending=2)
    first, second = t.begin("account:a", "source:1"), t.begin("account:b", "source:2")
    assert first is not None and second is not None
    assert t.begin("account:c", "source:3") is None
    with first:
        pass
    assert t.begin("account:c", "source:3") is not None


def test_a_flood_does_not_grow_the_failure_record(clock: Clock) -> None:
    t = LoginThrottle(3, 60.0)
    for _ in range(10_000):
        t.failed("source:1")
    assert len(t._failures["source:1"]) == 3 and t.blocked("source:1")
