"""The behaviour every directory backend must show, as one abstract test class.

Subclass :class:`DirectoryContract` once per backend and give it a ``harness`` fixture that
yields a :class:`Harness` on a fresh, empty directory at the latest schema. The bridge's
services see only the ``DirectoryBackend`` interface (``harness.db``); the operator's
actions (add, disable, remove, tokens) go through the harness, which calls the backend's
own admin path. Backend-specific checks (migrations of old files, ``db copy``) sit in the
subclasses.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod

import pytest

from relay_bridge.db import migrations
from relay_bridge.db.backend import DirectoryBackend
from relay_bridge.db.replicas import Replica
from relay_bridge.directory import AccountProblem, Device, DirectoryError, IdentityProblem, TokenProblem

SIGN_A, KEM_A = b"\x01" * 32, b"\x02" * 1216
SIGN_B, KEM_B = b"\x03" * 32, b"\x04" * 1216


def dev(router: str, title: str, *share_with: str, description: str = "") -> Device:
    return Device(router, title, description, tuple(sorted(share_with)))


def normalised(devices: list[Device]) -> list[Device]:
    """Share lists as sorted tuples: their order is not part of the contract."""
    return [Device(d.router, d.ae_title, d.description, tuple(sorted(d.share_with))) for d in devices]


class Harness(ABC):
    """One backend under test: the service interface plus the operator's actions."""

    db: DirectoryBackend
    integrity_error: type[BaseException]  # what a publish that breaks the schema's rules raises

    @abstractmethod
    async def add_router(self, name: str, password: str | None = None) -> str: ...
    @abstractmethod
    async def set_password(self, name: str, password: str) -> None: ...
    @abstractmethod
    async def set_enabled(self, name: str, enabled: bool) -> None: ...
    @abstractmethod
    async def remove_router(self, name: str) -> None: ...
    @abstractmethod
    async def issue_enrollment_token(self, name: str, ttl_s: float) -> str: ...
    @abstractmethod
    async def reset_identity(self, name: str) -> None: ...
    @abstractmethod
    async def reopen(self) -> DirectoryBackend:
        """Close the backend and open the same database again (what a restart sees)."""

    @abstractmethod
    async def schema_version(self) -> int: ...


class DirectoryContract:
    """Every directory behaviour the bridge relies on, for one backend."""

    # -- accounts ------------------------------------------------------------------------
    async def test_generated_password_verifies(self, harness: Harness) -> None:
        password = await harness.add_router("hospital-a")
        assert len(password) >= 12
        assert await harness.db.verify_password("hospital-a", password) is None

    async def test_given_password_and_refusal_reasons(self, harness: Harness) -> None:
        await harness.add_router("a", "correct horse battery")
        assert await harness.db.verify_password("a", "correct horse battery") is None
        assert await harness.db.verify_password("a", "wrong horse battery") is AccountProblem.WRONG_PASSWORD
        assert await harness.db.verify_password("nobody", "correct horse battery") is AccountProblem.UNKNOWN_ACCOUNT

    async def test_short_password_and_bad_names_are_refused(self, harness: Harness) -> None:
        with pytest.raises(DirectoryError, match="at least 12"):
            await harness.add_router("a", "short")
        for name in ("", "a b", "-a", "x" * 200, "a\n"):
            with pytest.raises(DirectoryError, match="router name"):
                await harness.add_router(name)
        assert await harness.db.routers() == []

    async def test_duplicate_router_is_refused(self, harness: Harness) -> None:
        await harness.add_router("a", "first password 1")
        with pytest.raises(DirectoryError, match="already exists"):
            await harness.add_router("a", "second password 2")
        assert await harness.db.verify_password("a", "first password 1") is None

    async def test_set_password_replaces_the_old_one(self, harness: Harness) -> None:
        await harness.add_router("a", "old password 123")
        await harness.set_password("a", "new password 456")
        assert await harness.db.verify_password("a", "old password 123") is AccountProblem.WRONG_PASSWORD
        assert await harness.db.verify_password("a", "new password 456") is None

    async def test_disable_and_enable(self, harness: Harness) -> None:
        await harness.add_router("a", "a good password")
        await harness.set_enabled("a", False)
        assert await harness.db.verify_password("a", "a good password") is AccountProblem.DISABLED
        # A wrong password on a disabled account says "wrong password": the state is not revealed.
        assert await harness.db.verify_password("a", "a bad password!") is AccountProblem.WRONG_PASSWORD
        assert [(r.name, r.enabled) for r in await harness.db.routers()] == [("a", False)]
        await harness.set_enabled("a", True)
        assert await harness.db.verify_password("a", "a good password") is None
        assert (await harness.db.router("a")).enabled  # type: ignore[union-attr]

    async def test_unknown_router_in_admin_actions(self, harness: Harness) -> None:
        for action in (
            harness.set_password("ghost", "a good password"),
            harness.set_enabled("ghost", False),
            harness.remove_router("ghost"),
            harness.reset_identity("ghost"),
            harness.issue_enrollment_token("ghost", 60),
        ):
            with pytest.raises(DirectoryError, match="no router named 'ghost'"):
                await action

    async def test_routers_listed_by_name_and_remembered(self, harness: Harness) -> None:
        for name in ("c", "a", "b"):
            await harness.add_router(name)
        before = time.time()
        routers = await harness.db.routers()
        assert [r.name for r in routers] == ["a", "b", "c"]
        assert [r.name for r in harness.db.known_routers] == ["a", "b", "c"]  # what a metrics scrape reads
        assert all(r.enabled and r.last_seen is None and r.created <= before for r in routers)
        assert await harness.db.router("b") == routers[1]
        assert await harness.db.router("zz") is None

    async def test_touch_records_last_seen(self, harness: Harness) -> None:
        await harness.add_router("a")
        before = time.time()
        await harness.db.touch("a")
        seen = (await harness.db.router("a")).last_seen  # type: ignore[union-attr]
        assert seen is not None and before - 1 <= seen <= time.time() + 1

    async def test_accounts_survive_a_restart(self, harness: Harness) -> None:
        password = await harness.add_router("a")
        await harness.db.publish("a", [dev("a", "PACS", "*")])
        db = await harness.reopen()
        assert await db.verify_password("a", password) is None
        assert normalised(await db.devices()) == [dev("a", "PACS", "*")]

    async def test_remove_router_cascades(self, harness: Harness) -> None:
        await harness.add_router("a", "a good password")
        await harness.add_router("b")
        token = await harness.issue_enrollment_token("a", 600)
        await harness.db.publish("a", [dev("a", "PACS", "b"), dev("a", "CT", "*")])
        await harness.db.publish("b", [dev("b", "RIS", "a")])
        await harness.remove_router("a")
        assert [r.name for r in await harness.db.routers()] == ["b"]
        assert normalised(await harness.db.devices()) == [dev("b", "RIS", "a")]
        assert await harness.db.verify_password("a", "a good password") is AccountProblem.UNKNOWN_ACCOUNT
        assert await harness.db.redeem_enrollment_token("a", token) is TokenProblem.UNKNOWN
        await harness.add_router("a")  # the name is free again, with nothing left over
        assert await harness.db.redeem_enrollment_token("a", token) is TokenProblem.UNKNOWN

    async def test_names_no_account_can_have_are_unknown(self, harness: Harness) -> None:
        """Account names arrive from the network: NUL bytes or megabytes are refused, never an error."""
        await harness.add_router("a", "a good password")
        token = await harness.issue_enrollment_token("a", 600)
        for name in ("a\x00", "\x00", "a" * 100_000, "a\n"):
            assert await harness.db.verify_password(name, "a good password") is AccountProblem.UNKNOWN_ACCOUNT
            assert await harness.db.check_identity(name, SIGN_A, KEM_A) is IdentityProblem.UNKNOWN_ACCOUNT
            assert await harness.db.redeem_enrollment_token(name, token) is TokenProblem.UNKNOWN
        assert await harness.db.redeem_enrollment_token("a", token + "\x00") is TokenProblem.UNKNOWN
        assert await harness.db.redeem_enrollment_token("a", token) is None

    async def test_scrypt_does_not_stall_the_event_loop(self, harness: Harness) -> None:
        password = await harness.add_router("a")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        try:
            assert await harness.db.verify_password("a", password) is None
            assert await harness.db.verify_password("unknown", password) is AccountProblem.UNKNOWN_ACCOUNT
        finally:
            task.cancel()
        assert ticks > 5

    # -- identities -----------------------------------------------------------------------
    async def test_first_identity_is_recorded_then_held(self, harness: Harness) -> None:
        await harness.add_router("a")
        assert await harness.db.check_identity("a", SIGN_A, KEM_A) is None
        assert await harness.db.check_identity("a", SIGN_A, KEM_A) is None
        assert await harness.db.check_identity("a", SIGN_B, KEM_B) is IdentityProblem.CHANGED
        assert await harness.db.check_identity("a", SIGN_A, KEM_B) is IdentityProblem.CHANGED
        assert await harness.db.check_identity("ghost", SIGN_A, KEM_A) is IdentityProblem.UNKNOWN_ACCOUNT
        assert await harness.db.identities() == {"a": (SIGN_A, KEM_A)}

    async def test_racing_first_sign_ons_record_one_identity(self, harness: Harness) -> None:
        await harness.add_router("a")
        results = await asyncio.gather(
            harness.db.check_identity("a", SIGN_A, KEM_A), harness.db.check_identity("a", SIGN_B, KEM_B)
        )
        assert sorted(map(str, results)) == sorted(["None", str(IdentityProblem.CHANGED)])
        recorded = (await harness.db.identities())["a"]
        assert recorded == ((SIGN_A, KEM_A) if results[0] is None else (SIGN_B, KEM_B))

    async def test_reset_and_set_identity(self, harness: Harness) -> None:
        await harness.add_router("a")
        await harness.add_router("b")
        assert await harness.db.check_identity("a", SIGN_A, KEM_A) is None
        await harness.reset_identity("a")
        assert await harness.db.identities() == {}
        assert await harness.db.check_identity("a", SIGN_B, KEM_B) is None
        await harness.db.set_identity("b", SIGN_A, KEM_A)  # enrollment: authoritative
        await harness.db.set_identity("b", SIGN_B, KEM_A)
        assert await harness.db.identities() == {"a": (SIGN_B, KEM_B), "b": (SIGN_B, KEM_A)}

    # -- enrollment tokens ---------------------------------------------------------------------
    async def test_token_works_once(self, harness: Harness) -> None:
        await harness.add_router("a")
        token = await harness.issue_enrollment_token("a", 600)
        assert len(token) == 64 and not token.startswith("-")
        assert await harness.db.redeem_enrollment_token("a", token) is None
        assert await harness.db.redeem_enrollment_token("a", token) is TokenProblem.USED

    async def test_token_is_for_its_router_only(self, harness: Harness) -> None:
        await harness.add_router("a")
        await harness.add_router("b")
        token = await harness.issue_enrollment_token("a", 600)
        assert await harness.db.redeem_enrollment_token("b", token) is TokenProblem.UNKNOWN
        assert await harness.db.redeem_enrollment_token("a", "0" * 64) is TokenProblem.UNKNOWN
        assert await harness.db.redeem_enrollment_token("a", token) is None  # the wrong tries did not spend it

    async def test_expired_token_is_refused(self, harness: Harness) -> None:
        await harness.add_router("a")
        token = await harness.issue_enrollment_token("a", -1)
        assert await harness.db.redeem_enrollment_token("a", token) is TokenProblem.EXPIRED

    async def test_several_tokens_stay_valid(self, harness: Harness) -> None:
        await harness.add_router("a")
        first, second = [await harness.issue_enrollment_token("a", 600) for _ in range(2)]
        assert first != second
        assert await harness.db.redeem_enrollment_token("a", second) is None
        assert await harness.db.redeem_enrollment_token("a", first) is None

    async def test_concurrent_redemptions_succeed_once(self, harness: Harness) -> None:
        await harness.add_router("a")
        token = await harness.issue_enrollment_token("a", 600)
        results = await asyncio.gather(*(harness.db.redeem_enrollment_token("a", token) for _ in range(8)))
        assert results.count(None) == 1
        assert results.count(TokenProblem.USED) == 7

    # -- devices and shares -------------------------------------------------------------------
    async def _three(self, harness: Harness) -> None:
        for name in ("a", "b", "c"):
            await harness.add_router(name)

    async def test_publish_replaces_devices_and_share_lists(self, harness: Harness) -> None:
        await self._three(harness)
        await harness.db.publish("a", [dev("a", "PACS", "b", "c", description="main archive"), dev("a", "CT")])
        await harness.db.publish("b", [dev("b", "RIS", "a")])
        assert normalised(await harness.db.devices()) == [
            dev("a", "CT"),
            dev("a", "PACS", "b", "c", description="main archive"),
            dev("b", "RIS", "a"),
        ]
        await harness.db.publish("a", [dev("a", "PACS", "c")])
        assert normalised(await harness.db.devices()) == [dev("a", "PACS", "c"), dev("b", "RIS", "a")]
        await harness.db.publish("a", [])
        assert normalised(await harness.db.devices()) == [dev("b", "RIS", "a")]
        assert await harness.db.device("b", "RIS") == Device("b", "RIS", "", ("a",))
        assert await harness.db.device("a", "PACS") is None

    async def test_duplicate_peers_collapse(self, harness: Harness) -> None:
        await self._three(harness)
        await harness.db.publish("a", [dev("a", "PACS", "b", "b")])
        assert normalised(await harness.db.devices()) == [dev("a", "PACS", "b")]

    async def test_reachable_by_honours_share_lists(self, harness: Harness) -> None:
        await self._three(harness)
        await harness.db.publish("a", [dev("a", "PACS", "b"), dev("a", "CT"), dev("a", "MR", "*"), dev("a", "X", "a")])
        await harness.db.publish("b", [dev("b", "RIS", "a", "c")])
        await harness.db.publish("c", [dev("c", "US", "*", "a")])
        reach = {p: normalised(await harness.db.reachable_by(p)) for p in ("a", "b", "c", "stranger")}
        assert reach["a"] == [dev("b", "RIS", "a", "c"), dev("c", "US", "*", "a")]
        assert reach["b"] == [dev("a", "MR", "*"), dev("a", "PACS", "b"), dev("c", "US", "*", "a")]
        assert reach["c"] == [dev("a", "MR", "*"), dev("b", "RIS", "a", "c")]
        assert reach["stranger"] == [dev("a", "MR", "*"), dev("c", "US", "*", "a")]

    async def test_a_disabled_routers_devices_are_hidden(self, harness: Harness) -> None:
        """A disabled account's devices leave the directory (and every Open) until it is enabled again."""
        await self._three(harness)
        await harness.db.publish("a", [dev("a", "PACS", "*")])
        await harness.db.publish("b", [dev("b", "RIS", "*")])
        await harness.set_enabled("a", False)
        assert normalised(await harness.db.devices()) == [dev("b", "RIS", "*")]
        assert await harness.db.device("a", "PACS") is None
        assert normalised(await harness.db.reachable_by("c")) == [dev("b", "RIS", "*")]
        await harness.set_enabled("a", True)
        assert await harness.db.device("a", "PACS") == dev("a", "PACS", "*")

    async def test_failed_publish_keeps_the_previous_devices(self, harness: Harness) -> None:
        await self._three(harness)
        await harness.db.publish("a", [dev("a", "PACS", "b")])
        with pytest.raises(harness.integrity_error):
            await harness.db.publish("a", [dev("a", "CT"), dev("a", "CT")])
        assert normalised(await harness.db.devices()) == [dev("a", "PACS", "b")]
        with pytest.raises(harness.integrity_error):
            await harness.db.publish("ghost", [dev("ghost", "PACS", "*")])
        assert normalised(await harness.db.devices()) == [dev("a", "PACS", "b")]

    # -- schema -------------------------------------------------------------------------------------
    async def test_a_new_directory_is_at_the_latest_schema(self, harness: Harness) -> None:
        assert await harness.schema_version() == migrations.LATEST

    # -- replicas and presence (issue 12: relay_bridge.db.replicas) --------------------------------------
    async def test_replicas_are_listed_while_their_lease_runs(self, harness: Harness) -> None:
        db, now = harness.db, time.time()
        await db.register_replica(Replica("r1", "127.0.0.1:7001", now, now + 10))
        await db.register_replica(Replica("r2", "127.0.0.1:7002", now, now + 1, sites=2, associations=3))
        assert [r.id for r in await db.live_replicas(now)] == ["r1", "r2"]
        assert (await db.live_replicas(now))[1] == Replica("r2", "127.0.0.1:7002", now, now + 1, False, 2, 3)
        assert [r.id for r in await db.live_replicas(now + 5)] == ["r1"]  # r2's lease ran out
        # A renewal is the same upsert: the lease moves, draining and load are recorded.
        await db.register_replica(Replica("r2", "127.0.0.1:7002", now, now + 20, draining=True))
        assert [(r.id, r.draining) for r in await db.live_replicas(now + 5)] == [("r1", False), ("r2", True)]
        await db.expire_replicas(now + 15)  # r1 expired: removed
        assert [r.id for r in await db.live_replicas(now)] == ["r2"]

    async def test_a_newer_sign_on_wins_the_site(self, harness: Harness) -> None:
        db, now = harness.db, time.time()
        for rid in ("r1", "r2"):
            await db.register_replica(Replica(rid, f"127.0.0.1:700{rid[1]}", now, now + 30))
        assert await db.claim_presence("site-a", "r1", now, now + 10)
        assert await db.locate("site-a", now) == ("r1", "127.0.0.1:7001")
        assert await db.claim_presence("site-a", "r2", now + 1, now + 10)  # newer: wins at once
        assert await db.locate("site-a", now) == ("r2", "127.0.0.1:7002")
        assert not await db.claim_presence("site-a", "r1", now + 0.5, now + 10)  # older: ignored
        # The old holder renews and learns the site is no longer its own; its release does not remove r2's row.
        assert await db.renew_presence("r1", now + 20) == set()
        assert await db.renew_presence("r2", now + 20) == {"site-a"}
        await db.release_presence("site-a", "r1")
        assert await db.locate("site-a", now) == ("r2", "127.0.0.1:7002")
        await db.release_presence("site-a", "r2")
        assert await db.locate("site-a", now) is None

    async def test_presence_expires_with_its_lease_or_its_replica(self, harness: Harness) -> None:
        db, now = harness.db, time.time()
        await db.register_replica(Replica("r1", "127.0.0.1:7001", now, now + 30))
        await db.register_replica(Replica("dead", "127.0.0.1:7009", now, now + 1))
        await db.claim_presence("site-a", "r1", now, now + 5)
        await db.claim_presence("site-b", "dead", now, now + 60)
        assert [(p.site, p.replica) for p in await db.live_presence(now)] == [("site-a", "r1"), ("site-b", "dead")]
        later = now + 2  # the dead replica's lease ran out: its sites are nowhere, whatever their own lease
        assert await db.locate("site-b", later) is None
        assert [p.site for p in await db.live_presence(later)] == ["site-a"]
        assert await db.locate("site-a", now + 6) is None  # the site's own lease ran out
        await db.remove_replica("r1")
        assert [p.site for p in await db.live_presence(now)] == ["site-b"]  # r1's rows went with it
        assert await db.locate("site-a", now) is None
