"""The bridge's directory: router accounts, shared devices and who may reach them.

SQLite is the embedded default (one file, easy to back up with `.backup`).
Passwords are stored as scrypt hashes (RFC 7914, via `cryptography`), never in
clear. The directory knows AE titles and share lists only: device addresses
stay inside each hospital.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import ParamSpec, TypeVar

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from relay_bridge.db import replicas
from relay_bridge.db.migrations import sqlite_upgrade
from relay_bridge.db.replicas import Presence, Replica
from relay_common.errors import RelayError
from relay_common.files import create_private
from relay_common.validate import SITE_NAME_RULE, is_site_name

# scrypt cost: 2^15 x 8 x 1 takes ~50 ms and 32 MiB here; stored per hash so it can grow.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
# The schema: relay_bridge/db/migrations.py (numbered steps for SQLite and PostgreSQL; add a step, never edit one).


class DirectoryError(RelayError):
    """An operator's request the directory cannot carry out (no such router, name taken, weak password)."""


class AccountProblem(StrEnum):
    """Why `verify_password` refused (the value is what the bridge logs)."""

    UNKNOWN_ACCOUNT = "unknown account"
    WRONG_PASSWORD = "wrong password"
    DISABLED = "account disabled"


class IdentityProblem(StrEnum):
    """Why `check_identity` refused."""

    UNKNOWN_ACCOUNT = "unknown account"
    CHANGED = "identity key changed"


class TokenProblem(StrEnum):
    """Why `redeem_enrollment_token` refused (the value is the text the router is shown)."""

    UNKNOWN = "unknown enrollment token"
    USED = "enrollment token already used"
    EXPIRED = "enrollment token expired"


def identity_changed_detail(name: str) -> str:
    """What a router whose identity key changed is told (and what the operator must do)."""
    return (
        "this router's identity key differs from the one the bridge recorded; if the router was "
        f"reinstalled, an operator must run: relay-bridge router reset-identity {name}"
    )


@dataclass(frozen=True)
class Router:
    name: str
    enabled: bool
    created: float
    last_seen: float | None


@dataclass(frozen=True)
class Device:
    router: str
    ae_title: str
    description: str
    share_with: tuple[str, ...]
    # (site or "*", service groups) as the owner published them; () = published none (an older router).
    grants: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def shared_with(self, peer: str) -> bool:
        return peer != self.router and ("*" in self.share_with or peer in self.share_with)

    def services_for(self, peer: str) -> tuple[str, ...] | None:
        """The service groups `peer` may use here: its own grant, else the "*" one; None if none published."""
        if not self.grants:
            return None
        table = dict(self.grants)
        return table.get(peer, table.get("*", ()))

    def grants_json(self) -> str:
        return json.dumps({site: list(groups) for site, groups in self.grants}) if self.grants else ""


def grants_from_json(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not text:
        return ()
    return tuple((site, tuple(groups)) for site, groups in json.loads(text).items())


def _hash(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password.encode("utf-8"))


@dataclass(frozen=True)
class PasswordRecord:
    digest: bytes
    salt: bytes
    n: int
    r: int
    p: int
    enabled: bool


def check_password(record: PasswordRecord | None, password: str) -> AccountProblem | None:
    """Hash `password` (slow, CPU-bound: scrypt) and compare; None when it is right."""
    if record is None:
        # Spend the same time as a real check so account names cannot be probed by timing.
        _hash(password, b"\0" * 16, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        return AccountProblem.UNKNOWN_ACCOUNT
    if not hmac.compare_digest(_hash(password, record.salt, record.n, record.r, record.p), record.digest):
        return AccountProblem.WRONG_PASSWORD
    if not record.enabled:
        return AccountProblem.DISABLED
    return None


class Directory:
    """Thread-safe access to the bridge database (one connection, one lock)."""

    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            # Create the file owner-only first: SQLite gives its -wal and -shm files the same mode.
            create_private(path)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA journal_mode = WAL")
        # Versioned schema (relay_bridge.db.migrations): creates or upgrades in place, refuses a newer one.
        self.schema_change = sqlite_upgrade(self._db)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    # -- accounts --------------------------------------------------------
    def add_router(self, name: str, password: str | None = None) -> str:
        """Create an account; returns its password (generated when not given)."""
        if not is_site_name(name):
            raise DirectoryError(f"router name {name!r} must be {SITE_NAME_RULE}")
        password = password or secrets.token_urlsafe(18)
        if len(password) < 12:
            raise DirectoryError("passwords must have at least 12 characters")
        salt = os.urandom(16)
        digest = _hash(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO routers(name, password_hash, salt, scrypt_n, scrypt_r, scrypt_p, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (name, digest, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, time.time()),
                )
            except sqlite3.IntegrityError as exc:
                raise DirectoryError(f"router {name!r} already exists") from exc
        return password

    def set_password(self, name: str, password: str) -> None:
        if len(password) < 12:
            raise DirectoryError("passwords must have at least 12 characters")
        salt = os.urandom(16)
        digest = _hash(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        with self._lock:
            cur = self._db.execute(
                "UPDATE routers SET password_hash=?, salt=?, scrypt_n=?, scrypt_r=?, scrypt_p=? WHERE name=?",
                (digest, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, name),
            )
        if cur.rowcount == 0:
            raise DirectoryError(f"no router named {name!r}")

    def set_enabled(self, name: str, enabled: bool) -> None:
        with self._lock:
            cur = self._db.execute("UPDATE routers SET enabled=? WHERE name=?", (int(enabled), name))
        if cur.rowcount == 0:
            raise DirectoryError(f"no router named {name!r}")

    def remove_router(self, name: str) -> None:
        with self._lock:
            cur = self._db.execute("DELETE FROM routers WHERE name=?", (name,))
        if cur.rowcount == 0:
            raise DirectoryError(f"no router named {name!r}")

    def verify_password(self, name: str, password: str) -> AccountProblem | None:
        """None when the credentials are good, else the reason (for logs and audit)."""
        return check_password(self.password_record(name), password)

    def password_record(self, name: str) -> PasswordRecord | None:
        """What checking a password needs (the hash itself is the caller's work: it is slow)."""
        with self._lock:
            row = self._db.execute(
                "SELECT password_hash, salt, scrypt_n, scrypt_r, scrypt_p, enabled FROM routers WHERE name=?",
                (name,),
            ).fetchone()
        if row is None:
            return None
        digest, salt, n, r, p, enabled = row
        return PasswordRecord(bytes(digest), bytes(salt), n, r, p, bool(enabled))

    def check_identity(self, name: str, sign_key: bytes, kem_key: bytes) -> IdentityProblem | None:
        """Record a router's identity on first sign-on; None if it matches, else the reason to refuse."""
        with self._lock:
            row = self._db.execute("SELECT sign_key, kem_key FROM routers WHERE name=?", (name,)).fetchone()
            if row is None:
                return IdentityProblem.UNKNOWN_ACCOUNT
            if row[0] is None:
                self._db.execute("UPDATE routers SET sign_key=?, kem_key=? WHERE name=?", (sign_key, kem_key, name))
                return None
        if (bytes(row[0]), bytes(row[1])) != (sign_key, kem_key):
            return IdentityProblem.CHANGED
        return None

    def issue_enrollment_token(self, name: str, ttl_s: float) -> str:
        """A new single-use token for `relay-router enroll` (earlier unused tokens stay valid until they expire)."""
        token = secrets.token_hex(32)  # hex: never starts with "-", which a command line would take for an option
        with self._lock:
            if self._db.execute("SELECT 1 FROM routers WHERE name=?", (name,)).fetchone() is None:
                raise DirectoryError(f"no router named {name!r}")
            self._db.execute(
                "INSERT INTO enrollment_tokens(router, token_sha256, expires) VALUES (?, ?, ?)",
                (name, hashlib.sha256(token.encode()).digest(), time.time() + ttl_s),
            )
        return token

    def redeem_enrollment_token(self, name: str, token: str) -> TokenProblem | None:
        """Mark the token used; None if it was valid for `name`, else why not."""
        digest = hashlib.sha256(token.encode()).digest()
        with self._lock:
            row = self._db.execute(
                "SELECT router, expires, used FROM enrollment_tokens WHERE token_sha256=?", (digest,)
            ).fetchone()
            if row is None or row[0] != name:
                return TokenProblem.UNKNOWN
            if row[2] is not None:
                return TokenProblem.USED
            if row[1] < time.time():
                return TokenProblem.EXPIRED
            self._db.execute("UPDATE enrollment_tokens SET used=? WHERE token_sha256=?", (time.time(), digest))
        return None

    def set_identity(self, name: str, sign_key: bytes, kem_key: bytes) -> None:
        """Record identity keys presented at enrollment (authoritative, replaces any earlier ones)."""
        with self._lock:
            self._db.execute("UPDATE routers SET sign_key=?, kem_key=? WHERE name=?", (sign_key, kem_key, name))

    def reset_identity(self, name: str) -> None:
        with self._lock:
            cur = self._db.execute("UPDATE routers SET sign_key=NULL, kem_key=NULL WHERE name=?", (name,))
        if cur.rowcount == 0:
            raise DirectoryError(f"no router named {name!r}")

    def identities(self) -> dict[str, tuple[bytes, bytes]]:
        with self._lock:
            rows = self._db.execute("SELECT name, sign_key, kem_key FROM routers WHERE sign_key IS NOT NULL").fetchall()
        return {n: (bytes(s), bytes(k)) for n, s, k in rows}

    def routers(self) -> list[Router]:
        with self._lock:
            rows = self._db.execute("SELECT name, enabled, created, last_seen FROM routers ORDER BY name").fetchall()
        return [Router(n, bool(e), c, s) for n, e, c, s in rows]

    def router(self, name: str) -> Router | None:
        return next((r for r in self.routers() if r.name == name), None)

    def touch(self, name: str) -> None:
        with self._lock:
            self._db.execute("UPDATE routers SET last_seen=? WHERE name=?", (time.time(), name))

    # -- devices ---------------------------------------------------------
    def publish(self, router: str, devices: list[Device]) -> None:
        """Replace the devices `router` shares (what its configuration says now)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute("DELETE FROM devices WHERE router=?", (router,))
                for d in devices:
                    self._db.execute(
                        "INSERT INTO devices(router, ae_title, description, services) VALUES (?, ?, ?, ?)",
                        (router, d.ae_title, d.description, d.grants_json()),
                    )
                    self._db.executemany(
                        "INSERT OR IGNORE INTO shares(router, ae_title, peer) VALUES (?, ?, ?)",
                        [(router, d.ae_title, peer) for peer in d.share_with],
                    )
                self._db.execute("COMMIT")
            except Exception:
                self._db.execute("ROLLBACK")
                raise

    def devices(self) -> list[Device]:
        with self._lock:
            rows = self._db.execute(
                "SELECT d.router, d.ae_title, d.description, group_concat(s.peer, char(31)), d.services"
                " FROM devices d JOIN routers r ON r.name=d.router AND r.enabled=1"
                " LEFT JOIN shares s ON s.router=d.router AND s.ae_title=d.ae_title"
                " GROUP BY d.router, d.ae_title ORDER BY d.router, d.ae_title"
            ).fetchall()
        return [
            Device(r, a, desc, tuple(peers.split("\x1f")) if peers else (), grants_from_json(services))
            for r, a, desc, peers, services in rows
        ]

    def device(self, router: str, ae_title: str) -> Device | None:
        """One device by its primary key (an indexed lookup: an Open must not read the whole directory)."""
        with self._lock:
            row = self._db.execute(
                "SELECT d.description, d.services FROM devices d JOIN routers r ON r.name=d.router AND r.enabled=1"
                " WHERE d.router=? AND d.ae_title=?",
                (router, ae_title),
            ).fetchone()
            if row is None:
                return None
            peers = self._db.execute(
                "SELECT peer FROM shares WHERE router=? AND ae_title=? ORDER BY rowid", (router, ae_title)
            ).fetchall()
        return Device(router, ae_title, row[0], tuple(p for (p,) in peers), grants_from_json(row[1]))

    def reachable_by(self, peer: str) -> list[Device]:
        return [d for d in self.devices() if d.shared_with(peer)]

    # -- replicas and presence (relay_bridge.db.replicas; one node here, the same calls as PostgreSQL) --
    def register_replica(self, replica: Replica) -> None:
        r = replica
        with self._lock:
            self._db.execute(
                replicas.REGISTER,
                (r.id, r.address, r.started, r.lease_until, r.draining, r.sites, r.associations),
            )

    def remove_replica(self, replica_id: str) -> None:
        with self._lock:
            self._db.execute(replicas.DELETE_REPLICA_PRESENCE, (replica_id,))
            self._db.execute(replicas.DELETE_REPLICA, (replica_id,))

    def claim_presence(self, site: str, replica_id: str, since: float, lease_until: float) -> bool:
        with self._lock:
            return self._db.execute(replicas.CLAIM, (site, replica_id, since, lease_until)).rowcount == 1

    def renew_presence(self, replica_id: str, lease_until: float) -> set[str]:
        with self._lock:
            return {s for (s,) in self._db.execute(replicas.RENEW_PRESENCE, (lease_until, replica_id)).fetchall()}

    def release_presence(self, site: str, replica_id: str) -> None:
        with self._lock:
            self._db.execute(replicas.RELEASE, (site, replica_id))

    def live_replicas(self, now: float) -> list[Replica]:
        with self._lock:
            rows = self._db.execute(replicas.LIVE_REPLICAS, (now,)).fetchall()
        return [replicas.replica_from_row(r) for r in rows]

    def live_presence(self, now: float) -> list[Presence]:
        with self._lock:
            rows = self._db.execute(replicas.LIVE_PRESENCE, (now, now)).fetchall()
        return [replicas.presence_from_row(r) for r in rows]

    def locate(self, site: str, now: float) -> tuple[str, str] | None:
        with self._lock:
            row = self._db.execute(replicas.LOCATE, (site, now, now)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def expire_replicas(self, before: float) -> None:
        with self._lock:
            self._db.execute(replicas.EXPIRE_PRESENCE, (before,))
            self._db.execute(replicas.EXPIRE_REPLICAS, (before,))


P = ParamSpec("P")
T = TypeVar("T")


class AsyncDirectory:
    """The directory for the event loop: every call runs on one dedicated thread, never on the loop.

    SQLite blocks (and scrypt takes ~50 ms), so the bridge's coroutines await
    these methods instead; the connection is only used from the executor's single
    thread, which also serialises the calls. Another database (PostgreSQL) can
    later sit behind the same interface. The CLI keeps the synchronous `Directory`.
    """

    backend = "sqlite"

    def __init__(self, directory: Directory, *, hash_threads: int = 2) -> None:
        self.sync = directory  # for the CLI and tests outside an event loop; never call it from the loop
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="relay-directory")
        # scrypt on threads of its own: queued password checks must hold up neither the database's
        # thread nor the loop's default executor.
        self._hasher = concurrent.futures.ThreadPoolExecutor(hash_threads, thread_name_prefix="relay-scrypt")
        # The accounts as last read, for readers that must not wait (a metrics scrape runs on the loop).
        self.known_routers: list[Router] = []

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Finish queued calls, then close the database on the executor's thread."""
        try:
            self._executor.submit(self.sync.close).result()
        finally:
            self._executor.shutdown(wait=True)
            self._hasher.shutdown(wait=False, cancel_futures=True)

    async def verify_password(self, name: str, password: str) -> AccountProblem | None:
        record = await self._call(self.sync.password_record, name)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._hasher, check_password, record, password)

    async def check_identity(self, name: str, sign_key: bytes, kem_key: bytes) -> IdentityProblem | None:
        return await self._call(self.sync.check_identity, name, sign_key, kem_key)

    async def redeem_enrollment_token(self, name: str, token: str) -> TokenProblem | None:
        return await self._call(self.sync.redeem_enrollment_token, name, token)

    async def set_identity(self, name: str, sign_key: bytes, kem_key: bytes) -> None:
        await self._call(self.sync.set_identity, name, sign_key, kem_key)

    async def identities(self) -> dict[str, tuple[bytes, bytes]]:
        return await self._call(self.sync.identities)

    async def routers(self) -> list[Router]:
        self.known_routers = await self._call(self.sync.routers)
        return self.known_routers

    async def router(self, name: str) -> Router | None:
        return next((r for r in await self.routers() if r.name == name), None)

    async def touch(self, name: str) -> None:
        await self._call(self.sync.touch, name)

    async def publish(self, router: str, devices: list[Device]) -> None:
        await self._call(self.sync.publish, router, devices)

    async def devices(self) -> list[Device]:
        return await self._call(self.sync.devices)

    async def device(self, router: str, ae_title: str) -> Device | None:
        return await self._call(self.sync.device, router, ae_title)

    async def reachable_by(self, peer: str) -> list[Device]:
        return await self._call(self.sync.reachable_by, peer)

    async def register_replica(self, replica: Replica) -> None:
        await self._call(self.sync.register_replica, replica)

    async def remove_replica(self, replica_id: str) -> None:
        await self._call(self.sync.remove_replica, replica_id)

    async def claim_presence(self, site: str, replica_id: str, since: float, lease_until: float) -> bool:
        return await self._call(self.sync.claim_presence, site, replica_id, since, lease_until)

    async def renew_presence(self, replica_id: str, lease_until: float) -> set[str]:
        return await self._call(self.sync.renew_presence, replica_id, lease_until)

    async def release_presence(self, site: str, replica_id: str) -> None:
        await self._call(self.sync.release_presence, site, replica_id)

    async def live_replicas(self, now: float) -> list[Replica]:
        return await self._call(self.sync.live_replicas, now)

    async def live_presence(self, now: float) -> list[Presence]:
        return await self._call(self.sync.live_presence, now)

    async def locate(self, site: str, now: float) -> tuple[str, str] | None:
        return await self._call(self.sync.locate, site, now)

    async def expire_replicas(self, before: float) -> None:
        await self._call(self.sync.expire_replicas, before)
