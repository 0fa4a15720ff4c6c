"""Directory changes reach every replica: LISTEN/NOTIFY to wake, a periodic re-read as a safety net.

Whoever writes the directory (a replica's sign-on, `relay-bridge router disable` on any host, the
console) changes rows; PostgreSQL triggers (migration step 5) send `NOTIFY relay_directory` with
`router:<name>` when an account changed, `table:<name>` when devices or shares did. Each replica
LISTENs on one dedicated connection and, within `COALESCE_S` of a notice:
- reads the indexed view again (relay_bridge.directory_view) and sends routers their new directory;
- for `router:` notices, checks the accounts and cuts the streams it holds of a router that was
  disabled or removed (each replica cuts its own; the others hold no stream of that router).

Safety nets, on both backends (SQLite has no NOTIFY: a CLI writing the file is seen this way):
every `ACCOUNTS_POLL_S` one read of the accounts (one query per replica, not one per router);
every `RESYNC_S` the view is read again and broadcast if it differs. A lost LISTEN connection
is re-opened with backoff, followed by a full re-read (notices sent meanwhile are lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay_common.errors import RelayError

if TYPE_CHECKING:
    from relay_bridge.sessions import RouterSession
    from relay_bridge.state import BridgeState

log = logging.getLogger("relay_bridge")
CHANNEL = "relay_directory"
COALESCE_S = 0.05
ACCOUNTS_POLL_S = 2.0
RESYNC_S = 10.0
RECONNECT_MAX_S = 10.0
MAX_PAYLOAD_KEYS = 1000  # names remembered between two wake-ups; more: check every account


class DirectoryWatcher:
    """Keeps one replica's directory view and router streams in step with the database."""

    def __init__(
        self,
        state: BridgeState,
        *,
        refresh: Callable[[], None],
        cut: Callable[[RouterSession], Awaitable[None]],
        listen_url: str | None = None,
        password_file: Path | None = None,
    ) -> None:
        """`refresh`: forget the view and send routers their directory; `cut`: end a router's streams."""
        self.state = state
        self.refresh = refresh
        self.cut = cut
        self.listen_url = listen_url
        self.password_file = password_file
        self.listening = asyncio.Event()  # set while the LISTEN connection is up (tests and status)
        self.notices = 0
        self._wake = asyncio.Event()
        self._routers_named: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_view: object = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._poll_forever()), loop.create_task(self._react_forever())]
        if self.listen_url is not None:
            self._tasks.append(loop.create_task(self._listen_forever()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    # -- what a change does -------------------------------------------------------------------
    async def check_accounts(self) -> None:
        """Cut the sessions held here whose account is disabled or gone (one read of the accounts)."""
        routers = await self.state.directory.routers()
        enabled = {r.name for r in routers if r.enabled}
        for session in list(self.state.sessions.values()):
            if session.name not in enabled and not session.ended.is_set():
                log.warning("router %s was disabled or removed; cutting its streams", session.name)
                await self.cut(session)

    async def _react_forever(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(COALESCE_S)  # one re-read for a burst of notices (a publication is several)
            self._wake.clear()
            named, self._routers_named = self._routers_named, set()
            self.refresh()
            if named:
                await self._guarded(self.check_accounts(), "checking the accounts after a change")

    async def _poll_forever(self) -> None:
        resync_every = max(1, round(RESYNC_S / ACCOUNTS_POLL_S))
        rounds = 0
        while True:
            await asyncio.sleep(ACCOUNTS_POLL_S)
            rounds += 1
            await self._guarded(self.check_accounts(), "checking the accounts")
            if rounds % resync_every == 0:
                await self._guarded(self._resync(), "re-reading the directory")
                await self._guarded(self._housekeeping(), "renewing the association leases")

    async def _housekeeping(self) -> None:
        """Renew this replica's association leases and forget old sign-on failures (PostgreSQL only)."""
        state = self.state
        if state.shared_associations is not None:
            await state.shared_associations.renew(list(state.splices))
        if state.shared_sign_ons is not None:
            await state.shared_sign_ons.expire()

    async def _resync(self) -> None:
        """Read the view again; send routers their directory only when it changed."""
        cache = self.state.directory_cache
        cache.changed()
        view = await cache.view()
        fingerprint = (view.by_key, view.identities)
        if self._last_view is not None and fingerprint != self._last_view:
            log.info("the directory changed without a notice (safety-net re-read); routers are sent theirs")
            self.refresh()
        self._last_view = fingerprint

    async def _guarded(self, work: Awaitable[None], what: str) -> None:
        """A database that is away must not end the watcher: log once per failure and keep going."""
        try:
            await work
        except RelayError as exc:
            log.warning("%s failed: %s (the streams and associations held here carry on)", what, exc)

    # -- LISTEN -------------------------------------------------------------------------------
    def notified(self, payload: str) -> None:
        self.notices += 1
        kind, _, name = payload.partition(":")
        if kind == "router" and len(self._routers_named) < MAX_PAYLOAD_KEYS:
            self._routers_named.add(name)
        elif kind == "router":
            self._routers_named.add("*")
        self._wake.set()

    async def _listen_forever(self) -> None:
        from relay_bridge.db.postgres import _import_psycopg, _one_line, conninfo

        psycopg, _ = _import_psycopg()
        assert self.listen_url is not None
        delay = 0.5
        while True:
            try:
                info = conninfo(self.listen_url, self.password_file)
                conn: Any = await psycopg.AsyncConnection.connect(info, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    delay = 0.5
                    log.info("listening for directory changes (PostgreSQL NOTIFY %s)", CHANNEL)
                    self.notified("router:*")  # anything missed while not listening: check everything once
                    async for notice in conn.notifies():
                        self.notified(notice.payload)
            except (psycopg.Error, OSError) as exc:
                log.warning(
                    "the directory-change listener lost PostgreSQL (%s); retrying in %.1f s (the periodic "
                    "re-read still runs)",
                    _one_line(exc),
                    delay,
                )
            except RelayError as exc:  # e.g. an unreadable password file
                log.error("cannot listen for directory changes: %s", exc)
            self.listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
