"""The directory on PostgreSQL: psycopg 3 with an async connection pool (several bridges, one database).

The same behaviour as the SQLite `Directory` (the contract suite in tests/integration/directory
runs both), with the decisions that must hold across replicas made by the database itself:
an enrollment token is redeemed by one conditional UPDATE (a token works once in the whole
cluster), a first identity is recorded only where none is (`sign_key IS NULL`). scrypt runs in
its own bounded threads (`hash_threads`), never on the event loop.

psycopg is imported only when a `postgresql://` database is opened: the embedded default
needs nothing more (`pip install 'dicom-relay[postgresql]'`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from relay_bridge import directory as _directory
from relay_bridge.db import migrations, replicas
from relay_bridge.db.replicas import Presence, Replica
from relay_bridge.directory import (
    AccountProblem,
    Device,
    DirectoryError,
    IdentityProblem,
    Router,
    TokenProblem,
    _hash,
    grants_from_json,
)
from relay_common.errors import RelayError
from relay_common.validate import SITE_NAME_RULE, is_site_name

T = TypeVar("T")


def _cost() -> tuple[int, int, int]:
    """scrypt's cost as the SQLite directory has it now (one setting for both backends)."""
    return _directory.SCRYPT_N, _directory.SCRYPT_R, _directory.SCRYPT_P


POOL_WAIT_S = 3.0
INSTALL_HINT = "PostgreSQL needs psycopg 3 and psycopg-pool: pip install 'dicom-relay[postgresql]'"


class DatabaseUnavailable(RelayError):
    """The PostgreSQL server cannot be reached or refused us (a transient condition for callers)."""


def _import_psycopg() -> Any:
    try:
        import psycopg
        import psycopg_pool
    except ImportError as exc:
        raise DirectoryError(INSTALL_HINT) from exc
    return psycopg, psycopg_pool


def conninfo(url: str, password_file: Path | None) -> str:
    """The libpq connection string: the URL plus the password from `password_file`, if any.

    Without a password file libpq's own sources apply (PGPASSWORD, PGPASSFILE/~/.pgpass, PG* variables).
    """
    psycopg, _ = _import_psycopg()
    url = "postgresql://" + url.split("://", 1)[1] if url.startswith("postgres://") else url
    extra: dict[str, str] = {"application_name": "relay-bridge", "connect_timeout": "10"}
    if password_file is not None:
        try:
            extra["password"] = password_file.read_text().strip()
        except OSError as exc:
            raise DirectoryError(f"cannot read the database password file {password_file}: {exc.strerror}") from exc
    return str(psycopg.conninfo.make_conninfo(url, **extra))


class PostgresDirectory:
    """`DirectoryBackend` on PostgreSQL. Create with `await PostgresDirectory.open(...)`."""

    backend = "postgresql"

    def __init__(self, pool: Any, psycopg: Any, *, hash_threads: int = 2) -> None:
        self._pool = pool
        self._psycopg = psycopg
        self.known_routers: list[Router] = []
        # scrypt on its own bounded threads: queued sign-on guesses never starve the default executor.
        self._hasher = concurrent.futures.ThreadPoolExecutor(hash_threads, thread_name_prefix="relay-scrypt")

    async def _hash(self, *args: Any) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(self._hasher, _hash, *args)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        password_file: Path | None = None,
        max_size: int = 10,
        check_schema: bool = True,
        hash_threads: int = 2,
    ) -> PostgresDirectory:
        """Connect (a pool of up to `max_size` connections); with `check_schema`, refuse any schema but the latest."""
        psycopg, psycopg_pool = _import_psycopg()
        info = conninfo(url, password_file)
        try:  # one direct attempt first: the server's own reason, at once (a pool would retry for its timeout)
            probe = await psycopg.AsyncConnection.connect(info)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"cannot connect to the PostgreSQL database: {_one_line(exc)}") from None
        await probe.close()
        # A short wait for a connection: with the server away, callers hear so in seconds (a sign-on gets a
        # transient refusal), not after a long queue. Checked at checkout: after a server restart the
        # pool's old connections are replaced instead of failing the first calls.
        pool = psycopg_pool.AsyncConnectionPool(
            info,
            min_size=1,
            max_size=max_size,
            open=False,
            timeout=POOL_WAIT_S,
            check=psycopg_pool.AsyncConnectionPool.check_connection,
        )
        try:
            await pool.open(wait=True, timeout=15.0)
        except psycopg_pool.PoolTimeout as exc:
            await pool.close()
            raise DatabaseUnavailable("cannot connect to the PostgreSQL database: timed out") from exc
        directory = cls(pool, psycopg, hash_threads=hash_threads)
        if check_schema:
            try:
                found = await directory.schema_version()
                if found > migrations.LATEST:
                    raise migrations.too_new(found)
                if found < migrations.LATEST:
                    raise migrations.too_old(found, "PostgreSQL")
            except BaseException:
                await pool.close()
                raise
        return directory

    async def aclose(self) -> None:
        await self._pool.close()
        self._hasher.shutdown(wait=False, cancel_futures=True)

    # -- schema ------------------------------------------------------------
    async def schema_version(self) -> int:
        async with self._pool.connection() as conn:
            return await migrations.postgresql_version(conn)

    async def upgrade(self) -> tuple[int, int]:
        async with self._pool.connection() as conn:
            return await migrations.postgresql_upgrade(conn)

    # -- helpers -------------------------------------------------------------
    # A lost server or an exhausted pool becomes `DatabaseUnavailable` (a RelayError with one line
    # of text): callers see one typed, transient error, whatever psycopg raised.
    async def _fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        async def work(conn: Any) -> list[tuple[Any, ...]]:
            cur = await conn.execute(sql, params)
            return list(await cur.fetchall())

        return await self._with_connection(work, transaction=False)

    async def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Run one statement in its own transaction; returns the rows it changed."""

        async def work(conn: Any) -> int:
            cur = await conn.execute(sql, params)
            return int(cur.rowcount)

        return await self._with_connection(work, transaction=False)

    async def in_transaction(self, work: Callable[[Any], Awaitable[T]]) -> T:
        return await self._with_connection(work, transaction=True)

    async def _with_connection(self, work: Callable[[Any], Awaitable[T]], *, transaction: bool) -> T:
        from psycopg_pool import PoolTimeout

        try:
            async with self._pool.connection() as conn:
                if not transaction:
                    return await work(conn)
                async with conn.transaction():
                    return await work(conn)
        except (self._psycopg.OperationalError, PoolTimeout) as exc:
            raise DatabaseUnavailable(f"the PostgreSQL database is unavailable: {_one_line(exc)}") from exc

    # -- accounts --------------------------------------------------------------
    async def add_router(self, name: str, password: str | None = None) -> str:
        if not is_site_name(name):
            raise DirectoryError(f"router name {name!r} must be {SITE_NAME_RULE}")
        password = password or secrets.token_urlsafe(18)
        if len(password) < 12:
            raise DirectoryError("passwords must have at least 12 characters")
        salt = os.urandom(16)
        digest = await self._hash(password, salt, *_cost())
        try:
            await self._execute(
                "INSERT INTO routers(name, password_hash, salt, scrypt_n, scrypt_r, scrypt_p, created)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (name, digest, salt, *_cost(), time.time()),
            )
        except self._psycopg.errors.UniqueViolation as exc:
            raise DirectoryError(f"router {name!r} already exists") from exc
        return password

    async def set_password(self, name: str, password: str) -> None:
        if len(password) < 12:
            raise DirectoryError("passwords must have at least 12 characters")
        salt = os.urandom(16)
        digest = await self._hash(password, salt, *_cost())
        changed = await self._execute(
            "UPDATE routers SET password_hash=%s, salt=%s, scrypt_n=%s, scrypt_r=%s, scrypt_p=%s WHERE name=%s",
            (digest, salt, *_cost(), name),
        )
        if changed == 0:
            raise DirectoryError(f"no router named {name!r}")

    async def set_enabled(self, name: str, enabled: bool) -> None:
        if await self._execute("UPDATE routers SET enabled=%s WHERE name=%s", (enabled, name)) == 0:
            raise DirectoryError(f"no router named {name!r}")

    async def remove_router(self, name: str) -> None:
        if await self._execute("DELETE FROM routers WHERE name=%s", (name,)) == 0:
            raise DirectoryError(f"no router named {name!r}")

    async def verify_password(self, name: str, password: str) -> AccountProblem | None:
        # A name no account can have (NUL bytes, which PostgreSQL text refuses, or any invalid name) is
        # unknown without asking the database: it comes from the network, and SQLite answers the same.
        rows = (
            await self._fetch(
                "SELECT password_hash, salt, scrypt_n, scrypt_r, scrypt_p, enabled FROM routers WHERE name=%s", (name,)
            )
            if is_site_name(name)
            else []
        )
        if not rows:
            # The same time as a real check, so account names cannot be probed by timing.
            await self._hash(password, b"\0" * 16, *_cost())
            return AccountProblem.UNKNOWN_ACCOUNT
        digest, salt, n, r, p, enabled = rows[0]
        computed = await self._hash(password, bytes(salt), n, r, p)
        if not hmac.compare_digest(computed, bytes(digest)):
            return AccountProblem.WRONG_PASSWORD
        if not enabled:
            return AccountProblem.DISABLED
        return None

    async def check_identity(self, name: str, sign_key: bytes, kem_key: bytes) -> IdentityProblem | None:
        if not is_site_name(name):
            return IdentityProblem.UNKNOWN_ACCOUNT

        async def work(conn: Any) -> IdentityProblem | None:
            # Record the first identity only where none is: two replicas racing cannot both "win".
            await conn.execute(
                "UPDATE routers SET sign_key=%s, kem_key=%s WHERE name=%s AND sign_key IS NULL",
                (sign_key, kem_key, name),
            )
            cur = await conn.execute("SELECT sign_key, kem_key FROM routers WHERE name=%s", (name,))
            row = await cur.fetchone()
            if row is None:
                return IdentityProblem.UNKNOWN_ACCOUNT
            if (bytes(row[0]), bytes(row[1])) != (sign_key, kem_key):
                return IdentityProblem.CHANGED
            return None

        return await self.in_transaction(work)

    async def issue_enrollment_token(self, name: str, ttl_s: float) -> str:
        token = secrets.token_hex(32)  # hex: never starts with "-", which a command line would take for an option
        try:
            await self._execute(
                "INSERT INTO enrollment_tokens(router, token_sha256, expires) VALUES (%s, %s, %s)",
                (name, hashlib.sha256(token.encode()).digest(), time.time() + ttl_s),
            )
        except self._psycopg.errors.ForeignKeyViolation as exc:
            raise DirectoryError(f"no router named {name!r}") from exc
        return token

    async def redeem_enrollment_token(self, name: str, token: str) -> TokenProblem | None:
        if not is_site_name(name):
            return TokenProblem.UNKNOWN
        digest = hashlib.sha256(token.encode()).digest()
        now = time.time()

        # One conditional UPDATE: of two replicas redeeming the same token at once, exactly one succeeds.
        async def work(conn: Any) -> TokenProblem | None:
            cur = await conn.execute(
                "UPDATE enrollment_tokens SET used=%s"
                " WHERE token_sha256=%s AND router=%s AND used IS NULL AND expires >= %s",
                (now, digest, name, now),
            )
            if cur.rowcount == 1:
                return None
            cur = await conn.execute(
                "SELECT router, expires, used FROM enrollment_tokens WHERE token_sha256=%s", (digest,)
            )
            row = await cur.fetchone()
            if row is None or row[0] != name:
                return TokenProblem.UNKNOWN
            return TokenProblem.USED if row[2] is not None else TokenProblem.EXPIRED

        return await self.in_transaction(work)

    async def set_identity(self, name: str, sign_key: bytes, kem_key: bytes) -> None:
        await self._execute("UPDATE routers SET sign_key=%s, kem_key=%s WHERE name=%s", (sign_key, kem_key, name))

    async def reset_identity(self, name: str) -> None:
        if await self._execute("UPDATE routers SET sign_key=NULL, kem_key=NULL WHERE name=%s", (name,)) == 0:
            raise DirectoryError(f"no router named {name!r}")

    async def identities(self) -> dict[str, tuple[bytes, bytes]]:
        rows = await self._fetch("SELECT name, sign_key, kem_key FROM routers WHERE sign_key IS NOT NULL")
        return {n: (bytes(s), bytes(k)) for n, s, k in rows}

    async def routers(self) -> list[Router]:
        rows = await self._fetch("SELECT name, enabled, created, last_seen FROM routers ORDER BY name")
        self.known_routers = [Router(n, bool(e), c, s) for n, e, c, s in rows]
        return self.known_routers

    async def router(self, name: str) -> Router | None:
        return next((r for r in await self.routers() if r.name == name), None)

    async def touch(self, name: str) -> None:
        await self._execute("UPDATE routers SET last_seen=%s WHERE name=%s", (time.time(), name))

    # -- devices ---------------------------------------------------------------
    async def publish(self, router: str, devices: list[Device]) -> None:
        async def work(conn: Any) -> None:
            await conn.execute("DELETE FROM devices WHERE router=%s", (router,))
            async with conn.cursor() as cur:
                for d in devices:
                    await cur.execute(
                        "INSERT INTO devices(router, ae_title, description, services) VALUES (%s, %s, %s, %s)",
                        (router, d.ae_title, d.description, d.grants_json()),
                    )
                    if d.share_with:
                        await cur.executemany(
                            "INSERT INTO shares(router, ae_title, peer) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                            [(router, d.ae_title, peer) for peer in d.share_with],
                        )

        await self.in_transaction(work)

    async def devices(self) -> list[Device]:
        rows = await self._fetch(
            "SELECT d.router, d.ae_title, d.description,"
            " coalesce(array_agg(s.peer ORDER BY s.peer) FILTER (WHERE s.peer IS NOT NULL), '{}'), d.services"
            " FROM devices d JOIN routers r ON r.name=d.router AND r.enabled"  # a disabled router's are hidden
            " LEFT JOIN shares s ON s.router=d.router AND s.ae_title=d.ae_title"
            " GROUP BY d.router, d.ae_title ORDER BY d.router, d.ae_title"
        )
        return [Device(r, a, desc, tuple(peers), grants_from_json(svc)) for r, a, desc, peers, svc in rows]

    async def device(self, router: str, ae_title: str) -> Device | None:
        """One device by its primary key (an indexed lookup: an Open must not read the whole directory)."""
        rows = await self._fetch(
            "SELECT d.description,"
            " coalesce(array_agg(s.peer ORDER BY s.peer) FILTER (WHERE s.peer IS NOT NULL), '{}'), d.services"
            " FROM devices d JOIN routers r ON r.name=d.router AND r.enabled"
            " LEFT JOIN shares s ON s.router=d.router AND s.ae_title=d.ae_title"
            " WHERE d.router=%s AND d.ae_title=%s GROUP BY d.router, d.ae_title",
            (router, ae_title),
        )
        if not rows:
            return None
        description, peers, services = rows[0]
        return Device(router, ae_title, description, tuple(peers), grants_from_json(services))

    async def reachable_by(self, peer: str) -> list[Device]:
        return [d for d in await self.devices() if d.shared_with(peer)]

    # -- replicas and presence (relay_bridge.db.replicas) ------------------------------------
    async def register_replica(self, replica: Replica) -> None:
        r = replica
        await self._execute(
            replicas.pg(replicas.REGISTER),
            (r.id, r.address, r.started, r.lease_until, r.draining, r.sites, r.associations),
        )

    async def remove_replica(self, replica_id: str) -> None:
        async def work(conn: Any) -> None:
            await conn.execute(replicas.pg(replicas.DELETE_REPLICA_PRESENCE), (replica_id,))
            await conn.execute(replicas.pg(replicas.DELETE_REPLICA), (replica_id,))

        await self.in_transaction(work)

    async def claim_presence(self, site: str, replica_id: str, since: float, lease_until: float) -> bool:
        return await self._execute(replicas.pg(replicas.CLAIM), (site, replica_id, since, lease_until)) == 1

    async def renew_presence(self, replica_id: str, lease_until: float) -> set[str]:
        async def work(conn: Any) -> set[str]:
            cur = await conn.execute(replicas.pg(replicas.RENEW_PRESENCE), (lease_until, replica_id))
            return {str(s) for (s,) in await cur.fetchall()}

        return await self._with_connection(work, transaction=False)

    async def release_presence(self, site: str, replica_id: str) -> None:
        await self._execute(replicas.pg(replicas.RELEASE), (site, replica_id))

    async def live_replicas(self, now: float) -> list[Replica]:
        return [replicas.replica_from_row(r) for r in await self._fetch(replicas.pg(replicas.LIVE_REPLICAS), (now,))]

    async def live_presence(self, now: float) -> list[Presence]:
        rows = await self._fetch(replicas.pg(replicas.LIVE_PRESENCE), (now, now))
        return [replicas.presence_from_row(r) for r in rows]

    async def locate(self, site: str, now: float) -> tuple[str, str] | None:
        rows = await self._fetch(replicas.pg(replicas.LOCATE), (site, now, now))
        return None if not rows else (str(rows[0][0]), str(rows[0][1]))

    async def expire_replicas(self, before: float) -> None:
        async def work(conn: Any) -> None:
            await conn.execute(replicas.pg(replicas.EXPIRE_PRESENCE), (before,))
            await conn.execute(replicas.pg(replicas.EXPIRE_REPLICAS), (before,))

        await self.in_transaction(work)


def _one_line(exc: BaseException) -> str:
    """libpq's message on one line (it spans several), without a traceback."""
    return " ".join(str(exc).split())
