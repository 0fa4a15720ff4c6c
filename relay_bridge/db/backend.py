"""The directory backend interface, and `open_directory`, which picks SQLite or PostgreSQL by `[storage] database`.

Schema policy at `serve` (docs/operations.md, "Database: SQLite or PostgreSQL"):
- SQLite (one bridge, one file): an older schema is upgraded in place when opened, so the quick
  start stays one command; a newer one is refused.
- PostgreSQL (possibly several replicas): any schema but the latest is refused; an operator runs
  `relay-bridge db upgrade` once, so replicas of two versions never race to change the schema.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from relay_bridge.db.replicas import Presence, Replica
from relay_bridge.directory import (
    AccountProblem,
    AsyncDirectory,
    Device,
    Directory,
    IdentityProblem,
    Router,
    TokenProblem,
)

T = TypeVar("T")
POSTGRES_SCHEMES = ("postgresql", "postgres")


def is_postgres_url(database: str | os.PathLike[str]) -> bool:
    return urlsplit(os.fspath(database)).scheme in POSTGRES_SCHEMES


class DirectoryBackend(Protocol):
    """What the bridge's services await (control, splice, metrics); both backends implement it.

    Calls never block the event loop: SQLite runs on one dedicated thread, PostgreSQL through
    an async pool, and scrypt in a thread for both.
    """

    backend: str
    known_routers: list[Router]  # the accounts as last read, for readers that must not wait

    async def verify_password(self, name: str, password: str) -> AccountProblem | None: ...
    async def check_identity(self, name: str, sign_key: bytes, kem_key: bytes) -> IdentityProblem | None: ...
    async def redeem_enrollment_token(self, name: str, token: str) -> TokenProblem | None: ...
    async def set_identity(self, name: str, sign_key: bytes, kem_key: bytes) -> None: ...
    async def identities(self) -> dict[str, tuple[bytes, bytes]]: ...
    async def routers(self) -> list[Router]: ...
    async def router(self, name: str) -> Router | None: ...
    async def touch(self, name: str) -> None: ...
    async def publish(self, router: str, devices: list[Device]) -> None: ...
    async def devices(self) -> list[Device]: ...
    async def device(self, router: str, ae_title: str) -> Device | None: ...
    async def reachable_by(self, peer: str) -> list[Device]: ...
    async def aclose(self) -> None: ...
    # Replicas and presence (relay_bridge.db.replicas, relay_bridge.cluster).
    async def register_replica(self, replica: Replica) -> None: ...
    async def remove_replica(self, replica_id: str) -> None: ...
    async def claim_presence(self, site: str, replica_id: str, since: float, lease_until: float) -> bool: ...
    async def renew_presence(self, replica_id: str, lease_until: float) -> set[str]: ...
    async def release_presence(self, site: str, replica_id: str) -> None: ...
    async def live_replicas(self, now: float) -> list[Replica]: ...
    async def live_presence(self, now: float) -> list[Presence]: ...
    async def locate(self, site: str, now: float) -> tuple[str, str] | None: ...
    async def expire_replicas(self, before: float) -> None: ...


async def open_directory(
    database: str | os.PathLike[str], *, password_file: Path | None = None, hash_threads: int = 2
) -> DirectoryBackend:
    """The directory for `serve`: SQLite (created or upgraded in place) or PostgreSQL (at the latest schema)."""
    if is_postgres_url(database):
        from relay_bridge.db.postgres import PostgresDirectory

        return await PostgresDirectory.open(os.fspath(database), password_file=password_file, hash_threads=hash_threads)
    return AsyncDirectory(await asyncio.to_thread(Directory, Path(database)), hash_threads=hash_threads)


class SyncPostgresDirectory:
    """The synchronous `Directory` methods the CLI's admin commands call, run on PostgreSQL.

    One private event loop for the life of the command (the CLI is synchronous and short-lived).
    """

    def __init__(self, url: str, password_file: Path | None) -> None:
        from relay_bridge.db.postgres import PostgresDirectory

        self._loop = asyncio.new_event_loop()
        try:
            self.db = self._run(PostgresDirectory.open(url, password_file=password_file, max_size=2))
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        try:
            self._run(self.db.aclose())
        finally:
            self._loop.close()

    def add_router(self, name: str, password: str | None = None) -> str:
        return self._run(self.db.add_router(name, password))

    def set_password(self, name: str, password: str) -> None:
        self._run(self.db.set_password(name, password))

    def set_enabled(self, name: str, enabled: bool) -> None:
        self._run(self.db.set_enabled(name, enabled))

    def remove_router(self, name: str) -> None:
        self._run(self.db.remove_router(name))

    def issue_enrollment_token(self, name: str, ttl_s: float) -> str:
        return self._run(self.db.issue_enrollment_token(name, ttl_s))

    def reset_identity(self, name: str) -> None:
        self._run(self.db.reset_identity(name))

    def routers(self) -> list[Router]:
        return self._run(self.db.routers())

    def devices(self) -> list[Device]:
        return self._run(self.db.devices())


def open_admin_directory(
    database: str | os.PathLike[str], password_file: Path | None
) -> Directory | SyncPostgresDirectory:
    """The directory for the CLI's synchronous admin commands."""
    if is_postgres_url(database):
        return SyncPostgresDirectory(os.fspath(database), password_file)
    return Directory(Path(database))
