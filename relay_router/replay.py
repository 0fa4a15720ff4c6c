"""The responder's replay record: association ids whose handshake verified, kept while a replay could matter.

An Open is accepted only within `FRESHNESS_WINDOW_S` of its signed time (relay_router.seal), so
an id must be remembered exactly that long, and across restarts: a bridge that recorded an Open
could otherwise replay it to a router that restarted a minute later. Hence:

- ids enter only after the handshake verified (`claim`), so forged notices cannot fill the record
  or push a real id out; only the peers we trust add entries, one per association they open;
- each id is kept until its Open's time has left the window (plus a margin for our own clock
  moving), then forgotten: the record is bounded by the window, not by a count;
- with a `path`, each claim is appended to a file (mode 0600) and flushed to disk before the
  device is contacted; the file is read back at start and compacted (rewritten atomically) when
  mostly expired.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from relay_router.seal import ASSOCIATION_ID, FRESHNESS_WINDOW_S

log = logging.getLogger("relay_router")

MARGIN_S = 60  # kept this much longer than the window, in case our clock is set back a little


class SeenAssociations:
    """Verified association ids and when each may be forgotten (Unix time), in memory and in `path`."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        window_s: float = FRESHNESS_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.window_s = window_s
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._lines = 0  # lines in the file since it was last compacted
        if path is not None:
            self._load(path)

    def __contains__(self, association_id: object) -> bool:
        expiry = self._expiry.get(association_id) if isinstance(association_id, str) else None
        return expiry is not None and expiry > self._clock()

    def __len__(self) -> int:
        self._expire()
        return len(self._expiry)

    def claim(self, association_id: str, sent_unix_ms: int | None = None) -> bool:
        """Record a verified association; False if it was already recorded (a replay).

        `sent_unix_ms` is the Open's signed time: the id is kept until that time has left the window."""
        if not ASSOCIATION_ID.fullmatch(association_id):
            raise ValueError(f"association id {association_id[:40]!r} is not 32 lowercase hex digits")
        if association_id in self:
            return False
        now = self._clock()
        sent = now if sent_unix_ms is None else sent_unix_ms / 1000
        expiry = max(sent, now) + self.window_s + MARGIN_S
        self._expire()
        self._expiry[association_id] = expiry
        if self.path is not None:
            self._append(self.path, association_id, expiry)
        return True

    def add(self, association_id: str) -> None:
        """Record an id as seen now (tests, and callers without a signed time)."""
        self.claim(association_id)

    # -- memory ------------------------------------------------------------------------
    def _expire(self) -> None:
        now = self._clock()
        for aid in [aid for aid, expiry in self._expiry.items() if expiry <= now]:
            del self._expiry[aid]

    # -- the file --------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return
        now = self._clock()
        bad = 0
        for line in text.splitlines():
            aid, _, expiry = line.partition(" ")
            try:
                when = float(expiry)
            except ValueError:
                bad += 1
                continue
            if ASSOCIATION_ID.fullmatch(aid) and when > now:
                self._expiry[aid] = max(when, self._expiry.get(aid, 0.0))
            elif not ASSOCIATION_ID.fullmatch(aid):
                bad += 1
        if bad:
            # A torn last line after a crash is expected; anything else would be worth a look.
            log.warning("replay record %s: skipped %d unreadable line(s)", path, bad)
        self._compact(path)

    def _append(self, path: Path, association_id: str, expiry: float) -> None:
        if self._lines > 2 * len(self._expiry) + 1000:
            self._compact(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{association_id} {expiry:.0f}\n".encode())
            os.fdatasync(fd)  # on disk before the device is contacted: a crash cannot reopen the window
        finally:
            os.close(fd)
        self._lines += 1

    def _compact(self, path: Path) -> None:
        """Rewrite the file with the live entries only: a new file (0600) renamed over the old one."""
        self._expire()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as out:
            out.write("".join(f"{aid} {expiry:.0f}\n" for aid, expiry in self._expiry.items()))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        self._lines = len(self._expiry)
