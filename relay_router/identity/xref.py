"""The cross-reference table: links between this hospital's patient IDs and partners' IDs, in SQLite.

One row links an identifier of our domain to one of another domain. The table lives in the
router's state directory (identity.sqlite, mode 0600: it is PHI). It is written by
`relay-router pix add|remove|import` and by ADT A40 merges, read by the resolver through
`XrefSource`; a change made by another process (the CLI while the router runs) is seen
through SQLite's data_version, and the resolver then drops its cached answers.

An identifier linked to two identifiers of the same other domain is ambiguous and maps to
nothing. `add` and `import` refuse to create that; a merge may (two partner records of the
same person), and the lookup then answers UNMAPPED until someone removes the stale link.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from relay_common.files import create_private
from relay_router.identity.model import IdentityError, Lookup, LookupOutcome, PatientRef

if TYPE_CHECKING:
    from pydicom import Dataset

DEFAULT_FILE = "identity.sqlite"
CSV_COLUMNS = ("local_id", "other_id", "other_issuer")  # and optionally local_issuer
MAX_IMPORT_ROWS = 1_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS link (
    local_id TEXT NOT NULL, local_issuer TEXT NOT NULL,
    other_id TEXT NOT NULL, other_issuer TEXT NOT NULL,
    origin TEXT NOT NULL,          -- cli, import, a40
    added TEXT NOT NULL,           -- UTC, ISO 8601
    PRIMARY KEY (local_id, local_issuer, other_id, other_issuer)
);
CREATE INDEX IF NOT EXISTS link_other ON link (other_id, other_issuer);
CREATE TABLE IF NOT EXISTS merge (
    prior_id TEXT NOT NULL, survivor_id TEXT NOT NULL, issuer TEXT NOT NULL,
    links_moved INTEGER NOT NULL, origin TEXT NOT NULL, at TEXT NOT NULL
);
"""


class XrefError(ValueError):
    """A change the table refuses (a conflicting link, a bad CSV row); the text says which and why."""


@dataclass(frozen=True)
class Link:
    local: PatientRef
    other: PatientRef
    origin: str = "cli"
    added: str = ""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class XrefTable:
    """Synchronous access (CLI, tests); the router uses it through XrefSource, off the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        create_private(path)  # born 0600; SQLite gives its journal files the same mode
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def data_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    # -- reading -----------------------------------------------------------------------------

    def linked(self, ref: PatientRef, target: str) -> list[PatientRef]:
        """The identifiers of domain `target` linked to `ref` (either side of a link)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT other_id, other_issuer FROM link WHERE local_id=? AND local_issuer=? AND other_issuer=? "
                "UNION SELECT local_id, local_issuer FROM link WHERE other_id=? AND other_issuer=? AND local_issuer=?",
                (ref.id, ref.issuer, target, ref.id, ref.issuer, target),
            ).fetchall()
        return [PatientRef(i, s) for i, s in rows]

    def links(self, *, patient_id: str = "", issuer: str = "") -> list[Link]:
        query = "SELECT local_id, local_issuer, other_id, other_issuer, origin, added FROM link"
        where, args = [], []
        if patient_id:
            where.append("(local_id=? OR other_id=?)")
            args += [patient_id, patient_id]
        if issuer:
            where.append("(local_issuer=? OR other_issuer=?)")
            args += [issuer, issuer]
        if where:
            query += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY local_issuer, local_id, other_issuer, other_id", args).fetchall()
        return [Link(PatientRef(a, b), PatientRef(c, d), o, t) for a, b, c, d, o, t in rows]

    # -- writing -----------------------------------------------------------------------------

    def add(self, local: PatientRef, other: PatientRef, *, origin: str = "cli", replace: bool = False) -> bool:
        """Link `local` and `other`; False when the link exists already.

        A link that would give `local` a second identifier in `other`'s domain (or `other` a
        second one in ours) is refused, unless `replace`, which removes the old link first.
        """
        with self._lock, self._transaction():
            return self._add(local, other, origin, replace)

    def add_many(self, links: Iterable[tuple[PatientRef, PatientRef]], *, origin: str, replace: bool) -> int:
        """All links or none (one transaction); returns the number of new links."""
        added = 0
        with self._lock, self._transaction():
            for local, other in links:
                added += self._add(local, other, origin, replace)
        return added

    def remove(self, local: PatientRef, other: PatientRef | None = None) -> int:
        """Remove the link between `local` and `other`, or every link of `local` when `other` is None."""
        with self._lock, self._transaction():
            if other is None:
                cursor = self._db.execute(
                    "DELETE FROM link WHERE local_id=? AND local_issuer=?", (local.id, local.issuer)
                )
            else:
                cursor = self._db.execute(
                    "DELETE FROM link WHERE local_id=? AND local_issuer=? AND other_id=? AND other_issuer=?",
                    (local.id, local.issuer, other.id, other.issuer),
                )
            return cursor.rowcount

    def merge(self, prior: PatientRef, survivor: PatientRef, *, origin: str = "a40") -> int:
        """`prior` was merged into `survivor` (same domain): its links move to `survivor`; returns how many."""
        if prior.issuer != survivor.issuer:
            raise XrefError(f"cannot merge across domains ({prior.issuer!r} into {survivor.issuer!r})")
        moved = 0
        with self._lock, self._transaction():
            for side in ("local", "other"):
                rows = self._db.execute(
                    f"SELECT local_id, local_issuer, other_id, other_issuer, origin FROM link "
                    f"WHERE {side}_id=? AND {side}_issuer=?",
                    (prior.id, prior.issuer),
                ).fetchall()
                for local_id, local_issuer, other_id, other_issuer, row_origin in rows:
                    if side == "local":
                        local_id = survivor.id
                    else:
                        other_id = survivor.id
                    self._db.execute(
                        "INSERT OR IGNORE INTO link VALUES (?, ?, ?, ?, ?, ?)",
                        (local_id, local_issuer, other_id, other_issuer, row_origin, _now()),
                    )
                    moved += 1
                self._db.execute(f"DELETE FROM link WHERE {side}_id=? AND {side}_issuer=?", (prior.id, prior.issuer))
            self._db.execute(
                "INSERT INTO merge VALUES (?, ?, ?, ?, ?, ?)",
                (prior.id, survivor.id, prior.issuer, moved, origin, _now()),
            )
        return moved

    def _add(self, local: PatientRef, other: PatientRef, origin: str, replace: bool) -> bool:
        if local.issuer == other.issuer:
            raise XrefError(f"{local} and {other} are in the same domain: a link joins two domains")
        if self._db.execute(
            "SELECT 1 FROM link WHERE local_id=? AND local_issuer=? AND other_id=? AND other_issuer=?",
            (local.id, local.issuer, other.id, other.issuer),
        ).fetchone():
            return False
        clashes = self._db.execute(
            "SELECT local_id, local_issuer, other_id, other_issuer FROM link "
            "WHERE (local_id=? AND local_issuer=? AND other_issuer=?) "
            "OR (other_id=? AND other_issuer=? AND local_issuer=?)",
            (local.id, local.issuer, other.issuer, other.id, other.issuer, local.issuer),
        ).fetchall()
        if clashes and not replace:
            a, b, c, d = clashes[0]
            raise XrefError(
                f"{local} -> {other} conflicts with the existing link {a}^^^{b} -> {c}^^^{d} "
                "(one identifier per domain; remove it first, or use --replace)"
            )
        for a, b, c, d in clashes:
            self._db.execute(
                "DELETE FROM link WHERE local_id=? AND local_issuer=? AND other_id=? AND other_issuer=?", (a, b, c, d)
            )
        self._db.execute(
            "INSERT INTO link VALUES (?, ?, ?, ?, ?, ?)",
            (local.id, local.issuer, other.id, other.issuer, origin, _now()),
        )
        return True

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def read_csv(text: str, *, local_issuer: str) -> list[tuple[PatientRef, PatientRef]]:
    """Links from CSV with a header row: local_id, other_id, other_issuer[, local_issuer].

    Every row is checked before anything is written; the first bad row is named by its line.
    """
    reader = csv.DictReader(io.StringIO(text))
    header = tuple(reader.fieldnames or ())
    missing = [c for c in CSV_COLUMNS if c not in header]
    unknown = [c for c in header if c not in (*CSV_COLUMNS, "local_issuer")]
    if missing or unknown:
        raise XrefError(
            f"line 1: the header must name {', '.join(CSV_COLUMNS)} (and optionally local_issuer); "
            + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}")
        )
    links: list[tuple[PatientRef, PatientRef]] = []
    for row in reader:
        line = reader.line_num
        if len(links) >= MAX_IMPORT_ROWS:
            raise XrefError(f"line {line}: more than {MAX_IMPORT_ROWS} rows; split the file")
        if None in row or any(v is None for v in row.values()):
            raise XrefError(f"line {line}: expected {len(header)} columns")
        try:
            local = PatientRef(row["local_id"], row.get("local_issuer") or local_issuer)
            other = PatientRef(row["other_id"], row["other_issuer"])
        except IdentityError as exc:
            raise XrefError(f"line {line}: {exc}") from None
        if not other.issuer:
            raise XrefError(f"line {line}: other_issuer is empty")
        links.append((local, other))
    return links


class XrefSource:
    """The cross-reference table as a mapping source (kind = "table")."""

    def __init__(self, table: XrefTable, *, name: str = "table", timeout_s: float = 2.0) -> None:
        self.table = table
        self.name = name
        self.timeout_s = timeout_s
        self._version: int | None = None

    async def lookup(self, ref: PatientRef, target: str, *, dataset: Dataset | None = None) -> Lookup:
        found = await asyncio.to_thread(self.table.linked, ref, target)
        if len(found) == 1:
            return Lookup(LookupOutcome.MAPPED, found[0], self.name)
        return Lookup(LookupOutcome.UNMAPPED, None, self.name)  # none, or ambiguous: never a guess

    async def changed(self) -> bool:
        """True when the table changed since the last call (another process, a merge): cached answers are stale."""
        version = await asyncio.to_thread(self.table.data_version)
        changed = self._version is not None and version != self._version
        self._version = version
        return changed
