"""The far router's book of final outcomes the near router has not acknowledged yet, by calling site.

A delivered instance leaves router B's spool at once; its outcome must outlive that until router A says
it has it (an ACK record), so that one reached while no stream is open is sent on the next one, also after
a restart. The book was one JSON file rewritten (created, written, renamed) on every outcome: a tenth of
router B's CPU during a run of small objects. Now it is an append-only file of JSON lines, owner-only:

    {"site-a": {"<origin id>": ["<SOP Instance UID>", status, "error"], ...}}     a snapshot (first line)
    ["add", "site-a", "<origin id>", "<SOP Instance UID>", status, "error"]       one outcome
    ["forget", "site-a", ["<origin id>", ...]]                                   acknowledged

:meth:`add` appends one line (one ``write``; a process killed at any moment leaves whole lines, since the
kernel keeps what was written); every COMPACT_EVERY lines, and when opened, the file is rewritten as one
snapshot (atomically, relay_common.files.write_private). A line that does not parse (a crash of the machine
mid-append) is skipped with a warning: at worst an outcome is lost, which the near router's own retry of
the instance repairs (a repeated C-STORE of the same SOP Instance UID is harmless). The older format (one
JSON object) is the snapshot line alone, so an existing book opens unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from relay_common.files import write_private
from relay_router.accel import records

__all__ = ["COMPACT_EVERY", "MAX_OUTCOMES_PER_SITE", "OutcomeBook"]

log = logging.getLogger("relay_router.accel")
MAX_OUTCOMES_PER_SITE = 100_000  # unacknowledged outcomes kept for one site; the oldest go first
COMPACT_EVERY = 4096  # lines appended before the file is rewritten as one snapshot


class OutcomeBook:
    """Final outcomes not yet acknowledged by the near router, by calling site (persisted; thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sites: dict[str, dict[str, list[object]]] = {}
        self._lock = threading.Lock()  # the delivery pools' worker threads add, the event loop forgets
        self._fd = -1
        self._lines = 0
        self._load()
        with self._lock:
            try:
                self._compact()
            except OSError as exc:
                log.error("outcome book %s cannot be written (%s); outcomes are kept in memory", path, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def add(self, site: str, origin_id: str, sop_instance: str, status: int, error: str) -> None:
        """Keep an outcome until acknowledged; returns once it is in the file (the kernel's cache)."""
        with self._lock:
            book = self._sites.setdefault(site, {})
            book[origin_id] = [sop_instance, status, error[:200]]
            while len(book) > MAX_OUTCOMES_PER_SITE:
                book.pop(next(iter(book)))
            self._append(["add", site, origin_id, sop_instance, status, error[:200]])

    def pending(self, site: str) -> list[bytes]:
        with self._lock:
            items = list(self._sites.get(site, {}).items())
        return [
            records.outcome(origin_id, str(sop), int(str(status)), str(error))
            for origin_id, (sop, status, error) in items
        ]

    def forget(self, site: str, ids: tuple[str, ...]) -> None:
        with self._lock:
            book = self._sites.get(site, {})
            gone = [i for i in ids if book.pop(i, None) is not None]
            if gone:  # one lost in a crash comes back and is sent again: the near router ignores it
                self._append(["forget", site, gone])

    def count(self) -> int:
        with self._lock:
            return sum(len(book) for book in self._sites.values())

    # -- the file ------------------------------------------------------------------------------

    def _append(self, item: list[object]) -> None:
        """One line at the end (caller holds _lock); a rewrite every COMPACT_EVERY lines."""
        try:
            if self._fd < 0 or self._lines >= COMPACT_EVERY:
                self._compact()
            os.write(self._fd, json.dumps(item).encode("utf-8") + b"\n")
            self._lines += 1
        except OSError as exc:  # a full disk: the outcome is still sent on a live stream; say so
            log.error("outcome book %s: cannot append (%s); this outcome is kept in memory only", self.path, exc)

    def _compact(self) -> None:
        """Rewrite the file as one snapshot line and append to it from now on (caller holds _lock)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(self.path, json.dumps(self._sites) + "\n")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._lines = 0

    def _load(self) -> None:
        try:
            text = self.path.read_text("utf-8")
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("outcome book %s unreadable (%s); outcomes not yet reported are lost", self.path, exc)
            return
        skipped = 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                self._apply(json.loads(line))
            except (ValueError, TypeError, AttributeError, IndexError, KeyError):
                skipped += 1
        if skipped:
            log.warning("outcome book %s: %d damaged lines skipped (a crash mid-write)", self.path, skipped)

    def _apply(self, item: object) -> None:
        if isinstance(item, dict):  # a snapshot
            self._sites = {str(s): {str(i): list(v)[:3] for i, v in o.items()} for s, o in item.items()}
        elif isinstance(item, list) and item and item[0] == "add" and len(item) == 6:
            _, site, origin_id, sop, status, error = item
            self._sites.setdefault(str(site), {})[str(origin_id)] = [str(sop), int(status), str(error)]
        elif isinstance(item, list) and item and item[0] == "forget" and len(item) == 3:
            book = self._sites.get(str(item[1]), {})
            for origin_id in item[2]:
                book.pop(str(origin_id), None)
        else:
            raise ValueError("not an outcome book line")
