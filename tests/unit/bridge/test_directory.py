"""relay_bridge.directory: router accounts, shared devices and who may reach them."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_bridge import directory as directory_module
from relay_bridge.directory import (
    AccountProblem,
    AsyncDirectory,
    Device,
    Directory,
    DirectoryError,
    IdentityProblem,
    TokenProblem,
)
from relay_common.errors import RelayError

CHEAP_N = 2**10  # the stored cost is per hash, so tests may use a cheap one


@pytest.fixture
def cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory_module, "SCRYPT_N", CHEAP_N)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "bridge.sqlite3"


@pytest.fixture
def directory(db_path: Path, cheap_scrypt: None) -> Iterator[Directory]:
    d = Directory(db_path)
    yield d
    d.close()


def rows(db_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db_path) as other:
        return other.execute(sql).fetchall()


def dev(router: str, title: str, *share_with: str, description: str = "") -> Device:
    return Device(router, title, description, tuple(share_with))


# -- accounts --------------------------------------------------------------------


def test_generated_password_verifies(directory: Directory) -> None:
    password = directory.add_router("hospital-a")
    assert len(password) >= 12
    assert directory.verify_password("hospital-a", password) is None


def test_generated_passwords_differ(directory: Directory) -> None:
    assert directory.add_router("a") != directory.add_router("b")


def test_given_password_is_used(directory: Directory) -> None:
    assert directory.add_router("a", "correct horse battery") == "correct horse battery"
    assert directory.verify_password("a", "correct horse battery") is None


def test_short_password_is_refused(directory: Directory) -> None:
    with pytest.raises(DirectoryError, match="^passwords must have at least 12 characters$"):
        directory.add_router("a", "short")
    assert directory.routers() == []


def test_refusal_reasons(directory: Directory) -> None:
    password = directory.add_router("a")
    assert directory.verify_password("a", password + "x") == "wrong password"
    assert directory.verify_password("a", "") == "wrong password"
    assert directory.verify_password("nobody", password) == "unknown account"
    directory.set_enabled("a", False)
    assert directory.verify_password("a", password) == "account disabled"
    directory.set_enabled("a", True)
    assert directory.verify_password("a", password) is None


def test_disabled_account_with_wrong_password_is_a_wrong_password(directory: Directory) -> None:
    directory.add_router("a")
    directory.set_enabled("a", False)
    assert directory.verify_password("a", "not the password") == "wrong password"


def test_set_password_replaces_the_old_one(directory: Directory) -> None:
    old = directory.add_router("a")
    directory.set_password("a", "a brand new password")
    assert directory.verify_password("a", old) == "wrong password"
    assert directory.verify_password("a", "a brand new password") is None


def test_duplicate_router(directory: Directory) -> None:
    directory.add_router("a")
    with pytest.raises(DirectoryError, match="^router 'a' already exists$"):
        directory.add_router("a")


@pytest.mark.parametrize("name", ["", "Hospital", "-a", ".a", "a b", "a/b", "h\u00f4pital", "a" * 64])
def test_invalid_router_names(directory: Directory, name: str) -> None:
    with pytest.raises(DirectoryError) as info:
        directory.add_router(name, "long enough password")
    assert str(info.value) == f"router name {name!r} must be 1-63 characters of a-z, 0-9, '.', '_' or '-'"


def test_longest_valid_router_name(directory: Directory) -> None:
    directory.add_router("a" * 63, "long enough password")
    assert [r.name for r in directory.routers()] == ["a" * 63]


def test_router_name_with_trailing_newline_is_refused(directory: Directory) -> None:
    with pytest.raises(DirectoryError):
        directory.add_router("lab\n", "long enough password")


@pytest.mark.parametrize("action", ["set_enabled", "remove_router", "set_password"])
def test_unknown_router_in_admin_actions(directory: Directory, action: str) -> None:
    args = {"set_enabled": (False,), "remove_router": (), "set_password": ("long enough password",)}[action]
    with pytest.raises(DirectoryError, match="^no router named 'ghost'$"):
        getattr(directory, action)("ghost", *args)


def test_routers_lists_accounts_by_name(directory: Directory) -> None:
    directory.add_router("b")
    directory.add_router("a")
    directory.set_enabled("b", False)
    listed = directory.routers()
    assert [(r.name, r.enabled, r.last_seen) for r in listed] == [("a", True, None), ("b", False, None)]
    directory.touch("a")
    seen = directory.router("a")
    assert seen is not None and seen.last_seen is not None and seen.last_seen >= seen.created
    assert directory.router("nobody") is None


# -- storage -------------------------------------------------------------------------


def test_passwords_are_stored_as_salted_hashes(directory: Directory, db_path: Path) -> None:
    password = "the same password for both"
    directory.add_router("a", password)
    directory.add_router("b", password)
    stored = rows(db_path, "SELECT name, password_hash, salt, scrypt_n, scrypt_r, scrypt_p FROM routers ORDER BY name")
    assert [r[0] for r in stored] == ["a", "b"]
    for _, digest, salt, n, r, p in stored:
        assert isinstance(digest, bytes) and len(digest) == 32 and password.encode() not in digest
        assert isinstance(salt, bytes) and len(salt) == 16
        assert (n, r, p) == (CHEAP_N, 8, 1)
    assert stored[0][1] != stored[1][1], "same password, different salts, different hashes"
    assert stored[0][2] != stored[1][2]


def test_no_plaintext_password_anywhere_on_disk(directory: Directory, db_path: Path) -> None:
    password = directory.add_router("a")
    directory.set_password("a", "second password in clear?")
    for f in db_path.parent.iterdir():
        data = f.read_bytes()
        assert password.encode() not in data, f.name
        assert b"second password in clear?" not in data, f.name
    for row in rows(db_path, "SELECT * FROM routers"):
        assert password not in map(str, row)


def test_default_cost_is_stored_with_each_hash(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Directory(db_path)
    try:
        password = d.add_router("a")  # the real cost, once
        assert rows(db_path, "SELECT scrypt_n, scrypt_r, scrypt_p FROM routers") == [(2**15, 8, 1)]
        # A hash keeps verifying with its own parameters after the default cost changes.
        monkeypatch.setattr(directory_module, "SCRYPT_N", CHEAP_N)
        assert d.verify_password("a", password) is None
    finally:
        d.close()


def test_database_file_is_owner_only(db_path: Path, cheap_scrypt: None) -> None:
    old = os.umask(0o022)
    try:
        d = Directory(db_path)
    finally:
        os.umask(old)
    d.add_router("a")
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    d.close()


def test_wal_files_are_owner_only(db_path: Path, cheap_scrypt: None) -> None:
    old = os.umask(0o022)
    try:
        d = Directory(db_path)
    finally:
        os.umask(old)
    try:
        d.add_router("a")
        sidecars = sorted(p for p in db_path.parent.iterdir() if p != db_path)
        assert [p.name for p in sidecars] == ["bridge.sqlite3-shm", "bridge.sqlite3-wal"]
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in sidecars} == {p.name: 0o600 for p in sidecars}
    finally:
        d.close()


def test_reopened_directory_keeps_accounts(db_path: Path, cheap_scrypt: None) -> None:
    d = Directory(db_path)
    password = d.add_router("a")
    d.publish("a", [dev("a", "PACS", "*")])
    d.close()
    again = Directory(db_path)
    try:
        assert again.verify_password("a", password) is None
        assert again.devices() == [dev("a", "PACS", "*")]
    finally:
        again.close()


def test_in_memory_directory(cheap_scrypt: None) -> None:
    d = Directory(":memory:")
    password = d.add_router("a")
    assert d.verify_password("a", password) is None
    d.close()


# -- devices -----------------------------------------------------------------------


@pytest.fixture
def three(directory: Directory) -> Directory:
    for name in ("a", "b", "c"):
        directory.add_router(name, "long enough password")
    return directory


def test_publish_and_list(three: Directory) -> None:
    three.publish("a", [dev("a", "PACS", "b", "c", description="archive"), dev("a", "CT", description="scanner")])
    assert three.devices() == [dev("a", "CT", description="scanner"), dev("a", "PACS", "b", "c", description="archive")]
    assert three.device("a", "PACS") == dev("a", "PACS", "b", "c", description="archive")
    assert three.device("a", "MR") is None
    assert three.device("b", "PACS") is None


def test_publish_replaces_devices_and_share_lists(three: Directory) -> None:
    three.publish("a", [dev("a", "PACS", "b", "c"), dev("a", "CT", "b")])
    three.publish("b", [dev("b", "RIS", "a")])
    three.publish("a", [dev("a", "PACS", "c")])
    assert three.devices() == [dev("a", "PACS", "c"), dev("b", "RIS", "a")]
    three.publish("a", [])
    assert three.devices() == [dev("b", "RIS", "a")]


def test_publish_of_duplicate_titles_keeps_the_previous_devices(three: Directory) -> None:
    three.publish("a", [dev("a", "PACS", "b")])
    with pytest.raises(sqlite3.IntegrityError):
        three.publish("a", [dev("a", "CT"), dev("a", "CT")])
    assert three.devices() == [dev("a", "PACS", "b")]


def test_duplicate_peers_in_a_share_list_collapse(three: Directory) -> None:
    three.publish("a", [dev("a", "PACS", "b", "b")])
    assert three.devices() == [dev("a", "PACS", "b")]


def test_reachable_by_honours_share_lists(three: Directory) -> None:
    three.publish("a", [dev("a", "PACS", "b"), dev("a", "CT"), dev("a", "MR", "*")])
    three.publish("b", [dev("b", "RIS", "a", "c")])
    three.publish("c", [dev("c", "US", "*", "a")])
    assert three.reachable_by("a") == [dev("b", "RIS", "a", "c"), dev("c", "US", "*", "a")]
    assert three.reachable_by("b") == [dev("a", "MR", "*"), dev("a", "PACS", "b"), dev("c", "US", "*", "a")]
    assert three.reachable_by("c") == [dev("a", "MR", "*"), dev("b", "RIS", "a", "c")]
    assert three.reachable_by("stranger") == [dev("a", "MR", "*"), dev("c", "US", "*", "a")]


def test_own_devices_are_never_reachable(three: Directory) -> None:
    three.publish("a", [dev("a", "PACS", "*"), dev("a", "CT", "a")])
    assert three.reachable_by("a") == []
    assert not dev("a", "PACS", "*").shared_with("a")


def test_unshared_device_is_listed_but_reachable_by_nobody(three: Directory) -> None:
    three.publish("a", [dev("a", "PACS")])
    assert three.devices() == [dev("a", "PACS")]
    assert three.reachable_by("b") == three.reachable_by("c") == []


def test_remove_router_cascades_devices_and_shares(three: Directory, db_path: Path) -> None:
    three.publish("a", [dev("a", "PACS", "b", "c"), dev("a", "CT", "*")])
    three.publish("b", [dev("b", "RIS", "a")])
    three.remove_router("a")
    assert [r.name for r in three.routers()] == ["b", "c"]
    assert three.devices() == [dev("b", "RIS", "a")]
    assert rows(db_path, "SELECT router, ae_title, peer FROM shares") == [("b", "RIS", "a")]
    assert three.verify_password("a", "long enough password") == "unknown account"


def test_devices_of_an_unknown_router_are_refused(three: Directory) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        three.publish("ghost", [dev("ghost", "PACS", "*")])
    assert three.devices() == []


# -- typed problems ------------------------------------------------------------------------


def test_problems_are_typed(directory: Directory) -> None:
    password = directory.add_router("a")
    assert directory.verify_password("a", "x" * 12) is AccountProblem.WRONG_PASSWORD
    assert directory.verify_password("b", password) is AccountProblem.UNKNOWN_ACCOUNT
    assert directory.check_identity("b", b"s" * 32, b"k") is IdentityProblem.UNKNOWN_ACCOUNT
    assert directory.check_identity("a", b"s" * 32, b"k") is None  # recorded at first sign-on
    assert directory.check_identity("a", b"t" * 32, b"k") is IdentityProblem.CHANGED
    token = directory.issue_enrollment_token("a", 60)
    assert directory.redeem_enrollment_token("b", token) is TokenProblem.UNKNOWN
    assert directory.redeem_enrollment_token("a", token) is None
    assert directory.redeem_enrollment_token("a", token) is TokenProblem.USED
    with pytest.raises(DirectoryError) as err:
        directory.add_router("a")
    assert isinstance(err.value, RelayError) and err.value.detail == "router 'a' already exists"


# -- the async interface ---------------------------------------------------------------------


class ThreadRecorder(Directory):
    """Records the thread of every database call."""

    threads: list[str]

    def routers(self):  # type: ignore[no-untyped-def]
        self.threads.append(threading.current_thread().name)
        return super().routers()

    def password_record(self, name: str):  # type: ignore[no-untyped-def]
        self.threads.append(threading.current_thread().name)
        return super().password_record(name)

    def publish(self, router: str, devices: list[Device]) -> None:
        self.threads.append(threading.current_thread().name)
        super().publish(router, devices)


async def test_async_calls_run_off_the_event_loop_on_one_thread(db_path: Path, cheap_scrypt: None) -> None:
    sync = ThreadRecorder(db_path)
    sync.threads = []
    password = sync.add_router("a")
    directory = AsyncDirectory(sync)
    try:
        loop_thread = threading.current_thread().name
        assert await directory.verify_password("a", password) is None
        assert await directory.verify_password("a", "x" * 12) is AccountProblem.WRONG_PASSWORD
        await directory.publish("a", [dev("a", "PACS", "*")])
        assert [r.name for r in await directory.routers()] == ["a"]
        assert [r.name for r in directory.known_routers] == ["a"]  # what a metrics scrape reads without waiting
        assert [d.ae_title for d in await directory.reachable_by("b")] == ["PACS"]
        assert len(sync.threads) == 4
        assert loop_thread not in sync.threads
        assert len(set(sync.threads)) == 1 and sync.threads[0].startswith("relay-directory")
    finally:
        directory.close()


async def test_password_hashes_run_on_their_own_threads(db_path: Path, cheap_scrypt: None, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Queued scrypt work holds up neither the database thread nor the loop's default executor."""
    from relay_bridge import directory as module

    hashed_on: list[str] = []
    real = module._hash

    def recording(*args):  # type: ignore[no-untyped-def]
        hashed_on.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(module, "_hash", recording)
    sync = Directory(db_path)
    password = sync.add_router("a")
    directory = AsyncDirectory(sync, hash_threads=1)
    hashed_on.clear()  # add_router hashed the new password on this thread
    try:
        assert await directory.verify_password("a", password) is None
        assert await directory.verify_password("nobody", password) is AccountProblem.UNKNOWN_ACCOUNT
        assert len(hashed_on) == 2 and all(name.startswith("relay-scrypt") for name in hashed_on)
    finally:
        directory.close()


def test_a_disabled_routers_devices_are_hidden(db_path: Path, cheap_scrypt: None) -> None:
    sync = Directory(db_path)
    sync.add_router("a")
    sync.publish("a", [dev("a", "PACS", "*")])
    assert sync.device("a", "PACS") is not None and [d.ae_title for d in sync.devices()] == ["PACS"]
    sync.set_enabled("a", False)
    assert sync.device("a", "PACS") is None and sync.devices() == []


async def test_the_loop_keeps_running_while_a_password_is_checked(db_path: Path) -> None:
    """A real-cost scrypt (~50 ms) does not stall other coroutines."""
    sync = Directory(db_path)
    password = sync.add_router("a")
    directory = AsyncDirectory(sync)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        assert await directory.verify_password("a", password) is None
        assert ticks > 5
    finally:
        task.cancel()
        directory.close()
