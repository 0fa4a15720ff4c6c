"""The operator's approvals of peer sites: approved fingerprints and sites waiting for approval.

The bridge is the only channel through which routers learn each other's keys, so a key
it offers for a site this router has never seen is not believed: the site is recorded as
*pending* with the fingerprint offered, and nothing reaches it or comes from it until the
hospital's operator has compared that fingerprint with the one the partner's operator
reads from its own router (`relay-router fingerprint`), by a channel the bridge does not
control, and approved it (`relay-router peers approve SITE --fingerprint FP`).

Two owner-only JSON files in the state directory, shared by the running router and the
`relay-router peers` commands (another process), so every read-modify-write holds an
advisory lock (`peers.lock`):

- `known_sites.json`: site -> approved fingerprint (the format of earlier versions, whose
  entries, trusted on first use then, stay approved);
- `pending_sites.json`: site -> {fingerprint, direction, first_seen, last_seen, attempts},
  at most `MAX_PENDING` sites (a bridge can invent names; beyond the cap new ones are
  refused without being recorded).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay_common.files import write_private
from relay_common.validate import SITE_NAME_RULE, is_site_name

KNOWN_FILE = "known_sites.json"
PENDING_FILE = "pending_sites.json"
LOCK_FILE = "peers.lock"
MAX_PENDING = 64
FINGERPRINT = re.compile(r"^[0-9a-f]{64}\Z")
DIRECTIONS = ("inbound", "outbound", "directory")


class ApprovalError(ValueError):
    """An approval the operator asked for cannot be made; the text says why and what to do."""


def check_fingerprint(text: str) -> str:
    """The fingerprint in canonical form (64 lower-case hex digits; spaces and colons ignored)."""
    canonical = re.sub(r"[\s:]", "", text).lower()
    if not FINGERPRINT.match(canonical):
        raise ApprovalError(
            f"{text!r} is not a fingerprint: 64 hexadecimal digits, as `relay-router fingerprint` prints them"
        )
    return canonical


@dataclass(frozen=True)
class Pending:
    site: str
    fingerprint: str
    direction: str  # "inbound" (it called us), "outbound" (we called it), "directory" (offered in the directory)
    first_seen: float
    last_seen: float
    attempts: int

    def as_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "direction": self.direction,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "attempts": self.attempts,
        }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"cannot read {path}: not a JSON object")
    return data


class ApprovalStore:
    """The two files of one state directory. Cheap to build; every method reads the files afresh."""

    def __init__(self, state_dir: Path, *, known_file: Path | None = None) -> None:
        self.state_dir = state_dir
        self.known_file = known_file or state_dir / KNOWN_FILE
        self.pending_file = state_dir / PENDING_FILE

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- reading ----------------------------------------------------------------------------
    def known(self) -> dict[str, str]:
        return {str(site): str(fp) for site, fp in _read_json(self.known_file).items()}

    def known_version(self) -> tuple[int, int] | None:
        """Changes when known_sites.json changes (another process approved or rejected a site)."""
        try:
            st = self.known_file.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def pending(self) -> dict[str, Pending]:
        entries: dict[str, Pending] = {}
        for site, row in _read_json(self.pending_file).items():
            try:
                entries[str(site)] = Pending(
                    str(site),
                    str(row["fingerprint"]),
                    str(row.get("direction", "directory")),
                    float(row.get("first_seen", 0)),
                    float(row.get("last_seen", 0)),
                    int(row.get("attempts", 0)),
                )
            except (KeyError, TypeError, ValueError):
                continue  # a damaged entry: the next sighting writes it again
        return entries

    # -- the running router ---------------------------------------------------------------------
    def remember_known(self, site: str, fingerprint: str) -> None:
        """Trust on first use (`trust_first_use = true`): record the key as approved."""
        with self._locked():
            known = self.known()
            known[site] = fingerprint
            self._write_known(known)

    def record_pending(self, site: str, fingerprint: str, direction: str, *, attempt: bool) -> bool:
        """Record (or refresh) a site waiting for approval. Returns True when the operator should be told:
        a new entry, or a different fingerprint than the one pending. False beyond `MAX_PENDING` sites."""
        if not is_site_name(site) or not FINGERPRINT.match(fingerprint) or direction not in DIRECTIONS:
            return False  # the bridge validates site names too; never write what we could not display
        with self._locked():
            pending = {s: p.as_json() for s, p in self.pending().items()}
            now = time.time()
            row = pending.get(site)
            if row is None and len(pending) >= MAX_PENDING:
                return False
            news = row is None or row["fingerprint"] != fingerprint
            if news:
                row = {"fingerprint": fingerprint, "direction": direction, "first_seen": now, "attempts": 0}
            assert row is not None
            if attempt:
                row["direction"] = direction
                row["attempts"] = int(row.get("attempts", 0)) + 1
            elif not news and not attempt:
                return False  # the same offer again in a directory message: nothing to write
            row["last_seen"] = now
            pending[site] = row
            write_private(self.pending_file, json.dumps(pending, indent=2, sort_keys=True))
            return news

    # -- the operator ---------------------------------------------------------------------------
    def approve(self, site: str, fingerprint: str) -> str:
        """Approve `site` with the fingerprint its operator gave us. Returns what was done, in words.

        Refused when the bridge currently offers another key for that site (its pending entry): the
        operator's fingerprint is the truth, and the bridge's key does not match it."""
        if not is_site_name(site):
            raise ApprovalError(f"{site!r} is not a site name ({SITE_NAME_RULE})")
        fingerprint = check_fingerprint(fingerprint)
        with self._locked():
            known = self.known()
            pending = self.pending()
            waiting = pending.get(site)
            if waiting is not None and waiting.fingerprint != fingerprint:
                raise ApprovalError(
                    f"NOT approved: the bridge offers {waiting.fingerprint} for {site}, not {fingerprint}. "
                    f"Either the fingerprint was mistyped, or the key the bridge offers is not {site}'s "
                    "(a malicious or compromised bridge, or a stolen password). Check with its operator."
                )
            before = known.get(site)
            known[site] = fingerprint
            self._write_known(known)
            if waiting is not None:
                del pending[site]
                self._write_pending(pending)
        if before == fingerprint:
            return f"{site} was already approved with {fingerprint}"
        if before is not None:
            return f"approved {site} with {fingerprint} (replacing {before})"
        if waiting is None:
            return f"approved {site} with {fingerprint} in advance (the bridge has not offered a key for it yet)"
        return f"approved {site} with {fingerprint}"

    def reject(self, site: str) -> str:
        """Forget `site`: its pending entry and its approval. Its next attempt waits for approval again."""
        with self._locked():
            known = self.known()
            pending = self.pending()
            dropped = [what for what, table in (("approval", known), ("pending request", pending)) if site in table]
            if not dropped:
                raise ApprovalError(f"{site} is neither approved nor pending")
            if known.pop(site, None) is not None:
                self._write_known(known)
            if pending.pop(site, None) is not None:
                self._write_pending(pending)
        return f"removed {site}'s {' and '.join(dropped)}: it cannot reach or call this router until approved"

    def _write_known(self, known: dict[str, str]) -> None:
        write_private(self.known_file, json.dumps(known, indent=2, sort_keys=True))

    def _write_pending(self, pending: dict[str, Pending]) -> None:
        rows = {s: p.as_json() for s, p in pending.items()}
        write_private(self.pending_file, json.dumps(rows, indent=2, sort_keys=True))


# -- `relay-router peers` ---------------------------------------------------------------------------


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(unix)) if unix else "-"


def peers_listing(store: ApprovalStore, pins: dict[str, str]) -> list[dict[str, Any]]:
    """One row per site: pinned in router.toml, approved, or pending (with what the bridge offered)."""
    rows: dict[str, dict[str, Any]] = {}
    for site, fp in store.known().items():
        rows[site] = {"site": site, "state": "approved", "fingerprint": fp}
    for site, fp in pins.items():
        rows[site] = {"site": site, "state": "pinned", "fingerprint": fp}
    for site, waiting in store.pending().items():
        row = rows.get(site)
        if row is None:
            rows[site] = {"site": site, "state": "pending", **waiting.as_json()}
        elif row["state"] == "approved" and row["fingerprint"] != waiting.fingerprint:
            # The bridge offers another key than the approved one: refused (identity_mismatch) until approved.
            rows[site] = {"site": site, "state": "changed", **waiting.as_json(), "approved": row["fingerprint"]}
    return [rows[s] for s in sorted(rows)]


def format_listing(own_site: str, own_fingerprint: str | None, rows: list[dict[str, Any]]) -> str:
    from relay_common.validate import printable

    lines = [f"this router: {own_site} {own_fingerprint or '(no identity yet)'}", ""]
    if not rows:
        return "\n".join([*lines, "no peer sites approved or pending"])
    lines.append(f"{'site':<24} {'state':<9} fingerprint")
    for row in rows:
        lines.append(f"{printable(row['site'], 63):<24} {row['state']:<9} {row['fingerprint']}")
        if row["state"] == "changed":
            lines.append(f"{'':<24} {'':<9} offered instead of the approved {row['approved']}")
        if row["state"] in ("pending", "changed"):
            lines.append(
                f"{'':<24} {'':<9} {row['direction']}, {row['attempts']} refused association(s), "
                f"first {_when(row['first_seen'])}, last {_when(row['last_seen'])}"
            )
    if any(row["state"] in ("pending", "changed") for row in rows):
        lines += [
            "",
            "Approve a pending site only after its operator has read you the same fingerprint from their router",
            "(`relay-router fingerprint`) by telephone or another channel the bridge does not carry:",
            "  relay-router peers approve SITE --fingerprint FINGERPRINT      (or: relay-router peers reject SITE)",
        ]
    return "\n".join(lines)
